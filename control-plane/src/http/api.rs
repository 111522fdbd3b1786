//! The JSON API under `/api/v1`. Every route needs `Authorization: Bearer gfa_…` of an unexpired
//! API token ([`ApiCaller`]) whose role holds the route's permission ([`super::ROUTES`]): `GET`
//! routes any role, submit/cancel/retry `operator` or `admin`, `GET /audit` (see
//! [`super::audit`]) `admin`. Without a valid token 401, with too low a role 403.
//!
//! | route                     | answer |
//! |---------------------------|--------|
//! | `GET /agents`             | one page: `{"agents": [agent], "counts": {…}, "next_cursor": "…" \| null}`; `?site=S`, `&state=online\|offline\|air_gapped\|revoked`, `&limit=N` (default [`AGENTS_LIMIT_DEFAULT`], 1..=[`AGENTS_LIMIT_MAX`]), `&cursor=C` (a previous page's `next_cursor`); also a `Link: <…>; rel="next"` header while more pages follow |
//! | `GET /agents/{id}`        | agent + `health_history` (latest [`HEALTH_HISTORY_MAX`], oldest first) |
//! | `POST /jobs`              | body `{"path", "site", "agent"?, "profile"?, "priority"?}` (priority `low`/`normal`/`high`, default `normal`) → 201 `{"id"}` |
//! | `GET /jobs`               | `[job]`, newest first, one page: `?limit=N` (default [`JOBS_LIMIT_DEFAULT`], at most [`JOBS_LIMIT_MAX`]), `&state=S`, `&agent=ID` (the job's agent), `&after=CURSOR`; a `Link: <…&after=CURSOR>; rel="next"` header while more pages follow |
//! | `GET /jobs/{id}`          | job + `digest` (the `Digest` JSON or null) |
//! | `POST /jobs/{id}/cancel`  | cancels a job that has not finished → 200 job; 404 unknown, 409 finished |
//! | `POST /jobs/{id}/retry`   | queues a failed or cancelled job again with a fresh attempt budget → 200 job; 404 unknown, 409 otherwise |
//!
//! An agent is: id, site, hostname, state (`online`, `offline`, `air_gapped`, `revoked`: revoked
//! first, then whether its link is up), online (its link is up), last_seen_ms, agent_version, health (latest `Health` or null),
//! health_source (`"nvml"`/`"cpu"`/null), jobs_running (jobs leased to it now), capabilities,
//! cert_serial, cert_not_after_ms, cert_issuer_fingerprint, revoked_at_ms. Agents are listed by
//! site, then hostname, then id; the cursor is an opaque position in that order (a page read after
//! an agent changed its hostname may show it again or not at all, never twice in one page). Each
//! agent's fields come from its record as stored when the page is read. `counts` are of the whole
//! fleet whatever the filters: `{"total", "online", "offline", "air_gapped", "revoked", "sites":
//! {"S": {"total", "online", …}}}`; the number of agents the filters match is `counts.total` (or
//! `counts.sites.S.total`), or that entry's state count.
//!
//! A job is: id, path, site, profile, priority, state, agent, pinned_agent, progress,
//! frames_decoded, error (failure, or why the last attempt was requeued), attempts, lease_id and
//! lease_deadline_ms (null unless assigned or running; the deadline is null while the holder is
//! connected and running it), pending_reason (why a queued job is still waiting, null otherwise or
//! before the first leasing pass), created_at_ms, updated_at_ms, finished_at_ms.
//!
//! Submit, cancel and retry are recorded in the audit log with the token as the actor
//! (`token:NAME`).

use std::collections::{BTreeMap, HashMap};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gaffer_protocol::digest::Digest;
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{AgentId, Capabilities, JobId, LeaseId, Profile};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::actions;
use super::auth::ApiCaller;
use super::openapi::ErrorBody;
use super::{AppError, HttpState};
use crate::scheduler::{JobRequest, Scheduler};
use crate::store::{
    AgentCursor, AgentQuery, AgentRecord, AgentState, AgentStateCounts, HealthSample, JobCursor, JobQuery, JobRecord,
    JobState, Priority, Store, UnixMs,
};

/// Health samples returned by `GET /agents/{id}`.
pub(crate) const HEALTH_HISTORY_MAX: usize = 100;
/// Default `limit` of `GET /agents`.
pub(crate) const AGENTS_LIMIT_DEFAULT: usize = 100;
/// Largest `limit` of `GET /agents` (and of the fleet page).
pub(crate) const AGENTS_LIMIT_MAX: usize = 1000;
/// Default `limit` of `GET /jobs`.
pub(crate) const JOBS_LIMIT_DEFAULT: usize = 100;
/// Largest `limit` of `GET /jobs`.
pub(crate) const JOBS_LIMIT_MAX: usize = 1000;

