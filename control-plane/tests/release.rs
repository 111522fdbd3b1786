//! `gaffer-control release keygen|sign|add|list` and `init --release-key-dir`, with the real
//! binary on real tarballs (made with `tar` and `gzip` as `installers/build-packages.sh` makes
//! them), directly on the data directory and through a running server's admin socket.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::Store;
use serde_json::Value;

fn control(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_gaffer-control")).args(args).env("GAFFER_LOG", "warn").output()?)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs a command that must succeed and print JSON.
fn json(args: &[&str]) -> Result<Value> {
    let out = control(args)?;
    ensure!(
        out.status.success(),
        "gaffer-control {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("{args:?}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs a command that must fail; returns its stderr.
fn refused(args: &[&str]) -> Result<String> {
    let out = control(args)?;
    ensure!(
        !out.status.success(),
        "gaffer-control {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A release tarball laid out as build-packages.sh writes it (top directory
/// `gaffer-agent-VERSION/`, the binary in `bin/`; a real ELF program of this machine), written
/// with tar and gzip into `dir`. `note` goes into the README, so two tarballs of one version differ.
fn tarball(dir: &Path, version: &str, note: &str) -> Result<PathBuf> {
    let stage = tempfile::tempdir()?;
    let top = stage.path().join(format!("gaffer-agent-{version}"));
    std::fs::create_dir_all(top.join("bin"))?;
    std::fs::copy(env!("CARGO_BIN_EXE_gaffer-control"), top.join("bin/gaffer-agent"))?;
    std::fs::write(top.join("README.md"), format!("gaffer-agent {version}\n{note}\n"))?;
    let path = dir.join(format!("gaffer-agent-{version}-{}-linux.tar.gz", std::env::consts::ARCH));
    let script = format!(
        "tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C '{}' -cf - 'gaffer-agent-{version}' | gzip -1 -n > '{}'",
        stage.path().display(),
        path.display()
    );
    let status = Command::new("sh").args(["-c", &script]).status()?;
    ensure!(status.success(), "tar | gzip failed");
    Ok(path)
}

fn init(root: &Path, key_dir: &Path) -> Result<(PathBuf, Value)> {
    let data = root.join("control");
    let v = json(&[
        "init",
        "--json",
        "--data-dir",
        s(&data),
        "--quic-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--release-key-dir",
        s(key_dir),
    ])?;
    Ok((data, v))
}

fn audit_actions(data: &Path) -> Result<Vec<(String, String, String)>> {
    let store = SledStore::open(&data.join("store"))?;
    Ok(store.list_audit(100)?.into_iter().map(|a| (a.action, a.who, a.detail)).collect())
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[test]
fn keygen_init_add_list_and_a_version_never_changes() -> Result<()> {
    let root = tempfile::tempdir()?;
    let keys = root.path().join("release-key");
    let key = json(&["release", "keygen", "--json", "--out", s(&keys)])?;
    let fingerprint = key["fingerprint"].as_str().unwrap_or_default().to_owned();
    assert_eq!(fingerprint.len(), 64, "{key}");
    assert_eq!(std::fs::read(keys.join("release.key"))?.len(), 64);
    assert_eq!(mode(&keys.join("release.key"))?, 0o600);
    let public = std::fs::read(keys.join("release.pub"))?;
    assert_eq!(public.len(), 32);
    assert_eq!(mode(&keys.join("release.pub"))?, 0o644);
    // The fingerprint is the SHA-256 of the 32 public key bytes.
    let public_key = gaffer_certs::ReleasePublicKey::from_key_file(&public)?;
    assert_eq!(public_key.fingerprint().to_string(), fingerprint);
    // A second keygen into the same directory refuses and leaves the key alone.
    let err = refused(&["release", "keygen", "--out", s(&keys)])?;
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(keys.join("release.pub"))?, public);

    let (data, init) = init(root.path(), &keys)?;
    assert_eq!(init["release_key_fingerprint"], fingerprint.as_str());

    let file = tarball(root.path(), "1.4.0", "first build")?;
    let added = json(&["release", "add", "--json", "--data-dir", s(&data), "--file", s(&file)])?;
    let r = &added["release"];
    assert_eq!((r["version"].as_str(), r["arch"].as_str()), (Some("1.4.0"), Some(std::env::consts::ARCH)));
    assert_eq!(r["signer_fingerprint"], fingerprint.as_str());
    assert_eq!((added["signed_here"].as_bool(), added["already_present"].as_bool()), (Some(true), Some(false)));
    // What is stored is the signed artifact: it verifies against the key agents pin, under its name.
    let stored = PathBuf::from(added["path"].as_str().unwrap_or_default());
    assert!(stored.starts_with(data.join("releases").join("1.4.0")), "{stored:?}");
    let bytes = std::fs::read(&stored)?;
    let name = stored.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let info = gaffer_certs::verify_release(name, &bytes, &[public_key])?;
    assert_eq!(r["sha256"], info.sha256.as_str());
    assert_eq!(r["size_bytes"].as_u64(), Some(bytes.len() as u64));
    // Still a tarball that tar reads, with the same content.
    let listing = Command::new("tar").arg("-tzf").arg(&stored).output()?;
    assert!(String::from_utf8_lossy(&listing.stdout).contains("gaffer-agent-1.4.0/bin/gaffer-agent"));

    // The same bytes again: nothing changes.
    let again = json(&["release", "add", "--json", "--data-dir", s(&data), "--file", s(&file)])?;
    assert_eq!(again["already_present"].as_bool(), Some(true));
    assert_eq!(again["release"]["sha256"], r["sha256"]);
    // Other bytes under the same version: refused, the stored release is untouched.
    let other_dir = root.path().join("rebuilt");
    std::fs::create_dir(&other_dir)?;
    let rebuilt = tarball(&other_dir, "1.4.0", "a different build")?;
    let err = refused(&["release", "add", "--data-dir", s(&data), "--file", s(&rebuilt)])?;
    assert!(err.contains("already added with other content"), "{err}");
    assert_eq!(std::fs::read(&stored)?, bytes);

    let second = tarball(root.path(), "1.5.0", "next")?;
    json(&["release", "add", "--json", "--data-dir", s(&data), "--file", s(&second)])?;
    let list = json(&["release", "list", "--json", "--data-dir", s(&data)])?;
    let list = list.as_array().context("list --json prints an array")?;
    assert_eq!(list.iter().map(|l| l["version"].as_str().unwrap_or_default()).collect::<Vec<_>>(), ["1.4.0", "1.5.0"]);
    for l in list {
        for field in ["arch", "sha256", "size_bytes", "added_at", "added_at_ms", "signer_fingerprint", "file_name"] {
            assert!(!l[field].is_null(), "{field} missing in {l}");
        }
        assert_eq!(l["signer_fingerprint"], fingerprint.as_str());
    }
    let text = control(&["release", "list", "--data-dir", s(&data)])?;
    assert!(String::from_utf8_lossy(&text.stdout).contains("1.5.0"));

    // Two releases added, each audited once with who did it; the no-op and the refusal wrote nothing.
    let audit = audit_actions(&data)?;
    let adds: Vec<_> = audit.iter().filter(|(action, _, _)| action == "release_add").collect();
    assert_eq!(adds.len(), 2, "{audit:?}");
    let me = gaffer_control::admin::local_actor().to_string();
    assert!(adds.iter().all(|(_, who, detail)| *who == me && detail.contains(&fingerprint)), "{adds:?}");
    Ok(())
}

#[test]
fn releases_signed_offline_are_verified_and_bad_ones_refused() -> Result<()> {
    let root = tempfile::tempdir()?;
    // The pair stays on the "offline machine"; the control plane's key directory holds only the
    // public key.
    let offline = root.path().join("offline-key");
    let key = json(&["release", "keygen", "--json", "--out", s(&offline)])?;
    let fingerprint = key["fingerprint"].as_str().unwrap_or_default().to_owned();
    let public_only = root.path().join("public-key");
    std::fs::create_dir(&public_only)?;
    std::fs::copy(offline.join("release.pub"), public_only.join("release.pub"))?;
    let (data, init) = init(root.path(), &public_only)?;
    assert_eq!(init["release_key_fingerprint"], fingerprint.as_str());

    let file = tarball(root.path(), "2.0.0", "offline")?;
    // No pair here to sign with: says how to sign offline.
    let err = refused(&["release", "add", "--data-dir", s(&data), "--file", s(&file)])?;
    assert!(err.contains("release sign") && err.contains("--signature-already-embedded"), "{err}");
    // Unsigned, claiming to be signed.
    let err = refused(&["release", "add", "--data-dir", s(&data), "--file", s(&file), "--signature-already-embedded"])?;
    assert!(err.contains("carries no release signature"), "{err}");

    let signed_dir = root.path().join("signed");
    std::fs::create_dir(&signed_dir)?;
    let signed = json(&[
        "release",
        "sign",
        "--json",
        "--file",
        s(&file),
        "--release-key-dir",
        s(&offline),
        "--out",
        s(&signed_dir),
    ])?;
    let signed_file = PathBuf::from(signed["path"].as_str().unwrap_or_default());
    assert_eq!(signed_file.file_name(), file.file_name(), "the name is what the signature covers");
    assert_eq!(signed["signer_fingerprint"], fingerprint.as_str());
    let added = json(&[
        "release",
        "add",
        "--json",
        "--data-dir",
        s(&data),
        "--file",
        s(&signed_file),
        "--signature-already-embedded",
    ])?;
    assert_eq!((added["signed_here"].as_bool(), added["already_present"].as_bool()), (Some(false), Some(false)));
    assert_eq!(added["release"]["signer_fingerprint"], fingerprint.as_str());
    assert_eq!(added["release"]["sha256"], signed["sha256"]);

    // One byte changed after signing: refused.
    let tampered_dir = root.path().join("tampered");
    std::fs::create_dir(&tampered_dir)?;
    let tampered = tampered_dir.join(signed_file.file_name().context("name")?);
    let mut bytes = std::fs::read(&signed_file)?;
    bytes[40] ^= 0x01;
    std::fs::write(&tampered, &bytes)?;
    let err =
        refused(&["release", "add", "--data-dir", s(&data), "--file", s(&tampered), "--signature-already-embedded"])?;
    assert!(err.contains("does not verify"), "{err}");

    // Signed by another key: refused.
    let stranger = root.path().join("stranger-key");
    json(&["release", "keygen", "--json", "--out", s(&stranger)])?;
    let stranger_out = root.path().join("stranger-signed");
    std::fs::create_dir(&stranger_out)?;
    let other = tarball(&tampered_dir, "2.1.0", "not ours")?;
    let by_stranger = json(&[
        "release",
        "sign",
        "--json",
        "--file",
        s(&other),
        "--release-key-dir",
        s(&stranger),
        "--out",
        s(&stranger_out),
    ])?;
    let by_stranger = by_stranger["path"].as_str().unwrap_or_default().to_owned();
    let err =
        refused(&["release", "add", "--data-dir", s(&data), "--file", &by_stranger, "--signature-already-embedded"])?;
    assert!(err.contains("does not verify"), "{err}");
    // Nor does pointing `add` at the stranger's key directory help: agents are offered ours.
    let err =
        refused(&["release", "add", "--data-dir", s(&data), "--file", s(&other), "--release-key-dir", s(&stranger)])?;
    assert!(err.contains("offers agents") && err.contains(&fingerprint), "{err}");

    // A mislabelled artifact (named 3.0.0, built as 2.0.0) is refused before anything is signed.
    let renamed = signed_dir.join(format!("gaffer-agent-3.0.0-{}-linux.tar.gz", std::env::consts::ARCH));
    std::fs::copy(&file, &renamed)?;
    let err = refused(&[
        "release",
        "sign",
        "--file",
        s(&renamed),
        "--release-key-dir",
        s(&offline),
        "--out",
        s(&tampered_dir),
    ])?;
    assert!(err.contains("top directory"), "{err}");

    let list = json(&["release", "list", "--json", "--data-dir", s(&data)])?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "only the good release was added: {list}");
    Ok(())
}

/// A server on the data directory holds the store: `release add` and `list` go through its admin
/// socket, and the server records the peer as the actor.
#[test]
fn add_and_list_go_through_the_running_server() -> Result<()> {
    let root = tempfile::tempdir()?;
    let keys = root.path().join("release-key");
    json(&["release", "keygen", "--json", "--out", s(&keys)])?;
    let (data, _) = init(root.path(), &keys)?;
    let server = Server::start(&data)?;
    // The server reports the version it was built as, the one `--version` prints.
    let serve_info: Value = serde_json::from_slice(&std::fs::read(data.join("serve.json"))?)?;
    let version = String::from_utf8(control(&["--version"])?.stdout)?;
    assert_eq!(version.trim(), format!("gaffer-control {}", serve_info["version"].as_str().unwrap_or_default()));
    let file = tarball(root.path(), "3.1.0", "served")?;
    let added = json(&["release", "add", "--json", "--data-dir", s(&data), "--file", s(&file)])?;
    assert_eq!(added["release"]["version"], "3.1.0");
    let list = json(&["release", "list", "--json", "--data-dir", s(&data)])?;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    drop(server);
    let audit = audit_actions(&data)?;
    let me = gaffer_control::admin::local_actor().to_string();
    assert!(
        audit.iter().any(|(action, who, detail)| action == "release_add" && *who == me && detail.contains("3.1.0")),
        "{audit:?}"
    );
    Ok(())
}

/// `gaffer-control serve` on loopback, stopped (SIGTERM) on drop.
struct Server(Child);

impl Server {
    fn start(data: &Path) -> Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_gaffer-control"))
            .args(["serve", "--data-dir", s(data), "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .env("GAFFER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        // serve.json is written once the server is up (read until it is complete).
        while std::fs::read(data.join("serve.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_none()
        {
            if Instant::now() > deadline {
                bail!("gaffer-control serve did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
