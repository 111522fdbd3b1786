//! Operator actions (enrollment tokens, API tokens, users, and the offline actions of
//! [`crate::offline`]), and the local admin socket through which CLI commands perform them while
//! `serve` holds the store open.
//!
//! sled allows one process per database, so while `gaffer-control serve` runs, `gaffer-control
//! token create` cannot open the store itself. Instead `serve` listens on `DATA_DIR/control.sock`
//! (mode 0600, inside the 0700 data directory), and the CLI sends one JSON request line and reads
//! one JSON response line. When no server is running the CLI opens the store directly and calls the
//! same function, [`handle`].
//!
//! **Who did it.** The server decides the actor of every request, never the client: the peer's
//! uid from the socket (`SO_PEERCRED`), named from the user database ([`os_actor`]). A peer whose
//! uid is neither the data directory's owner nor root is refused. The CLI on the store directly
//! records its own real uid ([`local_actor`]). Every change is written to the audit log.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use gaffer_certs::{ApiToken, CaFingerprint, EnrollmentToken};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::offline::{ImportReport, OfflineEnrollReport, OfflineError, OfflineSync, RevokeReport};
use crate::store::{
    audit_action, Actor, ApiTokenRecord, AuditRecord, EnrollmentTokenRecord, Role, Store, StoreError, UserRecord,
    UserRemoval,
};

/// Largest request or response line on the admin socket, bytes.
pub const ADMIN_LINE_BYTES_MAX: usize = 64 * 1024;
/// Largest rollout answer on the admin socket, bytes (64 MiB: a rollout of
/// [`crate::rollout::ROLLOUT_TARGETS_MAX`] agents at ~400 bytes each, with room).
pub const ADMIN_STATUS_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long the CLI waits for the server's answer.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the CLI waits for a bundle import (up to 256 MiB to verify, decrypt and apply).
pub const ADMIN_BUNDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest enrollment token lifetime accepted, seconds (30 days).
pub const ENROLL_TOKEN_TTL_SECS_MAX: u64 = 30 * 24 * 3600;
/// Default API token lifetime, seconds (90 days).
pub const API_TOKEN_TTL_SECS_DEFAULT: u64 = 90 * 24 * 3600;
/// Longest API token lifetime accepted, seconds (365 days).
pub const API_TOKEN_TTL_SECS_MAX: u64 = 365 * 24 * 3600;
/// Shortest password accepted for a user, bytes.
pub const PASSWORD_BYTES_MIN: usize = 12;
/// Longest password accepted for a user (and at login), bytes: bounds the argon2 work.
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Longest user or API token name, bytes.
pub const NAME_BYTES_MAX: usize = 64;

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
    /// Mint an API bearer token ([`mint_api_token`]).
    CreateApiToken {
        /// Unique name ([`validate_name`]).
        name: String,
        /// What requests with it may do.
        role: Role,
        /// Lifetime, seconds (1 s to [`API_TOKEN_TTL_SECS_MAX`]).
        ttl_secs: u64,
    },
    /// List the API tokens (never their secrets).
    ListApiTokens,
    /// Revoke (delete) the API token with this name.
    RevokeApiToken {
        /// The token's name.
        name: String,
    },
    /// Add a user ([`add_user`]).
    AddUser {
        /// Login name ([`validate_name`]).
        name: String,
        /// Role.
        role: Role,
        /// The password as an argon2 PHC string ([`hash_password`]): the CLI hashes it, so the
        /// password itself never crosses the socket.
        password_phc: String,
    },
    /// Remove a user and end its sessions (refused for the last admin).
    RemoveUser {
        /// Login name.
        name: String,
    },
    /// List the users.
    ListUsers,
    /// Change a user's password and end its sessions.
    SetPassword {
        /// Login name.
        name: String,
        /// The new password as an argon2 PHC string ([`hash_password`]).
        password_phc: String,
    },
    /// Sign an offline enrollment request ([`OfflineSync::enroll_offline`]).
    EnrollOffline {
        /// Absolute path of the request file.
        request: std::path::PathBuf,
        /// Absolute path to write the reply to.
        out: std::path::PathBuf,
    },
    /// Import an agent bundle and write the reply ([`OfflineSync::import_bundle`]).
    ImportBundle {
        /// Absolute path of the bundle file.
        bundle: std::path::PathBuf,
        /// Absolute path to write the reply bundle to.
        reply_out: std::path::PathBuf,
    },
    /// Revoke an agent's certificate ([`OfflineSync::revoke_agent`]).
    RevokeAgent {
        /// The agent.
        agent_id: uuid::Uuid,
    },
    /// Move the CA rotation to `phase` ([`OfflineSync::rotate_ca`]).
    RotateCa {
        /// The phase to enter.
        phase: crate::identity::RotationPhase,
    },
    /// Where the CA rotation stands ([`crate::identity::Pki::rotation_status`]).
    CaStatus,
    /// Add a release artifact ([`crate::release::Releases::add`]).
    AddRelease {
        /// Absolute path of the tarball.
        file: std::path::PathBuf,
        /// Absolute path of the release key directory; None: the one `init` recorded.
        release_key_dir: Option<std::path::PathBuf>,
        /// The file is signed already: verify only.
        signature_already_embedded: bool,
    },
    /// List the releases ([`crate::release::Releases::list`]).
    ListReleases,
    /// Start a rollout ([`crate::rollout::Rollouts::start`]); needs the running server.
    StartRollout {
        /// What to roll out.
        spec: crate::rollout::RolloutSpec,
    },
    /// The rollouts, newest first ([`crate::rollout::Rollouts::status`]).
    RolloutStatus {
        /// Most rollouts returned (the newest); 0: all.
        limit: usize,
    },
    /// Pause the running rollout; needs the running server.
    PauseRollout,
    /// Resume the paused rollout; needs the running server.
    ResumeRollout,
    /// Abort the active rollout; needs the running server.
    AbortRollout,
    /// `gaffer-control webhook add|list|remove|test|deliveries` ([`crate::webhook::handle_admin`]).
    Webhook(crate::webhook::WebhookRequest),
    /// `gaffer-control agent cordon|drain|uncordon` ([`set_agent_scheduling`]).
    SetScheduling {
        /// The agent.
        agent_id: uuid::Uuid,
        /// What to do.
        change: SchedulingChange,
    },
}

