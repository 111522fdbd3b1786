//! Speed of the `full` profile (release, CPU) as a multiple of real time, with the per-model
//! frame rates inside the pipeline, next to the per-model benchmark against the Python reference
//! packages on the same frames: the `vision` bench's binary, built by the same command, is run
//! at the end of this one (not duplicated here).
//!
//! ```sh
//! GAFFER_VISION_PYTHON=/tmp/h8venv/bin/python cargo bench -p gaffer-agent --bench full --bench vision
//! ```
//!
//! (cargo then also runs the `vision` bench on its own after this one.)
//!
//! For each file (`GAFFER_BENCH_FILES`, comma-separated names in `GAFFER_MEDIA_DIR`; default
//! `Megamind.avi,bbb-720p-x10.mp4`) it runs, after one unmeasured warm-up, `GAFFER_BENCH_REPS`
//! (default 3) analyses with the default [`FullOptions`] in this process, and prints the median
//! wall time, media duration / wall time, the CPU time (user + system, all threads; steadier
//! than wall time on a shared machine), and the `shots` profile on the same file for
//! comparison. The models come from `GAFFER_MODELS_DIR` (default
//! `~/.cache/gaffer/models-datadir`). `GAFFER_BENCH_OCR_FPS` overrides the OCR sampling rate,
//! to explore. Target: `full` ≥ 5× real time on
//! the 720p clip.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;
use gaffer_agent::analysis::full::{FullAnalysis, FullOptions, Models};
use gaffer_agent::analysis::{self, AnalyzeOptions, Profile};
use gaffer_protocol::digest::Digest;

fn env_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(default))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// User + system CPU time of this process so far, seconds (`/proc/self/stat` fields 14 and 15,
/// in `USER_HZ` = 100 ticks per second); 0 where `/proc` is unavailable.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(14) + ticks(15)) / 100.0
}

fn param(d: &Digest, analyzer: &str, key: &str) -> Option<f64> {
    d.analyzers.iter().find(|a| a.name == analyzer)?.parameters.iter().find(|(k, _)| k == key)?.1.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let media = env_dir("GAFFER_MEDIA_DIR", ".cache/gaffer/media");
    let models = Models::open(&env_dir("GAFFER_MODELS_DIR", ".cache/gaffer/models-datadir"), 0)?;
    anyhow::ensure!(models.missing().is_empty(), "models missing: {:?}", models.missing());
    let reps: usize = std::env::var("GAFFER_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let files = std::env::var("GAFFER_BENCH_FILES").unwrap_or_else(|_| "Megamind.avi,bbb-720p-x10.mp4".into());
    let mut options = FullOptions::default();
    if let Some(v) = std::env::var("GAFFER_BENCH_OCR_FPS").ok().and_then(|v| v.parse().ok()) {
        options.ocr_sample_fps = v;
    }
    let full = FullAnalysis { models: &models, options: &options };
    let cancel = AtomicBool::new(false);
    println!(
        "full profile: moderation {}/s, OCR {}/s (+ each shot's first frame), {reps} reps",
        options.moderation_sample_fps, options.ocr_sample_fps
    );
    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>10} {:>11} {:>9} {:>11} {:>11} {:>10} {:>9}",
        "file",
        "media s",
        "full s",
        "full ×rt",
        "full CPU s",
        "shots s",
        "shots ×rt",
        "nudenet f/s",
        "ocr f/s",
        "mod frames",
        "ocr frames"
    );
    for name in files.split(',').filter(|s| !s.is_empty()) {
        let path = media.join(name);
        let run = |profile: Profile| -> anyhow::Result<(f64, f64, Digest)> {
            let opts = AnalyzeOptions { profile, ..AnalyzeOptions::default() };
            let (started, cpu) = (Instant::now(), cpu_secs());
            let d = analysis::analyze_file_with(&path, &opts, Some(&full), &mut |_| {}, &cancel)
                .with_context(|| format!("{name} ({})", profile.as_str()))?;
            Ok((started.elapsed().as_secs_f64(), cpu_secs() - cpu, d))
        };
        run(Profile::Full)?; // warm-up: page cache, ONNX Runtime arenas
        let mut full_secs = Vec::new();
        let mut full_cpu = Vec::new();
        let mut shots_secs = Vec::new();
        let mut last = None;
        for _ in 0..reps {
            let (s, c, d) = run(Profile::Full)?;
            full_secs.push(s);
            full_cpu.push(c);
            last = Some(d);
            shots_secs.push(run(Profile::Shots)?.0);
        }
        let d = last.context("no run")?;
        let media_secs = d.technical.duration_secs.unwrap_or(f64::NAN);
        let (full_s, shots_s, cpu_s) = (median(full_secs), median(shots_secs), median(full_cpu));
        let mod_frames = d.moderation.as_ref().map_or(0, |m| m.frames_analyzed);
        let ocr_frames = d.text.as_ref().map_or(0, |t| t.frames_analyzed);
        let rate = |frames: u64, analyzer: &str| {
            param(&d, analyzer, "inference_secs").map_or(f64::NAN, |s| frames as f64 / s.max(1e-9))
        };
        println!(
            "{:<18} {:>8.2} {:>9.2} {:>9.2} {:>10.2} {:>11.2} {:>9.2} {:>11.2} {:>11.2} {:>10} {:>9}",
            name,
            media_secs,
            full_s,
            media_secs / full_s,
            cpu_s,
            shots_s,
            media_secs / shots_s,
            rate(mod_frames, "moderation.nudenet"),
            rate(ocr_frames, "text.ppocr"),
            mod_frames,
            ocr_frames
        );
    }
    println!();
    println!("per model on the vision fixture frames, next to the Python reference packages (benches/vision.rs):");
    match vision_bench() {
        Some(exe) => {
            let status = std::process::Command::new(&exe).status().with_context(|| format!("{}", exe.display()))?;
            anyhow::ensure!(status.success(), "{} failed: {status}", exe.display());
        }
        None => println!("  vision bench not built: add `--bench vision` to the cargo command"),
    }
    Ok(())
}

/// The newest `vision-*` bench executable next to this one (`target/release/deps/`).
fn vision_bench() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("vision-") && !name.contains('.')
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}
