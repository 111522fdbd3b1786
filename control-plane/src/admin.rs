//! Operator actions that mint secrets (enrollment tokens, API tokens), and the local admin socket
//! through which CLI commands perform them while `serve` holds the store open.
//!
//! sled allows one process per database, so while `gaffer-control serve` runs, `gaffer-control
//! token create` cannot open the store itself. Instead `serve` listens on `DATA_DIR/control.sock`
//! (mode 0600, inside the 0700 data directory: only the data directory's owner can connect), and the
//! CLI sends one JSON request line and reads one JSON response line. When no server is running the
//! CLI opens the store directly and calls the same functions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gaffer_certs::{ApiToken, CaFingerprint, EnrollmentToken};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::offline::{ImportReport, OfflineEnrollReport, OfflineError, OfflineSync, RevokeReport};
use crate::store::{EnrollmentTokenRecord, Store, StoreError};

/// Largest request or response line on the admin socket, bytes.
pub const ADMIN_LINE_BYTES_MAX: usize = 64 * 1024;
/// How long the CLI waits for the server's answer.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the CLI waits for a bundle import (up to 256 MiB to verify, decrypt and apply).
pub const ADMIN_BUNDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest enrollment token lifetime accepted, seconds (30 days).
pub const ENROLL_TOKEN_TTL_SECS_MAX: u64 = 30 * 24 * 3600;

/// Errors of admin actions.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is invalid (bad site, TTL out of range).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The admin socket could not be used.
    #[error("admin socket {path}: {detail}")]
    Socket {
        /// Socket path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The server refused or failed the request.
    #[error("control plane refused the request: {0}")]
    Remote(String),
}

/// A request on the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Mint an enrollment token.
    CreateEnrollmentToken {
        /// Site of the agent that will use it.
        site: String,
        /// Lifetime, seconds.
        ttl_secs: u64,
    },
    /// Mint an API bearer token.
    CreateApiToken,
    /// Sign an offline enrollment request ([`OfflineSync::enroll_offline`]).
    EnrollOffline {
        /// Absolute path of the request file.
        request: std::path::PathBuf,
        /// Absolute path to write the reply to.
        out: std::path::PathBuf,
        /// OS user running the command, for the audit log.
        who: String,
    },
    /// Import an agent bundle and write the reply ([`OfflineSync::import_bundle`]).
    ImportBundle {
        /// Absolute path of the bundle file.
        bundle: std::path::PathBuf,
        /// Absolute path to write the reply bundle to.
        reply_out: std::path::PathBuf,
        /// OS user running the command, for the audit log.
        who: String,
    },
    /// Revoke an agent's certificate ([`OfflineSync::revoke_agent`]).
    RevokeAgent {
        /// The agent.
        agent_id: uuid::Uuid,
        /// OS user running the command, for the audit log.
        who: String,
    },
}

impl AdminRequest {
    /// The action's name, for logs (carries no secrets).
    pub fn action(&self) -> &'static str {
        match self {
            AdminRequest::CreateEnrollmentToken { .. } => "create_enrollment_token",
            AdminRequest::CreateApiToken => "create_api_token",
            AdminRequest::EnrollOffline { .. } => "enroll_offline",
            AdminRequest::ImportBundle { .. } => "import_bundle",
            AdminRequest::RevokeAgent { .. } => "revoke_agent",
        }
    }

    /// How long the CLI waits for the answer to this request.
    pub fn timeout(&self) -> Duration {
        match self {
            AdminRequest::ImportBundle { .. } => ADMIN_BUNDLE_TIMEOUT,
            _ => ADMIN_TIMEOUT,
        }
    }
}

/// A freshly minted enrollment token: shown once, never stored in clear.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MintedEnrollmentToken {
    /// The token (secret).
    pub token: String,
    /// SHA-256 fingerprint of the fleet CA, lowercase hex: the agent checks the control plane
    /// against it before sending the token.
    pub ca_fingerprint: String,
    /// Site the token enrolls into.
    pub site: String,
    /// Expiry, RFC 3339 UTC.
    pub expires_at: String,
}

