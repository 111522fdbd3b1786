//! `gaffer-control`: the control plane.
//!
//! * [`store`]: persistent state behind the [`store::Store`] trait (sled implementation).
//! * [`jobs`]: the job state machine: every change of a job's state, leases with fencing,
//!   deadlines, attempts.
//! * [`scheduler`]: when jobs change: leasing in priority order, deadlines, operator actions,
//!   the connected fleet and its outgoing queues.
//! * [`ingest`]: applies agent messages exactly once in effect (link and bundles).
//! * [`link`]: the QUIC endpoint: enrollment (`gaffer-enroll/1`) and the agent link (`gaffer/1`).
//! * [`http`]: the JSON API under `/api/v1` and the server-rendered dashboard.
//! * [`admin`]: the local admin socket that CLI commands use while `serve` holds the store.
//! * [`metrics`]: Prometheus metrics; [`agent_metrics`]: the per-agent and per-GPU series.
//! * [`offline`]: air-gapped sites: offline enrollment, bundle import with reply, revocation.
//! * [`release`]: the release key, signed agent releases (`release keygen|sign|add|list`).
//! * [`replica`]: several `serve` processes sharing one store (PostgreSQL): heartbeats, the
//!   leader, dead replicas' agents, events between replicas.
//! * [`rollout`]: staged rollouts of releases (canaries, halt-on-error): the sans-IO book and its driver.
//! * [`datadir`]: the data directory layout and configuration.
//! * [`service`]: systemd notifications (`READY=1`, `STATUS=`, the watchdog, `STOPPING=1`).
//! * [`webhook`]: webhooks, alert rules and alert email: durable, signed, retried deliveries.
//! * [`config`]: the configuration file (`/etc/gaffer/control.toml`) of `serve` and `init`, checked by
//!   `validate`.
#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod agent_metrics;
pub mod config;
pub mod datadir;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod jobs;
pub mod link;
pub mod metrics;
pub mod offline;
pub mod release;
pub mod replica;
pub mod rollout;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod webhook;

use std::sync::Arc;

/// Everything request handlers and the link share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Persistent state.
    pub store: Arc<dyn store::Store>,
    /// Job submission and leases.
    pub scheduler: Arc<scheduler::Scheduler>,
    /// Prometheus metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// The agents revoked now (checked at every handshake and link turn).
    pub revocations: Arc<identity::Revocations>,
    /// The CAs and the rotation phase, for the dashboard; `serve` sets it (None in tools and tests
    /// that run without certificates).
    pub pki: Option<Arc<identity::Pki>>,
    /// Staged rollouts of agent releases; `serve` sets it (None: no agent is ever ordered to
    /// update, and update reports are recorded in the audit log only).
    pub rollouts: Option<Arc<rollout::Rollouts>>,
    /// This process among the replicas sharing the store (a new id per process).
    pub replica: Arc<replica::Replica>,
}

impl AppState {
    /// The shared state over `store`: a fresh fleet, metrics registry and scheduler with `cfg`.
    pub fn new(store: Arc<dyn store::Store>, cfg: scheduler::SchedulerConfig) -> Self {
        let metrics = Arc::new(metrics::Metrics::new());
        let fleet = Arc::new(scheduler::Fleet::default());
        let scheduler = Arc::new(scheduler::Scheduler::new(store.clone(), fleet, metrics.clone(), cfg));
        let revocations = Arc::new(identity::Revocations::load(store.as_ref()).unwrap_or_else(|e| {
            // The Hello check reads the agent record too, so a revoked agent is still refused.
            tracing::error!(error = %e, "could not load the revoked agents; relying on the per-connection check");
            identity::Revocations::default()
        }));
        let replica = Arc::new(replica::Replica::new(now_ms()));
        scheduler.set_replica(replica.clone());
        // `/metrics` renders per-agent series from memory: the store's agents once, here.
        metrics.agents().set_live(scheduler.fleet().clone(), revocations.clone());
        if let Err(e) = metrics.agents().seed(store.as_ref()) {
            tracing::error!(error = %e, "could not read the agents for /metrics; they appear as they connect");
        }
        Self { store, scheduler, metrics, revocations, pki: None, rollouts: None, replica }
    }
}

/// The version this control plane reports (`--version`, the Welcome, the dashboard): the one the
/// binary set with [`set_build_version`] (`GAFFER_BUILD_VERSION` when it was built, else the crate
/// version), else this crate's version. The binary reads the variable with `option_env!` and hands
/// it here, so a build with another version recompiles only the binary's own crate.
pub fn build_version() -> &'static str {
    BUILD_VERSION.get().copied().unwrap_or(env!("CARGO_PKG_VERSION"))
}

/// Sets what [`build_version`] returns, once, at the start of `main`; later calls change nothing.
pub fn set_build_version(version: &'static str) {
    let _ = BUILD_VERSION.set(version);
}

static BUILD_VERSION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
