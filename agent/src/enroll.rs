//! Enrollment: turn a one-time token into a certificate, keeping the private key on this box.
//!
//! 1. Generate the agent id and an ECDSA P-256 key here; write the key 0600.
//! 2. Connect with ALPN `gaffer-enroll/1`; the TLS verifier accepts the control plane only if its
//!    chain ends in a CA whose SHA-256 matches `--ca-fingerprint` (so the token is never sent to an
//!    impostor).
//! 3. Send token + CSR; receive the signed certificate; check it is for our key and id; store it
//!    with the CA taken from the verified TLS chain.
//!
//! [`renew`] (`gaffer-agent enroll --renew`) does the same for an agent that is already enrolled,
//! keeping its agent id and state, and switching keys the crash-safe way of [`crate::credentials`].

use std::time::Duration;

use gaffer_certs::{AgentKey, CaFingerprint, ReleaseKeyFingerprint, ReleasePublicKey};
use gaffer_protocol::codec::{encode_frame, FrameDecoder};
use gaffer_protocol::enroll::{EnrollRequest, EnrollResponse, ENROLL_FRAME_BYTES_MAX};
use gaffer_protocol::version::VersionRange;

use crate::credentials::{self, CertPair};
use crate::datadir::{AgentIdentity, DataDir};
use crate::link::{client_endpoint, resolve, server_name_of};
use crate::AgentError;

/// How long enrollment may take end to end.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);

/// What `gaffer-agent enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollParams {
    /// `HOST:PORT` of the control plane's QUIC endpoint.
    pub control_addr: String,
    /// The one-time token (secret).
    pub token: String,
    /// Fingerprint printed with the token.
    pub ca_fingerprint: CaFingerprint,
    /// Site the operator expects; the control plane refuses a token for another site.
    pub site: Option<String>,
}

/// Enrolls the agent into `data_dir` and returns its identity; pins the control plane's release
/// key when it offers one ([`crate::release_key`]).
///
/// # Errors
/// [`AgentError::AlreadyEnrolled`]; [`AgentError::Unreachable`] when the control plane cannot be
/// reached or its CA does not match the fingerprint (the message says which); [`AgentError::Refused`]
/// when the token is unknown, used, expired or for another site.
pub async fn enroll(data_dir: &DataDir, params: &EnrollParams) -> Result<AgentIdentity, AgentError> {
    enroll_expecting_release_key(data_dir, params, None).await
}

