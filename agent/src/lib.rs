//! `gaffer-agent`: the agent that runs on each GPU box.
//!
//! * [`enroll`]: one-time enrollment with a token, verifying the control plane by CA fingerprint;
//!   re-enrollment (`--renew`) of an agent whose certificate expired, keeping its identity.
//! * [`credentials`]: the key and certificate on disk, their renewal at half life, the trust bundle.
//! * [`link`]: the mTLS QUIC link: Hello, heartbeats, assignments, outbox delivery, reconnects.
//! * [`outbox`]: durable, acknowledged delivery of everything that matters.
//! * [`runner`]: the durable job queue; runs assigned jobs within the configured slots.
//! * [`worker`]: each job's decode and analysis in a child process with time and memory limits.
//! * [`analysis`]: FFmpeg decode → shot detection, keyframes, technical metadata → digest.
//! * [`health`]: host and GPU (NVML) health.
//! * [`models`]: ONNX Runtime provisioning, the model registry, execution-provider selection.
//! * [`speech`]: speech segments from the audio track (FFmpeg resampling + Silero VAD).
//! * [`vision`]: NudeNet moderation and PP-OCRv4 on-screen text on sampled frames.
//! * [`watch`]: watch folders that turn new media files into jobs.
//! * [`control_socket`]: `agent.sock`, through which `status` and bundle commands reach a running agent.
//! * [`release_key`]: the release public key pinned at enrollment (releases must be signed by it).
//! * [`update`]: self-update: staged releases, the re-exec into a new version, its health gate and
//!   the automatic rollback.
//! * [`bundle`]: offline-sync bundles (export to, and replies from, the control plane).
//! * [`datadir`]: the data directory layout.
//! * [`service`]: systemd notifications (`READY=1`, `STATUS=`, the watchdog, `STOPPING=1`).
//! * [`config`]: the configuration file (`/etc/gaffer/agent.toml`) of `run`, checked by `validate`.
//!
//! Architecture invariant: nothing in this crate sends frames, audio or file bytes to the network;
//! the only things that leave the box are [`gaffer_protocol`] messages (metadata and health).
#![warn(missing_docs)]

pub mod analysis;
pub mod bundle;
pub mod config;
pub mod control_socket;
pub mod credentials;
pub mod custody;
pub mod datadir;
pub mod enroll;
pub mod health;
pub mod link;
pub mod models;
pub mod outbox;
pub mod release_key;
pub mod runner;
pub mod service;
pub mod speech;
pub mod update;
pub mod vision;
pub mod watch;
pub mod worker;

use std::path::Path;

/// Errors of the agent library.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory has no enrollment yet.
    #[error("{data_dir} is not enrolled: run `gaffer-agent enroll --data-dir {data_dir} ...` first")]
    NotEnrolled {
        /// The data directory.
        data_dir: String,
    },
    /// `enroll` was run on a data directory that is already enrolled.
    #[error("{data_dir} is already enrolled; {advice}")]
    AlreadyEnrolled {
        /// The data directory.
        data_dir: String,
        /// What to do instead (`--renew` when its certificate has expired, a new data dir for
        /// another agent).
        advice: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Invalid configuration or arguments; the message says which.
    #[error("{0}")]
    Config(String),
    /// Certificates or keys could not be made or used.
    #[error(transparent)]
    Cert(#[from] gaffer_certs::CertError),
    /// The control plane could not be reached or the connection failed; retrying may help.
    #[error("cannot reach the control plane at {addr}: {detail}")]
    Unreachable {
        /// `HOST:PORT`.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The control plane refused us; the reason says what to do.
    #[error("the control plane refused: {0}")]
    Refused(String),
    /// The peer broke the protocol, or a message could not be framed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A reply bundle is addressed to another agent; nothing was imported.
    #[error("this reply bundle is for agent {agent_id}, not this agent; nothing was imported")]
    BundleNotForThisAgent {
        /// The agent it is for.
        agent_id: gaffer_protocol::messages::AgentId,
    },
    /// A reply bundle is older than one already imported; nothing was imported.
    #[error("reply bundle {number} is older than reply {last} already imported; nothing was imported")]
    BundleOutdated {
        /// This reply's number.
        number: u64,
        /// The last imported.
        last: u64,
    },
    /// A self-update could not be fetched, verified, unpacked or started; the agent keeps running
    /// the version it has. The message says what failed.
    #[error("self-update: {0}")]
    Update(String),
    /// The local state database failed.
    #[error("agent state database: {0}")]
    State(#[from] sled::Error),
    /// The control plane offered another release key than the one expected (`enroll
    /// --release-key-fingerprint`), or none. Nothing was stored; check the fingerprint against
    /// what `gaffer-control release keygen` printed.
    #[error("release key mismatch: {0}")]
    ReleaseKeyMismatch(String),
}

/// The version this agent reports (in `--version`, the enrollment request and every Hello): the
/// one the binary set with [`set_build_version`] (`GAFFER_BUILD_VERSION` when the binary was
/// built, else the crate version), else this crate's version.
///
/// The binary reads `GAFFER_BUILD_VERSION` with `option_env!` and hands it here, so a build with
/// another version recompiles only the binary's own crate, not this library.
pub fn build_version() -> &'static str {
    BUILD_VERSION.get().copied().unwrap_or(env!("CARGO_PKG_VERSION"))
}

/// Sets what [`build_version`] returns, once, at the start of `main`; later calls change nothing.
pub fn set_build_version(version: &'static str) {
    let _ = BUILD_VERSION.set(version);
}

static BUILD_VERSION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

impl AgentError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        AgentError::Io { path: path.display().to_string(), source }
    }
}

impl From<gaffer_protocol::CodecError> for AgentError {
    fn from(e: gaffer_protocol::CodecError) -> Self {
        AgentError::Protocol(e.to_string())
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Unix milliseconds as an RFC 3339 UTC time to the second (`2026-12-01T12:53:50Z`), for logs and
/// messages.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// This host's name, for display (empty if unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}
