//! The control plane's persistent state, behind the [`Store`] trait.
//!
//! The trait is deliberately dumb: typed records, atomic read-modify-write per record, and no
//! scheduling policy. The job state machine lives in [`crate::jobs`]; the store only guarantees
//! that each `update_*` closure runs against the latest committed value and that its result is
//! committed atomically together with the job indexes and counts. Methods are synchronous and may
//! block (sled calls take microseconds, [`Store::flush`] is an fsync): async callers run them on a
//! blocking thread, never on an async worker.
//!
//! Jobs are indexed by state (and, for queued jobs, by priority), so the scheduler, the fleet page
//! and `/metrics` read what they need — the queued jobs in leasing order, the leased jobs, the
//! per-state counts — without scanning job history ([`Store::jobs_in_state`],
//! [`Store::job_counts`], [`Store::list_jobs`] pages).
//!
//! Every applied agent message is one [`Store::commit_agent_message`]: its effect on one job, the
//! digest, a job it creates, audit entries and the agent's sequence watermark, in one transaction,
//! checked against the job record the effect was computed from. The operations map one to one onto
//! SQL (`SELECT … FOR UPDATE SKIP LOCKED` for leasing: [`Store::jobs_in_state`], then
//! [`Store::claim_job`]; a transaction for the commit), which is how the PostgreSQL store for
//! several replicas implements the same trait.
//!
//! Replicas sharing one database also share a registry ([`Store::replica_heartbeat`],
//! [`Store::list_replicas`]) and wake each other with events ([`Store::publish`],
//! [`Store::subscribe`]: PostgreSQL `NOTIFY`; an in-process channel for the embedded stores).
//!
//! Implementations: [`sled_store::SledStore`] (embedded, one control plane per studio),
//! [`pg_store::PgStore`] (PostgreSQL, several replicas) and [`mem_store::MemStore`] (in memory, for
//! the deterministic simulation and tests). All pass the contract suite in
//! `control-plane/tests/store_contract.rs`.

pub mod mem_store;
pub mod pg_store;
pub mod sled_store;

use gaffer_protocol::digest::Digest;
use gaffer_protocol::health::Health;
use gaffer_protocol::messages::{AgentId, Capabilities, JobId, LeaseId, Profile};
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
    /// The database server cannot be used now (PostgreSQL: unreachable, not answering within the
    /// call timeout, refusing the credentials, or without the database); retrying later may
    /// succeed.
    #[error(
        "the database at {url} is unavailable: {detail}; check that PostgreSQL is running and reachable from this \
         host (address, port, firewall, TLS), and the user, password and database name in the store URL"
    )]
    Unavailable {
        /// The server's URL, password redacted.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The database was migrated by a newer gaffer-control than this one; nothing was changed.
    #[error(
        "the database at {url} has schema version {found}, newer than the {supported} this gaffer-control knows: \
         upgrade gaffer-control to the version the other replicas run"
    )]
    SchemaTooNew {
        /// The server's URL, password redacted.
        url: String,
        /// The newest migration applied to the database.
        found: i64,
        /// The newest migration this binary has.
        supported: i64,
    },
    /// A [`StoreEventEnvelope`] too large to publish (nothing was sent).
    #[error("a store event of {bytes} bytes of JSON is over the {bytes_max}-byte limit of one notification; send less in one event")]
    EventTooLarge {
        /// Size of the event as JSON.
        bytes: usize,
        /// [`EVENT_BYTES_MAX`].
        bytes_max: usize,
    },
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
    /// The user logged in (sessions from before users existed have none and are refused).
    #[serde(default)]
    pub user: String,
    /// The user's role at login.
    #[serde(default)]
    pub role: Role,
    /// The user's [`UserRecord::password_changed_at_ms`] at login: once the password changes (or
    /// the user is removed and added again) the session is over.
    #[serde(default)]
    pub password_changed_at_ms: UnixMs,
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
    /// The control-plane replica ([`ReplicaRecord::id`]-style process id, new at every `serve`
    /// start) whose endpoint holds the link while `connected`; None before replicas were tracked.
    /// A replica that stops heartbeating is declared dead and its agents disconnected
    /// (`crate::replica`).
    #[serde(default)]
    pub link_replica: Option<uuid::Uuid>,
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
    /// SHA-256 fingerprint (lowercase hex) of the CA that issued the current certificate; None for
    /// agents enrolled before certificates were tracked. During a CA rotation it tells which agents
    /// still hold certificates from the old CA.
    #[serde(default)]
    pub cert_issuer_fingerprint: Option<String>,
    /// Certificates issued to this agent, oldest first, at most [`CERT_HISTORY_MAX`] (older ones are
    /// dropped): the agent page's renewal history, and every serial a revocation must list.
    #[serde(default)]
    pub cert_history: Vec<CertIssue>,
    /// Whether new jobs may be leased to it: the operator's cordon or drain, kept across its
    /// reconnects and control-plane restarts ([`Scheduling::Active`] for records written before
    /// drains existed).
    #[serde(default)]
    pub scheduling: Scheduling,
}

/// Whether the scheduler may lease new jobs to an agent, as an operator set it
/// (`gaffer-control agent cordon|drain|uncordon`, the agent page's buttons, the API).
///
/// Serialized as `{"state": "active"}`, `{"state": "cordoned", "by", "at_ms"}` or
/// `{"state": "draining", "by", "at_ms", "deadline_ms"}` (store JSON and the API alike).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Scheduling {
    /// New jobs may be leased to it (the default).
    #[default]
    Active,
    /// No new leases; the jobs it holds run to the end and their retries may come back to it.
    Cordoned {
        /// Who cordoned it (user or token name).
        by: String,
        /// When, Unix ms.
        at_ms: UnixMs,
    },
    /// No new leases; the jobs it holds run to the end, and those still held at `deadline_ms`
    /// are taken back and requeued for other agents without spending an attempt (Nomad's
    /// `node drain -deadline`). It stays out of rotation after the drain completes, until
    /// uncordoned.
    Draining {
        /// Who drained it (user or token name).
        by: String,
        /// When the drain started, Unix ms.
        at_ms: UnixMs,
        /// When what is left is requeued, Unix ms; None waits for every job to finish.
        deadline_ms: Option<UnixMs>,
    },
}

impl Scheduling {
    /// Whether new jobs may be leased to the agent.
    pub fn is_active(&self) -> bool {
        matches!(self, Scheduling::Active)
    }

