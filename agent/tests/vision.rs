//! Vision analyzer tests on real frames: parity with the `nudenet` and `rapidocr-onnxruntime`
//! Python packages (`tests/fixtures/vision/`, made by `scripts/make-vision-reference.py`), and
//! moderation ranges over a real clip.
//!
//! Need the provisioned runtime and models (`GAFFER_MODELS_DIR`, default
//! `~/.cache/gaffer/models-datadir`; `scripts/fetch-models.sh`): skipped with a message when
//! absent unless `GAFFER_REQUIRE_MODELS` is set. Need the sample media (`GAFFER_MEDIA_DIR`),
//! `ffmpeg` and the DejaVu fonts (`fonts-dejavu-core`).

mod common;
use common::media_dir;

use std::path::Path;
use std::process::Command;

use gaffer_agent::models::{Registry, Runtime};
use gaffer_agent::vision::{self, ModerationAggregator, NudeNet, Ocr, RgbFrame};
use gaffer_protocol::digest::BoxPx;
use serde_json::Value;
use sha2::Digest as _;

/// The NudeNet parity: same labels, boxes with IoU ≥ 0.9.
const NUDENET_IOU_MIN: f32 = 0.9;
/// The RapidOCR parity: the same string on ≥ 95% of the reference's text boxes.
const OCR_SAME_TEXT_FRACTION_MIN: f64 = 0.95;
/// A reference text box is "the same box" as ours when their bounds overlap this much.
const OCR_BOX_IOU_MIN: f32 = 0.5;

const VISION_MODELS: [&str; 4] = ["nudenet-320n", "ppocrv4-det", "ppocrv4-rec", "ppocr-mobile-v2-cls"];

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision").join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("fixture json")
}

/// Registry + CPU runtime, or None (skip) when not provisioned and not required.
fn setup() -> Option<(Registry, Runtime)> {
    common::registry_and_runtime(&VISION_MODELS)
}

/// A decoded fixture frame: RGB24 pixels and size.
struct Frame {
    id: String,
    rgb: Vec<u8>,
    width: u32,
    height: u32,
}

impl Frame {
    fn view(&self) -> RgbFrame<'_> {
        RgbFrame { data: &self.rgb, width: self.width, height: self.height }
    }
}

/// Rebuilds a fixture frame with the same FFmpeg command as the script, decodes the PNG and
/// checks its pixels hash to what the reference saw.
fn make_frame(spec: &Value, dir: &Path) -> Frame {
    let id = spec["id"].as_str().expect("id").to_owned();
    let png = dir.join(format!("{id}.png"));
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-v", "error", "-y", "-ss", spec["ss"].as_str().expect("ss"), "-i"])
        .arg(media_dir().join(spec["source"].as_str().expect("source")));
    for a in spec["ffmpeg_args"].as_array().expect("ffmpeg_args") {
        cmd.arg(a.as_str().expect("arg"));
    }
    let status = cmd.arg(&png).status().expect("run ffmpeg");
    assert!(status.success(), "ffmpeg failed for {id}");
    let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display())).to_rgb8();
    let (width, height) = img.dimensions();
    let rgb = img.into_raw();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&rgb)),
        spec["rgb_sha256"].as_str().expect("rgb_sha256"),
        "{id}: the rebuilt frame's pixels differ from the reference's (FFmpeg or fonts differ?)"
    );
    Frame { id, rgb, width, height }
}

fn json_box(v: &Value) -> BoxPx {
    let n = |i: usize| v[i].as_f64().expect("box number") as f32;
    BoxPx { x: n(0), y: n(1), width: n(2), height: n(3) }
}

