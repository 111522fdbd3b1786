//! Analysis workers: each job's decode and analysis runs in a child process with time and memory
//! limits, so a crash, a runaway decoder or an out-of-memory file fails one attempt of one job and
//! never the agent or its other jobs.
//!
//! Process model:
//!
//! ```text
//! gaffer-agent run (runner)                        gaffer-agent worker  (hidden subcommand)
//!   spawn /proc/self/exe worker  ──stdin──▶  one JSON line: WorkerJob; then stdin stays open
//!                                                  (EOF = the agent is gone: the worker stops)
//!   read frames (codec, ≤ 8 MiB) ◀──stdout──  WorkerMessage frames: Opened, Progress…, Done|Failed
//!   log lines, tail kept         ◀──stderr──  its tracing logs, one JSON object a line
//!   every 200 ms: /proc/PID/status VmRSS > limit → SIGKILL
//!   deadline passed / runner.cancel(job)    → SIGKILL
//! ```
//!
//! The worker canonicalizes the job's path, checks it against the agent's volumes, opens it once
//! read-only, checks that the open file (the kernel's name for it, `/proc/self/fd/N`) is a regular
//! file under a volume, refuses playlists and concat scripts, and gives FFmpeg `/proc/self/fd/N`
//! with `protocol_whitelist=file` and a `format_whitelist` of media demuxers
//! ([`crate::analysis::FORMAT_WHITELIST`]), so FFmpeg reads exactly the file that was checked and
//! nothing else. Media bytes stay in the worker; what comes back over the pipe is the same
//! metadata as before (progress, the digest).
//!
//! Limits, per job:
//! * **Wall time** (`--job-timeout`): fixed when given; otherwise scaled to the media:
//!   `max(10 min, 4 × media duration)`, with the duration the worker reports once the container is
//!   probed ([`WorkerMessage::Opened`]); 60 min when the container does not say its duration, and
//!   10 min until the worker has reported. See [`job_timeout`].
//! * **Memory** (`--job-memory-max`): the worker's resident memory (VmRSS), polled every
//!   [`MEMORY_POLL_INTERVAL`] (200 ms); above the limit the worker is SIGKILLed. Default
//!   `max(1 GiB, 75 % of the box's memory / job slots)`, the box's memory being the smaller of
//!   `MemTotal` and the cgroup's `memory.max`. See [`default_job_memory_max`]. No `RLIMIT_AS`:
//!   ONNX Runtime and FFmpeg reserve far more address space than they use.
//! * **Slots**: the runner's `--slots` (one worker per running job).
//!
//! A worker that fails reports why in words: "analysis worker killed by signal 9 (SIGKILL)",
//! "analysis worker exceeded the 4 GiB memory limit …", "analysis worker exceeded the 20 min time
//! limit …", "analysis worker exited with status 3: <its last log line>". Bad media is reported
//! by the worker itself ([`WorkerMessage::Failed`], exit status 0).

