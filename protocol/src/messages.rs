//! Messages between agent and control plane.
//!
//! One QUIC connection per agent carries one bidirectional stream opened by the agent. The agent
//! sends [`AgentEnvelope`]s, the control plane sends [`ControlMessage`]s, each as one frame of
//! [`crate::codec`]. The exchange is:
//!
//! ```text
//! agent                                   control plane
//!   | -- Hello (versions, capabilities) -->  |
//!   | <-- Welcome (version, intervals) ----  |   or Refused { reason } and close
//!   | -- Heartbeat(Health) every N secs -->  |
//!   | <-- Ack { seq: 0 } ------------------  |   heartbeat answer (liveness only)
//!   | <-- Assign { job, lease } -----------  |
//!   | -- JobAccepted / Progress / Digest --> |
//!   | <-- Ack { seq } ---------------------  |   after the control plane persisted it
//!   | <-- Cancel { job, reason } ----------  |   when the job or its lease is gone
//! ```
//!
//! [`crate::session`] holds the state machines for both ends (handshake, acknowledgements, the
//! outbox window, heartbeat deadlines).
//!
//! Every agent message carries `(agent_id, seq)`. `seq` is assigned by the agent, strictly
//! increasing per agent; the control plane acknowledges a message only once its effect is durable
//! and answers a repeated `(agent_id, seq)` with the same `Ack`, so redelivery is harmless.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::digest::Digest;
use crate::health::{GpuInfo, GpuXidCount, Health};
use crate::version::VersionRange;

/// Identifies a job across agent, control plane and API.
pub type JobId = Uuid;

/// Identifies an agent. It is also the URI SAN (`urn:gaffer:agent:<id>`) of the agent's certificate,
/// so the control plane checks it against the authenticated connection.
pub type AgentId = Uuid;

/// The analysis profile a job runs.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Decode, shot boundaries, one keyframe per shot, technical metadata.
    Shots,
    /// `shots` plus the ONNX analyzers: moderation (NudeNet), on-screen text (PP-OCRv4) and
    /// speech (Silero VAD). Needs the models of [`Profile::required_models`].
    Full,
}

impl Profile {
    /// The profile's name as used by the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Shots => "shots",
            Profile::Full => "full",
        }
    }

    /// Registry names of the models an agent must have to run this profile.
    pub fn required_models(self) -> &'static [&'static str] {
        match self {
            Profile::Shots => &[],
            Profile::Full => &["nudenet-320n", "ppocrv4-det", "ppocrv4-rec", "ppocr-mobile-v2-cls", "silero-vad"],
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shots" => Ok(Profile::Shots),
            "full" => Ok(Profile::Full),
            other => Err(format!("unknown profile {other:?} (known: shots, full)")),
        }
    }
}

/// What an agent can do, sent in [`AgentMessage::Hello`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// GPUs found by NVML; empty when NVML is absent (the agent then runs on CPU).
    pub gpus: Vec<GpuInfo>,
    /// Absolute directory paths this agent may read job files from (`--volume`, plus watch roots).
    pub volumes: Vec<String>,
    /// Absolute directory paths the agent watches for new media (a subset of `volumes`).
    pub watch_roots: Vec<String>,
    /// How many jobs the agent runs at once.
    pub job_slots: u32,
    /// Profiles the agent can run (it has the decoders and models for them).
    pub profiles: Vec<Profile>,
    /// Models installed and verified on the agent.
    pub models: Vec<ModelRef>,
}

/// A model as installed on an agent: what the digest stamps on every output of it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    /// Registry name, e.g. `"nudenet-320n"`.
    pub name: String,
    /// Version of the package it came from, e.g. `"3.4.2"`.
    pub version: String,
    /// SHA-256 of the model file, lowercase hex.
    pub sha256: String,
}

