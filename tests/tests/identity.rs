//! Identity end to end, with the real binaries on loopback: short-lived agent certificates renewed
//! online while jobs run, revocation of an agent in the middle of a job, and a CA rotation through
//! every phase (and a rollback) with three agents at work.
//!
//! Connectivity is sampled from the API every 250 ms by a watcher thread; "disconnected" is the
//! longest run of samples in which an agent was not listed online.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_tests::{media, media_dir, Agent, ControlPlane, ControlPlaneOptions};
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(240);

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Polls `GET /api/v1/agents` every 250 ms and keeps, per agent, the longest time it was not
/// listed online (after it was first seen online).
struct Watcher {
    stop: Arc<AtomicBool>,
    longest: Arc<Mutex<HashMap<String, Duration>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(cp: &ControlPlane) -> Self {
        let (url, token) = (format!("{}/api/v1/agents?limit=1000", cp.http_url), cp.api_token.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let longest = Arc::new(Mutex::new(HashMap::<String, Duration>::new()));
        let (s, l) = (stop.clone(), longest.clone());
        let thread = std::thread::spawn(move || {
            let client =
                reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
            let mut down_since: HashMap<String, Instant> = HashMap::new();
            let mut seen: std::collections::HashSet<String> = Default::default();
            while !s.load(Ordering::Relaxed) {
                // A control plane being restarted answers nothing: that counts as down for all.
                let listed: Vec<Value> = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .ok()
                    .and_then(|r| r.json::<Value>().ok())
                    .and_then(|v| v["agents"].as_array().cloned())
                    .unwrap_or_default();
                let now = Instant::now();
                let online: std::collections::HashSet<String> = listed
                    .iter()
                    .filter(|a| a["online"] == true)
                    .filter_map(|a| a["id"].as_str().map(str::to_owned))
                    .collect();
                seen.extend(online.iter().cloned());
                for id in &seen {
                    if online.contains(id) {
                        if let Some(since) = down_since.remove(id) {
                            let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
                            let e = l.entry(id.clone()).or_default();
                            *e = (*e).max(now - since);
                        }
                    } else {
                        down_since.entry(id.clone()).or_insert(now);
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            let now = Instant::now();
            let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
            for (id, since) in down_since {
                let e = l.entry(id).or_default();
                *e = (*e).max(now - since);
            }
        });
        Self { stop, longest, thread: Some(thread) }
    }

    /// Stops watching; the longest disconnection of each agent seen online.
    fn finish(mut self) -> HashMap<String, Duration> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.longest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn agent_record(cp: &ControlPlane, id: &str) -> anyhow::Result<Value> {
    cp.api_get(&format!("/agents/{id}"))
}

/// With `--agent-cert-ttl 60s` an agent runs jobs for `GAFFER_SOAK_SECS` (default 100 in the suite;
/// the soak is `GAFFER_SOAK_SECS=300`): its certificate is renewed online at every half
/// life (30 s), so at least `soak / 30 s − 2` times and never fewer than 2 (8 in 300 s, the issue
/// asks 4), it is never disconnected for more than 5 s, and every job succeeds. The server
/// certificate (also 60 s) is renewed too.
#[test]
fn short_lived_certificates_are_renewed_online_while_jobs_run() -> anyhow::Result<()> {
    let soak = Duration::from_secs(std::env::var("GAFFER_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(100));
    let renewals_min = (soak.as_secs() / 30).saturating_sub(2).max(2) as f64;
    let cp = ControlPlane::start_with(ControlPlaneOptions {
        init_args: vec!["--agent-cert-ttl".into(), "60s".into()],
        // The defaults of a real deployment, so a renewal reconnect is not hidden by a fast grace.
        heartbeat_interval_secs: 2,
        idle_timeout_secs: 10,
        lease_grace_secs: 30,
        ..ControlPlaneOptions::default()
    })?;
    let mut agent = Agent::enroll(&cp, "soak")?;
    let first_serial = agent_record(&cp, &agent.agent_id)?["cert_serial"].clone();
    agent.run(&[media_dir()])?;
    cp.wait_agent_online(&agent.agent_id, true, Duration::from_secs(20))?;
    let server_not_after_0 = cp.metric("gaffer_server_cert_not_after_seconds")?;
    let watcher = Watcher::start(&cp);

    let started = Instant::now();
    let mut jobs = Vec::new();
    while started.elapsed() < soak {
        // Keep the agent busy: at most two jobs outstanding.
        let outstanding = jobs
            .iter()
            .filter(|id: &&String| {
                cp.api_get(&format!("/jobs/{id}"))
                    .map(|j| !matches!(j["state"].as_str(), Some("succeeded" | "failed" | "cancelled")))
                    .unwrap_or(true)
            })
            .count();
        if outstanding < 2 {
            jobs.push(cp.submit_job(&media("bikes.mp4"), "soak")?);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let longest = watcher.finish();
    for id in &jobs {
        let job = cp.wait_job(id, &["succeeded", "failed", "cancelled"], JOB_TIMEOUT)?;
        anyhow::ensure!(job["state"] == "succeeded", "job {id} did not succeed: {job}\nagent log:\n{}", agent.log());
    }
    let renewals = cp.metric("gaffer_agent_certs_issued_total{via=\"renew\"}")?;
    let down = longest.get(&agent.agent_id).copied().unwrap_or_default();
    let record = agent_record(&cp, &agent.agent_id)?;
    let server_not_after = cp.metric("gaffer_server_cert_not_after_seconds")?;
    eprintln!(
        "soak {:?}: {} jobs, {renewals} online renewals, longest disconnection {down:?}, server cert not_after {server_not_after_0} → {server_not_after}",
        soak,
        jobs.len()
    );
    anyhow::ensure!(
        renewals >= renewals_min,
        "only {renewals} renewals in {soak:?} (at least {renewals_min})\nagent log:\n{}",
        agent.log()
    );
    anyhow::ensure!(
        down <= Duration::from_secs(5),
        "the agent was disconnected for {down:?}\nagent log:\n{}",
        agent.log()
    );
    anyhow::ensure!(record["cert_serial"] != first_serial, "the agent still has its first certificate: {record}");
    anyhow::ensure!(server_not_after > server_not_after_0, "the server certificate was not renewed");
    let history = record["cert_history"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        history.iter().filter(|c| c["via"] == "renew").count() as f64 >= renewals.min(31.0),
        "renewals missing from the history: {record}"
    );
    Ok(())
}

/// Revoking an agent in the middle of a job closes its link within 5 s, the job finishes on
/// another agent, and the revoked agent's reconnects and bundles are refused.
#[test]
fn a_revoked_agent_is_cut_off_and_its_job_finishes_elsewhere() -> anyhow::Result<()> {
    let cp = ControlPlane::start_with(ControlPlaneOptions { lease_grace_secs: 60, ..ControlPlaneOptions::default() })?;
    let mut a = Agent::enroll(&cp, "stage")?;
    let mut b = Agent::enroll(&cp, "stage")?;
    a.run(&[media_dir()])?;
    cp.wait_agent_online(&a.agent_id, true, Duration::from_secs(20))?;
    let id = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage")?;
    let running = cp.wait_job(&id, &["running"], Duration::from_secs(60))?;
    anyhow::ensure!(running["agent"] == a.agent_id.as_str(), "the job runs elsewhere: {running}");
    b.run(&[media_dir()])?;
    cp.wait_agent_online(&b.agent_id, true, Duration::from_secs(20))?;

    let revoked_at = Instant::now();
    let report = cp.cli_json(&["agent", "revoke", "--agent", &a.agent_id])?;
    anyhow::ensure!(report["newly_revoked"] == true, "{report}");
    cp.wait_agent_online(&a.agent_id, false, Duration::from_secs(5)).context("the revoked agent's link stayed up")?;
    eprintln!("revoked agent's link closed after {:?}", revoked_at.elapsed());

    let done = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    anyhow::ensure!(done["state"] == "succeeded", "{done}");
    anyhow::ensure!(done["agent"] == b.agent_id.as_str(), "the job did not finish on the other agent: {done}");

    // Its reconnects are refused in the handshake (the agent keeps trying with back-off).
    wait_until(Duration::from_secs(40), "a refused reconnect", || {
        Ok(cp.metric("gaffer_link_refused_total{reason=\"revoked\"}")? >= 1.0)
    })?;
    anyhow::ensure!(
        cp.wait_agent_online(&a.agent_id, true, Duration::from_secs(3)).is_err(),
        "the revoked agent came back online"
    );
    // And its bundles.
    a.kill();
    let bundle = a.dir.path().join("out.gbundle");
    a.bundle_export(&bundle)?;
    let out = cp.bundle_import_raw(&bundle, &a.dir.path().join("reply.gbundle"))?;
    anyhow::ensure!(!out.status.success(), "a revoked agent's bundle was imported");
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(stderr.contains("revoked"), "refused, but not for the revocation: {stderr}");
    Ok(())
}

/// A CA rotation through init, update-clients, update-servers and standby, then a second one rolled
/// back from update-servers, with three agents running jobs and the control plane restarted after
/// each server-side step (so agents must connect to the new server certificate): no agent is
/// disconnected longer than 60 s and every job succeeds.
#[test]
fn ca_rotation_through_every_phase_and_a_rollback_loses_no_job() -> anyhow::Result<()> {
    let mut cp = ControlPlane::start_with(ControlPlaneOptions {
        heartbeat_interval_secs: 2,
        idle_timeout_secs: 10,
        lease_grace_secs: 90,
        ..ControlPlaneOptions::default()
    })?;
    let mut agents = Vec::new();
    for _ in 0..3 {
        let mut a = Agent::enroll(&cp, "rot")?;
        a.run(&[media_dir()])?;
        agents.push(a);
    }
    for a in &agents {
        cp.wait_agent_online(&a.agent_id, true, Duration::from_secs(20))?;
    }
    let original = cp.cli_json(&["ca", "status"])?["current_ca_fingerprint"].clone();
    let watcher = Watcher::start(&cp);
    let mut jobs = Vec::new();
    let submit = |cp: &ControlPlane, jobs: &mut Vec<String>| -> anyhow::Result<()> {
        for _ in 0..3 {
            jobs.push(cp.submit_job(&media("bikes.mp4"), "rot")?);
        }
        Ok(())
    };
    let all_online = |cp: &ControlPlane| -> anyhow::Result<()> {
        for a in &agents {
            cp.wait_agent_online(&a.agent_id, true, Duration::from_secs(60))?;
        }
        Ok(())
    };
    let everyone_on_issuing_ca = |cp: &ControlPlane| {
        wait_until(Duration::from_secs(60), "every agent on the issuing CA", || {
            let s = cp.cli_json(&["ca", "status"])?;
            Ok(s["agents_on_other_ca"].as_array().is_some_and(Vec::is_empty))
        })
    };

    for (phase, restart) in [("init", false), ("update-clients", false), ("update-servers", true), ("standby", true)] {
        submit(&cp, &mut jobs)?;
        let r = cp.cli_json(&["ca", "rotate", "--phase", phase])?;
        anyhow::ensure!(r["phase"] == phase, "{r}");
        if phase == "update-clients" {
            everyone_on_issuing_ca(&cp)?;
        }
        if restart {
            cp.restart()?;
        }
        all_online(&cp)?;
    }
    let rotated = cp.cli_json(&["ca", "status"])?;
    anyhow::ensure!(rotated["current_ca_fingerprint"] != original, "standby did not move to the new CA: {rotated}");
    anyhow::ensure!(rotated["next_ca_fingerprint"].is_null(), "{rotated}");

    // A second rotation, rolled back from update-servers.
    let before = rotated["current_ca_fingerprint"].clone();
    for (phase, restart) in
        [("init", false), ("update-clients", false), ("update-servers", true), ("rollback", true), ("standby", true)]
    {
        submit(&cp, &mut jobs)?;
        let r = cp.cli_json(&["ca", "rotate", "--phase", phase])?;
        anyhow::ensure!(r["phase"] == phase, "{r}");
        if matches!(phase, "update-clients" | "rollback") {
            everyone_on_issuing_ca(&cp)?;
        }
        if restart {
            cp.restart()?;
        }
        all_online(&cp)?;
    }
    let rolled_back = cp.cli_json(&["ca", "status"])?;
    anyhow::ensure!(rolled_back["current_ca_fingerprint"] == before, "rollback changed the CA: {rolled_back}");

    for id in &jobs {
        let job = cp.wait_job(id, &["succeeded", "failed", "cancelled"], JOB_TIMEOUT)?;
        anyhow::ensure!(job["state"] == "succeeded", "job {id}: {job}");
    }
    let longest = watcher.finish();
    for a in &agents {
        let down = longest.get(&a.agent_id).copied().unwrap_or_default();
        eprintln!("agent {}: longest disconnection {down:?}", a.agent_id);
        anyhow::ensure!(
            down <= Duration::from_secs(60),
            "agent {} was disconnected for {down:?}\n{}",
            a.agent_id,
            a.log()
        );
    }
    Ok(())
}