    /// `"active"`, `"cordoned"` or `"draining"`.
    pub fn name(&self) -> &'static str {
        match self {
            Scheduling::Active => "active",
            Scheduling::Cordoned { .. } => "cordoned",
            Scheduling::Draining { .. } => "draining",
        }
    }

    /// Words for a pending reason or a page: "cordoned by alice", "draining by alice (deadline
    /// in 12 min)" / "draining by alice (deadline passed)"; None when active.
    pub fn describe(&self, now_ms: UnixMs) -> Option<String> {
        match self {
            Scheduling::Active => None,
            Scheduling::Cordoned { by, .. } => Some(format!("cordoned by {by}")),
            Scheduling::Draining { by, deadline_ms: None, .. } => Some(format!("draining by {by}")),
            Scheduling::Draining { by, deadline_ms: Some(d), .. } if *d > now_ms => {
                let mins = (d - now_ms).div_ceil(60_000);
                Some(format!("draining by {by} (deadline in {mins} min)"))
            }
            Scheduling::Draining { by, .. } => Some(format!("draining by {by} (deadline passed)")),
        }
    }
}

impl AgentRecord {
    /// A newly enrolled agent `id` of `site` on `hostname`, enrolled at `enrolled_at_ms`: not
    /// connected, never seen, no certificate recorded yet (`cert_not_after_unix` 0), nothing else
    /// known. Callers set what they know with struct update syntax
    /// (`AgentRecord { agent_version: Some(v), ..AgentRecord::new(..) }`).
    pub fn new(id: AgentId, site: impl Into<String>, hostname: impl Into<String>, enrolled_at_ms: UnixMs) -> Self {
        Self {
            id,
            site: site.into(),
            hostname: hostname.into(),
            enrolled_at_ms,
            cert_not_after_unix: 0,
            agent_version: None,
            capabilities: None,
            connected: false,
            link_replica: None,
            last_seen_ms: None,
            last_health: None,
            bundle_recipient: None,
            csr_pem: None,
            cert_serial_hex: None,
            revoked_at_ms: None,
            offline: false,
            cert_issuer_fingerprint: None,
            cert_history: Vec::new(),
            scheduling: Scheduling::Active,
        }
    }
}

/// Most jobs per state the default [`Store::leased_job_counts`] reads (the scheduler's own bound
/// on leased jobs).
pub const LEASED_JOBS_READ_MAX: usize = 100_000;

/// Where an agent stands, as `GET /api/v1/agents` and the fleet page show, count and filter it.
/// Derived from the agent's record alone ([`AgentState::of`]), so it is exactly as current as the
/// record: revoked first, then whether a link is up ([`AgentRecord::connected`]), then how it
/// syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Not revoked, and its link is up now.
    Online,
    /// Not revoked, enrolled for the link, and not connected.
    Offline,
    /// Not revoked, enrolled offline (it syncs by bundles), and not connected.
    AirGapped,
    /// Revoked (`gaffer-control agent revoke`): refused at every handshake and bundle import.
    Revoked,
}

impl AgentState {
    /// Every state, in the order of [`AgentStateCounts`].
    pub const ALL: [AgentState; 4] =
        [AgentState::Online, AgentState::Offline, AgentState::AirGapped, AgentState::Revoked];

    /// The state of `agent`.
    pub fn of(agent: &AgentRecord) -> AgentState {
        if agent.revoked_at_ms.is_some() {
            AgentState::Revoked
        } else if agent.connected {
            AgentState::Online
        } else if agent.offline {
            AgentState::AirGapped
        } else {
            AgentState::Offline
        }
    }

    /// API/dashboard name: `online`, `offline`, `air_gapped`, `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Online => "online",
            AgentState::Offline => "offline",
            AgentState::AirGapped => "air_gapped",
            AgentState::Revoked => "revoked",
        }
    }

    /// Position in [`AgentState::ALL`] (and in [`AgentStateCounts`]).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for AgentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown agent state {s:?} (known: online, offline, air_gapped, revoked)"))
    }
}

/// Number of agents in each [`AgentState`], indexed by [`AgentState::index`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStateCounts(pub [u64; 4]);

impl AgentStateCounts {
    /// Agents in `state`.
    pub fn get(&self, state: AgentState) -> u64 {
        self.0[state.index()]
    }

    /// Agents in any state.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Counts one more agent in `state`.
    pub fn add(&mut self, state: AgentState) {
        self.0[state.index()] += 1;
    }

    /// Counts one agent in `state` less (never below zero).
    pub fn remove(&mut self, state: AgentState) {
        let n = &mut self.0[state.index()];
        *n = n.saturating_sub(1);
    }
}

/// Enrolled agents counted by state, over the whole fleet and per site (whatever the filters of
/// the [`AgentQuery`] they came with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentCounts {
    /// Every agent.
    pub all: AgentStateCounts,
    /// Per site, by name; sites with no agents are absent.
    pub by_site: std::collections::BTreeMap<String, AgentStateCounts>,
}

impl AgentCounts {
    /// Counts `agents`.
    pub fn of<'a>(agents: impl IntoIterator<Item = &'a AgentRecord>) -> Self {
        let mut counts = AgentCounts::default();
        for a in agents {
            counts.add(&a.site, AgentState::of(a));
        }
        counts
    }

    /// Counts one more agent of `site` in `state`.
    pub fn add(&mut self, site: &str, state: AgentState) {
        self.all.add(state);
        match self.by_site.get_mut(site) {
            Some(c) => c.add(state),
            None => {
                let mut c = AgentStateCounts::default();
                c.add(state);
                self.by_site.insert(site.to_owned(), c);
            }
        }
    }

    /// Counts one agent of `site` in `state` less (a site left with none is dropped).
    pub fn remove(&mut self, site: &str, state: AgentState) {
        self.all.remove(state);
        if let Some(c) = self.by_site.get_mut(site) {
            c.remove(state);
            if c.total() == 0 {
                self.by_site.remove(site);
            }
        }
    }

    /// Agents matching the filters of `query` (site, state), cursor and limit aside.
    pub fn matching(&self, query: &AgentQuery) -> u64 {
        let counts = match &query.site {
            Some(site) => self.by_site.get(site).copied().unwrap_or_default(),
            None => self.all,
        };
        match query.state {
            Some(state) => counts.get(state),
            None => counts.total(),
        }
    }
}

/// Position in the agent listing, which is ordered by site, then hostname, then id (the order of
/// [`Store::list_agents`]): the last agent of a page. Opaque to API clients: it travels as the
/// URL-safe base64 of a JSON array ([`std::fmt::Display`] / [`std::str::FromStr`], at most
/// [`AgentCursor::TEXT_BYTES_MAX`] bytes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AgentCursor {
    /// Site of the last agent returned.
    pub site: String,
    /// Hostname of the last agent returned.
    pub hostname: String,
    /// Id of the last agent returned.
    pub id: AgentId,
}

impl AgentCursor {
    /// Longest cursor text accepted, bytes (a site is at most 128 bytes and a hostname 255, so a
    /// real cursor is well under it).
    pub const TEXT_BYTES_MAX: usize = 2048;

    /// The cursor of `agent`.
    pub fn of(agent: &AgentRecord) -> Self {
        Self { site: agent.site.clone(), hostname: agent.hostname.clone(), id: agent.id }
    }

    /// Whether `agent` comes after this cursor in the listing order.
    pub fn is_before(&self, agent: &AgentRecord) -> bool {
        (self.site.as_str(), self.hostname.as_str(), self.id) < (agent.site.as_str(), agent.hostname.as_str(), agent.id)
    }
}

