//! The server-rendered dashboard: fleet overview, agent and job pages, the job form, job cancel and
//! retry, login and logout. Usable without JavaScript. Every page needs a session ([`Session`]);
//! every form that changes something is a POST carrying the session's CSRF token (login: the
//! double-submit cookie); the jobs page's state filter is a plain GET form.
//!
//! | route                     | what |
//! |---------------------------|------|
//! | `GET /?site=S&state=T&cursor=C` | fleet: job counts per state ([`crate::store::Store::job_counts`]), agent counts by state and site with filter links, one page of agents (100, `limit` up to 1000; [`crate::store::Store::list_agents_page`]) with a next-page link, latest audit entries |
//! | `GET /jobs?state=S&after=C` | one page of jobs, newest first, with a state filter and a next-page link |
//! | `GET /jobs/new`, `POST /jobs` | the job form (with priority) and its submission |
//! | `GET /jobs/{id}`          | job: state, priority, attempts, lease, why it waits, last error, digest; Cancel / Retry buttons |
//! | `POST /jobs/{id}/cancel`, `POST /jobs/{id}/retry` | the buttons; 303 back to the job page |
//!
//! Who may open each page or send each form is in [`super::ROUTES`] (viewers read, operators also
//! submit, cancel and retry, admins also read the audit log); buttons the user's role may not use
//! are not shown. Logins (by user name and password, throttled per address and per user name),
//! submit, cancel and retry are recorded in the audit log with the user as the actor.

use std::collections::BTreeSet;
use std::time::Instant;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use axum_extra::extract::cookie::CookieJar;
use serde::Deserialize;

use super::actions;
use super::api::{
    agent_query, jobs_running_of, parse_cursor, parse_id, parse_state_filter, pending_reason, HEALTH_HISTORY_MAX,
};
use super::auth::{
    login_csrf_cookie, random_token, removal_cookie, session_cookie, sha256, tokens_equal, ClientAddr, LoginThrottle,
    Session, ThrottledBy, SESSION_TTL_MS,
};
use super::view::{
    mean_gpu_util, sparkline, utc, AgentOption, AgentPage, AgentRow, CaView, Count, DigestView, FilterLink, FleetPage,
    GpuInfoRow, HistoryRow, JobPage, JobRow, JobsPage, LoginPage, Me, NewJobPage, PriorityOption, SiteOption,
    StateOption, SPARK_H, SPARK_W,
};
use super::{AppError, HttpState, Page, PageError};
use crate::scheduler::{JobRequest, SubmitError};
use crate::store::{
    audit_action, Actor, AgentCursor, AgentQuery, AgentState, AuditRecord, JobQuery, JobState, Priority, SessionRecord,
    Store, UnixMs,
};

/// Jobs shown per page of `/jobs`.
const JOBS_PAGE_MAX: usize = 200;
/// Recent jobs listed on an agent page.
const AGENT_JOBS_MAX: usize = 20;
/// Longest accepted password, bytes (argon2 work is bounded by this).
const PASSWORD_BYTES_MAX: usize = crate::admin::PASSWORD_BYTES_MAX;
/// Status of a failed login (the form is shown again).
const LOGIN_FAILED_STATUS: StatusCode = StatusCode::UNAUTHORIZED;

fn form_rejection(e: FormRejection) -> AppError {
    AppError::BadRequest(e.body_text())
}

