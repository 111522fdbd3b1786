//! Staged rollouts of agent releases: canaries first, then everyone, halting on the first failure.
//!
//! Two layers, as the rest of the fleet core:
//!
//! * [`RolloutBook`] is the decision: a pure state machine with no clock, no store and no I/O.
//!   Inputs carry `now_ms`: an agent connected ([`RolloutBook::on_agent_connected`]), an agent's
//!   [`UpdateReport`] ([`RolloutBook::on_report`]), time passing ([`RolloutBook::tick`]) and the
//!   operator's [`RolloutBook::start`], [`RolloutBook::pause`], [`RolloutBook::resume`],
//!   [`RolloutBook::abort`]. Outputs are queued and taken by the caller: messages to agents
//!   ([`RolloutBook::take_messages`]), changes of which agents must take no new jobs
//!   ([`RolloutBook::take_hold_changes`]), the rollouts that changed (to persist) and events to
//!   audit. The simulation in `control-plane/tests/rollout.rs` drives exactly this code.
//! * [`Rollouts`] is the thin, thread-safe driver the server uses: the book behind a mutex, loaded
//!   from and saved to the [`Store`], releases resolved from [`Releases`], messages delivered with
//!   [`Fleet::send`] and holds set with [`Fleet::set_hold`], audit records and Prometheus metrics.
//!
//! # The rules
//!
//! * **One rollout at a time.** [`RolloutBook::start`] refuses while another is running or paused.
//!   Finished rollouts (halted, aborted, completed) stay listed, the newest [`ROLLOUTS_KEPT_MAX`].
//! * **Targets.** Every enrolled, non-revoked agent (of the rollout's site, if one is given). Those
//!   that already run the version and those seen speaking a protocol older than
//!   [`UPDATE_PROTOCOL_VERSION`] are [`TargetState::Skipped`] with the reason;
//!   an agent not seen since the control plane started is skipped for its protocol when it connects.
//! * **Canaries.** The first `canary` targets, connected ones first, then by site, host name and id
//!   (deterministic). A canary that turns out to be skipped is replaced by the next pending target.
//!   Only canaries get orders until every canary is [`TargetState::Healthy`]; then the general phase
//!   orders every other target at once. `canary = 0` starts in the general phase.
//! * **Orders** ([`ControlMessage::Update`]) go to a target when it becomes due, and again on each
//!   of its connections while it is [`TargetState::Ordered`] or [`TargetState::Staged`]. An order
//!   for an agent that is not connected is simply not delivered: it goes out when the agent
//!   connects. An agent is never ordered to a version it runs: one that connects already running
//!   the version after its order moves to [`TargetState::Restarted`] (it updated; the health report
//!   follows), one that runs it without an order is skipped.
//! * **Holding jobs back.** From [`TargetState::Staged`] until [`TargetState::Healthy`] or
//!   [`TargetState::Failed`] the agent takes no new jobs ([`RolloutBook::hold`]): it drains, restarts
//!   into the new version, and runs its health gate without work arriving meanwhile. Its running
//!   jobs are not touched.
//! * **Halt on error.** Any [`TargetState::Failed`] target — a failed report, or a target staged or
//!   restarted that reports nothing for `health_wait_secs` + [`HEALTH_REPORT_GRACE_SECS`] — halts a
//!   running or paused rollout ([`RolloutState::Halted`], naming the agent and its reason): no new
//!   orders, and every order not applied yet ([`TargetState::Ordered`] and
//!   [`TargetState::Staged`]) is withdrawn ([`ControlMessage::UpdateWithdrawn`]); those targets go
//!   back to [`TargetState::Pending`]. Agents that did not update are untouched. Targets already
//!   restarted carry on through their health gate and their reports are still recorded.
//! * **Pause** withdraws the orders not staged yet ([`TargetState::Ordered`] → pending) and sends no
//!   new ones; staged agents go ahead. **Resume** carries on where it was. **Abort** is like a halt
//!   by the operator ([`RolloutState::Aborted`]).
//! * **Completed** when every target is healthy or skipped.
//! * **Air-gapped targets** (enrolled offline) follow the same rules through their bundles: a due
//!   target is ordered when `bundle import` writes its reply carrying the order and the artifact
//!   ([`RolloutBook::order_for_bundle`], then [`RolloutBook::on_bundle_order_written`]); it is
//!   sent again in every reply while the target is [`TargetState::Ordered`]. Its reports arrive in
//!   its next bundle, and the version the bundle says it runs moves it on as a Hello does
//!   ([`RolloutBook::on_agent_bundle`]). It has no report deadline (nobody knows when the next
//!   bundle travels), and a withdrawn order cannot reach it: a release it staged is applied.
//! * **Reports** are at-least-once: a report for another rollout id, for an agent that is not a
//!   target, for another version, or one that would move a target backwards (a `Staged` after
//!   `Healthy`, anything after a final state) changes nothing.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use gaffer_protocol::bundle;
use gaffer_protocol::messages::{AgentId, ControlMessage, UpdateOrder, UpdateOutcome, UpdateReport};
use gaffer_protocol::UPDATE_PROTOCOL_VERSION;
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::release::{ReleaseError, Releases};
use crate::scheduler::Fleet;
use crate::store::{audit_action, Actor, AuditRecord, Store, StoreError, UnixMs};

/// A rollout's id: 1 for the first, one more for each next.
pub type RolloutId = u64;

/// Finished rollouts kept (listed, stored); older ones are deleted when a new one starts.
pub const ROLLOUTS_KEPT_MAX: usize = 50;
/// Most targets one rollout takes (the design's fleet is 10,000 agents).
pub const ROLLOUT_TARGETS_MAX: usize = 100_000;
/// Most canaries a rollout asks for.
pub const CANARY_MAX: u32 = 1000;
/// Shortest health wait accepted, seconds.
pub const HEALTH_WAIT_SECS_MIN: u32 = 1;
/// Longest health wait accepted, seconds (24 h).
pub const HEALTH_WAIT_SECS_MAX: u32 = 24 * 3600;
/// Default health wait, seconds (`rollout start --wait-mins 10`).
pub const HEALTH_WAIT_SECS_DEFAULT: u32 = 600;
/// How much longer than its health wait a staged or restarted target may stay silent before it
/// fails with "no health report within …", seconds (10 min: fetch, drain, restart, self-test).
pub const HEALTH_REPORT_GRACE_SECS: u64 = 600;
/// Longest version string accepted, bytes.
pub const VERSION_BYTES_MAX: usize = 64;
/// Agents whose version and protocol the book remembers from their connections.
pub const SEEN_AGENTS_MAX: usize = 100_000;
/// The architecture rollouts release for (the only one agents are built for today).
pub const ROLLOUT_ARCH: &str = "x86_64";

/// Why a rollout action was refused, or failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// Another rollout is running or paused: pause it and abort it, or wait until it finishes.
    #[error(
        "rollout {id} to {version} is {state}: only one rollout runs at a time; abort it first \
         (`gaffer-control rollout abort`) or wait until it finishes"
    )]
    AlreadyActive {
        /// The active rollout.
        id: RolloutId,
        /// Its version.
        version: String,
        /// `running` or `paused`.
        state: &'static str,
    },
    /// No rollout is running or paused: start one (`gaffer-control rollout start`).
    #[error("no rollout is running or paused (start one with `gaffer-control rollout start --version V`)")]
    NoActiveRollout,
    /// The action does not apply to the active rollout in its state (resume a running one, pause a
    /// paused one).
    #[error("rollout {id} is {state}: {action} does not apply")]
    WrongState {
        /// The rollout.
        id: RolloutId,
        /// Its state.
        state: &'static str,
        /// The action refused.
        action: &'static str,
    },
    /// The version was never added as a release: add it first.
    #[error(
        "release {version} ({arch}) is not added on this control plane: add it with `gaffer-control release add \
         --file gaffer-agent-{version}-{arch}-linux.tar.gz` (see `gaffer-control release list`)"
    )]
    UnknownRelease {
        /// The version asked for.
        version: String,
        /// The architecture.
        arch: &'static str,
    },
    /// No agent needs the update: every target already runs it, or none is enrolled (in the site).
    #[error("no agent to update to {version}{}: {detail}", site.as_deref().map(|s| format!(" in site {s}")).unwrap_or_default())]
    NothingToUpdate {
        /// The version.
        version: String,
        /// The site asked for.
        site: Option<String>,
        /// Why (counts).
        detail: String,
    },
    /// The request is invalid (version, site, canary count, health wait); the message says which.
    #[error("{0}")]
    Invalid(String),
    /// The release index could not be read.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The store failed; retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `rollout start` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The release version (added with `release add`).
    pub version: String,
    /// Only agents of this site; None: every site.
    pub site: Option<String>,
    /// How many canaries update first (0: none). Default 1 (CLI).
    pub canary: u32,
    /// How long an updated agent must stay healthy before it counts, seconds
    /// ([`HEALTH_WAIT_SECS_MIN`]..=[`HEALTH_WAIT_SECS_MAX`]; CLI default 600).
    pub health_wait_secs: u32,
}

