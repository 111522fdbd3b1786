//! Per-agent and per-GPU series on `/metrics`, named after dcgm-exporter's fields
//! (`DCGM_FI_DEV_GPU_UTIL` → `gaffer_gpu_utilization_ratio`, `DCGM_FI_DEV_FB_USED` →
//! `gaffer_gpu_memory_used_bytes`, `DCGM_FI_DEV_GPU_TEMP` → `gaffer_gpu_temperature_celsius`,
//! `DCGM_FI_DEV_POWER_USAGE` → `gaffer_gpu_power_watts`, `DCGM_FI_DEV_XID_ERRORS` →
//! `gaffer_gpu_xid_errors_total`).
//!
//! Every scrape renders them from [`AgentBook`], an in-memory view of the agents (their name, site,
//! GPUs and last heartbeat), and from the fleet's live links — never from a store scan — so the
//! series of an agent that is revoked disappear at the next scrape, and an agent shows
//! `gaffer_agent_connected 0` while its link is down. The book is filled from the store once at
//! start ([`AgentBook::seed`]), then by each Hello ([`AgentBook::agent_seen`]) and heartbeat
//! ([`AgentBook::health`]).
//!
//! | metric | type | labels (besides `agent_id`, `agent_name`, `site`) |
//! |---|---|---|
//! | `gaffer_agent_connected` | gauge 0/1 | – |
//! | `gaffer_agent_last_heartbeat_timestamp_seconds` | gauge | – (absent before the first heartbeat) |
//! | `gaffer_agent_health_source` | gauge, always 1 (info style) | `source` = `nvml` \| `cpu` |
//! | `gaffer_agent_cpu_utilization_ratio` | gauge 0..1 | – |
//! | `gaffer_agent_memory_used_bytes`, `gaffer_agent_memory_total_bytes` | gauge | – |
//! | `gaffer_agent_disk_available_bytes`, `gaffer_agent_disk_total_bytes` | gauge | `path` (volume root) |
//! | `gaffer_agent_outbox_pending_messages` | gauge | – |
//! | `gaffer_agent_jobs_running`, `gaffer_agent_job_slots` | gauge | – |
//! | `gaffer_gpu_utilization_ratio` | gauge 0..1 | `gpu` (NVML index), `gpu_name`, `gpu_uuid` |
//! | `gaffer_gpu_memory_used_bytes`, `gaffer_gpu_memory_total_bytes` | gauge | same |
//! | `gaffer_gpu_temperature_celsius` | gauge | same |
//! | `gaffer_gpu_power_watts` | gauge | same (absent when the board reports no power) |
//! | `gaffer_gpu_xid_errors_total` | counter | same; critical XID errors since the agent started (protocol 6 agents, GPUs that report XID events; from `AgentMessage::GpuXidErrors`) |
//!
//! The health numbers are those of the agent's last heartbeat; an agent that has not sent one
//! since this control plane started has only `connected` (and `last_heartbeat` from the store).
//!
//! **Cardinality.** Series per agent: at most 9 + 2 × disks + 6 × GPUs, with disks and GPUs each
//! cut to [`crate::ingest::HEALTH_LIST_MAX`] per report, and one set per enrolled, unrevoked agent
//! (the fleet bounds the agents). Label values are the agent's current ones only (an agent that
//! changes its hostname replaces its series), each cut to [`crate::ingest::HEALTH_STRING_BYTES_MAX`]
//! bytes; hostnames, GPU names and volume paths come from the agents, and only as label values.
//! With 10,000 agents of 2 GPUs and 2 volumes a scrape is about 250,000 samples (the
//! `a_scrape_of_10000_agents` test prints how long it takes to render).
//!
//! **Replicas.** Each replica renders the agents it knows: all of them from its start, with
//! `connected` 1 only for the links it holds itself, and health only from the heartbeats it
//! receives; aggregate with `max by (agent_id)` (the shipped rules and dashboard do).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use gaffer_protocol::health::{GpuInfo, GpuXidCount, Health, HealthSource};
use gaffer_protocol::messages::AgentId;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;

use crate::identity::Revocations;
use crate::ingest::{truncate, HEALTH_LIST_MAX, HEALTH_STRING_BYTES_MAX};
use crate::scheduler::Fleet;
use crate::store::{AgentRecord, HealthSample, Store, StoreError, UnixMs};

