//! Runs jobs: checks them against this agent's volumes, keeps them in a durable local queue, starts
//! them as slots free up, analyzes each on a blocking thread, and puts acceptance, progress and the
//! result into the outbox.
//!
//! A job that fails (bad media, unreadable file, even a panic inside the analysis) becomes a
//! `JobFailed` message with the reason; it never takes the agent or other jobs down.
//!
//! Crash recovery: every job the agent holds is in the sled tree `jobs` until its result is in the
//! outbox. After a restart (SIGKILL, power loss) the agent finds them there and runs them again
//! from the start, and reports them in its Hello so the control plane keeps their leases. A result
//! that was already in the outbox before the crash may be sent twice; the control plane keeps the
//! first.
//!
//! sled key layout (database `DATA_DIR/state`):
//!
//! | tree         | key                                 | value                                    |
//! |--------------|-------------------------------------|------------------------------------------|
//! | `jobs`       | enqueue order (u64 BE) ‖ job uuid   | the assignment, JSON                     |
//! | `watch_seen` | path ‖ NUL ‖ size BE ‖ NUL ‖ mtime BE | job uuid (16 bytes)                    |
//!
//! The watch-folder ledger makes sure each version of a watched file is submitted once, across
//! restarts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::messages::{AgentMessage, Assignment, JobId, Profile};
use tracing::Instrument as _;

use crate::analysis::full::{FullAnalysis, FullOptions, Models};
use crate::analysis::{self, AnalysisError, AnalyzeOptions};
use crate::outbox::Outbox;
use crate::watch::WatchedFile;
use crate::AgentError;

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Canonical directories jobs may read from (`--volume` and `--watch`).
    pub volumes: Vec<PathBuf>,
    /// Jobs run at once. Default 1.
    pub job_slots: u32,
    /// Shortest interval between two progress messages of one job. Default 2 s.
    pub progress_interval: Duration,
    /// Most jobs held (queued + running). Default 10 000.
    pub jobs_held_max: usize,
    /// ONNX Runtime and verified models for `full` jobs (None: this agent runs `shots` only,
    /// and a `full` job fails with [`AnalysisError::ModelsUnavailable`]). Default None.
    pub models: Option<Arc<Models>>,
    /// Sampling and queue options of `full` jobs. Default [`FullOptions::default`].
    pub full: FullOptions,
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
        }
    }
}

struct Held {
    key: Vec<u8>,
    assignment: Assignment,
    /// Set while running.
    cancel: Option<Arc<AtomicBool>>,
}

