//! Configuration files: `/etc/gaffer/control.toml` ([`DEFAULT_CONFIG_PATH`]), read by
//! `gaffer-control serve --config FILE` and `gaffer-control init --config FILE`, checked by
//! `gaffer-control validate --config FILE`.
//!
//! The file is TOML. Every setting of `serve` is a top-level key named like its flag with `-`
//! written `_`: `--heartbeat-interval-secs 5` is `heartbeat_interval_secs = 5`,
//! `--finished-job-retention 30d` is `finished_job_retention = "30d"`. `data_dir`, `quic_listen`,
//! `http_listen` and `agent_cert_ttl` are read by `init` too; the settings only `init` has
//! (`server_name`, `fleet_name`, `release_key_dir`) go in an `[init]` table. Durations are the strings the flags
//! take. A flag given on the command line overrides the file, and the file overrides the
//! defaults: [`ServeOptions::or`] then [`ServeOptions::resolve`] (and the same for
//! [`InitOptions`]), the one place where defaults apply. `installers/config/control.toml` lists
//! every key with its default.
//!
//! [`check`] reports every problem of a file at once, each with its line and column
//! ([`Problem`]), with the checker of [`gaffer_service::config_file`]: the document is parsed with
//! spans (`toml::de::DeTable`, recovering after a syntax error), every key is looked up in
//! [`SERVE_KEYS`] and [`INIT_KEYS`], and every value goes on its own through the parser and range
//! check its flag uses. Unknown keys are errors (a misspelt key
//! never quietly means "the default"); paths must be absolute (the file is read from any working
//! directory).
//!
//! Two more tables set what `serve` does about alerts: `[alerts]` ([`ALERTS_KEYS`], the thresholds
//! of [`crate::webhook::alerts`]) and `[webhooks]` ([`WEBHOOKS_KEYS`], the retry schedule of
//! [`crate::webhook`]); both have no flags, and every key has a default.
//!
//! Secrets never go in the file: the metrics bearer token is read from `metrics_token_file`,
//! passwords from `user add --password-file`, keys stay in the data directory or in files named
//! by `http_tls_key`.
//!
//! Limits: a file larger than [`CONFIG_BYTES_MAX`] is refused before it is read; at most
//! [`PROBLEMS_MAX`] problems are listed.

use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum as _;
use gaffer_service::config_file::{
    self as file, absolute_path, dash_hint, flag_integer, flag_integer_u32, integer, integer_u32, kind, nonempty,
    parsed, Bad, Doc,
};
pub use gaffer_service::config_file::{Problem, CONFIG_BYTES_MAX, PROBLEMS_MAX};
use gaffer_service::ServiceError;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::http::tls::HttpTlsMode;

/// Where the packages install the control plane's configuration file. Read only when given with
/// `--config` (or `GAFFER_CONTROL_CONFIG`).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gaffer/control.toml";

/// `lease_grace_secs`: 1 s..=1 day.
pub const LEASE_GRACE_SECS_RANGE: RangeInclusive<u64> = 1..=86_400;
/// Default of `lease_grace_secs`: 30 s.
pub const LEASE_GRACE_SECS_DEFAULT: u64 = 30;
/// `assign_timeout_secs`: 1 s..=1 day.
pub const ASSIGN_TIMEOUT_SECS_RANGE: RangeInclusive<u64> = 1..=86_400;
/// Default of `assign_timeout_secs`: 30 s.
pub const ASSIGN_TIMEOUT_SECS_DEFAULT: u64 = 30;
/// `max_attempts`: 1..=100.
pub const MAX_ATTEMPTS_RANGE: RangeInclusive<u64> = 1..=100;
/// Default of `max_attempts`: 3.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 3;
/// Default of `finished_job_retention`: 30 days.
pub const FINISHED_JOB_RETENTION_DEFAULT: Duration = Duration::from_secs(30 * 86_400);
/// `heartbeat_interval_secs`: 1 s..=1 h.
pub const HEARTBEAT_INTERVAL_SECS_RANGE: RangeInclusive<u64> = 1..=3600;
/// Default of `heartbeat_interval_secs`: 5 s.
pub const HEARTBEAT_INTERVAL_SECS_DEFAULT: u32 = 5;
/// `idle_timeout_secs`: 2 s..=10 min.
pub const IDLE_TIMEOUT_SECS_RANGE: RangeInclusive<u64> = 2..=600;
/// Default of `idle_timeout_secs`: 10 s.
pub const IDLE_TIMEOUT_SECS_DEFAULT: u64 = 10;
/// `quic_handshakes_max`: 1..=65536.
pub const QUIC_HANDSHAKES_MAX_RANGE: RangeInclusive<u64> = 1..=65_536;
/// `enroll_connections_max`: 1..=4096.
pub const ENROLL_CONNECTIONS_MAX_RANGE: RangeInclusive<u64> = 1..=4096;
/// Default of `init`'s `quic_listen`: `0.0.0.0:7443`.
pub const QUIC_LISTEN_DEFAULT: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 7443));
/// Default of `init`'s `http_listen`: `127.0.0.1:8080`.
pub const HTTP_LISTEN_DEFAULT: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8080));
/// Default of `init`'s `fleet_name`: `studio`.
pub const FLEET_NAME_DEFAULT: &str = "studio";
/// Default of `init`'s `agent_cert_ttl`: 7 days.
pub const AGENT_CERT_TTL_DEFAULT: Duration = Duration::from_secs(7 * 86_400);

