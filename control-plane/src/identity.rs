//! Agent and control-plane identity: issuing and renewing certificates, live revocation, the
//! trusted CA set and its rotation.
//!
//! # Certificate lifecycle
//! * **Issue.** An agent enrolls with a one-time token and a CSR for a key it generated; the issuing
//!   CA signs it for `--agent-cert-ttl` (default 7 days, at least 60 s) — [`Pki::issue_agent_cert`],
//!   which records the serial, expiry and issuing CA on the agent ([`AgentRecord::cert_history`]).
//! * **Renew.** At half its lifetime the agent sends a new CSR over the link
//!   (`AgentMessage::CertificateRequest`); the same function signs it (via `renew`). Offline agents
//!   get renewals in reply bundles (via `bundle`). The control plane renews its own server
//!   certificate the same way ([`Pki::renew_server_cert_if_due`]) and rebuilds its TLS configs
//!   (subscribers of [`Pki::subscribe`]).
//! * **Revoke.** [`Revocations`] is the live set of revoked agents: the QUIC endpoint's client
//!   verifier asks it at every handshake ([`LinkCertPolicy`]), the link closes a revoked agent's
//!   open connection on its next turn, and the scheduler voids its leases at once. Expired
//!   certificates fail the handshake; open connections close when their certificate expires.
//! * **Rotate.** [`Pki::rotate`] moves through Teleport's phases (see [`RotationPhase`]): `init`
//!   creates the next CA and trusts both, `update-clients` issues agent certificates from the next
//!   CA and asks every agent to renew, `update-servers` reissues the server certificate from it,
//!   `standby` drops the old CA; `rollback` returns to the old CA from any phase before `standby`.
//!
//! Files (in the control plane's data directory): `ca.pem`/`ca.key` (the current CA),
//! `ca-next.pem`/`ca-next.key` (during a rotation), `ca-rotation.json` (the phase),
//! `server.pem`/`server.key`. Keys are written 0600 and never logged.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use gaffer_certs::{CaFingerprint, CertError, ClientCertPolicy, ClientCertRefusal, FleetCa, IssuedKeyPair};
use gaffer_protocol::messages::{AgentId, ControlMessage};
use serde::{Deserialize, Serialize};

use crate::datadir::{DataDir, DataDirError};
use crate::metrics::Metrics;
use crate::store::{CertIssue, Store, StoreError, UnixMs, CERT_HISTORY_MAX};

/// Default validity of agent (and server) certificates, seconds: 7 days.
pub const AGENT_CERT_TTL_SECS_DEFAULT: u64 = 7 * 86_400;

/// Errors of identity operations. The variant says what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The request is refused (unknown or revoked agent, bad CSR, wrong phase); the message says why.
    #[error("{0}")]
    Refused(String),
    /// A certificate operation failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The store failed; retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A data directory file could not be read or written.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
}

/// The agents revoked now: loaded from the store at start, updated by every revocation. Read on
/// every agent handshake and every link turn (an in-memory set).
#[derive(Debug, Default)]
pub struct Revocations {
    agents: RwLock<HashSet<AgentId>>,
}

impl Revocations {
    /// The revoked agents of `store`.
    ///
    /// # Errors
    /// Store errors.
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let agents = store.list_agents()?.into_iter().filter(|a| a.revoked_at_ms.is_some()).map(|a| a.id).collect();
        Ok(Self { agents: RwLock::new(agents) })
    }

    /// Whether `agent` is revoked.
    pub fn is_revoked(&self, agent: AgentId) -> bool {
        self.agents.read().unwrap_or_else(|p| p.into_inner()).contains(&agent)
    }

    /// Marks `agent` revoked (after the store says so).
    pub fn revoke(&self, agent: AgentId) {
        self.agents.write().unwrap_or_else(|p| p.into_inner()).insert(agent);
    }

    /// Replaces the set with the revoked agents of `store` (another replica revoked some).
    ///
    /// # Errors
    /// Store errors (the set is kept as it was).
    pub fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let loaded = Self::load(store)?.agents.into_inner().unwrap_or_else(|p| p.into_inner());
        *self.agents.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(())
    }
}

