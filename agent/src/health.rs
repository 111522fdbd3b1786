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
//! * **Critical XID errors** ([`HealthSampler::watch_xid_errors`]): a thread registers NVML's
//!   critical-XID event set on every GPU that supports it and counts the events per GPU
//!   ([`XidTally`]); the link reads the counts through [`XidCounts`] and sends them when they change.
//!   Without NVML there is no thread and no counts.
//!
//! Sampling blocks (NVML calls, `statvfs`, and up to
//! [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] on a call that follows the previous one too closely),
//! so async callers should run [`HealthSampler::sample`] inside `tokio::task::spawn_blocking`.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gaffer_protocol::health::{DiskHealth, GpuHealth, GpuInfo, GpuXidCount, Health, HealthSource, InferenceProvider};
use gaffer_protocol::messages::AgentId;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};
use tracing::{debug, info, warn};

/// Extra wait on top of [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`]: `sysinfo` only re-reads
/// `/proc/stat` when strictly more than the minimum interval has passed.
const CPU_REFRESH_MARGIN: Duration = Duration::from_millis(10);

/// How long the XID watcher waits on NVML's event set per call, milliseconds: the most it takes to
/// notice that its [`HealthSampler`] is gone, and its pause after a failed wait.
pub const XID_WAIT_MS: u32 = 1000;
/// How long [`HealthSampler::watch_xid_errors`] waits for the watcher to register its GPUs.
const XID_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// XID errors logged at WARN per GPU one by one; past it only the 16th, 32nd, 64th, … are (see
/// [`xid_worth_logging`]).
pub const XID_LOGGED_EACH_MAX: u64 = 10;
/// The XID code NVML reports when it cannot tell which XID it was (`XidError::Unknown`).
pub const XID_UNKNOWN: u64 = 999;

/// Critical XID errors counted per GPU since the agent started: the pure part of the XID watcher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XidTally {
    gpus: BTreeMap<u32, GpuXidCount>,
}

impl XidTally {
    /// A tally of the GPUs with NVML indices `indices`, every count 0.
    pub fn new(indices: impl IntoIterator<Item = u32>) -> Self {
        let mut tally = Self::default();
        tally.watch(indices);
        tally
    }

    /// Adds the GPUs `indices` with count 0 (a GPU already counted keeps its count).
    pub fn watch(&mut self, indices: impl IntoIterator<Item = u32>) {
        for index in indices {
            self.gpus.entry(index).or_insert(GpuXidCount { index, errors: 0, last_xid: None });
        }
    }

    /// Counts one critical XID error with code `xid` on GPU `index` (a GPU not watched yet is added)
    /// and returns that GPU's count now (saturating at `u64::MAX`).
    pub fn record(&mut self, index: u32, xid: u64) -> u64 {
        let gpu = self.gpus.entry(index).or_insert(GpuXidCount { index, errors: 0, last_xid: None });
        gpu.errors = gpu.errors.saturating_add(1);
        gpu.last_xid = Some(xid);
        gpu.errors
    }

    /// The counts, one entry per GPU in index order, zero counts included.
    pub fn counts(&self) -> Vec<GpuXidCount> {
        self.gpus.values().cloned().collect()
    }
}

/// Whether a GPU's `errors`-th XID error is logged at WARN: each of the first
/// [`XID_LOGGED_EACH_MAX`], then powers of two only, so a storm of XIDs (an application faulting in a
/// loop) cannot flood the log while its growth stays visible.
pub fn xid_worth_logging(errors: u64) -> bool {
    errors <= XID_LOGGED_EACH_MAX || errors.is_power_of_two()
}

/// The XID counts of one agent, shared between the NVML watcher thread (which records) and the link
/// (which reads). Cheap to clone; empty until [`HealthSampler::watch_xid_errors`] registered GPUs.
#[derive(Debug, Clone, Default)]
pub struct XidCounts(Arc<Mutex<XidTally>>);

