//! Streaming decode of an audio stream to 16 kHz mono `f32` with FFmpeg (libswresample).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use ffmpeg::format::sample::Type as SampleType;
use ffmpeg::format::Sample;
use ffmpeg::software::resampling;
use ffmpeg::ChannelLayout;
use ffmpeg_next as ffmpeg;

use super::SpeechError;

/// Most channels accepted in an audio stream (checked before resampling).
pub const AUDIO_CHANNELS_MAX: u16 = 64;
/// Most samples per channel accepted in one decoded audio frame (checked before resampling).
pub const AUDIO_FRAME_SAMPLES_MAX: usize = 1 << 20;
/// Highest input sample rate accepted, Hz.
pub const AUDIO_RATE_HZ_MAX: u32 = 768_000;

/// The audio stream chosen for analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioStreamInfo {
    /// Stream index in the container.
    pub index: usize,
    /// Codec name, e.g. `"ac3"`.
    pub codec: String,
}

/// Decodes the first audio stream of `path`, resampled by libswresample (default options:
/// its default downmix matrix and filter, as `ffmpeg -ac 1 -ar 16000 -f f32le` uses) to mono
/// packed `f32` at `rate_hz`, and hands the samples to `sink` as they come, one decoded frame
/// at a time, so memory stays bounded whatever the length. `cancel` is checked every packet.
///
/// Returns `Ok(None)` when the file has no audio stream.
///
/// # Errors
/// [`SpeechError::NotMedia`], [`SpeechError::UnsupportedCodec`], [`SpeechError::BadAudio`] (too
/// many channels, oversize frames), [`SpeechError::Decode`], [`SpeechError::Cancelled`], or the
/// sink's own error.
pub fn decode_resampled(
    path: &Path,
    rate_hz: u32,
    cancel: &AtomicBool,
    sink: &mut dyn FnMut(&[f32]) -> Result<(), SpeechError>,
) -> Result<Option<AudioStreamInfo>, SpeechError> {
    crate::analysis::init_ffmpeg().map_err(|e| SpeechError::Decode { reason: e.to_string() })?;
    // "file:" pins FFmpeg to the local-file protocol whatever the path looks like.
    let url = format!("file:{}", path.display());
    let mut input = ffmpeg::format::input(&url)
        .map_err(|e| SpeechError::NotMedia { path: path.display().to_string(), reason: e.to_string() })?;
    let Some(stream) = input.streams().find(|s| s.parameters().medium() == ffmpeg::media::Type::Audio) else {
        return Ok(None);
    };
    let index = stream.index();
    let time_base = stream.time_base();
    let ctx = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| SpeechError::Decode { reason: format!("bad codec parameters: {e}") })?;
    let codec_id = ctx.id();
    let codec = format!("{codec_id:?}").to_lowercase();
    if ffmpeg::decoder::find(codec_id).is_none() {
        return Err(SpeechError::UnsupportedCodec { codec });
    }
    let mut decoder = ctx.decoder();
    decoder.set_packet_time_base(time_base);
    let mut decoder = decoder.audio().map_err(|e| SpeechError::UnsupportedCodec { codec: format!("{codec}: {e}") })?;
    let info = AudioStreamInfo { index, codec };

    let mut resampler: Option<resampling::Context> = None;
    let mut packet = ffmpeg::Packet::empty();
    let mut frame = ffmpeg::frame::Audio::empty();
    let mut decode_errors = 0u32;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(SpeechError::Cancelled);
        }
        match packet.read(&mut input) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(e) => {
                tracing::warn!(error = %e, "audio read stopped early; analyzing what was read");
                break;
            }
        }
        if packet.stream() != index {
            continue;
        }
        if let Err(e) = decoder.send_packet(&packet) {
            decode_errors += 1;
            tracing::debug!(error = %e, "audio packet failed to decode; skipped");
            if decode_errors > 1000 {
                return Err(SpeechError::Decode { reason: format!("too many undecodable audio packets: {e}") });
            }
        }
        drain(&mut decoder, &mut frame, &mut resampler, rate_hz, sink)?;
    }
    if decoder.send_eof().is_ok() {
        drain(&mut decoder, &mut frame, &mut resampler, rate_hz, sink)?;
    }
    if let Some(r) = resampler.as_mut() {
        flush(r, sink)?;
    }
    Ok(Some(info))
}

