//! The main job end to end: real `gaffer-control` and `gaffer-agent` processes on loopback, real
//! certificates, real FFmpeg on the sample media.

use std::collections::HashSet;
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use gaffer_protocol::codec::decode_payload;
use gaffer_protocol::AgentEnvelope;
use gaffer_tests::{media, media_dir, Agent, ControlPlane};
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn enrolled_agent_runs_a_job_on_real_media_and_the_digest_reaches_the_api() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    let listed = cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;
    assert_eq!(listed["site"], "stage-a");

    let path = media("bikes.mp4");
    let id = cp.submit_job(&path, "stage-a")?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(job["state"], "succeeded", "job: {job}\nagent log:\n{}", agent.log());
    assert_eq!(job["agent"], agent.agent_id.as_str());
    assert_eq!(job["progress"].as_f64(), Some(1.0));

    let digest = &job["digest"];
    assert_eq!(digest["source"]["path"], path.canonicalize()?.to_str().unwrap_or_default());
    let tech = &digest["technical"];
    let video = &tech["streams"][tech["primary_video_stream"].as_u64().unwrap_or(99) as usize];
    assert_eq!((video["width"].as_u64(), video["height"].as_u64()), (Some(640), Some(272)));
    assert_eq!(video["codec"], "h264");
    assert!((tech["duration_secs"].as_f64().unwrap_or(0.0) - 10.0).abs() < 0.1, "{tech}");
    assert_eq!(digest["shots"]["frames_decoded"], 250);
    let shots = digest["shots"]["shots"].as_array().cloned().unwrap_or_default();
    assert!(shots.len() >= 2, "bikes.mp4 has several shots: {shots:?}");
    for s in &shots {
        assert_eq!(s["keyframe"]["phash"].as_str().map(str::len), Some(16), "{s}");
    }

    // Health arrives on the heartbeat and says why there are no GPU numbers.
    let agent_view = cp.api_get(&format!("/agents/{}", agent.agent_id))?;
    assert_eq!(agent_view["online"], true);
    assert_eq!(agent_view["health_source"], "cpu", "{agent_view}");
    assert!(!agent_view["health_history"].as_array().map(Vec::is_empty).unwrap_or(true));
    Ok(())
}

/// Nothing but metadata leaves the box: every frame the agent sent while analyzing a file is one of
/// the protocol's metadata messages, the total is a small fraction of the file, and no 64-byte run
/// of the file appears in any frame.
#[test]
fn the_agent_sends_no_media_content_over_the_link() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;
    let path = media("bigbuckbunny.mp4");
    let id = cp.submit_job(&path, "stage-a")?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(job["state"], "succeeded", "{job}");

    let audit = std::fs::read_to_string(cp.wire_audit_log())?;
    let mut kinds = HashSet::new();
    let mut payloads = Vec::new();
    for line in audit.lines() {
        let v: Value = serde_json::from_str(line)?;
        let payload =
            base64::engine::general_purpose::STANDARD.decode(v["payload_b64"].as_str().unwrap_or_default())?;
        // The audit holds exactly what was on the wire: it decodes as an envelope from this agent.
        let env: AgentEnvelope = decode_payload(&payload)?;
        assert_eq!(env.agent_id.to_string(), agent.agent_id);
        kinds.insert(env.body.kind());
        payloads.push(payload);
    }
    // Custody is the file's SHA-256, size and mtime; XID counts are per-GPU numbers: metadata too.
    let allowed: HashSet<&str> =
        ["hello", "heartbeat", "job_accepted", "progress", "custody", "digest", "gpu_xid_errors"].into();
    assert!(kinds.is_subset(&allowed), "unexpected message kinds {kinds:?}");
    assert!(kinds.contains("digest") && kinds.contains("hello") && kinds.contains("custody"), "{kinds:?}");

    let mut file = Vec::new();
    std::fs::File::open(&path)?.read_to_end(&mut file)?;
    let sent: usize = payloads.iter().map(Vec::len).sum();
    assert!(sent * 20 < file.len(), "agent sent {sent} bytes for a {} byte file", file.len());
    let haystack: Vec<u8> = payloads.concat();
    let windows = 2000;
    let step = (file.len() - 64) / windows;
    for i in 0..windows {
        let needle = &file[i * step..i * step + 64];
        assert!(
            !haystack.windows(64).any(|w| w == needle),
            "bytes {}..{} of the media file were sent to the control plane",
            i * step,
            i * step + 64
        );
    }
    Ok(())
}

