//! The agent's local analysis pipeline: FFmpeg decode → analyzers → [`Digest`].
//!
//! Profile `shots` (the only one in protocol version 1):
//!
//! ```text
//! decode thread:
//! file ──libavformat──▶ packets of the primary video stream
//!      ──libavcodec (frame threads for frames ≥ 320×240)──▶ pictures, presentation order, numbered from 0
//!      ──batches of ≤ 8 picture references (bounded queue)──▶
//! analysis thread:
//!      ──swscale──▶ small BGRx frame (PySceneDetect's processing size, ≤ 256 px wide)
//!      ├─▶ content::ContentDetector  (HSV delta score, threshold, flash filter) ──▶ cuts
//!      └─▶ keyframes::KeyframePicker (16×16 luma thumbnails, DCT pHash)     ──▶ one keyframe per shot
//! container + streams ──▶ technical metadata
//! ```
//!
//! Speed (release build, 2 cores): the per-pixel work (HSV conversion and deltas, thumbnails) is
//! vectorized through [`pulp`] (AVX2 where the CPU has it); the decode thread only demuxes and
//! decodes, so the analysis overlaps decoding. Tiny frames are decoded single-threaded (see
//! [`FRAME_THREADING_PIXELS_MIN`]). `scripts/bench-shots.sh` compares the wall time with
//! decode-only FFmpeg.
//!
//! Shot detection reproduces PySceneDetect 0.7.2's `detect-content` with its defaults; see
//! [`content`]. Times are PTS × time base minus the stream's start time, in seconds.
//!
//! Full-resolution pictures are held only as references to the decoder's buffers while queued
//! for the analysis thread (at most 4 batches of at most 8 frames or 4 MiB); beyond that
//! the pipeline holds one small BGRx frame, two frames' HSV planes and a bounded set of
//! 256-byte thumbnails.
//!
//! Profile `full` adds, from the same demux and decode pass, NudeNet moderation and PP-OCR text
//! on sampled frames (an inference thread fed by the analysis thread) and Silero VAD speech on
//! the first audio stream (decoded on the decode thread); see [`full`].
//!
//! Entry points: [`init_ffmpeg`] once per process, then [`analyze_file`] (`shots`) or
//! [`analyze_file_with`] (any profile) on a blocking thread. The agent's analysis workers
//! (`crate::worker`) use [`analyze_opened_with`] on an [`OpenedMedia`] instead: FFmpeg reads the
//! file the worker opened and checked, restricted to [`PROTOCOL_WHITELIST`] and
//! [`FORMAT_WHITELIST`].

pub mod content;
pub mod full;
pub mod keyframes;
mod probe;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg_next as ffmpeg;
use gaffer_protocol::digest::{
    AnalyzerInfo, Cut, Digest, Keyframe, Shot, ShotAnalysis, SourceInfo, DIGEST_SCHEMA_VERSION,
};
pub use gaffer_protocol::messages::Profile;

use content::{ContentDetector, ScoredFrame};
use keyframes::{KeyframePicker, Thumbnailer};

/// Largest accepted video frame side, pixels: 16384. Checked against the container's declared
/// size before the decoder is opened, passed to the decoder as `max_pixels`, and checked again on
/// every decoded frame before anything is allocated for it.
pub const FRAME_SIDE_PX_MAX: u32 = 16_384;

/// Shortest interval between two progress callbacks, milliseconds: 250 (at most 4 per second).
pub const PROGRESS_INTERVAL_MS: u64 = 250;

/// Packets in a row that may fail to decode before the file is given up as undecodable: 300.
pub const CONSECUTIVE_DECODE_ERRORS_MAX: u64 = 300;

/// When reading stops early (a truncated or damaged file), the share of the declared duration
/// that must have decoded for the digest of the decoded part to be returned: 0.1 (10 %). Below
/// it, [`AnalysisError::DecodeFailed`].
pub const TRUNCATED_DECODED_FRACTION_MIN: f64 = 0.1;

/// Decoding less than this share of the declared duration counts as stopping early (a truncated
/// file usually ends without a read error): 0.9.
const TRUNCATED_SHORT_FRACTION: f64 = 0.9;

/// Smallest frame, in pixels, that [`AnalyzeOptions::decode_threads`]' auto setting decodes with
/// frame threading: 76 800 (320 × 240). Below it FFmpeg's per-frame hand-over between decoder
/// threads costs more than the decoding: on test.mp4 (160 × 90) `ffmpeg -threads 2` uses about
/// twice the CPU time of `-threads 1` for the same wall time.
pub const FRAME_THREADING_PIXELS_MIN: u64 = 320 * 240;

/// Most decoder threads [`AnalyzeOptions::decode_threads`] may ask for: 64.
pub const DECODE_THREADS_MAX: usize = 64;

/// swscale flags when the frame is only converted (YUV → BGRx), not resized: `SWS_BICUBIC`,
/// the flags OpenCV's FFmpeg capture backend uses, so PySceneDetect sees the same pixels.
const SCALE_FLAGS_CONVERT: scaling::Flags = scaling::Flags::BICUBIC;

/// swscale flags when the frame is converted and downscaled to the processing size.
/// `SWS_FAST_BILINEAR` is a 2-tap filter like OpenCV's `INTER_LINEAR` that PySceneDetect
/// downscales with, and it is the cheapest swscale filter.
const SCALE_FLAGS_DOWNSCALE: scaling::Flags = scaling::Flags::FAST_BILINEAR;

/// Version of the `shots` analysis algorithm, reported in [`AnalyzerInfo::version`].
pub const SHOTS_ANALYZER_VERSION: &str = "1";

/// Options of one analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyzeOptions {
    /// What to run. Default [`Profile::Shots`]. Every profile includes the `shots` stages
    /// (decode, shot boundaries, keyframes, technical metadata); [`Profile::Full`] adds
    /// moderation, on-screen text and speech from the same decode pass and needs the models
    /// (see [`analyze_file_with`] and [`full`]).
    pub profile: Profile,
    /// Cut threshold, HSV delta units 0–255. Default 27.0, as PySceneDetect's
    /// `ContentDetector`. Must be finite and in 0..=255.
    pub content_threshold: f64,
    /// Minimum shot length, frames. Default 15 (PySceneDetect's default; its CLI's 0.6 s at
    /// 25 fps). At most [`content::MIN_SHOT_FRAMES_MAX`]; 0 disables the filter.
    pub min_shot_frames: u32,
    /// Decoder threads (frame threading). 0 = auto: for frames of at least
    /// [`FRAME_THREADING_PIXELS_MIN`] pixels, the number of CPUs available to the process, at most
    /// 16 (2 on a 2-core box, like `ffmpeg -threads 2`); for smaller frames 1, because handing
    /// each frame between decoder threads then costs more than decoding it, and the analysis
    /// thread uses the other core. At most [`DECODE_THREADS_MAX`].
    pub decode_threads: usize,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self {
            profile: Profile::Shots,
            content_threshold: content::CONTENT_THRESHOLD_DEFAULT,
            min_shot_frames: content::MIN_SHOT_FRAMES_DEFAULT,
            decode_threads: 0,
        }
    }
}

