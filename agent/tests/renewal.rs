//! Online certificate renewal and re-enrollment, with the real agent link (`run_link`) against the
//! real control-plane link (`gaffer_control::link::Link`, its `Pki`, scheduler and sled store) on
//! loopback QUIC, in one process: real certificates, real enrollment, real analysis workers.
//!
//! * At half its life the certificate is renewed over the link with a key made on the box; the
//!   files switch over, the control plane records the new serial, the link comes back at once.
//! * A CA rotation (`init`, `update-clients`) pushes a two-CA trust bundle and asks the agent to
//!   renew now; a job running meanwhile keeps its worker process and its one attempt.
//! * A renewed certificate the control plane refuses in the handshake is dropped, the previous
//!   one used, and renewal retried later with the same renewal key.
//! * `enroll --renew` keeps the agent id, site, outbox and job queue and replaces the key.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_agent::credentials::{self, Credentials};
use gaffer_agent::datadir::{AgentIdentity, DataDir};
use gaffer_agent::health::HealthSampler;
use gaffer_agent::link::{self, LinkParams, LinkState, LinkStatus};
use gaffer_agent::outbox::Outbox;
use gaffer_agent::runner::{Runner, RunnerConfig};
use gaffer_agent::AgentError;
use gaffer_certs::{EnrollmentToken, FleetCa};
use gaffer_control::identity::{LinkCertPolicy, Pki, RotationPhase};
use gaffer_control::link::{Link, LinkConfig};
use gaffer_control::offline::OfflineSync;
use gaffer_control::scheduler::{JobRequest, SchedulerConfig};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{EnrollmentTokenRecord, JobOrigin, JobState, Priority, Store};
use gaffer_control::AppState;
use gaffer_protocol::messages::{AgentId, AgentMessage, Capabilities, Profile};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;
type TestResult = BoxResult<()>;

const SITE: &str = "stage-a";
const FLEET: &str = "test-fleet";

/// A control plane serving QUIC on 127.0.0.1, wired the way `gaffer-control serve` wires it.
struct ControlPlane {
    state: AppState,
    pki: Arc<Pki>,
    sync: OfflineSync,
    addr: String,
}

impl ControlPlane {
    async fn start(root: &Path, agent_cert_ttl_secs: u64) -> BoxResult<Self> {
        let dd = gaffer_control::datadir::DataDir::new(root.join("control"));
        dd.create()?;
        let names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        let ca = FleetCa::generate(FLEET)?;
        let server = ca.issue_server_cert(&names)?;
        gaffer_certs::write_secret_file(&dd.ca_key_path(), ca.key_pem().as_bytes())?;
        std::fs::write(dd.ca_cert_path(), ca.cert_pem())?;
        gaffer_certs::write_secret_file(&dd.server_key_path(), server.key_pem.as_bytes())?;
        std::fs::write(dd.server_cert_path(), server.cert_pem)?;
        let config = gaffer_control::datadir::ControlConfig {
            quic_listen: "127.0.0.1:0".parse()?,
            http_listen: "127.0.0.1:0".parse()?,
            server_names: names.clone(),
            fleet_name: FLEET.into(),
            agent_cert_ttl_secs,
        };
        dd.write_public(&dd.config_path(), serde_json::to_string_pretty(&config)?.as_bytes())?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dd.store_path())?);
        let state = AppState::new(store, SchedulerConfig::default());
        let pki = Pki::open(&dd, names, agent_cert_ttl_secs, state.metrics.clone())?;
        // Heartbeats every second, so renewal is checked every second.
        let link_cfg = LinkConfig { heartbeat_interval_secs: 1, ..LinkConfig::default() };
        let policy = LinkCertPolicy::new(state.revocations.clone(), state.metrics.clone());
        let tls = pki.quic_tls(policy.clone())?;
        let endpoint = quinn::Endpoint::server(
            gaffer_control::link::quinn_server_config(tls, &link_cfg)?,
            "127.0.0.1:0".parse()?,
        )?;
        // As `serve`: a rotation or server renewal reloads the endpoint's TLS.
        {
            let (pki, endpoint, link_cfg) = (pki.clone(), endpoint.clone(), link_cfg.clone());
            tokio::spawn(async move {
                let mut changed = pki.subscribe();
                while changed.changed().await.is_ok() {
                    if let Ok(cfg) = pki.quic_tls(policy.clone()).map_err(|e| e.to_string()).and_then(|tls| {
                        gaffer_control::link::quinn_server_config(tls, &link_cfg).map_err(|e| e.to_string())
                    }) {
                        endpoint.set_server_config(Some(cfg));
                    }
                }
            });
        }
        tokio::spawn(state.scheduler.clone().run());
        let link = Link::new(state.clone(), pki.clone(), link_cfg)?;
        let sync = OfflineSync::open(&dd, pki.clone(), state.clone(), link.ingest())?;
        let addr = format!("127.0.0.1:{}", endpoint.local_addr()?.port());
        tokio::spawn(link.run(endpoint.clone()));
        Ok(Self { state, pki, sync, addr })
    }

    /// A fresh one-time enrollment token for `site` (as `gaffer-control token create`).
    fn token(&self, site: &str) -> BoxResult<String> {
        let token = EnrollmentToken::generate();
        let now = gaffer_control::now_ms();
        self.state.store.insert_enrollment_token(&EnrollmentTokenRecord {
            hash: *token.hash().as_bytes(),
            site: site.to_owned(),
            created_at_ms: now,
            expires_at_ms: now + 600_000,
            used_at_ms: None,
            used_by: None,
        })?;
        Ok(token.as_str().to_owned())
    }

    fn recorded_serial(&self, agent: AgentId) -> BoxResult<Option<String>> {
        Ok(self.state.store.get_agent(agent)?.and_then(|a| a.cert_serial_hex))
    }
}

