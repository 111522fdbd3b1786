//! The Debian packages, the release tarball and the systemd units (issue 9), as
//! `installers/build-packages.sh --profile dev` builds them from the binaries of this build:
//! what `dpkg-deb` lists and declares, maintainer scripts that parse as POSIX sh and that create
//! the user and data directories idempotently (run for real in a private mount namespace over
//! copies of /etc and /var/lib), units that `systemd-analyze verify` accepts with their binaries
//! in place and that `systemd-analyze security --offline=true` scores at most 1.5 (control plane)
//! and 2.5 (agent), an agent unit that keeps /dev/nvidia* and /dev/dri reachable, and the
//! tarball's contents.
//!
//! The packages come from `GAFFER_PACKAGES_DIR` when it is set (scripts/test.sh builds them once),
//! otherwise this test builds them (about 20 s; cargo-deb is installed into `~/.cache/gaffer/tools`
//! on first use): into a temp dir under `cargo test`, once per run under nextest. Needs dpkg-dev
//! and systemd (for systemd-analyze), which scripts/setup.sh installs, and root (util-linux's
//! `unshare --mount`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context as _};

/// What the packaging produced, built once for every test here.
struct Packages {
    dir: PathBuf,
    /// Upstream version (the .deb's without its `-1` revision).
    version: String,
    agent_deb: PathBuf,
    control_deb: PathBuf,
    tarball: PathBuf,
    /// Both packages' files, extracted (`dpkg-deb -x`).
    root: PathBuf,
    _temp: tempfile::TempDir,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Runs `cmd`, failing with its stderr unless it exits 0; returns stdout.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Result<Packages, String>> = OnceLock::new();
    match PACKAGES.get_or_init(|| build_or_find().map_err(|e| format!("{e:#}"))) {
        Ok(p) => p,
        Err(e) => panic!("no packages to test: {e}"),
    }
}

fn build_or_find() -> anyhow::Result<Packages> {
    let temp = tempfile::tempdir()?;
    let dir = gaffer_tests::packages_dir()?;
    let find = |prefix: &str, suffix: &str| -> anyhow::Result<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && name.ends_with(suffix) {
                found.push(dir.join(name));
            }
        }
        ensure!(found.len() == 1, "{}: expected one {prefix}*{suffix}, found {found:?}", dir.display());
        Ok(found.remove(0))
    };
    let agent_deb = find("gaffer-agent_", ".deb")?;
    let control_deb = find("gaffer-control_", ".deb")?;
    let deb_version = run(Command::new("dpkg-deb").args(["-f"]).arg(&agent_deb).arg("Version"))?.trim().to_owned();
    let version = deb_version.strip_suffix("-1").context("the package revision is -1")?.to_owned();
    let arch = run(Command::new("uname").arg("-m"))?.trim().to_owned();
    let tarball = dir.join(format!("gaffer-agent-{version}-{arch}-linux.tar.gz"));
    ensure!(tarball.is_file(), "{} is missing", tarball.display());
    let root = temp.path().join("root");
    for deb in [&agent_deb, &control_deb] {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    Ok(Packages { dir, version, agent_deb, control_deb, tarball, root, _temp: temp })
}

/// `dpkg-deb -c`: path (without the leading `.`) → mode string.
fn contents(deb: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(mode), Some(path)) = (fields.first(), fields.get(5)) else { bail!("odd dpkg-deb -c line {line:?}") };
        files.insert(path.trim_start_matches('.').to_owned(), (*mode).to_owned());
    }
    Ok(files)
}

fn field(deb: &Path, name: &str) -> anyhow::Result<String> {
    Ok(run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?.trim().to_owned())
}

/// The values of `key=` in a unit file's text, in order, comments skipped; an empty assignment
/// resets the list (as systemd does for list settings).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let mut values = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == key {
                let v = v.trim();
                if v.is_empty() {
                    values.clear();
                } else {
                    values.push(v.to_owned());
                }
            }
        }
    }
    values
}

