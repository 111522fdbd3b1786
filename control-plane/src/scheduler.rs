//! Jobs and leases.
//!
//! A queued job is leased to a connected agent that (a) is in the job's site, (b) can read the
//! job's path (the path is under one of the agent's volumes), (c) runs the job's profile, (d) has a
//! free slot, and (e) is the job's pinned agent, if it has one. A lease lasts as long as the agent's
//! link connection: when the connection goes, its assigned and running jobs return to the queue
//! (unless the agent reconnects and reports them running within the grace period).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::messages::{AgentId, Assignment, Capabilities, ControlMessage, JobId, Profile};
use tokio::sync::{mpsc, Notify};

use crate::store::{JobOrigin, JobRecord, JobState, Store, StoreError};

/// Why a job submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request is invalid; the message says which field and why (HTTP 400/422).
    #[error("{0}")]
    Invalid(String),
    /// The pinned agent does not exist (HTTP 404/422).
    #[error("agent {0} is not enrolled")]
    UnknownAgent(AgentId),
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
}

/// Largest accepted job path, bytes.
pub const JOB_PATH_BYTES_MAX: usize = 4096;
/// Largest accepted site name, bytes.
pub const SITE_NAME_BYTES_MAX: usize = 128;

/// The scheduler. One per control plane.
pub struct Scheduler {
    store: Arc<dyn Store>,
    wake: Notify,
}

impl Scheduler {
    /// A scheduler over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, wake: Notify::new() }
    }

    /// Validates and queues a job, and wakes the scheduling loop.
    ///
    /// # Errors
    /// [`SubmitError::Invalid`] for a relative or oversize path, an empty or oversize site;
    /// [`SubmitError::UnknownAgent`] for a pinned agent that is not enrolled.
    pub fn submit(&self, req: JobRequest, origin: JobOrigin, id: Option<JobId>) -> Result<JobRecord, SubmitError> {
        validate_path(&req.path)?;
        validate_site(&req.site)?;
        if let Some(agent) = req.agent {
            if self.store.get_agent(agent)?.is_none() {
                return Err(SubmitError::UnknownAgent(agent));
            }
        }
        let now = crate::now_ms();
        let job = JobRecord {
            id: id.unwrap_or_else(uuid::Uuid::new_v4),
            path: req.path,
            site: req.site,
            profile: req.profile,
            pinned_agent: req.agent,
            origin,
            state: JobState::Queued,
            agent: None,
            progress: 0.0,
            frames_decoded: 0,
            error: None,
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
        };
        if !self.store.insert_job(&job)? {
            // Same id submitted again (a redelivered watch-folder submission): keep the first.
            if let Some(existing) = self.store.get_job(job.id)? {
                return Ok(existing);
            }
        }
        self.wake.notify_one();
        Ok(job)
    }

    /// Wakes the scheduling loop (after an agent connects, frees a slot, or a job is queued).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until [`Scheduler::wake`] or [`Scheduler::submit`] is called.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
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

/// A connected agent, as the scheduler sees it.
#[derive(Debug)]
pub struct AgentSession {
    /// Distinguishes this connection from an earlier one of the same agent.
    pub conn_id: u64,
    /// The agent's site.
    pub site: String,
    /// What it said it can do in its Hello.
    pub capabilities: Capabilities,
    /// Messages to the agent (the link's writer task drains it).
    pub tx: mpsc::Sender<ControlMessage>,
    /// Jobs leased to it (assigned or running).
    pub leased: HashSet<JobId>,
}

impl AgentSession {
    fn free_slots(&self) -> usize {
        (self.capabilities.job_slots as usize).saturating_sub(self.leased.len())
    }

