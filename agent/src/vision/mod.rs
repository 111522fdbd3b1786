//! Frame-level vision analyzers on ONNX Runtime: NudeNet moderation ([`nudenet`]) and PP-OCRv4
//! on-screen text ([`ocr`]), with their aggregation into the digest's time ranges.
//!
//! Both replicate the pre- and post-processing of their Python reference packages exactly
//! where it changes results (`nudenet==3.4.2` `NudeDetector.detect`, `rapidocr-onnxruntime==1.4.4`
//! `RapidOCR.__call__`); each constant's module docs say where it comes from. Parity is tested
//! in `agent/tests/vision.rs` against fixtures in `tests/fixtures/vision/` (see its README).
//!
//! Frames come in as [`RgbFrame`]s (RGB24, tightly packed, any size); boxes come back in pixels
//! of that frame. If the caller downscaled the source before handing the frame over, it scales
//! boxes back with [`BoxPx`]-level arithmetic ([`scale_box`]).
//!
//! Licensing note: NudeNet's `320n.onnx` detector is a YOLOv8 export (Ultralytics, AGPL-3.0)
//! although the `nudenet` package declares MIT; see [`crate::models`].

pub mod aggregate;
pub mod batch;
pub mod nudenet;
pub mod ocr;
pub mod resize;

pub use aggregate::{ModerationAggregator, TextAggregator};
pub use nudenet::{Detection, NudeNet};
pub use ocr::{Ocr, OcrLine};

use gaffer_protocol::digest::BoxPx;

use crate::models::ModelsError;

/// Largest frame side accepted, pixels (8K is 7680; anything larger is refused before any
/// buffer is sized from it).
pub const FRAME_SIDE_PX_MAX: u32 = 8192;

/// An RGB24 frame, tightly packed: `data.len() == width * height * 3`, row stride `width * 3`,
/// top row first. Boxes computed on it are in its pixels.
#[derive(Debug, Clone, Copy)]
pub struct RgbFrame<'a> {
    /// Pixels, `R, G, B` per pixel.
    pub data: &'a [u8],
    /// Width, pixels (1..=[`FRAME_SIDE_PX_MAX`]).
    pub width: u32,
    /// Height, pixels (1..=[`FRAME_SIDE_PX_MAX`]).
    pub height: u32,
}

impl RgbFrame<'_> {
    /// Checks the dimensions and the buffer length.
    ///
    /// # Errors
    /// [`VisionError::BadFrame`] when a side is 0 or above [`FRAME_SIDE_PX_MAX`], or the buffer
    /// is not `width * height * 3` bytes.
    pub fn validate(&self) -> Result<(), VisionError> {
        if self.width == 0 || self.height == 0 || self.width > FRAME_SIDE_PX_MAX || self.height > FRAME_SIDE_PX_MAX {
            return Err(VisionError::BadFrame {
                detail: format!("{}x{} outside 1..={FRAME_SIDE_PX_MAX} per side", self.width, self.height),
            });
        }
        let want = self.width as usize * self.height as usize * 3;
        if self.data.len() != want {
            return Err(VisionError::BadFrame {
                detail: format!("{}x{} RGB24 needs {want} bytes, got {}", self.width, self.height, self.data.len()),
            });
        }
        Ok(())
    }
}

/// Scales a box from a downscaled frame back to source pixels: `factor` = source width /
/// analyzed width (the same for height when the aspect ratio is kept).
pub fn scale_box(b: BoxPx, factor: f32) -> BoxPx {
    BoxPx { x: b.x * factor, y: b.y * factor, width: b.width * factor, height: b.height * factor }
}

/// Intersection over union of two boxes (0 when either is empty).
pub fn iou(a: &BoxPx, b: &BoxPx) -> f32 {
    let ix = (a.x + a.width).min(b.x + b.width) - a.x.max(b.x);
    let iy = (a.y + a.height).min(b.y + b.height) - a.y.max(b.y);
    if ix <= 0.0 || iy <= 0.0 {
        return 0.0;
    }
    let inter = ix * iy;
    let union = a.width * a.height + b.width * b.height - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Errors of the vision analyzers.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The frame's dimensions or buffer are invalid; the caller passed a bad frame.
    #[error("bad frame: {detail}")]
    BadFrame {
        /// What is wrong.
        detail: String,
    },
    /// The model is missing or its session could not be created: provision the models.
    #[error(transparent)]
    Models(#[from] ModelsError),
    /// The model does not have the inputs/outputs/metadata this analyzer was written for.
    #[error("model {model} has an unexpected signature: {detail}")]
    BadModel {
        /// Registry name.
        model: &'static str,
        /// What differs.
        detail: String,
    },
    /// ONNX Runtime failed while running a model (after the out-of-memory retries, if any).
    #[error("{model} inference failed: {detail}")]
    Inference {
        /// Registry name.
        model: &'static str,
        /// ONNX Runtime's error.
        detail: String,
    },
}