/// [`enroll`], and with `release_key` (`gaffer-agent enroll --release-key-fingerprint`) the
/// enrollment fails unless the control plane offers the release key with that fingerprint.
///
/// The check comes after the control plane has answered (its token is spent then): on a mismatch
/// nothing is stored here and the control plane holds an agent record without an agent. Revoke it
/// (`gaffer-control agent revoke --agent ID`, the id is in the error) and enroll again with a new
/// token.
///
/// # Errors
/// As [`enroll`]; [`AgentError::ReleaseKeyMismatch`] when the offered key is another or missing.
pub async fn enroll_expecting_release_key(
    data_dir: &DataDir,
    params: &EnrollParams,
    release_key: Option<ReleaseKeyFingerprint>,
) -> Result<AgentIdentity, AgentError> {
    data_dir.create()?;
    let agent_id = uuid::Uuid::new_v4();
    let key = AgentKey::generate()?;
    gaffer_certs::write_secret_file(&data_dir.key_path(), key.key_pem().as_bytes())?;
    let csr_pem = key.csr_pem(agent_id)?;
    let bundle_key = gaffer_certs::BundleKey::generate();
    gaffer_certs::write_secret_file(&crate::bundle::bundle_key_path(data_dir), bundle_key.secret_string().as_bytes())?;

    let req = EnrollRequest {
        versions: VersionRange::ours(),
        token: params.token.trim().to_owned(),
        agent_id,
        csr_pem,
        hostname: crate::hostname(),
        site: params.site.clone(),
        agent_version: crate::build_version().to_owned(),
        bundle_recipient: Some(bundle_key.recipient()),
        renew: false,
    };
    let (resp, ca_pem) = exchange(&params.control_addr, params.ca_fingerprint, &req).await?;
    let checked = check_response(resp, agent_id).and_then(|granted| {
        let offered = granted.release_key.map(|k| k.fingerprint());
        match (release_key, offered) {
            (Some(expected), Some(offered)) if offered != expected => Err(AgentError::ReleaseKeyMismatch(format!(
                "the control plane offered release key {offered}, not {expected}; nothing was stored. The control \
                 plane has enrolled agent {agent_id}: revoke it and enroll again with a new token"
            ))),
            (Some(expected), None) => Err(AgentError::ReleaseKeyMismatch(format!(
                "the control plane offered no release key (expected {expected}): give it one (gaffer-control init \
                 --release-key-dir) or enroll without --release-key-fingerprint; nothing was stored. The control \
                 plane has enrolled agent {agent_id}: revoke it and enroll again with a new token"
            ))),
            _ => Ok(granted),
        }
    });
    let Granted { site, cert_pem, bundle_recipient: cp_recipient, release_key: offered_key } = match checked {
        Ok(granted) => granted,
        Err(e) => {
            // Nothing usable was written but the keys: remove them so the directory can be reused.
            let _ = std::fs::remove_file(data_dir.key_path());
            let _ = std::fs::remove_file(crate::bundle::bundle_key_path(data_dir));
            return Err(e);
        }
    };
    // For our key and our id, or nothing is stored.
    let pair = CertPair::new(key.key_pem(), cert_pem.clone(), agent_id)?;
    gaffer_certs::write_secret_file(&data_dir.cert_path(), cert_pem.as_bytes())?;
    gaffer_certs::write_secret_file(&data_dir.ca_path(), ca_pem.as_bytes())?;
    credentials::record_installed(data_dir, &pair.serial_hex, crate::now_ms())?;
    if let Some(key) = &offered_key {
        // A fresh data dir pins nothing else; a release.pub left from an earlier try is kept.
        if let crate::release_key::PinOutcome::Refused { pinned, offered } = crate::release_key::pin(data_dir, key)? {
            return Err(AgentError::ReleaseKeyMismatch(format!(
                "{} already pins release key {pinned}, the control plane offered {offered}; remove it or use a new \
                 --data-dir",
                crate::release_key::release_key_path(data_dir).display()
            )));
        }
        tracing::info!(fingerprint = %key.fingerprint(), "pinned the control plane's release key");
    }
    let identity = AgentIdentity {
        agent_id,
        site,
        control_addr: params.control_addr.clone(),
        ca_fingerprint: params.ca_fingerprint.to_string(),
        enrolled_at_ms: crate::now_ms(),
        bundle_recipient: cp_recipient,
    };
    // agent.json last: it is what makes the directory "enrolled".
    data_dir.store_identity(&identity)?;
    tracing::info!(%agent_id, serial = %pair.serial_hex, not_after = %crate::rfc3339_ms(pair.not_after_ms), "enrolled");
    Ok(identity)
}

/// What `gaffer-agent enroll --renew` needs.
#[derive(Debug, Clone)]
pub struct RenewParams {
    /// `HOST:PORT` of the control plane; None: the one in `agent.json`.
    pub control_addr: Option<String>,
    /// A fresh one-time token for the agent's site (secret).
    pub token: String,
    /// Fingerprint printed with the token; checked before the token is sent.
    pub ca_fingerprint: CaFingerprint,
}

