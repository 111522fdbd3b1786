//! Admission control at the real QUIC endpoint (issue 10): an in-process control plane (temp data
//! dir, sled store, the fleet PKI, a quinn endpoint on 127.0.0.1 built by `quinn_server_config`,
//! the production `Link::run` accept loop) and real quinn clients on loopback.
//!
//! * With QUIC Retry on (the default) an enrollment still succeeds, and the Retry is counted; with
//!   it off, none is sent.
//! * Over the cap on handshakes in progress a connection is refused (`CONNECTION_REFUSED`, before
//!   any TLS work) and counted under `gaffer_admission_refused_total{reason="handshakes"}`; once a
//!   handshake ends its place is free again. A handshake is held "in progress" by a client whose
//!   certificate check waits for the test.
//! * Over the cap on open enrollment connections a new one is closed with code 8 and the reason
//!   "control plane busy, retry", and counted under `reason="enroll_connections"`.

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use gaffer_certs::{AgentKey, FleetCa};
use gaffer_control::admission::{self, AdmissionConfig};
use gaffer_control::datadir::DataDir;
use gaffer_control::identity::{LinkCertPolicy, Pki, AGENT_CERT_TTL_SECS_DEFAULT};
use gaffer_control::link::{quinn_server_config, Link, LinkConfig};
use gaffer_control::scheduler::SchedulerConfig;
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{Actor, Store};
use gaffer_control::AppState;
use gaffer_protocol::codec::{encode_frame, FrameDecoder};
use gaffer_protocol::enroll::{EnrollRequest, EnrollResponse, ENROLL_FRAME_BYTES_MAX};
use gaffer_protocol::version::VersionRange;
use gaffer_protocol::ALPN_ENROLL;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use uuid::Uuid;

type Result<T> = anyhow::Result<T>;

const SERVER_NAME: &str = "localhost";
/// Generous bound for the control plane to react to one event (a metric to move, a connection to
/// be answered). A correctness bound, not a performance target.
const REACTION_BOUND: Duration = Duration::from_secs(10);

/// A control plane serving enrollment and the agent link in this process, as `serve` sets it up,
/// with the admission settings under test.
struct ControlPlane {
    _dir: tempfile::TempDir,
    ca: FleetCa,
    state: AppState,
    addr: SocketAddr,
    _endpoint: quinn::Endpoint,
}