impl XidCounts {
    /// The counts now: one entry per watched GPU in NVML index order, zero counts included; empty
    /// without NVML or when no GPU reports XID events.
    pub fn counts(&self) -> Vec<GpuXidCount> {
        self.lock().counts()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, XidTally> {
        // Every update is one map entry: a poisoned lock leaves a usable tally.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stops the XID watcher thread (within [`XID_WAIT_MS`]) when the sampler is dropped.
struct XidWatch {
    stop: Arc<AtomicBool>,
}

impl Drop for XidWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Samples host CPU/memory/disk and (when NVML loads) per-GPU health.
///
/// Create one per agent with [`HealthSampler::new`] and keep it: CPU utilization is computed
/// between consecutive [`HealthSampler::sample`] calls.
pub struct HealthSampler {
    system: System,
    disks: Disks,
    volumes: Vec<PathBuf>,
    nvml: Option<Arc<Nvml>>,
    source: HealthSource,
    gpus: Vec<GpuInfo>,
    /// Critical XID errors per GPU, counted by the watcher thread once it runs.
    xid: XidCounts,
    /// The watcher thread, once [`HealthSampler::watch_xid_errors`] started it.
    xid_watch: Option<XidWatch>,
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
                (Some(Arc::new(nvml)), HealthSource::Nvml { driver_version }, gpus)
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
            xid: XidCounts::default(),
            xid_watch: None,
            cpu_refreshed_at,
            volumes_warned: HashSet::new(),
            inference: None,
        }
    }

    /// Starts counting critical XID errors of agent `agent_id` (once; later calls only return the
    /// handle): when NVML is loaded, a thread registers `EventTypes::CRITICAL_XID_ERROR` on every
    /// inventory GPU and waits on the event set ([`XID_WAIT_MS`] at a time, so it ends within that
    /// once this sampler is dropped), counting each event for its GPU and logging it at WARN with
    /// `agent_id`, the GPU index and the XID code (thinned out past [`XID_LOGGED_EACH_MAX`] per GPU,
    /// see [`xid_worth_logging`]). A GPU that does not report XID events (`NotSupported`, a vGPU) is
    /// logged once at INFO and left out of the counts. Blocks until the GPUs are registered (at most
    /// 10 s). Without NVML nothing starts and the counts stay empty. Never fails.
    pub fn watch_xid_errors(&mut self, agent_id: AgentId) -> XidCounts {
        if self.xid_watch.is_some() {
            return self.xid.clone();
        }
        let Some(nvml) = self.nvml.clone() else {
            return self.xid.clone();
        };
        if self.gpus.is_empty() {
            return self.xid.clone();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<usize>();
        let (counts, inventory, thread_stop) = (self.xid.clone(), self.gpus.clone(), stop.clone());
        let span = tracing::info_span!("xid_watch", agent_id = %agent_id);
        let spawned = std::thread::Builder::new().name("gaffer-xid".into()).spawn(move || {
            span.in_scope(|| watch_xid(&nvml, &inventory, &counts, &thread_stop, &ready_tx));
        });
        match spawned {
            Ok(_detached) => {
                self.xid_watch = Some(XidWatch { stop });
                match ready_rx.recv_timeout(XID_REGISTER_TIMEOUT) {
                    Ok(watched) => {
                        info!(agent_id = %agent_id, gpus_watched = watched, "counting critical GPU XID errors")
                    }
                    Err(_) => {
                        warn!(agent_id = %agent_id, "NVML did not register the XID events in time; counting from when it does")
                    }
                }
            }
            Err(e) => {
                warn!(agent_id = %agent_id, error = %e, "cannot start the XID watcher thread; GPU XID errors are not counted")
            }
        }
        self.xid.clone()
    }

    /// Critical XID errors per watched GPU since [`HealthSampler::watch_xid_errors`] (one entry per
    /// GPU that reports XID events, in NVML index order, zero counts included); empty without NVML or
    /// before the watcher started.
    pub fn xid_counts(&self) -> Vec<GpuXidCount> {
        self.xid.counts()
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

/// The XID watcher thread: registers the GPUs, says how many on `ready`, then waits on the event set
/// until `stop`.
fn watch_xid(
    nvml: &Nvml,
    inventory: &[GpuInfo],
    counts: &XidCounts,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<usize>,
) {
    let mut watched: Vec<u32> =
        inventory.iter().filter(|g| reports_xid_events(nvml, g.index)).map(|g| g.index).collect();
    let set = if watched.is_empty() { None } else { xid_event_set(nvml, &mut watched) };
    counts.lock().watch(watched.iter().copied());
    let _ = ready.send(watched.len());
    let Some(set) = set.filter(|_| !watched.is_empty()) else { return };
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        match set.wait(XID_WAIT_MS) {
            Ok(event) => {
                failing = false;
                let xid = match event.event_data {
                    Some(XidError::Value(code)) => code,
                    Some(XidError::Unknown) => XID_UNKNOWN,
                    None => continue,
                };
                let uuid = event.device.uuid().ok();
                // A GPU that fell off the bus may answer neither; with one GPU watched it is that one.
                let index = event
                    .device
                    .index()
                    .ok()
                    .or_else(|| {
                        let uuid = uuid.as_deref()?;
                        inventory.iter().find(|g| g.uuid == uuid).map(|g| g.index)
                    })
                    .or_else(|| (watched.len() == 1).then(|| watched[0]));
                match index {
                    Some(index) => {
                        let errors = counts.lock().record(index, xid);
                        if xid_worth_logging(errors) {
                            warn!(
                                gpu = index,
                                xid,
                                errors,
                                gpu_uuid = uuid.as_deref().unwrap_or(""),
                                "GPU reported a critical XID error"
                            );
                        }
                    }
                    None => warn!(xid, "a GPU NVML cannot name reported a critical XID error; not counted"),
                }
            }
            Err(NvmlError::Timeout) => failing = false,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "waiting for GPU XID events failed; trying again every second");
                }
                failing = true;
                std::thread::sleep(Duration::from_millis(u64::from(XID_WAIT_MS)));
            }
        }
    }
}

