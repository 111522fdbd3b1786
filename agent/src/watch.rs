//! Watch folders: new media files under configured roots become jobs.
//!
//! [`spawn_watcher`] watches each root recursively with `notify`'s recommended watcher (inotify on
//! Linux) and scans the roots once at start, so files that landed while the agent was down are
//! found too. A file is a *candidate* when its name passes the filter (media extension, not hidden,
//! not a partial download). Candidates wait in a bounded pending set and are re-`stat`ed every
//! [`RESTAT_INTERVAL_MS`]; a candidate *settles* once its size and modification time have stayed the
//! same for [`WatchConfig::settle_secs`] (a file still being copied keeps changing). A settled file
//! is sent once per (path, size, mtime) — unless the caller's `already_seen` says it already made a
//! job of it.
//!
//! Because events can be missed (network file systems where the writer is another host, inotify
//! queue overflow, our own bounded event queue filling up), the roots are also rescanned every
//! [`FULL_RESCAN_INTERVAL_SECS`], and at most every [`OVERFLOW_RESCAN_GAP_SECS`] after an overflow.
//!
//! Limits: the pending set holds at most [`WatchConfig::pending_max`] candidates (the rest are
//! picked up by a later rescan), the event queue from the watcher thread holds
//! [`EVENT_QUEUE_MAX`] events, a scan visits at most [`SCAN_ENTRIES_MAX`] directory entries and
//! descends at most [`SCAN_DEPTH_MAX`] directories deep, and symlinked directories are not
//! followed (symlinked files are).
//!
//! Reported paths are under the canonicalized roots (symlinks in the root paths resolved).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use notify::event::{AccessKind, AccessMode, MetadataKind, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// Default for [`WatchConfig::settle_secs`]: 2 seconds.
pub const SETTLE_SECS_DEFAULT: u64 = 2;
/// Default for [`WatchConfig::pending_max`]: 10 000 candidates.
pub const PENDING_MAX_DEFAULT: usize = 10_000;
/// Default for [`WatchConfig::extensions`] (lower case, without the dot; matched
/// case-insensitively).
pub const EXTENSIONS_DEFAULT: &[&str] =
    &["mp4", "mov", "mxf", "avi", "mkv", "m4v", "mts", "m2ts", "webm", "mpg", "mpeg", "wmv", "flv", "ts"];
/// File-name suffixes of partial downloads/copies, never reported (matched case-insensitively).
pub const PARTIAL_SUFFIXES: &[&str] = &[".part", ".tmp", ".crdownload", ".partial"];
/// How often pending candidates are re-`stat`ed, milliseconds.
pub const RESTAT_INTERVAL_MS: u64 = 500;
/// How often the roots are rescanned in full even without an overflow, seconds (covers
/// file systems where the watcher misses events, e.g. NFS written by another host).
pub const FULL_RESCAN_INTERVAL_SECS: u64 = 60;
/// Minimum time between rescans triggered by a lost-event condition (event queue or pending set
/// full, inotify overflow), seconds.
pub const OVERFLOW_RESCAN_GAP_SECS: u64 = 10;
/// Capacity of the queue from the watcher thread to the watch task, events; when full, events
/// are dropped and a rescan is scheduled.
pub const EVENT_QUEUE_MAX: usize = 4096;
/// Directory entries one scan visits at most (the scan stops there with a WARN).
pub const SCAN_ENTRIES_MAX: usize = 1_000_000;
/// Directory levels below a root a scan descends at most.
pub const SCAN_DEPTH_MAX: usize = 64;
/// Event paths with unknown type (possibly a directory moved in) waiting to be probed at most;
/// beyond this a rescan is scheduled instead.
const PROBES_MAX: usize = 1024;

