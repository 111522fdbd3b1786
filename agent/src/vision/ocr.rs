//! On-screen text with PP-OCRv4 (detection + recognition) and the PP-OCR mobile v2 orientation
//! classifier, replicating `RapidOCR.__call__` of `rapidocr-onnxruntime==1.4.4` with its default
//! `config.yaml`.
//!
//! # Pipeline (constants from `config.yaml` unless said otherwise)
//! 1. **Frame limits** (`RapidOCR.preprocess`): a frame whose longer side exceeds
//!    [`MAX_SIDE_LEN`] (2000) is shrunk so it fits, one whose shorter side is under
//!    [`MIN_SIDE_LEN`] (30) is enlarged, both to multiples of 32; a frame at most
//!    [`MIN_HEIGHT`] (30) pixels high or wider than [`WIDTH_HEIGHT_RATIO`] (8) × its height gets
//!    black bands above and below (`maybe_add_letterbox`). Video frames normally need none.
//! 2. **Detection** (`ch_ppocr_det`): resize so the **shorter** side is at least
//!    [`DET_LIMIT_SIDE_LEN`] (736, `limit_type: min`), each side `int()`-truncated then rounded
//!    to a multiple of 32 (Python `round`, ties to even); OpenCV `INTER_LINEAR`; BGR;
//!    `(v/255 − 0.5)/0.5`. The model outputs a text probability map at the input size.
//! 3. **DB post-processing** (`DBPostProcess`): bitmap = probability > [`DET_THRESH`] (0.3),
//!    dilated with a 2×2 kernel (`use_dilation: true`); every contour (`cv2.findContours`,
//!    `RETR_LIST`: outer borders and holes; here `imageproc::contours`), at most
//!    [`DET_MAX_CANDIDATES`] (1000): minimum-area rectangle (`cv2.minAreaRect`; here
//!    `geo::MinimumRotatedRect`), dropped if its short side is < [`DET_MIN_SIZE`] (3); score =
//!    mean probability inside the rectangle (`box_score_fast`, `score_mode: fast`), dropped if <
//!    [`DET_BOX_THRESH`] (0.5); expanded by `area × `[`DET_UNCLIP_RATIO`]` (1.6) / perimeter`
//!    with Clipper round joins (pyclipper = Clipper 6.4.2; here `geo-clipper`, the same library,
//!    with the same integer truncation of the corners); minimum-area rectangle again, dropped if
//!    its short side is < 5; scaled to the frame and rounded. Boxes are then ordered clockwise
//!    from top-left, clipped, dropped when a side is ≤ 3 px, and sorted top-to-bottom,
//!    left-to-right (`sorted_boxes`, same 10-pixel line tolerance).
//! 4. **Crops** (`get_crop_img_list`): each box is rectified with a perspective warp to
//!    `int(longest opposite sides)`, bicubic, replicated borders (`cv2.warpPerspective`
//!    `INTER_CUBIC`, `BORDER_REPLICATE`; here `warp_perspective_cubic`, which reproduces
//!    OpenCV 5's float computation with its A = −0.75 kernel); crops at least 1.5× taller than
//!    wide are turned 90° counter-clockwise. All resizes (steps 2, 5, 6) reproduce
//!    `cv2.resize`'s fixed-point arithmetic bit for bit ([`super::resize`]): the recognizer's
//!    choice of a space between two words changes with one-level differences in its input.
//! 5. **Orientation** (`ch_ppocr_cls`): crops resized to height 48, width ⌈48·w/h⌉ ≤ 192,
//!    zero-padded to 192, `(v/255 − 0.5)/0.5`; label `180` with probability >
//!    [`CLS_THRESH`] (0.9) turns the crop 180°.
//! 6. **Recognition** (`ch_ppocr_rec`): crops sorted by aspect ratio, in batches of
//!    [`REC_BATCH_NUM`] (6) padded to the batch's widest ratio (at least 320/48), height 48,
//!    same normalization; CTC greedy decoding: per time step the arg-max class, repeats merged,
//!    blanks (class 0) dropped; classes 1..=6623 are the model's `character` metadata lines and
//!    6624 is a space; confidence = mean of the kept steps' probabilities.
//! 7. Lines with confidence < [`TEXT_SCORE`] (0.5) are dropped; boxes go back to frame pixels.

use std::cmp::Ordering;

use gaffer_protocol::digest::BoxPx;
use geo::{Coord, LineString, MinimumRotatedRect, MultiPoint, Point as GeoPoint, Polygon};
use geo_clipper::{ClipperInt, EndType, JoinType};
use image::{Rgb, RgbImage};
use imageproc::contours::find_contours;
use ort::session::Session;
use ort::value::TensorRef;

use super::resize::{ChannelOrder, Dest, Resizer, Source};
use super::{RgbFrame, VisionError};
use crate::models::{Registry, Runtime, SessionTuning};

/// Registry name of the text detector.
pub const DET_MODEL: &str = "ppocrv4-det";
/// Registry name of the text recognizer.
pub const REC_MODEL: &str = "ppocrv4-rec";
/// Registry name of the orientation classifier.
pub const CLS_MODEL: &str = "ppocr-mobile-v2-cls";

