//! The agent's side of the mTLS QUIC link: a thin driver around
//! [`gaffer_protocol::session::AgentSession`].
//!
//! [`run_link`] keeps one connection to the control plane up for the life of the process:
//! connect (ALPN `gaffer/1`, the agent's certificate, trusting only the fleet CA), open one
//! bidirectional stream, and pump it through a fresh `AgentSession` (which says Hello). One
//! `select!` loop reads the stream into `handle_input`, sleeps until `poll_timeout`, fills the
//! session's outbox window when the outbox grows or acknowledgements open it, and hands
//! `poll_transmit` output to a writer task (a bounded queue of byte chunks), so reading goes on
//! while a write is in progress. After every input, timeout and call it drains **all** the
//! session's events before waiting again (issue 7: an Assign that arrived with the Welcome waited
//! for the next read). Assignments, cancellations and dispatch do durable sled work, so they run
//! on one blocking thread per connection, in arrival order.
//!
//! Any failure ends the connection; the loop reconnects after a jittered exponential backoff (full
//! jitter, 0.5 s doubling to 30 s), so a fleet that loses its control plane does not reconnect in
//! lockstep. A new session's window starts at sequence 0, so every unacknowledged outbox entry is
//! sent again, in order. Local work (running jobs, watch folders) carries on while the link is
//! down; results wait in the outbox.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::health::Health;
use gaffer_protocol::messages::{AgentId, Assignment, Capabilities, JobId};
use gaffer_protocol::session::{AgentEvent, AgentSession, AgentSessionConfig, CloseReason, SessionError};
use rand::Rng as _;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::health::HealthSampler;
use crate::outbox::Outbox;
use crate::runner::Runner;
use crate::AgentError;

/// Shortest reconnect delay ceiling.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest reconnect delay ceiling.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC keep-alive interval; the control plane's idle timeout is several times this.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Outbox entries read from sled per batch (the session's in-flight window bounds how many are
/// unacknowledged: 256 by default).
pub const OUTBOX_BATCH_MAX: usize = 64;

/// Link state, for status and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// Not connected; reconnecting.
    Down = 0,
    /// Connecting or saying Hello.
    Connecting = 1,
    /// Connected and welcomed.
    Up = 2,
}

/// Everything the link needs.
pub struct LinkParams {
    /// This agent.
    pub agent_id: AgentId,
    /// `HOST:PORT` of the control plane.
    pub control_addr: String,
    /// Fleet CA PEM.
    pub ca_pem: String,
    /// Agent certificate PEM.
    pub cert_pem: String,
    /// Agent private key PEM (secret).
    pub key_pem: String,
    /// What to advertise in Hello.
    pub capabilities: Capabilities,
}

/// Resolves `HOST:PORT`.
///
/// # Errors
/// [`AgentError::Unreachable`] when it does not resolve.
pub async fn resolve(control_addr: &str) -> Result<SocketAddr, AgentError> {
    tokio::net::lookup_host(control_addr)
        .await
        .map_err(|e| AgentError::Unreachable { addr: control_addr.into(), detail: format!("cannot resolve: {e}") })?
        .next()
        .ok_or_else(|| AgentError::Unreachable { addr: control_addr.into(), detail: "name has no address".into() })
}

/// The TLS server name for `HOST:PORT` (the host part, without IPv6 brackets).
///
/// # Errors
/// [`AgentError::Config`] if there is no `:PORT`.
pub fn server_name_of(control_addr: &str) -> Result<String, AgentError> {
    let (host, _port) = control_addr
        .rsplit_once(':')
        .ok_or_else(|| AgentError::Config(format!("--control {control_addr:?} must be HOST:PORT")))?;
    Ok(host.trim_start_matches('[').trim_end_matches(']').to_owned())
}

/// A client endpoint for `remote`'s address family using `tls`.
///
/// # Errors
/// [`AgentError::Config`] for an unusable TLS config, [`AgentError::Unreachable`] if no UDP socket
/// can be bound.
pub fn client_endpoint(remote: SocketAddr, tls: rustls::ClientConfig) -> Result<quinn::Endpoint, AgentError> {
    let bind: SocketAddr = if remote.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }
        .map_err(|e| AgentError::Config(format!("{e}")))?;
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| AgentError::Unreachable { addr: remote.to_string(), detail: format!("cannot bind UDP: {e}") })?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| AgentError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Shared link state, readable by status and health.
#[derive(Debug, Default)]
pub struct LinkStatus(AtomicU8);