/// An operator's change of whether an agent takes new jobs ([`crate::store::Scheduling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SchedulingChange {
    /// No new leases; what it holds runs to the end.
    Cordon,
    /// No new leases; what it still holds after `deadline_secs` (None: never) is requeued for
    /// other agents.
    Drain {
        /// Seconds from now; at most [`DRAIN_DEADLINE_SECS_MAX`].
        deadline_secs: Option<u64>,
    },
    /// Back in rotation.
    Uncordon,
}

/// Longest drain deadline accepted: 30 days, seconds.
pub const DRAIN_DEADLINE_SECS_MAX: u64 = 30 * 24 * 3600;

/// What [`set_agent_scheduling`] did: the agent's id, its new state and how many jobs it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SchedulingReport {
    /// The agent.
    #[schema(value_type = String, format = Uuid)]
    pub agent_id: uuid::Uuid,
    /// Its scheduling state now.
    pub scheduling: crate::store::Scheduling,
    /// Jobs assigned to or running on it now (they finish, or are requeued at a drain deadline).
    pub jobs_held: usize,
    /// Whether its link is up on this control plane (a change made while the server is stopped
    /// takes effect when it starts).
    pub connected: bool,
}

/// Cordons, drains or uncordons `agent_id` for `actor` (the admin socket, the API and the
/// dashboard all come here): through the live `scheduler` when there is one (the link sees it
/// at once), otherwise in the store only (it applies when the agent next connects). Audited as
/// `agent_cordon`, `agent_drain` (with the deadline) or `agent_uncordon`.
///
/// # Errors
/// [`AdminError::Invalid`] for an unknown or revoked agent or a deadline over
/// [`DRAIN_DEADLINE_SECS_MAX`]; store errors.
pub fn set_agent_scheduling(
    store: &dyn Store,
    scheduler: Option<&crate::scheduler::Scheduler>,
    actor: &Actor,
    agent_id: uuid::Uuid,
    change: SchedulingChange,
) -> Result<SchedulingReport, AdminError> {
    use crate::store::Scheduling;
    let now = crate::now_ms();
    let Some(rec) = store.get_agent(agent_id)? else {
        return Err(AdminError::Invalid(format!(
            "no agent {agent_id} is enrolled (see `gaffer-control agent list` or the fleet page)"
        )));
    };
    if rec.revoked_at_ms.is_some() {
        return Err(AdminError::Invalid(format!("agent {agent_id} is revoked; it takes no jobs already")));
    }
    let by = actor.to_string();
    let (scheduling, action, detail) = match change {
        SchedulingChange::Cordon => {
            (Scheduling::Cordoned { by, at_ms: now }, audit_action::AGENT_CORDON, String::new())
        }
        SchedulingChange::Drain { deadline_secs } => {
            if deadline_secs.is_some_and(|d| d > DRAIN_DEADLINE_SECS_MAX) {
                return Err(AdminError::Invalid(format!(
                    "a drain deadline is at most {} days",
                    DRAIN_DEADLINE_SECS_MAX / 86_400
                )));
            }
            let deadline_ms = deadline_secs.map(|d| now.saturating_add(d.saturating_mul(1000)));
            let detail = match deadline_ms {
                Some(d) => format!("deadline {}", rfc3339_ms(d)),
                None => "no deadline".to_owned(),
            };
            (Scheduling::Draining { by, at_ms: now, deadline_ms }, audit_action::AGENT_DRAIN, detail)
        }
        SchedulingChange::Uncordon => (Scheduling::Active, audit_action::AGENT_UNCORDON, String::new()),
    };
    let updated = match scheduler {
        Some(s) => s.set_scheduling(agent_id, scheduling)?,
        None => store.update_agent(agent_id, &mut |a| a.scheduling = scheduling.clone())?,
    };
    let Some(updated) = updated else {
        return Err(AdminError::Invalid(format!("no agent {agent_id} is enrolled")));
    };
    let detail = if detail.is_empty() { format!("agent {agent_id}") } else { format!("agent {agent_id}, {detail}") };
    store.append_audit(&AuditRecord::new(actor, action, now).agent(agent_id).detail(detail))?;
    store.flush()?;
    let jobs_held = store.jobs_leased_to(agent_id)?.len();
    let connected = scheduler.is_some_and(|s| s.fleet().is_connected(agent_id));
    Ok(SchedulingReport { agent_id, scheduling: updated.scheduling, jobs_held, connected })
}