/// The QUIC endpoint's [`ClientCertPolicy`]: live revocation from [`Revocations`], refusals counted
/// in `gaffer_link_refused_total{reason}` and logged.
pub struct LinkCertPolicy {
    revocations: Arc<Revocations>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for LinkCertPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCertPolicy").finish_non_exhaustive()
    }
}

impl LinkCertPolicy {
    /// A policy over `revocations`, counting into `metrics`.
    pub fn new(revocations: Arc<Revocations>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { revocations, metrics })
    }
}

impl ClientCertPolicy for LinkCertPolicy {
    fn is_revoked(&self, agent_id: AgentId, _serial_hex: &str) -> bool {
        self.revocations.is_revoked(agent_id)
    }

    fn refused(&self, reason: ClientCertRefusal) {
        self.metrics.handshake_refused(reason.as_str());
        tracing::warn!(%reason, "agent certificate refused in the handshake");
    }
}

/// A CA rotation phase, as in Teleport's `tctl auth rotate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum RotationPhase {
    /// No rotation: one CA, trusted and issuing.
    Standby,
    /// The next CA exists and is trusted beside the current one (agents are sent both); nothing is
    /// issued from it yet.
    Init,
    /// Agent certificates are issued from the next CA; every agent is asked to renew.
    UpdateClients,
    /// The server certificate is issued from the next CA too.
    UpdateServers,
    /// Going back: everything is issued from the current (old) CA again, agents are asked to renew;
    /// `standby` then drops the next CA.
    Rollback,
}

impl RotationPhase {
    /// The phase's name on the command line and the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationPhase::Standby => "standby",
            RotationPhase::Init => "init",
            RotationPhase::UpdateClients => "update-clients",
            RotationPhase::UpdateServers => "update-servers",
            RotationPhase::Rollback => "rollback",
        }
    }

    /// Whether moving from `self` to `to` is allowed: standby → init → update-clients →
    /// update-servers → standby, and rollback from init, update-clients or update-servers, then
    /// rollback → standby.
    pub fn can_move_to(self, to: RotationPhase) -> bool {
        use RotationPhase::*;
        matches!(
            (self, to),
            (Standby, Init)
                | (Init, UpdateClients)
                | (UpdateClients, UpdateServers)
                | (UpdateServers, Standby)
                | (Init | UpdateClients | UpdateServers, Rollback)
                | (Rollback, Standby)
        )
    }
}

impl std::fmt::Display for RotationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ca-rotation.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationFile {
    phase: RotationPhase,
    /// When the current phase was entered.
    since_ms: UnixMs,
}

/// A certificate just issued to an agent.
#[derive(Debug, Clone)]
pub struct IssuedAgentCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The CAs the agent must trust from now on, PEM, one per entry.
    pub ca_pems: Vec<String>,
    /// What was recorded.
    pub issue: CertIssue,
}

/// What a rotation step did, for the CLI and the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationReport {
    /// The phase before.
    pub from: RotationPhase,
    /// The phase now.
    pub phase: RotationPhase,
    /// Fingerprint of the current CA (the one trusted at standby).
    pub current_ca_fingerprint: String,
    /// Fingerprint of the next CA, during a rotation.
    pub next_ca_fingerprint: Option<String>,
    /// Fingerprint agents enroll with now (the CA of the server certificate).
    pub enroll_ca_fingerprint: String,
    /// Connected agents told about the change (trust bundle or renew now).
    pub agents_notified: usize,
}

/// Where a rotation stands, for the dashboard and the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationStatus {
    /// The phase.
    pub phase: RotationPhase,
    /// When it was entered, Unix ms (None: never rotated).
    pub since_ms: Option<UnixMs>,
    /// Fingerprint of the current CA.
    pub current_ca_fingerprint: String,
    /// Fingerprint of the next CA, during a rotation.
    pub next_ca_fingerprint: Option<String>,
    /// Fingerprint of the CA agent certificates are issued from now.
    pub issuing_ca_fingerprint: String,
    /// Enrolled, unrevoked agents whose current certificate is not from the issuing CA.
    pub agents_on_other_ca: Vec<AgentId>,
}

