//! Does the control plane slow down as job history grows? (issue 7)
//!
//! For each history size H in {0, 10 000, 100 000} finished jobs (succeeded / failed /
//! cancelled, a digest on every tenth succeeded one) in its own fresh `SledStore`, with a few
//! enrolled agents connected to the fleet, this measures:
//!
//! * **lease**: submit a queued job and run one leasing pass until it is `assigned`
//!   (`Scheduler::submit` + `Scheduler::lease_pass`; both fsync), and the leasing pass alone;
//! * **fleet**: `GET /` (the dashboard's fleet page, logged in);
//! * **metrics**: `GET /metrics` (checked to report the H-ish succeeded count);
//! * **jobs API**: `GET /api/v1/jobs?limit=100` (bearer token).
//!
//! HTTP requests go through the real router with `oneshot` (no network); the time includes
//! collecting the body. The three stores are open at once and measured interleaved, round by
//! round, so load from elsewhere on the machine hits every history size alike. Prints one table
//! (median / p99 in µs, and the 100k/0 ratio of each median) with the machine's load average;
//! `--json` prints the numbers as one JSON object instead. `--rounds N` sets the samples per
//! measurement (default 200, at least 80).
//!
//! Run: `cargo bench -p gaffer-control --bench history` (release).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use gaffer_control::scheduler::{AgentConn, JobRequest, SchedulerConfig};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{
    AgentRecord, ApiTokenRecord, JobOrigin, JobRecord, JobState, Lease, Priority, Role, SessionRecord, Store,
    UserRecord,
};
use gaffer_control::{http::router, AppState};
use gaffer_protocol::digest::{
    AnalyzerInfo, Cut, Digest, Keyframe, Shot, ShotAnalysis, SourceInfo, StreamInfo, StreamKind, TechnicalMetadata,
};
use gaffer_protocol::messages::{AgentId, Capabilities, Profile};
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;
use uuid::Uuid;

/// The history sizes; one store each, all open at once and measured interleaved.
const HISTORY_SIZES: [usize; 3] = [0, 10_000, 100_000];
const AGENTS: usize = 8;
const SITE: &str = "stage-a";
const SESSION_VALUE: &str = "bench-session-0123456789abcdefghijklmnopqrstuvwxyz";
const API_TOKEN: &str = "gfa_bench0123456789abcdefghijklmnopqrstuvwxyz";
const WARMUP: usize = 20;
/// One day, ms: history jobs are spread over the 30 days before the run.
const DAY_MS: u64 = 24 * 3600 * 1000;

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Median and p99 of samples, µs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Stat {
    p50_us: f64,
    p99_us: f64,
}

impl Stat {
    fn of(samples: &mut [Duration]) -> Stat {
        if samples.is_empty() {
            return Stat::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e6
        };
        Stat { p50_us: at(0.50), p99_us: at(0.99) }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    history: usize,
    setup_secs: f64,
    /// submit + one lease pass, until the job is assigned.
    lease: Stat,
    /// The lease pass alone.
    lease_pass: Stat,
    fleet_page: Stat,
    metrics: Stat,
    jobs_api: Stat,
}

struct Args {
    json: bool,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { json: false, rounds: 200 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = true,
            "--rounds" => {
                let n = it.next().context("--rounds needs a number")?;
                args.rounds = n.parse().with_context(|| format!("--rounds {n:?} is not a number"))?;
                // The job listing check wants 100 jobs, which the lease rounds create.
                ensure!(WARMUP + args.rounds >= 100, "--rounds must be at least {}", 100 - WARMUP);
            }
            // `cargo bench` passes `--bench`; ignore it and anything else we do not know.
            _ => {}
        }
    }
    Ok(args)
}

fn capabilities() -> Capabilities {
    Capabilities {
        gpus: vec![],
        volumes: vec!["/media".into()],
        watch_roots: vec![],
        job_slots: 4,
        profiles: vec![Profile::Shots],
        models: vec![],
    }
}

fn agent_record(id: AgentId, i: usize, now: u64) -> AgentRecord {
    AgentRecord {
        cert_not_after_unix: (now / 1000) as i64 + 365 * 24 * 3600,
        agent_version: Some("0.1.0".into()),
        capabilities: Some(capabilities()),
        connected: true,
        last_seen_ms: Some(now),
        ..AgentRecord::new(id, SITE, format!("gpu-box-{i:02}"), now - 30 * DAY_MS)
    }
}