/// What the book keeps of one agent.
#[derive(Debug, Clone, Default)]
struct AgentView {
    name: String,
    site: String,
    /// From the Hello: the GPUs' UUIDs by NVML index.
    gpus: Vec<GpuInfo>,
    last_heartbeat_ms: Option<UnixMs>,
    health: Option<Health>,
    /// Critical XID errors per GPU index since the agent started (protocol 6).
    xid: Vec<GpuXidCount>,
}

/// The in-memory view of the agents that `/metrics` renders per agent and per GPU. One per
/// process ([`crate::metrics::Metrics::agents`]); every method takes `&self` and holds a mutex
/// for a map update only.
#[derive(Debug, Default)]
pub struct AgentBook {
    agents: Mutex<BTreeMap<AgentId, AgentView>>,
    /// The live state: which agents have a link up here, which are revoked.
    live: OnceLock<(Arc<Fleet>, Arc<Revocations>)>,
}

impl AgentBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AgentId, AgentView>> {
        // Each update replaces whole entries: a poisoned lock leaves a usable map.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renders `connected` from `fleet` and leaves out the agents `revocations` names. Set once
    /// ([`crate::AppState::new`]); later calls are ignored. Without it every agent shows
    /// `connected 0`.
    pub fn set_live(&self, fleet: Arc<Fleet>, revocations: Arc<Revocations>) {
        let _ = self.live.set((fleet, revocations));
    }

    /// Fills the book from the store's agents (once, at start: the one full read).
    ///
    /// # Errors
    /// Store errors (the book is left as it was).
    pub fn seed(&self, store: &dyn Store) -> Result<(), StoreError> {
        let agents = store.list_agents()?;
        for a in agents.iter().filter(|a| a.revoked_at_ms.is_none()) {
            self.agent_seen(a);
        }
        Ok(())
    }

    /// Records `agent`'s name, site, GPUs and last health (at enrollment, at each Hello). A
    /// revoked agent is forgotten.
    pub fn agent_seen(&self, agent: &AgentRecord) {
        if agent.revoked_at_ms.is_some() {
            self.forget(agent.id);
            return;
        }
        let mut agents = self.lock();
        let view = agents.entry(agent.id).or_default();
        view.name = truncate(&agent.hostname, HEALTH_STRING_BYTES_MAX);
        view.site = truncate(&agent.site, HEALTH_STRING_BYTES_MAX);
        if let Some(caps) = &agent.capabilities {
            view.gpus = caps.gpus.iter().take(HEALTH_LIST_MAX).cloned().collect();
        }
        if let Some(h) = &agent.last_health {
            if view.last_heartbeat_ms.is_none_or(|t| t <= h.received_at_ms) {
                view.last_heartbeat_ms = Some(h.received_at_ms);
                view.health = Some(h.health.clone());
            }
        }
    }

    /// Records a heartbeat of a known agent (an agent not in the book yet is added at its Hello).
    pub fn health(&self, agent: AgentId, sample: &HealthSample) {
        if let Some(view) = self.lock().get_mut(&agent) {
            view.last_heartbeat_ms = Some(sample.received_at_ms);
            view.health = Some(sample.health.clone());
        }
    }

    /// Records an agent's critical XID error counts per GPU (protocol 6), at most
    /// [`HEALTH_LIST_MAX`] GPUs.
    pub fn xid_errors(&self, agent: AgentId, counts: &[GpuXidCount]) {
        if let Some(view) = self.lock().get_mut(&agent) {
            view.xid = counts.iter().take(HEALTH_LIST_MAX).cloned().collect();
        }
    }

    /// Forgets `agent` (revoked or removed): its series are gone from the next scrape.
    pub fn forget(&self, agent: AgentId) {
        self.lock().remove(&agent);
    }

    /// Agents with a link up on this control plane now (the fleet's live links; 0 without
    /// [`AgentBook::set_live`]).
    pub fn links_open(&self) -> usize {
        self.live.get().map_or(0, |(fleet, _)| fleet.connected_count())
    }

