//! Applying agent messages: the one path for messages that arrive over the link and from offline
//! bundles.
//!
//! Delivery contract (at-least-once in transport, exactly-once in effect):
//! * A message with `seq > 0` is turned into a job event, run through [`crate::jobs::transition`],
//!   and committed with [`Store::commit_agent_message`] — its effect and the agent's sequence
//!   watermark in one transaction — then the store is flushed (fsync), and only then does the
//!   caller acknowledge it.
//! * A message whose `seq` is not above the watermark is a redelivery: acknowledged again, not
//!   applied. Agents send their outbox in sequence order on every path, so a watermark is an exact
//!   dedupe key.
//! * **Fencing**: a report from an agent that is not the current holder of the job's current
//!   lease, or about a job that does not exist, changes nothing but the watermark and an audit
//!   entry; it is counted (`gaffer_agent_reports_refused_total`) and answered with a permanent
//!   error ([`Ingested::Refused`]), so one compromised box cannot write results for jobs that are
//!   not its own.
//! * Messages of one agent are ingested one at a time (a per-agent lock), so a reconnecting agent
//!   whose old connection is still draining cannot interleave two copies of its outbox.
//! * GPU XID counts (`AgentMessage::GpuXidErrors`, protocol 6) commit only the watermark; once
//!   committed they replace the agent's counts on `/metrics` (in memory: the agent sends them again on
//!   every connection). A list over [`HEALTH_LIST_MAX`] GPUs or with a GPU index twice is refused
//!   like a malformed report.
//! * `seq == 0` marks messages the agent does not keep (heartbeats): stored (bounded), never
//!   acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use gaffer_protocol::health::{GpuXidCount, Health, HealthSource};
use gaffer_protocol::messages::{AgentId, AgentMessage, JobId};
use gaffer_protocol::AgentEnvelope;

use crate::jobs::{self, JobEvent, Refusal, Report};
use crate::scheduler::{JobRequest, SubmitError};
use crate::store::{
    AgentCommit, AuditRecord, CommitOutcome, HealthSample, JobOrigin, JobWrite, Priority, StoreError, UnixMs,
};
use crate::AppState;

/// What happened to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Applied and durable: acknowledge it.
    Applied,
    /// Seen before: acknowledge it again, nothing changed.
    Duplicate,
    /// Applied, not to be acknowledged (heartbeat).
    Ephemeral,
    /// Refused for good (fencing, unknown job, invalid submission); durable as refused: answer
    /// with a permanent error carrying this text, so the agent drops it.
    Refused(String),
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

/// Most health samples kept per agent (an hour at 5 s).
pub const HEALTH_HISTORY_MAX: usize = 720;
/// Most bytes of health samples kept per agent (the oldest go first).
pub const HEALTH_HISTORY_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Most disks and GPUs kept from one health report (a larger report is cut, not refused).
pub const HEALTH_LIST_MAX: usize = 64;
/// Most bytes kept of any string in a health report.
pub const HEALTH_STRING_BYTES_MAX: usize = 256;
/// How many times a commit is recomputed after a concurrent change of its job.
const COMMIT_CONFLICT_RETRIES_MAX: usize = 16;

/// The ingest path. One per control plane.
pub struct Ingest {
    state: AppState,
    agent_locks: Mutex<HashMap<AgentId, Arc<Mutex<()>>>>,
}

impl Ingest {
    /// An ingest path over `state` (its scheduler carries out effects).
    pub fn new(state: AppState) -> Self {
        Self { state, agent_locks: Mutex::new(HashMap::new()) }
    }

    fn agent_lock(&self, agent: AgentId) -> Arc<Mutex<()>> {
        self.agent_locks.lock().unwrap_or_else(|p| p.into_inner()).entry(agent).or_default().clone()
    }

