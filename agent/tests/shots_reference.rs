//! The `shots` analysis on real media with the system FFmpeg.
//!
//! * accuracy against PySceneDetect 0.7.2 (`tests/fixtures/shots/`): F1 ≥ 0.95, cuts matched
//!   one-to-one within ±2 frames, same frame count;
//! * technical metadata of the other samples agrees with `ffprobe`;
//! * truncated and non-video files give readable errors (or a partial digest), never a panic;
//! * cancellation and progress callbacks behave as documented.
//!
//! Sample media: `$GAFFER_MEDIA_DIR`, default `~/.cache/gaffer/media` (`scripts/setup.sh`).

mod common;
use common::media_dir;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaffer_agent::analysis::{analyze_file, AnalysisError, AnalyzeOptions, ProgressUpdate};
use gaffer_protocol::digest::{Digest, StreamKind};

/// Frames a detected cut may be off from the reference and still count as found.
const TOLERANCE_FRAMES: u64 = 2;
/// Frames PySceneDetect (OpenCV) decodes from test.mp4; ours must decode the same.
const TEST_MP4_FRAMES: u64 = 5301;

fn media(name: &str) -> PathBuf {
    let p = media_dir().join(name);
    assert!(p.is_file(), "{} missing: run scripts/setup.sh (or set GAFFER_MEDIA_DIR)", p.display());
    p
}

fn analyze(path: &Path) -> Result<Digest, AnalysisError> {
    let cancel = AtomicBool::new(false);
    analyze_file(path, &AnalyzeOptions::default(), &mut |_| {}, &cancel)
}

/// 0-based cut frames from PySceneDetect's scene list CSV: every scene but the first starts with
/// a cut at (1-based `Start Frame`) − 1. Also returns the total frame count (last `End Frame`).
fn reference_cuts() -> (Vec<u64>, u64) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/shots/test.mp4.scenedetect-0.7.2.csv");
    let text = std::fs::read_to_string(&path).expect("reference CSV (scripts/make-reference-cuts.sh)");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header row").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name} column"));
    let (start_col, end_col) = (col("Start Frame"), col("End Frame"));
    let rows: Vec<Vec<&str>> = lines.filter(|l| !l.is_empty()).map(|l| l.split(',').collect()).collect();
    let num = |row: &Vec<&str>, c: usize| -> u64 { row[c].parse().expect("frame number") };
    let cuts = rows.iter().skip(1).map(|r| num(r, start_col) - 1).collect();
    let frames = rows.last().map(|r| num(r, end_col)).expect("at least one scene");
    (cuts, frames)
}

/// One-to-one matching of two sorted cut lists within `tol` frames; returns matched pairs.
/// Greedy in order is optimal for this interval matching.
fn match_cuts(detected: &[u64], reference: &[u64], tol: u64) -> usize {
    let (mut i, mut j, mut matched) = (0, 0, 0);
    while i < detected.len() && j < reference.len() {
        let (d, r) = (detected[i], reference[j]);
        if d.abs_diff(r) <= tol {
            matched += 1;
            i += 1;
            j += 1;
        } else if d < r {
            i += 1;
        } else {
            j += 1;
        }
    }
    matched
}

#[test]
fn matching_is_one_to_one() {
    assert_eq!(match_cuts(&[10, 11, 12], &[11], 2), 1);
    assert_eq!(match_cuts(&[10, 20], &[13, 21], 2), 1);
    assert_eq!(match_cuts(&[], &[1], 2), 0);
}

/// The `threads` parameter the digest reports for the decoder.
fn decode_threads(d: &Digest) -> String {
    let decode = d.analyzers.iter().find(|a| a.name == "decode.ffmpeg").expect("decode.ffmpeg analyzer");
    decode.parameters.iter().find(|(k, _)| k == "threads").map(|(_, v)| v.clone()).expect("threads parameter")
}

/// Decoder threading is a speed choice only: frame-threaded and single-threaded decoding give the
/// same frames, cuts, scores and keyframes.
#[test]
fn decoder_threading_does_not_change_the_digest() {
    let path = media("bikes.mp4");
    let cancel = AtomicBool::new(false);
    let run = |threads: usize| {
        let opts = AnalyzeOptions { decode_threads: threads, ..AnalyzeOptions::default() };
        analyze_file(&path, &opts, &mut |_| {}, &cancel).expect("bikes.mp4 analyzes")
    };
    let auto = run(0);
    let single = run(1);
    // 640x272 is above the frame-threading threshold: auto uses more than one thread.
    assert_ne!(decode_threads(&auto), "1");
    assert_eq!(decode_threads(&single), "1");
    assert_eq!(auto.shots.frames_decoded, single.shots.frames_decoded);
    assert!(!auto.shots.cuts.is_empty(), "bikes.mp4 has cuts");
    assert_eq!(auto.shots.cuts, single.shots.cuts);
    assert_eq!(auto.shots.shots, single.shots.shots);
}

