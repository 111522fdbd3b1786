//! The runner's durable queue, the outbox bound and results that cannot be stored, with real
//! media, real analysis workers (the `gaffer-agent` binary) and a real sled state.

mod common;
use common::media_dir;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gaffer_agent::outbox::{Outbox, OutboxLimits};
use gaffer_agent::runner::{Runner, RunnerConfig};
use gaffer_protocol::messages::{AgentMessage, Assignment, HeldJob, Profile};

fn assignment(name: &str) -> anyhow::Result<Assignment> {
    let path = media_dir().join(name).canonicalize()?;
    Ok(Assignment {
        job_id: uuid::Uuid::new_v4(),
        lease_id: rand_lease(),
        path: path.display().to_string(),
        profile: Profile::Shots,
    })
}

/// A lease id as the control plane would give (any non-zero u64).
fn rand_lease() -> u64 {
    u64::from(uuid::Uuid::new_v4().as_fields().0) + 1
}

/// Runner settings for tests: the sample media as the volume, and the real `gaffer-agent` binary
/// as the analysis worker (the test harness binary is not one).
fn config(volumes: Vec<PathBuf>) -> RunnerConfig {
    RunnerConfig { volumes, worker_exe: PathBuf::from(env!("CARGO_BIN_EXE_gaffer-agent")), ..RunnerConfig::default() }
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
    let filler = AgentMessage::JobAccepted { job_id: uuid::Uuid::new_v4(), lease_id: 1 };
    let first = outbox.push(&filler)?;
    outbox.push(&filler)?;
    assert!(outbox.is_full());

    let cfg = config(vec![media_dir().canonicalize()?]);
    let runner = Runner::new(cfg, outbox.clone(), &db)?;
    let job = assignment("bikes.mp4")?;
    runner.enqueue_assignment(job.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((runner.jobs_running(), runner.jobs_queued()), (0, 1), "held while the outbox is full");
    assert_eq!(kinds(&outbox)?, ["job_accepted", "job_accepted"], "nothing rejected, nothing started");
    assert_eq!(
        runner.running_jobs(),
        [HeldJob { job_id: job.job_id, lease_id: job.lease_id }],
        "the lease is kept (reported in Hello)"
    );

    outbox.ack(first)?;
    runner.dispatch();
    wait_until("the job to finish", || runner.jobs_running() == 0 && runner.jobs_queued() == 0).await?;
    let entries = outbox.entries()?;
    let digest = entries.iter().find_map(|e| match &e.message {
        AgentMessage::Digest { job_id, lease_id, digest } if *job_id == job.job_id => {
            assert_eq!(*lease_id, job.lease_id, "the digest carries the assignment's lease");
            Some(digest.clone())
        }
        _ => None,
    });
    assert!(digest.is_some_and(|d| d.shots.frames_decoded == 250), "digest recorded: {:?}", kinds(&outbox)?);
    let accepted = entries.iter().any(|e| {
        matches!(e.message, AgentMessage::JobAccepted { job_id, lease_id } if job_id == job.job_id && lease_id == job.lease_id)
    });
    assert!(accepted, "JobAccepted under the job's lease: {entries:?}");
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
        let runner = Runner::new(config(volumes.clone()), outbox, &db)?;
        runner.enqueue_assignment(a.clone());
        runner.enqueue_assignment(b.clone());
        assert_eq!(runner.jobs_queued(), 2);
        db.flush()?;
    }
    let db = gaffer_agent::datadir::open_state_db(dir.path(), Duration::from_secs(10))?;
    let outbox = Outbox::open(&db)?;
    let runner = Runner::new(config(volumes), outbox.clone(), &db)?;
    let mut held = runner.running_jobs();
    held.sort_by_key(|h| h.job_id);
    let mut expected =
        vec![HeldJob { job_id: a.job_id, lease_id: a.lease_id }, HeldJob { job_id: b.job_id, lease_id: b.lease_id }];
    expected.sort_by_key(|h| h.job_id);
    assert_eq!(held, expected, "both jobs found after the restart, with their leases");
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
    let runner = Runner::new(config(vec![volume.path().canonicalize()?]), outbox.clone(), &db)?;
    let job = assignment("bikes.mp4")?;
    runner.enqueue_assignment(job.clone());
    let entries = outbox.entries()?;
    assert!(
        matches!(&entries[..], [e] if matches!(&e.message, AgentMessage::JobRejected { reason, lease_id, .. }
            if reason.contains("not under this agent's volumes") && *lease_id == job.lease_id)),
        "{entries:?}"
    );
    assert_eq!(runner.jobs_queued() + runner.jobs_running(), 0);
    Ok(())
}