#[test]
fn nudenet_matches_the_nudenet_package() {
    let Some((registry, runtime)) = setup() else { return };
    let fx = fixture("nudenet");
    let tmp = tempfile::tempdir().expect("tempdir");
    let specs = fx["frames"].as_array().expect("frames");
    let frames: Vec<Frame> = specs.iter().map(|s| make_frame(s, tmp.path())).collect();
    let mut detector = NudeNet::new(&runtime, &registry).expect("nudenet");
    let views: Vec<RgbFrame<'_>> = frames.iter().map(Frame::view).collect();
    let ours = detector.detect_batch(&views).expect("detect");
    assert_eq!(ours.len(), frames.len());

    let mut total = 0;
    let mut failures = Vec::new();
    for ((spec, frame), dets) in specs.iter().zip(&frames).zip(&ours) {
        let refs = spec["detections"].as_array().expect("detections");
        total += refs.len();
        let mut used = vec![false; dets.len()];
        for r in refs {
            let label = r["class"].as_str().expect("class");
            let rbox = json_box(&r["box"]);
            // Reference boxes are truncated to integers; compare ours truncated the same way.
            let best = dets
                .iter()
                .enumerate()
                .filter(|(k, d)| !used[*k] && d.label == label)
                .map(|(k, d)| {
                    let b = d.box_px;
                    let t = BoxPx { x: b.x.trunc(), y: b.y.trunc(), width: b.width.trunc(), height: b.height.trunc() };
                    (k, vision::iou(&t, &rbox))
                })
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((k, iou)) if iou >= NUDENET_IOU_MIN => used[k] = true,
                other => {
                    failures.push(format!("{}: reference {label} {rbox:?} has no match (best {other:?})", frame.id))
                }
            }
        }
        for (k, d) in dets.iter().enumerate() {
            if !used[k] {
                failures.push(format!("{}: extra detection {} {:.3} {:?}", frame.id, d.label, d.score, d.box_px));
            }
        }
        eprintln!("{}: {:?}", frame.id, dets.iter().map(|d| (d.label, d.score)).collect::<Vec<_>>());
    }
    assert!(total >= 10, "the fixture frames must produce detections (got {total})");
    assert!(
        ours.iter().flatten().any(|d| d.label == "FACE_FEMALE"),
        "Megamind's frames show a woman's face: FACE_FEMALE expected"
    );
    assert!(failures.is_empty(), "NudeNet parity failures:\n{}", failures.join("\n"));
}

#[test]
fn ocr_matches_rapidocr() {
    let Some((registry, runtime)) = setup() else { return };
    let fx = fixture("ocr");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut ocr = Ocr::new(&runtime, &registry).expect("ocr");
    assert_eq!(ocr.classes(), 6625, "blank + 6623 characters + space");
    let (mut reference_boxes, mut same_text, mut extra) = (0usize, 0usize, 0usize);
    let mut report = Vec::new();
    for spec in fx["frames"].as_array().expect("frames") {
        let frame = make_frame(spec, tmp.path());
        let lines = ocr.read(&frame.view()).expect("read");
        let refs = spec["lines"].as_array().expect("lines");
        let mut used = vec![false; lines.len()];
        for r in refs {
            reference_boxes += 1;
            let text = r["text"].as_str().expect("text");
            let pts: Vec<(f32, f32)> = r["box"]
                .as_array()
                .expect("box")
                .iter()
                .map(|p| (p[0].as_f64().expect("x") as f32, p[1].as_f64().expect("y") as f32))
                .collect();
            let (x0, x1) =
                (pts.iter().map(|p| p.0).fold(f32::MAX, f32::min), pts.iter().map(|p| p.0).fold(0.0, f32::max));
            let (y0, y1) =
                (pts.iter().map(|p| p.1).fold(f32::MAX, f32::min), pts.iter().map(|p| p.1).fold(0.0, f32::max));
            let rbox = BoxPx { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
            let hit = lines
                .iter()
                .enumerate()
                .filter(|(k, l)| !used[*k] && vision::iou(&l.box_px, &rbox) >= OCR_BOX_IOU_MIN)
                .max_by(|a, b| vision::iou(&a.1.box_px, &rbox).total_cmp(&vision::iou(&b.1.box_px, &rbox)));
            match hit {
                Some((k, l)) => {
                    used[k] = true;
                    if l.text == text {
                        same_text += 1;
                    } else {
                        report.push(format!("{}: reference {text:?}, ours {:?}", frame.id, l.text));
                    }
                }
                None => report.push(format!("{}: reference {text:?} at {rbox:?}: no box of ours", frame.id)),
            }
        }
        for (k, l) in lines.iter().enumerate() {
            if !used[k] {
                extra += 1;
                report.push(format!("{}: extra line {:?} at {:?}", frame.id, l.text, l.box_px));
            }
        }
        eprintln!("{}: {:?}", frame.id, lines.iter().map(|l| (&l.text, l.confidence)).collect::<Vec<_>>());
    }
    let fraction = same_text as f64 / reference_boxes.max(1) as f64;
    eprintln!("same text on {same_text}/{reference_boxes} reference boxes ({:.1}%), {extra} extra", 100.0 * fraction);
    for r in &report {
        eprintln!("  {r}");
    }
    assert!(reference_boxes >= 10, "the fixture frames must carry text (got {reference_boxes} boxes)");
    assert!(
        fraction >= OCR_SAME_TEXT_FRACTION_MIN,
        "same text on only {same_text}/{reference_boxes} reference boxes:\n{}",
        report.join("\n")
    );
    assert!(
        (extra as f64) <= (1.0 - OCR_SAME_TEXT_FRACTION_MIN) * reference_boxes as f64,
        "{extra} lines the reference did not find:\n{}",
        report.join("\n")
    );
}

/// Decodes `file` at `fps` frames per second to RGB24 with the FFmpeg CLI: (width, height, frames).
fn sample_frames(file: &Path, fps: u32) -> (u32, u32, Vec<Vec<u8>>) {
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe");
    let dims = String::from_utf8_lossy(&probe.stdout);
    let mut it = dims.trim().split(',').map(|s| s.parse::<u32>().expect("dimension"));
    let (w, h) = (it.next().expect("width"), it.next().expect("height"));
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-vf", &format!("fps={fps}"), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg");
    assert!(out.status.success());
    let frame_bytes = (w * h * 3) as usize;
    (w, h, out.stdout.chunks_exact(frame_bytes).map(<[u8]>::to_vec).collect())
}

