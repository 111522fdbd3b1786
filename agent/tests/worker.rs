//! Analysis workers as real processes (the `gaffer-agent` binary) with real FFmpeg and media: a
//! worker that is SIGKILLed, passes its time or memory limit, or meets bad media fails that one
//! attempt with a reason a person understands, and the runner's other jobs complete; cancelling
//! a job kills its worker; playlists and concat scripts never reach FFmpeg's demuxers.

mod common;
use common::media_dir;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaffer_agent::outbox::Outbox;
use gaffer_agent::runner::{Runner, RunnerConfig};
use gaffer_protocol::digest::Digest;
use gaffer_protocol::messages::{AgentMessage, Assignment, JobId, Profile};

struct Setup {
    _dir: tempfile::TempDir,
    /// A second volume for generated files.
    scratch: PathBuf,
    db: sled::Db,
    outbox: Outbox,
    runner: Arc<Runner>,
}

fn setup(slots: u32) -> anyhow::Result<Setup> {
    setup_with(slots, PathBuf::from(env!("CARGO_BIN_EXE_gaffer-agent")))
}

fn setup_with(slots: u32, worker_exe: PathBuf) -> anyhow::Result<Setup> {
    // The runner's log (and the workers' lines it forwards), shown when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,gaffer_agent=debug"))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir()?;
    let scratch = dir.path().join("volume");
    std::fs::create_dir(&scratch)?;
    let scratch = scratch.canonicalize()?;
    let db = sled::open(dir.path().join("state"))?;
    let outbox = Outbox::open(&db)?;
    let cfg = RunnerConfig {
        volumes: vec![media_dir().canonicalize()?, scratch.clone()],
        job_slots: slots,
        progress_interval: Duration::ZERO,
        worker_exe,
        ..RunnerConfig::default()
    };
    let runner = Runner::new(cfg, outbox.clone(), &db)?;
    Ok(Setup { _dir: dir, scratch, db, outbox, runner })
}

fn job(path: &Path, lease_id: u64) -> Assignment {
    Assignment { job_id: uuid::Uuid::new_v4(), lease_id, path: path.display().to_string(), profile: Profile::Shots }
}

/// bikes.mp4: 10 s, 640 × 272, 250 frames; the job that must complete.
fn bikes(lease_id: u64) -> anyhow::Result<Assignment> {
    Ok(job(&media_dir().join("bikes.mp4").canonicalize()?, lease_id))
}

/// bbb-720p-x10.mp4: 53 s of 1280 × 720, long enough to still be running when a test kills it.
fn long_job(lease_id: u64) -> anyhow::Result<Assignment> {
    Ok(job(&media_dir().join("bbb-720p-x10.mp4").canonicalize()?, lease_id))
}

#[derive(Debug)]
enum Result_ {
    Digest(u64, Box<Digest>),
    Failed { lease_id: u64, reason: String, retryable: bool },
}

fn result_of(outbox: &Outbox, id: JobId) -> anyhow::Result<Option<Result_>> {
    Ok(outbox.entries()?.into_iter().find_map(|e| match e.message {
        AgentMessage::Digest { job_id, lease_id, digest } if job_id == id => Some(Result_::Digest(lease_id, digest)),
        AgentMessage::JobFailed { job_id, lease_id, reason, retryable } if job_id == id => {
            Some(Result_::Failed { lease_id, reason, retryable })
        }
        _ => None,
    }))
}

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_result(s: &Setup, a: &Assignment) -> anyhow::Result<Result_> {
    let mut found = None;
    wait_until(&format!("a result for {}", a.path), 120, || {
        found = result_of(&s.outbox, a.job_id)?;
        Ok(found.is_some())
    })
    .await?;
    found.ok_or_else(|| anyhow::anyhow!("no result"))
}

/// The job's digest, checked to be bikes.mp4's under the job's lease.
async fn expect_bikes_digest(s: &Setup, a: &Assignment) -> anyhow::Result<()> {
    match wait_result(s, a).await? {
        Result_::Digest(lease_id, d) => {
            assert_eq!(lease_id, a.lease_id, "the digest carries the job's lease");
            assert_eq!(d.shots.frames_decoded, 250);
            Ok(())
        }
        other => anyhow::bail!("expected a digest for {}, got {other:?}", a.path),
    }
}

async fn expect_failure(s: &Setup, a: &Assignment) -> anyhow::Result<(String, bool)> {
    match wait_result(s, a).await? {
        Result_::Failed { lease_id, reason, retryable } => {
            assert_eq!(lease_id, a.lease_id, "the failure carries the job's lease");
            Ok((reason, retryable))
        }
        other => anyhow::bail!("expected {} to fail, got {other:?}", a.path),
    }
}