/// The top-level keys of the file: the settings of `serve`, named like their flags.
pub const SERVE_KEYS: &[&str] = &[
    "data_dir",
    "agent_cert_ttl",
    "quic_listen",
    "http_listen",
    "lease_grace_secs",
    "assign_timeout_secs",
    "max_attempts",
    "finished_job_retention",
    "heartbeat_interval_secs",
    "idle_timeout_secs",
    "wire_audit_log",
    "http_tls",
    "http_tls_cert",
    "http_tls_key",
    "metrics_token_file",
    "metrics_listen",
    "quic_retry",
    "quic_handshakes_max",
    "enroll_connections_max",
];

/// The keys of the `[init]` table: the settings only `init` has.
pub const INIT_KEYS: &[&str] = &["server_name", "fleet_name", "release_key_dir"];

/// The keys of the `[alerts]` table ([`crate::webhook::alerts::AlertSettings`]), each with its
/// range: `agent_offline_secs` (default 120), `gpu_temperature_c_max` (85),
/// `gpu_memory_used_percent_max` (95), `disk_free_percent_min` (5), `outbox_depth_max` (10,000).
pub const ALERTS_KEYS: &[(&str, RangeInclusive<u64>)] = &[
    ("agent_offline_secs", 5..=86_400),
    ("gpu_temperature_c_max", 30..=150),
    ("gpu_memory_used_percent_max", 1..=100),
    ("disk_free_percent_min", 0..=99),
    ("outbox_depth_max", 1..=100_000_000),
];

/// The keys of the `[webhooks]` table ([`crate::webhook::WebhookSettings`]), each with its range:
/// `retry_initial_secs` (default 10), `retry_max_secs` (3600), `retry_for_secs` (86,400).
pub const WEBHOOKS_KEYS: &[(&str, RangeInclusive<u64>)] =
    &[("retry_initial_secs", 1..=3600), ("retry_max_secs", 1..=86_400), ("retry_for_secs", 60..=604_800)];

/// The settings of `gaffer-control serve` as one source gives them (the command line, or a
/// configuration file): `None` where that source does not set one. The field names are the
/// file's keys; the flags are the same names with `-`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ServeOptions {
    /// Data directory made by `init`. Required (as a flag or in the configuration file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Lifetime of the agent and server certificates issued from now on, e.g. 7d, 10m (at least
    /// 60s, at most 825d). Default: the one `init` wrote to config.json.
    #[arg(long, value_parser = agent_cert_ttl_text)]
    pub agent_cert_ttl: Option<Duration>,
    /// UDP address for agents (QUIC). Default: the one `init` wrote to config.json.
    #[arg(long)]
    pub quic_listen: Option<SocketAddr>,
    /// TCP address for the dashboard and API. Default: the one `init` wrote to config.json.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// How long a disconnected agent keeps its running jobs before they are requeued, seconds
    /// (1..=86400). Default: 30.
    #[arg(long, value_parser = |t: &str| flag_integer(t, &LEASE_GRACE_SECS_RANGE))]
    pub lease_grace_secs: Option<u64>,
    /// How long an agent has to accept an assignment before it is requeued, seconds
    /// (1..=86400). Default: 30.
    #[arg(long, value_parser = |t: &str| flag_integer(t, &ASSIGN_TIMEOUT_SECS_RANGE))]
    pub assign_timeout_secs: Option<u64>,
    /// Attempts (leases) a job gets before it fails for good with "gave up after N attempts"
    /// (1..=100). Default: 3.
    #[arg(long, value_parser = |t: &str| flag_integer_u32(t, &MAX_ATTEMPTS_RANGE))]
    pub max_attempts: Option<u32>,
    /// How long finished jobs (and their digests) are kept, e.g. 30d, 12h; older ones are
    /// deleted. Default: 30d.
    #[arg(long, value_parser = duration_text)]
    pub finished_job_retention: Option<Duration>,
    /// Heartbeat interval agents are told to use, seconds (1..=3600). Default: 5.
    #[arg(long, value_parser = |t: &str| flag_integer_u32(t, &HEARTBEAT_INTERVAL_SECS_RANGE))]
    pub heartbeat_interval_secs: Option<u32>,
    /// A link with no traffic for this long is considered dead, seconds (2..=600). Default: 10.
    #[arg(long, value_parser = |t: &str| flag_integer(t, &IDLE_TIMEOUT_SECS_RANGE))]
    pub idle_timeout_secs: Option<u64>,
    /// Append every frame received from agents to this file as JSON lines (audit of what leaves
    /// the boxes). Default: none.
    #[arg(long)]
    pub wire_audit_log: Option<PathBuf>,
    /// HTTPS for the dashboard and API: `on`, `off`, or `auto` (on unless the HTTP address is a
    /// loopback address). Default: auto.
    #[arg(long, value_enum)]
    pub http_tls: Option<HttpTlsMode>,
    /// Serve this certificate chain (PEM, leaf first) over HTTPS instead of the fleet's server
    /// certificate. Needs --http-tls-key. Default: the fleet's server certificate.
    #[arg(long)]
    pub http_tls_cert: Option<PathBuf>,
    /// The private key of --http-tls-cert (PEM; keep it 0600).
    #[arg(long)]
    pub http_tls_key: Option<PathBuf>,
    /// /metrics requires `Authorization: Bearer TOKEN`, TOKEN being this file's content (16-256
    /// visible characters, e.g. from `openssl rand -hex 32`). Default: no token.
    #[arg(long)]
    pub metrics_token_file: Option<PathBuf>,
    /// Serve /metrics (plain HTTP, nothing else) on this address instead of the dashboard's,
    /// e.g. an internal interface for Prometheus. Default: on the dashboard's address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Send a QUIC Retry to agents whose address is not validated yet (one extra round trip per
    /// connection; protects against spoofed-source floods): `on` or `off`. Default: on.
    #[arg(long, value_enum)]
    pub quic_retry: Option<QuicRetry>,
    /// Most QUIC handshakes in progress at once; more connections are refused and the agents back
    /// off (1..=65536). Default: 256.
    #[arg(long, value_parser = |t: &str| flag_integer(t, &QUIC_HANDSHAKES_MAX_RANGE))]
    pub quic_handshakes_max: Option<u64>,
    /// Most enrollment connections open at once; more are closed with "control plane busy,
    /// retry" (1..=4096). Default: 32.
    #[arg(long, value_parser = |t: &str| flag_integer(t, &ENROLL_CONNECTIONS_MAX_RANGE))]
    pub enroll_connections_max: Option<u64>,
}