use std::collections::VecDeque;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::codec::{encode_frame, CodecError, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use gaffer_protocol::digest::Digest;
use gaffer_protocol::messages::{JobId, Profile};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::Instrument as _;

use crate::analysis::full::{FullAnalysis, FullOptions, Models};
use crate::analysis::{self, AnalysisError, AnalyzeOptions, OpenedMedia};

/// The hidden subcommand of `gaffer-agent` that runs one job as a worker.
pub const WORKER_SUBCOMMAND: &str = "worker";

/// Largest frame the agent accepts from a worker, bytes: the protocol's
/// [`FRAME_BYTES_MAX_DEFAULT`] (8 MiB), so a digest that reaches the agent also fits the link.
pub const WORKER_FRAME_BYTES_MAX: usize = FRAME_BYTES_MAX_DEFAULT;

/// Largest job description a worker reads from stdin, bytes: 1 MiB.
pub const JOB_SPEC_BYTES_MAX: usize = 1 << 20;

/// How often the agent reads a worker's resident memory: 200 ms.
pub const MEMORY_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Shortest default wall-time limit of a job: 10 min.
pub const JOB_TIMEOUT_MIN: Duration = Duration::from_secs(10 * 60);

/// The default wall-time limit is this many times the media's duration (at least
/// [`JOB_TIMEOUT_MIN`]): 4.
pub const JOB_TIMEOUT_MEDIA_FACTOR: u32 = 4;

/// Default wall-time limit when the container does not declare a duration: 60 min.
pub const JOB_TIMEOUT_UNKNOWN_DURATION: Duration = Duration::from_secs(60 * 60);

/// Smallest default memory limit of a worker, bytes: 1 GiB.
pub const JOB_MEMORY_MIN_BYTES: u64 = 1 << 30;

/// Share of the box's memory the default limits of all slots add up to: 75 %.
pub const JOB_MEMORY_BOX_PERCENT: u64 = 75;

/// Lines of a worker's stderr kept for the failure reason and the log: 20.
pub const STDERR_TAIL_LINES: usize = 20;

/// Longest stderr line kept, bytes: 8 KiB (longer lines are cut).
pub const STDERR_LINE_BYTES_MAX: usize = 8 * 1024;

/// How long a worker may take to exit after its last message, or the agent after a kill: 10 s.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// How long a worker keeps going after the agent went away (stdin closed) before it exits: 5 s
/// (it stops the analysis at once; this bounds a stuck one).
const ORPHAN_EXIT_AFTER: Duration = Duration::from_secs(5);

/// Exit status of a worker whose job description could not be read.
const EXIT_BAD_JOB: i32 = 2;
/// Exit status of a worker that could not write to the agent.
const EXIT_PIPE: i32 = 3;
/// Exit status of a worker whose agent went away.
const EXIT_ORPHANED: i32 = 4;

/// One job, as the agent hands it to a worker (JSON, one line on the worker's stdin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerJob {
    /// The job (for the worker's log).
    pub job_id: JobId,
    /// The media file, as assigned.
    pub path: String,
    /// What to run.
    pub profile: Profile,
    /// Canonical directories the file must be under (the agent's volumes).
    pub volumes: Vec<PathBuf>,
    /// Data directory with the ONNX Runtime and models, for `full` (None: `full` fails with
    /// "models not available").
    pub models_data_dir: Option<PathBuf>,
    /// Whether the agent chose the CUDA provider (the worker then asks for it too).
    pub use_cuda: bool,
    /// [`FullOptions::moderation_sample_fps`], frames per second of media.
    pub moderation_sample_fps: f64,
    /// [`FullOptions::ocr_sample_fps`], frames per second of media.
    pub ocr_sample_fps: f64,
    /// [`FullOptions::queue_frames_max`], frames.
    pub queue_frames_max: usize,
}

/// What a worker tells the agent, one [`gaffer_protocol::codec`] frame each on its stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMessage {
    /// The file is open and its container probed; the media's duration in seconds, if declared.
    /// The agent sets the job's deadline from it.
    Opened {
        /// Seconds.
        duration_secs: Option<f64>,
    },
    /// Progress, at most 4 a second.
    Progress {
        /// 0..=1 by media time.
        fraction: f32,
        /// Video frames decoded so far.
        frames_decoded: u64,
    },
    /// The result. The worker exits after it.
    Done {
        /// The digest.
        digest: Box<Digest>,
    },
    /// The analysis failed. The worker exits after it.
    Failed {
        /// For a person, e.g. "not a media file: Invalid data found when processing input".
        reason: String,
        /// Whether another attempt may succeed (see `AgentMessage::JobFailed`).
        retryable: bool,
    },
}

// ---------------------------------------------------------------------------------------------
// Limits and units
// ---------------------------------------------------------------------------------------------

/// Limits of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimits {
    /// Wall time; None: scaled to the media (see [`job_timeout`]).
    pub timeout: Option<Duration>,
    /// Resident memory, bytes.
    pub memory_max_bytes: u64,
}

