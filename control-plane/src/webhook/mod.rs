//! Webhooks, alert rules and alert email: telling an operator when something happens.
//!
//! * **Targets** ([`WebhookTarget`]): an HTTP URL (JSON or Slack body) or an SMTP mailbox, with the
//!   events it wants and an optional secret, added with `gaffer-control webhook add` (admin socket,
//!   audited) or on the Webhooks page. At most [`TARGETS_MAX`].
//! * **Events** ([`EventKind`]): `job.succeeded`, `job.failed` (from the scheduler's one place where
//!   a job finishes), `agent.offline` / `agent.online`, `agent.health`, `outbox.full` (the alert rules
//!   of [`alerts`], fed by heartbeats and a timer), `rollout.halted` (the rollout driver) and
//!   `webhook.test` (`webhook test`). Every target subscribed to an event gets its own
//!   [`WebhookDelivery`], written to the store where the event happens ([`Webhooks::emit`]).
//! * **Body**: `{"event": "job.succeeded", "id": "<delivery id>", "time": "<RFC 3339>", "data": {…}}`
//!   with the job or agent as `GET /api/v1/jobs/{id}` / `GET /api/v1/agents/{id}` show it (without
//!   the digest and health history); `--format slack` posts `{"text": "…"}` instead. Headers:
//!   `X-Gaffer-Event`, `X-Gaffer-Delivery` (the delivery id: the same on every retry, the
//!   receiver's dedupe key), `X-Gaffer-Timestamp` (Unix seconds of this attempt) and, with a
//!   secret, `X-Gaffer-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>` ([`signature`]).
//! * **Durability**: deliveries are store records (survive restarts); the [`worker`] claims due
//!   ones, posts with a [`DELIVERY_TIMEOUT`] timeout, and records every attempt (time, status or
//!   error, duration). A failed attempt is retried after [`WebhookSettings::retry_delay_ms`]
//!   (`retry_initial_secs` doubling to `retry_max_secs`, ±20 % jitter) until `retry_for_secs`
//!   after the event, then the delivery is marked failed. At most [`PENDING_MAX`] deliveries are
//!   pending: past that the oldest pending one is dropped (counted, logged at WARN).
//! * **Secrets** are read from a 0600 file, stored in the store, used for signing (or as the SMTP
//!   password) and never logged, listed or shown.

pub mod alerts;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gaffer_protocol::messages::{AgentId, JobId};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::store::{audit_action, Actor, AuditRecord, JobRecord, JobState, Store, StoreError, UnixMs};

/// Most webhook and email targets.
pub const TARGETS_MAX: usize = 64;
/// Most deliveries pending at once; past it the oldest pending delivery is dropped.
pub const PENDING_MAX: usize = 10_000;
/// How long one HTTP attempt (connect, send, response head and body) may take.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a receiver's response body read (the rest is ignored).
pub const RESPONSE_BODY_BYTES_MAX: usize = 16 * 1024;
/// Most bytes of a receiver's response (or an error) kept in an attempt record.
pub const ATTEMPT_NOTE_BYTES_MAX: usize = 512;
/// Most attempts kept in one delivery record (the oldest go first; the count stays exact).
pub const ATTEMPTS_KEPT_MAX: usize = 48;
/// Longest URL of a target, bytes.
pub const URL_BYTES_MAX: usize = 2048;
/// Most bytes of a secret file.
pub const SECRET_BYTES_MAX: usize = 4096;
/// Most email recipients of one target.
pub const EMAIL_RECIPIENTS_MAX: usize = 16;
/// Finished deliveries are kept this long, then deleted (7 days).
pub const FINISHED_KEPT_MS: u64 = 7 * 86_400_000;

/// Default of `[webhooks] retry_initial_secs`: 10 s.
pub const RETRY_INITIAL_SECS_DEFAULT: u64 = 10;
/// Default of `[webhooks] retry_max_secs`: 1 h.
pub const RETRY_MAX_SECS_DEFAULT: u64 = 3600;
/// Default of `[webhooks] retry_for_secs`: 24 h.
pub const RETRY_FOR_SECS_DEFAULT: u64 = 86_400;

/// Errors of webhook actions.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The request is invalid (bad URL, unknown event, too many targets); the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// No target has that id or name; see `gaffer-control webhook list`.
    #[error("no webhook target is {0:?}; see `gaffer-control webhook list`")]
    NotFound(String),
    /// The secret file cannot be used (missing, too large, readable by others).
    #[error("secret file {path}: {detail}")]
    SecretFile {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The store failed; retrying later may succeed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened, as the `event` field and the `X-Gaffer-Event` header name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    /// A job succeeded (data: the job).
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    /// A job failed for good (data: the job, with its error).
    #[serde(rename = "job.failed")]
    JobFailed,
    /// An agent has been offline longer than `[alerts] agent_offline_secs` (data: agent, offline_secs).
    #[serde(rename = "agent.offline")]
    AgentOffline,
    /// An agent that was reported offline is back (data: agent, offline_secs).
    #[serde(rename = "agent.online")]
    AgentOnline,
    /// A health rule crossed its threshold (data: agent, rule, subject, value, threshold).
    #[serde(rename = "agent.health")]
    AgentHealth,
    /// An agent's outbox is full: it takes no new jobs (data: agent).
    #[serde(rename = "outbox.full")]
    OutboxFull,
    /// A rollout halted on a failed update (data: rollout_id, agent, reason).
    #[serde(rename = "rollout.halted")]
    RolloutHalted,
    /// `gaffer-control webhook test` (data: target, requested_by).
    #[serde(rename = "webhook.test")]
    Test,
}