/// The pid of the job's worker, once it is decoding (its first progress report is in the outbox).
async fn worker_pid_mid_job(s: &Setup, id: JobId) -> anyhow::Result<u32> {
    wait_until("the job's first progress report", 60, || {
        Ok(s.outbox
            .entries()?
            .iter()
            .any(|e| matches!(e.message, AgentMessage::Progress { job_id, .. } if job_id == id)))
    })
    .await?;
    s.runner
        .worker_pids()
        .into_iter()
        .find(|(j, _)| *j == id)
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("the job has no worker"))
}

/// Whether process `pid` still exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn kill9(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill -KILL {pid} failed");
    Ok(())
}

async fn wait_idle(s: &Setup) -> anyhow::Result<()> {
    wait_until("the runner to finish its jobs", 120, || Ok(s.runner.jobs_running() + s.runner.jobs_queued() == 0)).await
}

/// A worker SIGKILLed mid-job fails that attempt (retryable: the file may be fine); the next job
/// in the queue then runs and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_by_a_signal_fails_its_attempt_and_the_next_job_runs() -> anyhow::Result<()> {
    let s = setup(1)?;
    let (a, b) = (long_job(11)?, bikes(12)?);
    s.runner.enqueue_assignment(a.clone());
    s.runner.enqueue_assignment(b.clone());
    let pid = worker_pid_mid_job(&s, a.job_id).await?;
    kill9(pid)?;
    let (reason, retryable) = expect_failure(&s, &a).await?;
    assert_eq!(reason, "analysis worker killed by signal 9 (SIGKILL)");
    assert!(retryable, "a killed worker says nothing about the file");
    expect_bikes_digest(&s, &b).await?;
    wait_idle(&s).await?;
    assert_eq!(s.db.open_tree("jobs")?.len(), 0);
    Ok(())
}

/// A job past its wall-time limit is killed with the limit in the reason; a job running beside
/// it under the normal limit completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_time_limit_fails_and_its_neighbour_completes() -> anyhow::Result<()> {
    let s = setup(2)?;
    let (a, b) = (long_job(21)?, bikes(22)?);
    s.runner.set_job_limits(Some(Duration::from_millis(300)), None);
    s.runner.enqueue_assignment(a.clone());
    s.runner.set_job_limits(None, None);
    s.runner.enqueue_assignment(b.clone());
    let (reason, retryable) = expect_failure(&s, &a).await?;
    assert!(reason.starts_with("analysis worker exceeded the 300 ms time limit"), "{reason}");
    assert!(!retryable, "the same file would take as long again");
    expect_bikes_digest(&s, &b).await?;
    wait_idle(&s).await?;
    Ok(())
}

/// A worker above its memory limit is killed with the limit in the reason; a job running beside
/// it under the normal limit completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_limit_fails_and_its_neighbour_completes() -> anyhow::Result<()> {
    let s = setup(2)?;
    let (a, b) = (long_job(31)?, bikes(32)?);
    s.runner.set_job_limits(None, Some(1 << 20));
    s.runner.enqueue_assignment(a.clone());
    s.runner.set_job_limits(None, None);
    s.runner.enqueue_assignment(b.clone());
    let (reason, retryable) = expect_failure(&s, &a).await?;
    assert!(
        reason.starts_with("analysis worker exceeded the 1 MiB memory limit (resident memory reached "),
        "{reason}"
    );
    assert!(!retryable);
    expect_bikes_digest(&s, &b).await?;
    wait_idle(&s).await?;
    Ok(())
}

/// Bad media fails in the worker with the analysis' reason (the worker is not killed, the
/// failure is not retryable), and the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_media_fails_with_its_reason_and_kills_nothing() -> anyhow::Result<()> {
    let s = setup(1)?;
    let garbage = s.scratch.join("garbage.mp4");
    std::fs::write(&garbage, vec![0x5au8; 64 * 1024])?;
    let (a, b) = (job(&garbage, 41), bikes(42)?);
    s.runner.enqueue_assignment(a.clone());
    s.runner.enqueue_assignment(b.clone());
    let (reason, retryable) = expect_failure(&s, &a).await?;
    assert!(reason.starts_with("not a media file:"), "{reason}");
    assert!(!reason.contains("worker"), "the worker reported it, nobody killed it: {reason}");
    assert!(!retryable);
    expect_bikes_digest(&s, &b).await?;
    Ok(())
}