    /// Applies one message from `agent_id` at `now_ms` (blocking: store calls and an fsync).
    ///
    /// # Errors
    /// [`IngestError::Store`] (retryable), [`IngestError::Protocol`].
    pub fn ingest(&self, agent_id: AgentId, env: AgentEnvelope, now_ms: UnixMs) -> Result<Ingested, IngestError> {
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
                    let sample = HealthSample { received_at_ms: now_ms, health: bounded_health(health) };
                    // One agent write for the sample and last_seen_ms; not flushed (see the store's
                    // durability of health).
                    store.record_heartbeat(agent_id, &sample, HEALTH_HISTORY_MAX, HEALTH_HISTORY_BYTES_MAX)?;
                    self.state.metrics.agents().health(agent_id, &sample);
                    if let Some(hooks) = self.state.scheduler.webhooks() {
                        hooks.health(agent_id, &sample.health, now_ms);
                    }
                    Ok(Ingested::Ephemeral)
                }
                other => Err(IngestError::Protocol(format!("{} without a sequence number", other.kind()))),
            };
        }
        let lock = self.agent_lock(agent_id);
        let _one_at_a_time = lock.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = self.apply(agent_id, seq, &env.body, now_ms)?;
        store.flush()?;
        Ok(outcome)
    }

    fn apply(&self, agent: AgentId, seq: u64, msg: &AgentMessage, now_ms: UnixMs) -> Result<Ingested, IngestError> {
        let store = &self.state.store;
        for _ in 0..COMMIT_CONFLICT_RETRIES_MAX {
            if store.last_applied_seq(agent)?.is_some_and(|last| seq <= last) {
                tracing::debug!(agent_id = %agent, seq, "redelivered message acknowledged again");
                return Ok(Ingested::Duplicate);
            }
            let mut commit =
                AgentCommit { agent, seq, now_ms, job: None, digest: None, new_job: None, audit: Vec::new() };
            let mut effects = None;
            let mut refused = None;
            match msg {
                AgentMessage::Hello { .. } => return Err(IngestError::Protocol("Hello with a sequence number".into())),
                AgentMessage::Heartbeat(_) => {
                    return Err(IngestError::Protocol("heartbeat with a sequence number".into()))
                }
                AgentMessage::SubmitWatched { job_id, path, profile } => {
                    let site = store.get_agent(agent)?.map(|a| a.site).unwrap_or_default();
                    let req = JobRequest {
                        path: path.clone(),
                        site,
                        agent: Some(agent),
                        profile: *profile,
                        priority: Priority::Normal,
                    };
                    match crate::scheduler::new_job(req, JobOrigin::WatchFolder { agent }, Some(*job_id), now_ms) {
                        Ok(job) => commit.new_job = Some(job),
                        Err(SubmitError::Store(e)) => return Err(e.into()),
                        Err(e) => {
                            let reason = format!("watch-folder submission refused: {e}");
                            commit.audit.push(self.audit(agent, Some(*job_id), "refuse_submission", &reason, now_ms));
                            refused = Some(reason);
                        }
                    }
                }
                AgentMessage::UpdateReport(r) => {
                    let detail = format!("rollout {} to {}: {}", r.rollout_id, r.version, describe_update(&r.outcome));
                    commit.audit.push(self.audit(agent, None, "update_report", &detail, now_ms));
                }
                AgentMessage::Custody { job_id, sha256, .. } if !is_sha256_hex(sha256) => {
                    let reason = format!("custody of job {job_id} refused: sha256 is not 64 lowercase hex characters");
                    self.state.metrics.report_refused("malformed");
                    commit.audit.push(self.audit(agent, Some(*job_id), "refuse_report", &reason, now_ms));
                    refused = Some(reason);
                }
                AgentMessage::GpuXidErrors { counts } => {
                    // Nothing but the watermark is stored: the counts go to `/metrics` once committed.
                    if let Err(reason) = check_xid_counts(counts) {
                        self.state.metrics.report_refused("malformed");
                        commit.audit.push(self.audit(agent, None, "refuse_report", &reason, now_ms));
                        refused = Some(reason);
                    }
                }
                _ => {
                    let (job_id, lease_id, report) = report_of(msg)?;
                    let digest = match msg {
                        AgentMessage::Digest { digest, .. } => Some(digest),
                        _ => None,
                    };
                    match store.get_job(job_id)? {
                        None => {
                            let reason = format!("{} for unknown job {job_id} refused", msg.kind());
                            self.state.metrics.report_refused("unknown_job");
                            commit.audit.push(self.audit(agent, Some(job_id), "refuse_report", &reason, now_ms));
                            refused = Some(reason);
                        }
                        Some(before) => {
                            let event = JobEvent::Report { agent, lease_id, report: report.clone() };
                            match jobs::transition(&before, &event, now_ms, self.state.scheduler.policy()) {
                                Ok(t) => {
                                    if let Some(d) = digest.filter(|_| t.changed) {
                                        commit.digest = Some((job_id, (**d).clone()));
                                    }
                                    if t.changed {
                                        effects = Some((job_id, t.effects, before.created_at_ms, before.profile));
                                        commit.job = Some(JobWrite { before, after: t.job });
                                    }
                                }
                                Err(refusal) => {
                                    let reason = jobs::describe_refusal(&refusal, &report);
                                    self.state.metrics.report_refused(refusal_label(&refusal));
                                    commit.audit.push(self.audit(
                                        agent,
                                        Some(job_id),
                                        "refuse_report",
                                        &reason,
                                        now_ms,
                                    ));
                                    refused = Some(reason);
                                }
                            }
                        }
                    }
                }
            }
            match store.commit_agent_message(&commit)? {
                CommitOutcome::Duplicate => return Ok(Ingested::Duplicate),
                CommitOutcome::Conflict => continue,
                CommitOutcome::Committed => {}
            }
            if let Some(reason) = refused {
                tracing::warn!(agent_id = %agent, seq, %reason, "agent report refused");
                return Ok(Ingested::Refused(reason));
            }
            if let AgentMessage::UpdateReport(r) = msg {
                tracing::info!(agent_id = %agent, rollout_id = r.rollout_id, version = %r.version,
                    outcome = %describe_update(&r.outcome), "update report");
                if let Some(rollouts) = &self.state.rollouts {
                    if let Err(e) = rollouts.on_report(agent, r, now_ms) {
                        // Recorded (audit, sequence); the rollout learns the agent's version from
                        // its next Hello.
                        tracing::error!(agent_id = %agent, error = %e, "could not apply the update report to its rollout");
                    }
                }
            }
            if let AgentMessage::GpuXidErrors { counts } = msg {
                let errors: u64 = counts.iter().map(|c| c.errors).fold(0, u64::saturating_add);
                tracing::debug!(agent_id = %agent, seq, gpus = counts.len(), errors, "GPU XID counts");
                self.state.metrics.agents().xid_errors(agent, counts);
            }
            if let Some(job) = &commit.new_job {
                tracing::info!(job_id = %job.id, path = %job.path, "watch-folder job queued");
                self.state.scheduler.wake();
            }
            if let Some((job_id, effects, created, profile)) = effects {
                for e in &effects {
                    if let jobs::Effect::Finished(state) = e {
                        tracing::info!(job_id = %job_id, agent_id = %agent, state = state.as_str(), "job finished");
                    }
                }
                self.state.scheduler.carry_out(job_id, &effects, created, profile, now_ms);
            }
            return Ok(Ingested::Applied);
        }
        Err(IngestError::Store(StoreError::Io(format!(
            "job kept changing under message {seq} of agent {agent}; will retry"
        ))))
    }

    fn audit(&self, agent: AgentId, job: Option<JobId>, action: &str, detail: &str, now_ms: UnixMs) -> AuditRecord {
        AuditRecord {
            at_ms: now_ms,
            who: format!("agent {agent}"),
            action: action.to_owned(),
            agent: Some(agent),
            site: None,
            detail: truncate(detail, 1024),
            job,
        }
    }
}

