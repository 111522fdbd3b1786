//! Does the control plane hold 10,000 agents? (issue 10, item 2)
//!
//! One fresh `SledStore` with N enrolled agents (default 10 000) over 10 sites — realistic
//! records: capabilities with two GPUs, the latest health, a short certificate history and the CSR
//! — 96 % connected, 2 % offline, 1 % air-gapped, 1 % revoked, and 2 000 running jobs leased to
//! them. It measures, round by round and interleaved so load from elsewhere on the machine hits
//! every row alike:
//!
//! * **api first page**: `GET /api/v1/agents` (100 agents, counts);
//! * **api filtered**: `GET /api/v1/agents?site=site-03&state=offline`;
//! * **api deep page**: `GET /api/v1/agents?cursor=…` from the middle of the fleet;
//! * **api 1000**: `GET /api/v1/agents?limit=1000`;
//! * **fleet page**: `GET /` (the dashboard, logged in), and `GET /?site=site-03&state=online`;
//! * **metrics**: `GET /metrics` (agents by state come from the same counts);
//! * **store full read**: `Store::list_agents` (every record decoded: what the trait's default
//!   `list_agents_page` costs);
//! * **heartbeat**: one heartbeat through `Ingest::ingest`, as the link applies it (health history
//!   append and trim, `last_health`, `last_seen_ms`); its median gives the heartbeats per second
//!   one core sustains.
//!
//! HTTP requests go through the real router with `oneshot` (no network); the time includes
//! collecting the body, and every body is checked so an error page is never timed. Prints one
//! table (median / p99 in ms) with /proc/loadavg beside it; `--json` prints one JSON object.
//! `--agents N` (default 10 000, at least 1 000) and `--rounds R` (default 100, at least 20).
//!
//! Run: `cargo bench -p gaffer-control --bench agents` (release).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use gaffer_control::ingest::{Ingest, Ingested};
use gaffer_control::scheduler::SchedulerConfig;
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{
    AgentQuery, AgentRecord, AgentState, ApiTokenRecord, CertIssue, HealthSample, JobOrigin, JobRecord, JobState,
    Lease, Priority, Role, SessionRecord, Store, UserRecord,
};
use gaffer_control::{http::router, AppState};
use gaffer_protocol::health::{DiskHealth, GpuHealth, GpuInfo, Health, HealthSource};
use gaffer_protocol::messages::{AgentId, AgentMessage, Capabilities, ModelRef, Profile};
use gaffer_protocol::AgentEnvelope;
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;
use uuid::Uuid;

const SITES: usize = 10;
const LEASED_JOBS: usize = 2_000;
const SESSION_VALUE: &str = "bench-session-0123456789abcdefghijklmnopqrstuvwxyz";
const API_TOKEN: &str = "gfa_bench0123456789abcdefghijklmnopqrstuvwxyz";
const WARMUP: usize = 5;
/// Heartbeats timed per round.
const HEARTBEATS_PER_ROUND: usize = 20;
const DAY_MS: u64 = 24 * 3600 * 1000;

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Median and p99 of samples, ms.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Stat {
    p50_ms: f64,
    p99_ms: f64,
}