fn unit_text(name: &str) -> anyhow::Result<String> {
    let path = packages().root.join("usr/lib/systemd/system").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Checks one package: its files and modes, its control fields, its conffile, and that the files
/// are the repository's.
fn check_package(deb: &Path, name: &str, config: &str, depends: &[&str]) -> anyhow::Result<()> {
    let p = packages();
    let files = contents(deb)?;
    let expect = [
        (format!("/usr/bin/{name}"), "-rwxr-xr-x"),
        (format!("/usr/lib/systemd/system/{name}.service"), "-rw-r--r--"),
        (format!("/etc/gaffer/{config}"), "-rw-r--r--"),
        (format!("/usr/share/doc/{name}/copyright"), "-rw-r--r--"),
        (format!("/usr/share/doc/{name}/README.md"), "-rw-r--r--"),
    ];
    for (path, mode) in &expect {
        assert_eq!(files.get(path).map(String::as_str), Some(*mode), "{path} in {}: {files:#?}", deb.display());
    }
    assert_eq!(field(deb, "Package")?, name);
    assert_eq!(field(deb, "Version")?, format!("{}-1", p.version));
    assert_eq!(field(deb, "Architecture")?, run(Command::new("dpkg").arg("--print-architecture"))?.trim());
    assert!(!field(deb, "Maintainer")?.is_empty());
    let declared = field(deb, "Depends")?;
    let declared: Vec<&str> = declared.split(',').map(|d| d.split_whitespace().next().unwrap_or_default()).collect();
    for d in depends {
        assert!(
            declared.iter().any(|have| have == d || (d.ends_with('*') && have.starts_with(d.trim_end_matches('*')))),
            "{name} Depends lacks {d}: {declared:?}"
        );
    }

    let control = tempfile::tempdir()?;
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(control.path()))?;
    let conffiles = std::fs::read_to_string(control.path().join("conffiles"))?;
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), [format!("/etc/gaffer/{config}")]);

    // What was packaged is what the repository holds.
    let repo = repo_root();
    for (packaged, source) in [
        (format!("etc/gaffer/{config}"), format!("installers/config/{config}")),
        (format!("usr/lib/systemd/system/{name}.service"), format!("installers/systemd/{name}.service")),
    ] {
        assert_eq!(
            std::fs::read(p.root.join(&packaged))?,
            std::fs::read(repo.join(&source))?,
            "{packaged} differs from {source}"
        );
    }
    // The stripped binary still runs with the libraries its Depends name.
    let version = run(Command::new(p.root.join("usr/bin").join(name)).arg("--version"))?;
    assert!(version.starts_with(&format!("{name} ")), "{name} --version printed {version:?}");
    Ok(())
}

#[test]
fn agent_package_lists_binary_unit_conffile_and_dependencies() -> anyhow::Result<()> {
    // FFmpeg's sonames come from dpkg-shlibdeps ($auto); passwd for useradd, init-system-helpers
    // for the systemd fragments.
    let depends = ["libavcodec*", "libavformat*", "libavutil*", "libc6", "passwd", "init-system-helpers"];
    check_package(&packages().agent_deb, "gaffer-agent", "agent.toml", &depends)
}

#[test]
fn control_package_lists_binary_unit_conffile_and_dependencies() -> anyhow::Result<()> {
    check_package(
        &packages().control_deb,
        "gaffer-control",
        "control.toml",
        &["libc6", "passwd", "init-system-helpers"],
    )
}

#[test]
fn maintainer_scripts_are_posix_sh_and_handle_the_service() -> anyhow::Result<()> {
    for (deb, name) in [(&packages().agent_deb, "gaffer-agent"), (&packages().control_deb, "gaffer-control")] {
        let control = tempfile::tempdir()?;
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(control.path()))?;
        let unit = format!("{name}.service");
        for (script, must_contain) in [
            ("postinst", vec!["useradd --system".to_owned(), format!("deb-systemd-helper update-state {unit}")]),
            ("prerm", vec![format!("deb-systemd-invoke stop {unit}")]),
            ("postrm", vec![format!("deb-systemd-helper purge {unit}"), format!("rm -rf /var/lib/{name}")]),
        ] {
            let path = control.path().join(script);
            let text = std::fs::read_to_string(&path).with_context(|| format!("{name} has no {script}"))?;
            assert!(text.starts_with("#!/bin/sh\n"), "{name} {script} is not a /bin/sh script");
            assert!(!text.contains("#DEBHELPER#"), "{name} {script}: cargo-deb left #DEBHELPER# unreplaced");
            for needle in must_contain {
                assert!(text.contains(&needle), "{name} {script} lacks {needle:?}");
            }
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
            assert_eq!(mode & 0o111, 0o111, "{name} {script} is not executable");
            run(Command::new("sh").arg("-n").arg(&path)).with_context(|| format!("{name} {script} does not parse"))?;
        }
    }
    Ok(())
}