/// The job runner.
pub struct Runner {
    cfg: RunnerConfig,
    outbox: Outbox,
    tree: sled::Tree,
    db: sled::Db,
    held: Mutex<Vec<Held>>,
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
            match serde_json::from_slice::<Assignment>(&v) {
                Ok(assignment) => held.push(Held { key: k.to_vec(), assignment, cancel: None }),
                Err(e) => {
                    tracing::error!(error = %e, "dropping an unreadable job record");
                    tree.remove(k)?;
                }
            }
        }
        if !held.is_empty() {
            tracing::info!(jobs = held.len(), "resuming jobs held before the agent stopped");
        }
        Ok(Arc::new(Self { cfg, outbox, tree, db: db.clone(), held: Mutex::new(held) }))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids of every job the agent holds (running or queued): the leases to keep.
    pub fn running_jobs(&self) -> Vec<JobId> {
        self.held().iter().map(|h| h.assignment.job_id).collect()
    }

    /// Number of jobs running now.
    pub fn jobs_running(&self) -> u32 {
        self.held().iter().filter(|h| h.cancel.is_some()).count() as u32
    }

    /// Number of jobs waiting for a slot.
    pub fn jobs_queued(&self) -> u32 {
        self.held().iter().filter(|h| h.cancel.is_none()).count() as u32
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
    /// lexically under a volume (the analysis then fails it with the precise reason).
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

    fn push(&self, msg: &AgentMessage) {
        if let Err(e) = self.outbox.push(msg) {
            tracing::error!(error = %e, kind = msg.kind(), "could not write to the outbox");
        }
    }

    /// Takes a job: rejects it (with a reason, through the outbox) or queues it durably, then
    /// starts what the free slots allow. A job already held is ignored.
    pub fn enqueue_assignment(self: &Arc<Self>, a: Assignment) {
        let span = tracing::info_span!("job", job_id = %a.job_id);
        let _guard = span.enter();
        if self.held().iter().any(|h| h.assignment.job_id == a.job_id) {
            tracing::debug!("assignment for a job already held");
            return;
        }
        let reject = |reason: String| {
            tracing::warn!(%reason, "job rejected");
            self.push(&AgentMessage::JobRejected { job_id: a.job_id, reason });
        };
        if let Err(reason) = self.check_path(&a.path) {
            return reject(reason);
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
        self.held().push(Held { key, assignment: a, cancel: None });
        drop(_guard);
        self.dispatch();
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
                let running = held.iter().filter(|h| h.cancel.is_some()).count() as u32;
                if running >= self.cfg.job_slots {
                    return;
                }
                let Some(h) = held.iter_mut().find(|h| h.cancel.is_none()) else { return };
                let cancel = Arc::new(AtomicBool::new(false));
                h.cancel = Some(cancel.clone());
                (h.assignment.clone(), h.key.clone(), cancel)
            };
            self.start(next.0, next.1, next.2);
        }
    }

    fn start(self: &Arc<Self>, a: Assignment, key: Vec<u8>, cancel: Arc<AtomicBool>) {
        let span = tracing::info_span!("job", job_id = %a.job_id);
        span.in_scope(|| tracing::info!(path = %a.path, profile = %a.profile, "job started"));
        self.push(&AgentMessage::JobAccepted { job_id: a.job_id });
        let this = self.clone();
        tokio::spawn(
            async move {
                let job_id = a.job_id;
                let outcome = tokio::task::spawn_blocking({
                    let this = this.clone();
                    let cancel = cancel.clone();
                    move || this.analyze(job_id, Path::new(&a.path), a.profile, &cancel)
                })
                .await;
                let msg = match outcome {
                    Ok(Ok(digest)) => {
                        tracing::info!(shots = digest.shot_count(), secs = digest.analysis_secs, "job succeeded");
                        Some(AgentMessage::Digest { job_id, digest: Box::new(digest) })
                    }
                    Ok(Err(AnalysisError::Cancelled)) => {
                        tracing::info!("job cancelled by the control plane");
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "job failed");
                        Some(AgentMessage::JobFailed { job_id, reason: e.to_string() })
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "analysis panicked");
                        Some(AgentMessage::JobFailed { job_id, reason: format!("internal error in the analysis: {e}") })
                    }
                };
                // The result is durable in the outbox before the job leaves the queue.
                if let Some(msg) = msg {
                    this.push(&msg);
                }
                this.forget(&key);
                this.dispatch();
            }
            .instrument(span),
        );
    }

    fn forget(&self, key: &[u8]) {
        if let Err(e) = self.tree.remove(key).and_then(|_| self.tree.flush()) {
            tracing::error!(error = %e, "could not remove a finished job from the queue");
        }
        self.held().retain(|h| h.key != key);
    }

    fn analyze(
        &self,
        job_id: JobId,
        path: &Path,
        profile: Profile,
        cancel: &AtomicBool,
    ) -> Result<gaffer_protocol::digest::Digest, AnalysisError> {
        analysis::init_ffmpeg()?;
        let opts = AnalyzeOptions { profile, ..AnalyzeOptions::default() };
        let mut last = Instant::now();
        let mut on_progress = |p: analysis::ProgressUpdate| {
            if last.elapsed() >= self.cfg.progress_interval {
                last = Instant::now();
                self.push(&AgentMessage::Progress { job_id, fraction: p.fraction, frames_decoded: p.frames_decoded });
            }
        };
        let full = self.cfg.models.as_deref().map(|models| FullAnalysis { models, options: &self.cfg.full });
        analysis::analyze_file_with(path, &opts, full.as_ref(), &mut on_progress, cancel)
    }

    /// Stops a job (the control plane cancelled or reassigned it): a queued one is dropped, a
    /// running one is told to stop.
    pub fn cancel(&self, job_id: JobId) {
        let queued_key = {
            let held = self.held();
            match held.iter().find(|h| h.assignment.job_id == job_id) {
                Some(Held { cancel: Some(flag), .. }) => {
                    flag.store(true, Ordering::Relaxed);
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
    /// the new job (None if it was submitted before), which an offline agent runs itself.
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
        Ok(Some(Assignment { job_id, path: path.to_owned(), profile }))
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
