//! `gaffer-sim` as a real process against a real `gaffer-control serve` (issue 10's smoke test):
//! 500 simulated agents, each enrolled with its own token, key and certificate, connect over mTLS
//! QUIC, heartbeat and run 20 jobs/s for 30 s. Counts are asserted, never times.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_tests::sim::load::agents_online;
use gaffer_tests::{ControlPlane, ControlPlaneOptions};
use serde_json::Value;

/// The smoke test's fleet.
const AGENTS: usize = 500;

/// A control plane with the production heartbeat interval and idle timeout (the test defaults of
/// 1 s and 3 s would make 500 agents heartbeat every second on two busy cores).
fn control_plane() -> anyhow::Result<ControlPlane> {
    ControlPlane::start_with(ControlPlaneOptions {
        heartbeat_interval_secs: 5,
        idle_timeout_secs: 10,
        lease_grace_secs: 30,
        ..ControlPlaneOptions::default()
    })
}

fn sim(cp: &ControlPlane, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gaffer-sim"));
    cmd.arg("--data-dir").arg(cp.data_dir()).args(["--control", &cp.quic_addr, "--json"]).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Waits for `child` at most `timeout` (then kills it); returns its status, stdout and stderr.
fn finish(
    mut child: std::process::Child,
    timeout: Duration,
) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let (mut out, mut err) = (child.stdout.take().context("stdout")?, child.stderr.take().context("stderr")?);
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err_reader.join().unwrap_or_default();
            anyhow::bail!("gaffer-sim still running after {timeout:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok((status, out_reader.join().unwrap_or_default(), err_reader.join().unwrap_or_default()))
}

#[test]
fn five_hundred_simulated_agents_connect_heartbeat_and_finish_every_job() -> anyhow::Result<()> {
    let cp = control_plane()?;
    let child = sim(&cp, &["--agents", "500", "--duration-secs", "30", "--jobs-per-sec", "20"]).spawn()?;

    // While it runs, the control plane's own API lists all 500 online.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut online = 0;
    while online < AGENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        online = cp.api_get("/agents").map(|v| agents_online(&v)).unwrap_or(online);
    }

    let (status, stdout, stderr) = finish(child, Duration::from_secs(240))?;
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("gaffer-sim printed no JSON ({status}); stdout:\n{stdout}\nstderr:\n{stderr}"))?;
    eprintln!("gaffer-sim report: {report:#}");
    assert!(status.success(), "gaffer-sim failed ({status}): {}\nstderr:\n{stderr}", report["failures"]);
    assert_eq!(online, AGENTS, "GET /api/v1/agents listed {online} agents online while the simulation ran");
    assert_eq!(report["agents"], AGENTS);
    assert_eq!(report["agents_connected"], AGENTS, "report: {report}");
    assert_eq!(report["agents_enrolled"], AGENTS, "each agent enrolled with its own token");
    let submitted = report["jobs_submitted"].as_u64().unwrap_or(0);
    assert!(submitted > 0, "no job was submitted: {report}");
    assert_eq!(report["jobs_succeeded"].as_u64(), Some(submitted), "report: {report}");
    assert_eq!(report["submit_errors"], 0);
    assert!(report["heartbeats_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "report: {report}");
    assert!(report["connect_all_secs"].is_number(), "every agent was welcomed: {report}");
    assert!(report["assign_latency_ms_p99"].is_number() && report["finish_latency_ms_p99"].is_number());
    assert!(report["api_agents_ms_p99"].is_number() && report["fleet_page_ms_p99"].is_number());
    assert!(report["control_rss_bytes"].as_u64().unwrap_or(0) > 0, "the serve process was measured: {report}");

    // The control plane agrees: every job the simulator counted is succeeded in its store, with
    // the synthetic digest of a simulated agent.
    let jobs = cp.api_get("/jobs?state=succeeded&limit=1000")?;
    let jobs = jobs.as_array().or_else(|| jobs.get("jobs").and_then(Value::as_array)).context("a job list")?;
    assert_eq!(jobs.len() as u64, submitted, "succeeded jobs in the API");
    let one = jobs.first().and_then(|j| j["id"].as_str()).context("a job id")?;
    let job = cp.api_get(&format!("/jobs/{one}"))?;
    assert!(job.to_string().contains("/sim/clip-"), "a simulated path: {job}");
    Ok(())
}

/// A run whose jobs cannot finish in time exits non-zero and says so.
#[test]
fn jobs_that_do_not_finish_fail_the_run_with_the_reason() -> anyhow::Result<()> {
    let cp = control_plane()?;
    let args = [
        "--agents",
        "3",
        "--duration-secs",
        "2",
        "--jobs-per-sec",
        "2",
        "--job-delay-ms",
        "600000",
        "--drain-secs",
        "1",
    ];
    let (status, stdout, stderr) = finish(sim(&cp, &args).spawn()?, Duration::from_secs(120))?;
    assert_eq!(status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).context("the report is still printed")?;
    assert_eq!(report["agents_connected"], 3);
    let submitted = report["jobs_submitted"].as_u64().unwrap_or(0);
    assert!(submitted > 0 && report["jobs_succeeded"] == 0, "report: {report}");
    assert!(stderr.contains("submitted jobs did not succeed"), "stderr:\n{stderr}");
    Ok(())
}
