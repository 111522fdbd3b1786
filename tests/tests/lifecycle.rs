//! The job lifecycle end to end, with the real binaries on loopback: work queued before any agent
//! connects, fencing of reports from an agent that does not hold the lease, analysis workers killed
//! or out of time, attempts running out, cancel and retry through the API and the dashboard, and a
//! job that says why it waits.
//!
//! Randomized timings come from a seeded RNG; the seed is printed, `GAFFER_TEST_SEED` replays it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_protocol::digest::Digest;
use gaffer_protocol::AgentMessage;
use gaffer_tests::{csrf_of, media, media_dir, send_as_agent, Agent, ControlPlane, ControlPlaneOptions};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn seed() -> u64 {
    let seed = std::env::var("GAFFER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("GAFFER_TEST_SEED={seed}");
    seed
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Issue 7's first report: jobs queued, then an agent started 0–50 ms later. 20 rounds, each with
/// a fresh agent (a box powered on in the morning) in a site of its own (so the previous round's
/// killed agent, not yet noticed gone, cannot take the jobs) and its own random delay: every job
/// succeeds, on that agent.
#[test]
fn jobs_queued_before_the_agent_connects_all_succeed_20_times() -> anyhow::Result<()> {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cp = ControlPlane::start()?;
    let path = media("bikes.mp4");
    for round in 0..20 {
        let started = Instant::now();
        let site = format!("round-{round}");
        let mut agent = Agent::enroll(&cp, &site)?;
        let jobs: Vec<String> =
            (0..rng.gen_range(1..=3)).map(|_| cp.submit_job(&path, &site)).collect::<anyhow::Result<_>>()?;
        let delay_ms = rng.gen_range(0..=50);
        std::thread::sleep(Duration::from_millis(delay_ms));
        agent.run_with(&[media_dir()], &[], 2)?;
        for id in &jobs {
            let job = cp.wait_job(id, &["succeeded", "failed"], JOB_TIMEOUT).with_context(|| {
                format!("seed {seed} round {round} (delay {delay_ms} ms); agent log:\n{}", agent.log())
            })?;
            assert_eq!(job["state"], "succeeded", "seed {seed} round {round}: {job}");
            assert_eq!(job["agent"], agent.agent_id.as_str(), "seed {seed} round {round}");
        }
        eprintln!(
            "round {round}: {} jobs, agent started {delay_ms} ms after submit, all done in {:?}",
            jobs.len(),
            started.elapsed()
        );
        agent.kill();
    }
    Ok(())
}

/// A second enrolled agent, with its own valid certificate, sends a digest for a job leased to
/// the first: refused with a permanent error, audited and counted; the job keeps the holder's
/// digest.
#[test]
fn a_digest_from_an_agent_that_does_not_hold_the_lease_is_refused() -> anyhow::Result<()> {
    // A long grace: the holder can be stopped mid-job and keep its lease.
    let cp = ControlPlane::start_with(ControlPlaneOptions { lease_grace_secs: 120, ..ControlPlaneOptions::default() })?;
    let mut holder = Agent::enroll(&cp, "stage-a")?;
    let intruder = Agent::enroll(&cp, "stage-a")?;
    let path = media("bbb-720p-x10.mp4");
    let id = cp.submit_job(&path, "stage-a")?;
    holder.run(&[media_dir()])?;
    let running = cp.wait_job(&id, &["running"], JOB_TIMEOUT)?;
    let lease_id = running["lease_id"].as_u64().context("a running job has a lease id")?;
    holder.kill(); // the job stays leased to it (grace 120 s)

    let job_id: uuid::Uuid = id.parse()?;
    let forged: Digest = serde_json::from_value(serde_json::json!({
        "schema_version": gaffer_protocol::digest::DIGEST_SCHEMA_VERSION,
        "profile": "shots",
        "source": { "path": path, "size_bytes": 1, "modified_unix_secs": null },
        "technical": { "container": "forged", "container_long_name": "", "duration_secs": 1.0,
                       "bit_rate_bps": null, "streams": [], "primary_video_stream": null },
        "shots": { "detector": "content", "threshold": 27.0, "min_shot_frames": 15, "frames_decoded": 1,
                   "frames_corrupt": 0, "cuts": [], "shots": [] },
        "moderation": null, "text": null, "speech": null, "analyzers": [], "analysis_secs": 0.1
    }))?;
    let unknown_job = uuid::Uuid::new_v4();
    let answers = send_as_agent(
        &cp,
        &intruder,
        1,
        vec![
            // The current lease id, but not the holder.
            AgentMessage::Digest { job_id, lease_id, digest: Box::new(forged.clone()) },
            AgentMessage::Progress { job_id, lease_id, fraction: 0.5, frames_decoded: 9 },
            // A digest for a job that does not exist.
            AgentMessage::Digest { job_id: unknown_job, lease_id: 1, digest: Box::new(forged) },
        ],
    )?;
    assert_eq!(answers.len(), 3, "{answers:?}");
    for (seq, answer) in &answers {
        let message = answer.as_ref().err().with_context(|| format!("message {seq} was accepted: {answers:?}"))?;
        assert!(message.contains("refused"), "{message}");
    }
    assert!(answers[0].1.as_ref().err().is_some_and(|m| m.contains("is not leased to agent")), "{answers:?}");
    assert!(answers[2].1.as_ref().err().is_some_and(|m| m.contains("unknown job")), "{answers:?}");
    let job = cp.api_get(&format!("/jobs/{id}"))?;
    assert_eq!(job["state"], "running", "nothing changed: {job}");
    assert_eq!(job["agent"], holder.agent_id.as_str());
    assert!(cp.metric("gaffer_agent_reports_refused_total{reason=\"not_holder\"}")? >= 2.0);
    assert!(cp.metric("gaffer_agent_reports_refused_total{reason=\"unknown_job\"}")? >= 1.0);

    // The holder comes back, holds the lease, finishes: its digest is the one stored.
    holder.run(&[media_dir()])?;
    let done = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], holder.agent_id.as_str());
    assert_ne!(done["digest"]["technical"]["container"], "forged", "{}", done["digest"]);
    assert_eq!(done["digest"]["source"]["path"], path.canonicalize()?.to_str().unwrap_or_default());
    let audit = cp.dashboard_audit()?;
    assert!(audit.contains("refuse_report"), "refusals are in the audit log");
    Ok(())
}