pub(crate) fn drain(
    decoder: &mut ffmpeg::decoder::Audio,
    frame: &mut ffmpeg::frame::Audio,
    resampler: &mut Option<resampling::Context>,
    rate_hz: u32,
    sink: &mut dyn FnMut(&[f32]) -> Result<(), SpeechError>,
) -> Result<(), SpeechError> {
    loop {
        match decoder.receive_frame(frame) {
            Ok(()) => {}
            Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::error::EAGAIN => return Ok(()),
            Err(ffmpeg::Error::Eof) => return Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "audio frame failed to decode; skipped");
                return Ok(());
            }
        }
        let channels = frame.channels();
        if channels == 0 || channels > AUDIO_CHANNELS_MAX {
            return Err(SpeechError::BadAudio {
                detail: format!("{channels} channels (1..={AUDIO_CHANNELS_MAX} supported)"),
            });
        }
        if frame.samples() > AUDIO_FRAME_SAMPLES_MAX {
            return Err(SpeechError::BadAudio {
                detail: format!("a frame of {} samples (at most {AUDIO_FRAME_SAMPLES_MAX})", frame.samples()),
            });
        }
        let rate = frame.rate();
        if rate == 0 || rate > AUDIO_RATE_HZ_MAX {
            return Err(SpeechError::BadAudio { detail: format!("sample rate {rate} Hz") });
        }
        // Streams without a declared layout get FFmpeg's default for their channel count,
        // as the ffmpeg CLI does.
        let mut layout = frame.channel_layout();
        if layout.is_empty() || layout.channels() != i32::from(channels) {
            layout = ChannelLayout::default(i32::from(channels));
            frame.set_channel_layout(layout);
        }
        let format = frame.format();
        let stale = resampler.as_ref().is_none_or(|r| {
            let i = r.input();
            i.format != format || i.rate != rate || i.channel_layout != layout
        });
        if stale {
            if let Some(r) = resampler.as_mut() {
                flush(r, sink)?;
            }
            *resampler = Some(
                resampling::Context::get(
                    format,
                    layout,
                    rate,
                    Sample::F32(SampleType::Packed),
                    ChannelLayout::MONO,
                    rate_hz,
                )
                .map_err(|e| SpeechError::Decode { reason: format!("cannot set up resampling: {e}") })?,
            );
        }
        let Some(r) = resampler.as_mut() else {
            continue;
        };
        // A fresh output frame each time: ffmpeg-next sizes it from the input frame, and a
        // reused frame would keep the previous (smaller) sample count as its capacity.
        let mut out = ffmpeg::frame::Audio::empty();
        r.run(frame, &mut out).map_err(|e| SpeechError::Decode { reason: format!("resampling failed: {e}") })?;
        if out.samples() > 0 {
            sink(&out.plane::<f32>(0)[..out.samples()])?;
        }
    }
}

/// Drains the resampler's buffered samples.
pub(crate) fn flush(
    r: &mut resampling::Context,
    sink: &mut dyn FnMut(&[f32]) -> Result<(), SpeechError>,
) -> Result<(), SpeechError> {
    for _ in 0..64 {
        let mut out = ffmpeg::frame::Audio::new(Sample::F32(SampleType::Packed), 4096, ChannelLayout::MONO);
        r.flush(&mut out).map_err(|e| SpeechError::Decode { reason: format!("resampling flush failed: {e}") })?;
        if out.samples() == 0 {
            break;
        }
        sink(&out.plane::<f32>(0)[..out.samples()])?;
    }
    Ok(())
}