/// An update outcome in words, for the audit log.
fn describe_update(outcome: &gaffer_protocol::messages::UpdateOutcome) -> String {
    use gaffer_protocol::messages::UpdateOutcome;
    match outcome {
        UpdateOutcome::Staged => "staged".to_owned(),
        UpdateOutcome::Healthy => "healthy".to_owned(),
        UpdateOutcome::Failed { reason, rolled_back, running_version } => format!(
            "failed{}: {}; running {running_version}",
            if *rolled_back { " and rolled back" } else { "" },
            truncate(reason, 900)
        ),
    }
}

fn report_of(msg: &AgentMessage) -> Result<(JobId, u64, Report), IngestError> {
    Ok(match msg {
        AgentMessage::JobAccepted { job_id, lease_id } => (*job_id, *lease_id, Report::Accepted),
        AgentMessage::Progress { job_id, lease_id, fraction, frames_decoded } => {
            (*job_id, *lease_id, Report::Progress { fraction: *fraction, frames_decoded: *frames_decoded })
        }
        AgentMessage::Digest { job_id, lease_id, digest } => {
            (*job_id, *lease_id, Report::Digest { frames_decoded: digest.shots.frames_decoded })
        }
        AgentMessage::JobFailed { job_id, lease_id, reason, retryable } => {
            (*job_id, *lease_id, Report::Failed { reason: truncate(reason, 4096), retryable: *retryable })
        }
        AgentMessage::JobRejected { job_id, lease_id, reason } => {
            (*job_id, *lease_id, Report::Rejected { reason: truncate(reason, 4096) })
        }
        AgentMessage::Custody { job_id, lease_id, sha256, size_bytes, modified_unix_secs } => {
            if !is_sha256_hex(sha256) {
                return Err(IngestError::Protocol(format!(
                    "custody of job {job_id}: sha256 is not 64 lowercase hex characters"
                )));
            }
            let report = Report::Custody {
                sha256: sha256.clone(),
                size_bytes: *size_bytes,
                modified_unix_secs: *modified_unix_secs,
            };
            (*job_id, *lease_id, report)
        }
        other => return Err(IngestError::Protocol(format!("{} is not a job report", other.kind()))),
    })
}