impl AdminRequest {
    /// The action's name, for logs (carries no secrets).
    pub fn action(&self) -> &'static str {
        match self {
            AdminRequest::CreateEnrollmentToken { .. } => "create_enrollment_token",
            AdminRequest::CreateApiToken { .. } => "create_api_token",
            AdminRequest::ListApiTokens => "list_api_tokens",
            AdminRequest::RevokeApiToken { .. } => "revoke_api_token",
            AdminRequest::AddUser { .. } => "add_user",
            AdminRequest::RemoveUser { .. } => "remove_user",
            AdminRequest::ListUsers => "list_users",
            AdminRequest::SetPassword { .. } => "set_password",
            AdminRequest::EnrollOffline { .. } => "enroll_offline",
            AdminRequest::ImportBundle { .. } => "import_bundle",
            AdminRequest::RevokeAgent { .. } => "revoke_agent",
            AdminRequest::RotateCa { .. } => "rotate_ca",
            AdminRequest::CaStatus => "ca_status",
            AdminRequest::AddRelease { .. } => "add_release",
            AdminRequest::ListReleases => "list_releases",
            AdminRequest::StartRollout { .. } => "start_rollout",
            AdminRequest::RolloutStatus { .. } => "rollout_status",
            AdminRequest::PauseRollout => "pause_rollout",
            AdminRequest::ResumeRollout => "resume_rollout",
            AdminRequest::AbortRollout => "abort_rollout",
            AdminRequest::Webhook(_) => "webhook",
            AdminRequest::SetScheduling { .. } => "set_scheduling",
        }
    }

    /// How long the CLI waits for the answer to this request.
    pub fn timeout(&self) -> Duration {
        match self {
            AdminRequest::ImportBundle { .. } | AdminRequest::AddRelease { .. } => ADMIN_BUNDLE_TIMEOUT,
            _ => ADMIN_TIMEOUT,
        }
    }

    /// Largest answer the CLI reads to this request, bytes: [`ADMIN_LINE_BYTES_MAX`], or
    /// [`ADMIN_STATUS_BYTES_MAX`] for rollout answers (they list every target).
    pub fn response_bytes_max(&self) -> usize {
        match self {
            AdminRequest::StartRollout { .. }
            | AdminRequest::RolloutStatus { .. }
            | AdminRequest::PauseRollout
            | AdminRequest::ResumeRollout
            | AdminRequest::AbortRollout
            | AdminRequest::Webhook(_) => ADMIN_STATUS_BYTES_MAX,
            _ => ADMIN_LINE_BYTES_MAX,
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

/// A freshly minted API token: the secret is shown once, never stored in clear.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MintedApiToken {
    /// The bearer token (secret).
    pub token: String,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Expiry, RFC 3339 UTC.
    pub expires_at: String,
}

/// An API token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// When it was minted, RFC 3339 UTC.
    pub created_at: String,
    /// Expiry, RFC 3339 UTC.
    pub expires_at: String,
    /// Whether it has expired (it is refused).
    pub expired: bool,
    /// When a request last used it (to the minute), RFC 3339 UTC; None if never.
    pub last_used_at: Option<String>,
    /// Who minted it (audit actor).
    pub created_by: String,
}

