//! The dashboard's Webhooks page (admin): the targets (never their secrets), the newest
//! deliveries with every attempt, and forms to add, remove and test targets.
//!
//! | route                          | who   | what |
//! |--------------------------------|-------|------|
//! | `GET /webhooks`                | admin | targets and the newest [`DELIVERIES_SHOWN_MAX`] deliveries with their attempts |
//! | `POST /webhooks`               | admin | add an HTTP target (name, URL, format, events, secret); 303 back |
//! | `POST /webhooks/{id}/remove`   | admin | remove the target (its pending deliveries are dropped) |
//! | `POST /webhooks/{id}/test`     | admin | queue a `webhook.test` delivery to it |
//!
//! Every form carries the session's CSRF token; the actions go through the same functions as
//! `gaffer-control webhook …` ([`crate::webhook`]) and are audited with the user as the actor.
//! Email targets are added with the CLI (`webhook add --smtp-url`); they are listed and can be
//! removed and tested here.

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::auth::Session;
use super::view::Me;
use super::{blocking, AppError, HttpState, Page, PageError};
use crate::store::Actor;
use crate::webhook::{self, BodyFormat, Destination, EventKind, TargetSpec, WebhookError, WebhookInfo};

/// Deliveries shown on the page (the newest).
pub(crate) const DELIVERIES_SHOWN_MAX: usize = 100;

/// One attempt, ready to show.
pub(crate) struct AttemptRow {
    pub at: String,
    pub duration_ms: u64,
    /// `200`, `500`, or `–` without an answer.
    pub status: String,
    pub error: String,
    pub ok: bool,
}

/// One delivery, ready to show.
pub(crate) struct DeliveryRow {
    pub id: String,
    pub created: String,
    pub event: &'static str,
    pub target: String,
    pub state: &'static str,
    pub summary: String,
    pub attempts_total: u32,
    /// When the next attempt is due (pending ones).
    pub next: String,
    pub attempts: Vec<AttemptRow>,
}

/// One target, ready to show.
pub(crate) struct TargetRow {
    pub t: WebhookInfo,
    /// `https://… (slack)` or `email to a, b via smtp://…`.
    pub destination: String,
    /// `job.failed, agent.offline`.
    pub events: String,
}

impl TargetRow {
    fn of(t: WebhookInfo) -> Self {
        let destination = match (t.kind.as_str(), t.format) {
            ("email", _) => format!("email to {} via {}", t.to.join(", "), t.url),
            (_, Some(BodyFormat::Slack)) => format!("{} (slack)", t.url),
            _ => t.url.clone(),
        };
        let events = t.events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(", ");
        TargetRow { t, destination, events }
    }
}

/// An event checkbox of the add form.
pub(crate) struct EventOption {
    pub name: &'static str,
    pub field: String,
}

/// `GET /webhooks`.
#[derive(Template)]
#[template(path = "webhooks.html")]
pub(crate) struct WebhooksPage {
    pub me: Me,
    pub targets: Vec<TargetRow>,
    pub deliveries: Vec<DeliveryRow>,
    pub events: Vec<EventOption>,
    pub pending: u64,
}

fn field_of(e: EventKind) -> String {
    format!("ev_{}", e.as_str().replace('.', "_"))
}

pub(crate) async fn webhooks_page(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let store = state.app.store.clone();
    let (targets, deliveries, pending) = blocking(move || -> Result<_, AppError> {
        let mut targets: Vec<WebhookInfo> = store.list_webhook_targets()?.iter().map(WebhookInfo::of).collect();
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((targets, store.list_webhook_deliveries(DELIVERIES_SHOWN_MAX)?, store.webhook_pending_count()?))
    })
    .await??;
    let now = crate::now_ms();
    let deliveries = deliveries
        .into_iter()
        .map(|d| DeliveryRow {
            id: d.id.to_string(),
            created: super::view::utc(d.created_at_ms),
            event: d.event.as_str(),
            target: d.target_name,
            state: d.state.as_str(),
            summary: d.summary,
            attempts_total: d.attempts_total,
            next: if d.state == webhook::DeliveryState::Pending {
                super::view::countdown(d.next_attempt_at_ms, now)
            } else {
                String::new()
            },
            attempts: d
                .attempts
                .iter()
                .rev()
                .map(|a| AttemptRow {
                    at: super::view::utc(a.at_ms),
                    duration_ms: a.duration_ms,
                    status: a.status.map_or("–".into(), |s| s.to_string()),
                    error: a.error.clone().unwrap_or_default(),
                    ok: a.error.is_none(),
                })
                .collect(),
        })
        .collect();
    let events =
        EventKind::SUBSCRIBABLE.iter().map(|e| EventOption { name: e.as_str(), field: field_of(*e) }).collect();
    let targets = targets.into_iter().map(TargetRow::of).collect();
    Ok(Page(WebhooksPage { me: Me::of(&session), targets, deliveries, events, pending }).into_response())
}

