//! One simulated agent: the agent's [`AgentSession`] over a real mTLS QUIC connection, driven the
//! way `gaffer_agent::link` drives it, with the job runner and the outbox replaced by memory.
//!
//! * **Link.** Connect with the agent's own certificate (ALPN and TLS exactly as
//!   [`gaffer_agent::link::client_config`] builds them) through a shared client endpoint, open one
//!   bidirectional stream, and pump it through a fresh session: reads go into `handle_input`, the
//!   session's timer into `handle_timeout`, and after every input **all** events are handled before
//!   waiting again; writes go through a bounded queue to a writer task, so reading never waits for a
//!   write. Reads use `read_chunk`, so an idle agent holds no read buffer.
//! * **Heartbeats** at the interval of the Welcome, with the box's drifting health
//!   ([`super::synth::HealthModel`]).
//! * **Jobs.** An Assign is taken into one of `--slots` slots (or waits for one); a started job sends
//!   `JobAccepted`, `Progress` every 2 s as the agent's runner does, and after `--job-delay-ms` its
//!   synthetic digest. Each goes into the in-memory outbox first and is sent through the session's
//!   outbox window with increasing sequence numbers; it leaves the outbox only when the control
//!   plane acknowledges it (or refuses it for good). The Hello of every connection lists the held
//!   jobs (running, waiting, and those whose result is unacknowledged), and a new session resends
//!   every unacknowledged entry: at-least-once, as the agent.
//! * **Reconnects** after a lost or refused connection with the agent's full-jitter exponential
//!   back-off ([`gaffer_agent::link::reconnect_delay`], from [`RECONNECT_BACKOFF_MIN`] doubling to
//!   [`RECONNECT_BACKOFF_MAX`], reset once welcomed).
//!
//! **Sequence numbers** start at the run's start time in Unix microseconds ([`SimAgent::new`]),
//! so an identity reused from `--state-dir` in a later run always sends numbers above the control
//! plane's watermark for it (an agent sends far fewer than a million messages a second).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaffer_agent::link::{CONNECT_TIMEOUT, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN};
use gaffer_protocol::messages::{AgentId, AgentMessage, Assignment, Capabilities, HeldJob, JobId};
use gaffer_protocol::session::{AgentEvent, AgentSession, AgentSessionConfig, CloseReason, SessionError};
use rand::rngs::StdRng;
use rand::Rng as _;
use tokio::sync::{mpsc, watch};

use super::stats::Stats;
use super::synth::{self, HealthModel, JobLoad};

/// How often a running job reports progress (the agent runner's default `progress_interval`).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Outbox entries a simulated agent keeps at most; when full it starts no job and sends no progress
/// until acknowledgements drain it (the agent says `outbox_full` then, as this one does).
pub const OUTBOX_ENTRIES_MAX: usize = 1024;
/// Assignments waiting for a slot at most; one more is refused with `JobRejected` (the control plane
/// leases at most the advertised slots, so this only bounds a misbehaving peer).
pub const WAITING_JOBS_MAX: usize = 1024;
/// Largest chunk taken from the stream per read, bytes.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Byte chunks queued for the writer task at most (the agent's `WRITE_QUEUE_CHUNKS`).
const WRITE_QUEUE_CHUNKS: usize = 16;
/// Outbox entries handed to the session per window fill (the agent's `OUTBOX_BATCH_MAX`).
const OUTBOX_BATCH_MAX: usize = 64;
/// How long a closing connection may take to write its last frames.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// One simulated agent's identity and connection settings.
pub struct AgentSpec {
    /// Position in the fleet (0-based); names the host and seeds its RNG.
    pub index: usize,
    /// The enrolled agent id (its certificate's URI SAN).
    pub agent_id: AgentId,
    /// The QUIC client config with this agent's certificate and key.
    pub quic: quinn::ClientConfig,
}

/// What every simulated agent shares.
pub struct FleetParams {
    /// The control plane's QUIC address.
    pub addr: SocketAddr,
    /// TLS server name (the host of `--control`).
    pub server_name: String,
    /// `--slots`.
    pub job_slots: u32,
    /// `--job-delay-ms`.
    pub job_delay: Duration,
    /// `--seed`.
    pub seed: u64,
    /// The version sent in Hello.
    pub agent_version: String,
    /// First outbox sequence number of this run (see the module docs).
    pub seq_base: u64,
    /// Each agent makes its first connection attempt at a seeded random instant in
    /// `0..=connect_spread` after the start (zero: all at once).
    pub connect_spread: Duration,
    /// The shared counters.
    pub stats: Arc<Stats>,
}

