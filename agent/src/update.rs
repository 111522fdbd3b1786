//! Self-update: staged releases, the re-exec into a new version, its health gate and the
//! automatic rollback.
//!
//! # Files (in the data directory)
//! * `versions/<version>/gaffer-agent`: every release this agent unpacked (0755). The packaged
//!   binary (`/usr/bin/gaffer-agent`, or whatever was started: the *entry* binary) is never
//!   touched: it is the version of last resort, and with systemd `ProtectSystem=strict` it is
//!   read-only anyway.
//! * `update.json` ([`UpdateState`], written atomically): which binary is selected (`current`), the
//!   one before it (`previous`), an order fetched and verified but not applied yet (`staged`), the
//!   version on trial (`trial`), and reports written before the outbox could take them.
//!
//! # The path of an update
//! 1. The control plane sends an [`UpdateOrder`]; [`Updater`] fetches the artifact on the same
//!    authenticated connection ([`gaffer_protocol::release_fetch`]), checks its size and SHA-256,
//!    verifies its zipsign signature against the release key pinned at enrollment
//!    (`self_update::verify_signature`), unpacks `gaffer-agent-<version>/bin/gaffer-agent` with
//!    `self_update::Extract`, and checks that the unpacked binary says it is `<version>`.
//!    Any failure is reported (`Failed`, not rolled back) and the agent stays on its version.
//! 2. It reports `Staged`, takes no new job (the control plane holds them back too) and waits until
//!    it runs none.
//! 3. It records the trial (the new binary, the one to fall back to, its own argv and pid) and,
//!    without systemd, starts a watcher ([`watch_trial`], `gaffer-agent update-watch`) from the
//!    known-good binary; then it re-executes itself (`execve`, same pid) into the new version.
//! 4. The new version, at start ([`at_start`]), finds itself on trial with the recorded pid, runs
//!    its self-test ([`self_test`]: decode the built-in clip, find its cut, and with models
//!    installed run the `full` profile on it, which loads every model), then runs normally while
//!    its health gate ([`spawn_health_gate`]) counts the time the link is up. After `health_wait_secs`
//!    of it, the trial is confirmed (`current` = the new version, `previous` = the old one) and
//!    `Healthy` is reported.
//! 5. Rollback: a failed self-test, a health gate not met within `health_wait_secs` +
//!    [`HEALTH_GRACE_SECS`], or a crash puts the previous binary back. A crash leaves the trial
//!    recorded with a pid that is gone: whoever starts the agent next (systemd's
//!    `Restart=on-failure`, else the watcher) runs a binary whose [`at_start`] sees that, records
//!    the failure and re-executes the fallback, which reports `Failed { rolled_back: true }`.
//!
//! Air-gapped agents (`run --offline`) get the order and the signed artifact in a reply bundle
//! instead ([`gaffer_protocol::bundle::BundledRelease`]): `bundle import` writes the artifact to
//! `versions/.download-<version>/`, makes the same checks ([`stage_bundled`]), reports `Staged`
//! into the outbox (it reaches the control plane in the next agent bundle) and hands the binary to
//! the running agent's updater ([`UpdateCommand::Staged`]), or, with no agent running, leaves it
//! staged for the next `run`. Steps 2-5 are the same, except that with no link the health gate is
//! met once the new version has run for `health_wait_secs` after its self-test.
//!
//! Nothing here needs update metadata to keep running: a missing, expired or unreadable
//! `update.json` means "run the binary that was started", and an unreachable control plane means
//! no new orders, never a stop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gaffer_protocol::messages::{AgentMessage, UpdateOrder, UpdateOutcome, UpdateReport};
use gaffer_protocol::release_fetch::{
    ReleaseFetchReply, ReleaseFetchRequest, RELEASE_FETCH_FRAME_BYTES_MAX, RELEASE_FILE_NAME_BYTES_MAX,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::datadir::DataDir;
use crate::link::{LinkState, LinkStatus};
use crate::outbox::Outbox;
use crate::runner::Runner;
use crate::AgentError;

/// `DATA_DIR/update.json`.
pub const UPDATE_STATE_FILE: &str = "update.json";
/// `DATA_DIR/versions/`.
pub const VERSIONS_DIR: &str = "versions";
/// Largest `update.json` read, bytes (1 MiB).
pub const UPDATE_STATE_BYTES_MAX: u64 = 1024 * 1024;
/// How long past its `health_wait_secs` a new version may take to have been connected that long
/// before it is rolled back, seconds (300).
pub const HEALTH_GRACE_SECS: u64 = 300;
/// How long a fetch of a release may take, seconds (600).
pub const FETCH_TIMEOUT_SECS: u64 = 600;
/// How long `<new binary> --version` may take, seconds (30).
pub const VERSION_CHECK_TIMEOUT_SECS: u64 = 30;
/// Reports kept in `update.json` until the outbox takes them, at most (16).
pub const PENDING_REPORTS_MAX: usize = 16;
/// How many times in a row a start may re-execute into the selected binary (3): a guard against a
/// loop between binaries that disagree about which one is selected.
pub const EXEC_DEPTH_MAX: u32 = 3;
/// The environment variable that carries the re-exec depth.
pub const EXEC_DEPTH_ENV: &str = "GAFFER_AGENT_EXEC_DEPTH";
/// The built-in self-test clip: 4 s of 96×64 H.264 at 10 fps, a test pattern then colour bars, so
/// exactly one cut at 2.0 s (made with FFmpeg's `testsrc` and `smptebars`).
pub const SELF_TEST_CLIP: &[u8] = include_bytes!("../assets/selftest.mp4");

/// A binary this agent can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Its version, as `--version` prints it.
    pub version: String,
    /// Absolute path.
    pub exe: PathBuf,
}

