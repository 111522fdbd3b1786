//! The certificate matrix at the real QUIC endpoint (issue 8): an in-process control plane (temp
//! data dir, sled store, the fleet PKI, a quinn endpoint on 127.0.0.1 with the production
//! [`LinkCertPolicy`] and [`Link::run`]) and real quinn clients that drive the agent's
//! [`AgentSession`] as `gaffer-agent` does. Every refused certificate must be refused, and counted
//! in `/metrics` under its own reason, exactly once:
//!
//! | client certificate                              | refused by        | `gaffer_link_refused_total{reason}` |
//! |-------------------------------------------------|-------------------|-------------------------------------|
//! | issued by the fleet CA for an enrolled agent    | – (welcomed)      | –                                   |
//! | expired                                         | TLS handshake     | `expired`                           |
//! | not yet valid                                   | TLS handshake     | `not_yet_valid`                     |
//! | of a revoked agent                              | TLS handshake     | `revoked`                           |
//! | from another fleet's CA                         | TLS handshake     | `foreign_ca`                        |
//! | self-signed                                     | TLS handshake     | `self_signed`                       |
//! | the control plane's server certificate          | TLS handshake     | `wrong_purpose`                     |
//! | agent A's, with a Hello from agent B            | the session       | `agent_id_mismatch`                 |
//!
//! Beyond the handshake: revoking a connected agent closes its link with `close_code::REVOKED`
//! within 5 s; a client that keeps TLS sessions for resumption gets no session ticket, so after its
//! agent is revoked it cannot resume past the check; an open link closes with
//! `close_code::CERT_EXPIRED` when its certificate expires.
//!
//! Failed QUIC handshakes are also counted under the generic reason `tls` by `Link::run`; the
//! assertions here leave `tls` out and check every other reason exactly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use gaffer_certs::{AgentKey, FleetCa};
use gaffer_control::datadir::DataDir;
use gaffer_control::identity::{record_issue, LinkCertPolicy, Pki, AGENT_CERT_TTL_SECS_DEFAULT};
use gaffer_control::link::{close_code, quinn_server_config, Link, LinkConfig};
use gaffer_control::offline::OfflineSync;
use gaffer_control::scheduler::SchedulerConfig;
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{AgentRecord, Store};
use gaffer_control::AppState;
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{AgentId, Capabilities, Profile};
use gaffer_protocol::session::{AgentEvent, AgentSession, AgentSessionConfig, CloseReason};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use uuid::Uuid;

/// The control plane's server name (a SAN of its server certificate).
const SERVER_NAME: &str = "localhost";
/// Generous bound for anything the control plane does in reaction to one event (a refusal to be
/// counted, a revoked link to close, a closed link to leave the fleet). A correctness bound.
const REACTION_BOUND: Duration = Duration::from_secs(5);
/// Bound on one connection attempt, handshake to Welcome or refusal. A correctness bound.
const ATTEMPT_BOUND: Duration = Duration::from_secs(15);
/// Every refusal reason the link counts for a certificate or a Hello (all but the generic `tls`).
const REASONS: [&str; 11] = [
    "expired",
    "not_yet_valid",
    "revoked",
    "foreign_ca",
    "self_signed",
    "wrong_purpose",
    "no_agent_id",
    "invalid",
    "agent_id_mismatch",
    "unauthenticated",
    "refused",
];

type Result<T> = anyhow::Result<T>;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A control plane serving the agent link in this process, as `gaffer-control serve` sets it up.
struct ControlPlane {
    _dir: tempfile::TempDir,
    /// The fleet CA, as `init` wrote it.
    ca: FleetCa,
    state: AppState,
    pki: Arc<Pki>,
    sync: Arc<OfflineSync>,
    addr: SocketAddr,
    _endpoint: quinn::Endpoint,
}

/// A certificate and key a client presents.
#[derive(Clone)]
struct ClientCert {
    cert_pem: String,
    key_pem: String,
}