/// Watch-folder configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Directories to watch, recursively. Each must exist when watching starts. Default: none.
    pub roots: Vec<PathBuf>,
    /// Seconds a file must keep the same size and modification time before it counts (it is
    /// still being copied otherwise). Default [`SETTLE_SECS_DEFAULT`] (2). Checked every
    /// [`RESTAT_INTERVAL_MS`], so a file is reported between `settle_secs` and
    /// `settle_secs` + 0.5 s after its last change.
    pub settle_secs: u64,
    /// File extensions that count as media, without the dot, case-insensitive. Default
    /// [`EXTENSIONS_DEFAULT`].
    pub extensions: Vec<String>,
    /// Most candidates waiting to settle at once. Default [`PENDING_MAX_DEFAULT`] (10 000).
    pub pending_max: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            settle_secs: SETTLE_SECS_DEFAULT,
            extensions: EXTENSIONS_DEFAULT.iter().map(|e| (*e).to_owned()).collect(),
            pending_max: PENDING_MAX_DEFAULT,
        }
    }
}

/// A media file that has stopped changing, ready to become a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WatchedFile {
    /// Absolute path, under a canonicalized watch root.
    pub path: PathBuf,
    /// File size, bytes (never 0: empty files are not reported).
    pub size_bytes: u64,
    /// Modification time, Unix seconds (negative before 1970).
    pub modified_unix_secs: i64,
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A watch root does not exist.
    #[error("watch root {} does not exist; create it (mkdir -p '{}') or remove it from the watch roots", .path.display(), .path.display())]
    RootMissing {
        /// The root as configured.
        path: PathBuf,
    },
    /// A watch root exists but is a file (or another non-directory).
    #[error("watch root {} is not a directory; point the watch root at a directory", .path.display())]
    RootNotDirectory {
        /// The root as configured.
        path: PathBuf,
    },
    /// A watch root cannot be read (permissions, I/O error).
    #[error("cannot read watch root {}: {source}; check that the agent's user may list it", .path.display())]
    RootUnreadable {
        /// The root as configured.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The OS file watcher refused to watch a root.
    #[error("cannot watch {}: {source}; on Linux, raise fs.inotify.max_user_watches if the limit is reached", .path.display())]
    CannotWatch {
        /// The canonical root.
        path: PathBuf,
        /// The underlying error.
        source: notify::Error,
    },
    /// The OS file watcher could not be created.
    #[error("cannot start the file watcher: {source}; on Linux, raise fs.inotify.max_user_instances if the limit is reached")]
    WatcherUnavailable {
        /// The underlying error.
        source: notify::Error,
    },
    /// The configuration cannot work; fix the named field.
    #[error("invalid watch configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// [`spawn_watcher`] was called outside a Tokio runtime.
    #[error("spawn_watcher must be called from within a Tokio runtime")]
    NoRuntime,
}

/// A running watch. Dropping it stops watching (the watcher thread and the task end; a scan
/// already running on the blocking pool finishes and is discarded).
pub struct WatchHandle {
    _watcher: RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
    roots: Vec<PathBuf>,
}

