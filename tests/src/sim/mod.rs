//! `gaffer-sim`: a fleet of simulated agents in one process against a real `gaffer-control serve`,
//! and the measurements of issue 10 (connect time, heartbeat load, dispatch latency, API and
//! dashboard latency, control-plane memory and CPU).
//!
//! Every simulated agent is real where the control plane can tell: its own key (made here, only the
//! CSR crosses) and certificate from its own one-time token through the agent's enrollment code
//! ([`fleet`]), the agent's session state machine over real QUIC with mTLS (ALPN and TLS as the
//! agent builds them), heartbeats at the interval the Welcome asks for, job reports through an
//! outbox with real sequence numbers and acknowledgements ([`agent`]). Only the work is fake: a job
//! finishes after `--job-delay-ms` with a synthetic, schema-valid digest ([`synth`]).
//!
//! A run, in order:
//! 1. reads `CONTROL_DIR/serve.json` (the serve process's pid, HTTP address, CA fingerprint);
//! 2. through the admin socket `CONTROL_DIR/control.sock`, mints an operator API token and adds a
//!    viewer user for the dashboard (both named `gaffer-sim-PID-MS`, removed at the end);
//! 3. enrolls (or reuses from `--state-dir`) the agents, 64 at a time by default;
//! 4. starts every agent at once (or spread over `--connect-spread-secs`) and records
//!    `connect_all_secs`, from the start until every agent has been welcomed; an agent whose
//!    attempt fails or times out backs off as the agent does;
//! 5. submits jobs for `--duration-secs` ([`load`]) while a sampler times `GET /api/v1/agents` and
//!    the fleet page every 500 ms, then waits (at most `--drain-secs`) for every submitted job;
//! 6. reports, and exits non-zero when fewer agents were connected than asked, a submission failed,
//!    or a submitted job did not succeed, saying which.
//!
//! **What the latencies mean.** Each is measured from the instant the job's POST was sent.
//! *Assign*: until a simulated agent received the Assign frame. *Finish*: until the agent received
//! the control plane's Ack of the job's Digest, which the control plane sends only after the digest
//! and the job's `succeeded` state are committed and fsynced, so it is the moment the job is
//! durably done, as its agent learns it (not a poll of the API).
//!
//! **Cost per simulated agent**, so 10,000 fit in one process on two cores: one tokio task plus a
//! writer task while connected (no thread per agent), no read buffer (`read_chunk`), a QUIC client
//! endpoint (one UDP socket) per `--agents-per-socket` agents (500) carrying many identities through
//! `Endpoint::connect_with`, and a few small maps. Each endpoint's socket asks for 4 MiB buffers:
//! the handshake flights of hundreds of connections at once overflow the default 208 KiB, and the
//! drops would count against the control plane (the report gives both sides' UDP drops). File
//! descriptors: one per endpoint, one per HTTP client (at most 256 by default) and up to
//! `--enroll-concurrency` enrollment sockets, below the usual 1024 limit, so the simulator does not
//! raise `RLIMIT_NOFILE`.

pub mod agent;
pub mod fleet;
pub mod load;
pub mod stats;
pub mod synth;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gaffer_control::admin::{AdminRequest, AdminResponse};
use gaffer_control::store::Role;
use serde::Serialize;

use self::stats::{percentile, Stats};

