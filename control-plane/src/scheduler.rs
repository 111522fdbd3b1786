//! Job submission, leasing, deadlines, operator actions, and the connected fleet.
//!
//! Every job change goes through [`crate::jobs::transition`] via [`Scheduler::apply`]; this module
//! decides *when*: a leasing pass over the queued jobs in priority order (woken by a submission,
//! an agent connecting, a slot freeing), a deadline pass over the leased jobs, and the events of
//! agents connecting and disconnecting. Everything is synchronous and takes `now_ms` explicitly,
//! so the deterministic simulation drives exactly this code; [`Scheduler::run`] is the thin async
//! loop the server uses.
//!
//! A queued job is leased to a connected agent that (a) is in the job's site, (b) is the job's
//! pinned agent, if it has one, (c) runs the job's profile with every model it needs, (d) can read
//! the job's path (under one of its volumes), and (e) has a free slot and room in its outgoing
//! queue. A job that cannot be placed carries a [`Scheduler::pending_reason`], in the spirit of
//! Nomad's placement failures.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gaffer_protocol::messages::{AgentId, Capabilities, ControlMessage, HeldJob, JobId, Profile};
use tokio::sync::Notify;

use crate::jobs::{self, Effect, JobEvent, JobPolicy, Refusal};
use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::store::{JobOrigin, JobRecord, JobState, Priority, Scheduling, Store, StoreError, StoreEvent, UnixMs};

/// Why a job submission or an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request is invalid; the message says which field and why (HTTP 400/422).
    #[error("{0}")]
    Invalid(String),
    /// The pinned agent does not exist (HTTP 422).
    #[error("agent {0} is not enrolled")]
    UnknownAgent(AgentId),
    /// No such job (HTTP 404).
    #[error("job {0} does not exist")]
    UnknownJob(JobId),
    /// The action does not apply to the job in its state (HTTP 409).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store failed (HTTP 503).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job submission, as the API and the dashboard form take it.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Absolute path of the media file on the agent's box.
    pub path: String,
    /// Site whose agents may run it.
    pub site: String,
    /// Pin to one agent.
    pub agent: Option<AgentId>,
    /// Analysis profile.
    pub profile: Profile,
    /// Leasing order.
    pub priority: Priority,
}

/// Largest accepted job path, bytes.
pub const JOB_PATH_BYTES_MAX: usize = 4096;
/// Largest accepted site name, bytes.
pub const SITE_NAME_BYTES_MAX: usize = 128;
/// Queued jobs examined per leasing pass (in leasing order). Jobs behind them wait for the next
/// pass; the pass stops early once no connected agent has a free slot.
pub const LEASE_PASS_JOBS_MAX: usize = 10_000;
/// Queued jobs a leasing pass reads at least (then four per free slot, doubling while slots stay
/// free, up to [`LEASE_PASS_JOBS_MAX`]).
pub const LEASE_PASS_CHUNK_MIN: usize = 64;
/// Queued jobs whose placement failure is remembered for `pending_reason` (the first ones in
/// leasing order).
pub const PENDING_REASONS_MAX: usize = 1_000;
/// Leased (assigned or running) jobs examined per deadline pass.
pub const DEADLINE_PASS_JOBS_MAX: usize = 100_000;
/// Assignments that may wait in one agent's outgoing queue; beyond it the agent counts as busy
/// (back-pressure instead of a dropped message).
pub const MAILBOX_ASSIGN_MAX: usize = 64;
/// Messages of any kind that may wait in one agent's outgoing queue. Past it the agent is not
/// reading its link; the link driver closes the connection (its leases then follow the grace
/// rules) rather than drop a message.
pub const MAILBOX_MAX: usize = 4096;

/// Scheduling settings.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Deadlines and attempts.
    pub policy: JobPolicy,
    /// How often the deadline pass runs when nothing wakes the loop. Default 1 s.
    pub tick: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { policy: JobPolicy::default(), tick: Duration::from_secs(1) }
    }
}

/// The scheduler. One per control plane.
pub struct Scheduler {
    store: Arc<dyn Store>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    cfg: SchedulerConfig,
    wake: Notify,
    pending: Mutex<HashMap<JobId, String>>,
    /// This process among the replicas sharing the store ([`Scheduler::set_replica`]); unset:
    /// alone (tools, the simulation).
    replica: OnceLock<Arc<Replica>>,
    /// Webhooks and alert rules ([`Scheduler::set_webhooks`]); unset: no events are emitted.
    webhooks: OnceLock<Arc<crate::webhook::Webhooks>>,
}

impl Scheduler {
    /// A scheduler over `store` and `fleet`.
    pub fn new(store: Arc<dyn Store>, fleet: Arc<Fleet>, metrics: Arc<Metrics>, cfg: SchedulerConfig) -> Self {
        Self {
            store,
            fleet,
            metrics,
            cfg,
            wake: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            replica: OnceLock::new(),
            webhooks: OnceLock::new(),
        }
    }

    /// Makes this scheduler (and its fleet) one of several replicas sharing the store: wakes and
    /// messages for agents connected elsewhere go to the other replicas through `replica`, and
    /// leases whose holder is connected to another live replica are left to it. Once; later
    /// calls change nothing.
    pub fn set_replica(&self, replica: Arc<Replica>) {
        let _ = self.fleet.replica.set(replica.clone());
        let _ = self.replica.set(replica);
    }

    /// Emits job, agent and health events through `webhooks` from now on (`serve` sets it once;
    /// later calls change nothing).
    pub fn set_webhooks(&self, webhooks: Arc<crate::webhook::Webhooks>) {
        let _ = self.webhooks.set(webhooks);
    }

    /// The webhooks set with [`Scheduler::set_webhooks`].
    pub fn webhooks(&self) -> Option<&Arc<crate::webhook::Webhooks>> {
        self.webhooks.get()
    }