/// `--quic-retry`: whether unvalidated client addresses get a QUIC Retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QuicRetry {
    /// Send a Retry to every address not validated yet (the default).
    #[default]
    On,
    /// Accept handshakes from unvalidated addresses at once.
    Off,
}

/// The settings `serve` uses: [`ServeOptions`] with the defaults applied. `None` where the
/// default comes from elsewhere (config.json of the data directory, or "none").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Certificate lifetime; `None`: config.json's.
    pub agent_cert_ttl: Option<Duration>,
    /// QUIC address; `None`: config.json's.
    pub quic_listen: Option<SocketAddr>,
    /// HTTP address; `None`: config.json's.
    pub http_listen: Option<SocketAddr>,
    /// Seconds a disconnected agent keeps its running jobs.
    pub lease_grace_secs: u64,
    /// Seconds an agent has to accept an assignment.
    pub assign_timeout_secs: u64,
    /// Attempts a job gets.
    pub max_attempts: u32,
    /// How long finished jobs are kept.
    pub finished_job_retention: Duration,
    /// Heartbeat interval agents are told, seconds.
    pub heartbeat_interval_secs: u32,
    /// Seconds of silence after which a link is dead.
    pub idle_timeout_secs: u64,
    /// JSON-lines audit of every received frame.
    pub wire_audit_log: Option<PathBuf>,
    /// HTTPS on, off or auto.
    pub http_tls: HttpTlsMode,
    /// The operator's HTTPS certificate chain (always with `http_tls_key`).
    pub http_tls_cert: Option<PathBuf>,
    /// Its private key.
    pub http_tls_key: Option<PathBuf>,
    /// File holding the /metrics bearer token.
    pub metrics_token_file: Option<PathBuf>,
    /// Separate /metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Admission control of the QUIC endpoint (Retry, handshake and enrollment caps).
    pub admission: crate::admission::AdmissionConfig,
}

/// The settings of `gaffer-control init` as one source gives them; `None` where it sets none.
/// In the file, `data_dir`, `quic_listen`, `http_listen` and `agent_cert_ttl` are the top-level
/// keys `serve` reads too, and `server_name`, `fleet_name` and `release_key_dir` are in the
/// `[init]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct InitOptions {
    /// Data directory to create (mode 0700). Required (as a flag or in the configuration file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// UDP address for agents (QUIC). Default: 0.0.0.0:7443.
    #[arg(long)]
    pub quic_listen: Option<SocketAddr>,
    /// TCP address for the dashboard and API. Default: 127.0.0.1:8080.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// DNS name or IP address agents use to reach this control plane (repeatable). These become
    /// the server certificate's SANs. Default: localhost, 127.0.0.1 and this host's name.
    #[arg(long)]
    pub server_name: Option<Vec<String>>,
    /// Display name of the fleet (in the CA's name). Default: studio.
    #[arg(long)]
    pub fleet_name: Option<String>,
    /// Lifetime of agent certificates (and of this control plane's server certificate), e.g. 7d,
    /// 12h, 10m; at least 60s, at most 825d. Agents renew online at half of it. Default: 7d.
    #[arg(long, value_parser = agent_cert_ttl_text)]
    pub agent_cert_ttl: Option<Duration>,
    /// Directory of the release key (`gaffer-control release keygen --out DIR`): the pair for a
    /// small studio that signs here, or only release.pub when releases are signed offline. It may
    /// be empty yet. Agents pin its public key. Default: none.
    #[arg(long)]
    pub release_key_dir: Option<PathBuf>,
}