/// The wall-time limit of a job: `fixed` when set, else `max(10 min, 4 × media duration)`,
/// [`JOB_TIMEOUT_UNKNOWN_DURATION`] (60 min) when the duration is unknown.
pub fn job_timeout(fixed: Option<Duration>, media_duration_secs: Option<f64>) -> Duration {
    if let Some(t) = fixed {
        return t;
    }
    match media_duration_secs.filter(|d| d.is_finite() && *d > 0.0) {
        Some(d) => {
            // Clamped to a day per media hour's worth so a bogus declared duration cannot overflow.
            let scaled = Duration::from_secs_f64((d * f64::from(JOB_TIMEOUT_MEDIA_FACTOR)).min(1e9));
            scaled.max(JOB_TIMEOUT_MIN)
        }
        None => JOB_TIMEOUT_UNKNOWN_DURATION,
    }
}

/// The box's memory, bytes: the smaller of `/proc/meminfo`'s `MemTotal` and the cgroup v2
/// `memory.max` of this process (when set). None if neither can be read.
pub fn box_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)))
        .and_then(|rel| std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", rel.trim_end_matches('/'))).ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// The default memory limit of one worker, bytes: `max(1 GiB, 75 % of the box's memory / slots)`
/// (4 GiB when the box's memory cannot be read).
pub fn default_job_memory_max(job_slots: u32) -> u64 {
    match box_memory_bytes() {
        Some(total) => (total / 100 * JOB_MEMORY_BOX_PERCENT / u64::from(job_slots.max(1))).max(JOB_MEMORY_MIN_BYTES),
        None => 4 << 30,
    }
}

/// Parses a byte size with the `parse-size` crate: a number with an optional unit, e.g. `4GiB`,
/// `512M`, `1.5 GiB`, `1073741824`. Every unit is a power of 1024 (its `binary` setting: `G`,
/// `GB` and `GiB` are all 2^30), as memory limits usually are; `B` or none: bytes.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let bytes = parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|e| format!("{text:?} is not a size ({e}): use bytes or a unit, e.g. 4GiB, 512MiB, 2G"))?;
    if bytes == 0 {
        return Err(format!("{text:?} is out of range (at least 1 byte)"));
    }
    Ok(bytes)
}

/// Parses a duration with `humantime`: numbers with units, e.g. `20m`, `90s`, `1h 30m`, `500ms`.
///
/// # Errors
/// A message naming the accepted forms; a zero duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let total = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}): use e.g. 20m, 90s, 1h30m, 500ms"))?;
    if total.is_zero() {
        return Err(format!("{text:?}: the time limit must be above zero"));
    }
    Ok(total)
}

/// A byte count for people: `4 GiB`, `1.5 GiB`, `300 MiB`, `12 KiB`, `512 bytes`.
pub fn format_bytes(bytes: u64) -> String {
    let units = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, name) in units {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            let text = format!("{v:.1}");
            return format!("{} {name}", text.strip_suffix(".0").unwrap_or(&text));
        }
    }
    format!("{bytes} bytes")
}

/// A duration for people: `300 ms`, `2.5 s`, `20 min`, `4 min 30 s`, `1 h 30 min`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        let text = format!("{:.1}", d.as_secs_f64());
        return format!("{} s", text.strip_suffix(".0").unwrap_or(&text));
    }
    if secs < 3600 {
        return match secs % 60 {
            0 => format!("{} min", secs / 60),
            s => format!("{} min {s} s", secs / 60),
        };
    }
    match (secs % 3600) / 60 {
        0 => format!("{} h", secs / 3600),
        m => format!("{} h {m} min", secs / 3600),
    }
}

/// The name of a Linux signal number, e.g. 9 → `SIGKILL`.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => "unknown signal",
    }
}

/// Resident memory of process `pid` (`VmRSS` of `/proc/PID/status`), bytes. None when the process
/// is gone or has no memory left (a zombie).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// Agent side
// ---------------------------------------------------------------------------------------------

/// Shared between the runner and one running worker: cancellation and the worker's pid.
#[derive(Debug, Default)]
pub struct WorkerControl {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
    pid: AtomicU32,
}

