//! The job state machine: every change of a job's state goes through [`transition`].
//!
//! ```text
//!                 Lease (attempt n, lease id e+1, deadline = now + assign timeout)
//!   ┌────────┐ ─────────────────────────────────▶ ┌──────────┐  Accepted/Progress  ┌─────────┐
//!   │ queued │                                    │ assigned │ ──────────────────▶ │ running │
//!   └────────┘ ◀───────────────────────────────── └──────────┘                     └─────────┘
//!       ▲   attempt spent, attempts left:              │  Digest (holder, current lease)  │
//!       │   deadline passed, holder restarted          ▼                                  ▼
//!       │   without it, Failed{retryable}, Rejected  succeeded ◀──────────────────────────┘
//!       │                                            failed     (Failed{!retryable}, or attempts spent:
//!       │   Retry (operator)                                     "gave up after 3 attempts; last: …")
//!       └──────────────────────────────────────────  cancelled  (Cancel, from any non-final state)
//! ```
//!
//! * **Fencing.** Each lease has a lease id: the job's `lease_epoch`, incremented for every
//!   lease. An agent's report (accepted, progress, digest, failure) moves the job on only when it
//!   comes from the lease's holder with the current lease id; anything else is a [`Refusal`] and
//!   changes nothing. The one exception is [`LEASE_ID_NONE`]: a watch-folder job that its agent
//!   started on its own (offline or with the link down) reports under lease 0, accepted only from
//!   the agent the job is pinned to — no other agent can ever hold such a job's lease, so fencing
//!   between agents is intact.
//! * **Deadlines.** An assignment must be accepted by `lease.deadline_ms` (now + assign timeout);
//!   a running job's deadline is set when its holder's link goes (now + lease grace) and cleared
//!   when the holder comes back holding the lease. [`JobEvent::DeadlineCheck`] spends the attempt
//!   once the deadline has passed.
//! * **Attempts.** Every lease (and every self-started watch-folder run) is an attempt. A spent
//!   attempt requeues the job while `attempts < max_attempts`, else fails it with
//!   "gave up after N attempts; last: <reason>". An operator's retry starts a fresh budget.
//!
//! The function is pure — (job, event, now) in, new job and effects out — so the scheduler,
//! ingest, bundle import, the link and the simulation all share it, and it is property-tested.

use gaffer_protocol::messages::{AgentId, Assignment, LeaseId, LEASE_ID_NONE};

use crate::store::{JobOrigin, JobRecord, JobState, Lease, MediaCustody, StateChange, UnixMs, JOB_HISTORY_MAX};

/// The fencing check switched off, to show that the simulation catches it
/// (`cargo test -p gaffer-control --features planted-bug-no-lease-check --test simulation`).
/// Never enabled in a build that ships.
const PLANTED_BUG_NO_LEASE_CHECK: bool = cfg!(feature = "planted-bug-no-lease-check");

/// Deadlines and attempt budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPolicy {
    /// How long an agent has to accept an assignment, ms (`--assign-timeout-secs`, default 30 s).
    pub assign_timeout_ms: u64,
    /// How long a running job's holder may be gone before the job is requeued, ms
    /// (`--lease-grace-secs`, default 30 s: long enough for a network blip or an agent restart).
    pub lease_grace_ms: u64,
    /// Attempts before a job fails for good (`--max-attempts`, default 3).
    pub max_attempts: u32,
}

impl Default for JobPolicy {
    fn default() -> Self {
        Self { assign_timeout_ms: 30_000, lease_grace_ms: 30_000, max_attempts: 3 }
    }
}