impl LinkStatus {
    /// Current state.
    pub fn get(&self) -> LinkState {
        match self.0.load(Ordering::Relaxed) {
            2 => LinkState::Up,
            1 => LinkState::Connecting,
            _ => LinkState::Down,
        }
    }
    fn set(&self, s: LinkState) {
        self.0.store(s as u8, Ordering::Relaxed);
    }
}

/// Keeps the link up forever (returns only if the configuration is unusable).
///
/// # Errors
/// [`AgentError::Config`]/[`AgentError::Cert`] when the certificates cannot be used at all.
pub async fn run_link(
    params: LinkParams,
    outbox: Outbox,
    runner: Arc<Runner>,
    health: Arc<Mutex<HealthSampler>>,
    status: Arc<LinkStatus>,
) -> Result<(), AgentError> {
    let tls = gaffer_certs::client_config_link(&params.ca_pem, &params.cert_pem, &params.key_pem)?;
    let server_name = server_name_of(&params.control_addr)?;
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        status.set(LinkState::Connecting);
        let started = Instant::now();
        let attempt = async {
            let addr = resolve(&params.control_addr).await?;
            let endpoint = client_endpoint(addr, tls.clone())?;
            let result = session(&params, &endpoint, addr, &server_name, &outbox, &runner, &health, &status).await;
            endpoint.close(0u32.into(), b"agent reconnecting");
            result
        };
        let result = attempt.instrument(tracing::info_span!("link", agent_id = %params.agent_id)).await;
        status.set(LinkState::Down);
        match result {
            Ok(()) => tracing::info!("link closed by the control plane"),
            Err(AgentError::Refused(reason)) => tracing::error!(%reason, "control plane refused this agent"),
            Err(e) => tracing::warn!(error = %e, "link down"),
        }
        if started.elapsed() > RECONNECT_BACKOFF_MAX {
            backoff = RECONNECT_BACKOFF_MIN;
        }
        let delay = rand::thread_rng().gen_range(Duration::ZERO..=backoff);
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    params: &LinkParams,
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    outbox: &Outbox,
    runner: &Arc<Runner>,
    health: &Arc<Mutex<HealthSampler>>,
    status: &LinkStatus,
) -> Result<(), AgentError> {
    let unreachable = |detail: String| AgentError::Unreachable { addr: params.control_addr.clone(), detail };
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, async {
        endpoint
            .connect(addr, server_name)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))
    })
    .await
    .map_err(|_| unreachable("connection timed out".into()))??;
    let (send, recv) = conn.open_bi().await.map_err(|e| unreachable(e.to_string()))?;

    let cfg = AgentSessionConfig {
        agent_id: params.agent_id,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: crate::hostname(),
        capabilities: params.capabilities.clone(),
        running_jobs: runner.running_jobs(),
        ..AgentSessionConfig::default()
    };
    let session = AgentSession::new(cfg, Instant::now());

    // Writes run in their own task, so reading never waits for a write to finish.
    let (chunks, chunk_rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE_CHUNKS);
    let writer = tokio::spawn(write_chunks(send, chunk_rx));
    // Assign, Cancel and dispatch do durable sled work (fsync): one blocking thread per connection
    // applies them in arrival order, so an Assign always lands before its Cancel.
    let (jobs, jobs_rx) = mpsc::channel::<JobCommand>(JOB_COMMANDS_MAX);
    let job_thread = {
        let runner = runner.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| apply_job_commands(&runner, jobs_rx)))
    };

    let mut pump = Pump {
        session,
        recv,
        chunks,
        writer,
        jobs,
        outbox,
        health,
        runner,
        status,
        control_addr: &params.control_addr,
    };
    let result = pump.run().await;
    pump.writer.abort();
    // Every Assign this connection received is applied before the next Hello lists held jobs.
    drop(pump.jobs);
    if let Err(e) = job_thread.await {
        tracing::error!(error = %e, "applying assignments failed");
    }
    result
}

/// Byte chunks queued for the writer task at most (each up to `TRANSMIT_CHUNK_BYTES`, or one
/// larger frame); past it the pump holds one chunk and waits, reading on.
const WRITE_QUEUE_CHUNKS: usize = 16;
/// Assign/Cancel/dispatch commands queued for the job thread at most; past it the pump waits
/// (and stops reading), so the control plane is pushed back instead of anything being dropped.
const JOB_COMMANDS_MAX: usize = 256;
/// Read buffer, bytes.
const READ_BUF_BYTES: usize = 64 * 1024;
/// How long a closing session may take to write its last frames, e.g. acknowledgements.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Work for the runner, in the order the control plane sent it.
enum JobCommand {
    Assign(Assignment),
    Cancel { job_id: JobId, reason: String },
    Dispatch,
}