    /// Whether `agent`'s link is up on another live replica (never, when alone). Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn held_elsewhere(&self, agent: AgentId) -> Result<bool, StoreError> {
        let Some(replica) = self.replica.get() else { return Ok(false) };
        if self.fleet.is_connected(agent) {
            return Ok(false);
        }
        Ok(self.store.get_agent(agent)?.is_some_and(|a| replica.holds_elsewhere(&a)))
    }

    /// The connected agents.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Deadlines and attempts in force.
    pub fn policy(&self) -> &JobPolicy {
        &self.cfg.policy
    }

    /// Validates and queues a job, and wakes the scheduling loop. Blocking (store writes).
    ///
    /// # Errors
    /// [`SubmitError::Invalid`] for a relative or oversize path, an empty or oversize site;
    /// [`SubmitError::UnknownAgent`] for a pinned agent that is not enrolled.
    pub fn submit(
        &self,
        req: JobRequest,
        origin: JobOrigin,
        id: Option<JobId>,
        now_ms: UnixMs,
    ) -> Result<JobRecord, SubmitError> {
        self.submit_as(req, origin, id, None, now_ms)
    }

    /// [`Scheduler::submit`], recording `submitted_by` (an audit actor such as `token:NAME`) on the job
    /// ([`JobRecord::submitted_by`]; a watch-folder job records its agent whatever is passed).
    ///
    /// # Errors
    /// As [`Scheduler::submit`].
    pub fn submit_as(
        &self,
        req: JobRequest,
        origin: JobOrigin,
        id: Option<JobId>,
        submitted_by: Option<String>,
        now_ms: UnixMs,
    ) -> Result<JobRecord, SubmitError> {
        if let Some(agent) = req.agent {
            if self.store.get_agent(agent)?.is_none() {
                return Err(SubmitError::UnknownAgent(agent));
            }
        }
        let mut job = new_job(req, origin, id, now_ms)?;
        if job.submitted_by.is_none() {
            job.submitted_by = submitted_by;
        }
        if !self.store.insert_job(&job)? {
            // Same id submitted again (a redelivered watch-folder submission): keep the first.
            if let Some(existing) = self.store.get_job(job.id)? {
                return Ok(existing);
            }
        }
        self.store.flush()?;
        self.wake();
        self.store.get_job(job.id)?.ok_or(SubmitError::UnknownJob(job.id))
    }

    /// Cancels a job that has not finished (a leased one is stopped on its agent).
    ///
    /// # Errors
    /// [`SubmitError::UnknownJob`], [`SubmitError::Refused`] for a finished job, store errors.
    pub fn cancel(&self, job: JobId, by: &str, now_ms: UnixMs) -> Result<JobRecord, SubmitError> {
        let out = self.apply(job, &JobEvent::Cancel { by: by.to_owned() }, now_ms)?;
        self.store.flush()?;
        out.ok_or(SubmitError::UnknownJob(job))
    }

    /// Queues a failed or cancelled job again with a fresh attempt budget.
    ///
    /// # Errors
    /// [`SubmitError::UnknownJob`], [`SubmitError::Refused`] for a job that is not failed or
    /// cancelled, store errors.
    pub fn retry(&self, job: JobId, now_ms: UnixMs) -> Result<JobRecord, SubmitError> {
        let out = self.apply(job, &JobEvent::Retry, now_ms)?;
        self.store.flush()?;
        out.ok_or(SubmitError::UnknownJob(job))
    }

    /// Applies `event` to `job` through [`jobs::transition`] in one atomic store update, then
    /// carries out its effects. Returns the job as stored afterwards (None: no such job).
    /// Not flushed: callers that acknowledge something flush first.
    ///
    /// # Errors
    /// [`SubmitError::Refused`] when the event does not apply, store errors.
    pub fn apply(&self, job: JobId, event: &JobEvent, now_ms: UnixMs) -> Result<Option<JobRecord>, SubmitError> {
        self.apply_with(job, event, now_ms, false)
    }

    /// [`Scheduler::apply`]; with `claim`, through [`Store::claim_job`]: a job another replica is
    /// writing right now is skipped (`Ok(None)`) instead of waited for.
    fn apply_with(
        &self,
        job: JobId,
        event: &JobEvent,
        now_ms: UnixMs,
        claim: bool,
    ) -> Result<Option<JobRecord>, SubmitError> {
        let policy = self.cfg.policy;
        let mut outcome: Option<Result<jobs::Transition, Refusal>> = None;
        let mut step = |j: &mut JobRecord| {
            let t = jobs::transition(j, event, now_ms, &policy);
            let changed = match &t {
                Ok(t) if t.changed => {
                    *j = t.job.clone();
                    true
                }
                _ => false,
            };
            outcome = Some(t);
            changed
        };
        let stored =
            if claim { self.store.claim_job(job, &mut step)? } else { self.store.update_job(job, &mut step)? };
        match outcome {
            None => Ok(stored),
            Some(Err(refusal)) => Err(refusal.into()),
            Some(Ok(t)) => {
                self.carry_out(job, &t.effects, t.job.created_at_ms, t.job.profile, now_ms);
                Ok(stored)
            }
        }
    }

    /// Carries out the effects of a committed transition of `job`: messages to agents, lease
    /// bookkeeping in the fleet, metrics (the duration of a succeeded job by its `profile`), waking
    /// the loop.
    pub fn carry_out(&self, job: JobId, effects: &[Effect], created_at_ms: UnixMs, profile: Profile, now_ms: UnixMs) {
        for effect in effects {
            match effect {
                Effect::Assign(agent, a) => {
                    self.fleet.note_lease(*agent, job);
                    self.fleet.send(*agent, ControlMessage::Assign(a.clone()));
                }
                Effect::Holds(agent) => self.fleet.note_lease(*agent, job),
                Effect::Cancel { agent, reason } => {
                    self.fleet.release(*agent, job);
                    self.fleet.send(*agent, ControlMessage::Cancel { job_id: job, reason: reason.clone() });
                }
                Effect::Finished(state) => {
                    self.fleet.release_everywhere(job);
                    self.pending_lock().remove(&job);
                    self.metrics.job_finished(state.as_str());
                    if *state == JobState::Succeeded {
                        self.metrics.job_duration(profile, now_ms.saturating_sub(created_at_ms) as f64 / 1000.0);
                    }
                    if let Some(hooks) = self.webhooks.get() {
                        hooks.job_finished(job, *state, now_ms);
                    }
                    self.wake();
                }
                Effect::Requeued { reason } => {
                    self.fleet.release_everywhere(job);
                    self.metrics.job_requeued();
                    tracing::info!(job_id = %job, %reason, "job back in the queue");
                    self.wake();
                }
            }
        }
    }

    /// Why a queued job is still waiting, if the last leasing pass could not place it.
    pub fn pending_reason(&self, job: JobId) -> Option<String> {
        self.pending_lock().get(&job).cloned()
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, String>> {
        // Single inserts and removes: a panic elsewhere cannot leave the map inconsistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the scheduling loop (after an agent connects, frees a slot, or a job is queued), and
    /// the other replicas' (coalesced: [`crate::replica::WAKE_PUBLISH_GAP`]).
    pub fn wake(&self) {
        self.wake.notify_one();
        if let Some(replica) = self.replica.get() {
            replica.publish(StoreEvent::JobsChanged);
        }
    }

    /// Wakes this replica's scheduling loop only (another replica said jobs changed).
    pub fn wake_local(&self) {
        self.wake.notify_one();
    }

    /// Waits until [`Scheduler::wake`] is called (one stored permit).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Leases queued jobs, in leasing order, to connected agents that can run them. Blocking.
    ///
    /// # Errors
    /// Store errors (the pass stops; the next one retries).
    pub fn lease_pass(&self, now_ms: UnixMs) -> Result<usize, StoreError> {
        let mut pending = HashMap::new();
        let mut leased = 0;
        // Read as many queued jobs as the free slots could take (a backlog of thousands is not
        // decoded on every pass), more while slots stay free after them (jobs nobody here can
        // run at the head of the queue), up to LEASE_PASS_JOBS_MAX.
        let mut limit =
            self.fleet.free_slots_total().saturating_mul(4).clamp(LEASE_PASS_CHUNK_MIN, LEASE_PASS_JOBS_MAX);
        let mut seen = HashSet::new();
        'pass: loop {
            let queued = self.store.jobs_in_state(JobState::Queued, limit)?;
            let read = queued.len();
            for job in queued {
                if !seen.insert(job.id) {
                    continue;
                }
                if let Some(until) = self.own_start_until(&job).filter(|u| now_ms < *u) {
                    if pending.len() < PENDING_REASONS_MAX {
                        let agent = job.pinned_agent.map(|a| a.to_string()).unwrap_or_default();
                        let secs = until.saturating_sub(now_ms).div_ceil(1000);
                        let reason = format!(
                            "waiting {secs} s more for agent {agent} to report running the watch-folder file it found"
                        );
                        pending.insert(job.id, reason);
                    }
                    continue;
                }
                match self.fleet.reserve_for(&job) {
                    Err(reason) => {
                        if pending.len() < PENDING_REASONS_MAX {
                            pending.insert(job.id, reason);
                        }
                        if !self.fleet.any_free_slot() {
                            // Nobody can take anything: the rest keep their last reason.
                            break 'pass;
                        }
                    }
                    Ok(agent) => {
                        let event = JobEvent::Lease { agent, offline: false };
                        match self.apply_with(job.id, &event, now_ms, true) {
                            Ok(Some(j)) if j.lease.is_some_and(|l| l.holder == agent) => {
                                leased += 1;
                                tracing::info!(job_id = %job.id, agent_id = %agent, path = %job.path, "job leased");
                            }
                            Ok(_) | Err(SubmitError::Refused(_)) => {}
                            Err(SubmitError::Store(e)) => {
                                self.fleet.unreserve(agent, job.id);
                                return Err(e);
                            }
                            Err(_) => {}
                        }
                        self.fleet.unreserve(agent, job.id);
                    }
                }
            }
            if read < limit || limit >= LEASE_PASS_JOBS_MAX || !self.fleet.any_free_slot() {
                break;
            }
            limit = limit.saturating_mul(2).min(LEASE_PASS_JOBS_MAX);
        }
        if leased > 0 {
            self.store.flush()?;
        }
        let mut kept = self.pending_lock();
        for (id, reason) in pending {
            kept.insert(id, reason);
        }
        kept.retain(|id, _| !self.fleet.is_reserved_or_leased(*id));
        if kept.len() > PENDING_REASONS_MAX * 2 {
            kept.clear();
        }
        Ok(leased)
    }

    /// Until when a watch-folder job is left to the agent that found it: agents run the files of
    /// their watch folders themselves (with or without a link) and report under lease 0, so the
    /// scheduler leases such a job only if no run of it was reported within the assign timeout
    /// of its submission (the agent lost it) — never while that report may still be on its way,
    /// which would run the file twice. None for other jobs and for watch-folder jobs that were
    /// started before (retried ones).
    fn own_start_until(&self, job: &JobRecord) -> Option<UnixMs> {
        (matches!(job.origin, JobOrigin::WatchFolder { .. }) && job.lease_epoch == 0)
            .then(|| job.created_at_ms.saturating_add(self.cfg.policy.assign_timeout_ms))
    }

    /// Spends the attempts of leased jobs whose deadline has passed. Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn deadline_pass(&self, now_ms: UnixMs) -> Result<usize, StoreError> {
        let mut expired = 0;
        for state in [JobState::Assigned, JobState::Running] {
            for job in self.store.jobs_in_state(state, DEADLINE_PASS_JOBS_MAX)? {
                let Some(lease) = job.lease.filter(|l| l.deadline_ms.is_some_and(|d| d <= now_ms)) else { continue };
                if self.held_elsewhere(lease.holder)? {
                    // Its replica keeps or expires it.
                    continue;
                }
                if state == JobState::Running && self.fleet.leases_of(lease.holder).contains(&job.id) {
                    // Connected here and holding it: a grace started by another replica that
                    // declared this agent's old replica dead after the agent had moved here.
                    let event = JobEvent::HolderReconnected { agent: lease.holder, held: Some(lease.lease_id) };
                    match self.apply(job.id, &event, now_ms) {
                        Ok(_) | Err(SubmitError::Refused(_)) => {}
                        Err(SubmitError::Store(e)) => return Err(e),
                        Err(_) => {}
                    }
                    continue;
                }
                match self.apply(job.id, &JobEvent::DeadlineCheck, now_ms) {
                    Ok(_) | Err(SubmitError::Refused(_)) => expired += 1,
                    Err(SubmitError::Store(e)) => return Err(e),
                    Err(_) => {}
                }
            }
        }
        if expired > 0 {
            self.store.flush()?;
        }
        Ok(expired)
    }

    /// At start: every leased job of an agent that is not connected gets the grace deadline (a
    /// restarted control plane gives every agent the full grace to reconnect). Air-gapped
    /// agents' leases have no deadline and keep none. Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn recover(&self, now_ms: UnixMs) -> Result<(), StoreError> {
        for state in [JobState::Assigned, JobState::Running] {
            for job in self.store.jobs_in_state(state, DEADLINE_PASS_JOBS_MAX)? {
                let Some(lease) = job.lease else { continue };
                if self.fleet.is_connected(lease.holder) || lease.deadline_ms.is_some() {
                    continue;
                }
                if self.held_elsewhere(lease.holder)? {
                    continue;
                }
                if self.store.get_agent(lease.holder)?.is_some_and(|a| a.offline && a.revoked_at_ms.is_none()) {
                    continue;
                }
                let _ = self.apply(job.id, &JobEvent::HolderDisconnected { agent: lease.holder }, now_ms);
            }
        }
        self.store.flush()
    }

    /// An agent's link is up: reconcile its leases with the jobs it says it holds, register it in
    /// the fleet, and return the jobs it holds that are no longer its own (the caller has already
    /// been told to cancel them through its outgoing queue). Blocking.
    ///
    /// # Errors
    /// Store errors (the caller refuses the connection).
    pub fn agent_connected(
        &self,
        agent: AgentId,
        conn: AgentConn,
        held: &[HeldJob],
        now_ms: UnixMs,
    ) -> Result<(), StoreError> {
        let held_by_job: HashMap<JobId, u64> = held.iter().map(|h| (h.job_id, h.lease_id)).collect();
        let scheduling = self.store.get_agent(agent)?.map(|a| a.scheduling).unwrap_or_default();
        let notify = self.fleet.connect_with(agent, conn, scheduling);
        let mut still_leased = HashSet::new();
        for job in self.jobs_leased_to(agent)? {
            let event = JobEvent::HolderReconnected { agent, held: held_by_job.get(&job.id).copied() };
            match self.apply(job.id, &event, now_ms) {
                Ok(Some(j)) if j.lease.is_some_and(|l| l.holder == agent) => {
                    still_leased.insert(job.id);
                }
                Ok(_) | Err(SubmitError::Refused(_)) => {}
                Err(SubmitError::Store(e)) => return Err(e),
                Err(_) => {}
            }
        }
        for h in held {
            if still_leased.contains(&h.job_id) {
                continue;
            }
            if self.is_own_watch_run(agent, h)? {
                // It takes one of the agent's slots like a lease does.
                still_leased.insert(h.job_id);
                continue;
            }
            // Requeued, reassigned, cancelled or finished while the agent was away.
            let reason = "the job is no longer leased to this agent".to_owned();
            self.fleet.send(agent, ControlMessage::Cancel { job_id: h.job_id, reason });
        }
        self.fleet.set_leases(agent, still_leased);
        if let Some(hooks) = self.webhooks.get() {
            hooks.agent_connected(agent, now_ms);
        }
        self.store.flush()?;
        notify.notify_one();
        self.wake();
        Ok(())
    }

    /// Whether `held` is a watch-folder file `agent` runs on its own whose report has not been
    /// applied yet: the job is unknown (its submission is still in the agent's outbox) or queued
    /// and pinned to it. Such a run must not be cancelled — its report is on the way and makes
    /// it the agent's lease.
    fn is_own_watch_run(&self, agent: AgentId, held: &HeldJob) -> Result<bool, StoreError> {
        if held.lease_id != gaffer_protocol::messages::LEASE_ID_NONE {
            return Ok(false);
        }
        Ok(match self.store.get_job(held.job_id)? {
            None => true,
            Some(j) => {
                j.state == JobState::Queued && matches!(j.origin, JobOrigin::WatchFolder { agent: a } if a == agent)
            }
        })
    }

    /// The link `conn_id` of `agent` went down: its leases start their grace (unless a newer
    /// connection of the agent is up). Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn agent_disconnected(&self, agent: AgentId, conn_id: u64, now_ms: UnixMs) -> Result<bool, StoreError> {
        if !self.fleet.disconnect(agent, conn_id) {
            return Ok(false);
        }
        if let Some(hooks) = self.webhooks.get() {
            hooks.agent_disconnected(agent, now_ms);
        }
        if self.held_elsewhere(agent)? {
            // It failed over to another replica, whose Hello reconciled its leases.
            self.wake();
            return Ok(true);
        }
        for job in self.jobs_leased_to(agent)? {
            if let Err(SubmitError::Store(e)) = self.apply(job.id, &JobEvent::HolderDisconnected { agent }, now_ms) {
                return Err(e);
            }
        }
        self.store.flush()?;
        self.wake();
        Ok(true)
    }

    /// `agent` was revoked: every lease it holds is void at once and its jobs go back to the queue
    /// (each attempt spent), and its link is told to close (the driver sees the revocation on its
    /// next turn, which this wakes). Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn agent_revoked(&self, agent: AgentId, now_ms: UnixMs) -> Result<usize, StoreError> {
        let mut requeued = 0;
        for job in self.jobs_leased_to(agent)? {
            match self.apply(job.id, &JobEvent::HolderRevoked { agent }, now_ms) {
                Ok(Some(_)) => requeued += 1,
                Ok(None) => {}
                Err(SubmitError::Store(e)) => return Err(e),
                Err(e) => tracing::warn!(job_id = %job.id, error = %e, "could not requeue a revoked agent's job"),
            }
        }
        self.store.flush()?;
        if let Some(notify) = self.fleet.notifier(agent) {
            notify.notify_one();
        }
        self.wake();
        Ok(requeued)
    }

    /// An operator cordons, drains or uncordons `agent` ([`Scheduling`]): written to its record
    /// (so it lasts across reconnects and restarts), applied to its link here at once and on the
    /// replica holding it (through [`StoreEvent::SchedulingChanged`]). Uncordoning wakes the
    /// scheduler for the slots it frees. Blocking. Returns the updated record, None when no
    /// agent `agent` is enrolled.
    ///
    /// # Errors
    /// Store errors.
    pub fn set_scheduling(
        &self,
        agent: AgentId,
        scheduling: Scheduling,
    ) -> Result<Option<crate::store::AgentRecord>, StoreError> {
        let Some(rec) = self.store.update_agent(agent, &mut |a| a.scheduling = scheduling.clone())? else {
            return Ok(None);
        };
        self.store.flush()?;
        self.fleet.set_scheduling(agent, scheduling);
        if let Some(replica) = self.replica.get() {
            replica.publish(StoreEvent::SchedulingChanged { agent });
        }
        tracing::info!(agent_id = %agent, scheduling = rec.scheduling.name(), "agent scheduling changed");
        self.wake();
        Ok(Some(rec))
    }

    /// Another replica changed `agent`'s [`Scheduling`]: copy it from the store to its link here,
    /// if it is up here. Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn reload_scheduling(&self, agent: AgentId) -> Result<(), StoreError> {
        if self.fleet.is_connected(agent) {
            let scheduling = self.store.get_agent(agent)?.map(|a| a.scheduling).unwrap_or_default();
            self.fleet.set_scheduling(agent, scheduling);
            self.wake_local();
        }
        Ok(())
    }

    /// Takes back the jobs still held by agents connected here whose drain deadline has passed
    /// ([`JobEvent::HolderDrained`]: cancelled on the agent, requeued for others with the attempt
    /// given back). Blocking; runs with the deadline pass. Returns how many were requeued.
    ///
    /// # Errors
    /// Store errors.
    pub fn drain_pass(&self, now_ms: UnixMs) -> Result<usize, StoreError> {
        let mut requeued = 0;
        for (agent, jobs) in self.fleet.drains_due(now_ms) {
            for job in jobs {
                match self.apply(job, &JobEvent::HolderDrained { agent }, now_ms) {
                    Ok(Some(j)) if j.state == JobState::Queued => {
                        requeued += 1;
                        tracing::info!(job_id = %job, agent_id = %agent, "drain deadline passed: job requeued");
                    }
                    Ok(_) | Err(SubmitError::Refused(_)) | Err(SubmitError::UnknownJob(_)) => {}
                    Err(SubmitError::Store(e)) => return Err(e),
                    Err(e) => tracing::warn!(job_id = %job, error = %e, "could not requeue a drained agent's job"),
                }
            }
        }
        if requeued > 0 {
            self.store.flush()?;
            self.wake();
        }
        Ok(requeued)
    }

    /// The assigned and running jobs leased to `agent`, from the state index (bounded by the
    /// fleet's slots, not by history).
    ///
    /// # Errors
    /// Store errors.
    pub fn jobs_leased_to(&self, agent: AgentId) -> Result<Vec<JobRecord>, StoreError> {
        self.store.jobs_leased_to(agent)
    }

    /// Runs the scheduling loop forever: a leasing pass on every wake and every tick, preceded by
    /// a deadline pass at most once per tick. Store work runs on a blocking thread.
    pub async fn run(self: Arc<Self>) {
        let mut last_deadline_pass = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.woken() => {}
                _ = tokio::time::sleep(self.cfg.tick) => {}
            }
            // Deadlines are seconds apart: the deadline pass (which reads every leased job) runs
            // once per tick, not on every wake.
            let deadlines = last_deadline_pass.elapsed() >= self.cfg.tick;
            if deadlines {
                last_deadline_pass = tokio::time::Instant::now();
            }
            let this = self.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let now = crate::now_ms();
                if deadlines {
                    this.deadline_pass(now)?;
                    this.drain_pass(now)?;
                }
                this.lease_pass(now)
            })
            .await;
            match pass {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "scheduling pass failed; retrying"),
                Err(e) => tracing::error!(error = %e, "scheduling pass panicked; retrying"),
            }
        }
    }
}

