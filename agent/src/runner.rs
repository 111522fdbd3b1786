//! Runs jobs: checks them against this agent's volumes, keeps them in a durable local queue, starts
//! them as slots free up, analyzes each in its own worker process ([`crate::worker`]), and puts
//! acceptance, progress and the result into the outbox. Every message carries the lease id of the
//! job's [`Assignment`] ([`gaffer_protocol::messages::LEASE_ID_NONE`] for a watch-folder job the
//! agent started on its own).
//!
//! Process model: one tokio task per running job supervises one worker process (`gaffer-agent
//! worker`, found at [`RunnerConfig::worker_exe`]); at most [`RunnerConfig::job_slots`] run at
//! once. The worker decodes and analyzes; the task enforces the limits (wall time
//! [`RunnerConfig::job_timeout`], resident memory [`RunnerConfig::job_memory_max_bytes`]; defaults
//! and rules in [`crate::worker`]) and kills the worker on [`Runner::cancel`].
//!
//! A job that fails (bad media, an unreadable file, a worker that crashes, is killed or passes a
//! limit) becomes a `JobFailed` message with the reason; it never takes the agent or other jobs
//! down.
//!
//! No result is dropped: the job's result (`Digest` or `JobFailed`) is pushed into the outbox with
//! retries (100 ms back-off doubling to 30 s, until it works) while the job stays in the `jobs`
//! tree, so a restart runs it again; only once the result is durable does the job leave the tree.
//! A result that can never be stored (a digest larger than a frame may be,
//! [`RunnerConfig::frame_bytes_max`]) is replaced by a `JobFailed` saying so ("digest is 9.1 MiB,
//! over the 8 MiB frame limit"). `JobAccepted` and `JobRejected` are retried the same way;
//! progress is best effort (the next one or the result supersedes it).
//!
//! Crash recovery: every job the agent holds is in the sled tree `jobs` until its result is in the
//! outbox. After a restart (SIGKILL, power loss) the agent finds them there and runs them again
//! from the start, and reports them with their lease ids in its Hello so the control plane keeps
//! the leases that are still current. A result that was already in the outbox before the crash
//! may be sent twice; the control plane keeps the first.
//!
//! sled key layout (database `DATA_DIR/state`):
//!
//! | tree         | key                                 | value                                    |
//! |--------------|-------------------------------------|------------------------------------------|
//! | `jobs`       | enqueue order (u64 BE) ‖ job uuid   | the assignment (with its lease id), JSON |
//! | `watch_seen` | path ‖ NUL ‖ size BE ‖ NUL ‖ mtime BE | job uuid (16 bytes)                    |
//!
//! `jobs` records written before lease ids existed (no `lease_id`) are read with lease id 0.
//! The watch-folder ledger makes sure each version of a watched file is submitted once, across
//! restarts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::codec::{encode_frame, CodecError, FRAME_BYTES_MAX_DEFAULT};
use gaffer_protocol::messages::{AgentMessage, Assignment, HeldJob, JobId, LeaseId, Profile, LEASE_ID_NONE};
use tracing::Instrument as _;

use crate::analysis::full::{FullOptions, Models};
use crate::outbox::Outbox;
use crate::watch::WatchedFile;
use crate::worker::{self, WorkerControl, WorkerJob, WorkerLimits, WorkerOutcome};
use crate::AgentError;

/// First wait before retrying a failed outbox push: 100 ms (doubling up to [`PUSH_RETRY_MAX`]).
pub const PUSH_RETRY_FIRST: Duration = Duration::from_millis(100);