/// Re-enrolls an agent that is already enrolled in `data_dir` (typically one whose certificate
/// expired while it was offline) with a fresh token, **keeping its identity**: the agent id, site,
/// bundle key and the `state/` database (outbox, job queue, watch ledger) are untouched. A new key
/// is made on the box (`agent.next.key`, 0600, before the request is sent; reused if an earlier
/// attempt's answer was lost) and the control plane is asked, with [`EnrollRequest::renew`], for a
/// certificate for it under the same agent id. The new pair then replaces the old one the same
/// crash-safe way an online renewal does ([`credentials::promote`]); a running agent picks it up at
/// its next connection attempt. `ca.pem` is kept when it already trusts the control plane's CA
/// (during a CA rotation it holds two), else replaced by it; `agent.json` records the fingerprint
/// and, when given, the new control address.
///
/// # Errors
/// [`AgentError::NotEnrolled`]; [`AgentError::Config`] when no control address is known or an
/// offline enrollment is pending; [`AgentError::Unreachable`] as [`enroll`];
/// [`AgentError::Refused`] when the control plane refuses (unknown or revoked agent, token used,
/// expired or for another site); [`AgentError::Protocol`] for a grant for another agent or site.
pub async fn renew(data_dir: &DataDir, params: &RenewParams) -> Result<AgentIdentity, AgentError> {
    let mut identity = data_dir.load_identity()?;
    if pending_offline_path(data_dir).exists() {
        return Err(AgentError::Config(format!(
            "{} has a pending offline enrollment; install its reply with --offline-reply instead",
            data_dir.root().display()
        )));
    }
    let control_addr = match &params.control_addr {
        Some(a) => a.clone(),
        None if !identity.control_addr.is_empty() => identity.control_addr.clone(),
        None => {
            return Err(AgentError::Config(
                "this agent enrolled offline and knows no control plane address: pass --control HOST:PORT".into(),
            ))
        }
    };
    let agent_id = identity.agent_id;
    let recovered = {
        let dd = data_dir.clone();
        tokio::task::spawn_blocking(move || credentials::recover(&dd, agent_id))
            .await
            .map_err(|e| AgentError::Config(format!("recovering the key files: {e}")))??
    };
    if recovered {
        tracing::info!("finished switching to the renewed certificate an earlier run had begun");
    }
    let key = credentials::next_key(data_dir)?;
    let bundle_recipient = match crate::bundle::load_bundle_key(data_dir) {
        Ok(k) => Some(k.recipient()),
        Err(e) => {
            tracing::warn!(error = %e, "no usable bundle key; re-enrolling without one (offline sync stays unavailable)");
            None
        }
    };
    let req = EnrollRequest {
        versions: VersionRange::ours(),
        token: params.token.trim().to_owned(),
        agent_id,
        csr_pem: key.csr_pem(agent_id)?,
        hostname: crate::hostname(),
        site: Some(identity.site.clone()),
        agent_version: crate::build_version().to_owned(),
        bundle_recipient,
        renew: true,
    };
    let (resp, ca_pem) = exchange(&control_addr, params.ca_fingerprint, &req).await?;
    // A refusal keeps agent.next.key: the next attempt asks for the same key again.
    let Granted { site, cert_pem, bundle_recipient: cp_recipient, release_key } = check_response(resp, agent_id)?;
    if site != identity.site {
        return Err(AgentError::Protocol(format!(
            "the control plane re-enrolled this agent into site {site:?}, but it belongs to {:?}; nothing was changed",
            identity.site
        )));
    }
    let pair = credentials::install_next_cert(data_dir, agent_id, &cert_pem, crate::now_ms())?;
    let trusted = credentials::trust_bundle(data_dir).unwrap_or_default();
    let enrolled_ca = gaffer_certs::trust_bundle_from_pem(&ca_pem)?;
    let already_trusted =
        trusted.iter().filter_map(|pem| gaffer_certs::trust_bundle_from_pem(pem).ok()).any(|ders| ders == enrolled_ca);
    if !already_trusted {
        credentials::write_trust_bundle(data_dir, &[ca_pem])?;
    }
    credentials::promote(data_dir, agent_id)?;
    identity.control_addr = control_addr;
    identity.ca_fingerprint = params.ca_fingerprint.to_string();
    if cp_recipient.is_some() {
        identity.bundle_recipient = cp_recipient;
    }
    data_dir.store_identity(&identity)?;
    if let Some(key) = release_key {
        // Pinned now if the agent enrolled before the control plane had a release key; never replaced.
        crate::release_key::pin_offered(data_dir, key.as_bytes(), "re-enrollment");
    }
    tracing::info!(%agent_id, serial = %pair.serial_hex, not_after = %crate::rfc3339_ms(pair.not_after_ms),
        "re-enrolled with a new key and certificate; agent id, job queue and outbox kept");
    Ok(identity)
}