impl EventKind {
    /// Every kind a target can subscribe to (not [`EventKind::Test`], which goes to the tested
    /// target only).
    pub const SUBSCRIBABLE: [EventKind; 7] = [
        EventKind::JobSucceeded,
        EventKind::JobFailed,
        EventKind::AgentOffline,
        EventKind::AgentOnline,
        EventKind::AgentHealth,
        EventKind::OutboxFull,
        EventKind::RolloutHalted,
    ];

    /// The wire name, e.g. `job.succeeded`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::JobSucceeded => "job.succeeded",
            EventKind::JobFailed => "job.failed",
            EventKind::AgentOffline => "agent.offline",
            EventKind::AgentOnline => "agent.online",
            EventKind::AgentHealth => "agent.health",
            EventKind::OutboxFull => "outbox.full",
            EventKind::RolloutHalted => "rollout.halted",
            EventKind::Test => "webhook.test",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventKind {
    type Err = WebhookError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::SUBSCRIBABLE.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            WebhookError::Invalid(format!(
                "unknown event {s:?}; use a comma-separated list of {}",
                EventKind::SUBSCRIBABLE.map(EventKind::as_str).join(", ")
            ))
        })
    }
}

/// The body an HTTP target gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// `{"event", "id", "time", "data"}` (the default).
    #[default]
    Json,
    /// Slack's incoming-webhook body, `{"text": "…"}`.
    Slack,
}

/// Where a target's deliveries go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    /// An HTTP(S) POST.
    Http {
        /// `http://` or `https://` URL.
        url: String,
        /// The body.
        format: BodyFormat,
    },
    /// An email through SMTP (lettre).
    Email {
        /// `smtp://host:port` (STARTTLS when offered… see lettre's URL forms: `?tls=required`),
        /// or `smtps://host:port` (TLS from the start); a user name may come before `@`, the
        /// password is the target's secret.
        smtp_url: String,
        /// The sender address.
        from: String,
        /// The recipients (1 to [`EMAIL_RECIPIENTS_MAX`]).
        to: Vec<String>,
    },
}

/// A webhook or email target, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookTarget {
    /// Its id.
    pub id: Uuid,
    /// Unique name (defaults to the URL's host, or `email-<recipient>`).
    pub name: String,
    /// Where deliveries go.
    pub destination: Destination,
    /// The events it gets.
    pub events: Vec<EventKind>,
    /// The HMAC key (HTTP) or SMTP password (email); never listed or logged.
    pub secret: Option<String>,
    /// When it was added.
    pub created_at_ms: UnixMs,
    /// Who added it (audit actor).
    pub created_by: String,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its next attempt ([`WebhookDelivery::next_attempt_at_ms`]).
    Pending,
    /// A receiver answered 2xx (or the mail server accepted the message).
    Delivered,
    /// Every attempt failed until `retry_for_secs` after the event; given up.
    Failed,
    /// Dropped unsent because [`PENDING_MAX`] deliveries were pending.
    Dropped,
}

impl DeliveryState {
    /// `pending`, `delivered`, `failed` or `dropped`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Dropped => "dropped",
        }
    }
}

/// One attempt to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    /// When it started.
    pub at_ms: UnixMs,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// The HTTP status the receiver answered (None: no answer, see `error`; email: 250 on success).
    pub status: Option<u16>,
    /// Why it failed (connection refused, timeout, the start of a non-2xx body), at most
    /// [`ATTEMPT_NOTE_BYTES_MAX`] bytes; None when it succeeded.
    pub error: Option<String>,
}

/// One event for one target, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// The delivery id (UUID v7: ordered by creation), `X-Gaffer-Delivery` and the body's `id`.
    pub id: Uuid,
    /// The target.
    pub target_id: Uuid,
    /// The target's name when the event happened (for the page, after the target is removed).
    pub target_name: String,
    /// The event.
    pub event: EventKind,
    /// The exact bytes to post (UTF-8 JSON: the event body or the Slack body); the signature is over them.
    pub payload: String,
    /// One line saying what happened (Slack text, email subject, the page).
    pub summary: String,
    /// When the event happened.
    pub created_at_ms: UnixMs,
    /// Where it stands.
    pub state: DeliveryState,
    /// When it is due next (while pending; a worker claiming it moves this past its attempt).
    pub next_attempt_at_ms: UnixMs,
    /// Attempts made, all of them.
    pub attempts_total: u32,
    /// The latest attempts, oldest first (at most [`ATTEMPTS_KEPT_MAX`]).
    pub attempts: Vec<DeliveryAttempt>,
    /// When it was delivered, failed or dropped.
    pub finished_at_ms: Option<UnixMs>,
}