/// A validated new job record (state queued).
///
/// # Errors
/// [`SubmitError::Invalid`] for a bad path or site.
pub fn new_job(
    req: JobRequest,
    origin: JobOrigin,
    id: Option<JobId>,
    now_ms: UnixMs,
) -> Result<JobRecord, SubmitError> {
    validate_path(&req.path)?;
    validate_site(&req.site)?;
    let submitted_by = match &origin {
        JobOrigin::WatchFolder { agent } => Some(format!("watch folder of agent {agent}")),
        JobOrigin::Api => None,
    };
    Ok(JobRecord {
        id: id.unwrap_or_else(uuid::Uuid::new_v4),
        path: req.path,
        site: req.site,
        profile: req.profile,
        pinned_agent: req.agent,
        origin,
        priority: req.priority,
        state: JobState::Queued,
        agent: None,
        lease: None,
        lease_epoch: 0,
        progress: 0.0,
        frames_decoded: 0,
        error: None,
        attempts: 0,
        seq: 0,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        finished_at_ms: None,
        custody: None,
        submitted_by,
        history: Vec::new(),
    })
}

fn validate_path(path: &str) -> Result<(), SubmitError> {
    if path.len() > JOB_PATH_BYTES_MAX {
        return Err(SubmitError::Invalid(format!("path is longer than {JOB_PATH_BYTES_MAX} bytes")));
    }
    if !path.starts_with('/') {
        return Err(SubmitError::Invalid(format!("path must be absolute (start with /), got {path:?}")));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(SubmitError::Invalid("path must not contain '..' components".into()));
    }
    if path.contains('\0') {
        return Err(SubmitError::Invalid("path must not contain NUL".into()));
    }
    Ok(())
}