impl AnalyzeOptions {
    fn validate(&self) -> Result<(), AnalysisError> {
        if !self.content_threshold.is_finite() || !(0.0..=255.0).contains(&self.content_threshold) {
            return Err(AnalysisError::InvalidOptions(format!(
                "content threshold {} is outside 0..=255 (HSV delta units)",
                self.content_threshold
            )));
        }
        if self.min_shot_frames > content::MIN_SHOT_FRAMES_MAX {
            return Err(AnalysisError::InvalidOptions(format!(
                "minimum shot length {} frames exceeds the limit of {} frames",
                self.min_shot_frames,
                content::MIN_SHOT_FRAMES_MAX
            )));
        }
        if self.decode_threads > DECODE_THREADS_MAX {
            return Err(AnalysisError::InvalidOptions(format!(
                "{} decode threads exceeds the limit of {DECODE_THREADS_MAX}",
                self.decode_threads
            )));
        }
        Ok(())
    }

    /// Decoder threads for frames of `width` × `height` pixels (as declared by the container).
    fn effective_decode_threads(&self, width: u32, height: u32) -> usize {
        if self.decode_threads > 0 {
            return self.decode_threads;
        }
        if u64::from(width) * u64::from(height) < FRAME_THREADING_PIXELS_MIN {
            return 1;
        }
        std::thread::available_parallelism().map_or(2, |n| n.get()).min(16)
    }
}

/// Progress of a running analysis, passed to the `on_progress` callback of [`analyze_file`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressUpdate {
    /// Fraction done, 0..=1, by media time (time of the last decoded frame / duration); 0 while
    /// the duration is unknown.
    pub fraction: f32,
    /// Video frames decoded so far.
    pub frames_decoded: u64,
}

/// Why an analysis failed. Variants are named for what the caller can do about it; see
/// [`AnalysisError::remedy`] for a sentence to show the user.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The file does not exist: check the path (and the volume it is on).
    #[error("file not found: {}", path.display())]
    NotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The file exists but cannot be read (permissions, I/O error, a directory).
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The path as given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is not valid UTF-8 (or contains NUL), which FFmpeg cannot be given: rename the file.
    #[error("path is not valid UTF-8: {}", path.display())]
    PathNotUtf8 {
        /// The path as given.
        path: PathBuf,
    },
    /// FFmpeg could not open or probe the file: it is not a media file, or its container is
    /// damaged (e.g. an MP4 cut off before its index).
    #[error("not a media file: {reason}")]
    NotMedia {
        /// The path as given.
        path: PathBuf,
        /// FFmpeg's error text, e.g. "Invalid data found when processing input".
        reason: String,
    },
    /// The file is media but has no video stream (e.g. a WAV).
    #[error("no video stream: the file has {streams}")]
    NoVideoStream {
        /// What it has instead, e.g. "1 audio stream".
        streams: String,
    },
    /// This FFmpeg build has no decoder for the video codec.
    #[error("no decoder for video codec {codec} in this FFmpeg build")]
    UnsupportedCodec {
        /// Codec short name.
        codec: String,
    },
    /// A video frame is larger than [`FRAME_SIDE_PX_MAX`] on a side.
    #[error("video frame {width}x{height} exceeds the limit of {max_px} pixels per side")]
    FrameTooLarge {
        /// Declared or decoded width, pixels.
        width: u32,
        /// Declared or decoded height, pixels.
        height: u32,
        /// [`FRAME_SIDE_PX_MAX`].
        max_px: u32,
    },
    /// The video stream could not be decoded well enough to analyze: too many corrupt packets,
    /// or a file truncated before a useful part of it.
    #[error("video could not be decoded: {reason}")]
    DecodeFailed {
        /// What went wrong, with FFmpeg's error text where there is one.
        reason: String,
    },
    /// The options are out of range (see [`AnalyzeOptions`]).
    #[error("invalid analysis options: {0}")]
    InvalidOptions(String),
    /// The `cancel` flag was set.
    #[error("analysis cancelled")]
    Cancelled,
    /// FFmpeg's libraries could not be initialised.
    #[error("FFmpeg could not be initialised: {0}")]
    FfmpegInit(String),
    /// An invariant of the pipeline did not hold (a bug in the agent).
    #[error("internal analysis error: {0}")]
    Internal(String),
    /// The `full` profile was asked for but its ONNX Runtime or models are not available here:
    /// provision them (`gaffer-agent models fetch --data-dir DIR`).
    #[error("the `full` profile's models are not available: {0}")]
    ModelsUnavailable(String),
    /// An ONNX analyzer of the `full` profile (moderation, text, speech) failed: a model
    /// session or inference error, or audio it cannot analyze.
    #[error("{analyzer} failed: {reason}")]
    AnalyzerFailed {
        /// The analyzer, e.g. `"moderation.nudenet"`.
        analyzer: String,
        /// What failed.
        reason: String,
    },
}

impl AnalysisError {
    /// What the user or operator can do next, one sentence.
    pub fn remedy(&self) -> &'static str {
        match self {
            AnalysisError::NotFound { .. } => "Check the path and that the volume is mounted on this machine.",
            AnalysisError::Unreadable { .. } => "Check the file's permissions for the agent's user and that it is a regular file.",
            AnalysisError::PathNotUtf8 { .. } => "Rename the file so its path is valid UTF-8.",
            AnalysisError::NotMedia { .. } => {
                "Check that this is a video file (try `ffprobe FILE`); if it was copied or is still being written, the copy may be incomplete."
            }
            AnalysisError::NoVideoStream { .. } => "Pass a file with a video stream; audio-only files cannot be analyzed for shots.",
            AnalysisError::UnsupportedCodec { .. } => "Transcode the file to a common codec (e.g. H.264) or install an FFmpeg build with this decoder.",
            AnalysisError::FrameTooLarge { .. } => "Downscale the video below the limit before analysis.",
            AnalysisError::DecodeFailed { .. } => "The file is damaged or truncated: re-copy or re-export it and try again.",
            AnalysisError::InvalidOptions(_) => "Fix the option values (see `gaffer-agent analyze --help`).",
            AnalysisError::Cancelled => "Nothing to do: the analysis was stopped on request.",
            AnalysisError::FfmpegInit(_) => "Check the FFmpeg shared libraries installed on this machine.",
            AnalysisError::Internal(_) => "Report this as a bug, with the file's ffprobe output.",
            AnalysisError::ModelsUnavailable(_) => {
                "Run `gaffer-agent models fetch --data-dir DIR` (or `models install` on an air-gapped box), or use `--profile shots`."
            }
            AnalysisError::AnalyzerFailed { .. } => {
                "Check the models with `gaffer-agent models list` and the agent log; if the file's audio or video is unusual, try `--profile shots`."
            }
        }
    }
}