/// What an agent says about a job (the job-related [`gaffer_protocol::AgentMessage`]s).
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// It started the job.
    Accepted,
    /// It is this far.
    Progress {
        /// Fraction done, clamped to 0..=1.
        fraction: f32,
        /// Frames decoded so far.
        frames_decoded: u64,
    },
    /// It finished with a digest (stored beside the job).
    Digest {
        /// Frames the digest covers.
        frames_decoded: u64,
    },
    /// The attempt failed.
    Failed {
        /// Why.
        reason: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// It would not take the assignment.
    Rejected {
        /// Why.
        reason: String,
    },
    /// The media file's chain of custody (hash, size, mtime); recorded on the job, idempotently.
    Custody {
        /// SHA-256 of the file, 64 lowercase hex characters (checked by the caller).
        sha256: String,
        /// Size of the file, bytes.
        size_bytes: u64,
        /// Modification time, Unix seconds.
        modified_unix_secs: Option<i64>,
    },
}

impl Report {
    fn name(&self) -> &'static str {
        match self {
            Report::Accepted => "acceptance",
            Report::Progress { .. } => "progress",
            Report::Digest { .. } => "digest",
            Report::Failed { .. } => "failure",
            Report::Rejected { .. } => "rejection",
            Report::Custody { .. } => "chain of custody",
        }
    }
}

/// Everything that can happen to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The scheduler (or a bundle import) leases the queued job to `agent`.
    Lease {
        /// The agent.
        agent: AgentId,
        /// An air-gapped agent: its lease has no deadline (it lasts until a bundle brings the
        /// result or the agent is revoked).
        offline: bool,
    },
    /// An agent reports on the job under `lease_id`.
    Report {
        /// The reporting agent (the authenticated identity).
        agent: AgentId,
        /// The lease id the report carries.
        lease_id: LeaseId,
        /// What it says.
        report: Report,
    },
    /// The link of `agent` went down.
    HolderDisconnected {
        /// The agent.
        agent: AgentId,
    },
    /// `agent` (re)connected; `held` is the lease id it says it holds the job under, None if it
    /// does not hold the job.
    HolderReconnected {
        /// The agent.
        agent: AgentId,
        /// The lease it holds the job under, if any.
        held: Option<LeaseId>,
    },
    /// `agent` was revoked: its lease is void at once (no grace); the attempt is spent and the job
    /// goes back to the queue for another agent.
    HolderRevoked {
        /// The agent.
        agent: AgentId,
    },
    /// `agent`'s drain deadline passed while it still holds the job: its lease is void, its copy
    /// is cancelled, and the job goes back to the queue for another agent with the attempt given
    /// back (the operator took the box away; the job did nothing wrong).
    HolderDrained {
        /// The agent.
        agent: AgentId,
    },
    /// Time passed: spend the attempt if the lease's deadline is past.
    DeadlineCheck,
    /// An operator cancels the job.
    Cancel {
        /// Who (user or token name), for the reason.
        by: String,
    },
    /// An operator retries a failed or cancelled job.
    Retry,
}

/// A side effect the caller carries out after committing the new record.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send this assignment to its agent.
    Assign(AgentId, Assignment),
    /// Tell `agent` to stop its copy of the job.
    Cancel {
        /// The agent.
        agent: AgentId,
        /// Why.
        reason: String,
    },
    /// The job reached a final state (count it once, in metrics).
    Finished(JobState),
    /// `agent` now holds the job's lease without an assignment: it started a watch-folder job on
    /// its own (count the slot it takes).
    Holds(AgentId),
    /// The job went back to the queue (wake the scheduler).
    Requeued {
        /// Why.
        reason: String,
    },
}

/// Why an event does not apply; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The reporting agent does not hold the job's lease: a report from an agent the job was never
    /// or is no longer leased to. Answer with a permanent error, count and audit it.
    #[error("job {job_id} is not leased to agent {agent}")]
    NotHolder {
        /// The job.
        job_id: uuid::Uuid,
        /// The reporting agent.
        agent: AgentId,
    },
    /// The holder reports under a lease that is not the current one (a stale attempt).
    #[error("lease {got} of job {job_id} is not its current lease {current}")]
    StaleLease {
        /// The job.
        job_id: uuid::Uuid,
        /// The lease id in the report.
        got: LeaseId,
        /// The current lease id (0: none).
        current: LeaseId,
    },
    /// The job already finished.
    #[error("job {job_id} already {state}")]
    Finished {
        /// The job.
        job_id: uuid::Uuid,
        /// Its final state.
        state: &'static str,
    },
    /// The event makes no sense in the job's state (cancel a finished job, retry a running one,
    /// lease a job that is not queued). The text says what to do.
    #[error("cannot {what} job {job_id}: it is {state}")]
    WrongState {
        /// The job.
        job_id: uuid::Uuid,
        /// What was tried.
        what: &'static str,
        /// The job's state.
        state: &'static str,
    },
}

