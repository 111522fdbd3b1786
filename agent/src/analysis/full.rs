//! The `full` profile: the `shots` pipeline plus moderation (NudeNet), on-screen text (PP-OCR)
//! and speech (Silero VAD), all fed by the **one** demux and decode pass of
//! [`super::analyze_file_with`].
//!
//! ```text
//! decode thread (libavformat demux, libavcodec decode, as for `shots`)
//!   video packets ─▶ decoder ─▶ pictures ─(bounded queue)─▶ shots thread
//!   audio packets of the first audio stream ─▶ audio decoder ─▶ libswresample 16 kHz mono
//!        ─▶ SileroVad (512-sample windows, state carried)            [AudioTap, this thread]
//! shots thread (as for `shots`: content detector, keyframes), then [FrameTap]:
//!   every picture is held for a few frames (the hold window) until the content detector has
//!   had the chance to report a cut at it; pictures flagged for analysis leave the window
//!   ─(bounded queue of FullOptions::queue_frames_max pictures)─▶
//! inference thread [InferenceStage]:
//!   swscale ─▶ RGB24 at the analysis size ─▶ NudeNet (batches)
//!                                         └─(bounded queue of 2 frames)─▶ OCR thread: PP-OCR
//!   per-frame results, scaled back to source pixels with vision::scale_box
//! after the pass: results sorted by time ─▶ ModerationAggregator / TextAggregator ─▶ digest
//! ```
//!
//! Decode, shot detection, NudeNet and PP-OCR run on four threads, so inference overlaps
//! decoding and the two models run side by side; the bounded queues make the decoder wait when
//! inference falls behind (it is the slow stage).
//!
//! # Which frames are analyzed
//! * **Moderation** (NudeNet): the first frame of every [`FullOptions::moderation_sample_fps`]
//!   bin of presentation time (default 2 per second: the first frame at or after 0.0 s, 0.5 s,
//!   1.0 s, … by PTS), plus each shot's first frame.
//! * **On-screen text** (PP-OCR): the first frame of every [`FullOptions::ocr_sample_fps`] bin
//!   (default [`OCR_SAMPLE_FPS_DEFAULT`], lower than moderation because PP-OCR is by far the
//!   slowest model: about 1 frame/s on 2 CPU cores against NudeNet's tens), plus each shot's
//!   first frame.
//! * **Each shot's keyframe image**: the digest's keyframe is the *middle* frame of a shot,
//!   which is only known when the shot ends, long after its picture left the decoder. Holding a
//!   shot's pictures until then is unbounded, and seeking back for it costs up to a GOP of
//!   decoding per shot (5 s of 720p on `bbb-720p-x10.mp4`). So the ONNX analyzers take each
//!   shot's **first frame** (the frame at the cut, and frame 0) as the shot's image: the shots
//!   thread holds the last pictures in a window of `2 × min_shot_frames + 2` frames (at most
//!   [`HOLD_BYTES_MAX`] of decoded pictures), long enough for the content detector's flash
//!   filter to report the cut; a picture flagged as a cut frame is analyzed by both models. A
//!   cut reported after its frame left the window (only when the picture stays above the cut
//!   threshold for longer than the window) is counted in the analyzer parameters
//!   (`shot_frames_missed`); its shot is then covered by the time samples only.
//!
//! # Memory
//! Decoded pictures are moved, never copied, from the decoder to the shots thread and on to
//! the inference thread. Beyond the `shots` pipeline's own queue, at most the hold window
//! ([`HOLD_BYTES_MAX`]) and [`FullOptions::queue_frames_max`] pictures (default 8: 11 MB of
//! 720p, 25 MB of 1080p YUV 4:2:0) are held, plus one NudeNet batch of RGB24 frames at the
//! analysis size (8 × 2.8 MB at 720p) on the inference thread.
//!
//! # Analysis size
//! Frames are converted to RGB24 at the source size, or, when the shorter side is longer than
//! [`ocr::DET_LIMIT_SIDE_LEN`] (736 px), downscaled (swscale, bilinear) so the shorter side is
//! 736. PP-OCR's detector enlarges smaller frames to that shorter side anyway; for larger ones
//! (1080p, 4K) this bounds its cost (RapidOCR itself would run it at up to 2000 px), at the
//! price of very small text on such sources. NudeNet letterboxes everything to 320 px. Frames
//! up to 720p are analyzed at their own pixels, as the parity fixtures are. Boxes are scaled
//! back to source pixels ([`crate::vision::scale_box`]).
//!
//! # Threads
//! NudeNet and PP-OCR run on threads of their own, next to the decode and shots threads, so the
//! cores are shared between models rather than within one. Their sessions use the analyzers'
//! own measured options ([`NudeNet::TUNING`], [`Ocr::TUNING`]: one intra-op thread each); the
//! Silero session gets 1 intra-op thread (its windows are tiny). Measured on the 2-core box with
//! another process busy, `bbb-720p-x10.mp4` took 6.3 s with 1 intra-op thread per session and
//! 11.0 s with 2: ONNX Runtime's spinning pool threads starve everything else when the cores are
//! oversubscribed. Decoding uses the `shots` pipeline's setting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg_next as ffmpeg;
use gaffer_protocol::digest::{AnalyzerInfo, ModerationAnalysis, SpeechAnalysis, TextAnalysis};

