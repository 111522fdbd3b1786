//! Alert rules, sans-IO: health reports, link changes and the time go in ([`AlertRules::health`],
//! [`AlertRules::agent_connected`], [`AlertRules::agent_disconnected`], [`AlertRules::tick`]),
//! alerts come out. No clock reads, no store, no sockets; [`super::Webhooks`] drives it.
//!
//! Rules (thresholds from `[alerts]` in the configuration file, [`AlertSettings`]):
//! * `agent_offline`: an agent whose link has been down longer than `agent_offline_secs` (120 s)
//!   → `agent.offline`, once; when its link comes back → `agent.online`.
//! * `gpu_temperature`: a GPU at ≥ `gpu_temperature_c_max` °C (85), per GPU.
//! * `gpu_memory`: a GPU's memory use ≥ `gpu_memory_used_percent_max` % (95), per GPU.
//! * `disk_free`: a volume's free space ≤ `disk_free_percent_min` % (5), per volume.
//! * `outbox_depth`: the agent's outbox holds ≥ `outbox_depth_max` messages (10,000).
//! * `outbox_full`: the health says `outbox_full` → `outbox.full`.
//!
//! Each threshold rule fires once per crossing: it fires when the value crosses the threshold and
//! re-arms only once a report shows it back on the good side (hysteresis), so a GPU sitting at
//! 90 °C is one alert, not one per heartbeat. State is per agent and per subject (GPU index,
//! volume path); the subjects of one agent are bounded by the health report's own limits
//! (`ingest::HEALTH_LIST_MAX` GPUs and disks).

use std::collections::{BTreeSet, HashMap};

use gaffer_protocol::health::Health;
use gaffer_protocol::messages::AgentId;

use super::EventKind;
use crate::store::UnixMs;

/// Default of `[alerts] agent_offline_secs`: 120 s.
pub const AGENT_OFFLINE_SECS_DEFAULT: u64 = 120;
/// Default of `[alerts] gpu_temperature_c_max`: 85 °C.
pub const GPU_TEMPERATURE_C_MAX_DEFAULT: u64 = 85;
/// Default of `[alerts] gpu_memory_used_percent_max`: 95 %.
pub const GPU_MEMORY_USED_PERCENT_MAX_DEFAULT: u64 = 95;
/// Default of `[alerts] disk_free_percent_min`: 5 %.
pub const DISK_FREE_PERCENT_MIN_DEFAULT: u64 = 5;
/// Default of `[alerts] outbox_depth_max`: 10,000 messages.
pub const OUTBOX_DEPTH_MAX_DEFAULT: u64 = 10_000;

/// The thresholds (`[alerts]` of the configuration file, defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertSettings {
    /// Seconds an agent's link may be down before `agent.offline`.
    pub agent_offline_secs: u64,
    /// GPU temperature that fires `gpu_temperature`, °C.
    pub gpu_temperature_c_max: u64,
    /// GPU memory use that fires `gpu_memory`, percent of the GPU's memory.
    pub gpu_memory_used_percent_max: u64,
    /// Free space of a volume at or below which `disk_free` fires, percent.
    pub disk_free_percent_min: u64,
    /// Outbox depth that fires `outbox_depth`, messages.
    pub outbox_depth_max: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            agent_offline_secs: AGENT_OFFLINE_SECS_DEFAULT,
            gpu_temperature_c_max: GPU_TEMPERATURE_C_MAX_DEFAULT,
            gpu_memory_used_percent_max: GPU_MEMORY_USED_PERCENT_MAX_DEFAULT,
            disk_free_percent_min: DISK_FREE_PERCENT_MIN_DEFAULT,
            outbox_depth_max: OUTBOX_DEPTH_MAX_DEFAULT,
        }
    }
}

/// Something to tell the operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Alert {
    /// The agent's link has been down for `offline_secs`.
    Offline {
        /// The agent.
        agent: AgentId,
        /// How long, s.
        offline_secs: u64,
    },
    /// The agent reported offline is back after `offline_secs`.
    Online {
        /// The agent.
        agent: AgentId,
        /// How long it was away, s.
        offline_secs: u64,
    },
    /// A threshold rule fired.
    Health {
        /// The agent.
        agent: AgentId,
        /// `gpu_temperature`, `gpu_memory`, `disk_free` or `outbox_depth`.
        rule: &'static str,
        /// What it is about: `gpu 0`, a volume path, `outbox`.
        subject: String,
        /// The value reported (°C, percent, messages).
        value: f64,
        /// The threshold crossed.
        threshold: f64,
    },
    /// The agent's outbox is full.
    OutboxFull {
        /// The agent.
        agent: AgentId,
    },
}

impl Alert {
    /// The agent it is about.
    pub fn agent(&self) -> AgentId {
        match self {
            Alert::Offline { agent, .. }
            | Alert::Online { agent, .. }
            | Alert::Health { agent, .. }
            | Alert::OutboxFull { agent } => *agent,
        }
    }