    /// Whether this agent may run `job`: same site, pinned to it or unpinned, profile supported
    /// with every model the profile needs installed, and the path under one of its volumes.
    pub fn can_run(&self, agent: AgentId, job: &JobRecord) -> bool {
        self.site == job.site
            && job.pinned_agent.is_none_or(|p| p == agent)
            && self.capabilities.profiles.contains(&job.profile)
            && job.profile.required_models().iter().all(|m| self.capabilities.models.iter().any(|have| have.name == *m))
            && self.capabilities.volumes.iter().any(|v| path_is_under(&job.path, v))
    }
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

/// Connected agents and when the others were last connected. Shared by the link and the
/// scheduling loop.
#[derive(Debug, Default)]
pub struct Fleet {
    inner: Mutex<FleetInner>,
}

#[derive(Debug, Default)]
struct FleetInner {
    sessions: HashMap<AgentId, AgentSession>,
    disconnected_at: HashMap<AgentId, Instant>,
}

impl Fleet {
    fn lock(&self) -> std::sync::MutexGuard<'_, FleetInner> {
        // A panic while holding this lock cannot leave the maps inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `agent`, replacing an older one.
    pub fn connect(&self, agent: AgentId, session: AgentSession) {
        let mut inner = self.lock();
        inner.disconnected_at.remove(&agent);
        inner.sessions.insert(agent, session);
    }

    /// Removes the connection `conn_id` of `agent` (a newer connection is left alone). Returns
    /// whether it was the current one.
    pub fn disconnect(&self, agent: AgentId, conn_id: u64) -> bool {
        let mut inner = self.lock();
        if inner.sessions.get(&agent).is_some_and(|s| s.conn_id == conn_id) {
            inner.sessions.remove(&agent);
            inner.disconnected_at.insert(agent, Instant::now());
            true
        } else {
            false
        }
    }

    /// Whether `agent` has a link up.
    pub fn is_connected(&self, agent: AgentId) -> bool {
        self.lock().sessions.contains_key(&agent)
    }

    /// How long `agent` has been disconnected; agents never seen since this process started count
    /// from the first time they are asked about (so a restarted control plane gives every agent
    /// the full grace period to reconnect).
    pub fn disconnected_for(&self, agent: AgentId) -> Option<Duration> {
        let mut inner = self.lock();
        if inner.sessions.contains_key(&agent) {
            return None;
        }
        Some(inner.disconnected_at.entry(agent).or_insert_with(Instant::now).elapsed())
    }

    /// Records that `agent` holds `job` (it reported on a job it started itself).
    pub fn note_lease(&self, agent: AgentId, job: JobId) {
        if let Some(s) = self.lock().sessions.get_mut(&agent) {
            s.leased.insert(job);
        }
    }

    /// Forgets the lease of `job` on `agent` (finished, failed, cancelled).
    pub fn release(&self, agent: AgentId, job: JobId) {
        if let Some(s) = self.lock().sessions.get_mut(&agent) {
            s.leased.remove(&job);
        }
    }

    /// Sends `msg` to `agent` if it is connected; false if not connected or its queue is full.
    pub fn send(&self, agent: AgentId, msg: ControlMessage) -> bool {
        self.lock().sessions.get(&agent).is_some_and(|s| s.tx.try_send(msg).is_ok())
    }

    /// Number of connected agents.
    pub fn connected_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Picks the connected agent with the most free slots that can run `job`, records the lease
    /// in memory, and returns it with its sender. The caller commits the lease to the store.
    fn reserve_for(&self, job: &JobRecord) -> Option<(AgentId, mpsc::Sender<ControlMessage>)> {
        let mut inner = self.lock();
        let (agent, session) = inner
            .sessions
            .iter_mut()
            .filter(|(id, s)| s.free_slots() > 0 && s.can_run(**id, job))
            .max_by_key(|(_, s)| s.free_slots())?;
        session.leased.insert(job.id);
        Some((*agent, session.tx.clone()))
    }
}

/// Timing of the scheduling loop.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    /// How long a disconnected agent keeps its leases before its jobs are requeued. Default 30 s:
    /// long enough for a network blip or an agent restart, short enough that a dead box's work
    /// moves on quickly.
    pub lease_grace: Duration,
    /// How often the loop runs when nothing wakes it. Default 1 s.
    pub tick: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self { lease_grace: Duration::from_secs(30), tick: Duration::from_secs(1) }
    }
}

