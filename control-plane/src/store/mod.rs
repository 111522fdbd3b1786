//! The control plane's persistent state, behind the [`Store`] trait.
//!
//! The trait is deliberately dumb: typed records, atomic read-modify-write per record, and no
//! scheduling policy. The job state machine lives in [`crate::scheduler`]; the store only guarantees
//! that each `update_*` closure runs against the latest committed value and that its result is
//! committed atomically (a compare-and-swap loop in the sled implementation). Methods are
//! synchronous: sled calls take microseconds; [`Store::flush`] (fsync) is the one slow call and
//! async callers run it on a blocking thread.
//!
//! Implementations: [`sled_store::SledStore`] (embedded, one control plane per studio). A
//! PostgreSQL implementation is the path to several replicas (see DESIGN.md, "Scale").

pub mod sled_store;

use gaffer_protocol::digest::Digest;
use gaffer_protocol::health::Health;
use gaffer_protocol::messages::{AgentId, Capabilities, JobId, Profile};
use serde::{Deserialize, Serialize};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened: another process holds it, or the directory is unreadable.
    #[error("cannot open the store at {path}: {detail}")]
    Open {
        /// Database directory.
        path: String,
        /// What the database said.
        detail: String,
    },
    /// A read or write failed (disk full, I/O error); retrying later may succeed.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// A stored record could not be decoded (corruption or an incompatible older version).
    #[error("stored record {key} is unreadable: {detail}")]
    Corrupt {
        /// The record's key, for the operator.
        key: String,
        /// Decoder message.
        detail: String,
    },
    /// No enrollment token with that hash exists.
    #[error("enrollment token is not valid for this control plane")]
    TokenUnknown,
    /// The enrollment token was already used; mint a new one with `gaffer-control token create`.
    #[error("enrollment token was already used; mint a new one with `gaffer-control token create`")]
    TokenAlreadyUsed,
    /// The enrollment token expired; mint a new one with `gaffer-control token create`.
    #[error("enrollment token expired; mint a new one with `gaffer-control token create`")]
    TokenExpired,
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Milliseconds since the Unix epoch (control-plane clock).
pub type UnixMs = u64;

/// A one-time enrollment token, stored only by hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollmentTokenRecord {
    /// SHA-256 of the token string.
    pub hash: [u8; 32],
    /// Site the enrolling agent will belong to.
    pub site: String,
    /// When it was minted.
    pub created_at_ms: UnixMs,
    /// When it stops being accepted.
    pub expires_at_ms: UnixMs,
    /// When it was used (None while unused).
    pub used_at_ms: Option<UnixMs>,
    /// Which agent used it.
    pub used_by: Option<AgentId>,
}

/// A dashboard login session, stored by the hash of its cookie value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// SHA-256 of the session cookie value.
    pub id_hash: [u8; 32],
    /// Per-session CSRF token embedded in every form (not secret from the session's owner).
    pub csrf_token: String,
    /// When it was created.
    pub created_at_ms: UnixMs,
    /// When it stops being accepted.
    pub expires_at_ms: UnixMs,
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Agent id (the URI SAN of its certificate).
    pub id: AgentId,
    /// Site the agent belongs to (from its enrollment token).
    pub site: String,
    /// Host name the agent reported at enrollment or in its latest Hello.
    pub hostname: String,
    /// When it enrolled.
    pub enrolled_at_ms: UnixMs,
    /// Its certificate's expiry, Unix seconds.
    pub cert_not_after_unix: i64,
    /// Version from the latest Hello.
    pub agent_version: Option<String>,
    /// Capabilities from the latest Hello.
    pub capabilities: Option<Capabilities>,
    /// Whether a link connection is up now.
    pub connected: bool,
    /// Last time anything was heard from it.
    pub last_seen_ms: Option<UnixMs>,
    /// Latest health report.
    pub last_health: Option<HealthSample>,
    /// The agent's age X25519 recipient (`age1...`) for reply bundles (offline sync); None for
    /// agents enrolled before offline sync existed.
    #[serde(default)]
    pub bundle_recipient: Option<String>,
    /// The CSR the agent enrolled with (PEM): lets the control plane re-issue a certificate for the
    /// same key (renewal in reply bundles) without ever holding the key.
    #[serde(default)]
    pub csr_pem: Option<String>,
    /// Serial number of the agent's current certificate, hex (for revocation).
    #[serde(default)]
    pub cert_serial_hex: Option<String>,
    /// When the agent was revoked (`gaffer-control agent revoke`); None while it is trusted.
    #[serde(default)]
    pub revoked_at_ms: Option<UnixMs>,
    /// Enrolled offline (`gaffer-control enroll-offline`): it syncs by bundles, not the link.
    #[serde(default)]
    pub offline: bool,
}