impl WatchHandle {
    /// The canonicalized roots being watched, in configuration order.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether the watch task is still running (it ends when the receiver of `tx` is dropped).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle")
            .field("roots", &self.roots)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `cfg.roots` and sends each settled media file through `tx`.
///
/// Starts `notify`'s recommended watcher on every root (recursive), then a Tokio task that scans
/// the roots once, follows events, re-`stat`s candidates every [`RESTAT_INTERVAL_MS`] and
/// rescans periodically (see the module docs). Each settled file is sent once per (path, size,
/// mtime); `already_seen` is asked first, and files it accepts are skipped (the agent persists
/// the set of files it made jobs of). Ignored: hidden names (any path component below the root
/// starting with `.`), names ending in [`PARTIAL_SUFFIXES`], directories, empty files, and
/// extensions not in `cfg.extensions`. Sending waits while `tx` is full; the task ends when its
/// receiver is dropped.
///
/// Must be called within a Tokio runtime. Setting up recursive watches walks the roots
/// synchronously.
///
/// # Errors
/// [`WatchError::RootMissing`], [`WatchError::RootNotDirectory`], [`WatchError::RootUnreadable`]
/// for a bad root; [`WatchError::CannotWatch`] / [`WatchError::WatcherUnavailable`] when the OS
/// watcher refuses; [`WatchError::InvalidConfig`] for no roots, no extensions or
/// `pending_max == 0`; [`WatchError::NoRuntime`] outside Tokio.
pub fn spawn_watcher(
    cfg: WatchConfig,
    already_seen: impl Fn(&WatchedFile) -> bool + Send + Sync + 'static,
    tx: mpsc::Sender<WatchedFile>,
) -> Result<WatchHandle, WatchError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| WatchError::NoRuntime)?;
    let filter = Arc::new(Filter::new(&cfg)?);

    let (event_tx, event_rx) = mpsc::channel::<notify::Result<notify::Event>>(EVENT_QUEUE_MAX);
    let lost_events = Arc::new(AtomicBool::new(false));
    let lost_events_in_handler = Arc::clone(&lost_events);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event_tx.try_send(event).is_err() {
            lost_events_in_handler.store(true, Ordering::Relaxed);
        }
    })
    .map_err(|source| WatchError::WatcherUnavailable { source })?;
    for root in &filter.roots {
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|source| WatchError::CannotWatch { path: root.clone(), source })?;
    }
    info!(
        roots = ?filter.roots,
        settle_secs = cfg.settle_secs,
        "watch folders: watching"
    );

    let state = State {
        filter: Arc::clone(&filter),
        settle: Duration::from_secs(cfg.settle_secs),
        pending_max: cfg.pending_max,
        pending: HashMap::new(),
        probes: HashSet::new(),
        reported: HashMap::new(),
        rescan_needed: false,
        last_scan: None,
        pending_full_warned: false,
    };
    let task = runtime.spawn(run(state, event_rx, lost_events, already_seen, tx));
    Ok(WatchHandle { _watcher: watcher, task, roots: filter.roots.clone() })
}

/// What a path's name says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameClass {
    /// Media extension, not hidden, not partial.
    Media,
    /// Hidden, partial, or outside every root: never interesting.
    Ignored,
    /// Not a media name, but could be a directory holding media (e.g. one moved in).
    Other,
}

#[derive(Debug)]
struct Filter {
    /// Canonical roots.
    roots: Vec<PathBuf>,
    /// Lower-case extensions without dots.
    extensions: HashSet<String>,
}

impl Filter {
    fn new(cfg: &WatchConfig) -> Result<Self, WatchError> {
        if cfg.roots.is_empty() {
            return Err(WatchError::InvalidConfig {
                reason: "roots is empty; give at least one directory to watch".to_owned(),
            });
        }
        if cfg.pending_max == 0 {
            return Err(WatchError::InvalidConfig { reason: "pending_max must be at least 1".to_owned() });
        }
        let mut extensions = HashSet::new();
        for ext in &cfg.extensions {
            let ext = ext.trim().trim_start_matches('.').to_lowercase();
            if ext.is_empty() {
                return Err(WatchError::InvalidConfig { reason: "extensions contains an empty entry".to_owned() });
            }
            extensions.insert(ext);
        }
        if extensions.is_empty() {
            return Err(WatchError::InvalidConfig {
                reason: "extensions is empty; no file would ever match".to_owned(),
            });
        }
        let mut roots = Vec::with_capacity(cfg.roots.len());
        for root in &cfg.roots {
            roots.push(check_root(root)?);
        }
        Ok(Self { roots, extensions })
    }

    /// The longest root containing `path`.
    fn root_of(&self, path: &Path) -> Option<&Path> {
        self.roots
            .iter()
            .filter(|root| path.starts_with(root))
            .max_by_key(|root| root.components().count())
            .map(PathBuf::as_path)
    }

    fn classify(&self, path: &Path) -> NameClass {
        let Some(root) = self.root_of(path) else {
            return NameClass::Ignored;
        };
        let Ok(relative) = path.strip_prefix(root) else {
            return NameClass::Ignored;
        };
        let mut any = false;
        for component in relative.components() {
            match component {
                Component::Normal(name) => {
                    any = true;
                    if name.as_encoded_bytes().starts_with(b".") {
                        return NameClass::Ignored;
                    }
                }
                _ => return NameClass::Ignored,
            }
        }
        if !any {
            // The root itself.
            return NameClass::Ignored;
        }
        self.classify_name(path)
    }