trait AuditText {
    fn dashboard_audit(&self) -> anyhow::Result<String>;
}

impl AuditText for ControlPlane {
    fn dashboard_audit(&self) -> anyhow::Result<String> {
        let session = self.login()?;
        let (status, html) = self.page(&session, "/audit")?;
        anyhow::ensure!(status == 200, "audit page: {status}");
        Ok(html)
    }
}

/// A worker killed mid-job fails that attempt with its reason; the agent keeps serving (another job
/// runs meanwhile) and the job succeeds on its next attempt.
#[test]
fn a_sigkilled_analysis_worker_fails_one_attempt_and_the_job_succeeds_on_the_next() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run_with(&[media_dir()], &[], 2)?;
    cp.wait_agent_online(&agent.agent_id, true, Duration::from_secs(30))?;
    let long = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage-a")?;
    cp.wait_job(&long, &["running"], JOB_TIMEOUT)?;
    wait_until(Duration::from_secs(30), "a worker process", || Ok(!agent.worker_pids().is_empty()))?;
    let killed = agent.kill_workers();
    assert!(killed >= 1);
    // The attempt failed and went back to the queue with the reason, then ran again.
    wait_until(JOB_TIMEOUT, "the job's second attempt", || {
        let j = cp.api_get(&format!("/jobs/{long}"))?;
        Ok(j["attempts"].as_u64() >= Some(2) || j["state"] == "succeeded" || j["state"] == "failed")
    })?;
    let other = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let done = cp.wait_job(&long, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}\nagent log:\n{}", agent.log());
    assert_eq!(done["attempts"], 2, "{done}");
    let other = cp.wait_job(&other, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(other["state"], "succeeded", "the agent kept serving: {other}");
    assert!(agent.is_running(), "the agent survived its worker's death");
    assert!(
        cp.log().contains("analysis worker killed by signal 9")
            || agent.log().contains("analysis worker killed by signal 9"),
        "the reason names the signal"
    );
    Ok(())
}