/// `Global.max_side_len`.
pub const MAX_SIDE_LEN: u32 = 2000;
/// `Global.min_side_len`.
pub const MIN_SIDE_LEN: u32 = 30;
/// `Global.min_height`.
pub const MIN_HEIGHT: u32 = 30;
/// `Global.width_height_ratio`.
pub const WIDTH_HEIGHT_RATIO: f64 = 8.0;
/// `Global.text_score`: lines below this recognizer confidence are dropped.
pub const TEXT_SCORE: f32 = 0.5;
/// `Det.limit_side_len` (with `limit_type: min`).
pub const DET_LIMIT_SIDE_LEN: u32 = 736;
/// `Det.thresh`: probability-map binarization threshold.
pub const DET_THRESH: f32 = 0.3;
/// `Det.box_thresh`: minimum mean probability inside a box.
pub const DET_BOX_THRESH: f32 = 0.5;
/// `Det.max_candidates`.
pub const DET_MAX_CANDIDATES: usize = 1000;
/// `Det.unclip_ratio`.
pub const DET_UNCLIP_RATIO: f64 = 1.6;
/// `DBPostProcess.min_size`.
pub const DET_MIN_SIZE: f64 = 3.0;
/// pyclipper's default `ArcTolerance` for round joins.
const CLIPPER_ARC_TOLERANCE: f64 = 0.25;
/// `Cls.cls_image_shape` = `[3, 48, 192]`.
const CLS_H: usize = 48;
const CLS_W: usize = 192;
/// `Cls.cls_batch_num`.
const CLS_BATCH_NUM: usize = 6;
/// `Cls.cls_thresh`.
pub const CLS_THRESH: f32 = 0.9;
/// `Rec.rec_img_shape` = `[3, 48, 320]`.
const REC_H: usize = 48;
const REC_W: usize = 320;
/// `Rec.rec_batch_num`.
pub const REC_BATCH_NUM: usize = 6;
/// Widest recognizer input accepted, pixels (a crop 200× wider than high): bounds the tensor.
const REC_W_MAX: usize = 48 * 200;
/// Most text boxes recognized per frame (bounds work on pathological frames).
pub const BOXES_PER_FRAME_MAX: usize = 500;

/// One line of text read on a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct OcrLine {
    /// The text.
    pub text: String,
    /// Recognizer confidence, 0..1 (≥ [`TEXT_SCORE`]).
    pub confidence: f32,
    /// Axis-aligned bounds of `quad_px`, frame pixels.
    pub box_px: BoxPx,
    /// The detected quadrilateral, frame pixels: top-left, top-right, bottom-right, bottom-left.
    pub quad_px: [[f32; 2]; 4],
}

/// One intra-op thread, ONNX Runtime's defaults otherwise.
const ONE_THREAD: SessionTuning = SessionTuning {
    intra_threads: Some(1),
    inter_threads: None,
    optimization_level: None,
    cpu_mem_arena: None,
    memory_pattern: None,
    intra_op_spinning: None,
};

/// ONNX Runtime options of the three PP-OCR sessions ([`Ocr::with_tuning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OcrTuning {
    /// The text detector's session.
    pub det: SessionTuning,
    /// The orientation classifier's session.
    pub cls: SessionTuning,
    /// The text recognizer's session.
    pub rec: SessionTuning,
}

impl OcrTuning {
    /// Plain [`Runtime::session`]s for all three models.
    pub fn untuned() -> Self {
        Self { det: SessionTuning::default(), cls: SessionTuning::default(), rec: SessionTuning::default() }
    }
}

impl Default for OcrTuning {
    /// [`OcrTuning::untuned`].
    fn default() -> Self {
        Self::untuned()
    }
}

/// The three PP-OCR sessions and reusable buffers.
pub struct Ocr {
    det: Session,
    cls: Session,
    rec: Session,
    /// Index = CTC class: 0 blank, 1..=n the `character` lines, n+1 a space.
    characters: Vec<String>,
    resizer: Resizer,
    det_input: Vec<f32>,
    batch_input: Vec<f32>,
}

impl std::fmt::Debug for Ocr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ocr").field("characters", &self.characters.len()).finish_non_exhaustive()
    }
}

/// A frame-sized working image: borrowed frame or an owned resized/letterboxed copy.
struct WorkImage<'a> {
    data: std::borrow::Cow<'a, [u8]>,
    width: u32,
    height: u32,
}

impl WorkImage<'_> {
    fn source(&self) -> Source<'_> {
        Source::packed(&self.data, self.width, self.height)
    }
}

impl Ocr {
    /// Opens the installed detector, recognizer and classifier on `runtime`.
    ///
    /// # Errors
    /// [`VisionError::Models`] when a model is missing or its session fails;
    /// [`VisionError::BadModel`] when the recognizer lacks its `character` metadata or a
    /// model's output is not the expected one.
    pub fn new(runtime: &Runtime, registry: &Registry) -> Result<Self, VisionError> {
        Self::with_tuning(runtime, registry, &Self::TUNING)
    }