/// The settings `init` uses: [`InitOptions`] with the defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSettings {
    /// Data directory to create.
    pub data_dir: PathBuf,
    /// QUIC address written to config.json.
    pub quic_listen: SocketAddr,
    /// HTTP address written to config.json.
    pub http_listen: SocketAddr,
    /// Server certificate names; empty: localhost, 127.0.0.1 and this host's name.
    pub server_name: Vec<String>,
    /// Fleet name.
    pub fleet_name: String,
    /// Certificate lifetime.
    pub agent_cert_ttl: Duration,
    /// Release key directory to record; None records none.
    pub release_key_dir: Option<PathBuf>,
}

/// What a configuration file sets, for each command that reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlFile {
    /// The settings of `serve` (the top-level keys).
    pub serve: ServeOptions,
    /// The settings of `init` (the top-level keys it shares with `serve`, and `[init]`).
    pub init: InitOptions,
    /// `[alerts]`, defaults where unset.
    pub alerts: crate::webhook::alerts::AlertSettings,
    /// `[webhooks]`, defaults where unset.
    pub webhooks: crate::webhook::WebhookSettings,
}

impl ServeOptions {
    /// These options, with the settings they leave unset taken from `fallback` (the flags `or`
    /// the file).
    pub fn or(self, fallback: ServeOptions) -> ServeOptions {
        ServeOptions {
            data_dir: self.data_dir.or(fallback.data_dir),
            agent_cert_ttl: self.agent_cert_ttl.or(fallback.agent_cert_ttl),
            quic_listen: self.quic_listen.or(fallback.quic_listen),
            http_listen: self.http_listen.or(fallback.http_listen),
            lease_grace_secs: self.lease_grace_secs.or(fallback.lease_grace_secs),
            assign_timeout_secs: self.assign_timeout_secs.or(fallback.assign_timeout_secs),
            max_attempts: self.max_attempts.or(fallback.max_attempts),
            finished_job_retention: self.finished_job_retention.or(fallback.finished_job_retention),
            heartbeat_interval_secs: self.heartbeat_interval_secs.or(fallback.heartbeat_interval_secs),
            idle_timeout_secs: self.idle_timeout_secs.or(fallback.idle_timeout_secs),
            wire_audit_log: self.wire_audit_log.or(fallback.wire_audit_log),
            http_tls: self.http_tls.or(fallback.http_tls),
            http_tls_cert: self.http_tls_cert.or(fallback.http_tls_cert),
            http_tls_key: self.http_tls_key.or(fallback.http_tls_key),
            metrics_token_file: self.metrics_token_file.or(fallback.metrics_token_file),
            metrics_listen: self.metrics_listen.or(fallback.metrics_listen),
            quic_retry: self.quic_retry.or(fallback.quic_retry),
            quic_handshakes_max: self.quic_handshakes_max.or(fallback.quic_handshakes_max),
            enroll_connections_max: self.enroll_connections_max.or(fallback.enroll_connections_max),
        }
    }

    /// The settings with the defaults applied where nothing is set.
    ///
    /// # Errors
    /// [`ServiceError::MissingSetting`] without a data directory; [`ServiceError::SettingNeeds`] for an HTTPS
    /// certificate without its key or a key without its certificate.
    pub fn resolve(self) -> Result<ServeSettings, ServiceError> {
        match (&self.http_tls_cert, &self.http_tls_key) {
            (Some(_), None) => {
                return Err(ServiceError::SettingNeeds {
                    flag: "--http-tls-cert",
                    needs: "--http-tls-key",
                    needs_key: "http_tls_key",
                })
            }
            (None, Some(_)) => {
                return Err(ServiceError::SettingNeeds {
                    flag: "--http-tls-key",
                    needs: "--http-tls-cert",
                    needs_key: "http_tls_cert",
                })
            }
            _ => {}
        }
        Ok(ServeSettings {
            data_dir: self.data_dir.ok_or(ServiceError::MissingSetting { flag: "--data-dir", key: "data_dir" })?,
            agent_cert_ttl: self.agent_cert_ttl,
            quic_listen: self.quic_listen,
            http_listen: self.http_listen,
            lease_grace_secs: self.lease_grace_secs.unwrap_or(LEASE_GRACE_SECS_DEFAULT),
            assign_timeout_secs: self.assign_timeout_secs.unwrap_or(ASSIGN_TIMEOUT_SECS_DEFAULT),
            max_attempts: self.max_attempts.unwrap_or(MAX_ATTEMPTS_DEFAULT),
            finished_job_retention: self.finished_job_retention.unwrap_or(FINISHED_JOB_RETENTION_DEFAULT),
            heartbeat_interval_secs: self.heartbeat_interval_secs.unwrap_or(HEARTBEAT_INTERVAL_SECS_DEFAULT),
            idle_timeout_secs: self.idle_timeout_secs.unwrap_or(IDLE_TIMEOUT_SECS_DEFAULT),
            wire_audit_log: self.wire_audit_log,
            http_tls: self.http_tls.unwrap_or_default(),
            http_tls_cert: self.http_tls_cert,
            http_tls_key: self.http_tls_key,
            metrics_token_file: self.metrics_token_file,
            metrics_listen: self.metrics_listen,
            admission: crate::admission::AdmissionConfig {
                quic_retry: self.quic_retry.unwrap_or_default() == QuicRetry::On,
                handshakes_max: self
                    .quic_handshakes_max
                    .map_or(crate::admission::HANDSHAKES_MAX_DEFAULT, |n| usize::try_from(n).unwrap_or(usize::MAX)),
                enroll_connections_max: self
                    .enroll_connections_max
                    .map_or(crate::admission::ENROLL_CONNECTIONS_MAX_DEFAULT, |n| {
                        usize::try_from(n).unwrap_or(usize::MAX)
                    }),
            },
        })
    }
}