/// A freshly minted API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MintedApiToken {
    /// The bearer token (secret).
    pub token: String,
}

/// A response on the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    /// Answer to [`AdminRequest::CreateEnrollmentToken`].
    EnrollmentToken(MintedEnrollmentToken),
    /// Answer to [`AdminRequest::CreateApiToken`].
    ApiToken(MintedApiToken),
    /// Answer to [`AdminRequest::EnrollOffline`].
    OfflineEnrolled(OfflineEnrollReport),
    /// Answer to [`AdminRequest::ImportBundle`].
    BundleImported(ImportReport),
    /// Answer to [`AdminRequest::RevokeAgent`].
    AgentRevoked(RevokeReport),
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Mints an enrollment token for `site`, valid for `ttl_secs`, storing only its hash.
///
/// # Errors
/// [`AdminError::Invalid`] for an invalid site or a TTL of 0 or above [`ENROLL_TOKEN_TTL_SECS_MAX`].
pub fn mint_enrollment_token(
    store: &dyn Store,
    ca_fingerprint: &CaFingerprint,
    site: &str,
    ttl_secs: u64,
) -> Result<MintedEnrollmentToken, AdminError> {
    crate::scheduler::validate_site(site).map_err(|e| AdminError::Invalid(e.to_string()))?;
    if ttl_secs == 0 || ttl_secs > ENROLL_TOKEN_TTL_SECS_MAX {
        return Err(AdminError::Invalid(format!(
            "--ttl must be between 1s and {}d",
            ENROLL_TOKEN_TTL_SECS_MAX / 86400
        )));
    }
    let token = EnrollmentToken::generate();
    let now = crate::now_ms();
    let expires_at_ms = now + ttl_secs * 1000;
    store.insert_enrollment_token(&EnrollmentTokenRecord {
        hash: *token.hash().as_bytes(),
        site: site.to_owned(),
        created_at_ms: now,
        expires_at_ms,
        used_at_ms: None,
        used_by: None,
    })?;
    store.flush()?;
    Ok(MintedEnrollmentToken {
        token: token.as_str().to_owned(),
        ca_fingerprint: ca_fingerprint.to_string(),
        site: site.to_owned(),
        expires_at: rfc3339_ms(expires_at_ms),
    })
}

/// Mints an API bearer token, storing only its hash.
///
/// # Errors
/// [`AdminError::Store`].
pub fn mint_api_token(store: &dyn Store) -> Result<MintedApiToken, AdminError> {
    let token = ApiToken::generate();
    store.insert_api_token(token.hash().as_bytes(), crate::now_ms())?;
    store.flush()?;
    Ok(MintedApiToken { token: token.as_str().to_owned() })
}

/// Formats Unix milliseconds as RFC 3339 UTC (second precision).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

/// Performs one admin request against `store` (and `offline` for the offline-sync actions). The
/// CLI calls it directly when no server runs; the admin socket calls it inside `serve`.
pub fn handle(
    store: &dyn Store,
    ca_fingerprint: &CaFingerprint,
    offline: Option<&OfflineSync>,
    req: AdminRequest,
) -> AdminResponse {
    let offline_action = |f: &dyn Fn(&OfflineSync) -> Result<AdminResponse, OfflineError>| match offline {
        Some(o) => f(o).map_err(|e| e.to_string()),
        None => Err("offline sync is not available in this process".to_owned()),
    };
    let result = match req {
        AdminRequest::CreateEnrollmentToken { site, ttl_secs } => {
            mint_enrollment_token(store, ca_fingerprint, &site, ttl_secs)
                .map(AdminResponse::EnrollmentToken)
                .map_err(|e| e.to_string())
        }
        AdminRequest::CreateApiToken => mint_api_token(store).map(AdminResponse::ApiToken).map_err(|e| e.to_string()),
        AdminRequest::EnrollOffline { request, out, who } => {
            offline_action(&|o| o.enroll_offline(&request, &out, &who).map(AdminResponse::OfflineEnrolled))
        }
        AdminRequest::ImportBundle { bundle, reply_out, who } => {
            offline_action(&|o| o.import_bundle(&bundle, &reply_out, &who).map(AdminResponse::BundleImported))
        }
        AdminRequest::RevokeAgent { agent_id, who } => {
            offline_action(&|o| o.revoke_agent(agent_id, &who).map(AdminResponse::AgentRevoked))
        }
    };
    result.unwrap_or_else(|message| AdminResponse::Error { message })
}

