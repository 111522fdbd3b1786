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
//! lockstep. With several control-plane addresses (`run --control A --control B`: replicas sharing
//! one database), every attempt that fails and every connection that ends moves to the next
//! address, and the back-off doubles once per round of all of them: an agent whose control plane
//! dies is on the next one after one jittered delay (at most 0.5 s once it had been connected)
//! plus the time its connection takes to notice (the QUIC idle timeout). A new session's window starts at sequence 0, so every unacknowledged outbox entry is
//! sent again, in order. Local work (running jobs, watch folders) carries on while the link is
//! down; results wait in the outbox.
//!
//! **Certificates** ([`crate::credentials`]). Every connection attempt reads the key, certificate
//! and trust bundle from disk and builds its TLS config from them, so a renewed certificate, a new
//! trust bundle or an `enroll --renew` run by the operator is used at the next attempt. Once
//! welcomed by a protocol-3 control plane, and on every heartbeat tick, the driver checks whether
//! the certificate is past half its life ([`crate::credentials::renewal_due_at_ms`]); then it makes
//! `agent.next.key` (or reuses one whose request went unanswered) and sends its CSR. The answer is
//! stored as `agent.next.pem` (and its CAs as `ca.pem`), the connection is ended gracefully and the
//! next one, at once and with the new pair, switches files over when it is welcomed. A new pair the
//! control plane refuses in the handshake is dropped while the old certificate is valid, and
//! renewal is retried later, as after a `CertificateRefused` (a tenth of the remaining validity, 5 s
//! to 1 h). `RenewCertificate` renews at once; `TrustBundle` replaces `ca.pem`; `ReleaseKey` is
//! pinned if none is yet and refused if another is ([`crate::release_key`]). Reconnecting for a
//! new certificate leaves the outbox, the job queue and running jobs alone: the next Hello lists
//! the held jobs and the outbox is sent again from its start. With an expired certificate the agent
//! logs the `gaffer-agent enroll --renew` command to run and keeps trying once a minute.
//!
//! **GPU XID errors.** [`run_link`] starts the sampler's XID watcher
//! ([`HealthSampler::watch_xid_errors`]). On a connection that agreed
//! [`gaffer_protocol::XID_PROTOCOL_VERSION`] or later the driver queues the counts in the outbox
//! once after the Welcome (when the agent has GPUs) and then at a heartbeat tick whenever they
//! changed ([`xid_report`]), so at most one report per heartbeat interval; over an older link none
//! is queued, and one left in the outbox from a newer link is dropped by the session unsent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_protocol::health::{GpuXidCount, Health};
use gaffer_protocol::messages::{AgentId, AgentMessage, Assignment, Capabilities, JobId};
use gaffer_protocol::session::{AgentEvent, AgentSession, AgentSessionConfig, CloseReason, SessionError};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::credentials::{self, CertPair, Credentials, Slot};
use crate::datadir::{AgentIdentity, DataDir};
use crate::health::{HealthSampler, XidCounts};
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
/// Wait between attempts while the certificate has expired or the key files are unusable (the
/// operator may run `gaffer-agent enroll --renew` meanwhile; the next attempt reads the files again).
pub const CREDENTIALS_RETRY: Duration = Duration::from_secs(60);
/// How long a certificate request may stay unanswered on a connection before it is sent again
/// (with the same key), at most: a tenth of the certificate's remaining validity when that is
/// shorter, but at least 5 s (a 60 s certificate asks again within its life).
pub const CERT_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// The first protocol version with online renewal; a control plane that agreed an older one never
/// answers a certificate request, so none is sent.
pub const RENEWAL_PROTOCOL_VERSION_MIN: u16 = 3;
/// The application close codes with which the control plane refuses this agent's certificate
/// (`gaffer_control::link::close_code`): `UNAUTHENTICATED` (1, no usable agent in it), `REVOKED`
/// (6) and `CERT_EXPIRED` (7).
pub const CLOSE_CODES_REFUSING_CERT: [u32; 3] = [1, 6, 7];

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
    /// This agent (`agent.json`): its id, site, control plane address and CA fingerprint.
    pub identity: AgentIdentity,
    /// The data directory: key, certificate and trust bundle are read from it for every connection
    /// attempt, renewed ones written to it.
    pub data_dir: DataDir,
    /// What to advertise in Hello.
    pub capabilities: Capabilities,
    /// Where update orders go ([`crate::update::Updater`]); None: orders are logged and ignored
    /// (tests that drive the link without an updater).
    pub updates: Option<mpsc::Sender<crate::update::UpdateCommand>>,
    /// Control-plane addresses `HOST:PORT` in failover order (`run --control`, config `control`);
    /// empty: `identity.control_addr` alone. See [`control_addrs`].
    pub control_addrs: Vec<String>,
}