    /// The session options [`Ocr::new`] uses: one intra-op thread for each model, ONNX
    /// Runtime's defaults otherwise (they do not change what is read). Measured with
    /// `benches/vision.rs` on a shared 2-core machine: ~2.1× the frames per CPU-second of
    /// [`Runtime::session`]'s thread-per-core pools, whose spinning idle threads take the CPU
    /// from the thread doing the work (DB post-processing and crops run between the three
    /// models). RapidOCR's options (memory arena off) cost ~5%; memory patterns off, another
    /// optimization level, two non-spinning threads, and padding recognizer batches to fixed
    /// widths made no gain. For lower latency on an otherwise idle many-core box use
    /// [`Ocr::with_tuning`] with more threads and `intra_op_spinning: Some(false)`.
    pub const TUNING: OcrTuning = OcrTuning { det: ONE_THREAD, cls: ONE_THREAD, rec: ONE_THREAD };

    /// [`Ocr::new`] with the session options of `tuning`.
    ///
    /// # Errors
    /// As [`Ocr::new`].
    pub fn with_tuning(runtime: &Runtime, registry: &Registry, tuning: &OcrTuning) -> Result<Self, VisionError> {
        let det = runtime.session_with(registry, DET_MODEL, &tuning.det)?;
        let cls = runtime.session_with(registry, CLS_MODEL, &tuning.cls)?;
        let rec = runtime.session_with(registry, REC_MODEL, &tuning.rec)?;
        let bad = |model, detail: String| VisionError::BadModel { model, detail };
        let list = {
            let meta = rec.metadata().map_err(|e| bad(REC_MODEL, e.to_string()))?;
            meta.custom("character").ok_or_else(|| bad(REC_MODEL, "no `character` metadata".into()))?
        };
        let mut characters = vec!["blank".to_owned()];
        characters.extend(list.lines().map(str::to_owned));
        characters.push(" ".to_owned());
        for (s, model) in [(&det, DET_MODEL), (&cls, CLS_MODEL), (&rec, REC_MODEL)] {
            if s.inputs().len() != 1 || s.outputs().len() != 1 {
                return Err(bad(model, "expected one input and one output".into()));
            }
        }
        Ok(Self { det, cls, rec, characters, resizer: Resizer::new(), det_input: Vec::new(), batch_input: Vec::new() })
    }

    /// Recognizer classes (blank + characters + space): 6625 for PP-OCRv4.
    pub fn classes(&self) -> usize {
        self.characters.len()
    }

    /// Reads the text on `frame`: lines in reading order (top to bottom, left to right).
    ///
    /// # Errors
    /// [`VisionError::BadFrame`] for an invalid frame; [`VisionError::Inference`] when ONNX
    /// Runtime fails or a model's output has an unexpected shape.
    pub fn read(&mut self, frame: &RgbFrame<'_>) -> Result<Vec<OcrLine>, VisionError> {
        frame.validate()?;
        let (raw_w, raw_h) = (frame.width, frame.height);
        // 1. RapidOCR.preprocess + maybe_add_letterbox.
        let mut img = WorkImage { data: std::borrow::Cow::Borrowed(frame.data), width: raw_w, height: raw_h };
        let (mut ratio_w, mut ratio_h) = (1.0f64, 1.0f64);
        if img.width.max(img.height) > MAX_SIDE_LEN {
            let (w, h) = limit_dims(img.width, img.height, MAX_SIDE_LEN, true);
            (ratio_w, ratio_h) = (f64::from(img.width) / f64::from(w), f64::from(img.height) / f64::from(h));
            img = self.resized(&img, w, h);
        }
        if img.width.min(img.height) < MIN_SIDE_LEN {
            let (w, h) = limit_dims(img.width, img.height, MIN_SIDE_LEN, false);
            (ratio_w, ratio_h) = (f64::from(img.width) / f64::from(w), f64::from(img.height) / f64::from(h));
            img = self.resized(&img, w, h);
        }
        let mut pad_top = 0u32;
        if img.height <= MIN_HEIGHT || f64::from(img.width) / f64::from(img.height) > WIDTH_HEIGHT_RATIO {
            let new_h = ((f64::from(img.width) / WIDTH_HEIGHT_RATIO) as u32).max(MIN_HEIGHT) * 2;
            pad_top = new_h.abs_diff(img.height) / 2;
            img = letterbox(&img, pad_top);
        }
        // 2.-3. Detection.
        let boxes = self.detect(&img)?;
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        // 4. Crops.
        let mut crops: Vec<RgbImage> = Vec::with_capacity(boxes.len());
        for quad in &boxes {
            crops.push(Self::rotate_crop(&img, quad));
        }
        // 5. Orientation.
        self.classify(&mut crops)?;
        // 6. Recognition.
        let texts = self.recognize(&crops)?;
        // 7. Filter and map back to frame pixels.
        let mut lines = Vec::new();
        for (quad, (text, confidence)) in boxes.iter().zip(texts) {
            if confidence < TEXT_SCORE {
                continue;
            }
            let mut q = [[0f32; 2]; 4];
            for (k, p) in quad.iter().enumerate() {
                let x = (p[0] as f32 * ratio_w as f32).max(0.0).min(raw_w as f32);
                let y = ((p[1] as f32 - pad_top as f32) * ratio_h as f32).max(0.0).min(raw_h as f32);
                q[k] = [x, y];
            }
            let (x0, x1) =
                (q.iter().map(|p| p[0]).fold(f32::MAX, f32::min), q.iter().map(|p| p[0]).fold(0.0, f32::max));
            let (y0, y1) =
                (q.iter().map(|p| p[1]).fold(f32::MAX, f32::min), q.iter().map(|p| p[1]).fold(0.0, f32::max));
            lines.push(OcrLine {
                text,
                confidence,
                box_px: BoxPx { x: x0, y: y0, width: x1 - x0, height: y1 - y0 },
                quad_px: q,
            });
        }
        Ok(lines)
    }