/// `gaffer-sim`'s command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "gaffer-sim",
    version,
    about = "Simulate a fleet of Gaffer agents against a running control plane and measure it",
    long_about = "Enrolls N simulated agents (each with its own one-time token, key and certificate) into a running \
                  `gaffer-control serve`, connects them over real QUIC with mTLS, submits jobs through the REST API \
                  and measures connect time, dispatch latency, heartbeat load, API and dashboard latency, and the \
                  control plane's memory and CPU. Run it as the user that owns CONTROL_DIR (it uses the admin socket)."
)]
pub struct Args {
    /// The control plane's data directory (its admin socket and serve.json are used).
    #[arg(long, value_name = "CONTROL_DIR")]
    pub data_dir: PathBuf,
    /// The control plane's QUIC address the agents connect to, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub control: String,
    /// Simulated agents.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub agents: u32,
    /// How long to submit jobs, seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration_secs: u64,
    /// Jobs submitted per second, evenly paced (open loop); 0: as fast as the API accepts them
    /// with --submitters concurrent clients.
    #[arg(long, default_value_t = 10.0, value_parser = parse_rate)]
    pub jobs_per_sec: f64,
    /// Stop submitting after this many jobs; the run then ends when all of them finished (or
    /// --drain-secs after submitting stopped).
    #[arg(long, value_name = "M")]
    pub jobs_total: Option<usize>,
    /// Concurrent HTTP clients submitting jobs. Default: 16 unpaced; paced, one per 4 jobs per
    /// second (16 to 256), so a POST may take 250 ms on average before the pacing falls behind
    /// (`submit_lag_ms_p99` says when it did).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub submitters: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Site of the simulated agents and the jobs.
    #[arg(long, default_value = "sim")]
    pub site: String,
    /// Job slots per simulated agent.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: u32,
    /// How long a simulated job runs before its digest is sent, milliseconds.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub job_delay_ms: u64,
    /// Profile of the submitted jobs (shots or full; simulated agents claim every model).
    #[arg(long, default_value = "shots", value_parser = ["shots", "full"])]
    pub profile: String,
    /// Seed of every random draw (health, digests); the same seed describes the same fleet.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the agents' identities here and reuse them in later runs against the same control
    /// plane (else a temporary directory, removed at exit).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Enrollments in flight at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub enroll_concurrency: u32,
    /// Simulated agents per QUIC client endpoint (UDP socket).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub agents_per_socket: u32,
    /// Spread the agents' first connection attempts uniformly over this many seconds (0: all at
    /// once, the harshest start; `connect_all_secs` counts from the start either way).
    #[arg(long, default_value_t = 0.0, value_parser = parse_spread)]
    pub connect_spread_secs: f64,
    /// How long all agents may take to be welcomed before the load starts anyway, seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub connect_timeout_secs: u64,
    /// After submitting stops, how long to wait for outstanding jobs, seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_secs: u64,
    /// Pid of the serve process, for its RSS and CPU (default: the pid in CONTROL_DIR/serve.json).
    #[arg(long, value_name = "PID")]
    pub control_pid: Option<u32>,
}

impl Args {
    /// The submitters to run: `--submitters`, else its default for the pacing.
    pub fn submitters(&self) -> usize {
        match self.submitters {
            Some(n) => n as usize,
            None if self.jobs_per_sec > 0.0 => {
                ((self.jobs_per_sec / 4.0).ceil() as usize).clamp(SUBMITTERS_DEFAULT, PACED_SUBMITTERS_MAX)
            }
            None => SUBMITTERS_DEFAULT,
        }
    }
}

/// Default `--submitters` for unpaced runs, and the least for paced ones.
pub const SUBMITTERS_DEFAULT: usize = 16;
/// The most submitters a paced run starts by default.
pub const PACED_SUBMITTERS_MAX: usize = 256;
/// Receive and send buffer asked for on each simulated agents' UDP socket, bytes (the kernel caps
/// it at `net.core.rmem_max` / `wmem_max`): the handshake flights of hundreds of connections at
/// once overflow the default 208 KiB, and a dropped packet waits for QUIC's retransmit timer.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

fn parse_spread(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds between 0 and 3600")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && (0.0..=1_000_000.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0 and 1000000 jobs per second")),
    }
}