impl WorkerControl {
    /// A control for a job not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for the worker to be killed (the job was cancelled); it is, promptly.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Whether [`WorkerControl::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The worker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|&p| p != 0)
    }
}

/// How a worker's job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerOutcome {
    /// The digest.
    Digest(Box<Digest>),
    /// The attempt failed.
    Failed {
        /// For a person.
        reason: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// [`WorkerControl::cancel`] was called; the worker was killed.
    Cancelled,
}

impl WorkerOutcome {
    fn failed(reason: impl Into<String>, retryable: bool) -> Self {
        WorkerOutcome::Failed { reason: reason.into(), retryable }
    }
}

/// Why the agent stopped reading a worker before it reported a result.
enum Stop {
    /// Killed for passing a limit, or for breaking the pipe protocol: the failure reason.
    Kill(String, bool),
    Cancel,
}

/// Runs `job` in a worker process (`exe worker`) under `limits` and returns how it ended. Calls
/// `on_progress(fraction, frames_decoded)` for each progress report. Never panics and never fails
/// the caller: every problem is a [`WorkerOutcome::Failed`] with its reason. The worker's stderr
/// goes into this process's log (at the level the worker logged it, in the current span).
pub async fn run_worker(
    exe: &Path,
    job: &WorkerJob,
    limits: WorkerLimits,
    control: &WorkerControl,
    on_progress: &mut (dyn FnMut(f32, u64) + Send),
) -> WorkerOutcome {
    if control.is_cancelled() {
        return WorkerOutcome::Cancelled;
    }
    let spec = match serde_json::to_vec(job) {
        Ok(mut v) => {
            v.push(b'\n');
            v
        }
        Err(e) => {
            return WorkerOutcome::failed(format!("internal error: cannot describe the job to a worker: {e}"), true)
        }
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(WORKER_SUBCOMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return WorkerOutcome::failed(format!("cannot start the analysis worker {}: {e}", exe.display()), true)
        }
    };
    let pid = child.id().unwrap_or(0);
    control.pid.store(pid, Ordering::SeqCst);
    let started = Instant::now();
    tracing::debug!(pid, exe = %exe.display(), "analysis worker started");
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        control.pid.store(0, Ordering::SeqCst);
        return WorkerOutcome::failed("internal error: the analysis worker's pipes are missing", true);
    };
    let stderr_task = tokio::spawn(forward_stderr(stderr, pid).instrument(tracing::Span::current()));
    // A worker that dies before reading its job is reported through its exit status below.
    if let Err(e) = stdin.write_all(&spec).await.and(stdin.flush().await) {
        tracing::debug!(error = %e, "could not hand the job to the worker");
    }

    let mut timeout = limits.timeout.unwrap_or(JOB_TIMEOUT_MIN);
    let mut timeout_rule = match limits.timeout {
        Some(_) => "set with --job-timeout".to_string(),
        None => "the default until the worker reports the media's duration; set --job-timeout to change it".to_string(),
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut memory_poll = tokio::time::interval(MEMORY_POLL_INTERVAL);
    memory_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rss_peak = 0u64;
    let mut frames = FrameDecoder::new(WORKER_FRAME_BYTES_MAX);
    let mut buf = vec![0u8; 64 * 1024];
    let mut result: Option<WorkerOutcome> = None;
    let stop: Option<Stop> = 'read: loop {
        tokio::select! {
            biased;
            () = control.notify.notified() => {
                if control.is_cancelled() {
                    break 'read Some(Stop::Cancel);
                }
            }
            () = &mut deadline => {
                break 'read Some(Stop::Kill(
                    format!("analysis worker exceeded the {} time limit ({timeout_rule})", format_duration(timeout)),
                    false,
                ));
            }
            _ = memory_poll.tick() => {
                if let Some(rss) = rss_bytes(pid) {
                    rss_peak = rss_peak.max(rss);
                    if rss > limits.memory_max_bytes {
                        break 'read Some(Stop::Kill(
                            format!(
                                "analysis worker exceeded the {} memory limit (resident memory reached {}; \
                                 set --job-memory-max to change the limit)",
                                format_bytes(limits.memory_max_bytes),
                                format_bytes(rss)
                            ),
                            false,
                        ));
                    }
                }
            }
            read = stdout.read(&mut buf) => {
                let n = match read {
                    Ok(0) => break 'read None,
                    Ok(n) => n,
                    Err(e) => break 'read Some(Stop::Kill(format!("cannot read from the analysis worker: {e}"), true)),
                };
                frames.push(&buf[..n]);
                loop {
                    match frames.next_message::<WorkerMessage>() {
                        Ok(None) => break,
                        Ok(Some(WorkerMessage::Opened { duration_secs })) => {
                            tracing::debug!(?duration_secs, "worker opened the media");
                            if limits.timeout.is_none() {
                                timeout = job_timeout(None, duration_secs);
                                timeout_rule = match duration_secs {
                                    Some(d) => format!(
                                        "max({}, {JOB_TIMEOUT_MEDIA_FACTOR} × the media's {}); set --job-timeout to change it",
                                        format_duration(JOB_TIMEOUT_MIN),
                                        format_duration(Duration::from_secs_f64(d.clamp(0.0, 1e9)))
                                    ),
                                    None => "the default for media of unknown duration; set --job-timeout to change it".to_string(),
                                };
                                deadline.as_mut().reset(tokio::time::Instant::from_std(started + timeout));
                            }
                        }
                        Ok(Some(WorkerMessage::Progress { fraction, frames_decoded })) => on_progress(fraction, frames_decoded),
                        Ok(Some(WorkerMessage::Done { digest })) => result = Some(WorkerOutcome::Digest(digest)),
                        Ok(Some(WorkerMessage::Failed { reason, retryable })) => {
                            result = Some(WorkerOutcome::Failed { reason, retryable })
                        }
                        Err(e) => {
                            break 'read Some(Stop::Kill(format!("analysis worker sent a bad message: {e}"), true));
                        }
                    }
                }
                if result.is_some() {
                    break 'read None;
                }
            }
        }
    };
    drop(stdout);

    let status = match &stop {
        Some(_) => {
            let _ = child.start_kill();
            child.wait().await.ok()
        }
        None => match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                tracing::warn!(pid, "analysis worker did not exit after its last message; killing it");
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        },
    };
    drop(stdin);
    control.pid.store(0, Ordering::SeqCst);
    let tail = match tokio::time::timeout(EXIT_GRACE, stderr_task).await {
        Ok(Ok(tail)) => tail,
        _ => VecDeque::new(),
    };
    tracing::debug!(pid, secs = started.elapsed().as_secs_f64(), rss_peak, ?status, "analysis worker ended");
    match (stop, result) {
        (Some(Stop::Cancel), _) => WorkerOutcome::Cancelled,
        (Some(Stop::Kill(reason, retryable)), _) => {
            tracing::warn!(pid, %reason, "analysis worker killed");
            WorkerOutcome::Failed { reason, retryable }
        }
        (None, Some(outcome)) => {
            if let Some(s) = status.filter(|s| !s.success()) {
                tracing::warn!(pid, status = %describe_exit(s, &tail), "analysis worker exited badly after reporting its result");
            }
            outcome
        }
        (None, None) => {
            let reason = match status {
                Some(s) => describe_exit(s, &tail),
                None => "analysis worker ended and its exit status could not be read".to_string(),
            };
            if !tail.is_empty() {
                tracing::warn!(pid, stderr_tail = %tail.iter().cloned().collect::<Vec<_>>().join(" | "), "analysis worker failed");
            }
            WorkerOutcome::Failed { reason, retryable: true }
        }
    }
}

