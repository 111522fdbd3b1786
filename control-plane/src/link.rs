//! The QUIC endpoint: enrollment and the agent link.
//!
//! One UDP port, one quinn endpoint, two ALPNs (see `gaffer_certs::server_config`):
//! * `gaffer-enroll/1`: no client certificate; one [`EnrollRequest`] → one [`EnrollResponse`].
//! * `gaffer/1`: the client certificate must chain to the fleet CA (checked in the TLS handshake)
//!   and name an enrolled agent (checked here). One bidirectional stream, opened by the agent,
//!   carries [`AgentEnvelope`]s up and [`ControlMessage`]s down (framing: `gaffer_protocol::codec`).
//!
//! Delivery: a message with `seq > 0` is applied, the store is flushed, and only then is it
//! acknowledged; a message whose `seq` is not above the agent's last applied sequence is a
//! redelivery and is acknowledged again without being applied. Heartbeats carry `seq == 0`: they
//! are not durable at the agent and are never acknowledged.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use gaffer_certs::{EnrollmentToken, FleetCa};
use gaffer_protocol::codec::{encode_frame, CodecError, FrameDecoder};
use gaffer_protocol::enroll::{EnrollRequest, EnrollResponse, ENROLL_FRAME_BYTES_MAX};
use gaffer_protocol::messages::{AgentId, AgentMessage, ControlMessage};
use gaffer_protocol::version::{negotiate, VersionRange};
use gaffer_protocol::{AgentEnvelope, ALPN_AGENT_LINK, ALPN_ENROLL, FRAME_BYTES_MAX_DEFAULT};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::ingest::truncate;
use crate::ingest::{Ingest, IngestError, Ingested};
use crate::scheduler::{AgentSession, Fleet};
use crate::store::{AgentRecord, JobState, StoreError};
use crate::AppState;

/// Link settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Heartbeat interval the agents are told to use, seconds. Default 5.
    pub heartbeat_interval_secs: u32,
    /// A connection with no traffic for this long is dead (agents send QUIC keep-alives every
    /// third of it). Default 10 s.
    pub idle_timeout: Duration,
    /// Health samples kept per agent. Default 720 (an hour at 5 s).
    pub health_history_max: usize,
    /// Validity of agent certificates issued at enrollment, days. Default 90.
    pub agent_cert_validity_days: u32,
    /// If set, every frame received from an agent is appended here as a JSON line (agent id,
    /// sequence, kind, size, payload): an audit trail of exactly what left the boxes.
    pub wire_audit_log: Option<PathBuf>,
    /// The control plane's age X25519 recipient (`age1...`), sent to agents at enrollment so they
    /// can encrypt offline-sync bundles to it. Default None.
    pub bundle_recipient: Option<String>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: 5,
            idle_timeout: Duration::from_secs(10),
            health_history_max: 720,
            agent_cert_validity_days: 90,
            wire_audit_log: None,
            bundle_recipient: None,
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
}

/// Builds the quinn server config: TLS from `rustls_config`, idle timeout and stream limits.
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
    Ok(server)
}

