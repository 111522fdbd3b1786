//! The dashboard's rollouts page: every rollout kept, newest first, with its targets, the halt
//! reason and the agent that failed; Pause / Resume / Abort buttons for admins.
//!
//! | route                     | who      | what |
//! |---------------------------|----------|------|
//! | `GET /rollouts`           | viewer   | the rollouts ([`crate::rollout::Rollouts::status`], or the store's copy when no rollouts run in this process) |
//! | `POST /rollouts/pause`    | admin    | pause the running rollout; 303 back to `/rollouts` |
//! | `POST /rollouts/resume`   | admin    | resume the paused rollout |
//! | `POST /rollouts/abort`    | admin    | abort the active rollout |
//!
//! The buttons are POST forms with the session's CSRF token, shown only to roles holding
//! [`super::Permission::ManageReleases`]; the actions are audited with the user as the actor.

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::auth::Session;
use super::view::Me;
use super::{blocking, AppError, HttpState, Page, PageError};
use crate::rollout::{RolloutError, RolloutStatus, TargetStatus};
use crate::store::Actor;

/// Rollouts shown on the page (the newest).
pub(crate) const ROLLOUTS_SHOWN_MAX: usize = 10;
/// Targets listed per rollout; the rest are counted.
pub(crate) const TARGETS_SHOWN_MAX: usize = 2000;

/// One rollout, ready to show.
pub(crate) struct RolloutView {
    pub status: RolloutStatus,
    /// The failed agent's host name, when a failure halted it.
    pub failed_host: Option<String>,
    /// `n state` for the states with targets.
    pub counts: String,
    /// The first [`TARGETS_SHOWN_MAX`] targets.
    pub targets: Vec<TargetStatus>,
    /// Targets not listed.
    pub targets_hidden: usize,
    pub running: bool,
    pub paused: bool,
}

impl RolloutView {
    fn of(status: RolloutStatus) -> Self {
        let failed_host = status
            .failed_agent
            .and_then(|a| status.targets.iter().find(|t| t.agent_id == a))
            .map(|t| t.hostname.clone());
        let counts = status
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(state, n)| format!("{n} {state}"))
            .collect::<Vec<_>>()
            .join(", ");
        let targets: Vec<TargetStatus> = status.targets.iter().take(TARGETS_SHOWN_MAX).cloned().collect();
        RolloutView {
            failed_host,
            counts,
            targets_hidden: status.targets.len().saturating_sub(targets.len()),
            targets,
            running: status.state == "running",
            paused: status.state == "paused",
            status,
        }
    }
}

/// `GET /rollouts`.
#[derive(Template)]
#[template(path = "rollouts.html")]
pub(crate) struct RolloutsPage {
    pub me: Me,
    /// May pause, resume and abort (admin).
    pub can_control: bool,
    pub rollouts: Vec<RolloutView>,
}

pub(crate) async fn rollouts_page(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let app = state.app.clone();
    let statuses = blocking(move || -> Result<Vec<RolloutStatus>, AppError> {
        Ok(match &app.rollouts {
            Some(r) => r.status(),
            None => app.store.list_rollouts()?.iter().rev().map(RolloutStatus::of).collect(),
        })
    })
    .await??;
    let page = RolloutsPage {
        me: Me::of(&session),
        can_control: super::Permission::ManageReleases.granted_to(session.role()),
        rollouts: statuses.into_iter().take(ROLLOUTS_SHOWN_MAX).map(RolloutView::of).collect(),
    };
    Ok(Page(page).into_response())
}

/// The buttons' form.
#[derive(Deserialize)]
pub(crate) struct RolloutActionForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Clone, Copy)]
enum Action {
    Pause,
    Resume,
    Abort,
}

async fn act(
    session: Session,
    state: HttpState,
    form: Result<Form<RolloutActionForm>, FormRejection>,
    action: Action,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    session.check_csrf(&form.csrf)?;
    let Some(rollouts) = state.app.rollouts.clone() else {
        return Err(AppError::Conflict("rollouts are not available in this control plane".into()).into());
    };
    let actor = Actor::User(session.user.name.clone());
    blocking(move || {
        let now = crate::now_ms();
        match action {
            Action::Pause => rollouts.pause(&actor, now),
            Action::Resume => rollouts.resume(&actor, now),
            Action::Abort => rollouts.abort(&actor, now),
        }
    })
    .await?
    .map_err(|e| match e {
        RolloutError::Store(e) => AppError::Store(e),
        other => AppError::Conflict(other.to_string()),
    })?;
    Ok(Redirect::to("/rollouts").into_response())
}

pub(crate) async fn pause(
    session: Session,
    State(state): State<HttpState>,
    form: Result<Form<RolloutActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    act(session, state, form, Action::Pause).await
}

pub(crate) async fn resume(
    session: Session,
    State(state): State<HttpState>,
    form: Result<Form<RolloutActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    act(session, state, form, Action::Resume).await
}

pub(crate) async fn abort(
    session: Session,
    State(state): State<HttpState>,
    form: Result<Form<RolloutActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    act(session, state, form, Action::Abort).await
}
