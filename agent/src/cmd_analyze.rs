//! `gaffer-agent analyze FILE [--profile shots|full] [--data-dir DIR] [--json]`: run the local
//! analysis pipeline on one file and print the digest, without a control plane.
//!
//! `--profile full` also runs moderation, on-screen text and speech with the ONNX Runtime and
//! models provisioned in `--data-dir` (or `$GAFFER_MODELS_DIR`) by `gaffer-agent models fetch`.
//!
//! stdout carries only the result: the digest as pretty JSON with `--json`, otherwise a human
//! summary (container, duration, resolution, frame rate, shots with HH:MM:SS.mmm timecodes, and
//! for `full` the moderation ranges, text readings and speech segments).
//! The progress bar goes to stderr, and only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use gaffer_agent::analysis::full::{FullAnalysis, FullOptions, Models};
use gaffer_agent::analysis::{self, AnalyzeOptions, Profile, ProgressUpdate};
use gaffer_protocol::digest::{Digest, StreamKind};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Arguments of `gaffer-agent analyze`.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// Media file to analyze.
    pub file: PathBuf,
    /// Analysis profile to run.
    #[arg(long, default_value = "shots")]
    pub profile: Profile,
    /// Print the digest as pretty JSON on stdout (and nothing else on stdout).
    #[arg(long)]
    pub json: bool,
    /// Cut threshold, HSV delta units 0–255 (PySceneDetect detect-content default: 27).
    #[arg(long, default_value_t = analysis::content::CONTENT_THRESHOLD_DEFAULT)]
    pub threshold: f64,
    /// Minimum shot length, frames.
    #[arg(long, default_value_t = analysis::content::MIN_SHOT_FRAMES_DEFAULT)]
    pub min_shot_frames: u32,
    /// Agent data directory holding the ONNX Runtime and models (`gaffer-agent models fetch
    /// --data-dir DIR`); needed by `--profile full`.
    #[arg(long, env = "GAFFER_MODELS_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `full`: moderation samples per second of media (each shot's first frame comes on top).
    #[arg(long, default_value_t = analysis::full::MODERATION_SAMPLE_FPS_DEFAULT)]
    pub moderation_fps: f64,
    /// `full`: OCR samples per second of media (each shot's first frame comes on top).
    #[arg(long, default_value_t = analysis::full::OCR_SAMPLE_FPS_DEFAULT)]
    pub ocr_fps: f64,
}