impl RolloutSpec {
    /// Checks the spec's fields.
    ///
    /// # Errors
    /// [`RolloutError::Invalid`] saying which field and what is allowed.
    pub fn validate(&self) -> Result<(), RolloutError> {
        let v = &self.version;
        if v.is_empty()
            || v.len() > VERSION_BYTES_MAX
            || !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'))
        {
            return Err(RolloutError::Invalid(format!(
                "--version {v:?} is not a release version (1-{VERSION_BYTES_MAX} of letters, digits, '.', '-', '+', '_')"
            )));
        }
        if let Some(site) = &self.site {
            crate::scheduler::validate_site(site).map_err(|e| RolloutError::Invalid(format!("--site: {e}")))?;
        }
        if self.canary > CANARY_MAX {
            return Err(RolloutError::Invalid(format!("--canary must be at most {CANARY_MAX}")));
        }
        if !(HEALTH_WAIT_SECS_MIN..=HEALTH_WAIT_SECS_MAX).contains(&self.health_wait_secs) {
            return Err(RolloutError::Invalid(format!(
                "the health wait must be between {HEALTH_WAIT_SECS_MIN} s and {} h",
                HEALTH_WAIT_SECS_MAX / 3600
            )));
        }
        Ok(())
    }
}

/// The release artifact a rollout orders (from the release index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRelease {
    /// The version.
    pub version: String,
    /// `gaffer-agent-VERSION-ARCH-linux.tar.gz`.
    pub file_name: String,
    /// Size of the signed artifact, bytes.
    pub size_bytes: u64,
    /// SHA-256 of the signed artifact, lowercase hex.
    pub sha256: String,
}

/// An enrolled agent the rollout may target, as the caller knows it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The agent.
    pub agent_id: AgentId,
    /// Its site.
    pub site: String,
    /// Its host name.
    pub hostname: String,
    /// The version from its latest Hello (None: never connected).
    pub agent_version: Option<String>,
    /// Whether its link is up now.
    pub connected: bool,
    /// Air-gapped (enrolled offline): syncs by bundles, not the link.
    pub offline: bool,
    /// Revoked: never a target.
    pub revoked: bool,
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Sending orders as targets become due.
    Running,
    /// The operator paused it: no new orders.
    Paused,
    /// A target failed: no new orders; unapplied orders were withdrawn.
    Halted {
        /// What failed, in words.
        reason: String,
        /// The agent that failed.
        agent_id: Option<AgentId>,
    },
    /// The operator aborted it.
    Aborted {
        /// Who (audit actor).
        by: String,
    },
    /// Every target is healthy or skipped.
    Completed,
}

impl RolloutState {
    /// `running`, `paused`, `halted`, `aborted` or `completed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted { .. } => "halted",
            RolloutState::Aborted { .. } => "aborted",
            RolloutState::Completed => "completed",
        }
    }

    /// Running or paused (blocks another start).
    pub fn is_active(&self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::Paused)
    }
}

/// Which targets may get orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Only canaries.
    Canary,
    /// Everyone (every canary is healthy, or there are none).
    General,
}

impl Phase {
    /// `canary` or `general`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Canary => "canary",
            Phase::General => "general",
        }
    }
}

/// Where one target stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TargetState {
    /// Not ordered (yet, or any more: its order was withdrawn).
    Pending,
    /// Sent the order; no report yet.
    Ordered,
    /// Fetched and verified the release; restarts into it once it runs no job.
    Staged,
    /// Connected running the new version; its health report is due.
    Restarted,
    /// Passed its health gate on the new version.
    Healthy,
    /// The update failed (the agent runs its previous version) or no health report came.
    Failed {
        /// Why, in words.
        reason: String,
    },
    /// Not updated by this rollout.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// Every target state name, in the order of the update ([`TargetState::as_str`]).
pub const TARGET_STATES: [&str; 7] = ["pending", "ordered", "staged", "restarted", "healthy", "failed", "skipped"];

impl TargetState {
    /// `pending`, `ordered`, `staged`, `restarted`, `healthy`, `failed` or `skipped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Ordered => "ordered",
            TargetState::Staged => "staged",
            TargetState::Restarted => "restarted",
            TargetState::Healthy => "healthy",
            TargetState::Failed { .. } => "failed",
            TargetState::Skipped { .. } => "skipped",
        }
    }

    /// Healthy or skipped: nothing more happens to it.
    pub fn is_done(&self) -> bool {
        matches!(self, TargetState::Healthy | TargetState::Skipped { .. })
    }

    /// Healthy, failed or skipped.
    pub fn is_final(&self) -> bool {
        self.is_done() || matches!(self, TargetState::Failed { .. })
    }

    /// The reason of a failed or skipped target.
    pub fn reason(&self) -> Option<&str> {
        match self {
            TargetState::Failed { reason } | TargetState::Skipped { reason } => Some(reason),
            _ => None,
        }
    }
}

/// One agent of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Its site.
    pub site: String,
    /// Its host name at start.
    pub hostname: String,
    /// Where it stands.
    pub state: TargetState,
    /// When it entered that state, control-plane clock (Unix ms).
    pub since_ms: UnixMs,
    /// The version it ran at start (None: it never connected).
    pub from_version: Option<String>,
    /// Whether it is a canary.
    #[serde(default)]
    pub canary: bool,
    /// Whether it was ever sent an order in this rollout (a withdrawn order may still have been
    /// applied: its reports still count).
    #[serde(default)]
    pub ordered: bool,
    /// Air-gapped: ordered through its reply bundles ([`RolloutBook::order_for_bundle`]), never on
    /// a link, and given no report deadline.
    #[serde(default)]
    pub offline: bool,
}

/// A rollout: the release, how it is staged, and every target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id (the `rollout_id` of its orders and reports).
    pub id: RolloutId,
    /// The release version.
    pub version: String,
    /// The artifact's file name.
    pub file_name: String,
    /// The artifact's size, bytes.
    pub size_bytes: u64,
    /// The artifact's SHA-256, lowercase hex.
    pub sha256: String,
    /// Only agents of this site (None: all).
    pub site: Option<String>,
    /// How many canaries were asked for.
    pub canary: u32,
    /// How long an updated agent must stay healthy, seconds.
    pub health_wait_secs: u32,
    /// Where it stands.
    pub state: RolloutState,
    /// Which targets may get orders.
    pub phase: Phase,
    /// Every target, by agent id.
    pub targets: BTreeMap<AgentId, Target>,
    /// When it started, Unix ms.
    pub created_at_ms: UnixMs,
    /// Who started it (audit actor).
    pub created_by: String,
    /// Last change, Unix ms.
    pub updated_at_ms: UnixMs,
}

impl Rollout {
    fn order(&self) -> ControlMessage {
        ControlMessage::Update(UpdateOrder {
            rollout_id: self.id,
            version: self.version.clone(),
            file_name: self.file_name.clone(),
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            health_wait_secs: self.health_wait_secs,
        })
    }

    /// The deadline of a staged or restarted target's health report, Unix ms.
    fn report_deadline_ms(&self, t: &Target) -> UnixMs {
        t.since_ms.saturating_add((u64::from(self.health_wait_secs) + HEALTH_REPORT_GRACE_SECS) * 1000)
    }

    /// Number of targets in each state ([`TARGET_STATES`] order).
    pub fn counts(&self) -> [usize; 7] {
        let mut n = [0; 7];
        for t in self.targets.values() {
            if let Some(i) = TARGET_STATES.iter().position(|s| *s == t.state.as_str()) {
                n[i] += 1;
            }
        }
        n
    }
}

/// Something that happened to a rollout without an operator, to audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutEvent {
    /// A target failed and the rollout halted.
    Halted {
        /// The rollout.
        rollout_id: RolloutId,
        /// Why.
        reason: String,
        /// The failed agent.
        agent_id: AgentId,
    },
    /// Every target is healthy or skipped.
    Completed {
        /// The rollout.
        rollout_id: RolloutId,
    },
}

