//! Speech analyzer tests on real audio: parity with the silero-vad package
//! (`tests/fixtures/speech/`, made by `scripts/make-speech-reference.py`) and speech at known
//! times (espeak-ng lines muxed onto a sample clip).
//!
//! Need the provisioned runtime and models (`GAFFER_MODELS_DIR`, default
//! `~/.cache/gaffer/models-datadir`; `scripts/fetch-models.sh`): skipped with a message when
//! absent unless `GAFFER_REQUIRE_MODELS` is set. Need the sample media (`GAFFER_MEDIA_DIR`),
//! `ffmpeg` and `espeak-ng`.

mod common;
use common::media_dir;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use gaffer_agent::models::{manifest, Registry, Runtime};
use gaffer_agent::speech::{self, audio, SileroVad, SpeechError, VadParams};
use gaffer_protocol::messages::Profile;
use serde_json::Value;
use sha2::Digest as _;

/// Parity tolerance with the reference, seconds (the 100 ms).
const PARITY_TOLERANCE_SECS: f64 = 0.100;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/speech").join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("fixture json")
}

/// Registry + CPU runtime, or None (skip) when not provisioned and not required.
fn setup() -> Option<(Registry, Runtime)> {
    common::registry_and_runtime(Profile::Full.required_models())
}

/// Our pipeline on `path`: (segments in samples, audio samples, SHA-256 of our 16 kHz samples).
fn run_vad(path: &Path, registry: &Registry, runtime: &Runtime) -> (Vec<(u64, u64)>, u64, String) {
    let mut vad = SileroVad::new(runtime, registry).expect("vad");
    let mut hasher = sha2::Sha256::new();
    let cancel = AtomicBool::new(false);
    audio::decode_resampled(path, 16_000, &cancel, &mut |s| {
        for x in s {
            hasher.update(x.to_le_bytes());
        }
        vad.push_samples(s)
    })
    .expect("decode")
    .expect("has audio");
    let result = vad.finish().expect("finish");
    (result.segments_samples, result.audio_samples, hex::encode(hasher.finalize()))
}

