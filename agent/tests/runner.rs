//! The runner's durable queue and the outbox bound, with real media and a real sled state.

mod common;
use common::media_dir;

use std::time::{Duration, Instant};

use gaffer_agent::outbox::{Outbox, OutboxLimits};
use gaffer_agent::runner::{Runner, RunnerConfig};
use gaffer_protocol::messages::{AgentMessage, Assignment, Profile};

fn assignment(name: &str) -> anyhow::Result<Assignment> {
    let path = media_dir().join(name).canonicalize()?;
    Ok(Assignment { job_id: uuid::Uuid::new_v4(), path: path.display().to_string(), profile: Profile::Shots })
}

fn kinds(outbox: &Outbox) -> anyhow::Result<Vec<&'static str>> {
    Ok(outbox.entries()?.iter().map(|e| e.message.kind()).collect())
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A full outbox stops new jobs (they wait, durably queued, not rejected); once it drains below
/// the bound the queued job runs and its result is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_holds_new_jobs_until_it_drains() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let outbox = Outbox::open_with(&db, OutboxLimits { entries_max: 2, bytes_max: 1 << 20 })?;
    let filler = AgentMessage::JobAccepted { job_id: uuid::Uuid::new_v4() };
    let first = outbox.push(&filler)?;
    outbox.push(&filler)?;
    assert!(outbox.is_full());

    let cfg = RunnerConfig { volumes: vec![media_dir().canonicalize()?], ..RunnerConfig::default() };
    let runner = Runner::new(cfg, outbox.clone(), &db)?;
    let job = assignment("bikes.mp4")?;
    runner.enqueue_assignment(job.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((runner.jobs_running(), runner.jobs_queued()), (0, 1), "held while the outbox is full");
    assert_eq!(kinds(&outbox)?, ["job_accepted", "job_accepted"], "nothing rejected, nothing started");
    assert_eq!(runner.running_jobs(), [job.job_id], "the lease is kept (reported in Hello)");

    outbox.ack(first)?;
    runner.dispatch();
    wait_until("the job to finish", || runner.jobs_running() == 0 && runner.jobs_queued() == 0).await?;
    let entries = outbox.entries()?;
    let digest = entries.iter().find_map(|e| match &e.message {
        AgentMessage::Digest { job_id, digest } if *job_id == job.job_id => Some(digest.clone()),
        _ => None,
    });
    assert!(digest.is_some_and(|d| d.shots.frames_decoded == 250), "digest recorded: {:?}", kinds(&outbox)?);
    Ok(())
}

/// Jobs held when the agent dies are found in the state at the next start and run then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_survive_a_restart_and_run_afterwards() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let volumes = vec![media_dir().canonicalize()?];
    let (a, b) = (assignment("bikes.mp4")?, assignment("Megamind.avi")?);
    {
        let db = sled::open(dir.path())?;
        // A full outbox keeps both jobs queued, as if the agent died before starting them.
        let outbox = Outbox::open_with(&db, OutboxLimits { entries_max: 0, bytes_max: 0 })?;
        let runner = Runner::new(RunnerConfig { volumes: volumes.clone(), ..RunnerConfig::default() }, outbox, &db)?;
        runner.enqueue_assignment(a.clone());
        runner.enqueue_assignment(b.clone());
        assert_eq!(runner.jobs_queued(), 2);
        db.flush()?;
    }
    let db = gaffer_agent::datadir::open_state_db(dir.path(), Duration::from_secs(10))?;
    let outbox = Outbox::open(&db)?;
    let runner = Runner::new(RunnerConfig { volumes, ..RunnerConfig::default() }, outbox.clone(), &db)?;
    let mut held = runner.running_jobs();
    held.sort();
    let mut expected = vec![a.job_id, b.job_id];
    expected.sort();
    assert_eq!(held, expected, "both jobs found after the restart");
    runner.dispatch();
    wait_until("both jobs to finish", || runner.jobs_running() == 0 && runner.jobs_queued() == 0).await?;
    let digests = outbox.entries()?.iter().filter(|e| matches!(e.message, AgentMessage::Digest { .. })).count();
    assert_eq!(digests, 2);
    assert_eq!(db.open_tree("jobs")?.len(), 0, "finished jobs leave the queue");
    Ok(())
}

/// A path outside the volumes is rejected with a reason, through the outbox.
#[tokio::test]
async fn a_job_outside_the_volumes_is_rejected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path().join("state"))?;
    let outbox = Outbox::open(&db)?;
    let volume = tempfile::tempdir()?;
    let runner = Runner::new(
        RunnerConfig { volumes: vec![volume.path().canonicalize()?], ..RunnerConfig::default() },
        outbox.clone(),
        &db,
    )?;
    runner.enqueue_assignment(assignment("bikes.mp4")?);
    let entries = outbox.entries()?;
    assert!(
        matches!(&entries[..], [e] if matches!(&e.message, AgentMessage::JobRejected { reason, .. } if reason.contains("not under this agent's volumes"))),
        "{entries:?}"
    );
    assert_eq!(runner.jobs_queued() + runner.jobs_running(), 0);
    Ok(())
}