/// The result of a run: `--json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Simulated agents asked for.
    pub agents: usize,
    /// Agents connected (welcomed, link up) when the load ended.
    pub agents_connected: usize,
    /// Agents welcomed at least once.
    pub agents_welcomed: usize,
    /// First connection attempt → every agent welcomed, seconds (None: not all were).
    pub connect_all_secs: Option<f64>,
    /// First connection attempt → an agent's first welcome, p50 over the agents, seconds.
    pub connect_secs_p50: Option<f64>,
    /// The same, p99.
    pub connect_secs_p99: Option<f64>,
    /// Welcomes beyond each agent's first (reconnects).
    pub reconnects: u64,
    /// Connection attempts that failed and connections that were lost (each followed by the
    /// agent's back-off).
    pub link_failures: u64,
    /// Datagrams the kernel dropped on the control plane's UDP socket (full receive buffer)
    /// during the run (from /proc/net/udp; None when it is not visible here).
    pub control_udp_drops: Option<u64>,
    /// Datagrams the kernel dropped on the simulator's UDP sockets during the run.
    pub sim_udp_drops: Option<u64>,
    /// Enrollment phase, seconds.
    pub enroll_secs: f64,
    /// Agents enrolled by this run.
    pub agents_enrolled: usize,
    /// Agents reused from `--state-dir`.
    pub agents_reused: usize,
    /// The serve process's pid (None: unknown).
    pub control_pid: Option<u32>,
    /// Its resident memory at the end of the load, bytes.
    pub control_rss_bytes: Option<u64>,
    /// Its largest resident memory seen by the sampler, bytes.
    pub control_rss_bytes_max: Option<u64>,
    /// Its CPU over the load window, cores (CPU seconds / wall seconds).
    pub control_cpu_cores: Option<f64>,
    /// This simulator's resident memory at the end, bytes.
    pub sim_rss_bytes: Option<u64>,
    /// This simulator's CPU over the load window, cores.
    pub sim_cpu_cores: Option<f64>,
    /// The heartbeat interval the control plane asked for, seconds.
    pub heartbeat_interval_secs: u32,
    /// Heartbeats sent per second over the load window.
    pub heartbeats_per_sec: f64,
    /// Jobs per second asked for (0: unpaced).
    pub jobs_per_sec_target: f64,
    /// Jobs the API accepted (201).
    pub jobs_submitted: usize,
    /// Of those, jobs whose digest the control plane acknowledged.
    pub jobs_succeeded: usize,
    /// Submitted jobs that did not succeed.
    pub jobs_unfinished: usize,
    /// POSTs not answered with 201.
    pub submit_errors: usize,
    /// Jobs succeeded / (first submit → last acknowledged digest), per second.
    pub jobs_per_sec: f64,
    /// Submit → Assign received by a sim agent, p50, milliseconds.
    pub assign_latency_ms_p50: Option<f64>,
    /// Submit → Assign received by a sim agent, p99, milliseconds.
    pub assign_latency_ms_p99: Option<f64>,
    /// Submit → the control plane's Ack of the Digest received, p50, milliseconds.
    pub finish_latency_ms_p50: Option<f64>,
    /// Submit → the control plane's Ack of the Digest received, p99, milliseconds.
    pub finish_latency_ms_p99: Option<f64>,
    /// What `finish_latency` ends at.
    pub finish_latency_source: &'static str,
    /// POST /api/v1/jobs round trip, p50, milliseconds.
    pub submit_ms_p50: Option<f64>,
    /// POST /api/v1/jobs round trip, p99, milliseconds.
    pub submit_ms_p99: Option<f64>,
    /// How late paced POSTs left after their slot, p99, milliseconds (None: unpaced).
    pub submit_lag_ms_p99: Option<f64>,
    /// GET /api/v1/agents round trip, p50, milliseconds.
    pub api_agents_ms_p50: Option<f64>,
    /// GET /api/v1/agents round trip, p99, milliseconds.
    pub api_agents_ms_p99: Option<f64>,
    /// Most agents GET /api/v1/agents reported online.
    pub api_agents_online_max: usize,
    /// GET / (fleet page) round trip, p50, milliseconds.
    pub fleet_page_ms_p50: Option<f64>,
    /// GET / (fleet page) round trip, p99, milliseconds.
    pub fleet_page_ms_p99: Option<f64>,
    /// Sampler requests that failed.
    pub sample_errors: usize,
    /// Agent messages the control plane refused for good.
    pub messages_rejected: u64,
    /// Cancel messages the agents received.
    pub cancels: u64,
    /// Jobs assigned to sim agents that this run did not submit.
    pub foreign_jobs_assigned: usize,
    /// Load window (first submit → end of the drain), seconds.
    pub load_secs: f64,
    /// /proc/loadavg at the end: 1, 5, 15 minutes.
    pub load_avg: Option<[f64; 3]>,
    /// `--seed`.
    pub seed: u64,
    /// Why the run failed (empty: it did not).
    pub failures: Vec<String>,
}

