//! The digest: the result of analyzing one media file.
//!
//! A digest is metadata only. It never holds pixels, audio samples or bytes of the file: keyframes
//! travel as a timestamp and a 64-bit perceptual hash.
//!
//! Units, everywhere in this schema:
//! * times are seconds from the start of the presentation, `f64`, computed as PTS × time base minus
//!   the stream's start time;
//! * frame numbers count decoded video frames from 0 in presentation order;
//! * scores are in the unit their field names (HSV delta units 0–255 for shot detection).
//!
//! The schema is versioned by [`DIGEST_SCHEMA_VERSION`]; the JSON the API and
//! `gaffer-agent analyze --json` print is the serde JSON form of [`Digest`].
//!
//! Serde note: this type is also carried in bincode (a non-self-describing format), so no field may
//! use `skip_serializing_if`, `flatten` or internally tagged enums.

use serde::{Deserialize, Serialize};

/// Version of the digest schema. Bump on any change of a field's meaning or type.
pub const DIGEST_SCHEMA_VERSION: u32 = 2;

/// The result of one job.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    /// [`DIGEST_SCHEMA_VERSION`] of the producer.
    pub schema_version: u32,
    /// Profile that produced it (`"shots"`).
    pub profile: String,
    /// Which file was analyzed.
    pub source: SourceInfo,
    /// Container and stream metadata.
    pub technical: TechnicalMetadata,
    /// Shot boundary detection result: shots, the cuts between them and their keyframes.
    pub shots: ShotAnalysis,
    /// Moderation detections (profile `full`).
    pub moderation: Option<ModerationAnalysis>,
    /// On-screen text (profile `full`).
    pub text: Option<TextAnalysis>,
    /// Speech segments (profile `full`; None when the file has no audio stream).
    pub speech: Option<SpeechAnalysis>,
    /// Analyzers that ran, with their versions and parameters.
    pub analyzers: Vec<AnalyzerInfo>,
    /// Wall time the analysis took on the agent, seconds.
    pub analysis_secs: f64,
}

/// Identity of the analyzed file (never its content).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Absolute path on the agent's box.
    pub path: String,
    /// File size, bytes.
    pub size_bytes: u64,
    /// Modification time, Unix seconds (None when the file system does not say).
    pub modified_unix_secs: Option<i64>,
}

/// Container and stream metadata, as FFmpeg reports it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TechnicalMetadata {
    /// Container format short name(s), e.g. `"mov,mp4,m4a,3gp,3g2,mj2"` or `"avi"`.
    pub container: String,
    /// Container long name, e.g. `"QuickTime / MOV"`.
    pub container_long_name: String,
    /// Duration of the container, seconds (None when unknown).
    pub duration_secs: Option<f64>,
    /// Overall bit rate, bits per second (None when unknown).
    pub bit_rate_bps: Option<u64>,
    /// Every stream in the container.
    pub streams: Vec<StreamInfo>,
    /// Index (into `streams`) of the video stream that was analyzed.
    pub primary_video_stream: Option<u32>,
}

/// Kind of a stream.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// Video.
    Video,
    /// Audio.
    Audio,
    /// Subtitles.
    Subtitle,
    /// Data (timecode tracks and the like).
    Data,
    /// Attachments (fonts).
    Attachment,
    /// Anything else.
    Unknown,
}

/// One stream of the container.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream index in the container.
    pub index: u32,
    /// Video, audio, ...
    pub kind: StreamKind,
    /// Codec short name, e.g. `"h264"`, `"aac"`.
    pub codec: String,
    /// Time base as (numerator, denominator): PTS × num / den = seconds.
    pub time_base: (i32, i32),
    /// Stream duration, seconds (None when unknown).
    pub duration_secs: Option<f64>,
    /// Frame count the container declares (None when it does not); the decoded count is in
    /// [`ShotAnalysis::frames_decoded`].
    pub frames_declared: Option<u64>,
    /// Video: coded width, pixels.
    pub width: Option<u32>,
    /// Video: coded height, pixels.
    pub height: Option<u32>,
    /// Video: average frame rate, frames per second.
    pub frame_rate_fps: Option<f64>,
    /// Video: pixel format name, e.g. `"yuv420p"`.
    pub pixel_format: Option<String>,
    /// Audio: sample rate, Hz.
    pub sample_rate_hz: Option<u32>,
    /// Audio: channel count.
    pub channels: Option<u32>,
    /// Bit rate, bits per second (None when unknown).
    pub bit_rate_bps: Option<u64>,
    /// Language tag from the container metadata, if any.
    pub language: Option<String>,
}

/// Shot boundary detection result.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShotAnalysis {
    /// Detector name, e.g. `"content"`.
    pub detector: String,
    /// Cut threshold, HSV delta units 0–255.
    pub threshold: f64,
    /// Minimum shot length, frames.
    pub min_shot_frames: u32,
    /// Video frames decoded.
    pub frames_decoded: u64,
    /// Frames that failed to decode and were skipped.
    pub frames_corrupt: u64,
    /// The cuts, in order. A cut at frame `n` means frame `n` is the first frame of a new shot.
    pub cuts: Vec<Cut>,
    /// The shots, in order, covering every decoded frame.
    pub shots: Vec<Shot>,
}