/// Sent by the agent on the link, wrapped in an [`AgentEnvelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message on a connection.
    Hello {
        /// Protocol versions the agent speaks.
        versions: VersionRange,
        /// The agent's build version (semver of `gaffer-agent`).
        agent_version: String,
        /// The agent's host name, for display.
        hostname: String,
        /// What the agent can do.
        capabilities: Capabilities,
        /// Jobs the agent holds (queued or running) from an earlier connection, with the lease each
        /// was assigned under, so the control plane keeps the leases that are still current and
        /// cancels the rest.
        running_jobs: Vec<HeldJob>,
    },
    /// Periodic health report; also proves liveness.
    Heartbeat(Health),
    /// The agent took an assigned job and started it.
    JobAccepted {
        /// The job.
        job_id: JobId,
        /// The lease the job was assigned under ([`Assignment::lease_id`]); 0 for a watch-folder
        /// job the agent started on its own before any lease (see [`LEASE_ID_NONE`]).
        lease_id: LeaseId,
    },
    /// The agent refused an assigned job (path outside its volumes, no free slot, unknown profile).
    JobRejected {
        /// The job.
        job_id: JobId,
        /// The lease it was assigned under.
        lease_id: LeaseId,
        /// Human-readable reason, shown on the dashboard.
        reason: String,
    },
    /// Progress of a running job.
    Progress {
        /// The job.
        job_id: JobId,
        /// The lease it runs under.
        lease_id: LeaseId,
        /// Fraction done, 0..=1 (by media time).
        fraction: f32,
        /// Frames decoded so far.
        frames_decoded: u64,
    },
    /// The job finished; the digest is its result.
    Digest {
        /// The job.
        job_id: JobId,
        /// The lease it ran under; a digest under any other lease is refused.
        lease_id: LeaseId,
        /// The analysis result.
        digest: Box<Digest>,
    },
    /// The job failed; the reason is shown to the operator.
    JobFailed {
        /// The job.
        job_id: JobId,
        /// The lease it ran under.
        lease_id: LeaseId,
        /// Human-readable reason, e.g. "not a media file: Invalid data found when processing input".
        reason: String,
        /// Whether another attempt may succeed: `true` when the attempt died rather than the input
        /// being bad (the analysis worker crashed or was killed by a signal, the agent's state
        /// database failed), so the control plane requeues the job until its attempts are spent;
        /// `false` when the input itself is the problem (not a media file, unreadable, outside the
        /// volumes) or a limit was passed (`--job-timeout`, `--job-memory-max`: the same file
        /// would pass it again), so the job fails at once with `reason`.
        retryable: bool,
    },
    /// A new file appeared in a watch folder: the agent asks for a job for it (which will normally be
    /// leased back to the same agent).
    SubmitWatched {
        /// Id chosen by the agent, so a redelivered submission does not create a second job.
        job_id: JobId,
        /// Absolute path of the file on the agent's box.
        path: String,
        /// Profile to run.
        profile: Profile,
    },
    /// Online certificate renewal (protocol 3): a CSR (PEM `CERTIFICATE REQUEST`, ECDSA P-256) for a key the
    /// agent has just generated on its box. Sent with sequence 0, like a heartbeat: it is a request, not a
    /// report, so it is never kept in the outbox; if the answer is lost the agent asks again on its next
    /// connection with the same key. Answered by [`ControlMessage::Certificate`] or
    /// [`ControlMessage::CertificateRefused`].
    CertificateRequest {
        /// The CSR, PEM; at most `gaffer_certs::PEM_BYTES_MAX` bytes.
        csr_pem: String,
    },
    /// How an update ordered by [`ControlMessage::Update`] went (protocol 5). Kept in the outbox like a
    /// job report (at-least-once, applied once by sequence), so a report written just before the agent
    /// re-executed itself or rolled back still arrives.
    UpdateReport(UpdateReport),
    /// Chain of custody of a job's media file (protocol 6, [`crate::CUSTODY_PROTOCOL_VERSION`]): what the
    /// agent read, hashed on its box (a hash of the content, never the content). Kept in the outbox like a
    /// job report and sent before the job's `Digest`; applied idempotently from the lease holder. Never
    /// sent over a link that agreed less than 6 (the session drops it there).
    Custody {
        /// The job.
        job_id: JobId,
        /// The lease it ran under (fenced like the other reports).
        lease_id: LeaseId,
        /// SHA-256 of the file's bytes, 64 lowercase hex characters.
        sha256: String,
        /// Size of the file in bytes, as read.
        size_bytes: u64,
        /// The file's modification time, seconds since the Unix epoch (`None` where the file system
        /// does not say).
        modified_unix_secs: Option<i64>,
    },
    /// Critical XID errors per GPU (protocol 6, [`crate::XID_PROTOCOL_VERSION`]): one entry per GPU the
    /// agent watches with NVML's critical-XID event set, in NVML index order, zero counts included; counts
    /// are since the agent started, so they drop to 0 when it restarts (a counter reset). Sent when the
    /// counts change and once per connection, kept in the outbox like a report (a later one replaces an
    /// earlier one); never sent over a link that agreed less than 6 (the session drops it there). The
    /// control plane refuses a list longer than its per-report GPU bound (64) or naming a GPU index twice.
    GpuXidErrors {
        /// Per-GPU counts, at most one entry per NVML index.
        counts: Vec<GpuXidCount>,
    },
}