/// Enrolls a new agent with the real `enroll`.
async fn enroll(cp: &ControlPlane, root: &Path) -> BoxResult<(DataDir, AgentIdentity)> {
    let dd = DataDir::new(root.join("agent"));
    let params = gaffer_agent::enroll::EnrollParams {
        control_addr: cp.addr.clone(),
        token: cp.token(SITE)?,
        ca_fingerprint: cp.pki.enroll_fingerprint(),
        site: Some(SITE.into()),
    };
    let identity = gaffer_agent::enroll::enroll(&dd, &params).await?;
    Ok((dd, identity))
}

/// A running agent: its state database, runner and link, as `gaffer-agent run` sets them up.
struct Agent {
    dd: DataDir,
    id: AgentId,
    outbox: Outbox,
    runner: Arc<Runner>,
    status: Arc<LinkStatus>,
    link: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    fn run(dd: &DataDir, identity: &AgentIdentity, volumes: Vec<PathBuf>) -> BoxResult<Self> {
        let db = sled::open(dd.state_path())?;
        let outbox = Outbox::open(&db)?;
        let runner = Runner::new(
            RunnerConfig {
                volumes: volumes.clone(),
                worker_exe: PathBuf::from(env!("CARGO_BIN_EXE_gaffer-agent")),
                ..RunnerConfig::default()
            },
            outbox.clone(),
            &db,
        )?;
        let capabilities = Capabilities {
            gpus: vec![],
            volumes: volumes.iter().map(|v| v.display().to_string()).collect(),
            watch_roots: vec![],
            job_slots: 1,
            profiles: vec![Profile::Shots],
            models: vec![],
        };
        let health = Arc::new(Mutex::new(HealthSampler::new(volumes)));
        let status = Arc::new(LinkStatus::default());
        let params = LinkParams {
            identity: identity.clone(),
            data_dir: dd.clone(),
            capabilities,
            updates: None,
            control_addrs: vec![],
        };
        let link = tokio::spawn(link::run_link(params, outbox.clone(), runner.clone(), health, status.clone()));
        Ok(Self { dd: dd.clone(), id: identity.agent_id, outbox, runner, status, link })
    }

    fn current_serial(&self) -> BoxResult<String> {
        Ok(Credentials::load(&self.dd, self.id)?.current.ok_or("no current pair")?.serial_hex)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.link.abort();
    }
}