    fn resized<'b>(&mut self, img: &WorkImage<'_>, w: u32, h: u32) -> WorkImage<'b> {
        let mut out = Vec::new();
        self.resizer.resize_rgb(&img.source(), w, h, &mut out);
        WorkImage { data: std::borrow::Cow::Owned(out), width: w, height: h }
    }

    /// Detection + DB post-processing; quads in `img` pixels (integers), sorted.
    fn detect(&mut self, img: &WorkImage<'_>) -> Result<Vec<[[i32; 2]; 4]>, VisionError> {
        let (w, h) = det_dims(img.width, img.height);
        let plane = w as usize * h as usize;
        if self.det_input.len() < 3 * plane {
            self.det_input.resize(3 * plane, 0.0);
        }
        let mut dst = Dest {
            data: &mut self.det_input[..3 * plane],
            width: w,
            height: h,
            row_stride: w as usize,
            plane_len: plane,
        };
        self.resizer.resize_normalize(&img.source(), &mut dst, ChannelOrder::Bgr, 2.0 / 255.0, -1.0);
        let fail = |e: ort::Error| VisionError::Inference { model: DET_MODEL, detail: e.to_string() };
        let tensor = TensorRef::from_array_view(([1usize, 3, h as usize, w as usize], &self.det_input[..3 * plane]))
            .map_err(fail)?;
        let outputs = self.det.run(ort::inputs![tensor]).map_err(fail)?;
        let (shape, pred) = outputs[0].try_extract_tensor::<f32>().map_err(fail)?;
        if shape.as_ref() != [1, 1, i64::from(h), i64::from(w)] || pred.len() != plane {
            return Err(VisionError::Inference {
                model: DET_MODEL,
                detail: format!("output shape {shape:?}, expected [1, 1, {h}, {w}]"),
            });
        }
        let mut boxes = db_postprocess(pred, w, h, img.width, img.height);
        // filter_tag_det_res
        boxes = boxes
            .into_iter()
            .filter_map(|b| {
                let mut q = order_points_clockwise(b);
                for p in &mut q {
                    p[0] = p[0].clamp(0, img.width as i32 - 1);
                    p[1] = p[1].clamp(0, img.height as i32 - 1);
                }
                let rect_w = dist(q[0], q[1]) as i64;
                let rect_h = dist(q[0], q[3]) as i64;
                (rect_w > 3 && rect_h > 3).then_some(q)
            })
            .collect();
        boxes.truncate(BOXES_PER_FRAME_MAX);
        Ok(sorted_boxes(boxes))
    }

    /// `get_rotate_crop_image`: perspective-rectified crop of `quad` from `img`
    /// ([`warp_perspective_cubic`]), turned 90° counter-clockwise when at least 1.5× taller
    /// than wide.
    fn rotate_crop(img: &WorkImage<'_>, quad: &[[i32; 2]; 4]) -> RgbImage {
        let crop_w = dist(quad[0], quad[1]).max(dist(quad[2], quad[3])) as u32;
        let crop_h = dist(quad[0], quad[3]).max(dist(quad[1], quad[2])) as u32;
        let (crop_w, crop_h) = (crop_w.max(1), crop_h.max(1));
        let mut out = RgbImage::new(crop_w, crop_h);
        warp_perspective_cubic(img, quad, &mut out);
        if f64::from(crop_h) / f64::from(crop_w) >= 1.5 {
            out = image::imageops::rotate270(&out);
        }
        out
    }

    /// `TextClassifier`: turns crops classified as upside down (`180` > 0.9) by 180°.
    fn classify(&mut self, crops: &mut [RgbImage]) -> Result<(), VisionError> {
        let fail = |detail: String| VisionError::Inference { model: CLS_MODEL, detail };
        let plane = CLS_H * CLS_W;
        for start in (0..crops.len()).step_by(CLS_BATCH_NUM) {
            let end = (start + CLS_BATCH_NUM).min(crops.len());
            let n = end - start;
            self.batch_input.clear();
            self.batch_input.resize(n * 3 * plane, 0.0);
            for (i, crop) in crops[start..end].iter().enumerate() {
                let ratio = f64::from(crop.width()) / f64::from(crop.height());
                let resized_w = ((CLS_H as f64 * ratio).ceil() as usize).clamp(1, CLS_W);
                let mut dst = Dest {
                    data: &mut self.batch_input[i * 3 * plane..(i + 1) * 3 * plane],
                    width: resized_w as u32,
                    height: CLS_H as u32,
                    row_stride: CLS_W,
                    plane_len: plane,
                };
                let src = Source::packed(crop.as_raw(), crop.width(), crop.height());
                self.resizer.resize_normalize(&src, &mut dst, ChannelOrder::Bgr, 2.0 / 255.0, -1.0);
            }
            let tensor = TensorRef::from_array_view(([n, 3, CLS_H, CLS_W], &self.batch_input[..]))
                .map_err(|e| fail(e.to_string()))?;
            let outputs = self.cls.run(ort::inputs![tensor]).map_err(|e| fail(e.to_string()))?;
            let (shape, probs) = outputs[0].try_extract_tensor::<f32>().map_err(|e| fail(e.to_string()))?;
            if shape.as_ref() != [n as i64, 2] {
                return Err(fail(format!("output shape {shape:?}, expected [{n}, 2]")));
            }
            for (i, crop) in crops[start..end].iter_mut().enumerate() {
                let (p0, p180) = (probs[2 * i], probs[2 * i + 1]);
                if p180 > p0 && p180 > CLS_THRESH {
                    image::imageops::rotate180_in_place(crop);
                }
            }
        }
        Ok(())
    }

    /// `TextRecognizer` + `CTCLabelDecode`: (text, confidence) per crop, in crop order.
    fn recognize(&mut self, crops: &[RgbImage]) -> Result<Vec<(String, f32)>, VisionError> {
        let fail = |detail: String| VisionError::Inference { model: REC_MODEL, detail };
        let ratios: Vec<f64> = crops.iter().map(|c| f64::from(c.width()) / f64::from(c.height())).collect();
        let mut indices: Vec<usize> = (0..crops.len()).collect();
        indices.sort_by(|&a, &b| ratios[a].partial_cmp(&ratios[b]).unwrap_or(Ordering::Equal));
        let mut results = vec![(String::new(), 0f32); crops.len()];
        for chunk in indices.chunks(REC_BATCH_NUM) {
            let max_ratio = chunk.iter().map(|&i| ratios[i]).fold(REC_W as f64 / REC_H as f64, f64::max);
            let img_w = ((REC_H as f64 * max_ratio) as usize).min(REC_W_MAX);
            let plane = REC_H * img_w;
            let n = chunk.len();
            self.batch_input.clear();
            self.batch_input.resize(n * 3 * plane, 0.0);
            for (i, &ci) in chunk.iter().enumerate() {
                let crop = &crops[ci];
                let resized_w = ((REC_H as f64 * ratios[ci]).ceil() as usize).clamp(1, img_w);
                let mut dst = Dest {
                    data: &mut self.batch_input[i * 3 * plane..(i + 1) * 3 * plane],
                    width: resized_w as u32,
                    height: REC_H as u32,
                    row_stride: img_w,
                    plane_len: plane,
                };
                let src = Source::packed(crop.as_raw(), crop.width(), crop.height());
                self.resizer.resize_normalize(&src, &mut dst, ChannelOrder::Bgr, 2.0 / 255.0, -1.0);
            }
            let tensor = TensorRef::from_array_view(([n, 3, REC_H, img_w], &self.batch_input[..]))
                .map_err(|e| fail(e.to_string()))?;
            let outputs = self.rec.run(ort::inputs![tensor]).map_err(|e| fail(e.to_string()))?;
            let (shape, probs) = outputs[0].try_extract_tensor::<f32>().map_err(|e| fail(e.to_string()))?;
            let classes = self.characters.len();
            if shape.len() != 3 || shape[0] != n as i64 || shape[2] != classes as i64 {
                return Err(fail(format!("output shape {shape:?}, expected [{n}, T, {classes}]")));
            }
            let steps = shape[1] as usize;
            for (i, &ci) in chunk.iter().enumerate() {
                results[ci] =
                    ctc_greedy(&probs[i * steps * classes..(i + 1) * steps * classes], classes, &self.characters);
            }
        }
        Ok(results)
    }
}

