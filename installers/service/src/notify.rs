//! The systemd notify protocol for `Type=notify` units (`installers/systemd/`: `NotifyAccess=main`,
//! `WatchdogSec=30s`), through the `sd-notify` crate. Each program's `service` module says when it
//! calls these and builds its status report.
//!
//! * [`ready`]: `READY=1` and a first `STATUS=` once the process really serves. Until then
//!   `systemctl start` waits, `systemctl status` says "activating", and units ordered after this
//!   one do not start.
//! * [`spawn_watchdog`]: a task that, every half `WATCHDOG_USEC`, checks that the process is
//!   healthy and only then sends `WATCHDOG=1`, with the `STATUS=` line an operator sees in
//!   `systemctl status`. Healthy means: the async runtime runs a newly spawned task, the blocking
//!   pool runs the program's status report, and the report (which may take locks or read the
//!   store) returns `Ok` in time. A hung process stops feeding the watchdog, and systemd kills and
//!   restarts it (`Restart=on-failure`).
//! * [`status`]: a new `STATUS=` line.
//! * [`stopping`]: `STOPPING=1` when shutdown begins; no later `STATUS=` from the watchdog
//!   replaces its line.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd, or by a unit
//! that is not `Type=notify`). A notification that cannot be sent is logged and otherwise
//! ignored: the program's work never depends on systemd. Only the main process should notify
//! (child processes inherit the variables, and `NotifyAccess=main` ignores them).
//!
//! Limits: `STATUS=` lines are one line of at most [`STATUS_BYTES_MAX`] bytes; at most one status
//! report runs at a time, so a hung one ties up one blocking thread, never more.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How often [`spawn_watchdog`] refreshes `STATUS=` when systemd set no watchdog
/// (`WATCHDOG_USEC` unset): 10 seconds.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// `STATUS=` lines are cut to this many bytes (systemd shows one line; a datagram is bounded).
pub const STATUS_BYTES_MAX: usize = 256;

/// Set by [`stopping`]; held while the watchdog sends, so its `STATUS=` never lands after (and
/// overrides) the stopping one.
static STOPPING: Mutex<bool> = Mutex::new(false);

/// Whether systemd asked for notifications (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Tells systemd the process is serving: `READY=1` and `STATUS=<status>`. Call once, when it
/// really serves (listeners bound, tasks started). No-op without `NOTIFY_SOCKET`.
pub fn ready(status: &str) {
    let status = status_line(status);
    send(&[NotifyState::Ready, NotifyState::Status(&status)], "READY=1");
}

/// Sets the `STATUS=` line `systemctl status` shows. No-op without `NOTIFY_SOCKET`.
pub fn status(status: &str) {
    let status = status_line(status);
    send(&[NotifyState::Status(&status)], "STATUS=");
}

