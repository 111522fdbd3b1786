//! Runs assigned jobs: checks them against this agent's volumes and slots, analyzes each on a
//! blocking thread, and puts acceptance, progress and the result into the outbox.
//!
//! A job that fails (bad media, unreadable file, even a panic inside the analysis) becomes a
//! `JobFailed` message with the reason; it never takes the agent or other jobs down.
//!
//! The watch-folder ledger (sled tree `watch_seen`, key `path NUL size NUL mtime`, value the job
//! id) makes sure each version of a watched file is submitted once, across restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::messages::{AgentMessage, Assignment, JobId, Profile};
use tracing::Instrument as _;

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
}

/// The job runner.
pub struct Runner {
    cfg: RunnerConfig,
    outbox: Outbox,
    running: Mutex<HashMap<JobId, Arc<AtomicBool>>>,
}

impl Runner {
    /// A runner that reports through `outbox`.
    pub fn new(cfg: RunnerConfig, outbox: Outbox) -> Arc<Self> {
        Arc::new(Self { cfg, outbox, running: Mutex::new(HashMap::new()) })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<AtomicBool>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids of the jobs running now.
    pub fn running_jobs(&self) -> Vec<JobId> {
        self.running().keys().copied().collect()
    }

    /// Number of jobs running now.
    pub fn jobs_running(&self) -> u32 {
        self.running().len() as u32
    }

    /// Configured slots.
    pub fn job_slots(&self) -> u32 {
        self.cfg.job_slots
    }

    /// The canonical volumes.
    pub fn volumes(&self) -> &[PathBuf] {
        &self.cfg.volumes
    }

    /// Checks that `path` is a file under one of the volumes, resolving symlinks and `..` so a
    /// link inside a volume cannot point outside it. Returns the canonical path.
    ///
    /// # Errors
    /// A reason for the operator.
    pub fn check_path(&self, path: &str) -> Result<PathBuf, String> {
        let canonical = Path::new(path).canonicalize().map_err(|e| format!("cannot open {path}: {e}"))?;
        if !self.cfg.volumes.iter().any(|v| canonical.starts_with(v)) {
            return Err(format!(
                "{path} is not under this agent's volumes ({}); start the agent with --volume for its directory",
                self.cfg.volumes.iter().map(|v| v.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(canonical)
    }

    fn push(&self, msg: &AgentMessage) {
        if let Err(e) = self.outbox.push(msg) {
            tracing::error!(error = %e, kind = msg.kind(), "could not write to the outbox");
        }
    }

    /// Takes an assignment: rejects it (with a reason) or starts it.
    pub fn assign(self: &Arc<Self>, a: Assignment) {
        let span = tracing::info_span!("job", job_id = %a.job_id);
        let _guard = span.enter();
        if self.running().contains_key(&a.job_id) {
            tracing::debug!("assignment for a job already running");
            return;
        }
        let reject = |reason: String| {
            tracing::warn!(%reason, "job rejected");
            self.push(&AgentMessage::JobRejected { job_id: a.job_id, reason });
        };
        if self.jobs_running() >= self.cfg.job_slots {
            return reject(format!("no free slot ({} of {} busy)", self.jobs_running(), self.cfg.job_slots));
        }
        // A file that does not exist (or a non-file) still starts: the analysis fails it with the
        // precise reason. Only paths outside the volumes are refused up front.
        let path = match Path::new(&a.path).canonicalize() {
            Ok(_) => match self.check_path(&a.path) {
                Ok(p) => p,
                Err(reason) => return reject(reason),
            },
            Err(_) if self.cfg.volumes.iter().any(|v| Path::new(&a.path).starts_with(v)) => PathBuf::from(&a.path),
            Err(e) => return reject(format!("cannot open {}: {e}", a.path)),
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.running().insert(a.job_id, cancel.clone());
        self.push(&AgentMessage::JobAccepted { job_id: a.job_id });
        tracing::info!(path = %path.display(), profile = %a.profile, "job started");
        let this = self.clone();
        tokio::spawn(
            async move {
                let job_id = a.job_id;
                let outcome = tokio::task::spawn_blocking({
                    let this = this.clone();
                    let cancel = cancel.clone();
                    move || this.analyze(job_id, &path, a.profile, &cancel)
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
                if let Some(msg) = msg {
                    this.push(&msg);
                }
                this.running().remove(&job_id);
            }
            .instrument(span.clone()),
        );
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
        analysis::analyze_file(path, &opts, &mut on_progress, cancel)
    }

    /// Stops a running job (the control plane cancelled or reassigned it).
    pub fn cancel(&self, job_id: JobId) {
        if let Some(flag) = self.running().get(&job_id) {
            flag.store(true, Ordering::Relaxed);
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

    /// Submits `f` as a job through the outbox, once per file version.
    ///
    /// # Errors
    /// [`AgentError::State`], or a protocol error if the path cannot be sent.
    pub fn submit(&self, outbox: &Outbox, f: &WatchedFile) -> Result<Option<JobId>, AgentError> {
        if self.contains(f) {
            return Ok(None);
        }
        let Some(path) = f.path.to_str() else {
            return Err(AgentError::Config(format!("{} is not valid UTF-8; rename it", f.path.display())));
        };
        let job_id = uuid::Uuid::new_v4();
        outbox.push(&AgentMessage::SubmitWatched { job_id, path: path.to_owned(), profile: Profile::Shots })?;
        self.tree.insert(Self::key(f), job_id.as_bytes())?;
        self.tree.flush()?;
        Ok(Some(job_id))
    }
}
