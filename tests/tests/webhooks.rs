//! Webhooks end to end: real `gaffer-control` and `gaffer-agent` processes, a real HTTP receiver
//! (axum on loopback) in the test, a real `shots` job on the sample media. The receiver checks
//! the HMAC itself (hmac + sha2, not the control plane's code), can answer 500 for its first N
//! requests, and records every request; the tests dedupe by delivery id as a receiver would.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use gaffer_tests::{media, media_dir, wait_for, Agent, ControlPlane, ControlPlaneOptions};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
const SECRET: &str = "a webhook secret for the test, 0600";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    /// What it answered.
    status: u16,
    event: String,
    delivery: String,
    timestamp: String,
    signature: Option<String>,
    body: String,
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Received>>,
    /// Answer 500 to this many more requests.
    fail_next: AtomicUsize,
    /// Answer 503 to everything while set.
    down: AtomicBool,
}

/// An HTTP receiver on 127.0.0.1:0 with its own runtime thread; it stops with the test process.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
}

impl Receiver {
    fn start(fail_first: usize) -> anyhow::Result<Self> {
        let state = Arc::new(ReceiverState { fail_next: AtomicUsize::new(fail_first), ..ReceiverState::default() });
        let (tx, rx) = std::sync::mpsc::channel();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("bind: {e}")));
                        return;
                    }
                };
                let _ = tx.send(listener.local_addr().map_err(anyhow::Error::from));
                let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(st);
                let _ = axum::serve(listener, app).await;
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(10))??;
        Ok(Receiver { url: format!("http://{addr}/hook"), state })
    }

    fn got(&self) -> Vec<Received> {
        self.state.got.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// The requests answered 2xx, one per delivery id (what a deduplicating receiver keeps).
    fn delivered(&self) -> BTreeMap<String, Received> {
        self.got().into_iter().filter(|r| r.status < 300).map(|r| (r.delivery.clone(), r)).collect()
    }

    /// Waits until `n` distinct deliveries were answered 2xx.
    fn wait_delivered(&self, n: usize, what: &str) -> anyhow::Result<BTreeMap<String, Received>> {
        wait_for(DELIVERY_TIMEOUT, what, || {
            let d = self.delivered();
            Ok((d.len() >= n).then_some(d))
        })
        .with_context(|| format!("received so far: {:#?}", self.got()))
    }
}

async fn receive(
    axum::extract::State(st): axum::extract::State<Arc<ReceiverState>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::http::StatusCode {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let status = if st.down.load(Ordering::SeqCst) {
        503
    } else if st.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        500
    } else {
        200
    };
    let signature = headers.get("x-gaffer-signature-256").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let rec = Received {
        status,
        event: h("x-gaffer-event"),
        delivery: h("x-gaffer-delivery"),
        timestamp: h("x-gaffer-timestamp"),
        signature,
        body,
    };
    if let Ok(mut got) = st.got.lock() {
        got.push(rec);
    }
    axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
}

/// `sha256=<hex HMAC-SHA256(SECRET, body)>`, computed here.
fn expected_signature(body: &str) -> anyhow::Result<String> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes())?;
    mac.update(body.as_bytes());
    Ok(format!("sha256={}", hex::encode(mac.finalize().into_bytes())))
}

