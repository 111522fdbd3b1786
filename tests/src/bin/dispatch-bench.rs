//! `dispatch-bench`: no-op job dispatch end to end, Gaffer against Celery 5.7 + Redis 7, in one
//! run on one machine (issue 10, item 3).
//!
//! Three timed runs, one after another (never two at once), so drift on a shared machine shows:
//! Gaffer, Celery, Gaffer again. The ratio is the mean of the two Gaffer runs over the Celery run.
//!
//! * **Gaffer**: a fresh `gaffer-control init` + `serve` (release build, the defaults `serve` runs
//!   with in production: sled store, default log level, no wire audit) in a temp data dir, then
//!   `gaffer-sim` as a process: `--agents A --slots K` simulated agents on loopback QUIC with mTLS,
//!   unpaced submission through the REST API (`--jobs-per-sec 0 --jobs-total M --job-delay-ms 0`).
//!   Its `jobs_per_sec` is jobs succeeded / (first submit → last acknowledged digest). Every result
//!   is on disk before it is acknowledged: `POST /api/v1/jobs` answers after the job is flushed
//!   (`Scheduler::submit`), a leasing pass flushes before its assignments go out, and each agent
//!   report is committed with its sequence watermark (`Store::commit_agent_message`) and flushed
//!   (`Store::flush`) before the control plane acknowledges it (`ingest.rs`). `Store::flush` on
//!   sled is a group commit: sled 0.34's `Db::flush` (`pwrite` + `sync_file_range`) and then
//!   `fdatasync` of the log file, one for every caller waiting at that moment. So neither a killed
//!   control plane nor a power loss loses anything it acknowledged.
//! * **Celery**: a venv (`--venv`, default `~/.cache/gaffer/bench-venv`) with
//!   `tests/bench/celery/requirements.txt` installed `--require-hashes`; Debian's `redis-server` on
//!   a free loopback port with RDB snapshots off and the append-only file on, `appendfsync
//!   everysec` (Redis's durable setting short of an fsync per write: the append-only file is
//!   fsynced once a second, so a crash can lose about the last second of tasks, acknowledgements
//!   and results — weaker than Gaffer's flush before every acknowledgement; said above the table); a worker `celery worker --concurrency C` (prefork) on
//!   `tests/bench/celery/benchapp.py` (`task_acks_late`, Redis result backend, one no-op task);
//!   `driver.py` submits the warm-up tasks, waits for them, then submits M tasks with `.delay()`
//!   and waits for every result: jobs/s = M / (first submit → last result).
//!
//! Each run is preceded by `--warmup W` untimed jobs through the same server (Gaffer: a first
//! `gaffer-sim` run against the same control plane). Prints one table with the load average
//! (`/proc/loadavg`) before and after each run; `--json` prints one JSON object instead.
//! `--perf-record FILE` records the control plane of the first Gaffer run with `perf record -g`.
//!
//! Run: `cargo run --release -p gaffer-tests --bin dispatch-bench -- --jobs 20000`. It builds
//! `gaffer-control` and `gaffer-sim` itself (same profile and target dir; `--no-build` skips it).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::Value;

