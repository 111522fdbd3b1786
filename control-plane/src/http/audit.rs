//! The audit log over HTTP (admins only, [`super::Permission::ReadAudit`]): the dashboard's
//! `GET /audit` page with a filter form, the latest few entries on the fleet page, and
//! `GET /api/v1/audit`.
//!
//! Both take the same filters (query parameters; empty ones are ignored): `actor` (exactly the
//! entry's actor: `alice`, `token:ci`, `agent <uuid>`, `uid 1000 (alice)`), `action` (e.g.
//! `login_failed`, see [`crate::store::audit_action`]), `agent` and `job` (UUIDs), `since_ms`
//! (Unix ms) or, on the dashboard, `since` (a duration back from now such as `24h` or `7d`, or a
//! UTC time such as `2025-01-31 08:00:00`), and `after` (the `next` cursor of the previous page).
//! The API also takes `limit` (default [`AUDIT_API_LIMIT_DEFAULT`], at most
//! [`AUDIT_API_LIMIT_MAX`]).
//!
//! `GET /api/v1/audit` answers `{"entries": [{"id", "at_ms", "actor", "action", "agent", "site",
//! "job", "detail"}], "next": ID|null}`, newest first, with a `Link: <…&after=ID>; rel="next"`
//! header while older entries follow. Entries come from [`crate::store::Store::query_audit`];
//! every field is escaped by askama like all template output.

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gaffer_protocol::messages::{AgentId, JobId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::api::parse_id;
use super::auth::{ApiCaller, Session};
use super::openapi::ErrorBody;
use super::view::{relative, utc, Me};
use super::{AppError, HttpState, Page, PageError};
use crate::store::{audit_action, AuditEntry, AuditQuery, AuditRecord, Store, StoreError, UnixMs};

/// Entries listed per page of `/audit`, newest first.
pub(crate) const AUDIT_PAGE_MAX: usize = 200;
/// Entries shown on the fleet page (`/`), newest first.
pub(crate) const FLEET_AUDIT_MAX: usize = 5;
/// Default `limit` of `GET /api/v1/audit`.
pub(crate) const AUDIT_API_LIMIT_DEFAULT: usize = 100;
/// Largest `limit` of `GET /api/v1/audit`.
pub(crate) const AUDIT_API_LIMIT_MAX: usize = 1000;
/// Longest accepted `actor` or `action` filter, characters (the description's `maxLength`).
const FILTER_CHARS_MAX: usize = 256;

/// One audit entry, ready to show.
pub(crate) struct AuditRow {
    /// UTC date-time.
    pub when: String,
    /// "5 min ago".
    pub ago: String,
    pub who: String,
    pub action: String,
    /// The agent's id, if the action concerned one.
    pub agent: Option<String>,
    pub site: Option<String>,
    /// The job's id, if the action concerned one.
    pub job: Option<String>,
    pub detail: String,
}

impl AuditRow {
    fn new(rec: &AuditRecord, now_ms: UnixMs) -> Self {
        AuditRow {
            when: utc(rec.at_ms),
            ago: relative(Some(rec.at_ms), now_ms),
            who: rec.who.clone(),
            action: rec.action.clone(),
            agent: rec.agent.map(|a| a.to_string()),
            site: rec.site.clone(),
            job: rec.job.map(|j| j.to_string()),
            detail: rec.detail.clone(),
        }
    }

    /// The newest `limit` entries of `store`, newest first.
    pub(crate) fn latest(store: &dyn Store, limit: usize, now_ms: UnixMs) -> Result<Vec<AuditRow>, StoreError> {
        Ok(store.list_audit(limit)?.iter().map(|r| AuditRow::new(r, now_ms)).collect())
    }
}

/// The filter query of `/audit` and `/api/v1/audit`, as sent (strings, so that a bad value gets
/// a message naming the field). Serialized back for the next-page links.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditFilter {
    /// Only entries whose actor is exactly this (`alice`, `token:ci`, `agent <uuid>`); at most 256 characters.
    #[serde(default, skip_serializing_if = "blank")]
    #[param(max_length = 256)]
    actor: Option<String>,
    /// Only entries with this action (`login_failed`, `job_submitted`, …); at most 256 characters.
    #[serde(default, skip_serializing_if = "blank")]
    #[param(max_length = 256)]
    action: Option<String>,
    /// Only entries concerning this agent (a UUID; empty: any).
    #[serde(default, skip_serializing_if = "blank")]
    #[param(value_type = Option<String>, pattern = "^(|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")]
    agent: Option<String>,
    /// Only entries concerning this job (a UUID; empty: any).
    #[serde(default, skip_serializing_if = "blank")]
    #[param(value_type = Option<String>, pattern = "^(|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")]
    job: Option<String>,
    /// Only entries at or after this time, Unix ms.
    #[serde(default, skip_serializing_if = "blank")]
    #[param(value_type = Option<u64>)]
    since_ms: Option<String>,
    /// Only entries since a duration back from now (`24h`, `7d`) or a UTC time (`2025-01-31 08:00:00`);
    /// `since_ms` wins if both are given.
    #[serde(default, skip_serializing_if = "blank")]
    #[param(
        pattern = "^(0|([0-9]{1,6}(ms|s|m|h|d|w))+|(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8]) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9])?$"
    )]
    since: Option<String>,
    /// Entries per page, default 100; more than 1000 gives 1000.
    #[serde(default, skip_serializing_if = "blank")]
    #[param(value_type = Option<u64>, minimum = 1)]
    limit: Option<String>,
    /// The `next` of the previous page (documented in the path: utoipa skips a field serde
    /// does not serialize).
    #[serde(default, skip_serializing)]
    after: Option<String>,
}