/// The outcome of an event that applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The job after the event (equal to the input when `changed` is false).
    pub job: JobRecord,
    /// Whether the record changed (and must be written).
    pub changed: bool,
    /// What to do once it is committed.
    pub effects: Vec<Effect>,
}

/// Applies `event` to `job` at `now_ms` under `policy`.
///
/// # Errors
/// [`Refusal`] when the event does not apply; the job is unchanged.
pub fn transition(
    job: &JobRecord,
    event: &JobEvent,
    now_ms: UnixMs,
    policy: &JobPolicy,
) -> Result<Transition, Refusal> {
    let mut t = Transition { job: job.clone(), changed: false, effects: Vec::new() };
    let state_name = job.state.as_str();
    let wrong = |what: &'static str| Refusal::WrongState { job_id: job.id, what, state: state_name };
    match event {
        JobEvent::Lease { agent, offline } => {
            if job.state != JobState::Queued {
                return Err(wrong("lease"));
            }
            let j = &mut t.job;
            j.lease_epoch += 1;
            j.attempts += 1;
            j.state = JobState::Assigned;
            j.agent = Some(*agent);
            j.lease = Some(Lease {
                holder: *agent,
                lease_id: j.lease_epoch,
                deadline_ms: (!offline).then(|| now_ms.saturating_add(policy.assign_timeout_ms)),
            });
            j.progress = 0.0;
            j.frames_decoded = 0;
            j.updated_at_ms = now_ms;
            t.changed = true;
            t.effects.push(Effect::Assign(
                *agent,
                Assignment { job_id: j.id, lease_id: j.lease_epoch, path: j.path.clone(), profile: j.profile },
            ));
        }
        JobEvent::Report { agent, lease_id, report } => {
            apply_report(&mut t, *agent, *lease_id, report, now_ms, policy)?
        }
        JobEvent::HolderDisconnected { agent } => {
            if let Some(lease) = t.job.lease.as_mut().filter(|l| l.holder == *agent) {
                let grace = now_ms.saturating_add(policy.lease_grace_ms);
                let deadline = lease.deadline_ms.map_or(grace, |d| d.min(grace));
                if lease.deadline_ms != Some(deadline) {
                    lease.deadline_ms = Some(deadline);
                    t.changed = true;
                }
            }
        }
        JobEvent::HolderReconnected { agent, held } => {
            let Some(lease) = job.lease.filter(|l| l.holder == *agent) else { return Ok(t) };
            let self_started = *held == Some(LEASE_ID_NONE)
                && matches!(job.origin, JobOrigin::WatchFolder { agent: a } if a == *agent);
            if *held == Some(lease.lease_id) || self_started {
                if job.state == JobState::Running && lease.deadline_ms.is_some() {
                    t.job.lease = Some(Lease { deadline_ms: None, ..lease });
                    t.changed = true;
                }
            } else if held.is_none() && job.state == JobState::Assigned {
                // The assignment was lost on the way (the link went while it was in flight, e.g.
                // an agent reconnecting with a renewed certificate): send it again under the same
                // lease; its deadline still bounds how long the agent has to accept it.
                t.effects.push(Effect::Assign(
                    *agent,
                    Assignment {
                        job_id: job.id,
                        lease_id: lease.lease_id,
                        path: job.path.clone(),
                        profile: job.profile,
                    },
                ));
            } else {
                let reason = format!("agent {agent} came back without the job (attempt {})", job.attempts);
                spend_attempt(&mut t, reason, now_ms, policy);
            }
        }
        JobEvent::HolderRevoked { agent } => {
            if job.lease.is_some_and(|l| l.holder == *agent) {
                let reason = format!("agent {agent} was revoked");
                t.effects.push(Effect::Cancel { agent: *agent, reason: reason.clone() });
                spend_attempt(&mut t, reason, now_ms, policy);
            }
        }
        JobEvent::HolderDrained { agent } => {
            if job.lease.is_some_and(|l| l.holder == *agent) {
                let reason = format!("agent {agent} was drained: requeued at the drain deadline");
                t.effects.push(Effect::Cancel { agent: *agent, reason: reason.clone() });
                t.job.attempts = t.job.attempts.saturating_sub(1);
                requeue(&mut t, reason, now_ms);
            }
        }
        JobEvent::DeadlineCheck => {
            let Some(lease) = job.lease else { return Ok(t) };
            if lease.deadline_ms.is_some_and(|d| d <= now_ms) {
                let reason = if job.state == JobState::Assigned {
                    format!(
                        "agent {} did not accept the assignment within {} s",
                        lease.holder,
                        policy.assign_timeout_ms / 1000
                    )
                } else {
                    format!("lease lost: agent {} gone for more than {} s", lease.holder, policy.lease_grace_ms / 1000)
                };
                t.effects.push(Effect::Cancel { agent: lease.holder, reason: reason.clone() });
                spend_attempt(&mut t, reason, now_ms, policy);
            }
        }
        JobEvent::Cancel { by } => {
            if job.state.is_terminal() {
                return Err(wrong("cancel"));
            }
            let reason = format!("cancelled by {by}");
            if let Some(lease) = job.lease {
                t.effects.push(Effect::Cancel { agent: lease.holder, reason: reason.clone() });
            }
            finish(&mut t, JobState::Cancelled, Some(reason), now_ms);
        }
        JobEvent::Retry => {
            if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
                return Err(wrong("retry"));
            }
            let j = &mut t.job;
            j.state = JobState::Queued;
            j.agent = None;
            j.lease = None;
            j.attempts = 0;
            j.progress = 0.0;
            j.frames_decoded = 0;
            j.finished_at_ms = None;
            j.updated_at_ms = now_ms;
            t.changed = true;
            t.effects.push(Effect::Requeued { reason: "retried by an operator".into() });
        }
    }
    if t.job.state != job.state {
        record_state_change(&mut t, now_ms);
    }
    Ok(t)
}