    /// Classifies by file name only (hidden-ness of the name itself included).
    fn classify_name(&self, path: &Path) -> NameClass {
        let Some(name) = path.file_name() else {
            return NameClass::Ignored;
        };
        let name = name.to_string_lossy().to_lowercase();
        if name.starts_with('.') || PARTIAL_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            return NameClass::Ignored;
        }
        match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() && self.extensions.contains(ext) => NameClass::Media,
            _ => NameClass::Other,
        }
    }
}

fn check_root(root: &Path) -> Result<PathBuf, WatchError> {
    let metadata = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(WatchError::RootMissing { path: root.to_path_buf() })
        }
        Err(source) => return Err(WatchError::RootUnreadable { path: root.to_path_buf(), source }),
    };
    if !metadata.is_dir() {
        return Err(WatchError::RootNotDirectory { path: root.to_path_buf() });
    }
    let canonical = std::fs::canonicalize(root)
        .map_err(|source| WatchError::RootUnreadable { path: root.to_path_buf(), source })?;
    std::fs::read_dir(&canonical).map_err(|source| WatchError::RootUnreadable { path: root.to_path_buf(), source })?;
    Ok(canonical)
}

/// (size, full-precision mtime) as last seen by `stat`.
type Stat = (u64, SystemTime);

#[derive(Debug)]
struct Candidate {
    seen: Option<Stat>,
    stable_since: Instant,
}

/// A media file found by a scan.
#[derive(Debug)]
struct Found {
    path: PathBuf,
    stat: Stat,
}

/// Watch state; moved into the blocking pool for each tick and back.
struct State {
    filter: Arc<Filter>,
    settle: Duration,
    pending_max: usize,
    pending: HashMap<PathBuf, Candidate>,
    /// Event paths of unknown type, probed on the next tick.
    probes: HashSet<PathBuf>,
    /// Last (size, mtime secs) reported (or skipped by `already_seen`) per path; entries for
    /// files that disappeared are pruned by full rescans.
    reported: HashMap<PathBuf, (u64, i64)>,
    rescan_needed: bool,
    last_scan: Option<Instant>,
    pending_full_warned: bool,
}

