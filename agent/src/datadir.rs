//! The agent's data directory.
//!
//! ```text
//! DATA_DIR/          0700
//!   agent.json       identity and where the control plane is (written by `enroll`)
//!   agent.key        the agent's private key, generated here, 0600; never leaves the box
//!   agent.pem        the agent's certificate (URI SAN urn:gaffer:agent:<id>), signed by the fleet CA
//!   agent.next.key   during a renewal: the new key, 0600, written before its CSR is sent
//!   agent.next.pem   during a renewal: the new key's certificate, until a connection with it is welcomed
//!   cert-installed.json  serial and arrival time of the newest certificate (renewal timing)
//!   ca.pem           the trust bundle: the fleet CA, or the old and new CA during a CA rotation
//!   release.pub      the control plane's release public key (32 bytes, 0644), pinned at enrollment
//!                    or from the link when the agent enrolled before it existed (see release_key)
//!   state/           sled database: the outbox, the job queue and the watch-folder ledger (see outbox, runner)
//!   agent.sock       control socket, 0600, while `run` runs (see control_socket)
//! ```

use std::path::{Path, PathBuf};

use gaffer_protocol::messages::AgentId;
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// `agent.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentIdentity {
    /// The agent's id (its certificate's URI SAN).
    pub agent_id: AgentId,
    /// The site it enrolled into.
    pub site: String,
    /// `HOST:PORT` of the control plane's QUIC endpoint.
    pub control_addr: String,
    /// SHA-256 fingerprint of the fleet CA, lowercase hex.
    pub ca_fingerprint: String,
    /// When it enrolled, Unix milliseconds.
    pub enrolled_at_ms: u64,
    /// The control plane's age X25519 recipient (`age1...`) that offline-sync bundles are
    /// encrypted to; None for agents enrolled before offline sync.
    #[serde(default)]
    pub bundle_recipient: Option<String>,
}

/// Paths inside an agent data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (not checked).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `agent.json`.
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("agent.json")
    }
    /// Private key (0600).
    pub fn key_path(&self) -> PathBuf {
        self.root.join("agent.key")
    }
    /// Certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.root.join("agent.pem")
    }
    /// The renewal key (0600), made on the box before its CSR is sent (see [`crate::credentials`]).
    pub fn next_key_path(&self) -> PathBuf {
        self.root.join("agent.next.key")
    }
    /// The renewal key's certificate, kept apart until a connection with it has been welcomed.
    pub fn next_cert_path(&self) -> PathBuf {
        self.root.join("agent.next.pem")
    }
    /// When the newest certificate arrived (JSON: serial and Unix milliseconds).
    pub fn cert_installed_path(&self) -> PathBuf {
        self.root.join("cert-installed.json")
    }
    /// The trust bundle: one to four fleet CA certificates, PEM, concatenated.
    pub fn ca_path(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// sled state.
    pub fn state_path(&self) -> PathBuf {
        self.root.join("state")
    }
    /// The capabilities `run` last advertised (JSON), for offline-sync bundles.
    pub fn capabilities_path(&self) -> PathBuf {
        self.root.join("capabilities.json")
    }
    /// Control socket of the running agent.
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("agent.sock")
    }

    /// Reads `agent.json`.
    ///
    /// # Errors
    /// [`AgentError::NotEnrolled`] if the agent has not enrolled, [`AgentError::Io`] otherwise.
    pub fn load_identity(&self) -> Result<AgentIdentity, AgentError> {
        let path = self.identity_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AgentError::NotEnrolled { data_dir: self.root.display().to_string() }
            } else {
                AgentError::io(&path, e)
            }
        })?;
        serde_json::from_str(&text).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }

    /// Reads one of the data directory's text files.
    ///
    /// # Errors
    /// [`AgentError::Io`].
    pub fn read(&self, path: &Path) -> Result<String, AgentError> {
        std::fs::read_to_string(path).map_err(|e| AgentError::io(path, e))
    }

    /// Creates the directory with mode 0700.
    ///
    /// # Errors
    /// [`AgentError::AlreadyEnrolled`] if `agent.json` exists (its advice names `--renew` when the
    /// certificate has expired), [`AgentError::Io`].
    pub fn create(&self) -> Result<(), AgentError> {
        if self.identity_path().exists() {
            let data_dir = self.root.display().to_string();
            let expired_at = std::fs::read(self.cert_path())
                .ok()
                .and_then(|pem| gaffer_certs::cert_not_after_unix(&pem).ok())
                .filter(|not_after| *not_after <= (crate::now_ms() / 1000) as i64);
            let advice = match expired_at {
                Some(not_after) => format!(
                    "its certificate expired at {}: re-enroll it keeping its agent id, \
                     job queue and outbox with `gaffer-agent enroll --data-dir {data_dir} --renew --token TOKEN \
                     --ca-fingerprint FINGERPRINT` (a fresh token from `gaffer-control token create`)",
                    crate::rfc3339_ms(u64::try_from(not_after).unwrap_or(0) * 1000)
                ),
                None => "use a new --data-dir to enroll another agent, or `gaffer-agent enroll --renew` with a \
                         fresh token to give this one a new certificate"
                    .to_owned(),
            };
            return Err(AgentError::AlreadyEnrolled { data_dir, advice });
        }
        Ok(gaffer_certs::create_private_dir(&self.root)?)
    }

    /// Writes `agent.json` atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    /// [`AgentError::Cert`] (I/O) when it cannot be written.
    pub fn store_identity(&self, identity: &AgentIdentity) -> Result<(), AgentError> {
        let json = serde_json::to_vec_pretty(identity).map_err(|e| AgentError::Config(e.to_string()))?;
        gaffer_certs::write_secret_file(&self.identity_path(), &json)?;
        Ok(())
    }
}

/// Opens a sled database, waiting up to `wait` while another holder releases its lock: a
/// short-lived command (`status`, `bundle`) or, in the same process, the background flusher of a
/// just-dropped instance. A holder that keeps it (a second `gaffer-agent run` on the same data
/// dir) is reported after `wait`.
///
/// # Errors
/// [`AgentError::State`] when the database cannot be opened.
pub fn open_state_db(path: &Path, wait: std::time::Duration) -> Result<sled::Db, AgentError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match sled::open(path) {
            Ok(db) => return Ok(db),
            // sled reports a held lock as an I/O error of kind Other with this text.
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
