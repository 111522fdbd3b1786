//! Issue 9, self-update with staged rollouts, end to end: real `gaffer-control serve`, real
//! `gaffer-agent run` processes on loopback, releases signed with a real release key, the agents'
//! own fetch over their QUIC link, signature checks against the pinned key, re-exec, the health
//! gate and the rollback of a release that cannot start.
//!
//! Versions: A is the agent the suite built (`CARGO_PKG_VERSION`); B is the same code built with
//! `GAFFER_BUILD_VERSION=9.1.0` by the test command (`GAFFER_AGENT_NEXT_EXE`, see
//! scripts/test.sh); C is a real x86-64 ELF compiled here with gcc that answers `--version` as
//! 9.2.0 and exits with status 3 otherwise (a release that dies at start).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use gaffer_tests::{bin, media, wait_for, ControlPlane, ControlPlaneOptions};
use serde_json::Value;

const SITE: &str = "stage";
const B: &str = "9.1.0";
const C: &str = "9.2.0";
/// The health wait of the test rollouts (`--wait-secs`, the seconds form of `--wait-mins`).
const WAIT_SECS: &str = "6";

/// The version-B agent binary the test command built, or why it is missing.
fn next_exe() -> Result<PathBuf> {
    let p = std::env::var_os("GAFFER_AGENT_NEXT_EXE").map(PathBuf::from).context(
        "GAFFER_AGENT_NEXT_EXE is not set: the test command (scripts/test.sh) builds the agent a second time with \
         GAFFER_BUILD_VERSION=9.1.0 and sets it; run the suite with it",
    )?;
    ensure!(p.is_file(), "GAFFER_AGENT_NEXT_EXE={} is not a file", p.display());
    Ok(p)
}

