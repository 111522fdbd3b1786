//! Exports of a succeeded job's shots for editors: `GET /api/v1/jobs/{id}/export?format=F` (API
//! token) and `GET /jobs/{id}/export?format=F` (dashboard session, linked from the job page), both
//! `viewer` and above.
//!
//! | `format` | body | Content-Type | file name |
//! |---|---|---|---|
//! | `otio` | OpenTimelineIO JSON: `Timeline.1` → `Stack.1` → one video `Track.1` with one `Clip.2` per shot, each referencing the source file (`ExternalReference.1`, `file://` URL) with its `source_range` in frames at the source rate; `Marker.2`s on the track for moderation ranges (`RED`), on-screen text (`YELLOW`) and speech (`GREEN`) | `application/json` | `<stem>.otio` |
//! | `edl` | CMX 3600 EDL: `TITLE:`, `FCM: DROP FRAME` or `NON-DROP FRAME`, one cut event per shot (`001  AX       V     C        src_in src_out rec_in rec_out`) with `* FROM CLIP NAME:` and `* SOURCE FILE:` | `text/plain` | `<stem>.edl` |
//! | `csv` | PySceneDetect's `list-scenes` CSV: the `Timecode List:` row, then the header row and one row per scene | `text/csv` | `<stem>-Scenes.csv` |
//!
//! **Frames, not seconds.** Every shot boundary comes from the digest's frame numbers
//! ([`Shot::start_frame`], [`Shot::end_frame`], end exclusive); times are derived from them at the
//! source rate and never read back from the digest's float seconds. The rate is the primary video
//! stream's `frame_rate_fps` as FFmpeg reports it (`24000/1001` is `23.976023976…`): OTIO's
//! `RationalTime.rate` is that value; the EDL's timecode counts frames at the nominal integer rate
//! (24 for 23.976, 30 for 29.97) and is drop-frame (`;` before the frames, SMPTE 12M) at 29.97
//! and 59.94, computed in [`SourceRate::timecode`]; the CSV's seconds are frame / rate, as
//! PySceneDetect computes them. Markers (the only findings without frame numbers) are placed at
//! `round(seconds × rate)`.
//!
//! Errors: unknown job 404, a job without a digest (not succeeded) or without a video frame rate
//! 409, a missing or unknown `format` 400, all as the API's `{"error": "…"}` (an HTML error page
//! on the dashboard route). Bounds: the body is linear in the digest, which the frame limit of the
//! link bounds (8 MiB).

use std::str::FromStr;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use gaffer_protocol::digest::{Digest, Shot};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

use super::api::parse_id;
use super::api::JobIdParam;
use super::auth::{ApiCaller, Session};
use super::openapi::ErrorBody;
use super::{AppError, HttpState, PageError};
use crate::store::{JobRecord, JobState};

/// The formats of [`export`], by their `format` query value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    /// OpenTimelineIO JSON (`.otio`).
    Otio,
    /// CMX 3600 EDL (`.edl`).
    Edl,
    /// PySceneDetect `list-scenes` CSV (`-Scenes.csv`).
    Csv,
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "otio" => Ok(ExportFormat::Otio),
            "edl" => Ok(ExportFormat::Edl),
            "csv" => Ok(ExportFormat::Csv),
            other => Err(format!("unknown export format {other:?}: use format=otio, format=edl or format=csv")),
        }
    }
}

/// The `?format=` query of both export routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// `otio` (OpenTimelineIO JSON), `edl` (CMX 3600) or `csv` (PySceneDetect `list-scenes`).
    #[serde(default)]
    #[param(required = true, value_type = String, example = "otio", pattern = "^(otio|edl|csv)$")]
    format: Option<String>,
}

/// One export, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Export {
    /// The file's text.
    pub(crate) body: String,
    /// Its Content-Type.
    pub(crate) content_type: &'static str,
    /// The file name offered in Content-Disposition (ASCII letters, digits, `.`, `-`, `_`).
    pub(crate) file_name: String,
}