impl ApiTokenInfo {
    fn of(t: &ApiTokenRecord, now_ms: u64) -> Self {
        ApiTokenInfo {
            name: t.name.clone(),
            role: t.role,
            created_at: rfc3339_ms(t.created_at_ms),
            expires_at: rfc3339_ms(t.expires_at_ms),
            expired: t.expires_at_ms <= now_ms,
            last_used_at: t.last_used_at_ms.map(rfc3339_ms),
            created_by: t.created_by.clone(),
        }
    }
}

/// A user as listed (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// When the user was added, RFC 3339 UTC.
    pub created_at: String,
    /// When the password was last set, RFC 3339 UTC.
    pub password_changed_at: String,
}

impl UserInfo {
    fn of(u: &UserRecord) -> Self {
        UserInfo {
            name: u.name.clone(),
            role: u.role,
            created_at: rfc3339_ms(u.created_at_ms),
            password_changed_at: rfc3339_ms(u.password_changed_at_ms),
        }
    }
}

/// What removing a user or changing its password did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserChange {
    /// The user.
    pub name: String,
    /// Dashboard sessions of the user that were ended.
    pub sessions_ended: usize,
}

/// A response on the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    /// Answer to [`AdminRequest::CreateEnrollmentToken`].
    EnrollmentToken(MintedEnrollmentToken),
    /// Answer to [`AdminRequest::CreateApiToken`].
    ApiToken(MintedApiToken),
    /// Answer to [`AdminRequest::ListApiTokens`], by name.
    ApiTokens {
        /// The tokens.
        tokens: Vec<ApiTokenInfo>,
    },
    /// Answer to [`AdminRequest::RevokeApiToken`]: the token as it was.
    ApiTokenRevoked(ApiTokenInfo),
    /// Answer to [`AdminRequest::AddUser`].
    UserAdded(UserInfo),
    /// Answer to [`AdminRequest::RemoveUser`].
    UserRemoved(UserChange),
    /// Answer to [`AdminRequest::ListUsers`], by name.
    Users {
        /// The users.
        users: Vec<UserInfo>,
    },
    /// Answer to [`AdminRequest::SetPassword`].
    PasswordChanged(UserChange),
    /// Answer to [`AdminRequest::EnrollOffline`].
    OfflineEnrolled(OfflineEnrollReport),
    /// Answer to [`AdminRequest::ImportBundle`].
    BundleImported(ImportReport),
    /// Answer to [`AdminRequest::RevokeAgent`].
    AgentRevoked(RevokeReport),
    /// Answer to [`AdminRequest::RotateCa`].
    CaRotated(crate::identity::RotationReport),
    /// Answer to [`AdminRequest::CaStatus`].
    CaStatus(crate::identity::RotationStatus),
    /// Answer to [`AdminRequest::AddRelease`].
    ReleaseAdded(crate::release::AddReleaseReport),
    /// Answer to [`AdminRequest::ListReleases`], oldest first.
    Releases {
        /// The releases.
        releases: Vec<crate::release::ReleaseListing>,
    },
    /// Answer to [`AdminRequest::StartRollout`], [`AdminRequest::PauseRollout`],
    /// [`AdminRequest::ResumeRollout`] and [`AdminRequest::AbortRollout`]: the rollout afterwards.
    Rollout(crate::rollout::RolloutStatus),
    /// Answer to [`AdminRequest::RolloutStatus`], newest first.
    Rollouts {
        /// The rollouts.
        rollouts: Vec<crate::rollout::RolloutStatus>,
    },
    /// Answer to [`AdminRequest::Webhook`].
    Webhook(crate::webhook::WebhookResponse),
    /// Answer to [`AdminRequest::SetScheduling`].
    Scheduling(SchedulingReport),
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
    actor: &Actor,
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
    store.append_audit(
        &AuditRecord::new(actor, audit_action::ENROLL_TOKEN_CREATE, now)
            .site(site)
            .detail(format!("expires {}", rfc3339_ms(expires_at_ms))),
    )?;
    store.flush()?;
    Ok(MintedEnrollmentToken {
        token: token.as_str().to_owned(),
        ca_fingerprint: ca_fingerprint.to_string(),
        site: site.to_owned(),
        expires_at: rfc3339_ms(expires_at_ms),
    })
}