/// A job whose worker is killed on every attempt ends `failed` after `--max-attempts`.
#[test]
fn a_job_killed_on_every_attempt_gives_up_after_max_attempts() -> anyhow::Result<()> {
    let cp = ControlPlane::start_with(ControlPlaneOptions { max_attempts: 2, ..ControlPlaneOptions::default() })?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    let id = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage-a")?;
    let deadline = Instant::now() + JOB_TIMEOUT;
    let job = loop {
        agent.kill_workers();
        let j = cp.api_get(&format!("/jobs/{id}"))?;
        if j["state"] == "succeeded" || j["state"] == "failed" {
            break j;
        }
        anyhow::ensure!(Instant::now() < deadline, "job never finished: {j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("gave up after 2 attempts; last: "), "{error}");
    assert!(error.contains("killed by signal 9"), "{error}");
    assert!(agent.is_running());
    Ok(())
}

/// A job past `--job-timeout` fails with the time-limit reason; the agent goes on.
#[test]
fn a_job_past_its_time_limit_fails_with_the_reason() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run_args(&[media_dir()], &[], 1, &["--job-timeout", "1s"])?;
    let id = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage-a")?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("time limit"), "{error}");
    assert!(agent.is_running());
    Ok(())
}

/// Cancel a running job through the API (its worker is stopped on the agent), retry it through
/// the dashboard's CSRF-protected form, and it succeeds.
#[test]
fn cancel_and_retry_through_the_api_and_the_dashboard() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    let id = cp.submit_job(&media("bbb-720p-x10.mp4"), "stage-a")?;
    cp.wait_job(&id, &["running"], JOB_TIMEOUT)?;
    wait_until(Duration::from_secs(30), "a worker process", || Ok(!agent.worker_pids().is_empty()))?;
    let (status, body) = cp.api_post(&format!("/jobs/{id}/cancel"), &Value::Null)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cancelled", "{body}");
    wait_until(Duration::from_secs(20), "the agent to stop its worker", || Ok(agent.worker_pids().is_empty()))?;
    let (status, body) = cp.api_post(&format!("/jobs/{id}/cancel"), &Value::Null)?;
    assert_eq!(status, 409, "cancelling a cancelled job: {body}");

    // Retry through the dashboard: the form needs the session's CSRF token.
    let session = cp.login()?;
    assert_eq!(cp.post_form(&session, &format!("/jobs/{id}/retry"), &[("csrf", "wrong")])?, 403);
    let (status, page) = cp.page(&session, &format!("/jobs/{id}"))?;
    assert_eq!(status, 200);
    assert!(page.contains("Retry"), "the job page offers Retry for a cancelled job");
    let csrf = csrf_of(&page).context("the job page has a CSRF token")?;
    assert_eq!(cp.post_form(&session, &format!("/jobs/{id}/retry"), &[("csrf", &csrf)])?, 303);
    let done = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}");

    // And cancel through the dashboard too.
    let queued = cp.submit_job(&PathBuf::from("/nowhere/else.mov"), "stage-a")?;
    let (_, page) = cp.page(&session, &format!("/jobs/{queued}"))?;
    let csrf = csrf_of(&page).context("CSRF token")?;
    assert_eq!(cp.post_form(&session, &format!("/jobs/{queued}/cancel"), &[("csrf", &csrf)])?, 303);
    assert_eq!(cp.api_get(&format!("/jobs/{queued}"))?["state"], "cancelled");
    Ok(())
}

/// A job no agent can take says why, in the API and on its page.
#[test]
fn a_job_no_agent_can_take_shows_its_pending_reason() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let id = cp.submit_job(&PathBuf::from("/etc/passwd"), "stage-a")?;
    let mut reason = String::new();
    wait_until(Duration::from_secs(20), "a pending reason without agents", || {
        reason = cp.api_get(&format!("/jobs/{id}"))?["pending_reason"].as_str().unwrap_or_default().to_owned();
        Ok(!reason.is_empty())
    })?;
    assert!(reason.contains("no agent of site stage-a is connected"), "{reason}");

    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    cp.wait_agent_online(&agent.agent_id, true, Duration::from_secs(30))?;
    wait_until(Duration::from_secs(20), "the volume reason", || {
        reason = cp.api_get(&format!("/jobs/{id}"))?["pending_reason"].as_str().unwrap_or_default().to_owned();
        Ok(reason.contains("has a volume covering /etc/passwd"))
    })
    .with_context(|| format!("last reason: {reason}"))?;
    assert!(reason.contains("(1 agents checked)"), "{reason}");
    assert_eq!(cp.api_get(&format!("/jobs/{id}"))?["state"], "queued");
    let session = cp.login()?;
    let (_, page) = cp.page(&session, &format!("/jobs/{id}"))?;
    assert!(page.contains("has a volume covering /etc/passwd"), "the job page says why it waits");
    Ok(())
}
