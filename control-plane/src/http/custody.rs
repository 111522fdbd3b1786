//! A job's chain of custody: `GET /api/v1/jobs/{id}/custody` (viewer and above) and the "Chain of
//! custody" section of the job page.
//!
//! What it says, all from the store at request time: the media file's SHA-256, size and modification
//! time as the agent that analyzed it hashed them on its box ([`crate::store::MediaCustody`], protocol
//! 6); who submitted the job and when; the agent (id, host name, the version it runs now) and the
//! analyzers of the digest with their versions; and every state change with its time, creation first.
//! A job run by an agent that speaks a protocol older than 6 has no hash: `media` is null and
//! `media_note` says why.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::api::{parse_id, JobIdParam};
use super::auth::ApiCaller;
use super::openapi::ErrorBody;
use super::{AppError, HttpState};
use crate::store::{JobRecord, JobState, Store, StoreError};

/// The chain of custody of one job.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct CustodyJson {
    /// The job's id (UUID).
    pub job_id: String,
    /// Absolute path of the media file on the agent's box.
    pub path: String,
    /// The job's state now.
    pub state: JobState,
    /// The file as the agent read it; null until reported, and for agents before protocol 6.
    pub media: Option<MediaJson>,
    /// Why `media` is null (e.g. "not recorded (the agent speaks a protocol before 6)"); null when set.
    pub media_note: Option<String>,
    /// Who submitted it: `token:NAME`, `user:NAME` or `watch folder of agent ID`; null for jobs stored
    /// before submitters were recorded.
    pub submitted_by: Option<String>,
    /// When it was submitted, Unix ms.
    pub submitted_at_ms: u64,
    /// The agent that holds or finished the job; null while it is queued.
    pub agent: Option<CustodyAgentJson>,
    /// The analyzers that produced the digest, with their versions (empty until it succeeded).
    pub analyzers: Vec<AnalyzerJson>,
    /// Every state change, oldest first, starting with the submission (`queued` at `submitted_at_ms`).
    pub history: Vec<StateChangeJson>,
}

/// The media file's identity, hashed on the agent's box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct MediaJson {
    /// SHA-256 of the file's bytes, 64 lowercase hex characters.
    pub sha256: String,
    /// Size of the file, bytes.
    pub size_bytes: u64,
    /// Modification time, seconds since the Unix epoch; null where the file system does not say.
    pub modified_unix_secs: Option<i64>,
    /// The agent that hashed it (UUID).
    pub agent_id: String,
    /// When the control plane recorded it, Unix ms.
    pub recorded_at_ms: u64,
}

/// The agent of a job, as the fleet knows it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct CustodyAgentJson {
    /// Agent id (UUID).
    pub id: String,
    /// Host name; null for an agent no longer enrolled.
    pub hostname: Option<String>,
    /// `gaffer-agent` version from its latest Hello; null if never seen.
    pub agent_version: Option<String>,
}

/// One analyzer of the digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct AnalyzerJson {
    /// Name, e.g. `shots.content`.
    pub name: String,
    /// Version of its algorithm or model.
    pub version: String,
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct StateChangeJson {
    /// The state entered.
    pub state: JobState,
    /// When, Unix ms.
    pub at_ms: u64,
    /// The agent holding or finishing the job after the change (UUID), if any.
    pub agent_id: Option<String>,
    /// Why (failure or requeue reason), if the change has one.
    pub reason: Option<String>,
}

