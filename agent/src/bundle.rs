//! Offline sync for air-gapped agents: `gaffer-agent bundle export` and `bundle import`.
//!
//! * [`export`] writes every outbox entry not yet acknowledged into a bundle
//!   ([`gaffer_protocol::bundle`] format), encrypted with age to the control plane's recipient
//!   (`agent.json`'s `bundle_recipient`) and signed with `agent.key`, numbered one above the last
//!   export. An empty outbox still makes a valid bundle, so the agent can fetch jobs.
//! * [`import`] applies the control plane's reply: verifies it (our fleet, signed by a control plane
//!   certificate of our CA that our CRL does not revoke, for this agent, not older than the last reply
//!   imported) before changing anything; then removes acknowledged entries from the outbox, queues
//!   the assignments in the `offline_assignments` tree (the runner picks them up), stores the CRL,
//!   the trust bundle (`ca.pem`, when the reply carries one) and a renewed certificate (for the
//!   current key, or for a renewal key made before the agent went offline: then it switches to
//!   that pair, see [`crate::credentials`]). A release the reply carries (an air-gapped rollout)
//!   is verified and staged by [`crate::update::stage_bundled`]; a refused one is reported, and
//!   the rest of the reply is applied all the same.
//!
//! `ca.pem` may hold two CAs during a CA rotation: an export names (by fingerprint) the CA that
//! issued the agent's certificate, an import is verified against the CA the reply names.
//!
//! Both take an open `sled::Db` (the agent's `state/`), so the running agent can call them too.
//!
//! Files and sled keys:
//!
//! ```text
//! DATA_DIR/bundle.key   the agent's age X25519 identity, 0600 (created at enrollment)
//! DATA_DIR/crl.pem      the fleet CRL from the latest reply
//! ```
//!
//! | tree                  | key                       | value                                   |
//! |-----------------------|---------------------------|-----------------------------------------|
//! | `bundle_meta`         | `b"last_exported_bundle"` | u64 BE: number of the last export       |
//! | `bundle_meta`         | `b"last_imported_reply"`  | u64 BE: number of the last reply applied|
//! | `offline_assignments` | job UUID (16 bytes)       | bincode [`Assignment`] (wire payload)   |
//!
//! The export number is made durable *before* the file is written, so a number is never reused
//! for different contents.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use gaffer_certs::{BundleKey, BundleSigner, BundleSignerRole, BundleTrust};
use gaffer_protocol::bundle::{self, AgentBundle, BundleDirection, BundleHeader, ControlReply, BUNDLE_BYTES_MAX};
use gaffer_protocol::codec::{encode_frame, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES};
use gaffer_protocol::messages::{AgentEnvelope, Assignment};
use serde::{Deserialize, Serialize};

use crate::credentials::{self, CertPair, Credentials, Slot};
use crate::datadir::DataDir;
use crate::outbox::Outbox;
use crate::AgentError;

const LAST_EXPORTED: &[u8] = b"last_exported_bundle";
const LAST_IMPORTED_REPLY: &[u8] = b"last_imported_reply";

/// `DATA_DIR/bundle.key`: the agent's age identity (0600).
pub fn bundle_key_path(dd: &DataDir) -> PathBuf {
    dd.root().join("bundle.key")
}

/// `DATA_DIR/crl.pem`: the fleet CRL from the latest reply bundle.
pub fn crl_path(dd: &DataDir) -> PathBuf {
    dd.root().join("crl.pem")
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    /// The bundle's number.
    pub bundle_number: u64,
    /// Outbox entries it carries.
    pub messages: usize,
    /// Size of the file, bytes.
    pub size_bytes: u64,
    /// Where it was written.
    pub path: PathBuf,
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReplyImportReport {
    /// The reply was applied.
    Imported {
        /// The reply's number.
        reply_number: u64,
        /// Outbox entries acknowledged (removed).
        acked: usize,
        /// Jobs queued to run.
        assignments: usize,
        /// Whether a renewed certificate was installed.
        renewed_cert: bool,
        /// Entries still in the outbox.
        outbox_pending: u64,
        /// What became of the release the reply carried (None: it carried none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<crate::update::BundledOutcome>,
    },
    /// The same reply was imported before: nothing changed.
    AlreadyImported {
        /// The reply's number.
        reply_number: u64,
    },
}

fn meta_get(tree: &sled::Tree, key: &[u8]) -> Result<u64, AgentError> {
    match tree.get(key)? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| AgentError::Config(format!("corrupt bundle_meta entry ({} bytes)", v.len())))?,
        )),
    }
}

