//! `/metrics` end to end: real `gaffer-control` and `gaffer-agent` processes on loopback, scraped
//! over HTTP as Prometheus would.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_tests::{media_dir, wait_for, Agent, ControlPlane, ControlPlaneOptions};

const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// The control plane's `--idle-timeout-secs` in these tests (the harness default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

fn links_open(cp: &ControlPlane) -> anyhow::Result<f64> {
    cp.metric("gaffer_agent_links_open")
}

/// Waits until the agent's own status says its link is up (its Hello was accepted).
fn wait_link_up(agent: &Agent) -> anyhow::Result<()> {
    wait_for(ONLINE_TIMEOUT, &format!("agent {} link up", agent.agent_id), || {
        Ok(agent.status().ok().filter(|s| s["link"] == "up").map(|_| ()))
    })
}

/// Scrapes `gaffer_agent_links_open` every 50 ms for `how_long` and returns the highest value seen.
fn links_open_max_over(cp: &ControlPlane, how_long: Duration) -> anyhow::Result<f64> {
    let end = Instant::now() + how_long;
    let mut max = 0.0f64;
    while Instant::now() < end {
        max = max.max(links_open(cp)?);
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(max)
}

/// Issue 11: `gaffer_agent_links_open` said 3 with two agents connected after one restarted. An
/// agent that restarts (SIGKILL, or a graceful stop) leaves its old QUIC connection open on the
/// control plane until that connection's idle timeout; the gauge counts agents whose link is up,
/// once each, before, during and after that.
#[test]
fn the_links_gauge_counts_each_agent_once_across_restarts() -> anyhow::Result<()> {
    let cp = ControlPlane::start_with(ControlPlaneOptions {
        idle_timeout_secs: IDLE_TIMEOUT.as_secs(),
        ..ControlPlaneOptions::default()
    })?;
    let mut a = Agent::enroll(&cp, "stage-m")?;
    let mut b = Agent::enroll(&cp, "stage-m")?;
    a.run(&[media_dir()])?;
    b.run(&[media_dir()])?;
    wait_link_up(&a)?;
    wait_link_up(&b)?;
    wait_for(ONLINE_TIMEOUT, "2 links open", || Ok((links_open(&cp)? == 2.0).then_some(())))?;

    for (how, agent) in [("SIGKILL", &mut a), ("SIGTERM", &mut b)] {
        if how == "SIGKILL" {
            agent.kill();
        } else {
            assert!(agent.stop(), "the agent exits on SIGTERM; log:\n{}", agent.log());
        }
        agent.run(&[media_dir()])?;
        wait_link_up(agent).with_context(|| format!("agent log:\n{}", agent.log()))?;
        assert_eq!(links_open(&cp)?, 2.0, "after a {how} restart, with the new link up");
        // Past the old connection's idle timeout (and the session's heartbeat deadline) it is
        // gone whatever happened to it; the gauge never counted it on top of the new one.
        let max = links_open_max_over(&cp, IDLE_TIMEOUT * 2)?;
        assert_eq!(max, 2.0, "the most links_open said within 2 idle timeouts of a {how} restart");
        assert_eq!(links_open(&cp)?, 2.0, "after a {how} restart, past the old connection's idle timeout");
        assert_eq!(cp.metric("gaffer_agents{state=\"connected\"}")?, 2.0);
    }

    // And a stopped agent's link is no longer counted.
    a.kill();
    wait_for(IDLE_TIMEOUT * 4, "1 link open after an agent died", || Ok((links_open(&cp)? == 1.0).then_some(())))
        .with_context(|| format!("control log:\n{}", cp.log()))?;
    Ok(())
}

/// `promtool check metrics` (Prometheus' own linter, which reads the Prometheus text format) on a
/// scrape's text: an error with what it printed on any problem it reports.
fn promtool_check_metrics(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus) not installed: run scripts/setup.sh")?;
    child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\non:\n{text}");
    Ok(())
}

/// The samples of `name` (exactly that metric, any labels) whose label set contains `agent_id`.
fn samples_of<'t>(text: &'t str, name: &str, agent_id: &str) -> Vec<&'t str> {
    let needle = format!("agent_id=\"{agent_id}\"");
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')) && l.contains(&needle))
        .collect()
}