/// The addresses the link tries, in order: `configured` when it lists any, else the enrolled one.
pub fn control_addrs(identity: &AgentIdentity, configured: &[String]) -> Vec<String> {
    if configured.is_empty() {
        vec![identity.control_addr.clone()]
    } else {
        configured.to_vec()
    }
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
    endpoint.set_default_client_config(client_config(tls)?);
    Ok(endpoint)
}

/// The QUIC client config of every agent connection over `tls` (from
/// `gaffer_certs::client_config_link` or `client_config_enroll`): QUIC keep-alives every
/// [`KEEP_ALIVE_INTERVAL`], quinn's defaults otherwise. [`client_endpoint`] makes it the endpoint's
/// default; `quinn::Endpoint::connect_with` takes it per connection (the fleet simulator carries
/// many agents' identities on one endpoint that way).
///
/// # Errors
/// [`AgentError::Config`] for a TLS config QUIC cannot use (no TLS 1.3).
pub fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, AgentError> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| AgentError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// How long to wait before the next connection attempt under back-off ceiling `ceiling`: full
/// jitter, uniformly random in `0..=ceiling`, so a fleet that lost its control plane does not come
/// back in lockstep. The ceiling starts at [`RECONNECT_BACKOFF_MIN`] (and goes back there once a
/// connection was welcomed) and grows by [`next_backoff`].
pub fn reconnect_delay(ceiling: Duration) -> Duration {
    rand::thread_rng().gen_range(Duration::ZERO..=ceiling)
}

/// The back-off ceiling after `ceiling` was used up without a welcome: doubled, at most
/// [`RECONNECT_BACKOFF_MAX`].
pub fn next_backoff(ceiling: Duration) -> Duration {
    (ceiling * 2).min(RECONNECT_BACKOFF_MAX)
}

/// Shared link state, readable by status and health.
#[derive(Debug, Default)]
pub struct LinkStatus {
    state: AtomicU8,
    renewal: Mutex<RenewalStatus>,
    control_addr: Mutex<String>,
}

/// Where online certificate renewal stands, for `gaffer-agent status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalStatus {
    /// After a refusal: renewal is not asked for again before this time, Unix milliseconds.
    pub retry_at_ms: Option<u64>,
    /// The last renewal problem (a refusal's reason, an unusable answer), cleared by a renewal.
    pub last_error: Option<String>,
    /// When this process last switched to a renewed certificate, Unix milliseconds.
    pub last_renewed_at_ms: Option<u64>,
}

