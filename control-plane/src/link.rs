//! The QUIC endpoint: enrollment and the agent link.
//!
//! One UDP port, one quinn endpoint, two ALPNs (see `gaffer_certs::server_config`):
//! * `gaffer-enroll/1`: no client certificate; one [`EnrollRequest`] → one [`EnrollResponse`].
//! * `gaffer/1`: the client certificate must chain to the fleet CA (checked in the TLS handshake)
//!   and name an enrolled agent (checked here). One bidirectional stream, opened by the agent,
//!   carries [`AgentEnvelope`]s up and [`ControlMessage`]s down (framing: `gaffer_protocol::codec`).
//!
//! The agent link is a thin driver around [`ControlSession`] (sans-IO, in `gaffer_protocol`): it
//! feeds the stream's bytes in, handles every event the session has decoded before reading again
//! (Hello → lease reconciliation and registration in the [`Fleet`]; messages → [`Ingest`], then
//! an acknowledgement or a permanent/retryable error; heartbeats → bounded health history), moves
//! the agent's queued assignments and cancellations from the fleet into the session as far as the
//! session's transmit bound allows (the rest waits, nothing is dropped), and writes the session's
//! output through a bounded queue to a writer task so reading never waits for a write.
//!
//! Delivery: a message with `seq > 0` is applied and flushed before it is acknowledged; a
//! redelivery is acknowledged again without being applied; a report refused by the lease check is
//! answered with a permanent error. Heartbeats carry `seq == 0` and are never acknowledged.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use gaffer_certs::EnrollmentToken;
use gaffer_protocol::codec::{CodecError, FrameDecoder};
use gaffer_protocol::enroll::{EnrollRequest, EnrollResponse, ENROLL_FRAME_BYTES_MAX};
use gaffer_protocol::messages::{AgentId, AgentMessage, ControlMessage, HeldJob};
use gaffer_protocol::session::{CloseReason, ControlEvent, ControlSession, ControlSessionConfig};
use gaffer_protocol::version::{negotiate, VersionRange};
use gaffer_protocol::{AgentEnvelope, ALPN_AGENT_LINK, ALPN_ENROLL, FRAME_BYTES_MAX_DEFAULT};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::admission::{self, Admission, AdmissionConfig, Admit};
use crate::identity::Pki;
use crate::ingest::truncate;
use crate::ingest::{Ingest, IngestError, Ingested};
use crate::scheduler::AgentConn;
use crate::store::{audit_action, Actor, AgentRecord, AuditRecord, StoreError, UnixMs};
use crate::AppState;

/// How long a new link connection has to open its stream and say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals without any frame from the agent before its link is declared dead.
pub const HEARTBEAT_MISSES_MAX: u32 = 3;
/// Bound on encoded control messages queued in one session and not yet written, bytes.
pub const TRANSMIT_BYTES_MAX: usize = 1024 * 1024;
/// Encoded chunks waiting for the stream writer of one connection.
pub const WRITE_QUEUE_CHUNKS_MAX: usize = 64;
/// Outgoing messages moved from the fleet queue into the session per loop turn.
pub const OUTGOING_BATCH_MAX: usize = 64;

/// Link settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Heartbeat interval the agents are told to use, seconds. Default 5.
    pub heartbeat_interval_secs: u32,
    /// A connection with no traffic for this long is dead (agents send QUIC keep-alives every
    /// third of it). Default 10 s.
    pub idle_timeout: Duration,
    /// If set, every frame received from an agent is appended here as a JSON line (agent id,
    /// sequence, kind, size, payload): an audit trail of exactly what left the boxes.
    pub wire_audit_log: Option<PathBuf>,
    /// The control plane's age X25519 recipient (`age1...`), sent to agents at enrollment so they
    /// can encrypt offline-sync bundles to it. Default None.
    pub bundle_recipient: Option<String>,
    /// The release key offered to agents in the enrollment answer and after every Welcome
    /// (protocol 4), for them to pin. Default None (none offered).
    pub release_key: Option<Arc<crate::release::ReleaseKeySource>>,
    /// The releases agents may fetch on their link ([`gaffer_protocol::release_fetch`], protocol 5).
    /// Default None (every fetch refused).
    pub releases: Option<crate::release::Releases>,
    /// Admission control of the accept loop (QUIC Retry, caps on handshakes and enrollment
    /// connections; see [`crate::admission`]). Default [`AdmissionConfig::default`].
    pub admission: AdmissionConfig,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: 5,
            idle_timeout: Duration::from_secs(10),
            wire_audit_log: None,
            bundle_recipient: None,
            release_key: None,
            releases: None,
            admission: AdmissionConfig::default(),
        }
    }
}

/// Errors that end one connection.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The QUIC connection failed or closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer sent bytes that are not a valid frame.
    #[error("framing: {0}")]
    Codec(#[from] CodecError),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Setting up the endpoint failed.
    #[error("endpoint setup: {0}")]
    Setup(String),
}

/// QUIC application error codes sent when the control plane closes a connection.
pub mod close_code {
    /// Normal close.
    pub const OK: u32 = 0;
    /// The client presented no certificate on `gaffer/1`, or one naming no enrolled agent.
    pub const UNAUTHENTICATED: u32 = 1;
    /// Protocol versions do not overlap.
    pub const VERSION: u32 = 2;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 3;
    /// Unknown ALPN.
    pub const ALPN: u32 = 4;
    /// A server-side failure (store).
    pub const INTERNAL: u32 = 5;
    /// The agent was revoked while connected.
    pub const REVOKED: u32 = 6;
    /// The agent's certificate expired while connected (it renews online at half its life; this
    /// one did not).
    pub const CERT_EXPIRED: u32 = 7;
}

