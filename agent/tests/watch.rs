//! Watch folders on real files in temp dirs, with real inotify events.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaffer_agent::watch::{spawn_watcher, WatchConfig, WatchError, WatchHandle, WatchedFile};
use tokio::sync::mpsc;

const SETTLE_SECS: u64 = 1;

fn config(root: &Path) -> WatchConfig {
    WatchConfig { roots: vec![root.to_path_buf()], settle_secs: SETTLE_SECS, ..WatchConfig::default() }
}

fn start(root: &Path) -> (WatchHandle, mpsc::Receiver<WatchedFile>) {
    let (tx, rx) = mpsc::channel(16);
    let handle = spawn_watcher(config(root), |_| false, tx).expect("watcher starts");
    (handle, rx)
}

/// The canonical form of `p` (reported paths are under canonical roots).
fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).expect("canonicalize")
}

async fn next(rx: &mut mpsc::Receiver<WatchedFile>, within: Duration) -> Option<WatchedFile> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

/// Everything received within `within`.
async fn drain(rx: &mut mpsc::Receiver<WatchedFile>, within: Duration) -> Vec<WatchedFile> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.push(f);
    }
    out
}

/// Lets the watcher start and finish its initial scan.
async fn settle_start() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn growing_file_is_reported_once_after_it_stops_growing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_handle, mut rx) = start(dir.path());
    settle_start().await;

    let path = dir.path().join("ingest.mp4");
    let chunk = vec![0x42u8; 64 * 1024];
    let chunks = 6;
    let writer_path = path.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::create(&writer_path).expect("create");
        let mut last_write = Instant::now();
        for i in 0..chunks {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            f.write_all(&chunk).expect("write chunk");
            last_write = Instant::now();
        }
        last_write
    });

    // Nothing may be reported while the file is still growing (~1.5 s of writing).
    let early = drain(&mut rx, Duration::from_millis(1400)).await;
    assert!(early.is_empty(), "reported while growing: {early:?}");

    let last_write = writer.await.expect("writer");
    let got = next(&mut rx, Duration::from_secs(5)).await.expect("file reported after it stopped growing");
    let reported_at = Instant::now();
    assert_eq!(got.path, canon(&path));
    assert_eq!(got.size_bytes, 6 * 64 * 1024, "reported before the copy finished");
    assert!(
        // 50 ms allows for the gap between the final write(2) and reading the clock.
        reported_at.duration_since(last_write) >= Duration::from_secs(SETTLE_SECS) - Duration::from_millis(50),
        "reported {:?} after the last write, settle is {SETTLE_SECS} s",
        reported_at.duration_since(last_write)
    );
    let modified = std::fs::metadata(&path).expect("stat").modified().expect("mtime");
    let modified_secs = modified.duration_since(std::time::UNIX_EPOCH).expect("after epoch").as_secs() as i64;
    assert_eq!(got.modified_unix_secs, modified_secs);

    // Exactly once, even though reading it (as the analysis would) generates events.
    let _ = std::fs::read(&path).expect("read back");
    let again = drain(&mut rx, Duration::from_millis(2500)).await;
    assert!(again.is_empty(), "reported more than once: {again:?}");
}

#[tokio::test]
async fn changed_file_is_reported_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("take1.mov");
    std::fs::write(&path, b"first version").expect("write");
    let (_handle, mut rx) = start(dir.path());

    let first = next(&mut rx, Duration::from_secs(4)).await.expect("first");
    assert_eq!(first.size_bytes, 13);
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open");
    f.write_all(b" and more").expect("append");
    drop(f);
    let second = next(&mut rx, Duration::from_secs(4)).await.expect("second");
    assert_eq!(second.path, canon(&path));
    assert_eq!(second.size_bytes, 22);
}

#[tokio::test]
async fn file_present_before_start_is_found_by_initial_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("day1/cam_a")).expect("mkdir");
    let old = dir.path().join("day1/cam_a/A001C002.MXF");
    std::fs::write(&old, vec![1u8; 4096]).expect("write");
    std::fs::write(dir.path().join("day1/readme.txt"), b"notes").expect("write");

    let (_handle, mut rx) = start(dir.path());
    let got = next(&mut rx, Duration::from_secs(4)).await.expect("initial scan finds it");
    assert_eq!(got.path, canon(&old));
    assert_eq!(got.size_bytes, 4096);
    assert!(drain(&mut rx, Duration::from_millis(1500)).await.is_empty());
}