/// `[webhooks]` of the configuration file, with the defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookSettings {
    /// First retry delay, s (default [`RETRY_INITIAL_SECS_DEFAULT`]).
    pub retry_initial_secs: u64,
    /// Longest retry delay, s (default [`RETRY_MAX_SECS_DEFAULT`]).
    pub retry_max_secs: u64,
    /// How long after the event attempts go on, s (default [`RETRY_FOR_SECS_DEFAULT`]).
    pub retry_for_secs: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            retry_initial_secs: RETRY_INITIAL_SECS_DEFAULT,
            retry_max_secs: RETRY_MAX_SECS_DEFAULT,
            retry_for_secs: RETRY_FOR_SECS_DEFAULT,
        }
    }
}

impl WebhookSettings {
    /// The delay before the attempt after `failures` failed ones (1: the first retry), ms:
    /// `retry_initial_secs × 2^(failures-1)`, at most `retry_max_secs`, times `jitter` (callers
    /// pass a random factor in 0.8..=1.2; 1.0 for the plain schedule).
    pub fn retry_delay_ms(&self, failures: u32, jitter: f64) -> u64 {
        let exp = failures.saturating_sub(1).min(40);
        let base_secs = self.retry_initial_secs.saturating_mul(1u64 << exp).min(self.retry_max_secs.max(1));
        ((base_secs as f64 * 1000.0 * jitter.clamp(0.5, 1.5)) as u64).max(1)
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Gaffer-Signature-256` header value.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a received signature header against `body` in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else { return false };
    let Ok(sig) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else { return false };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// A target as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookInfo {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// `http` or `email`.
    pub kind: String,
    /// The URL (HTTP) or SMTP URL (email), any password removed.
    pub url: String,
    /// `json` or `slack` (HTTP); None for email.
    pub format: Option<BodyFormat>,
    /// Sender (email).
    pub from: Option<String>,
    /// Recipients (email).
    pub to: Vec<String>,
    /// Its events.
    pub events: Vec<EventKind>,
    /// Whether it has a secret (signatures for HTTP, the SMTP password for email).
    pub has_secret: bool,
    /// When it was added, RFC 3339 UTC.
    pub created_at: String,
    /// Who added it.
    pub created_by: String,
}

impl WebhookInfo {
    /// The listing of `t`.
    pub fn of(t: &WebhookTarget) -> Self {
        let (kind, url, format, from, to) = match &t.destination {
            Destination::Http { url, format } => ("http", redact_url(url), Some(*format), None, Vec::new()),
            Destination::Email { smtp_url, from, to } => {
                ("email", redact_url(smtp_url), None, Some(from.clone()), to.clone())
            }
        };
        WebhookInfo {
            id: t.id,
            name: t.name.clone(),
            kind: kind.to_owned(),
            url,
            format,
            from,
            to,
            events: t.events.clone(),
            has_secret: t.secret.is_some(),
            created_at: crate::admin::rfc3339_ms(t.created_at_ms),
            created_by: t.created_by.clone(),
        }
    }
}

/// `url` with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// What `webhook add` asks for (the CLI reads the secret file first; the secret crosses the
/// admin socket, which only the data directory's owner can use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Unique name; None: derived from the destination.
    pub name: Option<String>,
    /// Where deliveries go.
    pub destination: Destination,
    /// The events (at least one).
    pub events: Vec<EventKind>,
    /// The secret, from `--secret-file`.
    pub secret: Option<String>,
}

/// Requests of `gaffer-control webhook …` on the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WebhookRequest {
    /// Add a target.
    Add {
        /// What to add.
        spec: TargetSpec,
    },
    /// List the targets.
    List,
    /// Remove a target (by id or name); its pending deliveries are dropped.
    Remove {
        /// Id or name.
        target: String,
    },
    /// Queue a `webhook.test` delivery to a target (by id or name).
    Test {
        /// Id or name.
        target: String,
    },
    /// The newest deliveries.
    Deliveries {
        /// At most this many (1..=1000).
        limit: usize,
    },
}

/// Answers to [`WebhookRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum WebhookResponse {
    /// The target added.
    Added(WebhookInfo),
    /// The targets, by name.
    Targets {
        /// The targets.
        targets: Vec<WebhookInfo>,
    },
    /// The target removed.
    Removed(WebhookInfo),
    /// The test delivery queued.
    TestQueued {
        /// The target.
        target: WebhookInfo,
        /// The delivery's id.
        delivery_id: Uuid,
    },
    /// The newest deliveries, newest first.
    Deliveries {
        /// The deliveries.
        deliveries: Vec<WebhookDelivery>,
    },
}

fn validate_destination(d: &Destination) -> Result<(), WebhookError> {
    match d {
        Destination::Http { url, .. } => {
            if url.len() > URL_BYTES_MAX {
                return Err(WebhookError::Invalid(format!("--url is longer than {URL_BYTES_MAX} bytes")));
            }
            let u = url::Url::parse(url).map_err(|e| {
                WebhookError::Invalid(format!(
                    "--url {url:?} is not a URL ({e}); write e.g. https://hooks.example.com/gaffer"
                ))
            })?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(WebhookError::Invalid(format!(
                    "--url {url:?} must be an http:// or https:// URL with a host"
                )));
            }
        }
        Destination::Email { smtp_url, from, to } => {
            let u = url::Url::parse(smtp_url).map_err(|e| {
                WebhookError::Invalid(format!(
                    "--smtp-url {smtp_url:?} is not a URL ({e}); write e.g. smtp://mail.example.com:587"
                ))
            })?;
            if !matches!(u.scheme(), "smtp" | "smtps") || u.host_str().is_none() {
                return Err(WebhookError::Invalid(format!(
                    "--smtp-url {smtp_url:?} must be smtp://host:port (STARTTLS) or smtps://host:port (TLS)"
                )));
            }
            if u.password().is_some() {
                return Err(WebhookError::Invalid(
                    "--smtp-url must not hold a password: put it in --secret-file (mode 0600)".into(),
                ));
            }
            if to.is_empty() || to.len() > EMAIL_RECIPIENTS_MAX {
                return Err(WebhookError::Invalid(format!("give 1 to {EMAIL_RECIPIENTS_MAX} --to addresses")));
            }
            for a in to.iter().chain(std::iter::once(from)) {
                a.parse::<lettre::Address>()
                    .map_err(|e| WebhookError::Invalid(format!("{a:?} is not an email address ({e})")))?;
            }
        }
    }
    Ok(())
}

fn default_name(d: &Destination) -> String {
    let raw = match d {
        Destination::Http { url, .. } => url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)),
        Destination::Email { to, .. } => to.first().map(|t| format!("email-{t}")),
    }
    .unwrap_or_else(|| "webhook".into());
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(crate::admin::NAME_BYTES_MAX)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'w');
        name.truncate(crate::admin::NAME_BYTES_MAX);
    }
    name
}