/// An agent as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Agent)]
struct AgentJson {
    #[schema(value_type = String, format = Uuid)]
    id: AgentId,
    site: String,
    hostname: String,
    state: AgentState,
    /// Its link is up now.
    online: bool,
    /// Last message from it, Unix ms.
    last_seen_ms: Option<UnixMs>,
    agent_version: Option<String>,
    /// Latest health report.
    health: Option<Health>,
    /// Where `health` came from: `nvml` or `cpu`.
    #[schema(value_type = Option<String>, pattern = "^(nvml|cpu)$")]
    health_source: Option<&'static str>,
    /// Jobs leased to it now.
    jobs_running: usize,
    /// What it said it can do in its last Hello.
    capabilities: Option<Capabilities>,
    /// Serial of the agent's current certificate, lowercase hex.
    cert_serial: Option<String>,
    /// When it expires, Unix ms.
    cert_not_after_ms: Option<UnixMs>,
    /// SHA-256 fingerprint of the CA that issued it.
    cert_issuer_fingerprint: Option<String>,
    /// When the agent was revoked, Unix ms; None while trusted.
    revoked_at_ms: Option<UnixMs>,
    /// Whether it takes new jobs: `active`, or `cordoned` / `draining` by an operator
    /// (`gaffer-control agent cordon|drain|uncordon`, `POST /api/v1/agents/{id}/drain`).
    scheduling: crate::store::Scheduling,
}

/// An agent with its recent health and certificates.
#[derive(Serialize, ToSchema)]
#[schema(as = AgentDetail)]
struct AgentDetailJson {
    #[serde(flatten)]
    agent: AgentJson,
    /// Latest health samples, oldest first (at most 100).
    health_history: Vec<HealthSample>,
    /// Certificates issued to the agent, oldest first (enrollment, renewals, re-enrollments).
    cert_history: Vec<crate::store::CertIssue>,
}

/// A job as the API shows it (see the module docs for each field).
#[derive(Serialize, ToSchema)]
#[schema(as = Job)]
pub(crate) struct JobJson {
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
    /// Absolute path of the media file on the agent's box.
    path: String,
    site: String,
    profile: Profile,
    priority: Priority,
    state: JobState,
    /// The agent that holds or last held it.
    #[schema(value_type = Option<String>, format = Uuid)]
    agent: Option<AgentId>,
    /// The agent it may only run on.
    #[schema(value_type = Option<String>, format = Uuid)]
    pinned_agent: Option<AgentId>,
    /// Share done, 0..1.
    progress: f32,
    frames_decoded: u64,
    /// Why it failed, or why its last attempt was requeued.
    error: Option<String>,
    attempts: u32,
    /// The current lease (fencing token); null unless assigned or running.
    #[schema(value_type = Option<u64>)]
    lease_id: Option<LeaseId>,
    /// When the lease expires, Unix ms; null while its holder is connected and running it.
    lease_deadline_ms: Option<UnixMs>,
    /// Why a queued job still waits.
    pending_reason: Option<String>,
    created_at_ms: UnixMs,
    updated_at_ms: UnixMs,
    finished_at_ms: Option<UnixMs>,
}

/// A job with its digest.
#[derive(Serialize, ToSchema)]
#[schema(as = JobDetail)]
struct JobDetailJson {
    #[serde(flatten)]
    job: JobJson,
    /// The analysis result, once the job succeeded.
    digest: Option<Digest>,
}

/// `POST /api/v1/jobs` answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct JobCreated {
    /// The new job's id.
    #[schema(value_type = String, format = Uuid)]
    id: JobId,
}