#[tokio::test]
async fn ignored_names_are_never_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_handle, mut rx) = start(dir.path());
    settle_start().await;

    std::fs::write(dir.path().join(".hidden.mp4"), b"x").expect("write");
    std::fs::write(dir.path().join("download.mp4.part"), b"x").expect("write");
    std::fs::write(dir.path().join("copy.mkv.crdownload"), b"x").expect("write");
    std::fs::write(dir.path().join("render.mov.tmp"), b"x").expect("write");
    std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
    std::fs::write(dir.path().join("empty.mp4"), b"").expect("write");
    std::fs::create_dir(dir.path().join(".cache")).expect("mkdir");
    std::fs::write(dir.path().join(".cache/inside-hidden-dir.mp4"), b"x").expect("write");
    std::fs::create_dir(dir.path().join("folder.mp4")).expect("mkdir");
    // One real file, so the test proves the watcher was working.
    std::fs::write(dir.path().join("real.MP4"), b"video").expect("write");

    let got = drain(&mut rx, Duration::from_secs(3)).await;
    let names: Vec<_> = got.iter().map(|f| f.path.file_name().expect("name").to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["real.MP4".to_owned()]);
}

#[tokio::test]
async fn file_in_new_subdirectory_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_handle, mut rx) = start(dir.path());
    settle_start().await;

    let sub = dir.path().join("2026-11-22/unit-b");
    std::fs::create_dir_all(&sub).expect("mkdir");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let file = sub.join("B012.mts");
    std::fs::write(&file, vec![7u8; 1000]).expect("write");

    let got = next(&mut rx, Duration::from_secs(4)).await.expect("found in subdir");
    assert_eq!(got.path, canon(&file));
}

#[tokio::test]
async fn file_renamed_into_folder_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let (_handle, mut rx) = start(dir.path());
    settle_start().await;

    // Like `mv` from elsewhere on the same file system.
    let staged = outside.path().join("delivery.mp4");
    std::fs::write(&staged, vec![3u8; 2048]).expect("write");
    let target = dir.path().join("delivery.mp4");
    std::fs::rename(&staged, &target).expect("rename in");

    // Like rsync: write a hidden temp file in the folder, then rename it into place.
    let temp = dir.path().join(".reel2.mov.Xa8Ke2");
    std::fs::write(&temp, vec![4u8; 512]).expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reel = dir.path().join("reel2.mov");
    std::fs::rename(&temp, &reel).expect("rename into place");

    // A directory of media moved in as a whole.
    let batch = outside.path().join("batch");
    std::fs::create_dir(&batch).expect("mkdir");
    std::fs::write(batch.join("b1.avi"), vec![5u8; 100]).expect("write");
    std::fs::rename(&batch, dir.path().join("batch")).expect("rename dir in");

    let mut got: Vec<PathBuf> = drain(&mut rx, Duration::from_secs(4)).await.into_iter().map(|f| f.path).collect();
    got.sort();
    let mut want = vec![canon(&target), canon(&reel), canon(&dir.path().join("batch/b1.avi"))];
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn already_seen_files_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("done.mp4"), b"processed earlier").expect("write");
    std::fs::write(dir.path().join("new.mp4"), b"not yet").expect("write");

    let asked = Arc::new(Mutex::new(Vec::new()));
    let asked_in_filter = Arc::clone(&asked);
    let (tx, mut rx) = mpsc::channel(16);
    let _handle = spawn_watcher(
        config(dir.path()),
        move |f: &WatchedFile| {
            asked_in_filter.lock().expect("lock").push(f.path.clone());
            f.path.ends_with("done.mp4")
        },
        tx,
    )
    .expect("watcher starts");

    let got = drain(&mut rx, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].path.ends_with("new.mp4"));
    let asked = asked.lock().expect("lock");
    assert_eq!(asked.len(), 2, "already_seen consulted once per file: {asked:?}");
}

#[tokio::test]
async fn missing_root_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("ingest");
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn_watcher(config(&missing), |_| false, tx).expect_err("must fail");
    assert!(matches!(err, WatchError::RootMissing { ref path } if path == &missing));
    let message = err.to_string();
    assert!(message.contains(&missing.display().to_string()), "{message}");
    assert!(message.contains("create it"), "{message}");

    let file = dir.path().join("file.mp4");
    std::fs::write(&file, b"x").expect("write");
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn_watcher(config(&file), |_| false, tx).expect_err("must fail");
    assert!(matches!(err, WatchError::RootNotDirectory { .. }), "{err}");
}

#[tokio::test]
async fn watching_stops_when_handle_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (handle, mut rx) = start(dir.path());
    settle_start().await;
    drop(handle);
    std::fs::write(dir.path().join("late.mp4"), b"late").expect("write");
    // The sender lives in the aborted task, so the channel closes and nothing arrives.
    let got = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.expect("channel closes after drop");
    assert_eq!(got, None);
}

#[test]
fn spawn_outside_runtime_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn_watcher(config(dir.path()), |_| false, tx).expect_err("no runtime");
    assert!(matches!(err, WatchError::NoRuntime));
}