impl Stat {
    fn of(samples: &mut [Duration]) -> Stat {
        if samples.is_empty() {
            return Stat::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        Stat { p50_ms: at(0.50), p99_ms: at(0.99) }
    }
}

struct Args {
    json: bool,
    agents: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { json: false, agents: 10_000, rounds: 100 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut number = |name: &str, min: usize| -> Result<usize> {
            let n = it.next().with_context(|| format!("{name} needs a number"))?;
            let n: usize = n.parse().with_context(|| format!("{name} {n:?} is not a number"))?;
            ensure!(n >= min, "{name} must be at least {min}");
            Ok(n)
        };
        match a.as_str() {
            "--json" => args.json = true,
            "--agents" => args.agents = number("--agents", 1_000)?,
            "--rounds" => args.rounds = number("--rounds", 20)?,
            // `cargo bench` passes `--bench`; ignore it and anything else we do not know.
            _ => {}
        }
    }
    Ok(args)
}

fn site(i: usize) -> String {
    format!("site-{:02}", i % SITES)
}

fn capabilities() -> Capabilities {
    Capabilities {
        gpus: (0..2)
            .map(|g| GpuInfo {
                index: g,
                name: "NVIDIA RTX A5000".into(),
                uuid: format!("GPU-{}", Uuid::new_v4()),
                memory_total_bytes: 24 << 30,
            })
            .collect(),
        volumes: vec!["/media".into(), "/mnt/projects".into()],
        watch_roots: vec!["/media/incoming".into()],
        job_slots: 2,
        profiles: vec![Profile::Shots, Profile::Full],
        models: vec![ModelRef { name: "nudenet-320n".into(), version: "3.4.2".into(), sha256: "ab".repeat(32) }],
    }
}

/// A health report that varies with `i` (as the simulator's do).
fn health(i: usize, now: u64) -> Health {
    Health {
        sampled_at_unix_ms: now,
        source: HealthSource::Nvml { driver_version: "550.54.14".into() },
        cpu_percent: (i % 100) as f32,
        load_avg_1m: (i % 7) as f64 * 0.5,
        memory_used_bytes: (8 + (i % 16) as u64) << 30,
        memory_total_bytes: 64 << 30,
        disks: vec![DiskHealth { path: "/media".into(), available_bytes: 2 << 40, total_bytes: 8 << 40 }],
        gpus: (0..2)
            .map(|g| GpuHealth {
                index: g,
                name: "NVIDIA RTX A5000".into(),
                utilization_percent: ((i + g as usize * 37) % 101) as u32,
                memory_used_bytes: 3 << 30,
                memory_total_bytes: 24 << 30,
                temperature_c: 40 + (i % 40) as u32,
                power_w: Some(120.0),
            })
            .collect(),
        inference: None,
        jobs_running: 0,
        job_slots: 2,
        jobs_queued: 0,
        outbox_pending: 0,
        outbox_full: false,
    }
}

fn agent_record(id: AgentId, i: usize, now: u64) -> AgentRecord {
    // By `i / SITES`, so every site has its share of each state.
    let state = match (i / SITES) % 100 {
        0 | 1 => AgentState::Offline,
        2 => AgentState::AirGapped,
        3 => AgentState::Revoked,
        _ => AgentState::Online,
    };
    let issuer = "cd".repeat(32);
    let cert_history = (0..3)
        .map(|n| CertIssue {
            serial_hex: format!("{:032x}", i * 8 + n),
            not_after_unix: (now / 1000) as i64 + (n as i64 + 1) * 3 * 24 * 3600,
            issued_at_ms: now - (3 - n as u64) * 3 * DAY_MS,
            via: if n == 0 { "enroll".into() } else { "renew".into() },
            issuer_fingerprint: issuer.clone(),
        })
        .collect();
    AgentRecord {
        cert_not_after_unix: (now / 1000) as i64 + 7 * 24 * 3600,
        agent_version: Some("0.9.0".into()),
        capabilities: Some(capabilities()),
        connected: state == AgentState::Online,
        last_seen_ms: Some(now - (i as u64 % 5_000)),
        last_health: Some(HealthSample { received_at_ms: now, health: health(i, now) }),
        csr_pem: Some(format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            "MIIBBjCBrQIBADBLMUkwRwYDVQQDDEBnYWZmZXItYWdlbnQ".repeat(8)
        )),
        cert_serial_hex: Some(format!("{:032x}", i * 8 + 2)),
        revoked_at_ms: (state == AgentState::Revoked).then_some(now - DAY_MS),
        offline: state == AgentState::AirGapped,
        cert_issuer_fingerprint: Some(issuer),
        cert_history,
        ..AgentRecord::new(id, site(i), format!("gpu-box-{i:05}"), now - 30 * DAY_MS)
    }
}