/// Builds the quinn server config: TLS from `rustls_config`, idle timeout and stream limits, and
/// at most [`crate::admission::INCOMING_MAX`] incoming connections waiting for the accept loop.
///
/// # Errors
/// [`LinkError::Setup`] if rustls' config cannot be used for QUIC.
pub fn quinn_server_config(
    rustls_config: rustls::ServerConfig,
    cfg: &LinkConfig,
) -> Result<quinn::ServerConfig, LinkError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls_config)
        .map_err(|e| LinkError::Setup(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(cfg.idle_timeout.try_into().map_err(|e| LinkError::Setup(format!("{e}")))?))
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    server.max_incoming(crate::admission::INCOMING_MAX);
    Ok(server)
}

/// Shared state of the endpoint.
pub struct Link {
    state: AppState,
    ingest: Arc<Ingest>,
    pki: Arc<Pki>,
    cfg: LinkConfig,
    conn_ids: AtomicU64,
    audit: Option<Arc<WireAudit>>,
    admission: Admission,
}

impl Link {
    /// The ingest path this link applies agent messages through (offline-sync bundles use the
    /// same one, so one agent's messages are never applied concurrently).
    pub fn ingest(&self) -> Arc<Ingest> {
        self.ingest.clone()
    }

    /// A link over `state`.
    ///
    /// # Errors
    /// [`LinkError::Setup`] if the wire audit log cannot be opened.
    pub fn new(state: AppState, pki: Arc<Pki>, cfg: LinkConfig) -> Result<Arc<Self>, LinkError> {
        let audit = match &cfg.wire_audit_log {
            Some(path) => Some(Arc::new(WireAudit::open(path)?)),
            None => None,
        };
        let ingest = Arc::new(Ingest::new(state.clone()));
        let admission = Admission::new(cfg.admission, state.metrics.clone());
        Ok(Arc::new(Self { state, ingest, pki, cfg, conn_ids: AtomicU64::new(1), audit, admission }))
    }