/// A release fetched and verified, waiting for the agent to be idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// The order.
    pub order: UpdateOrder,
    /// The unpacked binary.
    pub exe: PathBuf,
    /// Whether it came in a reply bundle ([`stage_bundled`]): then the next start applies it when
    /// no agent ran to take it (a link order is sent again on the next connection instead).
    #[serde(default)]
    pub bundled: bool,
}

/// A version on trial: started, not yet through its health gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The order it came from.
    pub order: UpdateOrder,
    /// The new binary.
    pub exe: PathBuf,
    /// What runs if it fails.
    pub fallback: Installed,
    /// The command line the agent was started with (argv[1..]), for the restart after a crash.
    pub args: Vec<OsString>,
    /// The pid the trial runs under (`execve` keeps it): a start under any other pid while the
    /// trial is recorded means the trial died.
    pub pid: u32,
    /// When the re-exec happened, Unix ms.
    pub started_at_ms: u64,
}

/// `update.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateState {
    /// The binary selected to run; None: the one that was started.
    pub current: Option<Installed>,
    /// The binary before `current`, kept on disk for a manual rollback.
    pub previous: Option<Installed>,
    /// Fetched and verified, not applied.
    pub staged: Option<Staged>,
    /// On trial.
    pub trial: Option<Trial>,
    /// Reports for the outbox (written where the outbox is not open: at start, before a re-exec).
    pub reports: Vec<UpdateReport>,
    /// Updates this agent gave up on (rolled back or refused), newest last, at most
    /// [`FAILED_KEPT_MAX`]: an order of the same rollout and version, which the control plane may
    /// send again before the failure report reaches it, is answered with the failure again and
    /// never retried.
    #[serde(default)]
    pub failed: Vec<FailedUpdate>,
}

/// An update given up on ([`UpdateState::failed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedUpdate {
    /// The rollout of the order.
    pub rollout_id: u64,
    /// The version it asked for.
    pub version: String,
    /// Why it failed.
    pub reason: String,
    /// Whether the new version ran and was rolled back.
    pub rolled_back: bool,
}

/// Failed updates remembered, at most (16).
pub const FAILED_KEPT_MAX: usize = 16;

fn update_error(m: impl Into<String>) -> AgentError {
    AgentError::Update(m.into())
}

impl UpdateState {
    /// `DATA_DIR/update.json`.
    pub fn path(dd: &DataDir) -> PathBuf {
        dd.root().join(UPDATE_STATE_FILE)
    }

    /// Reads `update.json`; a missing file is the default state.
    ///
    /// # Errors
    /// [`AgentError::Io`] when it cannot be read, [`AgentError::Update`] when it is larger than
    /// [`UPDATE_STATE_BYTES_MAX`] or not valid.
    pub fn load(dd: &DataDir) -> Result<Self, AgentError> {
        let path = Self::path(dd);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(AgentError::io(&path, e)),
        };
        if meta.len() > UPDATE_STATE_BYTES_MAX {
            return Err(update_error(format!("{} is larger than {UPDATE_STATE_BYTES_MAX} bytes", path.display())));
        }
        let bytes = std::fs::read(&path).map_err(|e| AgentError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| update_error(format!("{}: {e}", path.display())))
    }

    /// Writes `update.json` atomically (temp file, fsync, rename, fsync of the directory).
    ///
    /// # Errors
    /// [`AgentError::Io`].
    pub fn save(&self, dd: &DataDir) -> Result<(), AgentError> {
        use std::io::Write as _;
        let path = Self::path(dd);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| update_error(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| AgentError::io(&tmp, e))?;
        f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| AgentError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| AgentError::io(&path, e))?;
        if let Ok(dir) = std::fs::File::open(dd.root()) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn push_report(&mut self, report: UpdateReport) {
        if let UpdateOutcome::Failed { reason, rolled_back, .. } = &report.outcome {
            self.remember_failure(report.rollout_id, &report.version, reason, *rolled_back);
        }
        if self.reports.len() >= PENDING_REPORTS_MAX {
            self.reports.remove(0);
        }
        self.reports.push(report);
    }

    /// Records an update given up on (see [`UpdateState::failed`]).
    pub fn remember_failure(&mut self, rollout_id: u64, version: &str, reason: &str, rolled_back: bool) {
        self.failed.retain(|f| !(f.rollout_id == rollout_id && f.version == version));
        if self.failed.len() >= FAILED_KEPT_MAX {
            self.failed.remove(0);
        }
        self.failed.push(FailedUpdate {
            rollout_id,
            version: version.to_owned(),
            reason: reason.to_owned(),
            rolled_back,
        });
    }

    /// The failure of the update `order` asks for, if this agent gave up on it.
    pub fn failure_of(&self, order: &UpdateOrder) -> Option<&FailedUpdate> {
        self.failed.iter().find(|f| f.rollout_id == order.rollout_id && f.version == order.version)
    }
}

/// `DATA_DIR/versions/<version>/gaffer-agent`.
pub fn version_exe(dd: &DataDir, version: &str) -> PathBuf {
    dd.root().join(VERSIONS_DIR).join(version).join("gaffer-agent")
}

/// The version this agent runs, as far as `update.json` tells (for a process that is not the
/// agent itself, such as `bundle export`): the version on trial, else the selected one, else
/// `my_version` (the binary asking).
pub fn running_version(dd: &DataDir, my_version: &str) -> String {
    match UpdateState::load(dd) {
        Ok(UpdateState { trial: Some(t), .. }) => t.order.version,
        Ok(UpdateState { current: Some(c), .. }) => c.version,
        _ => my_version.to_owned(),
    }
}