fn find_target(store: &dyn Store, key: &str) -> Result<WebhookTarget, WebhookError> {
    let targets = store.list_webhook_targets()?;
    targets
        .into_iter()
        .find(|t| t.name == key || t.id.to_string() == key)
        .ok_or_else(|| WebhookError::NotFound(key.to_owned()))
}

/// Adds a target (audited `webhook_add`).
///
/// # Errors
/// [`WebhookError::Invalid`] for a bad destination, name, no events, a name in use or
/// [`TARGETS_MAX`] targets already.
pub fn add_target(
    store: &dyn Store,
    actor: &Actor,
    spec: TargetSpec,
    now_ms: UnixMs,
) -> Result<WebhookInfo, WebhookError> {
    validate_destination(&spec.destination)?;
    if spec.events.is_empty() {
        return Err(WebhookError::Invalid(format!(
            "give at least one event with --events ({})",
            EventKind::SUBSCRIBABLE.map(EventKind::as_str).join(",")
        )));
    }
    if spec.events.contains(&EventKind::Test) {
        return Err(WebhookError::Invalid(
            "webhook.test is sent by `webhook test` only; leave it out of --events".into(),
        ));
    }
    if spec.secret.as_ref().is_some_and(|s| s.is_empty() || s.len() > SECRET_BYTES_MAX) {
        return Err(WebhookError::Invalid(format!("the secret must be 1 to {SECRET_BYTES_MAX} bytes")));
    }
    let name = spec.name.clone().unwrap_or_else(|| default_name(&spec.destination));
    crate::admin::validate_name(&name, "webhook name").map_err(|e| WebhookError::Invalid(e.to_string()))?;
    let targets = store.list_webhook_targets()?;
    if targets.len() >= TARGETS_MAX {
        return Err(WebhookError::Invalid(format!(
            "{TARGETS_MAX} targets exist already; remove one first (`gaffer-control webhook remove ID`)"
        )));
    }
    if targets.iter().any(|t| t.name == name) {
        return Err(WebhookError::Invalid(format!("a webhook named {name:?} exists; pick another --name")));
    }
    let mut events = spec.events;
    events.sort();
    events.dedup();
    let target = WebhookTarget {
        id: Uuid::new_v4(),
        name,
        destination: spec.destination,
        events,
        secret: spec.secret,
        created_at_ms: now_ms,
        created_by: actor.to_string(),
    };
    store.put_webhook_target(&target)?;
    let info = WebhookInfo::of(&target);
    store.append_audit(&AuditRecord::new(actor, audit_action::WEBHOOK_ADD, now_ms).detail(format!(
        "webhook {} ({} {}), events {}",
        info.name,
        info.kind,
        info.url,
        target.events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(",")
    )))?;
    store.flush()?;
    Ok(info)
}