/// Builds the chain of custody of `job` from the store (its agent record and digest).
///
/// # Errors
/// The store's.
pub(crate) fn custody_of(store: &dyn Store, job: &JobRecord) -> Result<CustodyJson, StoreError> {
    let agent_record = match job.agent {
        Some(a) => store.get_agent(a)?,
        None => None,
    };
    let analyzers = match job.state {
        JobState::Succeeded => store
            .get_digest(job.id)?
            .map(|d| d.analyzers.into_iter().map(|a| AnalyzerJson { name: a.name, version: a.version }).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let media_note = match (&job.custody, job.state) {
        (Some(_), _) => None,
        (None, JobState::Succeeded) => Some(format!(
            "not recorded (the agent{} speaks a protocol before {}, or could not hash the file: see its log)",
            agent_record.as_ref().and_then(|a| a.agent_version.as_ref()).map(|v| format!(" {v}")).unwrap_or_default(),
            gaffer_protocol::CUSTODY_PROTOCOL_VERSION
        )),
        (None, _) => Some("not recorded yet: the agent reports it when the analysis finishes".to_owned()),
    };
    let mut history = vec![StateChangeJson {
        state: JobState::Queued,
        at_ms: job.created_at_ms,
        agent_id: None,
        reason: job.submitted_by.as_ref().map(|s| format!("submitted by {s}")),
    }];
    history.extend(job.history.iter().map(|c| StateChangeJson {
        state: c.state,
        at_ms: c.at_ms,
        agent_id: c.agent.map(|a| a.to_string()),
        reason: c.reason.clone(),
    }));
    Ok(CustodyJson {
        job_id: job.id.to_string(),
        path: job.path.clone(),
        state: job.state,
        media: job.custody.as_ref().map(|c| MediaJson {
            sha256: c.sha256.clone(),
            size_bytes: c.size_bytes,
            modified_unix_secs: c.modified_unix_secs,
            agent_id: c.agent.to_string(),
            recorded_at_ms: c.recorded_at_ms,
        }),
        media_note,
        submitted_by: job.submitted_by.clone(),
        submitted_at_ms: job.created_at_ms,
        agent: job.agent.map(|id| CustodyAgentJson {
            id: id.to_string(),
            hostname: agent_record.as_ref().map(|a| a.hostname.clone()),
            agent_version: agent_record.as_ref().and_then(|a| a.agent_version.clone()),
        }),
        analyzers,
        history,
    })
}

/// `GET /api/v1/jobs/{id}/custody`: the job's chain of custody.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/custody", tag = "jobs", params(JobIdParam),
    responses(
        (status = 200, description = "The media file's hash, size and mtime, submitter, agent, analyzers and state history", body = CustodyJson),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
pub(crate) async fn api_custody(
    _: ApiCaller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<CustodyJson>, AppError> {
    let id = parse_id(&id, "job")?;
    let store = state.app.store.as_ref();
    let job = store.get_job(id)?.ok_or_else(|| AppError::NotFound(format!("job {id}")))?;
    Ok(Json(custody_of(store, &job)?))
}

/// The job page's "Chain of custody" section: [`CustodyJson`] in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CustodyView {
    /// SHA-256, lowercase hex; `None` when not recorded (then `media_note` says why).
    pub sha256: Option<String>,
    /// Size, e.g. "12345678 bytes".
    pub size: String,
    /// Modification time, UTC, or "not recorded".
    pub modified: String,
    /// Why there is no hash.
    pub media_note: String,
    /// Submitter, or "not recorded".
    pub submitted_by: String,
    /// Submission time, UTC.
    pub submitted_at: String,
    /// "HOSTNAME (ID), gaffer-agent VERSION", or empty while queued.
    pub agent: String,
    /// "name version" per analyzer.
    pub analyzers: Vec<String>,
    /// (state, time UTC, reason or empty) per change, creation first.
    pub history: Vec<(String, String, String)>,
}

impl CustodyView {
    /// The section for `c`.
    pub(crate) fn new(c: &CustodyJson) -> Self {
        let utc = super::view::utc;
        let media = c.media.as_ref();
        CustodyView {
            sha256: media.map(|m| m.sha256.clone()),
            size: media.map(|m| format!("{} bytes", m.size_bytes)).unwrap_or_default(),
            modified: media
                .and_then(|m| m.modified_unix_secs)
                .and_then(|s| u64::try_from(s).ok())
                .map(|s| utc(s.saturating_mul(1000)))
                .unwrap_or_else(|| "not recorded".to_owned()),
            media_note: c.media_note.clone().unwrap_or_default(),
            submitted_by: c.submitted_by.clone().unwrap_or_else(|| "not recorded".to_owned()),
            submitted_at: utc(c.submitted_at_ms),
            agent: c
                .agent
                .as_ref()
                .map(|a| {
                    format!(
                        "{} ({}), gaffer-agent {}",
                        a.hostname.as_deref().unwrap_or("unknown host"),
                        a.id,
                        a.agent_version.as_deref().unwrap_or("version unknown")
                    )
                })
                .unwrap_or_default(),
            analyzers: c.analyzers.iter().map(|a| format!("{} {}", a.name, a.version)).collect(),
            history: c
                .history
                .iter()
                .map(|h| (h.state.as_str().to_owned(), utc(h.at_ms), h.reason.clone().unwrap_or_default()))
                .collect(),
        }
    }
}
