//! The real binaries speak systemd's notify protocol as the `Type=notify` units in
//! `installers/systemd/` expect: `READY=1` with a `STATUS=` line once they serve, `WATCHDOG=1`
//! at half of `WATCHDOG_USEC` while healthy, `STOPPING=1` on SIGTERM. The test plays systemd: it
//! binds the `NOTIFY_SOCKET` datagram socket and sets the variables, as the service manager does.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gaffer_tests::{bin, media_dir, Agent, ControlPlane};

/// The service manager's end: every datagram the service sent, as text.
struct Manager {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl Manager {
    fn bind(dir: &Path) -> anyhow::Result<(Self, std::path::PathBuf)> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok((Self { socket, received: Vec::new() }, path))
    }

    /// Reads datagrams until one satisfies `pred` (returned) or `limit` passes.
    fn wait_for(&mut self, limit: Duration, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.received.push(msg.clone());
                    if pred(&msg) {
                        return Ok(msg);
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no {what} within {limit:?}; received: {:?}", self.received)
    }

    fn count(&self, line: &str) -> usize {
        self.received.iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

fn status_of(msg: &str) -> Option<&str> {
    msg.lines().find_map(|l| l.strip_prefix("STATUS="))
}

fn sigterm(child: &Child) -> anyhow::Result<()> {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    Ok(())
}

/// What systemd sets for a unit with `WatchdogSec=2s`: pings are due every second.
fn under_systemd(cmd: &mut Command, socket: &Path) {
    cmd.env("NOTIFY_SOCKET", socket).env("WATCHDOG_USEC", "2000000").env_remove("WATCHDOG_PID");
}

/// Checks the whole conversation of one service: ready with a status, fed watchdog, stopping.
fn check_conversation(
    manager: &mut Manager,
    mut child: Child,
    status_says: &str,
    log: impl Fn() -> String,
) -> anyhow::Result<()> {
    let ready = manager
        .wait_for(Duration::from_secs(30), "READY=1", |m| m.lines().any(|l| l == "READY=1"))
        .with_context(|| format!("log:\n{}", log()))?;
    let status = status_of(&ready).unwrap_or_default().to_owned();
    anyhow::ensure!(status.contains(status_says), "READY=1 came with STATUS={status:?}, expected {status_says:?}");
    // Two pings after READY, at the 1 s interval (bound: 10 s, a correctness bound only).
    let pings_before = manager.count("WATCHDOG=1");
    manager.wait_for(Duration::from_secs(10), "two watchdog pings", |_| false).ok();
    let pings = manager.count("WATCHDOG=1") - pings_before;
    anyhow::ensure!(pings >= 2, "{pings} WATCHDOG=1 in 10 s with WATCHDOG_USEC=2s; received {:?}", manager.received);
    sigterm(&child)?;
    manager
        .wait_for(Duration::from_secs(15), "STOPPING=1", |m| m.lines().any(|l| l == "STOPPING=1"))
        .with_context(|| format!("log:\n{}", log()))?;
    let exit = child.wait()?;
    anyhow::ensure!(exit.success(), "exited with {exit} after SIGTERM; log:\n{}", log());
    Ok(())
}

#[test]
fn the_control_plane_tells_systemd_it_is_ready_feeds_the_watchdog_and_says_stopping() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("control");
    let init = Command::new(bin("gaffer-control"))
        .args(["init", "--json", "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--server-name", "localhost"])
        .arg("--data-dir")
        .arg(&data)
        .output()?;
    anyhow::ensure!(init.status.success(), "init failed: {}", String::from_utf8_lossy(&init.stderr));
    let (mut manager, socket) = Manager::bind(dir.path())?;
    let log_path = dir.path().join("control.log");
    let mut cmd = Command::new(bin("gaffer-control"));
    cmd.arg("serve").arg("--data-dir").arg(&data).stdout(Stdio::null()).stderr(std::fs::File::create(&log_path)?);
    under_systemd(&mut cmd, &socket);
    let child = cmd.spawn()?;
    check_conversation(&mut manager, child, "QUIC udp/", || std::fs::read_to_string(&log_path).unwrap_or_default())
}

#[test]
fn the_agent_tells_systemd_it_is_ready_feeds_the_watchdog_and_says_stopping() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let agent = Agent::enroll(&cp, "notify")?;
    let dir = tempfile::tempdir()?;
    let (mut manager, socket) = Manager::bind(dir.path())?;
    let log_path = dir.path().join("agent.log");
    let mut cmd = Command::new(bin("gaffer-agent"));
    cmd.arg("run").arg("--data-dir").arg(agent.data_dir()).arg("--volume").arg(media_dir());
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log_path)?);
    under_systemd(&mut cmd, &socket);
    let child = cmd.spawn()?;
    // The status names the control plane the agent dials.
    let control = cp.quic_addr.clone();
    check_conversation(&mut manager, child, &control, || std::fs::read_to_string(&log_path).unwrap_or_default())
}
