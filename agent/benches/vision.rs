//! Frames/s of the NudeNet and PP-OCR analyzers (release, this machine's cores) next to the
//! Python reference packages on the same frames, in the same invocation.
//!
//! `cargo bench -p gaffer-agent --bench vision`. Frames are the fixture frames of
//! `tests/fixtures/vision/` rebuilt with FFmpeg; the Python side runs
//! `scripts/make-vision-reference.py --bench` with `$GAFFER_VISION_PYTHON` (default `python3`;
//! needs the venv of `tests/fixtures/vision/README.md`), and is skipped with a note if it fails.
//!
//! Session options: `GAFFER_BENCH_NUDENET_VARIANTS` and `GAFFER_BENCH_OCR_VARIANTS`
//! (comma-separated names, see [`nudenet_variant`] and [`ocr_variant`]; default `tuned,untuned`) are timed in turn for `GAFFER_BENCH_ROUNDS`
//! interleaved rounds (default 1) of `GAFFER_BENCH_SECS` seconds (default 10); each line gives
//! the median frames/s over wall time and over this process's CPU time (user + system, so
//! less sensitive to other load on a shared machine).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_agent::models::{GraphOptimizationLevel, Registry, Runtime, SessionTuning};
use gaffer_agent::vision::ocr::OcrTuning;
use gaffer_agent::vision::{NudeNet, Ocr, RgbFrame};

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Applies one session change named `change` to `t`: `intra1`, `intra2`, `inter1`, `nospin`,
/// `arena-off`, `mempattern-off`, `level1`, `level2`, `level3`, `all`.
fn apply(change: &str, t: &mut SessionTuning) -> anyhow::Result<()> {
    match change {
        "intra1" => t.intra_threads = Some(1),
        "intra2" => t.intra_threads = Some(2),
        "inter1" => t.inter_threads = Some(1),
        "nospin" => t.intra_op_spinning = Some(false),
        "arena-off" => t.cpu_mem_arena = Some(false),
        "mempattern-off" => t.memory_pattern = Some(false),
        "level1" => t.optimization_level = Some(GraphOptimizationLevel::Level1),
        "level2" => t.optimization_level = Some(GraphOptimizationLevel::Level2),
        "level3" => t.optimization_level = Some(GraphOptimizationLevel::Level3),
        "all" => t.optimization_level = Some(GraphOptimizationLevel::All),
        _ => anyhow::bail!("unknown session change {change}"),
    }
    Ok(())
}

/// NudeNet session options named `tuned` (what [`NudeNet::new`] uses), `untuned` (a plain
/// [`Runtime::session`]) or `+`-joined changes to `untuned` (see [`apply`]).
fn nudenet_variant(name: &str) -> anyhow::Result<SessionTuning> {
    match name {
        "tuned" => Ok(NudeNet::TUNING),
        "untuned" => Ok(SessionTuning::default()),
        _ => {
            let mut t = SessionTuning::default();
            for change in name.split('+') {
                apply(change, &mut t)?;
            }
            Ok(t)
        }
    }
}

/// OCR session options named `tuned` (what [`Ocr::new`] uses), `untuned` (plain
/// [`Runtime::session`]s) or `+`-joined changes to `untuned` (see [`apply`]), each for all
/// three models or, prefixed `det.`, `cls.`, `rec.` or `clsrec.`, for some
/// (e.g. `det.nospin+clsrec.intra1`).
fn ocr_variant(name: &str) -> anyhow::Result<OcrTuning> {
    match name {
        "tuned" => return Ok(Ocr::TUNING),
        "untuned" => return Ok(OcrTuning::untuned()),
        _ => {}
    }
    let mut tuning = OcrTuning::untuned();
    for change in name.split('+') {
        let (models, change) = match change.split_once('.') {
            Some(("det", c)) => ([true, false, false], c),
            Some(("cls", c)) => ([false, true, false], c),
            Some(("rec", c)) => ([false, false, true], c),
            Some(("clsrec", c)) => ([false, true, true], c),
            None => ([true, true, true], change),
            Some((m, _)) => anyhow::bail!("unknown model {m} in OCR variant {name}"),
        };
        for (on, t) in models.into_iter().zip([&mut tuning.det, &mut tuning.cls, &mut tuning.rec]) {
            if on {
                apply(change, t)?;
            }
        }
    }
    Ok(tuning)
}

fn home_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(default))
}

fn frames(name: &str, dir: &Path) -> anyhow::Result<Vec<(Vec<u8>, u32, u32)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join(format!("tests/fixtures/vision/{name}.json")))?)?;
    let media = home_dir("GAFFER_MEDIA_DIR", ".cache/gaffer/media");
    let mut out = Vec::new();
    for spec in fx["frames"].as_array().context("frames")? {
        let id = spec["id"].as_str().context("id")?;
        if id.contains("plain") {
            continue;
        }
        let png = dir.join(format!("{id}.png"));
        let mut cmd = Command::new("ffmpeg");
        cmd.args(["-v", "error", "-y", "-ss", spec["ss"].as_str().context("ss")?, "-i"])
            .arg(media.join(spec["source"].as_str().context("source")?));
        for a in spec["ffmpeg_args"].as_array().context("args")? {
            cmd.arg(a.as_str().context("arg")?);
        }
        anyhow::ensure!(cmd.arg(&png).status()?.success(), "ffmpeg failed for {id}");
        let img = image::open(&png)?.to_rgb8();
        let (w, h) = img.dimensions();
        out.push((img.into_raw(), w, h));
    }
    Ok(out)
}