impl std::fmt::Display for AgentCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine as _;
        let json = serde_json::to_vec(&(&self.site, &self.hostname, self.id)).map_err(|_| std::fmt::Error)?;
        f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    }
}

impl std::str::FromStr for AgentCursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use base64::Engine as _;
        let bad = || "cursor is not one this control plane made: pass the `next_cursor` of a previous page".to_owned();
        if s.len() > Self::TEXT_BYTES_MAX {
            return Err(bad());
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let (site, hostname, id): (String, String, AgentId) = serde_json::from_slice(&json).map_err(|_| bad())?;
        Ok(Self { site, hostname, id })
    }
}

/// Which agents [`Store::list_agents_page`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentQuery {
    /// Only agents of this site.
    pub site: Option<String>,
    /// Only agents in this state.
    pub state: Option<AgentState>,
    /// Continue after this cursor (from [`AgentPage::next`]).
    pub after: Option<AgentCursor>,
    /// Most agents returned; 0 returns only the counts. Callers cap it (the API at 1000).
    pub limit: usize,
}

impl AgentQuery {
    /// Whether `agent` matches the filters (not the cursor).
    pub fn matches(&self, agent: &AgentRecord) -> bool {
        self.site.as_deref().is_none_or(|s| agent.site == s) && self.state.is_none_or(|st| AgentState::of(agent) == st)
    }
}

/// One page of [`Store::list_agents_page`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentPage {
    /// The agents, by site, then hostname, then id.
    pub agents: Vec<AgentRecord>,
    /// The whole fleet's counts (not only this page's, whatever the filters).
    pub counts: AgentCounts,
    /// Cursor for the next page; None when no further agent matches.
    pub next: Option<AgentCursor>,
}

/// Most entries kept in [`AgentRecord::cert_history`] (a 7-day certificate renewed at half life
/// gives 32 entries in about 16 weeks).
pub const CERT_HISTORY_MAX: usize = 32;

/// One certificate issued to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CertIssue {
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// `notAfter`, Unix seconds.
    pub not_after_unix: i64,
    /// When it was issued, control-plane clock.
    pub issued_at_ms: UnixMs,
    /// How: `enroll`, `re-enroll`, `renew`, `bundle`, `offline-enroll`.
    pub via: String,
    /// SHA-256 fingerprint of the issuing CA, lowercase hex.
    pub issuer_fingerprint: String,
}

/// One change, for the append-only audit log: who ([`Actor`]), what ([`audit_action`]), what it
/// concerned, when. Build one with [`AuditRecord::new`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, control-plane clock.
    pub at_ms: UnixMs,
    /// Who: an [`Actor`] as a string (`alice`, `token:ci`, `agent <uuid>`, `uid 1000 (alice)`).
    pub who: String,
    /// What, e.g. `enroll_offline`, `revoke_agent`, `bundle_import`.
    pub action: String,
    /// The agent concerned, if any.
    pub agent: Option<AgentId>,
    /// The site concerned, if any.
    pub site: Option<String>,
    /// Human-readable detail (counts, bundle numbers); never secrets.
    pub detail: String,
    /// The job concerned, if any (job submit/cancel/retry, refused agent reports).
    #[serde(default)]
    pub job: Option<JobId>,
}

/// What a person or API token may do. Roles are ordered: `admin` > `operator` > `viewer`; each
/// holds every permission of the roles below it (see `gaffer_control::http::Permission`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything: the dashboard's pages and the `GET` API (not the audit log).
    #[default]
    Viewer,
    /// Also submits, cancels and retries jobs and drains agents.
    Operator,
    /// Also manages users, API tokens, agents (revocation), releases and the CA; reads the audit log.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// CLI/API name: `viewer`, `operator`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (known: admin, operator, viewer)"))
    }
}

/// A person who logs in to the dashboard (`gaffer-control user add`), stored by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Login name: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.
    pub name: String,
    /// What the user may do.
    pub role: Role,
    /// The password as an argon2 PHC string.
    pub password_phc: String,
    /// When the user was added.
    pub created_at_ms: UnixMs,
    /// When the password was last set (creation included). Strictly increases with every change,
    /// and every session remembers the value it was created under: a session whose value differs
    /// is over.
    pub password_changed_at_ms: UnixMs,
}

/// What [`Store::remove_user`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRemoval {
    /// The user was removed (and is returned).
    Removed(UserRecord),
    /// No user has that name.
    NotFound,
    /// The user is the last admin: removing it would leave nobody to manage users. Nothing changed.
    LastAdmin,
}

/// An API bearer token (`gaffer-control api-token create`), stored only by the SHA-256 of the
/// token string. Names are unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// SHA-256 of the full token string (`gfa_…`).
    pub hash: [u8; 32],
    /// Unique name, shown in listings and as the audit actor (`token:NAME`).
    pub name: String,
    /// What requests with this token may do.
    pub role: Role,
    /// When it was minted.
    pub created_at_ms: UnixMs,
    /// When it stops being accepted.
    pub expires_at_ms: UnixMs,
    /// When a request last used it (updated at most once a minute); None if never.
    #[serde(default)]
    pub last_used_at_ms: Option<UnixMs>,
    /// The audit actor that minted it.
    #[serde(default)]
    pub created_by: String,
}

/// Who did something, as written in [`AuditRecord::who`]. Build the string with `to_string()`.
///
/// | actor | written as |
/// |---|---|
/// | a dashboard user | `alice` |
/// | an API token | `token:ci-deploy` |
/// | an agent | `agent <uuid>` |
/// | a local OS user (admin socket peer, or the CLI on the store directly) | `uid 1000 (alice)`, or `uid 1000` when the uid has no name |
/// | the control plane itself | `control plane` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A logged-in dashboard user, by name.
    User(String),
    /// An API token, by name.
    ApiToken(String),
    /// An agent, by id.
    Agent(AgentId),
    /// A local operating-system user, identified by uid (never by an environment variable).
    OsUser {
        /// The uid (`SO_PEERCRED` of the admin socket peer, or `getuid()`).
        uid: u32,
        /// Its name from the user database, if it has one.
        name: Option<String>,
    },
    /// The control plane on its own behalf (migrations, sweeps).
    ControlPlane,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::User(name) => f.write_str(name),
            Actor::ApiToken(name) => write!(f, "token:{name}"),
            Actor::Agent(id) => write!(f, "agent {id}"),
            Actor::OsUser { uid, name: Some(name) } => write!(f, "uid {uid} ({name})"),
            Actor::OsUser { uid, name: None } => write!(f, "uid {uid}"),
            Actor::ControlPlane => f.write_str("control plane"),
        }
    }
}

