//! Air-gapped sites: offline enrollment, offline-sync bundle import (with the reply bundle), and
//! agent revocation — the operator actions behind `gaffer-control enroll-offline`, `bundle import`
//! and `agent revoke`.
//!
//! Each action runs in whichever process holds the store: inside `serve` (reached through the
//! admin socket, [`crate::admin`]) or in the CLI itself when no server runs. Either way it is this
//! module's [`OfflineSync`] that does it.
//!
//! Files it uses in the data directory, besides the CA and server key:
//!
//! ```text
//! DATA_DIR/bundle.key   the control plane's age X25519 identity, 0600, created by `init` (or on
//!                       first use for older data dirs); agent bundles are encrypted to its
//!                       recipient, which agents get at enrollment
//! ```
//!
//! # Import guarantees
//! `import_bundle` checks, before it changes anything: size and layout → the bundle's fleet
//! fingerprint is ours → the signer certificate chains to our CA, is valid and not on our CRL, and
//! is the agent the header names → the signature → the agent is enrolled, not revoked, and has a
//! bundle key → the bundle number (lower than the last imported: refused; equal: nothing to do) →
//! decryption and decoding. Only then does it apply each message through [`Ingest::ingest`] (the
//! link's path: watermark dedupe, idempotent, fsync before acknowledging), lease the agent's
//! queued jobs to it, write the reply bundle, and finally record the bundle numbers and an audit
//! entry and flush. A crash at any point leaves a state from which importing the same file again
//! finishes the job without applying anything twice.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gaffer_certs::{BundleKey, BundleSigner, BundleSignerRole, BundleTrust, CertError, FleetCa, RevokedCert};
use gaffer_protocol::bundle::{self, AgentBundle, BundleDirection, BundleHeader, ControlReply, BUNDLE_BYTES_MAX};
use gaffer_protocol::enroll::{OfflineEnrollGrant, OfflineEnrollReply, OfflineEnrollRequest, OFFLINE_ENROLL_BYTES_MAX};
use gaffer_protocol::messages::{AgentId, Assignment};
use gaffer_protocol::version::{negotiate, VersionRange};
use serde::{Deserialize, Serialize};

use crate::datadir::DataDir;
use crate::identity::Pki;
use crate::ingest::{Ingest, IngestError, Ingested};
use crate::jobs::JobEvent;
use crate::scheduler::SubmitError;
use crate::store::{AgentRecord, AuditRecord, BundleNumbers, JobState, RevokedCertRecord, StoreError};
use crate::AppState;

/// Most jobs leased to one agent in one reply bundle.
pub const REPLY_ASSIGNMENTS_MAX: usize = 1000;
/// Validity of certificates issued by offline enrollment and renewal, days.
pub const OFFLINE_CERT_VALIDITY_DAYS: u32 = gaffer_certs::AGENT_CERT_VALIDITY_DAYS_DEFAULT;
/// [`OFFLINE_CERT_VALIDITY_DAYS`] in seconds. Air-gapped agents renew only when a bundle travels,
/// so their certificates keep the long lifetime; online agents' follow `--agent-cert-ttl`.
pub const OFFLINE_CERT_VALIDITY_SECS: u64 = OFFLINE_CERT_VALIDITY_DAYS as u64 * 86_400;