/// Runs the real maintainer scripts as dpkg would (configure twice, remove, purge) in a private
/// mount namespace whose /etc and /var/lib are copies, so the host is untouched.
#[test]
fn maintainer_scripts_make_user_and_data_dirs_idempotently_and_purge_only_on_purge() -> anyhow::Result<()> {
    let p = packages();
    let t = tempfile::tempdir()?;
    for (deb, name) in [(&p.agent_deb, "agent"), (&p.control_deb, "control")] {
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(t.path().join(name)))?;
    }
    run(Command::new("cp").arg("-a").arg("/etc").arg(t.path().join("etc")))?;
    std::fs::create_dir(t.path().join("var-lib"))?;
    let script = r#"
        set -e
        mount --bind "$T/etc" /etc
        mount --bind "$T/var-lib" /var/lib
        # The agent joins video and render: make sure both exist so that path always runs.
        for g in video render; do getent group "$g" >/dev/null || groupadd --system "$g"; done
        snapshot() {
            echo "passwd=$(getent passwd gaffer)"
            echo "groups=$(id -Gn gaffer)"
            for d in agent control; do
                if [ -d /var/lib/gaffer-$d ]; then echo "$d=$(stat -c '%U:%G %a' /var/lib/gaffer-$d)"; else echo "$d=absent"; fi
            done
            echo "files=$(cat /etc/passwd /etc/group /etc/shadow /etc/gshadow | sha256sum | cut -c1-16)"
        }
        "$T/agent/postinst" configure
        "$T/control/postinst" configure
        echo "[first]"; snapshot
        mkdir /var/lib/gaffer-agent/kept && touch /var/lib/gaffer-control/kept
        "$T/agent/postinst" configure 0.1.0-1
        "$T/control/postinst" configure 0.1.0-1
        echo "[again]"; snapshot
        "$T/agent/prerm" remove && "$T/agent/postrm" remove
        echo "[removed]"; snapshot
        "$T/agent/postrm" purge
        "$T/control/prerm" remove && "$T/control/postrm" remove && "$T/control/postrm" purge
        echo "[purged]"; snapshot
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("T", t.path())
        .output()
        .context("running unshare (util-linux)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "maintainer scripts failed ({}); the test needs root for unshare --mount:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current = String::new();
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            sections.entry(current.clone()).or_default().insert(k.to_owned(), v.to_owned());
        }
    }
    let first = &sections["first"];
    let passwd: Vec<&str> = first["passwd"].split(':').collect();
    assert_eq!(passwd.first(), Some(&"gaffer"), "{first:?}");
    assert_eq!(passwd.last(), Some(&"/usr/sbin/nologin"), "a login shell for the service user: {first:?}");
    let uid: u32 = passwd.get(2).unwrap_or(&"").parse()?;
    assert!(uid < 1000, "gaffer is not a system user (uid {uid})");
    let groups: Vec<&str> = first["groups"].split_whitespace().collect();
    for g in ["gaffer", "video", "render"] {
        assert!(groups.contains(&g), "gaffer is not in {g}: {groups:?}");
    }
    assert_eq!(first["agent"], "gaffer:gaffer 700");
    assert_eq!(first["control"], "gaffer:gaffer 700");
    assert_eq!(sections["again"], sections["first"], "configuring again changed something");
    let removed = &sections["removed"];
    assert_eq!(removed["agent"], "gaffer:gaffer 700", "a plain remove deleted the agent's data");
    let purged = &sections["purged"];
    assert_eq!((purged["agent"].as_str(), purged["control"].as_str()), ("absent", "absent"), "{purged:?}");
    assert_eq!(purged["passwd"], first["passwd"], "purge removed the shared gaffer user");
    Ok(())
}