fn read_bounded(path: &Path, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
    let file = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let len = file.metadata().map_err(|e| AgentError::io(path, e))?.len();
    if len > max_bytes {
        return Err(gaffer_certs::CertError::Bundle(bundle::BundleError::TooLarge {
            what: "bundle",
            len_bytes: len,
            max_bytes,
        })
        .into());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| AgentError::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(AgentError::Config(format!("{} grew past {max_bytes} bytes while being read", path.display())));
    }
    Ok(bytes)
}

/// Loads the agent's bundle key.
///
/// # Errors
/// [`AgentError::Io`] if `bundle.key` is missing (enrolled before offline sync: re-enroll);
/// [`AgentError::Cert`] if it is unreadable.
pub fn load_bundle_key(dd: &DataDir) -> Result<BundleKey, AgentError> {
    let path = bundle_key_path(dd);
    Ok(BundleKey::from_secret_str(&dd.read(&path)?)?)
}

/// Writes a bundle of every unacknowledged outbox entry to `out` (see the module docs).
///
/// # Errors
/// [`AgentError::NotEnrolled`]; [`AgentError::Config`] if the agent has no control-plane bundle
/// recipient (enrolled before offline sync); [`AgentError::Cert`] if the keys are unusable or the
/// bundle exceeds the size limit; [`AgentError::State`], [`AgentError::Io`].
pub fn export(db: &sled::Db, dd: &DataDir, outbox: &Outbox, out: &Path) -> Result<ExportReport, AgentError> {
    let identity = dd.load_identity()?;
    let recipient = identity.bundle_recipient.clone().ok_or_else(|| {
        AgentError::Config(
            "this agent has no control-plane bundle key (enrolled before offline sync); re-enroll".into(),
        )
    })?;
    // The pair the control plane knows: the current one (a renewed pair not yet switched to only
    // when the current one is gone, as in an interrupted switch).
    let creds = Credentials::load(dd, identity.agent_id)?;
    let pair = creds.current.as_ref().or(creds.next.as_ref()).ok_or_else(|| {
        AgentError::Config(format!(
            "{} holds no key and certificate of this agent that belong together; re-enroll with `gaffer-agent \
             enroll --renew`",
            dd.root().display()
        ))
    })?;
    let signer = BundleSigner::from_pem(&pair.cert_pem, &pair.key_pem)?;
    // ca.pem may hold two CAs (a CA rotation): the bundle names the one that issued our certificate.
    let cas = credentials::trust_bundle(dd)?;
    let ca_pem = credentials::issuer_of(&cas, &pair.cert_pem, identity.agent_id)
        .or(cas.first())
        .ok_or_else(|| AgentError::Config("ca.pem holds no CA certificate".into()))?;
    let ca_fingerprint = gaffer_certs::CaFingerprint::from_cert_pem(ca_pem)?;
    let envelopes: Vec<AgentEnvelope> = outbox
        .entries()?
        .into_iter()
        .map(|e| AgentEnvelope { agent_id: identity.agent_id, seq: e.seq, body: e.message })
        .collect();
    let messages = envelopes.len();
    // What `run` last advertised, so the control plane can also send site-wide jobs this agent
    // can reach (absent if the agent never ran: then only jobs pinned to it come back).
    let capabilities = std::fs::read(dd.capabilities_path()).ok().and_then(|b| serde_json::from_slice(&b).ok());
    // The version the agent runs (a rollout's selection, or the binary on trial), not the version
    // of whichever binary runs this export.
    let agent_version = Some(crate::update::running_version(dd, crate::build_version()));
    let payload = bundle::encode_payload(&AgentBundle { envelopes, capabilities, agent_version })
        .map_err(gaffer_certs::CertError::from)?;

    let meta = db.open_tree("bundle_meta")?;
    let number = meta_get(&meta, LAST_EXPORTED)? + 1;
    meta.insert(LAST_EXPORTED, &number.to_be_bytes())?;
    meta.flush()?;

    let header = BundleHeader {
        direction: BundleDirection::AgentToControl,
        ca_fingerprint: *ca_fingerprint.as_bytes(),
        agent_id: identity.agent_id,
        bundle_number: number,
        created_at_ms: crate::now_ms(),
        signer_cert_der: Vec::new(),
    };
    let file = gaffer_certs::seal_bundle(header, &payload, &recipient, &signer)?;
    gaffer_certs::write_secret_file(out, &file)?;
    tracing::info!(bundle_number = number, messages, size_bytes = file.len(), path = %out.display(), "bundle exported");
    Ok(ExportReport { bundle_number: number, messages, size_bytes: file.len() as u64, path: out.to_path_buf() })
}