/// A digest that cannot be stored (larger than a frame may be) fails its job with the sizes in
/// the reason instead of vanishing; the job leaves the queue only once that failure is durable,
/// and the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_too_large_for_a_frame_fails_the_job_with_its_size() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let outbox = Outbox::open(&db)?;
    // bikes.mp4's digest is about 1 KiB.
    let cfg = RunnerConfig { frame_bytes_max: 512, ..config(vec![media_dir().canonicalize()?]) };
    let runner = Runner::new(cfg, outbox.clone(), &db)?;
    let (a, b) = (assignment("bikes.mp4")?, assignment("bikes.mp4")?);
    runner.enqueue_assignment(a.clone());
    runner.enqueue_assignment(b.clone());
    wait_until("both jobs to finish", || runner.jobs_running() == 0 && runner.jobs_queued() == 0).await?;
    let entries = outbox.entries()?;
    for job in [&a, &b] {
        let failed = entries.iter().find_map(|e| match &e.message {
            AgentMessage::JobFailed { job_id, lease_id, reason, retryable } if *job_id == job.job_id => {
                Some((*lease_id, reason.clone(), *retryable))
            }
            _ => None,
        });
        let Some((lease_id, reason, retryable)) = failed else {
            panic!("no JobFailed for {}: {entries:?}", job.job_id)
        };
        assert_eq!(lease_id, job.lease_id);
        assert!(
            reason.starts_with("digest is ") && reason.ends_with("KiB, over the 512 bytes frame limit"),
            "{reason}"
        );
        assert!(!retryable, "the same file gives the same digest");
    }
    assert!(!entries.iter().any(|e| matches!(e.message, AgentMessage::Digest { .. })), "no digest stored");
    assert_eq!(db.open_tree("jobs")?.len(), 0, "finished jobs leave the queue");
    Ok(())
}

/// The control plane requeues a job the moment an attempt's failure reaches it and may lease it
/// to the same agent again at once, while that agent is still finishing the old attempt. The new
/// lease must start a new attempt (it once was taken for the old, finishing one and the job was
/// lost: "running" on the control plane, on no worker). Here the new lease is handed over as soon
/// as the failure is in the outbox, in whatever state the old attempt's bookkeeping is then; three
/// rounds, because the window is a few milliseconds (with the fix removed about one round in three
/// loses its job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_leased_again_as_its_failed_attempt_ends_runs_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let outbox = Outbox::open(&db)?;
    let runner = Runner::new(config(vec![media_dir().canonicalize()?]), outbox.clone(), &db)?;
    let has = |o: &Outbox, want: &dyn Fn(&AgentMessage) -> bool| -> bool {
        o.entries().map(|es| es.iter().any(|e| want(&e.message))).unwrap_or(false)
    };
    for round in 0..3 {
        let first = assignment("bbb-720p-x10.mp4")?;
        runner.enqueue_assignment(first.clone());
        wait_until("a worker", || !runner.worker_pids().is_empty()).await?;
        for (_, pid) in runner.worker_pids() {
            let _ = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
        let failed = |m: &AgentMessage| matches!(m, AgentMessage::JobFailed { job_id, .. } if *job_id == first.job_id);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !has(&outbox, &failed) {
            anyhow::ensure!(Instant::now() < deadline, "round {round}: the killed attempt never failed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let second = Assignment { lease_id: first.lease_id + 1, ..first.clone() };
        runner.enqueue_assignment(second.clone());
        let done = |m: &AgentMessage| matches!(m, AgentMessage::Digest { job_id, lease_id, .. } if *job_id == second.job_id && *lease_id == second.lease_id);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !has(&outbox, &done) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "round {round}: the job leased again never ran: {:?} (running {}, queued {})",
                kinds(&outbox)?,
                runner.jobs_running(),
                runner.jobs_queued()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_until("the runner idle", || runner.jobs_running() == 0 && runner.jobs_queued() == 0).await?;
    }
    Ok(())
}