use super::AnalysisError;
use crate::models::{ModelsError, Registry, Runtime};
use crate::speech::{self, SileroVad, SpeechError};
use crate::vision::{self, aggregate, nudenet, ocr, Detection, ModerationAggregator, NudeNet, Ocr, OcrLine};
use crate::vision::{RgbFrame, TextAggregator};

/// Default moderation sampling rate, frames per second of media: 2.
pub const MODERATION_SAMPLE_FPS_DEFAULT: f64 = 2.0;

/// Default OCR sampling rate, frames per second of media: 0.25 (one frame every 4 s), on top of
/// each shot's first frame. Chosen by measurement (`agent/benches/full.rs`, 2-core box shared
/// with other work, load ≈ 5): PP-OCR reads 3–4 frames/s of 720p there and is the pipeline's
/// critical path, so 2 per second would keep the `full` profile near real time. On
/// `bbb-720p-x10.mp4` (52.8 s, 10 shots) 0.25/s (23 frames read) ran at 6.5× real time and
/// 0.5/s (36 frames) at 5.2×; 0.25/s keeps a margin over the 5× target.
pub const OCR_SAMPLE_FPS_DEFAULT: f64 = 0.25;

/// Highest accepted sampling rate, frames per second of media: 60.
pub const SAMPLE_FPS_MAX: f64 = 60.0;

/// Default pictures queued for the inference thread: 8.
pub const QUEUE_FRAMES_DEFAULT: usize = 8;

/// Most pictures that may be queued for the inference thread: 64.
pub const QUEUE_FRAMES_MAX: usize = 64;

/// Most bytes of decoded pictures the shots thread holds while waiting for cuts: 128 MiB
/// (e.g. 32 frames of 1080p YUV 4:2:0; the window is shorter for larger frames).
pub const HOLD_BYTES_MAX: usize = 128 << 20;

/// Version of the `full` pipeline's frame selection and aggregation, in [`AnalyzerInfo`].
pub const FULL_ANALYZER_VERSION: &str = "1";

/// swscale flags for the RGB24 conversion at the source size: bicubic, FFmpeg's default
/// (what `ffmpeg -i FILE -frames:v 1 frame.png` uses, as the parity fixtures do).
const SCALE_FLAGS_CONVERT: scaling::Flags = scaling::Flags::BICUBIC;
/// swscale flags when the frame is also downscaled to the analysis size.
const SCALE_FLAGS_DOWNSCALE: scaling::Flags = scaling::Flags::BILINEAR;

/// Options of the `full` profile's ONNX analyzers.
#[derive(Debug, Clone, PartialEq)]
pub struct FullOptions {
    /// Moderation samples per second of media, by PTS. Default
    /// [`MODERATION_SAMPLE_FPS_DEFAULT`] (2). 0 analyzes only each shot's first frame. At most
    /// [`SAMPLE_FPS_MAX`].
    pub moderation_sample_fps: f64,
    /// OCR samples per second of media, by PTS. Default [`OCR_SAMPLE_FPS_DEFAULT`] (0.25). 0
    /// reads only each shot's first frame. At most [`SAMPLE_FPS_MAX`].
    pub ocr_sample_fps: f64,
    /// Pictures queued between the shots thread and the inference thread (the memory budget of
    /// queued frames). Default [`QUEUE_FRAMES_DEFAULT`] (8), 1..=[`QUEUE_FRAMES_MAX`].
    pub queue_frames_max: usize,
}

impl Default for FullOptions {
    fn default() -> Self {
        Self {
            moderation_sample_fps: MODERATION_SAMPLE_FPS_DEFAULT,
            ocr_sample_fps: OCR_SAMPLE_FPS_DEFAULT,
            queue_frames_max: QUEUE_FRAMES_DEFAULT,
        }
    }
}

impl FullOptions {
    fn validate(&self) -> Result<(), AnalysisError> {
        for (name, v) in [("moderation", self.moderation_sample_fps), ("OCR", self.ocr_sample_fps)] {
            if !v.is_finite() || !(0.0..=SAMPLE_FPS_MAX).contains(&v) {
                return Err(AnalysisError::InvalidOptions(format!(
                    "{name} sampling rate {v} frames/s is outside 0..={SAMPLE_FPS_MAX}"
                )));
            }
        }
        if !(1..=QUEUE_FRAMES_MAX).contains(&self.queue_frames_max) {
            return Err(AnalysisError::InvalidOptions(format!(
                "inference queue of {} frames is outside 1..={QUEUE_FRAMES_MAX}",
                self.queue_frames_max
            )));
        }
        Ok(())
    }
}