/// `gaffer-control release keygen --out DIR --json`: the key's fingerprint.
fn keygen(dir: &Path) -> Result<String> {
    let out = Command::new(bin("gaffer-control")).args(["release", "keygen", "--json", "--out"]).arg(dir).output()?;
    ensure!(out.status.success(), "release keygen: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["fingerprint"].as_str().unwrap_or_default().to_owned())
}

/// A release tarball `gaffer-agent-V-x86_64-linux.tar.gz` with `exe` as its binary, unsigned.
fn tarball(dir: &Path, version: &str, exe: &Path) -> Result<PathBuf> {
    let stage = dir.join(format!("stage-{version}"));
    let top = stage.join(format!("gaffer-agent-{version}"));
    std::fs::create_dir_all(top.join("bin"))?;
    std::fs::copy(exe, top.join("bin/gaffer-agent"))?;
    let st = Command::new("chmod").arg("0755").arg(top.join("bin/gaffer-agent")).status()?;
    ensure!(st.success(), "chmod");
    let file = dir.join(format!("gaffer-agent-{version}-x86_64-linux.tar.gz"));
    let st = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
        .arg(&file)
        .arg("-C")
        .arg(&stage)
        .arg(format!("gaffer-agent-{version}"))
        .status()?;
    ensure!(st.success(), "tar");
    Ok(file)
}

/// `release add --file F` (signed by the control plane's release key).
fn release_add(cp: &ControlPlane, file: &Path) -> Result<Value> {
    cp.cli_json(&["release", "add", "--file", &file.display().to_string()])
}

/// `rollout start --version V --canary 1 --wait-secs 6`.
fn rollout_start(cp: &ControlPlane, version: &str) -> Result<Value> {
    cp.cli_json(&["rollout", "start", "--version", version, "--canary", "1", "--wait-secs", WAIT_SECS])
}

/// The newest rollout as `rollout status --json` shows it.
fn rollout_status(cp: &ControlPlane) -> Result<Value> {
    let v = cp.cli_json(&["rollout", "status"])?;
    Ok(match v {
        Value::Array(mut a) if !a.is_empty() => a.remove(0),
        Value::Object(mut o) if o.contains_key("rollouts") => match o.remove("rollouts") {
            Some(Value::Array(mut a)) if !a.is_empty() => a.remove(0),
            _ => bail!("no rollout in `rollout status`"),
        },
        other => other,
    })
}

/// The agent id of the (first) canary of a rollout as `rollout start --json` shows it.
fn canary_of(rollout: &Value) -> Result<String> {
    rollout["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["canary"] == true)
        .and_then(|t| t["agent_id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no canary in the rollout: {rollout}"))
}

/// The version each agent last said in its Hello, from `GET /api/v1/agents`.
fn versions(cp: &ControlPlane) -> Result<HashMap<String, (String, bool)>> {
    Ok(cp
        .agents()?
        .iter()
        .map(|a| {
            let id = a["id"].as_str().unwrap_or_default().to_owned();
            let v = a["agent_version"].as_str().unwrap_or_default().to_owned();
            (id, (v, a["online"] == true))
        })
        .collect())
}

/// An agent process in its own process group, so that the versions it re-executes into and the
/// processes its update watcher starts are all stopped with it.
struct GroupAgent {
    agent: gaffer_tests::Agent,
    child: Option<Child>,
}

impl GroupAgent {
    fn enroll(cp: &ControlPlane) -> Result<Self> {
        Ok(Self { agent: gaffer_tests::Agent::enroll(cp, SITE)?, child: None })
    }

    fn id(&self) -> &str {
        &self.agent.agent_id
    }

    fn run(&mut self, volume: &Path) -> Result<()> {
        self.spawn(&["--volume".as_ref(), volume.as_os_str()])
    }

    /// `gaffer-agent run --data-dir D ARGS…` in its own process group, logging to agent.log.
    fn spawn(&mut self, args: &[&std::ffi::OsStr]) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let child = Command::new(bin("gaffer-agent"))
            .arg("run")
            .arg("--data-dir")
            .arg(self.agent.data_dir())
            .args(args)
            .env("GAFFER_LOG", "info,gaffer_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.agent.dir.path().join("agent.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn update_state(&self) -> Value {
        std::fs::read(self.agent.data_dir().join("update.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }
}

impl Drop for GroupAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
            let _ = c.wait();
        }
    }
}

fn control_plane(keys: &Path) -> Result<ControlPlane> {
    keygen(keys)?;
    ControlPlane::start_with(ControlPlaneOptions {
        // Agents restart into new versions: their leases must survive a few seconds offline.
        lease_grace_secs: 30,
        init_args: vec!["--release-key-dir".into(), keys.display().to_string()],
        ..ControlPlaneOptions::default()
    })
}

fn agents_log(agents: &[GroupAgent]) -> String {
    agents.iter().map(|a| format!("--- agent {} ---\n{}", a.id(), a.log())).collect::<Vec<_>>().join("\n")
}

/// Three agents on A; B rolled out with one canary: the canary is healthy on B before any other
/// agent leaves A, then all three run B, and every job submitted meanwhile succeeds. Then C, whose
/// binary exits at start: the canary puts B back by itself, the rollout halts naming it, and the
/// other two never leave B.
#[test]
fn canary_first_then_the_fleet_and_a_broken_release_rolls_back_and_halts() -> Result<()> {
    let next = next_exe()?;
    let work = tempfile::tempdir()?;
    let cp = control_plane(&work.path().join("release-key"))?;
    let a_version = env!("CARGO_PKG_VERSION");
    let media_dir = media("bikes.mp4").parent().map(Path::to_path_buf).context("media dir")?;
    let mut agents = Vec::new();
    for _ in 0..3 {
        let mut a = GroupAgent::enroll(&cp)?;
        a.run(&media_dir)?;
        agents.push(a);
    }
    for a in &agents {
        cp.wait_agent_online(a.id(), true, Duration::from_secs(30))?;
    }

    let b_file = tarball(work.path(), B, &next)?;
    release_add(&cp, &b_file)?;

    // Jobs all through the rollout.
    let mut jobs = Vec::new();
    let started = rollout_start(&cp, B)?;
    ensure!(started["state"] == "running", "rollout start: {started}");
    let canary = canary_of(&started)?;

    // Watch versions until all three run B; note when each first said B and when the canary was
    // healthy.
    let t0 = Instant::now();
    let mut first_on_b: BTreeMap<String, Duration> = BTreeMap::new();
    let mut canary_healthy_at: Option<Duration> = None;
    let mut last_submit = Instant::now() - Duration::from_secs(10);
    let status = wait_for(Duration::from_secs(240), "all three agents on B and the rollout completed", || {
        if last_submit.elapsed() > Duration::from_secs(2) {
            jobs.push(cp.submit_job(&media("bikes.mp4"), SITE)?);
            last_submit = Instant::now();
        }
        for (id, (v, _)) in versions(&cp)? {
            if v == B {
                first_on_b.entry(id).or_insert(t0.elapsed());
            }
        }
        let st = rollout_status(&cp)?;
        let canary_state = st["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["agent_id"] == canary.as_str())
            .map(|t| t["state"].clone());
        if canary_healthy_at.is_none() && canary_state.as_ref().is_some_and(|s| s == "healthy") {
            canary_healthy_at = Some(t0.elapsed());
        }
        if st["state"] == "halted" || st["state"] == "aborted" {
            bail!("rollout of B stopped: {st}\n{}", agents_log(&agents));
        }
        Ok((st["state"] == "completed").then_some(st))
    })
    .with_context(|| format!("{}\n--- control plane ---\n{}", agents_log(&agents), cp.log()))?;
    let healthy_at = canary_healthy_at.context("the canary was never seen healthy")?;
    for a in &agents {
        let on_b = *first_on_b.get(a.id()).with_context(|| format!("agent {} never reported B", a.id()))?;
        if a.id() != canary {
            ensure!(
                on_b > healthy_at,
                "agent {} ran B at {on_b:?}, before the canary was healthy at {healthy_at:?}",
                a.id()
            );
        }
    }
    ensure!(status["counts"]["healthy"] == 3, "not all three healthy: {status}");
    wait_for(Duration::from_secs(30), "all three online on B", || {
        let v = versions(&cp)?;
        Ok(agents.iter().all(|a| v.get(a.id()).is_some_and(|(ver, on)| ver == B && *on)).then_some(()))
    })?;
    // Every job submitted during the rollout succeeds, once.
    for id in &jobs {
        let job = cp.wait_job(id, &["succeeded", "failed", "cancelled"], Duration::from_secs(180))?;
        ensure!(job["state"] == "succeeded", "job {id} during the rollout: {job}\n{}", agents_log(&agents));
    }
    ensure!(jobs.len() >= 3, "only {} jobs were submitted during the rollout", jobs.len());
    let digests: Vec<Value> = cp.jobs()?.into_iter().filter(|j| j["state"] == "succeeded").collect();
    ensure!(digests.len() == jobs.len(), "{} jobs succeeded, {} were submitted", digests.len(), jobs.len());
    // The agents kept A on disk and selected B.
    for a in &agents {
        let st = a.update_state();
        ensure!(st["current"]["version"] == B, "agent {} update.json: {st}", a.id());
        ensure!(st["previous"]["version"] == a_version, "agent {} update.json: {st}", a.id());
    }

    // C: exits at start.
    let c_exe = broken_exe(work.path(), C)?;
    let c_file = tarball(work.path(), C, &c_exe)?;
    release_add(&cp, &c_file)?;
    let started = rollout_start(&cp, C)?;
    let c_canary = canary_of(&started)?;
    let halted = wait_for(Duration::from_secs(120), "the rollout of C halted", || {
        let v = versions(&cp)?;
        for a in agents.iter().filter(|a| a.id() != c_canary) {
            let ver = v.get(a.id()).map(|(v, _)| v.as_str()).unwrap_or_default();
            ensure!(ver == B, "agent {} left B during the rollout of C: {ver}", a.id());
        }
        let st = rollout_status(&cp)?;
        Ok((st["state"] == "halted").then_some(st))
    })
    .with_context(|| format!("{}\n--- control plane ---\n{}", agents_log(&agents), cp.log()))?;
    let reason = halted["halt_reason"].as_str().unwrap_or_default();
    ensure!(halted["failed_agent"] == c_canary.as_str(), "halted by another agent: {halted}");
    ensure!(reason.contains("rolled back"), "halt reason does not say it rolled back: {reason}");
    // The canary runs B again, online; the other two never got C.
    wait_for(Duration::from_secs(60), "the canary back on B and online", || {
        let v = versions(&cp)?;
        Ok(v.get(&c_canary).is_some_and(|(ver, on)| ver == B && *on).then_some(()))
    })?;
    // The dashboard says which agent failed and why.
    let session = cp.login()?;
    let (code, page) = cp.page(&session, "/rollouts")?;
    ensure!(code == 200, "GET /rollouts: {code}");
    ensure!(
        page.contains("halted") && page.contains(c_canary.as_str()),
        "the rollouts page does not name the halt:\n{page}"
    );
    // It was the agent's own doing: its watcher saw C die and started B, which rolled back.
    let canary_log = agents.iter().find(|a| a.id() == c_canary).map(GroupAgent::log).unwrap_or_default();
    ensure!(
        canary_log.contains("the new version stopped before its health gate")
            && canary_log.contains("update rolled back"),
        "the canary's log does not show the watcher and the rollback:\n{canary_log}"
    );
    ensure!(canary_log.contains("this release exits at start"), "C never ran on the canary:\n{canary_log}");
    std::thread::sleep(Duration::from_secs(3));
    let v = versions(&cp)?;
    for a in &agents {
        ensure!(v.get(a.id()).is_some_and(|(ver, _)| ver == B), "agent {} is not on B: {v:?}", a.id());
        let st = a.update_state();
        ensure!(st["current"]["version"] == B, "agent {} update.json after C: {st}", a.id());
        ensure!(
            st["trial"].is_null() && st["staged"].is_null(),
            "agent {} still has an update under way: {st}",
            a.id()
        );
        if a.id() != c_canary {
            ensure!(!a.agent.data_dir().join("versions").join(C).exists(), "agent {} fetched C", a.id());
        }
    }
    // And the fleet still works.
    let id = cp.submit_job(&media("bikes.mp4"), SITE)?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], Duration::from_secs(120))?;
    ensure!(job["state"] == "succeeded", "job after the halted rollout: {job}");
    Ok(())
}

/// A real x86-64 ELF that says it is `gaffer-agent VERSION` and exits with status 3 otherwise.
fn broken_exe(dir: &Path, version: &str) -> Result<PathBuf> {
    let src = dir.join("broken.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n#include <string.h>\nint main(int argc, char **argv) {{\n  if (argc > 1 && \
             strcmp(argv[1], \"--version\") == 0) {{ puts(\"gaffer-agent {version}\"); return 0; }}\n  \
             fputs(\"gaffer-agent {version}: this release exits at start\\n\", stderr);\n  return 3;\n}}\n"
        ),
    )?;
    let exe = dir.join("broken");
    let out = Command::new("gcc").arg("-O1").arg("-o").arg(&exe).arg(&src).output()?;
    ensure!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    Ok(exe)
}

/// Writes `file` into the control plane's releases as if `release add` had taken it (the index
/// entry of `like`, with this version, name, size and digest): what a tampered store or a key
/// swapped on the control plane would serve.
fn plant_release(cp: &ControlPlane, file: &Path, version: &str, like: &Value) -> Result<()> {
    use sha2::{Digest as _, Sha256};
    let bytes = std::fs::read(file)?;
    let name = file.file_name().and_then(|n| n.to_str()).context("file name")?;
    let dir = cp.data_dir().join("releases").join(version);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), &bytes)?;
    let index_path = cp.data_dir().join("releases").join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let mut rec = like.clone();
    if let Some(o) = rec.as_object_mut() {
        // `release add` shows the index entry with its time in words; the index has only the ms.
        o.remove("added_at");
    }
    rec["version"] = Value::from(version);
    rec["file_name"] = Value::from(name);
    rec["size_bytes"] = Value::from(bytes.len() as u64);
    rec["sha256"] = Value::from(hex::encode(Sha256::digest(&bytes)));
    index["releases"].as_array_mut().context("index.json has no releases list")?.push(rec);
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// `release add`s `file` (version `version`), then replaces the stored artifact with a copy that
/// has one byte changed and its index entry with that copy's size and digest — what a tampered
/// control-plane store would serve. Returns the index entry as `release add` showed it.
fn add_then_tamper(cp: &ControlPlane, work: &Path, file: &Path, version: &str) -> Result<Value> {
    let added = release_add(cp, file)?;
    let like = added.get("release").cloned().unwrap_or(added.clone());
    let name = file.file_name().context("name")?;
    let stored = cp.data_dir().join("releases").join(version).join(name);
    let mut bytes = std::fs::read(&stored)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let tampered = work.join("tampered").join(name);
    std::fs::create_dir_all(tampered.parent().context("dir")?)?;
    std::fs::write(&tampered, &bytes)?;
    let index_path = cp.data_dir().join("releases").join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    if let Some(list) = index["releases"].as_array_mut() {
        list.retain(|r| r["version"] != version);
    }
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
    std::fs::remove_file(&stored)?;
    plant_release(cp, &tampered, version, &like)?;
    Ok(like)
}

