//! systemd integration for `gaffer-control serve` under
//! `installers/systemd/gaffer-control.service` (`Type=notify`, `NotifyAccess=main`,
//! `WatchdogSec=30s`): the notify protocol of [`gaffer_service::notify`], re-exported here, and
//! the control plane's status line ([`control_status`]). Without `NOTIFY_SOCKET` every call is a
//! no-op: serving never depends on systemd.
//!
//! * [`ready`]: once QUIC and HTTP are listening; until then units ordered after this one do not
//!   start.
//! * [`spawn_watchdog`] with [`control_status`] as the report ("QUIC udp/0.0.0.0:7443, dashboard
//!   https://gaffer.lan:8080/, 12 agents connected, 3 jobs running, 40 queued"): it reads the
//!   store's job counts on the blocking pool (where store writes run), so a hung store or a
//!   starved pool stops the pings, and systemd kills and restarts the control plane
//!   (`Restart=on-failure`); agents reconnect and leases follow their grace rules.
//! * [`stopping`]: when the shutdown signal arrives.

use gaffer_service::notify::plural;
pub use gaffer_service::notify::{
    enabled, ready, spawn_watchdog, status, stopping, watchdog_interval, STATUS_BYTES_MAX, STATUS_REFRESH,
};

use crate::store::JobState;
use crate::AppState;

/// The control plane's `STATUS=` line: where it listens, connected agents and jobs by state
/// ("QUIC udp/0.0.0.0:7443, dashboard http://127.0.0.1:8080/, 2 agents connected, 1 job running,
/// 0 queued"). `listening` is what [`ready`] said (addresses, dashboard URL). Reads the store's
/// job counts (no scan): call it from the blocking pool (as [`spawn_watchdog`] does).
///
/// Errors: the store could not be read, as the reason the watchdog reports.
pub fn control_status(listening: &str, state: &AppState) -> Result<String, String> {
    let counts = state.store.job_counts().map_err(|e| format!("the store cannot be read: {e}"))?;
    let agents = state.scheduler.fleet().connected_count();
    let running = counts.get(JobState::Running) + counts.get(JobState::Assigned);
    Ok(format!(
        "{listening}, {} connected, {} running, {} queued",
        plural(agents as u64, "agent"),
        plural(running, "job"),
        counts.get(JobState::Queued)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn control_status_counts_agents_and_jobs_from_the_store() {
        use crate::scheduler::{JobRequest, SchedulerConfig};
        use crate::store::mem_store::MemStore;
        use crate::store::JobOrigin;
        use gaffer_protocol::messages::Profile;

        let state = AppState::new(Arc::new(MemStore::new()), SchedulerConfig::default());
        let listening = "QUIC udp/127.0.0.1:7443, dashboard http://127.0.0.1:8080/";
        assert_eq!(
            control_status(listening, &state).as_deref(),
            Ok("QUIC udp/127.0.0.1:7443, dashboard http://127.0.0.1:8080/, 0 agents connected, 0 jobs running, 0 queued")
        );
        for i in 0..2 {
            let req = JobRequest {
                path: format!("/mnt/media/{i}.mov"),
                site: "stage-a".into(),
                agent: None,
                profile: Profile::Shots,
                priority: Default::default(),
            };
            state.scheduler.submit(req, JobOrigin::Api, None, crate::now_ms()).expect("submit");
        }
        assert_eq!(
            control_status(listening, &state).as_deref(),
            Ok("QUIC udp/127.0.0.1:7443, dashboard http://127.0.0.1:8080/, 0 agents connected, 0 jobs running, 2 queued")
        );
    }
}
