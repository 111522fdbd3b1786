//! NLE exports of a real job end to end: a `shots` job on sample media through the real binaries,
//! its OpenTimelineIO file read by the `opentimelineio` Python package and its EDL by
//! OpenTimelineIO's CMX 3600 adapter (the readers editors' tools use), and a 29.97 fps clip made
//! with FFmpeg whose EDL is drop-frame.
//!
//! Needs `GAFFER_TEST_PYTHON`: a Python with `opentimelineio==0.18.1` and
//! `otio-cmx3600-adapter==1.0.0` (`scripts/test-tools.sh` makes one); the test fails naming it when
//! it is unset.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use gaffer_tests::{media, Agent, ControlPlane};
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads an OTIO file and an EDL with OpenTimelineIO and prints what the test compares, as JSON.
const READ_WITH_OTIO: &str = r#"
import json, sys
import opentimelineio as otio
otio_text, edl_text, rate = open(sys.argv[1]).read(), open(sys.argv[2]).read(), float(sys.argv[3])
def ranges(tl):
    out = []
    for c in tl.find_clips():
        r = c.source_range
        out.append([r.start_time.value, r.duration.value, r.start_time.rate])
    return out
tl = otio.adapters.read_from_string(otio_text, "otio_json")
clips = list(tl.find_clips())
track = tl.tracks[0]
edl = otio.adapters.read_from_string(edl_text, "cmx_3600", rate=rate)
print(json.dumps({
    "otio_clips": ranges(tl),
    "otio_url": clips[0].media_reference.target_url,
    "otio_kind": track.kind,
    "otio_duration_frames": tl.duration().rescaled_to(rate).value,
    "edl_clips": ranges(edl),
}))
"#;

fn python() -> anyhow::Result<PathBuf> {
    match std::env::var_os("GAFFER_TEST_PYTHON") {
        Some(p) => Ok(PathBuf::from(p)),
        None => bail!(
            "GAFFER_TEST_PYTHON is not set: source scripts/test-tools.sh (or point it at a Python with \
             opentimelineio==0.18.1 and otio-cmx3600-adapter==1.0.0)"
        ),
    }
}

/// GET an export with the API token: (status, Content-Type, Content-Disposition, body).
fn export(cp: &ControlPlane, id: &str, format: &str) -> anyhow::Result<(u16, String, String, String)> {
    let resp = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?
        .get(format!("{}/api/v1/jobs/{id}/export?format={format}", cp.http_url))
        .bearer_auth(&cp.api_token)
        .send()?;
    let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (ct, cd) = (header(reqwest::header::CONTENT_TYPE), header(reqwest::header::CONTENT_DISPOSITION));
    Ok((resp.status().as_u16(), ct, cd, resp.text()?))
}

/// Runs a `shots` job on `path` to success and returns it with its digest.
fn run_job(cp: &ControlPlane, agent: &Agent, path: &Path) -> anyhow::Result<Value> {
    let id = cp.submit_job(path, "stage-a")?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    if job["state"] != "succeeded" {
        bail!("job on {}: {job}\nagent log:\n{}", path.display(), agent.log());
    }
    Ok(job)
}