#[test]
fn moderation_ranges_over_megamind_cover_the_face_on_screen() {
    let Some((registry, runtime)) = setup() else { return };
    let (w, h, frames) = sample_frames(&media_dir().join("Megamind.avi"), 2);
    assert!(frames.len() >= 20, "11 s at 2 fps");
    let mut detector = NudeNet::new(&runtime, &registry).expect("nudenet");
    let views: Vec<RgbFrame<'_>> = frames.iter().map(|f| RgbFrame { data: f, width: w, height: h }).collect();
    let dets = detector.detect_batch(&views).expect("detect");
    let mut agg = ModerationAggregator::default();
    for (i, d) in dets.iter().enumerate() {
        agg.push(i as f64 / 2.0, d);
    }
    assert_eq!(agg.frames(), frames.len() as u64);
    let ranges = agg.finish();
    for r in &ranges {
        eprintln!(
            "{} {:.1}-{:.1}s peak {:.2} at {:.1}s ({} frames)",
            r.label, r.start_secs, r.end_secs, r.peak_score, r.peak_time_secs, r.frames
        );
    }
    let face: f64 = ranges.iter().filter(|r| r.label == "FACE_FEMALE").map(|r| r.end_secs - r.start_secs).sum();
    assert!(face >= 5.0, "a woman's face is on screen most of the clip; FACE_FEMALE ranges cover {face:.1} s");
    for r in &ranges {
        assert!(r.start_secs <= r.peak_time_secs && r.peak_time_secs <= r.end_secs);
        assert!(r.peak_box.x >= 0.0 && r.peak_box.x + r.peak_box.width <= w as f32 + 0.01);
        assert!(r.peak_score > 0.25 && r.peak_score <= 1.0);
    }
}

#[test]
fn bad_frames_are_typed_errors_not_panics() {
    let Some((registry, runtime)) = setup() else { return };
    let mut detector = NudeNet::new(&runtime, &registry).expect("nudenet");
    let short = vec![0u8; 10];
    let err = detector.detect_batch(&[RgbFrame { data: &short, width: 4, height: 4 }]).expect_err("short buffer");
    assert!(matches!(err, vision::VisionError::BadFrame { .. }), "{err}");
    let mut ocr = Ocr::new(&runtime, &registry).expect("ocr");
    let err = ocr.read(&RgbFrame { data: &[], width: 0, height: 0 }).expect_err("empty");
    assert!(matches!(err, vision::VisionError::BadFrame { .. }), "{err}");
    // A tiny and a very wide frame go through the reference's resize/letterbox paths.
    let tiny = vec![128u8; 8 * 8 * 3];
    assert!(ocr.read(&RgbFrame { data: &tiny, width: 8, height: 8 }).expect("tiny").is_empty());
    let wide = vec![255u8; 1000 * 20 * 3];
    assert!(ocr.read(&RgbFrame { data: &wide, width: 1000, height: 20 }).expect("wide").is_empty());
}