/// The loaded ONNX Runtime and the verified models of an agent data directory: what the `full`
/// profile needs. Cheap to share behind an `Arc`; sessions are created per analysis.
#[derive(Debug, Clone)]
pub struct Models {
    /// The loaded runtime and its execution provider.
    pub runtime: Runtime,
    /// The verified models.
    pub registry: Registry,
}

impl Models {
    /// Opens the registry of `data_dir` (hashing every installed file) and loads its ONNX
    /// Runtime, choosing CUDA when `gpu_count > 0` (see [`Runtime::init`]).
    ///
    /// # Errors
    /// [`ModelsError`] when the directory cannot be read or no runtime is installed or loadable.
    pub fn open(data_dir: &std::path::Path, gpu_count: usize) -> Result<Models, ModelsError> {
        let registry = Registry::open(data_dir)?;
        let runtime = Runtime::init(&registry, gpu_count)?;
        Ok(Models { runtime, registry })
    }

    /// The models of [`super::Profile::Full`] that are not installed and verified (empty when
    /// the profile can run).
    pub fn missing(&self) -> Vec<&'static str> {
        super::Profile::Full.required_models().iter().copied().filter(|m| !self.registry.has_all(&[m])).collect()
    }
}

/// What [`super::analyze_file_with`] needs to run the `full` profile.
#[derive(Debug, Clone, Copy)]
pub struct FullAnalysis<'a> {
    /// Runtime and models.
    pub models: &'a Models,
    /// Sampling and queue options.
    pub options: &'a FullOptions,
}

fn model_error(analyzer: &str, e: impl std::fmt::Display) -> AnalysisError {
    AnalysisError::AnalyzerFailed { analyzer: analyzer.to_owned(), reason: e.to_string() }
}

fn missing_error(models: &Models) -> AnalysisError {
    let data_dir = models.registry.data_dir().display().to_string();
    AnalysisError::ModelsUnavailable(format!(
        "missing or unverified in {data_dir}: {}; run `gaffer-agent models fetch --data-dir {data_dir}`",
        models.missing().join(", ")
    ))
}

/// One picture on its way to the inference thread, with what to run on it.
struct Sample {
    time_secs: f64,
    picture: ffmpeg::frame::Video,
    moderation: bool,
    ocr: bool,
}

/// A picture in the shots thread's hold window.
struct Held {
    frame: u64,
    sample: Sample,
}

/// The `full` profile's hook on the shots thread: picks the frames to analyze and hands them
/// to the inference thread (see the module docs, "Which frames are analyzed").
pub(crate) struct FrameTap {
    tx: SyncSender<Sample>,
    moderation_sample_fps: f64,
    ocr_sample_fps: f64,
    last_moderation_bin: Option<i64>,
    last_ocr_bin: Option<i64>,
    hold: VecDeque<Held>,
    /// Hold window in frames, set from the first picture's size.
    hold_frames: usize,
    min_shot_frames: u32,
    first_seen: bool,
    /// Cuts reported after their frame left the hold window.
    pub(crate) shot_frames_missed: u64,
    /// Shots whose first frame went to the analyzers.
    pub(crate) shot_frames: u64,
}

impl FrameTap {
    fn bin(time_secs: f64, fps: f64) -> Option<i64> {
        (fps > 0.0 && time_secs.is_finite()).then(|| (time_secs.max(0.0) * fps).floor() as i64)
    }

    /// Takes one picture after the shots analysis ran on it; `cut` is the frame of a cut the
    /// content detector reported while processing it (at this frame or an earlier one).
    ///
    /// # Errors
    /// [`AnalysisError::Internal`] when the inference thread stopped (its own error explains
    /// why and is reported instead).
    pub(crate) fn on_frame(
        &mut self,
        frame: u64,
        time_secs: f64,
        picture: ffmpeg::frame::Video,
        cut: Option<u64>,
    ) -> Result<(), AnalysisError> {
        if let Some(c) = cut {
            match self.hold.iter_mut().find(|h| h.frame == c) {
                Some(h) => {
                    h.sample.moderation = true;
                    h.sample.ocr = true;
                    self.shot_frames += 1;
                }
                None if c == frame => {}
                None => {
                    tracing::debug!(cut = c, frame, "cut reported after its frame left the hold window");
                    self.shot_frames_missed += 1;
                }
            }
        }
        if self.hold_frames == 0 {
            let bytes = (picture.width() as usize * picture.height() as usize * 3 / 2).max(1);
            let by_bytes = (HOLD_BYTES_MAX / bytes).max(2);
            self.hold_frames = (2 * self.min_shot_frames as usize + 2).min(by_bytes);
        }
        let moderation_bin = Self::bin(time_secs, self.moderation_sample_fps);
        let ocr_bin = Self::bin(time_secs, self.ocr_sample_fps);
        let mut moderation = moderation_bin.is_some() && moderation_bin != self.last_moderation_bin;
        let mut ocr = ocr_bin.is_some() && ocr_bin != self.last_ocr_bin;
        if moderation {
            self.last_moderation_bin = moderation_bin;
        }
        if ocr {
            self.last_ocr_bin = ocr_bin;
        }
        let first = !self.first_seen;
        self.first_seen = true;
        // A cut at this very frame (no delay), and the first frame, which starts shot 0.
        if first || cut == Some(frame) {
            moderation = true;
            ocr = true;
            self.shot_frames += 1;
        }
        self.hold.push_back(Held { frame, sample: Sample { time_secs, picture, moderation, ocr } });
        while self.hold.len() > self.hold_frames {
            self.release_oldest()?;
        }
        Ok(())
    }