struct PkiState {
    current: Arc<FleetCa>,
    next: Option<Arc<FleetCa>>,
    phase: RotationPhase,
    since_ms: Option<UnixMs>,
    server: IssuedKeyPair,
    /// Whether the server certificate was issued by `next` (else `current`).
    server_from_next: bool,
}

impl PkiState {
    fn issuing(&self) -> &Arc<FleetCa> {
        match (self.phase, &self.next) {
            (RotationPhase::UpdateClients | RotationPhase::UpdateServers, Some(next)) => next,
            _ => &self.current,
        }
    }

    fn server_ca(&self) -> &Arc<FleetCa> {
        match (&self.next, self.server_from_next) {
            (Some(next), true) => next,
            _ => &self.current,
        }
    }

    fn trusted(&self) -> Vec<&Arc<FleetCa>> {
        let mut out = vec![&self.current];
        out.extend(self.next.as_ref());
        out
    }
}

/// The control plane's certificate authority state: the CAs, the phase of a rotation, the server
/// certificate and the agent certificate lifetime. Shared by the link, offline sync, the admin
/// socket and the HTTPS server.
pub struct Pki {
    dd: DataDir,
    server_names: Vec<String>,
    agent_cert_ttl_secs: AtomicU64,
    state: RwLock<PkiState>,
    metrics: Arc<Metrics>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("phase", &self.read().phase).finish_non_exhaustive()
    }
}

fn rotation_path(dd: &DataDir) -> PathBuf {
    dd.root().join("ca-rotation.json")
}
fn next_cert_path(dd: &DataDir) -> PathBuf {
    dd.root().join("ca-next.pem")
}
fn next_key_path(dd: &DataDir) -> PathBuf {
    dd.root().join("ca-next.key")
}

/// Writes `contents` to `path` atomically (a temporary file beside it, then rename), public (0644)
/// or secret (0600).
fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    if secret {
        gaffer_certs::write_secret_file(&tmp, contents)?;
    } else {
        std::fs::write(&tmp, contents).map_err(|e| DataDirError::Io { path: tmp.display().to_string(), source: e })?;
    }
    std::fs::rename(&tmp, path).map_err(|e| DataDirError::Io { path: path.display().to_string(), source: e })?;
    Ok(())
}

fn pem_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CertError::InvalidPem { what: "certificate", reason: e.to_string() })?;
    Ok(der.to_vec())
}

