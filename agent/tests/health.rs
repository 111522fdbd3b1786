//! Health sampling against the real host: /proc, statvfs (via df), NVML presence.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gaffer_agent::health::HealthSampler;
use gaffer_protocol::health::HealthSource;

/// MemTotal from /proc/meminfo, bytes.
fn proc_mem_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:")).expect("MemTotal line");
    let kib: u64 = line.split_whitespace().nth(1).expect("MemTotal value").parse().expect("MemTotal number");
    kib * 1024
}

/// (total, available) bytes of the file system holding `path`, from coreutils `df`.
fn df_bytes(path: &Path) -> (u64, u64) {
    let out = Command::new("df").args(["-B1", "--output=size,avail"]).arg(path).output().expect("run df");
    assert!(out.status.success(), "df failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("df output is UTF-8");
    let mut numbers =
        text.lines().nth(1).expect("df data line").split_whitespace().map(|n| n.parse::<u64>().expect("df number"));
    (numbers.next().expect("size"), numbers.next().expect("avail"))
}

fn within_percent(a: u64, b: u64, percent: f64) -> bool {
    let (a, b) = (a as f64, b as f64);
    (a - b).abs() <= b * percent / 100.0
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

fn busy_for(d: Duration) -> u64 {
    let start = Instant::now();
    let mut x: u64 = 1;
    while start.elapsed() < d {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
    }
    x
}

#[test]
fn host_health_is_real() {
    let volume = tempfile::tempdir().expect("tempdir");
    let missing = volume.path().join("not-mounted-here");
    let mut sampler = HealthSampler::new(vec![volume.path().to_path_buf(), missing.clone()]);

    // GPU source: this test knows which path it must see from the presence of the NVIDIA driver.
    let nvidia_driver = Path::new("/proc/driver/nvidia/version").exists();
    match sampler.source() {
        HealthSource::CpuOnly { reason } => {
            assert!(!nvidia_driver, "NVIDIA driver present but NVML did not load: {reason}");
            assert!(!reason.trim().is_empty(), "CPU-only reason must say why");
            eprintln!("CPU-only: {reason}");
            assert!(sampler.gpus().is_empty());
        }
        HealthSource::Nvml { driver_version } => {
            assert!(!driver_version.is_empty());
            assert!(!sampler.gpus().is_empty(), "NVML loaded but no GPU inventory");
        }
    }

    // First call right after new(): must still give a measured CPU figure, quickly.
    let started = Instant::now();
    let first = sampler.sample(1, 4);
    assert!(started.elapsed() < Duration::from_secs(1), "first sample took {:?}", started.elapsed());
    assert!((0.0..=100.0).contains(&first.cpu_percent));

    // Keep every core busy so the host-wide figure cannot read as idle.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers: Vec<_> = (0..cores).map(|_| std::thread::spawn(|| busy_for(Duration::from_millis(600)))).collect();
    for w in workers {
        w.join().expect("busy worker");
    }
    let health = sampler.sample(2, 4);

    assert!(
        health.cpu_percent > 20.0 && health.cpu_percent <= 100.0,
        "cpu_percent after busy work on all {cores} cores: {}",
        health.cpu_percent
    );
    assert_eq!((health.jobs_running, health.job_slots), (2, 4));

    let now = now_unix_ms();
    assert!(
        health.sampled_at_unix_ms.abs_diff(now) <= 5_000,
        "sampled_at_unix_ms {} vs now {now}",
        health.sampled_at_unix_ms
    );

    let mem_total = proc_mem_total_bytes();
    assert!(
        within_percent(health.memory_total_bytes, mem_total, 1.0),
        "memory_total_bytes {} vs /proc/meminfo MemTotal {mem_total}",
        health.memory_total_bytes
    );
    assert!(health.memory_used_bytes > 0 && health.memory_used_bytes <= health.memory_total_bytes);
    assert!(health.load_avg_1m >= 0.0);

    // The tempdir volume is reported with df's numbers; the missing one is left out.
    assert_eq!(health.disks.len(), 1, "disks: {:?}", health.disks);
    let disk = &health.disks[0];
    assert_eq!(PathBuf::from(&disk.path), volume.path());
    assert!(disk.available_bytes > 0 && disk.available_bytes <= disk.total_bytes);
    let (df_total, df_avail) = df_bytes(volume.path());
    assert!(within_percent(disk.total_bytes, df_total, 1.0), "total_bytes {} vs df {df_total}", disk.total_bytes);
    assert!(
        within_percent(disk.available_bytes, df_avail, 5.0),
        "available_bytes {} vs df {df_avail}",
        disk.available_bytes
    );

    match health.source {
        HealthSource::CpuOnly { .. } => assert!(health.gpus.is_empty()),
        HealthSource::Nvml { .. } => {
            assert_eq!(health.gpus.len(), sampler.gpus().len());
            for g in &health.gpus {
                assert!(g.utilization_percent <= 100);
                assert!(g.memory_used_bytes <= g.memory_total_bytes);
            }
        }
    }
}

#[test]
fn sampling_is_cheap() {
    let volume = tempfile::tempdir().expect("tempdir");
    let mut sampler = HealthSampler::new(vec![volume.path().to_path_buf()]);
    let _ = sampler.sample(0, 1);
    std::thread::sleep(Duration::from_millis(250));
    let started = Instant::now();
    let health = sampler.sample(0, 1);
    let elapsed = started.elapsed();
    assert_eq!(health.disks.len(), 1);
    // No sleep was needed (250 ms passed) so this is pure /proc + statvfs work.
    assert!(elapsed < Duration::from_millis(100), "sample took {elapsed:?}");
    eprintln!("sample() took {elapsed:?}");
}
