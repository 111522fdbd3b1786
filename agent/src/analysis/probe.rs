//! Container and stream metadata, read from an opened FFmpeg input (what `ffprobe` shows).

use ffmpeg::format::context::Input;
use ffmpeg::media::Type as MediaType;
use ffmpeg::{Rational, Stream};
use ffmpeg_next as ffmpeg;
use gaffer_protocol::digest::{StreamInfo, StreamKind, TechnicalMetadata};

/// FFmpeg's `AV_TIME_BASE`: container durations are in microseconds.
const AV_TIME_BASE: f64 = 1_000_000.0;

/// Seconds of `ts` ticks of `tb`, or `None` for FFmpeg's "no value" (`AV_NOPTS_VALUE`, which is
/// `i64::MIN`) and other negative or degenerate values.
pub(crate) fn ticks_to_secs(ts: i64, tb: Rational) -> Option<f64> {
    if ts < 0 || tb.denominator() == 0 {
        return None;
    }
    Some(ts as f64 * f64::from(tb.numerator()) / f64::from(tb.denominator()))
}

fn positive_u64(v: i64) -> Option<u64> {
    u64::try_from(v).ok().filter(|&v| v > 0)
}

/// Frame rate of a video stream: the average rate when the container gives one, else the
/// base ("real") rate.
pub(crate) fn frame_rate_fps(stream: &Stream<'_>) -> Option<f64> {
    [stream.avg_frame_rate(), stream.rate()]
        .into_iter()
        .find(|r| r.numerator() > 0 && r.denominator() > 0)
        .map(|r| f64::from(r.numerator()) / f64::from(r.denominator()))
}

fn kind(t: MediaType) -> StreamKind {
    match t {
        MediaType::Video => StreamKind::Video,
        MediaType::Audio => StreamKind::Audio,
        MediaType::Subtitle => StreamKind::Subtitle,
        MediaType::Data => StreamKind::Data,
        MediaType::Attachment => StreamKind::Attachment,
        MediaType::Unknown => StreamKind::Unknown,
    }
}

fn stream_info(stream: &Stream<'_>) -> StreamInfo {
    let params = stream.parameters();
    let tb = stream.time_base();
    let mut info = StreamInfo {
        index: u32::try_from(stream.index()).unwrap_or(u32::MAX),
        kind: kind(params.medium()),
        codec: params.id().name().to_string(),
        time_base: (tb.numerator(), tb.denominator()),
        duration_secs: ticks_to_secs(stream.duration(), tb),
        frames_declared: positive_u64(stream.frames()),
        width: None,
        height: None,
        frame_rate_fps: None,
        pixel_format: None,
        sample_rate_hz: None,
        channels: None,
        bit_rate_bps: None,
        language: stream.metadata().get("language").map(str::to_string),
    };
    // The safe ffmpeg-next API exposes per-stream codec parameters through a decoder context.
    // Opening one reads only the parameters (no packets), single-threaded; streams whose codec
    // this FFmpeg cannot decode keep these fields empty.
    let Ok(ctx) = ffmpeg::codec::context::Context::from_parameters(params) else {
        return info;
    };
    match info.kind {
        StreamKind::Video => {
            info.frame_rate_fps = frame_rate_fps(stream);
            if let Ok(video) = ctx.decoder().video() {
                info.width = Some(video.width()).filter(|&w| w > 0);
                info.height = Some(video.height()).filter(|&h| h > 0);
                info.pixel_format = video.format().descriptor().map(|d| d.name().to_string());
                info.bit_rate_bps = u64::try_from(video.bit_rate()).ok().filter(|&b| b > 0);
            }
        }
        StreamKind::Audio => {
            if let Ok(audio) = ctx.decoder().audio() {
                info.sample_rate_hz = Some(audio.rate()).filter(|&r| r > 0);
                info.channels = Some(u32::from(audio.channels())).filter(|&c| c > 0);
                info.bit_rate_bps = u64::try_from(audio.bit_rate()).ok().filter(|&b| b > 0);
            }
        }
        _ => {}
    }
    info
}

/// Reads container and stream metadata. `primary_video_stream` is left `None`; the caller
/// sets it once it has chosen the stream to analyze.
pub(crate) fn technical_metadata(input: &Input) -> TechnicalMetadata {
    let format = input.format();
    let duration_secs = Some(input.duration()).filter(|&d| d > 0).map(|d| d as f64 / AV_TIME_BASE);
    TechnicalMetadata {
        container: format.name().to_string(),
        container_long_name: format.description().to_string(),
        duration_secs,
        bit_rate_bps: positive_u64(input.bit_rate()),
        streams: input.streams().map(|s| stream_info(&s)).collect(),
        primary_video_stream: None,
    }
}