/// Applies a reply bundle from the control plane (see the module docs). Every check happens
/// before anything changes; importing the same reply twice changes nothing the second time.
///
/// # Errors
/// [`AgentError::Cert`] for a bundle that is tampered with, truncated, from another fleet, signed
/// by a revoked or wrong certificate, or undecryptable; [`AgentError::BundleNotForThisAgent`];
/// [`AgentError::BundleOutdated`]; [`AgentError::Protocol`] for a payload that does not decode or
/// a renewed certificate that is not for our key; [`AgentError::State`], [`AgentError::Io`].
pub fn import(db: &sled::Db, dd: &DataDir, outbox: &Outbox, file: &Path) -> Result<ReplyImportReport, AgentError> {
    let identity = dd.load_identity()?;
    let cas = credentials::trust_bundle(dd)?;
    let crl_pem = match std::fs::read_to_string(crl_path(dd)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(AgentError::io(&crl_path(dd), e)),
    };
    let bytes = read_bounded(file, BUNDLE_BYTES_MAX)?;
    // ca.pem may hold two CAs (a CA rotation): verify against the one the bundle names (with none
    // of ours named, the first one refuses it as another fleet's).
    let named = bundle::parse_bundle(&bytes).map_err(gaffer_certs::CertError::from)?.header.ca_fingerprint;
    let ca_pem = cas
        .iter()
        .find(|ca| gaffer_certs::CaFingerprint::from_cert_pem(ca).is_ok_and(|f| *f.as_bytes() == named))
        .or(cas.first())
        .ok_or_else(|| AgentError::Config("ca.pem holds no CA certificate".into()))?;
    let parsed = gaffer_certs::verify_bundle(
        &bytes,
        BundleTrust { ca_pem, crl_pem: &crl_pem },
        BundleDirection::ControlToAgent,
        |_| BundleSignerRole::ControlPlane,
        gaffer_certs::UnixTime::now(),
    )?;
    if parsed.header.agent_id != identity.agent_id {
        return Err(AgentError::BundleNotForThisAgent { agent_id: parsed.header.agent_id });
    }
    let number = parsed.header.bundle_number;
    let meta = db.open_tree("bundle_meta")?;
    let last = meta_get(&meta, LAST_IMPORTED_REPLY)?;
    if number < last {
        return Err(AgentError::BundleOutdated { number, last });
    }
    if number == last {
        tracing::info!(reply_number = number, "reply already imported; nothing changed");
        return Ok(ReplyImportReport::AlreadyImported { reply_number: number });
    }
    let plaintext = load_bundle_key(dd)?.decrypt(parsed.ciphertext)?;
    let reply = ControlReply::decode(&plaintext).map_err(|e| AgentError::Protocol(e.to_string()))?;
    // Validate what will be installed before installing anything.
    gaffer_certs::FleetCa::crls_from_pem(&reply.crl_pem)?;
    // A renewed certificate is for the current key (the CSR on record), or for the renewal key
    // when the agent had asked online before it went offline.
    let renewed = match &reply.renewed_cert_pem {
        None => None,
        Some(cert) => Some(renewed_cert_slot(dd, identity.agent_id, cert)?),
    };
    if !reply.trust_ca_pems.is_empty() {
        credentials::check_trust_bundle(&reply.trust_ca_pems)?;
    }
    let mut encoded = Vec::with_capacity(reply.assignments.len());
    for a in &reply.assignments {
        encoded.push((a.job_id, encode_assignment(a)?));
    }

    // Apply.
    for seq in &reply.acks {
        outbox.ack(*seq)?;
    }
    let queue = db.open_tree("offline_assignments")?;
    for (job_id, value) in &encoded {
        queue.insert(job_id.as_bytes(), value.as_slice())?;
    }
    if !reply.crl_pem.is_empty() {
        gaffer_certs::write_secret_file(&crl_path(dd), reply.crl_pem.as_bytes())?;
    }
    if !reply.trust_ca_pems.is_empty() && credentials::write_trust_bundle(dd, &reply.trust_ca_pems)? {
        tracing::info!(cas = reply.trust_ca_pems.len(), "installed the reply's trust bundle");
    }
    if let (Some(cert), Some(slot)) = (&reply.renewed_cert_pem, renewed) {
        let pair = match slot {
            Slot::Current => {
                let pair = CertPair::new(dd.read(&dd.key_path())?, cert.clone(), identity.agent_id)?;
                gaffer_certs::write_secret_file(&dd.cert_path(), cert.as_bytes())?;
                credentials::record_installed(dd, &pair.serial_hex, crate::now_ms())?;
                pair
            }
            // Issued by the control plane for our renewal key: switch to it (no link to try it on).
            Slot::Next => {
                credentials::install_next_cert(dd, identity.agent_id, cert, crate::now_ms())?;
                credentials::promote(dd, identity.agent_id)?
            }
        };
        tracing::info!(serial = %pair.serial_hex, not_after = %crate::rfc3339_ms(pair.not_after_ms),
            "installed the renewed certificate");
    }
    // A release (air-gapped rollout): staged or refused, and reported, as the link's updater does.
    let release = match &reply.update {
        Some(r) => Some(crate::update::stage_bundled(dd, db, outbox, r, crate::build_version())?),
        None => None,
    };
    meta.insert(LAST_IMPORTED_REPLY, &number.to_be_bytes())?;
    db.flush()?;
    tracing::info!(reply_number = number, acked = reply.acks.len(), assignments = encoded.len(), "reply imported");
    Ok(ReplyImportReport::Imported {
        reply_number: number,
        acked: reply.acks.len(),
        assignments: encoded.len(),
        renewed_cert: reply.renewed_cert_pem.is_some(),
        outbox_pending: outbox.len(),
        release,
    })
}