/// What [`stage_bundled`] did with the release of a reply bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum BundledOutcome {
    /// Verified and unpacked: `Staged` is in the outbox, and the agent restarts into it once it
    /// runs no job (the running agent's updater, or the next `run`).
    Staged {
        /// The version.
        version: String,
        /// The unpacked binary.
        exe: PathBuf,
    },
    /// Refused (size, SHA-256, signature, unpacking, `--version`): `Failed` is in the outbox and
    /// the agent stays on its version.
    Refused {
        /// The version.
        version: String,
        /// Why.
        reason: String,
    },
    /// Nothing to do: the agent runs that version already (`Healthy` is in the outbox), it is on
    /// trial, or it staged that order already.
    Skipped {
        /// The version.
        version: String,
        /// Why.
        reason: String,
    },
}

/// Stages the release a reply bundle carries (air-gapped rollouts), as [`Updater`] stages a
/// fetched one: writes the artifact to `versions/.download-<version>/<file name>`, checks its size
/// and SHA-256 against the order, verifies its signature against the pinned release key, unpacks
/// it and checks its `--version`; records it as staged (`bundled`) and pushes `Staged` into the
/// outbox. A refusal pushes `Failed { rolled_back: false }` and changes nothing else. `my_version`
/// is the binary calling.
///
/// # Errors
/// [`AgentError`] only when `update.json` or the outbox cannot be written (a refused release is
/// [`BundledOutcome::Refused`]).
pub fn stage_bundled(
    dd: &DataDir,
    db: &sled::Db,
    outbox: &Outbox,
    release: &gaffer_protocol::bundle::BundledRelease,
    my_version: &str,
) -> Result<BundledOutcome, AgentError> {
    let order = &release.order;
    let version = order.version.clone();
    let report = |outcome: UpdateOutcome| -> Result<(), AgentError> {
        outbox.push(&AgentMessage::UpdateReport(UpdateReport {
            rollout_id: order.rollout_id,
            version: order.version.clone(),
            outcome,
        }))?;
        Ok(())
    };
    let state = UpdateState::load(dd).unwrap_or_default();
    let running = running_version(dd, my_version);
    if state.trial.is_some() {
        let reason = "a version is on trial; the release is sent again in the next reply".to_owned();
        tracing::info!(rollout_id = order.rollout_id, %version, "{reason}");
        return Ok(BundledOutcome::Skipped { version, reason });
    }
    if running == order.version {
        report(UpdateOutcome::Healthy)?;
        return Ok(BundledOutcome::Skipped { version, reason: format!("this agent runs {running} already") });
    }
    if let Some(st) = state.staged.as_ref().filter(|st| st.order == *order && st.exe.is_file()) {
        return Ok(BundledOutcome::Skipped {
            version,
            reason: format!("staged already ({}); it is applied once the agent runs no job", st.exe.display()),
        });
    }
    match stage_artifact(dd, order, &release.artifact, my_version) {
        Ok(exe) => {
            let mut s = UpdateState::load(dd)?;
            s.staged = Some(Staged { order: order.clone(), exe: exe.clone(), bundled: true });
            s.save(dd)?;
            db.flush()?;
            report(UpdateOutcome::Staged)?;
            tracing::info!(rollout_id = order.rollout_id, from = %running, to = %version, exe = %exe.display(),
                "release from the reply bundle verified and unpacked");
            Ok(BundledOutcome::Staged { version, exe })
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::error!(rollout_id = order.rollout_id, %version, %reason,
                "release from the reply bundle refused; this agent stays on its version");
            report(UpdateOutcome::Failed { reason: reason.clone(), rolled_back: false, running_version: running })?;
            Ok(BundledOutcome::Refused { version, reason })
        }
    }
}

/// The checks and the unpacking of [`stage_bundled`]; returns the new binary.
fn stage_artifact(dd: &DataDir, order: &UpdateOrder, artifact: &[u8], my_version: &str) -> Result<PathBuf, AgentError> {
    let Some(key) = crate::release_key::load(dd)? else {
        return Err(update_error(
            "no release key is pinned, so no release can be verified: re-enroll this agent with a control plane \
             that has a release key (gaffer-control init --release-key-dir)",
        ));
    };
    let name = gaffer_certs::ReleaseName::parse(&order.file_name)
        .map_err(|e| update_error(format!("the order names {:?}: {e}", order.file_name)))?;
    if name.version != order.version {
        return Err(update_error(format!("the order's file {} is not version {}", order.file_name, order.version)));
    }
    let digest = hex::encode(Sha256::digest(artifact));
    if artifact.len() as u64 != order.size_bytes || digest != order.sha256 {
        return Err(update_error(format!(
            "the bundle carries {} as {} bytes with SHA-256 {digest}; the order said {} bytes with {}",
            order.file_name,
            artifact.len(),
            order.size_bytes,
            order.sha256
        )));
    }
    let dir = dd.root().join(VERSIONS_DIR).join(&order.version);
    let download_dir = dd.root().join(VERSIONS_DIR).join(format!(".download-{}", order.version));
    for d in [&dir, &download_dir] {
        std::fs::create_dir_all(d).map_err(|e| AgentError::io(d, e))?;
    }
    // The signature is bound to the file name: the download keeps it.
    let archive = download_dir.join(&order.file_name);
    let r = write_synced(&archive, artifact).and_then(|()| verify_and_unpack(order, &archive, &dir, key.as_bytes()));
    let _ = std::fs::remove_dir_all(&download_dir);
    let exe = r?;
    tracing::debug!(from = %my_version, to = %order.version, "bundled release unpacked");
    Ok(exe)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).map_err(|e| AgentError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| AgentError::io(path, e))
}

/// A release a reply bundle staged and no agent applied yet (it was not running at the import),
/// for the next `run` to hand to its [`Updater`]. None when there is none, or a trial runs.
pub fn bundled_staged(dd: &DataDir) -> Option<Staged> {
    let state = UpdateState::load(dd).ok()?;
    if state.trial.is_some() {
        return None;
    }
    state.staged.filter(|s| s.bundled && s.exe.is_file())
}

