//! The agent's side of the mTLS QUIC link.
//!
//! [`run_link`] keeps one connection to the control plane up for the life of the process:
//! connect (ALPN `gaffer/1`, the agent's certificate, trusting only the fleet CA), say Hello, then
//! in one loop: read control messages, send heartbeats on the interval the control plane asked for,
//! and send outbox entries in sequence order. Any failure ends the connection; the loop reconnects
//! after a jittered exponential backoff (full jitter, 0.5 s doubling to 30 s), so a fleet that loses
//! its control plane does not reconnect in lockstep. Local work (running jobs, watch folders)
//! carries on while the link is down; results wait in the outbox.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::codec::{encode_frame, FrameDecoder};
use gaffer_protocol::messages::{AgentId, AgentMessage, Capabilities, ControlMessage};
use gaffer_protocol::version::VersionRange;
use gaffer_protocol::{AgentEnvelope, FRAME_BYTES_MAX_DEFAULT};
use rand::Rng as _;
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
/// Outbox entries sent per batch.
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
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(e.to_string()))?;
    let frame = |body: AgentMessage, seq: u64| {
        encode_frame(&AgentEnvelope { agent_id: params.agent_id, seq, body }, FRAME_BYTES_MAX_DEFAULT)
    };

    let hello = AgentMessage::Hello {
        versions: VersionRange::ours(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: crate::hostname(),
        capabilities: params.capabilities.clone(),
        running_jobs: runner.running_jobs(),
    };
    send.write_all(&frame(hello, 0)?).await.map_err(|e| unreachable(e.to_string()))?;

    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut buf = vec![0u8; 64 * 1024];
    let heartbeat_interval_secs = loop {
        match dec.next_message::<ControlMessage>()? {
            Some(ControlMessage::Welcome { heartbeat_interval_secs, protocol_version, server_version }) => {
                tracing::info!(protocol_version, %server_version, "link up");
                break heartbeat_interval_secs.max(1);
            }
            Some(ControlMessage::Refused { reason }) => return Err(AgentError::Refused(reason)),
            Some(other) => return Err(AgentError::Protocol(format!("expected Welcome, got {other:?}"))),
            None => {}
        }
        let read = tokio::time::timeout(CONNECT_TIMEOUT, recv.read(&mut buf))
            .await
            .map_err(|_| unreachable("no Welcome within 10 s".into()))?;
        match read.map_err(|e| unreachable(e.to_string()))? {
            Some(n) => dec.push(&buf[..n]),
            None => return Err(unreachable("control plane closed the stream before Welcome".into())),
        }
    };
    status.set(LinkState::Up);

    let mut heartbeat = tokio::time::interval(Duration::from_secs(u64::from(heartbeat_interval_secs)));
    let mut sent_upto = 0u64;
    loop {
        // Send whatever the outbox holds beyond what this connection already sent.
        loop {
            let batch = outbox.pending_after(sent_upto, OUTBOX_BATCH_MAX)?;
            if batch.is_empty() {
                break;
            }
            for (seq, msg) in batch {
                send.write_all(&frame(msg, seq)?).await.map_err(|e| unreachable(e.to_string()))?;
                sent_upto = seq;
            }
        }
        tokio::select! {
            read = recv.read(&mut buf) => {
                match read.map_err(|e| unreachable(e.to_string()))? {
                    Some(n) => dec.push(&buf[..n]),
                    None => { dec.finish()?; return Ok(()); }
                }
                while let Some(msg) = dec.next_message::<ControlMessage>()? {
                    handle_control(msg, outbox, runner)?;
                }
            }
            _ = heartbeat.tick() => {
                let health = health.clone();
                let (running, slots) = (runner.jobs_running(), runner.job_slots());
                let (queued, pending, full) = (runner.jobs_queued(), outbox.len(), outbox.is_full());
                let sample = tokio::task::spawn_blocking(move || {
                    let mut h = health.lock().unwrap_or_else(|p| p.into_inner()).sample(running, slots);
                    h.jobs_queued = queued;
                    h.outbox_pending = pending;
                    h.outbox_full = full;
                    h
                })
                .await
                .map_err(|e| AgentError::Protocol(format!("health sampling failed: {e}")))?;
                send.write_all(&frame(AgentMessage::Heartbeat(sample), 0)?).await.map_err(|e| unreachable(e.to_string()))?;
            }
            _ = outbox.pushed() => {}
        }
    }
}

fn handle_control(msg: ControlMessage, outbox: &Outbox, runner: &Arc<Runner>) -> Result<(), AgentError> {
    match msg {
        ControlMessage::Ack { seq } => {
            let was_full = outbox.is_full();
            outbox.ack(seq)?;
            if was_full && !outbox.is_full() {
                runner.dispatch();
            }
        }
        ControlMessage::Assign(a) => runner.enqueue_assignment(a),
        ControlMessage::Cancel { job_id } => runner.cancel(job_id),
        ControlMessage::Error { seq, message, retry: true } => {
            return Err(AgentError::Protocol(format!(
                "control plane could not store message {seq}: {message}; will resend"
            )));
        }
        ControlMessage::Error { seq, message, retry: false } => {
            tracing::error!(seq, %message, "control plane will never accept this message; dropping it");
            outbox.ack(seq)?;
        }
        ControlMessage::Welcome { .. } => tracing::debug!("duplicate Welcome ignored"),
        ControlMessage::Refused { reason } => return Err(AgentError::Refused(reason)),
    }
    Ok(())
}