impl Scheduler {
    /// Runs the scheduling loop forever: requeues expired leases, then leases queued jobs.
    pub async fn run(self: Arc<Self>, fleet: Arc<Fleet>, policy: LeasePolicy) {
        loop {
            tokio::select! {
                _ = self.woken() => {}
                _ = tokio::time::sleep(policy.tick) => {}
            }
            let this = self.clone();
            let fleet = fleet.clone();
            let pass = tokio::task::spawn_blocking(move || {
                this.requeue_expired_leases(&fleet, policy.lease_grace)?;
                this.lease_queued_jobs(&fleet)
            })
            .await;
            match pass {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "scheduling pass failed; retrying"),
                Err(e) => tracing::error!(error = %e, "scheduling pass panicked; retrying"),
            }
        }
    }

    /// Requeues assigned and running jobs whose agent has been disconnected for longer than
    /// `grace`.
    ///
    /// # Errors
    /// [`StoreError`] from the store.
    pub fn requeue_expired_leases(&self, fleet: &Fleet, grace: Duration) -> Result<(), StoreError> {
        let mut leased = self.store.jobs_in_state(JobState::Assigned)?;
        leased.extend(self.store.jobs_in_state(JobState::Running)?);
        for job in leased {
            let Some(agent) = job.agent else { continue };
            if fleet.disconnected_for(agent).is_some_and(|d| d >= grace) {
                // Air-gapped agents never connect: their leases last until a bundle brings the
                // result (or an operator revokes the agent).
                if self.store.get_agent(agent)?.is_some_and(|a| a.offline && a.revoked_at_ms.is_none()) {
                    continue;
                }
                let reason = format!("lease lost: agent {agent} disconnected for more than {}s", grace.as_secs());
                if self.requeue(job.id, agent, &reason)? {
                    tracing::warn!(job_id = %job.id, agent_id = %agent, "requeued job of a disconnected agent");
                }
            }
        }
        Ok(())
    }

    /// Returns `job` to the queue if `agent` still holds its lease. Returns whether it did.
    ///
    /// # Errors
    /// [`StoreError`] from the store.
    pub fn requeue(&self, job: JobId, agent: AgentId, reason: &str) -> Result<bool, StoreError> {
        let mut changed = false;
        self.store.update_job(job, &mut |j| {
            changed = j.agent == Some(agent) && matches!(j.state, JobState::Assigned | JobState::Running);
            if changed {
                j.state = JobState::Queued;
                j.agent = None;
                j.progress = 0.0;
                j.frames_decoded = 0;
                j.error = Some(reason.to_owned());
                j.updated_at_ms = crate::now_ms();
            }
            changed
        })?;
        if changed {
            self.wake();
        }
        Ok(changed)
    }

    /// Leases queued jobs, oldest first, to connected agents that can run them.
    ///
    /// # Errors
    /// [`StoreError`] from the store.
    pub fn lease_queued_jobs(&self, fleet: &Fleet) -> Result<(), StoreError> {
        for job in self.store.jobs_in_state(JobState::Queued)? {
            let Some((agent, tx)) = fleet.reserve_for(&job) else { continue };
            let mut leased = false;
            self.store.update_job(job.id, &mut |j| {
                leased = j.state == JobState::Queued;
                if leased {
                    j.state = JobState::Assigned;
                    j.agent = Some(agent);
                    j.attempts += 1;
                    j.updated_at_ms = crate::now_ms();
                }
                leased
            })?;
            if !leased {
                fleet.release(agent, job.id);
                continue;
            }
            let assign =
                ControlMessage::Assign(Assignment { job_id: job.id, path: job.path.clone(), profile: job.profile });
            if tx.try_send(assign).is_err() {
                // The connection is going away or backed up: give the job back at once.
                fleet.release(agent, job.id);
                self.requeue(job.id, agent, "could not deliver the assignment")?;
            } else {
                tracing::info!(job_id = %job.id, agent_id = %agent, path = %job.path, "job leased");
            }
        }
        Ok(())
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