/// `cv2.warpPerspective(img, getPerspectiveTransform(quad, rect), (w, h), flags=INTER_CUBIC,
/// borderMode=BORDER_REPLICATE)` as opencv-python 5.0 computes it for 8-bit images: each output
/// pixel `(x, y)` maps through the homography taking the rectangle `(0,0) (w,0) (w,h) (0,h)` to
/// `quad` (computed in `f64`, the source position then rounded to `f32`); the 4×4 neighbourhood
/// (edge pixels replicated) is weighted with OpenCV's cubic kernel (`interpolateCubic`,
/// A = −0.75) in `f32`, rows first, and rounded to the nearest level. Matches `cv2` on all but
/// a handful of samples (±1) of the fixture crops; `imageproc`'s warp (A = −0.5, no source
/// rounding) differs on most samples of rotated boxes.
fn warp_perspective_cubic(img: &WorkImage<'_>, quad: &[[i32; 2]; 4], out: &mut RgbImage) {
    let (w, h) = (f64::from(out.width()), f64::from(out.height()));
    let [x0, y0] = quad[0].map(f64::from);
    let [x1, y1] = quad[1].map(f64::from);
    let [x2, y2] = quad[2].map(f64::from);
    let [x3, y3] = quad[3].map(f64::from);
    // Unit square → quad (Heckbert, "Fundamentals of Texture Mapping", 1989, §2.2.3).
    let (dx1, dx2, dx3) = (x1 - x2, x3 - x2, x0 - x1 + x2 - x3);
    let (dy1, dy2, dy3) = (y1 - y2, y3 - y2, y0 - y1 + y2 - y3);
    let det = dx1 * dy2 - dx2 * dy1;
    let (g, hh) = if (dx3 == 0.0 && dy3 == 0.0) || det == 0.0 {
        (0.0, 0.0)
    } else {
        ((dx3 * dy2 - dx2 * dy3) / det, (dx1 * dy3 - dx3 * dy1) / det)
    };
    let (a, b, c) = (x1 - x0 + g * x1, x3 - x0 + hh * x3, x0);
    let (d, e, f) = (y1 - y0 + g * y1, y3 - y0 + hh * y3, y0);
    let (iw, ih) = (img.width as i64, img.height as i64);
    let stride = img.width as usize * 3;
    let data: &[u8] = &img.data;
    for (ox, oy, px) in out.enumerate_pixels_mut() {
        let (u, v) = (f64::from(ox) / w, f64::from(oy) / h);
        let den = g * u + hh * v + 1.0;
        let sx = ((a * u + b * v + c) / den) as f32;
        let sy = ((d * u + e * v + f) / den) as f32;
        let (fx0, fy0) = (sx.floor(), sy.floor());
        let cx = cubic_weights(sx - fx0);
        let cy = cubic_weights(sy - fy0);
        let (bx, by) = (fx0 as i64 - 1, fy0 as i64 - 1);
        let cols: [usize; 4] = std::array::from_fn(|k| (bx + k as i64).clamp(0, iw - 1) as usize * 3);
        let mut sum = [0f32; 3];
        for (k1, wy) in cy.iter().enumerate() {
            let row = &data[(by + k1 as i64).clamp(0, ih - 1) as usize * stride..];
            let mut acc = [0f32; 3];
            for (col, wx) in cols.iter().zip(&cx) {
                for ch in 0..3 {
                    acc[ch] += wx * f32::from(row[col + ch]);
                }
            }
            for ch in 0..3 {
                sum[ch] += wy * acc[ch];
            }
        }
        *px = Rgb(sum.map(|v| v.round_ties_even().clamp(0.0, 255.0) as u8));
    }
}