/// Why a worker that reported no result ended, for a person.
fn describe_exit(status: ExitStatus, tail: &VecDeque<String>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let last = tail.back().map(String::as_str).unwrap_or("no log output");
    match (status.signal(), status.code()) {
        (Some(sig), _) => format!("analysis worker killed by signal {sig} ({})", signal_name(sig)),
        (None, Some(0)) => format!("analysis worker exited without reporting a result: {last}"),
        (None, Some(code)) => format!("analysis worker exited with status {code}: {last}"),
        (None, None) => format!("analysis worker ended ({status}): {last}"),
    }
}

/// Forwards a worker's stderr (JSON log lines, or raw text such as a crash message) into this
/// process's log and returns the last [`STDERR_TAIL_LINES`] lines' messages.
async fn forward_stderr(mut stderr: tokio::process::ChildStderr, pid: u32) -> VecDeque<String> {
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut overlong = false;
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            if !overlong {
                pending.extend_from_slice(&chunk[..nl]);
            }
            emit_worker_line(&pending, pid, &mut tail);
            pending.clear();
            overlong = false;
            chunk = &chunk[nl + 1..];
        }
        if !overlong {
            let room = STDERR_LINE_BYTES_MAX.saturating_sub(pending.len());
            pending.extend_from_slice(&chunk[..chunk.len().min(room)]);
            overlong = chunk.len() > room;
        }
    }
    if !pending.is_empty() {
        emit_worker_line(&pending, pid, &mut tail);
    }
    tail
}