/// What `serve` wrote into its data directory.
struct ServeInfo {
    pid: Option<u32>,
    http_base: String,
    ca_fingerprint: gaffer_certs::CaFingerprint,
}

fn serve_info(control_dir: &Path) -> anyhow::Result<ServeInfo> {
    let path = control_dir.join("serve.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("reading {} (is `gaffer-control serve --data-dir {}` running?)", path.display(), control_dir.display())
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let base = match v["dashboard_url"].as_str() {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{}", v["http_addr"].as_str().context("serve.json has no http_addr")?),
    };
    if !base.starts_with("http://") {
        bail!(
            "the control plane serves its API at {base}; gaffer-sim speaks plain HTTP only: run serve on loopback \
             with --http-tls off (or auto)"
        );
    }
    let fp = v["ca_fingerprint"].as_str().context("serve.json has no ca_fingerprint")?;
    Ok(ServeInfo {
        pid: v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
        http_base: base,
        ca_fingerprint: fp.parse().with_context(|| format!("serve.json's ca_fingerprint {fp:?}"))?,
    })
}

/// One admin-socket request to the running control plane.
///
/// # Errors
/// When no control plane answers on `socket`, or it refuses.
pub async fn admin(socket: &Path, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    match gaffer_control::admin::request(socket, req).await {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => bail!("no control plane is serving on {} (start `gaffer-control serve` first)", socket.display()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("admin request {} on {}", req.action(), socket.display()))),
    }
}

/// Unix milliseconds now.
pub fn now_unix_ms() -> u64 {
    gaffer_agent::now_ms()
}

/// The credentials a run makes for itself and removes at the end.
struct RunCredentials {
    name: String,
    api_token: String,
    password: String,
}

async fn make_credentials(socket: &Path, ttl_secs: u64) -> anyhow::Result<RunCredentials> {
    let name = format!("gaffer-sim-{}-{}", std::process::id(), now_unix_ms());
    let req = AdminRequest::CreateApiToken { name: name.clone(), role: Role::Operator, ttl_secs };
    let api_token = match admin(socket, &req).await? {
        AdminResponse::ApiToken(t) => t.token,
        other => bail!("unexpected answer to an API token request: {other:?}"),
    };
    let password = gaffer_control::admin::generate_password();
    let password_phc = gaffer_control::admin::hash_password(&password)?;
    match admin(socket, &AdminRequest::AddUser { name: name.clone(), role: Role::Viewer, password_phc }).await? {
        AdminResponse::UserAdded(_) => {}
        other => bail!("unexpected answer to an add-user request: {other:?}"),
    }
    Ok(RunCredentials { name, api_token, password })
}

async fn remove_credentials(socket: &Path, creds: &RunCredentials) {
    for req in [
        AdminRequest::RevokeApiToken { name: creds.name.clone() },
        AdminRequest::RemoveUser { name: creds.name.clone() },
    ] {
        if let Err(e) = admin(socket, &req).await {
            tracing::warn!(error = %format!("{e:#}"), name = %creds.name, "could not remove the simulator's credentials");
        }
    }
}