impl ControlPlane {
    async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a control plane whose QUIC TLS config is the production one, then changed by `tune`
    /// (only the control test of the resumption observable changes it).
    async fn start_with(tune: impl FnOnce(&mut rustls::ServerConfig)) -> Result<Self> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let dd = DataDir::new(dir.path().join("control"));
        dd.create()?;
        let ca = FleetCa::generate("studio")?;
        let server = ca.issue_server_cert(&[SERVER_NAME.to_owned()])?;
        dd.write_pki(&ca, &server)?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dd.store_path())?);
        let state = AppState::new(store, SchedulerConfig::default());
        let pki = Pki::open(&dd, vec![SERVER_NAME.to_owned()], AGENT_CERT_TTL_SECS_DEFAULT, state.metrics.clone())?;
        let link_cfg = LinkConfig::default();
        let policy = LinkCertPolicy::new(state.revocations.clone(), state.metrics.clone());
        let mut tls = pki.quic_tls(policy)?;
        tune(&mut tls);
        let endpoint = quinn::Endpoint::server(quinn_server_config(tls, &link_cfg)?, "127.0.0.1:0".parse()?)?;
        let addr = endpoint.local_addr()?;
        {
            let scheduler = state.scheduler.clone();
            tokio::task::spawn_blocking(move || scheduler.recover(gaffer_control::now_ms())).await??;
        }
        tokio::spawn(state.scheduler.clone().run());
        let link = Link::new(state.clone(), pki.clone(), link_cfg)?;
        let sync = Arc::new(OfflineSync::open(&dd, pki.clone(), state.clone(), link.ingest())?);
        tokio::spawn(link.run(endpoint.clone()));
        Ok(Self { _dir: dir, ca, state, pki, sync, addr, _endpoint: endpoint })
    }

    /// Enrolls a new agent the way the enrollment path does (its record, then a certificate from the
    /// issuing CA for a CSR of a key made "on the box"), valid for `validity_secs` (None: the
    /// control plane's agent certificate TTL).
    fn enroll(&self, validity_secs: Option<u64>) -> Result<(AgentId, ClientCert)> {
        let store = self.state.store.as_ref();
        let id = Uuid::new_v4();
        let now = gaffer_control::now_ms();
        store.insert_agent(&AgentRecord {
            agent_version: Some("0.1.0".into()),
            last_seen_ms: Some(now),
            ..AgentRecord::new(id, "default", "gpu-box", now)
        })?;
        let key = AgentKey::generate()?;
        let csr = key.csr_pem(id)?;
        let issued = match validity_secs {
            None => self.pki.issue_agent_cert(store, id, &csr, "enroll", now)?,
            Some(secs) => {
                let issued = self.pki.sign_agent(id, &csr, "enroll", Some(secs), now)?;
                record_issue(store, id, &csr, &issued.issue)?;
                issued
            }
        };
        store.flush()?;
        key.check_issued_cert(&issued.cert_pem)?;
        Ok((id, ClientCert { cert_pem: issued.cert_pem, key_pem: key.key_pem() }))
    }

    /// Revokes `agent` as `gaffer-control agent revoke` does.
    async fn revoke(&self, agent: AgentId) -> Result<()> {
        let sync = self.sync.clone();
        let report = tokio::task::spawn_blocking(move || sync.revoke_agent(agent, "cert-matrix test")).await??;
        ensure!(report.newly_revoked, "agent {agent} was already revoked");
        Ok(())
    }

    fn metrics_text(&self) -> String {
        self.state.metrics.encode(self.state.store.as_ref())
    }

    /// `gaffer_link_refused_total` by reason, for [`REASONS`], from the OpenMetrics text.
    fn refusals(&self) -> Result<BTreeMap<String, u64>> {
        let text = self.metrics_text();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("gaffer_link_refused_total{reason=\"") else { continue };
            let (reason, rest) = rest.split_once("\"}").with_context(|| format!("unparsable metric line {line:?}"))?;
            let value: u64 = rest.trim().parse().with_context(|| format!("unparsable metric line {line:?}"))?;
            if REASONS.contains(&reason) {
                out.insert(reason.to_owned(), value);
            }
        }
        for reason in REASONS {
            ensure!(
                out.contains_key(reason) || ["unauthenticated", "refused"].contains(&reason),
                "gaffer_link_refused_total{{reason={reason:?}}} is not exported:\n{text}"
            );
        }
        Ok(out)
    }

    /// Waits until the refusal counters differ from `before` by exactly `expected` (reason → count;
    /// every other reason of [`REASONS`] unchanged), failing with the last difference after
    /// [`REACTION_BOUND`].
    async fn expect_refusals(&self, before: &BTreeMap<String, u64>, expected: &[(&str, u64)]) -> Result<()> {
        let expected: BTreeMap<String, u64> = expected.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect();
        let deadline = tokio::time::Instant::now() + REACTION_BOUND;
        loop {
            let now = self.refusals()?;
            let delta: BTreeMap<String, u64> = now
                .iter()
                .filter_map(|(r, n)| {
                    let d = n - before.get(r).copied().unwrap_or(0);
                    (d != 0).then(|| (r.clone(), d))
                })
                .collect();
            if delta == expected {
                // Nothing more may follow (a second count of the same refusal).
                tokio::time::sleep(Duration::from_millis(200)).await;
                let again = self.refusals()?;
                ensure!(again == now, "refusal counters moved on after reaching {expected:?}: {now:?} → {again:?}");
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("gaffer_link_refused_total changed by {delta:?}, expected {expected:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A plain counter's value (`name` without `_total`).
    fn counter(&self, name: &str) -> Result<u64> {
        let text = self.metrics_text();
        let prefix = format!("{name}_total ");
        let line = text.lines().find(|l| l.starts_with(&prefix)).with_context(|| format!("{name} not in:\n{text}"))?;
        Ok(line[prefix.len()..].trim().parse()?)
    }

    /// Waits until `agent` is out of the fleet and its record says disconnected.
    async fn expect_disconnected(&self, agent: AgentId) -> Result<()> {
        let deadline = tokio::time::Instant::now() + REACTION_BOUND;
        loop {
            let in_fleet = self.state.scheduler.fleet().is_connected(agent);
            let record = self.state.store.get_agent(agent)?.context("agent record vanished")?;
            if !in_fleet && !record.connected {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "agent {agent} still connected after {REACTION_BOUND:?} (fleet: {in_fleet}, record: {})",
                    record.connected
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client endpoint presenting `cert` and trusting this fleet's CA, as the agent builds it
    /// (`gaffer_certs::client_config_link`, ALPN `gaffer/1`, no resumption), unless `sessions` is
    /// given: then TLS sessions are kept there for resumption (what a hostile client would do).
    fn client(&self, cert: &ClientCert, sessions: Option<Arc<TicketCounter>>) -> Result<quinn::Endpoint> {
        let mut tls = gaffer_certs::client_config_link(&self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)?;
        if let Some(store) = sessions {
            tls.resumption = rustls::client::Resumption::store(store);
        }
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // As the agent does (agent/src/link.rs KEEP_ALIVE_INTERVAL).
        transport.keep_alive_interval(Some(Duration::from_secs(2)));
        client.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(client);
        Ok(endpoint)
    }

    /// Connects with `endpoint`, opens the link stream and says Hello as `hello_agent`; returns what
    /// came of it.
    async fn attempt(&self, endpoint: &quinn::Endpoint, hello_agent: AgentId) -> Result<Outcome> {
        let attempt = async {
            let conn = match endpoint.connect(self.addr, SERVER_NAME)?.await {
                Ok(conn) => conn,
                Err(e) => return Ok(Outcome::from_end(End::Connection(e))),
            };
            let (send, recv) = match conn.open_bi().await {
                Ok(s) => s,
                Err(e) => return Ok(Outcome::from_end(End::Connection(e))),
            };
            let session = AgentSession::new(
                AgentSessionConfig {
                    agent_id: hello_agent,
                    agent_version: "0.1.0".into(),
                    hostname: "gpu-box".into(),
                    capabilities: Capabilities {
                        gpus: vec![],
                        volumes: vec!["/media".into()],
                        watch_roots: vec![],
                        job_slots: 1,
                        profiles: vec![Profile::Shots],
                        models: vec![],
                    },
                    ..AgentSessionConfig::default()
                },
                Instant::now(),
            );
            let mut link = AgentLink { conn, send, recv, session };
            Ok(match link.drive(true).await {
                None => Outcome::Welcomed(Box::new(link)),
                Some(end) => Outcome::from_end(end),
            })
        };
        tokio::time::timeout(ATTEMPT_BOUND, attempt).await.context("connection attempt hung")?
    }
}

/// How one agent link connection ended.
#[derive(Debug)]
enum End {
    /// The QUIC connection closed.
    Connection(quinn::ConnectionError),
    /// The agent's session closed (e.g. the control plane's `Refused`).
    Session(CloseReason),
}

/// What came of a connection attempt.
enum Outcome {
    /// Welcomed: the link is up.
    Welcomed(Box<AgentLink>),
    /// The control plane's TLS refused the handshake (CONNECTION_CLOSE with a TLS alert).
    RefusedInHandshake(String),
    /// The control plane closed the connection with this application code.
    Closed { code: u64, reason: String },
    /// The control plane's session refused the Hello.
    Refused(String),
    /// Anything else.
    Other(String),
}

impl Outcome {
    fn from_end(end: End) -> Self {
        match end {
            // The crypto error range: a TLS alert.
            End::Connection(quinn::ConnectionError::ConnectionClosed(c))
                if (0x100..0x200).contains(&u64::from(c.error_code)) =>
            {
                Outcome::RefusedInHandshake(c.to_string())
            }
            End::Connection(quinn::ConnectionError::ApplicationClosed(c)) => Outcome::Closed {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            End::Session(CloseReason::Refused(reason)) => Outcome::Refused(reason),
            other => Outcome::Other(format!("{other:?}")),
        }
    }

    fn describe(&self) -> String {
        match self {
            Outcome::Welcomed(_) => "welcomed".into(),
            Outcome::RefusedInHandshake(e) => format!("refused in the TLS handshake ({e})"),
            Outcome::Closed { code, reason } => format!("closed with code {code} ({reason})"),
            Outcome::Refused(r) => format!("refused by the session ({r})"),
            Outcome::Other(o) => format!("ended otherwise: {o}"),
        }
    }
}

/// The agent end of a link connection: the quinn stream pumped through an [`AgentSession`], as
/// `agent/src/link.rs` does (heartbeats answered, everything else ignored).
struct AgentLink {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: AgentSession,
}

impl AgentLink {
    /// Pumps until the Welcome (`until_welcome`; returns None) or until the link ends.
    async fn drive(&mut self, until_welcome: bool) -> Option<End> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(event) = self.session.poll_event() {
                match event {
                    AgentEvent::Welcomed { .. } if until_welcome => {
                        if let Err(end) = self.flush().await {
                            return Some(end);
                        }
                        return None;
                    }
                    AgentEvent::HeartbeatDue => self.session.send_heartbeat(health(), Instant::now()),
                    AgentEvent::Closed { reason } => return Some(End::Session(reason)),
                    _ => {}
                }
            }
            if let Err(end) = self.flush().await {
                return Some(end);
            }
            let deadline = self.session.poll_timeout();
            let sleep = tokio::time::sleep_until(
                deadline.map_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600), Into::into),
            );
            tokio::select! {
                read = self.recv.read(&mut buf) => match read {
                    Ok(Some(n)) => self.session.handle_input(&buf[..n], Instant::now()),
                    Ok(None) => self.session.handle_end_of_stream(Instant::now()),
                    Err(_) => return Some(self.connection_end().await),
                },
                () = sleep, if deadline.is_some() => self.session.handle_timeout(Instant::now()),
            }
        }
    }

    async fn flush(&mut self) -> std::result::Result<(), End> {
        while let Some(bytes) = self.session.poll_transmit() {
            if self.send.write_all(&bytes).await.is_err() {
                return Err(self.connection_end().await);
            }
        }
        Ok(())
    }

    async fn connection_end(&self) -> End {
        match tokio::time::timeout(REACTION_BOUND, self.conn.closed()).await {
            Ok(e) => End::Connection(e),
            Err(_) => End::Session(CloseReason::ProtocolViolation("stream failed, connection still open".into())),
        }
    }
}

fn health() -> Health {
    Health {
        sampled_at_unix_ms: gaffer_control::now_ms(),
        source: HealthSource::CpuOnly { reason: "cert matrix test".into() },
        cpu_percent: 1.0,
        load_avg_1m: 0.1,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 8 << 30,
        disks: Vec::new(),
        gpus: Vec::new(),
        inference: None,
        jobs_running: 0,
        job_slots: 1,
        jobs_queued: 0,
        outbox_pending: 0,
        outbox_full: false,
    }
}

/// Parameters of an agent certificate as the fleet CA makes them (CN, the agent URI SAN, EKU
/// clientAuth, digitalSignature), with the validity given.
fn agent_cert_params(
    agent: AgentId,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Gaffer");
    dn.push(DnType::CommonName, format!("gaffer-agent {agent}"));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(gaffer_certs::agent_uri_san(agent).try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// An agent certificate for `agent` signed with the fleet CA's own key, valid only in
/// [`not_before`, `not_after`] (what the CA would never issue today).
fn ca_signed_with_validity(
    ca: &FleetCa,
    agent: AgentId,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<ClientCert> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem(), KeyPair::from_pem(&ca.key_pem())?)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = agent_cert_params(agent, not_before, not_after)?;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A self-signed certificate that otherwise looks like `agent`'s.
fn self_signed(agent: AgentId) -> Result<ClientCert> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = time::OffsetDateTime::now_utc();
    let params = agent_cert_params(agent, now - time::Duration::hours(1), now + time::Duration::days(7))?;
    let cert = params.self_signed(&key)?;
    Ok(ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A [`ClientSessionStore`] (rustls' in-memory one) that counts the TLS 1.3 session tickets the
/// server gave and the ones offered for resumption: the observable of session resumption.
#[derive(Debug)]
struct TicketCounter {
    inner: ClientSessionMemoryCache,
    received: AtomicUsize,
    offered: AtomicUsize,
}

impl TicketCounter {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: ClientSessionMemoryCache::new(256),
            received: AtomicUsize::new(0),
            offered: AtomicUsize::new(0),
        })
    }
    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
    fn offered(&self) -> usize {
        self.offered.load(Ordering::SeqCst)
    }
}

impl ClientSessionStore for TicketCounter {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value);
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }
    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.received.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(server_name, value);
    }
    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let ticket = self.inner.take_tls13_ticket(server_name);
        if ticket.is_some() {
            self.offered.fetch_add(1, Ordering::SeqCst);
        }
        ticket
    }
}

