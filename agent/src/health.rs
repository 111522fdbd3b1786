//! Host and GPU health sampling for heartbeats and the `Hello` inventory.
//!
//! [`HealthSampler`] fills [`gaffer_protocol::health::Health`]:
//!
//! * **GPUs** come from NVML (`nvml_wrapper`). When NVML cannot be loaded (no NVIDIA driver, no
//!   `libnvidia-ml.so`, no permission) the sampler degrades to CPU-only and keeps NVML's error text
//!   as [`HealthSource::CpuOnly`]'s `reason`; it never fails.
//! * **CPU, memory, load** come from `sysinfo`, refreshing only global CPU usage and RAM (never the
//!   process table), so a sample costs a few `/proc` reads.
//! * **Disks**: for each configured volume, the `sysinfo` disk whose mount point is the longest
//!   prefix of the (canonicalized) volume path, confirmed by comparing device ids (`st_dev`) so a
//!   volume on a file system `sysinfo` does not list (tmpfs, NFS, CIFS, autofs by default) is left
//!   out instead of being reported with the numbers of the file system underneath it. Only the
//!   matched disks are `statvfs`ed.
//!
//! Sampling blocks (NVML calls, `statvfs`, and up to
//! [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] on a call that follows the previous one too closely),
//! so async callers should run [`HealthSampler::sample`] inside `tokio::task::spawn_blocking`.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gaffer_protocol::health::{DiskHealth, GpuHealth, GpuInfo, Health, HealthSource, InferenceProvider};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};
use tracing::{debug, info, warn};

/// Extra wait on top of [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`]: `sysinfo` only re-reads
/// `/proc/stat` when strictly more than the minimum interval has passed.
const CPU_REFRESH_MARGIN: Duration = Duration::from_millis(10);

/// Samples host CPU/memory/disk and (when NVML loads) per-GPU health.
///
/// Create one per agent with [`HealthSampler::new`] and keep it: CPU utilization is computed
/// between consecutive [`HealthSampler::sample`] calls.
pub struct HealthSampler {
    system: System,
    disks: Disks,
    volumes: Vec<PathBuf>,
    nvml: Option<Nvml>,
    source: HealthSource,
    gpus: Vec<GpuInfo>,
    /// When `system`'s CPU counters were last read (by `new` or `sample`).
    cpu_refreshed_at: Instant,
    /// Volumes already warned about as unreportable (so the warning is logged once, not per
    /// heartbeat); cleared for a volume when it becomes reportable again.
    volumes_warned: HashSet<PathBuf>,
    /// The ONNX Runtime execution provider in use, reported with every sample.
    inference: Option<InferenceProvider>,
}

impl std::fmt::Debug for HealthSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthSampler")
            .field("volumes", &self.volumes)
            .field("source", &self.source)
            .field("gpus", &self.gpus)
            .finish_non_exhaustive()
    }
}