/// Names of audited actions ([`AuditRecord::action`]), one constant per kind of change, so that
/// writers and the dashboard's filter agree.
pub mod audit_action {
    /// A dashboard login succeeded (detail: client address).
    pub const LOGIN: &str = "login";
    /// A dashboard login failed: wrong password or unknown user (detail: client address).
    pub const LOGIN_FAILED: &str = "login_failed";
    /// A user was added (`gaffer-control user add`, `init`).
    pub const USER_ADD: &str = "user_add";
    /// A user was removed; its sessions ended.
    pub const USER_REMOVE: &str = "user_remove";
    /// A user's password was changed; its sessions ended.
    pub const USER_PASSWD: &str = "user_passwd";
    /// An API token was minted.
    pub const API_TOKEN_CREATE: &str = "api_token_create";
    /// An API token was revoked.
    pub const API_TOKEN_REVOKE: &str = "api_token_revoke";
    /// An enrollment token was minted.
    pub const ENROLL_TOKEN_CREATE: &str = "enroll_token_create";
    /// An agent enrolled online with a token.
    pub const ENROLL: &str = "enroll";
    /// An air-gapped agent was enrolled offline.
    pub const ENROLL_OFFLINE: &str = "enroll_offline";
    /// An offline-sync bundle was imported.
    pub const BUNDLE_IMPORT: &str = "bundle_import";
    /// An agent was revoked.
    pub const REVOKE_AGENT: &str = "revoke_agent";
    /// An agent was drained: no new jobs, what it holds runs to the end or to the deadline
    /// (detail: the deadline).
    pub const AGENT_DRAIN: &str = "agent_drain";
    /// An agent was cordoned: no new jobs.
    pub const AGENT_CORDON: &str = "agent_cordon";
    /// An agent's cordon or drain was lifted.
    pub const AGENT_UNCORDON: &str = "agent_uncordon";
    /// A CA rotation phase was entered (detail: the phase).
    pub const CA_ROTATE: &str = "ca_rotate";
    /// A job was submitted.
    pub const JOB_SUBMIT: &str = "job_submit";
    /// A job was cancelled.
    pub const JOB_CANCEL: &str = "job_cancel";
    /// A job was queued again.
    pub const JOB_RETRY: &str = "job_retry";
    /// An agent's report was refused (not the lease holder, unknown job).
    pub const REFUSE_REPORT: &str = "refuse_report";
    /// A release artifact was added (`gaffer-control release add`; detail: version, architecture,
    /// SHA-256, signing key).
    pub const RELEASE_ADD: &str = "release_add";
    /// A rollout was started (`gaffer-control rollout start`; detail: id, version, site, canaries).
    pub const ROLLOUT_START: &str = "rollout_start";
    /// The running rollout was paused.
    pub const ROLLOUT_PAUSE: &str = "rollout_pause";
    /// The paused rollout was resumed.
    pub const ROLLOUT_RESUME: &str = "rollout_resume";
    /// The active rollout was aborted.
    pub const ROLLOUT_ABORT: &str = "rollout_abort";
    /// A rollout halted because a target failed (agent: the failed one; detail: the reason).
    pub const ROLLOUT_HALTED: &str = "rollout_halted";
    /// A rollout completed: every target is healthy or skipped.
    pub const ROLLOUT_COMPLETE: &str = "rollout_complete";
    /// A webhook or email target was added (`gaffer-control webhook add`; detail: name, URL, events).
    pub const WEBHOOK_ADD: &str = "webhook_add";
    /// A webhook target was removed.
    pub const WEBHOOK_REMOVE: &str = "webhook_remove";
    /// A test delivery was queued for a webhook target.
    pub const WEBHOOK_TEST: &str = "webhook_test";

    /// Every action above, for the dashboard's filter suggestions.
    pub const ALL: &[&str] = &[
        LOGIN,
        LOGIN_FAILED,
        USER_ADD,
        USER_REMOVE,
        USER_PASSWD,
        API_TOKEN_CREATE,
        API_TOKEN_REVOKE,
        ENROLL_TOKEN_CREATE,
        ENROLL,
        ENROLL_OFFLINE,
        BUNDLE_IMPORT,
        REVOKE_AGENT,
        AGENT_DRAIN,
        AGENT_CORDON,
        AGENT_UNCORDON,
        CA_ROTATE,
        JOB_SUBMIT,
        JOB_CANCEL,
        JOB_RETRY,
        REFUSE_REPORT,
        RELEASE_ADD,
        ROLLOUT_START,
        ROLLOUT_PAUSE,
        ROLLOUT_RESUME,
        ROLLOUT_ABORT,
        ROLLOUT_HALTED,
        ROLLOUT_COMPLETE,
        WEBHOOK_ADD,
        WEBHOOK_REMOVE,
        WEBHOOK_TEST,
    ];
}

impl AuditRecord {
    /// An entry for `action` by `actor` at `at_ms`, about nothing in particular yet; add what it
    /// concerns with [`AuditRecord::agent`], [`AuditRecord::site`], [`AuditRecord::job`] and
    /// [`AuditRecord::detail`]. Write it with [`Store::append_audit`] (then [`Store::flush`]).
    pub fn new(actor: &Actor, action: &str, at_ms: UnixMs) -> Self {
        AuditRecord {
            at_ms,
            who: actor.to_string(),
            action: action.to_owned(),
            agent: None,
            site: None,
            detail: String::new(),
            job: None,
        }
    }

    /// The entry concerning `agent`.
    pub fn agent(mut self, agent: AgentId) -> Self {
        self.agent = Some(agent);
        self
    }

    /// The entry concerning `site`.
    pub fn site(mut self, site: impl Into<String>) -> Self {
        self.site = Some(site.into());
        self
    }

    /// The entry concerning `job`.
    pub fn job(mut self, job: JobId) -> Self {
        self.job = Some(job);
        self
    }

    /// The entry with human-readable `detail` (never a secret).
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// A stored audit entry: the record and its id. Ids increase strictly with every append (also
/// across restarts) and are never reused: the log is append-only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log (> 0).
    pub id: u64,
    /// The entry.
    #[serde(flatten)]
    pub record: AuditRecord,
}

/// Which audit entries [`Store::query_audit`] returns. Empty filters match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only entries whose `who` is exactly this.
    pub actor: Option<String>,
    /// Only entries with this action.
    pub action: Option<String>,
    /// Only entries concerning this agent.
    pub agent: Option<AgentId>,
    /// Only entries concerning this job.
    pub job: Option<JobId>,
    /// Only entries at or after this time.
    pub since_ms: Option<UnixMs>,
    /// Continue with entries older than this id (from [`AuditPage::next`]).
    pub after: Option<u64>,
    /// Most entries returned; callers cap it (the API at 1000).
    pub limit: usize,
}

impl AuditQuery {
    /// Whether `entry` matches the filters (not the cursor).
    pub fn matches(&self, entry: &AuditRecord) -> bool {
        self.actor.as_deref().is_none_or(|a| entry.who == a)
            && self.action.as_deref().is_none_or(|a| entry.action == a)
            && self.agent.is_none_or(|a| entry.agent == Some(a))
            && self.job.is_none_or(|j| entry.job == Some(j))
            && self.since_ms.is_none_or(|t| entry.at_ms >= t)
    }
}