#[test]
fn test_mp4_cuts_match_pyscenedetect() {
    let (reference, reference_frames) = reference_cuts();
    assert_eq!(reference.len(), 123, "fixture changed? regenerate with scripts/make-reference-cuts.sh");
    let digest = analyze(&media("test.mp4")).expect("test.mp4 analyzes");
    let shots = &digest.shots;
    let detected: Vec<u64> = shots.cuts.iter().map(|c| c.frame).collect();

    let matched = match_cuts(&detected, &reference, TOLERANCE_FRAMES) as f64;
    let precision = if detected.is_empty() { 0.0 } else { matched / detected.len() as f64 };
    let recall = matched / reference.len() as f64;
    let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    println!(
        "test.mp4 vs PySceneDetect 0.7.2: detected {} cuts, reference {}, matched {matched} (±{TOLERANCE_FRAMES} frames): \
         precision {precision:.4} recall {recall:.4} F1 {f1:.4}",
        detected.len(),
        reference.len()
    );
    let exact = match_cuts(&detected, &reference, 0);
    println!("exact-frame matches: {exact}");
    assert!(f1 >= 0.95, "F1 {f1:.4} < 0.95");

    // Same decode as OpenCV: frame count and order.
    assert_eq!(reference_frames, TEST_MP4_FRAMES);
    assert_eq!(shots.frames_decoded, TEST_MP4_FRAMES);
    assert_eq!(shots.frames_corrupt, 0);

    // Shots tile the video, cut times follow the 25 fps PTS, one keyframe inside each shot.
    assert_eq!(shots.shots.len(), shots.cuts.len() + 1);
    assert_eq!(shots.shots.first().map(|s| s.start_frame), Some(0));
    assert_eq!(shots.shots.last().map(|s| s.end_frame), Some(TEST_MP4_FRAMES));
    for pair in shots.shots.windows(2) {
        assert_eq!(pair[0].end_frame, pair[1].start_frame);
        assert_eq!(pair[0].end_secs, pair[1].start_secs);
    }
    for (shot, cut) in shots.shots.iter().skip(1).zip(&shots.cuts) {
        assert_eq!(shot.start_frame, cut.frame);
        assert!((cut.time_secs - cut.frame as f64 / 25.0).abs() < 1e-6, "{cut:?}");
        assert!(cut.score >= 27.0, "{cut:?}");
    }
    for s in &shots.shots {
        assert!(s.end_frame - s.start_frame >= 1);
        let k = &s.keyframe;
        assert!((s.start_frame..s.end_frame).contains(&k.frame), "{s:?}");
        let mid = s.start_frame + (s.end_frame - s.start_frame) / 2;
        assert_eq!(k.frame, mid, "keyframe is the middle frame: {s:?}");
        assert_eq!(k.phash.len(), 16);
        assert!(k.phash.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
    // Different shots look different: most keyframe hashes are distinct.
    let mut hashes: Vec<&str> = shots.shots.iter().map(|s| s.keyframe.phash.as_str()).collect();
    hashes.sort_unstable();
    hashes.dedup();
    assert!(hashes.len() * 10 >= shots.shots.len() * 9, "{} distinct of {}", hashes.len(), shots.shots.len());

    // The digest names its analyzers and their parameters and survives a JSON round trip.
    let names: Vec<&str> = digest.analyzers.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["decode.ffmpeg", "shots.content", "keyframes.phash"]);
    // 160x90 is below the frame-threading threshold: auto decodes it with one thread.
    assert_eq!(decode_threads(&digest), "1");
    let json = serde_json::to_string(&digest).expect("serialize");
    let back: Digest = serde_json::from_str(&json).expect("deserialize");
    assert_eq!((&back.source, &back.technical.container), (&digest.source, &digest.technical.container));
    assert_eq!(back.shots.shots.len(), digest.shots.shots.len());
    let frames = |d: &Digest| d.shots.cuts.iter().map(|c| c.frame).collect::<Vec<_>>();
    assert_eq!(frames(&back), frames(&digest));
}

/// ffprobe's view of a file: (format duration s, width, height, codec name).
fn ffprobe(path: &Path) -> (f64, u32, u32, String) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "format=duration:stream=width,height,codec_name", "-of", "default=nw=1"])
        .arg(path)
        .output()
        .expect("ffprobe runs (apt install ffmpeg)");
    assert!(out.status.success(), "ffprobe failed on {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("ffprobe printed no {k}: {text}"))
    };
    (
        field("duration").parse().expect("duration"),
        field("width").parse().expect("width"),
        field("height").parse().expect("height"),
        field("codec_name"),
    )
}