impl ControlPlane {
    async fn start(admission: AdmissionConfig) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let dd = DataDir::new(dir.path().join("control"));
        dd.create()?;
        let ca = FleetCa::generate("studio")?;
        let server = ca.issue_server_cert(&[SERVER_NAME.to_owned()])?;
        dd.write_pki(&ca, &server)?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dd.store_path())?);
        let state = AppState::new(store, SchedulerConfig::default());
        let pki = Pki::open(&dd, vec![SERVER_NAME.to_owned()], AGENT_CERT_TTL_SECS_DEFAULT, state.metrics.clone())?;
        let link_cfg = LinkConfig { admission, ..LinkConfig::default() };
        let policy = LinkCertPolicy::new(state.revocations.clone(), state.metrics.clone());
        let tls = pki.quic_tls(policy)?;
        let endpoint = quinn::Endpoint::server(quinn_server_config(tls, &link_cfg)?, "127.0.0.1:0".parse()?)?;
        let addr = endpoint.local_addr()?;
        let link = Link::new(state.clone(), pki, link_cfg)?;
        tokio::spawn(link.run(endpoint.clone()));
        Ok(Self { _dir: dir, ca, state, addr, _endpoint: endpoint })
    }

    /// One sample of `/metrics` (e.g. `gaffer_quic_retries_sent_total`), 0 when absent.
    fn metric(&self, sample: &str) -> f64 {
        let text = self.state.metrics.encode(self.state.store.as_ref());
        let prefix = format!("{sample} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Waits until `sample` reads `want`.
    async fn wait_metric(&self, sample: &str, want: f64) -> Result<()> {
        let deadline = Instant::now() + REACTION_BOUND;
        loop {
            let got = self.metric(sample);
            if got == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{sample} is {got}, expected {want}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client endpoint that enrolls as `gaffer-agent enroll` does (ALPN `gaffer-enroll/1`, the CA
    /// checked by fingerprint).
    fn enroll_client(&self) -> Result<quinn::Endpoint> {
        client(gaffer_certs::client_config_enroll(self.ca.fingerprint())?)
    }

    /// A real enrollment with a freshly minted token: the certificate the control plane answers.
    async fn enroll(&self, endpoint: &quinn::Endpoint) -> Result<String> {
        let minted = gaffer_control::admin::mint_enrollment_token(
            self.state.store.as_ref(),
            &self.ca.fingerprint(),
            &Actor::ControlPlane,
            "stage-a",
            600,
        )?;
        let agent_id = Uuid::new_v4();
        let key = AgentKey::generate()?;
        let req = EnrollRequest {
            versions: VersionRange::ours(),
            token: minted.token,
            agent_id,
            csr_pem: key.csr_pem(agent_id)?,
            hostname: "gpu-box".into(),
            site: Some("stage-a".into()),
            agent_version: "0.1.0".into(),
            bundle_recipient: None,
            renew: false,
        };
        let conn = endpoint.connect(self.addr, SERVER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&encode_frame(&req, ENROLL_FRAME_BYTES_MAX)?).await?;
        send.finish()?;
        let mut dec = FrameDecoder::new(ENROLL_FRAME_BYTES_MAX);
        let mut buf = vec![0u8; 16 * 1024];
        let resp = loop {
            if let Some(payload) = dec.next_payload()? {
                break EnrollResponse::decode_payload(&payload)?;
            }
            match recv.read(&mut buf).await? {
                Some(n) => dec.push(&buf[..n]),
                None => bail!("the control plane closed without answering"),
            }
        };
        conn.close(0u32.into(), b"enrolled");
        match resp {
            EnrollResponse::Enrolled { agent_id: got, cert_pem, .. } => {
                ensure!(got == agent_id, "enrolled as {got}, asked for {agent_id}");
                Ok(cert_pem)
            }
            other => bail!("enrollment answered {other:?}"),
        }
    }
}

fn client(tls: rustls::ClientConfig) -> Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

/// A server certificate check that waits until the test lets it go, then accepts: it holds its
/// connection's handshake in progress on the control plane (the server's flight is sent, the
/// client's Finished is not). Signatures are still verified.
#[derive(Debug)]
struct StalledVerifier {
    release: Mutex<mpsc::Receiver<()>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for StalledVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let release = self.release.lock().map_err(|_| rustls::Error::General("release lock poisoned".into()))?;
        release.recv_timeout(Duration::from_secs(60)).map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Starts a handshake with the control plane at `addr` that stays in progress until the returned
/// sender sends (or is dropped); the client runs on a thread of its own, since its certificate
/// check blocks. The thread's result says how the handshake ended.
fn stalled_handshake(addr: SocketAddr) -> (mpsc::Sender<()>, std::thread::JoinHandle<Result<()>>) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || -> Result<()> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(StalledVerifier { release: Mutex::new(rx), provider: provider.clone() });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let endpoint = client(tls)?;
            let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            Ok(())
        })
    });
    (tx, thread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quic_retry_an_enrollment_succeeds_and_the_retry_is_counted() -> Result<()> {
    let cp = ControlPlane::start(AdmissionConfig::default()).await?;
    let endpoint = cp.enroll_client()?;
    let cert = cp.enroll(&endpoint).await?;
    ensure!(cert.contains("BEGIN CERTIFICATE"), "no certificate in the answer");
    assert!(cp.metric("gaffer_quic_retries_sent_total") >= 1.0, "no Retry was sent before the handshake");
    let sent = cp.metric("gaffer_quic_retries_sent_total");
    cp.enroll(&endpoint).await?;
    assert!(cp.metric("gaffer_quic_retries_sent_total") > sent, "every new connection is validated again");
    assert_eq!(cp.metric("gaffer_admission_refused_total{reason=\"handshakes\"}"), 0.0);
    cp.wait_metric("gaffer_quic_handshakes_in_progress", 0.0).await?;

    let off = ControlPlane::start(AdmissionConfig { quic_retry: false, ..AdmissionConfig::default() }).await?;
    off.enroll(&off.enroll_client()?).await?;
    assert_eq!(off.metric("gaffer_quic_retries_sent_total"), 0.0, "--quic-retry off sends no Retry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_handshake_cap_a_connection_is_refused_and_counted() -> Result<()> {
    let cp = ControlPlane::start(AdmissionConfig { handshakes_max: 1, ..AdmissionConfig::default() }).await?;
    let (release, stalled) = stalled_handshake(cp.addr);
    cp.wait_metric("gaffer_quic_handshakes_in_progress", 1.0).await?;

    // The one place is taken: the next connection is refused before any TLS work.
    let endpoint = cp.enroll_client()?;
    let refused = tokio::time::timeout(REACTION_BOUND, endpoint.connect(cp.addr, SERVER_NAME)?)
        .await
        .context("a connection over the cap was not answered")?;
    match refused {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(close.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED, "{close}");
        }
        Err(other) => bail!("refused with {other}, expected CONNECTION_REFUSED"),
        Ok(_) => bail!("a handshake over the cap of 1 was accepted"),
    }
    assert_eq!(cp.metric("gaffer_admission_refused_total{reason=\"handshakes\"}"), 1.0);
    assert_eq!(cp.metric("gaffer_quic_handshakes_in_progress"), 1.0);

    // The stalled handshake completes; its place is free and the next enrollment goes through.
    release.send(())?;
    stalled.join().map_err(|_| anyhow::anyhow!("stalled client panicked"))??;
    cp.wait_metric("gaffer_quic_handshakes_in_progress", 0.0).await?;
    cp.enroll(&endpoint).await?;
    assert_eq!(cp.metric("gaffer_admission_refused_total{reason=\"handshakes\"}"), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_enrollment_cap_a_connection_is_closed_busy() -> Result<()> {
    let cp = ControlPlane::start(AdmissionConfig { enroll_connections_max: 1, ..AdmissionConfig::default() }).await?;
    // A stranger opens an enrollment connection and sends nothing: it holds the one place.
    let idle = cp.enroll_client()?;
    let idle_conn = idle.connect(cp.addr, SERVER_NAME)?.await?;
    cp.wait_metric("gaffer_enroll_connections_open", 1.0).await?;

    let endpoint = cp.enroll_client()?;
    let conn = endpoint.connect(cp.addr, SERVER_NAME)?.await?;
    let closed = tokio::time::timeout(REACTION_BOUND, conn.closed()).await.context("not closed")?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, admission::close_code::BUSY.into());
            assert_eq!(&close.reason[..], admission::BUSY_REASON.as_bytes());
            assert_eq!(admission::BUSY_REASON, "control plane busy, retry");
        }
        other => bail!("closed with {other}, expected the busy close"),
    }
    assert_eq!(cp.metric("gaffer_admission_refused_total{reason=\"enroll_connections\"}"), 1.0);
    // The idle one gives its place back when it goes (or when the control plane stops waiting
    // for its request, 10 s); a real enrollment gets through afterwards.
    idle_conn.close(0u32.into(), b"bye");
    cp.wait_metric("gaffer_enroll_connections_open", 0.0).await?;
    cp.enroll(&endpoint).await?;
    Ok(())
}