/// The rollouts and their decisions (see the [module docs](self)). Pure: no clock, no I/O.
#[derive(Debug, Default)]
pub struct RolloutBook {
    /// By id, oldest first.
    rollouts: BTreeMap<RolloutId, Rollout>,
    /// Version and protocol of agents seen connecting since this book was made.
    seen: BTreeMap<AgentId, (String, u16)>,
    messages: VecDeque<(AgentId, ControlMessage)>,
    hold_changes: VecDeque<(AgentId, Option<String>)>,
    /// The holds given out (queued in `hold_changes`), by agent.
    holds: BTreeMap<AgentId, String>,
    changed: std::collections::BTreeSet<RolloutId>,
    removed: Vec<RolloutId>,
    events: Vec<RolloutEvent>,
}

impl RolloutBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// A book over stored rollouts (any order). Nothing is queued: holds and orders are given to
    /// agents when they connect.
    pub fn from_rollouts(rollouts: impl IntoIterator<Item = Rollout>) -> Self {
        let mut book = Self { rollouts: rollouts.into_iter().map(|r| (r.id, r)).collect(), ..Self::default() };
        let agents: Vec<AgentId> = book.rollouts.values().flat_map(|r| r.targets.keys().copied()).collect();
        for agent in agents {
            if let Some(h) = book.hold(agent) {
                book.holds.insert(agent, h);
            }
        }
        book
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> impl DoubleEndedIterator<Item = &Rollout> {
        self.rollouts.values()
    }

    /// One rollout.
    pub fn get(&self, id: RolloutId) -> Option<&Rollout> {
        self.rollouts.get(&id)
    }

    /// The running or paused rollout.
    pub fn active(&self) -> Option<&Rollout> {
        self.rollouts.values().rev().find(|r| r.state.is_active())
    }

    /// Starts a rollout of `release` over `candidates` (see the module docs for targets and
    /// canaries) and queues the first orders. Returns its id.
    ///
    /// # Errors
    /// [`RolloutError::Invalid`] for a bad spec or a release of another version,
    /// [`RolloutError::AlreadyActive`], [`RolloutError::NothingToUpdate`] when no target needs it.
    pub fn start(
        &mut self,
        release: &RolloutRelease,
        spec: &RolloutSpec,
        candidates: &[Candidate],
        created_by: &str,
        now_ms: UnixMs,
    ) -> Result<RolloutId, RolloutError> {
        spec.validate()?;
        if release.version != spec.version {
            return Err(RolloutError::Invalid(format!(
                "release {} was given for version {}",
                release.version, spec.version
            )));
        }
        if let Some(a) = self.active() {
            return Err(RolloutError::AlreadyActive { id: a.id, version: a.version.clone(), state: a.state.as_str() });
        }
        let in_scope: Vec<&Candidate> =
            candidates.iter().filter(|c| !c.revoked && spec.site.as_ref().is_none_or(|s| *s == c.site)).collect();
        if in_scope.len() > ROLLOUT_TARGETS_MAX {
            return Err(RolloutError::Invalid(format!(
                "{} agents are in scope; a rollout takes at most {ROLLOUT_TARGETS_MAX}: give --site",
                in_scope.len()
            )));
        }
        let mut targets = BTreeMap::new();
        let mut eligible: Vec<(bool, &Candidate)> = Vec::new();
        for c in &in_scope {
            let seen = self.seen.get(&c.agent_id);
            let version = seen.map(|(v, _)| v.clone()).or_else(|| c.agent_version.clone());
            let skip = if version.as_deref() == Some(spec.version.as_str()) {
                Some(format!("already runs {}", spec.version))
            } else if c.offline {
                None
            } else {
                seen.filter(|(_, p)| *p < UPDATE_PROTOCOL_VERSION).map(|(_, p)| old_protocol(*p))
            };
            let state = match skip {
                Some(reason) => TargetState::Skipped { reason },
                None => {
                    eligible.push((c.connected, c));
                    TargetState::Pending
                }
            };
            targets.insert(
                c.agent_id,
                Target {
                    site: c.site.clone(),
                    hostname: c.hostname.clone(),
                    state,
                    since_ms: now_ms,
                    from_version: version,
                    canary: false,
                    ordered: false,
                    offline: c.offline,
                },
            );
        }
        if eligible.is_empty() {
            let already = targets.values().filter(|t| matches!(&t.state, TargetState::Skipped { .. })).count();
            return Err(RolloutError::NothingToUpdate {
                version: spec.version.clone(),
                site: spec.site.clone(),
                detail: if in_scope.is_empty() {
                    "no enrolled agent is in scope".to_owned()
                } else {
                    format!("all {already} agents in scope run it already or cannot be updated")
                },
            });
        }
        // Canaries: connected first, then by site, host name, id.
        eligible.sort_by(|(ca, a), (cb, b)| {
            cb.cmp(ca).then_with(|| (&a.site, &a.hostname, a.agent_id).cmp(&(&b.site, &b.hostname, b.agent_id)))
        });
        for (_, c) in eligible.iter().take(spec.canary as usize) {
            if let Some(t) = targets.get_mut(&c.agent_id) {
                t.canary = true;
            }
        }
        let id = self.rollouts.keys().next_back().map_or(1, |last| last + 1);
        let rollout = Rollout {
            id,
            version: release.version.clone(),
            file_name: release.file_name.clone(),
            size_bytes: release.size_bytes,
            sha256: release.sha256.clone(),
            site: spec.site.clone(),
            canary: spec.canary,
            health_wait_secs: spec.health_wait_secs,
            state: RolloutState::Running,
            phase: if spec.canary == 0 { Phase::General } else { Phase::Canary },
            targets,
            created_at_ms: now_ms,
            created_by: created_by.to_owned(),
            updated_at_ms: now_ms,
        };
        self.rollouts.insert(id, rollout);
        self.changed.insert(id);
        self.prune();
        self.advance(id, now_ms);
        Ok(id)
    }

    /// Pauses the running rollout: withdraws the orders not staged yet, sends no new ones.
    ///
    /// # Errors
    /// [`RolloutError::NoActiveRollout`], [`RolloutError::WrongState`] when it is paused already.
    pub fn pause(&mut self, now_ms: UnixMs) -> Result<RolloutId, RolloutError> {
        let id = self.active_id("pause", &[RolloutState::Running])?;
        if let Some(r) = self.rollouts.get_mut(&id) {
            r.state = RolloutState::Paused;
            r.updated_at_ms = now_ms;
        }
        self.withdraw(id, false, "the rollout was paused", now_ms);
        self.changed.insert(id);
        self.sync_holds(id);
        Ok(id)
    }

    /// Resumes the paused rollout where it was.
    ///
    /// # Errors
    /// [`RolloutError::NoActiveRollout`], [`RolloutError::WrongState`] when it is running.
    pub fn resume(&mut self, now_ms: UnixMs) -> Result<RolloutId, RolloutError> {
        let id = self.active_id("resume", &[RolloutState::Paused])?;
        if let Some(r) = self.rollouts.get_mut(&id) {
            r.state = RolloutState::Running;
            r.updated_at_ms = now_ms;
        }
        self.changed.insert(id);
        self.advance(id, now_ms);
        Ok(id)
    }

    /// Aborts the running or paused rollout (`by`: the audit actor): like a halt, every order not
    /// applied yet is withdrawn.
    ///
    /// # Errors
    /// [`RolloutError::NoActiveRollout`].
    pub fn abort(&mut self, by: &str, now_ms: UnixMs) -> Result<RolloutId, RolloutError> {
        let id = self.active_id("abort", &[RolloutState::Running, RolloutState::Paused])?;
        if let Some(r) = self.rollouts.get_mut(&id) {
            r.state = RolloutState::Aborted { by: by.to_owned() };
            r.updated_at_ms = now_ms;
        }
        self.withdraw(id, true, &format!("the rollout was aborted by {by}"), now_ms);
        self.changed.insert(id);
        self.sync_holds(id);
        Ok(id)
    }

    fn active_id(&self, action: &'static str, allowed: &[RolloutState]) -> Result<RolloutId, RolloutError> {
        let r = self.active().ok_or(RolloutError::NoActiveRollout)?;
        if allowed.contains(&r.state) {
            Ok(r.id)
        } else {
            Err(RolloutError::WrongState { id: r.id, state: r.state.as_str(), action })
        }
    }

    /// An agent said Hello running `agent_version` over a link that agreed `protocol_version`.
    /// Re-sends the order of a target that is ordered or staged; a target that comes back on the
    /// rollout's version after its order is restarted; a pending one that speaks an older protocol
    /// is skipped. The caller sets the agent's hold to [`RolloutBook::hold`] afterwards (a new
    /// connection has none).
    pub fn on_agent_connected(&mut self, agent: AgentId, agent_version: &str, protocol_version: u16, now_ms: UnixMs) {
        if self.seen.len() < SEEN_AGENTS_MAX || self.seen.contains_key(&agent) {
            self.seen.insert(agent, (agent_version.to_owned(), protocol_version));
        }
        let ids: Vec<RolloutId> = self.rollouts.keys().copied().collect();
        for id in ids {
            let Some(r) = self.rollouts.get_mut(&id) else { continue };
            let active = r.state.is_active();
            let order = r.order();
            let on_version = agent_version == r.version;
            let Some(t) = r.targets.get_mut(&agent) else { continue };
            let mut changed = true;
            match t.state {
                TargetState::Pending | TargetState::Ordered
                    if active && !on_version && protocol_version < UPDATE_PROTOCOL_VERSION =>
                {
                    t.state = TargetState::Skipped { reason: old_protocol(protocol_version) };
                }
                TargetState::Ordered | TargetState::Staged if on_version => {
                    t.state = TargetState::Restarted;
                }
                TargetState::Ordered | TargetState::Staged => {
                    // Only active rollouts keep orders out; re-send for the new connection.
                    self.messages.push_back((agent, order));
                    changed = false;
                }
                TargetState::Pending if on_version && t.ordered => t.state = TargetState::Restarted,
                TargetState::Pending if t.ordered => {
                    // Its order was withdrawn, maybe while it was away: say so again.
                    let reason = format!("the rollout is {}", r.state.as_str());
                    self.messages.push_back((agent, ControlMessage::UpdateWithdrawn { rollout_id: id, reason }));
                    changed = false;
                }
                TargetState::Pending if active && on_version => {
                    t.state = TargetState::Skipped { reason: format!("already runs {}", r.version) };
                }
                _ => changed = false,
            }
            if changed {
                t.since_ms = now_ms;
                r.updated_at_ms = now_ms;
                self.changed.insert(id);
                self.advance(id, now_ms);
            }
        }
    }

    /// An agent's update report. Returns whether anything changed (false for duplicates, reports
    /// for other rollouts, agents or versions, and moves backwards).
    pub fn on_report(&mut self, agent: AgentId, report: &UpdateReport, now_ms: UnixMs) -> bool {
        let id = report.rollout_id;
        let Some(r) = self.rollouts.get_mut(&id) else { return false };
        if report.version != r.version {
            return false;
        }
        let Some(t) = r.targets.get_mut(&agent) else { return false };
        let next = match (&t.state, &report.outcome) {
            (TargetState::Ordered, UpdateOutcome::Staged) => TargetState::Staged,
            (TargetState::Pending, _) if !t.ordered => return false,
            // A withdrawn order may have been applied: the outcome still counts. A `Staged` of a
            // withdrawn order does not (the agent drops it).
            (TargetState::Pending, UpdateOutcome::Staged) => return false,
            (
                TargetState::Pending | TargetState::Ordered | TargetState::Staged | TargetState::Restarted,
                UpdateOutcome::Healthy,
            ) => TargetState::Healthy,
            (
                TargetState::Pending | TargetState::Ordered | TargetState::Staged | TargetState::Restarted,
                UpdateOutcome::Failed { reason, rolled_back, running_version },
            ) => TargetState::Failed {
                reason: format!(
                    "{reason}{}; it runs {running_version}",
                    if *rolled_back { " (rolled back)" } else { "" }
                ),
            },
            _ => return false,
        };
        t.state = next;
        t.since_ms = now_ms;
        r.updated_at_ms = now_ms;
        self.changed.insert(id);
        self.advance(id, now_ms);
        true
    }

    /// An air-gapped agent's bundle was imported (after its messages, reports included, were
    /// ingested). With the version it runs (`agent_version`, from the bundle) it moves on like
    /// [`RolloutBook::on_agent_connected`]: a target ordered or staged that runs the rollout's
    /// version is restarted. Bundles that carry no version come from agents that predate updates
    /// through bundles: their pending targets are skipped.
    pub fn on_agent_bundle(&mut self, agent: AgentId, agent_version: Option<&str>, now_ms: UnixMs) {
        match agent_version {
            // Bundles carry no protocol: an agent that writes its version understands bundled
            // releases, which is what the protocol check guards on a link.
            Some(v) => self.on_agent_connected(agent, v, UPDATE_PROTOCOL_VERSION, now_ms),
            None => {
                let ids: Vec<RolloutId> = self.rollouts.keys().copied().collect();
                for id in ids {
                    let Some(r) = self.rollouts.get_mut(&id) else { continue };
                    if !r.state.is_active() {
                        continue;
                    }
                    let Some(t) = r.targets.get_mut(&agent).filter(|t| t.state == TargetState::Pending) else {
                        continue;
                    };
                    t.state = TargetState::Skipped {
                        reason: "its bundles predate updates through bundles (update this agent by hand)".to_owned(),
                    };
                    t.since_ms = now_ms;
                    r.updated_at_ms = now_ms;
                    self.changed.insert(id);
                    self.advance(id, now_ms);
                }
            }
        }
    }

    /// The order an air-gapped agent's next reply bundle carries, if any: what a link would get
    /// now. The running rollout's target when it is due (the canary phase orders canaries only)
    /// and not known to run the version, or already ordered with no report yet (the order is
    /// sent again: the earlier reply may not have been imported). None while the rollout is
    /// paused, halted, aborted or completed, and once the agent reported staging it. Changes
    /// nothing: call [`RolloutBook::on_bundle_order_written`] once the reply is written.
    pub fn order_for_bundle(&self, agent: AgentId) -> Option<UpdateOrder> {
        let r = self.rollouts.values().rev().find(|r| r.state == RolloutState::Running)?;
        let t = r.targets.get(&agent).filter(|t| t.offline)?;
        let due = match t.state {
            TargetState::Ordered => true,
            TargetState::Pending => {
                (r.phase == Phase::General || t.canary) && self.seen.get(&agent).is_none_or(|(v, _)| *v != r.version)
            }
            _ => false,
        };
        match (due, r.order()) {
            (true, ControlMessage::Update(order)) => Some(order),
            _ => None,
        }
    }

    /// The reply bundle carrying `order` (from [`RolloutBook::order_for_bundle`]) to `agent` was
    /// written: its target is ordered. Returns whether anything changed.
    pub fn on_bundle_order_written(&mut self, agent: AgentId, order: &UpdateOrder, now_ms: UnixMs) -> bool {
        let id = order.rollout_id;
        let Some(r) = self.rollouts.get_mut(&id) else { return false };
        if r.state != RolloutState::Running || r.version != order.version {
            return false;
        }
        let Some(t) = r.targets.get_mut(&agent).filter(|t| t.offline && t.state == TargetState::Pending) else {
            return false;
        };
        t.state = TargetState::Ordered;
        t.ordered = true;
        t.since_ms = now_ms;
        r.updated_at_ms = now_ms;
        self.changed.insert(id);
        self.advance(id, now_ms);
        true
    }

    /// Time passed: staged or restarted targets silent past their deadline fail.
    pub fn tick(&mut self, now_ms: UnixMs) {
        let ids: Vec<RolloutId> = self.rollouts.keys().copied().collect();
        for id in ids {
            let Some(r) = self.rollouts.get_mut(&id) else { continue };
            let secs = u64::from(r.health_wait_secs) + HEALTH_REPORT_GRACE_SECS;
            let late: Vec<AgentId> = r
                .targets
                .iter()
                .filter(|(_, t)| matches!(t.state, TargetState::Staged | TargetState::Restarted))
                // An air-gapped target reports when its next bundle travels, whenever that is.
                .filter(|(_, t)| !t.offline && now_ms >= r.report_deadline_ms(t))
                .map(|(a, _)| *a)
                .collect();
            if late.is_empty() {
                continue;
            }
            for agent in late {
                if let Some(t) = r.targets.get_mut(&agent) {
                    let what = if t.state == TargetState::Staged { "staged" } else { "restarted" };
                    t.state =
                        TargetState::Failed { reason: format!("no health report within {secs} s of being {what}") };
                    t.since_ms = now_ms;
                }
            }
            r.updated_at_ms = now_ms;
            self.changed.insert(id);
            self.advance(id, now_ms);
        }
    }

    /// Why new jobs are held back from `agent`: it is staged or restarted in some rollout (it
    /// drains, restarts and runs its health gate). None: not held.
    pub fn hold(&self, agent: AgentId) -> Option<String> {
        self.rollouts.values().rev().find_map(|r| {
            let t = r.targets.get(&agent)?;
            matches!(t.state, TargetState::Staged | TargetState::Restarted).then(|| {
                format!(
                    "updating to {} (rollout {}): takes no new jobs until the new version is healthy",
                    r.version, r.id
                )
            })
        })
    }

    /// Takes the messages to deliver, in order. An undeliverable one (agent not connected) may be
    /// dropped: what still matters is sent again when the agent connects.
    pub fn take_messages(&mut self) -> Vec<(AgentId, ControlMessage)> {
        self.messages.drain(..).collect()
    }

    /// Takes the changes of holds since the last call: `(agent, Some(reason))` holds new jobs
    /// back, `(agent, None)` lets them flow.
    pub fn take_hold_changes(&mut self) -> Vec<(AgentId, Option<String>)> {
        self.hold_changes.drain(..).collect()
    }

    /// Takes the ids of rollouts changed since the last call (to persist).
    pub fn take_changed(&mut self) -> Vec<RolloutId> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    /// Takes the ids of rollouts dropped past [`ROLLOUTS_KEPT_MAX`] (to delete).
    pub fn take_removed(&mut self) -> Vec<RolloutId> {
        std::mem::take(&mut self.removed)
    }

    /// Takes the halts and completions since the last call (to audit).
    pub fn take_events(&mut self) -> Vec<RolloutEvent> {
        std::mem::take(&mut self.events)
    }

    fn prune(&mut self) {
        while self.rollouts.len() > ROLLOUTS_KEPT_MAX {
            let Some(oldest) = self.rollouts.values().find(|r| !r.state.is_active()).map(|r| r.id) else { break };
            self.rollouts.remove(&oldest);
            self.changed.remove(&oldest);
            self.removed.push(oldest);
        }
    }

    /// Withdraws unapplied orders of rollout `id`: ordered targets, and staged ones too when
    /// `staged_too` (halt, abort). They go back to pending.
    fn withdraw(&mut self, id: RolloutId, staged_too: bool, reason: &str, now_ms: UnixMs) {
        let Some(r) = self.rollouts.get_mut(&id) else { return };
        for (agent, t) in r.targets.iter_mut() {
            if t.state == TargetState::Ordered || (staged_too && t.state == TargetState::Staged) {
                t.state = TargetState::Pending;
                t.since_ms = now_ms;
                self.messages
                    .push_back((*agent, ControlMessage::UpdateWithdrawn { rollout_id: id, reason: reason.to_owned() }));
            }
        }
    }

    /// After any change to rollout `id`: halt on a failure, move to the general phase, order what
    /// is due, complete; and queue hold changes.
    fn advance(&mut self, id: RolloutId, now_ms: UnixMs) {
        self.sync_holds(id);
        let Some(r) = self.rollouts.get_mut(&id) else { return };
        if r.state.is_active() {
            if let Some((agent, t)) = r.targets.iter().find(|(_, t)| matches!(t.state, TargetState::Failed { .. })) {
                let reason =
                    format!("agent {} ({agent}) failed: {}", t.hostname, t.state.reason().unwrap_or("unknown reason"));
                let agent = *agent;
                r.state = RolloutState::Halted { reason: reason.clone(), agent_id: Some(agent) };
                r.updated_at_ms = now_ms;
                self.events.push(RolloutEvent::Halted { rollout_id: id, reason: reason.clone(), agent_id: agent });
                self.withdraw(id, true, &format!("the rollout halted: {reason}"), now_ms);
                self.changed.insert(id);
                self.sync_holds(id);
                return;
            }
        }
        if r.state != RolloutState::Running {
            return;
        }
        if r.phase == Phase::Canary {
            // Replace canaries that were skipped.
            let live =
                r.targets.values().filter(|t| t.canary && !matches!(t.state, TargetState::Skipped { .. })).count();
            let missing = (r.canary as usize).saturating_sub(live);
            if missing > 0 {
                let seen = &self.seen;
                let mut spare: Vec<(bool, String, String, AgentId)> = r
                    .targets
                    .iter()
                    .filter(|(_, t)| !t.canary && t.state == TargetState::Pending)
                    .map(|(a, t)| (!seen.contains_key(a), t.site.clone(), t.hostname.clone(), *a))
                    .collect();
                spare.sort();
                for (_, _, _, a) in spare.into_iter().take(missing) {
                    if let Some(t) = r.targets.get_mut(&a) {
                        t.canary = true;
                    }
                }
            }
            if r.targets.values().filter(|t| t.canary).all(|t| t.state.is_done()) {
                r.phase = Phase::General;
                r.updated_at_ms = now_ms;
                self.changed.insert(id);
            }
        }
        let phase = r.phase;
        let order = r.order();
        let mut ordered_any = false;
        for (agent, t) in r.targets.iter_mut() {
            if t.state != TargetState::Pending || (phase == Phase::Canary && !t.canary) {
                continue;
            }
            match self.seen.get(agent) {
                Some((v, _)) if *v == r.version => {
                    t.state = if t.ordered {
                        TargetState::Restarted
                    } else {
                        TargetState::Skipped { reason: format!("already runs {}", r.version) }
                    };
                }
                Some((_, p)) if *p < UPDATE_PROTOCOL_VERSION => {
                    t.state = TargetState::Skipped { reason: old_protocol(*p) };
                }
                // Due, and ordered when its next reply bundle is written (`order_for_bundle`).
                _ if t.offline => continue,
                _ => {
                    t.state = TargetState::Ordered;
                    t.ordered = true;
                    self.messages.push_back((*agent, order.clone()));
                }
            }
            t.since_ms = now_ms;
            ordered_any = true;
        }
        if ordered_any {
            r.updated_at_ms = now_ms;
            self.changed.insert(id);
            // A skip may have changed what is due (a canary replaced, the phase complete).
            self.sync_holds(id);
            return self.advance(id, now_ms);
        }
        if r.targets.values().all(|t| t.state.is_done()) {
            r.state = RolloutState::Completed;
            r.updated_at_ms = now_ms;
            self.changed.insert(id);
            self.events.push(RolloutEvent::Completed { rollout_id: id });
        }
    }

    /// Queues hold changes for the targets of rollout `id` whose hold differs from the one given
    /// out last.
    fn sync_holds(&mut self, id: RolloutId) {
        let Some(r) = self.rollouts.get(&id) else { return };
        let agents: Vec<AgentId> = r.targets.keys().copied().collect();
        for agent in agents {
            let now = self.hold(agent);
            if self.holds.get(&agent) != now.as_ref() {
                match &now {
                    Some(h) => self.holds.insert(agent, h.clone()),
                    None => self.holds.remove(&agent),
                };
                self.hold_changes.push_back((agent, now));
            }
        }
    }
}