/// What a start of `run` does.
#[derive(Debug)]
pub enum StartDecision {
    /// Run this binary; `trial` is set when it is a version on trial (self-test and health gate
    /// follow).
    Run {
        /// The trial, when this start is one.
        trial: Option<Trial>,
    },
    /// Re-execute into this binary (the selected version, or the fallback of a failed trial).
    Exec {
        /// The binary.
        exe: PathBuf,
        /// Why, for the log.
        why: String,
    },
}

/// Decides, at the start of `run`, whether this binary (`my_version`, process `my_pid`) runs, or
/// the selected one does, finishing a trial that died (rollback) on the way.
///
/// # Errors
/// [`AgentError`] when `update.json` cannot be read or written; the caller logs it and runs.
pub fn at_start(dd: &DataDir, my_version: &str, my_pid: u32, now_ms: u64) -> Result<StartDecision, AgentError> {
    let mut state = UpdateState::load(dd)?;
    let mut rolled_back: Option<String> = None;
    if let Some(trial) = state.trial.clone() {
        if trial.order.version == my_version && trial.pid == my_pid {
            return Ok(StartDecision::Run { trial: Some(trial) });
        }
        // The trial's process is gone and something started the agent again: the new version
        // crashed or was killed before its health gate. Put the fallback back.
        let ran_secs = now_ms.saturating_sub(trial.started_at_ms) / 1000;
        let reason = format!(
            "version {} stopped {ran_secs} s after it was started, before it passed its health gate; rolled back to {}",
            trial.order.version, trial.fallback.version
        );
        tracing::error!(rollout_id = trial.order.rollout_id, %reason, "update rolled back");
        state.push_report(UpdateReport {
            rollout_id: trial.order.rollout_id,
            version: trial.order.version.clone(),
            outcome: UpdateOutcome::Failed {
                reason,
                rolled_back: true,
                running_version: trial.fallback.version.clone(),
            },
        });
        state.trial = None;
        state.current = Some(trial.fallback.clone());
        state.save(dd)?;
        rolled_back = Some(trial.order.version);
    }
    // A packaged binary (not one a rollout unpacked) newer than the selection, and not the version
    // that just failed, is a package upgrade.
    let me = std::env::current_exe().ok();
    let packaged = me.as_ref().is_some_and(|p| !p.starts_with(dd.root().join(VERSIONS_DIR)));
    match state.current {
        Some(cur)
            if cur.version != my_version
                && packaged
                && rolled_back.as_deref() != Some(my_version)
                && newer(my_version, &cur.version) =>
        {
            // The started binary is newer than the selected one: a package upgrade
            // (`apt install gaffer-agent`) after a rollout. The upgrade wins.
            tracing::info!(selected = %cur.version, started = my_version,
                "the started binary is newer than the version a rollout selected; running it and selecting it");
            let exe = me.ok_or_else(|| update_error("which binary is this: /proc/self/exe is unreadable"))?;
            state.previous = Some(cur);
            state.current = Some(Installed { version: my_version.to_owned(), exe });
            state.save(dd)?;
            Ok(StartDecision::Run { trial: None })
        }
        Some(cur) if cur.version != my_version => {
            if !cur.exe.is_file() {
                tracing::error!(version = %cur.version, exe = %cur.exe.display(),
                    "the selected agent binary is missing; running this one ({my_version}) instead");
                return Ok(StartDecision::Run { trial: None });
            }
            let depth: u32 = std::env::var(EXEC_DEPTH_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            if depth >= EXEC_DEPTH_MAX {
                tracing::error!(version = %cur.version, depth,
                    "re-executed {depth} times in a row without reaching the selected version; running {my_version}");
                return Ok(StartDecision::Run { trial: None });
            }
            Ok(StartDecision::Exec {
                why: format!("version {} is selected ({UPDATE_STATE_FILE})", cur.version),
                exe: cur.exe,
            })
        }
        _ => Ok(StartDecision::Run { trial: None }),
    }
}

/// Whether version `a` is newer than `b` (semver; false when either does not parse).
fn newer(a: &str, b: &str) -> bool {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// Replaces this process with `exe`, keeping the pid and the arguments (argv[1..] of this
/// process); returns only on failure.
pub fn exec_into(exe: &Path) -> AgentError {
    use std::os::unix::process::CommandExt as _;
    let depth: u32 = std::env::var(EXEC_DEPTH_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(EXEC_DEPTH_ENV, (depth + 1).to_string())
        .exec();
    AgentError::io(exe, err)
}

/// Moves the reports `update.json` holds into the outbox (at-least-once: pushed, then removed).
///
/// # Errors
/// [`AgentError`] from the outbox or the state file.
pub fn flush_reports(dd: &DataDir, outbox: &Outbox) -> Result<usize, AgentError> {
    let mut state = UpdateState::load(dd)?;
    if state.reports.is_empty() {
        return Ok(0);
    }
    let n = state.reports.len();
    for r in state.reports.drain(..) {
        outbox.push(&AgentMessage::UpdateReport(r))?;
    }
    state.save(dd)?;
    Ok(n)
}

/// The self-test of a version on trial: decodes [`SELF_TEST_CLIP`] and finds its one cut; with
/// `models` it runs the `full` profile on it, which loads the ONNX Runtime sessions of every model
/// the profile uses.
///
/// # Errors
/// What failed, in words for the rollback report.
pub fn self_test(dd: &DataDir, models: Option<&crate::analysis::full::Models>) -> Result<(), String> {
    use crate::analysis::{self, AnalyzeOptions, Profile};
    let path = dd.root().join("selftest.mp4");
    std::fs::write(&path, SELF_TEST_CLIP).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let full_opts = analysis::full::FullOptions::default();
    let full = models.map(|m| analysis::full::FullAnalysis { models: m, options: &full_opts });
    let opts = AnalyzeOptions {
        profile: if full.is_some() { Profile::Full } else { Profile::Shots },
        ..AnalyzeOptions::default()
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let result = analysis::analyze_file_with(&path, &opts, full.as_ref(), &mut |_| {}, &cancel);
    let _ = std::fs::remove_file(&path);
    let digest = result.map_err(|e| format!("self-test: analyzing the built-in clip failed: {e}"))?;
    if digest.shots.cuts.len() != 1 {
        return Err(format!("self-test: the built-in clip has 1 cut, this build found {}", digest.shots.cuts.len()));
    }
    Ok(())
}

/// Confirms the trial: the new version becomes `current`, the fallback `previous`.
///
/// # Errors
/// [`AgentError`] from the state file.
pub fn confirm_trial(dd: &DataDir, trial: &Trial) -> Result<(), AgentError> {
    let mut state = UpdateState::load(dd)?;
    if state.trial.as_ref().is_some_and(|t| t.pid == trial.pid && t.order == trial.order) {
        state.previous = Some(trial.fallback.clone());
        state.current = Some(Installed { version: trial.order.version.clone(), exe: trial.exe.clone() });
        state.trial = None;
        state.save(dd)?;
    }
    Ok(())
}

/// Fails the trial: records the report and the fallback as `current`, and returns the fallback's
/// binary for the caller to re-execute.
///
/// # Errors
/// [`AgentError`] from the state file.
pub fn fail_trial(dd: &DataDir, trial: &Trial, reason: &str) -> Result<PathBuf, AgentError> {
    let mut state = UpdateState::load(dd)?;
    state.push_report(UpdateReport {
        rollout_id: trial.order.rollout_id,
        version: trial.order.version.clone(),
        outcome: UpdateOutcome::Failed {
            reason: format!("{reason}; rolled back to {}", trial.fallback.version),
            rolled_back: true,
            running_version: trial.fallback.version.clone(),
        },
    });
    state.trial = None;
    state.current = Some(trial.fallback.clone());
    state.save(dd)?;
    Ok(trial.fallback.exe.clone())
}

/// Runs the health gate of `trial`: once the link has been up for `health_wait_secs` in all, the
/// trial is confirmed and `Healthy` goes into the outbox; if that has not happened
/// [`HEALTH_GRACE_SECS`] after the wait, the trial fails and the process re-executes the fallback.
/// Without a link (`link` None: `run --offline`, an air-gapped agent) there is nothing to count:
/// the trial passes once it has run for `health_wait_secs` after its self-test.
pub fn spawn_health_gate(
    dd: DataDir,
    trial: Trial,
    link: Option<Arc<LinkStatus>>,
    outbox: Outbox,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let wait = u64::from(trial.order.health_wait_secs);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait + HEALTH_GRACE_SECS);
        let mut up_ms: u64 = 0;
        let tick = Duration::from_millis(250);
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            if link.as_ref().is_none_or(|l| l.get() == LinkState::Up) {
                up_ms += tick.as_millis() as u64;
            }
            if up_ms >= wait * 1000 {
                let (dd2, t2, ob) = (dd.clone(), trial.clone(), outbox.clone());
                let done = tokio::task::spawn_blocking(move || {
                    confirm_trial(&dd2, &t2)?;
                    ob.push(&AgentMessage::UpdateReport(UpdateReport {
                        rollout_id: t2.order.rollout_id,
                        version: t2.order.version.clone(),
                        outcome: UpdateOutcome::Healthy,
                    }))
                })
                .await;
                match done {
                    Ok(Ok(_)) => tracing::info!(rollout_id = trial.order.rollout_id, version = %trial.order.version,
                        "update healthy: this version passed its health gate and is now the selected one"),
                    Ok(Err(e)) => tracing::error!(error = %e, "could not confirm the update"),
                    Err(e) => tracing::error!(error = %e, "could not confirm the update"),
                }
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let reason = format!(
                    "version {} was connected for {} s of the {wait} s its health gate needs within {} s",
                    trial.order.version,
                    up_ms / 1000,
                    wait + HEALTH_GRACE_SECS
                );
                tracing::error!(%reason, "update failed its health gate; rolling back");
                match fail_trial(&dd, &trial, &reason) {
                    Ok(exe) => {
                        let e = exec_into(&exe);
                        tracing::error!(error = %e, "could not re-execute the previous version");
                    }
                    Err(e) => tracing::error!(error = %e, "could not record the failed update"),
                }
                return;
            }
        }
    })
}

