//! Drain and cordon end to end, with the real binaries on loopback: a drained agent finishes what
//! it runs and takes nothing new while another agent does; a drain deadline takes back what is
//! left and another agent runs it (the attempt given back); a cordon set before the agent ever
//! connects holds across a control-plane restart, names the agent in the waiting job's pending
//! reason, and uncordoning from the dashboard lets the job run. The CLI (admin socket), the API
//! and the dashboard's forms each change the state once.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_tests::{csrf_of, media, media_dir, Agent, ControlPlane};
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn scheduling_of(cp: &ControlPlane, agent: &Agent) -> anyhow::Result<Value> {
    Ok(cp.api_get(&format!("/agents/{}", agent.agent_id))?["scheduling"].clone())
}

/// A running job on agent A; A drained with the CLI (no deadline); a job submitted next goes to
/// B, which connects after the drain; A's job still finishes on A. With B gone, a new job waits
/// and its pending reason names A as draining; the API's uncordon lets A take it.
#[test]
fn a_drained_agent_finishes_its_job_and_takes_no_new_one_while_another_agent_does() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut a = Agent::enroll(&cp, "stage-a")?;
    a.run_with(&[media_dir()], &[], 1)?;
    let long = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage-a")?;
    let running = cp.wait_job(&long, &["running"], JOB_TIMEOUT)?;
    assert_eq!(running["agent"], a.agent_id.as_str(), "{running}");

    let report = cp.cli_json(&["agent", "drain", "--agent", &a.agent_id])?;
    assert_eq!(report["scheduling"]["state"], "draining", "{report}");
    assert_eq!(report["jobs_held"], 1, "{report}");
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(scheduling_of(&cp, &a)?["state"], "draining");

    let mut b = Agent::enroll(&cp, "stage-a")?;
    b.run_with(&[media_dir()], &[], 1)?;
    cp.wait_agent_online(&b.agent_id, true, Duration::from_secs(30))?;
    let short = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let done = cp.wait_job(&short, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], b.agent_id.as_str(), "the drained agent took a new job: {done}");

    let long_done = cp.wait_job(&long, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(long_done["state"], "succeeded", "{long_done}");
    assert_eq!(long_done["agent"], a.agent_id.as_str(), "the running job finished where it ran: {long_done}");
    assert_eq!(long_done["attempts"], 1, "{long_done}");

    // A is idle and still draining; with B gone, a job waits and says why.
    b.kill();
    cp.wait_agent_online(&b.agent_id, false, Duration::from_secs(60))?;
    let waiting = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let mut reason = String::new();
    wait_until(Duration::from_secs(20), "a pending reason naming the drained agent", || {
        reason = cp.api_get(&format!("/jobs/{waiting}"))?["pending_reason"].as_str().unwrap_or_default().to_owned();
        Ok(reason.contains(&a.agent_id))
    })
    .with_context(|| format!("last reason: {reason:?}"))?;
    assert!(reason.contains("out of rotation") && reason.contains("draining by"), "{reason}");
    assert_eq!(cp.api_get(&format!("/jobs/{waiting}"))?["state"], "queued");

    let (status, body) = cp.api_post(&format!("/agents/{}/uncordon", a.agent_id), &Value::Null)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scheduling"]["state"], "active", "{body}");
    let done = cp.wait_job(&waiting, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], a.agent_id.as_str(), "{done}");

    let audit = cp.api_get("/audit?limit=50")?.to_string();
    assert!(audit.contains("agent_drain") && audit.contains("agent_uncordon"), "{audit}");
    Ok(())
}