/// Checks a user or API token name: 1 to [`NAME_BYTES_MAX`] bytes of `a-z`, `0-9`, `.`, `_`,
/// `-`, starting with a letter or a digit. `what` names it in the message.
///
/// # Errors
/// [`AdminError::Invalid`] saying what is allowed.
pub fn validate_name(name: &str, what: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "{what} {name:?} is not allowed: use 1-{NAME_BYTES_MAX} of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )))
    }
}

/// Hashes a new password with argon2 (default parameters: argon2id, 19 MiB, 2 passes), after
/// checking its length ([`PASSWORD_BYTES_MIN`]..=[`PASSWORD_BYTES_MAX`] bytes).
///
/// # Errors
/// [`AdminError::Invalid`] for a password too short or too long, or if hashing fails.
pub fn hash_password(password: &str) -> Result<String, AdminError> {
    if password.len() < PASSWORD_BYTES_MIN || password.len() > PASSWORD_BYTES_MAX {
        return Err(AdminError::Invalid(format!(
            "the password must be {PASSWORD_BYTES_MIN} to {PASSWORD_BYTES_MAX} bytes long"
        )));
    }
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AdminError::Invalid(format!("hashing the password: {e}")))
}

/// A fresh random password (32 base64url characters, 192 bits), for `init` and `user add`
/// without a password.
pub fn generate_password() -> String {
    ApiToken::generate().as_str()["gfa_".len()..].chars().take(32).collect()
}

fn check_phc(phc: &str) -> Result<(), AdminError> {
    match PasswordHash::new(phc) {
        Ok(h) if h.algorithm.as_str().starts_with("argon2") => Ok(()),
        _ => Err(AdminError::Invalid("the password hash is not an argon2 PHC string".into())),
    }
}

/// The audit entry of `action` by `actor` now.
fn audit(store: &dyn Store, actor: &Actor, action: &str, detail: String) -> Result<(), AdminError> {
    store.append_audit(&AuditRecord::new(actor, action, crate::now_ms()).detail(detail))?;
    Ok(())
}

/// Mints an API bearer token named `name` with `role`, valid for `ttl_secs`, storing only its
/// hash; audited as `api_token_create` by `actor`.
///
/// # Errors
/// [`AdminError::Invalid`] for a bad name, a name in use, or a TTL of 0 or above
/// [`API_TOKEN_TTL_SECS_MAX`].
pub fn mint_api_token(
    store: &dyn Store,
    actor: &Actor,
    name: &str,
    role: Role,
    ttl_secs: u64,
) -> Result<MintedApiToken, AdminError> {
    validate_name(name, "token name")?;
    if ttl_secs == 0 || ttl_secs > API_TOKEN_TTL_SECS_MAX {
        return Err(AdminError::Invalid(format!("--ttl must be between 1s and {}d", API_TOKEN_TTL_SECS_MAX / 86400)));
    }
    let token = ApiToken::generate();
    let now = crate::now_ms();
    let rec = ApiTokenRecord {
        hash: *token.hash().as_bytes(),
        name: name.to_owned(),
        role,
        created_at_ms: now,
        expires_at_ms: now + ttl_secs * 1000,
        last_used_at_ms: None,
        created_by: actor.to_string(),
    };
    if !store.create_api_token(&rec)? {
        return Err(AdminError::Invalid(format!(
            "an API token named {name:?} exists; pick another name or revoke it first (`gaffer-control api-token revoke --name {name}`)"
        )));
    }
    audit(
        store,
        actor,
        audit_action::API_TOKEN_CREATE,
        format!("token {name}, role {role}, expires {}", rfc3339_ms(rec.expires_at_ms)),
    )?;
    store.flush()?;
    Ok(MintedApiToken {
        token: token.as_str().to_owned(),
        name: rec.name,
        role,
        expires_at: rfc3339_ms(rec.expires_at_ms),
    })
}

/// Revokes the API token `name`: requests with it are refused from now on. Audited.
///
/// # Errors
/// [`AdminError::Invalid`] when no token has that name.
pub fn revoke_api_token(store: &dyn Store, actor: &Actor, name: &str) -> Result<ApiTokenInfo, AdminError> {
    let Some(rec) = store.revoke_api_token(name)? else {
        return Err(AdminError::Invalid(format!(
            "no API token is named {name:?} (see `gaffer-control api-token list`)"
        )));
    };
    audit(store, actor, audit_action::API_TOKEN_REVOKE, format!("token {name}, role {}", rec.role))?;
    store.flush()?;
    Ok(ApiTokenInfo::of(&rec, crate::now_ms()))
}

