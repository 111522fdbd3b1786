//! Air-gapped round trip with the real binaries: offline enrollment, `run --offline` analyzing a
//! watch folder of real media, bundle export, import on a serving control plane (through its admin
//! socket), reply import, outbox empty, digests on the API; and refusals of a tampered bundle and
//! a replayed reply.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gaffer_tests::{media, Agent, ControlPlane};

const FILES: [&str; 3] = ["bikes.mp4", "Megamind.avi", "bigbuckbunny.mp4"];

#[test]
fn air_gapped_round_trip_delivers_every_digest_once() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll_offline(&cp, "island")?;
    let watch = agent.dir.path().join("watch");
    std::fs::create_dir_all(&watch)?;
    agent.run_offline(std::slice::from_ref(&watch))?;
    for f in FILES {
        std::fs::copy(media(f), watch.join(f))?;
    }
    // Wait until the offline agent has analyzed all three: 3 × (submit, accepted, digest) at least,
    // and nothing running or queued.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = agent.status()?;
        let pending = s["outbox_pending"].as_u64().unwrap_or(0);
        if pending >= 9 && s["jobs_running"] == 0 && s["jobs_queued"] == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("offline agent did not finish: {s}\nlog:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The agent keeps running: bundle commands reach it through its control socket.

    let bundle = agent.dir.path().join("out-1.gbundle");
    let export = agent.bundle_export(&bundle)?;
    assert_eq!(export["bundle_number"], 1);
    let exported = export["messages"].as_u64().unwrap_or(0);
    assert!(exported >= 9, "export carried {exported} messages: {export}");

    // A tampered copy is refused by the serving control plane, and nothing appears.
    let mut bad = std::fs::read(&bundle)?;
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    let tampered = agent.dir.path().join("tampered.gbundle");
    std::fs::write(&tampered, bad)?;
    let reply = agent.dir.path().join("reply-1.gbundle");
    let out = cp.bundle_import_raw(&tampered, &reply)?;
    assert!(!out.status.success(), "tampered bundle was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cp.api_get("/jobs")?.as_array().map(Vec::len), Some(0));

    let out = cp.bundle_import_raw(&bundle, &reply)?;
    anyhow::ensure!(out.status.success(), "bundle import failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["outcome"], "imported", "{report}");
    assert_eq!(report["applied"].as_u64(), Some(exported), "{report}");

    // Every file is one succeeded job with a digest, on the API.
    let jobs = cp.api_get("/jobs")?;
    let jobs = jobs.as_array().context("jobs is not a list")?;
    assert_eq!(jobs.len(), FILES.len(), "{jobs:?}");
    for job in jobs {
        let id = job["id"].as_str().context("job without id")?;
        let full = cp.wait_job(id, &["succeeded"], Duration::from_secs(5))?;
        assert!(full["digest"]["shots"]["frames_decoded"].as_u64().unwrap_or(0) > 0, "{full}");
    }

    // The reply empties the outbox; importing it again changes nothing.
    let out = agent.bundle_import_raw(&reply)?;
    anyhow::ensure!(out.status.success(), "reply import failed: {}", String::from_utf8_lossy(&out.stderr));
    let applied: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(applied["outcome"], "imported", "{applied}");
    assert_eq!(applied["outbox_pending"], 0, "{applied}");
    let again: serde_json::Value = serde_json::from_slice(&agent.bundle_import_raw(&reply)?.stdout)?;
    assert_eq!(again["outcome"], "already_imported", "{again}");
    let status = agent.status()?;
    assert_eq!(status["outbox_pending"], 0, "{status}");
    assert_eq!(status["link"], "offline", "{status}");
    assert!(agent.is_running(), "the agent stayed up through export and import");

    // Re-importing the agent bundle is a no-op at the control plane.
    let out = cp.bundle_import_raw(&bundle, &agent.dir.path().join("reply-again.gbundle"))?;
    let again: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(again["outcome"], "already_imported", "{again}");
    assert_eq!(cp.api_get("/jobs")?.as_array().map(Vec::len), Some(FILES.len()));
    Ok(())
}