/// OpenCV's `interpolateCubic` (A = −0.75) at fraction `x` in 0..1, in `f32` as OpenCV does.
fn cubic_weights(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// CTC greedy decoding (`CTCLabelDecode` with `is_remove_duplicate=True`).
fn ctc_greedy(probs: &[f32], classes: usize, characters: &[String]) -> (String, f32) {
    let mut text = String::new();
    let mut sum = 0f64;
    let mut kept = 0usize;
    let mut prev = usize::MAX;
    for step in probs.chunks_exact(classes) {
        let (mut best, mut best_p) = (0usize, f32::NEG_INFINITY);
        for (c, &p) in step.iter().enumerate() {
            if p > best_p {
                best = c;
                best_p = p;
            }
        }
        if best != 0 && best != prev {
            if let Some(ch) = characters.get(best) {
                text.push_str(ch);
            }
            sum += f64::from(best_p);
            kept += 1;
        }
        prev = best;
    }
    let confidence = if kept == 0 { 0.0 } else { (sum / kept as f64) as f32 };
    (text, confidence)
}

/// `reduce_max_side` (`shrink`) / `increase_min_side`: new (w, h), multiples of 32.
fn limit_dims(w: u32, h: u32, limit: u32, shrink: bool) -> (u32, u32) {
    let (w, h) = (f64::from(w), f64::from(h));
    let side = if shrink { w.max(h) } else { w.min(h) };
    let ratio = f64::from(limit) / side;
    let rw = (((w * ratio) as i64) as f64 / 32.0).round_ties_even() * 32.0;
    let rh = (((h * ratio) as i64) as f64 / 32.0).round_ties_even() * 32.0;
    ((rw as u32).max(32), (rh as u32).max(32))
}

/// `DetPreProcess.resize` with `limit_type: min`, `limit_side_len: 736`.
fn det_dims(w: u32, h: u32) -> (u32, u32) {
    let (fw, fh) = (f64::from(w), f64::from(h));
    let ratio = if w.min(h) < DET_LIMIT_SIDE_LEN { f64::from(DET_LIMIT_SIDE_LEN) / fw.min(fh) } else { 1.0 };
    let rw = (((fw * ratio) as i64) as f64 / 32.0).round_ties_even() * 32.0;
    let rh = (((fh * ratio) as i64) as f64 / 32.0).round_ties_even() * 32.0;
    ((rw as u32).max(32), (rh as u32).max(32))
}

/// `add_round_letterbox(img, (pad, pad, 0, 0))`: black bands above and below.
fn letterbox<'b>(img: &WorkImage<'_>, pad: u32) -> WorkImage<'b> {
    let row = img.width as usize * 3;
    let mut data = vec![0u8; row * (img.height + 2 * pad) as usize];
    data[row * pad as usize..row * (pad + img.height) as usize].copy_from_slice(&img.data[..row * img.height as usize]);
    WorkImage { data: std::borrow::Cow::Owned(data), width: img.width, height: img.height + 2 * pad }
}

fn dist(a: [i32; 2], b: [i32; 2]) -> f64 {
    let (dx, dy) = (f64::from(a[0] - b[0]), f64::from(a[1] - b[1]));
    (dx * dx + dy * dy).sqrt()
}