impl InitOptions {
    /// These options, with the settings they leave unset taken from `fallback`.
    pub fn or(self, fallback: InitOptions) -> InitOptions {
        InitOptions {
            data_dir: self.data_dir.or(fallback.data_dir),
            quic_listen: self.quic_listen.or(fallback.quic_listen),
            http_listen: self.http_listen.or(fallback.http_listen),
            server_name: self.server_name.or(fallback.server_name),
            fleet_name: self.fleet_name.or(fallback.fleet_name),
            agent_cert_ttl: self.agent_cert_ttl.or(fallback.agent_cert_ttl),
            release_key_dir: self.release_key_dir.or(fallback.release_key_dir),
        }
    }

    /// The settings with the defaults applied where nothing is set.
    ///
    /// # Errors
    /// [`ServiceError::MissingSetting`] without a data directory.
    pub fn resolve(self) -> Result<InitSettings, ServiceError> {
        Ok(InitSettings {
            data_dir: self.data_dir.ok_or(ServiceError::MissingSetting { flag: "--data-dir", key: "data_dir" })?,
            quic_listen: self.quic_listen.unwrap_or(QUIC_LISTEN_DEFAULT),
            http_listen: self.http_listen.unwrap_or(HTTP_LISTEN_DEFAULT),
            server_name: self.server_name.unwrap_or_default(),
            fleet_name: self.fleet_name.unwrap_or_else(|| FLEET_NAME_DEFAULT.to_owned()),
            agent_cert_ttl: self.agent_cert_ttl.unwrap_or(AGENT_CERT_TTL_DEFAULT),
            release_key_dir: self.release_key_dir,
        })
    }
}

impl ServeSettings {
    /// The settings as a configuration file that [`check`] reads back to the same settings (what
    /// `serve --print-config` prints). Settings that are not set are left out, with a comment
    /// saying where their value comes from.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        let mut notes = String::new();
        let text = |s: String| toml::Value::String(s);
        let path = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned());
        let mut optional = |table: &mut toml::Table, key: &str, value: Option<toml::Value>, otherwise: &str| {
            if let Some(v) = value {
                table.insert(key.into(), v);
            } else {
                notes.push_str(&format!("# {key}: not set: {otherwise}\n"));
            }
        };
        table.insert("data_dir".into(), path(&self.data_dir));
        let ttl = self.agent_cert_ttl.map(|d| text(humantime::format_duration(d).to_string()));
        optional(&mut table, "agent_cert_ttl", ttl, "the one in config.json of the data directory");
        let quic = self.quic_listen.map(|a| text(a.to_string()));
        optional(&mut table, "quic_listen", quic, "the one in config.json of the data directory");
        let http = self.http_listen.map(|a| text(a.to_string()));
        optional(&mut table, "http_listen", http, "the one in config.json of the data directory");
        let int = |n: u64| i64::try_from(n).map_or_else(|_| text(n.to_string()), toml::Value::Integer);
        table.insert("lease_grace_secs".into(), int(self.lease_grace_secs));
        table.insert("assign_timeout_secs".into(), int(self.assign_timeout_secs));
        table.insert("max_attempts".into(), int(self.max_attempts.into()));
        table.insert(
            "finished_job_retention".into(),
            text(humantime::format_duration(self.finished_job_retention).to_string()),
        );
        table.insert("heartbeat_interval_secs".into(), int(self.heartbeat_interval_secs.into()));
        table.insert("idle_timeout_secs".into(), int(self.idle_timeout_secs));
        optional(&mut table, "wire_audit_log", self.wire_audit_log.as_deref().map(path), "no wire audit log");
        let tls = self.http_tls.to_possible_value().map_or_else(|| "auto".to_owned(), |v| v.get_name().to_owned());
        table.insert("http_tls".into(), text(tls));
        let cert = self.http_tls_cert.as_deref().map(path);
        optional(&mut table, "http_tls_cert", cert, "HTTPS serves the fleet's server certificate");
        optional(&mut table, "http_tls_key", self.http_tls_key.as_deref().map(path), "with http_tls_cert");
        let token = self.metrics_token_file.as_deref().map(path);
        optional(&mut table, "metrics_token_file", token, "/metrics needs no token");
        let metrics = self.metrics_listen.map(|a| text(a.to_string()));
        optional(&mut table, "metrics_listen", metrics, "/metrics is on the dashboard's address");
        let retry = if self.admission.quic_retry { "on" } else { "off" };
        table.insert("quic_retry".into(), text(retry.to_owned()));
        table.insert("quic_handshakes_max".into(), int(self.admission.handshakes_max as u64));
        table.insert("enroll_connections_max".into(), int(self.admission.enroll_connections_max as u64));
        format!("{table}{notes}")
    }
}