fn old_protocol(p: u16) -> String {
    format!("speaks protocol {p}; updates need protocol {UPDATE_PROTOCOL_VERSION} (update this agent by hand)")
}

/// One target as `rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// The agent.
    pub agent_id: AgentId,
    /// Its host name.
    pub hostname: String,
    /// Its site.
    pub site: String,
    /// The version it ran at start (None: never connected).
    pub from_version: Option<String>,
    /// The rollout's version.
    pub to_version: String,
    /// [`TargetState::as_str`].
    pub state: String,
    /// Why it failed or was skipped.
    pub reason: Option<String>,
    /// Whether it is a canary.
    pub canary: bool,
    /// When it entered its state, Unix ms.
    pub since_ms: UnixMs,
    /// The same, RFC 3339 UTC.
    pub since: String,
}

/// A rollout as `rollout status --json` and the dashboard show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// Its id.
    pub id: RolloutId,
    /// The release version.
    pub version: String,
    /// The artifact's file name.
    pub file_name: String,
    /// Only agents of this site (None: all).
    pub site: Option<String>,
    /// Canaries asked for.
    pub canary: u32,
    /// Health wait, seconds.
    pub health_wait_secs: u32,
    /// [`RolloutState::as_str`].
    pub state: String,
    /// [`Phase::as_str`].
    pub phase: String,
    /// Why it halted.
    pub halt_reason: Option<String>,
    /// The agent whose failure halted it.
    pub failed_agent: Option<AgentId>,
    /// Who aborted it.
    pub aborted_by: Option<String>,
    /// Targets per state ([`TARGET_STATES`] names; every name present).
    pub counts: BTreeMap<String, usize>,
    /// Every target: canaries first, then by site, host name, agent id.
    pub targets: Vec<TargetStatus>,
    /// Who started it.
    pub created_by: String,
    /// When it started, Unix ms.
    pub created_at_ms: UnixMs,
    /// The same, RFC 3339 UTC.
    pub created_at: String,
    /// Last change, Unix ms.
    pub updated_at_ms: UnixMs,
}

