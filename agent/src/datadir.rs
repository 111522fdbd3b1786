//! The agent's data directory.
//!
//! ```text
//! DATA_DIR/          0700
//!   agent.json       identity and where the control plane is (written by `enroll`)
//!   agent.key        the agent's private key, generated here, 0600; never leaves the box
//!   agent.pem        the agent's certificate (URI SAN urn:gaffer:agent:<id>), signed by the fleet CA
//!   ca.pem           the fleet CA, the only root the agent trusts
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
    /// Fleet CA.
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
    /// [`AgentError::AlreadyEnrolled`] if `agent.json` exists, [`AgentError::Io`].
    pub fn create(&self) -> Result<(), AgentError> {
        if self.identity_path().exists() {
            return Err(AgentError::AlreadyEnrolled { data_dir: self.root.display().to_string() });
        }
        Ok(gaffer_certs::create_private_dir(&self.root)?)
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