static FFMPEG_INIT: OnceLock<Result<(), String>> = OnceLock::new();

/// Initialises FFmpeg once per process (idempotent; later calls return the first result) and
/// sets its log level to `error`, so FFmpeg does not write warnings about damaged input to
/// stderr; the pipeline reports problems through [`AnalysisError`] and `tracing` instead.
///
/// # Errors
/// [`AnalysisError::FfmpegInit`] if the libraries fail to initialise.
pub fn init_ffmpeg() -> Result<(), AnalysisError> {
    FFMPEG_INIT
        .get_or_init(|| {
            ffmpeg::init().map_err(|e| e.to_string())?;
            ffmpeg::log::set_level(ffmpeg::log::Level::Quiet);
            Ok(())
        })
        .clone()
        .map_err(AnalysisError::FfmpegInit)
}

fn source_info(path: &Path) -> Result<(SourceInfo, PathBuf), AnalysisError> {
    let io_err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            AnalysisError::NotFound { path: path.to_path_buf() }
        } else {
            AnalysisError::Unreadable { path: path.to_path_buf(), source }
        }
    };
    let canonical = std::fs::canonicalize(path).map_err(io_err)?;
    let meta = std::fs::metadata(&canonical).map_err(io_err)?;
    if !meta.is_file() {
        return Err(AnalysisError::Unreadable {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    // Opening proves read permission with a clear io error, before FFmpeg's vaguer one.
    std::fs::File::open(&canonical).map_err(io_err)?;
    let modified_unix_secs = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok());
    let path_text = canonical.to_str().ok_or_else(|| AnalysisError::PathNotUtf8 { path: path.to_path_buf() })?;
    if path_text.contains('\0') {
        return Err(AnalysisError::PathNotUtf8 { path: path.to_path_buf() });
    }
    let info = SourceInfo { path: path_text.to_string(), size_bytes: meta.len(), modified_unix_secs };
    Ok((info, canonical))
}

/// FFmpeg demuxers an agent's analysis worker lets open a job's file (`format_whitelist`; names
/// as `ffmpeg -demuxers` lists them in FFmpeg 5.1): the containers and elementary streams media
/// files come in. Left out on purpose: everything that reads other files or URLs (`hls`, `dash`,
/// `concat`, `webm_dash_manifest`, image sequences `image2`), and rarely used demuxers.
pub const FORMAT_WHITELIST: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mxf,mpeg,mpegvideo,\
flv,ogg,asf,dv,ivf,obu,wav,aiff,mp3,flac,h264,hevc,m4v,yuv4mpegpipe";

/// FFmpeg protocols an analysis worker allows (`protocol_whitelist`): `file` only, so nothing a
/// container says can make FFmpeg open a network URL, a pipe or a subprocess.
pub const PROTOCOL_WHITELIST: &str = "file";

/// Bytes at the start of a file read to recognize playlists and scripts before FFmpeg sees it:
/// 512.
const SNIFF_BYTES: usize = 512;

/// A job's media file, opened once (read-only) by the analysis worker after its path was checked
/// against the agent's volumes; FFmpeg then reads this open file, never the path again.
#[derive(Debug)]
pub struct OpenedMedia {
    file: std::fs::File,
    canonical: PathBuf,
    meta: std::fs::Metadata,
}

impl OpenedMedia {
    /// Opens `canonical` (an absolute path without symlinks, as [`std::fs::canonicalize`] makes
    /// it) read-only, checks with `fstat` that it is a regular file, and refuses text playlists
    /// and FFmpeg concat scripts (which would make FFmpeg read other files) with a reason.
    ///
    /// # Errors
    /// [`AnalysisError::NotFound`], [`AnalysisError::Unreadable`] (also for a directory or a
    /// device), [`AnalysisError::PathNotUtf8`], [`AnalysisError::NotMedia`] for a playlist or
    /// concat script.
    pub fn open(canonical: &Path) -> Result<Self, AnalysisError> {
        use std::os::unix::fs::FileExt as _;
        let io_err = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                AnalysisError::NotFound { path: canonical.to_path_buf() }
            } else {
                AnalysisError::Unreadable { path: canonical.to_path_buf(), source }
            }
        };
        if canonical.to_str().is_none_or(|t| t.contains('\0')) {
            return Err(AnalysisError::PathNotUtf8 { path: canonical.to_path_buf() });
        }
        let file = std::fs::File::open(canonical).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(AnalysisError::Unreadable {
                path: canonical.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let mut head = [0u8; SNIFF_BYTES];
        let mut filled = 0;
        while filled < head.len() {
            match file.read_at(&mut head[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        if let Some(what) = script_kind(&head[..filled]) {
            return Err(AnalysisError::NotMedia {
                path: canonical.to_path_buf(),
                reason: format!(
                    "it is {what}, which makes FFmpeg read other files or URLs; only media files are analyzed"
                ),
            });
        }
        Ok(Self { file, canonical: canonical.to_path_buf(), meta })
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// The kernel's name of the open file (`/proc/self/fd/N`'s target): where the file really
    /// is, whatever happened to the path since it was checked.
    ///
    /// # Errors
    /// The OS error of reading the link.
    pub fn opened_path(&self) -> std::io::Result<PathBuf> {
        std::fs::read_link(self.fd_path())
    }

    fn fd_path(&self) -> String {
        use std::os::fd::AsRawFd as _;
        format!("/proc/self/fd/{}", self.file.as_raw_fd())
    }

    fn source_info(&self) -> SourceInfo {
        let modified_unix_secs = self
            .meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok());
        SourceInfo {
            path: self.canonical.to_str().unwrap_or_default().to_string(),
            size_bytes: self.meta.len(),
            modified_unix_secs,
        }
    }
}

/// What a file that must not reach FFmpeg's probing is, judged from its first bytes: an M3U/HLS
/// playlist or an FFmpeg concat script. None for anything else.
fn script_kind(head: &[u8]) -> Option<&'static str> {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let start = head.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(head.len());
    let text = &head[start..];
    let starts = |p: &[u8]| text.len() >= p.len() && text[..p.len()].eq_ignore_ascii_case(p);
    if starts(b"#EXTM3U") || starts(b"#EXT-X-") {
        Some("an M3U/HLS playlist")
    } else if starts(b"ffconcat") {
        Some("an FFmpeg concat script (ffconcat)")
    } else {
        None
    }
}

/// Where [`analyze_media`] gets its input from.
enum MediaSource<'a> {
    /// A path, resolved and opened by FFmpeg (the `analyze` command).
    Path(&'a Path),
    /// A file opened and checked by the caller, read through its descriptor with FFmpeg
    /// restricted to [`PROTOCOL_WHITELIST`] and [`FORMAT_WHITELIST`] (analysis workers).
    Opened { media: &'a OpenedMedia, on_opened: &'a mut dyn FnMut(Option<f64>) },
}

/// Opens the input for [`analyze_media`]: the digest's source information and FFmpeg's demuxer
/// context.
fn open_input(
    media: MediaSource<'_>,
    cancel: &AtomicBool,
) -> Result<(SourceInfo, ffmpeg::format::context::Input), AnalysisError> {
    match media {
        MediaSource::Path(path) => {
            let (source, canonical) = source_info(path)?;
            if cancel.load(Ordering::Relaxed) {
                return Err(AnalysisError::Cancelled);
            }
            // "file:" pins FFmpeg to the local-file protocol whatever the path looks like.
            let url = format!("file:{}", source.path);
            let input = ffmpeg::format::input(&url)
                .map_err(|e| AnalysisError::NotMedia { path: canonical, reason: e.to_string() })?;
            Ok((source, input))
        }
        MediaSource::Opened { media, on_opened } => {
            if cancel.load(Ordering::Relaxed) {
                return Err(AnalysisError::Cancelled);
            }
            let mut options = ffmpeg::Dictionary::new();
            options.set("protocol_whitelist", PROTOCOL_WHITELIST);
            options.set("format_whitelist", FORMAT_WHITELIST);
            // /proc/self/fd/N opens the very file this process holds, not whatever the path
            // names now.
            let url = format!("file:{}", media.fd_path());
            let input = ffmpeg::format::input_with_dictionary(&url, options).map_err(|e| {
                let reason = match e {
                    ffmpeg::Error::Other { errno } if errno == ffmpeg::error::EINVAL => format!(
                        "FFmpeg refused it ({e}): its container is not one of the formats the agent analyzes \
                         ({FORMAT_WHITELIST}), or it is not media"
                    ),
                    e => e.to_string(),
                };
                AnalysisError::NotMedia { path: media.canonical.clone(), reason }
            })?;
            let duration = input.duration();
            let duration_secs = (duration > 0)
                .then(|| duration as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE))
                .filter(|d| d.is_finite());
            on_opened(duration_secs);
            Ok((media.source_info(), input))
        }
    }
}

fn describe_streams(technical: &gaffer_protocol::digest::TechnicalMetadata) -> String {
    use gaffer_protocol::digest::StreamKind;
    if technical.streams.is_empty() {
        return "no streams".to_string();
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for s in &technical.streams {
        let name = match s.kind {
            StreamKind::Video => "video (attached picture)",
            StreamKind::Audio => "audio",
            StreamKind::Subtitle => "subtitle",
            StreamKind::Data => "data",
            StreamKind::Attachment => "attachment",
            StreamKind::Unknown => "unknown",
        };
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    counts
        .iter()
        .map(|(n, c)| format!("{c} {n} stream{}", if *c == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One decoded frame on its way to the analysis thread: its number, presentation time
/// (seconds) and the decoder's picture (a reference to the decoder's buffer, not a copy).
struct DecodedFrame {
    frame: u64,
    time_secs: f64,
    picture: ffmpeg::frame::Video,
}

/// Decoded frames on their way from the decode thread to the analysis thread, in order.
struct FrameBatch {
    /// Processing size (width, height) in pixels, fixed by the first frame.
    processing: (u32, u32),
    frames: Vec<DecodedFrame>,
}

/// Most frames per [`FrameBatch`]: 8. The decode thread hands frames over in batches so that the
/// analysis thread wakes up once per batch rather than once per frame; for tiny frames the
/// wake-ups cost more than the analysis.
const ANALYSIS_BATCH_FRAMES: usize = 8;

/// Most decoded picture bytes per [`FrameBatch`] (fewer frames per batch for large frames):
/// 4 MiB, e.g. 2 frames of 1280 × 720 YUV 4:2:0. A batch holds at least one frame.
const ANALYSIS_BATCH_BYTES_MAX: usize = 4 << 20;

/// Batches queued between the decode and analysis threads: 2. With one batch being filled and
/// one being analyzed, at most 4 batches of decoded pictures are held beyond the decoder's own:
/// 32 frames of 160 × 90, 8 of 1280 × 720, 4 of a larger frame.
const ANALYSIS_QUEUE_BATCHES: usize = 2;

/// Converts decoded pictures to BGRx at the processing size with swscale. Lives on the analysis
/// thread (swscale contexts are not `Send`), which takes the conversion off the decode thread.
struct Converter {
    scaler: Option<scaling::Context>,
    small: ffmpeg::frame::Video,
}

impl Converter {
    fn new() -> Self {
        Self { scaler: None, small: ffmpeg::frame::Video::empty() }
    }

    /// Converts `picture` to BGRx of `pw` × `ph` pixels; returns the rows and their stride.
    fn convert(
        &mut self,
        picture: &ffmpeg::frame::Video,
        (pw, ph): (u32, u32),
    ) -> Result<(&[u8], usize), AnalysisError> {
        let (w, h) = (picture.width(), picture.height());
        let input_matches = self.scaler.as_ref().is_some_and(|s| {
            let i = s.input();
            i.format == picture.format() && i.width == w && i.height == h
        });
        if !input_matches {
            let flags = if (pw, ph) == (w, h) { SCALE_FLAGS_CONVERT } else { SCALE_FLAGS_DOWNSCALE };
            let scaler = scaling::Context::get(picture.format(), w, h, Pixel::BGRZ, pw, ph, flags).map_err(|e| {
                AnalysisError::DecodeFailed {
                    reason: format!("cannot convert pixel format {:?} {w}x{h} to BGR: {e}", picture.format()),
                }
            })?;
            tracing::debug!(width = w, height = h, pw, ph, "converter set up");
            self.scaler = Some(scaler);
        }
        let Some(scaler) = self.scaler.as_mut() else {
            return Err(AnalysisError::Internal("scaler missing after setup".into()));
        };
        scaler
            .run(picture, &mut self.small)
            .map_err(|e| AnalysisError::DecodeFailed { reason: format!("pixel conversion failed: {e}") })?;
        let stride = self.small.stride(0);
        let rows = (ph as usize).saturating_sub(1) * stride + pw as usize * 4;
        let data = self
            .small
            .data(0)
            .get(..rows)
            .ok_or_else(|| AnalysisError::Internal("converted frame smaller than its size".into()))?;
        Ok((data, stride))
    }
}

/// The analysis side of the `shots` pipeline, run on its own thread: conversion, content
/// detection and keyframes over decoded frames, in order.
struct ShotAnalyzer {
    threshold: f64,
    min_shot_frames: u32,
    detector: Option<ContentDetector>,
    thumbnailer: Option<Thumbnailer>,
    keyframes: KeyframePicker,
    cuts: Vec<Cut>,
    shot_keys: Vec<Option<Keyframe>>,
    /// The `full` profile's frame selection, handed every picture after its analysis.
    tap: Option<full::FrameTap>,
    /// (shot first frames analyzed, missed) by the tap, once it finished.
    tap_stats: (u64, u64),
}

impl ShotAnalyzer {
    fn new(threshold: f64, min_shot_frames: u32) -> Self {
        Self {
            threshold,
            min_shot_frames,
            detector: None,
            thumbnailer: None,
            keyframes: KeyframePicker::new(min_shot_frames),
            cuts: Vec::new(),
            shot_keys: Vec::new(),
            tap: None,
            tap_stats: (0, 0),
        }
    }

    /// Analyzes one BGRx frame of `w` × `h` pixels whose rows start every `stride` bytes.
    fn push(
        &mut self,
        frame: u64,
        time_secs: f64,
        w: usize,
        h: usize,
        bgrx: &[u8],
        stride: usize,
    ) -> Result<(), AnalysisError> {
        let (threshold, min_shot_frames) = (self.threshold, self.min_shot_frames);
        let detector = self.detector.get_or_insert_with(|| ContentDetector::new(w, h, threshold, min_shot_frames));
        let thumbnailer = self.thumbnailer.get_or_insert_with(|| Thumbnailer::new(w, h));
        let cut = detector.process(frame, time_secs, bgrx, stride);
        let thumb = thumbnailer
            .thumb(bgrx, stride)
            .ok_or_else(|| AnalysisError::Internal("converted frame smaller than its size".into()))?;
        self.keyframes.push(frame, time_secs, thumb);
        if let Some(ScoredFrame { frame: cut_frame, time_secs: cut_secs, score }) = cut {
            tracing::debug!(frame = cut_frame, time_secs = cut_secs, score, "cut");
            self.cuts.push(Cut { frame: cut_frame, time_secs: cut_secs, score });
            let key = self.keyframes.cut(cut_frame);
            self.shot_keys.push(key);
        }
        Ok(())
    }

    /// Runs until the sender hangs up; stops early (dropping the receiver) on an error.
    fn run(mut self, batches: std::sync::mpsc::Receiver<FrameBatch>) -> Result<Self, AnalysisError> {
        let mut converter = Converter::new();
        for batch in batches {
            let (pw, ph) = batch.processing;
            for f in batch.frames {
                let (bgrx, stride) = converter.convert(&f.picture, (pw, ph))?;
                let cuts_before = self.cuts.len();
                self.push(f.frame, f.time_secs, pw as usize, ph as usize, bgrx, stride)?;
                if let Some(tap) = self.tap.as_mut() {
                    let cut = self.cuts.get(cuts_before).map(|c| c.frame);
                    tap.on_frame(f.frame, f.time_secs, f.picture, cut)?;
                }
            }
        }
        // Hanging up lets the inference thread finish.
        if let Some(mut tap) = self.tap.take() {
            tap.finish()?;
            self.tap_stats = (tap.shot_frames, tap.shot_frames_missed);
        }
        Ok(self)
    }
}

/// Decode-side state of the `shots` pipeline: timing, conversion, counters, progress.
struct ShotsPipeline<'a> {
    cancel: &'a AtomicBool,
    on_progress: &'a mut dyn FnMut(ProgressUpdate),
    time_base: f64,
    start_ts: Option<i64>,
    frame_duration_secs: f64,
    duration_secs: Option<f64>,
    last_progress: Instant,
    processing: Option<(u32, u32)>,
    /// `None` once decoding is over (hangs up on the analysis thread).
    to_analyzer: Option<std::sync::mpsc::SyncSender<FrameBatch>>,
    /// The `full` profile's audio analysis, fed the packets of other streams.
    audio: Option<full::AudioTap>,
    /// Frames being batched; sent when [`ShotsPipeline::batch_frames`] are in, and by
    /// [`ShotsPipeline::flush`].
    batch: Vec<DecodedFrame>,
    /// Frames per batch for this video's frame size (see [`ANALYSIS_BATCH_BYTES_MAX`]).
    batch_frames: usize,
    /// The frame the decoder writes the next picture into.
    spare: ffmpeg::frame::Video,
    frames_decoded: u64,
    frames_corrupt: u64,
    consecutive_errors: u64,
    last_error: Option<String>,
    first_time_secs: Option<f64>,
    last_time_secs: f64,
}

impl ShotsPipeline<'_> {
    fn check_cancel(&self) -> Result<(), AnalysisError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(AnalysisError::Cancelled);
        }
        Ok(())
    }

    fn decode_error(&mut self, e: ffmpeg::Error) -> Result<(), AnalysisError> {
        self.frames_corrupt += 1;
        self.consecutive_errors += 1;
        tracing::debug!(error = %e, frame = self.frames_decoded, "video packet failed to decode");
        self.last_error = Some(e.to_string());
        if self.consecutive_errors >= CONSECUTIVE_DECODE_ERRORS_MAX {
            return Err(AnalysisError::DecodeFailed {
                reason: format!(
                    "{} packets in a row failed to decode (last error: {e}) after {} good frames",
                    self.consecutive_errors, self.frames_decoded
                ),
            });
        }
        Ok(())
    }

    fn frame_time_secs(&mut self, frame: &ffmpeg::frame::Video) -> f64 {
        match frame.timestamp().or_else(|| frame.pts()) {
            Some(ts) => {
                let start = *self.start_ts.get_or_insert(ts);
                ts.saturating_sub(start) as f64 * self.time_base
            }
            None => match self.first_time_secs {
                None => 0.0,
                Some(_) => self.last_time_secs + self.frame_duration_secs,
            },
        }
    }

    /// Takes a decoded picture: checks it, numbers and times it, and batches it for the
    /// analysis thread.
    fn on_frame(&mut self, picture: ffmpeg::frame::Video) -> Result<(), AnalysisError> {
        self.check_cancel()?;
        let (w, h) = (picture.width(), picture.height());
        if w > FRAME_SIDE_PX_MAX || h > FRAME_SIDE_PX_MAX {
            return Err(AnalysisError::FrameTooLarge { width: w, height: h, max_px: FRAME_SIDE_PX_MAX });
        }
        if w == 0 || h == 0 || picture.format() == Pixel::None {
            self.frames_corrupt += 1;
            return Ok(());
        }
        self.consecutive_errors = 0;
        // The processing size is fixed by the first frame (PySceneDetect: by the container's
        // frame size, which is the same); later frames of another size are scaled to it.
        if self.processing.is_none() {
            self.processing = Some(content::processing_size(w, h));
            // YUV 4:2:0 is 1.5 bytes a pixel; other formats are rarer and at most 4 × that.
            let picture_bytes = (w as usize * h as usize * 3 / 2).max(1);
            self.batch_frames = (ANALYSIS_BATCH_BYTES_MAX / picture_bytes).clamp(1, ANALYSIS_BATCH_FRAMES);
        }

        let n = self.frames_decoded;
        self.frames_decoded += 1;
        let time_secs = self.frame_time_secs(&picture);
        self.first_time_secs.get_or_insert(time_secs);
        self.last_time_secs = time_secs;
        self.batch.push(DecodedFrame { frame: n, time_secs, picture });
        if self.batch.len() >= self.batch_frames {
            self.flush()?;
        }
        self.maybe_progress(time_secs);
        Ok(())
    }

    /// Sends the frames batched so far (if any) to the analysis thread.
    fn flush(&mut self) -> Result<(), AnalysisError> {
        let (Some(processing), false) = (self.processing, self.batch.is_empty()) else {
            return Ok(());
        };
        let frames = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_frames));
        let sent = self.to_analyzer.as_ref().is_some_and(|tx| tx.send(FrameBatch { processing, frames }).is_ok());
        if !sent {
            // The analysis thread stopped on an error; the caller collects it from the join.
            return Err(AnalysisError::Internal("analysis thread stopped".into()));
        }
        Ok(())
    }

    fn maybe_progress(&mut self, time_secs: f64) {
        if self.last_progress.elapsed() < Duration::from_millis(PROGRESS_INTERVAL_MS) {
            return;
        }
        self.last_progress = Instant::now();
        let fraction = match self.duration_secs {
            Some(d) if d > 0.0 => (time_secs / d).clamp(0.0, 1.0) as f32,
            _ => 0.0,
        };
        (self.on_progress)(ProgressUpdate { fraction, frames_decoded: self.frames_decoded });
    }

    fn drain(&mut self, decoder: &mut ffmpeg::decoder::Video) -> Result<(), AnalysisError> {
        loop {
            match decoder.receive_frame(&mut self.spare) {
                Ok(()) => {
                    // The picture moves on to the analysis thread; the decoder gets a new frame.
                    let picture = std::mem::replace(&mut self.spare, ffmpeg::frame::Video::empty());
                    self.on_frame(picture)?;
                }
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::error::EAGAIN => return Ok(()),
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(e) => return self.decode_error(e),
            }
        }
    }
}

impl ShotAnalyzer {
    /// Builds the shot list once all `n` frames went through; `first_secs` and `end_secs` are
    /// the times of the first frame and of the end of the last one.
    fn finish(
        mut self,
        n: u64,
        first_secs: f64,
        end_secs: f64,
        frames_corrupt: u64,
    ) -> Result<ShotAnalysis, AnalysisError> {
        let last_key = self.keyframes.finish(n);
        self.shot_keys.push(last_key);
        let mut shots = Vec::with_capacity(self.cuts.len() + 1);
        let starts: Vec<(u64, f64)> =
            std::iter::once((0, first_secs)).chain(self.cuts.iter().map(|c| (c.frame, c.time_secs))).collect();
        for (i, &(start_frame, start_secs)) in starts.iter().enumerate() {
            let (end_frame, end_secs) = starts.get(i + 1).copied().unwrap_or((n, end_secs));
            let keyframe = self.shot_keys.get_mut(i).and_then(Option::take).ok_or_else(|| {
                AnalysisError::Internal(format!("no keyframe for shot {i} (frames {start_frame}..{end_frame})"))
            })?;
            shots.push(Shot {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                start_frame,
                end_frame,
                start_secs,
                end_secs,
                keyframe,
            });
        }
        Ok(ShotAnalysis {
            detector: "content".to_string(),
            threshold: self.threshold,
            min_shot_frames: self.min_shot_frames,
            frames_decoded: n,
            frames_corrupt,
            cuts: self.cuts,
            shots,
        })
    }
}

/// Reads and decodes every packet of the video stream, feeding frames to `pipe`, then flushes
/// the decoder. Returns the read error that ended reading early, if any (EOF is not an error).
fn decode_all(
    pipe: &mut ShotsPipeline<'_>,
    input: &mut ffmpeg::format::context::Input,
    decoder: &mut ffmpeg::decoder::Video,
    stream_index: usize,
) -> Result<Option<ffmpeg::Error>, AnalysisError> {
    let mut packet = ffmpeg::Packet::empty();
    loop {
        pipe.check_cancel()?;
        match packet.read(input) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(e) => return finish_decode(pipe, decoder).map(|()| Some(e)),
        }
        if packet.stream() != stream_index {
            if let Some(audio) = pipe.audio.as_mut() {
                audio.on_packet(&packet)?;
            }
            continue;
        }
        if let Err(e) = decoder.send_packet(&packet) {
            pipe.decode_error(e)?;
        }
        pipe.drain(decoder)?;
    }
    finish_decode(pipe, decoder).map(|()| None)
}

