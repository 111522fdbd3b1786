//! Enrollment, online and offline: the one exchange that takes bytes from a client nobody has
//! authenticated yet, and the files of offline enrollment.
//!
//! Input: byte 0 selects what the rest is ([`gaffer_fuzz::input::EnrollInput`]):
//! * the `gaffer-enroll/1` stream as the control plane reads it: an `EnrollRequest` frame
//!   (64 KiB limit), then what it checks without I/O: protocol versions, the token, the bundle
//!   recipient, and signing the CSR with the fleet CA;
//! * the stream as the agent reads it: an `EnrollResponse` frame, then the recipient and the
//!   issued certificate checked against the agent's key;
//! * an offline enrollment request file, checked as `gaffer-control enroll-offline` does;
//! * an offline enrollment reply file, checked as `gaffer-agent enroll --offline-reply` does;
//! * a CSR, PEM, signed by the fleet CA.
//!
//! Every certificate the CA issues from fuzzed input must name the requested agent and chain to
//! the fleet CA. No panic, and no allocation beyond what the input's size justifies.
#![no_main]

use gaffer_certs::{ApiToken, BundleSignerRole, BundleTrust, CaFingerprint, EnrollmentToken, UnixTime};
use gaffer_fuzz::input::EnrollInput;
use gaffer_fuzz::Fleet;
use gaffer_protocol::enroll::{
    EnrollRequest, EnrollResponse, OfflineEnrollGrant, OfflineEnrollReply, OfflineEnrollRequest,
    ENROLL_FRAME_BYTES_MAX, OFFLINE_ENROLL_BYTES_MAX,
};
use gaffer_protocol::version::{negotiate, VersionRange};
use gaffer_protocol::FrameDecoder;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

/// The first message of an enrollment stream, as both sides read it (one read of everything).
fn first_frame<T: serde::de::DeserializeOwned>(stream: &[u8]) -> Option<T> {
    let mut dec = FrameDecoder::new(ENROLL_FRAME_BYTES_MAX);
    dec.push(stream);
    dec.next_message::<T>().ok().flatten()
}

/// Signs `csr_pem` for `agent_id` as enrollment does; whatever the CA issues must be a certificate
/// for that agent that chains to the fleet CA.
fn sign_and_check(fleet: &Fleet, csr_pem: &str, agent_id: Uuid, validity_days: u32) {
    let Ok(cert_pem) = fleet.ca.sign_agent_csr(csr_pem, agent_id, validity_days) else { return };
    gaffer_certs::cert_not_after_unix(cert_pem.as_bytes())
        .unwrap_or_else(|e| panic!("the CA issued an unreadable certificate: {e}"));
    gaffer_certs::cert_serial_hex(cert_pem.as_bytes())
        .unwrap_or_else(|e| panic!("the CA issued a certificate without a readable serial: {e}"));
    let der = {
        use rustls_pki_types::pem::PemObject as _;
        rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .unwrap_or_else(|e| panic!("the CA issued bad PEM: {e}"))
    };
    // Issued just now (backdated an hour), so checked at the current time.
    gaffer_certs::verify_signer(
        BundleTrust { ca_pem: &fleet.ca_pem, crl_pem: "" },
        &der,
        BundleSignerRole::Agent(agent_id),
        UnixTime::now(),
    )
    .unwrap_or_else(|e| panic!("a certificate the fleet CA issued for {agent_id} is not accepted: {e}"));
}

/// `gaffer-control`'s online enrollment (`link.rs`, `enroll_agent`), up to the store.
fn control_reads_request(fleet: &Fleet, stream: &[u8]) {
    let Some(req) = first_frame::<EnrollRequest>(stream) else { return };
    let _ = ApiToken::parse(&req.token);
    if negotiate(VersionRange::ours(), req.versions).is_err() || EnrollmentToken::parse(&req.token).is_err() {
        return;
    }
    if let Some(r) = &req.bundle_recipient {
        if gaffer_certs::check_bundle_recipient(r).is_err() {
            return;
        }
    }
    let _ = gaffer_control::ingest::truncate(&req.hostname, 255);
    let _ = gaffer_control::ingest::truncate(&req.agent_version, 64);
    sign_and_check(fleet, &req.csr_pem, req.agent_id, gaffer_certs::AGENT_CERT_VALIDITY_DAYS_DEFAULT);
}