/// Longest wait between two retries of a failed outbox push: 30 s.
pub const PUSH_RETRY_MAX: Duration = Duration::from_secs(30);

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Canonical directories jobs may read from (`--volume` and `--watch`).
    pub volumes: Vec<PathBuf>,
    /// Jobs run at once (one worker process each). Default 1.
    pub job_slots: u32,
    /// Shortest interval between two progress messages of one job. Default 2 s.
    pub progress_interval: Duration,
    /// Most jobs held (queued + running). Default 10 000.
    pub jobs_held_max: usize,
    /// ONNX Runtime and verified models for `full` jobs (None: this agent runs `shots` only,
    /// and a `full` job fails with "models are not available"). The workers load their own
    /// runtime from the same data directory with the same provider. Default None.
    pub models: Option<Arc<Models>>,
    /// Sampling and queue options of `full` jobs. Default [`FullOptions::default`].
    pub full: FullOptions,
    /// The `gaffer-agent` executable that runs the analysis workers (`EXE worker`). Default
    /// [`default_worker_exe`]: this process's own binary. Tests running inside a test harness
    /// point it at the real binary (`env!("CARGO_BIN_EXE_gaffer-agent")`).
    pub worker_exe: PathBuf,
    /// Wall-time limit of one job (`--job-timeout`). Default None: `max(10 min, 4 × the media's
    /// duration)`, 60 min for media of unknown duration (see [`worker::job_timeout`]).
    pub job_timeout: Option<Duration>,
    /// Resident-memory limit of one worker, bytes (`--job-memory-max`). Default None:
    /// `max(1 GiB, 75 % of the box's memory / job_slots)` (see [`worker::default_job_memory_max`]).
    pub job_memory_max_bytes: Option<u64>,
    /// Largest message the outbox can store, bytes (the link's frame limit). A digest over it
    /// fails its job with the sizes. Default [`FRAME_BYTES_MAX_DEFAULT`] (8 MiB).
    pub frame_bytes_max: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            volumes: Vec::new(),
            job_slots: 1,
            progress_interval: Duration::from_secs(2),
            jobs_held_max: 10_000,
            models: None,
            full: FullOptions::default(),
            worker_exe: default_worker_exe(),
            job_timeout: None,
            job_memory_max_bytes: None,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        }
    }
}

/// This process's own executable, for analysis workers: `/proc/self/exe`, which runs the very
/// binary the agent runs even after an upgrade replaced the file on disk (so agent and workers
/// always speak the same worker protocol); [`std::env::current_exe`] where `/proc` is missing.
pub fn default_worker_exe() -> PathBuf {
    let own = Path::new("/proc/self/exe");
    if own.exists() {
        return own.to_path_buf();
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("gaffer-agent"))
}

struct Held {
    key: Vec<u8>,
    assignment: Assignment,
    /// Set while running.
    worker: Option<Arc<WorkerControl>>,
    /// The attempt is over (its worker ended) and its result is being recorded: a newer lease of
    /// the same job is a new attempt, not this one (the control plane may requeue and re-lease the
    /// job the moment the failure reaches it, before this entry is gone).
    finishing: bool,
}

/// A `jobs` record written before assignments carried lease ids.
#[derive(serde::Deserialize)]
struct LegacyAssignment {
    job_id: JobId,
    path: String,
    profile: Profile,
}

fn decode_job_record(v: &[u8]) -> Result<Assignment, serde_json::Error> {
    serde_json::from_slice::<Assignment>(v).or_else(|e| {
        serde_json::from_slice::<LegacyAssignment>(v)
            .map(|l| Assignment { job_id: l.job_id, lease_id: LEASE_ID_NONE, path: l.path, profile: l.profile })
            .map_err(|_| e)
    })
}

/// The job runner.
pub struct Runner {
    cfg: RunnerConfig,
    /// Limits of jobs started from now on (see [`Runner::set_job_limits`]).
    limits: Mutex<WorkerLimits>,
    outbox: Outbox,
    tree: sled::Tree,
    db: sled::Db,
    held: Mutex<Vec<Held>>,
    /// Why new leased jobs are rejected, when they are (an update waiting for the agent to be idle).
    hold: Mutex<Option<String>>,
}