/// Flushes the decoder: frame threading and B-frames hold frames back until EOF.
fn finish_decode(pipe: &mut ShotsPipeline<'_>, decoder: &mut ffmpeg::decoder::Video) -> Result<(), AnalysisError> {
    if decoder.send_eof().is_ok() {
        pipe.drain(decoder)?;
    }
    Ok(())
}

fn version_text(v: u32) -> String {
    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

/// Analyzes one media file and returns its digest.
///
/// Synchronous and CPU-bound: run it on a blocking thread (e.g. `tokio::task::spawn_blocking`).
/// Calls [`init_ffmpeg`] itself. `on_progress` is called at most once per
/// [`PROGRESS_INTERVAL_MS`] of wall time. `cancel` is checked for every packet and every frame;
/// once it is `true` the call returns [`AnalysisError::Cancelled`] promptly.
///
/// A file whose reading stops early (truncated, damaged) still gives the digest of what decoded
/// if at least [`TRUNCATED_DECODED_FRACTION_MIN`] of its duration did (the shortfall shows as
/// `frames_decoded` below the stream's `frames_declared`, and is logged at WARN).
///
/// # Errors
/// See [`AnalysisError`]: missing or unreadable file, not media, no video stream, unsupported
/// codec, oversize frames, undecodable or too-truncated video, bad options, cancellation.
pub fn analyze_file(
    path: &Path,
    opts: &AnalyzeOptions,
    on_progress: &mut dyn FnMut(ProgressUpdate),
    cancel: &AtomicBool,
) -> Result<Digest, AnalysisError> {
    analyze_file_with(path, opts, None, on_progress, cancel)
}

/// [`analyze_file`] for every profile: with `opts.profile` [`Profile::Full`], `full` gives the
/// ONNX Runtime, models and sampling options, and the same decode pass also feeds moderation,
/// on-screen text and speech (see [`full`]); the digest's `moderation` and `text` sections are
/// then set, and `speech` when the file has an audio stream. With [`Profile::Shots`], `full` is
/// ignored and this is exactly [`analyze_file`].
///
/// # Errors
/// As [`analyze_file`]; for `full` also [`AnalysisError::ModelsUnavailable`] (no `full` given,
/// or models missing) and [`AnalysisError::AnalyzerFailed`] (a model or the audio failed).
pub fn analyze_file_with(
    path: &Path,
    opts: &AnalyzeOptions,
    full: Option<&full::FullAnalysis<'_>>,
    on_progress: &mut dyn FnMut(ProgressUpdate),
    cancel: &AtomicBool,
) -> Result<Digest, AnalysisError> {
    analyze_media(MediaSource::Path(path), opts, full, on_progress, cancel)
}

/// [`analyze_file_with`] on a file the caller already opened and checked ([`OpenedMedia`]):
/// FFmpeg reads exactly that open file (through `/proc/self/fd/N`), restricted to the `file`
/// protocol and the demuxers of [`FORMAT_WHITELIST`], so a playlist or concat script cannot make
/// it read anything else. `on_opened` is called once the container is probed, with the media's
/// duration in seconds (None when the container does not say), before any frame is decoded.
/// This is what the agent's analysis workers run.
///
/// # Errors
/// As [`analyze_file_with`]; a container outside the whitelist, a playlist or a concat script is
/// [`AnalysisError::NotMedia`] with the reason.
pub fn analyze_opened_with(
    media: &OpenedMedia,
    opts: &AnalyzeOptions,
    full: Option<&full::FullAnalysis<'_>>,
    on_opened: &mut dyn FnMut(Option<f64>),
    on_progress: &mut dyn FnMut(ProgressUpdate),
    cancel: &AtomicBool,
) -> Result<Digest, AnalysisError> {
    analyze_media(MediaSource::Opened { media, on_opened }, opts, full, on_progress, cancel)
}

fn analyze_media(
    media: MediaSource<'_>,
    opts: &AnalyzeOptions,
    full: Option<&full::FullAnalysis<'_>>,
    on_progress: &mut dyn FnMut(ProgressUpdate),
    cancel: &AtomicBool,
) -> Result<Digest, AnalysisError> {
    let started = Instant::now();
    opts.validate()?;
    // Every profile starts with the `shots` stages; `full` adds the ONNX analyzers.
    let full = match (opts.profile, full) {
        (Profile::Shots, _) => None,
        (Profile::Full, Some(f)) => Some(f),
        (Profile::Full, None) => {
            return Err(AnalysisError::ModelsUnavailable(
                "no ONNX Runtime or model registry was given to the analysis".into(),
            ))
        }
    };
    init_ffmpeg()?;
    let (source, mut input) = open_input(media, cancel)?;
    let mut technical = probe::technical_metadata(&input);

    let (stream_index, time_base, start_ts, fps, stream_duration, parameters) = {
        let video = input
            .streams()
            .filter(|s| s.parameters().medium() == ffmpeg::media::Type::Video)
            .filter(|s| !s.disposition().contains(ffmpeg::format::stream::Disposition::ATTACHED_PIC))
            .max_by_key(|s| {
                // Prefer the default-flagged stream, then the earliest.
                (s.disposition().contains(ffmpeg::format::stream::Disposition::DEFAULT), std::cmp::Reverse(s.index()))
            })
            .ok_or_else(|| AnalysisError::NoVideoStream { streams: describe_streams(&technical) })?;
        let tb = video.time_base();
        (
            video.index(),
            tb,
            Some(video.start_time()).filter(|&s| s != i64::MIN),
            probe::frame_rate_fps(&video),
            probe::ticks_to_secs(video.duration(), tb),
            video.parameters(),
        )
    };
    technical.primary_video_stream = u32::try_from(stream_index).ok();
    let declared = technical.streams.get(stream_index);
    let (declared_w, declared_h) =
        (declared.and_then(|s| s.width).unwrap_or(0), declared.and_then(|s| s.height).unwrap_or(0));
    if declared_w > FRAME_SIDE_PX_MAX || declared_h > FRAME_SIDE_PX_MAX {
        return Err(AnalysisError::FrameTooLarge { width: declared_w, height: declared_h, max_px: FRAME_SIDE_PX_MAX });
    }
    let codec_name = declared.map(|s| s.codec.clone()).unwrap_or_default();

    let threads = opts.effective_decode_threads(declared_w, declared_h);
    let mut ctx = ffmpeg::codec::context::Context::from_parameters(parameters)
        .map_err(|e| AnalysisError::DecodeFailed { reason: format!("bad codec parameters: {e}") })?;
    ctx.set_threading(ffmpeg::threading::Config {
        kind: ffmpeg::threading::Type::Frame,
        count: threads,
        ..Default::default()
    });
    let codec =
        ffmpeg::decoder::find(ctx.id()).ok_or_else(|| AnalysisError::UnsupportedCodec { codec: codec_name.clone() })?;
    let decoder_name = codec.name().to_string();
    let mut decoder = ctx.decoder();
    decoder.set_packet_time_base(time_base);
    let max_pixels = (u64::from(FRAME_SIDE_PX_MAX) * u64::from(FRAME_SIDE_PX_MAX)).min(i32::MAX as u64).to_string();
    let mut options = ffmpeg::Dictionary::new();
    options.set("max_pixels", &max_pixels);
    let mut decoder = decoder
        .open_as_with(codec, options)
        .and_then(|o| o.video())
        .map_err(|e| AnalysisError::DecodeFailed { reason: format!("cannot open the {codec_name} decoder: {e}") })?;

    let duration_secs = stream_duration.or(technical.duration_secs);
    let full_run = match full {
        Some(f) => Some(full::FullRun::new(f, &input, (declared_w, declared_h), opts.min_shot_frames)?),
        None => None,
    };
    let (frame_tap, inference, audio_tap, full_finish) = match full_run.map(full::FullRun::split) {
        Some((t, i, a, f)) => (Some(t), Some(i), a, Some(f)),
        None => (None, None, None, None),
    };
    let tb_secs = if time_base.denominator() == 0 {
        0.0
    } else {
        f64::from(time_base.numerator()) / f64::from(time_base.denominator())
    };
    // Two threads: this one demuxes and decodes (with FFmpeg's own frame threads for large
    // frames); the analysis thread converts, scores frames and picks keyframes, so the two
    // overlap on a multi-core box. Pictures cross in order, in batches, through a bounded queue.
    let (to_analyzer, frames_rx) = std::sync::mpsc::sync_channel::<FrameBatch>(ANALYSIS_QUEUE_BATCHES);
    let mut analyzer = ShotAnalyzer::new(opts.content_threshold, opts.min_shot_frames);
    analyzer.tap = frame_tap;
    let mut pipe = ShotsPipeline {
        cancel,
        on_progress,
        time_base: tb_secs,
        start_ts,
        frame_duration_secs: fps.map_or(0.0, |f| 1.0 / f),
        duration_secs,
        last_progress: Instant::now(),
        processing: None,
        to_analyzer: Some(to_analyzer),
        audio: audio_tap,
        batch: Vec::with_capacity(ANALYSIS_BATCH_FRAMES),
        batch_frames: 1,
        spare: ffmpeg::frame::Video::empty(),
        frames_decoded: 0,
        frames_corrupt: 0,
        consecutive_errors: 0,
        last_error: None,
        first_time_secs: None,
        last_time_secs: 0.0,
    };
    let (decoded, analyzed, inferred) = std::thread::scope(|scope| {
        // The `full` profile's inference thread; it ends when the shots thread hangs up.
        let inference = match inference.map(|stage| {
            std::thread::Builder::new()
                .name("gaffer-inference".to_string())
                .spawn_scoped(scope, move || stage.run(cancel))
        }) {
            None => None,
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => {
                let err = AnalysisError::Internal(format!("cannot start the inference thread: {e}"));
                return (Err(err), None, None);
            }
        };
        let worker = std::thread::Builder::new()
            .name("gaffer-shots".to_string())
            .spawn_scoped(scope, move || analyzer.run(frames_rx));
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                let err = AnalysisError::Internal(format!("cannot start the analysis thread: {e}"));
                return (Err(err), None, None);
            }
        };
        let decoded = decode_all(&mut pipe, &mut input, &mut decoder, stream_index);
        // The last, partly filled batch; also after a decode error (a truncated file still
        // gets the digest of its decoded part).
        let decoded = match (decoded, pipe.flush()) {
            (Ok(read_error), Ok(())) => Ok(read_error),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        };
        // Hanging up lets the analysis thread finish the queued frames and return.
        pipe.to_analyzer = None;
        let analyzed =
            worker.join().unwrap_or_else(|_| Err(AnalysisError::Internal("the analysis thread panicked".into())));
        let inferred = inference
            .map(|h| h.join().unwrap_or_else(|_| Err(AnalysisError::Internal("the inference thread panicked".into()))));
        (decoded, Some(analyzed), inferred)
    });
    // An error of the inference thread explains a failed send on the shots thread.
    let inferred = match inferred {
        Some(Err(e)) => return Err(e),
        Some(Ok(v)) => Some(v),
        None => None,
    };
    let analyzer = match (decoded, analyzed) {
        (_, None) => return Err(AnalysisError::Internal("the analysis thread did not run".into())),
        // An error of the analysis thread explains a failed send on the decode side.
        (_, Some(Err(e))) => return Err(e),
        (Err(e), Some(Ok(_))) => return Err(e),
        (Ok(read_error), Some(Ok(a))) => (a, read_error),
    };
    let (analyzer, read_error) = analyzer;

    let n = pipe.frames_decoded;
    if n == 0 {
        let why = read_error
            .map(|e| e.to_string())
            .or_else(|| pipe.last_error.clone())
            .unwrap_or_else(|| "the stream has no frames".to_string());
        return Err(AnalysisError::DecodeFailed { reason: format!("no video frame could be decoded ({why})") });
    }
    if pipe.frames_corrupt > n {
        return Err(AnalysisError::DecodeFailed {
            reason: format!(
                "{} packets failed to decode and only {n} frames decoded (last error: {})",
                pipe.frames_corrupt,
                pipe.last_error.as_deref().unwrap_or("unknown")
            ),
        });
    }
    // A truncated file usually just ends (EOF, no read error), so also compare the media time
    // decoded with the declared duration.
    let decoded_secs = pipe.last_time_secs + pipe.frame_duration_secs;
    let short = duration_secs.is_some_and(|total| decoded_secs < total * TRUNCATED_SHORT_FRACTION);
    if read_error.is_some() || short {
        let why = read_error.map_or_else(|| "the data ends early".to_string(), |e| e.to_string());
        let total = duration_secs.unwrap_or(0.0);
        if total > 0.0 && decoded_secs < total * TRUNCATED_DECODED_FRACTION_MIN {
            return Err(AnalysisError::DecodeFailed {
                reason: format!(
                    "the file is truncated or damaged: only {decoded_secs:.1} s of {total:.1} s could be decoded ({why})"
                ),
            });
        }
        tracing::warn!(
            path = %source.path, reason = %why, decoded_secs, declared_secs = total, frames = n,
            "reading stopped early; the digest covers only the decoded part"
        );
    }

    let (pw, ph) = pipe.processing.unwrap_or((0, 0));
    let scale_flags =
        if technical.streams.get(stream_index).is_some_and(|s| s.width == Some(pw) && s.height == Some(ph)) {
            "bicubic (convert only)"
        } else {
            "fast_bilinear"
        };
    let analyzers = vec![
        AnalyzerInfo {
            name: "decode.ffmpeg".to_string(),
            version: format!(
                "libavformat {} libavcodec {} libswscale {}",
                version_text(ffmpeg::format::version()),
                version_text(ffmpeg::codec::version()),
                version_text(ffmpeg::software::scaling::version())
            ),
            parameters: vec![
                ("decoder".to_string(), decoder_name),
                ("thread_type".to_string(), "frame".to_string()),
                ("threads".to_string(), threads.to_string()),
            ],
        },
        AnalyzerInfo {
            name: "shots.content".to_string(),
            version: SHOTS_ANALYZER_VERSION.to_string(),
            parameters: vec![
                ("reference".to_string(), "PySceneDetect 0.7.2 ContentDetector (detect-content defaults)".to_string()),
                ("threshold".to_string(), opts.content_threshold.to_string()),
                ("min_shot_frames".to_string(), opts.min_shot_frames.to_string()),
                ("weights".to_string(), "hue=1,sat=1,lum=1,edges=0".to_string()),
                ("filter_mode".to_string(), "merge".to_string()),
                ("processing_size".to_string(), format!("{pw}x{ph}")),
                ("scale".to_string(), scale_flags.to_string()),
            ],
        },
        AnalyzerInfo {
            name: "keyframes.phash".to_string(),
            version: SHOTS_ANALYZER_VERSION.to_string(),
            parameters: vec![
                ("selection".to_string(), "middle frame of each shot".to_string()),
                ("hash".to_string(), keyframes::PHASH_DESCRIPTION.to_string()),
            ],
        },
    ];
    let mut analyzers = analyzers;
    let (mut moderation, mut text, mut speech) = (None, None, None);
    if let (Some(finish), Some(vision)) = (full_finish, inferred) {
        let audio = pipe.audio.take().map(full::AudioTap::finish).transpose()?;
        let sections = finish.sections(vision, audio, analyzer.tap_stats);
        moderation = Some(sections.moderation);
        text = Some(sections.text);
        speech = sections.speech;
        analyzers.extend(sections.analyzers);
    }
    let end_secs = pipe.last_time_secs + pipe.frame_duration_secs;
    let shots = analyzer.finish(n, pipe.first_time_secs.unwrap_or(0.0), end_secs, pipe.frames_corrupt)?;
    Ok(Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: opts.profile.as_str().to_string(),
        source,
        technical,
        shots,
        moderation,
        text,
        speech,
        analyzers,
        analysis_secs: started.elapsed().as_secs_f64(),
    })
}