/// A tarball whose bytes changed after signing, and one signed by another key, both served by the
/// control plane as if they were its releases: the agent refuses each before running anything,
/// stays on its version and keeps working; each rollout halts with the agent's reason.
#[test]
fn a_tampered_release_and_one_signed_by_another_key_are_refused() -> Result<()> {
    let work = tempfile::tempdir()?;
    let cp = control_plane(&work.path().join("release-key"))?;
    let a_version = env!("CARGO_PKG_VERSION");
    let media_dir = media("bikes.mp4").parent().map(Path::to_path_buf).context("media dir")?;
    let mut agent = GroupAgent::enroll(&cp)?;
    // Unreadable update metadata never stops an agent: it runs the binary it was started as.
    std::fs::write(agent.agent.data_dir().join("update.json"), b"{\"current\": ")?;
    agent.run(&media_dir)?;
    cp.wait_agent_online(agent.id(), true, Duration::from_secs(30))?;
    // Any real agent binary will do: the signature check comes first.
    let exe = bin("gaffer-agent");

    // D: signed by the control plane's key, then changed.
    let d = "9.3.0";
    let d_file = tarball(work.path(), d, &exe)?;
    let like = add_then_tamper(&cp, work.path(), &d_file, d)?;
    let st = rollout_start(&cp, d)?;
    ensure!(st["state"] == "running", "{st}");
    let halted = wait_for(Duration::from_secs(90), "the rollout of the tampered release halted", || {
        let st = rollout_status(&cp)?;
        Ok((st["state"] == "halted").then_some(st))
    })
    .with_context(|| format!("{}\n--- control plane ---\n{}", agent.log(), cp.log()))?;
    let reason = halted["halt_reason"].as_str().unwrap_or_default().to_owned();
    ensure!(reason.contains("signature"), "tampered: halt reason {reason:?}");

    // E: signed by a stranger's key.
    let stranger = work.path().join("stranger-key");
    keygen(&stranger)?;
    let e = "9.4.0";
    let e_file = tarball(work.path(), e, &exe)?;
    let signed_dir = work.path().join("signed-by-stranger");
    std::fs::create_dir_all(&signed_dir)?;
    let out = Command::new(bin("gaffer-control"))
        .args(["release", "sign", "--file"])
        .arg(&e_file)
        .arg("--release-key-dir")
        .arg(&stranger)
        .arg("--out")
        .arg(&signed_dir)
        .output()?;
    ensure!(out.status.success(), "release sign: {}", String::from_utf8_lossy(&out.stderr));
    plant_release(&cp, &signed_dir.join(e_file.file_name().context("name")?), e, &like)?;
    let st = rollout_start(&cp, e)?;
    ensure!(st["state"] == "running", "{st}");
    let halted = wait_for(Duration::from_secs(90), "the rollout of the stranger's release halted", || {
        let st = rollout_status(&cp)?;
        Ok((st["state"] == "halted" && st["version"] == e).then_some(st))
    })
    .with_context(|| format!("{}\n--- control plane ---\n{}", agent.log(), cp.log()))?;
    let reason = halted["halt_reason"].as_str().unwrap_or_default().to_owned();
    ensure!(reason.contains("signature"), "stranger: halt reason {reason:?}");

    // Neither was unpacked or run; the agent is on A, online, and works.
    for v in [d, e] {
        ensure!(!agent.agent.data_dir().join("versions").join(v).join("gaffer-agent").exists(), "{v} was unpacked");
    }
    let vs = versions(&cp)?;
    ensure!(vs.get(agent.id()).is_some_and(|(v, on)| v == a_version && *on), "agent after the refusals: {vs:?}");
    let id = cp.submit_job(&media("bikes.mp4"), SITE)?;
    let job = cp.wait_job(&id, &["succeeded", "failed"], Duration::from_secs(120))?;
    ensure!(job["state"] == "succeeded", "job after the refusals: {job}");
    Ok(())
}