    /// How many agents the book holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the book holds no agent.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the book with the connected flag of each agent, revoked agents left out (and
    /// forgotten), so the scrape encodes without holding the lock.
    fn snapshot(&self) -> Vec<(AgentId, bool, AgentView)> {
        let live = self.live.get();
        let mut agents = self.lock();
        if let Some((_, revocations)) = live {
            agents.retain(|id, _| !revocations.is_revoked(*id));
        }
        let connected: std::collections::HashSet<AgentId> =
            live.map(|(fleet, _)| fleet.connected_agents().into_iter().collect()).unwrap_or_default();
        agents.iter().map(|(id, v)| (*id, connected.contains(id), v.clone())).collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent_id: String,
    agent_name: String,
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    agent_id: String,
    agent_name: String,
    site: String,
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    agent_id: String,
    agent_name: String,
    site: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    agent_id: String,
    agent_name: String,
    site: String,
    gpu: String,
    gpu_name: String,
    gpu_uuid: String,
}

/// One metric family being rendered: its samples, encoded after the whole snapshot was visited.
struct Series<L, V> {
    name: &'static str,
    help: &'static str,
    samples: Vec<(L, V)>,
}

impl<L: EncodeLabelSet, V> Series<L, V> {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self { name, help, samples: Vec::new() }
    }
}

impl<L: EncodeLabelSet> Series<L, f64> {
    fn encode_gauges(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(self.name, self.help, None, MetricType::Gauge)?;
        for (labels, v) in &self.samples {
            family.encode_family(labels)?.encode_gauge(v)?;
        }
        Ok(())
    }
}

impl<L: EncodeLabelSet> Series<L, u64> {
    fn encode_counters(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
        for (labels, v) in &self.samples {
            family
                .encode_family(labels)?
                .encode_counter::<NoLabelSet, u64, u64>(v, None::<&Exemplar<NoLabelSet, u64>>)?;
        }
        Ok(())
    }
}

/// The [`Collector`] that renders an [`AgentBook`] at each scrape.
#[derive(Debug)]
pub(crate) struct AgentCollector(pub(crate) Arc<AgentBook>);

