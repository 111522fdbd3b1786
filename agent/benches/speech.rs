//! Silero VAD throughput (audio seconds per wall second, release, this machine) of
//! [`SileroVad`] next to the `silero-vad` Python package's `get_speech_timestamps` (ONNX mode)
//! on the same 16 kHz mono samples, in the same invocation.
//!
//! `cargo bench -p gaffer-agent --bench speech`. The audio of `Megamind.avi` and
//! `bigbuckbunny.mp4` (from `$GAFFER_MEDIA_DIR`, default `~/.cache/gaffer/media`) is resampled
//! once by FFmpeg to 16 kHz mono `pcm_f32le` WAVs in a temp dir; the Rust side reads them with
//! [`decode_resampled`] (an identity conversion), the Python side
//! (`scripts/bench-speech-reference.py`, run with `$GAFFER_SPEECH_PYTHON`, default `python3`;
//! needs `silero-vad==6.2.3 onnxruntime soundfile numpy torch`) with soundfile. Only the VAD is
//! timed on both sides: Rust pushes all samples and finishes a fresh [`SileroVad`] (session
//! opened beforehand), Python times one `get_speech_timestamps` call. Rust runs twice per
//! round: `rust`, opened by [`SileroVad::new`] as the agent does, and `rust-1t`, the same code
//! on a session with the package's `OnnxWrapper` options (1 intra-op, 1 inter-op thread).
//! After one warm-up run each, `GAFFER_BENCH_ROUNDS` rounds (default 15) alternate them per
//! file; the table gives medians and the load average before and after. Both sides must find the same segments. The Python side is skipped
//! with a note if it fails to start.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;
use gaffer_agent::models::{Registry, Runtime, SessionTuning};
use gaffer_agent::speech::audio::decode_resampled;
use gaffer_agent::speech::vad::{MODEL_NAME, SAMPLE_RATE_HZ};
use gaffer_agent::speech::{SileroVad, VadParams};

const CLIPS: [&str; 2] = ["Megamind.avi", "bigbuckbunny.mp4"];

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn home_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(default))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Resamples the first audio stream of `src` to a 16 kHz mono `pcm_f32le` WAV at `wav`.
fn resample(src: &Path, wav: &Path) -> anyhow::Result<()> {
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-i"])
        .arg(src)
        .args(["-map", "0:a:0", "-ac", "1", "-ar", &SAMPLE_RATE_HZ.to_string(), "-c:a", "pcm_f32le"])
        .arg(wav)
        .status()?;
    anyhow::ensure!(status.success(), "ffmpeg failed to resample {}", src.display());
    Ok(())
}

/// The Python reference, serving one timed `get_speech_timestamps` per request.
struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Reference {
    fn start(python: &str, wavs: &[PathBuf]) -> anyhow::Result<(Self, serde_json::Value)> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-speech-reference.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(wavs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {python}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut reference = Self { child, stdin, stdout };
        match reference.line() {
            Ok(ready) => Ok((reference, ready)),
            Err(e) => {
                let _ = reference.child.kill();
                let out = reference.child.wait_with_output()?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                anyhow::bail!("{e}: {}", stderr.lines().last().unwrap_or(""))
            }
        }
    }

    fn line(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        anyhow::ensure!(self.stdout.read_line(&mut line)? > 0, "reference exited");
        Ok(serde_json::from_str(&line)?)
    }

    /// (wall seconds of the call, segments in samples) for WAV number `index`.
    fn run(&mut self, index: usize) -> anyhow::Result<(f64, Vec<(u64, u64)>)> {
        writeln!(self.stdin, "{index}")?;
        self.stdin.flush()?;
        let reply = self.line()?;
        let secs = reply["secs"].as_f64().context("secs")?;
        let segments = reply["segments"]
            .as_array()
            .context("segments")?
            .iter()
            .map(|s| Some((s[0].as_u64()?, s[1].as_u64()?)))
            .collect::<Option<Vec<_>>>()
            .context("segment")?;
        Ok((secs, segments))
    }
}

/// Session options of the Python package's `OnnxWrapper`: one intra-op and one inter-op thread.
const PACKAGE_TUNING: SessionTuning = SessionTuning {
    intra_threads: Some(1),
    inter_threads: Some(1),
    optimization_level: None,
    cpu_mem_arena: None,
    memory_pattern: None,
    intra_op_spinning: None,
};