    fn release_oldest(&mut self) -> Result<(), AnalysisError> {
        let Some(h) = self.hold.pop_front() else { return Ok(()) };
        if h.sample.moderation || h.sample.ocr {
            self.tx.send(h.sample).map_err(|_| AnalysisError::Internal("the inference thread stopped".into()))?;
        }
        Ok(())
    }

    /// Sends what is left in the hold window and hangs up on the inference thread.
    ///
    /// # Errors
    /// As [`FrameTap::on_frame`].
    pub(crate) fn finish(&mut self) -> Result<(), AnalysisError> {
        while !self.hold.is_empty() {
            self.release_oldest()?;
        }
        Ok(())
    }
}

/// Converts pictures to tightly packed RGB24 at the analysis size.
struct RgbConverter {
    scaler: Option<scaling::Context>,
    out: ffmpeg::frame::Video,
}

impl RgbConverter {
    fn convert(
        &mut self,
        picture: &ffmpeg::frame::Video,
        (aw, ah): (u32, u32),
        packed: &mut Vec<u8>,
    ) -> Result<(), AnalysisError> {
        let (w, h) = (picture.width(), picture.height());
        let matches = self.scaler.as_ref().is_some_and(|s| {
            let i = s.input();
            i.format == picture.format() && i.width == w && i.height == h
        });
        if !matches {
            let flags = if (aw, ah) == (w, h) { SCALE_FLAGS_CONVERT } else { SCALE_FLAGS_DOWNSCALE };
            let s = scaling::Context::get(picture.format(), w, h, Pixel::RGB24, aw, ah, flags).map_err(|e| {
                AnalysisError::DecodeFailed {
                    reason: format!("cannot convert pixel format {:?} {w}x{h} to RGB24: {e}", picture.format()),
                }
            })?;
            self.scaler = Some(s);
        }
        let Some(s) = self.scaler.as_mut() else {
            return Err(AnalysisError::Internal("scaler missing after setup".into()));
        };
        s.run(picture, &mut self.out)
            .map_err(|e| AnalysisError::DecodeFailed { reason: format!("RGB conversion failed: {e}") })?;
        let stride = self.out.stride(0);
        let row = aw as usize * 3;
        let data = self.out.data(0);
        packed.clear();
        packed.reserve(row * ah as usize);
        for y in 0..ah as usize {
            let line = data
                .get(y * stride..y * stride + row)
                .ok_or_else(|| AnalysisError::Internal("converted frame smaller than its size".into()))?;
            packed.extend_from_slice(line);
        }
        Ok(())
    }
}

/// Per-frame results of the inference thread, in the order frames were analyzed.
#[derive(Debug, Default)]
pub(crate) struct VisionOutput {
    detections: Vec<(f64, Vec<Detection>)>,
    readings: Vec<(f64, Vec<OcrLine>)>,
    analysis_size: (u32, u32),
    nudenet_secs: f64,
    ocr_secs: f64,
    batch_frames: usize,
}

/// The inference thread's side: NudeNet and PP-OCR sessions and the receiving end of the queue.
pub(crate) struct InferenceStage {
    rx: Receiver<Sample>,
    nudenet: NudeNet,
    ocr: Ocr,
    /// Source size (width, height), from the container.
    source: (u32, u32),
}

/// Analysis size for a `w` × `h` source (see the module docs): the source size, or scaled so
/// the shorter side is [`ocr::DET_LIMIT_SIDE_LEN`], sides rounded to even.
pub fn analysis_size(w: u32, h: u32) -> (u32, u32) {
    let short = w.min(h);
    if short <= ocr::DET_LIMIT_SIDE_LEN || short == 0 {
        return (w, h);
    }
    let f = f64::from(ocr::DET_LIMIT_SIDE_LEN) / f64::from(short);
    let side = |v: u32| ((f64::from(v) * f / 2.0).round() as u32 * 2).max(2);
    (side(w), side(h))
}

/// One frame for the OCR thread: RGB24 at the analysis size, and the factor back to source
/// pixels.
struct OcrJob {
    time_secs: f64,
    rgb: Vec<u8>,
    size: (u32, u32),
    factor: f32,
}

/// Frames queued for the OCR thread: 2 (2 × 2.8 MB of RGB24 at 720p).
const OCR_QUEUE_FRAMES: usize = 2;