/// Tells systemd the process is shutting down: `STOPPING=1` and `STATUS=<status>`. Call when the
/// shutdown signal arrives, before flushing state; the watchdog's later status lines do not
/// replace this one. No-op without `NOTIFY_SOCKET`.
pub fn stopping(status: &str) {
    let status = status_line(status);
    let mut stopping = STOPPING.lock().unwrap_or_else(|p| p.into_inner());
    *stopping = true;
    send(&[NotifyState::Stopping, NotifyState::Status(&status)], "STOPPING=1");
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (systemd's `WatchdogSec=`), or `None`
/// when systemd set no watchdog for this process (unset, unparsable, or `WATCHDOG_PID` names
/// another process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

/// Starts the watchdog task on the current tokio runtime, or returns `None` without
/// `NOTIFY_SOCKET`. Every [`watchdog_interval`] (or [`STATUS_REFRESH`] when systemd set no
/// watchdog) it checks the process, then:
///
/// * healthy, `report` returned `Ok(status)`: sends `WATCHDOG=1` (when a watchdog is set) and
///   `STATUS=<status>` when it changed;
/// * otherwise: sends no `WATCHDOG=1`, sets `STATUS=unhealthy: <reason>` and logs the reason.
///
/// `report` runs on the blocking pool (it may take locks); one that has not returned within half
/// the interval counts as unhealthy, and no second one starts while it hangs (at most one thread
/// is ever tied up). Panics outside a tokio runtime.
pub fn spawn_watchdog<F>(report: F) -> Option<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    if !enabled() {
        return None;
    }
    let ping_every = watchdog_interval();
    let every = ping_every.unwrap_or(STATUS_REFRESH);
    tracing::info!(
        watchdog_ping_every_ms = ping_every.map(|d| d.as_millis() as u64),
        "systemd notifications on; feeding the watchdog while healthy"
    );
    Some(tokio::spawn(watchdog_loop(Arc::new(report), every, ping_every.is_some())))
}

/// `n` and `what`, plural unless `n` is 1, for status lines: `plural(1, "job")` is "1 job",
/// `plural(4, "slot")` is "4 slots".
pub fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `status` as one line of at most [`STATUS_BYTES_MAX`] bytes (control characters, newlines
/// among them, become spaces: a newline would end the field; cut at a character boundary).
pub fn status_line(status: &str) -> String {
    let mut line: String = status.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.len() > STATUS_BYTES_MAX {
        let mut end = STATUS_BYTES_MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

fn send(states: &[NotifyState<'_>], what: &str) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, notification = what, "could not notify systemd");
    }
}

async fn watchdog_loop<F>(report: Arc<F>, every: Duration, ping: bool)
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    let budget = every / 2;
    // Set while a report runs on the blocking pool; a hung one is never joined by a second.
    let in_flight = Arc::new(AtomicBool::new(false));
    let mut in_flight_since = Instant::now();
    let mut last_status = String::new();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let verdict = check(&report, &in_flight, &mut in_flight_since, budget).await;
        let status = match &verdict {
            Ok(status) => status_line(status),
            Err(reason) => {
                tracing::warn!(%reason, "unhealthy: not feeding the systemd watchdog");
                status_line(&format!("unhealthy: {reason}"))
            }
        };
        let mut states = Vec::with_capacity(2);
        if ping && verdict.is_ok() {
            states.push(NotifyState::Watchdog);
        }
        let stopping = STOPPING.lock().unwrap_or_else(|p| p.into_inner());
        // Once stopping, the watchdog is still fed while healthy but the status stays.
        if status != last_status && !*stopping {
            states.push(NotifyState::Status(&status));
        }
        if !states.is_empty() {
            send(&states, "WATCHDOG=1");
        }
        drop(stopping);
        last_status = status;
    }
}

/// One health check: the runtime runs a new task, and `report` returns `Ok` on the blocking pool,
/// each within `budget`.
async fn check<F>(
    report: &Arc<F>,
    in_flight: &Arc<AtomicBool>,
    in_flight_since: &mut Instant,
    budget: Duration,
) -> Result<String, String>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    match tokio::time::timeout(budget, tokio::spawn(async {})).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("the async runtime could not run a task: {e}")),
        Err(_) => return Err(format!("the async runtime did not run a new task within {} ms", budget.as_millis())),
    }
    if in_flight.swap(true, Ordering::AcqRel) {
        return Err(format!("the status check started {} s ago has not returned", in_flight_since.elapsed().as_secs()));
    }
    *in_flight_since = Instant::now();
    let (report, done) = (report.clone(), in_flight.clone());
    let task = tokio::task::spawn_blocking(move || {
        let r = report();
        done.store(false, Ordering::Release);
        r
    });
    match tokio::time::timeout(budget, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("the status check failed: {e}")),
        Err(_) => Err(format!("the status check did not return within {} ms", budget.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    //! The notification protocol end to end: a child process (this test binary, running the
    //! ignored [`service_child`] test) gets `NOTIFY_SOCKET` pointing at a datagram socket bound
    //! here, and `WATCHDOG_USEC`, exactly as systemd starts a `Type=notify` service. A child keeps
    //! the environment variables out of this multi-threaded test process.
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::process::{Command, Stdio};

    const SCENARIO_VAR: &str = "GAFFER_SERVICE_TEST_SCENARIO";

    /// One datagram from the child: when it arrived and its `KEY=value` lines.
    struct Datagram {
        at: Instant,
        lines: Vec<String>,
    }

    impl Datagram {
        fn has(&self, line: &str) -> bool {
            self.lines.iter().any(|l| l == line)
        }
        fn status(&self) -> Option<&str> {
            self.lines.iter().find_map(|l| l.strip_prefix("STATUS="))
        }
    }

    /// Runs scenario `name` in a child with `env` and returns every datagram it sent, up to its
    /// exit.
    fn run_child(name: &str, env: &[(&str, String)]) -> Vec<Datagram> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", "notify::tests::service_child", "--ignored", "--test-threads=1", "--nocapture"])
            .env(SCENARIO_VAR, name)
            .env("NOTIFY_SOCKET", &path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the child");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    got.push(Datagram { at: Instant::now(), lines: text.lines().map(str::to_owned).collect() });
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if child.try_wait().expect("child status").is_some() {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the child ran for over 60 s");
                }
                Err(e) => panic!("reading the notify socket: {e}"),
            }
        }
        let out = child.wait_with_output().expect("child output");
        assert!(
            out.status.success(),
            "child scenario {name} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        got
    }

    /// The child side: one scenario per `GAFFER_SERVICE_TEST_SCENARIO` value.
    #[test]
    #[ignore = "run by the other tests in a child process, with NOTIFY_SOCKET set"]
    fn service_child() {
        let scenario = std::env::var(SCENARIO_VAR).expect("run by run_child, which sets the scenario");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            match scenario.as_str() {
                "healthy" => {
                    ready("connected to cp.test:7443, 2 jobs running");
                    let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
                    let handle = spawn_watchdog(move || Ok(format!("report {}", n.fetch_add(1, Ordering::Relaxed))))
                        .expect("NOTIFY_SOCKET is set");
                    tokio::time::sleep(Duration::from_millis(4500)).await;
                    stopping("stopping");
                    // Still running: its next reports must not replace the stopping status.
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    handle.abort();
                }
                "unhealthy" => {
                    ready("starting");
                    let _handle = spawn_watchdog(|| Err("report stuck".to_owned())).expect("NOTIFY_SOCKET is set");
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                }
                "hung" => {
                    ready("starting");
                    // A report stuck for good, as on a deadlocked lock.
                    let _handle = spawn_watchdog(|| {
                        std::thread::sleep(Duration::from_secs(3600));
                        Ok("never".to_owned())
                    })
                    .expect("NOTIFY_SOCKET is set");
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                }
                "not-for-us" | "no-socket" => {
                    ready("starting");
                    let handle = spawn_watchdog(|| Ok("fine".to_owned()));
                    assert_eq!(handle.is_some(), scenario == "not-for-us");
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                other => panic!("unknown scenario {other}"),
            }
        });
        // A hung report's thread must not keep the child alive (the process exits after this).
        rt.shutdown_timeout(Duration::from_millis(100));
    }

    #[test]
    fn ready_status_watchdog_at_half_watchdog_usec_and_stopping() {
        let usec = 1_000_000u64; // pings every 500 ms
        let got = run_child("healthy", &[("WATCHDOG_USEC", usec.to_string())]);
        let first = got.first().expect("at least one notification");
        assert!(first.has("READY=1"), "first datagram: {:?}", first.lines);
        assert_eq!(first.status(), Some("connected to cp.test:7443, 2 jobs running"));
        let stop = got.iter().position(|d| d.has("STOPPING=1")).expect("STOPPING=1 sent");
        assert_eq!(got[stop].status(), Some("stopping"));
        assert!(got[stop + 1..].iter().all(|d| d.status().is_none()), "a STATUS= after STOPPING=1 overrode it");

        let pings: Vec<Instant> = got.iter().filter(|d| d.has("WATCHDOG=1")).map(|d| d.at).collect();
        // 4.5 s at one ping per 500 ms: about 9; a loaded machine may lose a few.
        assert!(pings.len() >= 5, "only {} pings in 4.5 s at a 500 ms interval", pings.len());
        for gap in pings.windows(2).map(|w| w[1] - w[0]) {
            // Not faster than the interval (generous for scheduling jitter), and always inside
            // the watchdog timeout, which is what keeps systemd from killing a healthy process.
            assert!(gap >= Duration::from_millis(250), "pings {gap:?} apart at a 500 ms interval");
            assert!(gap < Duration::from_micros(usec), "pings {gap:?} apart: past WATCHDOG_USEC");
        }
        // The report's line reaches STATUS= and follows it as it changes.
        let statuses: Vec<&str> =
            got.iter().filter_map(Datagram::status).filter(|s| s.starts_with("report ")).collect();
        assert!(statuses.len() >= 5, "statuses: {statuses:?}");
        assert_eq!(statuses[0], "report 0");
    }

    #[test]
    fn an_unhealthy_report_stops_the_pings_and_says_why() {
        let got = run_child("unhealthy", &[("WATCHDOG_USEC", "400000".to_owned())]);
        assert!(got[0].has("READY=1"));
        assert!(!got.iter().any(|d| d.has("WATCHDOG=1")), "pinged while unhealthy");
        let statuses: Vec<&str> = got.iter().filter_map(Datagram::status).collect();
        assert!(statuses.contains(&"unhealthy: report stuck"), "statuses: {statuses:?}");
    }

    #[test]
    fn a_hung_report_stops_the_pings() {
        let got = run_child("hung", &[("WATCHDOG_USEC", "400000".to_owned())]);
        assert!(!got.iter().any(|d| d.has("WATCHDOG=1")), "pinged while the report hung");
        let statuses: Vec<&str> = got.iter().filter_map(Datagram::status).collect();
        assert!(
            statuses.iter().any(|s| s.starts_with("unhealthy: the status check did not return within 100 ms")),
            "statuses: {statuses:?}"
        );
        // The next checks do not pile up threads behind the hung one.
        assert!(
            statuses.iter().any(|s| s.starts_with("unhealthy: the status check started")),
            "statuses: {statuses:?}"
        );
    }

    #[test]
    fn a_watchdog_for_another_process_is_not_fed() {
        let got = run_child("not-for-us", &[("WATCHDOG_USEC", "200000".to_owned()), ("WATCHDOG_PID", "1".to_owned())]);
        assert!(got[0].has("READY=1"));
        assert!(!got.iter().any(|d| d.has("WATCHDOG=1")), "fed a watchdog that is not ours");
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        // The child asserts that spawn_watchdog starts nothing; ready() must neither fail nor
        // panic with no socket to send to.
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "notify::tests::service_child", "--ignored", "--test-threads=1", "--nocapture"])
            .env(SCENARIO_VAR, "no-socket")
            .env_remove("NOTIFY_SOCKET")
            .env("WATCHDOG_USEC", "200000")
            .output()
            .expect("run the child");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn status_lines_are_one_bounded_line() {
        assert_eq!(status_line("a\nb\tc"), "a b c");
        let long = "é".repeat(STATUS_BYTES_MAX);
        let cut = status_line(&long);
        assert!(cut.len() <= STATUS_BYTES_MAX && cut.len() >= STATUS_BYTES_MAX - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn counts_are_plural_unless_one() {
        assert_eq!([plural(0, "job"), plural(1, "job"), plural(4, "slot")], ["0 jobs", "1 job", "4 slots"]);
    }
}