/// `--agent-cert-ttl`: a duration within the certificate lifetimes the CA issues (60 s..=825 d).
fn agent_cert_ttl_text(text: &str) -> Result<Duration, String> {
    let d = duration_text(text)?;
    crate::identity::check_ttl(d.as_secs()).map_err(|_| {
        format!(
            "{text:?} is outside {} s..={} days",
            gaffer_certs::AGENT_CERT_VALIDITY_SECS_MIN,
            gaffer_certs::AGENT_CERT_VALIDITY_SECS_MAX / 86_400
        )
    })?;
    Ok(d)
}

/// A duration as `humantime` reads it: `30d`, `12h`, `10m`, `1h 30m`.
fn duration_text(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}): use e.g. 30d, 12h, 10m, 90s"))
}

/// Reads the configuration file at `path` and checks it with [`check`] (`validate` runs
/// [`file::validate`] with it).
///
/// # Errors
/// [`ServiceError::ConfigFile`] with every problem; the file is read only up to [`CONFIG_BYTES_MAX`].
pub fn load(path: &Path) -> Result<ControlFile, ServiceError> {
    file::load(path, "gaffer-control", check)
}

/// Checks a configuration file's text and gives what it sets for `serve` and `init`.
///
/// # Errors
/// Every problem found, in file order (at most [`PROBLEMS_MAX`], the last one then counting the
/// rest): syntax errors, unknown keys (with a hint when the key is a flag's spelling, in the wrong
/// place, or a secret), values of the wrong type, values the key's flag would refuse (same parser,
/// same range), and an HTTPS certificate without its key (or the other way round). Values a
/// syntax error damaged are not checked further.
pub fn check(text: &str) -> Result<ControlFile, Vec<Problem>> {
    let (mut doc, root) = Doc::parse(text);
    let mut file = ControlFile::default();
    let mut tls_pair: [Option<Range<usize>>; 2] = [None, None];
    for (key, value) in root.get_ref() {
        let name = key.get_ref().as_ref();
        if name == "alerts" || name == "webhooks" {
            match value.get_ref() {
                DeValue::Table(t) => check_number_table(&mut doc, &mut file, name, t),
                other => {
                    doc.report(value.span(), Some(name), format!("expected a table ([{name}]); found {}", kind(other)))
                }
            }
            continue;
        }
        if name == "init" {
            match value.get_ref() {
                DeValue::Table(init) => check_init_table(&mut doc, &mut file.init, init),
                other => doc.report(
                    value.span(),
                    Some(name),
                    format!("expected a table ([init] with {}); found {}", INIT_KEYS.join(", "), kind(other)),
                ),
            }
            continue;
        }
        if !SERVE_KEYS.contains(&name) {
            doc.report(key.span(), Some(name), unknown_key(name, false));
            continue;
        }
        if doc.is_damaged(&value.span()) {
            continue;
        }
        match name {
            "http_tls_cert" => tls_pair[0] = Some(key.span()),
            "http_tls_key" => tls_pair[1] = Some(key.span()),
            _ => {}
        }
        if let Err(bad) = apply_serve_key(&mut file, name, value) {
            doc.report(bad.span, Some(name), bad.message);
        }
    }
    match tls_pair {
        [Some(span), None] => {
            doc.report(span, Some("http_tls_cert"), "needs `http_tls_key` too (the certificate's private key)".into())
        }
        [None, Some(span)] => {
            doc.report(span, Some("http_tls_key"), "needs `http_tls_cert` too (the key's certificate chain)".into())
        }
        _ => {}
    }
    doc.finish().map(|()| file)
}

/// `[alerts]` or `[webhooks]` (`table`): whole numbers in their ranges.
fn check_number_table(doc: &mut Doc<'_>, file: &mut ControlFile, table: &str, t: &DeTable<'_>) {
    let keys = if table == "alerts" { ALERTS_KEYS } else { WEBHOOKS_KEYS };
    for (key, value) in t {
        let name = key.get_ref().as_ref();
        let dotted = format!("{table}.{name}");
        let Some((_, range)) = keys.iter().find(|(k, _)| *k == name) else {
            let known = keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");
            doc.report(key.span(), Some(&dotted), format!("unknown key (the keys of [{table}] are: {known})"));
            continue;
        };
        if doc.is_damaged(&value.span()) {
            continue;
        }
        match integer(value, range) {
            Ok(n) => {
                let (a, w) = (&mut file.alerts, &mut file.webhooks);
                match name {
                    "agent_offline_secs" => a.agent_offline_secs = n,
                    "gpu_temperature_c_max" => a.gpu_temperature_c_max = n,
                    "gpu_memory_used_percent_max" => a.gpu_memory_used_percent_max = n,
                    "disk_free_percent_min" => a.disk_free_percent_min = n,
                    "outbox_depth_max" => a.outbox_depth_max = n,
                    "retry_initial_secs" => w.retry_initial_secs = n,
                    "retry_max_secs" => w.retry_max_secs = n,
                    _ => w.retry_for_secs = n,
                }
            }
            Err(bad) => doc.report(bad.span, Some(&dotted), bad.message),
        }
    }
}