/// Shared state of the endpoint.
pub struct Link {
    state: AppState,
    ingest: Arc<Ingest>,
    fleet: Arc<Fleet>,
    ca: Arc<FleetCa>,
    cfg: LinkConfig,
    conn_ids: AtomicU64,
    audit: Option<Mutex<std::fs::File>>,
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
    pub fn new(state: AppState, fleet: Arc<Fleet>, ca: Arc<FleetCa>, cfg: LinkConfig) -> Result<Arc<Self>, LinkError> {
        let audit = match &cfg.wire_audit_log {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| LinkError::Setup(format!("{}: {e}", path.display())))?,
            )),
            None => None,
        };
        let ingest = Arc::new(Ingest::new(state.clone(), fleet.clone(), cfg.health_history_max));
        Ok(Arc::new(Self { state, ingest, fleet, ca, cfg, conn_ids: AtomicU64::new(1), audit }))
    }

    /// Accepts connections until the endpoint closes.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let link = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => link.handle_connection(conn, remote).await,
                    Err(e) => {
                        link.state.metrics.handshake_refused("tls");
                        tracing::warn!(%remote, error = %e, "QUIC handshake failed");
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
                self.on_disconnect(agent_id, conn_id);
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
        send.write_all(&encode_frame(&resp, ENROLL_FRAME_BYTES_MAX)?).await?;
        send.finish().map_err(|e| LinkError::Protocol(e.to_string()))?;
        // Let the response reach the agent before the connection is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        Ok(())
    }

    /// Checks and performs one enrollment; the error is the reason shown to the agent's operator.
    async fn enroll_agent(&self, req: &EnrollRequest) -> Result<EnrollResponse, String> {
        negotiate(VersionRange::ours(), req.versions).map_err(|e| e.to_string())?;
        let token = EnrollmentToken::parse(&req.token).map_err(|e| e.to_string())?;
        let store = self.state.store.clone();
        let ca = self.ca.clone();
        let req = req.clone();
        let validity_days = self.cfg.agent_cert_validity_days;
        let cp_recipient = self.cfg.bundle_recipient.clone();
        if let Some(r) = &req.bundle_recipient {
            gaffer_certs::check_bundle_recipient(r).map_err(|e| e.to_string())?;
        }
        tokio::task::spawn_blocking(move || {
            if store.get_agent(req.agent_id).map_err(|e| e.to_string())?.is_some() {
                return Err(format!("agent id {} is already enrolled; re-run enroll with a fresh data dir", req.agent_id));
            }
            let now = crate::now_ms();
            let record = store.consume_enrollment_token(token.hash().as_bytes(), req.agent_id, now).map_err(|e| e.to_string())?;
            if let Some(site) = &req.site {
                if *site != record.site {
                    return Err(format!(
                        "this token enrolls into site {:?}, not {site:?}; the token is now used: mint one for the right site",
                        record.site
                    ));
                }
            }
            let cert_pem = ca.sign_agent_csr(&req.csr_pem, req.agent_id, validity_days).map_err(|e| e.to_string())?;
            let not_after = gaffer_certs::cert_not_after_unix(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
            let serial = gaffer_certs::cert_serial_hex(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
            store
                .insert_agent(&AgentRecord {
                    id: req.agent_id,
                    site: record.site.clone(),
                    hostname: truncate(&req.hostname, 255),
                    enrolled_at_ms: now,
                    cert_not_after_unix: not_after,
                    agent_version: Some(truncate(&req.agent_version, 64)),
                    capabilities: None,
                    connected: false,
                    last_seen_ms: Some(now),
                    last_health: None,
                    bundle_recipient: req.bundle_recipient.clone(),
                    csr_pem: Some(req.csr_pem.clone()),
                    cert_serial_hex: Some(serial),
                    revoked_at_ms: None,
                    offline: false,
                })
                .and_then(|()| store.flush())
                .map_err(|e| e.to_string())?;
            Ok(EnrollResponse::Enrolled {
                agent_id: req.agent_id,
                site: record.site,
                cert_pem,
                ca_pem: ca.cert_pem(),
                bundle_recipient: cp_recipient,
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
        let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
            .await
            .map_err(|_| LinkError::Protocol("agent opened no stream within 10 s".into()))??;
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let hello: AgentEnvelope = tokio::time::timeout(Duration::from_secs(10), read_one(&mut recv, &mut dec))
            .await
            .map_err(|_| LinkError::Protocol("no Hello within 10 s".into()))??;
        self.audit(agent_id, &hello);
        let AgentMessage::Hello { versions, agent_version, hostname, capabilities, running_jobs } = hello.body else {
            return Err(LinkError::Protocol(format!("first message was {}, not hello", hello.body.kind())));
        };
        if hello.agent_id != agent_id {
            conn.close(close_code::PROTOCOL.into(), b"agent id does not match certificate");
            return Err(LinkError::Protocol("Hello agent id does not match the certificate".into()));
        }
        let version = match negotiate(VersionRange::ours(), versions) {
            Ok(v) => v,
            Err(e) => {
                let reason = e.to_string();
                let frame = encode_frame(&ControlMessage::Refused { reason: reason.clone() }, FRAME_BYTES_MAX_DEFAULT)?;
                send.write_all(&frame).await?;
                let _ = send.finish();
                self.state.metrics.handshake_refused("version");
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.close(close_code::VERSION.into(), reason.as_bytes());
                return Err(LinkError::Protocol(reason));
            }
        };
        let record =
            self.state.store.get_agent(agent_id)?.ok_or_else(|| LinkError::Protocol("agent vanished".into()))?;
        let (tx, mut rx) = mpsc::channel::<ControlMessage>(256);
        tx.try_send(ControlMessage::Welcome {
            protocol_version: version,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            heartbeat_interval_secs: self.cfg.heartbeat_interval_secs,
        })
        .map_err(|_| LinkError::Protocol("send queue closed".into()))?;

        // Reconcile leases: jobs the store has on this agent vs. jobs the agent says it runs.
        let mut leased = std::collections::HashSet::new();
        let mut held = self.state.store.jobs_in_state(JobState::Assigned)?;
        held.extend(self.state.store.jobs_in_state(JobState::Running)?);
        for job in held.into_iter().filter(|j| j.agent == Some(agent_id)) {
            if running_jobs.contains(&job.id) {
                leased.insert(job.id);
            } else {
                self.state.scheduler.requeue(job.id, agent_id, "agent restarted without the job")?;
            }
        }
        for job_id in &running_jobs {
            if !leased.contains(job_id) {
                // Requeued or reassigned while the agent was away: stop its copy.
                let _ = tx.try_send(ControlMessage::Cancel { job_id: *job_id });
            }
        }
        let now = crate::now_ms();
        let caps = capabilities.clone();
        self.state.store.update_agent(agent_id, &mut |a| {
            a.connected = true;
            a.last_seen_ms = Some(now);
            a.hostname = truncate(&hostname, 255);
            a.agent_version = Some(truncate(&agent_version, 64));
            a.capabilities = Some(caps.clone());
        })?;
        self.fleet.connect(agent_id, AgentSession { conn_id, site: record.site.clone(), capabilities, tx, leased });
        self.state.metrics.agent_connected();
        self.state.scheduler.wake();
        tracing::info!(protocol_version = version, %agent_version, site = %record.site, "agent connected");

        let writer = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let frame = encode_frame(&msg, FRAME_BYTES_MAX_DEFAULT)?;
                send.write_all(&frame).await?;
            }
            Ok::<(), LinkError>(())
        });
        let result = self.read_loop(&mut recv, &mut dec, agent_id).await;
        writer.abort();
        result
    }

    async fn read_loop(
        &self,
        recv: &mut quinn::RecvStream,
        dec: &mut FrameDecoder,
        agent_id: AgentId,
    ) -> Result<(), LinkError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(env) = dec.next_message::<AgentEnvelope>()? {
                self.audit(agent_id, &env);
                if env.agent_id != agent_id {
                    return Err(LinkError::Protocol("envelope agent id does not match the certificate".into()));
                }
                self.state.metrics.message_received(env.body.kind());
                self.on_message(agent_id, env).await?;
            }
            match recv.read(&mut buf).await? {
                Some(n) => dec.push(&buf[..n]),
                None => return dec.finish().map_err(Into::into),
            }
        }
    }

    async fn on_message(&self, agent_id: AgentId, env: AgentEnvelope) -> Result<(), LinkError> {
        let seq = env.seq;
        let ingest = self.ingest.clone();
        let outcome = tokio::task::spawn_blocking(move || ingest.ingest(agent_id, env))
            .await
            .map_err(|e| LinkError::Protocol(format!("ingest task failed: {e}")))?;
        match outcome {
            Ok(Ingested::Applied) | Ok(Ingested::Duplicate) => {
                self.fleet.send(agent_id, ControlMessage::Ack { seq });
                Ok(())
            }
            Ok(Ingested::Ephemeral) => Ok(()),
            Err(IngestError::Store(e)) => {
                // Not applied: tell the agent to keep it and retry on a new connection.
                self.fleet.send(agent_id, ControlMessage::Error { seq, message: e.to_string(), retry: true });
                Err(e.into())
            }
            Err(IngestError::Protocol(m)) => Err(LinkError::Protocol(m)),
        }
    }

    fn on_disconnect(&self, agent_id: AgentId, conn_id: u64) {
        if self.fleet.disconnect(agent_id, conn_id) {
            self.state.metrics.agent_disconnected();
            let now = crate::now_ms();
            if let Err(e) = self.state.store.update_agent(agent_id, &mut |a| {
                a.connected = false;
                a.last_seen_ms = Some(now);
            }) {
                tracing::error!(agent_id = %agent_id, error = %e, "could not mark agent disconnected");
            }
            self.state.scheduler.wake();
        }
    }

    fn audit(&self, agent_id: AgentId, env: &AgentEnvelope) {
        let Some(file) = &self.audit else { return };
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
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{line}");
    }
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