fn small_digest(path: &str) -> Digest {
    Digest {
        schema_version: gaffer_protocol::digest::DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo { path: path.into(), size_bytes: 3_000_000, modified_unix_secs: Some(1_700_000_000) },
        technical: TechnicalMetadata {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(10.0),
            bit_rate_bps: Some(113_000),
            streams: vec![StreamInfo {
                index: 0,
                kind: StreamKind::Video,
                codec: "h264".into(),
                time_base: (1, 12_800),
                duration_secs: Some(10.0),
                frames_declared: Some(250),
                width: Some(160),
                height: Some(90),
                frame_rate_fps: Some(25.0),
                pixel_format: Some("yuv420p".into()),
                sample_rate_hz: None,
                channels: None,
                bit_rate_bps: Some(100_000),
                language: None,
            }],
            primary_video_stream: Some(0),
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 250,
            frames_corrupt: 0,
            cuts: vec![Cut { frame: 112, time_secs: 4.48, score: 41.5 }],
            shots: vec![
                Shot {
                    index: 0,
                    start_frame: 0,
                    end_frame: 112,
                    start_secs: 0.0,
                    end_secs: 4.48,
                    keyframe: Keyframe { frame: 0, time_secs: 0.0, phash: "c3a5e1f00f1e5a3c".into() },
                },
                Shot {
                    index: 1,
                    start_frame: 112,
                    end_frame: 250,
                    start_secs: 4.48,
                    end_secs: 10.0,
                    keyframe: Keyframe { frame: 112, time_secs: 4.48, phash: "0f0f0f0ff0f0f0f0".into() },
                },
            ],
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: vec![AnalyzerInfo {
            name: "shots.content".into(),
            version: "1".into(),
            parameters: vec![("threshold".into(), "27".into())],
        }],
        analysis_secs: 1.5,
    }
}

/// A finished history job number `i` of `h`, created in the 30 days before `now`.
fn history_job(i: usize, h: usize, agent: AgentId, now: u64) -> JobRecord {
    let state = match i % 10 {
        0..=7 => JobState::Succeeded,
        8 => JobState::Failed,
        _ => JobState::Cancelled,
    };
    let created = now - 30 * DAY_MS + (i as u64) * (29 * DAY_MS / h.max(1) as u64);
    let finished = created + 60_000;
    JobRecord {
        id: Uuid::new_v4(),
        path: format!("/media/show/reel{:03}/shot{i:06}.mov", i % 500),
        site: SITE.into(),
        profile: Profile::Shots,
        pinned_agent: None,
        origin: JobOrigin::Api,
        priority: Priority::Normal,
        state,
        agent: (state != JobState::Cancelled).then_some(agent),
        lease: None,
        lease_epoch: 1,
        progress: if state == JobState::Succeeded { 1.0 } else { 0.4 },
        frames_decoded: 250,
        error: match state {
            JobState::Failed => Some("decoder: invalid data found when processing input".into()),
            JobState::Cancelled => Some("cancelled by dashboard admin".into()),
            _ => None,
        },
        attempts: 1,
        seq: 0,
        created_at_ms: created,
        updated_at_ms: finished,
        finished_at_ms: Some(finished),
        custody: None,
        submitted_by: None,
        history: Vec::new(),
    }
}

struct Bench {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    state: AppState,
    agents: Vec<(AgentId, u64)>,
    succeeded: usize,
    history: usize,
    setup_secs: f64,
}

fn setup(h: usize) -> Result<Bench> {
    let started = Instant::now();
    let dir = tempfile::tempdir().context("temp dir")?;
    let store = Arc::new(SledStore::open(&dir.path().join("db"))?);
    let now = gaffer_control::now_ms();
    let agents: Vec<(AgentId, u64)> = (0..AGENTS).map(|i| (Uuid::new_v4(), i as u64 + 1)).collect();
    for (i, (id, _)) in agents.iter().enumerate() {
        store.insert_agent(&agent_record(*id, i, now))?;
    }
    // The bench user's password is never checked (the session is made here, not by logging in).
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
        expires_at_ms: now + 24 * 3600 * 1000,
    })?;
    store.create_api_token(&ApiTokenRecord {
        hash: sha256(API_TOKEN.as_bytes()),
        name: "bench".into(),
        role: Role::Viewer,
        created_at_ms: now,
        expires_at_ms: now + 24 * 3600 * 1000,
        last_used_at_ms: None,
        created_by: "bench".into(),
    })?;
    let mut succeeded = 0;
    for i in 0..h {
        let job = history_job(i, h, agents[i % AGENTS].0, now);
        ensure!(store.insert_job(&job)?, "history job {} inserted twice", job.id);
        if job.state == JobState::Succeeded {
            succeeded += 1;
            if succeeded % 10 == 1 {
                store.put_digest(job.id, &small_digest(&job.path))?;
            }
        }
    }
    store.flush()?;
    let counts = store.job_counts()?;
    ensure!(
        counts.get(JobState::Succeeded) == succeeded as u64,
        "store counts {} succeeded jobs, inserted {succeeded}",
        counts.get(JobState::Succeeded)
    );
    let shared: Arc<dyn Store> = store.clone();
    let state = AppState::new(shared, SchedulerConfig::default());
    for (id, conn_id) in &agents {
        state
            .scheduler
            .fleet()
            .connect(*id, AgentConn { conn_id: *conn_id, site: SITE.into(), capabilities: capabilities() });
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!("history {h}: setup {setup_secs:.1} s");
    Ok(Bench { _dir: dir, store, state, agents, succeeded, history: h, setup_secs })
}

