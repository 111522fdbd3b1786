//! NudeNet moderation detector (`nudenet==3.4.2`, `320n.onnx`, a YOLOv8n export with 18
//! classes), replicating `NudeDetector.detect` of `nudenet/nudenet.py`.
//!
//! # Pre-processing (`_read_image`)
//! 1. Pad the frame with black on the right or bottom to a square of side `max(width, height)`
//!    (`cv2.copyMakeBorder(mat, 0, y_pad, 0, x_pad, BORDER_CONSTANT)`).
//! 2. Resize the square to 320×320 with OpenCV `INTER_LINEAR` (`cv2.dnn.blobFromImage`, see
//!    [`super::resize`]), scale by 1/255, no mean.
//! 3. Channel order **B, G, R**: the reference reads BGR with `cv2.imread`, swaps to RGB with
//!    `cv2.cvtColor(mat, COLOR_RGBA2BGR)` (on a 3-channel image that code swaps R and B) and
//!    swaps back with `blobFromImage(swapRB=True)`, so the model sees BGR. We replicate that.
//!
//! # Post-processing (`_postprocess`)
//! Output `output0` is `[batch, 22, 2100]`: per anchor `cx, cy, w, h` in model pixels, then 18
//! class scores ([`LABELS`], the package's `__labels` order).
//! 1. Candidates: anchors whose best class score is ≥ [`CANDIDATE_SCORE_MIN`] (0.2); the box is
//!    converted to top-left + size, scaled by `max(width, height) / 320` and clipped to the frame.
//! 2. Class-agnostic NMS exactly as `cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)`: candidates
//!    with score **>** [`SCORE_THRESHOLD`] (0.25) in descending score order (stable), each kept
//!    unless its IoU with a kept box is > [`NMS_IOU_THRESHOLD`] (0.45). So the effective score
//!    threshold of a detection is > 0.25.
//!
//! Boxes are returned in frame pixels as floats (the reference truncates them to integers for
//! its output; the difference is under a pixel).
//!
//! # Batching
//! The model has a dynamic batch dimension, so frames are run [`BatchPolicy::frames_per_run`] at
//! a time (1.2 MB of input per frame); on CUDA an out-of-memory error halves the batch and
//! retries ([`super::batch::run_chunks`]).

use gaffer_protocol::digest::BoxPx;
use ort::session::Session;
use ort::value::TensorRef;

use super::batch::{run_chunks, BatchPolicy, RunError};
use super::resize::{ChannelOrder, Dest, Resizer, Source};
use super::{RgbFrame, VisionError};
use crate::models::{Registry, Runtime, SessionTuning};

/// Registry name of the model.
pub const MODEL_NAME: &str = "nudenet-320n";
/// Model input side, pixels (`NudeDetector(inference_resolution=320)`).
pub const INPUT_SIDE_PX: usize = 320;
/// Anchors in the output for a 320×320 input (40² + 20² + 10²).
const ANCHORS: usize = 2100;
/// Labels in output order, exactly as NudeNet names them (`nudenet.py` `__labels`).
pub const LABELS: [&str; 18] = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
];
/// An anchor becomes a candidate when its best class score is ≥ this (`_postprocess`:
/// `if max_score >= 0.2`).
pub const CANDIDATE_SCORE_MIN: f32 = 0.2;
/// NMS keeps candidates scoring strictly above this (`cv2.dnn.NMSBoxes(..., 0.25, ...)`);
/// the effective detection threshold, reported as the digest's `score_threshold`.
pub const SCORE_THRESHOLD: f32 = 0.25;
/// NMS suppresses a box whose IoU with a higher-scoring kept box is above this
/// (`cv2.dnn.NMSBoxes(..., 0.45)`).
pub const NMS_IOU_THRESHOLD: f32 = 0.45;
const CHANNELS: usize = 4 + LABELS.len();
const FRAME_FLOATS: usize = 3 * INPUT_SIDE_PX * INPUT_SIDE_PX;