/// What the Gaffer side guarantees, checked against control-plane/src/ingest.rs, scheduler.rs and
/// sled 0.34's `Db::flush`; printed above the table.
const GAFFER_DURABILITY: &str = "every submit (201), lease pass and agent report is on the device before it is \
answered or acknowledged (group commit: sled flush, then fdatasync of its log)";
/// What the Celery side guarantees with the Redis settings below.
const CELERY_DURABILITY: &str = "Redis AOF, appendfsync everysec: tasks, acks and results are fsynced once a \
second, after they are acknowledged";
/// How long a stopped server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a server gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// No-op job dispatch end to end through Gaffer and through Celery 5.7 + Redis 7, in one run:
/// Gaffer, Celery, Gaffer again, one after another; prints jobs/s of each and the ratio.
#[derive(Debug, Parser)]
#[command(name = "dispatch-bench", version)]
struct Args {
    /// Jobs timed in each run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    jobs: u64,
    /// Untimed jobs through the same server before each timed run.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    warmup: u64,
    /// Simulated Gaffer agents (gaffer-sim --agents).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    agents: u32,
    /// Job slots of each simulated agent (gaffer-sim --slots).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    slots: u32,
    /// Worker processes of the Celery worker (celery worker --concurrency).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    celery_concurrency: u32,
    /// The Python virtual environment for Celery; made and filled from
    /// tests/bench/celery/requirements.txt when needed. Default: ~/.cache/gaffer/bench-venv.
    #[arg(long, value_name = "DIR")]
    venv: Option<PathBuf>,
    /// Bound on each phase of a Gaffer or Celery run (submitting, then waiting for the results),
    /// seconds; a run past it fails.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(10..=3600))]
    run_timeout_secs: u64,
    /// Record the first Gaffer run's control plane with `perf record -g` into FILE
    /// (read it with `perf report -i FILE`).
    #[arg(long, value_name = "FILE")]
    perf_record: Option<PathBuf>,
    /// Use the gaffer-control and gaffer-sim binaries next to this one as they are (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// One timed run.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    tool: &'static str,
    run: u32,
    jobs: u64,
    jobs_succeeded: u64,
    seconds: f64,
    jobs_per_sec: f64,
    load_avg_before: String,
    load_avg_after: String,
    /// Everything the tool's own measuring program printed (gaffer-sim's or driver.py's JSON).
    detail: Value,
}