/// One lease round on `b`: submit → one lease pass → assigned. Returns (submit + pass, pass).
/// The job is then cancelled and the agents' outgoing queues drained, so every round starts
/// from the same fleet.
fn lease_round(b: &Bench, round: usize) -> Result<(Duration, Duration)> {
    let sched = &b.state.scheduler;
    let req = JobRequest {
        path: format!("/media/incoming/take{round:04}.mov"),
        site: SITE.into(),
        agent: None,
        profile: Profile::Shots,
        priority: Priority::Normal,
    };
    let t0 = Instant::now();
    let job = sched.submit(req, JobOrigin::Api, None, gaffer_control::now_ms())?;
    let t1 = Instant::now();
    let leased = sched.lease_pass(gaffer_control::now_ms())?;
    let t2 = Instant::now();
    let stored = b.store.get_job(job.id)?.context("submitted job vanished")?;
    ensure!(leased == 1, "lease pass leased {leased} jobs, expected 1");
    ensure!(stored.state == JobState::Assigned, "job is {} after the lease pass", stored.state.as_str());
    let Some(Lease { holder, .. }) = stored.lease else { bail!("assigned job has no lease") };
    ensure!(b.agents.iter().any(|(a, _)| *a == holder), "leased to an unknown agent");
    sched.cancel(job.id, "bench", gaffer_control::now_ms())?;
    for (agent, conn_id) in &b.agents {
        sched.fleet().take_outgoing(*agent, *conn_id, usize::MAX);
    }
    Ok((t2 - t0, t2 - t1))
}

/// The HTTP requests measured, with what a 200 body must show.
#[derive(Clone, Copy)]
enum Endpoint {
    Fleet,
    Metrics,
    Jobs,
}

impl Endpoint {
    const ALL: [Endpoint; 3] = [Endpoint::Fleet, Endpoint::Metrics, Endpoint::Jobs];

    fn request(self) -> Result<Request<Body>> {
        let req = match self {
            Endpoint::Fleet => Request::get("/")
                .header(header::COOKIE, format!("{}={SESSION_VALUE}", gaffer_control::http::SESSION_COOKIE)),
            Endpoint::Metrics => Request::get("/metrics"),
            Endpoint::Jobs => {
                Request::get("/api/v1/jobs?limit=100").header(header::AUTHORIZATION, format!("Bearer {API_TOKEN}"))
            }
        };
        Ok(req.body(Body::empty())?)
    }

    /// Checks a 200 body, so the benchmark cannot be timing an error page.
    fn check(self, b: &Bench, body: &str) -> Result<()> {
        match self {
            Endpoint::Fleet => ensure!(body.contains("gpu-box-00"), "fleet page does not list the agents"),
            Endpoint::Metrics => {
                let want = format!("gaffer_jobs{{state=\"succeeded\"}} {}", b.succeeded);
                ensure!(body.contains(&want), "/metrics lacks {want:?}");
            }
            Endpoint::Jobs => {
                let v: serde_json::Value = serde_json::from_str(body)?;
                let n = v.as_array().map_or(0, Vec::len);
                ensure!(n == 100, "listed {n} jobs, expected 100");
            }
        }
        Ok(())
    }
}

/// One GET through the router: its time (to the whole body) and the body.
async fn get_once(app: &Router, ep: Endpoint) -> Result<(Duration, String)> {
    let req = ep.request()?;
    let t0 = Instant::now();
    let resp = app.clone().oneshot(req).await?;
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 64 << 20).await?;
    let elapsed = t0.elapsed();
    let body = String::from_utf8(body.to_vec()).context("body is not UTF-8")?;
    if status != StatusCode::OK {
        bail!("{status}: {}", body.chars().take(500).collect::<String>());
    }
    Ok((elapsed, body))
}