/// (wall seconds of pushing `samples` through a fresh [`SileroVad`] and finishing, segments);
/// `tuning` `None` opens it as the agent does ([`SileroVad::new`]).
fn rust_run(
    runtime: &Runtime,
    registry: &Registry,
    tuning: Option<&SessionTuning>,
    samples: &[f32],
) -> anyhow::Result<(f64, Vec<(u64, u64)>)> {
    // Session opening is not timed.
    let mut vad = match tuning {
        None => SileroVad::new(runtime, registry)?,
        Some(t) => SileroVad::from_session(runtime.session_with(registry, MODEL_NAME, t)?, VadParams::default())?,
    };
    let start = Instant::now();
    vad.push_samples(samples)?;
    let (result, session) = vad.finish_keeping_session()?;
    let elapsed = start.elapsed().as_secs_f64();
    // Like the Python side, which times one `get_speech_timestamps` call on a loaded model, the
    // model's teardown is not part of the measurement.
    drop(session);
    Ok((elapsed, result.segments_samples))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = env_or("GAFFER_BENCH_ROUNDS", 15usize).max(1);
    let load_before = load_average();
    let registry = Registry::open(&home_dir("GAFFER_MODELS_DIR", ".cache/gaffer/models-datadir"))?;
    let runtime = Runtime::init(&registry, 0)?;
    let media = home_dir("GAFFER_MEDIA_DIR", ".cache/gaffer/media");
    let tmp = tempfile::tempdir()?;
    let cancel = AtomicBool::new(false);
    let mut wavs = Vec::new();
    let mut audio = Vec::new();
    for clip in CLIPS {
        let wav = tmp.path().join(format!("{clip}.wav"));
        resample(&media.join(clip), &wav)?;
        let mut samples = Vec::new();
        decode_resampled(&wav, SAMPLE_RATE_HZ, &cancel, &mut |s| {
            samples.extend_from_slice(s);
            Ok(())
        })?
        .with_context(|| format!("{} has no audio", wav.display()))?;
        wavs.push(wav);
        audio.push(samples);
    }
    let python = std::env::var("GAFFER_SPEECH_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut reference = match Reference::start(&python, &wavs) {
        Ok((reference, ready)) => {
            println!("python reference: {} (torch threads {})", ready["versions"], ready["torch_threads"]);
            Some(reference)
        }
        Err(e) => {
            println!("python reference skipped: {e:#}");
            None
        }
    };
    println!("rust: ONNX Runtime intra-op threads {}", runtime.intra_threads());

    // Per clip: Rust (as shipped, and with the package's session options) and Python wall
    // seconds per round.
    let mut rust_secs = vec![Vec::new(); CLIPS.len()];
    let mut rust1_secs = vec![Vec::new(); CLIPS.len()];
    let mut python_secs = vec![Vec::new(); CLIPS.len()];
    for i in 0..CLIPS.len() {
        // Warm-up, and both sides must agree on what is speech.
        let (_, rust_segments) = rust_run(&runtime, &registry, None, &audio[i])?;
        let (_, rust1_segments) = rust_run(&runtime, &registry, Some(&PACKAGE_TUNING), &audio[i])?;
        anyhow::ensure!(rust_segments == rust1_segments, "{}: session options change the segments", CLIPS[i]);
        if let Some(reference) = &mut reference {
            let (_, python_segments) = reference.run(i)?;
            anyhow::ensure!(
                rust_segments == python_segments,
                "{}: rust segments {rust_segments:?} differ from python {python_segments:?}",
                CLIPS[i]
            );
        }
        let agreement = if reference.is_some() { "same on both sides" } else { "rust only" };
        println!("{}: {} speech segments ({agreement})", CLIPS[i], rust_segments.len());
    }
    for _ in 0..rounds {
        for i in 0..CLIPS.len() {
            rust_secs[i].push(rust_run(&runtime, &registry, None, &audio[i])?.0);
            rust1_secs[i].push(rust_run(&runtime, &registry, Some(&PACKAGE_TUNING), &audio[i])?.0);
            if let Some(reference) = &mut reference {
                python_secs[i].push(reference.run(i)?.0);
            }
        }
    }
    if let Some(reference) = reference {
        drop(reference.stdin);
        reference.child.wait_with_output()?;
    }

    println!("\nmedian of {rounds} interleaved rounds, audio seconds per wall second");
    println!("rust = SileroVad::new as the agent ships it; rust-1t = same code, the package's session options (1 intra, 1 inter thread)");
    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>9} {:>12} {:>15}",
        "clip", "audio s", "rust", "rust-1t", "python", "rust/python", "rust-1t/python"
    );
    let fmt_ratio = |num: f64, den: f64| if den > 0.0 { format!("{:.2}x", num / den) } else { "-".to_owned() };
    let fmt_rate = |audio_secs: f64, secs: f64| {
        if secs > 0.0 {
            format!("{:.1}", audio_secs / secs)
        } else {
            "skipped".to_owned()
        }
    };
    let mut totals = [0.0f64; 4]; // audio, rust, rust-1t, python seconds
    for (i, clip) in CLIPS.iter().enumerate() {
        let audio_secs = audio[i].len() as f64 / f64::from(SAMPLE_RATE_HZ);
        let (rust, rust1) = (median(&rust_secs[i]), median(&rust1_secs[i]));
        let python = if python_secs[i].is_empty() { 0.0 } else { median(&python_secs[i]) };
        for (t, v) in totals.iter_mut().zip([audio_secs, rust, rust1, python]) {
            *t += v;
        }
        println!(
            "{clip:<18} {audio_secs:>8.2} {:>9.1} {:>9.1} {:>9} {:>12} {:>15}",
            audio_secs / rust,
            audio_secs / rust1,
            fmt_rate(audio_secs, python),
            fmt_ratio(python, rust),
            fmt_ratio(python, rust1)
        );
    }
    let [audio_secs, rust, rust1, python] = totals;
    println!(
        "{:<18} {audio_secs:>8.2} {:>9.1} {:>9.1} {:>9} {:>12} {:>15}",
        "both (sum)",
        audio_secs / rust,
        audio_secs / rust1,
        fmt_rate(audio_secs, python),
        fmt_ratio(python, rust),
        fmt_ratio(python, rust1)
    );
    for (i, clip) in CLIPS.iter().enumerate() {
        let audio_secs = audio[i].len() as f64 / f64::from(SAMPLE_RATE_HZ);
        let all = |v: &[f64]| v.iter().map(|s| format!("{:.0}", audio_secs / s)).collect::<Vec<_>>().join(" ");
        println!(
            "{clip} per round: rust [{}] rust-1t [{}] python [{}]",
            all(&rust_secs[i]),
            all(&rust1_secs[i]),
            all(&python_secs[i])
        );
    }
    println!("load average: before {load_before}, after {}", load_average());
    Ok(())
}