/// Per-frame OCR results and the time spent in [`Ocr::read`].
type OcrOutput = (Vec<(f64, Vec<OcrLine>)>, f64);

fn ocr_loop(ocr: &mut Ocr, jobs: Receiver<OcrJob>, cancel: &AtomicBool) -> Result<OcrOutput, AnalysisError> {
    let mut readings = Vec::new();
    let mut secs = 0.0;
    for job in jobs {
        if cancel.load(Ordering::Relaxed) {
            return Err(AnalysisError::Cancelled);
        }
        let started = std::time::Instant::now();
        let frame = RgbFrame { data: &job.rgb, width: job.size.0, height: job.size.1 };
        let mut lines = ocr.read(&frame).map_err(|e| model_error("text.ppocr", e))?;
        for l in &mut lines {
            l.box_px = vision::scale_box(l.box_px, job.factor);
            for p in &mut l.quad_px {
                p[0] *= job.factor;
                p[1] *= job.factor;
            }
        }
        readings.push((job.time_secs, lines));
        secs += started.elapsed().as_secs_f64();
    }
    Ok((readings, secs))
}

impl InferenceStage {
    /// Runs until the shots thread hangs up; checks `cancel` for every frame. PP-OCR runs on
    /// its own thread next to this one (NudeNet), so the two models use both cores.
    pub(crate) fn run(self, cancel: &AtomicBool) -> Result<VisionOutput, AnalysisError> {
        let InferenceStage { rx, mut nudenet, mut ocr, source } = self;
        let (ocr_tx, ocr_rx) = std::sync::mpsc::sync_channel::<OcrJob>(OCR_QUEUE_FRAMES);
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("gaffer-ocr".to_string())
                .spawn_scoped(scope, move || ocr_loop(&mut ocr, ocr_rx, cancel))
                .map_err(|e| AnalysisError::Internal(format!("cannot start the OCR thread: {e}")))?;
            let detected = Self::detect_loop(&rx, &mut nudenet, ocr_tx, source, cancel);
            let read = worker.join().unwrap_or_else(|_| Err(AnalysisError::Internal("the OCR thread panicked".into())));
            // An OCR error explains a failed send to the OCR thread.
            let (readings, ocr_secs) = read?;
            let mut out = detected?;
            out.readings = readings;
            out.ocr_secs = ocr_secs;
            Ok(out)
        })
    }

    fn detect_loop(
        rx: &Receiver<Sample>,
        nudenet: &mut NudeNet,
        ocr_tx: SyncSender<OcrJob>,
        source: (u32, u32),
        cancel: &AtomicBool,
    ) -> Result<VisionOutput, AnalysisError> {
        let mut converter = RgbConverter { scaler: None, out: ffmpeg::frame::Video::empty() };
        let mut out = VisionOutput::default();
        let mut pending: Vec<(f64, Vec<u8>)> = Vec::new();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut size = analysis_size(source.0, source.1);
        let mut picture_size = source;
        for sample in rx {
            if cancel.load(Ordering::Relaxed) {
                return Err(AnalysisError::Cancelled);
            }
            let (pw, ph) = (sample.picture.width(), sample.picture.height());
            if pw == 0 || ph == 0 {
                continue;
            }
            // A mid-stream size change: finish the batch at the old size first.
            if (pw, ph) != picture_size {
                Self::detect(nudenet, &mut pending, &mut spare, size, picture_size, &mut out)?;
                (size, picture_size) = (analysis_size(pw, ph), (pw, ph));
            }
            let factor = pw as f32 / size.0 as f32;
            let mut rgb = spare.pop().unwrap_or_default();
            converter.convert(&sample.picture, size, &mut rgb)?;
            drop(sample.picture);
            if sample.ocr {
                let job = OcrJob { time_secs: sample.time_secs, rgb: rgb.clone(), size, factor };
                ocr_tx.send(job).map_err(|_| AnalysisError::Internal("the OCR thread stopped".into()))?;
            }
            if sample.moderation {
                pending.push((sample.time_secs, rgb));
                if pending.len() >= nudenet.batch_frames() {
                    Self::detect(nudenet, &mut pending, &mut spare, size, picture_size, &mut out)?;
                }
            } else {
                spare.push(rgb);
            }
        }
        Self::detect(nudenet, &mut pending, &mut spare, size, picture_size, &mut out)?;
        out.analysis_size = size;
        out.batch_frames = nudenet.batch_frames();
        Ok(out)
    }

    /// Runs NudeNet on the pending frames (all of `size`, from pictures of `picture_size`).
    fn detect(
        nudenet: &mut NudeNet,
        pending: &mut Vec<(f64, Vec<u8>)>,
        spare: &mut Vec<Vec<u8>>,
        size: (u32, u32),
        picture_size: (u32, u32),
        out: &mut VisionOutput,
    ) -> Result<(), AnalysisError> {
        if pending.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let frames: Vec<RgbFrame<'_>> =
            pending.iter().map(|(_, d)| RgbFrame { data: d, width: size.0, height: size.1 }).collect();
        let results = nudenet.detect_batch(&frames).map_err(|e| model_error("moderation.nudenet", e))?;
        drop(frames);
        let factor = picture_size.0 as f32 / size.0 as f32;
        for ((time_secs, rgb), mut dets) in pending.drain(..).zip(results) {
            for d in &mut dets {
                d.box_px = vision::scale_box(d.box_px, factor);
            }
            out.detections.push((time_secs, dets));
            spare.push(rgb);
        }
        out.nudenet_secs += started.elapsed().as_secs_f64();
        Ok(())
    }
}