/// `POST /api/v1/jobs` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SubmitJob)]
pub(crate) struct SubmitJobBody {
    /// Absolute path of the media file on the agent's box: starts with `/`, no `..` component,
    /// no NUL, at most 4096 bytes.
    #[schema(pattern = "^/", max_length = 1024)]
    path: String,
    /// The site whose agents may run it: 1..=128 letters, digits, `-`, `_`, `.`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    site: String,
    /// Pin the job to this agent (a UUID; empty: any agent of the site).
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^(|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")]
    agent: Option<String>,
    /// Default `shots`.
    #[serde(default)]
    #[schema(value_type = Option<Profile>)]
    profile: Option<String>,
    /// Default `normal`.
    #[serde(default)]
    #[schema(value_type = Option<Priority>)]
    priority: Option<String>,
}

/// `GET /api/v1/jobs` query. Filters arrive as strings so that a bad one gets a message naming
/// the accepted values.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListJobsQuery {
    /// Jobs per page, default 100; more than 1000 gives 1000.
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// Only jobs in this state (a JobState; empty: any).
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(|queued|assigned|running|succeeded|failed|cancelled)$")]
    state: Option<String>,
    /// Only jobs of this agent (a UUID; empty: any).
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")]
    agent: Option<String>,
    /// The cursor of the `Link: rel="next"` header of the previous page (`<created_at_ms>-<seq>`).
    #[serde(default)]
    #[param(pattern = "^([0-9]{1,19}-[0-9]{1,19})?$")]
    after: Option<String>,
}

fn agent_json(a: AgentRecord, jobs_running: usize) -> AgentJson {
    let agent_state = AgentState::of(&a);
    let health = a.last_health.map(|s| s.health);
    let health_source = health.as_ref().map(|h| match h.source {
        HealthSource::Nvml { .. } => "nvml",
        HealthSource::CpuOnly { .. } => "cpu",
    });
    AgentJson {
        id: a.id,
        site: a.site,
        hostname: a.hostname,
        state: agent_state,
        online: a.connected,
        last_seen_ms: a.last_seen_ms,
        agent_version: a.agent_version,
        health,
        health_source,
        jobs_running,
        capabilities: a.capabilities,
        cert_serial: a.cert_serial_hex,
        cert_not_after_ms: (a.cert_not_after_unix > 0).then(|| a.cert_not_after_unix as u64 * 1000),
        cert_issuer_fingerprint: a.cert_issuer_fingerprint,
        revoked_at_ms: a.revoked_at_ms,
        scheduling: a.scheduling,
    }
}

/// A job as `GET /api/v1/jobs/{id}` shows it, without its digest and pending reason (webhooks).
pub(crate) fn job_value(j: JobRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(job_json_with(j, None)).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("pending_reason");
    }
    v
}

/// An agent as `GET /api/v1/agents/{id}` shows it, without its histories (webhooks).
pub(crate) fn agent_value(a: AgentRecord, jobs_running: usize) -> serde_json::Value {
    serde_json::to_value(agent_json(a, jobs_running)).unwrap_or_default()
}

/// Why a queued job waits (the scheduler's last placement failure); None for other states.
pub(crate) fn pending_reason(scheduler: &Scheduler, j: &JobRecord) -> Option<String> {
    (j.state == JobState::Queued).then(|| scheduler.pending_reason(j.id)).flatten()
}

pub(crate) fn job_json(j: JobRecord, scheduler: &Scheduler) -> JobJson {
    let pending_reason = pending_reason(scheduler, &j);
    job_json_with(j, pending_reason)
}

fn job_json_with(j: JobRecord, pending_reason: Option<String>) -> JobJson {
    JobJson {
        id: j.id,
        path: j.path,
        site: j.site,
        profile: j.profile,
        priority: j.priority,
        state: j.state,
        agent: j.agent,
        pinned_agent: j.pinned_agent,
        progress: j.progress,
        frames_decoded: j.frames_decoded,
        error: j.error,
        attempts: j.attempts,
        lease_id: j.lease.map(|l| l.lease_id),
        lease_deadline_ms: j.lease.and_then(|l| l.deadline_ms),
        pending_reason,
        created_at_ms: j.created_at_ms,
        updated_at_ms: j.updated_at_ms,
        finished_at_ms: j.finished_at_ms,
    }
}

/// Jobs leased (assigned or running) to each of `agents`, by lease holder
/// ([`Store::leased_job_counts`]: an index read per agent, never a scan of job history).
pub(crate) fn jobs_running_of(store: &dyn Store, agents: &[AgentId]) -> Result<HashMap<AgentId, usize>, AppError> {
    Ok(store.leased_job_counts(agents)?)
}

/// The `{id}` of the agent routes.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read by utoipa only: the handlers take the raw string and answer 400 themselves
pub(crate) struct AgentIdParam {
    /// The agent's id.
    #[param(value_type = String, format = Uuid, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    id: AgentId,
}

