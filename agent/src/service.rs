//! systemd integration for `gaffer-agent run` under `installers/systemd/gaffer-agent.service`
//! (`Type=notify`, `NotifyAccess=main`, `WatchdogSec=30s`): the notify protocol of
//! [`gaffer_service::notify`], re-exported here, and the agent's status line ([`agent_status`]).
//! Without `NOTIFY_SOCKET` every call is a no-op.
//!
//! * [`ready`]: once the agent really serves (link task started, watch folders set up; not after
//!   the control plane answered: an agent that cannot reach it still runs the jobs it holds).
//! * [`spawn_watchdog`] with [`agent_status`] as the report ("connected to cp.studio.lan:7443,
//!   2 jobs running, 1 queued, 4 slots"): it takes the job runner's lock on the blocking pool
//!   (where the agent's fsyncs run), so a hung runner or a starved pool stops the pings, and
//!   systemd kills and restarts the agent (`Restart=on-failure`); the jobs it held run again at
//!   the next start.
//! * [`stopping`]: when the shutdown signal arrives, before flushing state.
//!
//! Only the main process notifies; analysis workers inherit the variables but never call this
//! module (and `NotifyAccess=main` would ignore them).

use gaffer_service::notify::plural;
pub use gaffer_service::notify::{
    enabled, ready, spawn_watchdog, status, stopping, watchdog_interval, STATUS_BYTES_MAX, STATUS_REFRESH,
};

use crate::link::{LinkState, LinkStatus};
use crate::runner::Runner;

/// The agent's `STATUS=` line: link state with the control plane's address, jobs and slots,
/// and a full outbox when it is ("connected to cp:7443, 2 jobs running, 1 queued, 4 slots").
/// `link` is `None` for `run --offline`. Takes the runner's lock: call it from the blocking pool
/// (as [`spawn_watchdog`] does).
pub fn agent_status(control_addr: &str, link: Option<&LinkStatus>, runner: &Runner) -> String {
    // The address the link is on now (failover moves it), else the enrolled one.
    let current = link.map(LinkStatus::control_addr).filter(|a| !a.is_empty());
    let control_addr = current.as_deref().unwrap_or(control_addr);
    let link = match link.map(LinkStatus::get) {
        None => "offline (bundles only)".to_owned(),
        Some(LinkState::Up) => format!("connected to {control_addr}"),
        Some(LinkState::Connecting) => format!("connecting to {control_addr}"),
        Some(LinkState::Down) => format!("reconnecting to {control_addr}"),
    };
    let full = if runner.outbox().is_full() { ", outbox full: taking no new jobs" } else { "" };
    format!(
        "{link}, {} running, {} queued, {}{full}",
        plural(runner.jobs_running().into(), "job"),
        runner.jobs_queued(),
        plural(runner.job_slots().into(), "slot")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_status_names_the_link_jobs_and_slots() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join("state")).expect("state db");
        let outbox = crate::outbox::Outbox::open(&db).expect("outbox");
        let cfg = crate::runner::RunnerConfig { job_slots: 4, ..Default::default() };
        let runner = Runner::new(cfg, outbox, &db).expect("runner");
        let link = LinkStatus::default();
        assert_eq!(
            agent_status("cp.test:7443", Some(&link), &runner),
            "reconnecting to cp.test:7443, 0 jobs running, 0 queued, 4 slots"
        );
        assert_eq!(
            agent_status("cp.test:7443", None, &runner),
            "offline (bundles only), 0 jobs running, 0 queued, 4 slots"
        );
    }
}