impl HealthSampler {
    /// Creates a sampler for `volumes` (directories whose file systems' free/total space is
    /// reported, in this order, as [`Health::disks`]; [`DiskHealth::path`] is the path as given).
    ///
    /// Tries to load NVML (`Nvml::init()`). Without a GPU or driver it degrades to CPU-only and
    /// keeps NVML's error text as the reason for [`HealthSource::CpuOnly`]. Logs once which source
    /// is used (INFO for NVML, WARN for CPU-only). Takes the GPU inventory once (see
    /// [`HealthSampler::gpus`]) and primes the CPU counters so the first
    /// [`HealthSampler::sample`] reports utilization since this call. Never fails.
    pub fn new(volumes: Vec<PathBuf>) -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let cpu_refreshed_at = Instant::now();
        // Mount list only; storage numbers are read per matched volume in `sample`.
        let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing());

        let (nvml, source, gpus) = match Nvml::init() {
            Ok(nvml) => {
                let driver_version = nvml.sys_driver_version().unwrap_or_else(|e| {
                    debug!(error = %e, "NVML loaded but the driver version is unavailable");
                    "unknown".to_owned()
                });
                let gpus = gpu_inventory(&nvml);
                info!(
                    driver_version = %driver_version,
                    gpu_count = gpus.len(),
                    "health source: NVML"
                );
                (Some(nvml), HealthSource::Nvml { driver_version }, gpus)
            }
            Err(e) => {
                let reason = e.to_string();
                warn!(reason = %reason, "health source: CPU only (NVML unavailable)");
                (None, HealthSource::CpuOnly { reason }, Vec::new())
            }
        };

        Self {
            system,
            disks,
            volumes,
            nvml,
            source,
            gpus,
            cpu_refreshed_at,
            volumes_warned: HashSet::new(),
            inference: None,
        }
    }

    /// The GPU inventory taken at [`HealthSampler::new`], for `Hello`'s capabilities, in NVML
    /// index order. Empty without NVML; a device whose name, UUID or memory could not be read is
    /// left out (logged at DEBUG).
    pub fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }

    /// Sets the ONNX Runtime execution provider reported from now on (None: no runtime).
    pub fn set_inference(&mut self, inference: Option<InferenceProvider>) {
        self.inference = inference;
    }

    /// Where the numbers come from: [`HealthSource::Nvml`] with the driver version, or
    /// [`HealthSource::CpuOnly`] with NVML's load error.
    pub fn source(&self) -> HealthSource {
        self.source.clone()
    }

    /// Samples now.
    ///
    /// * `cpu_percent`: host utilization across all cores since the previous `sample` (or since
    ///   [`HealthSampler::new`] for the first call), 0..=100. If less than
    ///   [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] (200 ms on Linux) has passed, this call first
    ///   sleeps the remainder so the figure is always a real measurement.
    /// * memory: RAM in use (total − available) and total, bytes.
    /// * `disks`: one entry per volume whose file system is found (see the module docs); a
    ///   volume that is missing or on an unlisted file system is left out, with one WARN.
    /// * `gpus`: one entry per inventory GPU when NVML is loaded; a device whose utilization,
    ///   memory or temperature query fails is left out of this sample (DEBUG log); power is
    ///   `None` when the board does not report it.
    ///
    /// `jobs_running` and `job_slots` are copied into the report.
    pub fn sample(&mut self, jobs_running: u32, job_slots: u32) -> Health {
        let min_interval = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL + CPU_REFRESH_MARGIN;
        let since = self.cpu_refreshed_at.elapsed();
        if since < min_interval {
            std::thread::sleep(min_interval - since);
        }
        self.system.refresh_cpu_usage();
        self.cpu_refreshed_at = Instant::now();
        self.system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());

        let cpu_percent = self.system.global_cpu_usage();
        let cpu_percent = if cpu_percent.is_finite() { cpu_percent.clamp(0.0, 100.0) } else { 0.0 };

        let disks = self.sample_disks();
        let gpus = match &self.nvml {
            Some(nvml) => sample_gpus(nvml, &self.gpus),
            None => Vec::new(),
        };

        Health {
            sampled_at_unix_ms: unix_now_ms(),
            source: self.source.clone(),
            cpu_percent,
            load_avg_1m: System::load_average().one,
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disks,
            gpus,
            inference: self.inference.clone(),
            jobs_running,
            job_slots,
            jobs_queued: 0,
            outbox_pending: 0,
            outbox_full: false,
        }
    }

    fn sample_disks(&mut self) -> Vec<DiskHealth> {
        if self.volumes.is_empty() {
            return Vec::new();
        }
        // Re-read the mount table (cheap: /proc/mounts) so volumes mounted after start are found;
        // no statvfs here.
        self.disks.refresh_specifics(true, DiskRefreshKind::nothing());

        let mut out = Vec::with_capacity(self.volumes.len());
        for volume in &self.volumes {
            match disk_for_volume(&self.disks, volume) {
                Ok(index) => {
                    let disk = &mut self.disks.list_mut()[index];
                    disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                    if disk.total_space() == 0 {
                        if self.volumes_warned.insert(volume.clone()) {
                            warn!(
                                volume = %volume.display(),
                                mount_point = %disk.mount_point().display(),
                                "cannot read free space of the volume's file system (statvfs failed); leaving it out of health"
                            );
                        }
                        continue;
                    }
                    self.volumes_warned.remove(volume);
                    out.push(DiskHealth {
                        path: volume.display().to_string(),
                        available_bytes: disk.available_space(),
                        total_bytes: disk.total_space(),
                    });
                }
                Err(why) => {
                    if self.volumes_warned.insert(volume.clone()) {
                        warn!(volume = %volume.display(), reason = %why, "leaving volume out of health");
                    }
                }
            }
        }
        out
    }
}

