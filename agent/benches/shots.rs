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
//! and prints the median wall times and their ratios. Target: ours ≤ 1.1 × decode-only.
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

/// Runs `cmd` with stdout and stderr discarded; returns its wall time in seconds.
fn time(cmd: &mut Command) -> anyhow::Result<f64> {
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(secs)
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
    ours: f64,
    decode: f64,
    scenedetect: Option<f64>,
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
        rows.push(Row {
            name: name.to_string(),
            ours: median(&mut o),
            decode: median(&mut d),
            scenedetect: with_scenedetect.then(|| median(&mut s)),
        });
    }

    println!();
    println!(
        "shots benchmark: median wall time of {reps} runs, seconds (cores: {})",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<20} {:>9} {:>12} {:>12} {:>12} {:>19} {:>17}",
        "file", "ours", "decode-only", "scenedetect", "ours/decode", "scenedetect/decode", "scenedetect/ours"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.prec$}"));
    for r in &rows {
        println!(
            "{:<20} {:>9.3} {:>12.3} {:>12} {:>12.2} {:>19} {:>17}",
            r.name,
            r.ours,
            r.decode,
            opt(r.scenedetect, 3),
            r.ours / r.decode,
            opt(r.scenedetect.map(|s| s / r.decode), 2),
            opt(r.scenedetect.map(|s| s / r.ours), 2),
        );
    }
    let worst = rows.iter().map(|r| r.ours / r.decode).fold(0.0, f64::max);
    println!("target ours/decode <= 1.10: {}", if worst <= 1.10 { "met" } else { "NOT met" });
    Ok(())
}