impl GroupAgent {
    /// Air-gapped: `Agent::enroll_offline`, no link.
    fn enroll_offline(cp: &ControlPlane) -> Result<Self> {
        Ok(Self { agent: gaffer_tests::Agent::enroll_offline(cp, SITE)?, child: None })
    }

    /// `gaffer-agent run --offline` in its own process group.
    fn run_offline(&mut self) -> Result<()> {
        self.spawn(&["--offline".as_ref()])
    }

    /// One trip of the removable media: `bundle export` here, `bundle import` on the control plane
    /// (which writes the reply), `bundle import` of the reply here. Returns both import reports.
    fn sync(&self, cp: &ControlPlane, n: u32) -> Result<(Value, Value)> {
        let dir = self.agent.dir.path();
        let bundle = dir.join(format!("out-{n}.gbundle"));
        let reply = dir.join(format!("reply-{n}.gbundle"));
        self.agent.bundle_export(&bundle)?;
        let out = cp.bundle_import_raw(&bundle, &reply)?;
        ensure!(out.status.success(), "control bundle import {n}: {}", String::from_utf8_lossy(&out.stderr));
        let imported: Value = serde_json::from_slice(&out.stdout)?;
        let out = self.agent.bundle_import_raw(&reply)?;
        ensure!(out.status.success(), "agent bundle import {n}: {}", String::from_utf8_lossy(&out.stderr));
        Ok((imported, serde_json::from_slice(&out.stdout)?))
    }
}