/// Appends the job's current state to its history, dropping the oldest entries past [`JOB_HISTORY_MAX`].
fn record_state_change(t: &mut Transition, now_ms: UnixMs) {
    let requeued = t.effects.iter().find_map(|e| match e {
        Effect::Requeued { reason } => Some(reason.clone()),
        _ => None,
    });
    let j = &mut t.job;
    let reason = match j.state {
        JobState::Queued => requeued,
        JobState::Failed | JobState::Cancelled => j.error.clone(),
        _ => None,
    };
    j.history.push(StateChange { state: j.state, at_ms: now_ms, agent: j.agent, reason });
    let over = j.history.len().saturating_sub(JOB_HISTORY_MAX);
    j.history.drain(..over);
}

fn apply_report(
    t: &mut Transition,
    agent: AgentId,
    lease_id: LeaseId,
    report: &Report,
    now_ms: UnixMs,
    policy: &JobPolicy,
) -> Result<(), Refusal> {
    let job = t.job.clone();
    if job.state.is_terminal() {
        return Err(Refusal::Finished { job_id: job.id, state: job.state.as_str() });
    }
    let self_started =
        lease_id == LEASE_ID_NONE && matches!(job.origin, JobOrigin::WatchFolder { agent: a } if a == agent);
    match job.lease {
        Some(l) if l.holder != agent && !PLANTED_BUG_NO_LEASE_CHECK => {
            return Err(Refusal::NotHolder { job_id: job.id, agent })
        }
        Some(l) if l.lease_id != lease_id && !self_started && !PLANTED_BUG_NO_LEASE_CHECK => {
            return Err(Refusal::StaleLease { job_id: job.id, got: lease_id, current: l.lease_id })
        }
        Some(_) => {}
        None if self_started => {
            // A watch-folder job its agent started on its own: that run is an attempt under a
            // lease of its own.
            let j = &mut t.job;
            j.lease_epoch += 1;
            j.attempts += 1;
            j.agent = Some(agent);
            j.lease = Some(Lease { holder: agent, lease_id: j.lease_epoch, deadline_ms: None });
            j.state = JobState::Running;
            j.updated_at_ms = now_ms;
            t.changed = true;
            t.effects.push(Effect::Holds(agent));
        }
        None => return Err(Refusal::NotHolder { job_id: job.id, agent }),
    }
    let start_running = |t: &mut Transition| {
        if t.job.state == JobState::Assigned {
            t.job.state = JobState::Running;
            if let Some(l) = t.job.lease.as_mut() {
                l.deadline_ms = None;
            }
            t.job.updated_at_ms = now_ms;
            t.changed = true;
        }
    };
    match report {
        Report::Accepted => start_running(t),
        Report::Progress { fraction, frames_decoded } => {
            start_running(t);
            let fraction = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
            if t.job.progress != fraction || t.job.frames_decoded != *frames_decoded {
                t.job.progress = fraction;
                t.job.frames_decoded = *frames_decoded;
                t.job.updated_at_ms = now_ms;
                t.changed = true;
            }
        }
        Report::Digest { frames_decoded } => {
            t.job.frames_decoded = *frames_decoded;
            t.job.progress = 1.0;
            t.job.agent = Some(agent);
            finish(t, JobState::Succeeded, None, now_ms);
        }
        Report::Custody { sha256, size_bytes, modified_unix_secs } => {
            start_running(t);
            let same = t.job.custody.as_ref().is_some_and(|c| {
                c.agent == agent
                    && c.sha256 == *sha256
                    && c.size_bytes == *size_bytes
                    && c.modified_unix_secs == *modified_unix_secs
            });
            if !same {
                t.job.custody = Some(MediaCustody {
                    sha256: sha256.clone(),
                    size_bytes: *size_bytes,
                    modified_unix_secs: *modified_unix_secs,
                    agent,
                    recorded_at_ms: now_ms,
                });
                t.changed = true;
            }
        }
        Report::Failed { reason, retryable: false } => finish(t, JobState::Failed, Some(reason.clone()), now_ms),
        Report::Failed { reason, retryable: true } | Report::Rejected { reason } => {
            let what = if matches!(report, Report::Rejected { .. }) { "rejected by agent" } else { "attempt failed" };
            spend_attempt(t, format!("{what} {agent}: {reason}"), now_ms, policy);
        }
    }
    Ok(())
}

