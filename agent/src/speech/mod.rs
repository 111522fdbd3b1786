//! Speech segments from a file's audio track: FFmpeg decode → libswresample to 16 kHz mono →
//! Silero VAD v6 → the reference post-processing.
//!
//! * [`audio::decode_resampled`] decodes the first audio stream and resamples it with
//!   libswresample's defaults (the same conversion as `ffmpeg -ac 1 -ar 16000 -f f32le`),
//!   streaming: one decoded frame at a time.
//! * [`vad::SileroVad`] runs `silero_vad.onnx` on 512-sample windows with the 64-sample context
//!   and carried recurrent state of the package's `OnnxWrapper`; [`vad::SpeechTimestamps`]
//!   replicates `get_speech_timestamps` (silero-vad 6.2.3, `silero_vad/utils_vad.py`) with its
//!   defaults: threshold 0.5, neg_threshold 0.35, min speech 250 ms, min silence 100 ms,
//!   pad 30 ms, no maximum speech duration. See [`vad::VadParams`] for where each comes from.
//!
//! Parity with the Python package is tested in `agent/tests/speech.rs` against reference
//! outputs in `tests/fixtures/speech/` (see its README for how they were produced).

pub mod audio;
pub mod vad;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use gaffer_protocol::digest::{SpeechAnalysis, SpeechSegment};

use crate::models::{ModelsError, Registry, Runtime};
pub use vad::{SileroVad, SpeechTimestamps, VadParams, VadResult};

/// Errors of the speech analyzer.
#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// The file could not be opened as media.
    #[error("{path}: not readable as media: {reason}")]
    NotMedia {
        /// The file.
        path: String,
        /// FFmpeg's reason.
        reason: String,
    },
    /// No decoder for the audio codec in this FFmpeg build.
    #[error("no decoder for audio codec {codec}")]
    UnsupportedCodec {
        /// The codec.
        codec: String,
    },
    /// The audio is outside the limits (channels, frame size, sample rate).
    #[error("audio outside the limits: {detail}")]
    BadAudio {
        /// What is out of bounds.
        detail: String,
    },
    /// Decoding or resampling failed.
    #[error("audio decode failed: {reason}")]
    Decode {
        /// What failed.
        reason: String,
    },
    /// The model is missing or its session could not be created.
    #[error(transparent)]
    Models(#[from] ModelsError),
    /// The model does not look like Silero VAD v5/v6.
    #[error("silero-vad model has an unexpected signature: {detail}")]
    BadModel {
        /// What differs.
        detail: String,
    },
    /// ONNX Runtime failed while running the model.
    #[error("silero-vad inference failed: {detail}")]
    Inference {
        /// ONNX Runtime's error.
        detail: String,
    },
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Finds the speech in the first audio stream of `path`: decodes and resamples it to 16 kHz
/// mono, runs Silero VAD with the reference parameters ([`VadParams::default`]) and returns
/// the segments in seconds, the audio length and the speech fraction, stamped with the model's
/// name, version and SHA-256. `cancel` is checked for every packet.
///
/// Synchronous and CPU-bound: call it from a blocking thread. Returns `Ok(None)` when the file
/// has no audio stream.
///
/// # Errors
/// See [`SpeechError`].
pub fn analyze_speech(
    path: &Path,
    runtime: &Runtime,
    registry: &Registry,
    cancel: &AtomicBool,
) -> Result<Option<SpeechAnalysis>, SpeechError> {
    let model = registry.stamp(vad::MODEL_NAME).ok_or_else(|| ModelsError::NotInstalled {
        name: vad::MODEL_NAME.to_owned(),
        data_dir: registry.data_dir().display().to_string(),
    })?;
    let mut vad = SileroVad::new(runtime, registry)?;
    let started = std::time::Instant::now();
    let Some(stream) = audio::decode_resampled(path, vad::SAMPLE_RATE_HZ, cancel, &mut |s| vad.push_samples(s))? else {
        return Ok(None);
    };
    let result = vad.finish()?;
    tracing::info!(
        file = %path.display(),
        audio_secs = result.audio_secs(),
        segments = result.segments_samples.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "speech analysis done"
    );
    Ok(Some(to_analysis(&result, model, stream.index)))
}

/// Turns a [`VadResult`] into the digest's [`SpeechAnalysis`].
pub fn to_analysis(
    result: &VadResult,
    model: gaffer_protocol::digest::ModelStamp,
    audio_stream: usize,
) -> SpeechAnalysis {
    SpeechAnalysis {
        model,
        audio_stream: u32::try_from(audio_stream).unwrap_or(u32::MAX),
        audio_secs: result.audio_secs(),
        segments: result
            .segments_secs()
            .into_iter()
            .map(|(start_secs, end_secs)| SpeechSegment { start_secs, end_secs })
            .collect(),
        speech_fraction: result.speech_fraction(),
    }
}