/// Index in `disks` of the file system holding `volume`: the longest mount point that is a
/// path prefix of the canonical volume path (the last one listed wins among equal mount points,
/// as later mounts shadow earlier ones) and that has the same device id as the volume.
fn disk_for_volume(disks: &Disks, volume: &Path) -> Result<usize, String> {
    let canonical = std::fs::canonicalize(volume).map_err(|e| format!("cannot resolve the volume path: {e}"))?;
    let volume_dev = std::fs::metadata(&canonical).map_err(|e| format!("cannot stat the volume: {e}"))?.dev();

    let mut best: Option<(usize, usize)> = None; // (index, mount point component count)
    for (index, disk) in disks.list().iter().enumerate() {
        let mount_point = disk.mount_point();
        if !canonical.starts_with(mount_point) {
            continue;
        }
        let depth = mount_point.components().count();
        if best.is_none_or(|(_, best_depth)| depth >= best_depth) {
            best = Some((index, depth));
        }
    }
    let (index, _) = best.ok_or_else(|| "no listed file system contains it".to_owned())?;
    let mount_point = disks.list()[index].mount_point();
    let mount_dev = std::fs::metadata(mount_point)
        .map_err(|e| format!("cannot stat mount point {}: {e}", mount_point.display()))?
        .dev();
    if mount_dev != volume_dev {
        return Err(format!(
            "it is on a file system sysinfo does not list (tmpfs, NFS, CIFS and autofs are skipped by default); nearest listed mount point is {}",
            mount_point.display()
        ));
    }
    Ok(index)
}

/// Static inventory of all NVML devices; devices that fail a query are left out.
fn gpu_inventory(nvml: &Nvml) -> Vec<GpuInfo> {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "NVML loaded but cannot count devices; reporting no GPUs");
            return Vec::new();
        }
    };
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let info = nvml.device_by_index(index).and_then(|device| {
            Ok(GpuInfo {
                index,
                name: device.name()?,
                uuid: device.uuid()?,
                memory_total_bytes: device.memory_info()?.total,
            })
        });
        match info {
            Ok(info) => gpus.push(info),
            Err(e) => debug!(index, error = %e, "skipping GPU in inventory: NVML query failed"),
        }
    }
    gpus
}

/// Live numbers of every inventory GPU; a device whose query fails is skipped for this sample.
fn sample_gpus(nvml: &Nvml, inventory: &[GpuInfo]) -> Vec<GpuHealth> {
    let mut out = Vec::with_capacity(inventory.len());
    for gpu in inventory {
        let health = nvml.device_by_index(gpu.index).and_then(|device| {
            let utilization = device.utilization_rates()?;
            let memory = device.memory_info()?;
            let temperature_c = device.temperature(TemperatureSensor::Gpu)?;
            let power_w = match device.power_usage() {
                Ok(milliwatts) => Some(milliwatts as f32 / 1000.0),
                Err(e) => {
                    debug!(index = gpu.index, error = %e, "GPU power draw unavailable");
                    None
                }
            };
            Ok(GpuHealth {
                index: gpu.index,
                name: gpu.name.clone(),
                utilization_percent: utilization.gpu.min(100),
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
                temperature_c,
                power_w,
            })
        });
        match health {
            Ok(h) => out.push(h),
            Err(e) => {
                debug!(index = gpu.index, error = %e, "skipping GPU in sample: NVML query failed")
            }
        }
    }
    out
}

fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}