fn blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|s| s.trim().is_empty())
}

fn field(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl AuditFilter {
    /// The store query of this filter with at most `limit_default` (at most `limit_max`) entries.
    ///
    /// # Errors
    /// [`AppError::BadRequest`] naming the bad field.
    fn query(&self, limit_default: usize, limit_max: usize, now_ms: UnixMs) -> Result<AuditQuery, AppError> {
        let text = |v: &Option<String>, name: &str| -> Result<Option<String>, AppError> {
            // Measured as sent (before trimming), as the description's maxLength is.
            if v.as_deref().is_some_and(|s| s.chars().count() > FILTER_CHARS_MAX) {
                return Err(AppError::BadRequest(format!("{name} is longer than {FILTER_CHARS_MAX} characters")));
            }
            Ok(field(v).map(str::to_owned))
        };
        let id = |v: &Option<String>, name: &str| -> Result<Option<uuid::Uuid>, AppError> {
            field(v).map(|s| parse_id(s, name)).transpose()
        };
        // At most i64::MAX: what the API's description promises (int64), and more than any id or
        // Unix ms there will be.
        let number = |v: &Option<String>, name: &str| -> Result<Option<u64>, AppError> {
            field(v)
                .map(|s| match s.parse::<u64>() {
                    Ok(n) if n <= i64::MAX as u64 => Ok(n),
                    _ => Err(AppError::BadRequest(format!("{name} must be a whole number 0..={}", i64::MAX))),
                })
                .transpose()
        };
        // A bad `since` is refused even when `since_ms` (which wins) is given.
        let since = field(&self.since).map(|since| parse_since(since, now_ms)).transpose()?;
        let since_ms = number(&self.since_ms, "since_ms")?.or(since);
        let limit = match number(&self.limit, "limit")? {
            Some(0) => return Err(AppError::BadRequest(format!("limit must be 1..={limit_max}"))),
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(limit_max),
            None => limit_default,
        };
        let agent: Option<AgentId> = id(&self.agent, "agent")?;
        let job: Option<JobId> = id(&self.job, "job")?;
        Ok(AuditQuery {
            actor: text(&self.actor, "actor")?,
            action: text(&self.action, "action")?,
            agent,
            job,
            since_ms,
            after: number(&self.after, "after")?,
            limit,
        })
    }

    /// `path?<this filter>&after=<next>`.
    fn next_url(&self, path: &str, next: u64) -> String {
        let query = serde_urlencoded::to_string(self).unwrap_or_default();
        if query.is_empty() {
            format!("{path}?after={next}")
        } else {
            format!("{path}?{query}&after={next}")
        }
    }
}

/// `since`: a duration back from `now_ms` (`24h`, `7d`) or a UTC time (`2025-01-31 08:00:00`,
/// RFC 3339).
fn parse_since(since: &str, now_ms: UnixMs) -> Result<UnixMs, AppError> {
    if let Ok(ago) = humantime::parse_duration(since) {
        return Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)));
    }
    humantime::parse_rfc3339_weak(since)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .ok_or_else(|| {
            AppError::BadRequest(format!(
                "since {since:?} is neither a duration (24h, 7d) nor a UTC time (2025-01-31 08:00:00)"
            ))
        })
}