/// Logs to the test output, filtered by `GAFFER_LOG` (default: warnings).
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> BoxResult<bool>) -> TestResult {
    let deadline = Instant::now() + limit;
    loop {
        if ok()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's link is up with certificate `serial` on disk as the current one, switched over
/// completely, and the control plane has it on record.
fn switched_to_new(cp: &ControlPlane, agent: &Agent, old_serial: &str) -> BoxResult<bool> {
    let creds = Credentials::load(&agent.dd, agent.id)?;
    let Some(current) = creds.current else { return Ok(false) };
    Ok(current.serial_hex != old_serial
        && creds.next.is_none()
        && !creds.next_key_present
        && agent.status.get() == LinkState::Up
        && cp.recorded_serial(agent.id)?.as_deref() == Some(current.serial_hex.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_renewed_online_at_half_life_and_the_files_switch_over() -> TestResult {
    logs();
    let tmp = tempfile::tempdir()?;
    let cp = ControlPlane::start(tmp.path(), 60).await?;
    let (dd, identity) = enroll(&cp, tmp.path()).await?;
    let enrolled = Credentials::load(&dd, identity.agent_id)?;
    let first = enrolled.current.clone().ok_or("not enrolled")?;
    let due_ms = enrolled.renewal_due_at_ms(&first);
    assert!(due_ms > gaffer_agent::now_ms() + 20_000, "due half way through the 60 s, not at once");
    let enrolled_key = dd.read(&dd.key_path())?;
    let agent = Agent::run(&dd, &identity, vec![])?;
    wait_for("the link", Duration::from_secs(20), || Ok(agent.status.get() == LinkState::Up)).await?;
    wait_for("the first renewal", Duration::from_secs(60), || switched_to_new(&cp, &agent, &first.serial_hex)).await?;
    assert!(gaffer_agent::now_ms() >= due_ms, "renewed before half its life");
    let second = Credentials::load(&dd, identity.agent_id)?.current.ok_or("no current pair")?;
    assert_ne!(dd.read(&dd.key_path())?, enrolled_key, "a new key, made on the box");
    assert!(second.not_after_ms > first.not_after_ms);
    let status = agent.status.renewal();
    assert!(status.last_renewed_at_ms.is_some() && status.last_error.is_none(), "{status:?}");
    // The renewed certificate is renewed in turn, from when it arrived.
    wait_for("the second renewal", Duration::from_secs(60), || switched_to_new(&cp, &agent, &second.serial_hex))
        .await?;
    let history = cp.state.store.get_agent(identity.agent_id)?.ok_or("agent gone")?.cert_history;
    assert!(history.len() >= 3, "enrollment and two renewals on record: {history:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_renews_at_once_and_a_running_job_keeps_running() -> TestResult {
    logs();
    let tmp = tempfile::tempdir()?;
    let cp = ControlPlane::start(tmp.path(), 3600).await?;
    let (dd, identity) = enroll(&cp, tmp.path()).await?;
    let media = common::media_dir().canonicalize()?;
    let agent = Agent::run(&dd, &identity, vec![media.clone()])?;
    wait_for("the link", Duration::from_secs(20), || Ok(agent.status.get() == LinkState::Up)).await?;
    let first = agent.current_serial()?;

    // A job long enough (about 30 s of analysis) to be running through the reconnect.
    let path = media.join("bbb-720p-x10.mp4");
    let job = cp.state.scheduler.submit(
        JobRequest {
            path: path.display().to_string(),
            site: SITE.into(),
            agent: Some(identity.agent_id),
            profile: Profile::Shots,
            priority: Priority::Normal,
        },
        JobOrigin::Api,
        None,
        gaffer_control::now_ms(),
    )?;
    wait_for("the job to run", Duration::from_secs(30), || Ok(!agent.runner.worker_pids().is_empty())).await?;
    let worker = agent.runner.worker_pids();

    cp.sync.rotate_ca(RotationPhase::Init, &gaffer_control::store::Actor::ControlPlane)?;
    wait_for("the two-CA trust bundle", Duration::from_secs(10), || {
        Ok(credentials::trust_bundle(&dd).map(|cas| cas.len()).unwrap_or(0) == 2)
    })
    .await?;
    cp.sync.rotate_ca(RotationPhase::UpdateClients, &gaffer_control::store::Actor::ControlPlane)?;
    wait_for("the renewal the rotation asked for", Duration::from_secs(20), || switched_to_new(&cp, &agent, &first))
        .await?;
    assert_eq!(agent.runner.worker_pids(), worker, "the same worker process runs the job through the reconnect");

    // The new certificate is from the new CA.
    let cas = credentials::trust_bundle(&dd)?;
    let pair = Credentials::load(&dd, identity.agent_id)?.current.ok_or("no current pair")?;
    let issuer = credentials::issuer_of(&cas, &pair.cert_pem, identity.agent_id).ok_or("issued by none of ca.pem")?;
    assert_ne!(gaffer_certs::CaFingerprint::from_cert_pem(issuer)?, cp.pki.enroll_fingerprint(), "from the new CA");

    wait_for("the job to succeed", Duration::from_secs(600), || {
        Ok(cp.state.store.get_job(job.id)?.is_some_and(|j| j.state == JobState::Succeeded))
    })
    .await?;
    let done = cp.state.store.get_job(job.id)?.ok_or("job gone")?;
    assert_eq!(done.attempts, 1, "the reconnect cost no attempt");
    wait_for("the outbox to drain", Duration::from_secs(20), || Ok(agent.outbox.is_empty())).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_refused_in_the_handshake_falls_back_and_renewal_reuses_its_key() -> TestResult {
    logs();
    let tmp = tempfile::tempdir()?;
    let cp = ControlPlane::start(tmp.path(), 60).await?;
    let (dd, identity) = enroll(&cp, tmp.path()).await?;
    let id = identity.agent_id;
    let first = Credentials::load(&dd, id)?.current.ok_or("not enrolled")?;
    // A renewal that got as far as a certificate the control plane will refuse (not from its CA),
    // and a current certificate that is due (its arrival recorded at its notBefore).
    let next = credentials::next_key(&dd)?;
    let foreign = FleetCa::generate("another-fleet")?.sign_agent_csr_secs(&next.csr_pem(id)?, id, 3600)?;
    let refused = credentials::install_next_cert(&dd, id, &foreign, gaffer_agent::now_ms())?;
    credentials::record_installed(&dd, &first.serial_hex, first.not_before_ms)?;

    let agent = Agent::run(&dd, &identity, vec![])?;
    // Refused, dropped, the previous certificate used: the link comes up with it.
    wait_for("the fallback", Duration::from_secs(20), || {
        Ok(agent.status.get() == LinkState::Up && !dd.next_cert_path().exists())
    })
    .await?;
    let status = agent.status.renewal();
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("refused")), "{status:?}");
    assert!(status.retry_at_ms.is_some(), "renewal backs off: {status:?}");
    // After the back-off (a tenth of the remaining minute) it renews, with the renewal key it
    // already had.
    wait_for("the renewal", Duration::from_secs(30), || switched_to_new(&cp, &agent, &first.serial_hex)).await?;
    assert_eq!(dd.read(&dd.key_path())?, next.key_pem(), "the renewal key was reused, not replaced");
    assert_ne!(agent.current_serial()?, refused.serial_hex);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_renew_keeps_the_agent_id_site_outbox_and_job_queue() -> TestResult {
    logs();
    let tmp = tempfile::tempdir()?;
    let cp = ControlPlane::start(tmp.path(), 3600).await?;
    let (dd, identity) = enroll(&cp, tmp.path()).await?;
    let id = identity.agent_id;
    let old_key = dd.read(&dd.key_path())?;
    let old_serial = Credentials::load(&dd, id)?.current.ok_or("not enrolled")?.serial_hex;
    // Work waiting while the agent was away: outbox entries and a queued job.
    let (outbox_before, jobs_before) = {
        let db = sled::open(dd.state_path())?;
        let outbox = Outbox::open(&db)?;
        outbox.push(&AgentMessage::JobAccepted { job_id: uuid::Uuid::new_v4(), lease_id: 7 })?;
        outbox.push(&AgentMessage::JobAccepted { job_id: uuid::Uuid::new_v4(), lease_id: 8 })?;
        let jobs = db.open_tree("jobs")?;
        jobs.insert(b"queued-job", b"kept".as_slice())?;
        db.flush()?;
        let entries: Vec<_> = outbox.entries()?.into_iter().map(|e| (e.seq, e.message)).collect();
        (entries, jobs.len())
    };

    // Without --renew: refused, naming --renew.
    let params = gaffer_agent::enroll::EnrollParams {
        control_addr: cp.addr.clone(),
        token: cp.token(SITE)?,
        ca_fingerprint: cp.pki.enroll_fingerprint(),
        site: Some(SITE.into()),
    };
    match gaffer_agent::enroll::enroll(&dd, &params).await {
        Err(e @ AgentError::AlreadyEnrolled { .. }) => assert!(e.to_string().contains("--renew"), "{e}"),
        other => panic!("expected AlreadyEnrolled, got {other:?}"),
    }
    // A used token: refused, nothing switched.
    let renew = |token: String| gaffer_agent::enroll::RenewParams {
        control_addr: None,
        token,
        ca_fingerprint: cp.pki.enroll_fingerprint(),
    };
    let used = cp.token(SITE)?;
    let _ = gaffer_agent::enroll::renew(&dd, &renew(used.clone())).await?;
    let after_first = dd.read(&dd.key_path())?;
    assert!(matches!(gaffer_agent::enroll::renew(&dd, &renew(used)).await, Err(AgentError::Refused(_))));
    assert_eq!(dd.read(&dd.key_path())?, after_first, "a refused re-enrollment switches nothing");
    let kept_renewal_key = dd.read(&dd.next_key_path())?;
    // Again with a fresh token: the same agent, a new key (the one the refused attempt made).
    let renewed = gaffer_agent::enroll::renew(&dd, &renew(cp.token(SITE)?)).await?;
    assert_eq!((renewed.agent_id, renewed.site.as_str()), (id, SITE));
    let creds = Credentials::load(&dd, id)?;
    let current = creds.current.clone().ok_or("no current pair")?;
    assert_ne!(current.serial_hex, old_serial);
    assert_ne!(dd.read(&dd.key_path())?, old_key);
    assert_eq!(dd.read(&dd.key_path())?, kept_renewal_key, "the refused attempt's key was reused");
    assert!(creds.next.is_none() && !creds.next_key_present);
    assert_eq!(cp.recorded_serial(id)?.as_deref(), Some(current.serial_hex.as_str()));
    let loaded = dd.load_identity()?;
    assert_eq!((loaded.agent_id, loaded.site.as_str(), loaded.enrolled_at_ms), (id, SITE, identity.enrolled_at_ms));
    {
        let db = sled::open(dd.state_path())?;
        let entries: Vec<_> = Outbox::open(&db)?.entries()?.into_iter().map(|e| (e.seq, e.message)).collect();
        assert_eq!(entries, outbox_before, "the outbox is untouched");
        assert_eq!(db.open_tree("jobs")?.len(), jobs_before, "the job queue is untouched");
        // What `gaffer-agent status` shows of it.
        let report = gaffer_agent::control_socket::StatusReport::collect(
            &id.to_string(),
            SITE,
            "stopped",
            &Outbox::open(&db)?,
            None,
        )?
        .with_certificate(&dd, id, None);
        assert_eq!(report.cert_serial.as_deref(), Some(current.serial_hex.as_str()));
        assert_eq!(report.cert_not_after_ms, Some(current.not_after_ms));
        assert_eq!(report.cert_renewal_at_ms, Some(creds.renewal_due_at_ms(&current)));
        assert!(!report.cert_renewal_pending);
    }
    // The agent connects with the new certificate (the stand-in queue entry is not a job).
    sled::open(dd.state_path())?.open_tree("jobs")?.remove(b"queued-job")?;
    let agent = Agent::run(&dd, &renewed, vec![])?;
    wait_for("the link with the new certificate", Duration::from_secs(20), || {
        Ok(agent.status.get() == LinkState::Up && agent.current_serial()? == current.serial_hex)
    })
    .await?;
    Ok(())
}