fn emit_worker_line(line: &[u8], pid: u32, tail: &mut VecDeque<String>) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return;
    }
    let (level, message) = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(obj)) => {
            let level = obj.get("level").and_then(|l| l.as_str()).unwrap_or("INFO").to_ascii_uppercase();
            let mut message = String::new();
            if let Some(serde_json::Value::Object(fields)) = obj.get("fields") {
                if let Some(m) = fields.get("message") {
                    message.push_str(m.as_str().map_or_else(|| m.to_string(), str::to_owned).as_str());
                }
                for (k, v) in fields.iter().filter(|(k, _)| k.as_str() != "message") {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    message.push_str(&format!(" {k}={v}"));
                }
            }
            (level, message)
        }
        _ => ("WARN".to_string(), text.to_string()),
    };
    match level.as_str() {
        "ERROR" => tracing::error!(worker_pid = pid, "worker: {message}"),
        "WARN" => tracing::warn!(worker_pid = pid, "worker: {message}"),
        "INFO" => tracing::info!(worker_pid = pid, "worker: {message}"),
        "DEBUG" => tracing::debug!(worker_pid = pid, "worker: {message}"),
        _ => tracing::trace!(worker_pid = pid, "worker: {message}"),
    }
    if tail.len() == STDERR_TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(message);
}

// ---------------------------------------------------------------------------------------------
// Worker side
// ---------------------------------------------------------------------------------------------

/// Frames to the agent on stdout, one whole frame per write.
struct ToAgent {
    out: Mutex<std::io::Stdout>,
}

impl ToAgent {
    fn send(&self, msg: &WorkerMessage) -> Result<(), String> {
        let frame = encode_frame(msg, WORKER_FRAME_BYTES_MAX).map_err(|e| e.to_string())?;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(&frame).and_then(|()| out.flush()).map_err(|e| format!("cannot write to the agent: {e}"))
    }
}

