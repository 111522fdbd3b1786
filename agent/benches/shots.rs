//! Wall-time benchmark of the `shots` profile against decode-only FFmpeg and PySceneDetect.
//!
//! ```sh
//! cargo bench -p gaffer-agent --bench shots          # or scripts/bench-shots.sh
//! ```
//!
//! For each sample it runs, interleaved, `GAFFER_BENCH_REPS` times (default 5) after one
//! unmeasured warm-up round (page cache):
//!
//! * ours:        `gaffer-agent analyze --profile shots FILE --json > /dev/null` (this build's binary,
//!   release profile under `cargo bench`);
//! * decode-only: `ffmpeg -threads 2 -i FILE -an -f null -`;
//! * scenedetect: `scenedetect -i FILE detect-content` (PySceneDetect, if installed);
//!
//! and prints the median wall times and their ratios, and the median CPU time (user + system, all
//! threads) of ours and of decode-only FFmpeg: on a shared, loaded machine the CPU times are the
//! steadier comparison. Target: ours ≤ 1.1 × decode-only (wall).
//!
//! Environment: `GAFFER_MEDIA_DIR` (default `~/.cache/gaffer/media`), `GAFFER_BENCH_REPS`,
//! `GAFFER_BENCH_FILES` (comma-separated names in the media dir; default
//! `test.mp4,bbb-720p-x10.mp4`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

const OURS: &str = env!("CARGO_BIN_EXE_gaffer-agent");

fn media_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("GAFFER_MEDIA_DIR") {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set GAFFER_MEDIA_DIR")?;
    Ok(PathBuf::from(home).join(".cache/gaffer/media"))
}

/// Wall and CPU time of one run, seconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

/// Linux's `USER_HZ`: `/proc` reports CPU times in ticks of 1/100 s on every architecture the
/// kernel supports (see proc(5), "clock ticks").
const USER_HZ: f64 = 100.0;

/// User + system CPU time of this process's waited-for children so far, seconds (fields 16 and
/// 17 of `/proc/self/stat`, `cutime` and `cstime`); 0 where `/proc` is unavailable.
fn children_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name (field 2) is parenthesized and may contain spaces: split after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // `rest` starts at field 3; cutime and cstime are fields 16 and 17.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(16 - 3) + ticks(17 - 3)) / USER_HZ
}

/// Runs `cmd` with stdout and stderr discarded; returns its wall and CPU time.
fn time(cmd: &mut Command) -> anyhow::Result<Timing> {
    let cpu_before = children_cpu_secs();
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(Timing { wall, cpu: children_cpu_secs() - cpu_before })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ours(file: &Path) -> Command {
    let mut c = Command::new(OURS);
    c.args(["analyze", "--profile", "shots", "--json"]).arg(file);
    c
}

fn decode_only(file: &Path) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-nostdin", "-hide_banner", "-v", "error", "-threads", "2", "-i"])
        .arg(file)
        .args(["-an", "-f", "null", "-"]);
    c
}

fn scenedetect(file: &Path) -> Command {
    let mut c = Command::new("scenedetect");
    c.arg("-i").arg(file).arg("detect-content");
    c
}

fn scenedetect_available() -> bool {
    Command::new("scenedetect")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Row {
    name: String,
    /// Median wall times, seconds.
    ours: f64,
    decode: f64,
    scenedetect: Option<f64>,
    /// Median CPU times (user + system), seconds.
    ours_cpu: f64,
    decode_cpu: f64,
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; there are no options to parse.
    let reps: usize = match std::env::var("GAFFER_BENCH_REPS") {
        Ok(v) => v.parse().with_context(|| format!("GAFFER_BENCH_REPS={v:?} is not a count"))?,
        Err(_) => 5,
    };
    if reps == 0 {
        bail!("GAFFER_BENCH_REPS must be at least 1");
    }
    let files = std::env::var("GAFFER_BENCH_FILES").unwrap_or_else(|_| "test.mp4,bbb-720p-x10.mp4".into());
    let dir = media_dir()?;
    let with_scenedetect = scenedetect_available();
    if !with_scenedetect {
        eprintln!("scenedetect not found: its column is skipped (pip install 'scenedetect-headless==0.7.2')");
    }
    let mut rows = Vec::new();
    for name in files.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let file = dir.join(name);
        if !file.is_file() {
            bail!("{} not found: run scripts/setup.sh or set GAFFER_MEDIA_DIR", file.display());
        }
        eprintln!("{name}: warm-up, then {reps} interleaved rounds ...");
        time(&mut ours(&file))?;
        time(&mut decode_only(&file))?;
        if with_scenedetect {
            time(&mut scenedetect(&file))?;
        }
        let (mut o, mut d, mut s) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            o.push(time(&mut ours(&file))?);
            d.push(time(&mut decode_only(&file))?);
            if with_scenedetect {
                s.push(time(&mut scenedetect(&file))?);
            }
        }
        let wall = |v: &[Timing]| v.iter().map(|t| t.wall).collect::<Vec<_>>();
        let cpu = |v: &[Timing]| v.iter().map(|t| t.cpu).collect::<Vec<_>>();
        rows.push(Row {
            name: name.to_string(),
            ours: median(&mut wall(&o)),
            decode: median(&mut wall(&d)),
            scenedetect: with_scenedetect.then(|| median(&mut wall(&s))),
            ours_cpu: median(&mut cpu(&o)),
            decode_cpu: median(&mut cpu(&d)),
        });
    }

    println!();
    println!(
        "shots benchmark: median wall time (and CPU time, user + system) of {reps} runs, seconds (cores: {})",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<20} {:>9} {:>12} {:>12} {:>12} {:>19} {:>17} {:>9} {:>11}",
        "file",
        "ours",
        "decode-only",
        "scenedetect",
        "ours/decode",
        "scenedetect/decode",
        "scenedetect/ours",
        "ours cpu",
        "decode cpu"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.prec$}"));
    for r in &rows {
        println!(
            "{:<20} {:>9.3} {:>12.3} {:>12} {:>12.2} {:>19} {:>17} {:>9.2} {:>11.2}",
            r.name,
            r.ours,
            r.decode,
            opt(r.scenedetect, 3),
            r.ours / r.decode,
            opt(r.scenedetect.map(|s| s / r.decode), 2),
            opt(r.scenedetect.map(|s| s / r.ours), 2),
            r.ours_cpu,
            r.decode_cpu,
        );
    }
    let worst = rows.iter().map(|r| r.ours / r.decode).fold(0.0, f64::max);
    println!("target ours/decode <= 1.10: {}", if worst <= 1.10 { "met" } else { "NOT met" });
    Ok(())
}