fn leased_job(i: usize, holder: AgentId, now: u64) -> JobRecord {
    JobRecord {
        id: Uuid::new_v4(),
        path: format!("/media/show/reel{:03}/shot{i:06}.mov", i % 500),
        site: "site-00".into(),
        profile: Profile::Shots,
        pinned_agent: None,
        origin: JobOrigin::Api,
        priority: Priority::Normal,
        state: JobState::Running,
        agent: Some(holder),
        lease: Some(Lease { holder, lease_id: 1, deadline_ms: None }),
        lease_epoch: 1,
        progress: 0.3,
        frames_decoded: 100,
        error: None,
        attempts: 1,
        seq: 0,
        created_at_ms: now - 60_000,
        updated_at_ms: now - 1_000,
        finished_at_ms: None,
        custody: None,
        submitted_by: None,
        history: Vec::new(),
    }
}

struct Bench {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    ingest: Ingest,
    app: Router,
    agents: Vec<AgentId>,
    /// Per state, as inserted.
    online: u64,
    middle_cursor: String,
    setup_secs: f64,
}

fn setup(n: usize) -> Result<Bench> {
    let started = Instant::now();
    let dir = tempfile::tempdir().context("temp dir")?;
    let store = Arc::new(SledStore::open(&dir.path().join("db"))?);
    let now = gaffer_control::now_ms();
    let mut agents = Vec::with_capacity(n);
    let mut online = 0;
    for i in 0..n {
        let rec = agent_record(Uuid::new_v4(), i, now);
        online += u64::from(AgentState::of(&rec) == AgentState::Online);
        store.insert_agent(&rec)?;
        agents.push(rec.id);
    }
    for i in 0..LEASED_JOBS {
        ensure!(store.insert_job(&leased_job(i, agents[(i * 7) % n], now))?, "leased job inserted twice");
    }
    store.insert_user(&UserRecord {
        name: "bench".into(),
        role: Role::Viewer,
        password_phc: "$argon2id$v=19$m=19456,t=2,p=1$YmVuY2hzYWx0$unused".into(),
        created_at_ms: now,
        password_changed_at_ms: now,
    })?;
    store.insert_session(&SessionRecord {
        user: "bench".into(),
        role: Role::Viewer,
        password_changed_at_ms: now,
        id_hash: sha256(SESSION_VALUE.as_bytes()),
        csrf_token: "bench-csrf".into(),
        created_at_ms: now,
        expires_at_ms: now + DAY_MS,
    })?;
    store.create_api_token(&ApiTokenRecord {
        hash: sha256(API_TOKEN.as_bytes()),
        name: "bench".into(),
        role: Role::Viewer,
        created_at_ms: now,
        expires_at_ms: now + DAY_MS,
        last_used_at_ms: None,
        created_by: "bench".into(),
    })?;
    store.flush()?;
    let middle = store.list_agents_page(&AgentQuery { limit: n / 2, ..AgentQuery::default() })?;
    let middle_cursor = middle.next.context("the middle of the fleet has a next page")?.to_string();
    let shared: Arc<dyn Store> = store.clone();
    let state = AppState::new(shared, SchedulerConfig::default());
    let ingest = Ingest::new(state.clone());
    let app = router(state);
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!("{n} agents: setup {setup_secs:.1} s");
    Ok(Bench { _dir: dir, store, ingest, app, agents, online, middle_cursor, setup_secs })
}

/// The HTTP requests measured, with what a 200 body must show.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Endpoint {
    ApiFirstPage,
    ApiFiltered,
    ApiDeepPage,
    Api1000,
    FleetPage,
    FleetFiltered,
    Metrics,
}

impl Endpoint {
    const ALL: [Endpoint; 7] = [
        Endpoint::ApiFirstPage,
        Endpoint::ApiFiltered,
        Endpoint::ApiDeepPage,
        Endpoint::Api1000,
        Endpoint::FleetPage,
        Endpoint::FleetFiltered,
        Endpoint::Metrics,
    ];

