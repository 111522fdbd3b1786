//! Frames/s of the NudeNet and PP-OCR analyzers (release, this machine's cores) next to the
//! Python reference packages on the same frames, in the same invocation.
//!
//! `cargo bench -p gaffer-agent --bench vision`. Frames are the fixture frames of
//! `tests/fixtures/vision/` rebuilt with FFmpeg; the Python side runs
//! `scripts/make-vision-reference.py --bench` with `$GAFFER_VISION_PYTHON` (default `python3`;
//! needs the venv of `tests/fixtures/vision/README.md`), and is skipped with a note if it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_agent::models::{Registry, Runtime};
use gaffer_agent::vision::{NudeNet, Ocr, RgbFrame};

const SECONDS: Duration = Duration::from_secs(10);

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

fn rate(mut f: impl FnMut() -> anyhow::Result<usize>) -> anyhow::Result<f64> {
    f()?; // warm-up
    let (start, mut n) = (Instant::now(), 0usize);
    while start.elapsed() < SECONDS {
        n += f()?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let registry = Registry::open(&home_dir("GAFFER_MODELS_DIR", ".cache/gaffer/models-datadir"))?;
    let runtime = Runtime::init(&registry, 0)?;
    let tmp = tempfile::tempdir()?;
    let nude = frames("nudenet", tmp.path())?;
    let text = frames("ocr", tmp.path())?;
    let mut detector = NudeNet::new(&runtime, &registry)?;
    let views: Vec<RgbFrame<'_>> = nude.iter().map(|(d, w, h)| RgbFrame { data: d, width: *w, height: *h }).collect();
    let nude_fps = rate(|| Ok(detector.detect_batch(&views)?.len()))?;
    let mut ocr = Ocr::new(&runtime, &registry)?;
    let ocr_fps = rate(|| {
        for (d, w, h) in &text {
            ocr.read(&RgbFrame { data: d, width: *w, height: *h })?;
        }
        Ok(text.len())
    })?;
    println!("rust nudenet: {nude_fps:.2} frames/s ({} frames, batch {})", views.len(), detector.batch_frames());
    println!("rust rapidocr-equivalent: {ocr_fps:.2} frames/s ({} frames with text)", text.len());
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