/// SHA-256 of `ffmpeg -map 0:a:0 -ac 1 -ar 16000 -f f32le` (what the reference was fed).
fn ffmpeg_cli_samples_sha256(path: &Path) -> String {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(path)
        .args(["-map", "0:a:0", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"])
        .output()
        .expect("run ffmpeg");
    assert!(out.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&out.stderr));
    hex::encode(sha2::Sha256::digest(&out.stdout))
}

fn assert_parity(name: &str, path: &Path, registry: &Registry, runtime: &Runtime) {
    let fx = fixture(name);
    let reference: Vec<(u64, u64)> = fx["segments_samples"]
        .as_array()
        .expect("segments")
        .iter()
        .map(|p| (p[0].as_u64().expect("start"), p[1].as_u64().expect("end")))
        .collect();
    assert_eq!(
        ffmpeg_cli_samples_sha256(path),
        fx["samples_sha256"].as_str().expect("sha"),
        "{name}: the input is not the audio the reference was made from (regenerate with scripts/make-speech-reference.py)"
    );
    let (ours, samples, our_sha) = run_vad(path, registry, runtime);
    let ref_samples = fx["samples"].as_u64().expect("samples");
    eprintln!(
        "{name}: ours {} segments over {samples} samples (samples identical to ffmpeg CLI: {}), reference {} over {ref_samples}",
        ours.len(),
        our_sha == fx["samples_sha256"].as_str().unwrap_or_default(),
        reference.len()
    );
    assert!(samples.abs_diff(ref_samples) <= 1600, "{name}: {samples} vs {ref_samples} samples");
    assert_eq!(ours.len(), reference.len(), "{name}: ours {ours:?}\nreference {reference:?}");
    let mut worst = 0.0f64;
    for (o, r) in ours.iter().zip(&reference) {
        let ds = (o.0 as f64 - r.0 as f64).abs() / 16_000.0;
        let de = (o.1 as f64 - r.1 as f64).abs() / 16_000.0;
        worst = worst.max(ds).max(de);
        assert!(ds <= PARITY_TOLERANCE_SECS && de <= PARITY_TOLERANCE_SECS, "{name}: ours {o:?} vs reference {r:?}");
    }
    eprintln!("{name}: worst boundary difference {:.1} ms", worst * 1000.0);
}

#[test]
fn parity_with_silero_vad_package_on_megamind() {
    let Some((registry, runtime)) = setup() else {
        return;
    };
    assert_parity("megamind", &media_dir().join("Megamind.avi"), &registry, &runtime);
}

#[test]
fn parity_with_silero_vad_package_on_bigbuckbunny_51_audio() {
    let Some((registry, runtime)) = setup() else {
        return;
    };
    assert_parity("bigbuckbunny", &media_dir().join("bigbuckbunny.mp4"), &registry, &runtime);
}

/// The known-speech clip, built as `make_espeak_clip` in scripts/make-speech-reference.py does,
/// from the description stored in the fixture. Returns the clip and each line's voiced span in
/// clip seconds (offset + first/last sample above −40 dBFS of the espeak-ng output).
fn make_espeak_clip(dir: &Path) -> (PathBuf, Vec<(f64, f64)>) {
    let fx = fixture("espeak");
    let clip = &fx["clip"];
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-v", "error", "-y", "-i"]).arg(media_dir().join(clip["base"].as_str().expect("base")));
    let lines = clip["lines"].as_array().expect("lines");
    let mut chains = Vec::new();
    let mut spans = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let wav = dir.join(format!("line{i}.wav"));
        let status = Command::new("espeak-ng")
            .args(["-v", clip["voice"].as_str().expect("voice"), "-s", &clip["speed_wpm"].to_string(), "-w"])
            .arg(&wav)
            .arg(line["text"].as_str().expect("text"))
            .status()
            .expect("espeak-ng is needed (apt-get install espeak-ng)");
        assert!(status.success());
        cmd.arg("-i").arg(&wav);
        let offset = line["offset_secs"].as_f64().expect("offset");
        let delay_ms = (offset * 1000.0).round() as i64;
        chains.push(format!("[{}:a]aresample=48000,adelay={delay_ms}:all=1[a{i}]", i + 1));
        // Voiced span of the line.
        let pcm = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(&wav)
            .args(["-ac", "1", "-ar", "16000", "-f", "f32le", "-"])
            .output()
            .expect("ffmpeg");
        let samples: Vec<f32> =
            pcm.stdout.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let loud = |x: &f32| x.abs() > 0.01;
        let first = samples.iter().position(loud).expect("speech in line");
        let last = samples.iter().rposition(loud).expect("speech in line");
        spans.push((offset + first as f64 / 16_000.0, offset + last as f64 / 16_000.0));
    }
    let mix: String = (0..lines.len()).map(|i| format!("[a{i}]")).collect();
    let graph = format!("{};{mix}amix=inputs={}:normalize=0,apad[a]", chains.join(";"), lines.len());
    let out = dir.join("espeak-clip.mkv");
    let status = cmd
        .args([
            "-filter_complex",
            &graph,
            "-map",
            "0:v",
            "-map",
            "[a]",
            "-shortest",
            "-c:v",
            "copy",
            "-c:a",
            "pcm_s16le",
        ])
        .arg(&out)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    (out, spans)
}

#[test]
fn parity_with_silero_vad_package_on_espeak_clip() {
    let Some((registry, runtime)) = setup() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let (clip, _) = make_espeak_clip(tmp.path());
    assert_parity("espeak", &clip, &registry, &runtime);
}