/// Checks an agent's XID counts before they reach `/metrics`: at most [`HEALTH_LIST_MAX`] GPUs, each
/// NVML index once (two entries for one index would render one series twice).
///
/// # Errors
/// The refusal's reason, for the agent and the audit log.
fn check_xid_counts(counts: &[GpuXidCount]) -> Result<(), String> {
    if counts.len() > HEALTH_LIST_MAX {
        return Err(format!("GPU XID counts refused: {} GPUs, at most {HEALTH_LIST_MAX}", counts.len()));
    }
    let mut seen = HashSet::with_capacity(counts.len());
    match counts.iter().find(|c| !seen.insert(c.index)) {
        Some(c) => Err(format!("GPU XID counts refused: GPU index {} listed twice", c.index)),
        None => Ok(()),
    }
}

/// Whether `s` is a SHA-256 as the protocol sends it: 64 lowercase hex characters.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn refusal_label(r: &Refusal) -> &'static str {
    match r {
        Refusal::NotHolder { .. } => "not_holder",
        Refusal::StaleLease { .. } => "stale_lease",
        Refusal::Finished { .. } => "finished",
        Refusal::WrongState { .. } => "wrong_state",
    }
}

/// `health` with every list and string cut to the limits above, so one report cannot make the
/// store keep megabytes per agent.
pub fn bounded_health(mut health: Health) -> Health {
    health.disks.truncate(HEALTH_LIST_MAX);
    health.gpus.truncate(HEALTH_LIST_MAX);
    for d in &mut health.disks {
        d.path = truncate(&d.path, HEALTH_STRING_BYTES_MAX);
    }
    for g in &mut health.gpus {
        g.name = truncate(&g.name, HEALTH_STRING_BYTES_MAX);
    }
    if let Some(p) = health.inference.as_mut() {
        p.provider = truncate(&p.provider, HEALTH_STRING_BYTES_MAX);
        p.runtime_version = truncate(&p.runtime_version, HEALTH_STRING_BYTES_MAX);
        p.note = truncate(&p.note, HEALTH_STRING_BYTES_MAX * 4);
    }
    health.source = match health.source {
        HealthSource::CpuOnly { reason } => {
            HealthSource::CpuOnly { reason: truncate(&reason, HEALTH_STRING_BYTES_MAX) }
        }
        HealthSource::Nvml { driver_version } => {
            HealthSource::Nvml { driver_version: truncate(&driver_version, HEALTH_STRING_BYTES_MAX) }
        }
    };
    health
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SchedulerConfig;
    use crate::store::sled_store::SledStore;
    use crate::store::AgentRecord;
    use gaffer_protocol::health::GpuInfo;
    use gaffer_protocol::messages::Capabilities;

    fn xid(counts: &[(u32, u64, Option<u64>)]) -> AgentMessage {
        AgentMessage::GpuXidErrors {
            counts: counts.iter().map(|&(index, errors, last_xid)| GpuXidCount { index, errors, last_xid }).collect(),
        }
    }

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo { index, name: "NVIDIA H200".into(), uuid: format!("GPU-{index}"), memory_total_bytes: 141 << 30 }
    }

    /// GPU XID counts from the link or a bundle end up on `/metrics` as `gaffer_gpu_xid_errors_total`
    /// with the GPU's name and UUID from the Hello; a redelivery changes nothing, an oversized list or
    /// one naming a GPU twice is refused (audited, counted) and leaves the last good counts in place.
    #[test]
    fn xid_counts_reach_metrics_and_bad_lists_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn crate::store::Store> = Arc::new(SledStore::open(dir.path())?);
        let state = AppState::new(store.clone(), SchedulerConfig::default());
        let agent_id = uuid::Uuid::from_u128(7);
        let mut rec = AgentRecord::new(agent_id, "stage-a", "box-0", 0);
        rec.capabilities = Some(Capabilities {
            gpus: vec![gpu(0), gpu(1)],
            volumes: Vec::new(),
            watch_roots: Vec::new(),
            job_slots: 1,
            profiles: Vec::new(),
            models: Vec::new(),
        });
        store.insert_agent(&rec)?;
        state.metrics.agents().agent_seen(&rec);
        let ingest = Ingest::new(state.clone());
        let env = |seq, body| AgentEnvelope { agent_id, seq, body };
        let series = |index: u32, n: u64| {
            format!(
                "gaffer_gpu_xid_errors_total{{agent_id=\"{agent_id}\",agent_name=\"box-0\",site=\"stage-a\",\
                 gpu=\"{index}\",gpu_name=\"NVIDIA H200\",gpu_uuid=\"GPU-{index}\"}} {n}\n"
            )
        };

        let now_ms = 1_700_000_000_000;
        assert_eq!(ingest.ingest(agent_id, env(1, xid(&[(0, 0, None), (1, 3, Some(79))])), now_ms)?, Ingested::Applied);
        let text = state.metrics.encode(store.as_ref());
        assert!(text.contains(&series(0, 0)), "{text}");
        assert!(text.contains(&series(1, 3)), "{text}");

        let redelivered = ingest.ingest(agent_id, env(1, xid(&[(0, 9, Some(13)), (1, 9, Some(13))])), now_ms)?;
        assert_eq!(redelivered, Ingested::Duplicate);
        let too_many: Vec<_> = (0..=HEALTH_LIST_MAX as u32).map(|i| (i, 1, Some(48))).collect();
        let Ingested::Refused(reason) = ingest.ingest(agent_id, env(2, xid(&too_many)), now_ms)? else {
            anyhow::bail!("an oversized list was not refused");
        };
        assert!(reason.contains("65 GPUs, at most 64"), "{reason}");
        let Ingested::Refused(reason) = ingest.ingest(agent_id, env(3, xid(&[(1, 4, None), (1, 5, None)])), now_ms)?
        else {
            anyhow::bail!("a GPU listed twice was not refused");
        };
        assert!(reason.contains("index 1 listed twice"), "{reason}");
        let text = state.metrics.encode(store.as_ref());
        assert!(text.contains(&series(1, 3)), "the refused and redelivered lists changed nothing:\n{text}");
        assert!(!text.contains("gpu=\"64\""), "{text}");
        assert!(text.contains("gaffer_agent_reports_refused_total{reason=\"malformed\"} 2\n"), "{text}");
        let refusals = store.list_audit(10)?.into_iter().filter(|a| a.action == "refuse_report").count();
        assert_eq!(refusals, 2);

        assert_eq!(
            ingest.ingest(agent_id, env(4, xid(&[(0, 1, Some(79)), (1, 3, Some(79))])), now_ms)?,
            Ingested::Applied
        );
        let text = state.metrics.encode(store.as_ref());
        assert!(text.contains(&series(0, 1)), "{text}");
        assert_eq!(store.last_applied_seq(agent_id)?, Some(4));
        Ok(())
    }
}