/// What the link hands the [`Updater`].
pub enum UpdateCommand {
    /// An order, with the connection it came on (the artifact is fetched on it).
    Order {
        /// The order.
        order: UpdateOrder,
        /// The link connection.
        conn: quinn::Connection,
    },
    /// A release a reply bundle brought, already verified and unpacked ([`stage_bundled`], which
    /// reported `Staged`): apply it once the agent runs no job.
    Staged {
        /// The order.
        order: UpdateOrder,
        /// The unpacked binary.
        exe: PathBuf,
    },
    /// The control plane withdrew the order of this rollout.
    Withdrawn {
        /// The rollout.
        rollout_id: u64,
        /// Why.
        reason: String,
    },
}

/// Capacity of the updater's command queue (16); orders beyond it are dropped: the control plane
/// sends them again on the next connection.
pub const UPDATE_COMMANDS_MAX: usize = 16;

/// Carries out update orders: fetch, verify, stage, wait for idle, re-exec.
pub struct Updater {
    dd: DataDir,
    my_version: String,
    runner: Arc<Runner>,
    outbox: Outbox,
    db: sled::Db,
    rx: mpsc::Receiver<UpdateCommand>,
}

impl Updater {
    /// Starts the updater task of this agent (`my_version`); the link sends it what the control
    /// plane says. While this process is a version on trial, orders are ignored: its health gate
    /// decides first.
    pub fn spawn(
        dd: DataDir,
        my_version: &str,
        runner: Arc<Runner>,
        outbox: Outbox,
        db: sled::Db,
    ) -> mpsc::Sender<UpdateCommand> {
        let (tx, rx) = mpsc::channel(UPDATE_COMMANDS_MAX);
        let u = Updater { dd, my_version: my_version.to_owned(), runner, outbox, db, rx };
        tokio::spawn(u.run());
        tx
    }

