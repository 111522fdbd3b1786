//! The agent's local control socket, `DATA_DIR/agent.sock` (mode 0600 in the 0700 data dir).
//!
//! `gaffer-agent run` holds the sled state database, which one process at a time may open, so
//! commands that need the state while the agent runs (`status`, bundle export/import) ask the
//! running agent through this socket: one JSON request line, one JSON response line. When no agent
//! runs, the commands open the state themselves.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::link::{LinkState, LinkStatus};
use crate::outbox::Outbox;
use crate::runner::Runner;
use crate::AgentError;

/// Largest request or response line, bytes.
pub const LINE_BYTES_MAX: usize = 1024 * 1024;
/// How long a client waits for the agent's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What `gaffer-agent status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The agent's id.
    pub agent_id: String,
    /// Its site.
    pub site: String,
    /// `up`, `connecting`, `down` (reconnecting), `offline` (`run --offline`) or `stopped` (no
    /// agent process running).
    pub link: String,
    /// Messages waiting for acknowledgement.
    pub outbox_pending: u64,
    /// Their size, bytes.
    pub outbox_bytes: u64,
    /// Whether the outbox is at its bound (no new jobs are taken).
    pub outbox_full: bool,
    /// Age of the oldest unacknowledged message, seconds.
    pub oldest_unacked_age_secs: Option<f64>,
    /// Jobs running now.
    pub jobs_running: u32,
    /// Jobs waiting for a slot.
    pub jobs_queued: u32,
    /// Configured slots (0 when stopped).
    pub job_slots: u32,
    /// Serial of the certificate in use (the newest one on disk), lowercase hex.
    #[serde(default)]
    pub cert_serial: Option<String>,
    /// Its `notAfter`, Unix milliseconds.
    #[serde(default)]
    pub cert_not_after_ms: Option<u64>,
    /// When it is renewed next (half its lifetime, or later after a refusal), Unix milliseconds.
    #[serde(default)]
    pub cert_renewal_at_ms: Option<u64>,
    /// A renewal is under way: a renewal key or a renewed certificate not yet switched to is on disk.
    #[serde(default)]
    pub cert_renewal_pending: bool,
    /// The last renewal problem of the running agent (cleared by a renewal).
    #[serde(default)]
    pub cert_renewal_error: Option<String>,
    /// Fingerprint (SHA-256, hex) of the pinned release public key (`release.pub`); None when
    /// none is pinned yet.
    #[serde(default)]
    pub release_key_fingerprint: Option<String>,
}

impl StatusReport {
    /// Builds a report from live state.
    ///
    /// # Errors
    /// [`AgentError::State`] if the outbox cannot be read.
    pub fn collect(
        agent_id: &str,
        site: &str,
        link: &str,
        outbox: &Outbox,
        runner: Option<&Runner>,
    ) -> Result<Self, AgentError> {
        let oldest = outbox.oldest_enqueued_at_ms()?;
        Ok(Self {
            agent_id: agent_id.to_owned(),
            site: site.to_owned(),
            link: link.to_owned(),
            outbox_pending: outbox.len(),
            outbox_bytes: outbox.bytes(),
            outbox_full: outbox.is_full(),
            oldest_unacked_age_secs: oldest.map(|t| crate::now_ms().saturating_sub(t) as f64 / 1000.0),
            jobs_running: runner.map_or(0, Runner::jobs_running),
            jobs_queued: runner.map_or(0, Runner::jobs_queued),
            job_slots: runner.map_or(0, Runner::job_slots),
            cert_serial: None,
            cert_not_after_ms: None,
            cert_renewal_at_ms: None,
            cert_renewal_pending: false,
            cert_renewal_error: None,
            release_key_fingerprint: None,
        })
    }

    /// Adds the certificate fields and the pinned release key from the data directory and, for a
    /// running agent, the link's renewal state. Unreadable key files leave them empty (status still
    /// reports the rest).
    pub fn with_certificate(
        mut self,
        dd: &crate::datadir::DataDir,
        agent_id: gaffer_protocol::messages::AgentId,
        renewal: Option<&crate::link::RenewalStatus>,
    ) -> Self {
        self.release_key_fingerprint = crate::release_key::pinned_fingerprint(dd).map(|f| f.to_string());
        let Ok(creds) = crate::credentials::Credentials::load(dd, agent_id) else { return self };
        if let Some(pair) = creds.newest() {
            let due = creds.renewal_due_at_ms(pair);
            self.cert_serial = Some(pair.serial_hex.clone());
            self.cert_not_after_ms = Some(pair.not_after_ms);
            self.cert_renewal_at_ms = Some(renewal.and_then(|r| r.retry_at_ms).map_or(due, |retry| retry.max(due)));
        }
        self.cert_renewal_pending = creds.next_key_present || creds.next.is_some();
        self.cert_renewal_error = renewal.and_then(|r| r.last_error.clone());
        self
    }
}

/// A request on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Report status.
    Status,
    /// Write an offline-sync bundle of everything unacknowledged to `out` (absolute path).
    BundleExport {
        /// Where to write it.
        out: std::path::PathBuf,
    },
    /// Apply a reply bundle (absolute path) and queue its jobs.
    BundleImport {
        /// The reply bundle.
        file: std::path::PathBuf,
    },
}