/// CPU time of this process (all threads, user + system) from `/proc/self/stat`.
fn cpu_time(ticks_per_sec: f64) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11).context("utime")?.parse::<f64>()? + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(Duration::from_secs_f64(ticks / ticks_per_sec))
}

/// (frames/s over wall time, frames per CPU-second) of `f` run for `seconds` after a warm-up.
fn rate(seconds: Duration, ticks: f64, mut f: impl FnMut() -> anyhow::Result<usize>) -> anyhow::Result<(f64, f64)> {
    f()?; // warm-up
    let (start, cpu0, mut n) = (Instant::now(), cpu_time(ticks)?, 0usize);
    while start.elapsed() < seconds {
        n += f()?;
    }
    let (wall, cpu) = (start.elapsed().as_secs_f64(), (cpu_time(ticks)? - cpu0).as_secs_f64());
    Ok((n as f64 / wall, n as f64 / cpu.max(1e-3)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let seconds = Duration::from_secs_f64(env_or("GAFFER_BENCH_SECS", 10.0));
    let rounds: usize = env_or("GAFFER_BENCH_ROUNDS", 1usize).max(1);
    let ticks: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?.trim().parse()?;
    let registry = Registry::open(&home_dir("GAFFER_MODELS_DIR", ".cache/gaffer/models-datadir"))?;
    let runtime = Runtime::init(&registry, 0)?;
    let tmp = tempfile::tempdir()?;
    let nude = frames("nudenet", tmp.path())?;
    let text = frames("ocr", tmp.path())?;
    let views: Vec<RgbFrame<'_>> = nude.iter().map(|(d, w, h)| RgbFrame { data: d, width: *w, height: *h }).collect();
    let names = std::env::var("GAFFER_BENCH_NUDENET_VARIANTS").unwrap_or_else(|_| "tuned,untuned".into());
    let mut detectors = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        detectors.push((name, NudeNet::with_tuning(&runtime, &registry, &nudenet_variant(name)?)?, Vec::new()));
    }
    for _ in 0..rounds {
        for (_, detector, rates) in &mut detectors {
            rates.push(rate(seconds, ticks, || Ok(detector.detect_batch(&views)?.len()))?);
        }
    }
    let names = std::env::var("GAFFER_BENCH_OCR_VARIANTS").unwrap_or_else(|_| "tuned,untuned".into());
    let mut variants = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let tuning = ocr_variant(name)?;
        variants.push((name, Ocr::with_tuning(&runtime, &registry, &tuning)?, Vec::new()));
    }
    // Session options must not change what is read: every variant reads the same text.
    let mut first: Option<Vec<Vec<String>>> = None;
    for (name, ocr, _) in &mut variants {
        let mut texts = Vec::new();
        for (d, w, h) in &text {
            texts.push(ocr.read(&RgbFrame { data: d, width: *w, height: *h })?.into_iter().map(|l| l.text).collect());
        }
        match &first {
            None => first = Some(texts),
            Some(f) => anyhow::ensure!(*f == texts, "OCR variant {name} reads different text: {texts:?} vs {f:?}"),
        }
    }
    for _ in 0..rounds {
        for (_, ocr, rates) in &mut variants {
            rates.push(rate(seconds, ticks, || {
                for (d, w, h) in &text {
                    ocr.read(&RgbFrame { data: d, width: *w, height: *h })?;
                }
                Ok(text.len())
            })?);
        }
    }
    for (name, detector, rates) in detectors {
        let (mut wall, mut cpu): (Vec<f64>, Vec<f64>) = rates.into_iter().unzip();
        println!(
            "rust nudenet [{name}]: {:.2} frames/s, {:.2} frames/CPU-s ({} frames, batch {}, median of {rounds}; all: {})",
            median(&mut wall),
            median(&mut cpu),
            views.len(),
            detector.batch_frames(),
            wall.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
        );
    }
    for (name, _, rates) in variants {
        let (mut wall, mut cpu): (Vec<f64>, Vec<f64>) = rates.into_iter().unzip();
        println!(
            "rust rapidocr-equivalent [{name}]: {:.2} frames/s, {:.2} frames/CPU-s ({} frames with text, median of {rounds}; all: {})",
            median(&mut wall),
            median(&mut cpu),
            text.len(),
            wall.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
        );
    }
    let python = std::env::var("GAFFER_VISION_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-vision-reference.py");
    match Command::new(&python).arg(&script).arg("--bench").output() {
        Ok(out) if out.status.success() => print!("{}", String::from_utf8_lossy(&out.stdout)),
        Ok(out) => {
            println!("python reference skipped: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""))
        }
        Err(e) => println!("python reference skipped: {e}"),
    }
    Ok(())
}