/// What an enrollment answer grants.
struct Granted {
    site: String,
    cert_pem: String,
    /// The control plane's bundle recipient.
    bundle_recipient: Option<String>,
    /// The control plane's release public key (protocol 4).
    release_key: Option<ReleasePublicKey>,
}

/// The grant of an enrollment answer for `agent_id`.
fn check_response(resp: EnrollResponse, agent_id: uuid::Uuid) -> Result<Granted, AgentError> {
    match resp {
        EnrollResponse::Enrolled {
            agent_id: granted,
            site,
            cert_pem,
            ca_pem: _,
            bundle_recipient,
            release_public_key,
        } => {
            if granted != agent_id {
                return Err(AgentError::Protocol(format!(
                    "asked to enroll {agent_id}, got a certificate for {granted}"
                )));
            }
            if let Some(r) = &bundle_recipient {
                gaffer_certs::check_bundle_recipient(r)?;
            }
            let release_key = release_public_key.as_ref().map(ReleasePublicKey::from_bytes).transpose()?;
            Ok(Granted { site, cert_pem, bundle_recipient, release_key })
        }
        EnrollResponse::Refused { reason } => Err(AgentError::Refused(reason)),
    }
}

/// One enrollment exchange on ALPN `gaffer-enroll/1`: checks the control plane's CA by
/// `ca_fingerprint`, sends `req`, returns the answer and the CA certificate (PEM) from the verified
/// chain.
async fn exchange(
    control_addr: &str,
    ca_fingerprint: CaFingerprint,
    req: &EnrollRequest,
) -> Result<(EnrollResponse, String), AgentError> {
    let addr = resolve(control_addr).await?;
    let server_name = server_name_of(control_addr)?;
    let tls = gaffer_certs::client_config_enroll(ca_fingerprint)?;
    let endpoint = client_endpoint(addr, tls)?;
    let unreachable = |detail: String| AgentError::Unreachable { addr: control_addr.to_owned(), detail };

    let exchange = async {
        let conn = endpoint
            .connect(addr, &server_name)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(explain_connection_error(&e, &ca_fingerprint)))?;
        let peer_certs = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .ok_or_else(|| AgentError::Protocol("control plane presented no certificate".into()))?;
        let ca_pem = gaffer_certs::enrolled_ca_pem(&peer_certs, ca_fingerprint)?;
        // A stream error says only "connection lost"; the connection's close says why (e.g. the
        // control plane's "control plane busy, retry" when too many enrollments are open).
        let lost = |e: &dyn std::fmt::Display| unreachable(close_reason(&conn).unwrap_or_else(|| e.to_string()));
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        send.write_all(&encode_frame(req, ENROLL_FRAME_BYTES_MAX)?).await.map_err(|e| lost(&e))?;
        let _ = send.finish();
        let mut dec = FrameDecoder::new(ENROLL_FRAME_BYTES_MAX);
        let mut buf = vec![0u8; 16 * 1024];
        let resp = loop {
            // Either layout: protocol-3 control planes answer without the release key.
            if let Some(payload) = dec.next_payload()? {
                break EnrollResponse::decode_payload(&payload)?;
            }
            match recv.read(&mut buf).await.map_err(|e| lost(&e))? {
                Some(n) => dec.push(&buf[..n]),
                None => {
                    dec.finish()?;
                    return Err(AgentError::Protocol("control plane closed without answering".into()));
                }
            }
        };
        conn.close(0u32.into(), b"enrolled");
        Ok::<_, AgentError>((resp, ca_pem))
    };
    let result = tokio::time::timeout(ENROLL_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", ENROLL_TIMEOUT.as_secs())))?;
    endpoint.wait_idle().await;
    result
}

/// Why the control plane closed `conn`, when it did so with a reason ("control plane busy, retry
/// (code 8)"); None while it is open or when it went without one.
fn close_reason(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) if !close.reason.is_empty() => {
            Some(format!("the control plane closed the connection: {close}"))
        }
        _ => None,
    }
}