    async fn report(&self, order: &UpdateOrder, outcome: UpdateOutcome) {
        let outbox = self.outbox.clone();
        let msg = AgentMessage::UpdateReport(UpdateReport {
            rollout_id: order.rollout_id,
            version: order.version.clone(),
            outcome,
        });
        match tokio::task::spawn_blocking(move || outbox.push(&msg)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not queue the update report"),
            Err(e) => tracing::error!(error = %e, "could not queue the update report"),
        }
    }

    async fn fail(&self, order: &UpdateOrder, reason: String) {
        tracing::error!(rollout_id = order.rollout_id, version = %order.version, %reason,
            "update not applied; this agent stays on its version");
        let (dd, o, r) = (self.dd.clone(), order.clone(), reason.clone());
        let remembered = tokio::task::spawn_blocking(move || {
            let mut s = UpdateState::load(&dd)?;
            s.remember_failure(o.rollout_id, &o.version, &r, false);
            s.save(&dd)
        })
        .await;
        if !matches!(remembered, Ok(Ok(()))) {
            tracing::warn!("could not record the failed update; a repeated order would be tried again");
        }
        self.report(
            order,
            UpdateOutcome::Failed { reason, rolled_back: false, running_version: self.my_version.clone() },
        )
        .await;
    }

    async fn run(mut self) {
        while let Some(cmd) = self.rx.recv().await {
            let (order, source) = match cmd {
                UpdateCommand::Withdrawn { rollout_id, reason } => {
                    tracing::info!(rollout_id, %reason, "update order withdrawn before it was applied");
                    continue;
                }
                UpdateCommand::Order { order, conn } => (order, Ok(conn)),
                UpdateCommand::Staged { order, exe } => (order, Err(exe)),
            };
            let span = tracing::info_span!("update", rollout_id = order.rollout_id, version = %order.version);
            let _enter = span.enter();
            let dd = self.dd.clone();
            let state = tokio::task::spawn_blocking(move || UpdateState::load(&dd)).await.ok().and_then(Result::ok);
            if let Some(f) = state.as_ref().and_then(|s| s.failure_of(&order)).cloned() {
                // Given up on already: say so again (the first report may still be on its way).
                tracing::info!(reason = %f.reason, "this update failed here before; reporting it again, not retrying");
                let running_version = self.my_version.clone();
                let outcome = UpdateOutcome::Failed { reason: f.reason, rolled_back: f.rolled_back, running_version };
                self.report(&order, outcome).await;
                continue;
            }
            let on_trial = state.and_then(|s| s.trial).is_some_and(|t| t.pid == std::process::id());
            if on_trial {
                // The control plane sends the order again on the next connection.
                tracing::info!("this version is on trial; orders wait until its health gate is done");
                continue;
            }
            if order.version == self.my_version {
                self.report(&order, UpdateOutcome::Healthy).await;
                continue;
            }
            drop(_enter);
            let exe = match source {
                Ok(conn) => match self.stage(&order, &conn).await {
                    Ok(exe) => {
                        self.report(&order, UpdateOutcome::Staged).await;
                        exe
                    }
                    Err(e) => {
                        self.fail(&order, e.to_string()).await;
                        continue;
                    }
                },
                // From a reply bundle: staged and reported by the import.
                Err(exe) => exe,
            };
            self.runner.set_hold(Some(format!("restarting into version {}", order.version)));
            tracing::info!(rollout_id = order.rollout_id, version = %order.version,
                "update staged; taking no new job and restarting once the running ones are done");
            // Idle, or withdrawn.
            let withdrawn = loop {
                if self.runner.jobs_running() == 0 && self.runner.jobs_queued() == 0 {
                    break false;
                }
                match tokio::time::timeout(Duration::from_millis(500), self.rx.recv()).await {
                    Ok(Some(UpdateCommand::Withdrawn { rollout_id, reason })) if rollout_id == order.rollout_id => {
                        tracing::info!(rollout_id, %reason, "update order withdrawn; not applying it");
                        break true;
                    }
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => return,
                }
            };
            if withdrawn {
                self.runner.set_hold(None);
                let dd = self.dd.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let mut s = UpdateState::load(&dd)?;
                    s.staged = None;
                    s.save(&dd)
                })
                .await;
                continue;
            }
            let e = self.apply(&order, &exe).await;
            self.runner.set_hold(None);
            self.fail(&order, format!("could not start version {}: {e}", order.version)).await;
        }
    }

    /// Fetches, checks, verifies and unpacks the release of `order`; returns the new binary.
    async fn stage(&self, order: &UpdateOrder, conn: &quinn::Connection) -> Result<PathBuf, AgentError> {
        let key = {
            let dd = self.dd.clone();
            tokio::task::spawn_blocking(move || crate::release_key::load(&dd))
                .await
                .map_err(|e| update_error(e.to_string()))??
        };
        let Some(key) = key else {
            return Err(update_error(
                "no release key is pinned, so no release can be verified: give the control plane one \
                 (gaffer-control init --release-key-dir) and let the agent reconnect, or re-enroll",
            ));
        };
        let name = gaffer_certs::ReleaseName::parse(&order.file_name)
            .map_err(|e| update_error(format!("the order names {:?}: {e}", order.file_name)))?;
        if name.version != order.version {
            return Err(update_error(format!("the order's file {} is not version {}", order.file_name, order.version)));
        }
        if order.size_bytes > gaffer_certs::RELEASE_BYTES_MAX {
            return Err(update_error(format!(
                "the release is {} bytes, more than the {} an agent takes",
                order.size_bytes,
                gaffer_certs::RELEASE_BYTES_MAX
            )));
        }
        let dir = self.dd.root().join(VERSIONS_DIR).join(&order.version);
        let download_dir = self.dd.root().join(VERSIONS_DIR).join(format!(".download-{}", order.version));
        for d in [&dir, &download_dir] {
            std::fs::create_dir_all(d).map_err(|e| AgentError::io(d, e))?;
        }
        // The signature is bound to the file name: the download keeps it.
        let archive = download_dir.join(&order.file_name);
        let fetched = tokio::time::timeout(Duration::from_secs(FETCH_TIMEOUT_SECS), fetch(conn, order, &archive)).await;
        match fetched {
            Ok(r) => r?,
            Err(_) => {
                return Err(update_error(format!("fetching {} took more than {FETCH_TIMEOUT_SECS} s", order.file_name)))
            }
        }
        let (order2, archive2, dir2, dl2, my_version) =
            (order.clone(), archive.clone(), dir.clone(), download_dir.clone(), self.my_version.clone());
        let dd = self.dd.clone();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let r = verify_and_unpack(&order2, &archive2, &dir2, key.as_bytes());
            let _ = std::fs::remove_dir_all(&dl2);
            let exe = r?;
            let mut s = UpdateState::load(&dd)?;
            s.staged = Some(Staged { order: order2.clone(), exe: exe.clone(), bundled: false });
            s.save(&dd)?;
            db.flush()?;
            tracing::info!(from = %my_version, to = %order2.version, exe = %exe.display(), "release verified and unpacked");
            Ok(exe)
        })
        .await
        .map_err(|e| update_error(e.to_string()))?
    }

    /// Records the trial, starts the watcher (without systemd), re-executes into `exe`. Returns
    /// only on failure.
    async fn apply(&self, order: &UpdateOrder, exe: &Path) -> AgentError {
        let (dd, order, exe, my_version, db) =
            (self.dd.clone(), order.clone(), exe.to_path_buf(), self.my_version.clone(), self.db.clone());
        let r = tokio::task::spawn_blocking(move || -> Result<AgentError, AgentError> {
            let me = std::env::current_exe().map_err(|e| update_error(format!("which binary is this: {e}")))?;
            let mut s = UpdateState::load(&dd)?;
            let fallback = s
                .current
                .clone()
                .filter(|c| c.version == my_version)
                .unwrap_or(Installed { version: my_version.clone(), exe: me.clone() });
            let trial = Trial {
                order: order.clone(),
                exe: exe.clone(),
                fallback,
                args: std::env::args_os().skip(1).collect(),
                pid: std::process::id(),
                started_at_ms: crate::now_ms(),
            };
            s.staged = None;
            s.trial = Some(trial);
            s.save(&dd)?;
            db.flush()?;
            if !under_systemd() {
                spawn_watcher(&me, &dd)?;
            }
            let _ = std::fs::remove_file(dd.socket_path());
            tracing::info!(version = %order.version, exe = %exe.display(), "restarting into the new version");
            let e = exec_into(&exe);
            // Still here: the exec failed. Undo the trial.
            let mut s = UpdateState::load(&dd)?;
            s.trial = None;
            s.save(&dd)?;
            Ok(e)
        })
        .await;
        match r {
            Ok(Ok(e)) | Ok(Err(e)) => e,
            Err(e) => update_error(e.to_string()),
        }
    }
}