/// `get_mini_boxes`: the minimum-area rectangle of `points` as (tl, tr, br, bl) by the
/// reference's ordering rule, and its shorter side.
fn mini_box(points: &[[f64; 2]]) -> Option<([[f64; 2]; 4], f64)> {
    let mp = MultiPoint::from(points.iter().map(|p| GeoPoint::new(p[0], p[1])).collect::<Vec<_>>());
    let rect: Polygon<f64> = mp.minimum_rotated_rect()?;
    let c: Vec<Coord<f64>> = rect.exterior().0.clone();
    if c.len() < 4 {
        return None;
    }
    let mut pts = [[c[0].x, c[0].y], [c[1].x, c[1].y], [c[2].x, c[2].y], [c[3].x, c[3].y]];
    let side_a = ((pts[0][0] - pts[1][0]).powi(2) + (pts[0][1] - pts[1][1]).powi(2)).sqrt();
    let side_b = ((pts[1][0] - pts[2][0]).powi(2) + (pts[1][1] - pts[2][1]).powi(2)).sqrt();
    pts.sort_by(|a, b| a[0].partial_cmp(&b[0]).unwrap_or(Ordering::Equal));
    let (i1, i4) = if pts[1][1] > pts[0][1] { (0, 1) } else { (1, 0) };
    let (i2, i3) = if pts[3][1] > pts[2][1] { (2, 3) } else { (3, 2) };
    Some(([pts[i1], pts[i2], pts[i3], pts[i4]], side_a.min(side_b)))
}

/// `DBPostProcess.__call__` on a `w × h` probability map; quads in `dest_w × dest_h` pixels.
fn db_postprocess(pred: &[f32], w: u32, h: u32, dest_w: u32, dest_h: u32) -> Vec<[[i32; 2]; 4]> {
    // Binarize and dilate with the 2×2 kernel (anchor (1,1): max over x-1..=x, y-1..=y).
    let (wu, hu) = (w as usize, h as usize);
    let mut bitmap = image::GrayImage::new(w, h);
    {
        let buf: &mut [u8] = &mut bitmap;
        for y in 0..hu {
            for x in 0..wu {
                let on = |xx: usize, yy: usize| pred[yy * wu + xx] > DET_THRESH;
                let hit = on(x, y)
                    || (x > 0 && on(x - 1, y))
                    || (y > 0 && on(x, y - 1))
                    || (x > 0 && y > 0 && on(x - 1, y - 1));
                buf[y * wu + x] = if hit { 255 } else { 0 };
            }
        }
    }
    let contours = find_contours::<i32>(&bitmap);
    let mut boxes = Vec::new();
    for contour in contours.iter().take(DET_MAX_CANDIDATES) {
        let pts: Vec<[f64; 2]> = contour.points.iter().map(|p| [f64::from(p.x), f64::from(p.y)]).collect();
        let Some((quad, sside)) = mini_box(&pts) else { continue };
        if sside < DET_MIN_SIZE {
            continue;
        }
        if box_score_fast(pred, wu, hu, &quad) < f64::from(DET_BOX_THRESH) {
            continue;
        }
        let expanded = unclip(&quad);
        if expanded.len() < 3 {
            continue;
        }
        let Some((quad, sside)) = mini_box(&expanded) else { continue };
        if sside < DET_MIN_SIZE + 2.0 {
            continue;
        }
        boxes.push(quad.map(|p| {
            [
                (p[0] / f64::from(w) * f64::from(dest_w)).round_ties_even().clamp(0.0, f64::from(dest_w)) as i32,
                (p[1] / f64::from(h) * f64::from(dest_h)).round_ties_even().clamp(0.0, f64::from(dest_h)) as i32,
            ]
        }));
    }
    boxes
}

/// `box_score_fast`: mean of `pred` inside the quad (filled with `imageproc`, like
/// `cv2.fillPoly` on the integer-truncated corners) within its clipped bounding box.
fn box_score_fast(pred: &[f32], w: usize, h: usize, quad: &[[f64; 2]; 4]) -> f64 {
    let min_x = quad.iter().map(|p| p[0]).fold(f64::MAX, f64::min);
    let max_x = quad.iter().map(|p| p[0]).fold(f64::MIN, f64::max);
    let min_y = quad.iter().map(|p| p[1]).fold(f64::MAX, f64::min);
    let max_y = quad.iter().map(|p| p[1]).fold(f64::MIN, f64::max);
    let xmin = (min_x.floor() as i64).clamp(0, w as i64 - 1);
    let xmax = (max_x.ceil() as i64).clamp(0, w as i64 - 1);
    let ymin = (min_y.floor() as i64).clamp(0, h as i64 - 1);
    let ymax = (max_y.ceil() as i64).clamp(0, h as i64 - 1);
    let (mw, mh) = ((xmax - xmin + 1) as u32, (ymax - ymin + 1) as u32);
    let mut mask = image::GrayImage::new(mw, mh);
    let mut poly: Vec<imageproc::point::Point<i32>> = quad
        .iter()
        .map(|p| imageproc::point::Point::new((p[0] - xmin as f64) as i32, (p[1] - ymin as f64) as i32))
        .collect();
    poly.dedup();
    while poly.len() > 1 && poly.first() == poly.last() {
        poly.pop();
    }
    if poly.is_empty() {
        return 0.0;
    }
    imageproc::drawing::draw_polygon_mut(&mut mask, &poly, image::Luma([1u8]));
    let (mut sum, mut count) = (0f64, 0u64);
    for (mx, my, m) in mask.enumerate_pixels() {
        if m.0[0] != 0 {
            sum += f64::from(pred[(ymin as usize + my as usize) * w + xmin as usize + mx as usize]);
            count += 1;
        }
    }
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// `DBPostProcess.unclip`: offset by `area × ratio / perimeter` with round joins (Clipper 6,
/// integer corners truncated as pyclipper does); the expanded polygon's points.
fn unclip(quad: &[[f64; 2]; 4]) -> Vec<[f64; 2]> {
    let mut area2 = 0.0;
    let mut perimeter = 0.0;
    for i in 0..4 {
        let (a, b) = (quad[i], quad[(i + 1) % 4]);
        area2 += a[0] * b[1] - b[0] * a[1];
        perimeter += ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2)).sqrt();
    }
    if perimeter <= 0.0 {
        return Vec::new();
    }
    let distance = (area2 / 2.0).abs() * DET_UNCLIP_RATIO / perimeter;
    let ring: Vec<Coord<i64>> = quad.iter().map(|p| Coord { x: p[0] as i64, y: p[1] as i64 }).collect();
    let poly = Polygon::new(LineString::new(ring), vec![]);
    let out = poly.offset(distance, JoinType::Round(CLIPPER_ARC_TOLERANCE), EndType::ClosedPolygon);
    out.0.iter().flat_map(|p| p.exterior().0.iter().map(|c| [c.x as f64, c.y as f64])).collect()
}