/// Adds user `name` with `role` and the password hash `password_phc` ([`hash_password`]).
/// Audited as `user_add` by `actor`.
///
/// # Errors
/// [`AdminError::Invalid`] for a bad name or hash, or a name in use.
pub fn add_user(
    store: &dyn Store,
    actor: &Actor,
    name: &str,
    role: Role,
    password_phc: &str,
) -> Result<UserInfo, AdminError> {
    validate_name(name, "user name")?;
    check_phc(password_phc)?;
    let now = crate::now_ms();
    let rec = UserRecord {
        name: name.to_owned(),
        role,
        password_phc: password_phc.to_owned(),
        created_at_ms: now,
        password_changed_at_ms: now,
    };
    if !store.insert_user(&rec)? {
        return Err(AdminError::Invalid(format!(
            "a user named {name:?} exists (change its password with `gaffer-control user passwd --name {name}`)"
        )));
    }
    audit(store, actor, audit_action::USER_ADD, format!("user {name}, role {role}"))?;
    store.flush()?;
    Ok(UserInfo::of(&rec))
}

/// Removes user `name` and ends its sessions; the last admin cannot be removed. Audited.
///
/// # Errors
/// [`AdminError::Invalid`] for an unknown user or the last admin.
pub fn remove_user(store: &dyn Store, actor: &Actor, name: &str) -> Result<UserChange, AdminError> {
    match store.remove_user(name)? {
        UserRemoval::Removed(user) => {
            let sessions_ended = store.delete_user_sessions(name)?;
            audit(
                store,
                actor,
                audit_action::USER_REMOVE,
                format!("user {name}, role {}, {sessions_ended} sessions ended", user.role),
            )?;
            store.flush()?;
            Ok(UserChange { name: name.to_owned(), sessions_ended })
        }
        UserRemoval::NotFound => {
            Err(AdminError::Invalid(format!("no user is named {name:?} (see `gaffer-control user list`)")))
        }
        UserRemoval::LastAdmin => Err(AdminError::Invalid(format!(
            "{name:?} is the last admin; add another admin first (`gaffer-control user add --role admin`)"
        ))),
    }
}

/// Sets user `name`'s password hash and ends its sessions. Audited as `user_passwd`.
///
/// # Errors
/// [`AdminError::Invalid`] for an unknown user or a bad hash.
pub fn set_password(
    store: &dyn Store,
    actor: &Actor,
    name: &str,
    password_phc: &str,
) -> Result<UserChange, AdminError> {
    check_phc(password_phc)?;
    if store.set_user_password(name, password_phc, crate::now_ms())?.is_none() {
        return Err(AdminError::Invalid(format!("no user is named {name:?} (see `gaffer-control user list`)")));
    }
    let sessions_ended = store.delete_user_sessions(name)?;
    audit(store, actor, audit_action::USER_PASSWD, format!("user {name}, {sessions_ended} sessions ended"))?;
    store.flush()?;
    Ok(UserChange { name: name.to_owned(), sessions_ended })
}

/// The actor for local uid `uid`, named from the user database (`getpwuid_r`) when it can be.
pub fn os_actor(uid: u32) -> Actor {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
    Actor::OsUser { uid, name }
}

/// The actor of this process: its real uid ([`os_actor`]), never an environment variable.
pub fn local_actor() -> Actor {
    os_actor(nix::unistd::getuid().as_raw())
}

/// Formats Unix milliseconds as RFC 3339 UTC (second precision).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

/// Performs one admin request by `actor` against `store` (and `offline` for the offline-sync
/// actions). The CLI calls it directly when no server runs ([`local_actor`]); the admin socket
/// calls it inside `serve` with the peer's uid. Rollout changes need [`handle_with`] and the
/// server's rollouts; here they are refused and the status is read from the store.
pub fn handle(
    store: &dyn Store,
    ca_fingerprint: &CaFingerprint,
    offline: Option<&OfflineSync>,
    actor: &Actor,
    req: AdminRequest,
) -> AdminResponse {
    handle_with(store, ca_fingerprint, offline, None, actor, req)
}

/// What the admin socket of a running server reaches besides the store: the rollouts and the
/// scheduler of the live fleet.
#[derive(Clone)]
pub struct LiveFleet {
    /// The server's rollouts.
    pub rollouts: Arc<crate::rollout::Rollouts>,
    /// The server's scheduler (cordon, drain).
    pub scheduler: Arc<crate::scheduler::Scheduler>,
}