/// Whether systemd runs this agent as a service (it restarts a crashed agent itself, so no watcher
/// is started): `INVOCATION_ID` is set for every unit's processes.
pub fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
}

/// Starts `me update-watch --data-dir D --pid P --detach`, which starts the watcher proper and
/// exits at once, so the watcher is nobody's child (no zombie) and stays in this process group.
fn spawn_watcher(me: &Path, dd: &DataDir) -> Result<(), AgentError> {
    let status = std::process::Command::new(me)
        .arg("update-watch")
        .arg("--data-dir")
        .arg(dd.root())
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg("--detach")
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| AgentError::io(me, e))?;
    if !status.success() {
        return Err(update_error(format!("the update watcher did not start ({status})")));
    }
    Ok(())
}

async fn fetch(conn: &quinn::Connection, order: &UpdateOrder, archive: &Path) -> Result<(), AgentError> {
    use tokio::io::AsyncWriteExt as _;
    let link_err = |e: &dyn std::fmt::Display| update_error(format!("fetching {}: {e}", order.file_name));
    if order.file_name.len() > RELEASE_FILE_NAME_BYTES_MAX {
        return Err(update_error("the order's file name is too long"));
    }
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| link_err(&e))?;
    let req = ReleaseFetchRequest { file_name: order.file_name.clone() };
    let frame = gaffer_protocol::encode_frame(&req, RELEASE_FETCH_FRAME_BYTES_MAX).map_err(|e| link_err(&e))?;
    send.write_all(&frame).await.map_err(|e| link_err(&e))?;
    let _ = send.finish();
    let mut dec = gaffer_protocol::FrameDecoder::new(RELEASE_FETCH_FRAME_BYTES_MAX);
    let mut buf = vec![0u8; 64 * 1024];
    let reply: ReleaseFetchReply = loop {
        if let Some(r) = dec.next_message().map_err(|e| link_err(&e))? {
            break r;
        }
        match recv.read(&mut buf).await.map_err(|e| link_err(&e))? {
            Some(n) => dec.push(&buf[..n]),
            None => return Err(update_error("the control plane closed the release stream without an answer")),
        }
    };
    let (size_bytes, sha256) = match reply {
        ReleaseFetchReply::Artifact { size_bytes, sha256 } => (size_bytes, sha256),
        ReleaseFetchReply::Refused { reason } => return Err(update_error(format!("the control plane: {reason}"))),
    };
    if size_bytes != order.size_bytes || sha256 != order.sha256 {
        return Err(update_error(format!(
            "the control plane offers {} as {size_bytes} bytes with SHA-256 {sha256}, the order said {} bytes with {}",
            order.file_name, order.size_bytes, order.sha256
        )));
    }
    let mut file = tokio::fs::File::create(archive).await.map_err(|e| AgentError::io(archive, e))?;
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    // What the decoder read past the reply frame is the artifact's first bytes.
    let rest = dec.take_buffered();
    let mut chunk = rest;
    loop {
        if !chunk.is_empty() {
            got += chunk.len() as u64;
            if got > size_bytes {
                return Err(update_error(format!("the control plane sent more than {size_bytes} bytes")));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| AgentError::io(archive, e))?;
        }
        match recv.read(&mut buf).await.map_err(|e| link_err(&e))? {
            Some(n) => chunk = buf[..n].to_vec(),
            None => break,
        }
    }
    file.sync_all().await.map_err(|e| AgentError::io(archive, e))?;
    let digest = hex::encode(hasher.finalize());
    if got != size_bytes || digest != order.sha256 {
        return Err(update_error(format!(
            "received {got} bytes with SHA-256 {digest}; the order said {size_bytes} bytes with {}",
            order.sha256
        )));
    }
    Ok(())
}