impl IntoResponse for Export {
    fn into_response(self) -> Response {
        let disposition = format!("attachment; filename=\"{}\"", self.file_name);
        let mut response = self.body.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        // The file name holds only [A-Za-z0-9._-] (file_stem), so it is always a valid header.
        if let Ok(v) = HeaderValue::from_str(&disposition) {
            headers.insert(header::CONTENT_DISPOSITION, v);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The source's frame rate, as the exports use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SourceRate {
    /// Frames per second as FFmpeg reports the stream's rate (`24000/1001` → 23.976023976…).
    pub(crate) fps: f64,
    /// Frames per timecode second: the nominal integer rate (24 for 23.976, 30 for 29.97).
    pub(crate) timebase: u32,
    /// An NTSC rate (n × 1000/1001).
    pub(crate) ntsc: bool,
    /// Drop-frame timecode: NTSC at a multiple of 30 (29.97, 59.94).
    pub(crate) drop_frame: bool,
}

/// How close a rate must be to n or n × 1000/1001 to count as that rate, frames per second.
/// FFmpeg's rationals give the exact quotient; this only absorbs the f64 rounding.
const RATE_TOLERANCE_FPS: f64 = 1e-6;

impl SourceRate {
    /// The rate of `fps` frames per second; None unless it is finite and positive.
    pub(crate) fn of(fps: f64) -> Option<Self> {
        if !fps.is_finite() || fps <= 0.0 || fps > 1000.0 {
            return None;
        }
        let whole = fps.round();
        if (fps - whole).abs() < RATE_TOLERANCE_FPS && whole >= 1.0 {
            return Some(Self { fps, timebase: whole as u32, ntsc: false, drop_frame: false });
        }
        let nominal = (fps * 1.001).round();
        if nominal >= 1.0 && (fps - nominal * 1000.0 / 1001.0).abs() < RATE_TOLERANCE_FPS {
            let timebase = nominal as u32;
            return Some(Self { fps, timebase, ntsc: true, drop_frame: timebase.is_multiple_of(30) });
        }
        // Any other rate (12.5, a variable-rate average): timecode at the nearest whole rate.
        Some(Self { fps, timebase: (whole as u32).max(1), ntsc: false, drop_frame: false })
    }

    /// The rate of the digest's primary video stream.
    ///
    /// # Errors
    /// [`AppError::Conflict`] when the digest names no video stream with a frame rate.
    pub(crate) fn of_digest(digest: &Digest) -> Result<Self, AppError> {
        let stream =
            digest.technical.primary_video_stream.and_then(|i| digest.technical.streams.iter().find(|s| s.index == i));
        stream.and_then(|s| s.frame_rate_fps).and_then(Self::of).ok_or_else(|| {
            AppError::Conflict(
                "the job's digest has no video stream with a frame rate, so its shots have no timecodes".into(),
            )
        })
    }

    /// SMPTE timecode of frame `frame` (`HH:MM:SS:FF`, `HH:MM:SS;FF` when drop-frame; hours wrap
    /// at 24).
    ///
    /// Drop-frame (SMPTE 12M) skips the frame numbers 0 and 1 (0 to 3 at 59.94) at the start of
    /// every minute except each tenth, so the label keeps up with the wall clock. Computed here:
    /// `vtc` 0.1.14 labels frame 1799 at 29.97 DF `00:01:00;00` (a label that does not exist) and
    /// `video-timecode` needs a nightly compiler, so no crate fitted.
    pub(crate) fn timecode(&self, frame: u64) -> String {
        let fps = u64::from(self.timebase);
        let mut label = frame;
        if self.drop_frame {
            let dropped = 2 * (fps / 30);
            let per_minute = fps * 60 - dropped;
            let per_ten_minutes = fps * 600 - dropped * 9;
            let (tens, rest) = (frame / per_ten_minutes, frame % per_ten_minutes);
            label += dropped * 9 * tens;
            if rest > dropped {
                label += dropped * ((rest - dropped) / per_minute);
            }
        }
        let ff = label % fps;
        let secs = label / fps;
        let sep = if self.drop_frame { ';' } else { ':' };
        format!("{:02}:{:02}:{:02}{sep}{ff:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
    }

    /// Seconds of frame `frame`: frame / fps.
    fn seconds(&self, frame: u64) -> f64 {
        frame as f64 / self.fps
    }

    /// The frame nearest `secs` (negative and non-finite times clamp to 0).
    fn frame_at(&self, secs: f64) -> u64 {
        let f = (secs * self.fps).round();
        if f.is_finite() && f > 0.0 {
            f as u64
        } else {
            0
        }
    }
}

/// Renders `digest` (of `job`) in `format`.
///
/// # Errors
/// [`AppError::Conflict`] without a video frame rate; [`AppError::Internal`] if the CSV writer
/// fails (it does not on a digest that decoded).
pub(crate) fn export(job: &JobRecord, digest: &Digest, format: ExportFormat) -> Result<Export, AppError> {
    let rate = SourceRate::of_digest(digest)?;
    let stem = file_stem(&digest.source.path);
    Ok(match format {
        ExportFormat::Otio => Export {
            body: otio(job, digest, &rate).to_string(),
            content_type: "application/json",
            file_name: format!("{stem}.otio"),
        },
        ExportFormat::Edl => Export {
            body: edl(digest, &rate),
            content_type: "text/plain; charset=utf-8",
            file_name: format!("{stem}.edl"),
        },
        ExportFormat::Csv => Export {
            body: scene_list_csv(digest, &rate)?,
            content_type: "text/csv; charset=utf-8",
            file_name: format!("{stem}-Scenes.csv"),
        },
    })
}

/// The file name of `path` without its extension, cut to a safe ASCII header value (`video` if
/// nothing is left).
fn file_stem(path: &str) -> String {
    let stem = std::path::Path::new(path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let safe: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' })
        .take(120)
        .collect();
    if safe.trim_matches(['_', '.']).is_empty() {
        "video".into()
    } else {
        safe
    }
}

/// The file's name (last path component), for display in the exports.
fn file_name(path: &str) -> String {
    std::path::Path::new(path).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.into())
}

fn rational_time(frames: u64, rate: &SourceRate) -> Value {
    json!({ "OTIO_SCHEMA": "RationalTime.1", "rate": rate.fps, "value": frames as f64 })
}

fn time_range(start_frame: u64, duration_frames: u64, rate: &SourceRate) -> Value {
    json!({
        "OTIO_SCHEMA": "TimeRange.1",
        "start_time": rational_time(start_frame, rate),
        "duration": rational_time(duration_frames, rate),
    })
}

/// `file://` URL of an absolute path (percent-encoded); the path as given if it is not absolute.
fn file_url(path: &str) -> String {
    url::Url::from_file_path(path).map(|u| u.to_string()).unwrap_or_else(|()| path.to_string())
}

fn marker(name: &str, color: &str, start_frame: u64, end_frame: u64, comment: String, rate: &SourceRate) -> Value {
    json!({
        "OTIO_SCHEMA": "Marker.2",
        "metadata": {},
        "name": name,
        "color": color,
        "marked_range": time_range(start_frame, end_frame.saturating_sub(start_frame), rate),
        "comment": comment,
    })
}

/// Longest marker name taken from on-screen text, characters (the whole text is the comment).
const MARKER_NAME_CHARS_MAX: usize = 64;

/// The OpenTimelineIO document.
fn otio(job: &JobRecord, digest: &Digest, rate: &SourceRate) -> Value {
    let name = file_name(&digest.source.path);
    let target_url = file_url(&digest.source.path);
    let frames_total = digest.shots.shots.last().map_or(digest.shots.frames_decoded, |s| s.end_frame);
    let clips: Vec<Value> = digest
        .shots
        .shots
        .iter()
        .map(|shot| {
            json!({
                "OTIO_SCHEMA": "Clip.2",
                "metadata": { "gaffer": {
                    "shot_index": shot.index,
                    "keyframe_frame": shot.keyframe.frame,
                    "keyframe_phash": shot.keyframe.phash,
                } },
                "name": format!("Shot {}", shot.index + 1),
                "source_range": time_range(shot.start_frame, shot.end_frame.saturating_sub(shot.start_frame), rate),
                "effects": [],
                "markers": [],
                "enabled": true,
                "media_references": { "DEFAULT_MEDIA": {
                    "OTIO_SCHEMA": "ExternalReference.1",
                    "metadata": {},
                    "name": name,
                    "available_range": time_range(0, frames_total, rate),
                    "available_image_bounds": null,
                    "target_url": target_url,
                } },
                "active_media_reference_key": "DEFAULT_MEDIA",
            })
        })
        .collect();
    let mut markers = Vec::new();
    if let Some(m) = &digest.moderation {
        for r in &m.ranges {
            // The range's end is the last sampled frame with the label: the marker covers it.
            let (start, end) = (rate.frame_at(r.start_secs), rate.frame_at(r.end_secs) + 1);
            let comment =
                format!("moderation: peak score {:.2} at {:.3} s ({})", r.peak_score, r.peak_time_secs, m.model.name);
            markers.push(marker(&r.label, "RED", start, end.max(start), comment, rate));
        }
    }
    if let Some(t) = &digest.text {
        for r in &t.readings {
            let (start, end) = (rate.frame_at(r.start_secs), rate.frame_at(r.end_secs) + 1);
            let name: String = r.text.chars().take(MARKER_NAME_CHARS_MAX).collect();
            let comment = format!("on-screen text (confidence {:.2}): {}", r.confidence, r.text);
            markers.push(marker(&name, "YELLOW", start, end.max(start), comment, rate));
        }
    }
    if let Some(s) = &digest.speech {
        for seg in &s.segments {
            let (start, end) = (rate.frame_at(seg.start_secs), rate.frame_at(seg.end_secs));
            markers.push(marker("speech", "GREEN", start, end.max(start), format!("speech ({})", s.model.name), rate));
        }
    }
    json!({
        "OTIO_SCHEMA": "Timeline.1",
        "metadata": { "gaffer": {
            "job_id": job.id,
            "source_path": digest.source.path,
            "frame_rate_fps": rate.fps,
            "digest_schema_version": digest.schema_version,
            "profile": digest.profile,
        } },
        "name": name,
        "global_start_time": null,
        "tracks": {
            "OTIO_SCHEMA": "Stack.1",
            "metadata": {},
            "name": "tracks",
            "source_range": null,
            "effects": [],
            "markers": [],
            "enabled": true,
            "children": [{
                "OTIO_SCHEMA": "Track.1",
                "metadata": {},
                "name": "Shots",
                "source_range": null,
                "effects": [],
                "markers": markers,
                "enabled": true,
                "kind": "Video",
                "children": clips,
            }],
        },
    })
}

/// Text safe on one EDL line: control characters become spaces.
fn edl_text(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The CMX 3600 EDL: one cut event per shot, the record side laid end to end from 00:00:00:00
/// (shots cover every frame from 0, so record and source timecodes agree).
fn edl(digest: &Digest, rate: &SourceRate) -> String {
    let name = edl_text(&file_name(&digest.source.path));
    let mut out = format!("TITLE: {name}\nFCM: {}\n\n", if rate.drop_frame { "DROP FRAME" } else { "NON-DROP FRAME" });
    let mut record = 0u64;
    for (n, shot) in digest.shots.shots.iter().enumerate() {
        let length = shot.end_frame.saturating_sub(shot.start_frame);
        let (src_in, src_out) = (rate.timecode(shot.start_frame), rate.timecode(shot.end_frame));
        let (rec_in, rec_out) = (rate.timecode(record), rate.timecode(record + length));
        record += length;
        out.push_str(&format!(
            "{:03}  AX       V     C        {src_in} {src_out} {rec_in} {rec_out}\n* FROM CLIP NAME:  {name}\n* SOURCE FILE: {}\n\n",
            n + 1,
            edl_text(&digest.source.path),
        ));
    }
    out
}

/// PySceneDetect's `FrameTimecode.get_timecode()` (precision 3, rounded): `HH:MM:SS.nnn` of
/// `secs`, with the same carry when rounding reaches 60 s.
fn scenedetect_timecode(secs: f64) -> String {
    let mut secs = secs;
    let mut hrs = (secs / 3600.0) as u64;
    secs -= hrs as f64 * 3600.0;
    let mut mins = (secs / 60.0) as u64;
    secs = (secs - mins as f64 * 60.0).max(0.0);
    // Python's round(secs, 3) rounds the exact binary value half to even; so does formatting.
    secs = format!("{secs:.3}").parse::<f64>().unwrap_or(secs).min(60.0);
    if secs.trunc() == 60.0 {
        secs = 0.0;
        mins += 1;
        if mins >= 60 {
            mins = 0;
            hrs += 1;
        }
    }
    // PySceneDetect formats with one more digit and drops the last (a truncation).
    let wide = format!("{secs:.4}");
    let msec = &wide[wide.len() - 5..wide.len() - 1];
    format!("{hrs:02}:{mins:02}:{:02}{msec}", secs.trunc() as u64)
}

/// PySceneDetect's `list-scenes` CSV (`write_scene_list` with the cut list): the first row is
/// `Timecode List:` and the start timecode of every scene after the first, then the header row,
/// then one row per scene with the start frame 1-based and the end frame its last frame (1-based,
/// the exclusive 0-based end), as PySceneDetect prints them.
fn scene_list_csv(digest: &Digest, rate: &SourceRate) -> Result<String, AppError> {
    let mut w =
        csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).flexible(true).from_writer(Vec::new());
    let mut first_row = Vec::new();
    let csv_err = |e: csv::Error| AppError::Internal(format!("writing the scene list CSV: {e}"));
    let shots: &[Shot] = &digest.shots.shots;
    let mut cuts = vec!["Timecode List:".to_string()];
    cuts.extend(shots.iter().skip(1).map(|s| scenedetect_timecode(rate.seconds(s.start_frame))));
    if shots.len() > 1 {
        w.write_record(&cuts).map_err(csv_err)?;
    } else {
        // No cut: PySceneDetect writes an empty first row (Python's csv writes an empty list as a
        // bare line end; this crate would write `""`).
        first_row.push(b'\n');
    }
    w.write_record([
        "Scene Number",
        "Start Frame",
        "Start Timecode",
        "Start Time (seconds)",
        "End Frame",
        "End Timecode",
        "End Time (seconds)",
        "Length (frames)",
        "Length (timecode)",
        "Length (seconds)",
    ])
    .map_err(csv_err)?;
    for (i, shot) in shots.iter().enumerate() {
        let length = shot.end_frame.saturating_sub(shot.start_frame);
        let (start, end, dur) = (rate.seconds(shot.start_frame), rate.seconds(shot.end_frame), rate.seconds(length));
        w.write_record([
            (i + 1).to_string(),
            (shot.start_frame + 1).to_string(),
            scenedetect_timecode(start),
            format!("{start:.3}"),
            shot.end_frame.to_string(),
            scenedetect_timecode(end),
            format!("{end:.3}"),
            length.to_string(),
            scenedetect_timecode(dur),
            format!("{dur:.3}"),
        ])
        .map_err(csv_err)?;
    }
    let rows = w.into_inner().map_err(|e| AppError::Internal(format!("writing the scene list CSV: {e}")))?;
    let bytes = [first_row, rows].concat();
    String::from_utf8(bytes).map_err(|e| AppError::Internal(format!("scene list CSV: {e}")))
}

/// The job and its digest, or the error both routes answer with.
fn exportable(state: &HttpState, id: &str, format: Option<&str>) -> Result<Export, AppError> {
    let format = match format.map(str::trim) {
        None | Some("") => {
            return Err(AppError::BadRequest("missing format: use format=otio, format=edl or format=csv".into()))
        }
        Some(f) => f.parse::<ExportFormat>().map_err(AppError::BadRequest)?,
    };
    let id = parse_id(id, "job")?;
    let store = state.app.store.as_ref();
    let job = store.get_job(id)?.ok_or_else(|| AppError::NotFound(format!("job {id}")))?;
    let digest = match (job.state, store.get_digest(id)?) {
        (JobState::Succeeded, Some(d)) => d,
        (state, _) => {
            return Err(AppError::Conflict(format!(
                "job {id} is {state}: only a succeeded job has shots to export",
                state = state.as_str()
            )))
        }
    };
    export(&job, &digest, format)
}

/// `GET /api/v1/jobs/{id}/export?format=otio|edl|csv`: the job's shots as a file for an editor.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/export", tag = "jobs", params(JobIdParam, ExportQuery),
    responses(
        (status = 200, description = "The export, with `Content-Disposition: attachment; filename=…`",
            content((String = "application/json"), (String = "text/plain; charset=utf-8"), (String = "text/csv; charset=utf-8"))),
        (status = 400, description = "The id is not a UUID, or the format is missing or unknown", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (no digest), or its digest has no video frame rate", body = ErrorBody),
    ))]
pub(crate) async fn api_export(
    _: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Export, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    exportable(&state, &id, query.format.as_deref())
}

/// `GET /jobs/{id}/export?format=otio|edl|csv` (the job page's links).
pub(crate) async fn page_export(
    _: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Export, PageError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    Ok(exportable(&state, &id, query.format.as_deref())?)
}

#[cfg(test)]
mod tests {
    use gaffer_protocol::digest::{
        Keyframe, ShotAnalysis, SourceInfo, StreamInfo, StreamKind, TechnicalMetadata, DIGEST_SCHEMA_VERSION,
    };
    use gaffer_protocol::messages::Profile;

    use super::*;
    use crate::store::{JobOrigin, Priority};

    /// A digest of `frames` frames at `fps` with cuts at `cuts`.
    fn digest(fps: f64, frames: u64, cuts: &[u64]) -> Digest {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(frames);
        let shots = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| Shot {
                index: i as u32,
                start_frame: w[0],
                end_frame: w[1],
                // Deliberately off: the exports must not read these.
                start_secs: w[0] as f64 / fps + 0.0004,
                end_secs: w[1] as f64 / fps + 0.0004,
                keyframe: Keyframe { frame: (w[0] + w[1]) / 2, time_secs: 0.0, phash: "00ff00ff00ff00ff".into() },
            })
            .collect();
        Digest {
            schema_version: DIGEST_SCHEMA_VERSION,
            profile: "shots".into(),
            source: SourceInfo { path: "/media/reel 1/take,2.mov".into(), size_bytes: 1, modified_unix_secs: None },
            technical: TechnicalMetadata {
                container: "mov".into(),
                container_long_name: "QuickTime / MOV".into(),
                duration_secs: Some(frames as f64 / fps),
                bit_rate_bps: None,
                streams: vec![StreamInfo {
                    index: 0,
                    kind: StreamKind::Video,
                    codec: "h264".into(),
                    time_base: (1, 90_000),
                    duration_secs: None,
                    frames_declared: Some(frames),
                    width: Some(64),
                    height: Some(48),
                    frame_rate_fps: Some(fps),
                    pixel_format: None,
                    sample_rate_hz: None,
                    channels: None,
                    bit_rate_bps: None,
                    language: None,
                }],
                primary_video_stream: Some(0),
            },
            shots: ShotAnalysis {
                detector: "content".into(),
                threshold: 27.0,
                min_shot_frames: 15,
                frames_decoded: frames,
                frames_corrupt: 0,
                cuts: Vec::new(),
                shots,
            },
            moderation: None,
            text: None,
            speech: None,
            analyzers: Vec::new(),
            analysis_secs: 1.0,
        }
    }

    fn job() -> JobRecord {
        JobRecord {
            id: uuid::Uuid::nil(),
            path: "/media/reel 1/take,2.mov".into(),
            site: "s".into(),
            profile: Profile::Shots,
            pinned_agent: None,
            origin: JobOrigin::Api,
            priority: Priority::Normal,
            state: JobState::Succeeded,
            agent: None,
            lease: None,
            lease_epoch: 1,
            progress: 1.0,
            frames_decoded: 0,
            error: None,
            attempts: 1,
            seq: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            finished_at_ms: Some(0),
            custody: None,
            submitted_by: None,
            history: Vec::new(),
        }
    }

    const NTSC_24: f64 = 24000.0 / 1001.0;
    const NTSC_30: f64 = 30000.0 / 1001.0;
    const NTSC_60: f64 = 60000.0 / 1001.0;

    #[test]
    fn rates_are_recognised_from_ffmpeg_values() {
        let r = |fps| SourceRate::of(fps).map(|r| (r.timebase, r.ntsc, r.drop_frame));
        assert_eq!(r(NTSC_24), Some((24, true, false)));
        assert_eq!(r(24.0), Some((24, false, false)));
        assert_eq!(r(25.0), Some((25, false, false)));
        assert_eq!(r(NTSC_30), Some((30, true, true)));
        assert_eq!(r(30.0), Some((30, false, false)));
        assert_eq!(r(NTSC_60), Some((60, true, true)));
        assert_eq!(r(12.5), Some((13, false, false)));
        assert_eq!(r(0.0), None);
        assert_eq!(r(f64::NAN), None);
    }

    #[test]
    fn drop_frame_timecodes_match_smpte_12m() {
        let df30 = SourceRate::of(NTSC_30).unwrap();
        assert_eq!(df30.timecode(0), "00:00:00;00");
        assert_eq!(df30.timecode(1799), "00:00:59;29");
        // Frames 0 and 1 of minute 1 are dropped from the count...
        assert_eq!(df30.timecode(1800), "00:01:00;02");
        assert_eq!(df30.timecode(17981), "00:09:59;29");
        // ...but not those of every tenth minute.
        assert_eq!(df30.timecode(17982), "00:10:00;00");
        assert_eq!(df30.timecode(107_892), "01:00:00;00");
        let df60 = SourceRate::of(NTSC_60).unwrap();
        // 59.94 drops four frame numbers a minute.
        assert_eq!(df60.timecode(3600), "00:01:00;04");
        assert_eq!(df60.timecode(35_964), "00:10:00;00");
    }

    #[test]
    fn non_drop_timecodes_count_frames_at_the_nominal_rate() {
        assert_eq!(SourceRate::of(NTSC_24).unwrap().timecode(24 * 60 + 5), "00:01:00:05");
        assert_eq!(SourceRate::of(24.0).unwrap().timecode(86_399), "00:59:59:23");
        assert_eq!(SourceRate::of(25.0).unwrap().timecode(90_000), "01:00:00:00");
        assert_eq!(SourceRate::of(30.0).unwrap().timecode(1800), "00:01:00:00");
    }

    #[test]
    fn otio_clips_are_frame_exact_at_every_rate() {
        for fps in [NTSC_24, 24.0, 25.0, NTSC_30, 30.0] {
            // A cut deep into a long file, where seconds × rate in f64 would drift.
            let d = digest(fps, 1_000_003, &[1, 17_982, 999_999]);
            let v = otio(&job(), &d, &SourceRate::of_digest(&d).unwrap());
            let clips = v["tracks"]["children"][0]["children"].as_array().unwrap();
            assert_eq!(clips.len(), 4, "{fps}");
            for (clip, shot) in clips.iter().zip(&d.shots.shots) {
                let range = &clip["source_range"];
                assert_eq!(range["start_time"]["value"].as_f64(), Some(shot.start_frame as f64));
                assert_eq!(range["duration"]["value"].as_f64(), Some((shot.end_frame - shot.start_frame) as f64));
                assert_eq!(range["start_time"]["rate"].as_f64(), Some(fps), "the rate FFmpeg reports");
            }
            let reference = &clips[0]["media_references"]["DEFAULT_MEDIA"];
            assert_eq!(reference["target_url"], "file:///media/reel%201/take,2.mov");
            assert_eq!(clips[0]["active_media_reference_key"], "DEFAULT_MEDIA");
        }
    }

    #[test]
    fn otio_markers_for_findings() {
        use gaffer_protocol::digest::{
            BoxPx, ModelStamp, ModerationAnalysis, ModerationRange, SpeechAnalysis, SpeechSegment, TextAnalysis,
            TextReading,
        };
        let stamp = |n: &str| ModelStamp { name: n.into(), version: "1".into(), sha256: "ab".into() };
        let b = BoxPx { x: 0.0, y: 0.0, width: 1.0, height: 1.0 };
        let mut d = digest(25.0, 250, &[100]);
        d.moderation = Some(ModerationAnalysis {
            model: stamp("nudenet"),
            sample_fps: 2.0,
            score_threshold: 0.5,
            frames_analyzed: 20,
            ranges: vec![ModerationRange {
                label: "FACE_FEMALE".into(),
                start_secs: 1.0,
                end_secs: 2.5,
                peak_score: 0.9,
                peak_time_secs: 2.0,
                peak_box: b,
                frames: 4,
            }],
        });
        d.text = Some(TextAnalysis {
            detector: stamp("det"),
            recognizer: stamp("rec"),
            classifier: None,
            frames_analyzed: 3,
            readings: vec![TextReading {
                text: "EXIT".into(),
                start_secs: 4.0,
                end_secs: 8.0,
                box_px: b,
                confidence: 0.8,
            }],
        });
        d.speech = Some(SpeechAnalysis {
            model: stamp("silero"),
            audio_stream: 1,
            audio_secs: 10.0,
            segments: vec![SpeechSegment { start_secs: 0.5, end_secs: 3.0 }],
            speech_fraction: 0.25,
        });
        let v = otio(&job(), &d, &SourceRate::of(25.0).unwrap());
        let markers = v["tracks"]["children"][0]["markers"].as_array().unwrap();
        let summary: Vec<(String, String, f64, f64)> = markers
            .iter()
            .map(|m| {
                let r = &m["marked_range"];
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["color"].as_str().unwrap().to_string(),
                    r["start_time"]["value"].as_f64().unwrap(),
                    r["duration"]["value"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("FACE_FEMALE".into(), "RED".into(), 25.0, 39.0),
                ("EXIT".into(), "YELLOW".into(), 100.0, 101.0),
                ("speech".into(), "GREEN".into(), 13.0, 62.0),
            ]
        );
        assert!(markers.iter().all(|m| m["OTIO_SCHEMA"] == "Marker.2"));
    }

    #[test]
    fn edl_events_per_shot_with_drop_frame_at_29_97() {
        let d = digest(NTSC_30, 18_000, &[1800, 17_982]);
        let edl = edl(&d, &SourceRate::of_digest(&d).unwrap());
        let lines: Vec<&str> = edl.lines().collect();
        assert_eq!(lines[0], "TITLE: take,2.mov");
        assert_eq!(lines[1], "FCM: DROP FRAME");
        let events: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(|c: char| c.is_ascii_digit())).collect();
        assert_eq!(
            events,
            vec![
                "001  AX       V     C        00:00:00;00 00:01:00;02 00:00:00;00 00:01:00;02",
                "002  AX       V     C        00:01:00;02 00:10:00;00 00:01:00;02 00:10:00;00",
                "003  AX       V     C        00:10:00;00 00:10:00;18 00:10:00;00 00:10:00;18",
            ]
        );
        assert_eq!(edl.matches("* FROM CLIP NAME:  take,2.mov\n").count(), 3);
    }

    #[test]
    fn edl_non_drop_at_other_rates() {
        for (fps, out) in
            [(NTSC_24, "00:00:04:04"), (24.0, "00:00:04:04"), (25.0, "00:00:04:00"), (30.0, "00:00:03:10")]
        {
            let d = digest(fps, 200, &[100]);
            let edl = edl(&d, &SourceRate::of_digest(&d).unwrap());
            assert!(edl.contains("FCM: NON-DROP FRAME\n"), "{fps}");
            assert!(edl.contains(&format!(" {out} ")), "{fps}: shot 1 ends at frame 100:\n{edl}");
        }
    }

    #[test]
    fn edl_lines_cannot_be_injected_through_the_path() {
        let mut d = digest(25.0, 50, &[]);
        d.source.path = "/media/a\n002  AX V C evil\r.mov".into();
        let edl = edl(&d, &SourceRate::of(25.0).unwrap());
        assert_eq!(edl.lines().filter(|l| l.starts_with("002")).count(), 0, "{edl}");
    }

    #[test]
    fn csv_matches_pyscenedetect_list_scenes() {
        // What `scenedetect -i x list-scenes` prints for a 23.976 fps file cut at frames 120 and 300
        // of 431 (PySceneDetect 0.6/0.7: frame / fps seconds, start frame 1-based).
        let d = digest(NTSC_24, 431, &[120, 300]);
        let csv = scene_list_csv(&d, &SourceRate::of_digest(&d).unwrap()).unwrap();
        assert_eq!(
            csv,
            "Timecode List:,00:00:05.005,00:00:12.512\n\
             Scene Number,Start Frame,Start Timecode,Start Time (seconds),End Frame,End Timecode,End Time (seconds),Length (frames),Length (timecode),Length (seconds)\n\
             1,1,00:00:00.000,0.000,120,00:00:05.005,5.005,120,00:00:05.005,5.005\n\
             2,121,00:00:05.005,5.005,300,00:00:12.512,12.512,180,00:00:07.507,7.507\n\
             3,301,00:00:12.512,12.512,431,00:00:17.976,17.976,131,00:00:05.464,5.464\n"
        );
    }

    #[test]
    fn csv_frames_exact_at_every_rate() {
        for fps in [NTSC_24, 24.0, 25.0, NTSC_30, 30.0] {
            let d = digest(fps, 3 * 3600 * 30, &[107_892]);
            let csv = scene_list_csv(&d, &SourceRate::of_digest(&d).unwrap()).unwrap();
            let row: Vec<&str> = csv.lines().nth(3).unwrap().split(',').collect();
            assert_eq!(row[1], "107893", "{fps}: start frame 1-based");
            assert_eq!(row[3], format!("{:.3}", 107_892.0 / fps), "{fps}");
        }
    }

    #[test]
    fn scenedetect_timecode_carries_like_python() {
        assert_eq!(scenedetect_timecode(0.0), "00:00:00.000");
        assert_eq!(scenedetect_timecode(59.9996), "00:01:00.000");
        assert_eq!(scenedetect_timecode(3599.9999), "01:00:00.000");
        assert_eq!(scenedetect_timecode(3725.5), "01:02:05.500");
    }

    #[test]
    fn one_shot_csv_starts_with_an_empty_cut_row() {
        let d = digest(25.0, 50, &[]);
        let csv = scene_list_csv(&d, &SourceRate::of(25.0).unwrap()).unwrap();
        assert!(csv.starts_with("\nScene Number,"), "{csv:?}");
    }

    #[test]
    fn file_names_are_safe_header_values() {
        assert_eq!(file_stem("/media/reel 1/take,2.mov"), "take_2");
        assert_eq!(file_stem("/media/\"x\";\r\n.mp4"), "_x____");
        assert_eq!(file_stem("/"), "video");
        let e = export(&job(), &digest(25.0, 50, &[]), ExportFormat::Csv).unwrap();
        assert_eq!(e.file_name, "take_2-Scenes.csv");
        assert_eq!(e.content_type, "text/csv; charset=utf-8");
    }

    #[test]
    fn formats_parse_and_unknown_ones_are_named() {
        assert_eq!("otio".parse::<ExportFormat>(), Ok(ExportFormat::Otio));
        assert_eq!("edl".parse::<ExportFormat>(), Ok(ExportFormat::Edl));
        assert_eq!("csv".parse::<ExportFormat>(), Ok(ExportFormat::Csv));
        assert!("aaf".parse::<ExportFormat>().unwrap_err().contains("format=otio"));
    }

    #[test]
    fn no_frame_rate_is_a_conflict() {
        let mut d = digest(25.0, 50, &[]);
        d.technical.primary_video_stream = None;
        assert!(matches!(export(&job(), &d, ExportFormat::Otio), Err(AppError::Conflict(_))));
    }
}