/// The `full` profile's hook on the decode thread: decodes the first audio stream's packets,
/// resamples them to 16 kHz mono and runs Silero VAD on them.
pub(crate) struct AudioTap {
    stream_index: usize,
    decoder: ffmpeg::decoder::Audio,
    frame: ffmpeg::frame::Audio,
    resampler: Option<ffmpeg::software::resampling::Context>,
    vad: SileroVad,
    decode_errors: u32,
}

/// Audio packets in a row that may fail to decode before the speech analysis gives up: 1000
/// (as `speech::audio::decode_resampled`).
const AUDIO_DECODE_ERRORS_MAX: u32 = 1000;

fn speech_error(e: SpeechError) -> AnalysisError {
    match e {
        SpeechError::Cancelled => AnalysisError::Cancelled,
        e => model_error("speech.silero_vad", e),
    }
}

impl AudioTap {
    /// Feeds a packet of any stream; packets of other streams than the analyzed audio stream
    /// are ignored.
    ///
    /// # Errors
    /// [`AnalysisError::AnalyzerFailed`] for audio outside the limits, too many undecodable
    /// packets, or a VAD failure.
    pub(crate) fn on_packet(&mut self, packet: &ffmpeg::Packet) -> Result<(), AnalysisError> {
        if packet.stream() != self.stream_index {
            return Ok(());
        }
        if let Err(e) = self.decoder.send_packet(packet) {
            self.decode_errors += 1;
            tracing::debug!(error = %e, "audio packet failed to decode; skipped");
            if self.decode_errors > AUDIO_DECODE_ERRORS_MAX {
                return Err(model_error("speech.silero_vad", format!("too many undecodable audio packets: {e}")));
            }
        }
        self.drain()
    }

    fn drain(&mut self) -> Result<(), AnalysisError> {
        let vad = &mut self.vad;
        speech::audio::drain(
            &mut self.decoder,
            &mut self.frame,
            &mut self.resampler,
            speech::vad::SAMPLE_RATE_HZ,
            &mut |s| vad.push_samples(s),
        )
        .map_err(speech_error)
    }

    /// Flushes the decoder and resampler and runs the last window.
    ///
    /// # Errors
    /// As [`AudioTap::on_packet`].
    pub(crate) fn finish(mut self) -> Result<(usize, speech::VadResult), AnalysisError> {
        if self.decoder.send_eof().is_ok() {
            self.drain()?;
        }
        let vad = &mut self.vad;
        if let Some(r) = self.resampler.as_mut() {
            speech::audio::flush(r, &mut |s| vad.push_samples(s)).map_err(speech_error)?;
        }
        let result = self.vad.finish().map_err(speech_error)?;
        Ok((self.stream_index, result))
    }
}

/// The `full` profile's stages for one analysis, set up before decoding starts.
pub(crate) struct FullRun {
    pub(crate) frame_tap: FrameTap,
    pub(crate) inference: InferenceStage,
    pub(crate) audio: Option<AudioTap>,
    stamps: Stamps,
    options: FullOptions,
    provider: String,
}

struct Stamps {
    nudenet: gaffer_protocol::digest::ModelStamp,
    det: gaffer_protocol::digest::ModelStamp,
    rec: gaffer_protocol::digest::ModelStamp,
    cls: gaffer_protocol::digest::ModelStamp,
    vad: gaffer_protocol::digest::ModelStamp,
}