impl LinkStatus {
    /// Current state.
    pub fn get(&self) -> LinkState {
        match self.state.load(Ordering::Relaxed) {
            2 => LinkState::Up,
            1 => LinkState::Connecting,
            _ => LinkState::Down,
        }
    }
    fn set(&self, s: LinkState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    /// The control-plane address the link is on or trying now (empty before the first attempt).
    pub fn control_addr(&self) -> String {
        self.control_addr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set_control_addr(&self, addr: &str) {
        *self.control_addr.lock().unwrap_or_else(|p| p.into_inner()) = addr.to_owned();
    }
    /// Where certificate renewal stands.
    pub fn renewal(&self) -> RenewalStatus {
        self.renewal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set_renewal(&self, r: &Renewal) {
        let mut status = self.renewal.lock().unwrap_or_else(|p| p.into_inner());
        status.retry_at_ms = (r.retry_at_ms > crate::now_ms()).then_some(r.retry_at_ms);
        status.last_error = r.last_error.clone();
        status.last_renewed_at_ms = r.last_renewed_at_ms;
    }
}

/// Renewal state kept across connections.
#[derive(Debug, Default)]
struct Renewal {
    /// Do not ask before this time (Unix ms; 0: no wait).
    retry_at_ms: u64,
    /// The control plane asked for a renewal now (`RenewCertificate`), with its reason.
    renew_now: Option<String>,
    /// Serial of a renewed certificate the control plane refused in the handshake: the current
    /// pair is used instead.
    refused_next_serial: Option<String>,
    last_error: Option<String>,
    last_renewed_at_ms: Option<u64>,
}

impl Renewal {
    /// Backs off after a refusal of `pair`'s renewal.
    fn refused(&mut self, now_ms: u64, not_after_ms: u64, reason: String) {
        self.retry_at_ms = now_ms + credentials::renewal_retry_after_ms(now_ms, not_after_ms);
        self.last_error = Some(reason);
    }
}

/// The key and certificate a connection attempt uses, and what it needs to decide on renewal.
struct AttemptCreds {
    slot: Slot,
    pair: CertPair,
    /// When `pair` is due for renewal, Unix ms.
    due_at_ms: u64,
    /// The current pair, when `slot` is [`Slot::Next`] (the fallback).
    current: Option<CertPair>,
    tls: rustls::ClientConfig,
}

/// Reads the key files, finishes an interrupted promotion, picks the pair to connect with and
/// builds its TLS config (blocking file I/O).
fn attempt_creds(
    dd: &DataDir,
    agent_id: AgentId,
    refused_next_serial: Option<&str>,
) -> Result<AttemptCreds, AgentError> {
    if credentials::recover(dd, agent_id)? {
        tracing::info!("finished switching to the renewed certificate (the agent stopped half way)");
    }
    let creds = Credentials::load(dd, agent_id)?;
    let (slot, pair) = creds.for_connecting(refused_next_serial).ok_or_else(|| {
        AgentError::Config(format!(
            "{} holds no key and certificate of this agent that belong together",
            dd.root().display()
        ))
    })?;
    let ca_pem = dd.read(&dd.ca_path())?;
    let tls = gaffer_certs::client_config_link(&ca_pem, &pair.cert_pem, &pair.key_pem)?;
    Ok(AttemptCreds {
        slot,
        pair: pair.clone(),
        due_at_ms: creds.renewal_due_at_ms(pair),
        current: if slot == Slot::Next { creds.current.clone() } else { None },
        tls,
    })
}

/// What the operator runs to re-enroll this agent keeping its identity.
pub fn renew_command(identity: &AgentIdentity, dd: &DataDir) -> String {
    format!(
        "gaffer-agent enroll --data-dir {} --renew --control {} --ca-fingerprint {} --token TOKEN \
         (TOKEN from `gaffer-control token create --site {}`)",
        dd.root().display(),
        identity.control_addr,
        identity.ca_fingerprint,
        identity.site
    )
}

/// Keeps the link up forever (returns only if the configuration is unusable). Unusable key files
/// or an expired certificate do not end it: it logs what to do and tries again every
/// [`CREDENTIALS_RETRY`], reading the files afresh each time.
///
/// # Errors
/// [`AgentError::Config`] when the control address is not `HOST:PORT`.
pub async fn run_link(
    params: LinkParams,
    outbox: Outbox,
    runner: Arc<Runner>,
    health: Arc<Mutex<HealthSampler>>,
    status: Arc<LinkStatus>,
) -> Result<(), AgentError> {
    let agent_id = params.identity.agent_id;
    let targets = control_addrs(&params.identity, &params.control_addrs)
        .into_iter()
        .map(|addr| server_name_of(&addr).map(|name| (addr, name)))
        .collect::<Result<Vec<_>, _>>()?;
    // Which address the next attempt uses; it moves on after every attempt that fails or
    // connection that ends, and the back-off grows once per round of all addresses.
    let mut target = 0usize;
    let mut failed_in_round = 0usize;
    let mut renewal = Renewal::default();
    let mut backoff = RECONNECT_BACKOFF_MIN;
    // NVML registration blocks (briefly): not on an async worker.
    let xid = {
        let health = health.clone();
        tokio::task::spawn_blocking(move || health.lock().unwrap_or_else(|p| p.into_inner()).watch_xid_errors(agent_id))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "starting the XID watcher failed; GPU XID errors are not reported");
                XidCounts::default()
            })
    };
    loop {
        let (control_addr, server_name) = &targets[target % targets.len()];
        status.set_control_addr(control_addr);
        status.set(LinkState::Connecting);
        let started = Instant::now();
        let now_ms = crate::now_ms();
        let creds = {
            let (dd, refused) = (params.data_dir.clone(), renewal.refused_next_serial.clone());
            tokio::task::spawn_blocking(move || attempt_creds(&dd, agent_id, refused.as_deref()))
                .await
                .unwrap_or_else(|e| Err(AgentError::Config(format!("reading the key files: {e}"))))
        };
        let creds = match creds {
            Ok(c) => c,
            Err(e) => {
                status.set(LinkState::Down);
                tracing::error!(error = %e, next_step = %renew_command(&params.identity, &params.data_dir),
                    "cannot connect: no usable key and certificate; retrying in a minute");
                tokio::time::sleep(CREDENTIALS_RETRY).await;
                continue;
            }
        };
        let expired = creds.pair.expired_at(now_ms);
        if expired {
            tracing::error!(serial = %creds.pair.serial_hex, not_after = %crate::rfc3339_ms(creds.pair.not_after_ms),
                next_step = %renew_command(&params.identity, &params.data_dir),
                "this agent's certificate has expired, so the control plane will refuse it; re-enroll keeping the \
                 agent id, job queue and outbox with the command in next_step (local work goes on meanwhile)");
        }
        let (slot, serial) = (creds.slot, creds.pair.serial_hex.clone());
        let current = creds.current.clone();
        let span = tracing::info_span!("link", agent_id = %agent_id, cert_serial = %serial, control = %control_addr);
        let attempt = async {
            let addr = resolve(control_addr).await?;
            let endpoint = client_endpoint(addr, creds.tls.clone())?;
            let ctx = SessionCtx {
                params: &params,
                endpoint: &endpoint,
                addr,
                control_addr,
                server_name,
                outbox: &outbox,
                runner: &runner,
                health: &health,
                xid: &xid,
                status: &status,
            };
            let result = session(ctx, creds, &mut renewal).await;
            endpoint.close(0u32.into(), b"agent reconnecting");
            result
        };
        let (welcomed, result) = match attempt.instrument(span).await {
            Ok(outcome) => (outcome.welcomed, outcome.result),
            Err(e) => (false, Err(e)),
        };
        status.set(LinkState::Down);
        let mut delay_min = if expired { CREDENTIALS_RETRY } else { Duration::ZERO };
        match result {
            Ok(SessionEnd::SwitchCertificate) => {
                tracing::info!("reconnecting at once with the renewed certificate");
                backoff = RECONNECT_BACKOFF_MIN;
                continue;
            }
            Ok(SessionEnd::PeerFinished) => tracing::info!("link closed by the control plane"),
            Err(AgentError::Refused(reason)) if slot == Slot::Next && !welcomed => {
                match current.filter(|c| !c.expired_at(now_ms)) {
                    Some(current) => {
                        tracing::error!(%reason, refused_serial = %serial, fallback_serial = %current.serial_hex,
                            "the control plane refused the renewed certificate; back to the previous one, renewal \
                             retried later");
                        let dd = params.data_dir.clone();
                        match tokio::task::spawn_blocking(move || credentials::discard_next_cert(&dd)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!(error = %e, "could not remove the refused certificate"),
                            Err(e) => tracing::warn!(error = %e, "could not remove the refused certificate"),
                        }
                        renewal.refused_next_serial = Some(serial.clone());
                        renewal.refused(now_ms, current.not_after_ms, format!("renewed certificate refused: {reason}"));
                        status.set_renewal(&renewal);
                        // The previous pair is tried at once.
                        continue;
                    }
                    None => tracing::error!(%reason, next_step = %renew_command(&params.identity, &params.data_dir),
                        "the control plane refused the renewed certificate and the previous one has expired"),
                }
            }
            Err(AgentError::Refused(reason)) => tracing::error!(%reason, "control plane refused this agent"),
            Err(e) => tracing::warn!(error = %e, "link down"),
        }
        if welcomed || started.elapsed() > RECONNECT_BACKOFF_MAX {
            backoff = RECONNECT_BACKOFF_MIN;
            failed_in_round = 0;
        } else {
            failed_in_round += 1;
        }
        if !welcomed && slot == Slot::Next {
            // The renewed pair could not be tried (network): it stays, and is tried again.
            delay_min = delay_min.max(RECONNECT_BACKOFF_MIN);
        }
        // Fail over: the next attempt goes to the next address (a control plane that just went
        // away is the least likely to answer), after a jittered delay like any reconnect.
        target = (target + 1) % targets.len();
        let delay = reconnect_delay(backoff).max(delay_min);
        let next = &targets[target].0;
        tracing::info!(delay_ms = delay.as_millis() as u64, control = %next, "reconnecting");
        tokio::time::sleep(delay).await;
        if failed_in_round >= targets.len() {
            // A whole round without a welcome: slow down.
            backoff = next_backoff(backoff);
            failed_in_round = 0;
        }
    }
}