fn apply_job_commands(runner: &Arc<Runner>, mut rx: mpsc::Receiver<JobCommand>) {
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            JobCommand::Assign(a) => runner.enqueue_assignment(a),
            JobCommand::Cancel { job_id, reason } => {
                tracing::info!(%job_id, %reason, "control plane cancelled the job");
                runner.cancel(job_id);
            }
            JobCommand::Dispatch => runner.dispatch(),
        }
    }
}

async fn write_chunks(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Vec<u8>>) -> Result<(), String> {
    while let Some(chunk) = rx.recv().await {
        send.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    send.finish().map_err(|e| e.to_string())
}

/// Resolves with the sample when one is being taken, never otherwise.
async fn sampled(job: &mut Option<tokio::task::JoinHandle<Health>>) -> Result<Health, tokio::task::JoinError> {
    match job {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// One connection's driver: moves bytes between the quinn stream and the [`AgentSession`], and
/// acts on the session's events.
struct Pump<'a> {
    session: AgentSession,
    recv: quinn::RecvStream,
    chunks: mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<Result<(), String>>,
    jobs: mpsc::Sender<JobCommand>,
    outbox: &'a Outbox,
    health: &'a Arc<Mutex<HealthSampler>>,
    runner: &'a Arc<Runner>,
    status: &'a LinkStatus,
    control_addr: &'a str,
}

impl Pump<'_> {
    fn unreachable(&self, detail: String) -> AgentError {
        AgentError::Unreachable { addr: self.control_addr.to_owned(), detail }
    }

    async fn run(&mut self) -> Result<(), AgentError> {
        let mut buf = vec![0u8; READ_BUF_BYTES];
        // A chunk the writer queue had no room for; sent before anything else.
        let mut held_chunk: Option<Vec<u8>> = None;
        let mut sampling: Option<tokio::task::JoinHandle<Health>> = None;
        let mut outbox_dirty = false;
        let mut backpressured = false;
        let mut writer_gone = false;
        loop {
            // Every event of the last input, timeout or call, before waiting for anything.
            while let Some(event) = self.session.poll_event() {
                match event {
                    AgentEvent::Welcomed { protocol_version, server_version, heartbeat_interval_secs } => {
                        tracing::info!(protocol_version, %server_version, heartbeat_interval_secs, "link up");
                        self.status.set(LinkState::Up);
                        outbox_dirty = true;
                    }
                    AgentEvent::Assign(a) => self.job(JobCommand::Assign(a)).await?,
                    AgentEvent::Cancel { job_id, reason } => self.job(JobCommand::Cancel { job_id, reason }).await?,
                    AgentEvent::Acked(seq) => {
                        self.remove_from_outbox(seq).await?;
                        outbox_dirty = true;
                    }
                    AgentEvent::Rejected { seq, message } => {
                        tracing::error!(seq, %message, "control plane will never accept this message; dropping it");
                        self.remove_from_outbox(seq).await?;
                        outbox_dirty = true;
                    }
                    AgentEvent::RetryLater { seq, message } => {
                        tracing::warn!(seq, %message, "control plane could not store a message; reconnecting to resend");
                    }
                    AgentEvent::HeartbeatDue => {
                        if sampling.is_none() {
                            sampling = Some(self.sample_health());
                        }
                    }
                    AgentEvent::Closed { reason } => return self.close(held_chunk.take(), reason).await,
                    AgentEvent::Certificate { .. }
                    | AgentEvent::CertificateRefused { .. }
                    | AgentEvent::TrustBundle { .. }
                    | AgentEvent::RenewCertificate { .. } => {
                        tracing::debug!("certificate lifecycle message (online renewal lands with issue 8)");
                    }
                }
            }
            if outbox_dirty {
                outbox_dirty = false;
                backpressured = self.fill_window()?;
            }
            // Hand what the session wants written to the writer, as far as its queue has room.
            while let Some(chunk) = held_chunk.take().or_else(|| self.session.poll_transmit()) {
                match self.chunks.try_send(chunk) {
                    Ok(()) => outbox_dirty |= backpressured,
                    Err(mpsc::error::TrySendError::Full(chunk)) => {
                        held_chunk = Some(chunk);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.writer_failed().await),
                }
            }
            if outbox_dirty {
                continue;
            }

            let deadline = self.session.poll_timeout();
            let sleep = tokio::time::sleep_until(
                deadline.map_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600), Into::into),
            );
            tokio::select! {
                read = self.recv.read(&mut buf) => match read {
                    Ok(Some(n)) => self.session.handle_input(&buf[..n], Instant::now()),
                    Ok(None) => self.session.handle_end_of_stream(Instant::now()),
                    Err(e) => return Err(self.unreachable(e.to_string())),
                },
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
                () = self.outbox.pushed() => outbox_dirty = true,
                sample = sampled(&mut sampling) => {
                    sampling = None;
                    match sample {
                        Ok(h) => self.session.send_heartbeat(h, Instant::now()),
                        Err(e) => tracing::warn!(error = %e, "health sampling failed; skipping this heartbeat"),
                    }
                }
                written = &mut self.writer => {
                    let detail = match written {
                        Ok(Ok(())) => "writer stopped".to_owned(),
                        Ok(Err(e)) => format!("write failed: {e}"),
                        Err(e) => format!("writer task failed: {e}"),
                    };
                    return Err(self.unreachable(detail));
                }
            }
            if writer_gone {
                return Err(self.writer_failed().await);
            }
        }
    }

    /// Queues work for the job thread in order (waits while its queue is full).
    async fn job(&self, cmd: JobCommand) -> Result<(), AgentError> {
        self.jobs.send(cmd).await.map_err(|_| AgentError::Protocol("the job thread stopped".into()))
    }

    /// Deletes an acknowledged (or rejected) entry; restarts dispatch when that un-fills the outbox.
    async fn remove_from_outbox(&self, seq: u64) -> Result<(), AgentError> {
        let was_full = self.outbox.is_full();
        self.outbox.ack(seq)?;
        if was_full && !self.outbox.is_full() {
            self.job(JobCommand::Dispatch).await?;
        }
        Ok(())
    }

    /// Sends outbox entries while the session's window is open. Returns whether the transmit queue
    /// pushed back (then it is tried again once the writer took some bytes).
    fn fill_window(&mut self) -> Result<bool, AgentError> {
        while let Some((after, max)) = self.session.outbox_window() {
            let batch = self.outbox.pending_after(after, max.min(OUTBOX_BATCH_MAX))?;
            if batch.is_empty() {
                break;
            }
            for (seq, msg) in batch {
                match self.session.send_outbox(seq, msg) {
                    Ok(()) => {}
                    Err(SessionError::Backpressure { .. }) => return Ok(true),
                    Err(SessionError::Codec(e)) => {
                        // It can never be sent; keeping it would block every later entry.
                        tracing::error!(seq, error = %e, "outbox entry cannot be framed; dropping it");
                        self.outbox.ack(seq)?;
                    }
                    Err(e) => return Err(AgentError::Protocol(format!("outbox entry {seq}: {e}"))),
                }
            }
        }
        Ok(false)
    }

    fn sample_health(&self) -> tokio::task::JoinHandle<Health> {
        let health = self.health.clone();
        let (running, slots) = (self.runner.jobs_running(), self.runner.job_slots());
        let (queued, pending, full) = (self.runner.jobs_queued(), self.outbox.len(), self.outbox.is_full());
        tokio::task::spawn_blocking(move || {
            let mut h = health.lock().unwrap_or_else(|p| p.into_inner()).sample(running, slots);
            h.jobs_queued = queued;
            h.outbox_pending = pending;
            h.outbox_full = full;
            h
        })
    }

    async fn writer_failed(&mut self) -> AgentError {
        let detail = match (&mut self.writer).await {
            Ok(Err(e)) => format!("write failed: {e}"),
            Ok(Ok(())) => "writer stopped".to_owned(),
            Err(e) => format!("writer task failed: {e}"),
        };
        self.unreachable(detail)
    }

    /// Writes what the session still has queued, finishes the stream (bounded by
    /// [`CLOSE_FLUSH_TIMEOUT`]), and maps the reason to the link's result.
    async fn close(&mut self, held_chunk: Option<Vec<u8>>, reason: CloseReason) -> Result<(), AgentError> {
        let mut rest: Vec<Vec<u8>> = held_chunk.into_iter().collect();
        rest.extend(std::iter::from_fn(|| self.session.poll_transmit()));
        // Taking the sender out lets the writer see the end of its queue and finish the stream.
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
        if tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, flush).await.is_err() {
            tracing::debug!("closing: the last frames were not written in time");
        }
        match reason {
            CloseReason::PeerFinished => Ok(()),
            CloseReason::Refused(reason) => Err(AgentError::Refused(reason)),
            CloseReason::HeartbeatTimeout | CloseReason::WelcomeTimeout | CloseReason::RetryLater(_) => {
                Err(self.unreachable(reason.to_string()))
            }
            other => Err(AgentError::Protocol(other.to_string())),
        }
    }
}