impl FullRun {
    /// Opens the model sessions, and the decoder of `input`'s first audio stream (if any);
    /// `source` is the primary video stream's declared (width, height) in pixels.
    pub(crate) fn new(
        full: &FullAnalysis<'_>,
        input: &ffmpeg::format::context::Input,
        source: (u32, u32),
        min_shot_frames: u32,
    ) -> Result<FullRun, AnalysisError> {
        full.options.validate()?;
        let models = full.models;
        if !models.missing().is_empty() {
            return Err(missing_error(models));
        }
        let stamp = |name: &str| models.registry.stamp(name).ok_or_else(|| missing_error(models));
        let stamps = Stamps {
            nudenet: stamp(nudenet::MODEL_NAME)?,
            det: stamp(ocr::DET_MODEL)?,
            rec: stamp(ocr::REC_MODEL)?,
            cls: stamp(ocr::CLS_MODEL)?,
            vad: stamp(speech::vad::MODEL_NAME)?,
        };
        let runtime = &models.runtime;
        let nudenet = NudeNet::new(runtime, &models.registry).map_err(|e| model_error("moderation.nudenet", e))?;
        let ocr = Ocr::new(runtime, &models.registry).map_err(|e| model_error("text.ppocr", e))?;
        let audio = match input.streams().find(|s| s.parameters().medium() == ffmpeg::media::Type::Audio) {
            None => None,
            Some(stream) => {
                let mut vad_runtime = models.runtime.clone();
                vad_runtime.set_intra_threads(1);
                let vad = SileroVad::new(&vad_runtime, &models.registry).map_err(speech_error)?;
                let ctx = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
                    .map_err(|e| model_error("speech.silero_vad", format!("bad audio codec parameters: {e}")))?;
                let codec = format!("{:?}", ctx.id()).to_lowercase();
                if ffmpeg::decoder::find(ctx.id()).is_none() {
                    return Err(model_error("speech.silero_vad", format!("no decoder for audio codec {codec}")));
                }
                let mut decoder = ctx.decoder();
                decoder.set_packet_time_base(stream.time_base());
                let decoder = decoder
                    .audio()
                    .map_err(|e| model_error("speech.silero_vad", format!("cannot open the {codec} decoder: {e}")))?;
                Some(AudioTap {
                    stream_index: stream.index(),
                    decoder,
                    frame: ffmpeg::frame::Audio::empty(),
                    resampler: None,
                    vad,
                    decode_errors: 0,
                })
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(full.options.queue_frames_max);
        let frame_tap = FrameTap {
            tx,
            moderation_sample_fps: full.options.moderation_sample_fps,
            ocr_sample_fps: full.options.ocr_sample_fps,
            last_moderation_bin: None,
            last_ocr_bin: None,
            hold: VecDeque::new(),
            hold_frames: 0,
            min_shot_frames,
            first_seen: false,
            shot_frames_missed: 0,
            shot_frames: 0,
        };
        Ok(FullRun {
            frame_tap,
            inference: InferenceStage { rx, nudenet, ocr, source },
            audio,
            stamps,
            options: full.options.clone(),
            provider: runtime.provider().provider,
        })
    }
}

/// The `full` profile's sections of the digest, and the analyzer entries describing them.
pub(crate) struct FullSections {
    pub(crate) moderation: ModerationAnalysis,
    pub(crate) text: TextAnalysis,
    pub(crate) speech: Option<SpeechAnalysis>,
    pub(crate) analyzers: Vec<AnalyzerInfo>,
}

/// What is left of a [`FullRun`] once its stages moved onto their threads.
pub(crate) struct FullFinish {
    stamps: Stamps,
    options: FullOptions,
    provider: String,
}

impl FullRun {
    /// Splits the run into its stages and what [`FullFinish::sections`] needs afterwards.
    pub(crate) fn split(self) -> (FrameTap, InferenceStage, Option<AudioTap>, FullFinish) {
        let finish = FullFinish { stamps: self.stamps, options: self.options, provider: self.provider };
        (self.frame_tap, self.inference, self.audio, finish)
    }
}

impl FullFinish {
    /// Aggregates the per-frame results (sorted by time) into the digest's sections.
    pub(crate) fn sections(
        self,
        mut vision: VisionOutput,
        speech: Option<(usize, speech::VadResult)>,
        tap_stats: (u64, u64),
    ) -> FullSections {
        let ocr_gap_secs = if self.options.ocr_sample_fps > 0.0 {
            (1.5 / self.options.ocr_sample_fps).max(aggregate::GAP_SECS_DEFAULT)
        } else {
            aggregate::GAP_SECS_DEFAULT
        };
        let moderation_gap_secs = if self.options.moderation_sample_fps > 0.0 {
            (1.5 / self.options.moderation_sample_fps).max(aggregate::GAP_SECS_DEFAULT)
        } else {
            aggregate::GAP_SECS_DEFAULT
        };
        // Shot first frames reach the inference thread a few frames late; sort by time (stable).
        vision.detections.sort_by(|a, b| a.0.total_cmp(&b.0));
        vision.readings.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut moderation = ModerationAggregator::new(moderation_gap_secs);
        for (t, d) in &vision.detections {
            moderation.push(*t, d);
        }
        let mut text = TextAggregator::new(ocr_gap_secs);
        for (t, l) in &vision.readings {
            text.push(*t, l);
        }
        let (aw, ah) = vision.analysis_size;
        let (shot_frames, shot_frames_missed) = tap_stats;
        let common = |extra: Vec<(String, String)>| {
            let mut p = vec![
                ("execution_provider".to_owned(), self.provider.clone()),
                ("analysis_size".to_owned(), format!("{aw}x{ah}")),
                ("shot_frames".to_owned(), shot_frames.to_string()),
                ("shot_frames_missed".to_owned(), shot_frames_missed.to_string()),
            ];
            p.extend(extra);
            p
        };
        let mut analyzers = vec![
            AnalyzerInfo {
                name: "moderation.nudenet".to_owned(),
                version: FULL_ANALYZER_VERSION.to_owned(),
                parameters: common(vec![
                    ("reference".to_owned(), "nudenet 3.4.2 NudeDetector.detect (320n)".to_owned()),
                    ("sample_fps".to_owned(), self.options.moderation_sample_fps.to_string()),
                    ("plus".to_owned(), "each shot's first frame".to_owned()),
                    ("score_threshold".to_owned(), nudenet::SCORE_THRESHOLD.to_string()),
                    ("nms_iou".to_owned(), nudenet::NMS_IOU_THRESHOLD.to_string()),
                    ("range_gap_secs".to_owned(), moderation_gap_secs.to_string()),
                    ("batch_frames".to_owned(), vision.batch_frames.to_string()),
                    ("inference_secs".to_owned(), format!("{:.3}", vision.nudenet_secs)),
                ]),
            },
            AnalyzerInfo {
                name: "text.ppocr".to_owned(),
                version: FULL_ANALYZER_VERSION.to_owned(),
                parameters: common(vec![
                    ("reference".to_owned(), "rapidocr-onnxruntime 1.4.4 RapidOCR (default config)".to_owned()),
                    ("sample_fps".to_owned(), self.options.ocr_sample_fps.to_string()),
                    ("plus".to_owned(), "each shot's first frame".to_owned()),
                    ("det_thresh".to_owned(), ocr::DET_THRESH.to_string()),
                    ("det_box_thresh".to_owned(), ocr::DET_BOX_THRESH.to_string()),
                    ("det_unclip_ratio".to_owned(), ocr::DET_UNCLIP_RATIO.to_string()),
                    ("text_score".to_owned(), ocr::TEXT_SCORE.to_string()),
                    ("range_gap_secs".to_owned(), ocr_gap_secs.to_string()),
                    ("inference_secs".to_owned(), format!("{:.3}", vision.ocr_secs)),
                ]),
            },
        ];
        let speech = speech.map(|(index, result)| {
            let p = speech::VadParams::default();
            analyzers.push(AnalyzerInfo {
                name: "speech.silero_vad".to_owned(),
                version: FULL_ANALYZER_VERSION.to_owned(),
                parameters: vec![
                    ("reference".to_owned(), "silero-vad 6.2.3 get_speech_timestamps (defaults)".to_owned()),
                    ("audio_stream".to_owned(), index.to_string()),
                    ("resample".to_owned(), "libswresample, 16000 Hz mono f32".to_owned()),
                    ("window_samples".to_owned(), speech::vad::WINDOW_SAMPLES.to_string()),
                    ("threshold".to_owned(), p.threshold.to_string()),
                    ("neg_threshold".to_owned(), p.neg_threshold.to_string()),
                    ("min_speech_duration_ms".to_owned(), p.min_speech_duration_ms.to_string()),
                    ("min_silence_duration_ms".to_owned(), p.min_silence_duration_ms.to_string()),
                    ("speech_pad_ms".to_owned(), p.speech_pad_ms.to_string()),
                ],
            });
            speech::to_analysis(&result, self.stamps.vad.clone(), index)
        });
        let frames_moderated = moderation.frames();
        let frames_read = text.frames();
        FullSections {
            moderation: ModerationAnalysis {
                model: self.stamps.nudenet,
                sample_fps: self.options.moderation_sample_fps,
                score_threshold: nudenet::SCORE_THRESHOLD,
                frames_analyzed: frames_moderated,
                ranges: moderation.finish(),
            },
            text: TextAnalysis {
                detector: self.stamps.det,
                recognizer: self.stamps.rec,
                classifier: Some(self.stamps.cls),
                frames_analyzed: frames_read,
                readings: text.finish(),
            },
            speech,
            analyzers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analysis_size_keeps_small_frames_and_limits_the_short_side() {
        assert_eq!(analysis_size(1280, 720), (1280, 720));
        assert_eq!(analysis_size(720, 528), (720, 528));
        assert_eq!(analysis_size(1920, 1080), (1308, 736));
        assert_eq!(analysis_size(3840, 2160), (1308, 736));
        assert_eq!(analysis_size(1080, 1920), (736, 1308));
    }

    #[test]
    fn sampling_bins_take_the_first_frame_of_each_bin() {
        let frames: Vec<f64> = (0..100).map(|i| f64::from(i) / 25.0).collect();
        let mut last = None;
        let mut picked = Vec::new();
        for t in &frames {
            let b = FrameTap::bin(*t, 2.0);
            if b != last {
                last = b;
                picked.push(*t);
            }
        }
        assert_eq!(picked, vec![0.0, 0.52, 1.0, 1.52, 2.0, 2.52, 3.0, 3.52], "25 fps, 4 s, 2 samples/s");
        assert_eq!(FrameTap::bin(1.0, 0.0), None, "rate 0 samples nothing");
    }
}