/// A response on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Answer to [`ControlRequest::Status`].
    Status(StatusReport),
    /// Answer to [`ControlRequest::BundleExport`].
    BundleExported(crate::bundle::ExportReport),
    /// Answer to [`ControlRequest::BundleImport`].
    BundleImported(crate::bundle::ReplyImportReport),
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// What the socket server needs from the running agent.
pub struct AgentHandles {
    /// Agent id.
    pub agent_id: String,
    /// Site.
    pub site: String,
    /// The outbox.
    pub outbox: Outbox,
    /// The runner.
    pub runner: Arc<Runner>,
    /// Link state (None in `--offline` mode).
    pub link: Option<Arc<LinkStatus>>,
    /// The state database.
    pub db: sled::Db,
    /// The data directory.
    pub data_dir: crate::datadir::DataDir,
    /// The updater: a release a reply bundle staged is handed to it.
    pub updates: tokio::sync::mpsc::Sender<crate::update::UpdateCommand>,
}

impl AgentHandles {
    fn link_name(&self) -> &'static str {
        match self.link.as_ref().map(|l| l.get()) {
            None => "offline",
            Some(LinkState::Up) => "up",
            Some(LinkState::Connecting) => "connecting",
            Some(LinkState::Down) => "down",
        }
    }

    fn handle(&self, req: ControlRequest) -> ControlResponse {
        let result = match req {
            ControlRequest::Status => {
                StatusReport::collect(&self.agent_id, &self.site, self.link_name(), &self.outbox, Some(&self.runner))
                    .map(|r| match self.agent_id.parse() {
                        Ok(id) => {
                            r.with_certificate(&self.data_dir, id, self.link.as_ref().map(|l| l.renewal()).as_ref())
                        }
                        Err(_) => r,
                    })
                    .map(ControlResponse::Status)
            }
            ControlRequest::BundleExport { out } => {
                crate::bundle::export(&self.db, &self.data_dir, &self.outbox, &out).map(ControlResponse::BundleExported)
            }
            ControlRequest::BundleImport { file } => {
                crate::bundle::import(&self.db, &self.data_dir, &self.outbox, &file).and_then(|report| {
                    // Jobs the reply brought start now.
                    self.runner.enqueue_offline_assignments()?;
                    // A release it brought is applied once the agent runs no job.
                    if let crate::bundle::ReplyImportReport::Imported {
                        release: Some(crate::update::BundledOutcome::Staged { exe, .. }),
                        ..
                    } = &report
                    {
                        if let Some(staged) = crate::update::bundled_staged(&self.data_dir).filter(|s| s.exe == *exe) {
                            let cmd = crate::update::UpdateCommand::Staged { order: staged.order, exe: staged.exe };
                            if let Err(e) = self.updates.try_send(cmd) {
                                tracing::warn!(error = %e, "the updater is busy; the staged release is applied at the next start");
                            }
                        }
                    }
                    Ok(ControlResponse::BundleImported(report))
                })
            }
        };
        result.unwrap_or_else(|e| ControlResponse::Error { message: e.to_string() })
    }
}

/// Serves the socket until the returned task is aborted. Refuses to start if another agent answers
/// on it; removes a stale socket file.
///
/// # Errors
/// [`AgentError::Io`] if the socket cannot be bound; [`AgentError::Config`] if another agent runs.
pub async fn serve(path: &Path, handles: Arc<AgentHandles>) -> Result<tokio::task::JoinHandle<()>, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(AgentError::Config(format!(
                "another gaffer-agent is running on this data dir ({})",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| AgentError::io(path, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| AgentError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| AgentError::io(path, e))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handles = handles.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let resp = match read_line_bounded(read).await {
                    Ok(line) => match serde_json::from_str::<ControlRequest>(&line) {
                        Ok(req) => {
                            let h = handles.clone();
                            tokio::task::spawn_blocking(move || h.handle(req))
                                .await
                                .unwrap_or_else(|e| ControlResponse::Error { message: format!("internal error: {e}") })
                        }
                        Err(e) => ControlResponse::Error { message: format!("bad request: {e}") },
                    },
                    Err(e) => ControlResponse::Error { message: format!("bad request: {e}") },
                };
                if let Ok(mut out) = serde_json::to_vec(&resp) {
                    out.push(b'\n');
                    let _ = write.write_all(&out).await;
                    let _ = write.shutdown().await;
                }
            });
        }
    }))
}

async fn read_line_bounded(read: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<String> {
    let mut reader = BufReader::new(read.take(LINE_BYTES_MAX as u64 + 1));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if line.len() > LINE_BYTES_MAX {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(line)
}

/// Sends one request to a running agent. `Ok(None)` when no agent is listening.
///
/// # Errors
/// [`AgentError::Io`] on socket errors or timeouts, [`AgentError::Refused`] when the agent
/// answered with an error.
pub async fn request(path: &Path, req: &ControlRequest) -> Result<Option<ControlResponse>, AgentError> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(AgentError::io(path, e)),
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        write.write_all(&line).await?;
        write.shutdown().await?;
        read_line_bounded(read).await
    };
    let line = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| AgentError::io(path, std::io::Error::new(std::io::ErrorKind::TimedOut, "agent did not answer")))?
        .map_err(|e| AgentError::io(path, e))?;
    match serde_json::from_str::<ControlResponse>(&line) {
        Ok(ControlResponse::Error { message }) => Err(AgentError::Refused(message)),
        Ok(resp) => Ok(Some(resp)),
        Err(e) => Err(AgentError::Protocol(format!("unreadable answer from the agent: {e}"))),
    }
}