/// How a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The control plane finished the stream.
    PeerFinished,
    /// A renewed certificate arrived: reconnect at once with it.
    SwitchCertificate,
}

/// What one connection attempt came to.
struct SessionOutcome {
    /// Whether the control plane welcomed this connection.
    welcomed: bool,
    result: Result<SessionEnd, AgentError>,
}

/// What a connection borrows from the link loop.
struct SessionCtx<'a> {
    params: &'a LinkParams,
    endpoint: &'a quinn::Endpoint,
    addr: SocketAddr,
    /// The `HOST:PORT` being connected to (for errors and logs).
    control_addr: &'a str,
    server_name: &'a str,
    outbox: &'a Outbox,
    runner: &'a Arc<Runner>,
    health: &'a Arc<Mutex<HealthSampler>>,
    xid: &'a XidCounts,
    status: &'a LinkStatus,
}

/// An error from the connection: a handshake or close by the control plane that refuses this
/// agent's certificate becomes [`AgentError::Refused`], anything else [`AgentError::Unreachable`].
fn connection_error(control_addr: &str, e: &quinn::ConnectionError) -> AgentError {
    match e {
        // CONNECTION_CLOSE with a TLS alert (crypto error range 0x100-0x1ff): the peer's TLS
        // refused the handshake, i.e. our certificate.
        quinn::ConnectionError::ConnectionClosed(c) if (0x100..0x200).contains(&u64::from(c.error_code)) => {
            AgentError::Refused(format!(
                "the control plane refused this agent's certificate in the TLS handshake ({c})"
            ))
        }
        quinn::ConnectionError::ApplicationClosed(c)
            if CLOSE_CODES_REFUSING_CERT.iter().any(|code| u64::from(*code) == u64::from(c.error_code)) =>
        {
            AgentError::Refused(String::from_utf8_lossy(&c.reason).into_owned())
        }
        other => AgentError::Unreachable { addr: control_addr.to_owned(), detail: other.to_string() },
    }
}