/// Whether GPU `index` can report critical XID events; logs once at INFO why not.
fn reports_xid_events(nvml: &Nvml, index: u32) -> bool {
    match nvml.device_by_index(index).and_then(|d| d.supported_event_types()) {
        Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => true,
        Ok(_) | Err(NvmlError::NotSupported) => {
            info!(gpu = index, "GPU does not report XID events (NVML: not supported); its XID errors are not counted");
            false
        }
        Err(e) => {
            info!(gpu = index, error = %e, "cannot ask NVML which events the GPU reports; its XID errors are not counted");
            false
        }
    }
}

/// One event set with `CRITICAL_XID_ERROR` registered on every GPU of `indices`; a GPU whose
/// registration fails is logged at INFO and removed from `indices` (nvml-wrapper frees the set on
/// any registration error, so the set is built afresh without it). None when NVML cannot create a
/// set (logged at WARN).
fn xid_event_set<'n>(nvml: &'n Nvml, indices: &mut Vec<u32>) -> Option<EventSet<'n>> {
    'fresh: loop {
        let mut set = match nvml.create_event_set() {
            Ok(set) => set,
            Err(e) => {
                warn!(error = %e, "NVML cannot create an event set; GPU XID errors are not counted");
                indices.clear();
                return None;
            }
        };
        for pos in 0..indices.len() {
            let index = indices[pos];
            let registered = match nvml.device_by_index(index) {
                Ok(device) => device.register_events(EventTypes::CRITICAL_XID_ERROR, set).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match registered {
                Ok(s) => set = s,
                Err(e) => {
                    info!(gpu = index, error = %e, "cannot register the GPU's XID events; its XID errors are not counted");
                    indices.remove(pos);
                    continue 'fresh;
                }
            }
        }
        return Some(set);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xid_tally_counts_per_gpu_keeps_the_last_code_and_lists_idle_gpus_at_zero() {
        let mut tally = XidTally::new([1, 0]);
        assert_eq!(
            tally.counts(),
            [GpuXidCount { index: 0, errors: 0, last_xid: None }, GpuXidCount { index: 1, errors: 0, last_xid: None }]
        );
        assert_eq!(tally.record(1, 13), 1);
        assert_eq!(tally.record(1, 79), 2);
        // An event of a GPU that was not in the inventory still counts.
        assert_eq!(tally.record(3, 48), 1);
        tally.watch([0, 1]);
        assert_eq!(
            tally.counts(),
            [
                GpuXidCount { index: 0, errors: 0, last_xid: None },
                GpuXidCount { index: 1, errors: 2, last_xid: Some(79) },
                GpuXidCount { index: 3, errors: 1, last_xid: Some(48) },
            ],
            "index order; watching again keeps the counts"
        );
        if let Some(g) = tally.gpus.get_mut(&0) {
            g.errors = u64::MAX - 1;
        }
        assert_eq!(tally.record(0, 31), u64::MAX);
        assert_eq!(tally.record(0, 31), u64::MAX, "saturates");
    }

    #[test]
    fn an_xid_storm_is_logged_sparsely() {
        let logged: Vec<u64> = (1..=1000).filter(|&n| xid_worth_logging(n)).collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 128, 256, 512]);
    }

    /// Without NVML (this build machine): no thread, no counts. With NVML (a GPU box): the watcher
    /// runs and lists inventory GPUs only, all at zero (no XID happened in the test).
    #[test]
    fn the_xid_watcher_runs_only_with_nvml_and_starts_at_zero() {
        let mut sampler = HealthSampler::new(Vec::new());
        let counts = sampler.watch_xid_errors(AgentId::from_u128(1));
        if sampler.nvml.is_none() || sampler.gpus.is_empty() {
            assert!(sampler.xid_watch.is_none());
            assert!(counts.counts().is_empty());
        } else {
            assert!(sampler.xid_watch.is_some());
            let inventory: Vec<u32> = sampler.gpus.iter().map(|g| g.index).collect();
            for c in counts.counts() {
                assert!(inventory.contains(&c.index), "{c:?} not in {inventory:?}");
                assert_eq!((c.errors, c.last_xid), (0, None));
            }
            eprintln!("watching {} of {} GPUs for XID errors", counts.counts().len(), inventory.len());
        }
        assert_eq!(sampler.xid_counts(), counts.counts());
        assert!(
            sampler.watch_xid_errors(AgentId::from_u128(1)).counts() == counts.counts(),
            "a second call only returns the handle"
        );
    }
}
