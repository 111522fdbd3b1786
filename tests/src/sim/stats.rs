//! What the simulation measures: counters shared by every simulated agent, the per-job book that
//! matches submissions (by the id the API returned) with the Assign and the acknowledged Digest
//! the agents saw, latency percentiles, and `/proc` readings of a process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gaffer_protocol::messages::JobId;
use tokio::sync::Notify;

/// Clock ticks per second of `/proc/PID/stat`'s `utime`/`stime`: the kernel's `USER_HZ`, which is
/// 100 on every Linux architecture Gaffer runs on (x86_64, aarch64).
pub const USER_HZ: u64 = 100;

/// Counters and the job book, shared by the agents, the submitters and the sampler.
#[derive(Debug)]
pub struct Stats {
    agents: usize,
    welcomed_ever: Vec<AtomicBool>,
    welcomed_unique: AtomicUsize,
    all_welcomed_at: Mutex<Option<Instant>>,
    all_welcomed: Notify,
    /// When each agent was first welcomed, in order of arrival.
    first_welcomes: Mutex<Vec<Instant>>,
    /// Agents whose link is up now (welcomed, not closed).
    pub connected: AtomicUsize,
    /// Welcomes received, every connection counted (so `welcomes - agents` are reconnects).
    pub welcomes: AtomicU64,
    /// Connection attempts that failed or connections that ended before the run did.
    pub link_failures: AtomicU64,
    /// Heartbeat interval the control plane asked for in its last Welcome, seconds.
    pub heartbeat_interval_secs: AtomicU32,
    /// Heartbeats sent.
    pub heartbeats: AtomicU64,
    /// Outbox entries the control plane refused for good (`Error { retry: false }`).
    pub messages_rejected: AtomicU64,
    /// `Error { retry: true }` answers (the link is then reconnected and the entry resent).
    pub messages_retry_later: AtomicU64,
    /// Cancel messages received.
    pub cancels: AtomicU64,
    /// Assignments a sim agent refused (its local queue was full).
    pub assignments_refused: AtomicU64,
    /// The first reason the control plane gave for a refused message, connection or handshake.
    first_refusal: Mutex<Option<String>>,
    jobs: Mutex<JobBook>,
    job_succeeded: Notify,
}

/// What is known about one job.
#[derive(Debug, Default, Clone)]
struct JobTimes {
    /// When the POST that created it was sent (None: not submitted by this run, or its POST has
    /// not answered yet).
    submitted_at: Option<Instant>,
    /// When a sim agent first received an Assign for it.
    assigned_at: Option<Instant>,
    /// When a sim agent received the control plane's Ack of its Digest.
    succeeded_at: Option<Instant>,
    /// The control plane refused a Digest for it (permanent error), with this reason. The job
    /// itself goes on (it is leased again, or fails), so this does not settle it.
    refused: Option<String>,
}

#[derive(Debug, Default)]
struct JobBook {
    by_id: HashMap<JobId, JobTimes>,
    submitted: usize,
    /// Submitted by this run and succeeded.
    succeeded: usize,
    first_submit: Option<Instant>,
    last_success: Option<Instant>,
}

/// The job numbers at the end of a run.
#[derive(Debug, Clone)]
pub struct JobSummary {
    /// Jobs the API accepted (201) in this run.
    pub submitted: usize,
    /// Of those, jobs whose Digest the control plane acknowledged.
    pub succeeded: usize,
    /// Submitted jobs that did not succeed: up to 5 ids with what was seen of them.
    pub unfinished_examples: Vec<String>,
    /// Jobs assigned to sim agents that this run did not submit (left in the queue by an
    /// earlier run, or a POST that failed after the job was created).
    pub foreign_assigned: usize,
    /// Submit → Assign received, milliseconds, one per submitted job that was assigned.
    pub assign_latency_ms: Vec<f64>,
    /// Submit → Ack of the Digest received, milliseconds, one per succeeded job.
    pub finish_latency_ms: Vec<f64>,
    /// First submit → last acknowledged digest.
    pub submit_to_last_success: Option<Duration>,
}

impl Stats {
    /// Counters for a fleet of `agents`.
    pub fn new(agents: usize) -> Self {
        Self {
            agents,
            welcomed_ever: (0..agents).map(|_| AtomicBool::new(false)).collect(),
            welcomed_unique: AtomicUsize::new(0),
            all_welcomed_at: Mutex::new(None),
            all_welcomed: Notify::new(),
            first_welcomes: Mutex::new(Vec::with_capacity(agents)),
            connected: AtomicUsize::new(0),
            welcomes: AtomicU64::new(0),
            link_failures: AtomicU64::new(0),
            heartbeat_interval_secs: AtomicU32::new(0),
            heartbeats: AtomicU64::new(0),
            messages_rejected: AtomicU64::new(0),
            messages_retry_later: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            assignments_refused: AtomicU64::new(0),
            first_refusal: Mutex::new(None),
            jobs: Mutex::new(JobBook::default()),
            job_succeeded: Notify::new(),
        }
    }