/// One detection on a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The label exactly as NudeNet names it, e.g. `"FACE_FEMALE"`.
    pub label: &'static str,
    /// Class score, 0..1 (> [`SCORE_THRESHOLD`]).
    pub score: f32,
    /// Box in the frame's pixels.
    pub box_px: BoxPx,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    class: usize,
    score: f32,
    x: f32,
    y: f32,
    w: f32,
    h: f32,
}

/// The NudeNet detector on one ONNX Runtime session, with reusable buffers.
pub struct NudeNet {
    session: Session,
    policy: BatchPolicy,
    batch_frames: usize,
    input: Vec<f32>,
    resizer: Resizer,
    candidates: Vec<Candidate>,
    order: Vec<usize>,
}

impl std::fmt::Debug for NudeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NudeNet").field("policy", &self.policy).field("batch_frames", &self.batch_frames).finish()
    }
}

impl NudeNet {
    /// Opens the installed `nudenet-320n` model on `runtime` with the default [`BatchPolicy`]
    /// (halving on out-of-memory when the runtime uses CUDA).
    ///
    /// # Errors
    /// [`VisionError::Models`] when the model is not installed or the session fails;
    /// [`VisionError::BadModel`] when its input/output names differ.
    pub fn new(runtime: &Runtime, registry: &Registry) -> Result<Self, VisionError> {
        Self::with_tuning(runtime, registry, &Self::TUNING)
    }

    /// The session options [`NudeNet::new`] uses: one intra-op thread, ONNX Runtime's defaults
    /// otherwise. Measured with `benches/vision.rs` on a shared 2-core machine: ~1.9× the
    /// frames/s and frames per CPU-second of [`Runtime::session`]'s thread-per-core pool,
    /// whose spinning idle threads take the CPU from the thread doing the work; turning off
    /// the memory arena or memory patterns, or another optimization level, made no gain.
    /// For lower latency on an otherwise idle many-core box use [`NudeNet::with_tuning`] with
    /// more threads and `intra_op_spinning: Some(false)`.
    pub const TUNING: SessionTuning = SessionTuning {
        intra_threads: Some(1),
        inter_threads: None,
        optimization_level: None,
        cpu_mem_arena: None,
        memory_pattern: None,
        intra_op_spinning: None,
    };

    /// [`NudeNet::new`] with the session options of `tuning`.
    ///
    /// # Errors
    /// As [`NudeNet::new`].
    pub fn with_tuning(runtime: &Runtime, registry: &Registry, tuning: &SessionTuning) -> Result<Self, VisionError> {
        let policy = BatchPolicy { halve_on_oom: runtime.provider().provider == "cuda", ..BatchPolicy::default() };
        Self::from_session(runtime.session_with(registry, MODEL_NAME, tuning)?, policy)
    }

    /// Wraps a session of `320n.onnx` with a batch policy.
    ///
    /// # Errors
    /// [`VisionError::BadModel`] when the input is not `images` or the output not `output0`.
    pub fn from_session(session: Session, policy: BatchPolicy) -> Result<Self, VisionError> {
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if inputs != ["images"] || outputs != ["output0"] {
            return Err(VisionError::BadModel {
                model: MODEL_NAME,
                detail: format!("inputs {inputs:?}, outputs {outputs:?}; expected [images] → [output0]"),
            });
        }
        let batch_frames = policy.frames_per_run(FRAME_FLOATS * 4);
        Ok(Self {
            session,
            policy,
            batch_frames,
            input: Vec::new(),
            resizer: Resizer::new(),
            candidates: Vec::new(),
            order: Vec::new(),
        })
    }

    /// Frames per inference run now (halved after out-of-memory errors).
    pub fn batch_frames(&self) -> usize {
        self.batch_frames
    }