fn enroll_output(cp: &ControlPlane, token: &str) -> anyhow::Result<std::process::Output> {
    let dir = tempfile::tempdir()?;
    let out = Agent::enroll_raw(&dir.path().join("agent"), &cp.quic_addr, token, &cp.ca_fingerprint, None)?;
    Ok(out)
}

#[test]
fn a_token_used_twice_is_refused_the_second_time() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let token = cp.token("stage-a", "1h")?;
    let token = token["token"].as_str().context("token")?;
    let first = enroll_output(&cp, token)?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = enroll_output(&cp, token)?;
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already used"), "{err}");
    assert_eq!(cp.agents()?.len(), 1, "only the first agent is enrolled");
    Ok(())
}

#[test]
fn an_expired_token_is_refused() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let token = cp.token("stage-a", "1s")?;
    std::thread::sleep(Duration::from_millis(2100));
    let out = enroll_output(&cp, token["token"].as_str().context("token")?)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired"), "{err}");
    assert_eq!(cp.agents()?.len(), 0);
    Ok(())
}

#[test]
fn enrollment_with_the_wrong_ca_fingerprint_sends_nothing() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let token = cp.token("stage-a", "1h")?;
    let token = token["token"].as_str().context("token")?;
    let dir = tempfile::tempdir()?;
    let out = Agent::enroll_raw(&dir.path().join("agent"), &cp.quic_addr, token, &"ab".repeat(32), None)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fingerprint"), "{}", String::from_utf8_lossy(&out.stderr));
    // The token never reached the control plane, so it still works.
    let ok = enroll_output(&cp, token)?;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    Ok(())
}

/// An agent of another fleet, pointed at this control plane (it even trusts this CA), is refused in
/// the TLS handshake: its certificate does not chain to this fleet's CA.
#[test]
fn an_agent_with_a_certificate_from_another_ca_is_refused_at_the_handshake() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let other = ControlPlane::start()?;
    let mut intruder = Agent::enroll(&other, "stage-a")?;
    // Re-point the intruder at `cp`, trusting `cp`'s CA, but keep its certificate from `other`.
    let dd = intruder.data_dir();
    std::fs::copy(cp.data_dir().join("ca.pem"), dd.join("ca.pem"))?;
    let mut identity: Value = serde_json::from_slice(&std::fs::read(dd.join("agent.json"))?)?;
    identity["control_addr"] = Value::String(cp.quic_addr.clone());
    std::fs::write(dd.join("agent.json"), serde_json::to_vec(&identity)?)?;
    intruder.run(&[media_dir()])?;

    let metrics_url = format!("{}/metrics", cp.http_url);
    let refused = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        reqwest::blocking::get(&metrics_url)
            .and_then(|r| r.text())
            .map(|m| {
                // The intruder trusts another CA, so it aborts the handshake itself (it never
                // presents its certificate): a failed handshake, not a certificate refusal.
                m.lines().any(|l| l.starts_with("gaffer_quic_handshakes_failed_total") && !l.ends_with(" 0"))
            })
            .unwrap_or(false)
    });
    assert!(refused, "no failed handshake counted; control plane log:\n{}", cp.log());
    assert!(cp.log().contains("QUIC handshake failed"), "{}", cp.log());
    assert_eq!(cp.agent_counts()?["total"], 0, "the intruder never got in");
    let log = intruder.log();
    assert!(
        log.contains("link down") || log.contains("in the TLS handshake"),
        "the intruder saw its connection fail:\n{log}"
    );
    Ok(())
}