/// Runs agent `spec` over `endpoint` until `shutdown` turns true.
pub async fn run(spec: AgentSpec, endpoint: quinn::Endpoint, fleet: Arc<FleetParams>, shutdown: watch::Receiver<bool>) {
    SimAgent::new(spec, &fleet).run(&endpoint, &fleet, shutdown).await;
}

/// A job that holds a slot.
struct Running {
    assignment: Assignment,
    started: Instant,
    due: Instant,
    next_progress: Option<Instant>,
}

/// Why a connection ended.
enum End {
    /// The run is over.
    Shutdown,
    /// Lost, refused or closed: reconnect after the back-off.
    Lost(String),
}

struct SimAgent {
    index: usize,
    agent_id: AgentId,
    quic: quinn::ClientConfig,
    hostname: String,
    capabilities: Capabilities,
    health: HealthModel,
    digest_rng: StdRng,
    /// Unacknowledged messages by sequence number.
    outbox: BTreeMap<u64, AgentMessage>,
    next_seq: u64,
    /// Results (digests) in the outbox: which job each sequence number finishes.
    results: HashMap<u64, HeldJob>,
    running: Vec<Running>,
    waiting: VecDeque<Assignment>,
}

impl SimAgent {
    fn new(spec: AgentSpec, fleet: &FleetParams) -> Self {
        let health = HealthModel::new(fleet.seed, spec.index);
        let capabilities = synth::capabilities(health.gpu_infos(), fleet.job_slots);
        Self {
            index: spec.index,
            agent_id: spec.agent_id,
            quic: spec.quic,
            hostname: format!("sim-{:05}", spec.index),
            capabilities,
            health,
            digest_rng: synth::agent_rng(fleet.seed, spec.index, 2),
            outbox: BTreeMap::new(),
            next_seq: fleet.seq_base.max(1),
            results: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
        }
    }

    async fn run(mut self, endpoint: &quinn::Endpoint, fleet: &FleetParams, mut shutdown: watch::Receiver<bool>) {
        if !fleet.connect_spread.is_zero() {
            let at = synth::agent_rng(fleet.seed, self.index, 3).gen_range(Duration::ZERO..=fleet.connect_spread);
            tokio::select! {
                () = tokio::time::sleep(at) => {}
                _ = shutdown.changed() => return,
            }
        }
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = Instant::now();
            let (welcomed, end) = self.connection(endpoint, fleet, &mut shutdown).await;
            if welcomed {
                fleet.stats.on_disconnected();
            }
            let reason = match end {
                End::Shutdown => return,
                End::Lost(reason) => reason,
            };
            fleet.stats.link_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The agent's rule: a connection that was welcomed, or lasted longer than the longest
            // back-off, starts the back-off afresh.
            if welcomed || started.elapsed() > RECONNECT_BACKOFF_MAX {
                backoff = RECONNECT_BACKOFF_MIN;
            }
            let delay = gaffer_agent::link::reconnect_delay(backoff);
            tracing::debug!(agent = self.index, %reason, delay_ms = delay.as_millis() as u64, "link down; reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            backoff = gaffer_agent::link::next_backoff(backoff);
        }
    }

    /// Held jobs for the Hello: running, waiting, and finished ones whose result is unacknowledged.
    fn held_jobs(&self) -> Vec<HeldJob> {
        let mut held: Vec<HeldJob> = self
            .running
            .iter()
            .map(|r| &r.assignment)
            .chain(&self.waiting)
            .map(|a| HeldJob { job_id: a.job_id, lease_id: a.lease_id })
            .collect();
        for r in self.results.values() {
            if !held.iter().any(|h| h.job_id == r.job_id) {
                held.push(*r);
            }
        }
        held
    }