impl RolloutStatus {
    /// The status of `r`.
    pub fn of(r: &Rollout) -> Self {
        let (halt_reason, failed_agent) = match &r.state {
            RolloutState::Halted { reason, agent_id } => (Some(reason.clone()), *agent_id),
            _ => (None, None),
        };
        let aborted_by = match &r.state {
            RolloutState::Aborted { by } => Some(by.clone()),
            _ => None,
        };
        let mut targets: Vec<TargetStatus> = r
            .targets
            .iter()
            .map(|(a, t)| TargetStatus {
                agent_id: *a,
                hostname: t.hostname.clone(),
                site: t.site.clone(),
                from_version: t.from_version.clone(),
                to_version: r.version.clone(),
                state: t.state.as_str().to_owned(),
                reason: t.state.reason().map(str::to_owned),
                canary: t.canary,
                since_ms: t.since_ms,
                since: crate::admin::rfc3339_ms(t.since_ms),
            })
            .collect();
        targets.sort_by(|a, b| {
            b.canary
                .cmp(&a.canary)
                .then_with(|| (&a.site, &a.hostname, a.agent_id).cmp(&(&b.site, &b.hostname, b.agent_id)))
        });
        let counts = TARGET_STATES.iter().zip(r.counts()).map(|(s, n)| ((*s).to_owned(), n)).collect();
        RolloutStatus {
            id: r.id,
            version: r.version.clone(),
            file_name: r.file_name.clone(),
            site: r.site.clone(),
            canary: r.canary,
            health_wait_secs: r.health_wait_secs,
            state: r.state.as_str().to_owned(),
            phase: r.phase.as_str().to_owned(),
            halt_reason,
            failed_agent,
            aborted_by,
            counts,
            targets,
            created_by: r.created_by.clone(),
            created_at_ms: r.created_at_ms,
            created_at: crate::admin::rfc3339_ms(r.created_at_ms),
            updated_at_ms: r.updated_at_ms,
        }
    }
}