/// A truncated file and a non-video file fail their jobs with readable reasons; the agent keeps
/// running and completes the next job.
#[test]
fn bad_media_fails_its_job_and_the_agent_runs_the_next_one() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let volume = tempfile::tempdir()?;
    let original = std::fs::read(media("test.mp4"))?;
    let truncated = volume.path().join("truncated.mp4");
    std::fs::write(&truncated, &original[..4096])?;
    let not_video = volume.path().join("notes.mp4");
    std::fs::write(&not_video, "call sheet: day 12, stage B\n".repeat(200))?;
    let good = volume.path().join("good.mp4");
    std::fs::copy(media("bikes.mp4"), &good)?;

    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[volume.path().to_path_buf()])?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;

    for bad in [&truncated, &not_video] {
        let id = cp.submit_job(bad, "stage-a")?;
        let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
        assert_eq!(job["state"], "failed", "{job}");
        let error = job["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("not a media file") || error.contains("media"),
            "unhelpful error for {}: {error}",
            bad.display()
        );
        assert!(job["digest"].is_null());
    }
    assert!(agent.is_running(), "the agent died on bad media:\n{}", agent.log());
    let id = cp.submit_job(&good, "stage-a")?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["agent"], agent.agent_id.as_str());
    Ok(())
}

#[test]
fn a_job_outside_the_agents_volumes_is_not_offered_to_it() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let volume = tempfile::tempdir()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[volume.path().to_path_buf()])?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;
    let elsewhere = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let other_site = {
        let p: PathBuf = volume.path().join("x.mp4");
        std::fs::copy(media("bikes.mp4"), &p)?;
        cp.submit_job(&p, "stage-b")?
    };
    std::thread::sleep(Duration::from_secs(3));
    for id in [elsewhere, other_site] {
        let job = cp.api_get(&format!("/jobs/{id}"))?;
        assert_eq!(job["state"], "queued", "{job}");
    }
    Ok(())
}

/// An agent that disappears mid-job (SIGKILL: no goodbye) loses its lease after the grace period;
/// the job goes to another agent and finishes there.
#[test]
fn a_job_of_an_agent_that_disappears_is_requeued_and_finished_by_another() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut first = Agent::enroll(&cp, "stage-a")?;
    let mut second = Agent::enroll(&cp, "stage-a")?;
    first.run(&[media_dir()])?;
    cp.wait_agent_online(&first.agent_id, true, ONLINE_TIMEOUT)?;

    let id = cp.submit_job(&media("test.mp4"), "stage-a")?;
    let running = cp.wait_job(&id, &["running"], JOB_TIMEOUT)?;
    assert_eq!(running["agent"], first.agent_id.as_str());
    first.kill();
    second.run(&[media_dir()])?;

    let job = cp.wait_job(&id, &["succeeded", "failed"], JOB_TIMEOUT)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["agent"], second.agent_id.as_str(), "finished by the second agent");
    assert_eq!(job["attempts"], 2);
    assert!(job["digest"]["shots"]["shots"].as_array().is_some_and(|s| s.len() > 50));
    cp.wait_agent_online(&first.agent_id, false, ONLINE_TIMEOUT)?;
    Ok(())
}