    /// One connection: connect, say Hello, pump until it ends. Returns whether it was welcomed.
    async fn connection(
        &mut self,
        endpoint: &quinn::Endpoint,
        fleet: &FleetParams,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (bool, End) {
        let connecting = match endpoint.connect_with(self.quic.clone(), fleet.addr, &fleet.server_name) {
            Ok(c) => c,
            Err(e) => return (false, End::Lost(format!("cannot connect: {e}"))),
        };
        let conn = tokio::select! {
            conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => match conn {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    let reason = e.to_string();
                    if matches!(e, quinn::ConnectionError::ConnectionClosed(_) | quinn::ConnectionError::ApplicationClosed(_)) {
                        fleet.stats.note_refusal(&format!("handshake: {reason}"));
                    }
                    return (false, End::Lost(reason));
                }
                Err(_) => return (false, End::Lost("connection timed out".into())),
            },
            _ = shutdown.changed() => return (false, End::Shutdown),
        };
        let (send, recv) = tokio::select! {
            streams = conn.open_bi() => match streams {
                Ok(s) => s,
                Err(e) => return (false, End::Lost(e.to_string())),
            },
            _ = shutdown.changed() => {
                conn.close(0u32.into(), b"simulation over");
                return (false, End::Shutdown);
            }
        };
        let cfg = AgentSessionConfig {
            agent_id: self.agent_id,
            agent_version: fleet.agent_version.clone(),
            hostname: self.hostname.clone(),
            capabilities: self.capabilities.clone(),
            running_jobs: self.held_jobs(),
            ..AgentSessionConfig::default()
        };
        let session = AgentSession::new(cfg, Instant::now());
        let (chunks, chunk_rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE_CHUNKS);
        let writer = tokio::spawn(write_chunks(send, chunk_rx));
        let mut pump = Pump { session, recv, chunks, writer, welcomed: false };
        let end = pump.run(self, fleet, shutdown).await;
        let welcomed = pump.welcomed;
        match &end {
            End::Shutdown => conn.close(0u32.into(), b"simulation over"),
            End::Lost(_) => conn.close(0u32.into(), b"agent reconnecting"),
        }
        pump.writer.abort();
        (welcomed, end)
    }

    fn push(&mut self, msg: AgentMessage) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.insert(seq, msg);
        seq
    }

    fn outbox_full(&self) -> bool {
        self.outbox.len() >= OUTBOX_ENTRIES_MAX
    }

    fn job_load(&self) -> JobLoad {
        JobLoad {
            jobs_running: self.running.len() as u32,
            job_slots: self.capabilities.job_slots,
            jobs_queued: self.waiting.len() as u32,
            outbox_pending: self.outbox.len() as u64,
            outbox_full: self.outbox_full(),
        }
    }

    /// An Assign: a job already held takes the new lease (a running one says `JobAccepted` again
    /// under it, as the agent's runner does); a new one waits for a slot.
    fn assign(&mut self, a: Assignment, stats: &Stats) {
        if let Some(r) = self.running.iter_mut().find(|r| r.assignment.job_id == a.job_id) {
            r.assignment.lease_id = a.lease_id;
            self.push(AgentMessage::JobAccepted { job_id: a.job_id, lease_id: a.lease_id });
            return;
        }
        if let Some(w) = self.waiting.iter_mut().find(|w| w.job_id == a.job_id) {
            w.lease_id = a.lease_id;
            return;
        }
        if self.waiting.len() >= WAITING_JOBS_MAX {
            stats.assignments_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let reason = format!("simulated agent has {WAITING_JOBS_MAX} jobs waiting for a slot");
            self.push(AgentMessage::JobRejected { job_id: a.job_id, lease_id: a.lease_id, reason });
            return;
        }
        self.waiting.push_back(a);
    }

    fn cancel(&mut self, job_id: JobId) {
        self.running.retain(|r| r.assignment.job_id != job_id);
        self.waiting.retain(|w| w.job_id != job_id);
    }

    /// Moves jobs on at `now`: progress when due, the digest when finished, then starts waiting
    /// jobs in the free slots (while the outbox has room).
    fn advance_jobs(&mut self, now: Instant, job_delay: Duration) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            if r.due <= now {
                let r = self.running.swap_remove(i);
                let a = r.assignment;
                let digest = synth::digest(&a, &mut self.digest_rng, now.duration_since(r.started).as_secs_f64());
                let seq = self.push(AgentMessage::Digest {
                    job_id: a.job_id,
                    lease_id: a.lease_id,
                    digest: Box::new(digest),
                });
                self.results.insert(seq, HeldJob { job_id: a.job_id, lease_id: a.lease_id });
                continue;
            }
            if r.next_progress.is_some_and(|t| t <= now) {
                let fraction = (now.duration_since(r.started).as_secs_f64() / job_delay.as_secs_f64()).min(1.0);
                let (job_id, lease_id) = (r.assignment.job_id, r.assignment.lease_id);
                r.next_progress = now.checked_add(PROGRESS_INTERVAL).filter(|t| *t < r.due);
                // Best effort, as the agent's progress: skipped while the outbox is full.
                if !self.outbox_full() {
                    let frames_decoded = (fraction * job_delay.as_secs_f64() * 24.0) as u64;
                    self.push(AgentMessage::Progress { job_id, lease_id, fraction: fraction as f32, frames_decoded });
                }
            }
            i += 1;
        }
        while self.running.len() < self.capabilities.job_slots as usize && !self.outbox_full() {
            let Some(a) = self.waiting.pop_front() else { break };
            self.push(AgentMessage::JobAccepted { job_id: a.job_id, lease_id: a.lease_id });
            let due = now + job_delay;
            let next_progress = now.checked_add(PROGRESS_INTERVAL).filter(|t| *t < due);
            self.running.push(Running { assignment: a, started: now, due, next_progress });
        }
        if self.running.iter().any(|r| r.due <= now) {
            // Zero delay: the job just started is finished at once.
            self.advance_jobs(now, job_delay);
        }
    }

    /// The next instant a job needs attention.
    fn next_job_deadline(&self) -> Option<Instant> {
        self.running.iter().map(|r| r.next_progress.map_or(r.due, |p| p.min(r.due))).min()
    }
}