/// `order_points_clockwise`: tl, tr, br, bl from x-sorted then y-sorted pairs.
fn order_points_clockwise(q: [[i32; 2]; 4]) -> [[i32; 2]; 4] {
    let mut xs = q;
    xs.sort_by_key(|p| p[0]);
    let mut left = [xs[0], xs[1]];
    let mut right = [xs[2], xs[3]];
    left.sort_by_key(|p| p[1]);
    right.sort_by_key(|p| p[1]);
    [left[0], right[0], right[1], left[1]]
}

/// `RapidOCR.sorted_boxes`: by top-left (y, x), then lines within 10 px reordered by x.
fn sorted_boxes(mut boxes: Vec<[[i32; 2]; 4]>) -> Vec<[[i32; 2]; 4]> {
    boxes.sort_by(|a, b| (a[0][1], a[0][0]).cmp(&(b[0][1], b[0][0])));
    let n = boxes.len();
    for i in 0..n.saturating_sub(1) {
        for j in (0..=i).rev() {
            if (boxes[j + 1][0][1] - boxes[j][0][1]).abs() < 10 && boxes[j + 1][0][0] < boxes[j][0][0] {
                boxes.swap(j, j + 1);
            } else {
                break;
            }
        }
    }
    boxes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn det_resize_follows_limit_type_min() {
        assert_eq!(det_dims(1280, 720), (1312, 736));
        assert_eq!(det_dims(720, 528), (992, 736));
        assert_eq!(det_dims(640, 272), (1728, 736));
        assert_eq!(det_dims(1920, 1080), (1920, 1088));
    }

    #[test]
    fn ctc_merges_repeats_and_drops_blanks() {
        let chars: Vec<String> = ["blank", "a", "b", " "].iter().map(|s| s.to_string()).collect();
        // steps: a a blank a b b space
        let steps = [1usize, 1, 0, 1, 2, 2, 3];
        let mut probs = vec![0f32; steps.len() * 4];
        for (t, &c) in steps.iter().enumerate() {
            probs[t * 4 + c] = 0.8;
        }
        let (text, conf) = ctc_greedy(&probs, 4, &chars);
        assert_eq!(text, "aab ");
        assert!((conf - 0.8).abs() < 1e-6);
        assert_eq!(ctc_greedy(&[0f32; 8], 4, &chars), (String::new(), 0.0));
    }

    #[test]
    fn boxes_sort_in_reading_order() {
        let b = |x: i32, y: i32| [[x, y], [x + 10, y], [x + 10, y + 5], [x, y + 5]];
        let sorted = sorted_boxes(vec![b(50, 104), b(10, 100), b(0, 300)]);
        assert_eq!(sorted, vec![b(10, 100), b(50, 104), b(0, 300)]);
    }

    #[test]
    fn axis_aligned_crops_copy_pixels_exactly() {
        // A translation-only warp samples whole pixels: OpenCV's cubic kernel is (0, 1, 0, 0)
        // there, so the crop is the frame's pixels unchanged.
        let (w, h) = (9u32, 6u32);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let img = WorkImage { data: std::borrow::Cow::Borrowed(&data), width: w, height: h };
        let crop = Ocr::rotate_crop(&img, &[[2, 1], [7, 1], [7, 4], [2, 4]]);
        assert_eq!(crop.dimensions(), (5, 3));
        for (x, y, p) in crop.enumerate_pixels() {
            let at = (((y + 1) * w + x + 2) * 3) as usize;
            assert_eq!(p.0, [data[at], data[at + 1], data[at + 2]], "at {x},{y}");
        }
    }

    #[test]
    fn unclip_expands_a_box_by_area_over_perimeter() {
        // 100 x 20: distance = 2000 * 1.6 / 240 = 13.33; the expanded rect is ~126.7 x 46.7.
        let quad = [[0.0, 0.0], [100.0, 0.0], [100.0, 20.0], [0.0, 20.0]];
        let (rect, sside) = mini_box(&unclip(&quad)).expect("rect");
        assert!((sside - 46.67).abs() < 1.0, "{sside}");
        assert!((rect[1][0] - rect[0][0] - 126.67).abs() < 1.0, "{rect:?}");
    }
}