async fn session(
    ctx: SessionCtx<'_>,
    creds: AttemptCreds,
    renewal: &mut Renewal,
) -> Result<SessionOutcome, AgentError> {
    let control_addr = ctx.control_addr;
    let unreachable = |detail: String| AgentError::Unreachable { addr: control_addr.to_owned(), detail };
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, async {
        ctx.endpoint
            .connect(ctx.addr, ctx.server_name)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| connection_error(control_addr, &e))
    })
    .await
    .map_err(|_| unreachable("connection timed out".into()))??;
    let (send, recv) = conn.open_bi().await.map_err(|e| connection_error(control_addr, &e))?;

    // Held: what the runner holds, and the finished jobs whose result still waits in the outbox
    // (their leases are ours until the control plane has the result).
    let mut running_jobs = ctx.runner.running_jobs();
    match ctx.outbox.unacknowledged_results(OUTBOX_RESULTS_SCAN_MAX) {
        Ok(results) => {
            for r in results {
                if !running_jobs.iter().any(|h| h.job_id == r.job_id) {
                    running_jobs.push(r);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read the outbox for unacknowledged results"),
    }
    let cfg = AgentSessionConfig {
        agent_id: ctx.params.identity.agent_id,
        agent_version: crate::build_version().to_owned(),
        hostname: crate::hostname(),
        capabilities: ctx.params.capabilities.clone(),
        running_jobs,
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
        let runner = ctx.runner.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| apply_job_commands(&runner, jobs_rx)))
    };

    let mut pump = Pump {
        session,
        conn: conn.clone(),
        recv,
        chunks,
        writer,
        jobs,
        outbox: ctx.outbox,
        health: ctx.health,
        xid: ctx.xid,
        xid_queued: None,
        runner: ctx.runner,
        status: ctx.status,
        control_addr,
        data_dir: &ctx.params.data_dir,
        agent_id: ctx.params.identity.agent_id,
        cert: creds,
        renewal,
        welcomed: false,
        protocol_version: 0,
        request_sent_at: None,
        updates: ctx.params.updates.as_ref(),
    };
    let result = pump.run().await;
    let welcomed = pump.welcomed;
    pump.writer.abort();
    // Every Assign this connection received is applied before the next Hello lists held jobs.
    drop(pump.jobs);
    if let Err(e) = job_thread.await {
        tracing::error!(error = %e, "applying assignments failed");
    }
    if matches!(result, Ok(SessionEnd::SwitchCertificate)) {
        // Our stream is finished: give the control plane a moment to read its end and close, so
        // our last frames are not cut off (bounded; unacknowledged messages are sent again anyway).
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, conn.closed()).await;
        conn.close(0u32.into(), b"switching to a renewed certificate");
    }
    Ok(SessionOutcome { welcomed, result })
}

/// Byte chunks queued for the writer task at most (each up to `TRANSMIT_CHUNK_BYTES`, or one
/// larger frame); past it the pump holds one chunk and waits, reading on.
const WRITE_QUEUE_CHUNKS: usize = 16;
/// Assign/Cancel/dispatch commands queued for the job thread at most; past it the pump waits
/// (and stops reading), so the control plane is pushed back instead of anything being dropped.
const JOB_COMMANDS_MAX: usize = 256;
/// Oldest outbox entries scanned for unacknowledged results when saying Hello (a backlog deeper
/// than this is sent before the next Hello anyway).
const OUTBOX_RESULTS_SCAN_MAX: usize = 4096;
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
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    chunks: mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<Result<(), String>>,
    jobs: mpsc::Sender<JobCommand>,
    outbox: &'a Outbox,
    health: &'a Arc<Mutex<HealthSampler>>,
    /// The GPUs' XID counts (the sampler's watcher records them).
    xid: &'a XidCounts,
    /// The XID counts this connection last queued in the outbox (None before the first).
    xid_queued: Option<Vec<GpuXidCount>>,
    runner: &'a Arc<Runner>,
    status: &'a LinkStatus,
    control_addr: &'a str,
    data_dir: &'a DataDir,
    agent_id: AgentId,
    /// The pair this connection uses.
    cert: AttemptCreds,
    renewal: &'a mut Renewal,
    welcomed: bool,
    /// Agreed in the Welcome (0 before).
    protocol_version: u16,
    /// When this connection sent a certificate request that is not answered yet.
    request_sent_at: Option<Instant>,
    /// Where update orders go.
    updates: Option<&'a mpsc::Sender<crate::update::UpdateCommand>>,
}

