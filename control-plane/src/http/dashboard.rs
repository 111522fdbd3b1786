//! The server-rendered dashboard: fleet overview, agent and job pages, the job form, login and
//! logout. Usable without JavaScript. Every page needs a session ([`Session`]); every form is a
//! POST carrying the session's CSRF token (login: the double-submit cookie).

use std::collections::BTreeSet;
use std::time::Instant;

use argon2::password_hash::PasswordHash;
use argon2::{Argon2, PasswordVerifier};
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use axum_extra::extract::cookie::CookieJar;
use serde::Deserialize;

use super::api::{jobs_running_by_agent, parse_id, HEALTH_HISTORY_MAX};
use super::auth::{
    login_csrf_cookie, random_token, removal_cookie, session_cookie, sha256, tokens_equal, LoginThrottle, Session,
    LOGIN_CSRF_COOKIE, LOGIN_FAILED_STATUS, SESSION_COOKIE, SESSION_TTL_MS,
};
use super::view::{
    mean_gpu_util, sparkline, utc, AgentOption, AgentPage, AgentRow, Count, DigestView, FleetPage, GpuInfoRow,
    HistoryRow, JobPage, JobRow, JobsPage, LoginPage, NewJobPage, SPARK_H, SPARK_W,
};
use super::{AppError, HttpState, Page, PageError};
use crate::scheduler::{JobRequest, SubmitError};
use crate::store::{JobOrigin, JobState, SessionRecord};

/// Jobs shown on `/jobs`.
const JOBS_PAGE_MAX: usize = 200;
/// Jobs scanned for an agent page's "recent jobs".
const AGENT_JOBS_SCAN_MAX: usize = 500;
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
    let mut job_counts = Vec::new();
    for s in [JobState::Queued, JobState::Assigned, JobState::Running, JobState::Succeeded, JobState::Failed] {
        job_counts.push(Count { label: s.as_str(), count: store.jobs_in_state(s)?.len() });
    }
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
        .list_jobs(AGENT_JOBS_SCAN_MAX)?
        .iter()
        .filter(|j| j.agent == Some(id) || j.pinned_agent == Some(id))
        .take(AGENT_JOBS_MAX)
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

pub(crate) async fn jobs_page(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let now = crate::now_ms();
    let jobs = state.app.store.list_jobs(JOBS_PAGE_MAX)?.iter().map(|j| JobRow::new(j, now)).collect();
    Ok(Page(JobsPage { csrf: session.record.csrf_token, jobs }).into_response())
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
    let page = JobPage { csrf: session.record.csrf_token, job: JobRow::new(&job, crate::now_ms()), digest };
    Ok(Page(page).into_response())
}

fn new_job_page(
    state: &HttpState,
    csrf: String,
    error: Option<String>,
    path: String,
    site: String,
    selected: Option<String>,
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
    Ok(NewJobPage { csrf, error, path, site, sites: sites.into_iter().collect(), agents })
}

pub(crate) async fn new_job_form(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let page = new_job_page(&state, session.record.csrf_token, None, String::new(), String::new(), None)?;
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
        let page = new_job_page(&state, csrf.clone(), Some(error), form.path, form.site, agent)?;
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
    let req = JobRequest { path: form.path.trim().to_owned(), site: form.site.trim().to_owned(), agent, profile };
    match state.app.scheduler.submit(req, JobOrigin::Api, None) {
        Ok(job) => {
            tracing::info!(job = %job.id, site = %job.site, "job submitted from the dashboard");
            Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
        }
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