/// `GET /audit` — the audit log with its filter form.
#[derive(Template)]
#[template(path = "audit.html")]
pub(crate) struct AuditPage {
    pub me: Me,
    pub audit: Vec<AuditRow>,
    /// How many entries a page shows at most.
    pub limit: usize,
    /// The filter form's values, as sent.
    pub actor: String,
    pub action: String,
    pub agent: String,
    pub job: String,
    pub since: String,
    /// Whether any filter is in force.
    pub filtered: bool,
    /// Known action names (the action field's suggestions).
    pub actions: &'static [&'static str],
    /// Link to the next, older page, while there is one.
    pub next_url: Option<String>,
    /// Link back to the newest entries, on a later page.
    pub first_url: Option<String>,
}

pub(crate) async fn audit_page(
    session: Session,
    State(state): State<HttpState>,
    query: Result<Query<AuditFilter>, QueryRejection>,
) -> Result<Response, PageError> {
    let Query(filter) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let now = crate::now_ms();
    let q = filter.query(AUDIT_PAGE_MAX, AUDIT_PAGE_MAX, now)?;
    let page = state.app.store.query_audit(&q)?;
    let shown = |v: &Option<String>| field(v).unwrap_or_default().to_owned();
    let since = match (field(&filter.since), field(&filter.since_ms)) {
        (Some(s), _) => s.to_owned(),
        (None, Some(ms)) => ms.parse::<u64>().map(utc).unwrap_or_default(),
        (None, None) => String::new(),
    };
    let filtered =
        q.actor.is_some() || q.action.is_some() || q.agent.is_some() || q.job.is_some() || q.since_ms.is_some();
    let mut first = filter.clone();
    first.after = None;
    let first_query = serde_urlencoded::to_string(&first).unwrap_or_default();
    let audit_page = AuditPage {
        me: Me::of(&session),
        audit: page.entries.iter().map(|e| AuditRow::new(&e.record, now)).collect(),
        limit: AUDIT_PAGE_MAX,
        actor: shown(&filter.actor),
        action: shown(&filter.action),
        agent: shown(&filter.agent),
        job: shown(&filter.job),
        since,
        filtered,
        actions: audit_action::ALL,
        next_url: page.next.map(|n| filter.next_url("/audit", n)),
        first_url: q
            .after
            .map(|_| if first_query.is_empty() { "/audit".into() } else { format!("/audit?{first_query}") }),
    };
    Ok(Page(audit_page).into_response())
}

/// One entry of `GET /api/v1/audit`.
#[derive(Serialize, ToSchema)]
#[schema(as = AuditEntry)]
struct AuditEntryJson {
    /// Position in the log (> 0), increasing.
    id: u64,
    /// When, Unix ms.
    at_ms: UnixMs,
    /// Who: `alice`, `token:NAME`, `agent <uuid>`, `uid 1000 (alice)`.
    actor: String,
    /// What, e.g. `job_submitted`.
    action: String,
    #[schema(value_type = Option<String>, format = Uuid)]
    agent: Option<AgentId>,
    site: Option<String>,
    #[schema(value_type = Option<String>, format = Uuid)]
    job: Option<JobId>,
    /// Human-readable detail (never a secret).
    detail: String,
}