/// [`handle`] with the running server's live fleet (None: no live fleet, as the CLI without a
/// server: rollout changes are refused with what to do, the status comes from the store, and a
/// cordon or drain is written to the store for the next start).
pub fn handle_with(
    store: &dyn Store,
    ca_fingerprint: &CaFingerprint,
    offline: Option<&OfflineSync>,
    live: Option<&LiveFleet>,
    actor: &Actor,
    req: AdminRequest,
) -> AdminResponse {
    let rollouts = live.map(|l| l.rollouts.as_ref());
    let who = actor.to_string();
    let now = crate::now_ms();
    // During a CA rotation agents enroll against the CA of the server certificate in use now.
    let enroll_fingerprint = offline.map(|o| o.pki().enroll_fingerprint());
    let ca_fingerprint = enroll_fingerprint.as_ref().unwrap_or(ca_fingerprint);
    let offline_action = |f: &dyn Fn(&OfflineSync) -> Result<AdminResponse, OfflineError>| match offline {
        Some(o) => f(o).map_err(|e| e.to_string()),
        None => Err("offline sync is not available in this process".to_owned()),
    };
    let result = match req {
        AdminRequest::CreateEnrollmentToken { site, ttl_secs } => {
            mint_enrollment_token(store, ca_fingerprint, actor, &site, ttl_secs)
                .map(AdminResponse::EnrollmentToken)
                .map_err(|e| e.to_string())
        }
        AdminRequest::CreateApiToken { name, role, ttl_secs } => {
            mint_api_token(store, actor, &name, role, ttl_secs).map(AdminResponse::ApiToken).map_err(|e| e.to_string())
        }
        AdminRequest::ListApiTokens => store
            .list_api_tokens()
            .map(|ts| AdminResponse::ApiTokens { tokens: ts.iter().map(|t| ApiTokenInfo::of(t, now)).collect() })
            .map_err(|e| e.to_string()),
        AdminRequest::RevokeApiToken { name } => {
            revoke_api_token(store, actor, &name).map(AdminResponse::ApiTokenRevoked).map_err(|e| e.to_string())
        }
        AdminRequest::AddUser { name, role, password_phc } => {
            add_user(store, actor, &name, role, &password_phc).map(AdminResponse::UserAdded).map_err(|e| e.to_string())
        }
        AdminRequest::RemoveUser { name } => {
            remove_user(store, actor, &name).map(AdminResponse::UserRemoved).map_err(|e| e.to_string())
        }
        AdminRequest::ListUsers => store
            .list_users()
            .map(|us| AdminResponse::Users { users: us.iter().map(UserInfo::of).collect() })
            .map_err(|e| e.to_string()),
        AdminRequest::SetPassword { name, password_phc } => set_password(store, actor, &name, &password_phc)
            .map(AdminResponse::PasswordChanged)
            .map_err(|e| e.to_string()),
        AdminRequest::EnrollOffline { request, out } => {
            offline_action(&|o| o.enroll_offline(&request, &out, &who).map(AdminResponse::OfflineEnrolled))
        }
        AdminRequest::ImportBundle { bundle, reply_out } => {
            offline_action(&|o| o.import_bundle(&bundle, &reply_out, &who).map(AdminResponse::BundleImported))
        }
        AdminRequest::RevokeAgent { agent_id } => {
            offline_action(&|o| o.revoke_agent(agent_id, &who).map(AdminResponse::AgentRevoked))
        }
        AdminRequest::RotateCa { phase } => {
            offline_action(&|o| o.rotate_ca(phase, actor).map(AdminResponse::CaRotated))
        }
        AdminRequest::CaStatus => offline_action(&|o| o.ca_status().map(AdminResponse::CaStatus)),
        req @ (AdminRequest::AddRelease { .. } | AdminRequest::ListReleases) => match offline {
            Some(o) => crate::release::handle_admin(o.data_dir(), store, actor, req).map_err(|e| e.to_string()),
            None => Err("releases are not available in this process".to_owned()),
        },
        AdminRequest::Webhook(req) => {
            crate::webhook::handle_admin(store, actor, req).map(AdminResponse::Webhook).map_err(|e| e.to_string())
        }
        AdminRequest::SetScheduling { agent_id, change } => {
            set_agent_scheduling(store, live.map(|l| l.scheduler.as_ref()), actor, agent_id, change)
                .map(AdminResponse::Scheduling)
                .map_err(|e| e.to_string())
        }
        AdminRequest::RolloutStatus { limit } => {
            let all = match rollouts {
                Some(r) => Ok(r.status()),
                None => store
                    .list_rollouts()
                    .map(|rs| rs.iter().rev().map(crate::rollout::RolloutStatus::of).collect())
                    .map_err(|e| e.to_string()),
            };
            all.map(|mut all: Vec<crate::rollout::RolloutStatus>| {
                if limit > 0 {
                    all.truncate(limit);
                }
                AdminResponse::Rollouts { rollouts: all }
            })
        }
        req @ (AdminRequest::StartRollout { .. }
        | AdminRequest::PauseRollout
        | AdminRequest::ResumeRollout
        | AdminRequest::AbortRollout) => match rollouts {
            None => Err(
                "a rollout needs the live fleet: start the control plane (`gaffer-control serve`) and run this again"
                    .to_owned(),
            ),
            Some(r) => match req {
                AdminRequest::StartRollout { spec } => r.start(spec, actor, now),
                AdminRequest::PauseRollout => r.pause(actor, now),
                AdminRequest::ResumeRollout => r.resume(actor, now),
                _ => r.abort(actor, now),
            }
            .map(AdminResponse::Rollout)
            .map_err(|e| e.to_string()),
        },
    };
    result.unwrap_or_else(|message| AdminResponse::Error { message })
}