/// One page of [`Store::query_audit`], newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditPage {
    /// The entries, newest (highest id) first.
    pub entries: Vec<AuditEntry>,
    /// Cursor (an id) for the next, older page; None when the log has nothing older.
    pub next: Option<u64>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthSample {
    /// Control-plane receive time.
    pub received_at_ms: UnixMs,
    /// The report.
    pub health: Health,
}

/// Lifecycle of a job: `queued → assigned → running → succeeded | failed | cancelled`; every
/// change goes through [`crate::jobs::transition`]. A lease that expires returns the job to
/// `queued` (or ends it `failed` once its attempts are spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for an agent.
    Queued,
    /// Leased to an agent, not yet accepted by it.
    Assigned,
    /// The agent accepted it and is analyzing.
    Running,
    /// Finished with a digest.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped by an operator.
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order (the order of [`JobCounts`]).
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// API/dashboard name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has finished (no further change but an operator's retry).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Position in [`JobState::ALL`] (and in [`JobCounts`]); also the state byte of index keys.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            format!("unknown job state {s:?} (known: queued, assigned, running, succeeded, failed, cancelled)")
        })
    }
}

/// Number of jobs in each state, indexed by [`JobState::index`]. Kept by the store as jobs
/// change, so reading it costs the same with 10 or 10 million jobs of history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts(pub [u64; 6]);

impl JobCounts {
    /// Jobs in `state`.
    pub fn get(&self, state: JobState) -> u64 {
        self.0[state.index()]
    }
}

/// How urgently a job should be leased. Higher priorities lease first; within one priority,
/// oldest first.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// After every normal and high job.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Before every normal and low job.
    High,
}

impl Priority {
    /// API/dashboard name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!("unknown priority {other:?} (known: low, normal, high)")),
        }
    }
}

/// The current lease of an assigned or running job: who holds it, under which lease id (the
/// fencing token), and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The agent the job is leased to.
    pub holder: AgentId,
    /// The lease id sent in the assignment (the job's lease epoch when it was issued; > 0).
    pub lease_id: LeaseId,
    /// When the lease expires unless renewed, Unix ms: for an assignment, when it must have been
    /// accepted (`--assign-timeout-secs`); for a running job, set when its holder's link goes
    /// (`--lease-grace-secs` later) and cleared when the holder reconnects holding it. None while
    /// the holder is connected and running it.
    pub deadline_ms: Option<UnixMs>,
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
    /// Leasing order among queued jobs.
    #[serde(default)]
    pub priority: Priority,
    /// Lifecycle state.
    pub state: JobState,
    /// Agent holding the lease (assigned/running) or that finished it.
    pub agent: Option<AgentId>,
    /// The current lease: `Some` exactly when the job is assigned or running.
    #[serde(default)]
    pub lease: Option<Lease>,
    /// The last lease id issued for this job (0: never leased); the next lease gets one more.
    #[serde(default)]
    pub lease_epoch: LeaseId,
    /// Fraction done, 0..=1.
    pub progress: f32,
    /// Frames decoded so far.
    pub frames_decoded: u64,
    /// Failure reason (failed), or why the last attempt was requeued.
    pub error: Option<String>,
    /// How many attempts were started (leases issued, plus self-started watch-folder runs);
    /// capped by `--max-attempts`.
    pub attempts: u32,
    /// Insertion sequence assigned by the store when the job is inserted (the value passed to
    /// [`Store::insert_job`] is ignored): orders jobs created in the same millisecond and is part
    /// of the index keys.
    #[serde(default)]
    pub seq: u64,
    /// When it was created.
    pub created_at_ms: UnixMs,
    /// Last state or progress change.
    pub updated_at_ms: UnixMs,
    /// When it finished.
    pub finished_at_ms: Option<UnixMs>,
    /// The media file's chain of custody as its agent reported it (`AgentMessage::Custody`, protocol 6);
    /// `None` until reported, and for jobs run by agents that speak an older protocol.
    #[serde(default)]
    pub custody: Option<MediaCustody>,
    /// Who submitted it: `token:NAME` (API token), `user:NAME` (dashboard or API user), or
    /// `watch folder of agent ID`; `None` for jobs stored before this was recorded.
    #[serde(default)]
    pub submitted_by: Option<String>,
    /// Every state change, oldest first, appended by [`crate::jobs::transition`]; at most
    /// [`JOB_HISTORY_MAX`] entries (the oldest are dropped). Creation (queued at `created_at_ms`) is not
    /// an entry.
    #[serde(default)]
    pub history: Vec<StateChange>,
}

/// Most entries [`JobRecord::history`] keeps (64); older ones are dropped.
pub const JOB_HISTORY_MAX: usize = 64;

/// What an agent read of a job's media file, hashed on its box (never the content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaCustody {
    /// SHA-256 of the file's bytes, 64 lowercase hex characters.
    pub sha256: String,
    /// Size of the file, bytes.
    pub size_bytes: u64,
    /// The file's modification time, seconds since the Unix epoch (`None` where the agent's file
    /// system does not say).
    pub modified_unix_secs: Option<i64>,
    /// The agent that hashed it (the lease holder).
    pub agent: AgentId,
    /// When the control plane recorded it, Unix ms.
    pub recorded_at_ms: UnixMs,
}

/// One state change of a job ([`JobRecord::history`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The state entered.
    pub state: JobState,
    /// When, Unix ms.
    pub at_ms: UnixMs,
    /// The agent holding or finishing the job after the change, if any.
    pub agent: Option<AgentId>,
    /// Why (the failure or requeue reason), if the change has one.
    pub reason: Option<String>,
}

/// Which jobs [`Store::list_jobs`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs leased to or finished by this agent (`JobRecord::agent`).
    pub agent: Option<AgentId>,
    /// Continue after this cursor (from [`JobPage::next`]).
    pub after: Option<JobCursor>,
    /// Most jobs returned; callers cap it (the API at 1000).
    pub limit: usize,
}

/// Position in the newest-first job listing: the last job of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCursor {
    /// `created_at_ms` of the last job returned.
    pub created_at_ms: UnixMs,
    /// `seq` of the last job returned.
    pub seq: u64,
}

impl JobCursor {
    /// The cursor of `job`.
    pub fn of(job: &JobRecord) -> Self {
        Self { created_at_ms: job.created_at_ms, seq: job.seq }
    }
}

impl std::fmt::Display for JobCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.created_at_ms, self.seq)
    }
}

impl std::str::FromStr for JobCursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("cursor {s:?} is not of the form <created_at_ms>-<seq>: pass the `next` of a previous page");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self { created_at_ms: a.parse().map_err(|_| bad())?, seq: b.parse().map_err(|_| bad())? })
    }
}