/// Checks a site name: 1..=128 bytes of letters, digits, '-', '_' and '.'.
///
/// # Errors
/// [`SubmitError::Invalid`] saying what is wrong.
pub fn validate_site(site: &str) -> Result<(), SubmitError> {
    if site.is_empty() || site.len() > SITE_NAME_BYTES_MAX {
        return Err(SubmitError::Invalid(format!("site must be 1..={SITE_NAME_BYTES_MAX} bytes")));
    }
    if !site.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(SubmitError::Invalid(format!("site {site:?} may only use letters, digits, '-', '_' and '.'")));
    }
    Ok(())
}

/// Why an agent cannot run a job (placement), as words for `pending_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    /// Another site.
    Site,
    /// The job is pinned to another agent.
    Pinned,
    /// The agent does not run the profile, or lacks one of its models.
    Profile,
    /// The path is under none of the agent's volumes.
    Volume,
}

/// Whether the agent `agent` (in `site`, with `caps`) may run `job`: same site, pinned to it or
/// unpinned, profile supported with every model the profile needs installed, and the path under
/// one of its volumes. Shared by the link's scheduler and the offline bundle path.
///
/// # Errors
/// The first check that fails.
pub fn eligibility(agent: AgentId, site: &str, caps: &Capabilities, job: &JobRecord) -> Result<(), Ineligible> {
    if site != job.site {
        return Err(Ineligible::Site);
    }
    if job.pinned_agent.is_some_and(|p| p != agent) {
        return Err(Ineligible::Pinned);
    }
    let has_models = job.profile.required_models().iter().all(|m| caps.models.iter().any(|have| have.name == *m));
    if !caps.profiles.contains(&job.profile) || !has_models {
        return Err(Ineligible::Profile);
    }
    if !caps.volumes.iter().any(|v| path_is_under(&job.path, v)) {
        return Err(Ineligible::Volume);
    }
    Ok(())
}