/// One operator action, for the audit log (`gaffer-control enroll-offline`, `agent revoke`,
/// `bundle import`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, control-plane clock.
    pub at_ms: UnixMs,
    /// Who: the OS user that ran the command (`$USER`, else `uid <n>`).
    pub who: String,
    /// What, e.g. `enroll_offline`, `revoke_agent`, `bundle_import`.
    pub action: String,
    /// The agent concerned, if any.
    pub agent: Option<AgentId>,
    /// The site concerned, if any.
    pub site: Option<String>,
    /// Human-readable detail (counts, bundle numbers); never secrets.
    pub detail: String,
}

/// Offline-sync bundle numbers of one agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleNumbers {
    /// Highest agent bundle number imported (0: none yet).
    pub last_imported_bundle: u64,
    /// Number of the last reply bundle written to the agent (0: none yet).
    pub last_reply_number: u64,
}

/// A revoked certificate, as listed on the fleet's CRL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCertRecord {
    /// Certificate serial number, lowercase hex (as `gaffer_certs::cert_serial_hex` gives it).
    pub serial_hex: String,
    /// The agent it belonged to.
    pub agent: AgentId,
    /// When it was revoked.
    pub revoked_at_ms: UnixMs,
}

/// One health report as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSample {
    /// Control-plane receive time.
    pub received_at_ms: UnixMs,
    /// The report.
    pub health: Health,
}

/// Lifecycle of a job: `queued → assigned → running → succeeded | failed`; a lease lost with its
/// agent returns the job to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for an agent.
    Queued,
    /// Leased to an agent, not yet started.
    Assigned,
    /// The agent accepted it and is analyzing.
    Running,
    /// Finished with a digest.
    Succeeded,
    /// Finished with an error.
    Failed,
}

impl JobState {
    /// API/dashboard name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    /// Whether the job has finished.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// Who created a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobOrigin {
    /// Submitted through the API or the dashboard.
    Api,
    /// Found by an agent's watch folder.
    WatchFolder {
        /// The agent that found it.
        agent: AgentId,
    },
}

/// A job. The digest is stored separately ([`Store::get_digest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: JobId,
    /// Absolute path of the media file on the agent's box.
    pub path: String,
    /// Site whose agents may run it.
    pub site: String,
    /// Analysis profile.
    pub profile: Profile,
    /// If set, only this agent may run it.
    pub pinned_agent: Option<AgentId>,
    /// Who created it.
    pub origin: JobOrigin,
    /// Lifecycle state.
    pub state: JobState,
    /// Agent holding the lease (assigned/running) or that finished it.
    pub agent: Option<AgentId>,
    /// Fraction done, 0..=1.
    pub progress: f32,
    /// Frames decoded so far.
    pub frames_decoded: u64,
    /// Failure reason (failed), or why the last attempt was requeued.
    pub error: Option<String>,
    /// How many times it was leased.
    pub attempts: u32,
    /// When it was created.
    pub created_at_ms: UnixMs,
    /// Last state or progress change.
    pub updated_at_ms: UnixMs,
    /// When it finished.
    pub finished_at_ms: Option<UnixMs>,
}