/// Removes a target by id or name (audited `webhook_remove`); its pending deliveries are dropped.
///
/// # Errors
/// [`WebhookError::NotFound`].
pub fn remove_target(store: &dyn Store, actor: &Actor, key: &str, now_ms: UnixMs) -> Result<WebhookInfo, WebhookError> {
    let target = find_target(store, key)?;
    store.delete_webhook_target(target.id)?;
    for d in store.webhook_deliveries_due(u64::MAX, PENDING_MAX)? {
        if d.target_id == target.id {
            store.update_webhook_delivery(d.id, &mut |d| {
                if d.state != DeliveryState::Pending {
                    return false;
                }
                d.state = DeliveryState::Dropped;
                d.finished_at_ms = Some(now_ms);
                true
            })?;
        }
    }
    let info = WebhookInfo::of(&target);
    store.append_audit(
        &AuditRecord::new(actor, audit_action::WEBHOOK_REMOVE, now_ms)
            .detail(format!("webhook {} ({} {})", info.name, info.kind, info.url)),
    )?;
    store.flush()?;
    Ok(info)
}

/// Queues a `webhook.test` delivery to one target (audited `webhook_test`); the worker sends it.
///
/// # Errors
/// [`WebhookError::NotFound`].
pub fn test_target(
    store: &dyn Store,
    actor: &Actor,
    key: &str,
    now_ms: UnixMs,
) -> Result<(WebhookInfo, Uuid), WebhookError> {
    let target = find_target(store, key)?;
    let data = serde_json::json!({ "target": target.name, "requested_by": actor.to_string() });
    let summary = format!("Gaffer test delivery to {} requested by {actor}", target.name);
    let d = delivery_for(&target, EventKind::Test, &data, &summary, now_ms);
    let id = d.id;
    enqueue(store, &d)?;
    store.append_audit(
        &AuditRecord::new(actor, audit_action::WEBHOOK_TEST, now_ms)
            .detail(format!("webhook {}, delivery {id}", target.name)),
    )?;
    store.flush()?;
    Ok((WebhookInfo::of(&target), id))
}

/// Performs one admin-socket webhook request.
///
/// # Errors
/// As the action.
pub fn handle_admin(store: &dyn Store, actor: &Actor, req: WebhookRequest) -> Result<WebhookResponse, WebhookError> {
    let now = crate::now_ms();
    Ok(match req {
        WebhookRequest::Add { spec } => WebhookResponse::Added(add_target(store, actor, spec, now)?),
        WebhookRequest::List => {
            let mut targets: Vec<WebhookInfo> = store.list_webhook_targets()?.iter().map(WebhookInfo::of).collect();
            targets.sort_by(|a, b| a.name.cmp(&b.name));
            WebhookResponse::Targets { targets }
        }
        WebhookRequest::Remove { target } => WebhookResponse::Removed(remove_target(store, actor, &target, now)?),
        WebhookRequest::Test { target } => {
            let (target, delivery_id) = test_target(store, actor, &target, now)?;
            WebhookResponse::TestQueued { target, delivery_id }
        }
        WebhookRequest::Deliveries { limit } => {
            WebhookResponse::Deliveries { deliveries: store.list_webhook_deliveries(limit.clamp(1, 1000))? }
        }
    })
}

/// The delivery of `event` with `data` to `target` at `now_ms` (not stored yet).
pub fn delivery_for(
    target: &WebhookTarget,
    event: EventKind,
    data: &serde_json::Value,
    summary: &str,
    now_ms: UnixMs,
) -> WebhookDelivery {
    let id = Uuid::now_v7();
    let payload = match &target.destination {
        Destination::Http { format: BodyFormat::Slack, .. } => serde_json::json!({ "text": summary }).to_string(),
        _ => serde_json::json!({
            "event": event.as_str(),
            "id": id,
            "time": rfc3339_millis(now_ms),
            "data": data,
        })
        .to_string(),
    };
    WebhookDelivery {
        id,
        target_id: target.id,
        target_name: target.name.clone(),
        event,
        payload,
        summary: summary.to_owned(),
        created_at_ms: now_ms,
        state: DeliveryState::Pending,
        next_attempt_at_ms: now_ms,
        attempts_total: 0,
        attempts: Vec::new(),
        finished_at_ms: None,
    }
}

/// Stores a pending delivery, dropping the oldest pending ones past [`PENDING_MAX`] (WARN).
///
/// # Errors
/// Store errors.
pub fn enqueue(store: &dyn Store, d: &WebhookDelivery) -> Result<usize, StoreError> {
    let dropped = store.enqueue_webhook_delivery(d, PENDING_MAX)?;
    for id in &dropped {
        tracing::warn!(delivery_id = %id, pending_max = PENDING_MAX, "webhook delivery dropped unsent: too many pending");
    }
    Ok(dropped.len())
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339_millis(ms: UnixMs) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{ms}"))
}