/// Listens on the admin socket until the task is dropped. Removes a stale socket file first and
/// creates the new one with mode 0600. Each connection's peer uid (`SO_PEERCRED`) must be the
/// owner of the socket's directory (the data directory) or root; it becomes the request's actor.
///
/// # Errors
/// [`AdminError::Socket`] if the socket cannot be bound or its directory read.
pub async fn serve_admin_socket(
    path: &Path,
    store: Arc<dyn Store>,
    ca_fingerprint: CaFingerprint,
    offline: Option<Arc<OfflineSync>>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    serve_admin_socket_with(path, store, ca_fingerprint, offline, None).await
}

/// [`serve_admin_socket`] with the server's live fleet, so that `rollout start|pause|resume|abort`
/// and `agent cordon|drain|uncordon` reach it ([`handle_with`]).
///
/// # Errors
/// As [`serve_admin_socket`].
pub async fn serve_admin_socket_with(
    path: &Path,
    store: Arc<dyn Store>,
    ca_fingerprint: CaFingerprint,
    offline: Option<Arc<OfflineSync>>,
    live: Option<LiveFleet>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    let sock_err = |detail: String| AdminError::Socket { path: path.display().to_string(), detail };
    let dir = path.parent().unwrap_or(Path::new("."));
    let owner_uid = std::fs::metadata(dir).map_err(|e| sock_err(format!("{}: {e}", dir.display())))?.uid();
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
            let live = live.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, owner_uid, store, ca_fingerprint, offline, live).await {
                    tracing::warn!(error = %e, "admin socket request failed");
                }
            });
        }
    }))
}

async fn serve_one(
    stream: UnixStream,
    owner_uid: u32,
    store: Arc<dyn Store>,
    fp: CaFingerprint,
    offline: Option<Arc<OfflineSync>>,
    live: Option<LiveFleet>,
) -> std::io::Result<()> {
    let peer_uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let line = read_line_bounded(read, ADMIN_LINE_BYTES_MAX).await?;
    let resp = if peer_uid != owner_uid && peer_uid != 0 {
        tracing::warn!(
            peer_uid,
            owner_uid,
            "admin socket request refused: the peer is neither the data directory's owner nor root"
        );
        AdminResponse::Error {
            message: format!(
                "uid {peer_uid} may not use this control plane's admin socket: run the command as the data directory's owner (uid {owner_uid}) or root"
            ),
        }
    } else {
        match serde_json::from_str::<AdminRequest>(&line) {
            Ok(req) => {
                let actor = tokio::task::spawn_blocking(move || os_actor(peer_uid))
                    .await
                    .unwrap_or(Actor::OsUser { uid: peer_uid, name: None });
                tracing::info!(action = req.action(), actor = %actor, "admin request");
                tokio::task::spawn_blocking(move || {
                    handle_with(store.as_ref(), &fp, offline.as_deref(), live.as_ref(), &actor, req)
                })
                .await
                .unwrap_or_else(|e| AdminResponse::Error { message: format!("internal error: {e}") })
            }
            Err(e) => AdminResponse::Error { message: format!("bad request: {e}") },
        }
    };
    let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

async fn read_line_bounded(read: impl tokio::io::AsyncRead + Unpin, bytes_max: usize) -> std::io::Result<String> {
    let mut reader = BufReader::new(read.take(bytes_max as u64 + 1));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if line.len() > bytes_max {
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
        read_line_bounded(read, req.response_bytes_max()).await
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