/// A hard cut between two shots.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cut {
    /// First frame of the new shot.
    pub frame: u64,
    /// Presentation time of that frame, seconds.
    pub time_secs: f64,
    /// Content score that triggered the cut, HSV delta units 0–255.
    pub score: f64,
}

/// One shot: frames `start_frame..end_frame` (end exclusive).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shot {
    /// 0-based shot number.
    pub index: u32,
    /// First frame.
    pub start_frame: u64,
    /// One past the last frame.
    pub end_frame: u64,
    /// Presentation time of the first frame, seconds.
    pub start_secs: f64,
    /// Presentation time at which the shot ends (start of the next shot, or end of the stream),
    /// seconds.
    pub end_secs: f64,
    /// The shot's representative frame.
    pub keyframe: Keyframe,
}

/// A representative frame of a shot, as a time and a perceptual hash only.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyframe {
    /// Frame number.
    pub frame: u64,
    /// Presentation time, seconds.
    pub time_secs: f64,
    /// 64-bit DCT perceptual hash (pHash) of the frame, as 16 lowercase hex digits. Similar frames
    /// have hashes with a small Hamming distance.
    pub phash: String,
}

/// An analyzer that contributed to the digest.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyzerInfo {
    /// Name, e.g. `"shots.content"`.
    pub name: String,
    /// Version of the analyzer's algorithm.
    pub version: String,
    /// Parameters as `key=value` pairs, for reproducibility.
    pub parameters: Vec<(String, String)>,
}

impl Digest {
    /// Number of shots.
    pub fn shot_count(&self) -> usize {
        self.shots.shots.len()
    }
}

/// Identifies the model behind an output: name, version and SHA-256 of the model file.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStamp {
    /// Registry name, e.g. `"nudenet-320n"`.
    pub name: String,
    /// Version of the package the model came from.
    pub version: String,
    /// SHA-256 of the model file, lowercase hex.
    pub sha256: String,
}

/// An axis-aligned box in pixels of the source frame (not the model's input).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoxPx {
    /// Left edge, pixels.
    pub x: f32,
    /// Top edge, pixels.
    pub y: f32,
    /// Width, pixels.
    pub width: f32,
    /// Height, pixels.
    pub height: f32,
}

/// Moderation detections aggregated into time ranges per label.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModerationAnalysis {
    /// The detector.
    pub model: ModelStamp,
    /// Frames sampled per second of media (keyframes come on top).
    pub sample_fps: f64,
    /// Minimum class score for a detection, 0..1.
    pub score_threshold: f32,
    /// Frames the detector ran on.
    pub frames_analyzed: u64,
    /// Time ranges in which a label was detected, ordered by start.
    pub ranges: Vec<ModerationRange>,
}

/// A stretch of time in which one label was detected on the sampled frames.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModerationRange {
    /// The label exactly as NudeNet names it, e.g. `"FACE_FEMALE"`.
    pub label: String,
    /// Time of the first sampled frame with the label, seconds.
    pub start_secs: f64,
    /// Time of the last sampled frame with the label, seconds.
    pub end_secs: f64,
    /// Highest score in the range, 0..1.
    pub peak_score: f32,
    /// Time of the frame with the highest score, seconds.
    pub peak_time_secs: f64,
    /// Box of the highest-scoring detection, source pixels.
    pub peak_box: BoxPx,
    /// Sampled frames in the range with the label.
    pub frames: u32,
}

/// Text read on frames, identical consecutive readings merged.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextAnalysis {
    /// Text detector (PP-OCRv4 det).
    pub detector: ModelStamp,
    /// Text recognizer (PP-OCRv4 rec).
    pub recognizer: ModelStamp,
    /// Orientation classifier, if used.
    pub classifier: Option<ModelStamp>,
    /// Frames the OCR ran on.
    pub frames_analyzed: u64,
    /// Readings, ordered by start time.
    pub readings: Vec<TextReading>,
}

/// One piece of text seen on screen over a time range.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextReading {
    /// The text.
    pub text: String,
    /// Time of the first frame it was read on, seconds.
    pub start_secs: f64,
    /// Time of the last frame it was read on, seconds.
    pub end_secs: f64,
    /// Where, source pixels (from the first reading).
    pub box_px: BoxPx,
    /// Mean recognizer confidence over the merged readings, 0..1.
    pub confidence: f32,
}

/// Speech found in the audio track.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechAnalysis {
    /// The voice activity detector.
    pub model: ModelStamp,
    /// Index of the audio stream analyzed.
    pub audio_stream: u32,
    /// Audio analyzed, seconds.
    pub audio_secs: f64,
    /// Speech segments, ordered.
    pub segments: Vec<SpeechSegment>,
    /// Share of the audio that is speech, 0..1.
    pub speech_fraction: f64,
}

/// A stretch of speech.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechSegment {
    /// Start, seconds.
    pub start_secs: f64,
    /// End, seconds.
    pub end_secs: f64,
}