/// Ends the current attempt: back to the queue while attempts remain, else failed for good.
fn spend_attempt(t: &mut Transition, reason: String, now_ms: UnixMs, policy: &JobPolicy) {
    if t.job.attempts >= policy.max_attempts {
        let reason = format!("gave up after {} attempts; last: {reason}", t.job.attempts);
        finish(t, JobState::Failed, Some(reason), now_ms);
        return;
    }
    requeue(t, reason, now_ms);
}

/// Back to the queue: no holder, no lease, progress reset, `reason` as the last error.
fn requeue(t: &mut Transition, reason: String, now_ms: UnixMs) {
    let j = &mut t.job;
    j.state = JobState::Queued;
    j.agent = None;
    j.lease = None;
    j.progress = 0.0;
    j.frames_decoded = 0;
    j.error = Some(reason.clone());
    j.updated_at_ms = now_ms;
    t.changed = true;
    t.effects.push(Effect::Requeued { reason });
}

fn finish(t: &mut Transition, state: JobState, error: Option<String>, now_ms: UnixMs) {
    let j = &mut t.job;
    j.state = state;
    j.lease = None;
    j.error = error;
    j.finished_at_ms = Some(now_ms);
    j.updated_at_ms = now_ms;
    t.changed = true;
    t.effects.push(Effect::Finished(state));
}

