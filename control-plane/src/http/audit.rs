//! The operator audit log on the dashboard: `GET /audit` lists the newest entries (who did what —
//! the offline actions `enroll_offline`, `bundle_import`, `revoke_agent`, and the job actions
//! `job_submit`, `job_cancel`, `job_retry` from the API and the dashboard — when, and with what
//! result), and the fleet page shows the latest few. Entries come from
//! [`crate::store::Store::list_audit`]; every field is escaped by askama like all template output.

use askama::Template;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::auth::Session;
use super::view::{relative, utc};
use super::{HttpState, Page, PageError};
use crate::store::{AuditRecord, Store, StoreError, UnixMs};

/// Entries listed on `/audit`, newest first.
pub(crate) const AUDIT_PAGE_MAX: usize = 200;
/// Entries shown on the fleet page (`/`), newest first.
pub(crate) const FLEET_AUDIT_MAX: usize = 5;

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

/// `GET /audit` — the operator audit log.
#[derive(Template)]
#[template(path = "audit.html")]
pub(crate) struct AuditPage {
    pub csrf: String,
    pub audit: Vec<AuditRow>,
    /// How many entries the page shows at most.
    pub limit: usize,
}

pub(crate) async fn audit_page(session: Session, State(state): State<HttpState>) -> Result<Response, PageError> {
    let audit = AuditRow::latest(state.app.store.as_ref(), AUDIT_PAGE_MAX, crate::now_ms())?;
    Ok(Page(AuditPage { csrf: session.record.csrf_token, audit, limit: AUDIT_PAGE_MAX }).into_response())
}
