//! The control plane's data directory.
//!
//! ```text
//! DATA_DIR/                 0700
//!   config.json             listen addresses, server names (written by `init`, read by `serve`)
//!   ca.pem                  fleet CA certificate (public; its SHA-256 is the fingerprint agents check)
//!   ca.key                  fleet CA private key, 0600
//!   server.pem, server.key  the server certificate (SANs = server names) and key (0600), renewed
//!                           by `serve` at half its lifetime (see identity)
//!   ca-next.pem, ca-next.key, ca-rotation.json   during a CA rotation (see identity)
//!   store/                  sled database (see store::sled_store)
//!   control.sock            admin socket, 0600, present while `serve` runs
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or writing the data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory has not been initialized.
    #[error("{path} is not an initialized data directory: run `gaffer-control init --data-dir {path}` first")]
    NotInitialized {
        /// The directory.
        path: String,
    },
    /// `init` was run on a directory that already holds a control plane.
    #[error("{path} already holds a control plane (config.json exists); refusing to overwrite its CA")]
    AlreadyInitialized {
        /// The directory.
        path: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// config.json is not valid.
    #[error("{path}: invalid configuration: {detail}")]
    BadConfig {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// UDP address of the QUIC endpoint (agent link and enrollment). Default `0.0.0.0:7443`.
    pub quic_listen: SocketAddr,
    /// TCP address of the dashboard and API. Default `127.0.0.1:8080`.
    pub http_listen: SocketAddr,
    /// Names (DNS or IP) agents use to reach the control plane: the server certificate's SANs.
    pub server_names: Vec<String>,
    /// Display name of the fleet (in the CA's common name).
    pub fleet_name: String,
    /// Lifetime of the agent certificates issued (and of the server certificate), seconds
    /// (`init --agent-cert-ttl`, default 7 days; `serve --agent-cert-ttl` overrides it). Data
    /// directories from before it existed get the default.
    #[serde(default = "default_agent_cert_ttl_secs")]
    pub agent_cert_ttl_secs: u64,
}

fn default_agent_cert_ttl_secs() -> u64 {
    crate::identity::AGENT_CERT_TTL_SECS_DEFAULT
}

/// Paths inside a data directory.
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
    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }
    /// Fleet CA certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// Fleet CA key (0600).
    pub fn ca_key_path(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// Server certificate.
    pub fn server_cert_path(&self) -> PathBuf {
        self.root.join("server.pem")
    }
    /// Server key (0600).
    pub fn server_key_path(&self) -> PathBuf {
        self.root.join("server.key")
    }
    /// sled database directory.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("store")
    }
    /// `store.url` (0600): the PostgreSQL URL `init --store` was given, which `serve` and the
    /// offline commands use instead of the sled directory. Absent: sled at [`DataDir::store_path`].
    pub fn store_url_path(&self) -> PathBuf {
        self.root.join("store.url")
    }
    /// Admin socket.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// Reads `config.json`.
    ///
    /// # Errors
    /// [`DataDirError::NotInitialized`] when it does not exist, [`DataDirError::BadConfig`] when it
    /// does not parse.
    pub fn load_config(&self) -> Result<ControlConfig, DataDirError> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataDirError::NotInitialized { path: self.root.display().to_string() }
            } else {
                DataDirError::Io { path: path.display().to_string(), source: e }
            }
        })?;
        serde_json::from_str(&text)
            .map_err(|e| DataDirError::BadConfig { path: path.display().to_string(), detail: e.to_string() })
    }

    /// Reads a text file of the data directory.
    ///
    /// # Errors
    /// [`DataDirError::Io`].
    pub fn read(&self, path: &Path) -> Result<String, DataDirError> {
        std::fs::read_to_string(path).map_err(|e| DataDirError::Io { path: path.display().to_string(), source: e })
    }

    /// Writes a public file (certificate, config), 0644.
    ///
    /// # Errors
    /// [`DataDirError::Io`].
    pub fn write_public(&self, path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
        std::fs::write(path, contents).map_err(|e| DataDirError::Io { path: path.display().to_string(), source: e })
    }

    /// Creates the directory with mode 0700 (and refuses one that already holds a config).
    ///
    /// # Errors
    /// [`DataDirError::AlreadyInitialized`], [`DataDirError::Io`].
    pub fn create(&self) -> Result<(), DataDirError> {
        if self.config_path().exists() {
            return Err(DataDirError::AlreadyInitialized { path: self.root.display().to_string() });
        }
        gaffer_certs::create_private_dir(&self.root).map_err(|e| match e {
            gaffer_certs::CertError::Io { source, .. } => {
                DataDirError::Io { path: self.root.display().to_string(), source }
            }
            other => DataDirError::Io { path: self.root.display().to_string(), source: std::io::Error::other(other) },
        })
    }

    /// Writes the fleet CA (`ca.pem`, `ca.key` 0600) and the server certificate (`server.pem`,
    /// `server.key` 0600), as `init` leaves them.
    ///
    /// # Errors
    /// [`DataDirError::Io`].
    pub fn write_pki(
        &self,
        ca: &gaffer_certs::FleetCa,
        server: &gaffer_certs::IssuedKeyPair,
    ) -> Result<(), DataDirError> {
        self.write_secret(&self.ca_key_path(), ca.key_pem().as_bytes())?;
        self.write_public(&self.ca_cert_path(), ca.cert_pem().as_bytes())?;
        self.write_secret(&self.server_key_path(), server.key_pem.as_bytes())?;
        self.write_public(&self.server_cert_path(), server.cert_pem.as_bytes())
    }

    fn write_secret(&self, path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
        gaffer_certs::write_secret_file(path, contents).map_err(|e| match e {
            gaffer_certs::CertError::Io { source, .. } => DataDirError::Io { path: path.display().to_string(), source },
            other => DataDirError::Io { path: path.display().to_string(), source: std::io::Error::other(other) },
        })
    }
}