/// Files that would make FFmpeg read other files (an HLS playlist, an ffconcat script), or are
/// in a container outside the whitelist (a PNG image), are refused with a clear reason, and a
/// symlink out of the volumes is refused by the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playlists_concat_scripts_and_other_formats_are_refused() -> anyhow::Result<()> {
    let s = setup(2)?;
    let target = media_dir().join("bikes.mp4").canonicalize()?;
    let m3u8 = s.scratch.join("list.m3u8");
    std::fs::write(
        &m3u8,
        format!("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{}\n#EXT-X-ENDLIST\n", target.display()),
    )?;
    let concat = s.scratch.join("list.txt");
    std::fs::write(&concat, format!("ffconcat version 1.0\nfile '{}'\n", target.display()))?;
    let png = s.scratch.join("still.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30])).save(&png)?;
    let outside = tempfile::tempdir()?;
    std::fs::copy(&target, outside.path().join("elsewhere.mp4"))?;
    let link = s.scratch.join("link.mp4");
    std::os::unix::fs::symlink(outside.path().join("elsewhere.mp4"), &link)?;

    let jobs = [job(&m3u8, 51), job(&concat, 52), job(&png, 53)];
    for a in &jobs {
        s.runner.enqueue_assignment(a.clone());
    }
    let (reason, _) = expect_failure(&s, &jobs[0]).await?;
    assert!(reason.contains("it is an M3U/HLS playlist, which makes FFmpeg read other files"), "{reason}");
    let (reason, _) = expect_failure(&s, &jobs[1]).await?;
    assert!(reason.contains("it is an FFmpeg concat script (ffconcat)"), "{reason}");
    let (reason, retryable) = expect_failure(&s, &jobs[2]).await?;
    assert!(reason.contains("not one of the formats the agent analyzes"), "{reason}");
    assert!(!retryable);
    // The runner refuses the symlink out of the volumes at once.
    s.runner.enqueue_assignment(job(&link, 54));
    let rejected = s.outbox.entries()?.into_iter().any(|e| {
        matches!(&e.message, AgentMessage::JobRejected { lease_id: 54, reason, .. } if reason.contains("not under this agent's volumes"))
    });
    assert!(rejected, "symlink out of the volumes not rejected");
    wait_idle(&s).await?;
    Ok(())
}

/// The worker itself checks the volumes on the file it opened: a path that passed the runner's
/// check but leads outside (the link was swapped after the check) is refused.
#[test]
fn the_worker_checks_the_volumes_on_the_opened_file() -> anyhow::Result<()> {
    let volume = tempfile::tempdir()?;
    let outside = tempfile::tempdir()?;
    let secret = outside.path().join("secret.mp4");
    std::fs::copy(media_dir().join("bikes.mp4"), &secret)?;
    let link = volume.path().join("link.mp4");
    std::os::unix::fs::symlink(&secret, &link)?;
    let volumes = vec![volume.path().canonicalize()?];
    let err = gaffer_agent::worker::open_checked(&link.display().to_string(), &volumes)
        .err()
        .ok_or_else(|| anyhow::anyhow!("opened a file outside the volumes"))?;
    assert!(err.to_string().contains("is not under this agent's volumes"), "{err}");
    let inside = volume.path().join("bikes.mp4");
    std::fs::copy(media_dir().join("bikes.mp4"), &inside)?;
    let media = gaffer_agent::worker::open_checked(&inside.display().to_string(), &volumes)?;
    assert_eq!(media.opened_path()?, inside.canonicalize()?);
    Ok(())
}

/// Cancelling a running job kills its worker; nothing is reported for the job, it leaves the
/// queue, and the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_worker() -> anyhow::Result<()> {
    let s = setup(1)?;
    let (a, b) = (long_job(61)?, bikes(62)?);
    s.runner.enqueue_assignment(a.clone());
    s.runner.enqueue_assignment(b.clone());
    let pid = worker_pid_mid_job(&s, a.job_id).await?;
    assert!(alive(pid));
    s.runner.cancel(a.job_id);
    wait_until("the cancelled job's worker to be gone", 10, || Ok(!alive(pid))).await?;
    expect_bikes_digest(&s, &b).await?;
    wait_idle(&s).await?;
    assert!(result_of(&s.outbox, a.job_id)?.is_none(), "a cancelled job reports nothing");
    assert_eq!(s.db.open_tree("jobs")?.len(), 0);
    Ok(())
}

/// A worker that exits with an error status before reporting fails the attempt with the status
/// and its last log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_with_an_error_reports_its_status_and_last_line() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = tempfile::tempdir()?;
    let exe = bin.path().join("broken-worker");
    std::fs::write(&exe, "#!/bin/sh\necho 'starting' >&2\necho 'cannot map the decoder: out of luck' >&2\nexit 3\n")?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    let s = setup_with(1, exe)?;
    let (a, b) = (bikes(71)?, bikes(72)?);
    s.runner.enqueue_assignment(a.clone());
    s.runner.enqueue_assignment(b.clone());
    for j in [&a, &b] {
        let (reason, retryable) = expect_failure(&s, j).await?;
        assert_eq!(reason, "analysis worker exited with status 3: cannot map the decoder: out of luck");
        assert!(retryable);
    }
    wait_idle(&s).await?;
    Ok(())
}