/// Turns a connection error into advice, recognizing a CA fingerprint mismatch.
fn explain_connection_error(e: &quinn::ConnectionError, expected: &CaFingerprint) -> String {
    let text = e.to_string();
    if !text.to_ascii_lowercase().contains("fingerprint") {
        return text;
    }
    // The verifier's error names the fingerprint it saw: "got: CaFingerprint(<hex>)".
    let got = text.split("got: CaFingerprint(").nth(1).and_then(|rest| rest.split(')').next()).unwrap_or("another CA");
    format!(
        "the control plane presented a CA with fingerprint {got}, not the expected {expected}; nothing was sent. \
         Check --ca-fingerprint against the output of `gaffer-control token create`, and that --control points at the \
         right host"
    )
}

/// `DATA_DIR/offline-request.json`: present while an offline enrollment waits for its reply.
pub fn pending_offline_path(data_dir: &DataDir) -> std::path::PathBuf {
    data_dir.root().join("offline-request.json")
}

/// Offline enrollment, step 1 (`gaffer-agent enroll --offline-request FILE`): creates the data
/// dir, generates the agent id, its ECDSA P-256 key (0600) and its age bundle key (0600), and
/// writes the request (CSR, id, site, host name, bundle recipient; nothing secret) to `out` and to
/// the data dir, which is then "pending offline enrollment".
///
/// # Errors
/// [`AgentError::AlreadyEnrolled`]; [`AgentError::Config`] if a request is already pending;
/// [`AgentError::Cert`], [`AgentError::Io`].
pub fn write_offline_request(
    data_dir: &DataDir,
    site: &str,
    out: &std::path::Path,
) -> Result<gaffer_protocol::enroll::OfflineEnrollRequest, AgentError> {
    if pending_offline_path(data_dir).exists() {
        return Err(AgentError::Config(format!(
            "{} already has a pending offline enrollment request; install the reply with --offline-reply",
            data_dir.root().display()
        )));
    }
    data_dir.create()?;
    let agent_id = uuid::Uuid::new_v4();
    let key = AgentKey::generate()?;
    gaffer_certs::write_secret_file(&data_dir.key_path(), key.key_pem().as_bytes())?;
    let bundle_key = gaffer_certs::BundleKey::generate();
    gaffer_certs::write_secret_file(&crate::bundle::bundle_key_path(data_dir), bundle_key.secret_string().as_bytes())?;
    let req = gaffer_protocol::enroll::OfflineEnrollRequest {
        versions: VersionRange::ours(),
        agent_id,
        csr_pem: key.csr_pem(agent_id)?,
        hostname: crate::hostname(),
        site: site.to_owned(),
        agent_version: crate::build_version().to_owned(),
        bundle_recipient: bundle_key.recipient(),
    };
    let json = serde_json::to_string_pretty(&req).map_err(|e| AgentError::Config(e.to_string()))?;
    std::fs::write(out, &json).map_err(|e| AgentError::io(out, e))?;
    let pending = pending_offline_path(data_dir);
    std::fs::write(&pending, &json).map_err(|e| AgentError::io(&pending, e))?;
    Ok(req)
}

