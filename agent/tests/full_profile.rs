//! The `full` profile's one-pass pipeline on real media with the real models: its speech
//! section equals the standalone speech analysis (which is parity-tested against the
//! `silero-vad` package), the frames it analyzes follow the documented sampling, boxes are in
//! source pixels, and cancellation and missing models fail cleanly.
//!
//! Skipped (with a note) when the runtime and models are not provisioned in `$GAFFER_MODELS_DIR`
//! (default `~/.cache/gaffer/models-datadir`), unless `GAFFER_REQUIRE_MODELS` is set.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use gaffer_agent::analysis::full::{FullAnalysis, FullOptions, Models};
use gaffer_agent::analysis::{self, AnalysisError, AnalyzeOptions, Profile};

fn media(name: &str) -> PathBuf {
    common::media_dir().join(name)
}

fn models() -> Option<Models> {
    match Models::open(&common::models_dir(), 0) {
        Ok(m) if m.missing().is_empty() => Some(m),
        other => {
            common::models_missing(
                &other.map(|m| format!("missing {:?}", m.missing())).unwrap_or_else(|e| e.to_string()),
            );
            None
        }
    }
}

const FULL: AnalyzeOptions = AnalyzeOptions {
    profile: Profile::Full,
    content_threshold: analysis::content::CONTENT_THRESHOLD_DEFAULT,
    min_shot_frames: analysis::content::MIN_SHOT_FRAMES_DEFAULT,
    decode_threads: 0,
};

#[test]
fn one_pass_full_profile_on_megamind() {
    let Some(models) = models() else { return };
    let path = media("Megamind.avi");
    let options = FullOptions::default();
    let full = FullAnalysis { models: &models, options: &options };
    let cancel = AtomicBool::new(false);
    let d = analysis::analyze_file_with(&path, &FULL, Some(&full), &mut |_| {}, &cancel).expect("full analysis");
    assert_eq!(d.profile, "full");

    // Speech from the shared decode pass is exactly the standalone analysis of the file.
    let alone = gaffer_agent::speech::analyze_speech(&path, &models.runtime, &models.registry, &cancel)
        .expect("standalone speech")
        .expect("Megamind has audio");
    let speech = d.speech.as_ref().expect("speech section");
    assert_eq!(speech.segments, alone.segments);
    assert_eq!(speech.audio_stream, alone.audio_stream);
    assert!((speech.audio_secs - alone.audio_secs).abs() < 1e-9);
    assert!(speech.speech_fraction > 0.5, "dialogue nearly throughout: {speech:?}");

    // Sampling: moderation on the first frame of every 0.5 s of the 11.26 s (23 bins) plus shot
    // first frames that are not also bin starts; OCR on every shot's first frame plus the first
    // frame of each 4 s bin (0, 4, 8 s) — 4 shots starting at 0.04, 4.13, 6.47, 8.38 s, so 6.
    let shots = &d.shots.shots;
    assert_eq!(shots.len(), 4, "{shots:?}");
    let m = d.moderation.as_ref().expect("moderation section");
    assert!((23..=23 + shots.len() as u64).contains(&m.frames_analyzed), "{}", m.frames_analyzed);
    let t = d.text.as_ref().expect("text section");
    assert_eq!(t.frames_analyzed, 6);
    let param = |name: &str, key: &str| {
        d.analyzers
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.parameters.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(param("moderation.nudenet", "shot_frames").as_deref(), Some("4"));
    assert_eq!(param("moderation.nudenet", "shot_frames_missed").as_deref(), Some("0"));

    // Ranges are ordered, inside the media, and boxes are in source pixels (720 × 528).
    assert!(m.ranges.iter().any(|r| r.label == "FACE_FEMALE"), "{:?}", m.ranges);
    for r in &m.ranges {
        assert!(r.start_secs <= r.peak_time_secs && r.peak_time_secs <= r.end_secs && r.end_secs < 11.3, "{r:?}");
        let b = r.peak_box;
        assert!(b.x >= 0.0 && b.y >= 0.0 && b.x + b.width <= 720.5 && b.y + b.height <= 528.5, "{r:?}");
        assert!(r.peak_score > nudenet_threshold());
    }
    assert_eq!(m.model.name, "nudenet-320n");
    assert_eq!(speech.model.name, "silero-vad");
}

fn nudenet_threshold() -> f32 {
    gaffer_agent::vision::nudenet::SCORE_THRESHOLD
}

#[test]
fn full_without_models_is_a_clear_error() {
    let cancel = AtomicBool::new(false);
    let err = analysis::analyze_file_with(&media("Megamind.avi"), &FULL, None, &mut |_| {}, &cancel)
        .expect_err("full needs models");
    assert!(matches!(err, AnalysisError::ModelsUnavailable(_)), "{err}");
    assert!(err.remedy().contains("models fetch"));
}

#[test]
fn cancelling_a_full_analysis_stops_it() {
    let Some(models) = models() else { return };
    let options = FullOptions::default();
    let full = FullAnalysis { models: &models, options: &options };
    let cancel = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let result = analysis::analyze_file_with(
        &media("bbb-720p-x10.mp4"),
        &FULL,
        Some(&full),
        &mut |p| {
            if p.fraction > 0.1 {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(AnalysisError::Cancelled)), "{result:?}");
    assert!(started.elapsed().as_secs() < 30, "stops promptly");
}