impl From<AuditEntry> for AuditEntryJson {
    fn from(e: AuditEntry) -> Self {
        let r = e.record;
        AuditEntryJson {
            id: e.id,
            at_ms: r.at_ms,
            actor: r.who,
            action: r.action,
            agent: r.agent,
            site: r.site,
            job: r.job,
            detail: r.detail,
        }
    }
}

/// One page of the audit log, newest first.
#[derive(Serialize, ToSchema)]
#[schema(as = AuditPage)]
struct AuditPageJson {
    entries: Vec<AuditEntryJson>,
    /// Pass as `after` for the next, older page; null on the last.
    next: Option<u64>,
}

/// `GET /api/v1/audit` (admin): one page of the audit log.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(AuditFilter, ("after" = Option<u64>, Query, description = "The `next` of the previous page: entries older than this id")),
    responses(
        (status = 200, description = "One page of entries, newest first", body = AuditPageJson, headers(("Link" = String, description = "`</api/v1/audit?…&after=ID>; rel=\"next\"` while older entries follow"))),
        (status = 400, description = "A bad filter; the message names it", body = ErrorBody),
    ))]
pub(crate) async fn api_list(
    _: ApiCaller,
    State(state): State<HttpState>,
    query: Result<Query<AuditFilter>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(filter) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let q = filter.query(AUDIT_API_LIMIT_DEFAULT, AUDIT_API_LIMIT_MAX, crate::now_ms())?;
    let page = state.app.store.query_audit(&q)?;
    let next = page.next;
    let body = AuditPageJson { entries: page.entries.into_iter().map(AuditEntryJson::from).collect(), next };
    let mut response = Json(body).into_response();
    if let Some(n) = next {
        let link = HeaderValue::from_str(&format!("<{}>; rel=\"next\"", filter.next_url("/api/v1/audit", n)))
            .map_err(|e| AppError::Internal(format!("Link header: {e}")))?;
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_utc_times() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_since("24h", now).ok(), Some(now - 86_400_000));
        assert_eq!(parse_since("1970-01-02 00:00:00", now).ok(), Some(86_400_000));
        assert_eq!(parse_since("1970-01-02T00:00:00Z", now).ok(), Some(86_400_000));
        assert!(parse_since("yesterday-ish", now).is_err());
    }

    #[test]
    fn next_links_keep_the_filters_and_drop_the_old_cursor() {
        let filter = AuditFilter {
            actor: Some("uid 1000 (alice)".into()),
            action: Some(" ".into()),
            after: Some("99".into()),
            ..AuditFilter::default()
        };
        assert_eq!(filter.next_url("/audit", 42), "/audit?actor=uid+1000+%28alice%29&after=42");
    }

    #[test]
    fn filters_are_limited_in_characters_as_sent() {
        let with_actor = |actor: String| AuditFilter { actor: Some(actor), ..AuditFilter::default() };
        let query = |f: AuditFilter| f.query(100, 1000, 0);
        // 256 four-byte characters are within the limit; one more character (or padding) is not.
        assert_eq!(query(with_actor("🎬".repeat(256))).map(|q| q.actor).ok(), Some(Some("🎬".repeat(256))));
        assert!(matches!(query(with_actor("a".repeat(257))), Err(AppError::BadRequest(m)) if m.contains("actor")));
        assert!(query(with_actor(" ".repeat(257))).is_err(), "blank padding past the limit is refused too");
        assert_eq!(query(with_actor(" ".repeat(3))).map(|q| q.actor).ok(), Some(None));
        // `since_ms` wins over `since`, but a malformed `since` beside it is still refused.
        let both = |since: &str| AuditFilter {
            since_ms: Some("5".into()),
            since: Some(since.into()),
            ..AuditFilter::default()
        };
        assert_eq!(query(both("24h")).map(|q| q.since_ms).ok(), Some(Some(5)));
        assert!(matches!(query(both("last tuesday")), Err(AppError::BadRequest(_))));
    }
}