fn write_config(dir: &Path, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("control.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn secret_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("webhook.secret");
    std::fs::write(&path, format!("{SECRET}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// A control plane whose webhooks retry after 1 s (doubling to 2 s) and whose agents count as
/// offline after 5 s.
fn control_plane(dir: &Path) -> anyhow::Result<ControlPlane> {
    let config = write_config(
        dir,
        "[webhooks]\nretry_initial_secs = 1\nretry_max_secs = 2\n\n[alerts]\nagent_offline_secs = 5\n",
    )?;
    ControlPlane::start_with(ControlPlaneOptions {
        serve_args: vec!["--config".into(), config.display().to_string()],
        ..ControlPlaneOptions::default()
    })
}

fn add_webhook(cp: &ControlPlane, name: &str, url: &str, events: &str, secret: &Path) -> anyhow::Result<Value> {
    let secret = secret.display().to_string();
    cp.cli_json(&["webhook", "add", "--name", name, "--url", url, "--events", events, "--secret-file", &secret])
}

#[test]
fn a_finished_job_is_posted_signed_and_a_failing_receiver_gets_every_event_once() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let good = Receiver::start(0)?;
    let flaky = Receiver::start(3)?;
    let mut cp = control_plane(work.path())?;
    let secret = secret_file(work.path())?;

    // A secret readable by others is refused, and nothing is added.
    let loose = work.path().join("loose.secret");
    std::fs::write(&loose, SECRET)?;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644))?;
    let refused = add_webhook(&cp, "loose", &good.url, "job.failed", &loose);
    assert!(format!("{:#}", refused.err().unwrap_or_else(|| anyhow::anyhow!("accepted"))).contains("chmod 600"));

    let events = "job.succeeded,job.failed,agent.offline,agent.online";
    let added = add_webhook(&cp, "good", &good.url, events, &secret)?;
    assert_eq!(added["has_secret"], true, "{added}");
    assert!(!added.to_string().contains(SECRET), "the secret is never shown: {added}");
    add_webhook(&cp, "flaky", &flaky.url, "job.succeeded", &secret)?;
    let listed = cp.cli_json(&["webhook", "list"])?;
    let names: Vec<&str> = listed.as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["flaky", "good"]);
    assert!(!listed.to_string().contains(SECRET), "nor listed: {listed}");

    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;
    let job_id = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let job = cp.wait_job(&job_id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(job["state"], "succeeded", "{job}\nagent log:\n{}", agent.log());

    // The good receiver gets one signed job.succeeded with the job as the API shows it.
    let got = good.wait_delivered(1, "job.succeeded at the good receiver")?;
    let (id, r) = got.iter().next().context("one delivery")?;
    assert_eq!(r.event, "job.succeeded");
    assert_eq!(r.signature.as_deref(), Some(expected_signature(&r.body)?.as_str()), "HMAC of the body");
    let body: Value = serde_json::from_str(&r.body)?;
    assert_eq!(body["event"], "job.succeeded");
    assert_eq!(body["id"].as_str(), Some(id.as_str()), "body id = X-Gaffer-Delivery");
    assert_eq!(body["data"]["id"].as_str(), Some(job_id.as_str()));
    assert_eq!(body["data"]["state"], "succeeded");
    assert_eq!(body["data"]["agent"].as_str(), Some(agent.agent_id.as_str()));
    assert_eq!(body["data"]["path"], job["path"]);
    assert!(body["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
    let now_secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let ts: u64 = r.timestamp.parse()?;
    assert!(ts <= now_secs && now_secs - ts < 120, "timestamp {ts} vs now {now_secs}");

    // The flaky receiver answers 500 three times, then gets it: the same delivery id every time,
    // one event after deduplication.
    let got = flaky.wait_delivered(1, "job.succeeded at the flaky receiver after three 500s")?;
    let requests = flaky.got();
    assert_eq!(requests.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 500, 200], "{requests:#?}");
    let ids: BTreeSet<&str> = requests.iter().map(|r| r.delivery.as_str()).collect();
    assert_eq!(ids.len(), 1, "every retry carries the same delivery id");
    let flaky_body: Value = serde_json::from_str(&got.values().next().context("one")?.body)?;
    assert_eq!(flaky_body["data"]["id"].as_str(), Some(job_id.as_str()));
    // A test delivery is a second event: also delivered once.
    let queued = cp.cli_json(&["webhook", "test", "flaky"])?;
    let test_id = queued["delivery_id"].as_str().context("delivery id")?.to_owned();
    let got = flaky.wait_delivered(2, "the test delivery")?;
    assert_eq!(got.get(&test_id).map(|r| r.event.as_str()), Some("webhook.test"));
    assert_eq!(got.len(), 2, "two events, each once: {got:#?}");

    // Every attempt is recorded, with the status the receiver answered.
    let deliveries = cp.cli_json(&["webhook", "deliveries"])?;
    let flaky_job = deliveries
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["target_name"] == "flaky" && d["event"] == "job.succeeded")
        .context("the flaky delivery is listed")?;
    assert_eq!(flaky_job["state"], "delivered");
    assert_eq!(flaky_job["attempts_total"], 4);
    let statuses: Vec<u64> =
        flaky_job["attempts"].as_array().into_iter().flatten().filter_map(|a| a["status"].as_u64()).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    assert!(cp.metric("gaffer_webhook_deliveries_total{outcome=\"retry\"}")? >= 3.0);
    assert!(cp.metric("gaffer_webhook_deliveries_total{outcome=\"delivered\"}")? >= 3.0);

    // The agent goes away: agent.offline after 5 s; it comes back: agent.online.
    agent.kill();
    let got = good.wait_delivered(2, "agent.offline")?;
    let offline = got.values().find(|r| r.event == "agent.offline").context("agent.offline")?;
    let offline_body: Value = serde_json::from_str(&offline.body)?;
    assert_eq!(offline_body["data"]["agent"]["id"].as_str(), Some(agent.agent_id.as_str()));
    assert!(offline_body["data"]["offline_secs"].as_u64().is_some_and(|s| s >= 5), "{offline_body}");
    agent.run(&[media_dir()])?;
    let got = good.wait_delivered(3, "agent.online")?;
    assert!(got.values().any(|r| r.event == "agent.online"), "{got:#?}");
    assert_eq!(got.values().filter(|r| r.event == "agent.offline").count(), 1, "one offline per outage");

    // Removing a target stops its deliveries and is audited.
    cp.cli_json(&["webhook", "remove", "flaky"])?;
    let audit = cp.api_get("/audit?limit=100")?.to_string();
    assert!(
        audit.contains("webhook_add") && audit.contains("webhook_remove") && audit.contains("webhook_test"),
        "{audit}"
    );
    assert!(!cp.log().contains(SECRET), "the secret is never logged");
    cp.kill();
    Ok(())
}

#[test]
fn pending_deliveries_survive_a_control_plane_restart() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let rx = Receiver::start(0)?;
    rx.state.down.store(true, Ordering::SeqCst);
    let mut cp = control_plane(work.path())?;
    let secret = secret_file(work.path())?;
    add_webhook(&cp, "rx", &rx.url, "job.failed", &secret)?;
    let first = cp.cli_json(&["webhook", "test", "rx"])?["delivery_id"].as_str().unwrap_or_default().to_owned();
    let second = cp.cli_json(&["webhook", "test", "rx"])?["delivery_id"].as_str().unwrap_or_default().to_owned();
    // Both were tried and refused (503) before the kill.
    wait_for(DELIVERY_TIMEOUT, "both deliveries attempted", || {
        let tried: BTreeSet<String> = rx.got().into_iter().map(|r| r.delivery).collect();
        Ok((tried.contains(&first) && tried.contains(&second)).then_some(()))
    })?;
    assert!(rx.delivered().is_empty());
    cp.kill();

    rx.state.down.store(false, Ordering::SeqCst);
    cp.restart()?;
    let got = rx.wait_delivered(2, "both deliveries after the restart")?;
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), BTreeSet::from([first.clone(), second.clone()]));
    for r in got.values() {
        assert_eq!(r.event, "webhook.test");
        assert_eq!(r.signature.as_deref(), Some(expected_signature(&r.body)?.as_str()));
    }
    // The target survived too.
    let listed = cp.cli_json(&["webhook", "list"])?;
    assert_eq!(listed[0]["name"], "rx", "{listed}");
    let target_id = listed[0]["id"].as_str().context("target id")?.to_owned();

    // The Webhooks page shows the target and each delivery with its attempts (the 503s, then 200),
    // never the secret; its forms add a target and queue a test delivery.
    let session = cp.login()?;
    let (status, html) = cp.page(&session, "/webhooks")?;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("<td>rx</td>") && html.contains(&first) && html.contains(&second), "{html}");
    assert!(html.contains("<td>503</td>") && html.contains("<td>200</td>"), "attempts listed: {html}");
    assert!(!html.contains(SECRET), "the secret is never shown");
    let csrf = gaffer_tests::csrf_of(&html).context("the page's forms carry the CSRF token")?;
    let added = cp.post_form(
        &session,
        "/webhooks",
        &[("csrf", &csrf), ("name", "from-page"), ("url", "https://hooks.example.com/p"), ("ev_job_failed", "on")],
    )?;
    assert_eq!(added, 303);
    assert_eq!(cp.post_form(&session, "/webhooks", &[("csrf", "wrong"), ("url", "https://x.example.com/")])?, 403);
    let names: Vec<String> = cp
        .cli_json(&["webhook", "list"])?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["from-page", "rx"]);
    assert_eq!(cp.post_form(&session, &format!("/webhooks/{target_id}/test"), &[("csrf", &csrf)])?, 303);
    let got = rx.wait_delivered(3, "the test delivery queued from the page")?;
    assert_eq!(got.len(), 3);
    cp.kill();
    Ok(())
}