#[test]
fn units_pass_systemd_analyze_verify() -> anyhow::Result<()> {
    let p = packages();
    // verify --root resolves every unit under the root: give it the system's units beside ours,
    // and it checks ExecStart= against the packaged binaries there.
    let root = tempfile::tempdir()?;
    run(Command::new("cp").arg("-a").arg(format!("{}/.", p.root.display())).arg(root.path()))?;
    let system = root.path().join("usr/lib/systemd/system");
    run(Command::new("cp").arg("-an").arg("/usr/lib/systemd/system/.").arg(&system))
        .context("copying the host's systemd units (apt-get install systemd)")?;
    for unit in ["gaffer-agent.service", "gaffer-control.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(unit)
            .output()
            .context("running systemd-analyze (apt-get install systemd)")?;
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // Unknown keys and bad values are warnings with exit 0: any output is a failure.
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{said}",
            out.status
        );
    }
    Ok(())
}

/// `systemd-analyze security --offline=true`'s overall exposure (0 = locked down, 10 = none).
fn exposure(unit: &str) -> anyhow::Result<f64> {
    let path = packages().root.join("usr/lib/systemd/system").join(unit);
    let report = run(Command::new("systemd-analyze").args(["security", "--offline=true", "--no-pager"]).arg(&path))?;
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .with_context(|| format!("no overall exposure line in:\n{report}"))?;
    let score = line.split(':').nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_default();
    score.parse().with_context(|| format!("parsing {line:?}"))
}

#[test]
fn units_score_within_the_exposure_limits() -> anyhow::Result<()> {
    let control = exposure("gaffer-control.service")?;
    assert!(control <= 1.5, "gaffer-control.service exposure {control} > 1.5");
    let agent = exposure("gaffer-agent.service")?;
    assert!(agent <= 2.5, "gaffer-agent.service exposure {agent} > 2.5");
    Ok(())
}

#[test]
fn units_are_notify_services_with_a_watchdog_running_as_gaffer() -> anyhow::Result<()> {
    let p = packages();
    for (unit, exec, config, data_dir) in [
        (
            "gaffer-agent.service",
            "/usr/bin/gaffer-agent run --config /etc/gaffer/agent.toml",
            "agent.toml",
            "gaffer-agent",
        ),
        (
            "gaffer-control.service",
            "/usr/bin/gaffer-control serve --config /etc/gaffer/control.toml",
            "control.toml",
            "gaffer-control",
        ),
    ] {
        let text = unit_text(unit)?;
        let one = |key: &str| unit_values(&text, key).last().cloned().unwrap_or_default();
        assert_eq!(one("Type"), "notify", "{unit}");
        assert_eq!(one("NotifyAccess"), "main", "{unit}");
        assert_eq!(one("WatchdogSec"), "30s", "{unit}");
        assert_eq!(one("Restart"), "on-failure", "{unit}");
        assert_eq!(one("User"), "gaffer", "{unit}");
        assert_eq!(unit_values(&text, "ExecStart"), [exec], "{unit}");
        assert_eq!(one("StateDirectory"), data_dir, "{unit}");
        // The packaged config names the directory systemd makes writable as the data dir.
        let cfg = std::fs::read_to_string(p.root.join("etc/gaffer").join(config))?;
        let configured = cfg.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "data_dir").then(|| v.trim().trim_matches('"').to_owned())
        });
        assert_eq!(configured, Some(format!("/var/lib/{data_dir}")), "data_dir in {config}");
    }
    Ok(())
}

/// The device classes (names in /proc/devices) a GPU box's agent must reach: the NVIDIA driver's
/// (older drivers name the main one nvidia-frontend) and DRM's (/dev/dri/card*, renderD*).
const GPU_DEVICE_CLASSES: [&str; 7] =
    ["nvidia", "nvidiactl", "nvidia-frontend", "nvidia-uvm", "nvidia-modeset", "nvidia-caps", "drm"];