/// Formats seconds as `HH:MM:SS.mmm` (negative or non-finite values print as zero).
pub fn timecode(secs: f64) -> String {
    let ms_total = if secs.is_finite() && secs > 0.0 { (secs * 1000.0).round() as u64 } else { 0 };
    let (h, rest) = (ms_total / 3_600_000, ms_total % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

/// Runs the command.
///
/// # Errors
/// The analysis error, with a sentence on what to do next; or a failure to write stdout.
pub fn run(args: AnalyzeArgs) -> anyhow::Result<()> {
    let opts = AnalyzeOptions {
        profile: args.profile,
        content_threshold: args.threshold,
        min_shot_frames: args.min_shot_frames,
        decode_threads: 0,
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut on_progress = |p: ProgressUpdate| {
        bar.set_position((f64::from(p.fraction) * 1000.0) as u64);
        bar.set_message(format!("{} frames", p.frames_decoded));
    };
    let models = match args.profile {
        Profile::Shots => None,
        Profile::Full => Some(open_models(args.data_dir.as_deref())?),
    };
    let full_opts = FullOptions {
        moderation_sample_fps: args.moderation_fps,
        ocr_sample_fps: args.ocr_fps,
        ..FullOptions::default()
    };
    let full = models.as_ref().map(|models| FullAnalysis { models, options: &full_opts });
    let cancel = AtomicBool::new(false);
    let result = analysis::analyze_file_with(&args.file, &opts, full.as_ref(), &mut on_progress, &cancel);
    bar.finish_and_clear();
    let digest = match result {
        Ok(d) => d,
        Err(e) => {
            let remedy = e.remedy();
            anyhow::bail!("cannot analyze {}: {e}\n{remedy}", args.file.display());
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &digest).context("writing the digest to stdout")?;
        writeln!(out).context("writing to stdout")?;
    } else {
        write_summary(&mut out, &digest).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// Opens the runtime and models of `data_dir` for `--profile full`, with what to run when they
/// are missing.
fn open_models(data_dir: Option<&std::path::Path>) -> anyhow::Result<Models> {
    let Some(dir) = data_dir else {
        anyhow::bail!(
            "--profile full needs the ONNX Runtime and models: pass --data-dir DIR (or set GAFFER_MODELS_DIR) \
             after `gaffer-agent models fetch --data-dir DIR`"
        );
    };
    // GPUs NVML sees (0 without an NVIDIA driver): CUDA is chosen when there are any.
    let gpus = nvml_wrapper::Nvml::init().ok().and_then(|n| n.device_count().ok()).unwrap_or(0) as usize;
    let models = Models::open(dir, gpus).with_context(|| format!("loading the models of {}", dir.display()))?;
    let missing = models.missing();
    if !missing.is_empty() {
        anyhow::bail!(
            "models missing or unverified in {}: {}; run `gaffer-agent models fetch --data-dir {}`",
            dir.display(),
            missing.join(", "),
            dir.display()
        );
    }
    Ok(models)
}

fn write_summary(out: &mut impl Write, d: &Digest) -> std::io::Result<()> {
    let t = &d.technical;
    let video = t.primary_video_stream.and_then(|i| t.streams.get(i as usize));
    writeln!(out, "file:        {}", d.source.path)?;
    writeln!(out, "container:   {} ({})", t.container, t.container_long_name)?;
    match t.duration_secs {
        Some(s) => writeln!(out, "duration:    {} ({s:.3} s)", timecode(s))?,
        None => writeln!(out, "duration:    unknown")?,
    }
    if let Some(v) = video {
        let res = match (v.width, v.height) {
            (Some(w), Some(h)) => format!("{w}x{h}"),
            _ => "unknown".to_string(),
        };
        let fps = v.frame_rate_fps.map_or_else(|| "unknown".to_string(), |f| format!("{f:.3}"));
        writeln!(
            out,
            "video:       stream {} {} {res} {} @ {fps} fps",
            v.index,
            v.codec,
            v.pixel_format.as_deref().unwrap_or("?")
        )?;
    }
    for s in t.streams.iter().filter(|s| s.kind == StreamKind::Audio) {
        writeln!(
            out,
            "audio:       stream {} {} {} Hz, {} ch{}",
            s.index,
            s.codec,
            s.sample_rate_hz.map_or_else(|| "?".into(), |r| r.to_string()),
            s.channels.map_or_else(|| "?".into(), |c| c.to_string()),
            s.language.as_deref().map(|l| format!(" [{l}]")).unwrap_or_default()
        )?;
    }
    let sa = &d.shots;
    writeln!(out, "frames:      {} decoded, {} corrupt", sa.frames_decoded, sa.frames_corrupt)?;
    writeln!(
        out,
        "shots:       {} ({} cuts; detector {}, threshold {}, min {} frames), analyzed in {:.2} s",
        sa.shots.len(),
        sa.cuts.len(),
        sa.detector,
        sa.threshold,
        sa.min_shot_frames,
        d.analysis_secs
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:>5}  {:<12}  {:<12}  {:>8}  {:>8}  {:<12}  {:<16}",
        "shot", "start", "end", "frames", "cut", "keyframe", "phash"
    )?;
    for (i, s) in sa.shots.iter().enumerate() {
        let cut_score = if i == 0 {
            "-".to_string()
        } else {
            sa.cuts.get(i - 1).map_or_else(|| "-".to_string(), |c| format!("{:.1}", c.score))
        };
        writeln!(
            out,
            "{:>5}  {:<12}  {:<12}  {:>8}  {:>8}  {:<12}  {:<16}",
            s.index,
            timecode(s.start_secs),
            timecode(s.end_secs),
            s.end_frame - s.start_frame,
            cut_score,
            timecode(s.keyframe.time_secs),
            s.keyframe.phash
        )?;
    }
    write_full_sections(out, d)
}

fn write_full_sections(out: &mut impl Write, d: &Digest) -> std::io::Result<()> {
    if let Some(m) = &d.moderation {
        writeln!(out)?;
        writeln!(
            out,
            "moderation:  {} ranges on {} frames ({} {}, {} samples/s + shot first frames, score > {})",
            m.ranges.len(),
            m.frames_analyzed,
            m.model.name,
            m.model.version,
            m.sample_fps,
            m.score_threshold
        )?;
        for r in &m.ranges {
            writeln!(
                out,
                "  {:<12}  {:<12}  {:<24}  peak {:.2} at {}  ({} frames)",
                timecode(r.start_secs),
                timecode(r.end_secs),
                r.label,
                r.peak_score,
                timecode(r.peak_time_secs),
                r.frames
            )?;
        }
    }
    if let Some(t) = &d.text {
        writeln!(out)?;
        writeln!(
            out,
            "text:        {} readings on {} frames ({} + {})",
            t.readings.len(),
            t.frames_analyzed,
            t.detector.name,
            t.recognizer.name
        )?;
        for r in &t.readings {
            writeln!(
                out,
                "  {:<12}  {:<12}  {:.2}  at ({:.0}, {:.0}) {:.0}x{:.0}  {:?}",
                timecode(r.start_secs),
                timecode(r.end_secs),
                r.confidence,
                r.box_px.x,
                r.box_px.y,
                r.box_px.width,
                r.box_px.height,
                r.text
            )?;
        }
    }
    if d.profile == Profile::Full.as_str() {
        writeln!(out)?;
        match &d.speech {
            None => writeln!(out, "speech:      no audio stream")?,
            Some(s) => {
                writeln!(
                    out,
                    "speech:      {} segments, {:.1} % of {:.2} s of audio (stream {}, {} {})",
                    s.segments.len(),
                    s.speech_fraction * 100.0,
                    s.audio_secs,
                    s.audio_stream,
                    s.model.name,
                    s.model.version
                )?;
                for seg in &s.segments {
                    writeln!(out, "  {:<12}  {:<12}", timecode(seg.start_secs), timecode(seg.end_secs))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::timecode;

    #[test]
    fn timecodes() {
        assert_eq!(timecode(0.0), "00:00:00.000");
        assert_eq!(timecode(0.68), "00:00:00.680");
        assert_eq!(timecode(3723.0456), "01:02:03.046");
        assert_eq!(timecode(-1.0), "00:00:00.000");
        assert_eq!(timecode(f64::NAN), "00:00:00.000");
    }
}
