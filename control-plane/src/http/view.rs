//! Dashboard view models (askama templates from `dashboards/templates`) and the formatting they
//! need. Handlers turn store records into these plain structs of display strings, so the templates
//! hold no logic beyond loops and conditionals. askama escapes every `{{ }}` by default.

use askama::Template;
use gaffer_protocol::digest::{Digest, StreamInfo, StreamKind};
use gaffer_protocol::health::{Health, HealthSource};

use super::timeline::{ModerationView, SpeechView, TextView, TimelineView};
use crate::store::{AgentRecord, HealthSample, JobRecord, JobState, UnixMs};

/// `HH:MM:SS.mmm` of a presentation time in seconds (negative or non-finite shown as 0).
pub(crate) fn timecode(secs: f64) -> String {
    let ms_total = if secs.is_finite() && secs > 0.0 { (secs * 1000.0).round() as u64 } else { 0 };
    let (h, rem) = (ms_total / 3_600_000, ms_total % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, ms) = (rem / 1000, rem % 1000);
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

/// "12 s ago", "5 min ago", "3 h ago", "2 d ago"; "never" for `None`; "just now" for the future.
pub(crate) fn relative(then_ms: Option<UnixMs>, now_ms: UnixMs) -> String {
    let Some(then) = then_ms else {
        return "never".into();
    };
    let secs = now_ms.saturating_sub(then) / 1000;
    match secs {
        0 => "just now".into(),
        1..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

/// Time left until `deadline_ms`: "in 25 s", "in 3 min"; "passed 4 s ago" once it is past.
pub(crate) fn countdown(deadline_ms: UnixMs, now_ms: UnixMs) -> String {
    if deadline_ms <= now_ms {
        return match relative(Some(deadline_ms), now_ms).as_str() {
            "just now" => "passed just now".into(),
            ago => format!("passed {ago}"),
        };
    }
    let secs = (deadline_ms - now_ms).div_ceil(1000);
    match secs {
        0..=59 => format!("in {secs} s"),
        60..=3599 => format!("in {} min", secs / 60),
        3600..=86_399 => format!("in {} h", secs / 3600),
        _ => format!("in {} d", secs / 86_400),
    }
}

/// Bytes as GiB/MiB with one decimal.
pub(crate) fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = n as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else {
        format!("{:.1} MiB", f / MIB)
    }
}

/// UTC date-time `YYYY-MM-DD HH:MM:SS UTC` of Unix milliseconds.
pub(crate) fn utc(ms: UnixMs) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Percent used of `used` out of `total`, 0 when total is 0.
fn percent(used: u64, total: u64) -> u32 {
    if total == 0 {
        0
    } else {
        ((used as f64 / total as f64) * 100.0).round().clamp(0.0, 100.0) as u32
    }
}

/// The logged-in user, for the header of every page and for hiding what the role may not use.
#[derive(Debug, Clone)]
pub(crate) struct Me {
    /// The session's CSRF token (for every form).
    pub csrf: String,
    /// The user name.
    pub user: String,
    /// The role's name.
    pub role: &'static str,
    /// May submit, cancel and retry jobs.
    pub can_operate: bool,
    /// May read the audit log.
    pub can_audit: bool,
    /// May revoke agents (admin).
    pub can_revoke: bool,
    /// May cordon, drain and uncordon agents (operator).
    pub can_drain: bool,
    /// The live pages reload themselves (this browser has not paused it, [`super::refresh`]).
    pub auto_refresh: bool,
    /// The link that pauses (or resumes) the auto-refresh and comes back to this page.
    pub refresh_toggle_url: String,
}

impl Me {
    /// The user of `session`.
    pub(crate) fn of(session: &super::auth::Session) -> Self {
        let role = session.role();
        Me {
            csrf: session.record.csrf_token.clone(),
            user: session.user.name.clone(),
            role: role.as_str(),
            can_operate: super::Permission::OperateJobs.granted_to(role),
            can_audit: super::Permission::ReadAudit.granted_to(role),
            can_revoke: super::Permission::RevokeAgents.granted_to(role),
            can_drain: super::Permission::DrainAgents.granted_to(role),
            auto_refresh: session.auto_refresh,
            refresh_toggle_url: super::refresh::toggle_url(&session.here, session.auto_refresh),
        }
    }
}

/// One certificate issued to an agent, ready to show.
pub(crate) struct CertRow {
    pub issued: String,
    pub via: String,
    pub serial: String,
    pub expires: String,
    /// First 16 hex digits of the issuing CA's fingerprint.
    pub issuer: String,
}

impl CertRow {
    pub(crate) fn new(c: &crate::store::CertIssue) -> Self {
        CertRow {
            issued: utc(c.issued_at_ms),
            via: c.via.clone(),
            serial: c.serial_hex.clone(),
            expires: u64::try_from(c.not_after_unix).map(|s| utc(s.saturating_mul(1000))).unwrap_or_default(),
            issuer: c.issuer_fingerprint.get(..16).unwrap_or(&c.issuer_fingerprint).to_owned(),
        }
    }
}

/// One GPU's live numbers.
pub(crate) struct GpuRow {
    pub index: u32,
    pub name: String,
    pub util_percent: u32,
    pub memory: String,
    pub memory_percent: u32,
    pub temperature_c: u32,
    pub power: String,
}

/// Latest health, ready to show.
pub(crate) struct HealthView {
    /// "CPU only" reason, when NVML is unavailable.
    pub cpu_only_reason: Option<String>,
    /// NVIDIA driver version, when NVML loaded.
    pub driver: Option<String>,
    /// ONNX Runtime execution provider and why, e.g. "cpu (ONNX Runtime 1.31.1): NVML found no
    /// GPU: CPU execution provider"; None when the agent has no runtime installed.
    pub inference: Option<String>,
    /// Messages waiting in the agent's outbox, and whether it is full.
    pub outbox: String,
    pub outbox_full: bool,
    pub cpu_percent: String,
    pub memory: String,
    pub memory_percent: u32,
    pub load: String,
    pub gpus: Vec<GpuRow>,
    pub disks: Vec<String>,
    pub received: String,
}

impl HealthView {
    pub(crate) fn new(sample: &HealthSample, now_ms: UnixMs) -> Self {
        let h = &sample.health;
        let (cpu_only_reason, driver) = match &h.source {
            HealthSource::CpuOnly { reason } => (Some(reason.clone()), None),
            HealthSource::Nvml { driver_version } => (None, Some(driver_version.clone())),
        };
        HealthView {
            cpu_only_reason,
            driver,
            inference: h
                .inference
                .as_ref()
                .map(|i| format!("{} (ONNX Runtime {}): {}", i.provider, i.runtime_version, i.note)),
            outbox: format!("{} pending, {} queued jobs", h.outbox_pending, h.jobs_queued),
            outbox_full: h.outbox_full,
            cpu_percent: format!("{:.0}%", h.cpu_percent),
            memory: format!("{} / {}", bytes(h.memory_used_bytes), bytes(h.memory_total_bytes)),
            memory_percent: percent(h.memory_used_bytes, h.memory_total_bytes),
            load: format!("{:.2}", h.load_avg_1m),
            gpus: h
                .gpus
                .iter()
                .map(|g| GpuRow {
                    index: g.index,
                    name: g.name.clone(),
                    util_percent: g.utilization_percent.min(100),
                    memory: format!("{} / {}", bytes(g.memory_used_bytes), bytes(g.memory_total_bytes)),
                    memory_percent: percent(g.memory_used_bytes, g.memory_total_bytes),
                    temperature_c: g.temperature_c,
                    power: g.power_w.map(|w| format!("{w:.0} W")).unwrap_or_else(|| "–".into()),
                })
                .collect(),
            disks: h
                .disks
                .iter()
                .map(|d| format!("{}: {} free of {}", d.path, bytes(d.available_bytes), bytes(d.total_bytes)))
                .collect(),
            received: relative(Some(sample.received_at_ms), now_ms),
        }
    }
}

/// One agent in the fleet table.
pub(crate) struct AgentRow {
    pub id: String,
    pub site: String,
    pub hostname: String,
    pub online: bool,
    /// [`crate::store::AgentState`] name: `online`, `offline`, `air_gapped`, `revoked`.
    pub state: &'static str,
    pub last_seen: String,
    pub version: String,
    pub health: Option<HealthView>,
    pub jobs_running: usize,
    pub slots: String,
    /// `active`, `cordoned` or `draining` ([`crate::store::Scheduling::name`]).
    pub scheduling: &'static str,
    /// "cordoned by alice", "draining by alice (deadline in 12 min)"; None when active.
    pub scheduling_note: Option<String>,
}

impl AgentRow {
    pub(crate) fn new(a: &AgentRecord, jobs_running: usize, now_ms: UnixMs) -> Self {
        AgentRow {
            id: a.id.to_string(),
            site: a.site.clone(),
            hostname: a.hostname.clone(),
            online: a.connected,
            state: crate::store::AgentState::of(a).as_str(),
            last_seen: relative(a.last_seen_ms, now_ms),
            version: a.agent_version.clone().unwrap_or_else(|| "–".into()),
            health: a.last_health.as_ref().map(|s| HealthView::new(s, now_ms)),
            jobs_running,
            slots: a.capabilities.as_ref().map(|c| c.job_slots.to_string()).unwrap_or_else(|| "?".into()),
            scheduling: a.scheduling.name(),
            scheduling_note: a.scheduling.describe(now_ms),
        }
    }
}

/// The current lease of a job, ready to show.
pub(crate) struct LeaseView {
    /// The holder's agent id.
    pub holder: String,
    /// The lease id (fencing token).
    pub lease_id: u64,
    /// "2024-… UTC (in 25 s)"; None while the holder runs it connected (no deadline).
    pub deadline: Option<String>,
}

/// One job in a table.
pub(crate) struct JobRow {
    pub id: String,
    pub path: String,
    pub site: String,
    pub profile: String,
    pub priority: &'static str,
    pub state: String,
    pub finished: bool,
    /// Not finished: the Cancel button applies.
    pub can_cancel: bool,
    /// Failed or cancelled: the Retry button applies.
    pub can_retry: bool,
    /// Why a queued job still waits (set with [`JobRow::with_pending_reason`]).
    pub pending_reason: Option<String>,
    pub lease: Option<LeaseView>,
    /// 0..=100.
    pub progress_percent: u32,
    pub frames_decoded: u64,
    pub agent: Option<String>,
    pub pinned_agent: Option<String>,
    pub origin: String,
    pub error: Option<String>,
    pub attempts: u32,
    pub created: String,
    pub updated: String,
    pub finished_at: Option<String>,
}

impl JobRow {
    pub(crate) fn new(j: &JobRecord, now_ms: UnixMs) -> Self {
        let progress = if j.progress.is_finite() { j.progress.clamp(0.0, 1.0) } else { 0.0 };
        JobRow {
            id: j.id.to_string(),
            path: j.path.clone(),
            site: j.site.clone(),
            profile: j.profile.as_str().into(),
            priority: j.priority.as_str(),
            state: j.state.as_str().into(),
            finished: j.state.is_terminal(),
            can_cancel: !j.state.is_terminal(),
            can_retry: matches!(j.state, JobState::Failed | JobState::Cancelled),
            pending_reason: None,
            lease: j.lease.map(|l| LeaseView {
                holder: l.holder.to_string(),
                lease_id: l.lease_id,
                deadline: l.deadline_ms.map(|d| format!("{} ({})", utc(d), countdown(d, now_ms))),
            }),
            progress_percent: (progress * 100.0).round() as u32,
            frames_decoded: j.frames_decoded,
            agent: j.agent.map(|a| a.to_string()),
            pinned_agent: j.pinned_agent.map(|a| a.to_string()),
            origin: match &j.origin {
                crate::store::JobOrigin::Api => "API / dashboard".into(),
                crate::store::JobOrigin::WatchFolder { agent } => {
                    format!("watch folder of {agent}")
                }
            },
            error: j.error.clone(),
            attempts: j.attempts,
            created: relative(Some(j.created_at_ms), now_ms),
            updated: relative(Some(j.updated_at_ms), now_ms),
            finished_at: j.finished_at_ms.map(utc),
        }
    }

    /// The row with the scheduler's reason why the (queued) job waits.
    pub(crate) fn with_pending_reason(mut self, reason: Option<String>) -> Self {
        self.pending_reason = reason;
        self
    }
}

/// One stream of the container.
pub(crate) struct StreamRow {
    pub index: u32,
    pub kind: &'static str,
    pub codec: String,
    pub detail: String,
    pub duration: String,
    pub bit_rate: String,
    pub language: String,
}

impl StreamRow {
    fn new(s: &StreamInfo) -> Self {
        let kind = match s.kind {
            StreamKind::Video => "video",
            StreamKind::Audio => "audio",
            StreamKind::Subtitle => "subtitle",
            StreamKind::Data => "data",
            StreamKind::Attachment => "attachment",
            StreamKind::Unknown => "unknown",
        };
        let mut detail = Vec::new();
        if let (Some(w), Some(h)) = (s.width, s.height) {
            detail.push(format!("{w}×{h}"));
        }
        if let Some(p) = &s.pixel_format {
            detail.push(p.clone());
        }
        if let Some(fps) = s.frame_rate_fps {
            detail.push(format!("{fps:.3} fps"));
        }
        if let Some(hz) = s.sample_rate_hz {
            detail.push(format!("{hz} Hz"));
        }
        if let Some(ch) = s.channels {
            detail.push(format!("{ch} ch"));
        }
        detail.push(format!("time base {}/{}", s.time_base.0, s.time_base.1));
        StreamRow {
            index: s.index,
            kind,
            codec: s.codec.clone(),
            detail: detail.join(", "),
            duration: s.duration_secs.map(timecode).unwrap_or_else(|| "–".into()),
            bit_rate: s.bit_rate_bps.map(|b| format!("{} kb/s", b / 1000)).unwrap_or_else(|| "–".into()),
            language: s.language.clone().unwrap_or_else(|| "–".into()),
        }
    }
}

/// One shot of the shot list.
pub(crate) struct ShotRow {
    pub index: u32,
    pub start_tc: String,
    pub end_tc: String,
    pub start_frame: u64,
    pub end_frame: u64,
    pub frames: u64,
    pub keyframe_tc: String,
    pub keyframe_frame: u64,
    pub phash: String,
}

/// A digest, ready to show.
pub(crate) struct DigestView {
    pub container: String,
    pub container_long_name: String,
    pub duration: String,
    pub bit_rate: String,
    pub streams: Vec<StreamRow>,
    pub detector: String,
    pub threshold: String,
    pub min_shot_frames: u32,
    pub frames_decoded: u64,
    pub frames_corrupt: u64,
    pub cut_count: usize,
    pub shots: Vec<ShotRow>,
    pub analyzers: Vec<String>,
    pub analysis_secs: String,
    pub schema_version: u32,
    pub source_size: String,
    /// The timeline (shots and the `full` profile's findings); `None` without a positive duration.
    pub timeline: Option<TimelineView>,
    pub moderation: Option<ModerationView>,
    pub text: Option<TextView>,
    pub speech: Option<SpeechView>,
}

impl DigestView {
    pub(crate) fn new(d: &Digest) -> Self {
        let t = &d.technical;
        DigestView {
            container: t.container.clone(),
            container_long_name: t.container_long_name.clone(),
            duration: t.duration_secs.map(timecode).unwrap_or_else(|| "–".into()),
            bit_rate: t.bit_rate_bps.map(|b| format!("{} kb/s", b / 1000)).unwrap_or_else(|| "–".into()),
            streams: t.streams.iter().map(StreamRow::new).collect(),
            detector: d.shots.detector.clone(),
            threshold: format!("{:.1}", d.shots.threshold),
            min_shot_frames: d.shots.min_shot_frames,
            frames_decoded: d.shots.frames_decoded,
            frames_corrupt: d.shots.frames_corrupt,
            cut_count: d.shots.cuts.len(),
            shots: d
                .shots
                .shots
                .iter()
                .map(|s| ShotRow {
                    index: s.index,
                    start_tc: timecode(s.start_secs),
                    end_tc: timecode(s.end_secs),
                    start_frame: s.start_frame,
                    end_frame: s.end_frame,
                    frames: s.end_frame.saturating_sub(s.start_frame),
                    keyframe_tc: timecode(s.keyframe.time_secs),
                    keyframe_frame: s.keyframe.frame,
                    phash: s.keyframe.phash.clone(),
                })
                .collect(),
            analyzers: d
                .analyzers
                .iter()
                .map(|a| {
                    let params: Vec<String> = a.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{} {} ({})", a.name, a.version, params.join(", "))
                })
                .collect(),
            analysis_secs: format!("{:.1} s", d.analysis_secs),
            schema_version: d.schema_version,
            source_size: bytes(d.source.size_bytes),
            timeline: TimelineView::new(d),
            moderation: d.moderation.as_ref().map(ModerationView::new),
            text: d.text.as_ref().map(TextView::new),
            speech: d.speech.as_ref().map(SpeechView::new),
        }
    }
}

/// One row of the health history table.
pub(crate) struct HistoryRow {
    pub at: String,
    pub cpu_percent: String,
    pub memory: String,
    pub load: String,
    pub gpu_util: String,
    pub jobs: String,
}

/// Width and height of the sparkline's SVG viewBox.
pub(crate) const SPARK_W: u32 = 300;
/// See [`SPARK_W`].
pub(crate) const SPARK_H: u32 = 40;

/// SVG polyline points (`"x,y x,y …"`) of percentages 0..=100 across the sparkline box; empty
/// for fewer than two values.
pub(crate) fn sparkline(values: &[f64]) -> String {
    if values.len() < 2 {
        return String::new();
    }
    let step = f64::from(SPARK_W) / (values.len() - 1) as f64;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let v = if v.is_finite() { v.clamp(0.0, 100.0) } else { 0.0 };
            format!("{:.1},{:.1}", i as f64 * step, f64::from(SPARK_H) * (1.0 - v / 100.0))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Mean GPU utilization of a report, percent, `None` without GPUs.
pub(crate) fn mean_gpu_util(h: &Health) -> Option<f64> {
    if h.gpus.is_empty() {
        None
    } else {
        Some(h.gpus.iter().map(|g| f64::from(g.utilization_percent)).sum::<f64>() / h.gpus.len() as f64)
    }
}

impl HistoryRow {
    pub(crate) fn new(s: &HealthSample) -> Self {
        let h = &s.health;
        HistoryRow {
            at: utc(s.received_at_ms),
            cpu_percent: format!("{:.0}%", h.cpu_percent),
            memory: format!("{} / {}", bytes(h.memory_used_bytes), bytes(h.memory_total_bytes)),
            load: format!("{:.2}", h.load_avg_1m),
            gpu_util: h
                .gpus
                .iter()
                .map(|g| format!("GPU{} {}% {}°C", g.index, g.utilization_percent, g.temperature_c))
                .collect::<Vec<_>>()
                .join(", "),
            jobs: format!("{} / {}", h.jobs_running, h.job_slots),
        }
    }
}

/// A labelled count (jobs by state).
pub(crate) struct Count {
    pub label: &'static str,
    pub count: u64,
}

/// `GET /` — the fleet overview.
#[derive(Template)]
#[template(path = "fleet.html")]
pub(crate) struct FleetPage {
    pub me: Me,
    /// One page of agents matching the filters.
    pub agents: Vec<AgentRow>,
    pub job_counts: Vec<Count>,
    /// Agents online, whole fleet.
    pub online_count: u64,
    /// Agents enrolled, whole fleet.
    pub agent_total: u64,
    /// Agents the filters match (every page).
    pub matching: u64,
    /// "all" and one link per agent state, with counts within the site filter.
    pub state_filters: Vec<FilterLink>,
    /// The site filter's options.
    pub sites: Vec<SiteOption>,
    /// The site filtered on, if any.
    pub site: Option<String>,
    /// The state filtered on, if any.
    pub state: Option<&'static str>,
    /// Link to the next page, while there is one.
    pub next_url: Option<String>,
    /// Link back to the first page, when this is a later one.
    pub first_url: Option<String>,
    /// The newest operator actions (`audit_table.html`), newest first.
    pub audit: Vec<super::audit::AuditRow>,
    /// The fleet CA and its rotation, when the control plane has certificates.
    pub ca: Option<CaView>,
}

/// A filter link with the number of matches behind it.
pub(crate) struct FilterLink {
    pub label: &'static str,
    pub count: u64,
    pub url: String,
    pub selected: bool,
}

/// A site in the fleet page's site filter.
pub(crate) struct SiteOption {
    pub name: String,
    pub online: u64,
    pub total: u64,
    pub selected: bool,
}

/// The fleet CA on the fleet page: rotation phase, fingerprints, agents still on another CA.
pub(crate) struct CaView {
    pub phase: &'static str,
    pub rotating: bool,
    pub since: String,
    pub current: String,
    pub next: Option<String>,
    pub issuing: String,
    /// Agents whose certificate is not from the issuing CA: (id, host name); during a rotation
    /// only, the first 50.
    pub on_other_ca: Vec<(String, String)>,
    /// How many agents hold a certificate from another CA (during a rotation).
    pub on_other_ca_total: usize,
}

/// A GPU from the agent's capabilities.
pub(crate) struct GpuInfoRow {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory: String,
}

/// `GET /agents/{id}`.
#[derive(Template)]
#[template(path = "agent.html")]
pub(crate) struct AgentPage {
    pub me: Me,
    pub agent: AgentRow,
    pub enrolled: String,
    pub cert_expires: String,
    /// Serial of the current certificate, hex ("–" when unknown).
    pub cert_serial: String,
    /// Fingerprint prefix of the CA that issued it.
    pub cert_issuer: String,
    /// When it was revoked, if it was.
    pub revoked: Option<String>,
    /// Certificates issued to it, newest first.
    pub cert_history: Vec<CertRow>,
    pub volumes: Vec<String>,
    pub watch_roots: Vec<String>,
    pub profiles: Vec<String>,
    /// Installed models as "name version (sha256 prefix)".
    pub models: Vec<String>,
    pub gpus: Vec<GpuInfoRow>,
    pub has_capabilities: bool,
    pub history: Vec<HistoryRow>,
    pub spark_w: u32,
    pub spark_h: u32,
    pub spark_cpu: String,
    pub spark_gpu: String,
    pub jobs: Vec<JobRow>,
}

/// An option of the jobs page's state filter.
pub(crate) struct StateOption {
    pub name: &'static str,
    pub selected: bool,
}

/// `GET /jobs` (one page, newest first).
#[derive(Template)]
#[template(path = "jobs.html")]
pub(crate) struct JobsPage {
    pub me: Me,
    pub jobs: Vec<JobRow>,
    /// The state filter's options (every state; the one in force selected).
    pub states: Vec<StateOption>,
    /// The state filtered on, if any.
    pub state: Option<&'static str>,
    /// Link to the next page, while there is one.
    pub next_url: Option<String>,
    /// Link back to the first page, when this is a later one.
    pub first_url: Option<String>,
}

/// `GET /jobs/{id}`.
#[derive(Template)]
#[template(path = "job.html")]
pub(crate) struct JobPage {
    pub me: Me,
    pub job: JobRow,
    /// Attempts allowed before the job fails for good (`--max-attempts`).
    pub max_attempts: u32,
    pub digest: Option<DigestView>,
    /// The "Chain of custody" section.
    pub custody: super::custody::CustodyView,
}

/// An option of the agent select.
pub(crate) struct AgentOption {
    pub id: String,
    pub label: String,
    pub selected: bool,
}

/// `GET /jobs/new` (and the form re-rendered with an error).
#[derive(Template)]
#[template(path = "job_new.html")]
pub(crate) struct NewJobPage {
    pub me: Me,
    pub error: Option<String>,
    pub path: String,
    pub site: String,
    pub sites: Vec<String>,
    pub agents: Vec<AgentOption>,
    /// The priority select's options (`low`, `normal`, `high`) and the chosen one.
    pub priorities: Vec<PriorityOption>,
}

/// An option of the priority select.
pub(crate) struct PriorityOption {
    pub name: &'static str,
    pub selected: bool,
}

/// `GET /login`.
#[derive(Template)]
#[template(path = "login.html")]
pub(crate) struct LoginPage {
    pub csrf: String,
    /// The user name typed last (shown again after a failure).
    pub user: String,
    pub error: Option<String>,
}

/// Any error, as a page.
#[derive(Template)]
#[template(path = "error.html")]
pub(crate) struct ErrorPage {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timecodes() {
        assert_eq!(timecode(0.0), "00:00:00.000");
        assert_eq!(timecode(3725.0405), "01:02:05.041");
        assert_eq!(timecode(-1.0), "00:00:00.000");
        assert_eq!(timecode(f64::NAN), "00:00:00.000");
        assert_eq!(timecode(211.96), "00:03:31.960");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(None, 10), "never");
        assert_eq!(relative(Some(10_000), 22_500), "12 s ago");
        assert_eq!(relative(Some(0), 5 * 60_000), "5 min ago");
        assert_eq!(relative(Some(0), 3 * 3_600_000), "3 h ago");
        assert_eq!(relative(Some(50_000), 10_000), "just now");
    }

    #[test]
    fn countdowns() {
        assert_eq!(countdown(40_000, 15_000), "in 25 s");
        assert_eq!(countdown(15_001, 15_000), "in 1 s");
        assert_eq!(countdown(15_000 + 180_000, 15_000), "in 3 min");
        assert_eq!(countdown(10_000, 14_000), "passed 4 s ago");
        assert_eq!(countdown(10_000, 10_000), "passed just now");
    }

    #[test]
    fn sparkline_spans_the_box() {
        assert_eq!(sparkline(&[50.0]), "");
        assert_eq!(sparkline(&[0.0, 100.0, 250.0]), "0.0,40.0 150.0,0.0 300.0,0.0");
    }
}