/// The `{id}` of the job routes.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read by utoipa only: the handlers take the raw string and answer 400 themselves
pub(crate) struct JobIdParam {
    /// The job's id.
    #[param(value_type = String, format = Uuid, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    id: JobId,
}

/// Parses a path id, 400 on a malformed one.
pub(crate) fn parse_id(raw: &str, what: &str) -> Result<uuid::Uuid, AppError> {
    uuid::Uuid::parse_str(raw).map_err(|_| AppError::BadRequest(format!("{what} id must be a UUID")))
}

/// Parses a `state` filter (empty: none), 400 naming the known states.
pub(crate) fn parse_state_filter(raw: Option<&str>) -> Result<Option<JobState>, AppError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<JobState>().map(Some).map_err(AppError::BadRequest),
    }
}

/// Parses an `after` cursor (empty: the first page), 400 saying the accepted form.
pub(crate) fn parse_cursor(raw: Option<&str>) -> Result<Option<JobCursor>, AppError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<JobCursor>().map(Some).map_err(|e| AppError::BadRequest(format!("after: {e}"))),
    }
}

/// `GET /api/v1/agents` query. Filters arrive as strings so that a bad one gets a message naming
/// the accepted values.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListAgentsQuery {
    /// Only agents of this site (empty: every site).
    #[serde(default)]
    #[param(pattern = "^[A-Za-z0-9._-]{0,128}$")]
    site: Option<String>,
    /// Only agents in this state (an AgentState; empty: any).
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(|online|offline|air_gapped|revoked)$")]
    state: Option<String>,
    /// Agents per page, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page (opaque; one this control plane did not make is 400).
    #[serde(default)]
    cursor: Option<String>,
}

/// The `counts` of `GET /api/v1/agents`: `{"total", "online", "offline", "air_gapped",
/// "revoked"}`, and the same per site under `"sites"`.
#[derive(Serialize, ToSchema)]
#[schema(as = AgentCounts)]
struct AgentCountsJson {
    #[serde(flatten)]
    all: StateCountsJson,
    /// The same per site.
    sites: BTreeMap<String, StateCountsJson>,
}

/// Agents by state.
#[derive(Serialize, ToSchema)]
#[schema(as = StateCounts)]
pub(crate) struct StateCountsJson {
    total: u64,
    online: u64,
    offline: u64,
    air_gapped: u64,
    revoked: u64,
}

impl StateCountsJson {
    pub(crate) fn of(c: &AgentStateCounts) -> Self {
        StateCountsJson {
            total: c.total(),
            online: c.get(AgentState::Online),
            offline: c.get(AgentState::Offline),
            air_gapped: c.get(AgentState::AirGapped),
            revoked: c.get(AgentState::Revoked),
        }
    }
}

/// One page of agents.
#[derive(Serialize, ToSchema)]
#[schema(as = AgentList)]
struct AgentListJson {
    agents: Vec<AgentJson>,
    /// Of the whole fleet, whatever the filters.
    counts: AgentCountsJson,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// Parses the agent listing's filters, limit and cursor (shared by the API and the fleet page):
/// empty values mean "none"; 400 naming what is accepted.
pub(crate) fn agent_query(
    site: Option<&str>,
    state: Option<&str>,
    limit: Option<usize>,
    cursor: Option<&str>,
    limit_default: usize,
) -> Result<AgentQuery, AppError> {
    let site = match site.map(str::trim) {
        None | Some("") => None,
        Some(s) => {
            crate::scheduler::validate_site(s).map_err(|e| AppError::BadRequest(format!("site: {e}")))?;
            Some(s.to_owned())
        }
    };
    let state = match state.map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(s.parse::<AgentState>().map_err(AppError::BadRequest)?),
    };
    let limit = limit.unwrap_or(limit_default);
    if limit == 0 || limit > AGENTS_LIMIT_MAX {
        return Err(AppError::BadRequest(format!("limit must be 1..={AGENTS_LIMIT_MAX}")));
    }
    let after = match cursor.map(str::trim) {
        None | Some("") => None,
        Some(c) => Some(c.parse::<AgentCursor>().map_err(|e| AppError::BadRequest(format!("cursor: {e}")))?),
    };
    Ok(AgentQuery { site, state, after, limit })
}