/// The digest's shots as (start frame, length in frames).
fn digest_shots(job: &Value) -> Vec<(f64, f64)> {
    job["digest"]["shots"]["shots"]
        .as_array()
        .map(|shots| {
            shots
                .iter()
                .map(|s| {
                    let (start, end) =
                        (s["start_frame"].as_f64().unwrap_or(-1.0), s["end_frame"].as_f64().unwrap_or(-1.0));
                    (start, end - start)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn frame_rate(job: &Value) -> f64 {
    let tech = &job["digest"]["technical"];
    let video = tech["primary_video_stream"].as_u64().unwrap_or(u64::MAX);
    tech["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["index"].as_u64() == Some(video)))
        .and_then(|s| s["frame_rate_fps"].as_f64())
        .unwrap_or(0.0)
}

/// Reads the job's OTIO and EDL exports with OpenTimelineIO and checks them against the digest.
fn check_with_otio(cp: &ControlPlane, job: &Value, dir: &Path) -> anyhow::Result<String> {
    let id = job["id"].as_str().context("job id")?;
    let (status, ct, cd, otio_text) = export(cp, id, "otio")?;
    assert_eq!(status, 200, "{otio_text}");
    assert_eq!(ct, "application/json");
    assert!(cd.starts_with("attachment; filename=\"") && cd.ends_with(".otio\""), "{cd}");
    let (status, ct, cd, edl_text) = export(cp, id, "edl")?;
    assert_eq!(status, 200, "{edl_text}");
    assert!(ct.starts_with("text/plain"), "{ct}");
    assert!(cd.ends_with(".edl\""), "{cd}");
    let (otio_file, edl_file) = (dir.join(format!("{id}.otio")), dir.join(format!("{id}.edl")));
    std::fs::write(&otio_file, &otio_text)?;
    std::fs::write(&edl_file, &edl_text)?;

    let rate = frame_rate(job);
    let out = Command::new(python()?)
        .arg("-c")
        .arg(READ_WITH_OTIO)
        .arg(&otio_file)
        .arg(&edl_file)
        .arg(format!("{rate:.17}"))
        .output()
        .context("running GAFFER_TEST_PYTHON")?;
    if !out.status.success() {
        bail!("OpenTimelineIO could not read the exports:\n{}\nEDL:\n{edl_text}", String::from_utf8_lossy(&out.stderr));
    }
    let read: Value = serde_json::from_slice(&out.stdout).context("the reader's JSON")?;
    let shots = digest_shots(job);
    assert!(shots.len() >= 2, "the sample has cuts: {shots:?}");
    let clips = |key: &str| -> Vec<(f64, f64, f64)> {
        read[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (c[0].as_f64().unwrap_or(-1.0), c[1].as_f64().unwrap_or(-1.0), c[2].as_f64().unwrap_or(-1.0))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let otio_clips = clips("otio_clips");
    assert_eq!(otio_clips.len(), shots.len(), "one OTIO clip per shot: {read}");
    for (i, (clip, shot)) in otio_clips.iter().zip(&shots).enumerate() {
        assert_eq!((clip.0, clip.1), *shot, "OTIO clip {i} = the digest's shot {i}");
        assert_eq!(clip.2, rate, "OTIO clip {i} at the source rate");
    }
    let total: f64 = shots.iter().map(|s| s.1).sum();
    assert_eq!(read["otio_duration_frames"].as_f64(), Some(total), "{read}");
    assert_eq!(read["otio_kind"], "Video");
    let source = job["digest"]["source"]["path"].as_str().context("source path")?;
    assert_eq!(read["otio_url"].as_str(), Some(format!("file://{source}").as_str()), "{read}");

    let edl_clips = clips("edl_clips");
    assert_eq!(edl_clips.len(), shots.len(), "one EDL event per shot: {read}\n{edl_text}");
    for (i, (clip, shot)) in edl_clips.iter().zip(&shots).enumerate() {
        assert_eq!((clip.0, clip.1), *shot, "EDL event {i} = the digest's shot {i}\n{edl_text}");
    }
    Ok(edl_text)
}

#[test]
fn a_jobs_otio_and_edl_are_read_by_opentimelineio_and_a_29_97_clip_is_drop_frame() -> anyhow::Result<()> {
    python()?;
    let work = tempfile::tempdir()?;
    let clips = work.path().join("clips");
    std::fs::create_dir(&clips)?;
    // The 29.97 fps copy of the sample (every frame re-timed onto the NTSC rate).
    let ntsc = clips.join("bikes-2997.mp4");
    let ff = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(media("bikes.mp4"))
        .args(["-vf", "fps=30000/1001", "-an", "-c:v", "libx264", "-preset", "ultrafast"])
        .arg(&ntsc)
        .output()?;
    assert!(ff.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&ff.stderr));
    let native = clips.join("bikes.mp4");
    std::fs::copy(media("bikes.mp4"), &native)?;
    let clips = clips.canonicalize()?;

    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(std::slice::from_ref(&clips))?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;

    // 25 fps: non-drop timecode.
    let job = run_job(&cp, &agent, &clips.join("bikes.mp4"))?;
    assert_eq!(frame_rate(&job), 25.0);
    let edl = check_with_otio(&cp, &job, work.path())?;
    assert!(edl.contains("\nFCM: NON-DROP FRAME\n"), "{edl}");
    assert!(!edl.contains(';'), "no drop-frame separator at 25 fps:\n{edl}");

    // The same footage at 29.97: drop-frame, and OpenTimelineIO reads the same frames back.
    let job = run_job(&cp, &agent, &clips.join("bikes-2997.mp4"))?;
    assert!((frame_rate(&job) - 30000.0 / 1001.0).abs() < 1e-9, "{}", frame_rate(&job));
    let edl = check_with_otio(&cp, &job, work.path())?;
    assert!(edl.contains("\nFCM: DROP FRAME\n"), "{edl}");
    let event = edl.lines().find(|l| l.starts_with("001 ")).context("event 001")?;
    assert!(event.contains("00:00:00;00"), "drop-frame timecodes use ';': {event}");

    // The CSV has PySceneDetect's columns, one row per shot, start frames 1-based.
    let id = job["id"].as_str().context("id")?;
    let (status, ct, cd, csv) = export(&cp, id, "csv")?;
    assert_eq!(status, 200, "{csv}");
    assert!(ct.starts_with("text/csv"), "{ct}");
    assert!(cd.ends_with("-Scenes.csv\""), "{cd}");
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("Timecode List:,"), "{csv}");
    assert!(lines[1].starts_with("Scene Number,Start Frame,Start Timecode,Start Time (seconds),End Frame"), "{csv}");
    let shots = digest_shots(&job);
    assert_eq!(lines.len(), 2 + shots.len(), "{csv}");
    assert_eq!(lines[2].split(',').nth(1), Some("1"));

    // Errors: an unknown format is 400, a job without a digest 409, an unknown job 404, all JSON.
    let (status, _, _, body) = export(&cp, id, "aaf")?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("format=otio"), "{body}");
    let bad = cp.submit_job(Path::new("/nonexistent/clip.mp4"), "stage-a")?;
    let (status, _, _, body) = export(&cp, &bad, "otio")?;
    assert_eq!(status, 409, "{body}");
    assert!(serde_json::from_str::<Value>(&body)?["error"].is_string(), "{body}");
    let (status, _, _, body) = export(&cp, &uuid_nil(), "otio")?;
    assert_eq!(status, 404, "{body}");

    // The job page links the three exports, and the dashboard route serves them.
    let session = cp.login()?;
    let (status, html) = cp.page(&session, &format!("/jobs/{id}"))?;
    assert_eq!(status, 200);
    for f in ["otio", "edl", "csv"] {
        assert!(html.contains(&format!("href=\"/jobs/{id}/export?format={f}\"")), "link to {f}");
    }
    let (status, page_edl) = cp.page(&session, &format!("/jobs/{id}/export?format=edl"))?;
    assert_eq!(status, 200);
    assert_eq!(page_edl, edl, "the dashboard serves the same EDL");
    Ok(())
}

fn uuid_nil() -> String {
    "00000000-0000-0000-0000-000000000000".into()
}