/// `gaffer-agent enroll`'s handling of the answer.
fn agent_reads_response(fleet: &Fleet, stream: &[u8]) {
    // As `gaffer-agent enroll` reads it: the frame's payload, then either layout (protocol 4 with
    // the release key, or protocol 3 without).
    let mut dec = FrameDecoder::new(ENROLL_FRAME_BYTES_MAX);
    dec.push(stream);
    let Ok(Some(payload)) = dec.next_payload() else { return };
    let Ok(resp) = EnrollResponse::decode_payload(&payload) else { return };
    if let EnrollResponse::Enrolled { cert_pem, bundle_recipient, release_public_key, .. } = resp {
        if let Some(key) = &release_public_key {
            // What the agent pins: 32 bytes of an Ed25519 public key, or refused.
            let _ = gaffer_certs::ReleasePublicKey::from_bytes(key);
        }
        if let Some(r) = &bundle_recipient {
            if gaffer_certs::check_bundle_recipient(r).is_err() {
                return;
            }
        }
        let _ = fleet.agent_key.check_issued_cert(&cert_pem);
    }
}

/// `gaffer-control enroll-offline` (`offline.rs`, `enroll_offline`), up to the store.
fn control_reads_offline_request(fleet: &Fleet, bytes: &[u8]) {
    if bytes.len() as u64 > OFFLINE_ENROLL_BYTES_MAX {
        return;
    }
    let Ok(req) = serde_json::from_slice::<OfflineEnrollRequest>(bytes) else { return };
    if negotiate(VersionRange::ours(), req.versions).is_err()
        || gaffer_control::scheduler::validate_site(&req.site).is_err()
        || gaffer_certs::check_bundle_recipient(&req.bundle_recipient).is_err()
    {
        return;
    }
    sign_and_check(fleet, &req.csr_pem, req.agent_id, gaffer_control::offline::OFFLINE_CERT_VALIDITY_DAYS);
}

/// `gaffer-agent enroll --offline-reply` (`enroll.rs`, `install_offline_reply`), up to writing
/// files; the pending request is the fleet's agent.
fn agent_reads_offline_reply(fleet: &Fleet, bytes: &[u8]) {
    use base64::Engine as _;
    if bytes.len() as u64 > OFFLINE_ENROLL_BYTES_MAX {
        return;
    }
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(reply) = serde_json::from_str::<OfflineEnrollReply>(text) else { return };
    let Ok(grant) = serde_json::from_str::<OfflineEnrollGrant>(&reply.grant_json) else { return };
    match CaFingerprint::from_cert_pem(&grant.ca_pem) {
        Ok(fp) if fp == fleet.ca.fingerprint() => {}
        _ => return,
    }
    let server_der = {
        use rustls_pki_types::pem::PemObject as _;
        match rustls_pki_types::CertificateDer::from_pem_slice(grant.server_cert_pem.as_bytes()) {
            Ok(d) => d,
            Err(_) => return,
        }
    };
    let trust = BundleTrust { ca_pem: &grant.ca_pem, crl_pem: "" };
    if gaffer_certs::verify_signer(trust, &server_der, BundleSignerRole::ControlPlane, fleet.now()).is_err() {
        return;
    }
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(reply.signature_b64.trim()) else { return };
    if gaffer_certs::verify_detached_signature(&server_der, reply.grant_json.as_bytes(), &signature).is_err() {
        return;
    }
    if grant.agent_id != fleet.agent_id || gaffer_certs::check_bundle_recipient(&grant.bundle_recipient).is_err() {
        return;
    }
    let _ = fleet.agent_key.check_issued_cert(&grant.cert_pem);
}

fuzz_target!(|data: &[u8]| {
    let fleet = gaffer_fuzz::fleet();
    gaffer_fuzz::reset_largest_allocation();
    let Some((&selector, rest)) = data.split_first() else { return };
    match EnrollInput::of(selector) {
        EnrollInput::RequestFrame => control_reads_request(fleet, rest),
        EnrollInput::ResponseFrame => agent_reads_response(fleet, rest),
        EnrollInput::OfflineRequest => control_reads_offline_request(fleet, rest),
        EnrollInput::OfflineReply => agent_reads_offline_reply(fleet, rest),
        EnrollInput::Csr => {
            if let Ok(csr) = std::str::from_utf8(rest) {
                sign_and_check(fleet, csr, fleet.agent_id, 1);
            }
        }
    }
    gaffer_fuzz::check_allocations(data.len(), "enrollment");
});