#[test]
fn agent_unit_keeps_gpu_devices_reachable() -> anyhow::Result<()> {
    let path = packages().root.join("usr/lib/systemd/system/gaffer-agent.service");
    // systemd's own reading of the unit: no private /dev (it would hide /dev/nvidia*, /dev/dri).
    let report = run(Command::new("systemd-analyze").args(["security", "--offline=true", "--json=short"]).arg(&path))?;
    let items: Vec<serde_json::Value> = serde_json::from_str(&report)?;
    let private_devices = items.iter().find(|i| i["name"] == "PrivateDevices=").context("no PrivateDevices= item")?;
    assert_eq!(private_devices["set"], false, "PrivateDevices=yes hides the GPUs: {private_devices}");

    // A closed device policy that allows every GPU class read-write.
    let text = unit_text("gaffer-agent.service")?;
    assert_eq!(unit_values(&text, "DevicePolicy").last().map(String::as_str), Some("closed"));
    let allowed: Vec<(String, String)> = unit_values(&text, "DeviceAllow")
        .iter()
        .map(|v| {
            let (dev, rights) = v.split_once(char::is_whitespace).unwrap_or((v, "rwm"));
            (dev.to_owned(), rights.trim().to_owned())
        })
        .collect();
    for class in GPU_DEVICE_CLASSES {
        let ok = allowed.iter().any(|(dev, rights)| {
            let Some(pattern) = dev.strip_prefix("char-") else { return false };
            let matches = match pattern.strip_suffix('*') {
                Some(prefix) => class.starts_with(prefix),
                None => pattern == class,
            };
            matches && rights.contains('r') && rights.contains('w')
        });
        assert!(ok, "DeviceAllow= does not let the agent read and write char-{class}: {allowed:?}");
    }

    // The control plane has no use for devices at all.
    let control = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--json=short"])
        .arg(packages().root.join("usr/lib/systemd/system/gaffer-control.service")))?;
    let items: Vec<serde_json::Value> = serde_json::from_str(&control)?;
    assert!(items.iter().any(|i| i["name"] == "PrivateDevices=" && i["set"] == true), "control plane sees devices");
    Ok(())
}

#[test]
fn tarball_holds_the_packaged_binary_unit_config_and_readme() -> anyhow::Result<()> {
    let p = packages();
    let listing = run(Command::new("tar").arg("-tvzf").arg(&p.tarball))?;
    let top = format!("gaffer-agent-{}", p.version);
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(mode), Some(owner), Some(path)) = (fields.first(), fields.get(1), fields.get(5)) else {
            bail!("odd tar line {line:?}")
        };
        assert_eq!(*owner, "0/0", "{path} is not root-owned in the tarball");
        if !mode.starts_with('d') {
            files.insert(path.to_string(), mode.to_string());
        }
    }
    let expect: BTreeMap<String, String> = [
        ("bin/gaffer-agent", "-rwxr-xr-x"),
        ("systemd/gaffer-agent.service", "-rw-r--r--"),
        ("config/agent.toml", "-rw-r--r--"),
        ("README.md", "-rw-r--r--"),
    ]
    .into_iter()
    .map(|(f, m)| (format!("{top}/{f}"), m.to_owned()))
    .collect();
    assert_eq!(files, expect);

    let x = tempfile::tempdir()?;
    run(Command::new("tar").arg("-xzf").arg(&p.tarball).arg("-C").arg(x.path()))?;
    let unpacked = x.path().join(&top);
    for (in_tar, in_deb) in [
        ("bin/gaffer-agent", "usr/bin/gaffer-agent"),
        ("systemd/gaffer-agent.service", "usr/lib/systemd/system/gaffer-agent.service"),
        ("config/agent.toml", "etc/gaffer/agent.toml"),
    ] {
        assert_eq!(std::fs::read(unpacked.join(in_tar))?, std::fs::read(p.root.join(in_deb))?, "{in_tar} ≠ the .deb's");
    }
    let readme = std::fs::read_to_string(unpacked.join("README.md"))?;
    assert!(readme.contains(&format!("gaffer-agent {}", p.version)) && !readme.contains("@VERSION@"), "{readme}");
    assert!(readme.contains("Apache-2.0"), "the README names no license");
    // SHA256SUMS covers the three artifacts.
    let sums = run(Command::new("sha256sum").arg("--check").arg("SHA256SUMS").current_dir(&p.dir))?;
    assert_eq!(sums.lines().filter(|l| l.ends_with(": OK")).count(), 3, "{sums}");
    Ok(())
}