fn check_init_table(doc: &mut Doc<'_>, init: &mut InitOptions, table: &DeTable<'_>) {
    for (key, value) in table {
        let name = key.get_ref().as_ref();
        let dotted = format!("init.{name}");
        if !INIT_KEYS.contains(&name) {
            doc.report(key.span(), Some(&dotted), unknown_key(name, true));
            continue;
        }
        if doc.is_damaged(&value.span()) {
            continue;
        }
        let applied = match name {
            "server_name" => names(value).map(|v| init.server_name = Some(v)),
            "fleet_name" => nonempty(value, "\"studio\"").map(|v| init.fleet_name = Some(v.to_owned())),
            "release_key_dir" => path(value).map(|v| init.release_key_dir = Some(v)),
            _ => Ok(()),
        };
        if let Err(bad) = applied {
            doc.report(bad.span, Some(&dotted), bad.message);
        }
    }
}

/// Sets the top-level `key` (one of [`SERVE_KEYS`]) from `value`; the keys `init` shares are set
/// for it too.
fn apply_serve_key(file: &mut ControlFile, key: &str, value: &Spanned<DeValue<'_>>) -> Result<(), Bad> {
    let (s, i) = (&mut file.serve, &mut file.init);
    match key {
        "data_dir" => {
            let p = path(value)?;
            i.data_dir = Some(p.clone());
            s.data_dir = Some(p);
        }
        "agent_cert_ttl" => {
            let d = parsed(value, "\"7d\"", agent_cert_ttl_text)?;
            (s.agent_cert_ttl, i.agent_cert_ttl) = (Some(d), Some(d));
        }
        "quic_listen" => {
            let a = address(value, "\"0.0.0.0:7443\"")?;
            (s.quic_listen, i.quic_listen) = (Some(a), Some(a));
        }
        "http_listen" => {
            let a = address(value, "\"127.0.0.1:8080\"")?;
            (s.http_listen, i.http_listen) = (Some(a), Some(a));
        }
        "lease_grace_secs" => s.lease_grace_secs = Some(integer(value, &LEASE_GRACE_SECS_RANGE)?),
        "assign_timeout_secs" => s.assign_timeout_secs = Some(integer(value, &ASSIGN_TIMEOUT_SECS_RANGE)?),
        "max_attempts" => {
            s.max_attempts = Some(integer_u32(value, &MAX_ATTEMPTS_RANGE)?);
        }
        "finished_job_retention" => s.finished_job_retention = Some(parsed(value, "\"30d\"", duration_text)?),
        "heartbeat_interval_secs" => {
            s.heartbeat_interval_secs = Some(integer_u32(value, &HEARTBEAT_INTERVAL_SECS_RANGE)?);
        }
        "idle_timeout_secs" => s.idle_timeout_secs = Some(integer(value, &IDLE_TIMEOUT_SECS_RANGE)?),
        "wire_audit_log" => s.wire_audit_log = Some(path(value)?),
        "http_tls" => {
            s.http_tls = Some(parsed(value, "\"auto\"", |t| {
                HttpTlsMode::from_str(t, false).map_err(|_| format!("{t:?} is not one of on, off, auto"))
            })?)
        }
        "http_tls_cert" => s.http_tls_cert = Some(path(value)?),
        "http_tls_key" => s.http_tls_key = Some(path(value)?),
        "metrics_token_file" => s.metrics_token_file = Some(path(value)?),
        "metrics_listen" => s.metrics_listen = Some(address(value, "\"10.0.0.5:9090\"")?),
        "quic_retry" => {
            s.quic_retry = Some(parsed(value, "\"on\"", |t| {
                QuicRetry::from_str(t, false).map_err(|_| format!("{t:?} is not one of on, off"))
            })?)
        }
        "quic_handshakes_max" => s.quic_handshakes_max = Some(integer(value, &QUIC_HANDSHAKES_MAX_RANGE)?),
        "enroll_connections_max" => s.enroll_connections_max = Some(integer(value, &ENROLL_CONNECTIONS_MAX_RANGE)?),
        _ => {}
    }
    Ok(())
}

/// An `IP:PORT` address, read as the flag reads it.
fn address(value: &Spanned<DeValue<'_>>, example: &str) -> Result<SocketAddr, Bad> {
    parsed(value, example, |t| {
        t.parse::<SocketAddr>().map_err(|e| format!("{t:?} is not an IP:PORT address ({e}); write e.g. {example}"))
    })
}