    fn label(self) -> &'static str {
        match self {
            Endpoint::ApiFirstPage => "GET /api/v1/agents",
            Endpoint::ApiFiltered => "GET /api/v1/agents?site=site-03&state=offline",
            Endpoint::ApiDeepPage => "GET /api/v1/agents?cursor=<middle>",
            Endpoint::Api1000 => "GET /api/v1/agents?limit=1000",
            Endpoint::FleetPage => "GET / (fleet page)",
            Endpoint::FleetFiltered => "GET /?site=site-03&state=online",
            Endpoint::Metrics => "GET /metrics",
        }
    }

    fn request(self, b: &Bench) -> Result<Request<Body>> {
        let api = |path: String| Request::get(path).header(header::AUTHORIZATION, format!("Bearer {API_TOKEN}"));
        let page = |path: &str| {
            Request::get(path)
                .header(header::COOKIE, format!("{}={SESSION_VALUE}", gaffer_control::http::SESSION_COOKIE))
        };
        let req = match self {
            Endpoint::ApiFirstPage => api("/api/v1/agents".into()),
            Endpoint::ApiFiltered => api("/api/v1/agents?site=site-03&state=offline".into()),
            Endpoint::ApiDeepPage => api(format!("/api/v1/agents?cursor={}", b.middle_cursor)),
            Endpoint::Api1000 => api("/api/v1/agents?limit=1000".into()),
            Endpoint::FleetPage => page("/"),
            Endpoint::FleetFiltered => page("/?site=site-03&state=online"),
            Endpoint::Metrics => Request::get("/metrics"),
        };
        Ok(req.body(Body::empty())?)
    }

    /// Checks a 200 body, so the benchmark cannot be timing an error page or a wrong answer.
    fn check(self, b: &Bench, body: &str) -> Result<()> {
        let n = b.agents.len();
        let listed = |want: usize| -> Result<()> {
            let v: serde_json::Value = serde_json::from_str(body)?;
            let got = v["agents"].as_array().map_or(0, Vec::len);
            ensure!(got == want, "{}: listed {got} agents, expected {want}", self.label());
            let total = v["counts"]["total"].as_u64().unwrap_or(0);
            ensure!(total == n as u64, "{}: counts.total {total}, expected {n}", self.label());
            Ok(())
        };
        match self {
            Endpoint::ApiFirstPage | Endpoint::ApiDeepPage => listed(100)?,
            // 2 % of the agents are offline, spread evenly over the sites.
            Endpoint::ApiFiltered => listed((n / 50 / SITES).min(100))?,
            Endpoint::Api1000 => listed(1000)?,
            Endpoint::FleetPage => {
                let want = format!("{} of {} online", b.online, n);
                ensure!(body.contains(&want), "fleet page lacks {want:?}");
                ensure!(body.matches("<tr>").count() == 100 + 1, "fleet page does not show 100 agents");
            }
            Endpoint::FleetFiltered => {
                ensure!(body.contains("site-03"), "filtered fleet page lacks the site");
                ensure!(body.contains("rel=\"next\""), "filtered fleet page has no next page");
            }
            Endpoint::Metrics => {
                let want = format!("gaffer_agents{{state=\"connected\"}} {}", b.online);
                ensure!(body.contains(&want), "/metrics lacks {want:?}");
            }
        }
        Ok(())
    }
}

/// One GET through the router: its time (to the whole body) and the body.
async fn get_once(b: &Bench, ep: Endpoint) -> Result<(Duration, String)> {
    let req = ep.request(b)?;
    let t0 = Instant::now();
    let resp = b.app.clone().oneshot(req).await?;
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 64 << 20).await?;
    let elapsed = t0.elapsed();
    let body = String::from_utf8(body.to_vec()).context("body is not UTF-8")?;
    if status != StatusCode::OK {
        bail!("{}: {status}: {}", ep.label(), body.chars().take(500).collect::<String>());
    }
    Ok((elapsed, body))
}