/// The control plane's emitter: the alert rules' state and the store the deliveries go to.
/// [`Webhooks::emit`] and the `*_` hooks are blocking (store writes): call them where blocking is
/// allowed (the ingest path, the scheduler's effects, a blocking task).
pub struct Webhooks {
    store: Arc<dyn Store>,
    rules: Mutex<alerts::AlertRules>,
    settings: WebhookSettings,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Webhooks {
    /// An emitter over `store` with the alert `rules` and delivery `settings`.
    pub fn new(
        store: Arc<dyn Store>,
        rules: alerts::AlertSettings,
        settings: WebhookSettings,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self { store, rules: Mutex::new(alerts::AlertRules::new(rules)), settings, metrics })
    }

    /// The delivery settings.
    pub fn settings(&self) -> WebhookSettings {
        self.settings
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, alerts::AlertRules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event` with `data` for every target subscribed to it. Never fails the caller: a
    /// store error is logged (the event itself already happened).
    pub fn emit(&self, event: EventKind, data: serde_json::Value, summary: &str, now_ms: UnixMs) {
        let targets = match self.store.list_webhook_targets() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, event = %event, "webhook targets unreadable; event not queued");
                return;
            }
        };
        for t in targets.iter().filter(|t| t.events.contains(&event)) {
            let d = delivery_for(t, event, &data, summary, now_ms);
            match enqueue(self.store.as_ref(), &d) {
                Ok(dropped) => {
                    for _ in 0..dropped {
                        self.metrics.webhook_delivery("dropped");
                    }
                    tracing::debug!(delivery_id = %d.id, target = %t.name, event = %event, "webhook delivery queued");
                }
                Err(e) => tracing::error!(error = %e, target = %t.name, event = %event, "webhook delivery not queued"),
            }
        }
    }

    /// A job finished in `state` (the scheduler's effect): `job.succeeded` / `job.failed`.
    pub fn job_finished(&self, job_id: JobId, state: JobState, now_ms: UnixMs) {
        let event = match state {
            JobState::Succeeded => EventKind::JobSucceeded,
            JobState::Failed => EventKind::JobFailed,
            _ => return,
        };
        let job = match self.store.get_job(job_id) {
            Ok(Some(j)) => j,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(job_id = %job_id, error = %e, "finished job unreadable; no webhook");
                return;
            }
        };
        let summary = job_summary(&job);
        self.emit(event, crate::http::job_value(job), &summary, now_ms);
    }

    /// An agent's link came up: `agent.online` when it had been reported offline.
    pub fn agent_connected(&self, agent: AgentId, now_ms: UnixMs) {
        let alerts = self.rules().agent_connected(agent, now_ms);
        self.send_alerts(alerts, now_ms);
    }

    /// An agent's link went down: starts its offline timer.
    pub fn agent_disconnected(&self, agent: AgentId, now_ms: UnixMs) {
        self.rules().agent_disconnected(agent, now_ms);
    }

    /// A heartbeat's health: the threshold rules.
    pub fn health(&self, agent: AgentId, health: &gaffer_protocol::health::Health, now_ms: UnixMs) {
        let alerts = self.rules().health(agent, health);
        self.send_alerts(alerts, now_ms);
    }

    /// The offline timer: `agent.offline` for agents offline longer than the rule allows.
    pub fn tick(&self, now_ms: UnixMs) {
        let alerts = self.rules().tick(now_ms);
        self.send_alerts(alerts, now_ms);
    }

    /// A rollout halted.
    pub fn rollout_halted(&self, rollout_id: u64, agent: AgentId, reason: &str, now_ms: UnixMs) {
        let data = serde_json::json!({ "rollout_id": rollout_id, "agent": agent, "reason": reason });
        self.emit(
            EventKind::RolloutHalted,
            data,
            &format!("Rollout {rollout_id} halted on agent {agent}: {reason}"),
            now_ms,
        );
    }

    fn send_alerts(&self, alerts: Vec<alerts::Alert>, now_ms: UnixMs) {
        for alert in alerts {
            let agent_id = alert.agent();
            let agent = match self.store.get_agent(agent_id) {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(agent_id = %agent_id, error = %e, "agent unreadable; alert not sent");
                    continue;
                }
            };
            let jobs_running = self.store.leased_job_counts(&[agent_id]).ok().and_then(|m| m.get(&agent_id).copied());
            let host = agent.hostname.clone();
            let agent_value = crate::http::agent_value(agent, jobs_running.unwrap_or(0));
            let (event, data, summary) = alert.describe(agent_value, &host);
            tracing::info!(agent_id = %agent_id, event = %event, "{summary}");
            self.emit(event, data, &summary, now_ms);
        }
    }
}

fn job_summary(job: &JobRecord) -> String {
    match (&job.state, &job.error) {
        (JobState::Failed, Some(e)) => format!("Job {} failed: {} ({e})", job.id, job.path),
        _ => format!("Job {} {}: {}", job.id, job.state.as_str(), job.path),
    }
}

/// Reads a secret file: at most [`SECRET_BYTES_MAX`] bytes, not readable or writable by group or
/// others (0600), trailing newline removed.
///
/// # Errors
/// [`WebhookError::SecretFile`] saying what to fix.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, WebhookError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let bad = |detail: String| WebhookError::SecretFile { path: path.display().to_string(), detail };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mode = file.metadata().map_err(|e| bad(e.to_string()))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!("mode {mode:03o} lets others read it; run `chmod 600 {}`", path.display())));
    }
    let mut bytes = Vec::new();
    file.take(SECRET_BYTES_MAX as u64 + 1).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
    if bytes.len() > SECRET_BYTES_MAX {
        return Err(bad(format!("larger than {SECRET_BYTES_MAX} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(secret)
}

/// `gaffer-control webhook …`.
#[derive(Debug, clap::Subcommand)]
pub enum WebhookCommand {
    /// Add a target: an HTTP URL (--url) or an email through SMTP (--smtp-url, --to, --from).
    Add {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// POST deliveries to this http:// or https:// URL.
        #[arg(long, required_unless_present = "smtp_url", conflicts_with = "smtp_url")]
        url: Option<String>,
        /// Send email through this SMTP server: smtp://[user@]host:port (STARTTLS) or smtps://… (TLS).
        #[arg(long, requires_all = ["to", "from"])]
        smtp_url: Option<String>,
        /// Email recipient (repeat for several).
        #[arg(long)]
        to: Vec<String>,
        /// Email sender address.
        #[arg(long)]
        from: Option<String>,
        /// Comma-separated events: job.succeeded, job.failed, agent.offline, agent.online,
        /// agent.health, outbox.full, rollout.halted.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// File (mode 0600) holding the HMAC secret (HTTP) or the SMTP password (email).
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
        /// Body of HTTP deliveries.
        #[arg(long, value_enum, default_value_t = BodyFormat::Json)]
        format: BodyFormat,
        /// Unique name (default: the URL's host, or email-<first recipient>).
        #[arg(long)]
        name: Option<String>,
        /// Print the target as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the targets (never their secrets).
    List {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a target by id or name; its pending deliveries are dropped.
    Remove {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The target's id or name.
        target: String,
        /// Print the removed target as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue a webhook.test delivery to a target (by id or name).
    Test {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The target's id or name.
        target: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The newest deliveries with their attempts.
    Deliveries {
        /// Data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `gaffer-control webhook …`: through the running server's admin socket, or on the store
/// directly when no server runs. Returns what to print.
///
/// # Errors
/// A message for the user.
pub async fn run_command(command: WebhookCommand) -> Result<String, String> {
    let (data_dir, req, json) = match command {
        WebhookCommand::Add { data_dir, url, smtp_url, to, from, events, secret_file, format, name, json } => {
            let events = events
                .iter()
                .map(|e| e.trim().parse::<EventKind>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let secret = secret_file.as_deref().map(read_secret_file).transpose().map_err(|e| e.to_string())?;
            let destination = match (url, smtp_url) {
                (Some(url), _) => Destination::Http { url, format },
                (None, Some(smtp_url)) => Destination::Email { smtp_url, from: from.unwrap_or_default(), to },
                (None, None) => return Err("give --url URL, or --smtp-url with --to and --from".into()),
            };
            (data_dir, WebhookRequest::Add { spec: TargetSpec { name, destination, events, secret } }, json)
        }
        WebhookCommand::List { data_dir, json } => (data_dir, WebhookRequest::List, json),
        WebhookCommand::Remove { data_dir, target, json } => (data_dir, WebhookRequest::Remove { target }, json),
        WebhookCommand::Test { data_dir, target, json } => (data_dir, WebhookRequest::Test { target }, json),
        WebhookCommand::Deliveries { data_dir, limit, json } => (data_dir, WebhookRequest::Deliveries { limit }, json),
    };
    let resp = admin_or_local(&data_dir, req).await?;
    Ok(render(&resp, json))
}

async fn admin_or_local(data_dir: &std::path::Path, req: WebhookRequest) -> Result<WebhookResponse, String> {
    use crate::admin::{self, AdminRequest, AdminResponse};
    let dd = crate::datadir::DataDir::new(data_dir);
    dd.load_config().map_err(|e| e.to_string())?;
    let admin_req = AdminRequest::Webhook(req.clone());
    match admin::request(&dd.admin_socket_path(), &admin_req).await.map_err(|e| e.to_string())? {
        Some(AdminResponse::Webhook(resp)) => return Ok(resp),
        Some(other) => return Err(format!("unexpected answer from the control plane: {other:?}")),
        None => {}
    }
    let store = crate::store::sled_store::SledStore::open(&dd.store_path())
        .map_err(|e| format!("opening the store (is another gaffer-control process using this data dir?): {e}"))?;
    tokio::task::spawn_blocking(move || handle_admin(&store, &admin::local_actor(), req))
        .await
        .map_err(|e| format!("internal error: {e}"))?
        .map_err(|e| e.to_string())
}

fn to_json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

fn render_target(t: &WebhookInfo) -> String {
    let events = t.events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(",");
    let dest = match t.kind.as_str() {
        "email" => format!("email {} → {} via {}", t.from.as_deref().unwrap_or(""), t.to.join(", "), t.url),
        _ => format!(
            "{} ({})",
            t.url,
            t.format.map_or("json", |f| if f == BodyFormat::Slack { "slack" } else { "json" })
        ),
    };
    format!(
        "{}  {}\n  {dest}\n  events {events}; {}; added {} by {}\n",
        t.id,
        t.name,
        if t.has_secret { "secret set" } else { "no secret (unsigned)" },
        t.created_at,
        t.created_by
    )
}

fn render(resp: &WebhookResponse, json: bool) -> String {
    match resp {
        WebhookResponse::Added(t) if json => to_json(t),
        WebhookResponse::Added(t) => format!("Webhook added.\n{}", render_target(t)),
        WebhookResponse::Targets { targets } if json => to_json(targets),
        WebhookResponse::Targets { targets } if targets.is_empty() => {
            "No webhooks yet: add one with `gaffer-control webhook add --url URL --events job.failed`.\n".into()
        }
        WebhookResponse::Targets { targets } => targets.iter().map(render_target).collect::<Vec<_>>().join(""),
        WebhookResponse::Removed(t) if json => to_json(t),
        WebhookResponse::Removed(t) => format!("Webhook {} removed.\n", t.name),
        WebhookResponse::TestQueued { target, delivery_id } if json => {
            to_json(&serde_json::json!({ "target": target, "delivery_id": delivery_id }))
        }
        WebhookResponse::TestQueued { target, delivery_id } => format!(
            "Test delivery {delivery_id} queued for {}; see `gaffer-control webhook deliveries` or the Webhooks page.\n",
            target.name
        ),
        WebhookResponse::Deliveries { deliveries } if json => to_json(deliveries),
        WebhookResponse::Deliveries { deliveries } => deliveries
            .iter()
            .map(|d| {
                let last = d.attempts.last().map_or("no attempt yet".to_owned(), |a| match (a.status, &a.error) {
                    (Some(s), None) => format!("last: {s}"),
                    (Some(s), Some(e)) => format!("last: {s} {e}"),
                    (None, Some(e)) => format!("last: {e}"),
                    (None, None) => "last: ok".into(),
                });
                format!(
                    "{}  {}  {} → {}  {}  {} attempt(s), {last}\n",
                    d.id,
                    crate::admin::rfc3339_ms(d.created_at_ms),
                    d.event,
                    d.target_name,
                    d.state.as_str(),
                    d.attempts_total
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        // RFC 4231 §4.3: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify_signature(
            b"Jefe",
            b"what do ya want for nothing?",
            &signature(b"Jefe", b"what do ya want for nothing?")
        ));
        assert!(!verify_signature(
            b"Jefe",
            b"what do ya want for nothing!",
            &signature(b"Jefe", b"what do ya want for nothing?")
        ));
        assert!(!verify_signature(b"jefe", b"x", "sha256=zz"));
    }

    #[test]
    fn retry_delays_double_from_the_initial_to_the_cap() {
        let s = WebhookSettings::default();
        let secs: Vec<u64> = (1..=11).map(|n| s.retry_delay_ms(n, 1.0) / 1000).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]);
        assert_eq!(s.retry_delay_ms(1000, 1.0), 3_600_000);
        assert_eq!(s.retry_delay_ms(1, 1.2), 12_000);
    }

    #[test]
    fn events_parse_by_wire_name_and_test_is_not_subscribable() {
        assert_eq!("job.failed".parse::<EventKind>().ok(), Some(EventKind::JobFailed));
        assert!("webhook.test".parse::<EventKind>().is_err());
        assert!("job.done".parse::<EventKind>().unwrap_err().to_string().contains("job.succeeded"));
    }

    #[test]
    fn bodies_carry_event_id_time_and_data_or_slack_text() {
        let mut t = WebhookTarget {
            id: Uuid::new_v4(),
            name: "hooks".into(),
            destination: Destination::Http { url: "https://hooks.example.com/x".into(), format: BodyFormat::Json },
            events: vec![EventKind::JobFailed],
            secret: None,
            created_at_ms: 0,
            created_by: "t".into(),
        };
        let d =
            delivery_for(&t, EventKind::JobFailed, &serde_json::json!({"id": "j"}), "Job j failed", 1_700_000_000_123);
        let body: serde_json::Value = serde_json::from_str(&d.payload).unwrap_or_default();
        assert_eq!(body["event"], "job.failed");
        assert_eq!(body["id"], d.id.to_string());
        assert_eq!(body["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(body["data"]["id"], "j");
        t.destination = Destination::Http { url: "https://hooks.slack.com/x".into(), format: BodyFormat::Slack };
        let d = delivery_for(&t, EventKind::JobFailed, &serde_json::json!({}), "Job j failed", 0);
        assert_eq!(d.payload, r#"{"text":"Job j failed"}"#);
    }

    #[test]
    fn urls_are_listed_without_passwords() {
        assert_eq!(redact_url("smtp://bob:hunter2@mail.example.com:587"), "smtp://bob:***@mail.example.com:587");
        assert_eq!(redact_url("https://h.example.com/x"), "https://h.example.com/x");
    }
}