#[test]
fn speech_found_at_known_times_and_not_in_silence() {
    let Some((registry, runtime)) = setup() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let (clip, spans) = make_espeak_clip(tmp.path());
    let analysis = speech::analyze_speech(&clip, &runtime, &registry, &AtomicBool::new(false))
        .expect("analyze")
        .expect("clip has audio");
    let segs: Vec<(f64, f64)> = analysis.segments.iter().map(|s| (s.start_secs, s.end_secs)).collect();
    eprintln!("known spoken spans {spans:?}\ndetected {segs:?}");
    let overlap = |a: (f64, f64), b: (f64, f64)| (a.1.min(b.1) - a.0.max(b.0)).max(0.0);
    let known: f64 = spans.iter().map(|s| s.1 - s.0).sum();
    let covered: f64 = spans.iter().map(|&k| segs.iter().map(|&s| overlap(k, s)).sum::<f64>()).sum();
    assert!(covered >= 0.8 * known, "covered {covered:.2} s of {known:.2} s spoken");
    // No segment in the silent stretches: each overlaps a spoken line, and reaches past it by
    // at most 0.3 s (the reference's 30 ms pad plus its 100 ms minimum silence and window slack).
    for &s in &segs {
        let k =
            spans.iter().copied().find(|&k| overlap(k, s) > 0.0).unwrap_or_else(|| panic!("segment {s:?} in silence"));
        assert!(k.0 - s.0 <= 0.3 && s.1 - k.1 <= 0.3, "segment {s:?} reaches into silence around {k:?}");
    }
    // The digest section.
    assert_eq!(analysis.model.name, "silero-vad");
    assert_eq!(analysis.model.sha256, manifest::item("silero-vad").expect("item").sha256());
    assert!((analysis.audio_secs - 10.0).abs() < 0.2, "audio {} s", analysis.audio_secs);
    let fraction = segs.iter().map(|s| s.1 - s.0).sum::<f64>() / analysis.audio_secs;
    assert!((analysis.speech_fraction - fraction).abs() < 1e-9 && fraction > 0.3 && fraction < 0.8);
}

#[test]
fn file_without_audio_gives_none_and_cancel_stops() {
    let Some((registry, runtime)) = setup() else {
        return;
    };
    let none = speech::analyze_speech(&media_dir().join("bikes.mp4"), &runtime, &registry, &AtomicBool::new(false))
        .expect("analyze");
    assert!(none.is_none());
    let err = speech::analyze_speech(&media_dir().join("Megamind.avi"), &runtime, &registry, &AtomicBool::new(true))
        .expect_err("cancelled");
    assert!(matches!(err, SpeechError::Cancelled), "{err:?}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let junk = tmp.path().join("junk.mp4");
    std::fs::write(&junk, b"not media at all").expect("write");
    let err = speech::analyze_speech(&junk, &runtime, &registry, &AtomicBool::new(false)).expect_err("junk");
    assert!(matches!(err, SpeechError::NotMedia { .. }), "{err:?}");
}

#[test]
fn timestamps_state_machine_matches_reference_rules() {
    // Pure post-processing, no model. Expected values from the package itself:
    // `silero_vad.utils_vad.get_speech_timestamps_from_probs(p, audio_length_samples=len(p)*512)`.
    type Case = (Vec<f32>, Vec<(u64, u64)>);
    let cases: Vec<Case> = vec![
        // A 4-window dip (1536 samples < 100 ms) does not end speech.
        ([vec![0.1; 2], vec![0.9; 10], vec![0.2; 4], vec![0.9; 3], vec![0.1; 10]].concat(), vec![(544, 10208)]),
        // A 5-window dip does; the 3-window burst after it (< 250 ms) is dropped.
        ([vec![0.1; 2], vec![0.9; 10], vec![0.2; 5], vec![0.9; 3], vec![0.1; 10]].concat(), vec![(544, 6624)]),
        // Between the thresholds (0.4) is neither start nor end; speech running to the end of
        // the audio ends there.
        (
            [vec![0.1; 2], vec![0.9; 10], vec![0.2; 5], vec![0.9; 8], vec![0.4; 3], vec![0.1; 2], vec![0.9; 9]]
                .concat(),
            vec![(544, 6624), (8224, 19968)],
        ),
    ];
    for (probs, expected) in cases {
        let mut t = speech::SpeechTimestamps::new(VadParams::default());
        for p in &probs {
            t.push(*p);
        }
        assert_eq!(t.finish(probs.len() as u64 * 512), expected, "probs {probs:?}");
    }
}