/// Offline enrollment, step 2 (`gaffer-agent enroll --offline-reply FILE --ca-fingerprint FP`):
/// checks the reply and installs the certificate, the CA and the control plane's bundle recipient.
///
/// Checks, before writing anything: the reply's CA has the operator's fingerprint; the signing
/// certificate chains to that CA as a server certificate; the signature over the grant verifies;
/// the grant is for the pending agent id; the certificate is for our key and id.
///
/// # Errors
/// [`AgentError::Config`] if no request is pending or the reply is unreadable;
/// [`AgentError::Cert`] for a fingerprint mismatch ([`gaffer_certs::CertError::FingerprintMismatch`]),
/// a bad signer or signature; [`AgentError::Protocol`] for a grant to another agent.
pub fn install_offline_reply(
    data_dir: &DataDir,
    reply_path: &std::path::Path,
    ca_fingerprint: CaFingerprint,
) -> Result<AgentIdentity, AgentError> {
    use base64::Engine as _;
    use gaffer_protocol::enroll::{
        OfflineEnrollGrant, OfflineEnrollReply, OfflineEnrollRequest, OFFLINE_ENROLL_BYTES_MAX,
    };
    let pending_path = pending_offline_path(data_dir);
    let pending: OfflineEnrollRequest = match std::fs::read_to_string(&pending_path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| AgentError::Config(format!("{}: {e}", pending_path.display())))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AgentError::Config(format!(
                "{} has no pending offline enrollment: run `gaffer-agent enroll --offline-request` first",
                data_dir.root().display()
            )))
        }
        Err(e) => return Err(AgentError::io(&pending_path, e)),
    };
    let len = std::fs::metadata(reply_path).map_err(|e| AgentError::io(reply_path, e))?.len();
    if len > OFFLINE_ENROLL_BYTES_MAX {
        return Err(AgentError::Config(format!(
            "{} is {len} bytes: not an offline enrollment reply",
            reply_path.display()
        )));
    }
    let text = std::fs::read_to_string(reply_path).map_err(|e| AgentError::io(reply_path, e))?;
    let reply: OfflineEnrollReply = serde_json::from_str(&text)
        .map_err(|e| AgentError::Config(format!("{} is not an offline enrollment reply: {e}", reply_path.display())))?;
    let grant: OfflineEnrollGrant = serde_json::from_str(&reply.grant_json)
        .map_err(|e| AgentError::Config(format!("the reply's grant is unreadable: {e}")))?;
    let got = CaFingerprint::from_cert_pem(&grant.ca_pem)?;
    if got != ca_fingerprint {
        return Err(gaffer_certs::CertError::FingerprintMismatch { expected: ca_fingerprint, got }.into());
    }
    let server_der = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_slice(grant.server_cert_pem.as_bytes())
            .map_err(|e| AgentError::Config(format!("the reply's server certificate is unreadable: {e}")))?
    };
    gaffer_certs::verify_signer(
        gaffer_certs::BundleTrust { ca_pem: &grant.ca_pem, crl_pem: "" },
        &server_der,
        gaffer_certs::BundleSignerRole::ControlPlane,
        gaffer_certs::UnixTime::now(),
    )?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(reply.signature_b64.trim())
        .map_err(|e| AgentError::Config(format!("the reply's signature is not base64: {e}")))?;
    gaffer_certs::verify_detached_signature(&server_der, reply.grant_json.as_bytes(), &signature)?;
    if grant.agent_id != pending.agent_id {
        return Err(AgentError::Protocol(format!(
            "the reply enrolls agent {}, but this data dir requested {}",
            grant.agent_id, pending.agent_id
        )));
    }
    gaffer_certs::check_bundle_recipient(&grant.bundle_recipient)?;
    let key = AgentKey::from_pem(&data_dir.read(&data_dir.key_path())?)?;
    let cert_id = key.check_issued_cert(&grant.cert_pem)?;
    if cert_id != pending.agent_id {
        return Err(AgentError::Protocol(format!("certificate names agent {cert_id}, expected {}", pending.agent_id)));
    }
    let pair = CertPair::new(key.key_pem(), grant.cert_pem.clone(), pending.agent_id)?;
    gaffer_certs::write_secret_file(&data_dir.cert_path(), grant.cert_pem.as_bytes())?;
    gaffer_certs::write_secret_file(&data_dir.ca_path(), grant.ca_pem.as_bytes())?;
    credentials::record_installed(data_dir, &pair.serial_hex, crate::now_ms())?;
    if let Some(key) = &grant.release_public_key {
        crate::release_key::pin_offered(data_dir, key, "the offline enrollment reply");
    }
    let identity = AgentIdentity {
        agent_id: pending.agent_id,
        site: grant.site,
        control_addr: String::new(),
        ca_fingerprint: ca_fingerprint.to_string(),
        enrolled_at_ms: crate::now_ms(),
        bundle_recipient: Some(grant.bundle_recipient),
    };
    data_dir.store_identity(&identity)?;
    std::fs::remove_file(&pending_path).map_err(|e| AgentError::io(&pending_path, e))?;
    Ok(identity)
}