    /// Accepts connections until the endpoint closes, through admission control
    /// ([`crate::admission`]): a Retry to an unvalidated address, a refusal over the handshake cap,
    /// else the handshake, holding its place until it completes or fails.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(mut incoming) = endpoint.accept().await {
            let mut admit = self.admission.admit(incoming.remote_address_validated());
            if let Admit::Retry = admit {
                match incoming.retry() {
                    Ok(()) => {
                        self.admission.retry_sent();
                        continue;
                    }
                    // Only a validated address cannot be sent a Retry: it goes on as one.
                    Err(e) => {
                        incoming = e.into_incoming();
                        admit = self.admission.handshake();
                    }
                }
            }
            let permit = match admit {
                Admit::Accept(permit) => permit,
                Admit::Refuse | Admit::Retry => {
                    let remote = incoming.remote_address();
                    tracing::debug!(%remote, "refused a connection: too many handshakes in progress");
                    incoming.refuse();
                    continue;
                }
            };
            let link = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let handshake = incoming.await;
                drop(permit);
                match handshake {
                    Ok(conn) => link.handle_connection(conn, remote).await,
                    Err(e) => {
                        // The verifier counted a certificate refusal under its reason already;
                        // this counts every failed handshake (bad certificates, but also
                        // timeouts and garbage), so the two never add up twice.
                        link.state.metrics.handshake_failed();
                        match e {
                            // A refused certificate or a protocol error: worth an operator's look.
                            quinn::ConnectionError::TransportError(_)
                            | quinn::ConnectionError::ConnectionClosed(_)
                            | quinn::ConnectionError::VersionMismatch => {
                                tracing::warn!(%remote, error = %e, "QUIC handshake failed");
                            }
                            // A client that gave up or went away (every one of a reconnect
                            // storm's timeouts): counted in gaffer_quic_handshakes_failed_total,
                            // not a log line each.
                            _ => tracing::debug!(%remote, error = %e, "QUIC handshake did not finish"),
                        }
                    }
                }
            });
        }
    }

    async fn handle_connection(self: Arc<Self>, conn: quinn::Connection, remote: SocketAddr) {
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        match alpn.as_deref() {
            Some(p) if p == ALPN_ENROLL => {
                let Some(_place) = self.admission.enroll_connection() else {
                    tracing::debug!(%remote, "closed an enrollment connection: too many open");
                    conn.close(admission::close_code::BUSY.into(), admission::BUSY_REASON.as_bytes());
                    return;
                };
                let span = tracing::info_span!("enroll", %remote);
                if let Err(e) = self.enroll(&conn).instrument(span.clone()).await {
                    span.in_scope(|| tracing::warn!(error = %e, "enrollment connection failed"));
                }
            }
            Some(p) if p == ALPN_AGENT_LINK => {
                let agent_id = match self.authenticate(&conn) {
                    Ok(id) => id,
                    Err(reason) => {
                        self.state.metrics.handshake_refused("unauthenticated");
                        tracing::warn!(%remote, %reason, "refused link connection");
                        conn.close(close_code::UNAUTHENTICATED.into(), reason.as_bytes());
                        return;
                    }
                };
                let conn_id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("link", agent_id = %agent_id, conn_id, %remote);
                let result = self.clone().session(&conn, agent_id, conn_id).instrument(span.clone()).await;
                span.in_scope(|| match result {
                    Ok(()) => tracing::info!("agent link closed"),
                    Err(e) => tracing::warn!(error = %e, "agent link ended"),
                });
            }
            _ => {
                self.state.metrics.handshake_refused("alpn");
                conn.close(close_code::ALPN.into(), b"unknown ALPN");
            }
        }
    }

    /// The agent id of an authenticated connection, or why it is refused.
    fn authenticate(&self, conn: &quinn::Connection) -> Result<AgentId, String> {
        let certs = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .ok_or_else(|| "no client certificate: enroll first (gaffer-agent enroll)".to_owned())?;
        let agent_id = gaffer_certs::peer_agent_id(&certs).map_err(|e| e.to_string())?;
        match self.state.store.get_agent(agent_id) {
            Ok(Some(a)) if a.revoked_at_ms.is_some() => Err(format!("agent {agent_id} is revoked")),
            Ok(Some(_)) => Ok(agent_id),
            Ok(None) => Err(format!("agent {agent_id} is not enrolled with this control plane")),
            Err(e) => Err(format!("store error: {e}")),
        }
    }

    async fn enroll(&self, conn: &quinn::Connection) -> Result<(), LinkError> {
        let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
            .await
            .map_err(|_| LinkError::Protocol("no enrollment request within 10 s".into()))??;
        let mut dec = FrameDecoder::new(ENROLL_FRAME_BYTES_MAX);
        let req: EnrollRequest =
            tokio::time::timeout(Duration::from_secs(10), read_one(&mut recv, &mut dec))
                .await
                .map_err(|_| LinkError::Protocol("enrollment request incomplete after 10 s".into()))??;
        let span = tracing::info_span!("enroll_agent", agent_id = %req.agent_id, hostname = %req.hostname);
        let resp = match self.enroll_agent(&req).instrument(span.clone()).await {
            Ok(resp) => {
                self.state.metrics.enrollment("ok");
                span.in_scope(|| tracing::info!("agent enrolled"));
                resp
            }
            Err(reason) => {
                self.state.metrics.enrollment("refused");
                span.in_scope(|| tracing::warn!(%reason, "enrollment refused"));
                EnrollResponse::Refused { reason }
            }
        };
        // Protocol-3 agents get the answer in their layout (without the release key).
        send.write_all(&resp.encode_frame_for(req.versions, ENROLL_FRAME_BYTES_MAX)?).await?;
        send.finish().map_err(|e| LinkError::Protocol(e.to_string()))?;
        // Let the response reach the agent before the connection is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        Ok(())
    }

    /// Checks and performs one enrollment (or re-enrollment, `renew`); the error is the reason
    /// shown to the agent's operator. The CSR is checked before the one-time token is spent.
    async fn enroll_agent(&self, req: &EnrollRequest) -> Result<EnrollResponse, String> {
        negotiate(VersionRange::ours(), req.versions).map_err(|e| e.to_string())?;
        let token = EnrollmentToken::parse(&req.token).map_err(|e| e.to_string())?;
        let store = self.state.store.clone();
        let pki = self.pki.clone();
        let revocations = self.state.revocations.clone();
        let req = req.clone();
        let cp_recipient = self.cfg.bundle_recipient.clone();
        let release_key = self.cfg.release_key.clone();
        if let Some(r) = &req.bundle_recipient {
            gaffer_certs::check_bundle_recipient(r).map_err(|e| e.to_string())?;
        }
        tokio::task::spawn_blocking(move || {
            let existing = store.get_agent(req.agent_id).map_err(|e| e.to_string())?;
            match (&existing, req.renew) {
                (Some(_), false) => {
                    return Err(format!(
                        "agent id {} is already enrolled: to get a new certificate for it, run `gaffer-agent enroll --renew` \
                         with a fresh token; to enroll a new agent, use a fresh data dir",
                        req.agent_id
                    ))
                }
                (None, true) => {
                    return Err(format!(
                        "agent id {} is not enrolled with this control plane, so it cannot re-enroll: enroll it without --renew",
                        req.agent_id
                    ))
                }
                (Some(a), true) if a.revoked_at_ms.is_some() || revocations.is_revoked(a.id) => {
                    return Err(format!("agent {} is revoked; it cannot re-enroll", req.agent_id))
                }
                _ => {}
            }
            // A CSR that cannot be signed must not spend the token.
            pki.issuing_ca()
                .sign_agent_csr_secs(&req.csr_pem, req.agent_id, pki.agent_cert_ttl_secs())
                .map_err(|e| format!("the CSR was refused: {e}"))?;
            let now = crate::now_ms();
            let record = store.consume_enrollment_token(token.hash().as_bytes(), req.agent_id, now).map_err(|e| e.to_string())?;
            let site_wanted = existing.as_ref().map(|a| a.site.clone()).or_else(|| req.site.clone());
            if let Some(site) = site_wanted {
                if site != record.site {
                    return Err(format!(
                        "this token enrolls into site {:?}, not {site:?}; the token is now used: mint one for the right site",
                        record.site
                    ));
                }
            }
            let (via, action_detail) = if existing.is_some() {
                store
                    .update_agent(req.agent_id, &mut |a| {
                        a.hostname = truncate(&req.hostname, 255);
                        a.agent_version = Some(truncate(&req.agent_version, 64));
                        if req.bundle_recipient.is_some() {
                            a.bundle_recipient = req.bundle_recipient.clone();
                        }
                    })
                    .map_err(|e| e.to_string())?;
                ("re-enroll", "re-enrolled with a new key (the agent keeps its id, jobs and outbox)")
            } else {
                store
                    .insert_agent(&AgentRecord {
                        agent_version: Some(truncate(&req.agent_version, 64)),
                        last_seen_ms: Some(now),
                        bundle_recipient: req.bundle_recipient.clone(),
                        ..AgentRecord::new(req.agent_id, record.site.clone(), truncate(&req.hostname, 255), now)
                    })
                    .map_err(|e| e.to_string())?;
                ("enroll", "enrolled online with a one-time token")
            };
            let issued = pki.issue_agent_cert(store.as_ref(), req.agent_id, &req.csr_pem, via, now).map_err(|e| e.to_string())?;
            let audit = AuditRecord::new(&Actor::Agent(req.agent_id), audit_action::ENROLL, now)
                .agent(req.agent_id)
                .site(record.site.clone())
                .detail(format!("{action_detail}; certificate serial {}", issued.issue.serial_hex));
            store.append_audit(&audit).and_then(|_| store.flush()).map_err(|e| e.to_string())?;
            Ok(EnrollResponse::Enrolled {
                agent_id: req.agent_id,
                site: record.site,
                cert_pem: issued.cert_pem,
                ca_pem: issued.ca_pems.concat(),
                bundle_recipient: cp_recipient,
                release_public_key: release_key.and_then(|k| k.current()).map(|k| *k.as_bytes()),
            })
        })
        .await
        .map_err(|e| format!("internal error: {e}"))?
    }

    async fn session(
        self: Arc<Self>,
        conn: &quinn::Connection,
        agent_id: AgentId,
        conn_id: u64,
    ) -> Result<(), LinkError> {
        let (send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| LinkError::Protocol("agent opened no stream within 10 s".into()))??;
        let mut core = Some(AgentConnCore::new(
            self.state.clone(),
            self.ingest.clone(),
            agent_id,
            conn_id,
            self.cfg.heartbeat_interval_secs,
            self.audit.clone(),
            Instant::now(),
        ));
        if let Some(c) = core.as_mut() {
            c.set_pki(self.pki.clone());
            if let Some(source) = &self.cfg.release_key {
                c.set_release_key(source.clone());
            }
        }
        // Release fetches (protocol 5) come on further streams of the same connection.
        let fetches = tokio::spawn(
            serve_release_fetches(conn.clone(), self.state.clone(), self.cfg.releases.clone(), agent_id)
                .instrument(tracing::Span::current()),
        );
        let _abort_fetches = AbortOnDrop(fetches);
        // The connection lives no longer than the certificate it authenticated with.
        let cert_expiry = peer_cert_expiry(conn);
        // Writes go through a bounded queue to a writer task, so reading goes on while a write
        // waits for the peer's flow control; a full queue holds the next chunk back (pending),
        // never drops it.
        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE_CHUNKS_MAX);
        let mut writer = tokio::spawn(async move {
            let mut send = send;
            while let Some(bytes) = wrx.recv().await {
                send.write_all(&bytes).await?;
            }
            let _ = send.finish();
            Ok::<(), LinkError>(())
        });
        let mut pending_out: Option<Vec<u8>> = None;
        let mut buf = vec![0u8; 64 * 1024];
        let mut input = Input::None;
        let result = loop {
            // The core handles what arrived and every event it decoded (store work: on a
            // blocking thread), then the bytes it produced go to the writer.
            let Some(mut c) = core.take() else { break Err(LinkError::Protocol("connection core lost".into())) };
            let step = tokio::task::spawn_blocking(move || {
                let now = Instant::now();
                let now_ms = crate::now_ms();
                match input {
                    Input::None => {}
                    Input::Bytes(b) => c.handle_input(&b, now),
                    Input::End => c.session.handle_end_of_stream(now),
                    Input::Timer => c.session.handle_timeout(now),
                }
                let closed = c.process(now_ms);
                (c, closed)
            })
            .await;
            let (mut c, closed) = match step {
                Ok(v) => v,
                Err(e) => break Err(LinkError::Protocol(format!("connection task failed: {e}"))),
            };
            input = Input::None;
            let mut writer_gone = false;
            while pending_out.is_none() {
                let Some(bytes) = c.session.poll_transmit() else { break };
                match wtx.try_send(bytes) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(bytes)) => pending_out = Some(bytes),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        writer_gone = true;
                        break;
                    }
                }
            }
            let timeout = c.session.poll_timeout().map(tokio::time::Instant::from_std);
            let notify = c.notifier();
            core = Some(c);
            if let Some(result) = closed {
                if let LinkCloseAction::CloseConnection { code, reason } = &result.action {
                    conn.close((*code).into(), reason.as_bytes());
                }
                break result.result;
            }
            if writer_gone {
                break Err(LinkError::Protocol("stream writer ended".into()));
            }
            let notified = async {
                match &notify {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            let timer = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let expiry = async {
                match cert_expiry {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = recv.read(&mut buf) => match read {
                    Ok(Some(n)) => input = Input::Bytes(buf[..n].to_vec()),
                    Ok(None) => input = Input::End,
                    Err(e) => break Err(e.into()),
                },
                _ = timer => input = Input::Timer,
                _ = expiry => {
                    self.state.metrics.link_closed_cert_expired();
                    conn.close(close_code::CERT_EXPIRED.into(), b"the agent certificate expired; renew it (gaffer-agent enroll --renew)");
                    break Err(LinkError::Protocol("the agent's certificate expired".into()));
                }
                _ = notified => {}
                permit = wtx.reserve(), if pending_out.is_some() => match permit {
                    Ok(permit) => { if let Some(bytes) = pending_out.take() { permit.send(bytes); } }
                    Err(_) => break Err(LinkError::Protocol("stream writer ended".into())),
                },
                done = &mut writer => {
                    break match done {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(LinkError::Protocol(format!("stream writer failed: {e}"))),
                    };
                }
            }
        };
        // Let what the session still has (a Refused, the last acks) reach the agent.
        if let Some(bytes) = pending_out.take() {
            let _ = wtx.send(bytes).await;
        }
        if let Some(c) = core.as_mut() {
            while let Some(bytes) = c.session.poll_transmit() {
                if wtx.send(bytes).await.is_err() {
                    break;
                }
            }
        }
        drop(wtx);
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
        writer.abort();
        let state = self.state.clone();
        let done = tokio::task::spawn_blocking(move || match core {
            Some(c) => c.finish(crate::now_ms()),
            // The core was lost with a failed step (a panic): still take this connection out of
            // the fleet, or the agent would count as linked (and its leases held) for good.
            None => {
                if let Err(e) = state.scheduler.agent_disconnected(agent_id, conn_id, crate::now_ms()) {
                    tracing::error!(error = %e, "could not start the grace of the agent's leases");
                }
            }
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "disconnect task failed");
        }
        result
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Release fetch streams at once per connection, at most (2); more wait for one to end.
pub const RELEASE_FETCHES_PER_CONNECTION_MAX: usize = 2;
/// How long an agent may take to send its fetch request, seconds (10).
const RELEASE_FETCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers the release fetch streams ([`gaffer_protocol::release_fetch`]) an authenticated agent
/// opens on its link connection: the signed artifact of a release this control plane has, as
/// stored by `release add`. Ends with the connection.
async fn serve_release_fetches(
    conn: quinn::Connection,
    state: AppState,
    releases: Option<crate::release::Releases>,
    agent_id: AgentId,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(RELEASE_FETCHES_PER_CONNECTION_MAX));
    loop {
        let Ok((send, recv)) = conn.accept_bi().await else { return };
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (state, releases) = (state.clone(), releases.clone());
        tokio::spawn(
            async move {
                let _permit = permit;
                if let Err(e) = answer_release_fetch(send, recv, &state, releases.as_ref(), agent_id).await {
                    tracing::warn!(error = %e, "release fetch failed");
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

async fn answer_release_fetch(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    state: &AppState,
    releases: Option<&crate::release::Releases>,
    agent_id: AgentId,
) -> Result<(), LinkError> {
    use gaffer_protocol::release_fetch::{ReleaseFetchReply, ReleaseFetchRequest, RELEASE_FETCH_FRAME_BYTES_MAX};
    let mut dec = FrameDecoder::new(RELEASE_FETCH_FRAME_BYTES_MAX);
    let req: ReleaseFetchRequest = tokio::time::timeout(RELEASE_FETCH_REQUEST_TIMEOUT, read_one(&mut recv, &mut dec))
        .await
        .map_err(|_| LinkError::Protocol("no release fetch request within 10 s".into()))??;
    let refuse = |reason: String| ReleaseFetchReply::Refused { reason };
    let found = match (releases, state.revocations.is_revoked(agent_id)) {
        (_, true) => Err(refuse("agent revoked".into())),
        (None, false) => Err(refuse("this control plane serves no releases".into())),
        (Some(r), false) => {
            let (r, name) = (r.clone(), req.file_name.clone());
            match tokio::task::spawn_blocking(move || r.list().map(|l| (r, l))).await {
                Ok(Ok((r, list))) => match list.into_iter().find(|rec| rec.file_name == name) {
                    Some(rec) => Ok((r.artifact_path(&rec), rec)),
                    None => Err(refuse(format!("no release {name} here: add it with `gaffer-control release add`"))),
                },
                Ok(Err(e)) => Err(refuse(format!("reading the releases: {e}"))),
                Err(e) => Err(refuse(format!("reading the releases: {e}"))),
            }
        }
    };
    let write_reply = |reply: &ReleaseFetchReply| {
        gaffer_protocol::encode_frame(reply, RELEASE_FETCH_FRAME_BYTES_MAX)
            .map_err(|e| LinkError::Protocol(e.to_string()))
    };
    let (path, rec) = match found {
        Ok(v) => v,
        Err(reply) => {
            send.write_all(&write_reply(&reply)?).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let reply = refuse(format!("reading {}: {e}", rec.file_name));
            send.write_all(&write_reply(&reply)?).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let reply = ReleaseFetchReply::Artifact { size_bytes: rec.size_bytes, sha256: rec.sha256.clone() };
    send.write_all(&write_reply(&reply)?).await?;
    // Exactly the recorded size goes out; a file that changed size on disk ends the stream short
    // (or is cut), and the agent's size and digest checks refuse it.
    let mut limited = tokio::io::AsyncReadExt::take(&mut file, rec.size_bytes);
    let sent = tokio::io::copy(&mut limited, &mut send).await.map_err(|e| LinkError::Protocol(e.to_string()))?;
    let _ = send.finish();
    state.metrics.release_fetched();
    tracing::info!(file = %rec.file_name, bytes = sent, "release fetched");
    Ok(())
}

/// What the async driver feeds the core on its next turn.
enum Input {
    None,
    Bytes(Vec<u8>),
    End,
    Timer,
}

/// Appends every frame received from agents to a file as JSON lines: an audit trail of exactly
/// what left the boxes (`serve --wire-audit-log`).
pub struct WireAudit {
    file: Mutex<std::fs::File>,
}

impl WireAudit {
    /// Opens (appending) `path`.
    ///
    /// # Errors
    /// [`LinkError::Setup`] when it cannot be opened.
    pub fn open(path: &std::path::Path) -> Result<Self, LinkError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| LinkError::Setup(format!("{}: {e}", path.display())))?;
        Ok(Self { file: Mutex::new(file) })
    }

    /// Records one received envelope.
    pub fn record(&self, agent_id: AgentId, env: &AgentEnvelope) {
        let payload = match gaffer_protocol::codec::encode_frame(env, FRAME_BYTES_MAX_DEFAULT) {
            Ok(frame) => frame,
            Err(_) => return,
        };
        let line = serde_json::json!({
            "agent_id": agent_id,
            "seq": env.seq,
            "kind": env.body.kind(),
            "frame_bytes": payload.len(),
            "payload_b64": base64::engine::general_purpose::STANDARD.encode(&payload[gaffer_protocol::FRAME_HEADER_BYTES..]),
            "message": env.body,
        });
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{line}");
    }
}

/// How a connection ended, from [`AgentConnCore::process`].
#[derive(Debug)]
pub struct LinkClosed {
    /// What the driver does with the QUIC connection.
    pub action: LinkCloseAction,
    /// The session's result, for the log.
    pub result: Result<(), LinkError>,
}

/// What the driver does with the QUIC connection when the session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCloseAction {
    /// Flush what the session still has to send, then let the stream end.
    Flush,
    /// Close the connection at once with this application code and reason.
    CloseConnection {
        /// A [`close_code`].
        code: u32,
        /// Shown to the peer.
        reason: String,
    },
}

/// One agent connection's logic, without I/O: the [`ControlSession`] plus what the control plane
/// does with its events. The async driver ([`Link`]) feeds it the stream's bytes and writes what
/// it produces; the deterministic simulation drives the same struct over a simulated network.
/// Its methods block (store work and fsyncs): the driver calls them on a blocking thread.
pub struct AgentConnCore {
    /// The sans-IO session; the driver feeds `handle_input`/`handle_end_of_stream`/
    /// `handle_timeout` and drains `poll_transmit`.
    pub session: ControlSession,
    state: AppState,
    ingest: Arc<Ingest>,
    agent_id: AgentId,
    conn_id: u64,
    /// The wire audit and its own decoder of the received bytes (so it records exactly what
    /// arrived, Hello included, independent of what the session makes of it).
    audit: Option<(Arc<WireAudit>, FrameDecoder)>,
    registered: Option<Arc<tokio::sync::Notify>>,
    /// Signs renewals and sends trust bundles; None where certificates are not in play (the
    /// simulation), which refuses renewals.
    pki: Option<Arc<Pki>>,
    /// The release key offered after the Welcome (protocol 4); None offers none.
    release_key: Option<Arc<crate::release::ReleaseKeySource>>,
}

impl AgentConnCore {
    /// The core of connection `conn_id` of the authenticated `agent_id`, at `now`.
    pub fn new(
        state: AppState,
        ingest: Arc<Ingest>,
        agent_id: AgentId,
        conn_id: u64,
        heartbeat_interval_secs: u32,
        audit: Option<Arc<WireAudit>>,
        now: Instant,
    ) -> Self {
        let session = ControlSession::new(
            ControlSessionConfig {
                agent_id,
                server_version: crate::build_version().to_owned(),
                heartbeat_interval_secs,
                hello_timeout: HELLO_TIMEOUT,
                heartbeat_misses_max: HEARTBEAT_MISSES_MAX,
                frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
                transmit_bytes_max: TRANSMIT_BYTES_MAX,
            },
            now,
        );
        let audit = audit.map(|a| (a, FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT)));
        Self { session, state, ingest, agent_id, conn_id, audit, registered: None, pki: None, release_key: None }
    }

    /// Lets this connection offer the control plane's release key to agents that speak protocol 4.
    pub fn set_release_key(&mut self, source: Arc<crate::release::ReleaseKeySource>) {
        self.release_key = Some(source);
    }

    /// Lets this connection sign its agent's certificate renewals and send trust bundles.
    pub fn set_pki(&mut self, pki: Arc<Pki>) {
        self.pki = Some(pki);
    }

    /// Whether the agent speaks protocol 3 (certificate renewal, trust bundles).
    fn speaks_certificates(&self) -> bool {
        self.session.protocol_version().is_some_and(|v| v >= 3)
    }

    /// Signs a renewal CSR and answers it.
    fn on_certificate_request(&mut self, csr_pem: &str, now_ms: UnixMs) {
        let answer = match &self.pki {
            None => {
                ControlMessage::CertificateRefused { reason: "this control plane does not renew certificates".into() }
            }
            Some(pki) => match pki
                .issue_agent_cert(self.state.store.as_ref(), self.agent_id, csr_pem, "renew", now_ms)
                .and_then(|issued| self.state.store.flush().map(|()| issued).map_err(Into::into))
            {
                Ok(issued) => ControlMessage::Certificate { cert_pem: issued.cert_pem, ca_pems: issued.ca_pems },
                Err(e) => {
                    tracing::warn!(error = %e, "certificate renewal refused");
                    ControlMessage::CertificateRefused { reason: truncate(&e.to_string(), 500) }
                }
            },
        };
        if let Err(e) = self.session.send(answer) {
            tracing::warn!(error = %e, "could not queue the certificate answer; the agent asks again");
        }
    }

    fn closed_revoked(&self) -> LinkClosed {
        self.state.metrics.link_closed_revoked();
        LinkClosed {
            action: LinkCloseAction::CloseConnection { code: close_code::REVOKED, reason: "agent revoked".into() },
            result: Err(LinkError::Protocol("the agent was revoked; link closed".into())),
        }
    }

    /// Feeds bytes read from the stream to the session (and to the wire audit, if on).
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        if let Some((audit, dec)) = self.audit.as_mut() {
            dec.push(bytes);
            // A frame the session refuses ends the connection; the audit just stops there.
            while let Ok(Some(env)) = dec.next_message::<AgentEnvelope>() {
                audit.record(self.agent_id, &env);
            }
        }
        self.session.handle_input(bytes, now);
    }

    /// The notifier that says the agent has queued outgoing messages (once registered).
    pub fn notifier(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.registered.clone()
    }

    /// Whether the Hello was accepted and the agent registered in the fleet.
    pub fn is_registered(&self) -> bool {
        self.registered.is_some()
    }

    /// Handles every event the session has decoded, in order, then moves the agent's queued
    /// assignments and cancellations into the session as far as its transmit bound allows.
    /// Returns `Some` when the connection is over. Blocking.
    pub fn process(&mut self, now_ms: UnixMs) -> Option<LinkClosed> {
        if self.state.revocations.is_revoked(self.agent_id) {
            return Some(self.closed_revoked());
        }
        while let Some(event) = self.session.poll_event() {
            match event {
                ControlEvent::Hello { protocol_version, agent_version, hostname, capabilities, running_jobs } => {
                    match self.on_hello(
                        protocol_version,
                        &agent_version,
                        &hostname,
                        capabilities,
                        &running_jobs,
                        now_ms,
                    ) {
                        Ok(notify) => {
                            // Registered in the fleet from here on, so `finish` takes it out again
                            // even if the Welcome cannot be queued.
                            self.registered = Some(notify);
                            if let Err(e) = self.session.accept() {
                                return Some(self.closed_protocol(e.to_string()));
                            }
                            if let Some(rollouts) = &self.state.rollouts {
                                rollouts.on_agent_connected(self.agent_id, &agent_version, protocol_version, now_ms);
                            }
                            let v4 = self
                                .session
                                .protocol_version()
                                .is_some_and(|v| v >= gaffer_protocol::RELEASE_KEY_PROTOCOL_VERSION);
                            if let (Some(key), true) = (self.release_key.as_ref().and_then(|k| k.current()), v4) {
                                let public_key = *key.as_bytes();
                                if let Err(e) = self.session.send(ControlMessage::ReleaseKey { public_key }) {
                                    tracing::warn!(error = %e, "could not queue the release key");
                                }
                            }
                            if let (Some(pki), true) = (&self.pki, self.speaks_certificates()) {
                                let ca_pems = pki.trusted_ca_pems();
                                if let Err(e) = self.session.send(ControlMessage::TrustBundle { ca_pems }) {
                                    tracing::warn!(error = %e, "could not queue the trust bundle");
                                }
                                // During a rotation, an agent that was away when the others were
                                // asked to renew holds a certificate from the other CA: ask now.
                                use crate::identity::RotationPhase::{Rollback, UpdateClients, UpdateServers};
                                if matches!(pki.phase(), UpdateClients | UpdateServers | Rollback) {
                                    let issuing = pki.issuing_ca().fingerprint().to_string();
                                    let holds_other = match self.state.store.get_agent(self.agent_id) {
                                        Ok(Some(a)) => a.cert_issuer_fingerprint.as_deref() != Some(issuing.as_str()),
                                        _ => false,
                                    };
                                    if holds_other {
                                        let reason = format!("CA rotation: {}", pki.phase());
                                        if let Err(e) = self.session.send(ControlMessage::RenewCertificate { reason }) {
                                            tracing::warn!(error = %e, "could not queue the renewal request");
                                        }
                                    }
                                }
                            }
                        }
                        Err(reason) => {
                            tracing::warn!(%reason, "agent refused");
                            self.state.metrics.handshake_refused("refused");
                            self.session.refuse(&reason);
                        }
                    }
                }
                ControlEvent::Message(env) => {
                    // Nothing from an agent revoked since the last turn is applied.
                    if self.state.revocations.is_revoked(self.agent_id) {
                        return Some(self.closed_revoked());
                    }
                    self.state.metrics.message_received(env.body.kind());
                    let seq = env.seq;
                    match self.ingest.ingest(self.agent_id, env, now_ms) {
                        Ok(Ingested::Applied | Ingested::Duplicate) => self.session.acknowledge(seq),
                        Ok(Ingested::Refused(reason)) => self.session.reject(seq, &reason, false),
                        Ok(Ingested::Ephemeral) => {}
                        // Not applied: the agent keeps it and resends on a new connection.
                        Err(IngestError::Store(e)) => self.session.reject(seq, &e.to_string(), true),
                        Err(IngestError::Protocol(m)) => return Some(self.closed_protocol(m)),
                    }
                }
                ControlEvent::Heartbeat(health) => {
                    self.state.metrics.message_received("heartbeat");
                    let env = AgentEnvelope { agent_id: self.agent_id, seq: 0, body: AgentMessage::Heartbeat(health) };
                    if let Err(e) = self.ingest.ingest(self.agent_id, env, now_ms) {
                        tracing::warn!(error = %e, "could not store a heartbeat");
                    }
                }
                ControlEvent::CertificateRequest { csr_pem } => {
                    self.state.metrics.message_received("certificate_request");
                    self.on_certificate_request(&csr_pem, now_ms);
                }
                ControlEvent::Closed { reason } => {
                    match reason {
                        CloseReason::VersionMismatch(_) => self.state.metrics.handshake_refused("version"),
                        CloseReason::IdentityMismatch(_) => self.state.metrics.handshake_refused("agent_id_mismatch"),
                        _ => {}
                    }
                    let result = match reason {
                        CloseReason::PeerFinished => Ok(()),
                        other => Err(LinkError::Protocol(other.to_string())),
                    };
                    return Some(LinkClosed { action: LinkCloseAction::Flush, result });
                }
            }
        }
        if self.registered.is_some() && self.session.is_up() {
            let fleet = self.state.scheduler.fleet();
            if fleet.conn_id(self.agent_id) != Some(self.conn_id) {
                return Some(LinkClosed {
                    action: LinkCloseAction::CloseConnection { code: close_code::OK, reason: "replaced".into() },
                    result: Err(LinkError::Protocol("replaced by a newer connection of the agent".into())),
                });
            }
            if fleet.overflowed(self.agent_id) {
                return Some(LinkClosed {
                    action: LinkCloseAction::CloseConnection {
                        code: close_code::INTERNAL,
                        reason: "not reading".into(),
                    },
                    result: Err(LinkError::Protocol("agent is not reading its link (outgoing queue full)".into())),
                });
            }
            let v3 = self.speaks_certificates();
            let v5 = self.session.protocol_version().is_some_and(|v| v >= gaffer_protocol::UPDATE_PROTOCOL_VERSION);
            let mut msgs =
                fleet.take_outgoing(self.agent_id, self.conn_id, OUTGOING_BATCH_MAX).into_iter().filter(|m| {
                    (v3 || !matches!(m, ControlMessage::TrustBundle { .. } | ControlMessage::RenewCertificate { .. }))
                        && (v5 || !matches!(m, ControlMessage::Update(_) | ControlMessage::UpdateWithdrawn { .. }))
                });
            while let Some(msg) = msgs.next() {
                match self.session.send(msg.clone()) {
                    Ok(()) => {}
                    Err(back @ gaffer_protocol::session::SessionError::Backpressure { .. }) => {
                        tracing::debug!(error = %back, "session transmit queue full; holding the rest");
                        let rest: Vec<ControlMessage> = std::iter::once(msg).chain(msgs).collect();
                        fleet.requeue_outgoing(self.agent_id, self.conn_id, rest);
                        break;
                    }
                    // A message this session can never carry would block everything behind it.
                    Err(e) => tracing::error!(error = %e, kind = msg.kind(), "message dropped: not for this session"),
                }
            }
        }
        if self.session.is_closed() {
            return Some(LinkClosed { action: LinkCloseAction::Flush, result: Ok(()) });
        }
        None
    }

    fn closed_protocol(&self, m: String) -> LinkClosed {
        LinkClosed {
            action: LinkCloseAction::CloseConnection { code: close_code::PROTOCOL, reason: truncate(&m, 200) },
            result: Err(LinkError::Protocol(m)),
        }
    }

    /// The connection is gone: its leases start their grace (unless a newer connection of the
    /// agent is up) and the agent shows as disconnected. Blocking.
    pub fn finish(self, now_ms: UnixMs) {
        if self.registered.is_none() {
            return;
        }
        match self.state.scheduler.agent_disconnected(self.agent_id, self.conn_id, now_ms) {
            Ok(true) => {
                let me = self.state.replica.id();
                if let Err(e) = self.state.store.update_agent(self.agent_id, &mut |a| {
                    // Unless it is connected to another replica already (it failed over).
                    if a.link_replica.is_none_or(|r| r == me) {
                        a.connected = false;
                        a.link_replica = None;
                    }
                    a.last_seen_ms = Some(now_ms);
                }) {
                    tracing::error!(error = %e, "could not mark agent disconnected");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "could not start the grace of the agent's leases"),
        }
    }

    /// A Hello passed the session's checks: refuse a revoked or vanished agent, else record its
    /// capabilities, reconcile its leases and register it. Returns the fleet notifier, or the
    /// refusal reason.
    fn on_hello(
        &self,
        protocol_version: u16,
        agent_version: &str,
        hostname: &str,
        capabilities: gaffer_protocol::messages::Capabilities,
        running_jobs: &[HeldJob],
        now_ms: UnixMs,
    ) -> Result<Arc<tokio::sync::Notify>, String> {
        let (agent_id, state) = (self.agent_id, &self.state);
        let store_error = |e: StoreError| format!("control plane store error: {e}; try again later");
        let record = match state.store.get_agent(agent_id) {
            Ok(Some(a)) if a.revoked_at_ms.is_some() => return Err(format!("agent {agent_id} is revoked")),
            Ok(Some(a)) => a,
            Ok(None) => return Err(format!("agent {agent_id} is not enrolled with this control plane")),
            Err(e) => return Err(store_error(e)),
        };
        let caps = capabilities.clone();
        let updated = state
            .store
            .update_agent(agent_id, &mut |a| {
                a.connected = true;
                a.link_replica = Some(state.replica.id());
                a.last_seen_ms = Some(now_ms);
                a.hostname = truncate(hostname, 255);
                a.agent_version = Some(truncate(agent_version, 64));
                a.capabilities = Some(caps.clone());
            })
            .map_err(store_error)?;
        if let Some(a) = &updated {
            state.metrics.agents().agent_seen(a);
        }
        let conn = AgentConn { conn_id: self.conn_id, site: record.site.clone(), capabilities };
        state.scheduler.agent_connected(agent_id, conn, running_jobs, now_ms).map_err(store_error)?;
        tracing::info!(protocol_version, %agent_version, site = %record.site, "agent connected");
        state.scheduler.fleet().notifier(agent_id).ok_or_else(|| "replaced by a newer connection".to_owned())
    }
}

/// When the connection's client certificate expires, as a tokio instant (None if it cannot be read).
fn peer_cert_expiry(conn: &quinn::Connection) -> Option<tokio::time::Instant> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    let not_after = gaffer_certs::cert_not_after_unix(certs.first()?.as_ref()).ok()?;
    let now = (crate::now_ms() / 1000) as i64;
    let left = Duration::from_secs(u64::try_from(not_after.saturating_sub(now)).unwrap_or(0));
    Some(tokio::time::Instant::now() + left)
}

/// Reads exactly one message from `recv`.
async fn read_one<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<T, LinkError> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(msg) = dec.next_message::<T>()? {
            return Ok(msg);
        }
        match recv.read(&mut buf).await? {
            Some(n) => dec.push(&buf[..n]),
            None => {
                dec.finish()?;
                return Err(LinkError::Protocol("stream ended before a message".into()));
            }
        }
    }
}
