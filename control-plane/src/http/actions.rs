//! Operator job actions shared by the API and the dashboard: submit, cancel, retry.
//!
//! Each runs the scheduler call on the blocking pool ([`super::blocking`]: it writes the store and
//! fsyncs), then records the action in the audit log with its actor (`job_submit`, `job_cancel`,
//! `job_retry`; the job's site and id, and the path or the reason as detail) and flushes that too.
//! The actor is a parameter: the API token (`token:NAME`) or the dashboard user (`alice`).

use gaffer_protocol::messages::JobId;

use super::{blocking, AppError};
use crate::scheduler::{JobRequest, SubmitError};
use crate::store::{AuditRecord, JobOrigin, JobRecord, Store};
use crate::AppState;

/// Writes the audit entry of a job action that succeeded, and flushes it. A failure is logged,
/// not returned: the action itself is committed, and the caller must say so.
fn audit(store: &dyn Store, who: &str, action: &str, job: &JobRecord, detail: String, now_ms: u64) {
    let rec = AuditRecord {
        at_ms: now_ms,
        who: who.to_owned(),
        action: action.to_owned(),
        agent: None,
        site: Some(job.site.clone()),
        detail,
        job: Some(job.id),
    };
    if let Err(e) = store.append_audit(&rec).and_then(|()| store.flush()) {
        tracing::error!(error = %e, job_id = %job.id, action, "job action done but its audit entry was not written");
    }
}

/// Queues a job submitted by `who`. The inner error is the scheduler's (the dashboard re-renders
/// its form for [`SubmitError::Invalid`] and [`SubmitError::UnknownAgent`]).
///
/// # Errors
/// Outer: the blocking task failed.
pub(crate) async fn submit(
    app: &AppState,
    req: JobRequest,
    who: String,
) -> Result<Result<JobRecord, SubmitError>, AppError> {
    let app = app.clone();
    blocking(move || -> Result<JobRecord, SubmitError> {
        let now = crate::now_ms();
        let job = app.scheduler.submit_as(req, JobOrigin::Api, None, Some(who.clone()), now)?;
        audit(app.store.as_ref(), &who, "job_submit", &job, job.path.clone(), now);
        tracing::info!(job_id = %job.id, site = %job.site, priority = job.priority.as_str(), who = %who, "job submitted");
        Ok(job)
    })
    .await
}

/// Cancels job `id` on behalf of `who`.
///
/// # Errors
/// 404 for an unknown job, 409 for a finished one, store errors.
pub(crate) async fn cancel(app: &AppState, id: JobId, who: String) -> Result<JobRecord, AppError> {
    let app = app.clone();
    blocking(move || -> Result<JobRecord, AppError> {
        let now = crate::now_ms();
        let job = app.scheduler.cancel(id, &who, now)?;
        let reason = job.error.clone().unwrap_or_else(|| format!("cancelled by {who}"));
        audit(app.store.as_ref(), &who, "job_cancel", &job, format!("{reason}: {}", job.path), now);
        tracing::info!(job_id = %id, who = %who, "job cancelled");
        Ok(job)
    })
    .await?
}

/// Queues failed or cancelled job `id` again on behalf of `who`.
///
/// # Errors
/// 404 for an unknown job, 409 for a job that is not failed or cancelled, store errors.
pub(crate) async fn retry(app: &AppState, id: JobId, who: String) -> Result<JobRecord, AppError> {
    let app = app.clone();
    blocking(move || -> Result<JobRecord, AppError> {
        let now = crate::now_ms();
        let job = app.scheduler.retry(id, now)?;
        audit(app.store.as_ref(), &who, "job_retry", &job, format!("retried by {who}: {}", job.path), now);
        tracing::info!(job_id = %id, who = %who, "job retried");
        Ok(job)
    })
    .await?
}

/// Revokes agent `id` on behalf of `who` ([`crate::offline::revoke_agent`]: CRL, live revocation
/// set, open link closed, leases voided, audit entry).
///
/// # Errors
/// 404 for an unknown agent, 409 for one without a recorded certificate, store errors.
pub(crate) async fn revoke(
    app: &AppState,
    id: gaffer_protocol::messages::AgentId,
    who: String,
) -> Result<crate::offline::RevokeReport, AppError> {
    let app = app.clone();
    blocking(move || {
        crate::offline::revoke_agent(&app, id, &who).map_err(|e| match e {
            crate::offline::OfflineError::UnknownAgent(id) => AppError::NotFound(format!("agent {id}")),
            crate::offline::OfflineError::Store(e) => AppError::Store(e),
            other => AppError::Conflict(other.to_string()),
        })
    })
    .await?
}