/// The rollouts of a running control plane: a [`RolloutBook`] behind a mutex, persisted in the
/// [`Store`] after every change, its messages delivered through the [`Fleet`]. Send + Sync; share
/// it behind the `Arc` [`Rollouts::load`] returns.
///
/// Every method may block (store writes and an fsync after a change): call them from blocking
/// threads, as the [`Store`]. Messages are delivered under the book's lock, so one agent's
/// messages keep their order.
pub struct Rollouts {
    book: Mutex<RolloutBook>,
    store: Arc<dyn Store>,
    fleet: Arc<Fleet>,
    releases: Releases,
    metrics: Arc<Metrics>,
    /// `rollout.halted` goes out through these ([`Rollouts::set_webhooks`]).
    webhooks: std::sync::OnceLock<Arc<crate::webhook::Webhooks>>,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

impl Rollouts {
    /// Loads the stored rollouts. Agents get their orders and holds when they connect
    /// ([`Rollouts::on_agent_connected`]).
    ///
    /// # Errors
    /// [`RolloutError::Store`] when the rollouts cannot be read.
    pub fn load(
        store: Arc<dyn Store>,
        fleet: Arc<Fleet>,
        releases: Releases,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RolloutError> {
        let book = RolloutBook::from_rollouts(store.list_rollouts()?);
        let me = Self { book: Mutex::new(book), store, fleet, releases, metrics, webhooks: Default::default() };
        me.publish_gauges(&me.lock());
        Ok(Arc::new(me))
    }

    /// Emits `rollout.halted` through `webhooks` from now on (once; later calls change nothing).
    pub fn set_webhooks(&self, webhooks: Arc<crate::webhook::Webhooks>) {
        let _ = self.webhooks.set(webhooks);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RolloutBook> {
        // Every book method leaves it consistent before returning: a panic elsewhere while
        // holding the lock cannot leave it half-changed.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After each Hello of `agent` (once the fleet has its connection): re-sends an outstanding
    /// order, moves a target that came back on the new version on, and sets the agent's hold.
    /// Store errors are logged (the next change saves again).
    pub fn on_agent_connected(&self, agent: AgentId, agent_version: &str, protocol_version: u16, now_ms: UnixMs) {
        let mut book = self.lock();
        book.on_agent_connected(agent, agent_version, protocol_version, now_ms);
        // A new connection has no hold: give it what the book says, whatever changed.
        self.fleet.set_hold(agent, book.hold(agent));
        if let Err(e) = self.carry_out(&mut book, now_ms) {
            tracing::error!(agent_id = %agent, error = %e, "could not save the rollout after the agent connected");
        }
    }

    /// An agent's update report. Durable when this returns Ok: acknowledge the report after it.
    ///
    /// # Errors
    /// [`RolloutError::Store`] (the report is not recorded: let the agent resend it).
    pub fn on_report(&self, agent: AgentId, report: &UpdateReport, now_ms: UnixMs) -> Result<(), RolloutError> {
        let outcome = match &report.outcome {
            UpdateOutcome::Staged => "staged",
            UpdateOutcome::Healthy => "healthy",
            UpdateOutcome::Failed { .. } => "failed",
        };
        self.metrics.update_report(outcome);
        let mut book = self.lock();
        let changed = book.on_report(agent, report, now_ms);
        tracing::info!(
            agent_id = %agent, rollout_id = report.rollout_id, version = %report.version, outcome, changed,
            "update report"
        );
        self.carry_out(&mut book, now_ms)
    }

    /// After an air-gapped agent's bundle was ingested: moves its targets on by the version the
    /// bundle says it runs ([`RolloutBook::on_agent_bundle`]).
    ///
    /// # Errors
    /// [`RolloutError::Store`].
    pub fn on_agent_bundle(
        &self,
        agent: AgentId,
        agent_version: Option<&str>,
        now_ms: UnixMs,
    ) -> Result<(), RolloutError> {
        let mut book = self.lock();
        book.on_agent_bundle(agent, agent_version, now_ms);
        self.carry_out(&mut book, now_ms)
    }

    /// The order the reply bundle being written for air-gapped `agent` carries, if any
    /// ([`RolloutBook::order_for_bundle`]: the phase rules, pauses, halts and withdrawals apply as
    /// on a link). Changes nothing until [`Rollouts::on_bundle_order_written`].
    pub fn order_for_bundle(&self, agent: AgentId, now_ms: UnixMs) -> Option<UpdateOrder> {
        let order = self.lock().order_for_bundle(agent);
        tracing::debug!(agent_id = %agent, now_ms, ordered = order.is_some(), "rollout order for a reply bundle");
        order
    }

    /// The signed artifact of `order`, to carry in a reply bundle: read from the release store,
    /// checked against the order's size.
    ///
    /// # Errors
    /// [`RolloutError::UnknownRelease`] when the release is gone; [`RolloutError::Invalid`] when
    /// the artifact is larger than a reply carries ([`bundle::BUNDLE_RELEASE_BYTES_MAX`]) or not
    /// the size the order says; [`RolloutError::Release`] when it cannot be read.
    pub fn bundled_release(&self, order: &UpdateOrder) -> Result<bundle::BundledRelease, RolloutError> {
        let record = self
            .releases
            .get(&order.version, ROLLOUT_ARCH)?
            .ok_or_else(|| RolloutError::UnknownRelease { version: order.version.clone(), arch: ROLLOUT_ARCH })?;
        let max = bundle::BUNDLE_RELEASE_BYTES_MAX;
        if order.size_bytes > max {
            return Err(RolloutError::Invalid(format!(
                "release {} is {} bytes; a reply bundle carries at most {max}: update this agent by hand",
                order.file_name, order.size_bytes
            )));
        }
        let path = self.releases.artifact_path(&record);
        let io = |e: std::io::Error| RolloutError::Release(ReleaseError::Io { path: path.clone(), source: e });
        let file = std::fs::File::open(&path).map_err(io)?;
        let mut artifact = Vec::with_capacity(order.size_bytes as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut artifact).map_err(io)?;
        if artifact.len() as u64 != order.size_bytes {
            return Err(RolloutError::Invalid(format!(
                "{} is {} bytes, the release index says {}",
                path.display(),
                artifact.len(),
                order.size_bytes
            )));
        }
        Ok(bundle::BundledRelease { order: order.clone(), artifact })
    }

    /// The reply bundle carrying `order` to `agent` was written: its target is ordered.
    ///
    /// # Errors
    /// [`RolloutError::Store`].
    pub fn on_bundle_order_written(
        &self,
        agent: AgentId,
        order: &UpdateOrder,
        now_ms: UnixMs,
    ) -> Result<(), RolloutError> {
        let mut book = self.lock();
        if book.on_bundle_order_written(agent, order, now_ms) {
            tracing::info!(agent_id = %agent, rollout_id = order.rollout_id, version = %order.version,
                "update order sent in a reply bundle");
        }
        self.carry_out(&mut book, now_ms)
    }

    /// Fails targets whose health report is overdue. Call it every few seconds. Store errors are
    /// logged.
    pub fn tick(&self, now_ms: UnixMs) {
        let mut book = self.lock();
        book.tick(now_ms);
        if let Err(e) = self.carry_out(&mut book, now_ms) {
            tracing::error!(error = %e, "could not save the rollouts after a tick");
        }
    }

    /// Starts a rollout of release `spec.version` ([`ROLLOUT_ARCH`]) over the enrolled agents, by
    /// `actor`. Audited as `rollout_start`.
    ///
    /// # Errors
    /// [`RolloutError::Invalid`], [`RolloutError::UnknownRelease`], [`RolloutError::AlreadyActive`],
    /// [`RolloutError::NothingToUpdate`], [`RolloutError::Release`], [`RolloutError::Store`].
    pub fn start(&self, spec: RolloutSpec, actor: &Actor, now_ms: UnixMs) -> Result<RolloutStatus, RolloutError> {
        spec.validate()?;
        let record = self
            .releases
            .get(&spec.version, ROLLOUT_ARCH)?
            .ok_or_else(|| RolloutError::UnknownRelease { version: spec.version.clone(), arch: ROLLOUT_ARCH })?;
        let release = RolloutRelease {
            version: record.version,
            file_name: record.file_name,
            size_bytes: record.size_bytes,
            sha256: record.sha256,
        };
        let candidates: Vec<Candidate> = self
            .store
            .list_agents()?
            .into_iter()
            .map(|a| Candidate {
                connected: self.fleet.is_connected(a.id),
                agent_id: a.id,
                site: a.site,
                hostname: a.hostname,
                agent_version: a.agent_version,
                offline: a.offline,
                revoked: a.revoked_at_ms.is_some(),
            })
            .collect();
        let mut book = self.lock();
        let id = book.start(&release, &spec, &candidates, &actor.to_string(), now_ms)?;
        let status = book.get(id).map(RolloutStatus::of);
        let detail = status.as_ref().map_or_else(String::new, |s| {
            format!(
                "rollout {id}: gaffer-agent {} ({}), site {}, {} canaries, health wait {} s, {} targets ({} skipped)",
                s.version,
                s.file_name,
                s.site.as_deref().unwrap_or("all"),
                s.canary,
                s.health_wait_secs,
                s.targets.len(),
                s.counts.get("skipped").copied().unwrap_or(0)
            )
        });
        let mut audit = AuditRecord::new(actor, audit_action::ROLLOUT_START, now_ms).detail(detail);
        if let Some(site) = &spec.site {
            audit = audit.site(site);
        }
        self.store.append_audit(&audit)?;
        self.carry_out(&mut book, now_ms)?;
        tracing::info!(rollout_id = id, version = %spec.version, actor = %actor, "rollout started");
        status.ok_or(RolloutError::NoActiveRollout)
    }

    /// Pauses the running rollout by `actor` (audited as `rollout_pause`).
    ///
    /// # Errors
    /// [`RolloutError::NoActiveRollout`], [`RolloutError::WrongState`], [`RolloutError::Store`].
    pub fn pause(&self, actor: &Actor, now_ms: UnixMs) -> Result<RolloutStatus, RolloutError> {
        self.operate(actor, now_ms, audit_action::ROLLOUT_PAUSE, |b| b.pause(now_ms))
    }

    /// Resumes the paused rollout by `actor` (audited as `rollout_resume`).
    ///
    /// # Errors
    /// As [`Rollouts::pause`].
    pub fn resume(&self, actor: &Actor, now_ms: UnixMs) -> Result<RolloutStatus, RolloutError> {
        self.operate(actor, now_ms, audit_action::ROLLOUT_RESUME, |b| b.resume(now_ms))
    }

    /// Aborts the running or paused rollout by `actor` (audited as `rollout_abort`).
    ///
    /// # Errors
    /// [`RolloutError::NoActiveRollout`], [`RolloutError::Store`].
    pub fn abort(&self, actor: &Actor, now_ms: UnixMs) -> Result<RolloutStatus, RolloutError> {
        let by = actor.to_string();
        self.operate(actor, now_ms, audit_action::ROLLOUT_ABORT, |b| b.abort(&by, now_ms))
    }

    fn operate(
        &self,
        actor: &Actor,
        now_ms: UnixMs,
        action: &str,
        f: impl FnOnce(&mut RolloutBook) -> Result<RolloutId, RolloutError>,
    ) -> Result<RolloutStatus, RolloutError> {
        let mut book = self.lock();
        let id = f(&mut book)?;
        let status = book.get(id).map(RolloutStatus::of).ok_or(RolloutError::NoActiveRollout)?;
        self.store.append_audit(
            &AuditRecord::new(actor, action, now_ms).detail(format!("rollout {id} to {}", status.version)),
        )?;
        self.carry_out(&mut book, now_ms)?;
        tracing::info!(rollout_id = id, actor = %actor, action, "rollout changed");
        Ok(status)
    }

    /// Every rollout, newest first.
    pub fn status(&self) -> Vec<RolloutStatus> {
        self.lock().rollouts().rev().map(RolloutStatus::of).collect()
    }

    /// Why new jobs are held back from `agent` by a rollout, if they are.
    pub fn hold(&self, agent: AgentId) -> Option<String> {
        self.lock().hold(agent)
    }

    /// Delivers the book's output and saves what changed: messages and holds to the fleet (an
    /// agent that is not connected gets them when it connects), audit records for halts and
    /// completions, the changed rollouts, one flush.
    fn carry_out(&self, book: &mut RolloutBook, now_ms: UnixMs) -> Result<(), RolloutError> {
        for (agent, msg) in book.take_messages() {
            let kind = msg.kind();
            let delivered = self.fleet.send(agent, msg);
            tracing::debug!(agent_id = %agent, kind, delivered, "rollout message");
        }
        for (agent, hold) in book.take_hold_changes() {
            self.fleet.set_hold(agent, hold);
        }
        let events = book.take_events();
        let changed = book.take_changed();
        let removed = book.take_removed();
        if events.is_empty() && changed.is_empty() && removed.is_empty() {
            return Ok(());
        }
        for event in &events {
            let record = match event {
                RolloutEvent::Halted { rollout_id, reason, agent_id } => {
                    tracing::warn!(rollout_id, agent_id = %agent_id, %reason, "rollout halted");
                    if let Some(hooks) = self.webhooks.get() {
                        hooks.rollout_halted(*rollout_id, *agent_id, reason, now_ms);
                    }
                    AuditRecord::new(&Actor::ControlPlane, audit_action::ROLLOUT_HALTED, now_ms)
                        .agent(*agent_id)
                        .detail(format!("rollout {rollout_id}: {reason}"))
                }
                RolloutEvent::Completed { rollout_id } => {
                    tracing::info!(rollout_id, "rollout completed");
                    AuditRecord::new(&Actor::ControlPlane, audit_action::ROLLOUT_COMPLETE, now_ms)
                        .detail(format!("rollout {rollout_id}: every target is healthy or skipped"))
                }
            };
            self.store.append_audit(&record)?;
        }
        for id in changed {
            if let Some(r) = book.get(id) {
                self.store.put_rollout(r)?;
            }
        }
        for id in removed {
            self.store.delete_rollout(id)?;
        }
        self.store.flush()?;
        self.publish_gauges(book);
        Ok(())
    }

    fn publish_gauges(&self, book: &RolloutBook) {
        let counts = book.rollouts().next_back().map(Rollout::counts).unwrap_or_default();
        for (state, n) in TARGET_STATES.iter().zip(counts) {
            self.metrics.rollout_targets(state, n);
        }
    }
}

/// `gaffer-control rollout …`: through the running server's admin socket (a rollout needs the
/// live fleet; only `status` reads the store itself when no server runs).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RolloutCommand {
    /// Start rolling release --version out: canaries first, then every other agent; halts on the
    /// first failure.
    Start {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The release version (added with `gaffer-control release add`).
        #[arg(long)]
        version: String,
        /// Only agents of this site (default: every site).
        #[arg(long)]
        site: Option<String>,
        /// How many agents update first; the others wait until every canary is healthy (0: none).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=i64::from(CANARY_MAX)))]
        canary: u32,
        /// How long an updated agent must stay connected and healthy before it counts, minutes.
        #[arg(long, default_value_t = HEALTH_WAIT_SECS_DEFAULT / 60, value_parser = clap::value_parser!(u32).range(1..=i64::from(HEALTH_WAIT_SECS_MAX / 60)))]
        wait_mins: u32,
        /// The health wait in seconds instead of minutes (short trials and tests).
        #[arg(long, conflicts_with = "wait_mins", value_parser = clap::value_parser!(u32).range(i64::from(HEALTH_WAIT_SECS_MIN)..=i64::from(HEALTH_WAIT_SECS_MAX)))]
        wait_secs: Option<u32>,
        /// Print the rollout as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the newest rollout (--all: every one kept) with every target.
    Status {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Every rollout kept, newest first.
        #[arg(long)]
        all: bool,
        /// Print a JSON array of rollouts, newest first.
        #[arg(long)]
        json: bool,
    },
    /// Pause the running rollout: no new orders; orders not staged yet are withdrawn.
    Pause {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Print the rollout as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume the paused rollout.
    Resume {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Print the rollout as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Abort the running or paused rollout: every order not applied yet is withdrawn.
    Abort {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Print the rollout as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `rollout` command and returns what to print.
///
/// # Errors
/// What went wrong and what to do, as words (the running server's refusal, no server running
/// for a change, an unreadable data directory).
pub async fn run_command(command: RolloutCommand) -> Result<String, String> {
    use crate::admin::{AdminRequest, AdminResponse};
    let (data_dir, req, json) = match command {
        RolloutCommand::Start { data_dir, version, site, canary, wait_mins, wait_secs, json } => {
            let health_wait_secs = wait_secs.unwrap_or(wait_mins.saturating_mul(60));
            let spec = RolloutSpec { version, site, canary, health_wait_secs };
            spec.validate().map_err(|e| e.to_string())?;
            (data_dir, AdminRequest::StartRollout { spec }, json)
        }
        RolloutCommand::Status { data_dir, all, json } => {
            (data_dir, AdminRequest::RolloutStatus { limit: if all { 0 } else { 1 } }, json)
        }
        RolloutCommand::Pause { data_dir, json } => (data_dir, AdminRequest::PauseRollout, json),
        RolloutCommand::Resume { data_dir, json } => (data_dir, AdminRequest::ResumeRollout, json),
        RolloutCommand::Abort { data_dir, json } => (data_dir, AdminRequest::AbortRollout, json),
    };
    match admin_or_local(&data_dir, &req).await? {
        AdminResponse::Rollout(status) => Ok(if json {
            to_json(&status)
        } else {
            let verb = match req {
                AdminRequest::StartRollout { .. } => "started",
                AdminRequest::PauseRollout => "paused",
                AdminRequest::ResumeRollout => "resumed",
                _ => "aborted",
            };
            format!("Rollout {} {verb}.\n\n{}", status.id, render_status(&status))
        }),
        AdminResponse::Rollouts { rollouts } => Ok(if json {
            to_json(&rollouts)
        } else if rollouts.is_empty() {
            "No rollouts yet: start one with `gaffer-control rollout start --version V`.\n".to_owned()
        } else {
            rollouts.iter().map(render_status).collect::<Vec<_>>().join("\n")
        }),
        other => Err(format!("unexpected answer from the control plane: {other:?}")),
    }
}

/// Pretty JSON with a line end, for `--json`.
fn to_json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// The text `rollout status` prints for one rollout: a header with its state (and the halt
/// reason), the counts, and a table of targets (agent, host, site, from → to, state, since,
/// reason; canaries marked `*`).
pub fn render_status(s: &RolloutStatus) -> String {
    let mut out = format!(
        "Rollout {} to {}: {} (phase {}), site {}, {} canar{}, health wait {} s\n  started {} by {}\n",
        s.id,
        s.version,
        s.state.to_uppercase(),
        s.phase,
        s.site.as_deref().unwrap_or("all"),
        s.canary,
        if s.canary == 1 { "y" } else { "ies" },
        s.health_wait_secs,
        s.created_at,
        s.created_by
    );
    if let Some(reason) = &s.halt_reason {
        out.push_str(&format!("  halted: {reason}\n"));
    }
    if let Some(by) = &s.aborted_by {
        out.push_str(&format!("  aborted by {by}\n"));
    }
    let counts: Vec<String> =
        s.counts.iter().filter(|(_, n)| **n > 0).map(|(state, n)| format!("{n} {state}")).collect();
    out.push_str(&format!("  targets: {}\n\n", counts.join(", ")));
    let host_w = s.targets.iter().map(|t| t.hostname.len()).max().unwrap_or(4).max(4);
    let site_w = s.targets.iter().map(|t| t.site.len()).max().unwrap_or(4).max(4);
    let fromto = |t: &TargetStatus| format!("{} → {}", t.from_version.as_deref().unwrap_or("?"), t.to_version);
    let ft_w = s.targets.iter().map(|t| fromto(t).chars().count()).max().unwrap_or(9).max(9);
    out.push_str(&format!(
        "  {:<37} {:<host_w$} {:<site_w$} {:<ft_w$} {:<10} {:<20} REASON\n",
        "AGENT", "HOST", "SITE", "FROM → TO", "STATE", "SINCE"
    ));
    for t in &s.targets {
        let agent = format!("{}{}", t.agent_id, if t.canary { "*" } else { "" });
        let ft = fromto(t);
        let pad = ft_w.saturating_sub(ft.chars().count());
        out.push_str(&format!(
            "  {agent:<37} {:<host_w$} {:<site_w$} {ft}{} {:<10} {:<20} {}\n",
            t.hostname,
            t.site,
            " ".repeat(pad),
            t.state,
            t.since,
            t.reason.as_deref().unwrap_or("")
        ));
    }
    if s.targets.iter().any(|t| t.canary) {
        out.push_str("  (* canary)\n");
    }
    out
}

/// The running server's admin socket; without one, `status` reads the store and changes are
/// refused ([`crate::admin::handle`]).
async fn admin_or_local(
    data_dir: &std::path::Path,
    req: &crate::admin::AdminRequest,
) -> Result<crate::admin::AdminResponse, String> {
    use crate::admin::{self, AdminRequest, AdminResponse};
    let dd = crate::datadir::DataDir::new(data_dir);
    dd.load_config().map_err(|e| e.to_string())?;
    if let Some(resp) = admin::request(&dd.admin_socket_path(), req).await.map_err(|e| e.to_string())? {
        return Ok(resp);
    }
    if !matches!(req, AdminRequest::RolloutStatus { .. }) {
        return Err(format!(
            "no control plane is running on {}: a rollout needs the live fleet; start it (`gaffer-control serve \
             --data-dir {}` or `systemctl start gaffer-control`) and run this again",
            data_dir.display(),
            data_dir.display()
        ));
    }
    let store = crate::store::sled_store::SledStore::open(&dd.store_path())
        .map_err(|e| format!("opening the store (is another gaffer-control process using this data dir?): {e}"))?;
    let req = req.clone();
    let resp = tokio::task::spawn_blocking(move || match req {
        AdminRequest::RolloutStatus { limit } => store.list_rollouts().map(|rs| {
            rs.iter().rev().take(if limit == 0 { usize::MAX } else { limit }).map(RolloutStatus::of).collect()
        }),
        _ => Ok(Vec::new()),
    })
    .await
    .map_err(|e| format!("internal error: {e}"))?
    .map_err(|e| e.to_string())?;
    Ok(AdminResponse::Rollouts { rollouts: resp })
}