/// One connection's driver.
struct Pump {
    session: AgentSession,
    recv: quinn::RecvStream,
    chunks: mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<Result<(), String>>,
    welcomed: bool,
}

impl Pump {
    async fn run(&mut self, agent: &mut SimAgent, fleet: &FleetParams, shutdown: &mut watch::Receiver<bool>) -> End {
        let stats = &fleet.stats;
        let mut held_chunk: Option<Vec<u8>> = None;
        let mut outbox_dirty = false;
        let mut backpressured = false;
        loop {
            // Every event of the last input, timeout or call, before waiting for anything.
            while let Some(event) = self.session.poll_event() {
                let now = Instant::now();
                match event {
                    AgentEvent::Welcomed { heartbeat_interval_secs, .. } => {
                        self.welcomed = true;
                        stats.on_welcomed(agent.index, heartbeat_interval_secs);
                        outbox_dirty = true;
                    }
                    AgentEvent::Assign(a) => {
                        stats.on_assigned(a.job_id, now);
                        agent.assign(a, stats);
                        outbox_dirty = true;
                    }
                    AgentEvent::Cancel { job_id, .. } => {
                        stats.cancels.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        agent.cancel(job_id);
                    }
                    AgentEvent::Acked(seq) => {
                        agent.outbox.remove(&seq);
                        if let Some(done) = agent.results.remove(&seq) {
                            stats.on_succeeded(done.job_id, now);
                        }
                        outbox_dirty = true;
                    }
                    AgentEvent::Rejected { seq, message } => {
                        stats.messages_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        stats.note_refusal(&format!("message refused: {message}"));
                        tracing::warn!(agent = agent.index, seq, %message, "control plane refused a message for good");
                        agent.outbox.remove(&seq);
                        if let Some(done) = agent.results.remove(&seq) {
                            stats.on_result_refused(done.job_id, &message);
                        }
                        outbox_dirty = true;
                    }
                    AgentEvent::RetryLater { .. } => {
                        stats.messages_retry_later.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    AgentEvent::HeartbeatDue => {
                        let health = agent.health.sample(agent.job_load());
                        self.session.send_heartbeat(health, now);
                        stats.heartbeats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    AgentEvent::Closed { reason } => {
                        self.flush(held_chunk.take()).await;
                        if let CloseReason::Refused(r) = &reason {
                            stats.note_refusal(&format!("link: {r}"));
                        }
                        return End::Lost(reason.to_string());
                    }
                    // Certificate renewal, trust bundles, release keys and update orders are the real
                    // agent's business; a simulated agent keeps its enrolled certificate and version.
                    AgentEvent::Certificate { .. }
                    | AgentEvent::CertificateRefused { .. }
                    | AgentEvent::TrustBundle { .. }
                    | AgentEvent::RenewCertificate { .. }
                    | AgentEvent::ReleaseKey { .. }
                    | AgentEvent::Update(_)
                    | AgentEvent::UpdateWithdrawn { .. } => {}
                }
            }
            let len_before = agent.outbox.len();
            agent.advance_jobs(Instant::now(), fleet.job_delay);
            outbox_dirty |= agent.outbox.len() != len_before;
            if outbox_dirty {
                outbox_dirty = false;
                match self.fill_window(agent) {
                    Ok(b) => backpressured = b,
                    Err(e) => return End::Lost(e),
                }
            }
            // Hand what the session wants written to the writer, as far as its queue has room.
            while let Some(chunk) = held_chunk.take().or_else(|| self.session.poll_transmit()) {
                match self.chunks.try_send(chunk) {
                    Ok(()) => outbox_dirty |= backpressured,
                    Err(mpsc::error::TrySendError::Full(chunk)) => {
                        held_chunk = Some(chunk);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return End::Lost(self.writer_failed().await),
                }
            }
            if outbox_dirty {
                continue;
            }

            let deadline = match (self.session.poll_timeout(), agent.next_job_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = tokio::time::sleep_until(
                deadline.map_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600), Into::into),
            );
            let mut writer_gone = false;
            let mut stop = false;
            tokio::select! {
                read = self.recv.read_chunk(READ_CHUNK_BYTES_MAX, true) => match read {
                    Ok(Some(chunk)) => self.session.handle_input(&chunk.bytes, Instant::now()),
                    Ok(None) => self.session.handle_end_of_stream(Instant::now()),
                    Err(e) => return End::Lost(format!("read failed: {e}")),
                },
                // The session ignores a call before its own deadline, so one timer serves both.
                () = sleep, if deadline.is_some() => self.session.handle_timeout(Instant::now()),
                permit = self.chunks.reserve(), if held_chunk.is_some() => match permit {
                    Ok(permit) => {
                        if let Some(chunk) = held_chunk.take() {
                            permit.send(chunk);
                        }
                        outbox_dirty |= backpressured;
                    }
                    Err(_) => writer_gone = true,
                },
                _ = shutdown.changed() => stop = true,
                written = &mut self.writer => {
                    return End::Lost(match written {
                        Ok(Ok(())) => "writer stopped".to_owned(),
                        Ok(Err(e)) => format!("write failed: {e}"),
                        Err(e) => format!("writer task failed: {e}"),
                    });
                }
            }
            if writer_gone {
                return End::Lost(self.writer_failed().await);
            }
            if stop {
                self.flush(held_chunk.take()).await;
                return End::Shutdown;
            }
        }
    }

    /// Sends outbox entries while the session's window is open. Returns whether the transmit
    /// queue pushed back.
    fn fill_window(&mut self, agent: &mut SimAgent) -> Result<bool, String> {
        while let Some((after, max)) = self.session.outbox_window() {
            let batch: Vec<(u64, AgentMessage)> = agent
                .outbox
                .range(after + 1..)
                .take(max.min(OUTBOX_BATCH_MAX))
                .map(|(seq, msg)| (*seq, msg.clone()))
                .collect();
            if batch.is_empty() {
                break;
            }
            for (seq, msg) in batch {
                match self.session.send_outbox(seq, msg) {
                    Ok(()) => {}
                    Err(SessionError::Backpressure { .. }) => return Ok(true),
                    Err(SessionError::Codec(e)) => {
                        // It can never be sent; keeping it would block every later entry.
                        tracing::error!(agent = agent.index, seq, error = %e, "outbox entry cannot be framed; dropping it");
                        agent.outbox.remove(&seq);
                        agent.results.remove(&seq);
                    }
                    Err(e) => return Err(format!("outbox entry {seq}: {e}")),
                }
            }
        }
        Ok(false)
    }

    async fn writer_failed(&mut self) -> String {
        match (&mut self.writer).await {
            Ok(Err(e)) => format!("write failed: {e}"),
            Ok(Ok(())) => "writer stopped".to_owned(),
            Err(e) => format!("writer task failed: {e}"),
        }
    }

    /// Writes what the session still has queued and finishes the stream, bounded by
    /// [`CLOSE_FLUSH_TIMEOUT`].
    async fn flush(&mut self, held_chunk: Option<Vec<u8>>) {
        let mut rest: Vec<Vec<u8>> = held_chunk.into_iter().collect();
        rest.extend(std::iter::from_fn(|| self.session.poll_transmit()));
        let chunks = std::mem::replace(&mut self.chunks, mpsc::channel(1).0);
        let writer = &mut self.writer;
        let flush = async move {
            for chunk in rest {
                if chunks.send(chunk).await.is_err() {
                    break;
                }
            }
            drop(chunks);
            let _ = writer.await;
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, flush).await;
    }
}

async fn write_chunks(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Vec<u8>>) -> Result<(), String> {
    while let Some(chunk) = rx.recv().await {
        send.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    send.finish().map_err(|e| e.to_string())
}