impl State {
    fn handle_event(&mut self, event: notify::Event) {
        if event.need_rescan() {
            debug!("watcher asked for a rescan");
            self.rescan_needed = true;
        }
        match event.kind {
            // Reads (including our own analysis opening the file) and atime changes say
            // nothing about new content.
            EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write) => return,
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => return,
            _ => {}
        }
        for (i, path) in event.paths.into_iter().enumerate() {
            let gone = match event.kind {
                EventKind::Remove(_) => true,
                EventKind::Modify(ModifyKind::Name(RenameMode::From)) => true,
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => i == 0,
                _ => false,
            };
            match self.filter.classify(&path) {
                NameClass::Ignored => {}
                NameClass::Media if gone => {
                    self.pending.remove(&path);
                    self.reported.remove(&path);
                }
                NameClass::Media => self.offer(path, None, Instant::now()),
                NameClass::Other if gone => {}
                NameClass::Other => {
                    if self.probes.len() < PROBES_MAX {
                        self.probes.insert(path);
                    } else {
                        self.rescan_needed = true;
                    }
                }
            }
        }
    }

    /// Adds a candidate unless it is already pending or known unchanged.
    fn offer(&mut self, path: PathBuf, stat: Option<Stat>, now: Instant) {
        if self.pending.contains_key(&path) {
            return;
        }
        if let Some(stat) = stat {
            if self.reported.get(&path) == Some(&(stat.0, unix_secs(stat.1))) {
                return;
            }
        }
        if self.pending.len() >= self.pending_max {
            self.rescan_needed = true;
            if !self.pending_full_warned {
                self.pending_full_warned = true;
                warn!(
                    pending_max = self.pending_max,
                    "watch folders: pending set full; further files are picked up by a later rescan"
                );
            }
            return;
        }
        self.pending.insert(path, Candidate { seen: stat, stable_since: now });
    }

    fn scan_due(&self, now: Instant) -> bool {
        match self.last_scan {
            None => true,
            Some(last) => {
                let since = now.saturating_duration_since(last);
                since >= Duration::from_secs(FULL_RESCAN_INTERVAL_SECS)
                    || (self.rescan_needed && since >= Duration::from_secs(OVERFLOW_RESCAN_GAP_SECS))
            }
        }
    }

    /// One tick's file-system work (blocking): rescan if due, probe unknown event paths,
    /// re-`stat` candidates. Returns the files that settled and were not reported before.
    fn tick_blocking(&mut self) -> Vec<WatchedFile> {
        let now = Instant::now();
        if self.scan_due(now) {
            self.full_scan(now);
        }

        let probes: Vec<PathBuf> = self.probes.drain().collect();
        for path in probes {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {
                    let mut found = Vec::new();
                    let mut budget = SCAN_ENTRIES_MAX;
                    walk(&self.filter, &path, &mut budget, &mut found);
                    if budget == 0 {
                        self.rescan_needed = true;
                    }
                    for f in found {
                        self.offer(f.path, Some(f.stat), now);
                    }
                }
                Ok(_) => {
                    if self.filter.classify(&path) == NameClass::Media {
                        self.offer(path, None, now);
                    }
                }
                Err(e) => debug!(path = %path.display(), error = %e, "event path gone"),
            }
        }

        let mut settled = Vec::new();
        let settle = self.settle;
        self.pending.retain(|path, candidate| {
            let metadata = match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "candidate gone");
                    return false;
                }
            };
            if !metadata.is_file() {
                return false;
            }
            let stat = (metadata.len(), metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            if candidate.seen != Some(stat) {
                candidate.seen = Some(stat);
                candidate.stable_since = now;
                return true;
            }
            if now.saturating_duration_since(candidate.stable_since) < settle {
                return true;
            }
            if stat.0 == 0 {
                debug!(path = %path.display(), "ignoring empty file");
                return false;
            }
            settled.push(WatchedFile { path: path.clone(), size_bytes: stat.0, modified_unix_secs: unix_secs(stat.1) });
            false
        });
        settled.retain(|f| self.reported.get(&f.path) != Some(&(f.size_bytes, f.modified_unix_secs)));
        settled
    }

    fn full_scan(&mut self, now: Instant) {
        let started = Instant::now();
        let mut found = Vec::new();
        let mut budget = SCAN_ENTRIES_MAX;
        for root in &self.filter.roots {
            walk(&self.filter, root, &mut budget, &mut found);
        }
        let complete = budget > 0;
        if !complete {
            warn!(
                entries_max = SCAN_ENTRIES_MAX,
                "watch folders: scan stopped at its entry limit; some files may be missed"
            );
        }
        let file_count = found.len();
        self.rescan_needed = false;
        self.pending_full_warned = false;
        if complete {
            let present: HashSet<&Path> = found.iter().map(|f| f.path.as_path()).collect();
            self.reported.retain(|path, _| present.contains(path.as_path()));
        }
        for f in found {
            self.offer(f.path, Some(f.stat), now);
        }
        self.last_scan = Some(now);
        debug!(
            media_files = file_count,
            pending = self.pending.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "watch folders: scanned roots"
        );
    }
}