/// A job running on A when A is drained with a 1 s deadline (API) is taken back at the deadline,
/// A's worker stops, and B runs it to success with the attempt given back (attempts 1).
#[test]
fn a_drain_deadline_requeues_what_is_left_for_another_agent() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut a = Agent::enroll(&cp, "stage-a")?;
    a.run_with(&[media_dir()], &[], 1)?;
    let long = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage-a")?;
    cp.wait_job(&long, &["running"], JOB_TIMEOUT)?;
    wait_until(Duration::from_secs(30), "a worker process on A", || Ok(!a.worker_pids().is_empty()))?;
    let mut b = Agent::enroll(&cp, "stage-a")?;
    b.run_with(&[media_dir()], &[], 1)?;
    cp.wait_agent_online(&b.agent_id, true, Duration::from_secs(30))?;

    let (status, body) = cp.api_post(&format!("/agents/{}/drain?deadline_secs=1", a.agent_id), &Value::Null)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scheduling"]["state"], "draining", "{body}");
    assert!(body["scheduling"]["deadline_ms"].as_u64().is_some(), "{body}");

    let mut last = Value::Null;
    wait_until(JOB_TIMEOUT, "the job to move to B", || {
        last = cp.api_get(&format!("/jobs/{long}"))?;
        Ok(last["agent"] == b.agent_id.as_str())
    })
    .with_context(|| format!("last seen: {last}"))?;
    wait_until(Duration::from_secs(30), "A to stop its worker", || Ok(a.worker_pids().is_empty()))?;
    let done = cp.wait_job(&long, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], b.agent_id.as_str(), "{done}");
    assert_eq!(done["attempts"], 1, "the drain gave the attempt back: {done}");
    assert!(a.is_running(), "a drained agent keeps running");

    // Invalid drains are refused with the API's error shape.
    let (status, body) = cp.api_post("/agents/not-a-uuid/drain", &Value::Null)?;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let (status, body) = cp.api_post(&format!("/agents/{}/drain", uuid::Uuid::new_v4()), &Value::Null)?;
    assert_eq!(status, 404, "{body}");
    let (status, body) = cp.api_post(&format!("/agents/{}/drain?deadline_secs=99999999", b.agent_id), &Value::Null)?;
    assert_eq!(status, 422, "{body}");
    Ok(())
}

/// A cordon set while the agent is enrolled but not running is read when it connects, survives a
/// control-plane restart, shows on the fleet and agent pages, and the dashboard's Uncordon button
/// (CSRF-checked) lets the waiting job run.
#[test]
fn a_cordon_set_before_the_agent_connects_holds_across_a_restart_until_uncordoned_on_the_dashboard(
) -> anyhow::Result<()> {
    let mut cp = ControlPlane::start()?;
    let mut a = Agent::enroll(&cp, "stage-a")?;
    let report = cp.cli_json(&["agent", "cordon", "--agent", &a.agent_id])?;
    assert_eq!(report["scheduling"]["state"], "cordoned", "{report}");
    assert_eq!(report["connected"], false, "{report}");

    let job = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    a.run_with(&[media_dir()], &[], 1)?;
    cp.wait_agent_online(&a.agent_id, true, Duration::from_secs(30))?;
    cp.restart()?;
    cp.wait_agent_online(&a.agent_id, true, Duration::from_secs(60))?;
    let mut reason = String::new();
    wait_until(Duration::from_secs(20), "a pending reason naming the cordoned agent", || {
        reason = cp.api_get(&format!("/jobs/{job}"))?["pending_reason"].as_str().unwrap_or_default().to_owned();
        Ok(reason.contains(&a.agent_id))
    })
    .with_context(|| format!("last reason: {reason:?}"))?;
    assert!(reason.contains("cordoned by"), "{reason}");
    assert_eq!(cp.api_get(&format!("/jobs/{job}"))?["state"], "queued", "a cordoned agent took the job");
    assert_eq!(scheduling_of(&cp, &a)?["state"], "cordoned");

    let session = cp.login()?;
    let (status, fleet) = cp.page(&session, "/")?;
    assert_eq!(status, 200);
    assert!(fleet.contains("badge cordoned"), "the fleet page shows the cordon");
    let (_, page) = cp.page(&session, &format!("/agents/{}", a.agent_id))?;
    assert!(page.contains("Uncordon") && page.contains("cordoned by"), "the agent page offers Uncordon");
    let path = format!("/agents/{}/uncordon", a.agent_id);
    assert_eq!(cp.post_form(&session, &path, &[("csrf", "wrong")])?, 403);
    let csrf = csrf_of(&page).context("the agent page has a CSRF token")?;
    assert_eq!(cp.post_form(&session, &path, &[("csrf", &csrf)])?, 303);
    let done = cp.wait_job(&job, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], a.agent_id.as_str(), "{done}");

    // And the dashboard's Drain form, with a deadline in minutes.
    let (_, page) = cp.page(&session, &format!("/agents/{}", a.agent_id))?;
    let csrf = csrf_of(&page).context("CSRF token")?;
    let drain = format!("/agents/{}/drain", a.agent_id);
    assert_eq!(cp.post_form(&session, &drain, &[("csrf", &csrf), ("deadline_mins", "30")])?, 303);
    let s = scheduling_of(&cp, &a)?;
    assert_eq!(s["state"], "draining", "{s}");
    let (_, page) = cp.page(&session, &format!("/agents/{}", a.agent_id))?;
    assert!(page.contains("deadline in 30 min"), "the agent page shows the deadline");
    Ok(())
}