/// The query string of `query` with `cursor` (`site=…&state=…&limit=…&cursor=…`, URL-encoded),
/// for next-page links.
pub(crate) fn agent_query_string(query: &AgentQuery, cursor: &AgentCursor) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(site) = &query.site {
        pairs.push(("site", site.clone()));
    }
    if let Some(state) = query.state {
        pairs.push(("state", state.as_str().to_owned()));
    }
    pairs.push(("limit", query.limit.to_string()));
    pairs.push(("cursor", cursor.to_string()));
    serde_urlencoded::to_string(&pairs).unwrap_or_default()
}

/// `GET /api/v1/agents`: one page of agents (see the module docs), read on a blocking thread.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", params(ListAgentsQuery),
    responses(
        (status = 200, description = "One page of agents", body = AgentListJson, headers(("Link" = String, description = "`</api/v1/agents?…>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Bad filter, limit or cursor", body = ErrorBody),
    ))]
pub(crate) async fn list_agents(
    _: ApiCaller,
    State(state): State<HttpState>,
    query: Result<Query<ListAgentsQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(raw) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let query =
        agent_query(raw.site.as_deref(), raw.state.as_deref(), raw.limit, raw.cursor.as_deref(), AGENTS_LIMIT_DEFAULT)?;
    let store = state.app.store.clone();
    let body = tokio::task::spawn_blocking(move || -> Result<(AgentListJson, Option<String>), AppError> {
        let page = store.list_agents_page(&query)?;
        let ids: Vec<AgentId> = page.agents.iter().map(|a| a.id).collect();
        let running = jobs_running_of(store.as_ref(), &ids)?;
        let link =
            page.next.as_ref().map(|c| format!("</api/v1/agents?{}>; rel=\"next\"", agent_query_string(&query, c)));
        let agents = page
            .agents
            .into_iter()
            .map(|a| {
                let n = running.get(&a.id).copied().unwrap_or(0);
                agent_json(a, n)
            })
            .collect();
        let counts = AgentCountsJson {
            all: StateCountsJson::of(&page.counts.all),
            sites: page.counts.by_site.iter().map(|(s, c)| (s.clone(), StateCountsJson::of(c))).collect(),
        };
        Ok((AgentListJson { agents, counts, next_cursor: page.next.map(|c| c.to_string()) }, link))
    })
    .await
    .map_err(|e| AppError::Internal(format!("agent listing task: {e}")))??;
    let (body, link) = body;
    let mut response = Json(body).into_response();
    if let Some(link) = link {
        let link = HeaderValue::from_str(&link).map_err(|e| AppError::Internal(format!("Link header: {e}")))?;
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

/// `GET /api/v1/agents/{id}`: one agent with its health history and certificates.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", params(AgentIdParam),
    responses(
        (status = 200, description = "The agent", body = AgentDetailJson),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
    ))]
pub(crate) async fn get_agent(
    _: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "agent")?;
    let store = state.app.store.as_ref();
    let agent = store.get_agent(id)?.ok_or_else(|| AppError::NotFound(format!("agent {id}")))?;
    let running = jobs_running_of(store, &[id])?.get(&id).copied().unwrap_or(0);
    let health_history = store.health_history(id, HEALTH_HISTORY_MAX)?;
    let cert_history = agent.cert_history.clone();
    Ok(Json(AgentDetailJson { agent: agent_json(agent, running), health_history, cert_history }))
}

/// `GET /api/v1/jobs`: one page of jobs, newest first.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListJobsQuery),
    responses(
        (status = 200, description = "One page of jobs, newest first", body = Vec<JobJson>, headers(("Link" = String, description = "`</api/v1/jobs?…&after=CURSOR>; rel=\"next\"` while more pages follow"))),
        (status = 400, description = "Bad filter, limit or cursor", body = ErrorBody),
    ))]