/// Listens on the admin socket until the task is dropped. Removes a stale socket file first and
/// creates the new one with mode 0600.
///
/// # Errors
/// [`AdminError::Socket`] if the socket cannot be bound.
pub async fn serve_admin_socket(
    path: &Path,
    store: Arc<dyn Store>,
    ca_fingerprint: CaFingerprint,
    offline: Option<Arc<OfflineSync>>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    let sock_err = |detail: String| AdminError::Socket { path: path.display().to_string(), detail };
    if path.exists() {
        // A leftover from a killed server; a live server would still answer.
        if UnixStream::connect(path).await.is_ok() {
            return Err(sock_err("another gaffer-control serve is running on this data directory".into()));
        }
        std::fs::remove_file(path).map_err(|e| sock_err(e.to_string()))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| sock_err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| sock_err(e.to_string()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let store = store.clone();
            let offline = offline.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, store, ca_fingerprint, offline).await {
                    tracing::warn!(error = %e, "admin socket request failed");
                }
            });
        }
    }))
}

async fn serve_one(
    stream: UnixStream,
    store: Arc<dyn Store>,
    fp: CaFingerprint,
    offline: Option<Arc<OfflineSync>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let line = read_line_bounded(read).await?;
    let resp = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(req) => {
            tracing::info!(action = req.action(), "admin request");
            tokio::task::spawn_blocking(move || handle(store.as_ref(), &fp, offline.as_deref(), req))
                .await
                .unwrap_or_else(|e| AdminResponse::Error { message: format!("internal error: {e}") })
        }
        Err(e) => AdminResponse::Error { message: format!("bad request: {e}") },
    };
    let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

async fn read_line_bounded(read: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<String> {
    let mut reader = BufReader::new(read.take(ADMIN_LINE_BYTES_MAX as u64 + 1));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if line.len() > ADMIN_LINE_BYTES_MAX {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(line)
}

use tokio::io::AsyncReadExt as _;

/// Sends one request to a running server's admin socket.
///
/// Returns `Ok(None)` when no server is listening (the caller then opens the store itself).
///
/// # Errors
/// [`AdminError::Socket`] on I/O errors or timeouts, [`AdminError::Remote`] when the server answered
/// with an error.
pub async fn request(path: &Path, req: &AdminRequest) -> Result<Option<AdminResponse>, AdminError> {
    let sock_err = |detail: String| AdminError::Socket { path: path.display().to_string(), detail };
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(sock_err(e.to_string())),
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        write.write_all(&line).await?;
        write.shutdown().await?;
        read_line_bounded(read).await
    };
    let line = tokio::time::timeout(req.timeout(), exchange)
        .await
        .map_err(|_| sock_err("timed out waiting for the control plane".into()))?
        .map_err(|e| sock_err(e.to_string()))?;
    match serde_json::from_str::<AdminResponse>(&line) {
        Ok(AdminResponse::Error { message }) => Err(AdminError::Remote(message)),
        Ok(resp) => Ok(Some(resp)),
        Err(e) => Err(sock_err(format!("unreadable answer: {e}"))),
    }
}
