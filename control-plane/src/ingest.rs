//! Applying agent messages to the store: the one path for messages that arrive over the link and
//! from offline bundles.
//!
//! Delivery contract (at-least-once in transport, exactly-once in effect):
//! * A message with `seq > 0` is applied, then `(agent, seq)` is recorded as the agent's applied
//!   watermark, then the store is flushed (fsync) — and only then does the caller acknowledge it.
//! * A message whose `seq` is not above the watermark is a redelivery: it is acknowledged again
//!   and not applied. Agents send their outbox in sequence order on every path, so a watermark is
//!   an exact dedupe key.
//! * Every effect is idempotent besides (a digest for a job that has one is not stored twice; state
//!   changes check the current state), so a crash between apply and watermark is harmless.
//! * Messages of one agent are ingested one at a time (a per-agent lock), so a reconnecting agent
//!   whose old connection is still draining cannot interleave two copies of its outbox.
//! * `seq == 0` marks messages the agent does not keep (heartbeats): applied, never acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gaffer_protocol::messages::{AgentId, AgentMessage, ControlMessage, JobId};
use gaffer_protocol::AgentEnvelope;

use crate::scheduler::{Fleet, JobRequest, SubmitError};
use crate::store::{HealthSample, JobOrigin, JobState, StoreError};
use crate::AppState;

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Applied and durable: acknowledge it.
    Applied,
    /// Seen before: acknowledge it again, nothing changed.
    Duplicate,
    /// Applied, not to be acknowledged (heartbeat).
    Ephemeral,
}

/// Why a message was not ingested.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store failed: nothing was acknowledged; redelivery may succeed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The message breaks the protocol (e.g. a second Hello); the sender is faulty.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// The ingest path. One per control plane.
pub struct Ingest {
    state: AppState,
    fleet: Arc<Fleet>,
    health_history_max: usize,
    agent_locks: Mutex<HashMap<AgentId, Arc<Mutex<()>>>>,
}

impl Ingest {
    /// An ingest path over `state`; `fleet` receives cancellations and lease releases.
    pub fn new(state: AppState, fleet: Arc<Fleet>, health_history_max: usize) -> Self {
        Self { state, fleet, health_history_max, agent_locks: Mutex::new(HashMap::new()) }
    }

    fn agent_lock(&self, agent: AgentId) -> Arc<Mutex<()>> {
        self.agent_locks.lock().unwrap_or_else(|p| p.into_inner()).entry(agent).or_default().clone()
    }

    /// Applies one message from `agent_id` (blocking: store calls and an fsync).
    ///
    /// # Errors
    /// [`IngestError::Store`] (retryable), [`IngestError::Protocol`].
    pub fn ingest(&self, agent_id: AgentId, env: AgentEnvelope) -> Result<Ingested, IngestError> {
        if env.agent_id != agent_id {
            return Err(IngestError::Protocol(format!(
                "message of agent {} on the identity of {agent_id}",
                env.agent_id
            )));
        }
        let store = &self.state.store;
        let seq = env.seq;
        if seq == 0 {
            return match env.body {
                AgentMessage::Heartbeat(health) => {
                    let now = crate::now_ms();
                    store.push_health(
                        agent_id,
                        &HealthSample { received_at_ms: now, health },
                        self.health_history_max,
                    )?;
                    store.update_agent(agent_id, &mut |a| a.last_seen_ms = Some(now))?;
                    Ok(Ingested::Ephemeral)
                }
                other => Err(IngestError::Protocol(format!("{} without a sequence number", other.kind()))),
            };
        }
        let lock = self.agent_lock(agent_id);
        let _one_at_a_time = lock.lock().unwrap_or_else(|p| p.into_inner());
        if store.last_applied_seq(agent_id)?.is_some_and(|last| seq <= last) {
            tracing::debug!(agent_id = %agent_id, seq, "redelivered message acknowledged again");
            return Ok(Ingested::Duplicate);
        }
        self.apply(agent_id, env.body)?;
        store.set_last_applied_seq(agent_id, seq)?;
        store.flush()?;
        Ok(Ingested::Applied)
    }