impl Pump<'_> {
    /// A failed read or write: the connection's close reason when it has one (a refusal of our
    /// certificate shows up here, after the handshake), else `detail`.
    fn unreachable(&self, detail: String) -> AgentError {
        match self.conn.close_reason() {
            Some(e) => connection_error(self.control_addr, &e),
            None => AgentError::Unreachable { addr: self.control_addr.to_owned(), detail },
        }
    }

    async fn run(&mut self) -> Result<SessionEnd, AgentError> {
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
                        self.welcomed = true;
                        self.protocol_version = protocol_version;
                        outbox_dirty = true;
                        self.queue_xid_counts().await;
                        if self.cert.slot == Slot::Next {
                            self.promote().await;
                        }
                        self.maybe_renew("half its lifetime has passed").await;
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
                        self.queue_xid_counts().await;
                        self.maybe_renew("half its lifetime has passed").await;
                    }
                    AgentEvent::Closed { reason } => return self.close(held_chunk.take(), reason).await,
                    AgentEvent::Certificate { cert_pem, ca_pems } => {
                        if self.install_certificate(cert_pem, ca_pems).await {
                            self.flush(held_chunk.take()).await;
                            return Ok(SessionEnd::SwitchCertificate);
                        }
                    }
                    AgentEvent::CertificateRefused { reason } => {
                        self.request_sent_at = None;
                        let now_ms = crate::now_ms();
                        self.renewal.refused(now_ms, self.cert.pair.not_after_ms, format!("CSR refused: {reason}"));
                        self.status.set_renewal(self.renewal);
                        tracing::warn!(%reason, retry_at = %crate::rfc3339_ms(self.renewal.retry_at_ms),
                            "the control plane refused to renew the certificate; asking again later");
                    }
                    AgentEvent::TrustBundle { ca_pems } => self.install_trust_bundle(ca_pems).await,
                    AgentEvent::ReleaseKey { public_key } => {
                        // Pinned if none is yet; another key is refused and logged (file I/O: not
                        // on an async worker).
                        let dd = self.data_dir.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            crate::release_key::pin_offered(&dd, &public_key, "link")
                        })
                        .await;
                    }
                    AgentEvent::Update(order) => {
                        tracing::info!(rollout_id = order.rollout_id, version = %order.version, "update order");
                        let cmd = crate::update::UpdateCommand::Order { order, conn: self.conn.clone() };
                        self.update_command(cmd);
                    }
                    AgentEvent::UpdateWithdrawn { rollout_id, reason } => {
                        self.update_command(crate::update::UpdateCommand::Withdrawn { rollout_id, reason });
                    }
                    AgentEvent::RenewCertificate { reason } => {
                        tracing::info!(%reason, "the control plane asks for a certificate renewal now");
                        self.renewal.renew_now = Some(reason);
                        self.renewal.retry_at_ms = 0;
                        self.request_sent_at = None;
                        self.maybe_renew("the control plane asked for it").await;
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
    /// Hands an update order or withdrawal to the updater; dropped (with a warning) when its queue
    /// is full or there is none: the control plane sends orders again on the next connection.
    fn update_command(&self, cmd: crate::update::UpdateCommand) {
        match self.updates {
            Some(tx) => {
                if tx.try_send(cmd).is_err() {
                    tracing::warn!("update queue full; the order comes again on the next connection");
                }
            }
            None => tracing::warn!("this agent runs without an updater; update order ignored"),
        }
    }

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
                    Err(e @ SessionError::PeerTooOld { .. }) => {
                        // The control plane cannot take it (it agreed an older protocol): drop it here.
                        tracing::info!(seq, error = %e, "outbox entry not spoken by the control plane; dropping it");
                        self.outbox.ack(seq)?;
                    }
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

    /// Queues the GPUs' XID counts in the outbox when [`xid_report`] says so. A failed push is logged
    /// and tried again at the next heartbeat tick.
    async fn queue_xid_counts(&mut self) {
        let counts = self.xid.counts();
        let Some(msg) = xid_report(self.protocol_version, &counts, self.xid_queued.as_deref()) else { return };
        let outbox = self.outbox.clone();
        // The push fsyncs: not on an async worker.
        match tokio::task::spawn_blocking(move || outbox.push(&msg)).await {
            Ok(Ok(seq)) => {
                tracing::debug!(seq, gpus = counts.len(), "GPU XID counts queued");
                self.xid_queued = Some(counts);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not queue the GPU XID counts; trying at the next heartbeat")
            }
            Err(e) => tracing::warn!(error = %e, "could not queue the GPU XID counts; trying at the next heartbeat"),
        }
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

    /// Writes what the session still has queued and finishes the stream, bounded by
    /// [`CLOSE_FLUSH_TIMEOUT`].
    async fn flush(&mut self, held_chunk: Option<Vec<u8>>) {
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
    }

    /// Flushes ([`Pump::flush`]) and maps the close reason to the link's result.
    async fn close(&mut self, held_chunk: Option<Vec<u8>>, reason: CloseReason) -> Result<SessionEnd, AgentError> {
        self.flush(held_chunk).await;
        match reason {
            CloseReason::PeerFinished => Ok(SessionEnd::PeerFinished),
            CloseReason::Refused(reason) => Err(AgentError::Refused(reason)),
            CloseReason::HeartbeatTimeout | CloseReason::WelcomeTimeout | CloseReason::RetryLater(_) => {
                Err(self.unreachable(reason.to_string()))
            }
            other => Err(AgentError::Protocol(other.to_string())),
        }
    }

    /// After the Welcome of a connection made with the renewed pair: makes it the current one.
    async fn promote(&mut self) {
        let (dd, agent_id) = (self.data_dir.clone(), self.agent_id);
        let promoted = tokio::task::spawn_blocking(move || {
            let pair = credentials::promote(&dd, agent_id)?;
            let creds = Credentials::load(&dd, agent_id)?;
            let due_at_ms = creds.renewal_due_at_ms(&pair);
            Ok::<_, AgentError>((pair, due_at_ms))
        })
        .await
        .unwrap_or_else(|e| Err(AgentError::Config(format!("switching key files: {e}"))));
        match promoted {
            Ok((pair, due_at_ms)) => {
                tracing::info!(serial = %pair.serial_hex, not_after = %crate::rfc3339_ms(pair.not_after_ms),
                    renewal_at = %crate::rfc3339_ms(due_at_ms), "switched to the renewed certificate");
                self.cert.slot = Slot::Current;
                self.cert.pair = pair;
                self.cert.due_at_ms = due_at_ms;
                self.cert.current = None;
                self.renewal.renew_now = None;
                self.renewal.refused_next_serial = None;
                self.renewal.last_error = None;
                self.renewal.last_renewed_at_ms = Some(crate::now_ms());
                self.status.set_renewal(self.renewal);
            }
            // The files still hold a working pair (the renewed one is tried again next time).
            Err(e) => tracing::error!(error = %e, "could not switch the key files to the renewed certificate"),
        }
    }

    /// Asks for a renewed certificate when one is due (past half life, or asked for), the control
    /// plane speaks protocol 3, the link is up, this connection uses the current pair, no request
    /// is waiting for its answer and no refusal's back-off is running.
    async fn maybe_renew(&mut self, why: &str) {
        if self.protocol_version < RENEWAL_PROTOCOL_VERSION_MIN
            || !self.session.is_up()
            || self.cert.slot != Slot::Current
        {
            return;
        }
        let now_ms = crate::now_ms();
        let answer_timeout =
            Duration::from_millis(credentials::renewal_retry_after_ms(now_ms, self.cert.pair.not_after_ms))
                .min(CERT_ANSWER_TIMEOUT);
        match self.request_sent_at {
            Some(t) if t.elapsed() < answer_timeout => return,
            Some(t) => tracing::warn!(
                waited_ms = t.elapsed().as_millis() as u64,
                "no answer to the certificate request; asking again"
            ),
            None => {}
        }
        let asked = self.renewal.renew_now.is_some();
        if !(asked || now_ms >= self.cert.due_at_ms) || now_ms < self.renewal.retry_at_ms {
            return;
        }
        let (dd, agent_id) = (self.data_dir.clone(), self.agent_id);
        // The key is on disk (0600) before its CSR leaves.
        let csr = tokio::task::spawn_blocking(move || {
            credentials::next_key(&dd)?.csr_pem(agent_id).map_err(AgentError::from)
        })
        .await
        .unwrap_or_else(|e| Err(AgentError::Config(format!("making the renewal key: {e}"))));
        let sent = csr.and_then(|csr| {
            self.session.send_certificate_request(csr).map_err(|e| AgentError::Protocol(e.to_string()))
        });
        match sent {
            Ok(()) => {
                self.request_sent_at = Some(Instant::now());
                let reason = self.renewal.renew_now.as_deref().unwrap_or(why);
                tracing::info!(serial = %self.cert.pair.serial_hex, not_after = %crate::rfc3339_ms(self.cert.pair.not_after_ms),
                    %reason, "asking the control plane for a renewed certificate (new key made on this box)");
            }
            Err(e) => {
                self.renewal.refused(now_ms, self.cert.pair.not_after_ms, format!("renewal request failed: {e}"));
                self.status.set_renewal(self.renewal);
                tracing::error!(error = %e, retry_at = %crate::rfc3339_ms(self.renewal.retry_at_ms),
                    "could not ask for a renewed certificate");
            }
        }
    }

    /// Stores a certificate the control plane issued (for `agent.next.key`) and its trust bundle.
    /// Returns whether the connection should now end so the next one uses it.
    async fn install_certificate(&mut self, cert_pem: String, ca_pems: Vec<String>) -> bool {
        self.request_sent_at = None;
        let (dd, agent_id) = (self.data_dir.clone(), self.agent_id);
        let now_ms = crate::now_ms();
        let installed = tokio::task::spawn_blocking(move || {
            let pair = credentials::install_next_cert(&dd, agent_id, &cert_pem, now_ms)?;
            // The CAs to trust from now on; a bad set keeps ca.pem (the control plane's CA is in it).
            let trust = credentials::write_trust_bundle(&dd, &ca_pems);
            Ok::<_, AgentError>((pair, trust))
        })
        .await
        .unwrap_or_else(|e| Err(AgentError::Config(format!("storing the certificate: {e}"))));
        match installed {
            Ok((pair, trust)) => {
                match trust {
                    Ok(true) => tracing::info!("trust bundle updated with the renewed certificate"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the renewed certificate came with an unusable trust bundle; keeping ca.pem")
                    }
                }
                tracing::info!(serial = %pair.serial_hex, not_after = %crate::rfc3339_ms(pair.not_after_ms),
                    "renewed certificate received; reconnecting with it");
                true
            }
            Err(e) => {
                self.renewal.refused(now_ms, self.cert.pair.not_after_ms, format!("unusable certificate: {e}"));
                self.status.set_renewal(self.renewal);
                tracing::error!(error = %e, retry_at = %crate::rfc3339_ms(self.renewal.retry_at_ms),
                    "the control plane's certificate cannot be used; keeping the current one");
                false
            }
        }
    }

    /// Replaces `ca.pem` with the control plane's trust bundle when it differs.
    async fn install_trust_bundle(&mut self, ca_pems: Vec<String>) {
        let dd = self.data_dir.clone();
        let count = ca_pems.len();
        match tokio::task::spawn_blocking(move || credentials::write_trust_bundle(&dd, &ca_pems)).await {
            Ok(Ok(true)) => tracing::info!(cas = count, "trust bundle updated; used from the next connection"),
            Ok(Ok(false)) => tracing::debug!(cas = count, "trust bundle unchanged"),
            Ok(Err(e)) => tracing::warn!(error = %e, "refused the control plane's trust bundle; keeping ca.pem"),
            Err(e) => tracing::warn!(error = %e, "storing the trust bundle failed"),
        }
    }
}

/// The GPU XID report to queue now on a connection that agreed `protocol_version`, given the
/// `counts` now and what this connection `queued` last (None before its first): the counts when the
/// link speaks [`gaffer_protocol::XID_PROTOCOL_VERSION`] or later, the agent has GPUs that report
/// XID events, and the counts differ from `queued`. None otherwise — in particular always over an
/// older link, which could not decode the message.
pub fn xid_report(
    protocol_version: u16,
    counts: &[GpuXidCount],
    queued: Option<&[GpuXidCount]>,
) -> Option<AgentMessage> {
    if protocol_version < gaffer_protocol::XID_PROTOCOL_VERSION || counts.is_empty() || queued == Some(counts) {
        return None;
    }
    Some(AgentMessage::GpuXidErrors { counts: counts.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::XidTally;

    #[test]
    fn xid_counts_go_once_per_connection_and_on_change_over_protocol_6_only() {
        let mut tally = XidTally::new([0, 1]);
        let zero = tally.counts();
        let v6 = gaffer_protocol::XID_PROTOCOL_VERSION;
        let v5 = gaffer_protocol::UPDATE_PROTOCOL_VERSION;

        // First report of a connection: the zero counts too, so the series exist from the start.
        assert_eq!(xid_report(v6, &zero, None), Some(AgentMessage::GpuXidErrors { counts: zero.clone() }));
        assert_eq!(xid_report(v6, &zero, Some(&zero)), None, "unchanged: nothing at the next heartbeat");
        assert_eq!(xid_report(v5, &zero, None), None, "never over a protocol-5 link");

        tally.record(1, 79);
        let after = tally.counts();
        let Some(AgentMessage::GpuXidErrors { counts }) = xid_report(v6, &after, Some(&zero)) else {
            panic!("a change on a protocol-6 link is sent");
        };
        assert_eq!(counts[1], GpuXidCount { index: 1, errors: 1, last_xid: Some(79) });
        assert_eq!(xid_report(v5, &after, Some(&zero)), None, "not even a change over protocol 5");
        assert_eq!(xid_report(v6, &[], None), None, "an agent without GPUs sends nothing");
        assert_eq!(xid_report(0, &after, None), None, "nothing before the Welcome");
    }
}