/// `GET /` query: the agent table's filters and page (see [`super::api::agent_query`]).
#[derive(Deserialize)]
pub(crate) struct FleetQuery {
    #[serde(default)]
    site: Option<String>,
    #[serde(default)]
    state: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// Agents on the other CA named on the fleet page during a rotation (the rest are counted).
const FLEET_OTHER_CA_SHOWN_MAX: usize = 50;

pub(crate) async fn fleet(
    session: Session,
    State(state): State<HttpState>,
    query: Result<Query<FleetQuery>, QueryRejection>,
) -> Result<Response, PageError> {
    let Query(raw) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let query =
        agent_query(raw.site.as_deref(), raw.state.as_deref(), raw.limit, raw.cursor.as_deref(), FLEET_AGENTS_PAGE)?;
    let me = Me::of(&session);
    let can_audit = me.can_audit;
    let app = state.app.clone();
    let page = tokio::task::spawn_blocking(move || fleet_page(&app, me, query, can_audit))
        .await
        .map_err(|e| AppError::Internal(format!("fleet page task: {e}")))??;
    Ok(Page(page).into_response())
}

/// Agents per page of the fleet table unless `limit` says otherwise.
const FLEET_AGENTS_PAGE: usize = 100;

fn fleet_page(app: &crate::AppState, me: Me, query: AgentQuery, can_audit: bool) -> Result<FleetPage, AppError> {
    let store = app.store.as_ref();
    let now = crate::now_ms();
    let page = store.list_agents_page(&query)?;
    let ids: Vec<gaffer_protocol::messages::AgentId> = page.agents.iter().map(|a| a.id).collect();
    let running = jobs_running_of(store, &ids)?;
    let agents: Vec<AgentRow> =
        page.agents.iter().map(|a| AgentRow::new(a, running.get(&a.id).copied().unwrap_or(0), now)).collect();
    let counts = store.job_counts()?;
    let job_counts = JobState::ALL.iter().map(|&s| Count { label: s.as_str(), count: counts.get(s) }).collect();
    let audit =
        if can_audit { super::audit::AuditRow::latest(store, super::audit::FLEET_AUDIT_MAX, now)? } else { Vec::new() };
    let ca = match &app.pki {
        Some(pki) => Some(fleet_ca_view(pki, store, now)?),
        None => None,
    };
    // Filter links keep the other filter and the page size, and start from the first page.
    let site_counts = match &query.site {
        Some(site) => page.counts.by_site.get(site).copied().unwrap_or_default(),
        None => page.counts.all,
    };
    let url = |site: Option<&str>, state: Option<AgentState>, cursor: Option<&AgentCursor>| {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(site) = site {
            pairs.push(("site", site.to_owned()));
        }
        if let Some(state) = state {
            pairs.push(("state", state.as_str().to_owned()));
        }
        if query.limit != FLEET_AGENTS_PAGE {
            pairs.push(("limit", query.limit.to_string()));
        }
        if let Some(c) = cursor {
            pairs.push(("cursor", c.to_string()));
        }
        let qs = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        if qs.is_empty() {
            "/".to_owned()
        } else {
            format!("/?{qs}")
        }
    };
    let site = query.site.as_deref();
    let mut state_filters = vec![FilterLink {
        label: "all",
        count: site_counts.total(),
        url: url(site, None, None),
        selected: query.state.is_none(),
    }];
    state_filters.extend(AgentState::ALL.iter().map(|&st| FilterLink {
        label: st.as_str(),
        count: site_counts.get(st),
        url: url(site, Some(st), None),
        selected: query.state == Some(st),
    }));
    let sites = page
        .counts
        .by_site
        .iter()
        .map(|(name, c)| SiteOption {
            name: name.clone(),
            online: c.get(AgentState::Online),
            total: c.total(),
            selected: site == Some(name.as_str()),
        })
        .collect();
    Ok(FleetPage {
        me,
        agents,
        job_counts,
        online_count: page.counts.all.get(AgentState::Online),
        agent_total: page.counts.all.total(),
        matching: page.counts.matching(&query),
        state_filters,
        sites,
        site: query.site.clone(),
        state: query.state.map(AgentState::as_str),
        next_url: page.next.as_ref().map(|c| url(site, query.state, Some(c))),
        first_url: query.after.as_ref().map(|_| url(site, query.state, None)),
        audit,
        ca,
    })
}

/// The fleet CA box. Only during a rotation are the agents still on another CA looked up (that
/// reads every agent record); in standby the box shows the fingerprints alone.
fn fleet_ca_view(pki: &crate::identity::Pki, store: &dyn Store, now: UnixMs) -> Result<CaView, AppError> {
    let issuing = pki.issuing_ca().fingerprint().to_string();
    if pki.phase() == crate::identity::RotationPhase::Standby {
        return Ok(CaView {
            phase: crate::identity::RotationPhase::Standby.as_str(),
            rotating: false,
            since: "–".into(),
            current: issuing.clone(),
            next: None,
            issuing,
            on_other_ca: Vec::new(),
            on_other_ca_total: 0,
        });
    }
    let st = pki.rotation_status(store).map_err(|e| AppError::Internal(e.to_string()))?;
    let mut on_other_ca = Vec::new();
    for id in st.agents_on_other_ca.iter().take(FLEET_OTHER_CA_SHOWN_MAX) {
        let host = store.get_agent(*id)?.map(|a| a.hostname).unwrap_or_default();
        on_other_ca.push((id.to_string(), host));
    }
    Ok(CaView {
        phase: st.phase.as_str(),
        rotating: true,
        since: st.since_ms.map(|ms| super::view::relative(Some(ms), now)).unwrap_or_else(|| "–".into()),
        current: st.current_ca_fingerprint,
        next: st.next_ca_fingerprint,
        issuing: st.issuing_ca_fingerprint,
        on_other_ca,
        on_other_ca_total: st.agents_on_other_ca.len(),
    })
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
    let running = jobs_running_of(store, &[id])?.get(&id).copied().unwrap_or(0);
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
        me: Me::of(&session),
        agent: AgentRow::new(&agent, running, now),
        enrolled: utc(agent.enrolled_at_ms),
        cert_expires: u64::try_from(agent.cert_not_after_unix)
            .map(|s| utc(s.saturating_mul(1000)))
            .unwrap_or_else(|_| agent.cert_not_after_unix.to_string()),
        cert_serial: agent.cert_serial_hex.clone().unwrap_or_else(|| "–".into()),
        cert_issuer: agent
            .cert_issuer_fingerprint
            .as_deref()
            .map(|f| f.get(..16).unwrap_or(f).to_owned())
            .unwrap_or_else(|| "–".into()),
        revoked: agent.revoked_at_ms.map(utc),
        cert_history: agent.cert_history.iter().rev().map(super::view::CertRow::new).collect(),
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
        me: Me::of(&session),
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
    let custody = super::custody::CustodyView::new(&super::custody::custody_of(store, &job)?);
    let row = JobRow::new(&job, crate::now_ms()).with_pending_reason(pending_reason(scheduler, &job));
    let page =
        JobPage { me: Me::of(&session), job: row, max_attempts: scheduler.policy().max_attempts, digest, custody };
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
    let job = actions::cancel(&state.app, id, session.actor()).await?;
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

/// `POST /agents/{id}/revoke` (admin): revokes the agent, then shows its page.
pub(crate) async fn revoke_agent(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<JobActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    session.check_csrf(&form.csrf)?;
    let id = parse_id(&id, "agent")?;
    actions::revoke(&state.app, id, session.actor()).await?;
    Ok(Redirect::to(&format!("/agents/{id}")).into_response())
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
    let job = actions::retry(&state.app, id, session.actor()).await?;
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

fn new_job_page(
    state: &HttpState,
    me: Me,
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
    Ok(NewJobPage { me, error, path, site, sites: sites.into_iter().collect(), agents, priorities })
}

pub(crate) async fn new_job_form(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let page = new_job_page(&state, Me::of(&session), None, String::new(), String::new(), None, Priority::default())?;
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
    let me = Me::of(&session);
    let rerender = |error: String, form: NewJobForm| -> Result<Response, PageError> {
        let agent = (!form.agent.is_empty()).then_some(form.agent);
        let priority = form.priority.trim().parse().unwrap_or_default();
        let page = new_job_page(&state, me.clone(), Some(error), form.path, form.site, agent, priority)?;
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
    match actions::submit(&state.app, req, session.actor()).await? {
        Ok(job) => Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response()),
        Err(e @ (SubmitError::Invalid(_) | SubmitError::UnknownAgent(_))) => rerender(e.to_string(), form),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn login_form(State(state): State<HttpState>, jar: CookieJar) -> Response {
    let csrf = random_token();
    let jar = jar.add(login_csrf_cookie(&state.security, csrf.clone()));
    (jar, Page(LoginPage { csrf, user: String::new(), error: None })).into_response()
}

/// The `POST /login` form.
#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

fn login_again(state: &HttpState, jar: CookieJar, status: StatusCode, user: String, error: String) -> Response {
    let csrf = random_token();
    let jar = jar.add(login_csrf_cookie(&state.security, csrf.clone()));
    (status, jar, Page(LoginPage { csrf, user, error: Some(error) })).into_response()
}

/// Writes a login's audit entry and flushes it (the session too); a failure is logged only.
fn audit_login(state: &HttpState, rec: AuditRecord) {
    let store = state.app.store.as_ref();
    if let Err(e) = store.append_audit(&rec).and_then(|()| store.flush()) {
        tracing::error!(error = %e, action = %rec.action, "login audit entry was not written");
    }
}

/// `POST /login`: user name and password. Order of checks: the login CSRF cookie; the throttle
/// (per client address and per user name, [`LoginThrottle`]); the password, verified with argon2
/// under [`super::auth::PasswordChecks`] (an unknown name against a dummy hash: the same cost and
/// the same answer as a wrong password). Success and failure are audited with the client address.
pub(crate) async fn login(
    State(state): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    jar: CookieJar,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(form_rejection)?;
    let name = form.user.trim().to_owned();
    let cookie_ok =
        jar.get(state.security.login_csrf_cookie_name()).is_some_and(|c| tokens_equal(c.value(), &form.csrf));
    if !cookie_ok {
        return Ok(login_again(
            &state,
            jar,
            StatusCode::FORBIDDEN,
            name,
            "The login form expired; please try again.".into(),
        ));
    }
    if let Err(throttled) = state.logins.begin(addr, &name, Instant::now()) {
        let by = match throttled.by {
            ThrottledBy::Address => "address",
            ThrottledBy::User => "user name",
        };
        tracing::warn!(%addr, by, wait_secs = throttled.wait_secs, "dashboard login refused: too many failed attempts");
        let mut response = login_again(
            &state,
            jar,
            StatusCode::TOO_MANY_REQUESTS,
            name,
            format!("Too many failed logins; try again in {} s.", throttled.wait_secs),
        );
        if let Ok(v) = axum::http::HeaderValue::from_str(&throttled.wait_secs.to_string()) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        return Ok(response);
    }
    let user =
        if crate::admin::validate_name(&name, "user name").is_ok() { state.app.store.get_user(&name)? } else { None };
    let ok = if form.password.len() > PASSWORD_BYTES_MAX {
        false
    } else {
        state.passwords.verify(user.as_ref().map(|u| u.password_phc.clone()), form.password).await?
    };
    let now = crate::now_ms();
    let Some(user) = user.filter(|_| ok) else {
        // Only a known name is shown: an unknown one may be a password typed into the wrong field.
        let known = state.app.store.get_user(&name)?.is_some();
        let who = if known { Actor::User(name.clone()) } else { Actor::User("(unknown user)".into()) };
        let detail = if known { format!("wrong password, from {addr}") } else { format!("no such user, from {addr}") };
        audit_login(&state, AuditRecord::new(&who, audit_action::LOGIN_FAILED, now).detail(detail));
        if known {
            tracing::warn!(user = %name, %addr, "dashboard login failed: wrong password");
        } else {
            tracing::warn!(%addr, "dashboard login failed: unknown user name");
        }
        tokio::time::sleep(LoginThrottle::FAILURE_DELAY).await;
        return Ok(login_again(&state, jar, LOGIN_FAILED_STATUS, name, "Wrong user name or password.".into()));
    };
    state.logins.succeeded(addr, &name, Instant::now());
    if let Err(e) = state.app.store.delete_expired_sessions(now) {
        tracing::warn!(error = %e, "could not delete expired sessions");
    }
    let session_value = random_token();
    state.app.store.insert_session(&SessionRecord {
        id_hash: sha256(session_value.as_bytes()),
        csrf_token: random_token(),
        created_at_ms: now,
        expires_at_ms: now + SESSION_TTL_MS,
        user: user.name.clone(),
        role: user.role,
        password_changed_at_ms: user.password_changed_at_ms,
    })?;
    audit_login(
        &state,
        AuditRecord::new(&Actor::User(user.name.clone()), audit_action::LOGIN, now)
            .detail(format!("role {}, from {addr}", user.role)),
    );
    tracing::info!(user = %user.name, role = %user.role, %addr, "dashboard login succeeded");
    let security = &state.security;
    let jar = jar.add(session_cookie(security, session_value)).add(removal_cookie(
        security,
        security.login_csrf_cookie_name(),
        "/login",
    ));
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
    let jar = jar.add(removal_cookie(&state.security, state.security.session_cookie_name(), "/"));
    Ok((jar, Redirect::to("/login")).into_response())
}

pub(crate) async fn not_found() -> PageError {
    PageError(AppError::NotFound("page".into()))
}