/// The binaries and the repository this bench runs.
struct Setup {
    control: PathBuf,
    sim: PathBuf,
    celery_dir: PathBuf,
    venv: PathBuf,
    redis_version: String,
    celery_version: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = end_children_on_signal().and_then(|()| run(&args)) {
        eprintln!("dispatch-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("dispatch-bench: this is a debug build; measure with `cargo run --release`");
    }
    let setup = prepare(args)?;
    let load_before = load_avg();
    let mut runs = vec![gaffer_run(args, &setup, 1, args.perf_record.as_deref())?];
    runs.push(celery_run(args, &setup, 1)?);
    runs.push(gaffer_run(args, &setup, 2, None)?);
    let load_after = load_avg();

    let gaffer: Vec<f64> = runs.iter().filter(|r| r.tool == "gaffer").map(|r| r.jobs_per_sec).collect();
    let gaffer_mean = gaffer.iter().sum::<f64>() / gaffer.len() as f64;
    let celery = runs.iter().find(|r| r.tool == "celery").map_or(f64::NAN, |r| r.jobs_per_sec);
    let ratio = gaffer_mean / celery;
    let gaffer_about = format!(
        "gaffer-control {} (sled) + gaffer-sim, {} agents x {} slots, QUIC/mTLS on loopback; {GAFFER_DURABILITY}",
        env!("CARGO_PKG_VERSION"),
        args.agents,
        args.slots
    );
    let celery_about = format!(
        "Celery {} + Redis {}, task_acks_late, prefork --concurrency {}, Redis result backend; {CELERY_DURABILITY}",
        setup.celery_version, setup.redis_version, args.celery_concurrency
    );
    if args.json {
        let out = serde_json::json!({
            "jobs": args.jobs,
            "warmup": args.warmup,
            "gaffer": gaffer_about,
            "celery": celery_about,
            "runs": runs,
            "gaffer_jobs_per_sec_mean": gaffer_mean,
            "celery_jobs_per_sec": celery,
            "ratio_gaffer_celery": ratio,
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "No-op job dispatch end to end (first submit -> last result), {} jobs per run after {} warm-up jobs, \
         runs one after another on this machine ({} CPUs)",
        args.jobs,
        args.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  gaffer: {gaffer_about}");
    println!("  celery: {celery_about}");
    println!();
    println!(
        "{:<7} {:>3} {:>8} {:>9} {:>9}   load avg 1/5/15 min before -> after",
        "tool", "run", "jobs", "seconds", "jobs/s"
    );
    for r in &runs {
        println!(
            "{:<7} {:>3} {:>8} {:>9.2} {:>9.1}   {} -> {}",
            r.tool, r.run, r.jobs_succeeded, r.seconds, r.jobs_per_sec, r.load_avg_before, r.load_avg_after
        );
    }
    println!();
    println!("Gaffer mean {gaffer_mean:.1} jobs/s, Celery {celery:.1} jobs/s: ratio Gaffer/Celery {ratio:.2}x");
    println!("load avg (1/5/15 min) before {load_before}, after {load_after}");
    Ok(())
}

/// Builds the Gaffer binaries (unless `--no-build`), checks redis-server and Python, and makes
/// the Celery venv.
fn prepare(args: &Args) -> Result<Setup> {
    let exe = std::env::current_exe().context("path of this executable")?;
    let bin_dir = exe.parent().context("directory of this executable")?.to_path_buf();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("repository root")?.to_path_buf();
    if !args.no_build {
        build_gaffer(&repo, &bin_dir)?;
    }
    let control = bin_dir.join("gaffer-control");
    let sim = bin_dir.join("gaffer-sim");
    for b in [&control, &sim] {
        ensure!(
            b.is_file(),
            "{} is missing: build it with `cargo build --release -p gaffer-control -p gaffer-tests --bin gaffer-control \
             --bin gaffer-sim` (or drop --no-build)",
            b.display()
        );
    }
    let redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .context("redis-server is not installed: `apt-get install -y redis-server` (Debian ships Redis 7)")?;
    let redis_line = String::from_utf8_lossy(&redis.stdout).into_owned();
    let redis_version = redis_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .with_context(|| format!("no version in `redis-server --version`: {redis_line}"))?
        .to_owned();
    if !redis_version.starts_with("7.") {
        eprintln!("dispatch-bench: redis-server is {redis_version}, not Redis 7 as the comparison asks");
    }
    let celery_dir = repo.join("tests/bench/celery");
    let venv = match &args.venv {
        Some(v) => v.clone(),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set: pass --venv DIR")?)
            .join(".cache/gaffer/bench-venv"),
    };
    make_venv(&venv, &celery_dir.join("requirements.txt"))?;
    let out = Command::new(venv.join("bin/celery")).arg("--version").output().context("celery --version")?;
    ensure!(out.status.success(), "celery --version failed: {}", String::from_utf8_lossy(&out.stderr));
    let celery_version = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("unknown").to_owned();
    Ok(Setup { control, sim, celery_dir, venv, redis_version, celery_version })
}

/// `cargo build` of gaffer-control and gaffer-sim into the target dir and profile this binary
/// was built in (`target/<profile dir>/`).
fn build_gaffer(repo: &Path, bin_dir: &Path) -> Result<()> {
    let target_dir = bin_dir.parent().context("target directory")?;
    let profile = match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => bail!("cannot tell the cargo profile from {}", bin_dir.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--profile", profile, "-p", "gaffer-control", "-p", "gaffer-tests"])
        .args(["--bin", "gaffer-control", "--bin", "gaffer-sim", "--target-dir"])
        .arg(target_dir)
        .arg("--manifest-path")
        .arg(repo.join("Cargo.toml"))
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    ensure!(status.success(), "cargo build of gaffer-control and gaffer-sim failed ({status})");
    Ok(())
}

/// Makes the venv at `dir` if it has no Python yet, and installs `requirements` into it with
/// `--require-hashes` (quick when everything is already there).
fn make_venv(dir: &Path, requirements: &Path) -> Result<()> {
    let python = dir.join("bin/python");
    if !python.is_file() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(dir)
            .status()
            .context("python3 is not installed (Celery needs it): `apt-get install -y python3 python3-venv`")?;
        ensure!(status.success(), "python3 -m venv {} failed ({status})", dir.display());
    }
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--require-hashes", "-r"])
        .arg(requirements)
        .output()
        .with_context(|| format!("running {} -m pip", python.display()))?;
    ensure!(
        out.status.success(),
        "pip install --require-hashes -r {} failed ({}): {}",
        requirements.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One Gaffer run: a fresh control plane, a warm-up gaffer-sim run, the timed gaffer-sim run.
fn gaffer_run(args: &Args, setup: &Setup, run: u32, perf_record: Option<&Path>) -> Result<RunResult> {
    let dir = temp_dir("dispatch-bench-gaffer-")?;
    let data = dir.path().join("control");
    let out = Command::new(&setup.control)
        .args(["init", "--json", "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--server-name", "localhost", "--server-name", "127.0.0.1", "--data-dir"])
        .arg(&data)
        .output()
        .context("running gaffer-control init")?;
    ensure!(
        out.status.success(),
        "gaffer-control init failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let log = dir.path().join("control.log");
    let mut serve = Command::new(&setup.control);
    serve.arg("serve").arg("--data-dir").arg(&data).stdout(Stdio::null()).stderr(log_file(&log)?);
    let mut server = Daemon::spawn("gaffer-control serve", &mut serve, Signal::SIGTERM, &log)?;
    let serve_json = data.join("serve.json");
    let info: Value = wait_until(START_TIMEOUT, "gaffer-control serve to write serve.json", || {
        server.check_running()?;
        Ok(std::fs::read(&serve_json).ok().and_then(|b| serde_json::from_slice(&b).ok()))
    })?;
    let quic_addr = info["quic_addr"].as_str().context("serve.json has no quic_addr")?.to_owned();

    if args.warmup > 0 {
        gaffer_sim(args, setup, &data, &quic_addr, args.warmup, "gaffer-sim-warmup", &mut server)?;
    }
    let perf = match perf_record {
        Some(file) => Some(start_perf(file, server.pid(), dir.path())?),
        None => None,
    };
    let load_avg_before = load_avg();
    let detail = gaffer_sim(args, setup, &data, &quic_addr, args.jobs, "gaffer-sim", &mut server)?;
    let load_avg_after = load_avg();
    if let Some(mut perf) = perf {
        perf.stop();
    }
    server.stop();

    let jobs_succeeded = detail["jobs_succeeded"].as_u64().context("gaffer-sim printed no jobs_succeeded")?;
    let jobs_per_sec = detail["jobs_per_sec"].as_f64().context("gaffer-sim printed no jobs_per_sec")?;
    ensure!(jobs_succeeded == args.jobs, "gaffer-sim: {jobs_succeeded} of {} jobs succeeded: {detail}", args.jobs);
    ensure!(jobs_per_sec > 0.0, "gaffer-sim printed jobs_per_sec {jobs_per_sec}");
    Ok(RunResult {
        tool: "gaffer",
        run,
        jobs: args.jobs,
        jobs_succeeded,
        seconds: jobs_succeeded as f64 / jobs_per_sec,
        jobs_per_sec,
        load_avg_before,
        load_avg_after,
        detail,
    })
}

/// Runs gaffer-sim against the control plane at `quic_addr` (data dir `data`) for `jobs` unpaced
/// no-op jobs and returns its JSON report; its output goes next to the data dir as NAME.out/.err.
fn gaffer_sim(
    args: &Args,
    setup: &Setup,
    data: &Path,
    quic_addr: &str,
    jobs: u64,
    name: &str,
    server: &mut Daemon,
) -> Result<Value> {
    let mut cmd = Command::new(&setup.sim);
    cmd.arg("--data-dir").arg(data).args(["--control", quic_addr]);
    cmd.args(["--agents", &args.agents.to_string(), "--slots", &args.slots.to_string()]);
    cmd.args(["--jobs-per-sec", "0", "--jobs-total", &jobs.to_string(), "--job-delay-ms", "0"]);
    let secs = args.run_timeout_secs.to_string();
    cmd.args(["--duration-secs", &secs, "--drain-secs", &secs]);
    cmd.args(["--control-pid", &server.pid().to_string(), "--json"]);
    let dir = data.parent().context("the data dir's parent")?;
    // The warm-up run's agents are the timed run's: enrolled once, reconnected.
    cmd.arg("--state-dir").arg(dir.join("sim-state"));
    let report = run_json(&mut cmd, dir, name, Duration::from_secs(args.run_timeout_secs + 60))?;
    server.check_running()?;
    Ok(report)
}

/// Starts `perf record -g` on `pid`, writing `file`; stopped with SIGINT (perf then writes the file).
fn start_perf(file: &Path, pid: u32, dir: &Path) -> Result<Daemon> {
    let log = dir.join("perf.log");
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-g", "-p", &pid.to_string(), "-o"]).arg(file);
    cmd.stdout(Stdio::null()).stderr(log_file(&log)?);
    let mut perf = Daemon::spawn("perf record", &mut cmd, Signal::SIGINT, &log)
        .context("perf is not installed: `apt-get install -y linux-perf`")?;
    // perf exits at once when it cannot attach (perf_event_paranoid, no PMU access).
    std::thread::sleep(Duration::from_millis(500));
    perf.check_running()?;
    Ok(perf)
}

/// One Celery run: a fresh Redis, a worker, driver.py with the warm-up and the timed tasks.
fn celery_run(args: &Args, setup: &Setup, run: u32) -> Result<RunResult> {
    let dir = temp_dir("dispatch-bench-celery-")?;
    let port = free_tcp_port()?;
    let redis_log = dir.path().join("redis.log");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"]);
    cmd.args(["--appendonly", "yes", "--appendfsync", "everysec", "--dir"]).arg(dir.path());
    cmd.stdout(log_file(&redis_log)?).stderr(log_file(&redis_log)?);
    let mut redis = Daemon::spawn("redis-server", &mut cmd, Signal::SIGTERM, &redis_log)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(START_TIMEOUT, "redis-server to answer PING", || {
        redis.check_running()?;
        Ok(redis_ping(addr).then_some(()))
    })?;
    let redis_url = format!("redis://127.0.0.1:{port}");

    let worker_log = dir.path().join("celery-worker.log");
    let mut cmd = Command::new(setup.venv.join("bin/celery"));
    cmd.args(["-A", "benchapp", "worker", "--pool", "prefork", "--loglevel", "warning"]);
    cmd.args(["--concurrency", &args.celery_concurrency.to_string(), "--hostname", "dispatch-bench@%h"]);
    cmd.current_dir(&setup.celery_dir).env("GAFFER_BENCH_REDIS_URL", &redis_url);
    cmd.stdout(log_file(&worker_log)?).stderr(log_file(&worker_log)?);
    let mut worker = Daemon::spawn("celery worker", &mut cmd, Signal::SIGTERM, &worker_log)?;

    let mut cmd = Command::new(setup.venv.join("bin/python"));
    cmd.arg("driver.py").args(["--jobs", &args.jobs.to_string(), "--warmup", &args.warmup.to_string()]);
    cmd.args(["--timeout-secs", &args.run_timeout_secs.to_string()]);
    cmd.current_dir(&setup.celery_dir).env("GAFFER_BENCH_REDIS_URL", &redis_url);
    let load_avg_before = load_avg();
    let detail = run_json(&mut cmd, dir.path(), "celery-driver", Duration::from_secs(2 * args.run_timeout_secs + 60))?;
    let load_avg_after = load_avg();
    worker.check_running()?;
    worker.stop();
    redis.stop();

    let jobs_succeeded = detail["succeeded"].as_u64().context("driver.py printed no succeeded")?;
    let seconds = detail["seconds"].as_f64().context("driver.py printed no seconds")?;
    let jobs_per_sec = detail["jobs_per_sec"].as_f64().context("driver.py printed no jobs_per_sec")?;
    ensure!(jobs_succeeded == args.jobs, "driver.py: {jobs_succeeded} of {} tasks succeeded: {detail}", args.jobs);
    Ok(RunResult {
        tool: "celery",
        run,
        jobs: args.jobs,
        jobs_succeeded,
        seconds,
        jobs_per_sec,
        load_avg_before,
        load_avg_after,
        detail,
    })
}

/// A new temp dir named `PREFIX…`, removed when dropped or by [`end_children_on_signal`].
fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().context("making a temp dir")?;
    TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir.path().to_path_buf());
    Ok(dir)
}

/// Whether a Redis server at `addr` answers `PING` with `+PONG`.
fn redis_ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A loopback TCP port free now (the kernel's pick; Redis takes it right after).
fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// `/proc/loadavg`'s three averages (1, 5, 15 minutes), or "unknown".
fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Calls `f` every 50 ms until it returns `Some`, for at most `timeout`.
fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` to its end (at most `timeout`; then its process group is killed), stdout and stderr
/// into `dir/NAME.out` and `dir/NAME.err`, and returns its stdout as JSON.
fn run_json(cmd: &mut Command, dir: &Path, name: &str, timeout: Duration) -> Result<Value> {
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    cmd.stdout(log_file(&out_path)?).stderr(log_file(&err_path)?);
    let mut child = Daemon::spawn(name, cmd, Signal::SIGKILL, &err_path)?;
    let status: ExitStatus = wait_until(timeout, &format!("{name} to finish"), || Ok(child.child.try_wait()?))
        .with_context(|| format!("{name} ran too long; its stderr ends:\n{}", log_tail(&err_path, 20)))?;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    ensure!(status.success(), "{name} failed ({status}); its stderr ends:\n{}", log_tail(&err_path, 20));
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!("{name} printed no JSON object: {stdout:?}; its stderr ends:\n{}", log_tail(&err_path, 20))
    })
}

/// Process groups of the [`Daemon`]s running now, for [`end_children_on_signal`].
static RUNNING: Mutex<Vec<Pid>> = Mutex::new(Vec::new());
/// The runs' temp dirs (one per run, three in all; they hold a data dir with its CA key), for
/// [`end_children_on_signal`].
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// On SIGINT or SIGTERM, kills the process groups of every [`Daemon`] still running, removes the
/// runs' temp dirs and exits with status 130: the servers are in process groups of their own, so
/// a Ctrl-C on the terminal does not reach them, and an exit by signal runs no destructors.
fn end_children_on_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut interrupt, mut terminate) = {
        let _in_runtime = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        });
        for group in RUNNING.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = killpg(*group, Signal::SIGKILL);
        }
        for dir in TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("dispatch-bench: interrupted; killed the servers it had started");
        std::process::exit(130);
    });
    Ok(())
}

/// A child process in a process group of its own, ended with its group (the signal it was made
/// with, then SIGKILL after [`STOP_GRACE`]) when stopped or dropped.
struct Daemon {
    name: String,
    child: Child,
    stop_signal: Signal,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, cmd: &mut Command, stop_signal: Signal, log: &Path) -> Result<Self> {
        let child = cmd.process_group(0).spawn().with_context(|| format!("starting {name}"))?;
        RUNNING.lock().unwrap_or_else(|p| p.into_inner()).push(Pid::from_raw(child.id() as i32));
        Ok(Self { name: name.to_owned(), child, stop_signal, log: log.to_path_buf() })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error, with the end of its log, when the process has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); its log ends:\n{}", self.name, log_tail(&self.log, 20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(group, self.stop_signal);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Whatever is left of the group (the leader past its grace, a worker's pool processes
        // after their leader died) goes too; the kernel keeps the id while the group exists.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
        RUNNING.lock().unwrap_or_else(|p| p.into_inner()).retain(|g| *g != group);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