/// The worker process's log: JSON lines on stderr (the agent parses and forwards them), filtered
/// by `GAFFER_LOG` like the agent's.
pub fn init_worker_tracing() {
    tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG").unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The `gaffer-agent worker` process: reads one [`WorkerJob`] from stdin, analyzes it, writes
/// [`WorkerMessage`] frames to stdout. Returns the exit status: 0 when it reported a result (success or failure),
/// 2 for a job description it cannot read, 3 when it cannot write to the agent, 4 when the agent
/// went away (stdin closed).
pub fn worker_main() -> i32 {
    init_worker_tracing();
    std::panic::set_hook(Box::new(|info| tracing::error!("analysis worker panicked: {info}")));
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    let mut line = Vec::new();
    let read = (&mut stdin).take(JOB_SPEC_BYTES_MAX as u64 + 1).read_until(b'\n', &mut line);
    let job: WorkerJob = match read {
        Ok(_) if line.len() > JOB_SPEC_BYTES_MAX => {
            tracing::error!("job description longer than {JOB_SPEC_BYTES_MAX} bytes");
            return EXIT_BAD_JOB;
        }
        Ok(_) => match serde_json::from_slice(&line) {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(error = %e, "unreadable job description on stdin (this subcommand is for the agent)");
                return EXIT_BAD_JOB;
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot read the job description from stdin");
            return EXIT_BAD_JOB;
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    // The agent keeps stdin open while it wants the result; EOF means it is gone.
    let watch_cancel = cancel.clone();
    let _ = std::thread::Builder::new().name("gaffer-worker-stdin".into()).spawn(move || {
        let _ = std::io::copy(&mut stdin, &mut std::io::sink());
        watch_cancel.store(true, Ordering::Relaxed);
        tracing::warn!("the agent closed the pipe; stopping");
        std::thread::sleep(ORPHAN_EXIT_AFTER);
        std::process::exit(EXIT_ORPHANED);
    });
    let span = tracing::info_span!("job", job_id = %job.job_id);
    let _enter = span.enter();
    let to_agent = ToAgent { out: Mutex::new(std::io::stdout()) };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| analyze_job(&job, &to_agent, &cancel)));
    let msg = match outcome {
        Ok(Ok(digest)) => WorkerMessage::Done { digest: Box::new(digest) },
        Ok(Err(e)) => WorkerMessage::Failed { reason: e.to_string(), retryable: retryable(&e) },
        Err(_) => WorkerMessage::Failed {
            reason: "internal error: the analysis panicked (see the agent log)".to_string(),
            retryable: true,
        },
    };
    let sent = match to_agent.send(&msg) {
        Err(_) if matches!(msg, WorkerMessage::Done { .. }) => {
            // Too large for a frame (or the pipe broke, which the next send shows too).
            let reason = match &msg {
                WorkerMessage::Done { digest } => digest_too_large_reason(digest),
                _ => None,
            }
            .unwrap_or_else(|| "the digest could not be sent to the agent".to_string());
            to_agent.send(&WorkerMessage::Failed { reason, retryable: false })
        }
        other => other,
    };
    match sent {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "could not report the result");
            EXIT_PIPE
        }
    }
}

/// "digest is 9.1 MiB, over the 8 MiB frame limit" when `digest` does not fit a frame of
/// `frame_bytes_max`; None when it fits.
pub fn digest_size_reason(digest: &Digest, frame_bytes_max: usize) -> Option<String> {
    match encode_frame(digest, frame_bytes_max) {
        Err(CodecError::FrameTooLarge { len_bytes, max_bytes }) => Some(format!(
            "digest is {}, over the {} frame limit",
            format_bytes(len_bytes as u64),
            format_bytes(max_bytes as u64)
        )),
        _ => None,
    }
}

fn digest_too_large_reason(digest: &Digest) -> Option<String> {
    digest_size_reason(digest, WORKER_FRAME_BYTES_MAX)
}

/// Whether another attempt at the same file may succeed after this analysis error.
pub fn retryable(e: &AnalysisError) -> bool {
    matches!(
        e,
        AnalysisError::FfmpegInit(_)
            | AnalysisError::Internal(_)
            | AnalysisError::ModelsUnavailable(_)
            | AnalysisError::AnalyzerFailed { .. }
            | AnalysisError::Cancelled
    )
}