/// Whether `path` is `root` or inside it, comparing whole path components (`/media2/x` is not
/// under `/media`).
pub fn path_is_under(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return path.starts_with('/');
    }
    path == root || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
}

/// A connected agent, as the scheduler sees it.
#[derive(Debug)]
pub struct AgentConn {
    /// Distinguishes this connection from an earlier one of the same agent.
    pub conn_id: u64,
    /// The agent's site.
    pub site: String,
    /// What it said it can do in its Hello.
    pub capabilities: Capabilities,
}

#[derive(Debug)]
struct Connected {
    conn: AgentConn,
    /// Jobs leased to it (assigned or running).
    leased: HashSet<JobId>,
    /// Jobs reserved for it by a leasing pass in progress.
    reserved: HashSet<JobId>,
    /// Messages waiting for the link driver, in order.
    mailbox: VecDeque<ControlMessage>,
    /// Wakes the link driver when the mailbox gets a message.
    notify: Arc<Notify>,
    /// Why no new job is leased to it, when something holds it back (an update it is about to
    /// restart for); the jobs it holds run to the end.
    hold: Option<String>,
    /// The operator's cordon or drain ([`crate::store::AgentRecord::scheduling`]), copied here at
    /// connect and on every change: no new leases unless active.
    scheduling: Scheduling,
}

