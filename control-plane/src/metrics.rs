//! Prometheus metrics, served as OpenMetrics text at `GET /metrics` (no authentication: the
//! numbers carry no secrets, and Prometheus scrapes without credentials).
//!
//! | metric                          | type      | labels                                  | updated by |
//! |---------------------------------|-----------|-----------------------------------------|------------|
//! | `gaffer_agents`                 | gauge     | `state` = `connected` \| `disconnected` | the store's agent counts at scrape time ([`Store::list_agents_page`]; connected: not revoked, link up) |
//! | `gaffer_jobs`                   | gauge     | `state` = `queued` … `cancelled`        | the store's per-state counts at scrape time (O(1), not a scan) |
//! | `gaffer_agent_messages_total`   | counter   | `kind` (agent message kind)             | [`Metrics::message_received`] |
//! | `gaffer_agent_links_open`       | gauge     | –                                       | the fleet's live links at scrape time: agents registered on this control plane, one per agent however many old connections still wait for their idle timeout |
//! | `gaffer_queue_depth`            | gauge     | `site`, `profile`                       | queued jobs at scrape time, from the queued-state index (at most [`QUEUE_DEPTH_JOBS_MAX`] read; `gaffer_jobs{state="queued"}` is the exact total) |
//! | `gaffer_agent_*`, `gaffer_gpu_*` | gauge, counter | `agent_id`, `agent_name`, `site`, …   | per agent and per GPU, rendered from [`AgentBook`] at each scrape: see [`crate::agent_metrics`] |
//! | `gaffer_jobs_finished_total`    | counter   | `state` = `succeeded` \| `failed` \| `cancelled` | [`Metrics::job_finished`] |
//! | `gaffer_jobs_requeued_total`    | counter   | –                                       | [`Metrics::job_requeued`] (a spent attempt with attempts left) |
//! | `gaffer_agent_reports_refused_total` | counter | `reason` = `not_holder` \| `stale_lease` \| `finished` \| `unknown_job` \| `wrong_state` | [`Metrics::report_refused`]: fenced-off agent reports |
//! | `gaffer_enrollments_total`      | counter   | `result`                                | [`Metrics::enrollment`] |
//! | `gaffer_link_refused_total`     | counter   | `reason`                                | [`Metrics::handshake_refused`] |
//! | `gaffer_job_duration_seconds`   | histogram | `profile` = `shots` \| `full`             | [`Metrics::job_duration`]: submission to success |
//! | `gaffer_rollout_targets`        | gauge     | `state` = `pending` … `skipped`         | [`Metrics::rollout_targets`]: the targets of the newest rollout |
//! | `gaffer_update_reports_total`   | counter   | `outcome` = `staged` \| `healthy` \| `failed` | [`Metrics::update_report`]: agents' update reports received (duplicates included) |
//! | `gaffer_replicas_live`          | gauge     | –                                       | [`Metrics::set_replicas`]: control-plane replicas heartbeating in the shared store (1 on sled) |
//! | `gaffer_replica_leader`         | gauge     | –                                       | [`Metrics::set_replicas`]: 1 while this replica leads (rollout ticks, retention, dead-replica sweeps) |
//! | `gaffer_quic_handshakes_in_progress` | gauge | –                                       | [`Metrics::handshake_started`] / [`Metrics::handshake_ended`] ([`crate::admission`]) |
//! | `gaffer_enroll_connections_open` | gauge    | –                                       | [`Metrics::enroll_connection_started`] / [`Metrics::enroll_connection_ended`] |
//! | `gaffer_quic_retries_sent_total` | counter  | –                                       | [`Metrics::quic_retry_sent`]: QUIC Retry packets sent to unvalidated addresses |
//! | `gaffer_admission_refused_total` | counter  | `reason` = `handshakes` \| `enroll_connections` | [`Metrics::admission_refused`]: connections refused over a cap |
//! | `gaffer_webhook_deliveries_total` | counter | `outcome` = `delivered` \| `retry` \| `failed` \| `dropped` | [`Metrics::webhook_delivery`]: webhook and email attempts ([`crate::webhook`]) |
//! | `gaffer_webhook_pending`        | gauge     | –                                       | [`Metrics::set_webhook_pending`]: deliveries waiting, every second |
//!
//! Label values come from the control plane's own code (short fixed words), never from agents'
//! free text, so the label cardinality stays bounded; the exceptions are the per-agent series of
//! [`crate::agent_metrics`] (bounded by the fleet, see its cardinality notes) and `site` (bounded by
//! the operator's sites).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::agent_metrics::{AgentBook, AgentCollector};
use crate::store::{AgentQuery, AgentState, JobState, Store};