/// The control plane's persistent state. See the module docs for the contract.
pub trait Store: Send + Sync + 'static {
    /// The admin password as an argon2 PHC string, if `init` set one.
    fn admin_password_hash(&self) -> StoreResult<Option<String>>;
    /// Replaces the admin password hash.
    fn set_admin_password_hash(&self, phc: &str) -> StoreResult<()>;

    /// Stores a new enrollment token.
    fn insert_enrollment_token(&self, rec: &EnrollmentTokenRecord) -> StoreResult<()>;
    /// Atomically marks the token used by `agent` and returns it.
    ///
    /// # Errors
    /// [`StoreError::TokenUnknown`], [`StoreError::TokenAlreadyUsed`], [`StoreError::TokenExpired`]
    /// (checked in that order); the token is unchanged on error.
    fn consume_enrollment_token(
        &self,
        hash: &[u8; 32],
        agent: AgentId,
        now_ms: UnixMs,
    ) -> StoreResult<EnrollmentTokenRecord>;

    /// Stores the hash of a new API bearer token.
    fn insert_api_token(&self, hash: &[u8; 32], created_at_ms: UnixMs) -> StoreResult<()>;
    /// Whether an API bearer token with this hash exists.
    fn api_token_exists(&self, hash: &[u8; 32]) -> StoreResult<bool>;

    /// Stores a dashboard session.
    fn insert_session(&self, rec: &SessionRecord) -> StoreResult<()>;
    /// Looks a session up by the hash of its cookie value.
    fn get_session(&self, id_hash: &[u8; 32]) -> StoreResult<Option<SessionRecord>>;
    /// Deletes a session (logout).
    fn delete_session(&self, id_hash: &[u8; 32]) -> StoreResult<()>;

    /// Stores a newly enrolled agent (replacing any record with the same id).
    fn insert_agent(&self, rec: &AgentRecord) -> StoreResult<()>;
    /// One agent.
    fn get_agent(&self, id: AgentId) -> StoreResult<Option<AgentRecord>>;
    /// All agents, ordered by site then hostname.
    fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Read-modify-write of one agent; `None` if it does not exist.
    fn update_agent(&self, id: AgentId, f: &mut dyn FnMut(&mut AgentRecord)) -> StoreResult<Option<AgentRecord>>;
    /// Appends a health sample to the agent's history, keeping at most `keep_max` newest samples,
    /// and sets it as the agent's `last_health`.
    fn push_health(&self, id: AgentId, sample: &HealthSample, keep_max: usize) -> StoreResult<()>;
    /// Up to `limit` newest health samples, oldest first.
    fn health_history(&self, id: AgentId, limit: usize) -> StoreResult<Vec<HealthSample>>;

    /// Inserts a job; returns false (and changes nothing) if a job with that id exists.
    fn insert_job(&self, job: &JobRecord) -> StoreResult<bool>;
    /// One job.
    fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>>;
    /// Up to `limit` jobs, newest first.
    fn list_jobs(&self, limit: usize) -> StoreResult<Vec<JobRecord>>;
    /// Jobs in `state`, oldest first.
    fn jobs_in_state(&self, state: JobState) -> StoreResult<Vec<JobRecord>>;
    /// Read-modify-write of one job. The closure returns whether it changed the record; if it
    /// returns false nothing is written. Returns the record as stored afterwards, `None` if the
    /// job does not exist.
    fn update_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>>;
    /// Stores a job's digest; returns false (and keeps the first) if it already has one.
    fn put_digest(&self, id: JobId, digest: &Digest) -> StoreResult<bool>;
    /// A job's digest.
    fn get_digest(&self, id: JobId) -> StoreResult<Option<Digest>>;

    /// Highest sequence number applied from this agent (for dedupe), if any.
    fn last_applied_seq(&self, agent: AgentId) -> StoreResult<Option<u64>>;
    /// Records that every message up to `seq` from `agent` has been applied.
    fn set_last_applied_seq(&self, agent: AgentId, seq: u64) -> StoreResult<()>;

    /// Appends an operator action to the audit log.
    fn append_audit(&self, rec: &AuditRecord) -> StoreResult<()>;
    /// Up to `limit` newest audit entries, newest first.
    fn list_audit(&self, limit: usize) -> StoreResult<Vec<AuditRecord>>;

    /// Offline-sync bundle numbers of `agent` (zeros if none were exchanged).
    fn bundle_numbers(&self, agent: AgentId) -> StoreResult<BundleNumbers>;
    /// Replaces the offline-sync bundle numbers of `agent`.
    fn set_bundle_numbers(&self, agent: AgentId, numbers: &BundleNumbers) -> StoreResult<()>;

    /// Adds a certificate to the revocation list (replacing an entry with the same serial).
    fn insert_revoked_cert(&self, rec: &RevokedCertRecord) -> StoreResult<()>;
    /// Every revoked certificate, by serial.
    fn list_revoked_certs(&self) -> StoreResult<Vec<RevokedCertRecord>>;

    /// Makes every write so far durable (fsync). Acknowledgements to agents wait for this.
    fn flush(&self) -> StoreResult<()>;
}