/// Errors of offline operations. Every refusal happens before any state changes.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The bundle or reply failed a cryptographic or format check (tampered, truncated, another
    /// fleet, revoked or wrong signer, undecryptable): nothing was imported.
    #[error(transparent)]
    Refused(#[from] CertError),
    /// The bundle is older than one already imported from that agent: nothing was imported.
    #[error("bundle {number} of agent {agent_id} is older than bundle {last} already imported; nothing was imported")]
    Outdated {
        /// The agent.
        agent_id: AgentId,
        /// This bundle's number.
        number: u64,
        /// The last imported.
        last: u64,
    },
    /// The agent is not enrolled here.
    #[error("agent {0} is not enrolled with this control plane")]
    UnknownAgent(AgentId),
    /// The agent is revoked.
    #[error("agent {0} is revoked; nothing was imported")]
    AgentRevoked(AgentId),
    /// An input file is invalid (the message says how); nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store failed; retrying may help (imports are idempotent).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Applying a message failed in the store; retrying may help.
    #[error("applying the bundle failed: {0}")]
    Ingest(#[from] IngestError),
    /// Recording the agent's rollout progress failed in the store; retrying may help (imports are
    /// idempotent).
    #[error("recording the rollout failed: {0}")]
    Rollout(#[from] crate::rollout::RolloutError),
}

/// Result of [`OfflineSync::import_bundle`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ImportReport {
    /// The bundle was applied and a reply bundle written.
    Imported {
        /// The agent.
        agent_id: AgentId,
        /// The bundle's number.
        bundle_number: u64,
        /// Messages applied now.
        applied: usize,
        /// Messages that had been applied before (redelivered).
        duplicates: usize,
        /// Messages refused as protocol violations (acknowledged so the agent drops them).
        rejected: usize,
        /// Number of the reply bundle written.
        reply_number: u64,
        /// Jobs leased to the agent in the reply.
        assignments: usize,
        /// Whether the reply carries a renewed certificate.
        renewed_cert: bool,
        /// Where the reply was written.
        reply_path: PathBuf,
    },
    /// The same bundle was imported before: nothing changed and no reply was written.
    AlreadyImported {
        /// The agent.
        agent_id: AgentId,
        /// The bundle's number.
        bundle_number: u64,
    },
}

/// Result of [`OfflineSync::enroll_offline`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfflineEnrollReport {
    /// The new agent.
    pub agent_id: AgentId,
    /// Its site.
    pub site: String,
    /// Where the reply was written.
    pub reply_path: PathBuf,
}

/// Result of [`OfflineSync::revoke_agent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevokeReport {
    /// The agent.
    #[schema(value_type = String, format = Uuid)]
    pub agent_id: AgentId,
    /// Serial of the revoked certificate, hex.
    pub serial_hex: String,
    /// False if it was already revoked (nothing changed).
    pub newly_revoked: bool,
}

/// The offline operations over one control plane's data dir and store.
pub struct OfflineSync {
    /// The CAs, the server certificate that signs replies (renewed while serving), renewals.
    pki: Arc<Pki>,
    dd: DataDir,
    bundle_key: BundleKey,
    state: AppState,
    ingest: Arc<Ingest>,
}

impl std::fmt::Debug for OfflineSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineSync").field("bundle_recipient", &self.bundle_key.recipient()).finish()
    }
}

/// `DATA_DIR/bundle.key`.
pub fn bundle_key_path(dd: &DataDir) -> PathBuf {
    dd.root().join("bundle.key")
}

