//! Host and GPU health, sent by the agent on every heartbeat.

use serde::{Deserialize, Serialize};

/// A GPU as reported by NVML, sent once in `Hello`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML device index.
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA RTX A6000".
    pub name: String,
    /// NVML UUID ("GPU-…").
    pub uuid: String,
    /// Total device memory, bytes.
    pub memory_total_bytes: u64,
}

/// Where the health numbers came from.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HealthSource {
    /// NVML loaded: GPU numbers are real.
    Nvml {
        /// NVIDIA driver version.
        driver_version: String,
    },
    /// NVML did not load (no NVIDIA driver): host CPU, memory and disk only.
    CpuOnly {
        /// Why NVML is unavailable, e.g. "libnvidia-ml.so: cannot open shared object file".
        reason: String,
    },
}

/// Live numbers of one GPU.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuHealth {
    /// NVML device index.
    pub index: u32,
    /// Marketing name.
    pub name: String,
    /// GPU utilization over NVML's last sample period, percent 0..=100.
    pub utilization_percent: u32,
    /// Device memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Total device memory, bytes.
    pub memory_total_bytes: u64,
    /// Core temperature, °C.
    pub temperature_c: u32,
    /// Board power draw, watts (None when the board does not report it).
    pub power_w: Option<f32>,
}

/// Free and total space of one volume.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskHealth {
    /// The volume root as configured on the agent.
    pub path: String,
    /// Space available to the agent, bytes.
    pub available_bytes: u64,
    /// Size of the file system, bytes.
    pub total_bytes: u64,
}

/// One health report.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Agent wall clock when sampled, Unix milliseconds (the control plane also records its own
    /// receive time; this one shows clock skew).
    pub sampled_at_unix_ms: u64,
    /// NVML or CPU-only, and why.
    pub source: HealthSource,
    /// Host CPU utilization since the previous sample, percent 0..=100 across all cores.
    pub cpu_percent: f32,
    /// One-minute load average.
    pub load_avg_1m: f64,
    /// Host memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Host memory total, bytes.
    pub memory_total_bytes: u64,
    /// Per-volume disk space.
    pub disks: Vec<DiskHealth>,
    /// Per-GPU numbers; empty for [`HealthSource::CpuOnly`].
    pub gpus: Vec<GpuHealth>,
    /// Which ONNX Runtime execution provider inference uses, and why (None when no runtime is
    /// installed).
    pub inference: Option<InferenceProvider>,
    /// Jobs running now.
    pub jobs_running: u32,
    /// Configured concurrent job slots.
    pub job_slots: u32,
    /// Jobs accepted and waiting for a slot.
    pub jobs_queued: u32,
    /// Messages in the agent's outbox not yet acknowledged.
    pub outbox_pending: u64,
    /// The outbox is at its bound: the agent takes no new jobs until it drains.
    pub outbox_full: bool,
}

/// Critical XID errors one GPU reported (NVML's critical-XID event set), counted by the agent since
/// it started; the control plane renders it as `gaffer_gpu_xid_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuXidCount {
    /// NVML device index.
    pub index: u32,
    /// Critical XID events since the agent started.
    pub errors: u64,
    /// The XID code of the latest one (e.g. 79: "GPU has fallen off the bus"), None before any.
    pub last_xid: Option<u64>,
}

/// The ONNX Runtime execution provider in use.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceProvider {
    /// `"cuda"` or `"cpu"`.
    pub provider: String,
    /// ONNX Runtime version, e.g. `"1.31.1"`.
    pub runtime_version: String,
    /// Why this provider, e.g. "NVML absent: CPU provider" or "CUDA provider registered on GPU 0".
    pub note: String,
}