    /// The event, its `data` (with `agent` the agent as the API shows it) and a one-line summary
    /// naming the host.
    pub fn describe(&self, agent: serde_json::Value, host: &str) -> (EventKind, serde_json::Value, String) {
        match self {
            Alert::Offline { offline_secs, .. } => (
                EventKind::AgentOffline,
                serde_json::json!({ "agent": agent, "offline_secs": offline_secs }),
                format!("Agent {host} has been offline for {offline_secs} s"),
            ),
            Alert::Online { offline_secs, .. } => (
                EventKind::AgentOnline,
                serde_json::json!({ "agent": agent, "offline_secs": offline_secs }),
                format!("Agent {host} is back online after {offline_secs} s"),
            ),
            Alert::Health { rule, subject, value, threshold, .. } => (
                EventKind::AgentHealth,
                serde_json::json!({
                    "agent": agent, "rule": rule, "subject": subject, "value": value, "threshold": threshold
                }),
                format!("Agent {host}: {rule} on {subject} is {value:.1} (threshold {threshold})"),
            ),
            Alert::OutboxFull { .. } => (
                EventKind::OutboxFull,
                serde_json::json!({ "agent": agent }),
                format!("Agent {host}: outbox full, it takes no new jobs"),
            ),
        }
    }
}

#[derive(Debug, Default)]
struct AgentAlerts {
    /// When its link went down (None: up, or never seen down by this process).
    offline_since_ms: Option<UnixMs>,
    /// `agent.offline` was sent for the current outage.
    offline_fired: bool,
    /// (rule, subject) pairs over their threshold now (fired, waiting to re-arm).
    firing: BTreeSet<(&'static str, String)>,
    /// The last report said outbox_full.
    outbox_full: bool,
}

/// The rules' state for every agent this process has heard of.
#[derive(Debug)]
pub struct AlertRules {
    settings: AlertSettings,
    agents: HashMap<AgentId, AgentAlerts>,
}

impl AlertRules {
    /// Rules with `settings`, no state.
    pub fn new(settings: AlertSettings) -> Self {
        Self { settings, agents: HashMap::new() }
    }

    /// The thresholds.
    pub fn settings(&self) -> &AlertSettings {
        &self.settings
    }

    /// The agent's link went down at `now_ms` (starts its offline timer unless one runs).
    pub fn agent_disconnected(&mut self, agent: AgentId, now_ms: UnixMs) {
        let a = self.agents.entry(agent).or_default();
        if a.offline_since_ms.is_none() {
            a.offline_since_ms = Some(now_ms);
            a.offline_fired = false;
        }
    }

    /// The agent's link came up: [`Alert::Online`] if it had been reported offline.
    pub fn agent_connected(&mut self, agent: AgentId, now_ms: UnixMs) -> Vec<Alert> {
        let a = self.agents.entry(agent).or_default();
        let since = a.offline_since_ms.take();
        let fired = std::mem::take(&mut a.offline_fired);
        match since {
            Some(since) if fired => {
                vec![Alert::Online { agent, offline_secs: now_ms.saturating_sub(since) / 1000 }]
            }
            _ => Vec::new(),
        }
    }

    /// Forgets an agent (revoked or removed): no alerts about it any more.
    pub fn forget(&mut self, agent: AgentId) {
        self.agents.remove(&agent);
    }

    /// The offline timer at `now_ms`: [`Alert::Offline`] for each agent down longer than
    /// `agent_offline_secs` and not reported yet.
    pub fn tick(&mut self, now_ms: UnixMs) -> Vec<Alert> {
        let limit_ms = self.settings.agent_offline_secs.saturating_mul(1000);
        let mut out = Vec::new();
        for (id, a) in &mut self.agents {
            if let Some(since) = a.offline_since_ms {
                let down_ms = now_ms.saturating_sub(since);
                if !a.offline_fired && down_ms > limit_ms {
                    a.offline_fired = true;
                    out.push(Alert::Offline { agent: *id, offline_secs: down_ms / 1000 });
                }
            }
        }
        out.sort_by_key(|a| a.agent());
        out
    }