/// Verifies `archive` against `key` (`self_update::verify_signature`), unpacks its binary into
/// `dir` (`self_update::Extract`) and checks that it says it is `order.version`.
fn verify_and_unpack(order: &UpdateOrder, archive: &Path, dir: &Path, key: &[u8; 32]) -> Result<PathBuf, AgentError> {
    self_update::verify_signature(archive, &[*key]).map_err(|e| {
        update_error(format!("{}: the signature does not verify against the pinned release key: {e}", order.file_name))
    })?;
    let inner = format!("gaffer-agent-{}/bin/gaffer-agent", order.version);
    let unpack = dir.join(".unpack");
    let _ = std::fs::remove_dir_all(&unpack);
    std::fs::create_dir_all(&unpack).map_err(|e| AgentError::io(&unpack, e))?;
    self_update::Extract::from_source(archive)
        .archive(self_update::ArchiveKind::Tar(Some(self_update::Compression::Gz)))
        .extract_file(&unpack, &inner)
        .map_err(|e| update_error(format!("{}: unpacking {inner}: {e}", order.file_name)))?;
    let exe = dir.join("gaffer-agent");
    let tmp = dir.join(".gaffer-agent.new");
    std::fs::rename(unpack.join(&inner), &tmp).map_err(|e| AgentError::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&unpack);
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(|e| AgentError::io(&tmp, e))?;
    }
    check_version(&tmp, &order.version)?;
    // self_update's Move: the rename into place, so a half-written binary is never at `exe`.
    self_update::Move::from_source(&tmp)
        .to_dest(&exe)
        .map_err(|e| update_error(format!("installing {}: {e}", exe.display())))?;
    Ok(exe)
}

/// Runs `exe --version` and checks it prints `gaffer-agent <version>`.
fn check_version(exe: &Path, version: &str) -> Result<(), AgentError> {
    let mut child = std::process::Command::new(exe)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| AgentError::io(exe, e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(VERSION_CHECK_TIMEOUT_SECS);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| AgentError::io(exe, e))? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(update_error(format!(
                "{} --version did not answer in {VERSION_CHECK_TIMEOUT_SECS} s",
                exe.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        use std::io::Read as _;
        let _ = (&mut so).take(4096).read_to_string(&mut out);
    }
    let want = format!("gaffer-agent {version}");
    if !status.success() || out.trim() != want {
        return Err(update_error(format!("the unpacked binary says {:?} ({status}), not {want:?}", out.trim())));
    }
    Ok(())
}

/// The watcher of a trial started without systemd (`gaffer-agent update-watch`): until the trial
/// of process `pid` is confirmed or failed, it checks every 250 ms that the process lives; when it
/// is gone (or still unconfirmed past its health deadline plus a minute: killed), it starts the
/// fallback binary with the trial's arguments, whose [`at_start`] rolls the update back.
///
/// # Errors
/// [`AgentError`] when the fallback cannot be started.
pub fn watch_trial(dd: &DataDir, pid: u32) -> Result<(), AgentError> {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let state = match UpdateState::load(dd) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "update watcher: cannot read the update state; trying again");
                continue;
            }
        };
        let Some(trial) = state.trial.filter(|t| t.pid == pid) else { return Ok(()) };
        let deadline_ms =
            trial.started_at_ms + (u64::from(trial.order.health_wait_secs) + HEALTH_GRACE_SECS + 60) * 1000;
        let alive = process_alive(pid);
        if alive && crate::now_ms() < deadline_ms {
            continue;
        }
        if alive {
            tracing::error!(pid, "update watcher: the new version is past its health deadline; stopping it");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(500));
        }
        tracing::error!(pid, version = %trial.order.version, fallback = %trial.fallback.version,
            "update watcher: the new version stopped before its health gate; starting the previous one");
        std::process::Command::new(&trial.fallback.exe)
            .args(&trial.args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| AgentError::io(&trial.fallback.exe, e))?;
        return Ok(());
    }
}

/// Whether process `pid` runs (a zombie does not).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}