/// One heartbeat from agent `i`, through the link's ingest path.
fn heartbeat(b: &Bench, i: usize) -> Result<Duration> {
    let agent_id = b.agents[i % b.agents.len()];
    let now = gaffer_control::now_ms();
    let env = AgentEnvelope { agent_id, seq: 0, body: AgentMessage::Heartbeat(health(i, now)) };
    let t0 = Instant::now();
    let got = b.ingest.ingest(agent_id, env, now)?;
    let elapsed = t0.elapsed();
    ensure!(got == Ingested::Ephemeral, "a heartbeat was {got:?}");
    Ok(elapsed)
}

#[derive(serde::Serialize)]
struct Row {
    what: String,
    #[serde(flatten)]
    stat: Stat,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let b = setup(args.agents)?;
    let mut http: Vec<Vec<Duration>> = vec![Vec::new(); Endpoint::ALL.len()];
    let mut full_read = Vec::new();
    let mut leased_read = Vec::new();
    let mut beats = Vec::new();
    let mut beat_no = 0usize;
    for round in 0..WARMUP + args.rounds {
        let measured = round >= WARMUP;
        for (k, ep) in Endpoint::ALL.into_iter().enumerate() {
            let (t, body) = rt.block_on(get_once(&b, ep))?;
            if round == 0 {
                ep.check(&b, &body)?;
            }
            if measured {
                http[k].push(t);
            }
        }
        let t0 = Instant::now();
        let all = b.store.list_agents()?;
        let t = t0.elapsed();
        ensure!(all.len() == args.agents, "list_agents read {} agents", all.len());
        if measured {
            full_read.push(t);
        }
        let t0 = Instant::now();
        let leased = b.store.jobs_in_state(JobState::Running, 100_000)?;
        let t = t0.elapsed();
        ensure!(leased.len() == LEASED_JOBS, "read {} running jobs", leased.len());
        if measured {
            leased_read.push(t);
        }
        for _ in 0..HEARTBEATS_PER_ROUND {
            // Spread over the fleet, as 10 000 agents every 5 s are.
            beat_no += 1;
            let t = heartbeat(&b, beat_no.wrapping_mul(7919))?;
            if measured {
                beats.push(t);
            }
        }
    }
    let mut rows: Vec<Row> = Endpoint::ALL
        .into_iter()
        .zip(http.iter_mut())
        .map(|(ep, samples)| Row { what: ep.label().into(), stat: Stat::of(samples) })
        .collect();
    rows.push(Row { what: "Store::list_agents (every record decoded)".into(), stat: Stat::of(&mut full_read) });
    rows.push(Row {
        what: format!("Store::jobs_in_state(running): {LEASED_JOBS} jobs"),
        stat: Stat::of(&mut leased_read),
    });
    let beat = Stat::of(&mut beats);
    rows.push(Row { what: "heartbeat (Ingest::ingest)".into(), stat: beat });
    let heartbeats_per_core_sec = if beat.p50_ms > 0.0 { 1e3 / beat.p50_ms } else { 0.0 };
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    if args.json {
        let out = serde_json::json!({
            "agents": args.agents,
            "rounds": args.rounds,
            "setup_secs": b.setup_secs,
            "rows": rows,
            "heartbeats_per_core_sec": heartbeats_per_core_sec,
            "load_avg": load_avg,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} agents ({} online, {SITES} sites, {LEASED_JOBS} leased jobs), {} rounds; load average {load_avg}",
        args.agents, b.online, args.rounds
    );
    println!("{:<50} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    for r in &rows {
        println!("{:<50} {:>10.3} {:>10.3}", r.what, r.stat.p50_ms, r.stat.p99_ms);
    }
    println!("heartbeats one core applies per second (1 / p50): {heartbeats_per_core_sec:.0}");
    Ok(())
}