/// Two real agents: the live `/metrics` passes promtool's lint, and carries every per-agent series
/// for both (CPU-only here: health source `cpu`, no GPU series), the queue depth by site and
/// profile of a queued job, and a revoked agent's series are gone at the next scrape.
#[test]
fn live_metrics_pass_promtool_with_per_agent_series_for_two_agents() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut a = Agent::enroll(&cp, "stage-m")?;
    let mut b = Agent::enroll(&cp, "stage-n")?;
    a.run(&[media_dir()])?;
    b.run(&[media_dir()])?;
    wait_link_up(&a)?;
    wait_link_up(&b)?;
    // A heartbeat of each since the Hello (interval 1 s).
    let text = wait_for(ONLINE_TIMEOUT, "a heartbeat of both agents on /metrics", || {
        let text = cp.metrics_text()?;
        let both =
            [&a, &b].iter().all(|ag| !samples_of(&text, "gaffer_agent_cpu_utilization_ratio", &ag.agent_id).is_empty());
        Ok(both.then_some(text))
    })
    .with_context(|| format!("/metrics:\n{}", cp.metrics_text().unwrap_or_default()))?;
    promtool_check_metrics(&cp.metrics_text_prometheus()?)?;
    for (agent, site) in [(&a, "stage-m"), (&b, "stage-n")] {
        for name in [
            "gaffer_agent_connected",
            "gaffer_agent_last_heartbeat_timestamp_seconds",
            "gaffer_agent_health_source",
            "gaffer_agent_cpu_utilization_ratio",
            "gaffer_agent_memory_used_bytes",
            "gaffer_agent_memory_total_bytes",
            "gaffer_agent_disk_available_bytes",
            "gaffer_agent_disk_total_bytes",
            "gaffer_agent_outbox_pending_messages",
            "gaffer_agent_jobs_running",
            "gaffer_agent_job_slots",
        ] {
            let samples = samples_of(&text, name, &agent.agent_id);
            assert!(!samples.is_empty(), "{name} of agent {} missing:\n{text}", agent.agent_id);
            assert!(samples.iter().all(|s| s.contains(&format!("site=\"{site}\""))), "{samples:?}");
        }
        let connected = samples_of(&text, "gaffer_agent_connected", &agent.agent_id);
        assert!(connected[0].ends_with(" 1.0") || connected[0].ends_with(" 1"), "{connected:?}");
        let source = samples_of(&text, "gaffer_agent_health_source", &agent.agent_id);
        assert!(source[0].contains("source=\"cpu\""), "{source:?}");
        let disks = samples_of(&text, "gaffer_agent_disk_total_bytes", &agent.agent_id);
        let volumes = [media_dir(), media_dir().canonicalize()?];
        assert!(
            disks.iter().any(|d| volumes.iter().any(|v| d.contains(&format!("path=\"{}\"", v.display())))),
            "a disk series for the agent's volume: {disks:?}"
        );
        let total = samples_of(&text, "gaffer_agent_memory_total_bytes", &agent.agent_id);
        let bytes: f64 = total[0].rsplit(' ').next().unwrap_or_default().parse()?;
        assert!(bytes > 1e8, "host memory total is the box's: {total:?}");
        assert!(samples_of(&text, "gaffer_gpu_utilization_ratio", &agent.agent_id).is_empty(), "no GPU here");
    }
    assert_eq!(cp.metric("gaffer_agent_links_open")?, 2.0);

    // A job no agent can take (a site without agents) waits in the queue: counted by site and profile.
    cp.submit_job(&gaffer_tests::media("bikes.mp4"), "stage-empty")?;
    let text = cp.metrics_text()?;
    assert!(
        text.lines().any(|l| l.starts_with("gaffer_queue_depth{")
            && l.contains("site=\"stage-empty\"")
            && l.contains("profile=\"")
            && l.ends_with(" 1")),
        "{text}"
    );
    promtool_check_metrics(&cp.metrics_text_prometheus()?)?;

    // A revoked agent's series go; the other's stay, and a dead link shows connected 0.
    cp.cli_json(&["agent", "revoke", "--agent", &b.agent_id])?;
    b.kill();
    wait_for(ONLINE_TIMEOUT, "the revoked agent's series gone", || {
        let text = cp.metrics_text()?;
        Ok(text.lines().all(|l| !l.contains(&b.agent_id)).then_some(()))
    })?;
    a.kill();
    wait_for(IDLE_TIMEOUT * 4, "agent a connected 0", || {
        let text = cp.metrics_text()?;
        let s = samples_of(&text, "gaffer_agent_connected", &a.agent_id);
        Ok(s.first().is_some_and(|l| l.ends_with(" 0.0") || l.ends_with(" 0")).then_some(()))
    })?;
    Ok(())
}