impl Connected {
    fn busy(&self) -> usize {
        self.leased.len() + self.reserved.len()
    }
    fn free_slots(&self) -> usize {
        if self.hold.is_some() || !self.scheduling.is_active() {
            return 0;
        }
        (self.conn.capabilities.job_slots as usize).saturating_sub(self.busy())
    }
    fn mailbox_has_room_for_assign(&self) -> bool {
        self.mailbox.len() < MAILBOX_ASSIGN_MAX
    }
}

/// Connected agents: their leases and their outgoing queues. Shared by the link drivers and the
/// scheduler; a plain mutex-protected map with no I/O, so the simulation uses it as is.
#[derive(Debug, Default)]
pub struct Fleet {
    /// By agent id, so a leasing pass visits agents in a fixed order without sorting them.
    inner: Mutex<BTreeMap<AgentId, Connected>>,
    /// Set by [`Scheduler::set_replica`]: messages for agents not connected here go to the other
    /// replicas.
    replica: OnceLock<Arc<Replica>>,
}

impl Fleet {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AgentId, Connected>> {
        // Single inserts and removes: a panic while holding this lock cannot leave the map
        // inconsistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `agent`, replacing an older one (whose queued messages go
    /// with it: they were for a connection that is gone, and the new Hello reconciles; its driver
    /// is woken to notice it was replaced and close). Returns the notifier the link driver waits
    /// on for outgoing messages.
    pub fn connect(&self, agent: AgentId, conn: AgentConn) -> Arc<Notify> {
        self.connect_with(agent, conn, Scheduling::Active)
    }

    /// [`Fleet::connect`] of an agent whose operator-set [`Scheduling`] is `scheduling` (a
    /// cordoned agent is never leased to, not even between connecting and reading its record).
    pub fn connect_with(&self, agent: AgentId, conn: AgentConn, scheduling: Scheduling) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let c = Connected {
            conn,
            leased: HashSet::new(),
            reserved: HashSet::new(),
            mailbox: VecDeque::new(),
            notify: notify.clone(),
            hold: None,
            scheduling,
        };
        if let Some(old) = self.lock().insert(agent, c) {
            old.notify.notify_one();
        }
        notify
    }

    /// The notifier of `agent`'s current connection.
    pub fn notifier(&self, agent: AgentId) -> Option<Arc<Notify>> {
        self.lock().get(&agent).map(|c| c.notify.clone())
    }

    /// Removes the connection `conn_id` of `agent` (a newer connection is left alone). Returns
    /// whether it was the current one.
    pub fn disconnect(&self, agent: AgentId, conn_id: u64) -> bool {
        let mut inner = self.lock();
        if inner.get(&agent).is_some_and(|s| s.conn.conn_id == conn_id) {
            inner.remove(&agent);
            true
        } else {
            false
        }
    }