/// Closes a welcomed link as the agent does on shutdown and waits until the control plane has
/// taken the agent out of the fleet.
async fn hang_up(cp: &ControlPlane, agent: AgentId, link: Box<AgentLink>) -> Result<()> {
    link.conn.close(0u32.into(), b"test done");
    cp.expect_disconnected(agent).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_certificate_is_refused_at_the_endpoint_with_its_own_reason() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let (agent, good) = cp.enroll(None)?;
    let (other_agent, _) = cp.enroll(None)?;

    // Control: a good certificate is welcomed and nothing is counted as refused.
    let before = cp.refusals()?;
    match cp.attempt(&cp.client(&good, None)?, agent).await? {
        Outcome::Welcomed(link) => {
            ensure!(cp.state.scheduler.fleet().is_connected(agent), "welcomed, but not in the fleet");
            hang_up(&cp, agent, link).await?;
        }
        other => bail!("the good certificate was {}", other.describe()),
    }
    cp.expect_refusals(&before, &[]).await?;

    let (revoked_agent, revoked_cert) = cp.enroll(None)?;
    cp.revoke(revoked_agent).await?;
    let foreign_ca = FleetCa::generate("another studio")?;
    let foreign = {
        let key = AgentKey::generate()?;
        let cert_pem = foreign_ca.sign_agent_csr(&key.csr_pem(agent)?, agent, 30)?;
        ClientCert { cert_pem, key_pem: key.key_pem() }
    };
    let (server_pair, _) = cp.pki.server_pair();
    let server_cert = ClientCert { cert_pem: server_pair.cert_pem, key_pem: server_pair.key_pem };
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let cases: Vec<(&str, ClientCert, AgentId, &str)> = vec![
        ("expired", ca_signed_with_validity(&cp.ca, agent, now - day * 2, now - day)?, agent, "expired"),
        ("not yet valid", ca_signed_with_validity(&cp.ca, agent, now + day, now + day * 2)?, agent, "not_yet_valid"),
        ("of a revoked agent", revoked_cert, revoked_agent, "revoked"),
        ("from a foreign CA", foreign, agent, "foreign_ca"),
        ("self-signed", self_signed(agent)?, agent, "self_signed"),
        ("the server certificate", server_cert, agent, "wrong_purpose"),
    ];
    for (what, cert, hello_agent, reason) in cases {
        let before = cp.refusals()?;
        match cp.attempt(&cp.client(&cert, None)?, hello_agent).await? {
            Outcome::RefusedInHandshake(_) => {}
            other => bail!("a certificate {what} was {}, not refused in the handshake", other.describe()),
        }
        cp.expect_refusals(&before, &[(reason, 1)]).await.with_context(|| format!("certificate {what}"))?;
        ensure!(!cp.state.scheduler.fleet().is_connected(hello_agent), "certificate {what}: agent in the fleet");
    }

    // A valid certificate of one agent, with a Hello from another.
    let before = cp.refusals()?;
    match cp.attempt(&cp.client(&good, None)?, other_agent).await? {
        Outcome::Refused(reason) => {
            ensure!(reason.contains(&other_agent.to_string()) && reason.contains(&agent.to_string()), "{reason}")
        }
        other => bail!("agent {agent}'s certificate with a Hello from {other_agent} was {}", other.describe()),
    }
    cp.expect_refusals(&before, &[("agent_id_mismatch", 1)]).await.context("agent id mismatch")?;
    ensure!(!cp.state.scheduler.fleet().is_connected(other_agent), "the Hello's agent is in the fleet");
    ensure!(!cp.state.scheduler.fleet().is_connected(agent), "the certificate's agent is in the fleet");

    // The same good certificate still works: nothing above harmed the enrolled agent.
    match cp.attempt(&cp.client(&good, None)?, agent).await? {
        Outcome::Welcomed(link) => hang_up(&cp, agent, link).await?,
        other => bail!("the good certificate, again, was {}", other.describe()),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_connected_agent_closes_its_link_within_5_s_and_refuses_it_after() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let (agent, cert) = cp.enroll(None)?;
    let endpoint = cp.client(&cert, None)?;
    let mut link = match cp.attempt(&endpoint, agent).await? {
        Outcome::Welcomed(link) => link,
        other => bail!("the agent was {}", other.describe()),
    };
    ensure!(cp.state.scheduler.fleet().is_connected(agent), "welcomed, but not in the fleet");
    let driver = tokio::spawn(async move { link.drive(false).await });

    let revoked_at = tokio::time::Instant::now();
    cp.revoke(agent).await?;
    let end = tokio::time::timeout(REACTION_BOUND, driver)
        .await
        .context("the revoked agent's link is still open 5 s after the revocation")??;
    match end.map(Outcome::from_end) {
        Some(Outcome::Closed { code, .. }) if code == u64::from(close_code::REVOKED) => {}
        Some(other) => bail!("the revoked agent's link was {}, not closed with REVOKED", other.describe()),
        None => bail!("the link driver stopped without an end"),
    }
    tracing::info!(elapsed = ?revoked_at.elapsed(), "revoked link closed");
    cp.expect_disconnected(agent).await?;
    ensure!(cp.counter("gaffer_link_closed_revoked")? == 1, "gaffer_link_closed_revoked_total is not 1");

    let before = cp.refusals()?;
    match cp.attempt(&endpoint, agent).await? {
        Outcome::RefusedInHandshake(_) => {}
        other => bail!("the revoked agent's reconnect was {}", other.describe()),
    }
    cp.expect_refusals(&before, &[("revoked", 1)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_cannot_resume_a_session() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let (agent, cert) = cp.enroll(None)?;
    // The client keeps TLS sessions and would resume with them; one client config and endpoint for
    // both connections, so a ticket from the first would be offered on the second.
    let sessions = TicketCounter::new();
    let endpoint = cp.client(&cert, Some(sessions.clone()))?;
    match cp.attempt(&endpoint, agent).await? {
        Outcome::Welcomed(mut link) => {
            // A heartbeat round trip after the Welcome: any ticket sent with the handshake is in.
            link.session.send_heartbeat(health(), Instant::now());
            if let Err(end) = link.flush().await {
                bail!("link ended after the Welcome: {end:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            hang_up(&cp, agent, link).await?;
        }
        other => bail!("the agent was {}", other.describe()),
    }
    ensure!(sessions.received() == 0, "the control plane issued {} TLS session tickets", sessions.received());

    cp.revoke(agent).await?;
    let before = cp.refusals()?;
    match cp.attempt(&endpoint, agent).await? {
        Outcome::RefusedInHandshake(_) => {}
        other => bail!("the revoked agent's reconnect was {}", other.describe()),
    }
    // Refused by the certificate check in the handshake (a resumed session would skip it).
    cp.expect_refusals(&before, &[("revoked", 1)]).await?;
    ensure!(sessions.offered() == 0, "the client offered a session ticket");
    Ok(())
}

/// Control for the test above: the ticket counter does see tickets when a server sends them, and a
/// resumed session skips the handshake's certificate check — why agent links must not resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_server_that_sends_tickets_lets_a_revoked_agent_resume_past_the_handshake_check() -> Result<()> {
    let cp = ControlPlane::start_with(|tls| {
        tls.send_tls13_tickets = 2;
        tls.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    })
    .await?;
    let (agent, cert) = cp.enroll(None)?;
    let sessions = TicketCounter::new();
    let endpoint = cp.client(&cert, Some(sessions.clone()))?;
    match cp.attempt(&endpoint, agent).await? {
        Outcome::Welcomed(mut link) => {
            link.session.send_heartbeat(health(), Instant::now());
            if let Err(end) = link.flush().await {
                bail!("link ended after the Welcome: {end:?}");
            }
            let deadline = tokio::time::Instant::now() + REACTION_BOUND;
            while sessions.received() == 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            hang_up(&cp, agent, link).await?;
        }
        other => bail!("the agent was {}", other.describe()),
    }
    ensure!(sessions.received() > 0, "no ticket counted from a server that sends them: the observable is blind");

    cp.revoke(agent).await?;
    let before = cp.refusals()?;
    let outcome = cp.attempt(&endpoint, agent).await?;
    ensure!(sessions.offered() == 1, "the client offered {} tickets", sessions.offered());
    // The resumed handshake never asked the certificate policy: `revoked` is not counted, and only
    // the link's own check of the store refuses the agent.
    match outcome {
        Outcome::Closed { code, .. } if code == u64::from(close_code::UNAUTHENTICATED) => {}
        other => bail!("the resumed reconnect was {}", other.describe()),
    }
    cp.expect_refusals(&before, &[("unauthenticated", 1)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_link_closes_when_its_certificate_expires() -> Result<()> {
    let cp = ControlPlane::start().await?;
    // An enrolled agent presenting a fleet-CA certificate of the shortest lifetime the CA issues
    // (60 s), issued 52 s ago: 8 s left, so the test waits seconds, not the whole minute.
    let (agent, _) = cp.enroll(None)?;
    let remaining_secs = 8;
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(remaining_secs);
    let not_before = not_after - time::Duration::seconds(gaffer_certs::AGENT_CERT_VALIDITY_SECS_MIN as i64);
    let started = tokio::time::Instant::now();
    let cert = ca_signed_with_validity(&cp.ca, agent, not_before, not_after)?;
    let endpoint = cp.client(&cert, None)?;
    let mut link = match cp.attempt(&endpoint, agent).await? {
        Outcome::Welcomed(link) => link,
        other => bail!("the agent was {}", other.describe()),
    };
    // The link stays up with heartbeats until the certificate runs out. Correctness bound, not a
    // performance assertion: the time left plus 15 s.
    let bound = Duration::from_secs(remaining_secs as u64 + 15);
    let end = tokio::time::timeout_at(started + bound, link.drive(false)).await.with_context(|| {
        format!("the link is still open {bound:?} after connecting with a certificate {remaining_secs} s from expiry")
    })?;
    let closed_after = started.elapsed();
    match end.map(Outcome::from_end) {
        Some(Outcome::Closed { code, .. }) if code == u64::from(close_code::CERT_EXPIRED) => {}
        Some(other) => bail!("the link was {} after {closed_after:?}, not closed with CERT_EXPIRED", other.describe()),
        None => bail!("the link driver stopped without an end"),
    }
    // notAfter has whole seconds: the close may come up to a second before it, never much earlier.
    ensure!(
        closed_after + Duration::from_secs(2) >= Duration::from_secs(remaining_secs as u64),
        "closed after {closed_after:?}, before the certificate's remaining {remaining_secs} s were up"
    );
    cp.expect_disconnected(agent).await?;
    ensure!(cp.counter("gaffer_link_closed_cert_expired")? == 1, "gaffer_link_closed_cert_expired_total is not 1");

    // The certificate the fleet CA issued is now refused in the handshake as expired.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cp.refusals()?;
    match cp.attempt(&endpoint, agent).await? {
        Outcome::RefusedInHandshake(_) => {}
        other => bail!("the expired certificate's reconnect was {}", other.describe()),
    }
    cp.expect_refusals(&before, &[("expired", 1)]).await
}