impl AgentMessage {
    /// Short name of the message kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Hello { .. } => "hello",
            AgentMessage::Heartbeat(_) => "heartbeat",
            AgentMessage::JobAccepted { .. } => "job_accepted",
            AgentMessage::JobRejected { .. } => "job_rejected",
            AgentMessage::Progress { .. } => "progress",
            AgentMessage::Digest { .. } => "digest",
            AgentMessage::JobFailed { .. } => "job_failed",
            AgentMessage::SubmitWatched { .. } => "submit_watched",
            AgentMessage::CertificateRequest { .. } => "certificate_request",
            AgentMessage::UpdateReport(_) => "update_report",
            AgentMessage::Custody { .. } => "custody",
            AgentMessage::GpuXidErrors { .. } => "gpu_xid_errors",
        }
    }
}

/// An agent message with its dedupe key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEnvelope {
    /// The sending agent; must match the identity of the authenticated connection.
    pub agent_id: AgentId,
    /// Per-agent sequence number, strictly increasing across restarts of the agent.
    pub seq: u64,
    /// The message.
    pub body: AgentMessage,
}

/// A lease id: the per-job epoch of an assignment (a fencing token). Every assignment of a job
/// gets a larger one; only messages carrying the job's current lease id from the lease's holder
/// move the job on.
pub type LeaseId = u64;

/// The lease id of a watch-folder job an agent started on its own, before the control plane
/// leased it (offline, or link down). Accepted only for jobs pinned to that agent.
pub const LEASE_ID_NONE: LeaseId = 0;

/// A job an agent holds, as reported in [`AgentMessage::Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeldJob {
    /// The job.
    pub job_id: JobId,
    /// The lease it was assigned under ([`LEASE_ID_NONE`] for a self-started watch-folder job).
    pub lease_id: LeaseId,
}

/// A job as handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The job.
    pub job_id: JobId,
    /// This assignment's lease id; the agent sends it back with everything it reports on the job.
    pub lease_id: LeaseId,
    /// Absolute path of the media file on the agent's box.
    pub path: String,
    /// What to run.
    pub profile: Profile,
}

/// Sent by the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Answer to an acceptable Hello.
    Welcome {
        /// The negotiated protocol version.
        protocol_version: u16,
        /// The control plane's build version.
        server_version: String,
        /// How often the agent should send a heartbeat, in seconds.
        heartbeat_interval_secs: u32,
    },
    /// The control plane will not talk to this agent; the connection closes after this.
    Refused {
        /// Why, in words an operator can act on.
        reason: String,
    },
    /// Run this job.
    Assign(Assignment),
    /// Stop this job (it was cancelled, or the lease is no longer the agent's).
    Cancel {
        /// The job.
        job_id: JobId,
        /// Why, for the agent's log (e.g. "cancelled by an operator", "lease expired").
        reason: String,
    },
    /// The agent message with this sequence number is durable at the control plane.
    ///
    /// `seq == 0` is the answer to a heartbeat (heartbeats carry sequence 0 and are never kept):
    /// it only proves the control plane is alive, so an idle link carries traffic both ways every
    /// heartbeat interval, and agents ignore it otherwise.
    Ack {
        /// The acknowledged sequence number.
        seq: u64,
    },
    /// The control plane could not process the message with this sequence number. `retry` says
    /// whether sending it again may help (a store error) or not: a message the control plane will
    /// never accept (a report under a lease that is not the agent's current one, a digest for an
    /// unknown job), which the agent drops after logging; nothing was applied either way.
    Error {
        /// Sequence number of the message that failed.
        seq: u64,
        /// What went wrong.
        message: String,
        /// Whether redelivery may succeed.
        retry: bool,
    },
    /// Answer to [`AgentMessage::CertificateRequest`] (protocol 3): the agent's new certificate, signed by
    /// the fleet's issuing CA for the control plane's `--agent-cert-ttl`. The agent keeps its old key and
    /// certificate until a connection with the new ones has been welcomed.
    Certificate {
        /// The certificate, PEM (URI SAN `urn:gaffer:agent:<id>`).
        cert_pem: String,
        /// Every CA certificate the agent must trust from now on, PEM, one per entry (two during a CA
        /// rotation, else one).
        ca_pems: Vec<String>,
    },
    /// The control plane will not sign the CSR; the agent keeps its current certificate and asks again
    /// later (protocol 3).
    CertificateRefused {
        /// Why, in words an operator can act on.
        reason: String,
    },
    /// The CAs the agent must trust for the control plane's certificate from now on (protocol 3): sent
    /// on every Welcome and whenever a CA rotation changes the set. Replaces the agent's trust set.
    TrustBundle {
        /// CA certificates, PEM, one per entry, never empty.
        ca_pems: Vec<String>,
    },
    /// Renew your certificate now, whatever its age (protocol 3): sent when a CA rotation moves agents
    /// to the new issuing CA (`update-clients`, `rollback`).
    RenewCertificate {
        /// Why, for the agent's log.
        reason: String,
    },
    /// The control plane's Ed25519 release public key (protocol 4), sent after every Welcome while
    /// the control plane has one. An agent that pinned no key yet (it enrolled before the key
    /// existed) pins this one; an agent that pinned another key refuses it and keeps its own: a
    /// release key is never replaced over the link.
    ReleaseKey {
        /// The 32 bytes of the public key (zipsign's `release.pub`).
        public_key: [u8; 32],
    },
    /// Update to this release (protocol 5): sent when a rollout picks the agent, and again on every
    /// connection while it is picked and has not reported the outcome. The agent fetches the artifact
    /// on the same authenticated connection ([`crate::release_fetch`]), verifies it against its pinned
    /// release key, waits until it runs no job, then re-executes into the new version.
    Update(UpdateOrder),
    /// Drop the update order of this rollout if it has not been applied yet (protocol 5): the rollout
    /// was paused, halted or aborted. An agent already running the new version under its health gate
    /// carries on.
    UpdateWithdrawn {
        /// The rollout whose order is withdrawn.
        rollout_id: u64,
        /// Why, for the agent's log.
        reason: String,
    },
}