    /// Holds new leases back from the connected `agent` (`Some(reason)`) or lets them flow again
    /// (`None`); the jobs it holds are not touched. A hold lasts as long as the connection: whoever
    /// holds an agent back sets it again when the agent reconnects. Returns whether `agent` is
    /// connected.
    pub fn set_hold(&self, agent: AgentId, hold: Option<String>) -> bool {
        match self.lock().get_mut(&agent) {
            Some(c) => {
                c.hold = hold;
                true
            }
            None => false,
        }
    }

    /// Sets the operator's cordon or drain of the connected `agent` (see [`Scheduling`]); the
    /// jobs it holds are not touched here ([`Scheduler::drain_pass`] takes them back at a drain's
    /// deadline). Returns whether `agent` is connected.
    pub fn set_scheduling(&self, agent: AgentId, scheduling: Scheduling) -> bool {
        match self.lock().get_mut(&agent) {
            Some(c) => {
                c.scheduling = scheduling;
                true
            }
            None => false,
        }
    }

    /// The connected agents whose drain deadline is at or before `now_ms` and which still hold
    /// jobs, with those jobs.
    pub fn drains_due(&self, now_ms: UnixMs) -> Vec<(AgentId, Vec<JobId>)> {
        self.lock()
            .iter()
            .filter(|(_, c)| {
                matches!(c.scheduling, Scheduling::Draining { deadline_ms: Some(d), .. } if d <= now_ms)
                    && !c.leased.is_empty()
            })
            .map(|(id, c)| (*id, c.leased.iter().copied().collect()))
            .collect()
    }

    /// Why new leases are held back from `agent`, if they are.
    pub fn hold(&self, agent: AgentId) -> Option<String> {
        self.lock().get(&agent).and_then(|c| c.hold.clone())
    }

    /// Whether `agent` has a link up.
    pub fn is_connected(&self, agent: AgentId) -> bool {
        self.lock().contains_key(&agent)
    }

    /// The connection id of `agent`'s current link.
    pub fn conn_id(&self, agent: AgentId) -> Option<u64> {
        self.lock().get(&agent).map(|c| c.conn.conn_id)
    }

    /// Replaces the set of jobs leased to `agent`.
    pub fn set_leases(&self, agent: AgentId, leased: HashSet<JobId>) {
        if let Some(c) = self.lock().get_mut(&agent) {
            c.leased = leased;
        }
    }

    /// Records that `agent` holds `job`.
    pub fn note_lease(&self, agent: AgentId, job: JobId) {
        if let Some(c) = self.lock().get_mut(&agent) {
            c.leased.insert(job);
        }
    }

    /// Forgets the lease of `job` on `agent`.
    pub fn release(&self, agent: AgentId, job: JobId) {
        if let Some(c) = self.lock().get_mut(&agent) {
            c.leased.remove(&job);
        }
    }

    /// Forgets `job` on every agent (it finished or went back to the queue).
    pub fn release_everywhere(&self, job: JobId) {
        for c in self.lock().values_mut() {
            c.leased.remove(&job);
        }
    }

    /// Jobs leased to `agent` as the fleet knows them.
    pub fn leases_of(&self, agent: AgentId) -> Vec<JobId> {
        self.lock().get(&agent).map(|c| c.leased.iter().copied().collect()).unwrap_or_default()
    }

    fn is_reserved_or_leased(&self, job: JobId) -> bool {
        self.lock().values().any(|c| c.leased.contains(&job) || c.reserved.contains(&job))
    }

    /// Queues `msg` for `agent`'s link driver. False if `agent` is not connected here, or its
    /// queue is at [`MAILBOX_MAX`] (the driver then closes the link: see [`Fleet::overflowed`]).
    /// With replicas, a message for an agent not connected here is also handed to the other
    /// replicas, and the one holding the agent's link queues it (still false here: nothing was
    /// queued on this replica).
    pub fn send(&self, agent: AgentId, msg: ControlMessage) -> bool {
        match self.replica.get() {
            Some(replica) if !self.is_connected(agent) => {
                replica.publish(StoreEvent::Deliver { agent, msg });
                false
            }
            _ => self.send_local(agent, msg),
        }
    }

    /// [`Fleet::send`] to this replica's links only.
    pub fn send_local(&self, agent: AgentId, msg: ControlMessage) -> bool {
        let mut inner = self.lock();
        let Some(c) = inner.get_mut(&agent) else { return false };
        if let ControlMessage::Cancel { job_id, .. } = &msg {
            if c.mailbox.iter().any(|m| matches!(m, ControlMessage::Cancel { job_id: j, .. } if j == job_id)) {
                return true;
            }
        }
        if c.mailbox.len() >= MAILBOX_MAX {
            tracing::warn!(agent_id = %agent, "agent's outgoing queue is full; its link will be closed");
            c.notify.notify_one();
            return false;
        }
        c.mailbox.push_back(msg);
        c.notify.notify_one();
        true
    }

    /// Messages waiting in `agent`'s outgoing queue (0 when not connected).
    pub fn outgoing_len(&self, agent: AgentId) -> usize {
        self.lock().get(&agent).map_or(0, |c| c.mailbox.len())
    }

    /// Whether `agent`'s outgoing queue is full (the driver closes such a link).
    pub fn overflowed(&self, agent: AgentId) -> bool {
        self.lock().get(&agent).is_some_and(|c| c.mailbox.len() >= MAILBOX_MAX)
    }