/// The rollout target of `agent` in rollout status `st`.
fn target_of<'a>(st: &'a Value, agent: &str) -> Option<&'a Value> {
    st["targets"].as_array().into_iter().flatten().find(|t| t["agent_id"] == agent)
}

/// An air-gapped agent on A (`run --offline`) takes part in a rollout of B with one canary: the
/// release travels in its reply bundle, the running agent verifies and stages it, re-executes into
/// B, passes its gate without a link, and the next bundle tells the control plane, which completes
/// the rollout. Then a tampered release in a reply is refused: the agent stays on B, and the
/// failure reaches the control plane in the next bundle and halts that rollout.
#[test]
fn an_air_gapped_agent_updates_through_its_reply_bundles_and_refuses_a_tampered_release() -> Result<()> {
    let next = next_exe()?;
    let work = tempfile::tempdir()?;
    let cp = control_plane(&work.path().join("release-key"))?;
    let a_version = env!("CARGO_PKG_VERSION");
    let mut agent = GroupAgent::enroll_offline(&cp)?;
    ensure!(
        agent.agent.data_dir().join(gaffer_certs::RELEASE_PUB_FILE).is_file(),
        "the offline enrollment pinned no release key"
    );
    agent.run_offline()?;
    wait_for(Duration::from_secs(30), "the offline agent's control socket", || Ok(agent.agent.status().ok()))
        .with_context(|| agent.log())?;

    let b_file = tarball(work.path(), B, &next)?;
    release_add(&cp, &b_file)?;
    let started = rollout_start(&cp, B)?;
    ensure!(started["state"] == "running", "rollout start: {started}");
    let t = target_of(&started, agent.id()).context("the air-gapped agent is not a target")?;
    ensure!(t["canary"] == true && t["state"] == "pending", "target at start: {t}");

    // Trip 1: the reply carries B; the running agent stages it and restarts into it.
    let (cp_report, agent_report) = agent.sync(&cp, 1).with_context(|| agent.log())?;
    ensure!(cp_report["outcome"] == "imported", "{cp_report}");
    ensure!(agent_report["release"]["outcome"] == "staged", "agent import: {agent_report}\n{}", agent.log());
    ensure!(agent_report["release"]["version"] == B, "{agent_report}");
    let st = rollout_status(&cp)?;
    ensure!(target_of(&st, agent.id()).is_some_and(|t| t["state"] == "ordered"), "after trip 1: {st}");
    wait_for(Duration::from_secs(120), "the agent on B through its health gate", || {
        // update.json changes just before the agent logs it: wait for both.
        let st = agent.update_state();
        Ok((st["current"]["version"] == B && st["trial"].is_null() && agent.log().contains("update healthy"))
            .then_some(()))
    })
    .with_context(|| format!("{}\nupdate.json: {}", agent.log(), agent.update_state()))?;
    let log = agent.log();
    ensure!(log.contains("self-test passed") && log.contains("update healthy"), "no gate in the log:\n{log}");
    wait_for(Duration::from_secs(30), "the agent's socket on B", || Ok(agent.agent.status().ok()))?;

    // Trip 2: Staged and Healthy reach the control plane; the rollout completes.
    let (_, agent_report) = agent.sync(&cp, 2).with_context(|| agent.log())?;
    ensure!(agent_report["release"].is_null(), "a second release after the update: {agent_report}");
    let st = rollout_status(&cp)?;
    ensure!(st["state"] == "completed", "after trip 2: {st}\n{}", cp.log());
    ensure!(target_of(&st, agent.id()).is_some_and(|t| t["state"] == "healthy"), "{st}");
    ensure!(st["counts"]["healthy"] == 1, "{st}");
    let us = agent.update_state();
    ensure!(us["current"]["version"] == B && us["previous"]["version"] == a_version, "update.json: {us}");
    ensure!(us["staged"].is_null(), "update.json: {us}");
    let vs = versions(&cp)?;
    ensure!(vs.get(agent.id()).is_some_and(|(v, _)| v == B), "the control plane has the agent on {vs:?}");

    // D: signed, then changed on the control plane (size and digest in the index match the
    // changed bytes: only the signature can catch it).
    let d = "9.3.0";
    let d_file = tarball(work.path(), d, &bin("gaffer-agent"))?;
    add_then_tamper(&cp, work.path(), &d_file, d)?;
    let st = rollout_start(&cp, d)?;
    ensure!(st["state"] == "running", "{st}");

    // Trip 3: the reply carries D; the agent refuses it and stays on B.
    let (_, agent_report) = agent.sync(&cp, 3).with_context(|| agent.log())?;
    ensure!(agent_report["release"]["outcome"] == "refused", "tampered release: {agent_report}");
    let reason = agent_report["release"]["reason"].as_str().unwrap_or_default().to_owned();
    ensure!(reason.contains("signature"), "refusal reason: {reason}");
    ensure!(!agent.agent.data_dir().join("versions").join(d).join("gaffer-agent").exists(), "D was unpacked");
    // Trip 4: the failure reaches the control plane and halts the rollout.
    agent.sync(&cp, 4).with_context(|| agent.log())?;
    let st = rollout_status(&cp)?;
    ensure!(st["state"] == "halted" && st["version"] == d, "after trip 4: {st}");
    let halt = st["halt_reason"].as_str().unwrap_or_default();
    ensure!(halt.contains("signature") && halt.contains(B), "halt reason: {halt}");
    ensure!(st["failed_agent"] == agent.id(), "{st}");
    std::thread::sleep(Duration::from_secs(2));
    let us = agent.update_state();
    ensure!(us["current"]["version"] == B && us["trial"].is_null() && us["staged"].is_null(), "update.json: {us}");
    let status = agent.agent.status()?;
    ensure!(status["link"] == "offline", "the agent after the refusal: {status}");
    Ok(())
}