/// `gaffer-control release keygen --out DIR --json`: the key's fingerprint.
fn release_keygen(dir: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(gaffer_tests::bin("gaffer-control"))
        .args(["release", "keygen", "--json", "--out"])
        .arg(dir)
        .output()?;
    anyhow::ensure!(out.status.success(), "release keygen: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["fingerprint"].as_str().unwrap_or_default().to_owned())
}

/// `gaffer-agent enroll` into a fresh `data`, with `extra` arguments.
fn enroll_with(cp: &ControlPlane, data: &std::path::Path, extra: &[&str]) -> anyhow::Result<std::process::Output> {
    let token = cp.token("stage-r", "10m")?;
    Ok(std::process::Command::new(gaffer_tests::bin("gaffer-agent"))
        .args(["enroll", "--json", "--control", &cp.quic_addr, "--ca-fingerprint", &cp.ca_fingerprint])
        .args(["--token", token["token"].as_str().unwrap_or_default(), "--data-dir"])
        .arg(data)
        .args(extra)
        .output()?)
}

/// Issue 9: the agent pins the control plane's release key at enrollment, like the CA; with
/// `--release-key-fingerprint` a control plane offering another key is refused.
#[test]
fn enrollment_pins_the_release_key_and_checks_its_fingerprint() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    let key_dir = keys.path().join("release-key");
    let fingerprint = release_keygen(&key_dir)?;
    let cp = ControlPlane::start_with(gaffer_tests::ControlPlaneOptions {
        init_args: vec!["--release-key-dir".into(), key_dir.display().to_string()],
        ..Default::default()
    })?;
    let boxes = tempfile::tempdir()?;

    // The operator expects another key: enrollment fails and stores nothing.
    let wrong = boxes.path().join("wrong");
    let other = "ab".repeat(32);
    let out = enroll_with(&cp, &wrong, &["--release-key-fingerprint", &other])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "enrolled despite the wrong release key fingerprint");
    assert!(stderr.contains("release key mismatch") && stderr.contains(&fingerprint), "{stderr}");
    assert!(!wrong.join("agent.json").exists() && !wrong.join("release.pub").exists());

    // The right one: enrolled, the key pinned (0644) and shown by status.
    let data = boxes.path().join("agent");
    let out = enroll_with(&cp, &data, &["--release-key-fingerprint", &fingerprint.to_uppercase()])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(data.join("release.pub"))?, std::fs::read(key_dir.join("release.pub"))?);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(data.join("release.pub"))?.permissions().mode() & 0o777, 0o644);
    let status = std::process::Command::new(gaffer_tests::bin("gaffer-agent"))
        .args(["status", "--json", "--data-dir"])
        .arg(&data)
        .output()?;
    let status: Value = serde_json::from_slice(&status.stdout).context("status --json")?;
    assert_eq!(status["release_key_fingerprint"], fingerprint.as_str(), "{status}");
    Ok(())
}

/// Issue 9: an agent enrolled before the control plane had a release key gets it once over the
/// link and pins it; a different key offered later is refused, logged, and never replaces it.
#[test]
fn an_agent_enrolled_before_the_release_key_pins_it_from_the_link_and_refuses_another() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    let key_dir = keys.path().join("release-key");
    let mut cp = ControlPlane::start_with(gaffer_tests::ControlPlaneOptions {
        init_args: vec!["--release-key-dir".into(), key_dir.display().to_string()],
        ..Default::default()
    })?;
    let mut agent = Agent::enroll(&cp, "stage-r")?;
    let pinned = agent.data_dir().join("release.pub");
    assert!(!pinned.exists(), "no key existed at enrollment");
    assert_eq!(agent.status()?["release_key_fingerprint"], Value::Null);

    // The key is made while the control plane serves; the agent connects and pins it.
    let fingerprint = release_keygen(&key_dir)?;
    agent.run(&[media_dir()])?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;
    let deadline = std::time::Instant::now() + ONLINE_TIMEOUT;
    while !pinned.exists() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "release key not pinned; agent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = std::fs::read(key_dir.join("release.pub"))?;
    assert_eq!(std::fs::read(&pinned)?, first);
    assert_eq!(agent.status()?["release_key_fingerprint"], fingerprint.as_str());

    // Someone replaces the control plane's key; at the next connection the agent refuses it.
    std::fs::remove_file(key_dir.join("release.key"))?;
    std::fs::remove_file(key_dir.join("release.pub"))?;
    let replaced = release_keygen(&key_dir)?;
    assert_ne!(replaced, fingerprint);
    cp.restart()?;
    let deadline = std::time::Instant::now() + ONLINE_TIMEOUT;
    while !agent.log().contains("REFUSED a different release key") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no refusal logged; agent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.log().contains(&replaced), "the log names the refused key");
    assert_eq!(std::fs::read(&pinned)?, first, "the pinned key was replaced");
    assert_eq!(agent.status()?["release_key_fingerprint"], fingerprint.as_str());
    Ok(())
}