/// The message for an unknown key (`in_init`: inside `[init]`), with a hint where one helps.
fn unknown_key(key: &str, in_init: bool) -> String {
    let known = |k: &str| if in_init { INIT_KEYS.contains(&k) } else { SERVE_KEYS.contains(&k) };
    if let Some(hint) = dash_hint(key, known) {
        return hint;
    }
    let underscored = key.replace('-', "_");
    if !in_init && INIT_KEYS.contains(&underscored.as_str()) {
        return format!("unknown key here: `{underscored}` is read by `init` only; put it in the [init] table");
    }
    if in_init && SERVE_KEYS.contains(&underscored.as_str()) {
        return format!(
            "unknown key in [init]: `{underscored}` is a top-level key (serve and init read it); put it at the top \
             of the file, before [init]"
        );
    }
    let lower = key.to_ascii_lowercase();
    if lower.contains("token") {
        return "unknown key: secrets never go in this file; put the /metrics token in a file readable only by \
                gaffer-control and set `metrics_token_file`"
            .into();
    }
    if ["password", "secret", "private_key"].iter().any(|s| lower.contains(s)) {
        return "unknown key: secrets never go in this file; passwords are set with `gaffer-control user passwd`, \
                keys stay in the data directory or in the file `http_tls_key` names"
            .into();
    }
    if !in_init && key == "serve" {
        return "unknown key: the settings of `gaffer-control serve` go at the top of the file, not in a [serve] table"
            .into();
    }
    if in_init {
        format!("unknown key (the keys of [init] are: {})", INIT_KEYS.join(", "))
    } else {
        format!("unknown key (the keys are: {}, and the [init] table)", SERVE_KEYS.join(", "))
    }
}

/// An absolute path.
fn path(value: &Spanned<DeValue<'_>>) -> Result<PathBuf, Bad> {
    absolute_path(value, "\"/var/lib/gaffer-control\"")
}

/// An array of non-empty strings (server names); a bad element is reported where it is.
fn names(value: &Spanned<DeValue<'_>>) -> Result<Vec<String>, Bad> {
    match value.get_ref() {
        DeValue::Array(items) => {
            items.iter().map(|v| nonempty(v, "\"gaffer.studio.lan\"").map(str::to_owned)).collect()
        }
        other => Err(Bad::at(
            value,
            format!("expected an array of names, e.g. [\"gaffer.studio.lan\", \"10.0.0.5\"]; found {}", kind(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_accepted_with_a_good_value() {
        let good = [
            ("data_dir", "\"/d\""),
            ("agent_cert_ttl", "\"12h\""),
            ("quic_listen", "\"127.0.0.1:7443\""),
            ("http_listen", "\"[::1]:8080\""),
            ("lease_grace_secs", "60"),
            ("assign_timeout_secs", "5"),
            ("max_attempts", "100"),
            ("finished_job_retention", "\"12h\""),
            ("heartbeat_interval_secs", "3600"),
            ("idle_timeout_secs", "2"),
            ("wire_audit_log", "\"/w.jsonl\""),
            ("http_tls", "\"off\""),
            ("http_tls_cert", "\"/c.pem\"\nhttp_tls_key = \"/k.pem\""),
            ("http_tls_key", "\"/k.pem\"\nhttp_tls_cert = \"/c.pem\""),
            ("metrics_token_file", "\"/t\""),
            ("metrics_listen", "\"10.0.0.5:9090\""),
            ("quic_retry", "\"off\""),
            ("quic_handshakes_max", "1000"),
            ("enroll_connections_max", "8"),
        ];
        assert_eq!(good.map(|(k, _)| k).as_slice(), SERVE_KEYS);
        for (key, value) in good {
            let file = check(&format!("{key} = {value}\n")).unwrap_or_else(|p| panic!("{key}: {p:?}"));
            assert_ne!(file.serve, ServeOptions::default(), "{key} set nothing");
        }
        let file =
            check("[init]\nserver_name = [\"a\"]\nfleet_name = \"f\"\nrelease_key_dir = \"/k\"\n").expect("init keys");
        assert_eq!(file.init.server_name, Some(vec!["a".to_owned()]));
        assert_eq!(file.init.fleet_name.as_deref(), Some("f"));
        assert_eq!(file.init.release_key_dir, Some(PathBuf::from("/k")));
    }

    #[test]
    fn printed_settings_read_back_the_same() {
        let settings = ServeSettings {
            data_dir: "/var/lib/gaffer-control".into(),
            agent_cert_ttl: Some(Duration::from_secs(36 * 3600 + 5)),
            quic_listen: Some("[::]:7443".parse().expect("addr")),
            http_listen: None,
            lease_grace_secs: 1,
            assign_timeout_secs: 86_400,
            max_attempts: 7,
            finished_job_retention: Duration::from_millis(1500),
            heartbeat_interval_secs: 9,
            idle_timeout_secs: 600,
            wire_audit_log: Some("/var/log/wire.jsonl".into()),
            http_tls: HttpTlsMode::On,
            http_tls_cert: Some("/etc/ssl/c.pem".into()),
            http_tls_key: Some("/etc/ssl/k.pem".into()),
            metrics_token_file: None,
            metrics_listen: Some("10.1.2.3:9100".parse().expect("addr")),
            admission: crate::admission::AdmissionConfig {
                quic_retry: false,
                handshakes_max: 1000,
                enroll_connections_max: 4,
            },
        };
        let text = settings.to_toml();
        let back = check(&text).unwrap_or_else(|p| panic!("{p:?}\n{text}")).serve.resolve().map_err(|e| e.to_string());
        assert_eq!(back, Ok(settings), "{text}");
    }
}