pub(crate) async fn list_jobs(
    _: ApiCaller,
    State(state): State<HttpState>,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let limit = query.limit.unwrap_or(JOBS_LIMIT_DEFAULT);
    if limit == 0 {
        return Err(AppError::BadRequest(format!("limit must be 1..={JOBS_LIMIT_MAX}")));
    }
    let limit = limit.min(JOBS_LIMIT_MAX);
    let job_state = parse_state_filter(query.state.as_deref())?;
    let agent = match query.agent.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => Some(parse_id(raw, "agent")?),
    };
    let after = parse_cursor(query.after.as_deref())?;
    let page = state.app.store.list_jobs(&JobQuery { state: job_state, agent, after, limit })?;
    let scheduler = state.app.scheduler.as_ref();
    let jobs: Vec<JobJson> = page.jobs.into_iter().map(|j| job_json(j, scheduler)).collect();
    let mut response = Json(jobs).into_response();
    if let Some(next) = page.next {
        let mut url = format!("/api/v1/jobs?limit={limit}");
        if let Some(s) = job_state {
            url.push_str(&format!("&state={}", s.as_str()));
        }
        if let Some(a) = agent {
            url.push_str(&format!("&agent={a}"));
        }
        url.push_str(&format!("&after={next}"));
        let link = HeaderValue::from_str(&format!("<{url}>; rel=\"next\""))
            .map_err(|e| AppError::Internal(format!("Link header: {e}")))?;
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

/// `GET /api/v1/jobs/{id}`: one job with its digest.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(JobIdParam),
    responses(
        (status = 200, description = "The job and its digest (null until it succeeded)", body = JobDetailJson),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
pub(crate) async fn get_job(
    _: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "job")?;
    let store = state.app.store.as_ref();
    let job = store.get_job(id)?.ok_or_else(|| AppError::NotFound(format!("job {id}")))?;
    let digest = store.get_digest(id)?;
    Ok(Json(JobDetailJson { job: job_json(job, &state.app.scheduler), digest }))
}

/// `POST /api/v1/jobs` (operator): queues a job.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = SubmitJobBody,
    responses(
        (status = 201, description = "Queued", body = JobCreated),
        (status = 400, description = "Malformed JSON, unknown field or wrong content type", body = ErrorBody),
        (status = 413, description = "Body larger than 64 KiB", body = ErrorBody),
        (status = 422, description = "A refused value (relative path, unknown agent or profile); the message names it", body = ErrorBody),
    ))]
pub(crate) async fn submit_job(
    caller: ApiCaller,
    State(state): State<HttpState>,
    body: Result<Json<SubmitJobBody>, JsonRejection>,
) -> Result<impl IntoResponse, AppError> {
    let Json(body) = body.map_err(json_rejection)?;
    let agent = match body.agent.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => Some(parse_id(raw, "agent")?),
    };
    let profile = match body.profile.as_deref() {
        None => Profile::Shots,
        Some(p) => p.parse::<Profile>().map_err(AppError::Unprocessable)?,
    };
    let priority = match body.priority.as_deref() {
        None => Priority::Normal,
        Some(p) => p.parse::<Priority>().map_err(AppError::Unprocessable)?,
    };
    let req = JobRequest { path: body.path, site: body.site, agent, profile, priority };
    let job = actions::submit(&state.app, req, caller.actor()).await??;
    Ok((StatusCode::CREATED, Json(JobCreated { id: job.id })))
}

/// `POST /api/v1/jobs/{id}/cancel` (operator): cancels a job that has not finished.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(JobIdParam),
    responses(
        (status = 200, description = "Cancelled", body = JobJson),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has finished", body = ErrorBody),
    ))]
pub(crate) async fn cancel_job(
    caller: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "job")?;
    let job = actions::cancel(&state.app, id, caller.actor()).await?;
    Ok(Json(job_json(job, &state.app.scheduler)))
}

/// `POST /api/v1/agents/{id}/revoke` (admin): `{"agent_id", "serial_hex", "newly_revoked"}`.
#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke", tag = "agents", params(AgentIdParam),
    responses(
        (status = 200, description = "Revoked (or already revoked: `newly_revoked` false)", body = crate::offline::RevokeReport),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        (status = 409, description = "The agent has no certificate to revoke", body = ErrorBody),
    ))]
pub(crate) async fn revoke_agent(
    caller: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "agent")?;
    let report = actions::revoke(&state.app, id, caller.actor()).await?;
    Ok(Json(report))
}

/// `POST /api/v1/jobs/{id}/retry` (operator): queues a failed or cancelled job again.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs", params(JobIdParam),
    responses(
        (status = 200, description = "Queued again", body = JobJson),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is neither failed nor cancelled", body = ErrorBody),
    ))]
pub(crate) async fn retry_job(
    caller: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "job")?;
    let job = actions::retry(&state.app, id, caller.actor()).await?;
    Ok(Json(job_json(job, &state.app.scheduler)))
}

/// Maps axum's JSON rejection (syntax, types, unknown fields, content type, size) to [`AppError`].
fn json_rejection(e: JsonRejection) -> AppError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
        StatusCode::UNPROCESSABLE_ENTITY => AppError::Unprocessable(e.body_text()),
        _ => AppError::BadRequest(e.body_text()),
    }
}

pub(crate) async fn not_found() -> AppError {
    AppError::NotFound("API route".into())
}