    /// Takes up to `max` queued messages of connection `conn_id` of `agent`, in order.
    pub fn take_outgoing(&self, agent: AgentId, conn_id: u64, max: usize) -> Vec<ControlMessage> {
        let mut inner = self.lock();
        match inner.get_mut(&agent) {
            Some(c) if c.conn.conn_id == conn_id => {
                let n = max.min(c.mailbox.len());
                c.mailbox.drain(..n).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Puts messages the driver could not send yet back at the front of the queue, in order.
    pub fn requeue_outgoing(&self, agent: AgentId, conn_id: u64, msgs: Vec<ControlMessage>) {
        if let Some(c) = self.lock().get_mut(&agent).filter(|c| c.conn.conn_id == conn_id) {
            for m in msgs.into_iter().rev() {
                c.mailbox.push_front(m);
            }
        }
    }

    /// The connected agents.
    pub fn connected_agents(&self) -> Vec<AgentId> {
        self.lock().keys().copied().collect()
    }

    /// How many agents are connected now.
    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Free slots of the connected agents with room for an assignment, together.
    pub fn free_slots_total(&self) -> usize {
        self.lock().values().filter(|c| c.mailbox_has_room_for_assign()).map(Connected::free_slots).sum()
    }

    /// Whether any connected agent has a free slot and room for an assignment.
    pub fn any_free_slot(&self) -> bool {
        self.lock().values().any(|c| c.free_slots() > 0 && c.mailbox_has_room_for_assign())
    }

    /// Picks the connected agent with the most free slots that can run `job` and reserves a slot
    /// on it (release with [`Fleet::unreserve`] once the lease is committed or abandoned).
    ///
    /// # Errors
    /// Why no agent can take it, in words for `pending_reason`.
    pub fn reserve_for(&self, job: &JobRecord) -> Result<AgentId, String> {
        let mut inner = self.lock();
        // Only agents that can take a job now; the first one with as many free slots as any
        // connected agent has slots at all wins outright (nobody can have more). Deterministic
        // choice among equals: the smallest agent id (the map is ordered by id).
        let slots_max = inner.values().map(|c| c.conn.capabilities.job_slots as usize).max().unwrap_or(0);
        let mut best: Option<(AgentId, usize)> = None;
        for (id, c) in inner.iter() {
            let free = c.free_slots();
            if free == 0 || best.is_some_and(|(_, f)| free <= f) || !c.mailbox_has_room_for_assign() {
                continue;
            }
            if eligibility(*id, &c.conn.site, &c.conn.capabilities, job).is_ok() {
                best = Some((*id, free));
                if free >= slots_max {
                    break;
                }
            }
        }
        if let Some((id, _)) = best {
            if let Some(c) = inner.get_mut(&id) {
                c.reserved.insert(job.id);
            }
            return Ok(id);
        }
        // Nobody can take it: say why, from every connected agent.
        let mut in_site = 0usize;
        let mut eligible = 0usize;
        // Eligible agents an operator took out of rotation, with why ("cordoned by alice").
        let mut out_of_rotation: Vec<String> = Vec::new();
        let mut worst = Ineligible::Site;
        let now_ms = crate::now_ms();
        for (id, c) in inner.iter() {
            match eligibility(*id, &c.conn.site, &c.conn.capabilities, job) {
                Err(Ineligible::Site) => continue,
                Err(why) => {
                    in_site += 1;
                    worst = worst.max_by_rank(why);
                }
                Ok(()) => {
                    in_site += 1;
                    eligible += 1;
                    if let Some(why) = c.scheduling.describe(now_ms) {
                        out_of_rotation.push(format!("agent {id} {why}"));
                    }
                }
            }
        }
        const NAMED_MAX: usize = 3;
        let named = |list: &[String]| {
            let mut text = list.iter().take(NAMED_MAX).cloned().collect::<Vec<_>>().join("; ");
            if list.len() > NAMED_MAX {
                text.push_str(&format!("; and {} more", list.len() - NAMED_MAX));
            }
            text
        };
        Err(if let Some(pinned) = job.pinned_agent.filter(|p| !inner.contains_key(p)) {
            format!("pinned to agent {pinned}, which is not connected")
        } else if in_site == 0 {
            format!("no agent of site {} is connected", job.site)
        } else if eligible > 0 && out_of_rotation.len() == eligible {
            format!("every eligible agent of site {} is out of rotation: {}", job.site, named(&out_of_rotation))
        } else if !out_of_rotation.is_empty() {
            format!(
                "all {} eligible agents of site {} in rotation are busy; {} out of rotation: {}",
                eligible - out_of_rotation.len(),
                job.site,
                out_of_rotation.len(),
                named(&out_of_rotation)
            )
        } else if eligible > 0 {
            format!("all {eligible} eligible agents of site {} are busy", job.site)
        } else {
            match worst {
                Ineligible::Volume => format!(
                    "no connected agent in site {} has a volume covering {} ({in_site} agents checked)",
                    job.site, job.path
                ),
                Ineligible::Profile => format!(
                    "needs profile {}: no connected agent in site {} has it{} ({in_site} agents checked)",
                    job.profile,
                    job.site,
                    if job.profile.required_models().is_empty() { "" } else { " with the models" }
                ),
                Ineligible::Pinned | Ineligible::Site => {
                    format!("pinned to an agent that cannot run it ({in_site} agents checked)")
                }
            }
        })
    }

    /// Releases a reservation made by [`Fleet::reserve_for`].
    pub fn unreserve(&self, agent: AgentId, job: JobId) {
        if let Some(c) = self.lock().get_mut(&agent) {
            c.reserved.remove(&job);
        }
    }
}

impl Ineligible {
    /// The reason that gets furthest in the checks (volume is the most specific).
    fn max_by_rank(self, other: Ineligible) -> Ineligible {
        let rank = |i: Ineligible| match i {
            Ineligible::Site => 0,
            Ineligible::Pinned => 1,
            Ineligible::Profile => 2,
            Ineligible::Volume => 3,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::path_is_under;

    #[test]
    fn path_under_root_compares_components() {
        assert!(path_is_under("/media/a.mp4", "/media"));
        assert!(path_is_under("/media/a.mp4", "/media/"));
        assert!(path_is_under("/media/x/y/a.mp4", "/media"));
        assert!(!path_is_under("/media2/a.mp4", "/media"));
        assert!(!path_is_under("/other/a.mp4", "/media"));
        assert!(path_is_under("/a.mp4", "/"));
    }
}