    /// Agent `index` was welcomed on a new connection.
    pub fn on_welcomed(&self, index: usize, heartbeat_interval_secs: u32) {
        self.welcomes.fetch_add(1, Ordering::Relaxed);
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.heartbeat_interval_secs.store(heartbeat_interval_secs, Ordering::Relaxed);
        let first = self.welcomed_ever.get(index).is_some_and(|w| !w.swap(true, Ordering::Relaxed));
        if first {
            lock(&self.first_welcomes).push(Instant::now());
        }
        if first && self.welcomed_unique.fetch_add(1, Ordering::Relaxed) + 1 == self.agents {
            *lock(&self.all_welcomed_at) = Some(Instant::now());
            self.all_welcomed.notify_waiters();
        }
    }

    /// A welcomed connection ended.
    pub fn on_disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// Each agent's first welcome, milliseconds after `start`.
    pub fn first_welcome_ms(&self, start: Instant) -> Vec<f64> {
        lock(&self.first_welcomes).iter().map(|t| ms(t.saturating_duration_since(start))).collect()
    }

    /// Agents welcomed at least once.
    pub fn welcomed_unique(&self) -> usize {
        self.welcomed_unique.load(Ordering::Relaxed)
    }

    /// Waits until every agent was welcomed once (returns when that happened) or `deadline`.
    pub async fn wait_all_welcomed(&self, deadline: tokio::time::Instant) -> Option<Instant> {
        loop {
            let notified = self.all_welcomed.notified();
            if let Some(at) = *lock(&self.all_welcomed_at) {
                return Some(at);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return *lock(&self.all_welcomed_at);
            }
        }
    }

    /// Remembers the first refusal (message, connection or handshake) for the final report.
    pub fn note_refusal(&self, reason: &str) {
        lock(&self.first_refusal).get_or_insert_with(|| reason.to_owned());
    }

    /// The first refusal noted, if any.
    pub fn first_refusal(&self) -> Option<String> {
        lock(&self.first_refusal).clone()
    }

    /// The API created job `id` for a POST sent at `sent_at`.
    pub fn on_submitted(&self, id: JobId, sent_at: Instant) {
        let mut book = lock(&self.jobs);
        book.submitted += 1;
        book.first_submit = Some(book.first_submit.map_or(sent_at, |t| t.min(sent_at)));
        let times = book.by_id.entry(id).or_default();
        times.submitted_at = Some(sent_at);
        // The Assign, even the acknowledged Digest, can arrive before the POST's answer.
        if let Some(at) = times.succeeded_at {
            book.succeeded += 1;
            book.last_success = Some(book.last_success.map_or(at, |t| t.max(at)));
            drop(book);
            self.job_succeeded.notify_waiters();
        }
    }

    /// A sim agent received an Assign for `id` (only the first one counts).
    pub fn on_assigned(&self, id: JobId, at: Instant) {
        lock(&self.jobs).by_id.entry(id).or_default().assigned_at.get_or_insert(at);
    }

    /// The control plane acknowledged a Digest for `id`.
    pub fn on_succeeded(&self, id: JobId, at: Instant) {
        let mut book = lock(&self.jobs);
        let times = book.by_id.entry(id).or_default();
        if times.succeeded_at.is_some() {
            return;
        }
        times.succeeded_at = Some(at);
        if times.submitted_at.is_some() {
            book.succeeded += 1;
            book.last_success = Some(book.last_success.map_or(at, |t| t.max(at)));
            drop(book);
            self.job_succeeded.notify_waiters();
        }
    }

    /// The control plane refused a Digest for `id` for good (the job is not done: the control
    /// plane leases it again or fails it; the reason explains a job that never succeeds).
    pub fn on_result_refused(&self, id: JobId, reason: &str) {
        let mut book = lock(&self.jobs);
        let times = book.by_id.entry(id).or_default();
        if times.succeeded_at.is_none() {
            times.refused = Some(reason.to_owned());
        }
    }

    /// (submitted, succeeded) jobs of this run so far.
    pub fn job_progress(&self) -> (usize, usize) {
        let book = lock(&self.jobs);
        (book.submitted, book.succeeded)
    }

    /// Jobs submitted so far.
    pub fn jobs_submitted(&self) -> usize {
        lock(&self.jobs).submitted
    }

