//! Fault injection with real processes on loopback: agents and control planes killed with SIGKILL
//! at random moments, and a control plane that goes away for a while. Afterwards nothing is lost
//! and nothing is duplicated: every job has exactly one digest and the job count is as submitted.
//!
//! The kill moments come from a seeded RNG. The seed is printed at the start and in any failure;
//! set `GAFFER_TEST_SEED=<seed>` to replay a run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_tests::{media, Agent, ControlPlane, ControlPlaneOptions};
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn seed() -> u64 {
    let seed = std::env::var("GAFFER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("GAFFER_TEST_SEED={seed}");
    seed
}

/// A volume with `n` short real media files (copies of the sample media under distinct names).
fn volume_with_jobs(n: usize) -> anyhow::Result<(tempfile::TempDir, Vec<PathBuf>)> {
    let dir = tempfile::tempdir()?;
    let sources = [media("bikes.mp4"), media("Megamind.avi"), media("bigbuckbunny.mp4")];
    let mut files = Vec::new();
    for i in 0..n {
        let src = &sources[i % sources.len()];
        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("mp4");
        let dst = dir.path().join(format!("reel{i:02}.{ext}"));
        std::fs::copy(src, &dst)?;
        files.push(dst);
    }
    Ok((dir, files))
}

/// Asserts: exactly `expected` jobs exist, all succeeded, each with one digest of its own file.
fn assert_all_succeeded_once(cp: &ControlPlane, ids: &HashMap<String, PathBuf>, seed: u64) -> anyhow::Result<()> {
    let jobs = cp.jobs()?;
    assert_eq!(jobs.len(), ids.len(), "job count changed (seed {seed}): {jobs:?}");
    for (id, path) in ids {
        let job = cp.api_get(&format!("/jobs/{id}"))?;
        assert_eq!(job["state"], "succeeded", "seed {seed}: {job}");
        let digest = &job["digest"];
        assert_eq!(
            digest["source"]["path"].as_str(),
            path.canonicalize()?.to_str(),
            "seed {seed}: digest of another file for job {id}"
        );
        assert!(digest["shots"]["frames_decoded"].as_u64().unwrap_or(0) > 0);
    }
    // Redeliveries happened (that is the point of the test), yet the store kept one digest per
    // job (checked above) and counted each job's success once.
    let audit = std::fs::read_to_string(cp.wire_audit_log())?;
    let digests_sent = audit.lines().filter(|l| l.contains("\"kind\":\"digest\"")).count();
    eprintln!("seed {seed}: {} jobs, {digests_sent} digest messages received in all", ids.len());
    let counted = cp.metric("gaffer_jobs{state=\"succeeded\"}")?;
    assert_eq!(counted, ids.len() as f64, "seed {seed}: the store counts each success once");
    Ok(())
}

fn wait_all(cp: &ControlPlane, ids: &HashMap<String, PathBuf>, timeout: Duration, seed: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let done = ids
            .keys()
            .filter(|id| {
                cp.api_get(&format!("/jobs/{id}"))
                    .map(|j| j["state"] == "succeeded" || j["state"] == "failed")
                    .unwrap_or(false)
            })
            .count();
        if done == ids.len() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "seed {seed}: only {done} of {} jobs finished in time", ids.len());
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn submit_all(cp: &ControlPlane, files: &[PathBuf]) -> anyhow::Result<HashMap<String, PathBuf>> {
    files.iter().map(|f| Ok((cp.submit_job(f, "stage-a")?, f.clone()))).collect()
}

/// (a) 20 jobs while the agent is SIGKILLed and restarted at random moments, 10 times.
#[test]
fn agent_killed_ten_times_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A long grace: a restarted agent keeps its leases.
    let cp = ControlPlane::start_with(ControlPlaneOptions { lease_grace_secs: 60, ..ControlPlaneOptions::default() })?;
    let (volume, files) = volume_with_jobs(20)?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    let vols = [volume.path().to_path_buf()];
    agent.run(&vols)?;
    cp.wait_agent_online(&agent.agent_id, true, Duration::from_secs(30))?;
    let ids = submit_all(&cp, &files)?;

    for kill in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..2500)));
        agent.kill();
        eprintln!("seed {seed}: SIGKILL {} of the agent", kill + 1);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
        agent.run(&vols)?;
    }
    wait_all(&cp, &ids, Duration::from_secs(300), seed).with_context(|| format!("agent log:\n{}", agent.log()))?;
    assert_all_succeeded_once(&cp, &ids, seed)?;
    // The agent's outbox drains once everything is acknowledged.
    let drained = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        agent.status().map(|s| s["outbox_pending"] == 0).unwrap_or(false)
    });
    assert!(drained, "seed {seed}: outbox not drained: {:?}", agent.status());
    Ok(())
}