impl Pki {
    /// Loads the CAs, the rotation phase and the server certificate of `dd`.
    ///
    /// # Errors
    /// Unreadable files or certificates; a server certificate issued by neither CA.
    pub fn open(
        dd: &DataDir,
        server_names: Vec<String>,
        agent_cert_ttl_secs: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, IdentityError> {
        let current = Arc::new(FleetCa::from_pem(&dd.read(&dd.ca_cert_path())?, &dd.read(&dd.ca_key_path())?)?);
        let rotation: Option<RotationFile> = match std::fs::read_to_string(rotation_path(dd)) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| DataDirError::BadConfig {
                path: rotation_path(dd).display().to_string(),
                detail: e.to_string(),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(DataDirError::Io { path: rotation_path(dd).display().to_string(), source: e }.into()),
        };
        let phase = rotation.as_ref().map_or(RotationPhase::Standby, |r| r.phase);
        let next = if phase == RotationPhase::Standby {
            None
        } else {
            Some(Arc::new(FleetCa::from_pem(&dd.read(&next_cert_path(dd))?, &dd.read(&next_key_path(dd))?)?))
        };
        let server =
            IssuedKeyPair { cert_pem: dd.read(&dd.server_cert_path())?, key_pem: dd.read(&dd.server_key_path())? };
        let server_der = pem_der(&server.cert_pem)?;
        let server_from_next = match &next {
            Some(n) if n.signed(&server_der) => true,
            _ if current.signed(&server_der) => false,
            _ => {
                return Err(IdentityError::Refused(format!(
                    "{} was issued by none of this control plane's CAs",
                    dd.server_cert_path().display()
                )))
            }
        };
        let (changed, _) = tokio::sync::watch::channel(0);
        let pki = Arc::new(Self {
            dd: dd.clone(),
            server_names,
            agent_cert_ttl_secs: AtomicU64::new(agent_cert_ttl_secs),
            state: RwLock::new(PkiState {
                current,
                next,
                phase,
                since_ms: rotation.map(|r| r.since_ms),
                server,
                server_from_next,
            }),
            metrics,
            changed,
        });
        if let Ok(na) = gaffer_certs::cert_not_after_unix(pki.read().server.cert_pem.as_bytes()) {
            pki.metrics.server_cert_not_after(na);
        }
        Ok(pki)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PkiState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PkiState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The data directory the CAs live in (the HTTP install routes find the releases beside them).
    pub fn data_dir(&self) -> &DataDir {
        &self.dd
    }

    /// Validity of the agent (and server) certificates issued from now on, seconds.
    pub fn agent_cert_ttl_secs(&self) -> u64 {
        self.agent_cert_ttl_secs.load(Ordering::Relaxed)
    }

    /// Changes the validity of certificates issued from now on (`serve --agent-cert-ttl`).
    ///
    /// # Errors
    /// [`IdentityError::Refused`] outside 60 s..=825 days.
    pub fn set_agent_cert_ttl_secs(&self, secs: u64) -> Result<(), IdentityError> {
        check_ttl(secs)?;
        self.agent_cert_ttl_secs.store(secs, Ordering::Relaxed);
        Ok(())
    }

    /// A receiver whose value changes whenever the server certificate or the trusted CAs change:
    /// rebuild TLS configs then.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// The rotation phase.
    pub fn phase(&self) -> RotationPhase {
        self.read().phase
    }

    /// The CA certificates agents must trust, PEM, one per entry (two during a rotation).
    pub fn trusted_ca_pems(&self) -> Vec<String> {
        self.read().trusted().iter().map(|ca| ca.cert_pem()).collect()
    }

    /// The trusted CAs as one PEM bundle.
    pub fn trust_bundle_pem(&self) -> String {
        self.trusted_ca_pems().concat()
    }

    /// The CA agent certificates are issued from now.
    pub fn issuing_ca(&self) -> Arc<FleetCa> {
        self.read().issuing().clone()
    }

    /// Every CA trusted now (current first).
    pub fn trusted_cas(&self) -> Vec<Arc<FleetCa>> {
        self.read().trusted().into_iter().cloned().collect()
    }

    /// The fingerprint agents enroll with now: the CA of the server certificate.
    pub fn enroll_fingerprint(&self) -> CaFingerprint {
        self.read().server_ca().fingerprint()
    }

    /// The server certificate and key, and the PEM of the CA that issued it.
    pub fn server_pair(&self) -> (IssuedKeyPair, String) {
        let st = self.read();
        (st.server.clone(), st.server_ca().cert_pem())
    }

    /// The QUIC endpoint's rustls config for the current server certificate and trusted CAs.
    ///
    /// # Errors
    /// Certificate errors.
    pub fn quic_tls(&self, policy: Arc<dyn ClientCertPolicy>) -> Result<rustls::ServerConfig, IdentityError> {
        let (server, server_ca) = self.server_pair();
        Ok(gaffer_certs::fleet_server_config(&self.trust_bundle_pem(), &server, &server_ca, policy)?)
    }

    /// Signs `csr_pem` for `agent_id` with the issuing CA for [`Pki::agent_cert_ttl_secs`] and
    /// records it on the agent (serial, expiry, issuing CA, CSR, history; not flushed): `via` is
    /// `enroll`, `re-enroll`, `renew`, `bundle` or `offline-enroll`. The agent must exist (insert
    /// new agents first) and not be revoked.
    ///
    /// # Errors
    /// [`IdentityError::Refused`] for an unknown or revoked agent or a bad CSR; store errors.
    pub fn issue_agent_cert(
        &self,
        store: &dyn Store,
        agent_id: AgentId,
        csr_pem: &str,
        via: &str,
        now_ms: UnixMs,
    ) -> Result<IssuedAgentCert, IdentityError> {
        let agent = store
            .get_agent(agent_id)?
            .ok_or_else(|| IdentityError::Refused(format!("agent {agent_id} is not enrolled")))?;
        if agent.revoked_at_ms.is_some() {
            return Err(IdentityError::Refused(format!("agent {agent_id} is revoked")));
        }
        let issued = self.sign_agent(agent_id, csr_pem, via, None, now_ms)?;
        record_issue(store, agent_id, csr_pem, &issued.issue)?;
        Ok(issued)
    }

    /// Signs `csr_pem` for `agent_id` with the issuing CA, valid for `validity_secs` (None: the
    /// agent certificate TTL), without recording it (see [`record_issue`]).
    ///
    /// # Errors
    /// [`IdentityError::Refused`] for a CSR that cannot be signed.
    pub fn sign_agent(
        &self,
        agent_id: AgentId,
        csr_pem: &str,
        via: &str,
        validity_secs: Option<u64>,
        now_ms: UnixMs,
    ) -> Result<IssuedAgentCert, IdentityError> {
        let ca = self.issuing_ca();
        let cert_pem = ca
            .sign_agent_csr_secs(csr_pem, agent_id, validity_secs.unwrap_or_else(|| self.agent_cert_ttl_secs()))
            .map_err(|e| IdentityError::Refused(format!("the CSR was refused: {e}")))?;
        let issue = CertIssue {
            serial_hex: gaffer_certs::cert_serial_hex(cert_pem.as_bytes())?,
            not_after_unix: gaffer_certs::cert_not_after_unix(cert_pem.as_bytes())?,
            issued_at_ms: now_ms,
            via: via.to_owned(),
            issuer_fingerprint: ca.fingerprint().to_string(),
        };
        self.metrics.cert_issued(via);
        tracing::info!(agent_id = %agent_id, serial = %issue.serial_hex, not_after = issue.not_after_unix, via, "agent certificate issued");
        Ok(IssuedAgentCert { cert_pem, ca_pems: self.trusted_ca_pems(), issue })
    }

    /// Renews the server certificate when half its lifetime has passed (or it is not from the CA a
    /// rotation wants it from), writing `server.pem`/`server.key` atomically and telling
    /// subscribers. Returns whether it renewed.
    ///
    /// # Errors
    /// Certificate or file errors (the old certificate stays in use).
    pub fn renew_server_cert_if_due(&self, now_unix: i64) -> Result<bool, IdentityError> {
        let (due, wrong_ca) = {
            let st = self.read();
            let der = pem_der(&st.server.cert_pem)?;
            let (nb, na) = gaffer_certs::cert_validity_unix(&der)?;
            let (issued, validity) = issued_and_validity(nb, na);
            let wants_next = matches!(st.phase, RotationPhase::UpdateServers);
            (now_unix >= issued + validity / 2, wants_next != st.server_from_next)
        };
        if !due && !wrong_ca {
            return Ok(false);
        }
        self.reissue_server_cert()?;
        Ok(true)
    }

    /// Issues a new server certificate from the CA the phase wants (next during update-servers,
    /// else current) and installs it.
    fn reissue_server_cert(&self) -> Result<(), IdentityError> {
        let (ca, from_next) = {
            let st = self.read();
            match (&st.next, st.phase) {
                (Some(next), RotationPhase::UpdateServers) => (next.clone(), true),
                _ => (st.current.clone(), false),
            }
        };
        let pair = ca.issue_server_cert_secs(&self.server_names, self.agent_cert_ttl_secs())?;
        // Key first: a crash between the two leaves a key whose certificate is missing, which
        // `open` detects (the pair does not match) — never a certificate without its key.
        write_atomic(&self.dd.server_key_path(), pair.key_pem.as_bytes(), true)?;
        write_atomic(&self.dd.server_cert_path(), pair.cert_pem.as_bytes(), false)?;
        let na = gaffer_certs::cert_not_after_unix(pair.cert_pem.as_bytes())?;
        {
            let mut st = self.write();
            st.server = pair;
            st.server_from_next = from_next;
        }
        self.metrics.server_cert_not_after(na);
        tracing::info!(not_after = na, from_next_ca = from_next, "server certificate renewed");
        self.bump();
        Ok(())
    }

    /// Moves the CA rotation to `to` (see [`RotationPhase::can_move_to`]), writing the files first,
    /// then telling connected agents through `send` (the fleet's outgoing queues): the new trust
    /// bundle (init, standby), or renew now (update-clients, rollback).
    ///
    /// # Errors
    /// [`IdentityError::Refused`] for a move that is not allowed; file or certificate errors.
    pub fn rotate(
        &self,
        to: RotationPhase,
        fleet_name: &str,
        connected: &[AgentId],
        send: &dyn Fn(AgentId, ControlMessage) -> bool,
        now_ms: UnixMs,
    ) -> Result<RotationReport, IdentityError> {
        let from = self.phase();
        if !from.can_move_to(to) {
            return Err(IdentityError::Refused(format!(
                "cannot move the CA rotation from {from} to {to}: the order is init, update-clients, update-servers, \
                 standby (rollback from any phase before standby, then standby)"
            )));
        }
        match to {
            RotationPhase::Init => {
                let next = FleetCa::generate(fleet_name)?;
                write_atomic(&next_key_path(&self.dd), next.key_pem().as_bytes(), true)?;
                write_atomic(&next_cert_path(&self.dd), next.cert_pem().as_bytes(), false)?;
                self.write().next = Some(Arc::new(next));
            }
            RotationPhase::Standby if from == RotationPhase::UpdateServers => {
                // The next CA becomes the current one; the old one is kept aside, untrusted.
                let next = self.read().next.clone().ok_or_else(|| IdentityError::Refused("no next CA".into()))?;
                let stamp = now_ms / 1000;
                let retired = |name: &str| self.dd.root().join(format!("ca-retired-{stamp}.{name}"));
                std::fs::copy(self.dd.ca_cert_path(), retired("pem"))
                    .map_err(|e| DataDirError::Io { path: retired("pem").display().to_string(), source: e })?;
                write_atomic(&retired("key"), self.dd.read(&self.dd.ca_key_path())?.as_bytes(), true)?;
                write_atomic(&self.dd.ca_key_path(), next.key_pem().as_bytes(), true)?;
                write_atomic(&self.dd.ca_cert_path(), next.cert_pem().as_bytes(), false)?;
                let _ = std::fs::remove_file(next_key_path(&self.dd));
                let _ = std::fs::remove_file(next_cert_path(&self.dd));
                let mut st = self.write();
                st.current = next;
                st.next = None;
                st.server_from_next = false;
            }
            RotationPhase::Standby => {
                // From rollback: drop the next CA.
                let _ = std::fs::remove_file(next_key_path(&self.dd));
                let _ = std::fs::remove_file(next_cert_path(&self.dd));
                let mut st = self.write();
                st.next = None;
                st.server_from_next = false;
            }
            RotationPhase::UpdateClients | RotationPhase::UpdateServers | RotationPhase::Rollback => {}
        }
        {
            let mut st = self.write();
            st.phase = to;
            st.since_ms = Some(now_ms);
        }
        let file = RotationFile { phase: to, since_ms: now_ms };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| IdentityError::Refused(e.to_string()))?;
        write_atomic(&rotation_path(&self.dd), &json, false)?;
        // The server certificate follows the phase (update-servers: from next; rollback and
        // standby: from current).
        let server_ok = {
            let st = self.read();
            st.server_from_next == matches!(to, RotationPhase::UpdateServers)
        };
        if !server_ok {
            self.reissue_server_cert()?;
        } else {
            self.bump();
        }
        let msg = match to {
            RotationPhase::UpdateClients | RotationPhase::Rollback => {
                ControlMessage::RenewCertificate { reason: format!("CA rotation: {to}") }
            }
            _ => ControlMessage::TrustBundle { ca_pems: self.trusted_ca_pems() },
        };
        let agents_notified = connected.iter().filter(|a| send(**a, msg.clone())).count();
        let st = self.read();
        tracing::warn!(%from, phase = %to, agents_notified, "CA rotation phase changed");
        Ok(RotationReport {
            from,
            phase: to,
            current_ca_fingerprint: st.current.fingerprint().to_string(),
            next_ca_fingerprint: st.next.as_ref().map(|n| n.fingerprint().to_string()),
            enroll_ca_fingerprint: st.server_ca().fingerprint().to_string(),
            agents_notified,
        })
    }

    /// Where the rotation stands, with the agents whose certificate is from another CA than the
    /// issuing one.
    ///
    /// # Errors
    /// Store errors.
    pub fn rotation_status(&self, store: &dyn Store) -> Result<RotationStatus, IdentityError> {
        let (phase, since_ms, current, next, issuing) = {
            let st = self.read();
            (
                st.phase,
                st.since_ms,
                st.current.fingerprint().to_string(),
                st.next.as_ref().map(|n| n.fingerprint().to_string()),
                st.issuing().fingerprint().to_string(),
            )
        };
        let agents_on_other_ca = store
            .list_agents()?
            .into_iter()
            .filter(|a| a.revoked_at_ms.is_none() && a.cert_issuer_fingerprint.as_deref() != Some(issuing.as_str()))
            .map(|a| a.id)
            .collect();
        Ok(RotationStatus {
            phase,
            since_ms,
            current_ca_fingerprint: current,
            next_ca_fingerprint: next,
            issuing_ca_fingerprint: issuing,
            agents_on_other_ca,
        })
    }
}

/// Records a certificate issued to `agent_id` (from [`Pki::sign_agent`]) on its record: serial,
/// expiry, issuing CA, the CSR (bundle renewals re-sign it), and the history (bounded). Not flushed.
///
/// # Errors
/// Store errors.
pub fn record_issue(store: &dyn Store, agent_id: AgentId, csr_pem: &str, issue: &CertIssue) -> Result<(), StoreError> {
    store.update_agent(agent_id, &mut |a| {
        a.cert_serial_hex = Some(issue.serial_hex.clone());
        a.cert_not_after_unix = issue.not_after_unix;
        a.cert_issuer_fingerprint = Some(issue.issuer_fingerprint.clone());
        a.csr_pem = Some(csr_pem.to_owned());
        a.cert_history.push(issue.clone());
        let excess = a.cert_history.len().saturating_sub(CERT_HISTORY_MAX);
        a.cert_history.drain(..excess);
    })?;
    Ok(())
}

/// When a certificate with validity (`not_before`, `not_after`) was issued, and for how long, given
/// the backdate rule of `gaffer_certs` (backdated by an hour, or by its whole validity when that is
/// shorter).
fn issued_and_validity(not_before: i64, not_after: i64) -> (i64, i64) {
    let span = not_after - not_before;
    let backdate = gaffer_certs::CLOCK_SKEW_BACKDATE_SECS;
    let validity = if span <= 2 * backdate { span / 2 } else { span - backdate };
    (not_after - validity, validity)
}

/// Checks a certificate lifetime setting.
///
/// # Errors
/// [`IdentityError::Refused`] outside 60 s..=825 days.
pub fn check_ttl(secs: u64) -> Result<(), IdentityError> {
    if (gaffer_certs::AGENT_CERT_VALIDITY_SECS_MIN..=gaffer_certs::AGENT_CERT_VALIDITY_SECS_MAX).contains(&secs) {
        Ok(())
    } else {
        Err(IdentityError::Refused(format!("--agent-cert-ttl of {secs} s is outside 60 s..=825 days")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_time_is_recovered_from_the_backdated_validity() {
        // 60 s certificate: backdated 60 s.
        assert_eq!(issued_and_validity(1000 - 60, 1000 + 60), (1000, 60));
        // 7 days: backdated an hour.
        let week = 7 * 86_400;
        assert_eq!(issued_and_validity(1000 - 3600, 1000 + week), (1000, week));
        // Exactly an hour.
        assert_eq!(issued_and_validity(1000 - 3600, 1000 + 3600), (1000, 3600));
    }

    #[test]
    fn rotation_moves_only_in_order_and_rolls_back_before_standby() {
        use RotationPhase::*;
        let all = [Standby, Init, UpdateClients, UpdateServers, Rollback];
        let allowed: Vec<(RotationPhase, RotationPhase)> =
            all.iter().flat_map(|a| all.iter().map(move |b| (*a, *b))).filter(|(a, b)| a.can_move_to(*b)).collect();
        assert_eq!(
            allowed,
            vec![
                (Standby, Init),
                (Init, UpdateClients),
                (Init, Rollback),
                (UpdateClients, UpdateServers),
                (UpdateClients, Rollback),
                (UpdateServers, Standby),
                (UpdateServers, Rollback),
                (Rollback, Standby),
            ]
        );
    }
}