/// A release an agent is asked to update to ([`ControlMessage::Update`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOrder {
    /// The rollout this order belongs to; the agent's [`UpdateReport`] names it.
    pub rollout_id: u64,
    /// The target version, semver (`1.4.0`), as in the artifact's name.
    pub version: String,
    /// The signed artifact's file name, `gaffer-agent-<version>-<arch>-linux.tar.gz`.
    pub file_name: String,
    /// Size of the signed artifact, bytes; the agent refuses a fetch of any other size.
    pub size_bytes: u64,
    /// SHA-256 of the signed artifact, lowercase hex (a transfer check; the signature is the trust).
    pub sha256: String,
    /// How long the new version must stay connected and heartbeating after its self-test before the
    /// agent calls it healthy and drops the previous binary's claim, seconds (`rollout start
    /// --wait-mins` × 60).
    pub health_wait_secs: u32,
}

/// What an agent says about an update ([`AgentMessage::UpdateReport`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// The rollout of the order.
    pub rollout_id: u64,
    /// The version the order asked for.
    pub version: String,
    /// What happened.
    pub outcome: UpdateOutcome,
}

/// The outcome of an update order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateOutcome {
    /// The artifact was fetched and verified; the agent restarts into the new version as soon as it
    /// runs no job.
    Staged,
    /// The new version started, passed its self-test, connected and heartbeated for the health wait.
    Healthy,
    /// The update was not applied or was rolled back; the agent runs `running_version`.
    Failed {
        /// What went wrong, in words an operator can act on (e.g. "signature does not verify against
        /// the pinned release key", "version 1.5.0 exited with status 3 before its self-test").
        reason: String,
        /// Whether the new version ran and the agent put the previous binary back (`true`), or the
        /// update never got that far (`false`: fetch, verification or unpacking failed).
        rolled_back: bool,
        /// The version the agent runs now.
        running_version: String,
    },
}

impl ControlMessage {
    /// Short name of the message kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Welcome { .. } => "welcome",
            ControlMessage::Refused { .. } => "refused",
            ControlMessage::Assign(_) => "assign",
            ControlMessage::Cancel { .. } => "cancel",
            ControlMessage::Ack { .. } => "ack",
            ControlMessage::Error { .. } => "error",
            ControlMessage::Certificate { .. } => "certificate",
            ControlMessage::CertificateRefused { .. } => "certificate_refused",
            ControlMessage::TrustBundle { .. } => "trust_bundle",
            ControlMessage::RenewCertificate { .. } => "renew_certificate",
            ControlMessage::ReleaseKey { .. } => "release_key",
            ControlMessage::Update(_) => "update",
            ControlMessage::UpdateWithdrawn { .. } => "update_withdrawn",
        }
    }
}
