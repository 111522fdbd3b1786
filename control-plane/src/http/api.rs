//! The JSON API under `/api/v1`. Every route needs `Authorization: Bearer gfa_…` ([`ApiCaller`]).
//!
//! | route                | answer |
//! |----------------------|--------|
//! | `GET /agents`        | `[agent]`: id, site, hostname, online, last_seen_ms, agent_version, health (latest `Health` or null), health_source (`"nvml"`/`"cpu"`/null), jobs_running, capabilities |
//! | `GET /agents/{id}`   | agent + `health_history` (latest [`HEALTH_HISTORY_MAX`], oldest first) |
//! | `POST /jobs`         | body `{"path", "site", "agent"?, "profile"?}` → 201 `{"id"}` |
//! | `GET /jobs?limit=N`  | `[job]`, newest first; limit default [`JOBS_LIMIT_DEFAULT`], at most [`JOBS_LIMIT_MAX`] |
//! | `GET /jobs/{id}`     | job + `digest` (the `Digest` JSON or null) |

use std::collections::HashMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use gaffer_protocol::digest::Digest;
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{AgentId, Capabilities, JobId, Profile};
use serde::{Deserialize, Serialize};

use super::auth::ApiCaller;
use super::{AppError, HttpState};
use crate::scheduler::JobRequest;
use crate::store::{AgentRecord, HealthSample, JobOrigin, JobRecord, JobState, Store, UnixMs};

/// Health samples returned by `GET /agents/{id}`.
pub(crate) const HEALTH_HISTORY_MAX: usize = 100;
/// Default `limit` of `GET /jobs`.
pub(crate) const JOBS_LIMIT_DEFAULT: usize = 100;
/// Largest `limit` of `GET /jobs`.
pub(crate) const JOBS_LIMIT_MAX: usize = 1000;

#[derive(Serialize)]
struct AgentJson {
    id: AgentId,
    site: String,
    hostname: String,
    online: bool,
    last_seen_ms: Option<UnixMs>,
    agent_version: Option<String>,
    health: Option<Health>,
    health_source: Option<&'static str>,
    jobs_running: usize,
    capabilities: Option<Capabilities>,
}

#[derive(Serialize)]
struct AgentDetailJson {
    #[serde(flatten)]
    agent: AgentJson,
    health_history: Vec<HealthSample>,
}

#[derive(Serialize)]
struct JobJson {
    id: JobId,
    path: String,
    site: String,
    profile: Profile,
    state: JobState,
    agent: Option<AgentId>,
    progress: f32,
    frames_decoded: u64,
    error: Option<String>,
    attempts: u32,
    created_at_ms: UnixMs,
    updated_at_ms: UnixMs,
    finished_at_ms: Option<UnixMs>,
}

#[derive(Serialize)]
struct JobDetailJson {
    #[serde(flatten)]
    job: JobJson,
    digest: Option<Digest>,
}

/// `POST /api/v1/jobs` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitJobBody {
    path: String,
    site: String,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    profile: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct ListJobsQuery {
    limit: Option<usize>,
}

fn agent_json(a: AgentRecord, jobs_running: usize) -> AgentJson {
    let health = a.last_health.map(|s| s.health);
    let health_source = health.as_ref().map(|h| match h.source {
        HealthSource::Nvml { .. } => "nvml",
        HealthSource::CpuOnly { .. } => "cpu",
    });
    AgentJson {
        id: a.id,
        site: a.site,
        hostname: a.hostname,
        online: a.connected,
        last_seen_ms: a.last_seen_ms,
        agent_version: a.agent_version,
        health,
        health_source,
        jobs_running,
        capabilities: a.capabilities,
    }
}

fn job_json(j: JobRecord) -> JobJson {
    JobJson {
        id: j.id,
        path: j.path,
        site: j.site,
        profile: j.profile,
        state: j.state,
        agent: j.agent,
        progress: j.progress,
        frames_decoded: j.frames_decoded,
        error: j.error,
        attempts: j.attempts,
        created_at_ms: j.created_at_ms,
        updated_at_ms: j.updated_at_ms,
        finished_at_ms: j.finished_at_ms,
    }
}

/// Jobs leased (assigned or running) per agent.
pub(crate) fn jobs_running_by_agent(store: &dyn Store) -> Result<HashMap<AgentId, usize>, AppError> {
    let mut counts = HashMap::new();
    for state in [JobState::Assigned, JobState::Running] {
        for job in store.jobs_in_state(state)? {
            if let Some(agent) = job.agent {
                *counts.entry(agent).or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}

/// Parses a path id, 400 on a malformed one.
pub(crate) fn parse_id(raw: &str, what: &str) -> Result<uuid::Uuid, AppError> {
    uuid::Uuid::parse_str(raw).map_err(|_| AppError::BadRequest(format!("{what} id must be a UUID")))
}

pub(crate) async fn list_agents(_: ApiCaller, State(state): State<HttpState>) -> Result<impl IntoResponse, AppError> {
    let store = state.app.store.as_ref();
    let running = jobs_running_by_agent(store)?;
    let agents: Vec<AgentJson> = store
        .list_agents()?
        .into_iter()
        .map(|a| {
            let n = running.get(&a.id).copied().unwrap_or(0);
            agent_json(a, n)
        })
        .collect();
    Ok(Json(agents))
}

pub(crate) async fn get_agent(
    _: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "agent")?;
    let store = state.app.store.as_ref();
    let agent = store.get_agent(id)?.ok_or_else(|| AppError::NotFound(format!("agent {id}")))?;
    let running = jobs_running_by_agent(store)?.get(&id).copied().unwrap_or(0);
    let health_history = store.health_history(id, HEALTH_HISTORY_MAX)?;
    Ok(Json(AgentDetailJson { agent: agent_json(agent, running), health_history }))
}

pub(crate) async fn list_jobs(
    _: ApiCaller,
    State(state): State<HttpState>,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<impl IntoResponse, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let limit = query.limit.unwrap_or(JOBS_LIMIT_DEFAULT).min(JOBS_LIMIT_MAX);
    let jobs: Vec<JobJson> = state.app.store.list_jobs(limit)?.into_iter().map(job_json).collect();
    Ok(Json(jobs))
}

pub(crate) async fn get_job(
    _: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "job")?;
    let store = state.app.store.as_ref();
    let job = store.get_job(id)?.ok_or_else(|| AppError::NotFound(format!("job {id}")))?;
    let digest = store.get_digest(id)?;
    Ok(Json(JobDetailJson { job: job_json(job), digest }))
}

pub(crate) async fn submit_job(
    _: ApiCaller,
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
    let req = JobRequest { path: body.path, site: body.site, agent, profile };
    let job = state.app.scheduler.submit(req, JobOrigin::Api, None)?;
    tracing::info!(job = %job.id, site = %job.site, "job submitted through the API");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": job.id }))))
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
