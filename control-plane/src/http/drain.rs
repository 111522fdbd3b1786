//! Cordon, drain and uncordon an agent from the API and the dashboard (operator role,
//! [`super::Permission::DrainAgents`]); the CLI does the same through the admin socket. All three
//! end in [`crate::admin::set_agent_scheduling`]: the agent record's
//! [`crate::store::Scheduling`] is written, the live link sees it at once, and the action is
//! audited (`agent_cordon`, `agent_drain`, `agent_uncordon`).

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::Deserialize;
use utoipa::IntoParams;

use super::api::{parse_id, AgentIdParam};
use super::auth::{ApiCaller, Session};
use super::openapi::ErrorBody;
use super::{blocking, AppError, HttpState, PageError};
use crate::admin::{set_agent_scheduling, AdminError, SchedulingChange, SchedulingReport, DRAIN_DEADLINE_SECS_MAX};
use crate::store::Actor;
use crate::AppState;

/// Applies `change` to agent `id` for `actor` on the blocking pool.
///
/// # Errors
/// 404 for an agent that is not enrolled, 409 for a revoked one, 422 for a deadline over
/// [`DRAIN_DEADLINE_SECS_MAX`], store errors.
async fn apply(
    app: &AppState,
    id: gaffer_protocol::messages::AgentId,
    actor: Actor,
    change: SchedulingChange,
) -> Result<SchedulingReport, AppError> {
    if let SchedulingChange::Drain { deadline_secs: Some(d) } = change {
        if d > DRAIN_DEADLINE_SECS_MAX {
            return Err(AppError::Unprocessable(format!(
                "deadline_secs is at most {DRAIN_DEADLINE_SECS_MAX} (30 days)"
            )));
        }
    }
    let app = app.clone();
    blocking(move || {
        let Some(agent) = app.store.get_agent(id)? else {
            return Err(AppError::NotFound(format!("agent {id}")));
        };
        if agent.revoked_at_ms.is_some() {
            return Err(AppError::Conflict(format!("agent {id} is revoked; it takes no jobs already")));
        }
        set_agent_scheduling(app.store.as_ref(), Some(&app.scheduler), &actor, id, change).map_err(|e| match e {
            AdminError::Store(e) => AppError::Store(e),
            other => AppError::Conflict(other.to_string()),
        })
    })
    .await?
}

/// Query of `POST /api/v1/agents/{id}/drain`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DrainQuery {
    /// Seconds from now after which the jobs it still holds are requeued for other agents (the
    /// attempt given back); absent: wait for them. At most 2,592,000 (30 days).
    #[param(maximum = 2_592_000, minimum = 0)]
    deadline_secs: Option<u64>,
}

/// `POST /api/v1/agents/{id}/drain` (operator): no new jobs for the agent; what it runs finishes,
/// or is requeued at the deadline. It stays out of rotation until uncordoned.
#[utoipa::path(post, path = "/api/v1/agents/{id}/drain", tag = "agents", params(AgentIdParam, DrainQuery),
    responses(
        (status = 200, description = "Draining", body = SchedulingReport),
        (status = 400, description = "The id is not a UUID or the query is malformed", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        (status = 409, description = "The agent is revoked", body = ErrorBody),
        (status = 422, description = "The deadline is over 30 days", body = ErrorBody),
    ))]
pub(crate) async fn api_drain(
    caller: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    query: Result<Query<DrainQuery>, QueryRejection>,
) -> Result<impl IntoResponse, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let id = parse_id(&id, "agent")?;
    let change = SchedulingChange::Drain { deadline_secs: query.deadline_secs };
    Ok(Json(apply(&state.app, id, caller.audit_actor(), change).await?))
}

/// `POST /api/v1/agents/{id}/cordon` (operator): no new jobs for the agent; what it runs finishes.
#[utoipa::path(post, path = "/api/v1/agents/{id}/cordon", tag = "agents", params(AgentIdParam),
    responses(
        (status = 200, description = "Cordoned", body = SchedulingReport),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        (status = 409, description = "The agent is revoked", body = ErrorBody),
    ))]
pub(crate) async fn api_cordon(
    caller: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "agent")?;
    Ok(Json(apply(&state.app, id, caller.audit_actor(), SchedulingChange::Cordon).await?))
}

/// `POST /api/v1/agents/{id}/uncordon` (operator): the agent takes new jobs again.
#[utoipa::path(post, path = "/api/v1/agents/{id}/uncordon", tag = "agents", params(AgentIdParam),
    responses(
        (status = 200, description = "Back in rotation", body = SchedulingReport),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such agent", body = ErrorBody),
        (status = 409, description = "The agent is revoked", body = ErrorBody),
    ))]
pub(crate) async fn api_uncordon(
    caller: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let id = parse_id(&id, "agent")?;
    Ok(Json(apply(&state.app, id, caller.audit_actor(), SchedulingChange::Uncordon).await?))
}

/// The agent page's Drain form: the CSRF token and an optional deadline in minutes.
#[derive(Deserialize)]
pub(crate) struct DrainForm {
    #[serde(default)]
    csrf: String,
    /// Minutes; empty: no deadline.
    #[serde(default)]
    deadline_mins: String,
}

/// `POST /agents/{id}/drain` (operator): drains the agent, then shows its page.
pub(crate) async fn drain_agent(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<DrainForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    // A forged form is refused before its deadline is read (page_apply checks again, cheaply).
    session.check_csrf(&form.csrf)?;
    let text = form.deadline_mins.trim();
    let deadline_secs = if text.is_empty() {
        None
    } else {
        let mins: u64 = text
            .parse()
            .map_err(|_| AppError::Unprocessable(format!("the deadline is a whole number of minutes, not {text:?}")))?;
        Some(mins.saturating_mul(60))
    };
    page_apply(&session, &state, &id, &form.csrf, SchedulingChange::Drain { deadline_secs }).await
}

/// The Cordon and Uncordon buttons' form.
#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /agents/{id}/cordon` (operator): cordons the agent, then shows its page.
pub(crate) async fn cordon_agent(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    page_apply(&session, &state, &id, &form.csrf, SchedulingChange::Cordon).await
}

/// `POST /agents/{id}/uncordon` (operator): puts the agent back in rotation, then shows its page.
pub(crate) async fn uncordon_agent(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    page_apply(&session, &state, &id, &form.csrf, SchedulingChange::Uncordon).await
}

/// A dashboard form's change: CSRF checked, applied, then the agent's page.
async fn page_apply(
    session: &Session,
    state: &HttpState,
    id: &str,
    csrf: &str,
    change: SchedulingChange,
) -> Result<Response, PageError> {
    session.check_csrf(csrf)?;
    let id = parse_id(id, "agent")?;
    apply(&state.app, id, session.audit_actor(), change).await?;
    Ok(Redirect::to(&format!("/agents/{id}")).into_response())
}