/// One page of [`Store::list_jobs`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<JobRecord>,
    /// Cursor for the next page; None when this is the last.
    pub next: Option<JobCursor>,
}

/// A job change computed from a record read earlier: written only if the record is still `before`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobWrite {
    /// The record as read (the precondition).
    pub before: JobRecord,
    /// The record to write (same id).
    pub after: JobRecord,
}

/// Everything one applied agent message writes (see [`Store::commit_agent_message`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentCommit {
    /// The sending agent.
    pub agent: AgentId,
    /// The message's sequence number (> 0); becomes the agent's watermark.
    pub seq: u64,
    /// When it was applied (the agent's `last_seen_ms`).
    pub now_ms: UnixMs,
    /// The job change, if the message changes a job.
    pub job: Option<JobWrite>,
    /// A digest to store for a job (kept if the job already has one).
    pub digest: Option<(JobId, Digest)>,
    /// A job the message creates (a watch-folder submission); skipped if the id exists.
    pub new_job: Option<JobRecord>,
    /// Audit entries (refused reports).
    pub audit: Vec<AuditRecord>,
}

/// What [`Store::commit_agent_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Everything was written.
    Committed,
    /// The sequence number was already applied: nothing written; acknowledge again.
    Duplicate,
    /// The job changed since it was read: nothing written; read it again and recompute.
    Conflict,
}

/// A control-plane replica serving from the shared store, as it last reported itself
/// ([`Store::replica_heartbeat`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The replica's id (chosen at its start).
    pub id: uuid::Uuid,
    /// Where agents reach its QUIC endpoint (`host:port`).
    pub quic_addr: String,
    /// Where its dashboard and API listen (`host:port`).
    pub http_addr: String,
    /// When it started, its clock.
    pub started_at_ms: UnixMs,
    /// Its latest heartbeat, its clock.
    pub seen_at_ms: UnixMs,
    /// Its gaffer-control version.
    pub version: String,
}

/// Something one replica tells every replica on the same store ([`Store::publish`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StoreEvent {
    /// A job was queued or a slot was freed: run a leasing pass. Also sent by the store itself
    /// ([`STORE_ORIGIN`]) when events may have been missed (its listener reconnected).
    JobsChanged,
    /// Send `msg` to `agent` if its link is up on this replica.
    Deliver {
        /// The agent.
        agent: AgentId,
        /// The message for it.
        msg: gaffer_protocol::messages::ControlMessage,
    },
    /// The agent was revoked: close its link if it is up on this replica.
    AgentRevoked {
        /// The agent.
        agent: AgentId,
    },
    /// The revocation list changed: reload it.
    CertsRevoked,
    /// An operator cordoned, drained or uncordoned the agent: re-read its
    /// [`AgentRecord::scheduling`] if its link is up on this replica.
    SchedulingChanged {
        /// The agent.
        agent: AgentId,
    },
}

/// A [`StoreEvent`] with the replica that published it, so a replica can skip its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreEventEnvelope {
    /// The publishing replica's id ([`ReplicaRecord::id`]); [`STORE_ORIGIN`] for events the
    /// store makes itself.
    pub origin: uuid::Uuid,
    /// The event.
    pub event: StoreEvent,
}

/// Origin of events a store makes itself (the nil UUID, which no replica has).
pub const STORE_ORIGIN: uuid::Uuid = uuid::Uuid::nil();

/// Largest event [`Store::publish`] sends, bytes of JSON (PostgreSQL's notification payload
/// limit is 8,000 bytes). Every store enforces it, so an event that works on one works on all.
pub const EVENT_BYTES_MAX: usize = 7_900;

/// Events a subscriber may fall behind by before it misses some
/// (`broadcast::error::RecvError::Lagged`; treat that as [`StoreEvent::JobsChanged`]).
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

impl StoreEventEnvelope {
    /// The envelope as JSON, as it is published.
    ///
    /// # Errors
    /// [`StoreError::EventTooLarge`] past [`EVENT_BYTES_MAX`] bytes.
    pub fn to_json(&self) -> StoreResult<String> {
        let json = serde_json::to_string(self).map_err(|e| StoreError::Io(format!("cannot encode event: {e}")))?;
        if json.len() > EVENT_BYTES_MAX {
            return Err(StoreError::EventTooLarge { bytes: json.len(), bytes_max: EVENT_BYTES_MAX });
        }
        Ok(json)
    }
}