/// Which key a reply's renewed certificate is for.
///
/// # Errors
/// [`AgentError::Protocol`] when it is for neither key of this agent (or names another agent).
fn renewed_cert_slot(
    dd: &DataDir,
    agent_id: gaffer_protocol::messages::AgentId,
    cert_pem: &str,
) -> Result<Slot, AgentError> {
    let key = |path: &Path| std::fs::read_to_string(path).ok();
    let fits =
        |key_pem: Option<String>| key_pem.is_some_and(|k| CertPair::new(k, cert_pem.to_owned(), agent_id).is_ok());
    if fits(key(&dd.key_path())) {
        return Ok(Slot::Current);
    }
    if fits(key(&dd.next_key_path())) {
        return Ok(Slot::Next);
    }
    let named = {
        use rustls_pki_types::pem::PemObject as _;
        rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .ok()
            .and_then(|der| gaffer_certs::agent_id_from_cert_der(&der).ok())
    };
    Err(AgentError::Protocol(match named {
        Some(id) if id != agent_id => format!("renewed certificate names agent {id}, not {agent_id}"),
        _ => "the renewed certificate is not for this agent's key".to_owned(),
    }))
}

fn encode_assignment(a: &Assignment) -> Result<Vec<u8>, AgentError> {
    let frame = encode_frame(a, FRAME_BYTES_MAX_DEFAULT)?;
    Ok(frame[FRAME_HEADER_BYTES..].to_vec())
}