fn ratio_of_percent(percent: f64) -> f64 {
    (percent / 100.0).clamp(0.0, 1.0)
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.snapshot();
        let mut connected =
            Series::new("gaffer_agent_connected", "1 while the agent's link to this control plane is up, else 0");
        let mut heartbeat = Series::new(
            "gaffer_agent_last_heartbeat_timestamp_seconds",
            "When the agent's last heartbeat was received, Unix seconds",
        );
        let mut source = Series::new(
            "gaffer_agent_health_source",
            "Where the agent's health numbers come from (source: nvml, cpu), always 1",
        );
        let mut cpu = Series::new("gaffer_agent_cpu_utilization_ratio", "Host CPU utilization across all cores, 0..1");
        let mut mem_used = Series::new("gaffer_agent_memory_used_bytes", "Host memory in use, bytes");
        let mut mem_total = Series::new("gaffer_agent_memory_total_bytes", "Host memory total, bytes");
        let mut disk_avail =
            Series::new("gaffer_agent_disk_available_bytes", "Space available to the agent on a volume, bytes");
        let mut disk_total = Series::new("gaffer_agent_disk_total_bytes", "Size of a volume's file system, bytes");
        let mut outbox =
            Series::new("gaffer_agent_outbox_pending_messages", "Messages in the agent's outbox not yet acknowledged");
        let mut running = Series::new("gaffer_agent_jobs_running", "Jobs the agent is running now");
        let mut slots = Series::new("gaffer_agent_job_slots", "Jobs the agent runs at once (its slots)");
        let mut gpu_util =
            Series::new("gaffer_gpu_utilization_ratio", "GPU utilization over NVML's last sample period, 0..1");
        let mut gpu_used = Series::new("gaffer_gpu_memory_used_bytes", "GPU memory in use (frame buffer), bytes");
        let mut gpu_total = Series::new("gaffer_gpu_memory_total_bytes", "GPU memory total (frame buffer), bytes");
        let mut gpu_temp = Series::new("gaffer_gpu_temperature_celsius", "GPU core temperature, degrees Celsius");
        let mut gpu_power = Series::new("gaffer_gpu_power_watts", "GPU board power draw, watts");
        let mut gpu_xid: Series<GpuLabels, u64> = Series::new(
            "gaffer_gpu_xid_errors",
            "Critical XID errors the GPU reported since the agent started (protocol 6 agents)",
        );
        let mut id = String::new();
        for (agent_id, is_connected, view) in &snapshot {
            id.clear();
            let _ = write!(id, "{agent_id}");
            let agent = AgentLabels { agent_id: id.clone(), agent_name: view.name.clone(), site: view.site.clone() };
            connected.samples.push((agent.clone(), if *is_connected { 1.0 } else { 0.0 }));
            if let Some(ms) = view.last_heartbeat_ms {
                heartbeat.samples.push((agent.clone(), ms as f64 / 1000.0));
            }
            let gpu_labels = |index: u32, name: &str| {
                let uuid = view.gpus.iter().find(|g| g.index == index).map(|g| g.uuid.as_str()).unwrap_or_default();
                GpuLabels {
                    agent_id: agent.agent_id.clone(),
                    agent_name: agent.agent_name.clone(),
                    site: agent.site.clone(),
                    gpu: index.to_string(),
                    gpu_name: name.to_owned(),
                    gpu_uuid: truncate(uuid, HEALTH_STRING_BYTES_MAX),
                }
            };
            for x in &view.xid {
                let name = view.gpus.iter().find(|g| g.index == x.index).map(|g| g.name.as_str()).unwrap_or_default();
                gpu_xid.samples.push((gpu_labels(x.index, &truncate(name, HEALTH_STRING_BYTES_MAX)), x.errors));
            }
            let Some(h) = &view.health else { continue };
            let source_name = match h.source {
                HealthSource::Nvml { .. } => "nvml",
                HealthSource::CpuOnly { .. } => "cpu",
            };
            source.samples.push((
                SourceLabels {
                    agent_id: agent.agent_id.clone(),
                    agent_name: agent.agent_name.clone(),
                    site: agent.site.clone(),
                    source: source_name.to_owned(),
                },
                1.0,
            ));
            cpu.samples.push((agent.clone(), ratio_of_percent(f64::from(h.cpu_percent))));
            mem_used.samples.push((agent.clone(), h.memory_used_bytes as f64));
            mem_total.samples.push((agent.clone(), h.memory_total_bytes as f64));
            outbox.samples.push((agent.clone(), h.outbox_pending as f64));
            running.samples.push((agent.clone(), f64::from(h.jobs_running)));
            slots.samples.push((agent.clone(), f64::from(h.job_slots)));
            for d in &h.disks {
                let labels = DiskLabels {
                    agent_id: agent.agent_id.clone(),
                    agent_name: agent.agent_name.clone(),
                    site: agent.site.clone(),
                    path: d.path.clone(),
                };
                disk_avail.samples.push((labels.clone(), d.available_bytes as f64));
                disk_total.samples.push((labels, d.total_bytes as f64));
            }
            for g in &h.gpus {
                let labels = gpu_labels(g.index, &g.name);
                gpu_util.samples.push((labels.clone(), ratio_of_percent(f64::from(g.utilization_percent))));
                gpu_used.samples.push((labels.clone(), g.memory_used_bytes as f64));
                gpu_total.samples.push((labels.clone(), g.memory_total_bytes as f64));
                gpu_temp.samples.push((labels.clone(), f64::from(g.temperature_c)));
                if let Some(w) = g.power_w {
                    gpu_power.samples.push((labels, f64::from(w)));
                }
            }
        }
        connected.encode_gauges(&mut encoder)?;
        heartbeat.encode_gauges(&mut encoder)?;
        source.encode_gauges(&mut encoder)?;
        cpu.encode_gauges(&mut encoder)?;
        mem_used.encode_gauges(&mut encoder)?;
        mem_total.encode_gauges(&mut encoder)?;
        disk_avail.encode_gauges(&mut encoder)?;
        disk_total.encode_gauges(&mut encoder)?;
        outbox.encode_gauges(&mut encoder)?;
        running.encode_gauges(&mut encoder)?;
        slots.encode_gauges(&mut encoder)?;
        gpu_util.encode_gauges(&mut encoder)?;
        gpu_used.encode_gauges(&mut encoder)?;
        gpu_total.encode_gauges(&mut encoder)?;
        gpu_temp.encode_gauges(&mut encoder)?;
        gpu_power.encode_gauges(&mut encoder)?;
        gpu_xid.encode_counters(&mut encoder)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::sled_store::SledStore;
    use gaffer_protocol::health::{DiskHealth, GpuHealth};

    fn health(gpus: u32) -> Health {
        Health {
            sampled_at_unix_ms: 1,
            source: HealthSource::Nvml { driver_version: "550.1".into() },
            cpu_percent: 50.0,
            load_avg_1m: 1.0,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 1 << 34,
            disks: vec![DiskHealth { path: "/mnt/media".into(), available_bytes: 5, total_bytes: 10 }],
            gpus: (0..gpus)
                .map(|index| GpuHealth {
                    index,
                    name: "NVIDIA RTX A6000".into(),
                    utilization_percent: 75,
                    memory_used_bytes: 1 << 30,
                    memory_total_bytes: 48 << 30,
                    temperature_c: 70,
                    power_w: Some(250.5),
                })
                .collect(),
            inference: None,
            jobs_running: 1,
            job_slots: 2,
            jobs_queued: 0,
            outbox_pending: 3,
            outbox_full: false,
        }
    }

    fn agent(n: u32, gpus: u32) -> AgentRecord {
        let id = uuid::Uuid::from_u128(u128::from(n) + 1);
        let mut a = AgentRecord::new(id, "stage-a", format!("box-{n}"), 0);
        a.last_health = Some(HealthSample { received_at_ms: 1_700_000_000_000, health: health(gpus) });
        a
    }

    #[test]
    fn renders_per_agent_and_per_gpu_series_and_forgets_revoked_agents() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let m = Metrics::new();
        let a = agent(0, 2);
        m.agents().agent_seen(&a);
        m.agents().xid_errors(a.id, &[GpuXidCount { index: 1, errors: 4, last_xid: Some(79) }]);
        let text = m.encode(&store);
        let labels = format!("agent_id=\"{}\",agent_name=\"box-0\",site=\"stage-a\"", a.id);
        for line in [
            format!("gaffer_agent_connected{{{labels}}} 0.0"),
            format!("gaffer_agent_cpu_utilization_ratio{{{labels}}} 0.5"),
            format!("gaffer_agent_last_heartbeat_timestamp_seconds{{{labels}}} 1700000000.0"),
            format!("gaffer_agent_health_source{{{labels},source=\"nvml\"}} 1.0"),
            format!("gaffer_agent_disk_available_bytes{{{labels},path=\"/mnt/media\"}} 5.0"),
            format!("gaffer_agent_outbox_pending_messages{{{labels}}} 3.0"),
            format!(
                "gaffer_gpu_utilization_ratio{{{labels},gpu=\"1\",gpu_name=\"NVIDIA RTX A6000\",gpu_uuid=\"\"}} 0.75"
            ),
            format!("gaffer_gpu_power_watts{{{labels},gpu=\"0\",gpu_name=\"NVIDIA RTX A6000\",gpu_uuid=\"\"}} 250.5"),
            format!(
                "gaffer_gpu_temperature_celsius{{{labels},gpu=\"0\",gpu_name=\"NVIDIA RTX A6000\",gpu_uuid=\"\"}} 70.0"
            ),
            format!("gaffer_gpu_xid_errors_total{{{labels},gpu=\"1\",gpu_name=\"\",gpu_uuid=\"\"}} 4"),
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} missing from:\n{text}");
        }
        m.agents().forget(a.id);
        let text = m.encode(&store);
        assert!(!text.contains(&a.id.to_string()), "{text}");
        Ok(())
    }

    /// 10,000 agents of 2 GPUs and 1 volume: every series is rendered; prints how long one
    /// scrape takes to encode (a measurement, not an assertion).
    #[test]
    fn a_scrape_of_10000_agents() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let m = Metrics::new();
        for n in 0..10_000 {
            m.agents().agent_seen(&agent(n, 2));
        }
        let started = std::time::Instant::now();
        let text = m.encode(&store);
        let took = started.elapsed();
        let samples = text.lines().filter(|l| l.starts_with("gaffer_gpu_temperature_celsius{")).count();
        assert_eq!(samples, 20_000);
        eprintln!(
            "a scrape of 10,000 agents: {} bytes, {} lines, encoded in {took:?}",
            text.len(),
            text.lines().count()
        );
        Ok(())
    }
}