#[test]
fn other_samples_have_sane_technical_metadata() {
    for (name, container, frames) in [
        ("bikes.mp4", "mov,mp4,m4a,3gp,3g2,mj2", 250),
        ("bigbuckbunny.mp4", "mov,mp4,m4a,3gp,3g2,mj2", 132),
        ("Megamind.avi", "avi", 270),
    ] {
        let path = media(name);
        let d = analyze(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (duration, width, height, codec) = ffprobe(&path);
        let t = &d.technical;
        println!(
            "{name}: {} {:?} s, {} streams, {} frames, {} shots",
            t.container,
            t.duration_secs,
            t.streams.len(),
            d.shots.frames_decoded,
            d.shot_count()
        );
        assert_eq!(t.container, container, "{name}");
        let ours = t.duration_secs.expect("duration known");
        assert!((ours - duration).abs() <= 0.1, "{name}: duration {ours} vs ffprobe {duration}");
        let v = t
            .primary_video_stream
            .and_then(|i| t.streams.get(i as usize))
            .unwrap_or_else(|| panic!("{name}: no primary video stream"));
        assert_eq!(v.kind, StreamKind::Video);
        assert_eq!((v.width, v.height), (Some(width), Some(height)), "{name}");
        assert_eq!(v.codec, codec, "{name}");
        assert_eq!(v.pixel_format.as_deref(), Some("yuv420p"), "{name}");
        let fps = v.frame_rate_fps.expect("frame rate");
        assert!((23.0..=30.0).contains(&fps), "{name}: {fps} fps");
        assert_eq!(d.shots.frames_decoded, frames, "{name}");
        assert!(d.shot_count() >= 1);
        // The last shot ends at the end of the stream (within a frame of the container duration).
        let end = d.shots.shots.last().map(|s| s.end_secs).unwrap_or_default();
        assert!((end - duration).abs() <= 0.1 + 1.0 / fps, "{name}: last shot ends at {end}, duration {duration}");
        for s in t.streams.iter().filter(|s| s.kind == StreamKind::Audio) {
            assert!(s.sample_rate_hz.is_some_and(|r| r >= 8000), "{name}: {s:?}");
            assert!(s.channels.is_some_and(|c| c >= 1), "{name}: {s:?}");
        }
    }
}

fn write_prefix(src: &Path, dst: &Path, fraction: f64) {
    let bytes = std::fs::read(src).expect("read sample");
    let len = (bytes.len() as f64 * fraction) as usize;
    std::fs::write(dst, &bytes[..len]).expect("write truncated copy");
}

#[test]
fn truncated_mp4_with_index_at_end_fails_readably() {
    // test.mp4 keeps its index (moov) after the media data, so its first 30 % has no index.
    let dir = tempfile::tempdir().expect("tempdir");
    let cut = dir.path().join("test-30pct.mp4");
    write_prefix(&media("test.mp4"), &cut, 0.3);
    match analyze(&cut) {
        Err(e @ AnalysisError::NotMedia { .. }) => {
            let text = e.to_string();
            println!("truncated test.mp4: {text} / {}", e.remedy());
            assert!(text.starts_with("not a media file: "), "{text}");
            assert!(e.remedy().contains("incomplete"));
        }
        other => panic!("expected NotMedia, got {other:?}"),
    }
}

#[test]
fn truncated_faststart_mp4_gives_partial_digest() {
    // With the index first (faststart), a 30 % prefix holds about 30 % of the frames: the digest
    // covers what decoded.
    let dir = tempfile::tempdir().expect("tempdir");
    let faststart = dir.path().join("test-faststart.mp4");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(media("test.mp4"))
        .args(["-c", "copy", "-movflags", "+faststart", "-y"])
        .arg(&faststart)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success());
    let cut = dir.path().join("test-faststart-30pct.mp4");
    write_prefix(&faststart, &cut, 0.3);
    let d = analyze(&cut).expect("partial digest of a truncated file");
    let n = d.shots.frames_decoded;
    println!("truncated faststart test.mp4: {n} of {TEST_MP4_FRAMES} frames, {} shots", d.shot_count());
    assert!(n > TEST_MP4_FRAMES / 5 && n < TEST_MP4_FRAMES / 2, "{n} frames");
    assert!(d.shot_count() > 10);
    assert_eq!(d.shots.shots.last().map(|s| s.end_frame), Some(n));

    // A 5 % prefix (the index plus ~1 % of the media) is too little to be useful: a clear error instead of a near-empty digest.
    let tiny = dir.path().join("test-faststart-5pct.mp4");
    write_prefix(&faststart, &tiny, 0.05);
    match analyze(&tiny) {
        Err(e @ AnalysisError::DecodeFailed { .. }) => {
            println!("5 % prefix: {e}");
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        other => panic!("expected DecodeFailed, got {other:?}"),
    }
}

#[test]
fn non_video_files_fail_readably() {
    let dir = tempfile::tempdir().expect("tempdir");

    let text = dir.path().join("notes.mp4");
    std::fs::write(&text, "these are production notes, not a video\n".repeat(100)).expect("write");
    match analyze(&text) {
        Err(e @ AnalysisError::NotMedia { .. }) => {
            println!("text file: {e}");
            assert!(e.to_string().starts_with("not a media file: "));
        }
        other => panic!("expected NotMedia, got {other:?}"),
    }

    let wav = dir.path().join("tone.wav");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-y"])
        .arg(&wav)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success());
    match analyze(&wav) {
        Err(e @ AnalysisError::NoVideoStream { .. }) => {
            println!("wav: {e}");
            assert!(e.to_string().contains("1 audio stream"), "{e}");
        }
        other => panic!("expected NoVideoStream, got {other:?}"),
    }

    let empty = dir.path().join("empty.mov");
    std::fs::write(&empty, b"").expect("write");
    assert!(matches!(analyze(&empty), Err(AnalysisError::NotMedia { .. })));

    let missing = dir.path().join("missing.mp4");
    assert!(matches!(analyze(&missing), Err(AnalysisError::NotFound { .. })));
    assert!(matches!(analyze(dir.path()), Err(AnalysisError::Unreadable { .. })));
}