impl Runner {
    /// A runner that keeps its queue in `db` and reports through `outbox`. Jobs left in the queue
    /// by an earlier run of the agent are loaded to run again; call [`Runner::dispatch`] to start.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn new(cfg: RunnerConfig, outbox: Outbox, db: &sled::Db) -> Result<Arc<Self>, AgentError> {
        let tree = db.open_tree("jobs")?;
        let mut held = Vec::new();
        for item in tree.iter() {
            let (k, v) = item?;
            match decode_job_record(&v) {
                Ok(assignment) => held.push(Held { key: k.to_vec(), assignment, worker: None, finishing: false }),
                Err(e) => {
                    tracing::error!(error = %e, "dropping an unreadable job record");
                    tree.remove(k)?;
                }
            }
        }
        if !held.is_empty() {
            tracing::info!(jobs = held.len(), "resuming jobs held before the agent stopped");
        }
        let limits = Self::limits_for(&cfg, cfg.job_timeout, cfg.job_memory_max_bytes);
        Ok(Arc::new(Self {
            cfg,
            limits: Mutex::new(limits),
            outbox,
            tree,
            db: db.clone(),
            held: Mutex::new(held),
            hold: Mutex::new(None),
        }))
    }

    fn limits_for(cfg: &RunnerConfig, timeout: Option<Duration>, memory_max_bytes: Option<u64>) -> WorkerLimits {
        let limits = WorkerLimits {
            timeout,
            memory_max_bytes: memory_max_bytes.unwrap_or_else(|| worker::default_job_memory_max(cfg.job_slots)),
        };
        tracing::info!(
            memory_max = %worker::format_bytes(limits.memory_max_bytes),
            timeout = %timeout.map_or_else(|| "max(10 min, 4 × media duration)".to_string(), worker::format_duration),
            slots = cfg.job_slots,
            "analysis worker limits"
        );
        limits
    }

    /// Rejects new jobs leased by the control plane with `reason` (`Some`), or takes them again
    /// (`None`). Jobs already held, and watch-folder jobs (this box's own), are not affected: an
    /// agent about to restart into an update finishes what it has.
    pub fn set_hold(&self, reason: Option<String>) {
        *self.hold.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Changes the wall-time and memory limits (as [`RunnerConfig::job_timeout`] and
    /// [`RunnerConfig::job_memory_max_bytes`], None meaning the default) of jobs started from now
    /// on; running jobs keep the limits they started with.
    pub fn set_job_limits(&self, timeout: Option<Duration>, memory_max_bytes: Option<u64>) {
        let limits = Self::limits_for(&self.cfg, timeout, memory_max_bytes);
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    /// The limits jobs started now get.
    pub fn job_limits(&self) -> WorkerLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every job the agent holds (running or queued) with its lease id: the leases to keep.
    pub fn running_jobs(&self) -> Vec<HeldJob> {
        self.held().iter().map(|h| HeldJob { job_id: h.assignment.job_id, lease_id: h.assignment.lease_id }).collect()
    }

    /// Number of jobs running now.
    pub fn jobs_running(&self) -> u32 {
        self.held().iter().filter(|h| h.worker.is_some()).count() as u32
    }

    /// Number of jobs waiting for a slot.
    pub fn jobs_queued(&self) -> u32 {
        self.held().iter().filter(|h| h.worker.is_none()).count() as u32
    }

    /// Process ids of the analysis workers running now, by job (for diagnostics and tests).
    pub fn worker_pids(&self) -> Vec<(JobId, u32)> {
        self.held()
            .iter()
            .filter_map(|h| h.worker.as_ref().and_then(|w| w.pid()).map(|pid| (h.assignment.job_id, pid)))
            .collect()
    }

    /// Configured slots.
    pub fn job_slots(&self) -> u32 {
        self.cfg.job_slots
    }

    /// The canonical volumes.
    pub fn volumes(&self) -> &[PathBuf] {
        &self.cfg.volumes
    }

    /// The outbox results go to.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Checks that `path` is under one of the volumes, resolving symlinks and `..` so a link
    /// inside a volume cannot point outside it. A path that does not exist passes if it is
    /// lexically under a volume (the analysis then fails it with the precise reason). The worker
    /// checks again on the file it opens.
    ///
    /// # Errors
    /// A reason for the operator.
    pub fn check_path(&self, path: &str) -> Result<PathBuf, String> {
        let outside = || {
            format!(
                "{path} is not under this agent's volumes ({}); start the agent with --volume for its directory",
                self.cfg.volumes.iter().map(|v| v.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        };
        match Path::new(path).canonicalize() {
            Ok(c) if self.cfg.volumes.iter().any(|v| c.starts_with(v)) => Ok(c),
            Ok(_) => Err(outside()),
            Err(_)
                if !path.split('/').any(|c| c == "..")
                    && self.cfg.volumes.iter().any(|v| Path::new(path).starts_with(v)) =>
            {
                Ok(PathBuf::from(path))
            }
            Err(e) => Err(format!("cannot open {path}: {e}")),
        }
    }

    /// Best effort (progress): one try, logged when it fails.
    fn push_once(&self, msg: &AgentMessage) {
        if let Err(e) = off_async_worker(|| self.outbox.push(msg)) {
            tracing::warn!(error = %e, kind = msg.kind(), "could not write to the outbox; skipping this update");
        }
    }

    /// Pushes `msg` until it is durable in the outbox, waiting [`PUSH_RETRY_FIRST`] doubling to
    /// [`PUSH_RETRY_MAX`] between tries. Returns the reason when the message can never be stored
    /// (it is too large for a frame).
    async fn push_durably(&self, msg: &AgentMessage) -> Result<u64, String> {
        let mut wait = PUSH_RETRY_FIRST;
        let mut attempt = 1u32;
        loop {
            match off_async_worker(|| self.outbox.push(msg)) {
                Ok(seq) => {
                    if attempt > 1 {
                        tracing::info!(kind = msg.kind(), attempt, "outbox write succeeded after retrying");
                    }
                    return Ok(seq);
                }
                Err(AgentError::Protocol(reason)) => return Err(reason),
                Err(e) => {
                    tracing::error!(error = %e, kind = msg.kind(), attempt, retry_in_ms = wait.as_millis() as u64,
                        "could not write to the outbox; retrying (the job stays held)");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(PUSH_RETRY_MAX);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Pushes `msg` now, or keeps retrying in the background if that fails (for callers that
    /// cannot wait: taking assignments).
    fn push_or_retry_later(self: &Arc<Self>, msg: AgentMessage) {
        match self.outbox.push(&msg) {
            Ok(_) => {}
            Err(AgentError::Protocol(reason)) => {
                tracing::error!(%reason, kind = msg.kind(), "message cannot be stored in the outbox")
            }
            Err(e) => {
                tracing::error!(error = %e, kind = msg.kind(), "could not write to the outbox; retrying in the background");
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        let this = self.clone();
                        handle.spawn(
                            async move {
                                if let Err(reason) = this.push_durably(&msg).await {
                                    tracing::error!(%reason, kind = msg.kind(), "message cannot be stored in the outbox");
                                }
                            }
                            .instrument(tracing::Span::current()),
                        );
                    }
                    Err(_) => tracing::error!(kind = msg.kind(), "no runtime to retry on; message lost"),
                }
            }
        }
    }

    /// The lease the job stored under `key` runs under now (a newer assignment of a held job
    /// moves it on).
    fn lease_of(&self, key: &[u8], fallback: LeaseId) -> LeaseId {
        self.held().iter().find(|h| h.key == key).map_or(fallback, |h| h.assignment.lease_id)
    }

    /// Takes a job: rejects it (with a reason, through the outbox) or queues it durably, then
    /// starts what the free slots allow. A job already held keeps running; if the assignment
    /// carries a newer lease, the job's reports carry that lease from now on (and a running job
    /// says `JobAccepted` again under it).
    pub fn enqueue_assignment(self: &Arc<Self>, a: Assignment) {
        let span = tracing::info_span!("job", job_id = %a.job_id);
        let _guard = span.enter();
        if self.renew_lease(&a) {
            return;
        }
        let reject = |reason: String| {
            tracing::warn!(%reason, "job rejected");
            self.push_or_retry_later(AgentMessage::JobRejected { job_id: a.job_id, lease_id: a.lease_id, reason });
        };
        if let Err(reason) = self.check_path(&a.path) {
            return reject(reason);
        }
        let hold = self.hold.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(reason), true) = (hold, a.lease_id != gaffer_protocol::messages::LEASE_ID_NONE) {
            return reject(format!("this agent is {reason}; try another agent"));
        }
        if self.held().len() >= self.cfg.jobs_held_max {
            return reject(format!("this agent already holds {} jobs", self.cfg.jobs_held_max));
        }
        let key = match self.db.generate_id() {
            Ok(n) => {
                let mut k = n.to_be_bytes().to_vec();
                k.extend_from_slice(a.job_id.as_bytes());
                k
            }
            Err(e) => return reject(format!("agent state database: {e}")),
        };
        let stored = serde_json::to_vec(&a)
            .map_err(|e| e.to_string())
            .and_then(|v| self.tree.insert(key.as_slice(), v).map_err(|e| e.to_string()))
            .and_then(|_| self.tree.flush().map_err(|e| e.to_string()));
        if let Err(e) = stored {
            return reject(format!("agent state database: {e}"));
        }
        self.held().push(Held { key, assignment: a, worker: None, finishing: false });
        drop(_guard);
        self.dispatch();
    }

    /// For an assignment of a job already held: adopts a newer lease (durably) and returns true;
    /// false when the job is not held.
    fn renew_lease(self: &Arc<Self>, a: &Assignment) -> bool {
        let (key, running) = {
            let mut held = self.held();
            let Some(h) = held.iter_mut().find(|h| h.assignment.job_id == a.job_id) else { return false };
            if h.finishing && a.lease_id > h.assignment.lease_id {
                // The attempt this entry ran is over; the newer lease is the next attempt.
                tracing::info!(
                    lease_id = a.lease_id,
                    old_lease_id = h.assignment.lease_id,
                    "job re-leased as its last attempt ends: queuing the new attempt"
                );
                return false;
            }
            if a.lease_id <= h.assignment.lease_id {
                tracing::debug!(
                    lease_id = a.lease_id,
                    held_lease_id = h.assignment.lease_id,
                    "assignment for a job already held"
                );
                return true;
            }
            tracing::info!(
                lease_id = a.lease_id,
                old_lease_id = h.assignment.lease_id,
                "job already held: taking the newer lease"
            );
            h.assignment.lease_id = a.lease_id;
            (h.key.clone(), h.worker.is_some())
        };
        let record = self.held().iter().find(|h| h.key == key).map(|h| h.assignment.clone());
        if let Some(record) = record {
            let stored = serde_json::to_vec(&record)
                .map_err(|e| e.to_string())
                .and_then(|v| self.tree.insert(key.as_slice(), v).map_err(|e| e.to_string()))
                .and_then(|_| self.tree.flush().map_err(|e| e.to_string()));
            if let Err(e) = stored {
                tracing::error!(error = %e, "could not store the new lease; it is used until the agent restarts");
            }
        }
        if running {
            self.push_or_retry_later(AgentMessage::JobAccepted { job_id: a.job_id, lease_id: a.lease_id });
        }
        true
    }

    /// Starts queued jobs while slots are free and the outbox has room.
    pub fn dispatch(self: &Arc<Self>) {
        loop {
            if self.outbox.is_full() {
                tracing::warn!(pending = self.outbox.len(), "outbox full: not starting new jobs until it drains");
                return;
            }
            let next = {
                let mut held = self.held();
                let running = held.iter().filter(|h| h.worker.is_some()).count() as u32;
                if running >= self.cfg.job_slots {
                    return;
                }
                let Some(h) = held.iter_mut().find(|h| h.worker.is_none()) else { return };
                let control = Arc::new(WorkerControl::new());
                h.worker = Some(control.clone());
                (h.assignment.clone(), h.key.clone(), control)
            };
            self.start(next.0, next.1, next.2);
        }
    }

    fn worker_job(&self, a: &Assignment) -> WorkerJob {
        WorkerJob {
            job_id: a.job_id,
            path: a.path.clone(),
            profile: a.profile,
            volumes: self.cfg.volumes.clone(),
            models_data_dir: self.cfg.models.as_ref().map(|m| m.registry.data_dir().to_path_buf()),
            use_cuda: self.cfg.models.as_ref().is_some_and(|m| m.runtime.provider().provider == "cuda"),
            moderation_sample_fps: self.cfg.full.moderation_sample_fps,
            ocr_sample_fps: self.cfg.full.ocr_sample_fps,
            queue_frames_max: self.cfg.full.queue_frames_max,
        }
    }

    fn start(self: &Arc<Self>, a: Assignment, key: Vec<u8>, control: Arc<WorkerControl>) {
        // Not inside the span of the job whose end started this one.
        let span = tracing::info_span!(parent: None, "job", job_id = %a.job_id);
        span.in_scope(|| tracing::info!(path = %a.path, profile = %a.profile, lease_id = a.lease_id, "job started"));
        let limits = self.job_limits();
        let this = self.clone();
        tokio::spawn(
            async move {
                let job_id = a.job_id;
                let accepted = AgentMessage::JobAccepted { job_id, lease_id: this.lease_of(&key, a.lease_id) };
                if let Err(reason) = this.push_durably(&accepted).await {
                    tracing::error!(%reason, "could not record the job's acceptance");
                }
                let job = this.worker_job(&a);
                let mut last = Instant::now();
                let progress_this = this.clone();
                let progress_key = key.clone();
                let mut on_progress = move |fraction: f32, frames_decoded: u64| {
                    if last.elapsed() >= progress_this.cfg.progress_interval {
                        last = Instant::now();
                        let lease_id = progress_this.lease_of(&progress_key, a.lease_id);
                        progress_this.push_once(&AgentMessage::Progress { job_id, lease_id, fraction, frames_decoded });
                    }
                };
                let outcome = worker::run_worker(&this.cfg.worker_exe, &job, limits, &control, &mut on_progress).await;
                let lease_id = this.finish_attempt(&key, a.lease_id);
                let msg = match outcome {
                    WorkerOutcome::Digest(digest) => {
                        tracing::info!(shots = digest.shot_count(), secs = digest.analysis_secs, "job succeeded");
                        this.record_custody(job_id, lease_id, &a.path).await;
                        Some(AgentMessage::Digest { job_id, lease_id, digest })
                    }
                    WorkerOutcome::Cancelled => {
                        tracing::info!("job cancelled by the control plane; its worker was stopped");
                        None
                    }
                    WorkerOutcome::Failed { reason, retryable } => {
                        tracing::warn!(%reason, retryable, "job failed");
                        Some(AgentMessage::JobFailed { job_id, lease_id, reason, retryable })
                    }
                };
                // The result is durable in the outbox before the job leaves the queue.
                if let Some(msg) = msg {
                    if !this.record_result(job_id, lease_id, msg).await {
                        // Not recorded: keep the job in the `jobs` tree (a restart runs it again)
                        // but free its slot.
                        this.release(&key);
                        this.dispatch();
                        return;
                    }
                }
                this.forget(&key);
                this.dispatch();
            }
            .instrument(span),
        );
    }

    /// Hashes the job's media file (the worker has read it and checked it is inside the volumes) and makes
    /// its chain of custody durable in the outbox, before the digest. A file that cannot be hashed any more
    /// is logged and leaves the job without custody; it does not fail an analysis that succeeded.
    async fn record_custody(&self, job_id: JobId, lease_id: LeaseId, path: &str) {
        let file = PathBuf::from(path);
        let hashed = tokio::task::spawn_blocking(move || crate::custody::hash_media_file(&file)).await;
        let custody = match hashed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not hash the media file; the job has no chain of custody");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the hashing task failed; the job has no chain of custody");
                return;
            }
        };
        let msg = AgentMessage::Custody {
            job_id,
            lease_id,
            sha256: custody.sha256,
            size_bytes: custody.size_bytes,
            modified_unix_secs: custody.modified_unix_secs,
        };
        if let Err(reason) = self.push_durably(&msg).await {
            tracing::error!(%reason, "could not record the media file's chain of custody");
        }
    }

    /// Makes the job's result durable in the outbox; a result that can never be stored becomes a
    /// `JobFailed` saying why. Returns whether something was recorded.
    async fn record_result(&self, job_id: JobId, lease_id: LeaseId, msg: AgentMessage) -> bool {
        let msg = match encode_frame(&msg, self.cfg.frame_bytes_max) {
            Ok(_) => msg,
            Err(e) => {
                let reason = match (&msg, &e) {
                    (AgentMessage::Digest { .. }, CodecError::FrameTooLarge { len_bytes, max_bytes }) => {
                        format!(
                            "digest is {}, over the {} frame limit",
                            worker::format_bytes(*len_bytes as u64),
                            worker::format_bytes(*max_bytes as u64)
                        )
                    }
                    _ => format!("the job's result cannot be sent: {e}"),
                };
                tracing::warn!(%reason, "job failed: result too large");
                AgentMessage::JobFailed { job_id, lease_id, reason, retryable: false }
            }
        };
        match self.push_durably(&msg).await {
            Ok(_) => true,
            Err(reason) => {
                let failed = AgentMessage::JobFailed {
                    job_id,
                    lease_id,
                    reason: format!("the job's result cannot be stored: {reason}"),
                    retryable: false,
                };
                match self.push_durably(&failed).await {
                    Ok(_) => true,
                    Err(reason) => {
                        tracing::error!(%reason, "the job's failure cannot be stored either; the job stays queued");
                        false
                    }
                }
            }
        }
    }

    /// The attempt of the held job `key` is over: marks it finishing and returns the lease its
    /// result goes under (`fallback` if the entry is gone).
    fn finish_attempt(&self, key: &[u8], fallback: LeaseId) -> LeaseId {
        let mut held = self.held();
        match held.iter_mut().find(|h| h.key == key) {
            Some(h) => {
                h.finishing = true;
                h.assignment.lease_id
            }
            None => fallback,
        }
    }

    /// Marks a job not running, leaving it in the `jobs` tree.
    fn release(&self, key: &[u8]) {
        self.held().retain(|h| h.key != key);
    }

    fn forget(&self, key: &[u8]) {
        if let Err(e) = off_async_worker(|| self.tree.remove(key).and_then(|_| self.tree.flush())) {
            tracing::error!(error = %e, "could not remove a finished job from the queue");
        }
        self.held().retain(|h| h.key != key);
    }

    /// Stops a job (the control plane cancelled it, or the lease is no longer ours): a queued
    /// one is dropped, a running one's worker is killed. Nothing is reported for it.
    pub fn cancel(&self, job_id: JobId) {
        let queued_key = {
            let held = self.held();
            match held.iter().find(|h| h.assignment.job_id == job_id) {
                Some(Held { worker: Some(control), .. }) => {
                    control.cancel();
                    None
                }
                Some(h) => Some(h.key.clone()),
                None => None,
            }
        };
        if let Some(key) = queued_key {
            self.forget(&key);
        }
    }
}

/// Runs `f` (an fsync: outbox pushes, queue removals) so that it does not hold up an async worker
/// thread: through `block_in_place` on a multi-threaded runtime (the agent's), directly elsewhere
/// (outside a runtime, or on a current-thread runtime in tests, where nothing else is starved).
fn off_async_worker<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Remembers which watched files were turned into jobs.
#[derive(Clone)]
pub struct WatchLedger {
    tree: sled::Tree,
}

impl WatchLedger {
    /// Opens the ledger tree of `db`.
    ///
    /// # Errors
    /// [`AgentError::State`].
    pub fn open(db: &sled::Db) -> Result<Self, AgentError> {
        Ok(Self { tree: db.open_tree("watch_seen")? })
    }

    fn key(f: &WatchedFile) -> Vec<u8> {
        let mut k = f.path.as_os_str().as_encoded_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&f.size_bytes.to_be_bytes());
        k.push(0);
        k.extend_from_slice(&f.modified_unix_secs.to_be_bytes());
        k
    }

    /// Whether this version of the file was already submitted.
    pub fn contains(&self, f: &WatchedFile) -> bool {
        self.tree.contains_key(Self::key(f)).unwrap_or(false)
    }

    /// Submits `f` as a `profile` job through the outbox, once per file version. Returns the assignment of
    /// the new job (None if it was submitted before), which the agent runs itself under lease id
    /// [`LEASE_ID_NONE`] (the control plane accepts that for jobs pinned to this agent).
    ///
    /// # Errors
    /// [`AgentError::State`], or [`AgentError::Config`] for a path that is not UTF-8.
    pub fn submit(&self, outbox: &Outbox, f: &WatchedFile, profile: Profile) -> Result<Option<Assignment>, AgentError> {
        if self.contains(f) {
            return Ok(None);
        }
        let Some(path) = f.path.to_str() else {
            return Err(AgentError::Config(format!("{} is not valid UTF-8; rename it", f.path.display())));
        };
        let job_id = uuid::Uuid::new_v4();
        outbox.push(&AgentMessage::SubmitWatched { job_id, path: path.to_owned(), profile })?;
        self.tree.insert(Self::key(f), job_id.as_bytes())?;
        self.tree.flush()?;
        Ok(Some(Assignment { job_id, lease_id: LEASE_ID_NONE, path: path.to_owned(), profile }))
    }
}

impl Runner {
    /// Queues the assignments a bundle import left in the `offline_assignments` tree (key: job
    /// uuid, value: the assignment in bincode, the wire payload form), removing each only after
    /// it is in the durable job queue. Returns how many were queued.
    ///
    /// # Errors
    /// [`AgentError::State`].
    pub fn enqueue_offline_assignments(self: &Arc<Self>) -> Result<usize, AgentError> {
        let tree = self.db.open_tree("offline_assignments")?;
        let mut n = 0;
        for item in tree.iter() {
            let (k, v) = item?;
            match gaffer_protocol::codec::decode_payload::<Assignment>(&v) {
                Ok(a) => {
                    self.enqueue_assignment(a);
                    n += 1;
                }
                Err(e) => tracing::error!(error = %e, "dropping an unreadable offline assignment"),
            }
            tree.remove(k)?;
        }
        Ok(n)
    }
}