    /// Waits until every submitted job succeeded or `deadline` passes; returns whether all did.
    pub async fn wait_jobs_succeeded(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.job_succeeded.notified();
            let (submitted, succeeded) = self.job_progress();
            if succeeded >= submitted {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let (submitted, succeeded) = self.job_progress();
                return succeeded >= submitted;
            }
        }
    }

    /// The job numbers and latencies.
    pub fn job_summary(&self) -> JobSummary {
        let book = lock(&self.jobs);
        let mut summary = JobSummary {
            submitted: book.submitted,
            succeeded: book.succeeded,
            unfinished_examples: Vec::new(),
            foreign_assigned: 0,
            assign_latency_ms: Vec::new(),
            finish_latency_ms: Vec::new(),
            submit_to_last_success: match (book.first_submit, book.last_success) {
                (Some(a), Some(b)) => Some(b.saturating_duration_since(a)),
                _ => None,
            },
        };
        for (id, t) in &book.by_id {
            let Some(sent) = t.submitted_at else {
                if t.assigned_at.is_some() {
                    summary.foreign_assigned += 1;
                }
                continue;
            };
            if let Some(at) = t.assigned_at {
                summary.assign_latency_ms.push(ms(at.saturating_duration_since(sent)));
            }
            match (t.succeeded_at, &t.refused) {
                (Some(at), _) => summary.finish_latency_ms.push(ms(at.saturating_duration_since(sent))),
                (None, refused) if summary.unfinished_examples.len() < 5 => {
                    let what = match (refused, t.assigned_at) {
                        (Some(reason), _) => format!("digest refused: {reason}"),
                        (None, Some(_)) => "assigned, digest not acknowledged".to_owned(),
                        (None, None) => "never assigned to a sim agent".to_owned(),
                    };
                    summary.unfinished_examples.push(format!("{id} ({what})"));
                }
                _ => {}
            }
        }
        summary
    }
}

/// Milliseconds of `d`, fractional.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`th percentile (0..=100) of `values` by nearest rank; None when empty.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values.get(rank.clamp(1, values.len()) - 1).copied()
}

/// Resident memory of process `pid` (`VmRSS` of `/proc/PID/status`), bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// CPU time process `pid` has used (`utime + stime` of `/proc/PID/stat`).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces, so fields are counted after the last ')';
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// Datagrams the kernel dropped so far on the UDP sockets bound to any of `ports` (the `drops`
/// column of `/proc/net/udp` and `/proc/net/udp6`, summed); None when no such socket is listed.
pub fn udp_drops(ports: &[u16]) -> Option<u64> {
    let mut found = None;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields
                .get(1)
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if port.is_some_and(|p| ports.contains(&p)) {
                let drops: u64 = fields.last().and_then(|d| d.parse().ok()).unwrap_or(0);
                found = Some(found.unwrap_or(0) + drops);
            }
        }
    }
    found
}

/// The 1, 5 and 15 minute load averages of `/proc/loadavg`.
pub fn load_avg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(percentile(&mut [7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn a_digest_acknowledged_before_the_post_answers_still_counts() {
        let stats = Stats::new(1);
        let id = uuid::Uuid::new_v4();
        let sent = Instant::now();
        stats.on_assigned(id, sent + Duration::from_millis(3));
        stats.on_succeeded(id, sent + Duration::from_millis(5));
        assert_eq!(stats.job_progress(), (0, 0), "not ours until the POST answers");
        stats.on_submitted(id, sent);
        let s = stats.job_summary();
        assert_eq!((s.submitted, s.succeeded, s.foreign_assigned), (1, 1, 0));
        assert_eq!(s.assign_latency_ms.len(), 1);
        assert!((s.finish_latency_ms[0] - 5.0).abs() < 0.01);
    }

    #[test]
    fn own_and_foreign_jobs_are_told_apart() {
        let stats = Stats::new(2);
        let (ours, foreign, lost) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let now = Instant::now();
        stats.on_submitted(ours, now);
        stats.on_submitted(lost, now);
        stats.on_assigned(ours, now);
        stats.on_assigned(foreign, now);
        stats.on_succeeded(foreign, now);
        stats.on_result_refused(ours, "not the lease holder");
        let s = stats.job_summary();
        assert_eq!((s.submitted, s.succeeded, s.foreign_assigned), (2, 0, 1));
        assert_eq!(stats.job_progress(), (2, 0), "a refused digest does not finish the job");
        assert_eq!(s.unfinished_examples.len(), 2);
        assert!(s.unfinished_examples.iter().any(|e| e.contains("not the lease holder")));
        assert!(s.unfinished_examples.iter().any(|e| e.contains("never assigned")));
    }

    #[test]
    fn all_welcomed_once_each() {
        let stats = Stats::new(2);
        stats.on_welcomed(0, 5);
        stats.on_disconnected();
        stats.on_welcomed(0, 5);
        assert_eq!(stats.welcomed_unique(), 1);
        assert!(lock(&stats.all_welcomed_at).is_none());
        stats.on_welcomed(1, 5);
        assert_eq!(stats.welcomed_unique(), 2);
        assert!(lock(&stats.all_welcomed_at).is_some());
        assert_eq!(stats.connected.load(Ordering::Relaxed), 2);
        assert_eq!(stats.welcomes.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn proc_readings_of_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
        assert!(cpu_time(me).is_some());
        assert!(load_avg().is_some());
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string());
        let port = socket.as_ref().ok().and_then(|s| s.local_addr().ok()).map(|a| a.port());
        assert_eq!(port.and_then(|p| udp_drops(&[p])), Some(0), "a fresh socket, listed, without drops");
    }
}
