//! The server-rendered dashboard: fleet overview, agent and job pages, the job form, job cancel and
//! retry, login and logout. Usable without JavaScript. Every page needs a session ([`Session`]);
//! every form that changes something is a POST carrying the session's CSRF token (login: the
//! double-submit cookie); the jobs page's state filter is a plain GET form.
//!
//! | route                     | what |
//! |---------------------------|------|
//! | `GET /`                   | fleet: job counts per state ([`crate::store::Store::job_counts`]), agents, latest audit entries |
//! | `GET /jobs?state=S&after=C` | one page of jobs, newest first, with a state filter and a next-page link |
//! | `GET /jobs/new`, `POST /jobs` | the job form (with priority) and its submission |
//! | `GET /jobs/{id}`          | job: state, priority, attempts, lease, why it waits, last error, digest; Cancel / Retry buttons |
//! | `POST /jobs/{id}/cancel`, `POST /jobs/{id}/retry` | the buttons; 303 back to the job page |
//!
//! Submit, cancel and retry are recorded in the audit log with the actor `"dashboard admin"`.

use std::collections::BTreeSet;
use std::time::Instant;

use argon2::password_hash::PasswordHash;
use argon2::{Argon2, PasswordVerifier};
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use axum_extra::extract::cookie::CookieJar;
use serde::Deserialize;

use super::actions::{self, DASHBOARD_ACTOR};
use super::api::{
    jobs_running_by_agent, parse_cursor, parse_id, parse_state_filter, pending_reason, HEALTH_HISTORY_MAX,
};
use super::auth::{
    login_csrf_cookie, random_token, removal_cookie, session_cookie, sha256, tokens_equal, LoginThrottle, Session,
    LOGIN_CSRF_COOKIE, LOGIN_FAILED_STATUS, SESSION_COOKIE, SESSION_TTL_MS,
};
use super::view::{
    mean_gpu_util, sparkline, utc, AgentOption, AgentPage, AgentRow, Count, DigestView, FleetPage, GpuInfoRow,
    HistoryRow, JobPage, JobRow, JobsPage, LoginPage, NewJobPage, PriorityOption, StateOption, SPARK_H, SPARK_W,
};
use super::{AppError, HttpState, Page, PageError};
use crate::scheduler::{JobRequest, SubmitError};
use crate::store::{JobQuery, JobState, Priority, SessionRecord};

/// Jobs shown per page of `/jobs`.
const JOBS_PAGE_MAX: usize = 200;
/// Recent jobs listed on an agent page.
const AGENT_JOBS_MAX: usize = 20;
/// Longest accepted password, bytes (argon2 work is bounded by this).
const PASSWORD_BYTES_MAX: usize = 1024;

fn form_rejection(e: FormRejection) -> AppError {
    AppError::BadRequest(e.body_text())
}

pub(crate) async fn fleet(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let store = state.app.store.as_ref();
    let now = crate::now_ms();
    let running = jobs_running_by_agent(store)?;
    let agents: Vec<AgentRow> =
        store.list_agents()?.iter().map(|a| AgentRow::new(a, running.get(&a.id).copied().unwrap_or(0), now)).collect();
    let counts = store.job_counts()?;
    let job_counts = JobState::ALL.iter().map(|&s| Count { label: s.as_str(), count: counts.get(s) }).collect();
    let online_count = agents.iter().filter(|a| a.online).count();
    let audit = super::audit::AuditRow::latest(store, super::audit::FLEET_AUDIT_MAX, now)?;
    Ok(Page(FleetPage { csrf: session.record.csrf_token, agents, job_counts, online_count, audit }).into_response())
}