/// Runs the simulation described by `args` and returns its report (its `failures` say whether
/// it met the bar: all agents connected, every submission accepted, every submitted job done).
///
/// # Errors
/// When the run cannot start: no serve.json or admin socket, enrollment refused, a bad address.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    let serve = serve_info(&args.data_dir)?;
    let socket = gaffer_control::datadir::DataDir::new(&args.data_dir).admin_socket_path();
    let control_pid = args.control_pid.or(serve.pid);
    let addr: SocketAddr = gaffer_agent::link::resolve(&args.control).await?;
    let server_name = gaffer_agent::link::server_name_of(&args.control)?;
    let agents = args.agents as usize;

    let _temp_state;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => {
            let t = tempfile::Builder::new().prefix("gaffer-sim-").tempdir()?;
            let p = t.path().to_path_buf();
            _temp_state = t;
            p
        }
    };
    let credential_ttl_secs = args.duration_secs + args.drain_secs + args.connect_timeout_secs + 3600;
    let creds = make_credentials(&socket, credential_ttl_secs).await?;
    let result = run_with(args, &serve, &socket, &creds, control_pid, addr, server_name, agents, &state_dir).await;
    remove_credentials(&socket, &creds).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_with(
    args: &Args,
    serve: &ServeInfo,
    socket: &Path,
    creds: &RunCredentials,
    control_pid: Option<u32>,
    addr: SocketAddr,
    server_name: String,
    agents: usize,
    state_dir: &Path,
) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .timeout(load::HTTP_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(args.submitters() + 2)
        .build()?;
    let api = load::Api { client: client.clone(), base: serve.http_base.clone(), token: creds.api_token.clone() };
    let session_cookie = load::login(&client, &serve.http_base, &creds.name, &creds.password).await?;

    tracing::info!(agents, state_dir = %state_dir.display(), "enrolling");
    let (specs, enrolled) = fleet::enroll_fleet(fleet::FleetEnrollment {
        admin_socket: socket,
        control_addr: &args.control,
        ca_fingerprint: serve.ca_fingerprint,
        site: &args.site,
        agents,
        state_dir,
        concurrency: args.enroll_concurrency as usize,
    })
    .await?;
    tracing::info!(
        enrolled = enrolled.enrolled,
        reused = enrolled.reused,
        secs = enrolled.elapsed.as_secs_f64(),
        "fleet ready"
    );

    let stats = Arc::new(Stats::new(agents));
    let fleet_params = Arc::new(agent::FleetParams {
        addr,
        server_name,
        job_slots: args.slots,
        job_delay: Duration::from_millis(args.job_delay_ms),
        seed: args.seed,
        agent_version: gaffer_agent::build_version().to_owned(),
        seq_base: now_unix_ms().saturating_mul(1000),
        connect_spread: Duration::from_secs_f64(args.connect_spread_secs),
        stats: stats.clone(),
    });
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse()?;
    let per_socket = args.agents_per_socket as usize;
    let endpoints =
        (0..agents.div_ceil(per_socket)).map(|_| client_endpoint(bind)).collect::<anyhow::Result<Vec<_>>>()?;
    let sim_ports: Vec<u16> = endpoints.iter().filter_map(|e| e.local_addr().ok()).map(|a| a.port()).collect();
    let udp_drops_start = (stats::udp_drops(&[addr.port()]), stats::udp_drops(&sim_ports));
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let connect_started = Instant::now();
    let mut agent_tasks = tokio::task::JoinSet::new();
    for spec in specs {
        let endpoint = endpoints[spec.index / per_socket].clone();
        agent_tasks.spawn(agent::run(spec, endpoint, fleet_params.clone(), shutdown_rx.clone()));
    }
    let connect_deadline = tokio::time::Instant::now() + Duration::from_secs(args.connect_timeout_secs);
    let connect_log = {
        let stats = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                tracing::info!(welcomed = stats.welcomed_unique(), of = agents, "connecting");
            }
        })
    };
    let all_welcomed = stats.wait_all_welcomed(connect_deadline).await;
    connect_log.abort();
    let connect_all_secs = all_welcomed.map(|at| at.duration_since(connect_started).as_secs_f64());
    tracing::info!(welcomed = stats.welcomed_unique(), ?connect_all_secs, "connected; submitting jobs");

    // The load window.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(load::sample(api.clone(), session_cookie, control_pid, stop_rx));
    let window_start = Instant::now();
    let control_cpu_start = control_pid.and_then(stats::cpu_time);
    let sim_cpu_start = stats::cpu_time(std::process::id());
    let heartbeats_start = stats.heartbeats.load(Ordering::Relaxed);
    let plan = load::SubmitPlan {
        jobs_per_sec: args.jobs_per_sec,
        jobs_total: args.jobs_total,
        duration: Duration::from_secs(args.duration_secs),
        submitters: args.submitters(),
        site: args.site.clone(),
        profile: args.profile.clone(),
    };
    let progress_log = {
        let stats = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let (submitted, succeeded) = stats.job_progress();
                tracing::info!(submitted, succeeded, connected = stats.connected.load(Ordering::Relaxed), "load");
            }
        })
    };
    let submitted = load::submit_jobs(&api, &plan, &stats).await;
    let drained = stats.wait_jobs_succeeded(tokio::time::Instant::now() + Duration::from_secs(args.drain_secs)).await;
    progress_log.abort();
    let window = window_start.elapsed();
    let control_cpu_end = control_pid.and_then(stats::cpu_time);
    let sim_cpu_end = stats::cpu_time(std::process::id());
    let heartbeats = stats.heartbeats.load(Ordering::Relaxed) - heartbeats_start;
    let agents_connected = stats.connected.load(Ordering::Relaxed);
    let control_rss_bytes = control_pid.and_then(stats::rss_bytes);
    let udp_drops_end = (stats::udp_drops(&[addr.port()]), stats::udp_drops(&sim_ports));
    let _ = stop_tx.send(true);
    let mut samples = sampler.await.unwrap_or_default();
    tracing::info!(drained, "load done; disconnecting");

    let _ = shutdown_tx.send(true);
    while agent_tasks.join_next().await.is_some() {}
    // Let the close frames go out (bounded; all endpoints at once).
    let mut idle = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        idle.spawn(async move { endpoint.wait_idle().await });
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while idle.join_next().await.is_some() {} }).await;

    let jobs = stats.job_summary();
    let cores = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if !window.is_zero() => Some(b.saturating_sub(a).as_secs_f64() / window.as_secs_f64()),
        _ => None,
    };
    let (mut assign, mut finish) = (jobs.assign_latency_ms.clone(), jobs.finish_latency_ms.clone());
    let mut post = submitted.post_ms.clone();
    let mut lag = submitted.lag_ms.clone();
    let mut welcomed_ms = stats.first_welcome_ms(connect_started);
    let mut report = Report {
        agents,
        agents_connected,
        agents_welcomed: stats.welcomed_unique(),
        connect_all_secs,
        connect_secs_p50: percentile(&mut welcomed_ms, 50.0).map(|v| v / 1000.0),
        connect_secs_p99: percentile(&mut welcomed_ms, 99.0).map(|v| v / 1000.0),
        reconnects: stats.welcomes.load(Ordering::Relaxed).saturating_sub(stats.welcomed_unique() as u64),
        link_failures: stats.link_failures.load(Ordering::Relaxed),
        control_udp_drops: udp_drops_end.0.zip(udp_drops_start.0).map(|(b, a)| b.saturating_sub(a)),
        sim_udp_drops: udp_drops_end.1.zip(udp_drops_start.1).map(|(b, a)| b.saturating_sub(a)),
        enroll_secs: enrolled.elapsed.as_secs_f64(),
        agents_enrolled: enrolled.enrolled,
        agents_reused: enrolled.reused,
        control_pid,
        control_rss_bytes,
        control_rss_bytes_max: samples.control_rss_bytes.iter().copied().chain(control_rss_bytes).max(),
        control_cpu_cores: cores(control_cpu_start, control_cpu_end),
        sim_rss_bytes: stats::rss_bytes(std::process::id()),
        sim_cpu_cores: cores(sim_cpu_start, sim_cpu_end),
        heartbeat_interval_secs: stats.heartbeat_interval_secs.load(Ordering::Relaxed),
        heartbeats_per_sec: heartbeats as f64 / window.as_secs_f64().max(1e-9),
        jobs_per_sec_target: args.jobs_per_sec,
        jobs_submitted: jobs.submitted,
        jobs_succeeded: jobs.succeeded,
        jobs_unfinished: jobs.submitted - jobs.succeeded,
        submit_errors: submitted.errors,
        jobs_per_sec: match jobs.submit_to_last_success {
            Some(d) if !d.is_zero() => jobs.succeeded as f64 / d.as_secs_f64(),
            _ => 0.0,
        },
        assign_latency_ms_p50: percentile(&mut assign, 50.0),
        assign_latency_ms_p99: percentile(&mut assign, 99.0),
        finish_latency_ms_p50: percentile(&mut finish, 50.0),
        finish_latency_ms_p99: percentile(&mut finish, 99.0),
        finish_latency_source: "ack of the digest (sent after the control plane committed and fsynced it)",
        submit_ms_p50: percentile(&mut post, 50.0),
        submit_ms_p99: percentile(&mut post, 99.0),
        submit_lag_ms_p99: percentile(&mut lag, 99.0),
        api_agents_ms_p50: percentile(&mut samples.api_agents_ms, 50.0),
        api_agents_ms_p99: percentile(&mut samples.api_agents_ms, 99.0),
        api_agents_online_max: samples.api_agents_online_max,
        fleet_page_ms_p50: percentile(&mut samples.fleet_page_ms, 50.0),
        fleet_page_ms_p99: percentile(&mut samples.fleet_page_ms, 99.0),
        sample_errors: samples.errors,
        messages_rejected: stats.messages_rejected.load(Ordering::Relaxed),
        cancels: stats.cancels.load(Ordering::Relaxed),
        foreign_jobs_assigned: jobs.foreign_assigned,
        load_secs: window.as_secs_f64(),
        load_avg: stats::load_avg(),
        seed: args.seed,
        failures: Vec::new(),
    };
    if report.agents_connected < agents {
        let why = stats.first_refusal().map(|r| format!("; first refusal: {r}")).unwrap_or_default();
        report.failures.push(format!(
            "only {} of {agents} agents were connected at the end of the load ({} ever welcomed){why}",
            report.agents_connected, report.agents_welcomed
        ));
    }
    if submitted.errors > 0 {
        report.failures.push(format!(
            "{} job submissions failed; first: {}",
            submitted.errors,
            submitted.first_error.as_deref().unwrap_or("?")
        ));
    }
    if report.jobs_unfinished > 0 {
        report.failures.push(format!(
            "{} of {} submitted jobs did not succeed within {} s after submitting stopped, e.g. {}",
            report.jobs_unfinished,
            report.jobs_submitted,
            args.drain_secs,
            jobs.unfinished_examples.join(", ")
        ));
    }
    if samples.errors > 0 {
        tracing::warn!(
            errors = samples.errors,
            first = samples.first_error.as_deref().unwrap_or("?"),
            "sampler requests failed"
        );
    }
    Ok(report)
}