/// (b) The control plane SIGKILLed and restarted twice during a 20-job run.
#[test]
fn control_plane_killed_twice_keeps_every_acknowledged_result() -> anyhow::Result<()> {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cp =
        ControlPlane::start_with(ControlPlaneOptions { lease_grace_secs: 60, ..ControlPlaneOptions::default() })?;
    let (volume, files) = volume_with_jobs(20)?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run_with(&[volume.path().to_path_buf()], &[], 2)?;
    cp.wait_agent_online(&agent.agent_id, true, Duration::from_secs(30))?;
    let ids = submit_all(&cp, &files)?;

    for kill in 0..2 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..5000)));
        cp.kill();
        eprintln!("seed {seed}: SIGKILL {} of the control plane", kill + 1);
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..2000)));
        cp.restart()?;
    }
    wait_all(&cp, &ids, Duration::from_secs(300), seed)
        .with_context(|| format!("agent log:\n{}\ncontrol log:\n{}", agent.log(), cp.log()))?;
    assert_all_succeeded_once(&cp, &ids, seed)?;
    Ok(())
}

fn copy_into(dir: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for f in files {
        let dst = dir.join(f.file_name().context("file name")?);
        // Copy next to it and rename in, as a careful ingest tool does.
        let tmp = dir.join(format!(".{}.part", f.file_name().and_then(|n| n.to_str()).unwrap_or("x")));
        std::fs::copy(f, &tmp)?;
        std::fs::rename(&tmp, &dst)?;
        out.push(dst);
    }
    Ok(out)
}

/// (c) The control plane is unreachable for a stretch; the agent keeps finishing watch-folder
/// jobs, and all of them arrive when it comes back.
#[test]
fn watch_folder_jobs_finish_during_an_outage_and_arrive_afterwards() -> anyhow::Result<()> {
    let seed = seed();
    let mut cp = ControlPlane::start()?;
    let watch = tempfile::tempdir()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run_with(&[], &[watch.path().to_path_buf()], 2)?;
    cp.wait_agent_online(&agent.agent_id, true, Duration::from_secs(30))?;

    cp.kill();
    let (_src, files) = volume_with_jobs(5)?;
    let landed = copy_into(watch.path(), &files)?;
    // All five finish locally while the control plane is down.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = agent.status()?;
        let finished = s["jobs_running"] == 0 && s["jobs_queued"] == 0;
        // accepted + digest (at least) per file, plus the submission itself
        if finished && s["outbox_pending"].as_u64().unwrap_or(0) >= 3 * landed.len() as u64 {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "seed {seed}: jobs did not finish offline: {s}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_ne!(status["link"], "up", "{status}");
    assert!(status["oldest_unacked_age_secs"].as_f64().is_some());

    cp.restart()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs: Vec<Value> = cp.jobs()?;
        let done = jobs.iter().filter(|j| j["state"] == "succeeded").count();
        if jobs.len() == landed.len() && done == landed.len() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "seed {seed}: backlog did not arrive: {jobs:?}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let ids: HashMap<String, PathBuf> = cp
        .jobs()?
        .into_iter()
        .filter_map(|j| Some((j["id"].as_str()?.to_owned(), PathBuf::from(j["path"].as_str()?))))
        .collect();
    for path in &landed {
        assert!(ids.values().any(|p| p == &path.canonicalize().unwrap_or_default()), "{} missing", path.display());
    }
    assert_all_succeeded_once(&cp, &ids, seed)?;
    let drained = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        agent.status().map(|s| s["outbox_pending"] == 0).unwrap_or(false)
    });
    assert!(
        drained,
        "outbox not drained: {:?}\nagent log:\n{}\ncontrol log:\n{}",
        agent.status(),
        agent.log(),
        cp.log()
    );
    Ok(())
}
