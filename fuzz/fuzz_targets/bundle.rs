//! Offline-sync bundles, the files air-gapped agents and the control plane carry on removable
//! media, through the checks each importer makes before it changes anything.
//!
//! Input: byte 0 selects what the rest is ([`gaffer_fuzz::input::BundleMode`]):
//! * a bundle file: verified as `gaffer-control bundle import` verifies an agent bundle (our CRL,
//!   signer = the agent the header names) and as `gaffer-agent bundle import` verifies a reply
//!   (signer = a control plane certificate); what verifies is decrypted and decoded;
//! * a decrypted payload, decoded as both payload types and checked as the importers check them
//!   (what a fleet member holding a valid key could send);
//! * an age ciphertext, decrypted with both bundle keys;
//! * a payload sealed with the real writer, which must verify and decrypt to itself.
//!
//! The fleet is `fuzz/fixtures/` ([`gaffer_fuzz::fleet`]); the seeds are real bundles of it, so
//! mutations start past the signature. No panic, and no allocation beyond what the input's size
//! justifies.
#![no_main]

use gaffer_certs::{BundleSignerRole, BundleTrust};
use gaffer_fuzz::input::BundleMode;
use gaffer_fuzz::Fleet;
use gaffer_protocol::bundle::{self, AgentBundle, BundleDirection, BundleHeader, ControlReply};
use libfuzzer_sys::fuzz_target;

/// What `gaffer-control bundle import` checks in a decrypted agent bundle before applying it:
/// it decodes, and every message is from the agent that signed it. True if it would be applied.
fn control_checks_payload(plaintext: &[u8], agent_id: uuid::Uuid) -> bool {
    match bundle::decode_payload::<AgentBundle>(plaintext) {
        Ok(payload) => payload.envelopes.iter().all(|e| e.agent_id == agent_id),
        Err(_) => false,
    }
}

/// What `gaffer-agent bundle import` checks in a decrypted reply before installing anything.
fn agent_checks_reply(fleet: &Fleet, plaintext: &[u8]) {
    let Ok(reply) = bundle::decode_payload::<ControlReply>(plaintext) else { return };
    if gaffer_certs::FleetCa::crls_from_pem(&reply.crl_pem).is_err() {
        return;
    }
    if let Some(cert) = &reply.renewed_cert_pem {
        // `renewed_cert_slot`: the certificate must pair with our key and name our agent id.
        if gaffer_agent::credentials::CertPair::new(fleet.agent_key.key_pem(), cert.clone(), fleet.agent_id).is_err() {
            return;
        }
    }
    if !reply.trust_ca_pems.is_empty() && gaffer_agent::credentials::check_trust_bundle(&reply.trust_ca_pems).is_err() {
        return;
    }
    for a in &reply.assignments {
        // The agent stores each assignment as its wire payload (`offline_assignments` tree).
        let frame = gaffer_protocol::codec::encode_frame(a, gaffer_protocol::FRAME_BYTES_MAX_DEFAULT)
            .unwrap_or_else(|e| panic!("a decoded assignment does not encode: {e}"));
        let back: gaffer_protocol::messages::Assignment =
            gaffer_protocol::codec::decode_payload(&frame[gaffer_protocol::FRAME_HEADER_BYTES..])
                .unwrap_or_else(|e| panic!("an encoded assignment does not decode: {e}"));
        assert_eq!(back.job_id, a.job_id);
    }
}

fn import_file(fleet: &Fleet, file: &[u8]) {
    let trust = BundleTrust { ca_pem: &fleet.ca_pem, crl_pem: &fleet.crl_pem };
    // The control plane's import.
    if let Ok(parsed) = gaffer_certs::verify_bundle(
        file,
        trust,
        BundleDirection::AgentToControl,
        |h: &BundleHeader| BundleSignerRole::Agent(h.agent_id),
        fleet.now(),
    ) {
        assert_eq!(parsed.header.direction, BundleDirection::AgentToControl);
        if let Ok(plaintext) = fleet.control_bundle_key.decrypt(parsed.ciphertext) {
            control_checks_payload(&plaintext, parsed.header.agent_id);
        }
    }
    // The agent's import of a reply.
    if let Ok(parsed) = gaffer_certs::verify_bundle(
        file,
        trust,
        BundleDirection::ControlToAgent,
        |_: &BundleHeader| BundleSignerRole::ControlPlane,
        fleet.now(),
    ) {
        assert_eq!(parsed.header.direction, BundleDirection::ControlToAgent);
        if parsed.header.agent_id == fleet.agent_id {
            if let Ok(plaintext) = fleet.agent_bundle_key.decrypt(parsed.ciphertext) {
                agent_checks_reply(fleet, &plaintext);
            }
        }
    }
}

fn seal_round_trip(fleet: &Fleet, payload: &[u8]) {
    let header = BundleHeader {
        direction: BundleDirection::AgentToControl,
        ca_fingerprint: *fleet.ca.fingerprint().as_bytes(),
        agent_id: fleet.agent_id,
        bundle_number: 1,
        created_at_ms: 0,
        signer_cert_der: Vec::new(),
    };
    let file = gaffer_certs::seal_bundle(header, payload, &fleet.control_bundle_key.recipient(), &fleet.agent_signer)
        .unwrap_or_else(|e| panic!("sealing a {}-byte payload failed: {e}", payload.len()));
    let trust = BundleTrust { ca_pem: &fleet.ca_pem, crl_pem: &fleet.crl_pem };
    let parsed = gaffer_certs::verify_bundle(
        &file,
        trust,
        BundleDirection::AgentToControl,
        |h: &BundleHeader| BundleSignerRole::Agent(h.agent_id),
        fleet.now(),
    )
    .unwrap_or_else(|e| panic!("a bundle sealed by the agent's key does not verify: {e}"));
    let plaintext = fleet
        .control_bundle_key
        .decrypt(parsed.ciphertext)
        .unwrap_or_else(|e| panic!("a sealed bundle does not decrypt: {e}"));
    assert_eq!(plaintext, payload, "the sealed payload came back different");
    control_checks_payload(&plaintext, fleet.agent_id);
}

fuzz_target!(|data: &[u8]| {
    let fleet = gaffer_fuzz::fleet();
    gaffer_fuzz::reset_largest_allocation();
    let Some((&selector, rest)) = data.split_first() else { return };
    match BundleMode::of(selector) {
        BundleMode::File => import_file(fleet, rest),
        BundleMode::Payload => {
            control_checks_payload(rest, fleet.agent_id);
            agent_checks_reply(fleet, rest);
        }
        BundleMode::Ciphertext => {
            if let Ok(p) = fleet.control_bundle_key.decrypt(rest) {
                control_checks_payload(&p, fleet.agent_id);
            }
            if let Ok(p) = fleet.agent_bundle_key.decrypt(rest) {
                agent_checks_reply(fleet, &p);
            }
        }
        BundleMode::Seal => seal_round_trip(fleet, rest),
    }
    gaffer_fuzz::check_allocations(data.len(), "bundle import");
});