pub(crate) async fn agent_page(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = parse_id(&id, "agent")?;
    let store = state.app.store.as_ref();
    let now = crate::now_ms();
    let agent = store.get_agent(id)?.ok_or_else(|| AppError::NotFound(format!("agent {id}")))?;
    let running = jobs_running_by_agent(store)?.get(&id).copied().unwrap_or(0);
    let samples = store.health_history(id, HEALTH_HISTORY_MAX)?;
    let cpu: Vec<f64> = samples.iter().map(|s| f64::from(s.health.cpu_percent)).collect();
    let gpu: Vec<f64> = samples.iter().filter_map(|s| mean_gpu_util(&s.health)).collect();
    let jobs: Vec<JobRow> = store
        .list_jobs(&JobQuery { agent: Some(id), limit: AGENT_JOBS_MAX, ..JobQuery::default() })?
        .jobs
        .iter()
        .map(|j| JobRow::new(j, now))
        .collect();
    let caps = agent.capabilities.clone();
    let page = AgentPage {
        csrf: session.record.csrf_token,
        agent: AgentRow::new(&agent, running, now),
        enrolled: utc(agent.enrolled_at_ms),
        cert_expires: u64::try_from(agent.cert_not_after_unix)
            .map(|s| utc(s.saturating_mul(1000)))
            .unwrap_or_else(|_| agent.cert_not_after_unix.to_string()),
        has_capabilities: caps.is_some(),
        volumes: caps.as_ref().map(|c| c.volumes.clone()).unwrap_or_default(),
        watch_roots: caps.as_ref().map(|c| c.watch_roots.clone()).unwrap_or_default(),
        profiles: caps.as_ref().map(|c| c.profiles.iter().map(|p| p.to_string()).collect()).unwrap_or_default(),
        models: caps
            .as_ref()
            .map(|c| {
                c.models
                    .iter()
                    .map(|m| format!("{} {} ({})", m.name, m.version, m.sha256.get(..12).unwrap_or(&m.sha256)))
                    .collect()
            })
            .unwrap_or_default(),
        gpus: caps
            .as_ref()
            .map(|c| {
                c.gpus
                    .iter()
                    .map(|g| GpuInfoRow {
                        index: g.index,
                        name: g.name.clone(),
                        uuid: g.uuid.clone(),
                        memory: super::view::bytes(g.memory_total_bytes),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        history: samples.iter().rev().map(HistoryRow::new).collect(),
        spark_w: SPARK_W,
        spark_h: SPARK_H,
        spark_cpu: sparkline(&cpu),
        spark_gpu: sparkline(&gpu),
        jobs,
    };
    Ok(Page(page).into_response())
}

/// The `GET /jobs` query: the state filter form and the next-page link.
#[derive(Deserialize)]
pub(crate) struct JobsQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

pub(crate) async fn jobs_page(
    session: Session,
    State(state): State<HttpState>,
    query: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Response, PageError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let job_state = parse_state_filter(query.state.as_deref())?;
    let after = parse_cursor(query.after.as_deref())?;
    let now = crate::now_ms();
    let page = state.app.store.list_jobs(&JobQuery { state: job_state, agent: None, after, limit: JOBS_PAGE_MAX })?;
    let scheduler = state.app.scheduler.as_ref();
    let jobs =
        page.jobs.iter().map(|j| JobRow::new(j, now).with_pending_reason(pending_reason(scheduler, j))).collect();
    let filter = job_state.map(|s| format!("state={}&", s.as_str())).unwrap_or_default();
    let page = JobsPage {
        csrf: session.record.csrf_token,
        jobs,
        states: JobState::ALL
            .iter()
            .map(|&s| StateOption { name: s.as_str(), selected: Some(s) == job_state })
            .collect(),
        state: job_state.map(JobState::as_str),
        next_url: page.next.map(|c| format!("/jobs?{filter}after={c}")),
        first_url: after.map(|_| match job_state {
            Some(s) => format!("/jobs?state={}", s.as_str()),
            None => "/jobs".to_owned(),
        }),
    };
    Ok(Page(page).into_response())
}

pub(crate) async fn job_page(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id = parse_id(&id, "job")?;
    let store = state.app.store.as_ref();
    let job = store.get_job(id)?.ok_or_else(|| AppError::NotFound(format!("job {id}")))?;
    let digest = store.get_digest(id)?.map(|d| DigestView::new(&d));
    let scheduler = state.app.scheduler.as_ref();
    let row = JobRow::new(&job, crate::now_ms()).with_pending_reason(pending_reason(scheduler, &job));
    let page =
        JobPage { csrf: session.record.csrf_token, job: row, max_attempts: scheduler.policy().max_attempts, digest };
    Ok(Page(page).into_response())
}

/// The Cancel and Retry buttons' form.
#[derive(Deserialize)]
pub(crate) struct JobActionForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn cancel_job(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<JobActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    session.check_csrf(&form.csrf)?;
    let id = parse_id(&id, "job")?;
    let job = actions::cancel(&state.app, id, DASHBOARD_ACTOR.to_owned()).await?;
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

pub(crate) async fn retry_job(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<JobActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    session.check_csrf(&form.csrf)?;
    let id = parse_id(&id, "job")?;
    let job = actions::retry(&state.app, id, DASHBOARD_ACTOR.to_owned()).await?;
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

fn new_job_page(
    state: &HttpState,
    csrf: String,
    error: Option<String>,
    path: String,
    site: String,
    selected: Option<String>,
    priority: Priority,
) -> Result<NewJobPage, AppError> {
    let agents = state.app.store.list_agents()?;
    let sites: BTreeSet<String> = agents.iter().map(|a| a.site.clone()).collect();
    let agents = agents
        .iter()
        .map(|a| {
            let id = a.id.to_string();
            AgentOption {
                label: format!("{} / {}{}", a.site, a.hostname, if a.connected { "" } else { " (offline)" }),
                selected: selected.as_deref() == Some(id.as_str()),
                id,
            }
        })
        .collect();
    let priorities = [Priority::Low, Priority::Normal, Priority::High]
        .into_iter()
        .map(|p| PriorityOption { name: p.as_str(), selected: p == priority })
        .collect();
    Ok(NewJobPage { csrf, error, path, site, sites: sites.into_iter().collect(), agents, priorities })
}

pub(crate) async fn new_job_form(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let page =
        new_job_page(&state, session.record.csrf_token, None, String::new(), String::new(), None, Priority::default())?;
    Ok(Page(page).into_response())
}

/// The `POST /jobs` form.
#[derive(Deserialize)]
pub(crate) struct NewJobForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    site: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    profile: String,
    #[serde(default)]
    priority: String,
}

pub(crate) async fn submit_job(
    session: Session,
    State(state): State<HttpState>,
    form: Result<Form<NewJobForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    session.check_csrf(&form.csrf)?;
    let csrf = session.record.csrf_token.clone();
    let rerender = |error: String, form: NewJobForm| -> Result<Response, PageError> {
        let agent = (!form.agent.is_empty()).then_some(form.agent);
        let priority = form.priority.trim().parse().unwrap_or_default();
        let page = new_job_page(&state, csrf.clone(), Some(error), form.path, form.site, agent, priority)?;
        Ok((StatusCode::UNPROCESSABLE_ENTITY, Page(page)).into_response())
    };
    let agent = match form.agent.trim() {
        "" => None,
        raw => match uuid::Uuid::parse_str(raw) {
            Ok(id) => Some(id),
            Err(_) => return rerender("agent must be one of the listed agents".into(), form),
        },
    };
    let profile = match form.profile.trim() {
        "" => gaffer_protocol::messages::Profile::Shots,
        raw => match raw.parse() {
            Ok(p) => p,
            Err(msg) => return rerender(msg, form),
        },
    };
    let priority = match form.priority.trim() {
        "" => Priority::default(),
        raw => match raw.parse() {
            Ok(p) => p,
            Err(msg) => return rerender(msg, form),
        },
    };
    let req =
        JobRequest { path: form.path.trim().to_owned(), site: form.site.trim().to_owned(), agent, profile, priority };
    match actions::submit(&state.app, req, DASHBOARD_ACTOR.to_owned()).await? {
        Ok(job) => Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response()),
        Err(e @ (SubmitError::Invalid(_) | SubmitError::UnknownAgent(_))) => rerender(e.to_string(), form),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn login_form(jar: CookieJar) -> Response {
    let csrf = random_token();
    let jar = jar.add(login_csrf_cookie(csrf.clone()));
    (jar, Page(LoginPage { csrf, error: None })).into_response()
}

/// The `POST /login` form.
#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    password: String,
}

fn login_again(jar: CookieJar, status: StatusCode, error: String) -> Response {
    let csrf = random_token();
    let jar = jar.add(login_csrf_cookie(csrf.clone()));
    (status, jar, Page(LoginPage { csrf, error: Some(error) })).into_response()
}

pub(crate) async fn login(
    State(state): State<HttpState>,
    jar: CookieJar,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    let cookie_ok = jar.get(LOGIN_CSRF_COOKIE).is_some_and(|c| tokens_equal(c.value(), &form.csrf));
    if !cookie_ok {
        return Ok(login_again(jar, StatusCode::FORBIDDEN, "The login form expired; please try again.".into()));
    }
    if let Err(wait_secs) = state.logins.check(Instant::now()) {
        tracing::warn!(wait_secs, "dashboard login refused: too many failed attempts");
        return Err(AppError::TooManyAttempts(wait_secs).into());
    }
    let Some(phc) = state.app.store.admin_password_hash()? else {
        return Err(AppError::Internal("no admin password is set; run `gaffer-control init`".into()).into());
    };
    let ok = if form.password.len() > PASSWORD_BYTES_MAX {
        false
    } else {
        let password = form.password;
        tokio::task::spawn_blocking(move || match PasswordHash::new(&phc) {
            Ok(hash) => Ok(Argon2::default().verify_password(password.as_bytes(), &hash).is_ok()),
            Err(e) => Err(AppError::Internal(format!("stored admin password hash is unreadable: {e}"))),
        })
        .await
        .map_err(|e| AppError::Internal(format!("password check task failed: {e}")))??
    };
    if !ok {
        state.logins.failed(Instant::now());
        tracing::warn!("dashboard login failed: wrong password");
        tokio::time::sleep(LoginThrottle::FAILURE_DELAY).await;
        return Ok(login_again(jar, LOGIN_FAILED_STATUS, "Wrong password.".into()));
    }
    state.logins.succeeded();
    let session_value = random_token();
    let now = crate::now_ms();
    state.app.store.insert_session(&SessionRecord {
        id_hash: sha256(session_value.as_bytes()),
        csrf_token: random_token(),
        created_at_ms: now,
        expires_at_ms: now + SESSION_TTL_MS,
    })?;
    tracing::info!("dashboard login succeeded");
    let jar = jar.add(session_cookie(session_value)).add(removal_cookie(LOGIN_CSRF_COOKIE, "/login"));
    Ok((jar, Redirect::to("/")).into_response())
}

/// The `POST /logout` form.
#[derive(Deserialize)]
pub(crate) struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn logout(
    session: Session,
    State(state): State<HttpState>,
    jar: CookieJar,
    form: Result<Form<LogoutForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    session.check_csrf(&form.csrf)?;
    state.app.store.delete_session(&session.record.id_hash)?;
    let jar = jar.add(removal_cookie(SESSION_COOKIE, "/"));
    Ok((jar, Redirect::to("/login")).into_response())
}

pub(crate) async fn not_found() -> PageError {
    PageError(AppError::NotFound("page".into()))
}