/// Loads the control plane's bundle key, creating it (0600) if the data dir has none yet.
///
/// # Errors
/// [`OfflineError::Io`], [`OfflineError::Refused`] for an unreadable key file.
pub fn load_or_create_bundle_key(dd: &DataDir) -> Result<BundleKey, OfflineError> {
    let path = bundle_key_path(dd);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(BundleKey::from_secret_str(&text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = BundleKey::generate();
            gaffer_certs::write_secret_file(&path, key.secret_string().as_bytes())?;
            tracing::info!(path = %path.display(), recipient = %key.recipient(), "created the bundle key");
            Ok(key)
        }
        Err(e) => Err(io_err(&path, e)),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> OfflineError {
    OfflineError::Io { path: path.display().to_string(), source }
}

/// Reads a file of at most `max_bytes`, checking the size before reading it.
fn read_bounded(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>, OfflineError> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    if len > max_bytes {
        return Err(CertError::Bundle(bundle::BundleError::TooLarge {
            what: if what == "bundle" { "bundle" } else { "offline enrollment file" },
            len_bytes: len,
            max_bytes,
        })
        .into());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(OfflineError::Invalid(format!("{} grew past {max_bytes} bytes while being read", path.display())));
    }
    Ok(bytes)
}

impl OfflineSync {
    /// Opens the offline operations of the data dir `dd` over `state`, applying messages through
    /// `ingest` (pass the link's, [`crate::link::Link::ingest`], inside `serve`). Creates
    /// `bundle.key` if missing.
    ///
    /// # Errors
    /// [`OfflineError::Io`] for unreadable files; [`OfflineError::Refused`] for an unusable CA,
    /// server key or bundle key.
    pub fn open(dd: &DataDir, pki: Arc<Pki>, state: AppState, ingest: Arc<Ingest>) -> Result<Self, OfflineError> {
        let bundle_key = load_or_create_bundle_key(dd)?;
        // Fail now, not at the first import, if the server key cannot sign.
        let (server, _) = pki.server_pair();
        BundleSigner::from_pem(&server.cert_pem, &server.key_pem)?;
        Ok(Self { pki, dd: dd.clone(), bundle_key, state, ingest })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &DataDir {
        &self.dd
    }

    /// The control plane's certificate authority state.
    pub fn pki(&self) -> &Arc<Pki> {
        &self.pki
    }

    /// Moves the CA rotation to `phase` (see [`Pki::rotate`]), telling connected agents through
    /// their outgoing queues, and writes the audit entry.
    ///
    /// # Errors
    /// [`OfflineError::Invalid`] for a move that is not allowed or a failed step (the message says
    /// which); [`OfflineError::Store`].
    pub fn rotate_ca(
        &self,
        phase: crate::identity::RotationPhase,
        actor: &crate::store::Actor,
    ) -> Result<crate::identity::RotationReport, OfflineError> {
        let fleet_name = self.dd.load_config().map_err(|e| OfflineError::Invalid(e.to_string()))?.fleet_name;
        let fleet = self.state.scheduler.fleet();
        let connected = fleet.connected_agents();
        let now = crate::now_ms();
        let report = self
            .pki
            .rotate(phase, &fleet_name, &connected, &|agent, msg| fleet.send(agent, msg), now)
            .map_err(|e| OfflineError::Invalid(e.to_string()))?;
        let store = &self.state.store;
        let detail = format!(
            "{} → {}; current CA {}, next CA {}, agents enroll with {}; {} connected agents told",
            report.from,
            report.phase,
            report.current_ca_fingerprint,
            report.next_ca_fingerprint.as_deref().unwrap_or("none"),
            report.enroll_ca_fingerprint,
            report.agents_notified
        );
        store.append_audit(
            &crate::store::AuditRecord::new(actor, crate::store::audit_action::CA_ROTATE, now).detail(detail),
        )?;
        store.flush()?;
        Ok(report)
    }

    /// Where the CA rotation stands.
    ///
    /// # Errors
    /// [`OfflineError::Store`].
    pub fn ca_status(&self) -> Result<crate::identity::RotationStatus, OfflineError> {
        self.pki.rotation_status(self.state.store.as_ref()).map_err(|e| OfflineError::Invalid(e.to_string()))
    }

    /// The current CA (the one trusted at standby; the first of the trust set).
    fn ca(&self) -> Arc<FleetCa> {
        self.pki.trusted_cas().swap_remove(0)
    }

    /// The signer of replies and grants: the server certificate in use now, and its PEM.
    fn signer(&self) -> Result<(BundleSigner, String), OfflineError> {
        let (server, _) = self.pki.server_pair();
        Ok((BundleSigner::from_pem(&server.cert_pem, &server.key_pem)?, server.cert_pem))
    }

    /// The control plane's age recipient (`age1...`).
    pub fn bundle_recipient(&self) -> String {
        self.bundle_key.recipient()
    }

    /// The current CRL (PEM) listing every revoked agent certificate; the CRL number is the
    /// current time in milliseconds, so later lists have higher numbers.
    ///
    /// # Errors
    /// [`OfflineError::Store`], [`OfflineError::Refused`] if the CA cannot sign it.
    pub fn crl_pem(&self) -> Result<String, OfflineError> {
        crl_pem(&self.ca(), self.state.store.as_ref())
    }

    fn audit(
        &self,
        who: &str,
        action: &str,
        agent: Option<AgentId>,
        site: Option<String>,
        detail: String,
    ) -> Result<(), OfflineError> {
        self.state.store.append_audit(&AuditRecord {
            at_ms: crate::now_ms(),
            who: crate::ingest::truncate(who, 128),
            action: action.into(),
            agent,
            site,
            detail,
            job: None,
        })?;
        Ok(())
    }

    /// Signs an offline enrollment request (`gaffer-agent enroll --offline-request`) and writes the
    /// reply to `out`: creates the agent (marked offline), records `who` in the audit log.
    ///
    /// # Errors
    /// [`OfflineError::Invalid`] for an unreadable request, an unsupported protocol version, a bad
    /// site, CSR or recipient, or an agent id already enrolled; [`OfflineError::Io`],
    /// [`OfflineError::Store`].
    pub fn enroll_offline(&self, request: &Path, out: &Path, who: &str) -> Result<OfflineEnrollReport, OfflineError> {
        let bytes = read_bounded(request, OFFLINE_ENROLL_BYTES_MAX, "offline enrollment request")?;
        let req: OfflineEnrollRequest = serde_json::from_slice(&bytes).map_err(|e| {
            OfflineError::Invalid(format!("{} is not an offline enrollment request: {e}", request.display()))
        })?;
        negotiate(VersionRange::ours(), req.versions).map_err(|e| OfflineError::Invalid(e.to_string()))?;
        crate::scheduler::validate_site(&req.site).map_err(|e| OfflineError::Invalid(e.to_string()))?;
        gaffer_certs::check_bundle_recipient(&req.bundle_recipient)?;
        let store = &self.state.store;
        if store.get_agent(req.agent_id)?.is_some() {
            return Err(OfflineError::Invalid(format!(
                "agent id {} is already enrolled; make a new request from a fresh data dir",
                req.agent_id
            )));
        }
        let now = crate::now_ms();
        let issued = self
            .pki
            .sign_agent(req.agent_id, &req.csr_pem, "offline-enroll", Some(OFFLINE_CERT_VALIDITY_SECS), now)
            .map_err(|e| OfflineError::Invalid(e.to_string()))?;
        let cert_pem = issued.cert_pem.clone();
        let (signer, server_cert_pem) = self.signer()?;
        let grant = OfflineEnrollGrant {
            agent_id: req.agent_id,
            site: req.site.clone(),
            cert_pem: cert_pem.clone(),
            ca_pem: issued.ca_pems.concat(),
            server_cert_pem,
            bundle_recipient: self.bundle_key.recipient(),
            granted_at_ms: now,
            release_public_key: crate::release::ReleaseKeySource::open(&self.dd)
                .ok()
                .and_then(|s| s.current())
                .map(|k| *k.as_bytes()),
        };
        let grant_json = serde_json::to_string(&grant).map_err(|e| OfflineError::Invalid(e.to_string()))?;
        let signature = signer.sign(grant_json.as_bytes())?;
        use base64::Engine as _;
        let reply = OfflineEnrollReply {
            grant_json,
            signature_b64: base64::engine::general_purpose::STANDARD.encode(signature),
        };
        let reply_text = serde_json::to_string_pretty(&reply).map_err(|e| OfflineError::Invalid(e.to_string()))?;
        gaffer_certs::write_secret_file(out, reply_text.as_bytes())?;
        store.insert_agent(&AgentRecord {
            cert_not_after_unix: gaffer_certs::cert_not_after_unix(cert_pem.as_bytes())?,
            agent_version: Some(crate::ingest::truncate(&req.agent_version, 64)),
            bundle_recipient: Some(req.bundle_recipient.clone()),
            csr_pem: Some(req.csr_pem.clone()),
            cert_serial_hex: Some(gaffer_certs::cert_serial_hex(cert_pem.as_bytes())?),
            offline: true,
            cert_issuer_fingerprint: Some(issued.issue.issuer_fingerprint.clone()),
            cert_history: vec![issued.issue.clone()],
            ..AgentRecord::new(req.agent_id, req.site.clone(), crate::ingest::truncate(&req.hostname, 255), now)
        })?;
        self.audit(
            who,
            "enroll_offline",
            Some(req.agent_id),
            Some(req.site.clone()),
            format!("host {:?}, reply written to {}", crate::ingest::truncate(&req.hostname, 64), out.display()),
        )?;
        store.flush()?;
        tracing::info!(agent_id = %req.agent_id, site = %req.site, %who, "agent enrolled offline");
        Ok(OfflineEnrollReport { agent_id: req.agent_id, site: req.site, reply_path: out.to_path_buf() })
    }

    /// Revokes `agent_id`'s current certificate: it goes on the CRL (bundles it signs are refused,
    /// and `serve` refuses its link), and the agent record is marked revoked. Revoking twice
    /// changes nothing.
    ///
    /// # Errors
    /// [`OfflineError::UnknownAgent`]; [`OfflineError::Invalid`] if the record has no certificate
    /// serial (enrolled before revocation existed: re-enroll it); [`OfflineError::Store`].
    pub fn revoke_agent(&self, agent_id: AgentId, who: &str) -> Result<RevokeReport, OfflineError> {
        revoke_agent(&self.state, agent_id, who)
    }

    /// Imports an agent bundle and writes the reply bundle to `reply_out` (see the module docs for
    /// the order of checks and the guarantees).
    ///
    /// # Errors
    /// [`OfflineError::Refused`] (tampered, truncated, another fleet, revoked or wrong signer,
    /// undecryptable), [`OfflineError::Outdated`], [`OfflineError::UnknownAgent`],
    /// [`OfflineError::AgentRevoked`], [`OfflineError::Invalid`] — all before any state change;
    /// [`OfflineError::Io`], [`OfflineError::Store`], [`OfflineError::Ingest`] (retry the import).
    pub fn import_bundle(&self, bundle_path: &Path, reply_out: &Path, who: &str) -> Result<ImportReport, OfflineError> {
        let bytes = read_bounded(bundle_path, BUNDLE_BYTES_MAX, "bundle")?;
        let store = &self.state.store;
        let crl = self.crl_pem()?;
        // Signed by an agent certificate from any trusted CA (two during a rotation); the
        // current CA's answer is the one reported when none accepts it.
        let mut verified = None;
        for (i, ca) in self.pki.trusted_cas().iter().enumerate() {
            let ca_pem = ca.cert_pem();
            let ca_crl = if i == 0 { crl.clone() } else { crl_pem(ca, store.as_ref())? };
            let trust = BundleTrust { ca_pem: &ca_pem, crl_pem: &ca_crl };
            match gaffer_certs::verify_bundle(
                &bytes,
                trust,
                BundleDirection::AgentToControl,
                |h| BundleSignerRole::Agent(h.agent_id),
                gaffer_certs::UnixTime::now(),
            ) {
                Ok(p) => {
                    verified = Some(Ok(p));
                    break;
                }
                Err(e) if verified.is_none() => verified = Some(Err(e)),
                Err(_) => {}
            }
        }
        let parsed = verified.ok_or_else(|| OfflineError::Invalid("no CA is trusted".into()))??;
        let agent_id = parsed.header.agent_id;
        let number = parsed.header.bundle_number;
        let agent = store.get_agent(agent_id)?.ok_or(OfflineError::UnknownAgent(agent_id))?;
        if agent.revoked_at_ms.is_some() {
            return Err(OfflineError::AgentRevoked(agent_id));
        }
        let recipient = agent.bundle_recipient.clone().ok_or_else(|| {
            OfflineError::Invalid(format!(
                "agent {agent_id} enrolled without a bundle key; re-enroll it to use bundles"
            ))
        })?;
        let numbers = store.bundle_numbers(agent_id)?;
        if number < numbers.last_imported_bundle {
            return Err(OfflineError::Outdated { agent_id, number, last: numbers.last_imported_bundle });
        }
        if number == numbers.last_imported_bundle {
            tracing::info!(agent_id = %agent_id, number, "bundle already imported; nothing changed");
            return Ok(ImportReport::AlreadyImported { agent_id, bundle_number: number });
        }
        let plaintext = self.bundle_key.decrypt(parsed.ciphertext)?;
        let payload = AgentBundle::decode(&plaintext).map_err(CertError::from)?;
        if let Some(env) = payload.envelopes.iter().find(|e| e.agent_id != agent_id) {
            return Err(OfflineError::Invalid(format!(
                "bundle of agent {agent_id} carries a message of agent {}; nothing was imported",
                env.agent_id
            )));
        }

        // Checks done: apply.
        let (mut applied, mut duplicates, mut rejected) = (0, 0, 0);
        let mut acks = Vec::with_capacity(payload.envelopes.len());
        for env in payload.envelopes {
            let seq = env.seq;
            match self.ingest.ingest(agent_id, env, crate::now_ms()) {
                Ok(Ingested::Refused(reason)) => {
                    // Refused for good (lease check): acknowledged so the agent drops it.
                    tracing::warn!(agent_id = %agent_id, seq, %reason, "message in bundle refused");
                    rejected += 1;
                    acks.push(seq);
                }
                Ok(Ingested::Applied) => {
                    applied += 1;
                    acks.push(seq);
                }
                Ok(Ingested::Duplicate) => {
                    duplicates += 1;
                    acks.push(seq);
                }
                Ok(Ingested::Ephemeral) => {}
                Err(IngestError::Protocol(reason)) => {
                    tracing::warn!(agent_id = %agent_id, seq, %reason, "message in bundle refused");
                    rejected += 1;
                    if seq > 0 {
                        acks.push(seq);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let now = crate::now_ms();
        store.update_agent(agent_id, &mut |a| {
            a.last_seen_ms = Some(now);
            if let Some(c) = &payload.capabilities {
                a.capabilities = Some(c.clone());
            }
            if let Some(v) = &payload.agent_version {
                a.agent_version = Some(crate::ingest::truncate(v, 64));
            }
        })?;
        // Rollouts: the version the agent runs moves its target on; its reports were ingested.
        let mut update = None;
        if let Some(rollouts) = &self.state.rollouts {
            rollouts.on_agent_bundle(agent_id, payload.agent_version.as_deref(), now)?;
            // Only agents that write their version can decode a reply with a release.
            if payload.agent_version.is_some() {
                update = rollouts.order_for_bundle(agent_id, now).and_then(|order| {
                    rollouts
                        .bundled_release(&order)
                        .map_err(|e| {
                            tracing::error!(agent_id = %agent_id, rollout_id = order.rollout_id, error = %e,
                                "the release cannot go into the reply; the next import tries again")
                        })
                        .ok()
                });
            }
        }
        let agent = store.get_agent(agent_id)?.ok_or(OfflineError::UnknownAgent(agent_id))?;
        let assignments = self.lease_for(&agent, now)?;
        let renewed_cert_pem = self.renew_if_due(&agent, &parsed.header)?;
        let reply_number = numbers.last_reply_number + 1;
        let reply = ControlReply {
            acks,
            assignments,
            crl_pem: if crl.is_empty() { self.empty_crl()? } else { crl.clone() },
            renewed_cert_pem: renewed_cert_pem.clone(),
            trust_ca_pems: self.pki.trusted_ca_pems(),
            update,
        };
        let header = BundleHeader {
            direction: BundleDirection::ControlToAgent,
            ca_fingerprint: *self.pki.enroll_fingerprint().as_bytes(),
            agent_id,
            bundle_number: reply_number,
            created_at_ms: now,
            signer_cert_der: Vec::new(),
        };
        let payload = if payload.agent_version.is_some() {
            bundle::encode_payload(&reply)
        } else {
            // An agent that predates releases in bundles decodes only the older layout.
            reply.encode_without_update()
        }
        .map_err(CertError::from)?;
        let (signer, _) = self.signer()?;
        let file = gaffer_certs::seal_bundle(header, &payload, &recipient, &signer)?;
        gaffer_certs::write_secret_file(reply_out, &file)?;
        if let (Some(rollouts), Some(release)) = (&self.state.rollouts, &reply.update) {
            rollouts.on_bundle_order_written(agent_id, &release.order, now)?;
        }
        store.set_bundle_numbers(
            agent_id,
            &BundleNumbers { last_imported_bundle: number, last_reply_number: reply_number },
        )?;
        let n_assign = reply.assignments.len();
        self.audit(
            who,
            "bundle_import",
            Some(agent_id),
            Some(agent.site.clone()),
            format!(
                "bundle {number}: {applied} applied, {duplicates} duplicates, {rejected} rejected; reply {reply_number} \
                 with {} acks, {n_assign} jobs{}{}",
                reply.acks.len(),
                if renewed_cert_pem.is_some() { ", renewed certificate" } else { "" },
                reply.update.as_ref().map(|u| format!(", release {}", u.order.version)).unwrap_or_default()
            ),
        )?;
        store.flush()?;
        self.state.scheduler.wake();
        tracing::info!(agent_id = %agent_id, number, applied, duplicates, rejected, reply_number, "bundle imported");
        Ok(ImportReport::Imported {
            agent_id,
            bundle_number: number,
            applied,
            duplicates,
            rejected,
            reply_number,
            assignments: n_assign,
            renewed_cert: renewed_cert_pem.is_some(),
            reply_path: reply_out.to_path_buf(),
        })
    }

    fn empty_crl(&self) -> Result<String, OfflineError> {
        Ok(self.ca().revocation_list_pem(&[], crate::now_ms())?)
    }

    /// Jobs for the agent: those already leased to it and not started (a reply lost on the way is
    /// re-sent), then queued jobs it may run — by the same eligibility rules as the link's
    /// scheduler (site, pin, profile and models, volumes), known only once it reported
    /// capabilities — leased to it now through the job state machine, up to its free slots
    /// (`job_slots` minus the jobs it holds) and [`REPLY_ASSIGNMENTS_MAX`]. Its leases have no
    /// deadline (air-gapped).
    fn lease_for(&self, agent: &AgentRecord, now: u64) -> Result<Vec<Assignment>, OfflineError> {
        let store = &self.state.store;
        let mut out = Vec::new();
        let leased = self.state.scheduler.jobs_leased_to(agent.id)?;
        let held = leased.len();
        for j in leased {
            let Some(lease) = j.lease.filter(|_| j.state == JobState::Assigned) else { continue };
            if out.len() < REPLY_ASSIGNMENTS_MAX {
                out.push(Assignment { job_id: j.id, lease_id: lease.lease_id, path: j.path, profile: j.profile });
            }
        }
        let Some(caps) = agent.capabilities.as_ref() else { return Ok(out) };
        let slots = (caps.job_slots as usize).max(1);
        let room = slots.saturating_sub(held).min(REPLY_ASSIGNMENTS_MAX.saturating_sub(out.len()));
        if room == 0 {
            return Ok(out);
        }
        let mut leased = 0;
        for job in store.jobs_in_state(JobState::Queued, crate::scheduler::LEASE_PASS_JOBS_MAX)? {
            if leased >= room {
                break;
            }
            if crate::scheduler::eligibility(agent.id, &agent.site, caps, &job).is_err() {
                continue;
            }
            let event = JobEvent::Lease { agent: agent.id, offline: true };
            match self.state.scheduler.apply(job.id, &event, now) {
                Ok(Some(j)) => {
                    if let Some(lease) = j.lease.filter(|l| l.holder == agent.id && j.state == JobState::Assigned) {
                        out.push(Assignment {
                            job_id: j.id,
                            lease_id: lease.lease_id,
                            path: j.path,
                            profile: j.profile,
                        });
                        leased += 1;
                    }
                }
                Ok(None) | Err(SubmitError::Refused(_)) => {}
                Err(SubmitError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(OfflineError::Invalid(e.to_string())),
            }
        }
        Ok(out)
    }

    /// A new certificate for the agent's key when the certificate that signed this bundle is past
    /// half its lifetime.
    fn renew_if_due(&self, agent: &AgentRecord, header: &BundleHeader) -> Result<Option<String>, OfflineError> {
        let (not_before, not_after) = gaffer_certs::cert_validity_unix(&header.signer_cert_der)?;
        let now = (crate::now_ms() / 1000) as i64;
        if now < not_before + (not_after - not_before) / 2 {
            return Ok(None);
        }
        let Some(csr) = &agent.csr_pem else {
            tracing::warn!(agent_id = %agent.id, "certificate due for renewal but no CSR is on record");
            return Ok(None);
        };
        let issued = self
            .pki
            .sign_agent(agent.id, csr, "bundle", Some(OFFLINE_CERT_VALIDITY_SECS), crate::now_ms())
            .map_err(|e| OfflineError::Invalid(e.to_string()))?;
        crate::identity::record_issue(self.state.store.as_ref(), agent.id, csr, &issued.issue)?;
        Ok(Some(issued.cert_pem))
    }
}

/// Revokes an agent (the admin socket, the API and the dashboard all come here): every certificate
/// it may still hold goes on the CRL (air-gapped bundles are refused), the live revocation set is
/// updated (its handshakes fail and its open link closes on its next turn, within a second), its
/// leases are voided at once and its jobs requeued, and the audit log records `who`. Revoking twice
/// changes nothing.
///
/// # Errors
/// [`OfflineError::UnknownAgent`]; [`OfflineError::Invalid`] if the record has no certificate
/// serial; [`OfflineError::Store`].
pub fn revoke_agent(state: &AppState, agent_id: AgentId, who: &str) -> Result<RevokeReport, OfflineError> {
    let store = &state.store;
    let agent = store.get_agent(agent_id)?.ok_or(OfflineError::UnknownAgent(agent_id))?;
    let serial_hex = agent.cert_serial_hex.clone().ok_or_else(|| {
        OfflineError::Invalid(format!("agent {agent_id} has no recorded certificate serial; it cannot be revoked"))
    })?;
    if agent.revoked_at_ms.is_some() {
        return Ok(RevokeReport { agent_id, serial_hex, newly_revoked: false });
    }
    let now = crate::now_ms();
    // Every certificate it may still hold: the current one and any earlier one not yet expired
    // (online renewal issues a new one every half lifetime).
    let now_unix = (now / 1000) as i64;
    let mut serials: Vec<String> =
        agent.cert_history.iter().filter(|c| c.not_after_unix > now_unix).map(|c| c.serial_hex.clone()).collect();
    if !serials.contains(&serial_hex) {
        serials.push(serial_hex.clone());
    }
    for serial in &serials {
        store.insert_revoked_cert(&RevokedCertRecord {
            serial_hex: serial.clone(),
            agent: agent_id,
            revoked_at_ms: now,
        })?;
    }
    store.update_agent(agent_id, &mut |a| a.revoked_at_ms = Some(now))?;
    // From here on the handshake refuses it and its open link closes on its next turn.
    state.revocations.revoke(agent_id);
    // And on the other replicas, one of which may hold its link.
    state.replica.publish(crate::store::StoreEvent::AgentRevoked { agent: agent_id });
    store.append_audit(&AuditRecord {
        at_ms: now,
        who: crate::ingest::truncate(who, 128),
        action: crate::store::audit_action::REVOKE_AGENT.into(),
        agent: Some(agent_id),
        site: Some(agent.site.clone()),
        detail: format!("certificate serials {}", serials.join(", ")),
        job: None,
    })?;
    store.flush()?;
    let requeued = state.scheduler.agent_revoked(agent_id, now)?;
    tracing::warn!(agent_id = %agent_id, %who, serial = %serial_hex, certificates = serials.len(), jobs = requeued, "agent revoked");
    Ok(RevokeReport { agent_id, serial_hex, newly_revoked: true })
}

/// The CRL (PEM) of every revoked certificate in `store`, or an empty string when none is revoked.
/// The CRL number is the current time in milliseconds.
///
/// # Errors
/// [`OfflineError::Store`], [`OfflineError::Refused`] if the CA cannot sign it.
pub fn crl_pem(ca: &FleetCa, store: &dyn crate::store::Store) -> Result<String, OfflineError> {
    let revoked: Vec<RevokedCert> = store
        .list_revoked_certs()?
        .into_iter()
        .map(|r| RevokedCert { serial_hex: r.serial_hex, revoked_at_unix: (r.revoked_at_ms / 1000) as i64 })
        .collect();
    if revoked.is_empty() {
        return Ok(String::new());
    }
    Ok(ca.revocation_list_pem(&revoked, crate::now_ms())?)
}
