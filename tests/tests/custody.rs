//! Chain of custody end to end: a `shots` job on sample media through the real binaries, and
//! `GET /api/v1/jobs/{id}/custody` says what the agent read (the SHA-256, size and mtime of the file,
//! checked here against the file itself), who submitted it (the test's API token), which agent and
//! agent version ran it, the digest's analyzers, and every state change in order.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use gaffer_tests::{media, Agent, ControlPlane};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const JOB_TIMEOUT: Duration = Duration::from_secs(180);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_finished_jobs_custody_names_the_files_hash_its_submitter_agent_and_every_state() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let clips = work.path().join("clips");
    std::fs::create_dir(&clips)?;
    let clip = clips.join("bikes.mp4");
    std::fs::copy(media("bikes.mp4"), &clip)?;
    let clips = clips.canonicalize()?;
    let clip = clips.join("bikes.mp4");
    let bytes = std::fs::read(&clip)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let mtime_secs = std::fs::metadata(&clip)?.modified()?.duration_since(UNIX_EPOCH)?.as_secs();

    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(std::slice::from_ref(&clips))?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;

    let id = cp.submit_job(&clip, "stage-a")?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    if job["state"] != "succeeded" {
        bail!("job: {job}\nagent log:\n{}", agent.log());
    }
    let c: Value = cp.api_get(&format!("/jobs/{id}/custody"))?;

    assert_eq!(c["job_id"], id.as_str());
    assert_eq!(c["state"], "succeeded");
    assert_eq!(c["media"]["sha256"].as_str(), Some(sha256.as_str()), "the hash of the file's bytes: {c}");
    assert_eq!(c["media"]["size_bytes"].as_u64(), Some(bytes.len() as u64), "{c}");
    assert_eq!(c["media"]["modified_unix_secs"].as_u64(), Some(mtime_secs), "{c}");
    assert_eq!(c["media"]["agent_id"].as_str(), Some(agent.agent_id.as_str()), "{c}");
    assert!(c["media_note"].is_null(), "{c}");
    assert_eq!(c["submitted_by"], "token:e2e", "the test's API token submitted it: {c}");

    assert_eq!(c["agent"]["id"].as_str(), Some(agent.agent_id.as_str()), "{c}");
    assert_eq!(c["agent"]["agent_version"].as_str(), Some(env!("CARGO_PKG_VERSION")), "{c}");
    let analyzers = c["analyzers"].as_array().context("analyzers")?;
    assert!(
        analyzers.iter().any(|a| a["name"].as_str().is_some_and(|n| n.starts_with("shots"))
            && a["version"].as_str().is_some_and(|v| !v.is_empty())),
        "the shot detector with its version: {c}"
    );

    let history = c["history"].as_array().context("history")?;
    let states: Vec<&str> = history.iter().filter_map(|h| h["state"].as_str()).collect();
    assert_eq!(states, ["queued", "assigned", "running", "succeeded"], "{c}");
    let times: Vec<u64> = history.iter().filter_map(|h| h["at_ms"].as_u64()).collect();
    assert_eq!(times.len(), 4, "{c}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "times never go back: {times:?}");
    assert_eq!(times[0], c["submitted_at_ms"].as_u64().context("submitted_at_ms")?);
    for h in &history[1..] {
        assert_eq!(h["agent_id"].as_str(), Some(agent.agent_id.as_str()), "{c}");
    }

    // An unknown job is a 404 with the API's error shape; a malformed id a 400.
    let err = cp.api_get(&format!("/jobs/{}/custody", uuid::Uuid::new_v4())).err().context("unknown job")?;
    assert!(err.to_string().contains("404"), "{err}");
    let err = cp.api_get("/jobs/not-a-uuid/custody").err().context("bad id")?;
    assert!(err.to_string().contains("400"), "{err}");
    Ok(())
}