/// Most queued jobs a scrape reads for `gaffer_queue_depth` (50,000), in leasing order.
pub const QUEUE_DEPTH_JOBS_MAX: usize = 50_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    site: String,
    profile: String,
}

/// Content type of [`Metrics::encode`]'s output, for the HTTP response.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabel {
    profile: String,
}

/// Buckets of `gaffer_job_duration_seconds`: 1 s doubling to about 4.5 h (15 buckets).
fn job_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: String,
}

/// The control plane's metrics registry. One per process, shared behind an `Arc`; every method
/// takes `&self` and is cheap (atomic increments).
pub struct Metrics {
    registry: Registry,
    replicas_live: Gauge,
    replica_leader: Gauge,
    agents: Family<StateLabel, Gauge>,
    jobs: Family<StateLabel, Gauge>,
    messages: Family<KindLabel, Counter>,
    links_open: Gauge,
    queue_depth: Family<QueueLabels, Gauge>,
    agents_book: std::sync::Arc<AgentBook>,
    render_lock: std::sync::Mutex<()>,
    jobs_finished: Family<StateLabel, Counter>,
    enrollments: Family<ResultLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    reports_refused: Family<ReasonLabel, Counter>,
    requeued: Counter,
    job_duration: Family<ProfileLabel, Histogram>,
    certs_issued: Family<ViaLabel, Counter>,
    server_cert_not_after: Gauge,
    links_closed_revoked: Counter,
    links_closed_expired: Counter,
    releases_fetched: Counter,
    handshakes_failed: Counter,
    rollout_targets: Family<StateLabel, Gauge>,
    update_reports: Family<OutcomeLabel, Counter>,
    handshakes_in_progress: Gauge,
    enroll_connections_open: Gauge,
    quic_retries_sent: Counter,
    admission_refused: Family<ReasonLabel, Counter>,
    webhook_deliveries: Family<OutcomeLabel, Counter>,
    webhook_pending: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered at zero. Job duration buckets are 1 s, 2 s, 4 s …
    /// 16384 s (about 4.5 h).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let agents = Family::<StateLabel, Gauge>::default();
        registry.register("gaffer_agents", "Enrolled agents by link state", agents.clone());
        let jobs = Family::<StateLabel, Gauge>::default();
        registry.register("gaffer_jobs", "Jobs by lifecycle state", jobs.clone());
        let messages = Family::<KindLabel, Counter>::default();
        registry.register("gaffer_agent_messages", "Agent messages received, by kind", messages.clone());
        let links_open = Gauge::default();
        registry.register(
            "gaffer_agent_links_open",
            "Agents with a link up on this control plane now (one per agent)",
            links_open.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register("gaffer_queue_depth", "Queued jobs by site and profile", queue_depth.clone());
        let agents_book = std::sync::Arc::new(AgentBook::default());
        registry.register_collector(Box::new(AgentCollector(agents_book.clone())));
        let jobs_finished = Family::<StateLabel, Counter>::default();
        registry.register("gaffer_jobs_finished", "Jobs that finished, by final state", jobs_finished.clone());
        let enrollments = Family::<ResultLabel, Counter>::default();
        registry.register("gaffer_enrollments", "Enrollment attempts, by result", enrollments.clone());
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register("gaffer_link_refused", "Agent link handshakes refused, by reason", refused.clone());
        let reports_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "gaffer_agent_reports_refused",
            "Agent reports refused by the lease check (not the holder, stale lease, finished or unknown job)",
            reports_refused.clone(),
        );
        let requeued = Counter::default();
        registry.register(
            "gaffer_jobs_requeued",
            "Attempts that ended with the job back in the queue",
            requeued.clone(),
        );
        let job_duration =
            Family::<ProfileLabel, Histogram>::new_with_constructor(job_duration_histogram as fn() -> Histogram);
        registry.register(
            "gaffer_job_duration_seconds",
            "Time from submission to success of succeeded jobs, by profile (queueing included)",
            job_duration.clone(),
        );
        let certs_issued = Family::<ViaLabel, Counter>::default();
        registry.register(
            "gaffer_agent_certs_issued",
            "Agent certificates issued, by how (enroll, re-enroll, renew, bundle, offline-enroll)",
            certs_issued.clone(),
        );
        let server_cert_not_after = Gauge::default();
        registry.register(
            "gaffer_server_cert_not_after_seconds",
            "Expiry of the control plane's current server certificate, Unix seconds",
            server_cert_not_after.clone(),
        );
        let links_closed_revoked = Counter::default();
        registry.register(
            "gaffer_link_closed_revoked",
            "Live agent links closed because the agent was revoked",
            links_closed_revoked.clone(),
        );
        let links_closed_expired = Counter::default();
        registry.register(
            "gaffer_link_closed_cert_expired",
            "Live agent links closed because the agent's certificate expired",
            links_closed_expired.clone(),
        );
        let releases_fetched = Counter::default();
        registry.register(
            "gaffer_releases_fetched",
            "Signed release artifacts sent to agents on their links (self-update)",
            releases_fetched.clone(),
        );
        let handshakes_failed = Counter::default();
        registry.register(
            "gaffer_quic_handshakes_failed",
            "QUIC/TLS handshakes that failed for any reason (certificate refusals are also counted by reason in gaffer_link_refused)",
            handshakes_failed.clone(),
        );
        let rollout_targets = Family::<StateLabel, Gauge>::default();
        registry.register(
            "gaffer_rollout_targets",
            "Targets of the newest rollout, by state (pending, ordered, staged, restarted, healthy, failed, skipped)",
            rollout_targets.clone(),
        );
        let update_reports = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "gaffer_update_reports",
            "Update reports received from agents, by outcome (staged, healthy, failed), duplicates included",
            update_reports.clone(),
        );
        let replicas_live = Gauge::default();
        registry.register(
            "gaffer_replicas_live",
            "Control-plane replicas heartbeating in the shared store, this one included",
            replicas_live.clone(),
        );
        let replica_leader = Gauge::default();
        registry.register(
            "gaffer_replica_leader",
            "1 while this replica leads (rollout ticks, retention sweeps, dead-replica sweeps), else 0",
            replica_leader.clone(),
        );
        let handshakes_in_progress = Gauge::default();
        registry.register(
            "gaffer_quic_handshakes_in_progress",
            "QUIC handshakes accepted and not yet completed or failed (capped by --quic-handshakes-max)",
            handshakes_in_progress.clone(),
        );
        let enroll_connections_open = Gauge::default();
        registry.register(
            "gaffer_enroll_connections_open",
            "Enrollment connections open now (capped by --enroll-connections-max)",
            enroll_connections_open.clone(),
        );
        let quic_retries_sent = Counter::default();
        registry.register(
            "gaffer_quic_retries_sent",
            "QUIC Retry packets sent to clients whose address was not validated yet (--quic-retry)",
            quic_retries_sent.clone(),
        );
        let admission_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "gaffer_admission_refused",
            "Connections refused by admission control, by the cap they met (handshakes, enroll_connections)",
            admission_refused.clone(),
        );
        for reason in ["handshakes", "enroll_connections"] {
            let _ = admission_refused.get_or_create(&ReasonLabel { reason: reason.to_owned() });
        }
        let webhook_deliveries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "gaffer_webhook_deliveries",
            "Webhook and email delivery attempts, by outcome (delivered, retry, failed: given up, dropped: unsent)",
            webhook_deliveries.clone(),
        );
        for outcome in ["delivered", "retry", "failed", "dropped"] {
            let _ = webhook_deliveries.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() });
        }
        let webhook_pending = Gauge::default();
        registry.register(
            "gaffer_webhook_pending",
            "Webhook and email deliveries waiting to be sent",
            webhook_pending.clone(),
        );
        for state in crate::rollout::TARGET_STATES {
            let _ = rollout_targets.get_or_create(&StateLabel { state: state.to_owned() });
        }
        for outcome in ["staged", "healthy", "failed"] {
            let _ = update_reports.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() });
        }
        for reason in gaffer_certs::ClientCertRefusal::ALL {
            let _ = refused.get_or_create(&ReasonLabel { reason: reason.as_str().to_owned() });
        }
        let _ = refused.get_or_create(&ReasonLabel { reason: "agent_id_mismatch".to_owned() });
        Self {
            webhook_deliveries,
            webhook_pending,
            handshakes_in_progress,
            enroll_connections_open,
            quic_retries_sent,
            admission_refused,
            replicas_live,
            replica_leader,
            rollout_targets,
            update_reports,
            handshakes_failed,
            certs_issued,
            server_cert_not_after,
            links_closed_revoked,
            links_closed_expired,
            releases_fetched,
            registry,
            agents,
            jobs,
            messages,
            links_open,
            queue_depth,
            agents_book,
            render_lock: std::sync::Mutex::new(()),
            jobs_finished,
            enrollments,
            refused,
            reports_refused,
            requeued,
            job_duration,
        }
    }

    /// Counts one webhook delivery attempt or drop by `outcome` (`delivered`, `retry`, `failed`,
    /// `dropped`).
    pub fn webhook_delivery(&self, outcome: &str) {
        self.webhook_deliveries.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
    }

    /// Sets the number of pending webhook deliveries.
    pub fn set_webhook_pending(&self, pending: u64) {
        self.webhook_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Counts one agent message of `kind` (e.g. `"heartbeat"`, from `AgentMessage::kind`).
    pub fn message_received(&self, kind: &str) {
        self.messages.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    /// The replicas seen live at the last heartbeat, and whether this one leads.
    pub fn set_replicas(&self, live: usize, leader: bool) {
        self.replicas_live.set(i64::try_from(live).unwrap_or(i64::MAX));
        self.replica_leader.set(i64::from(leader));
    }

    /// The per-agent and per-GPU view `/metrics` renders ([`crate::agent_metrics`]); its live state
    /// (the fleet's links) also gives `gaffer_agent_links_open`.
    pub fn agents(&self) -> &std::sync::Arc<AgentBook> {
        &self.agents_book
    }

    /// A job reached its final `state` (`"succeeded"`, `"failed"` or `"cancelled"`).
    pub fn job_finished(&self, state: &str) {
        self.jobs_finished.get_or_create(&StateLabel { state: state.to_owned() }).inc();
    }

    /// An enrollment attempt ended with `result` (e.g. `"ok"`, `"token_expired"`).
    pub fn enrollment(&self, result: &str) {
        self.enrollments.get_or_create(&ResultLabel { result: result.to_owned() }).inc();
    }

    /// An agent link handshake was refused for `reason` (e.g. `"version"`, `"unknown_agent"`).
    pub fn handshake_refused(&self, reason: &str) {
        self.refused.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// An agent report was refused by the lease check, for `reason` (a fixed word).
    pub fn report_refused(&self, reason: &str) {
        self.reports_refused.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// An agent certificate was issued `via` `"enroll"`, `"re-enroll"`, `"renew"`, `"bundle"` or
    /// `"offline-enroll"`.
    pub fn cert_issued(&self, via: &str) {
        self.certs_issued.get_or_create(&ViaLabel { via: via.to_owned() }).inc();
    }

    /// The control plane's server certificate now expires at `not_after_unix` (seconds).
    pub fn server_cert_not_after(&self, not_after_unix: i64) {
        self.server_cert_not_after.set(not_after_unix);
    }

    /// A QUIC handshake failed (any reason).
    pub fn handshake_failed(&self) {
        self.handshakes_failed.inc();
    }

    /// A live link was closed because its agent was revoked.
    pub fn link_closed_revoked(&self) {
        self.links_closed_revoked.inc();
    }

    /// A live link was closed because its certificate expired.
    pub fn link_closed_cert_expired(&self) {
        self.links_closed_expired.inc();
    }

    /// A release artifact was sent to an agent.
    pub fn release_fetched(&self) {
        self.releases_fetched.inc();
    }

    /// An attempt ended and the job went back to the queue.
    pub fn job_requeued(&self) {
        self.requeued.inc();
    }

    /// The newest rollout has `n` targets in `state` ([`crate::rollout::TARGET_STATES`]).
    pub fn rollout_targets(&self, state: &str, n: usize) {
        self.rollout_targets
            .get_or_create(&StateLabel { state: state.to_owned() })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An agent's update report with `outcome` (`staged`, `healthy`, `failed`) was received.
    pub fn update_report(&self, outcome: &str) {
        self.update_reports.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
    }

    /// A QUIC handshake was accepted ([`crate::admission`]).
    pub fn handshake_started(&self) {
        self.handshakes_in_progress.inc();
    }

    /// An accepted QUIC handshake completed or failed.
    pub fn handshake_ended(&self) {
        self.handshakes_in_progress.dec();
    }

    /// An enrollment connection took a place.
    pub fn enroll_connection_started(&self) {
        self.enroll_connections_open.inc();
    }

    /// An enrollment connection ended.
    pub fn enroll_connection_ended(&self) {
        self.enroll_connections_open.dec();
    }

    /// A QUIC Retry was sent.
    pub fn quic_retry_sent(&self) {
        self.quic_retries_sent.inc();
    }

    /// A connection was refused over the admission cap `reason` (`handshakes`,
    /// `enroll_connections`).
    pub fn admission_refused(&self, reason: &str) {
        self.admission_refused.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Records the duration of one succeeded job of `profile`, seconds from submission.
    pub fn job_duration(&self, profile: gaffer_protocol::messages::Profile, secs: f64) {
        self.job_duration.get_or_create(&ProfileLabel { profile: profile.to_string() }).observe(secs);
    }

    /// Refreshes the store-derived gauges and encodes everything as OpenMetrics text (ending in
    /// `# EOF`). A store error is logged and leaves those gauges at their previous values.
    pub fn encode(&self, store: &dyn Store) -> String {
        // One scrape at a time: the rendered-from-state families are cleared and refilled.
        let _render = self.render_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(store);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing into a String only fails if a metric's encoder fails; nothing to retry.
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// [`Metrics::encode`] in the Prometheus text format 0.0.4 ([`PROMETHEUS_TEXT_CONTENT_TYPE`]),
    /// for clients that ask for `text/plain` (promtool, older scrapers): counter families are
    /// named with their `_total` suffix in `# HELP`/`# TYPE`, and the OpenMetrics-only `# UNIT`
    /// and `# EOF` lines are left out. Samples are the same lines.
    pub fn encode_prometheus_text(&self, store: &dyn Store) -> String {
        openmetrics_to_prometheus_text(&self.encode(store))
    }

    fn refresh(&self, store: &dyn Store) {
        // The listing's counts: an index read, not a decode of every agent record.
        match store.list_agents_page(&AgentQuery { limit: 0, ..AgentQuery::default() }) {
            Ok(page) => {
                let counts = page.counts.all;
                let online = i64::try_from(counts.get(AgentState::Online)).unwrap_or(i64::MAX);
                let total = i64::try_from(counts.total()).unwrap_or(i64::MAX);
                self.agents.get_or_create(&StateLabel { state: "connected".into() }).set(online);
                self.agents.get_or_create(&StateLabel { state: "disconnected".into() }).set(total - online);
            }
            Err(e) => tracing::error!(error = %e, "metrics: cannot count agents"),
        }
        match store.job_counts() {
            Ok(counts) => {
                for state in JobState::ALL {
                    let n = i64::try_from(counts.get(state)).unwrap_or(i64::MAX);
                    self.jobs.get_or_create(&StateLabel { state: state.as_str().into() }).set(n);
                }
            }
            Err(e) => tracing::error!(error = %e, "metrics: cannot count jobs"),
        }
        self.links_open.set(i64::try_from(self.agents_book.links_open()).unwrap_or(i64::MAX));
        match store.jobs_in_state(JobState::Queued, QUEUE_DEPTH_JOBS_MAX) {
            Ok(queued) => {
                let mut depth: std::collections::BTreeMap<(&str, &str), i64> = std::collections::BTreeMap::new();
                for job in &queued {
                    *depth.entry((job.site.as_str(), job.profile.as_str())).or_default() += 1;
                }
                // Rendered from the queue as it is now: a site whose queue emptied has no series.
                self.queue_depth.clear();
                for ((site, profile), n) in depth {
                    let labels = QueueLabels { site: site.to_owned(), profile: profile.to_owned() };
                    self.queue_depth.get_or_create(&labels).set(n);
                }
            }
            Err(e) => tracing::error!(error = %e, "metrics: cannot read the queue"),
        }
    }
}

/// Content type of [`Metrics::encode_prometheus_text`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as the `prometheus_client` encoder writes it → Prometheus text 0.0.4.
fn openmetrics_to_prometheus_text(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + counters.len() * 12);
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;

    #[test]
    fn prometheus_text_names_counters_with_total_and_has_no_eof() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let m = Metrics::new();
        m.message_received("heartbeat");
        let text = m.encode_prometheus_text(&store);
        assert!(text.contains("# TYPE gaffer_agent_messages_total counter\n"), "{text}");
        assert!(text.contains("# HELP gaffer_agent_messages_total Agent messages"), "{text}");
        assert!(text.contains("gaffer_agent_messages_total{kind=\"heartbeat\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE gaffer_agents gauge\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        Ok(())
    }

    #[test]
    fn encodes_counters_and_store_gauges() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let m = Metrics::new();
        m.message_received("heartbeat");
        m.message_received("heartbeat");
        m.job_finished("failed");
        m.enrollment("ok");
        m.handshake_refused("version");
        m.job_duration(gaffer_protocol::messages::Profile::Shots, 3.0);
        let text = m.encode(&store);
        assert!(text.contains("gaffer_agent_messages_total{kind=\"heartbeat\"} 2"), "{text}");
        // No fleet given: no link is up.
        assert!(text.contains("gaffer_agent_links_open 0"), "{text}");
        assert!(text.contains("gaffer_jobs_finished_total{state=\"failed\"} 1"), "{text}");
        assert!(text.contains("gaffer_enrollments_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("gaffer_link_refused_total{reason=\"version\"} 1"), "{text}");
        assert!(text.contains("gaffer_job_duration_seconds_count{profile=\"shots\"} 1"), "{text}");
        assert!(text.contains("gaffer_jobs{state=\"queued\"} 0"), "{text}");
        assert!(text.contains("gaffer_agents{state=\"connected\"} 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        Ok(())
    }
}