/// The job named in a report, for refusal messages: "job X".
pub fn describe_refusal(r: &Refusal, report: &Report) -> String {
    format!("{} refused: {r}", report.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gaffer_protocol::messages::Profile;
    use proptest::prelude::*;

    use crate::store::Priority;

    fn queued(origin: JobOrigin) -> JobRecord {
        JobRecord {
            id: uuid::Uuid::from_u128(7),
            path: "/media/a.mov".into(),
            site: "s1".into(),
            profile: Profile::Shots,
            pinned_agent: None,
            origin,
            priority: Priority::Normal,
            state: JobState::Queued,
            agent: None,
            lease: None,
            lease_epoch: 0,
            progress: 0.0,
            frames_decoded: 0,
            error: None,
            attempts: 0,
            seq: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
            finished_at_ms: None,
            custody: None,
            submitted_by: None,
            history: Vec::new(),
        }
    }

    const A: AgentId = uuid::Uuid::from_u128(1);
    const B: AgentId = uuid::Uuid::from_u128(2);

    fn run(job: &JobRecord, e: JobEvent, now: u64) -> Result<Transition, Refusal> {
        transition(job, &e, now, &JobPolicy::default())
    }

    #[test]
    fn digest_only_from_the_current_holder_with_the_current_lease() -> Result<(), Refusal> {
        let j = run(&queued(JobOrigin::Api), JobEvent::Lease { agent: A, offline: false }, 10)?.job;
        let lease = j.lease.map(|l| l.lease_id).unwrap_or_default();
        let digest = Report::Digest { frames_decoded: 5 };
        let other = run(&j, JobEvent::Report { agent: B, lease_id: lease, report: digest.clone() }, 11);
        assert!(matches!(other, Err(Refusal::NotHolder { .. })), "{other:?}");
        let stale = run(&j, JobEvent::Report { agent: A, lease_id: lease + 1, report: digest.clone() }, 11);
        assert!(matches!(stale, Err(Refusal::StaleLease { .. })), "{stale:?}");
        let ok = run(&j, JobEvent::Report { agent: A, lease_id: lease, report: digest.clone() }, 12)?;
        assert_eq!(ok.job.state, JobState::Succeeded);
        assert_eq!(ok.effects, vec![Effect::Finished(JobState::Succeeded)]);
        let again = run(&ok.job, JobEvent::Report { agent: A, lease_id: lease, report: digest }, 13);
        assert!(matches!(again, Err(Refusal::Finished { .. })), "a second digest changes nothing: {again:?}");
        Ok(())
    }

    #[test]
    fn unaccepted_assignment_expires_and_attempts_run_out() -> Result<(), Refusal> {
        let policy = JobPolicy::default();
        let mut j = queued(JobOrigin::Api);
        let mut now = 0;
        for attempt in 1..=policy.max_attempts {
            j = run(&j, JobEvent::Lease { agent: A, offline: false }, now)?.job;
            assert_eq!(j.attempts, attempt);
            let early = run(&j, JobEvent::DeadlineCheck, now + policy.assign_timeout_ms - 1)?;
            assert!(!early.changed, "not before the deadline");
            now += policy.assign_timeout_ms;
            let t = run(&j, JobEvent::DeadlineCheck, now)?;
            assert!(t.effects.iter().any(|e| matches!(e, Effect::Cancel { agent, .. } if *agent == A)));
            j = t.job;
        }
        assert_eq!(j.state, JobState::Failed);
        let error = j.error.unwrap_or_default();
        assert!(error.starts_with("gave up after 3 attempts; last: agent"), "{error}");
        assert!(error.contains("did not accept the assignment within 30 s"), "{error}");
        Ok(())
    }

    #[test]
    fn running_lease_survives_a_reconnect_within_the_grace() -> Result<(), Refusal> {
        let j = run(&queued(JobOrigin::Api), JobEvent::Lease { agent: A, offline: false }, 0)?.job;
        let lease = j.lease.map(|l| l.lease_id).unwrap_or_default();
        let j = run(&j, JobEvent::Report { agent: A, lease_id: lease, report: Report::Accepted }, 1)?.job;
        assert_eq!(j.lease.and_then(|l| l.deadline_ms), None, "a running job of a connected holder has no deadline");
        let j = run(&j, JobEvent::HolderDisconnected { agent: A }, 100)?.job;
        assert_eq!(j.lease.and_then(|l| l.deadline_ms), Some(100 + 30_000));
        let j = run(&j, JobEvent::HolderReconnected { agent: A, held: Some(lease) }, 200)?.job;
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.lease.and_then(|l| l.deadline_ms), None);
        let gone = run(&j, JobEvent::HolderReconnected { agent: A, held: None }, 300)?.job;
        assert_eq!(gone.state, JobState::Queued, "came back without the job: requeued");
        assert!(gone.error.unwrap_or_default().contains("came back without the job"));
        Ok(())
    }

    /// An assignment lost in flight (the agent reconnected before it arrived, e.g. to switch to a
    /// renewed certificate) is sent again under the same lease, costing no attempt; its deadline
    /// still runs.
    #[test]
    fn an_assignment_the_agent_never_got_is_sent_again_on_reconnect() -> Result<(), Refusal> {
        let policy = JobPolicy::default();
        let j = run(&queued(JobOrigin::Api), JobEvent::Lease { agent: A, offline: false }, 0)?.job;
        let lease = j.lease.map(|l| l.lease_id).unwrap_or_default();
        let j = run(&j, JobEvent::HolderDisconnected { agent: A }, 100)?.job;
        let t = run(&j, JobEvent::HolderReconnected { agent: A, held: None }, 200)?;
        assert_eq!(t.job.state, JobState::Assigned);
        assert_eq!(t.job.attempts, 1, "no attempt spent");
        assert!(
            t.effects.iter().any(|e| matches!(e, Effect::Assign(a, asg) if *a == A && asg.lease_id == lease)),
            "{:?}",
            t.effects
        );
        let deadline = t.job.lease.and_then(|l| l.deadline_ms).unwrap_or_default();
        assert!(deadline > 0 && deadline <= policy.assign_timeout_ms, "the deadline still runs: {deadline}");
        let expired = run(&t.job, JobEvent::DeadlineCheck, deadline)?.job;
        assert_eq!(expired.state, JobState::Queued, "never accepted: requeued at the deadline");
        Ok(())
    }

    #[test]
    fn self_started_watch_folder_job_reports_under_lease_zero_only_from_its_agent() -> Result<(), Refusal> {
        let mut j = queued(JobOrigin::WatchFolder { agent: A });
        j.pinned_agent = Some(A);
        let report = Report::Digest { frames_decoded: 1 };
        let other = run(&j, JobEvent::Report { agent: B, lease_id: LEASE_ID_NONE, report: report.clone() }, 1);
        assert!(matches!(other, Err(Refusal::NotHolder { .. })), "{other:?}");
        let t = run(&j, JobEvent::Report { agent: A, lease_id: LEASE_ID_NONE, report }, 1)?;
        assert_eq!(t.job.state, JobState::Succeeded);
        assert_eq!(t.job.attempts, 1);
        Ok(())
    }

    #[test]
    fn cancel_and_retry() -> Result<(), Refusal> {
        let j = run(&queued(JobOrigin::Api), JobEvent::Lease { agent: A, offline: false }, 0)?.job;
        let t = run(&j, JobEvent::Cancel { by: "op".into() }, 5)?;
        assert_eq!(t.job.state, JobState::Cancelled);
        assert!(t.effects.contains(&Effect::Cancel { agent: A, reason: "cancelled by op".into() }));
        assert!(matches!(run(&t.job, JobEvent::Cancel { by: "op".into() }, 6), Err(Refusal::WrongState { .. })));
        let r = run(&t.job, JobEvent::Retry, 7)?.job;
        assert_eq!((r.state, r.attempts, r.lease), (JobState::Queued, 0, None));
        assert!(matches!(run(&r, JobEvent::Retry, 8), Err(Refusal::WrongState { .. })));
        let again = run(&r, JobEvent::Lease { agent: B, offline: false }, 9)?.job;
        assert!(again.lease.is_some_and(|l| l.lease_id > j.lease_epoch), "lease ids keep growing across retries");
        Ok(())
    }

    fn agent_strategy() -> impl Strategy<Value = AgentId> {
        prop_oneof![Just(A), Just(B)]
    }

    fn event_strategy() -> impl Strategy<Value = JobEvent> {
        let report = prop_oneof![
            Just(Report::Accepted),
            (0.0f32..1.0).prop_map(|f| Report::Progress { fraction: f, frames_decoded: 3 }),
            Just(Report::Digest { frames_decoded: 9 }),
            any::<bool>().prop_map(|r| Report::Failed { reason: "boom".into(), retryable: r }),
            Just(Report::Rejected { reason: "no".into() }),
        ];
        prop_oneof![
            (agent_strategy(), any::<bool>()).prop_map(|(agent, offline)| JobEvent::Lease { agent, offline }),
            (agent_strategy(), 0u64..6, report).prop_map(|(agent, lease_id, report)| JobEvent::Report {
                agent,
                lease_id,
                report
            }),
            agent_strategy().prop_map(|agent| JobEvent::HolderDisconnected { agent }),
            agent_strategy().prop_map(|agent| JobEvent::HolderRevoked { agent }),
            agent_strategy().prop_map(|agent| JobEvent::HolderDrained { agent }),
            (agent_strategy(), proptest::option::of(0u64..6))
                .prop_map(|(agent, held)| JobEvent::HolderReconnected { agent, held }),
            Just(JobEvent::DeadlineCheck),
            Just(JobEvent::Cancel { by: "op".into() }),
            Just(JobEvent::Retry),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// Whatever happens to a job, in any order: a lease exists exactly while it is assigned or
        /// running; lease ids only grow; attempts stay within the budget; a refused event changes
        /// nothing; the job reaches a final state at most once per operator retry; and no report
        /// from an agent that does not hold the current lease changes it.
        #[test]
        fn job_invariants_hold_under_any_event_sequence(
            events in proptest::collection::vec((event_strategy(), 0u64..40_000), 1..60),
            watch in any::<bool>(),
        ) {
            let policy = JobPolicy::default();
            let origin = if watch { JobOrigin::WatchFolder { agent: A } } else { JobOrigin::Api };
            let mut job = queued(origin);
            if watch { job.pinned_agent = Some(A); }
            let mut now = 0u64;
            let (mut finishes, mut retries) = (0u32, 0u32);
            for (event, dt) in events {
                now += dt;
                let before = job.clone();
                match transition(&job, &event, now, &policy) {
                    Err(_) => {}
                    Ok(t) => {
                        prop_assert_eq!(t.changed, t.job != before, "changed flag is exact");
                        if let JobEvent::Report { agent, lease_id, .. } = &event {
                            if t.changed && !(watch && *lease_id == LEASE_ID_NONE && *agent == A) {
                                let held = before.lease.is_some_and(|l| l.holder == *agent && l.lease_id == *lease_id);
                                prop_assert!(held, "a report changed the job without the current lease: {:?}", event);
                            }
                        }
                        finishes += t.effects.iter().filter(|e| matches!(e, Effect::Finished(_))).count() as u32;
                        if matches!(event, JobEvent::Retry) { retries += 1; }
                        job = t.job;
                    }
                }
                prop_assert_eq!(job.lease.is_some(), matches!(job.state, JobState::Assigned | JobState::Running));
                prop_assert!(job.lease_epoch >= before.lease_epoch);
                if let Some(l) = job.lease { prop_assert_eq!(l.lease_id, job.lease_epoch); }
                prop_assert!(job.attempts <= policy.max_attempts, "attempts {} over the budget", job.attempts);
                prop_assert_eq!(job.state.is_terminal(), job.finished_at_ms.is_some());
                if job.state == JobState::Failed { prop_assert!(job.error.is_some(), "a failed job says why"); }
                prop_assert!(finishes <= retries + 1, "finished {} times with {} retries", finishes, retries);
            }
        }
    }
}