/// Opens the job's file for analysis: canonicalizes `path`, checks it is under one of `volumes`,
/// opens it once, and checks that the file actually opened is a regular file under a volume (so
/// a symlink swapped in after the check cannot point FFmpeg elsewhere).
///
/// # Errors
/// The analysis error to report; a path outside the volumes is
/// [`AnalysisError::Unreadable`] with kind `PermissionDenied` and the volumes in the message.
pub fn open_checked(path: &str, volumes: &[PathBuf]) -> Result<OpenedMedia, AnalysisError> {
    let given = Path::new(path);
    let canonical = given.canonicalize().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            AnalysisError::NotFound { path: given.to_path_buf() }
        } else {
            AnalysisError::Unreadable { path: given.to_path_buf(), source }
        }
    })?;
    let outside = |p: &Path| {
        let volumes = volumes.iter().map(|v| v.display().to_string()).collect::<Vec<_>>().join(", ");
        AnalysisError::Unreadable {
            path: given.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} is not under this agent's volumes ({volumes})", p.display()),
            ),
        }
    };
    let under = |p: &Path| volumes.iter().any(|v| p.starts_with(v));
    if !under(&canonical) {
        return Err(outside(&canonical));
    }
    let media = OpenedMedia::open(&canonical)?;
    let opened =
        media.opened_path().map_err(|source| AnalysisError::Unreadable { path: given.to_path_buf(), source })?;
    if !under(&opened) {
        return Err(outside(&opened));
    }
    Ok(media)
}

fn analyze_job(job: &WorkerJob, to_agent: &ToAgent, cancel: &AtomicBool) -> Result<Digest, AnalysisError> {
    analysis::init_ffmpeg()?;
    tracing::debug!(path = %job.path, profile = %job.profile, "worker analyzing");
    let media = open_checked(&job.path, &job.volumes)?;
    let models = match (job.profile, &job.models_data_dir) {
        (Profile::Full, Some(dir)) => Some(
            Models::open(dir, usize::from(job.use_cuda))
                .map_err(|e| AnalysisError::ModelsUnavailable(e.to_string()))?,
        ),
        _ => None,
    };
    let options = FullOptions {
        moderation_sample_fps: job.moderation_sample_fps,
        ocr_sample_fps: job.ocr_sample_fps,
        queue_frames_max: job.queue_frames_max,
    };
    let full = models.as_ref().map(|models| FullAnalysis { models, options: &options });
    let opts = AnalyzeOptions { profile: job.profile, ..AnalyzeOptions::default() };
    // A failed write means the agent is gone; the stdin watcher ends the process then.
    let mut on_opened = |duration_secs| {
        let _ = to_agent.send(&WorkerMessage::Opened { duration_secs });
    };
    let mut on_progress = |p: analysis::ProgressUpdate| {
        let _ = to_agent.send(&WorkerMessage::Progress { fraction: p.fraction, frames_decoded: p.frames_decoded });
    };
    analysis::analyze_opened_with(&media, &opts, full.as_ref(), &mut on_opened, &mut on_progress, cancel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("4G"), Ok(4 << 30));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert_eq!(format_bytes(4 << 30), "4 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(9_542_000), "9.1 MiB");
        assert_eq!(format_bytes(100), "100 bytes");
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("20").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_duration(Duration::from_secs(1200)), "20 min");
        assert_eq!(format_duration(Duration::from_secs(270)), "4 min 30 s");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1 h 30 min");
        assert_eq!(format_duration(Duration::from_millis(300)), "300 ms");
        assert_eq!(format_duration(Duration::from_millis(2500)), "2.5 s");
    }

    #[test]
    fn the_default_timeout_scales_with_the_media() {
        assert_eq!(job_timeout(Some(Duration::from_secs(5)), Some(3600.0)), Duration::from_secs(5));
        assert_eq!(job_timeout(None, Some(10.0)), JOB_TIMEOUT_MIN);
        assert_eq!(job_timeout(None, Some(3600.0)), Duration::from_secs(4 * 3600));
        assert_eq!(job_timeout(None, None), JOB_TIMEOUT_UNKNOWN_DURATION);
        assert_eq!(job_timeout(None, Some(f64::NAN)), JOB_TIMEOUT_UNKNOWN_DURATION);
    }

    #[test]
    fn the_default_memory_limit_is_at_least_1_gib() {
        assert!(default_job_memory_max(64) >= JOB_MEMORY_MIN_BYTES);
        assert!(default_job_memory_max(1) >= default_job_memory_max(2));
    }
}