/// Walks `start` (a directory) without following directory symlinks, collecting media files.
/// Decrements `budget` per directory entry and stops when it reaches 0.
fn walk(filter: &Filter, start: &Path, budget: &mut usize, out: &mut Vec<Found>) {
    let mut stack = vec![(start.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot list directory");
                continue;
            }
        };
        for entry in entries {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    debug!(dir = %dir.display(), error = %e, "cannot read directory entry");
                    continue;
                }
            };
            let path = entry.path();
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                if depth < SCAN_DEPTH_MAX {
                    stack.push((path, depth + 1));
                }
                continue;
            }
            if filter.classify(&path) != NameClass::Media {
                continue;
            }
            // Follows a symlinked file to its target.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    out.push(Found { path, stat: (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)) })
                }
                Ok(_) => {}
                Err(e) => debug!(path = %path.display(), error = %e, "cannot stat file"),
            }
        }
    }
}

async fn run(
    mut state: State,
    mut events: mpsc::Receiver<notify::Result<notify::Event>>,
    lost_events: Arc<AtomicBool>,
    already_seen: impl Fn(&WatchedFile) -> bool + Send + Sync + 'static,
    tx: mpsc::Sender<WatchedFile>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(RESTAT_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Ok(event)) => state.handle_event(event),
                Some(Err(e)) => {
                    warn!(error = %e, "watch folders: watcher error; scheduling a rescan");
                    state.rescan_needed = true;
                }
                None => {
                    debug!("watcher stopped");
                    return;
                }
            },
            _ = ticker.tick() => {
                if lost_events.swap(false, Ordering::Relaxed) {
                    debug!("event queue overflowed; scheduling a rescan");
                    state.rescan_needed = true;
                }
                let joined = tokio::task::spawn_blocking(move || {
                    let settled = state.tick_blocking();
                    (state, settled)
                })
                .await;
                let settled;
                (state, settled) = match joined {
                    Ok(result) => result,
                    Err(e) => {
                        error!(error = %e, "watch folders: tick failed; watching stopped");
                        return;
                    }
                };
                for file in settled {
                    let key = (file.size_bytes, file.modified_unix_secs);
                    let path = file.path.clone();
                    if already_seen(&file) {
                        debug!(path = %path.display(), "settled file already seen; skipping");
                    } else {
                        info!(
                            path = %path.display(),
                            size_bytes = file.size_bytes,
                            "watch folders: new file"
                        );
                        if tx.send(file).await.is_err() {
                            info!("watch folders: receiver closed; watching stopped");
                            return;
                        }
                    }
                    if state.reported.len() >= SCAN_ENTRIES_MAX {
                        warn!("watch folders: reported set at its limit; clearing it (already_seen still filters)");
                        state.reported.clear();
                    }
                    state.reported.insert(path, key);
                }
            }
        }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(root: &Path) -> Filter {
        Filter {
            roots: vec![root.to_path_buf()],
            extensions: EXTENSIONS_DEFAULT.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    #[test]
    fn classify_names() {
        let f = filter(Path::new("/media/in"));
        let c = |p: &str| f.classify(Path::new(p));
        assert_eq!(c("/media/in/a.mp4"), NameClass::Media);
        assert_eq!(c("/media/in/sub/B.MOV"), NameClass::Media);
        assert_eq!(c("/media/in/x.M2TS"), NameClass::Media);
        assert_eq!(c("/media/in/.a.mp4"), NameClass::Ignored);
        assert_eq!(c("/media/in/.sync/a.mp4"), NameClass::Ignored);
        assert_eq!(c("/media/in/a.mp4.part"), NameClass::Ignored);
        assert_eq!(c("/media/in/a.mp4.TMP"), NameClass::Ignored);
        assert_eq!(c("/media/in/a.crdownload"), NameClass::Ignored);
        assert_eq!(c("/media/in/notes.txt"), NameClass::Other);
        assert_eq!(c("/media/in/dir"), NameClass::Other);
        assert_eq!(c("/media/in/mp4"), NameClass::Other);
        assert_eq!(c("/media/in"), NameClass::Ignored);
        assert_eq!(c("/elsewhere/a.mp4"), NameClass::Ignored);
        // Prefix match is by component: /media/input is not under /media/in.
        assert_eq!(c("/media/input/a.mp4"), NameClass::Ignored);
    }

    #[test]
    fn unix_secs_handles_pre_epoch() {
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}