    fn apply(&self, agent_id: AgentId, msg: AgentMessage) -> Result<(), IngestError> {
        let now = crate::now_ms();
        let store = &self.state.store;
        store.update_agent(agent_id, &mut |a| a.last_seen_ms = Some(now))?;
        match msg {
            AgentMessage::Hello { .. } => return Err(IngestError::Protocol("Hello with a sequence number".into())),
            AgentMessage::Heartbeat(_) => return Err(IngestError::Protocol("heartbeat with a sequence number".into())),
            AgentMessage::JobAccepted { job_id } => {
                let mut ours = false;
                store.update_job(job_id, &mut |j| {
                    ours = claim(j, agent_id, now);
                    ours
                })?;
                if ours {
                    self.fleet.note_lease(agent_id, job_id);
                } else {
                    self.fleet.send(agent_id, ControlMessage::Cancel { job_id });
                }
            }
            AgentMessage::Progress { job_id, fraction, frames_decoded } => {
                store.update_job(job_id, &mut |j| {
                    let change = claim(j, agent_id, now);
                    if change {
                        j.progress = fraction.clamp(0.0, 1.0);
                        j.frames_decoded = frames_decoded;
                    }
                    change
                })?;
            }
            AgentMessage::Digest { job_id, digest } => {
                let first = store.put_digest(job_id, &digest)?;
                let mut finished = None;
                store.update_job(job_id, &mut |j| {
                    if j.state.is_terminal() {
                        return false;
                    }
                    finished = Some((j.agent, j.created_at_ms));
                    j.state = JobState::Succeeded;
                    j.agent = Some(agent_id);
                    j.progress = 1.0;
                    j.error = None;
                    j.frames_decoded = digest.shots.frames_decoded;
                    j.finished_at_ms = Some(now);
                    j.updated_at_ms = now;
                    true
                })?;
                if let Some((holder, created)) = finished {
                    self.state.metrics.job_finished("succeeded");
                    self.state.metrics.job_duration(now.saturating_sub(created) as f64 / 1000.0);
                    tracing::info!(job_id = %job_id, agent_id = %agent_id, shots = digest.shot_count(), "job succeeded");
                    if let Some(other) = holder.filter(|h| *h != agent_id) {
                        // Another agent holds the lease: its copy is redundant now.
                        self.fleet.send(other, ControlMessage::Cancel { job_id });
                        self.fleet.release(other, job_id);
                    }
                } else if !first {
                    tracing::debug!(job_id = %job_id, "digest for a finished job ignored");
                }
                self.release(agent_id, job_id);
            }
            AgentMessage::JobFailed { job_id, reason } | AgentMessage::JobRejected { job_id, reason } => {
                let reason = truncate(&reason, 4096);
                let mut failed = false;
                store.update_job(job_id, &mut |j| {
                    failed = j.agent == Some(agent_id) && !j.state.is_terminal();
                    if failed {
                        j.state = JobState::Failed;
                        j.error = Some(reason.clone());
                        j.finished_at_ms = Some(now);
                        j.updated_at_ms = now;
                    }
                    failed
                })?;
                if failed {
                    self.state.metrics.job_finished("failed");
                    tracing::warn!(job_id = %job_id, agent_id = %agent_id, %reason, "job failed");
                }
                self.release(agent_id, job_id);
            }
            AgentMessage::SubmitWatched { job_id, path, profile } => {
                let site = store.get_agent(agent_id)?.map(|a| a.site).unwrap_or_default();
                let req = JobRequest { path, site, agent: Some(agent_id), profile };
                match self.state.scheduler.submit(req, JobOrigin::WatchFolder { agent: agent_id }, Some(job_id)) {
                    Ok(job) => tracing::info!(job_id = %job.id, path = %job.path, "watch-folder job queued"),
                    Err(SubmitError::Store(e)) => return Err(e.into()),
                    // Invalid submissions can never succeed: log, and let the caller acknowledge them
                    // so the agent drops them.
                    Err(e) => tracing::warn!(job_id = %job_id, error = %e, "watch-folder submission refused"),
                }
            }
        }
        Ok(())
    }

    fn release(&self, agent_id: AgentId, job_id: JobId) {
        self.fleet.release(agent_id, job_id);
        self.state.scheduler.wake();
    }
}

/// Whether `agent` may report on `j`, making it running on `agent` if so: the agent holds the
/// lease, or the job is queued and pinned to that agent (a watch-folder job the agent started on
/// its own before the scheduler leased it back, or while the link was down).
fn claim(j: &mut crate::store::JobRecord, agent: AgentId, now: u64) -> bool {
    let holds = j.agent == Some(agent) && matches!(j.state, JobState::Assigned | JobState::Running);
    let pinned_waiting = j.state == JobState::Queued && j.pinned_agent == Some(agent);
    if !(holds || pinned_waiting) {
        return false;
    }
    if pinned_waiting {
        j.agent = Some(agent);
        j.attempts += 1;
    }
    j.state = JobState::Running;
    j.updated_at_ms = now;
    true
}

/// `s` cut to at most `max_bytes` on a character boundary.
pub fn truncate(s: &str, max_bytes: usize) -> String {
    if s.len() <= max_bytes {
        return s.to_owned();
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