#[test]
fn cancellation_stops_promptly() {
    let path = media("bbb-720p-x10.mp4");
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    let worker = std::thread::spawn(move || {
        let started = Instant::now();
        let mut frames_seen = 0;
        let r = analyze_file(&path, &AnalyzeOptions::default(), &mut |p| frames_seen = p.frames_decoded, &flag);
        (r, started.elapsed(), frames_seen)
    });
    std::thread::sleep(Duration::from_millis(600));
    let cancelled_at = Instant::now();
    cancel.store(true, Ordering::Relaxed);
    let (result, _, frames_seen) = worker.join().expect("analysis thread does not panic");
    let stop_latency = cancelled_at.elapsed();
    println!("cancelled after {frames_seen} frames, stopped {stop_latency:?} after the flag was set");
    assert!(matches!(result, Err(AnalysisError::Cancelled)), "{result:?}");
    // A correctness bound, not a speed target: the flag is checked per frame, so the analysis
    // stops within a few frames' work even on a starved machine (a decode of the whole file takes
    // tens of seconds here), never by running to the end.
    assert!(stop_latency < Duration::from_secs(5), "took {stop_latency:?} to stop");

    // Already-cancelled: returns at once without decoding.
    let set = AtomicBool::new(true);
    let r = analyze_file(&media("test.mp4"), &AnalyzeOptions::default(), &mut |_| {}, &set);
    assert!(matches!(r, Err(AnalysisError::Cancelled)));
}

#[test]
fn progress_is_throttled_and_monotonic() {
    let cancel = AtomicBool::new(false);
    let mut updates: Vec<ProgressUpdate> = Vec::new();
    let started = Instant::now();
    let d = analyze_file(&media("bbb-720p-x10.mp4"), &AnalyzeOptions::default(), &mut |p| updates.push(p), &cancel)
        .expect("analysis");
    let secs = started.elapsed().as_secs_f64();
    println!("{} progress updates in {secs:.2} s", updates.len());
    assert!(!updates.is_empty(), "a {secs:.1} s analysis reports progress");
    assert!(updates.len() as f64 <= secs * 4.0 + 1.0, "{} updates in {secs:.2} s", updates.len());
    for w in updates.windows(2) {
        assert!(w[0].fraction <= w[1].fraction && w[0].frames_decoded < w[1].frames_decoded, "{w:?}");
    }
    assert!(updates.iter().all(|p| (0.0..=1.0).contains(&p.fraction)));
    assert!(updates.iter().all(|p| p.frames_decoded <= d.shots.frames_decoded));
    assert_eq!(d.shots.frames_decoded, 1320);
}

#[test]
fn options_out_of_range_are_refused() {
    let cancel = AtomicBool::new(false);
    let opts = AnalyzeOptions { content_threshold: f64::NAN, ..AnalyzeOptions::default() };
    let r = analyze_file(&media("test.mp4"), &opts, &mut |_| {}, &cancel);
    assert!(matches!(r, Err(AnalysisError::InvalidOptions(_))), "{r:?}");
    let opts = AnalyzeOptions { min_shot_frames: 1_000_000, ..AnalyzeOptions::default() };
    let r = analyze_file(&media("test.mp4"), &opts, &mut |_| {}, &cancel);
    assert!(matches!(r, Err(AnalysisError::InvalidOptions(_))), "{r:?}");
}