/// The control plane's persistent state. See the module docs for the contract.
pub trait Store: Send + Sync + 'static {
    /// Adds a user; returns false (and changes nothing) if one with that name exists.
    fn insert_user(&self, rec: &UserRecord) -> StoreResult<bool>;
    /// One user, by name.
    fn get_user(&self, name: &str) -> StoreResult<Option<UserRecord>>;
    /// Every user, by name.
    fn list_users(&self) -> StoreResult<Vec<UserRecord>>;
    /// Replaces a user's password hash; `password_changed_at_ms` becomes `now_ms`, or one more
    /// than before if that is not later (it strictly increases, so every older session ends).
    /// Returns the updated user, `None` if there is none with that name.
    fn set_user_password(&self, name: &str, password_phc: &str, now_ms: UnixMs) -> StoreResult<Option<UserRecord>>;
    /// Removes a user unless it is the last admin (checked atomically with the removal).
    fn remove_user(&self, name: &str) -> StoreResult<UserRemoval>;

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

    /// Stores a new API token; returns false (and changes nothing) if its name or hash is taken.
    fn create_api_token(&self, rec: &ApiTokenRecord) -> StoreResult<bool>;
    /// The API token with this hash (expired ones included: the caller checks the expiry).
    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>>;
    /// Every API token, by name.
    fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenRecord>>;
    /// Deletes the API token named `name`; returns it, `None` if there is none. Requests with it
    /// are refused from then on.
    fn revoke_api_token(&self, name: &str) -> StoreResult<Option<ApiTokenRecord>>;
    /// Sets the token's `last_used_at_ms` (no-op for an unknown hash). Not flushed.
    fn touch_api_token(&self, hash: &[u8; 32], now_ms: UnixMs) -> StoreResult<()>;

    /// Stores a dashboard session.
    fn insert_session(&self, rec: &SessionRecord) -> StoreResult<()>;
    /// Looks a session up by the hash of its cookie value.
    fn get_session(&self, id_hash: &[u8; 32]) -> StoreResult<Option<SessionRecord>>;
    /// Deletes a session (logout).
    fn delete_session(&self, id_hash: &[u8; 32]) -> StoreResult<()>;
    /// Deletes every session of `user`; returns how many there were.
    fn delete_user_sessions(&self, user: &str) -> StoreResult<usize>;
    /// Deletes every session that expired before `now_ms`; returns how many.
    fn delete_expired_sessions(&self, now_ms: UnixMs) -> StoreResult<usize>;

    /// Stores a newly enrolled agent (replacing any record with the same id).
    fn insert_agent(&self, rec: &AgentRecord) -> StoreResult<()>;
    /// One agent.
    fn get_agent(&self, id: AgentId) -> StoreResult<Option<AgentRecord>>;
    /// All agents, ordered by site then hostname.
    fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// How many jobs are leased (assigned or running) to each of `holders` now, by lease holder
    /// ([`Lease::holder`]); agents that hold none are absent. The default reads every leased job
    /// ([`Store::jobs_in_state`], at most [`LEASED_JOBS_READ_MAX`] per state): O(leased jobs). A
    /// store that serves large fleets indexes jobs by holder instead ([`sled_store::SledStore`]:
    /// O(holders + their jobs)).
    fn leased_job_counts(&self, holders: &[AgentId]) -> StoreResult<std::collections::HashMap<AgentId, usize>> {
        let wanted: std::collections::HashSet<&AgentId> = holders.iter().collect();
        let mut counts = std::collections::HashMap::new();
        for state in [JobState::Assigned, JobState::Running] {
            for job in self.jobs_in_state(state, LEASED_JOBS_READ_MAX)? {
                if let Some(lease) = job.lease.filter(|l| wanted.contains(&l.holder)) {
                    *counts.entry(lease.holder).or_insert(0) += 1;
                }
            }
        }
        Ok(counts)
    }

    /// The jobs leased (assigned or running) to `holder` now, assigned first, each state oldest
    /// first. The default reads every leased job ([`Store::jobs_in_state`], at most
    /// [`LEASED_JOBS_READ_MAX`] per state) and keeps the holder's: O(leased jobs), which a
    /// reconnect storm pays once per agent. [`sled_store::SledStore`] and
    /// [`pg_store::PgStore`] read their holder index instead: O(the holder's jobs).
    fn jobs_leased_to(&self, holder: AgentId) -> StoreResult<Vec<JobRecord>> {
        let mut out = Vec::new();
        for state in [JobState::Assigned, JobState::Running] {
            out.extend(
                self.jobs_in_state(state, LEASED_JOBS_READ_MAX)?
                    .into_iter()
                    .filter(|j| j.lease.is_some_and(|l| l.holder == holder)),
            );
        }
        Ok(out)
    }

    /// One page of agents matching `query`, by site, then hostname, then id, with the fleet's
    /// counts by state and site. Every agent on the page is read from its record as stored when
    /// the page is read (so `connected` and the state are never older than the call); with
    /// `limit` 0 only the counts are returned.
    ///
    /// The default reads every agent ([`Store::list_agents`]): O(fleet) decodes per call. A store
    /// that serves large fleets keeps an index instead ([`sled_store::SledStore`]: O(limit)
    /// decodes, counts in O(sites)).
    fn list_agents_page(&self, query: &AgentQuery) -> StoreResult<AgentPage> {
        let agents = self.list_agents()?;
        let counts = AgentCounts::of(&agents);
        let mut matching =
            agents.into_iter().filter(|a| query.matches(a) && query.after.as_ref().is_none_or(|c| c.is_before(a)));
        let page: Vec<AgentRecord> = matching.by_ref().take(query.limit).collect();
        let more = query.limit > 0 && matching.next().is_some();
        let next = if more { page.last().map(AgentCursor::of) } else { None };
        Ok(AgentPage { agents: page, counts, next })
    }
    /// Read-modify-write of one agent; `None` if it does not exist.
    fn update_agent(&self, id: AgentId, f: &mut dyn FnMut(&mut AgentRecord)) -> StoreResult<Option<AgentRecord>>;
    /// Appends a health sample to the agent's history, keeping at most `keep_max` newest samples
    /// and at most `bytes_max` bytes of them (oldest dropped first; the newest is always kept),
    /// and sets it as the agent's `last_health`.
    fn push_health(&self, id: AgentId, sample: &HealthSample, keep_max: usize, bytes_max: usize) -> StoreResult<()>;
    /// One heartbeat: [`Store::push_health`] of `sample`, and the agent's `last_seen_ms` set to
    /// `sample.received_at_ms`. Not flushed: health is not a job result, and a sample lost in a
    /// crash is replaced by the next one within a heartbeat interval. The default makes two agent
    /// writes; [`sled_store::SledStore`] makes one (a heartbeat rewrites the agent record, its
    /// certificate history included, so at 2,000 heartbeats a second the second write is a
    /// tenth of the control plane's CPU).
    fn record_heartbeat(
        &self,
        id: AgentId,
        sample: &HealthSample,
        keep_max: usize,
        bytes_max: usize,
    ) -> StoreResult<()> {
        self.push_health(id, sample, keep_max, bytes_max)?;
        self.update_agent(id, &mut |a| a.last_seen_ms = Some(sample.received_at_ms))?;
        Ok(())
    }
    /// Up to `limit` newest health samples, oldest first.
    fn health_history(&self, id: AgentId, limit: usize) -> StoreResult<Vec<HealthSample>>;

    /// Inserts a job (assigning its [`JobRecord::seq`]) and counts it; returns false (and changes
    /// nothing) if a job with that id exists.
    fn insert_job(&self, job: &JobRecord) -> StoreResult<bool>;
    /// One job.
    fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>>;
    /// One page of jobs, newest first (by `created_at_ms`, then `seq`), matching `query`.
    fn list_jobs(&self, query: &JobQuery) -> StoreResult<JobPage>;
    /// Up to `limit` jobs in `state`, from the state index: queued jobs in leasing order (higher
    /// [`Priority`] first, then oldest first), other states oldest first. Costs O(limit), however
    /// many jobs are in other states.
    fn jobs_in_state(&self, state: JobState, limit: usize) -> StoreResult<Vec<JobRecord>>;
    /// Number of jobs in each state, O(1).
    fn job_counts(&self) -> StoreResult<JobCounts>;
    /// Read-modify-write of one job. The closure returns whether it changed the record; if it
    /// returns false nothing is written. The state index and counts change with the record in
    /// one atomic write. Returns the record as stored afterwards, `None` if the job does not
    /// exist. The closure may run more than once (on a concurrent change) and must not have side
    /// effects.
    fn update_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>>;
    /// Like [`Store::update_job`], for leasing from several replicas: when another writer holds
    /// the job right now it returns `Ok(None)` at once instead of waiting (PostgreSQL: `SELECT …
    /// FOR UPDATE SKIP LOCKED`; the embedded stores, which have no other writers, behave exactly
    /// like `update_job`). `None` therefore means "missing or busy": skip the job this pass.
    fn claim_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>>;
    /// Deletes up to `limit` finished jobs (and their digests) whose `finished_at_ms` is before
    /// `finished_before_ms`, oldest first; returns how many were deleted. Retention of finished
    /// jobs (`--finished-job-retention`).
    fn delete_finished_jobs(&self, finished_before_ms: UnixMs, limit: usize) -> StoreResult<usize>;
    /// Applies one agent message in one transaction: if `commit.seq` is not above the agent's
    /// applied watermark nothing is written ([`CommitOutcome::Duplicate`]); if the job named by
    /// `commit.job` is no longer exactly `commit.job.before` nothing is written
    /// ([`CommitOutcome::Conflict`]: re-read and recompute); otherwise the job's new record (with
    /// index and counts), the digest (kept if one exists), the new job (skipped if its id exists),
    /// the audit entries, the agent's `last_seen_ms` and the watermark `seq` are written together
    /// ([`CommitOutcome::Committed`]). Not durable until [`Store::flush`].
    fn commit_agent_message(&self, commit: &AgentCommit) -> StoreResult<CommitOutcome>;
    /// Stores a job's digest; returns false (and keeps the first) if it already has one.
    fn put_digest(&self, id: JobId, digest: &Digest) -> StoreResult<bool>;
    /// A job's digest.
    fn get_digest(&self, id: JobId) -> StoreResult<Option<Digest>>;

    /// Highest sequence number applied from this agent (for dedupe), if any.
    fn last_applied_seq(&self, agent: AgentId) -> StoreResult<Option<u64>>;
    /// Records that every message up to `seq` from `agent` has been applied.
    fn set_last_applied_seq(&self, agent: AgentId, seq: u64) -> StoreResult<()>;

    /// Appends an entry to the audit log, with an id strictly greater than every earlier entry's
    /// ([`AuditEntry::id`]). Entries are never changed or deleted. Not durable until
    /// [`Store::flush`].
    fn append_audit(&self, rec: &AuditRecord) -> StoreResult<()>;
    /// Up to `limit` newest audit entries, newest first.
    fn list_audit(&self, limit: usize) -> StoreResult<Vec<AuditRecord>>;
    /// One page of audit entries matching `query`, newest first. Looks at no more than
    /// [`sled_store::list_scan_budget`]`(limit)` entries; a page may then hold fewer than `limit`
    /// matches (even none) and still have a `next`. Paging on until `next` is `None` visits every
    /// entry once.
    fn query_audit(&self, query: &AuditQuery) -> StoreResult<AuditPage>;

    /// Offline-sync bundle numbers of `agent` (zeros if none were exchanged).
    fn bundle_numbers(&self, agent: AgentId) -> StoreResult<BundleNumbers>;
    /// Replaces the offline-sync bundle numbers of `agent`.
    fn set_bundle_numbers(&self, agent: AgentId, numbers: &BundleNumbers) -> StoreResult<()>;

    /// Adds a certificate to the revocation list (replacing an entry with the same serial).
    fn insert_revoked_cert(&self, rec: &RevokedCertRecord) -> StoreResult<()>;
    /// Every revoked certificate, by serial.
    fn list_revoked_certs(&self) -> StoreResult<Vec<RevokedCertRecord>>;

    /// Stores a rollout ([`crate::rollout::Rollout`], with its targets), replacing the one with
    /// the same id. Not durable until [`Store::flush`].
    fn put_rollout(&self, rollout: &crate::rollout::Rollout) -> StoreResult<()>;
    /// Every stored rollout, by id (oldest first).
    fn list_rollouts(&self) -> StoreResult<Vec<crate::rollout::Rollout>>;
    /// Deletes the rollout `id`; returns whether it existed.
    fn delete_rollout(&self, id: u64) -> StoreResult<bool>;

    /// Stores a webhook target ([`crate::webhook::WebhookTarget`]), replacing the one with its id.
    /// Not durable until [`Store::flush`].
    fn put_webhook_target(&self, target: &crate::webhook::WebhookTarget) -> StoreResult<()>;
    /// Every webhook target, by id.
    fn list_webhook_targets(&self) -> StoreResult<Vec<crate::webhook::WebhookTarget>>;
    /// Deletes the webhook target `id` (its deliveries stay); whether it existed.
    fn delete_webhook_target(&self, id: uuid::Uuid) -> StoreResult<bool>;
    /// Inserts the pending delivery `d`. When `pending_max` deliveries are pending already, the
    /// oldest pending ones (by id: UUID v7, creation order) are marked
    /// [`crate::webhook::DeliveryState::Dropped`] first so that at most `pending_max` stay
    /// pending; returns their ids. Not durable until [`Store::flush`].
    fn enqueue_webhook_delivery(
        &self,
        d: &crate::webhook::WebhookDelivery,
        pending_max: usize,
    ) -> StoreResult<Vec<uuid::Uuid>>;
    /// Pending deliveries with `next_attempt_at_ms <= now_ms`, soonest first, at most `limit`
    /// (an index read, never a scan of finished deliveries).
    fn webhook_deliveries_due(&self, now_ms: UnixMs, limit: usize)
        -> StoreResult<Vec<crate::webhook::WebhookDelivery>>;
    /// Read-modify-write of the delivery `id` against its latest committed value, atomically with
    /// the due index (as [`Store::update_job`]; `f` may run more than once). `f` returns false to
    /// leave it unchanged. Returns the delivery as written; None when there is no such delivery
    /// or `f` declined.
    fn update_webhook_delivery(
        &self,
        id: uuid::Uuid,
        f: &mut dyn FnMut(&mut crate::webhook::WebhookDelivery) -> bool,
    ) -> StoreResult<Option<crate::webhook::WebhookDelivery>>;
    /// The newest deliveries, newest first, at most `limit`.
    fn list_webhook_deliveries(&self, limit: usize) -> StoreResult<Vec<crate::webhook::WebhookDelivery>>;
    /// How many deliveries are pending.
    fn webhook_pending_count(&self) -> StoreResult<u64>;
    /// Deletes up to `limit` deliveries that are not pending and were created before
    /// `created_before_ms`, oldest first; how many.
    fn delete_finished_webhook_deliveries(&self, created_before_ms: UnixMs, limit: usize) -> StoreResult<usize>;

    /// Records that replica `rec.id` is alive (insert or replace).
    fn replica_heartbeat(&self, rec: &ReplicaRecord) -> StoreResult<()>;
    /// Every registered replica, by id (stale ones included: compare `seen_at_ms`).
    fn list_replicas(&self) -> StoreResult<Vec<ReplicaRecord>>;
    /// Removes replica `id` from the registry; returns whether it was there.
    fn remove_replica(&self, id: uuid::Uuid) -> StoreResult<bool>;

    /// Sends `ev` to every subscriber of every store on the same database, this one's own
    /// included (filter by [`StoreEventEnvelope::origin`]). Delivery is best effort: events are
    /// not stored, and a subscriber that was not listening, or fell more than
    /// [`EVENT_CHANNEL_CAPACITY`] behind, misses them.
    ///
    /// # Errors
    /// [`StoreError::EventTooLarge`] past [`EVENT_BYTES_MAX`] bytes of JSON (nothing sent).
    fn publish(&self, ev: &StoreEventEnvelope) -> StoreResult<()>;
    /// A receiver of every event published from now on (see [`Store::publish`]).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreEventEnvelope>;

    /// Makes every write so far durable (fsync). Acknowledgements to agents wait for this.
    fn flush(&self) -> StoreResult<()>;
}