    /// Detects on each frame; returns one list per frame, in frame order, each ordered by
    /// descending score.
    ///
    /// # Errors
    /// [`VisionError::BadFrame`] for an invalid frame (nothing is run), [`VisionError::Inference`]
    /// when ONNX Runtime fails (after halving on out-of-memory, when enabled).
    pub fn detect_batch(&mut self, frames: &[RgbFrame<'_>]) -> Result<Vec<Vec<Detection>>, VisionError> {
        for f in frames {
            f.validate()?;
        }
        let mut results = Vec::with_capacity(frames.len());
        let mut batch = self.batch_frames;
        let outcome = run_chunks(frames.len(), &mut batch, self.policy.halve_on_oom, |range| {
            let chunk = &frames[range];
            self.run_chunk(chunk, &mut results)
        });
        self.batch_frames = batch;
        outcome.map_err(|e| VisionError::Inference { model: MODEL_NAME, detail: e.message().to_owned() })?;
        Ok(results)
    }

    fn run_chunk(&mut self, chunk: &[RgbFrame<'_>], results: &mut Vec<Vec<Detection>>) -> Result<(), RunError> {
        let n = chunk.len();
        if self.input.len() < n * FRAME_FLOATS {
            self.input.resize(n * FRAME_FLOATS, 0.0);
        }
        for (i, frame) in chunk.iter().enumerate() {
            let side = frame.width.max(frame.height);
            let src = Source {
                padded_width: side,
                padded_height: side,
                ..Source::packed(frame.data, frame.width, frame.height)
            };
            let mut dst = Dest {
                data: &mut self.input[i * FRAME_FLOATS..(i + 1) * FRAME_FLOATS],
                width: INPUT_SIDE_PX as u32,
                height: INPUT_SIDE_PX as u32,
                row_stride: INPUT_SIDE_PX,
                plane_len: INPUT_SIDE_PX * INPUT_SIDE_PX,
            };
            self.resizer.resize_normalize(&src, &mut dst, ChannelOrder::Bgr, 1.0 / 255.0, 0.0);
        }
        let other = |e: ort::Error| RunError::from_message(e.to_string());
        let tensor =
            TensorRef::from_array_view(([n, 3, INPUT_SIDE_PX, INPUT_SIDE_PX], &self.input[..n * FRAME_FLOATS]))
                .map_err(other)?;
        let outputs = self.session.run(ort::inputs!["images" => tensor]).map_err(other)?;
        let (shape, out) = outputs["output0"].try_extract_tensor::<f32>().map_err(other)?;
        let want = [n as i64, CHANNELS as i64, ANCHORS as i64];
        if shape.as_ref() != want || out.len() != n * CHANNELS * ANCHORS {
            return Err(RunError::Other(format!("output0 has shape {shape:?}, expected {want:?}")));
        }
        for (i, frame) in chunk.iter().enumerate() {
            let per = &out[i * CHANNELS * ANCHORS..(i + 1) * CHANNELS * ANCHORS];
            results.push(postprocess(per, frame.width, frame.height, &mut self.candidates, &mut self.order));
        }
        Ok(())
    }
}

/// `_postprocess` + `cv2.dnn.NMSBoxes` for one frame's `[22, 2100]` output.
fn postprocess(
    out: &[f32],
    width: u32,
    height: u32,
    candidates: &mut Vec<Candidate>,
    order: &mut Vec<usize>,
) -> Vec<Detection> {
    candidates.clear();
    let side = width.max(height) as f32;
    // `(image_original_width + x_pad) / model_width`, a Python float applied to float32 values.
    let scale = (f64::from(side) / INPUT_SIDE_PX as f64) as f32;
    let (w_img, h_img) = (width as f32, height as f32);
    for a in 0..ANCHORS {
        let mut best = 0usize;
        let mut best_score = out[4 * ANCHORS + a];
        for c in 1..LABELS.len() {
            let s = out[(4 + c) * ANCHORS + a];
            if s > best_score {
                best = c;
                best_score = s;
            }
        }
        if best_score < CANDIDATE_SCORE_MIN {
            continue;
        }
        let (cx, cy, bw, bh) = (out[a], out[ANCHORS + a], out[2 * ANCHORS + a], out[3 * ANCHORS + a]);
        let x = (cx - bw / 2.0) * scale;
        let y = (cy - bh / 2.0) * scale;
        let w = bw * scale;
        let h = bh * scale;
        let x = x.min(w_img).max(0.0);
        let y = y.min(h_img).max(0.0);
        let w = w.min(w_img - x);
        let h = h.min(h_img - y);
        candidates.push(Candidate { class: best, score: best_score, x, y, w, h });
    }
    order.clear();
    order.extend((0..candidates.len()).filter(|&i| candidates[i].score > SCORE_THRESHOLD));
    // std::stable_sort by descending score, as cv::dnn's GetMaxScoreIndex.
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    let mut kept: Vec<Detection> = Vec::new();
    for &i in order.iter() {
        let c = candidates[i];
        let b = BoxPx { x: c.x, y: c.y, width: c.w, height: c.h };
        if kept.iter().all(|k| f64::from(rect_overlap(&k.box_px, &b)) <= f64::from(NMS_IOU_THRESHOLD)) {
            kept.push(Detection { label: LABELS[c.class], score: c.score, box_px: b });
        }
    }
    kept
}

/// `cv::dnn::rectOverlap` for `Rect2d`: 1 − Jaccard distance, in f64 like OpenCV.
fn rect_overlap(a: &BoxPx, b: &BoxPx) -> f32 {
    let (ax, ay, aw, ah) = (f64::from(a.x), f64::from(a.y), f64::from(a.width), f64::from(a.height));
    let (bx, by, bw, bh) = (f64::from(b.x), f64::from(b.y), f64::from(b.width), f64::from(b.height));
    let area_a = aw.max(0.0) * ah.max(0.0);
    let area_b = bw.max(0.0) * bh.max(0.0);
    if area_a + area_b <= f64::EPSILON {
        return 0.0;
    }
    let ix = ((ax + aw).min(bx + bw) - ax.max(bx)).max(0.0);
    let iy = ((ay + ah).min(by + bh) - ay.max(by)).max(0.0);
    let inter = ix * iy;
    (inter / (area_a + area_b - inter)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_with(anchors: &[(usize, [f32; 4], usize, f32)]) -> Vec<f32> {
        let mut out = vec![0f32; CHANNELS * ANCHORS];
        for &(a, [cx, cy, w, h], class, score) in anchors {
            out[a] = cx;
            out[ANCHORS + a] = cy;
            out[2 * ANCHORS + a] = w;
            out[3 * ANCHORS + a] = h;
            out[(4 + class) * ANCHORS + a] = score;
        }
        out
    }

    #[test]
    fn nms_is_class_agnostic_and_scores_at_or_below_the_threshold_are_dropped() {
        let out = output_with(&[
            (0, [100.0, 100.0, 40.0, 40.0], 1, 0.9),  // FACE_FEMALE
            (1, [102.0, 101.0, 40.0, 40.0], 12, 0.8), // FACE_MALE, same place: suppressed
            (2, [250.0, 250.0, 20.0, 20.0], 7, 0.25), // exactly 0.25: not > threshold
            (3, [250.0, 50.0, 20.0, 20.0], 9, 0.3),   // FEET_COVERED
        ]);
        let d = postprocess(&out, 640, 480, &mut Vec::new(), &mut Vec::new());
        let labels: Vec<&str> = d.iter().map(|d| d.label).collect();
        assert_eq!(labels, ["FACE_FEMALE", "FEET_COVERED"]);
        // Scaled by 640/320 = 2, back to frame pixels.
        assert_eq!(d[0].box_px, BoxPx { x: 160.0, y: 160.0, width: 80.0, height: 80.0 });
    }

    #[test]
    fn boxes_are_clipped_to_the_frame() {
        let out = output_with(&[(0, [310.0, 300.0, 40.0, 40.0], 1, 0.9)]);
        // 320x180 frame: scale 1; the box runs past the bottom of the frame (y 280..320 > 180).
        let d = postprocess(&out, 320, 180, &mut Vec::new(), &mut Vec::new());
        assert_eq!(d[0].box_px, BoxPx { x: 290.0, y: 180.0, width: 30.0, height: 0.0 });
    }
}