/// The add form.
#[derive(Deserialize)]
pub(crate) struct AddForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    format: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    ev_job_succeeded: Option<String>,
    #[serde(default)]
    ev_job_failed: Option<String>,
    #[serde(default)]
    ev_agent_offline: Option<String>,
    #[serde(default)]
    ev_agent_online: Option<String>,
    #[serde(default)]
    ev_agent_health: Option<String>,
    #[serde(default)]
    ev_outbox_full: Option<String>,
    #[serde(default)]
    ev_rollout_halted: Option<String>,
}

/// The remove and test buttons' form.
#[derive(Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

fn page_error(e: WebhookError) -> PageError {
    match e {
        WebhookError::Store(e) => AppError::Store(e),
        WebhookError::NotFound(what) => AppError::NotFound(format!("webhook {what}")),
        other => AppError::Unprocessable(other.to_string()),
    }
    .into()
}

pub(crate) async fn add(
    session: Session,
    State(state): State<HttpState>,
    form: Result<Form<AddForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(f) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    session.check_csrf(&f.csrf)?;
    let format = match f.format.as_str() {
        "" | "json" => BodyFormat::Json,
        "slack" => BodyFormat::Slack,
        other => return Err(AppError::Unprocessable(format!("format {other:?} is not json or slack")).into()),
    };
    let checked = [
        (EventKind::JobSucceeded, &f.ev_job_succeeded),
        (EventKind::JobFailed, &f.ev_job_failed),
        (EventKind::AgentOffline, &f.ev_agent_offline),
        (EventKind::AgentOnline, &f.ev_agent_online),
        (EventKind::AgentHealth, &f.ev_agent_health),
        (EventKind::OutboxFull, &f.ev_outbox_full),
        (EventKind::RolloutHalted, &f.ev_rollout_halted),
    ];
    let events = checked.iter().filter(|(_, v)| v.is_some()).map(|(e, _)| *e).collect();
    let spec = TargetSpec {
        name: (!f.name.trim().is_empty()).then(|| f.name.trim().to_owned()),
        destination: Destination::Http { url: f.url.trim().to_owned(), format },
        events,
        secret: (!f.secret.is_empty()).then_some(f.secret),
    };
    let store = state.app.store.clone();
    let actor = Actor::User(session.user.name.clone());
    blocking(move || webhook::add_target(store.as_ref(), &actor, spec, crate::now_ms())).await?.map_err(page_error)?;
    Ok(Redirect::to("/webhooks").into_response())
}

pub(crate) async fn remove(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(f) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    session.check_csrf(&f.csrf)?;
    let id = super::api::parse_id(&id, "webhook")?.to_string();
    let store = state.app.store.clone();
    let actor = Actor::User(session.user.name.clone());
    blocking(move || webhook::remove_target(store.as_ref(), &actor, &id, crate::now_ms()))
        .await?
        .map_err(page_error)?;
    Ok(Redirect::to("/webhooks").into_response())
}

pub(crate) async fn test(
    session: Session,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(f) = form.map_err(|e| AppError::BadRequest(e.body_text()))?;
    session.check_csrf(&f.csrf)?;
    let id = super::api::parse_id(&id, "webhook")?.to_string();
    let store = state.app.store.clone();
    let actor = Actor::User(session.user.name.clone());
    blocking(move || webhook::test_target(store.as_ref(), &actor, &id, crate::now_ms())).await?.map_err(page_error)?;
    Ok(Redirect::to("/webhooks").into_response())
}