/// A client endpoint for the simulated agents on its own UDP socket bound to `bind`, with
/// [`UDP_SOCKET_BUFFER_BYTES`] of socket buffers.
fn client_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(bind), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
            .context("creating a UDP socket for the simulated agents")?;
    // Best effort: the kernel caps both at its maximum, and a smaller buffer only costs retransmits.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into()).with_context(|| format!("binding a UDP socket on {bind}"))?;
    let runtime = quinn::default_runtime().context("no async runtime for the QUIC endpoint")?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), runtime)
        .context("starting a QUIC client endpoint")
}

/// The report as the human table, `/proc/loadavg` beside it.
pub fn table(r: &Report) -> String {
    fn opt(v: Option<f64>, unit: &str) -> String {
        v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} {unit}"))
    }
    let mib = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    let per_agent = match (r.control_rss_bytes, r.agents_connected) {
        (Some(b), n) if n > 0 => {
            format!(" ({:.1} KiB per connected agent, whole process)", b as f64 / 1024.0 / n as f64)
        }
        _ => String::new(),
    };
    let load = r.load_avg.map_or_else(|| "-".to_owned(), |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]));
    let rows: Vec<(&str, String)> = vec![
        (
            "agents connected",
            format!(
                "{} of {} ({} reconnects, {} failed or lost connections)",
                r.agents_connected, r.agents, r.reconnects, r.link_failures
            ),
        ),
        (
            "UDP drops",
            format!(
                "control {}, sim {}",
                r.control_udp_drops.map_or("-".into(), |d| d.to_string()),
                r.sim_udp_drops.map_or("-".into(), |d| d.to_string())
            ),
        ),
        (
            "connect",
            format!(
                "all {}  (p50 {}  p99 {})",
                opt(r.connect_all_secs, "s"),
                opt(r.connect_secs_p50, "s"),
                opt(r.connect_secs_p99, "s")
            ),
        ),
        ("enrollment", format!("{:.1} s ({} new, {} reused)", r.enroll_secs, r.agents_enrolled, r.agents_reused)),
        ("control RSS", format!("{}{per_agent}", mib(r.control_rss_bytes))),
        ("control CPU", opt(r.control_cpu_cores, "cores")),
        ("sim RSS / CPU", format!("{} / {}", mib(r.sim_rss_bytes), opt(r.sim_cpu_cores, "cores"))),
        ("heartbeats", format!("{:.1} /s (every {} s)", r.heartbeats_per_sec, r.heartbeat_interval_secs)),
        (
            "jobs",
            format!(
                "{} submitted, {} succeeded, {} submit errors",
                r.jobs_submitted, r.jobs_succeeded, r.submit_errors
            ),
        ),
        (
            "jobs/s",
            format!(
                "{:.1} (target {})",
                r.jobs_per_sec,
                if r.jobs_per_sec_target > 0.0 { format!("{}", r.jobs_per_sec_target) } else { "unpaced".into() }
            ),
        ),
        (
            "submit→assign",
            format!("p50 {}  p99 {}", opt(r.assign_latency_ms_p50, "ms"), opt(r.assign_latency_ms_p99, "ms")),
        ),
        (
            "submit→succeeded",
            format!("p50 {}  p99 {}", opt(r.finish_latency_ms_p50, "ms"), opt(r.finish_latency_ms_p99, "ms")),
        ),
        ("POST /api/v1/jobs", format!("p50 {}  p99 {}", opt(r.submit_ms_p50, "ms"), opt(r.submit_ms_p99, "ms"))),
        (
            "GET /api/v1/agents",
            format!(
                "p50 {}  p99 {}  (max {} online)",
                opt(r.api_agents_ms_p50, "ms"),
                opt(r.api_agents_ms_p99, "ms"),
                r.api_agents_online_max
            ),
        ),
        ("fleet page", format!("p50 {}  p99 {}", opt(r.fleet_page_ms_p50, "ms"), opt(r.fleet_page_ms_p99, "ms"))),
        ("load window", format!("{:.1} s", r.load_secs)),
        ("load avg", load),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<20} {v}\n"));
    }
    for f in &r.failures {
        out.push_str(&format!("FAILED: {f}\n"));
    }
    out
}