/// Every measurement for every store, interleaved round by round (each round visits every
/// store), so load from elsewhere on the machine lands on all history sizes alike.
fn measure(benches: &[Bench], rounds: usize, rt: &tokio::runtime::Runtime) -> Result<Vec<Row>> {
    let n = benches.len();
    let mut lease = vec![Vec::with_capacity(rounds); n];
    let mut pass = vec![Vec::with_capacity(rounds); n];
    for round in 0..WARMUP + rounds {
        for (i, b) in benches.iter().enumerate() {
            let (total, p) = lease_round(b, round).with_context(|| format!("lease, history {}", b.history))?;
            if round >= WARMUP {
                lease[i].push(total);
                pass[i].push(p);
            }
        }
    }
    // After the lease rounds every store holds at least WARMUP + rounds >= 100 jobs to list.
    let apps: Vec<Router> = benches.iter().map(|b| router(b.state.clone())).collect();
    let mut http = vec![[Vec::with_capacity(rounds), Vec::with_capacity(rounds), Vec::with_capacity(rounds)]; n];
    for (i, b) in benches.iter().enumerate() {
        for ep in Endpoint::ALL {
            let (_, body) = rt.block_on(get_once(&apps[i], ep))?;
            ep.check(b, &body).with_context(|| format!("history {}", b.history))?;
        }
    }
    let http = rt.block_on(async move {
        // On a worker thread, as under `axum::serve`.
        tokio::spawn(async move {
            for round in 0..WARMUP + rounds {
                for (i, app) in apps.iter().enumerate() {
                    for (e, ep) in Endpoint::ALL.into_iter().enumerate() {
                        let (t, _) = get_once(app, ep).await?;
                        if round >= WARMUP {
                            http[i][e].push(t);
                        }
                    }
                }
            }
            anyhow::Ok(http)
        })
        .await
        .context("measurement task failed")?
    })?;
    Ok(benches
        .iter()
        .zip(lease.iter_mut().zip(pass.iter_mut()).zip(http))
        .map(|(b, ((l, p), mut h))| Row {
            history: b.history,
            setup_secs: b.setup_secs,
            lease: Stat::of(l),
            lease_pass: Stat::of(p),
            fleet_page: Stat::of(&mut h[0]),
            metrics: Stat::of(&mut h[1]),
            jobs_api: Stat::of(&mut h[2]),
        })
        .collect())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ratio(last: f64, first: f64) -> f64 {
    if first > 0.0 {
        last / first
    } else {
        f64::NAN
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let benches = HISTORY_SIZES.into_iter().map(setup).collect::<Result<Vec<_>>>()?;
    let load_before = loadavg();
    let rows = measure(&benches, args.rounds, &rt)?;
    let load_after = loadavg();
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    let ratios = [
        ("lease", ratio(last.lease.p50_us, first.lease.p50_us)),
        ("lease_pass", ratio(last.lease_pass.p50_us, first.lease_pass.p50_us)),
        ("fleet_page", ratio(last.fleet_page.p50_us, first.fleet_page.p50_us)),
        ("metrics", ratio(last.metrics.p50_us, first.metrics.p50_us)),
        ("jobs_api", ratio(last.jobs_api.p50_us, first.jobs_api.p50_us)),
    ];
    if args.json {
        let ratio_obj: serde_json::Map<String, serde_json::Value> =
            ratios.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect();
        let obj = serde_json::json!({
            "rounds": args.rounds,
            "agents": AGENTS,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "rows": rows,
            "p50_ratio_largest_to_empty": ratio_obj,
        });
        println!("{obj}");
        return Ok(());
    }
    println!(
        "history bench: {} rounds per store (stores measured interleaved), {AGENTS} agents x 4 slots",
        args.rounds
    );
    println!("loadavg (1/5/15 min) before {load_before}, after {load_after}");
    println!("times in µs, p50 / p99; lease = submit + one lease pass until assigned (two fsyncs)");
    println!(
        "{:>10} | {:>17} | {:>17} | {:>17} | {:>17} | {:>19}",
        "history", "lease", "lease pass", "fleet page /", "/metrics", "jobs API ?limit=100"
    );
    let cell = |s: &Stat| format!("{:.0} / {:.0}", s.p50_us, s.p99_us);
    for r in &rows {
        println!(
            "{:>10} | {:>17} | {:>17} | {:>17} | {:>17} | {:>19}",
            r.history,
            cell(&r.lease),
            cell(&r.lease_pass),
            cell(&r.fleet_page),
            cell(&r.metrics),
            cell(&r.jobs_api)
        );
    }
    let rc = |v: f64| format!("{v:.2}x");
    println!(
        "{:>10} | {:>17} | {:>17} | {:>17} | {:>17} | {:>19}",
        format!("{}/{}", last.history, first.history),
        rc(ratios[0].1),
        rc(ratios[1].1),
        rc(ratios[2].1),
        rc(ratios[3].1),
        rc(ratios[4].1)
    );
    println!("(last row: p50 with the largest history over p50 with none)");
    Ok(())
}