    /// One health report of `agent`: the threshold rules and `outbox_full`.
    pub fn health(&mut self, agent: AgentId, h: &Health) -> Vec<Alert> {
        let s = self.settings;
        // (rule, subject, value, threshold, over)
        let mut checks: Vec<(&'static str, String, f64, f64, bool)> = Vec::new();
        for g in &h.gpus {
            let t = f64::from(g.temperature_c);
            checks.push((
                "gpu_temperature",
                format!("gpu {}", g.index),
                t,
                s.gpu_temperature_c_max as f64,
                t >= s.gpu_temperature_c_max as f64,
            ));
            if g.memory_total_bytes > 0 {
                let pct = g.memory_used_bytes as f64 * 100.0 / g.memory_total_bytes as f64;
                let max = s.gpu_memory_used_percent_max as f64;
                checks.push(("gpu_memory", format!("gpu {}", g.index), pct, max, pct >= max));
            }
        }
        for d in &h.disks {
            if d.total_bytes > 0 {
                let free = d.available_bytes as f64 * 100.0 / d.total_bytes as f64;
                let min = s.disk_free_percent_min as f64;
                checks.push(("disk_free", d.path.clone(), free, min, free <= min));
            }
        }
        let depth = h.outbox_pending as f64;
        checks.push((
            "outbox_depth",
            "outbox".into(),
            depth,
            s.outbox_depth_max as f64,
            depth >= s.outbox_depth_max as f64,
        ));

        let a = self.agents.entry(agent).or_default();
        let mut out = Vec::new();
        for (rule, subject, value, threshold, over) in checks {
            let key = (rule, subject);
            if over {
                if a.firing.insert(key.clone()) {
                    out.push(Alert::Health { agent, rule, subject: key.1, value, threshold });
                }
            } else {
                a.firing.remove(&key);
            }
        }
        if h.outbox_full && !a.outbox_full {
            out.push(Alert::OutboxFull { agent });
        }
        a.outbox_full = h.outbox_full;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gaffer_protocol::health::{DiskHealth, GpuHealth, HealthSource};

    fn health(temp_c: u32, mem_used: u64, disk_free: u64, outbox: u64, full: bool) -> Health {
        Health {
            sampled_at_unix_ms: 0,
            source: HealthSource::CpuOnly { reason: "test".into() },
            cpu_percent: 0.0,
            load_avg_1m: 0.0,
            memory_used_bytes: 0,
            memory_total_bytes: 0,
            disks: vec![DiskHealth { path: "/media".into(), available_bytes: disk_free, total_bytes: 100 }],
            gpus: vec![GpuHealth {
                index: 0,
                name: "L40S".into(),
                utilization_percent: 0,
                memory_used_bytes: mem_used,
                memory_total_bytes: 100,
                temperature_c: temp_c,
                power_w: None,
            }],
            inference: None,
            jobs_running: 0,
            job_slots: 1,
            jobs_queued: 0,
            outbox_pending: outbox,
            outbox_full: full,
        }
    }

    fn rules_of(alerts: &[Alert]) -> Vec<(&'static str, String)> {
        alerts
            .iter()
            .map(|a| match a {
                Alert::Health { rule, subject, .. } => (*rule, subject.clone()),
                Alert::OutboxFull { .. } => ("outbox_full", String::new()),
                Alert::Offline { .. } => ("offline", String::new()),
                Alert::Online { .. } => ("online", String::new()),
            })
            .collect()
    }

    #[test]
    fn each_threshold_fires_once_per_crossing_and_rearms_below() {
        let agent = AgentId::from_u128(1);
        let mut r = AlertRules::new(AlertSettings::default());
        assert!(r.health(agent, &health(60, 10, 50, 0, false)).is_empty());
        let hot = r.health(agent, &health(85, 10, 50, 0, false));
        assert_eq!(rules_of(&hot), [("gpu_temperature", "gpu 0".to_owned())]);
        assert!(matches!(hot[0], Alert::Health { value, threshold, .. } if value == 85.0 && threshold == 85.0));
        // Still hot: no second alert.
        assert!(r.health(agent, &health(90, 10, 50, 0, false)).is_empty());
        // Back under re-arms; the next crossing fires again.
        assert!(r.health(agent, &health(84, 10, 50, 0, false)).is_empty());
        assert_eq!(rules_of(&r.health(agent, &health(86, 10, 50, 0, false))).len(), 1);
    }

    #[test]
    fn memory_disk_and_outbox_rules_use_their_thresholds() {
        let agent = AgentId::from_u128(2);
        let mut r = AlertRules::new(AlertSettings::default());
        assert!(r.health(agent, &health(50, 94, 6, 9_999, false)).is_empty());
        let all = r.health(agent, &health(50, 95, 5, 10_000, true));
        assert_eq!(
            rules_of(&all),
            [
                ("gpu_memory", "gpu 0".to_owned()),
                ("disk_free", "/media".to_owned()),
                ("outbox_depth", "outbox".to_owned()),
                ("outbox_full", String::new()),
            ]
        );
        assert!(r.health(agent, &health(50, 99, 1, 20_000, true)).is_empty());
        // Another agent has its own state.
        assert_eq!(r.health(AgentId::from_u128(3), &health(50, 95, 50, 0, false)).len(), 1);
    }

    #[test]
    fn offline_fires_after_the_limit_once_and_online_follows_only_a_fired_offline() {
        let agent = AgentId::from_u128(4);
        let mut r = AlertRules::new(AlertSettings { agent_offline_secs: 120, ..AlertSettings::default() });
        r.agent_disconnected(agent, 1_000);
        assert!(r.tick(121_000).is_empty(), "exactly 120 s is not longer than 120 s");
        let fired = r.tick(121_001);
        assert_eq!(fired, [Alert::Offline { agent, offline_secs: 120 }]);
        assert!(r.tick(500_000).is_empty(), "once per outage");
        // A second disconnect while down keeps the first outage's start.
        r.agent_disconnected(agent, 400_000);
        assert_eq!(r.agent_connected(agent, 601_000), [Alert::Online { agent, offline_secs: 600 }]);
        // A short blip: no offline, so no online either.
        r.agent_disconnected(agent, 700_000);
        assert!(r.tick(750_000).is_empty());
        assert!(r.agent_connected(agent, 760_000).is_empty());
        assert!(r.tick(10_000_000).is_empty());
    }
}
