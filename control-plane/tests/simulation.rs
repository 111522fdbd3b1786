//! Deterministic simulation of the fleet core (quinn-proto's `Pair`, TigerBeetle's VOPR).
//!
//! One control plane — the real [`AgentConnCore`] per connection (the sans-IO
//! [`gaffer_protocol::session::ControlSession`] plus the control plane's handling of its events),
//! the real scheduler, job state machine and ingest, over the in-memory store — and a few agents,
//! each the real [`AgentSession`] plus a model of the agent's durable state (outbox, job queue)
//! and of its runner (jobs take a while, sometimes fail or crash). Between them a simulated
//! network: byte chunks split and delayed at random, connections severed (the control plane
//! notices late, so an old connection can still deliver after a new one is up), partitions.
//! Faults: agent crashes and restarts (with their durable state), control-plane crashes and
//! restarts (with the store), wall-clock jumps. Operators submit, cancel and retry at random; jobs
//! are queued before, during and after agents connect.
//!
//! After every step the invariants are checked (see [`Sim::check`]); after the chaos phase the
//! network heals and every job must end within a bounded simulated time. Each seed is one run; a
//! failure prints its seed, and `GAFFER_SIM_SEED=<seed>` replays exactly that run.
//! `GAFFER_SIM_SEEDS=N` sets how many seeds run (default 2000; `GAFFER_SIM_FIRST_SEED` the first);
//! `GAFFER_SIM_KEEP_GOING=1` counts every failing seed instead of stopping at the first. For a
//! replay, `GAFFER_SIM_TRACE_FROM=<ms>` prints the fleet after every scheduler pass from that
//! simulated time on, and `GAFFER_SIM_DEBUG=1` adds the fleet's state to the failure message.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaffer_control::ingest::Ingest;
use gaffer_control::jobs::JobPolicy;
use gaffer_control::link::AgentConnCore;
use gaffer_control::scheduler::{JobRequest, SchedulerConfig, MAILBOX_ASSIGN_MAX};
use gaffer_control::store::mem_store::MemStore;
use gaffer_control::store::{AgentRecord, JobOrigin, JobQuery, JobRecord, JobState, Priority, Scheduling, Store};
use gaffer_control::AppState;
use gaffer_protocol::digest::{Digest, ShotAnalysis, SourceInfo, TechnicalMetadata, DIGEST_SCHEMA_VERSION};
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{AgentId, AgentMessage, Assignment, Capabilities, HeldJob, JobId, Profile};
use gaffer_protocol::session::{AgentEvent, AgentSession, AgentSessionConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SITE: &str = "s1";
const HEARTBEAT_SECS: u32 = 5;
/// Simulated time of one step, ms (the step length itself is random up to this).
const STEP_MS_MAX: u64 = 250;
/// Chaos phase length, simulated ms.
const CHAOS_MS: u64 = 180_000;
/// After the network heals, every job must be final within this plus [`heal_bound_ms`]'s share
/// for the work itself, simulated ms: a job whose holder vanished just before the heal waits out
/// the lease grace (30 s) or the assign timeout (30 s) before it runs again.
const HEAL_BASE_MS: u64 = 150_000;
/// Longest a simulated job runs, ms.
const JOB_RUN_MS_MAX: u64 = 20_000;
/// How long after the control plane loses a connection it notices, at most, ms.
const NOTICE_DELAY_MS_MAX: u64 = 12_000;

/// Knobs that vary per seed.
#[derive(Debug, Clone)]
struct Scenario {
    agents: usize,
    jobs: usize,
    p_submit: f64,
    p_agent_crash: f64,
    p_cp_crash: f64,
    p_sever: f64,
    p_partition: f64,
    p_cancel: f64,
    p_retry: f64,
    p_clock_jump: f64,
    p_worker_crash: f64,
    p_watch: f64,
    latency_ms_max: u64,
    /// An operator cordons, drains (with or without a deadline) or uncordons an agent.
    p_cordon: f64,
}

impl Scenario {
    fn random(rng: &mut StdRng) -> Self {
        Self {
            agents: rng.gen_range(1..=4),
            jobs: rng.gen_range(1..=24),
            p_submit: rng.gen_range(0.005..0.08),
            p_agent_crash: rng.gen_range(0.0..0.004),
            p_cp_crash: rng.gen_range(0.0..0.0015),
            p_sever: rng.gen_range(0.0..0.006),
            p_partition: rng.gen_range(0.0..0.002),
            p_cancel: rng.gen_range(0.0..0.01),
            p_retry: rng.gen_range(0.0..0.01),
            p_clock_jump: rng.gen_range(0.0..0.001),
            p_worker_crash: rng.gen_range(0.0..0.3),
            p_watch: rng.gen_range(0.0..0.003),
            latency_ms_max: rng.gen_range(1..400),
            p_cordon: rng.gen_range(0.0..0.004),
        }
    }
}

/// A byte stream in one direction of one connection.
#[derive(Default)]
struct Pipe {
    chunks: VecDeque<(u64, Vec<u8>)>,
}

impl Pipe {
    fn push(&mut self, rng: &mut StdRng, now: u64, latency_max: u64, bytes: Vec<u8>) {
        // Split at random, keep order: a later chunk never arrives before an earlier one.
        let last = self.chunks.back().map_or(0, |c| c.0);
        let mut at = (now + rng.gen_range(0..=latency_max)).max(last);
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let n = if rng.gen_bool(0.3) { rng.gen_range(1..=rest.len()) } else { rest.len() };
            self.chunks.push_back((at, rest[..n].to_vec()));
            rest = &rest[n..];
            at += rng.gen_range(0..3);
        }
    }

    fn due(&mut self, now: u64, coalesce: bool) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        while self.chunks.front().is_some_and(|c| c.0 <= now) {
            let Some((_, bytes)) = self.chunks.pop_front() else { break };
            match out.last_mut() {
                // Several chunks in one read: the case the drain bug got wrong.
                Some(prev) if coalesce => prev.extend_from_slice(&bytes),
                _ => out.push(bytes),
            }
        }
        out
    }
}

struct Conn {
    agent: usize,
    to_cp: Pipe,
    to_agent: Pipe,
    /// The agent side is gone (severed or agent crashed): nothing more goes to the agent.
    agent_gone: bool,
    /// When the control plane notices the connection is gone (then its core finishes).
    cp_notices_at: Option<u64>,
    core: Option<AgentConnCore>,
}

/// A job in an agent's durable queue.
#[derive(Debug, Clone)]
struct Held {
    assignment: Assignment,
    /// Set while running: when it finishes.
    finish_at: Option<u64>,
}

struct SimAgent {
    id: AgentId,
    caps: Capabilities,
    // Durable (survive a crash):
    outbox: BTreeMap<u64, AgentMessage>,
    next_seq: u64,
    held: Vec<Held>,
    // Volatile:
    running: bool,
    restart_at: u64,
    conn: Option<(u64, AgentSession)>,
    reconnect_at: u64,
    backoff_ms: u64,
    partitioned_until: u64,
}

impl SimAgent {
    fn push(&mut self, msg: AgentMessage) {
        self.next_seq += 1;
        self.outbox.insert(self.next_seq, msg);
    }
}

/// What the simulation remembers about a job to check the invariants.
#[derive(Debug, Default, Clone)]
struct Track {
    finishes: u32,
    retries: u32,
    last_state: Option<JobState>,
    assigned_since: Option<u64>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    sc: Scenario,
    base: Instant,
    /// Simulated time since the start, ms.
    t: u64,
    /// Offset of the control plane's wall clock (clock jumps), ms.
    clock_offset_ms: i64,
    store: Arc<MemStore>,
    state: AppState,
    ingest: Arc<Ingest>,
    cp_up: bool,
    cp_restart_at: u64,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    agents: Vec<SimAgent>,
    jobs: Vec<JobId>,
    track: BTreeMap<JobId, Track>,
    watermarks: BTreeMap<AgentId, u64>,
    healed_at: Option<u64>,
    calm_since: u64,
    last_pass: u64,
    watched: usize,
    free_since: BTreeMap<usize, u64>,
    /// Agents an operator took out of rotation (cordoned or draining), as set in the store.
    cordoned: BTreeMap<AgentId, Scheduling>,
    /// Every (job, lease id) seen so far, with its holder: a new one must never name an agent
    /// out of rotation.
    leases_seen: BTreeMap<(JobId, u64), AgentId>,
}

const EPOCH_MS: u64 = 1_800_000_000_000;

fn policy() -> JobPolicy {
    JobPolicy::default()
}

fn digest_marker(agent: AgentId, lease_id: u64) -> String {
    format!("sim:{agent}:{lease_id}")
}

fn digest(path: &str, agent: AgentId, lease_id: u64) -> Digest {
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo { path: path.into(), size_bytes: 1, modified_unix_secs: None },
        technical: TechnicalMetadata {
            container: digest_marker(agent, lease_id),
            container_long_name: String::new(),
            duration_secs: Some(1.0),
            bit_rate_bps: None,
            streams: Vec::new(),
            primary_video_stream: None,
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 25,
            frames_corrupt: 0,
            cuts: Vec::new(),
            shots: Vec::new(),
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: Vec::new(),
        analysis_secs: 1.0,
    }
}

fn health() -> Health {
    Health {
        sampled_at_unix_ms: 0,
        source: HealthSource::CpuOnly { reason: "simulated".into() },
        cpu_percent: 1.0,
        load_avg_1m: 0.1,
        memory_used_bytes: 1,
        memory_total_bytes: 2,
        disks: Vec::new(),
        gpus: Vec::new(),
        inference: None,
        jobs_running: 0,
        job_slots: 1,
        jobs_queued: 0,
        outbox_pending: 0,
        outbox_full: false,
    }
}

/// Path of job `n`: `/media/<n>.mov` (every agent), `/archive/<n>.mov` (only agents with the
/// archive volume), or a bad file (fails permanently).
fn job_path(rng: &mut StdRng, n: usize) -> String {
    match rng.gen_range(0..10) {
        0 => format!("/media/bad-{n}.mov"),
        1 | 2 => format!("/archive/{n}.mov"),
        _ => format!("/media/{n}.mov"),
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let sc = Scenario::random(&mut rng);
        let store = Arc::new(MemStore::new());
        let agents: Vec<SimAgent> = (0..sc.agents)
            .map(|i| {
                let mut volumes = vec!["/media".to_owned()];
                // Agent 0 always has the archive, so every job can run somewhere.
                if i == 0 || rng.gen_bool(0.3) {
                    volumes.push("/archive".to_owned());
                }
                SimAgent {
                    id: uuid::Uuid::from_u128(0xa000 + i as u128),
                    caps: Capabilities {
                        gpus: Vec::new(),
                        volumes,
                        watch_roots: Vec::new(),
                        job_slots: rng.gen_range(1..=3),
                        profiles: vec![Profile::Shots],
                        models: Vec::new(),
                    },
                    outbox: BTreeMap::new(),
                    next_seq: 0,
                    held: Vec::new(),
                    running: false,
                    // Agents come up at random times: some jobs are queued first.
                    restart_at: rng.gen_range(0..20_000),
                    conn: None,
                    reconnect_at: 0,
                    backoff_ms: 500,
                    partitioned_until: 0,
                }
            })
            .collect();
        for a in &agents {
            let rec = AgentRecord {
                cert_not_after_unix: 4_000_000_000,
                ..AgentRecord::new(a.id, SITE, format!("gpu-{}", a.id), EPOCH_MS)
            };
            if let Err(e) = store.insert_agent(&rec) {
                panic!("seed {seed}: insert agent: {e}");
            }
        }
        let (state, ingest) = control_plane(store.clone());
        Sim {
            seed,
            rng,
            sc,
            base: Instant::now(),
            t: 0,
            clock_offset_ms: 0,
            store,
            state,
            ingest,
            cp_up: true,
            cp_restart_at: 0,
            conns: BTreeMap::new(),
            next_conn: 1,
            agents,
            jobs: Vec::new(),
            track: BTreeMap::new(),
            watermarks: BTreeMap::new(),
            healed_at: None,
            calm_since: 0,
            last_pass: 0,
            watched: 0,
            free_since: BTreeMap::new(),
            cordoned: BTreeMap::new(),
            leases_seen: BTreeMap::new(),
        }
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.t)
    }

    fn cp_now_ms(&self) -> u64 {
        (EPOCH_MS + self.t).saturating_add_signed(self.clock_offset_ms)
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "simulation seed {} failed at t={} ms: {what}\n  scenario: {:?}\n{}\n  replay: GAFFER_SIM_SEED={} cargo test -p gaffer-control --test simulation",
            self.seed, self.t, self.sc, self.dump(), self.seed
        );
    }

    /// The agents' side of things, for failure messages.
    fn dump(&self) -> String {
        let mut out = String::new();
        for a in &self.agents {
            out.push_str(&format!(
                "  agent {} running={} conn={:?} up={:?} window={:?} inflight={:?} slots={} held={:?} outbox={:?}\n",
                a.id,
                a.running,
                a.conn.as_ref().map(|c| c.0),
                a.conn.as_ref().map(|c| c.1.is_up()),
                a.conn.as_ref().map(|c| c.1.outbox_window()),
                a.conn.as_ref().map(|c| c.1.inflight_len()),
                a.caps.job_slots,
                a.held.iter().map(|h| (h.assignment.job_id, h.assignment.lease_id, h.finish_at)).collect::<Vec<_>>(),
                a.outbox.iter().map(|(s, m)| (*s, m.kind())).collect::<Vec<_>>(),
            ));
        }
        for (id, c) in &self.conns {
            out.push_str(&format!(
                "  connection {id}: agent {} agent_gone={} cp_notices_at={:?} core={:?} to_cp={} to_agent={}\n",
                c.agent,
                c.agent_gone,
                c.cp_notices_at,
                c.core.as_ref().map(|k| (k.is_registered(), k.session.is_up(), k.session.is_closed())),
                c.to_cp.chunks.iter().map(|(at, b)| (*at, b.len())).collect::<Vec<_>>().len(),
                c.to_agent.chunks.len()
            ));
            out.push_str(&format!(
                "    to_cp chunks (deliver at, bytes): {:?}\n",
                c.to_cp.chunks.iter().map(|(at, b)| (*at, b.len())).collect::<Vec<_>>()
            ));
        }
        let fleet = self.state.scheduler.fleet();
        let queued =
            self.store.jobs_in_state(JobState::Queued, 1000).map(|v| v.iter().map(|j| j.id).collect::<Vec<_>>());
        out.push_str(&format!("  queued by the state index: {queued:?}\n"));
        if std::env::var_os("GAFFER_SIM_DEBUG").is_some() {
            out.push_str(&format!("  fleet: {fleet:?}\n"));
            for a in self.store.list_audit(200).unwrap_or_default() {
                out.push_str(&format!("  audit {} {} {:?} {}\n", a.at_ms, a.action, a.job, a.detail));
            }
            let r = self.state.scheduler.lease_pass(self.cp_now_ms());
            out.push_str(&format!(
                "  a lease pass now: {r:?}; queued after it: {:?}\n",
                self.store.jobs_in_state(JobState::Queued, 10).map(|v| v.len())
            ));
            out.push_str(&format!("  last_pass {} t {} cp_up {}\n", self.last_pass, self.t, self.cp_up));
        }
        for a in &self.agents {
            out.push_str(&format!(
                "  fleet: {} connected={} outgoing={}\n",
                a.id,
                fleet.conn_id(a.id).is_some(),
                fleet.outgoing_len(a.id)
            ));
            for job in fleet.leases_of(a.id) {
                let rec = self.store.get_job(job).ok().flatten();
                out.push_str(&format!(
                    "  fleet lease of {}: {job} stored as {:?}\n",
                    a.id,
                    rec.map(|j| (j.state, j.lease, j.error))
                ));
            }
        }
        out
    }

    fn chaos(&self) -> bool {
        self.healed_at.is_none()
    }

    // ---- operators ------------------------------------------------------------------------

    fn submit(&mut self) {
        if self.jobs.len() >= self.sc.jobs {
            return;
        }
        let n = self.jobs.len();
        let path = job_path(&mut self.rng, n);
        let priority = [Priority::Low, Priority::Normal, Priority::High][self.rng.gen_range(0..3)];
        let req = JobRequest { path, site: SITE.into(), agent: None, profile: Profile::Shots, priority };
        let id = uuid::Uuid::from_u128(self.rng.gen());
        match self.state.scheduler.submit(req, JobOrigin::Api, Some(id), self.cp_now_ms()) {
            Ok(job) => {
                self.jobs.push(job.id);
                self.track.insert(job.id, Track::default());
            }
            Err(e) => self.fail(&format!("submit failed: {e}")),
        }
    }

    fn operator_action(&mut self, retry: bool) {
        if self.jobs.is_empty() {
            return;
        }
        let id = self.jobs[self.rng.gen_range(0..self.jobs.len())];
        let now = self.cp_now_ms();
        let r = if retry { self.state.scheduler.retry(id, now) } else { self.state.scheduler.cancel(id, "sim", now) };
        if let Err(e) = r {
            if !matches!(e, gaffer_control::scheduler::SubmitError::Refused(_)) {
                self.fail(&format!("operator action failed: {e}"));
            }
        }
    }

    // ---- faults ---------------------------------------------------------------------------

    fn sever(&mut self, conn_id: u64) {
        let delay = self.rng.gen_range(0..NOTICE_DELAY_MS_MAX);
        let t = self.t;
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.agent_gone = true;
            c.to_agent.chunks.clear();
            c.cp_notices_at.get_or_insert(t + delay);
            if let Some(a) = self.agents.get_mut(c.agent) {
                if a.conn.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                    a.conn = None;
                    a.reconnect_at = t + 500;
                }
            }
        }
    }

    fn crash_agent(&mut self, i: usize) {
        let down = self.rng.gen_range(100..20_000);
        if let Some((conn_id, _)) = self.agents[i].conn.take() {
            self.sever(conn_id);
        }
        let a = &mut self.agents[i];
        a.running = false;
        a.restart_at = self.t + down;
        for h in &mut a.held {
            h.finish_at = None; // re-run from the start after the restart
        }
    }

    fn crash_control_plane(&mut self) {
        // Connections die with the process; nothing of the in-memory state survives.
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(mut c) = self.conns.remove(&id) {
                c.core = None;
                if let Some(a) = self.agents.get_mut(c.agent) {
                    if a.conn.as_ref().is_some_and(|(cid, _)| *cid == id) {
                        a.conn = None;
                        a.reconnect_at = self.t + 500;
                    }
                }
            }
        }
        self.cp_up = false;
        self.cp_restart_at = self.t + self.rng.gen_range(100..15_000);
    }

    fn restart_control_plane(&mut self) {
        let store = Arc::new(self.store.snapshot());
        self.store = store.clone();
        let (state, ingest) = control_plane(store);
        self.state = state;
        self.ingest = ingest;
        self.cp_up = true;
        if let Err(e) = self.state.scheduler.recover(self.cp_now_ms()) {
            self.fail(&format!("recover failed: {e}"));
        }
    }

    // ---- agents ---------------------------------------------------------------------------

    fn connect(&mut self, i: usize) {
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let a = &self.agents[i];
        let running_jobs =
            a.held.iter().map(|h| HeldJob { job_id: h.assignment.job_id, lease_id: h.assignment.lease_id }).collect();
        let cfg = AgentSessionConfig {
            agent_id: a.id,
            agent_version: "sim".into(),
            hostname: format!("gpu-{i}"),
            capabilities: a.caps.clone(),
            running_jobs,
            ..AgentSessionConfig::default()
        };
        let session = AgentSession::new(cfg, self.instant());
        let core = AgentConnCore::new(
            self.state.clone(),
            self.ingest.clone(),
            a.id,
            conn_id,
            HEARTBEAT_SECS,
            None,
            self.instant(),
        );
        self.conns.insert(
            conn_id,
            Conn {
                agent: i,
                to_cp: Pipe::default(),
                to_agent: Pipe::default(),
                agent_gone: false,
                cp_notices_at: None,
                core: Some(core),
            },
        );
        self.agents[i].conn = Some((conn_id, session));
    }

    /// The agent's runner: start held jobs while slots are free, finish running ones.
    fn run_jobs(&mut self, i: usize) {
        let t = self.t;
        let chaos = self.chaos();
        let p_crash = self.sc.p_worker_crash;
        let slots = self.agents[i].caps.job_slots as usize;
        let mut finished = Vec::new();
        {
            let a = &mut self.agents[i];
            for h in a.held.iter().filter(|h| h.finish_at.is_some_and(|f| f <= t)) {
                finished.push(h.assignment.clone());
            }
            a.held.retain(|h| h.finish_at.is_none_or(|f| f > t));
        }
        for asg in finished {
            let id = self.agents[i].id;
            let msg = if asg.path.contains("/bad-") {
                AgentMessage::JobFailed {
                    job_id: asg.job_id,
                    lease_id: asg.lease_id,
                    reason: "not a media file".into(),
                    retryable: false,
                }
            } else if chaos && self.rng.gen_bool(p_crash) {
                AgentMessage::JobFailed {
                    job_id: asg.job_id,
                    lease_id: asg.lease_id,
                    reason: "analysis worker killed by signal 9 (SIGKILL)".into(),
                    retryable: true,
                }
            } else {
                AgentMessage::Digest {
                    job_id: asg.job_id,
                    lease_id: asg.lease_id,
                    digest: Box::new(digest(&asg.path, id, asg.lease_id)),
                }
            };
            self.agents[i].push(msg);
        }
        loop {
            let a = &self.agents[i];
            let busy = a.held.iter().filter(|h| h.finish_at.is_some()).count();
            let Some(k) = a.held.iter().position(|h| h.finish_at.is_none()) else { break };
            if busy >= slots {
                break;
            }
            let took = self.rng.gen_range(200..JOB_RUN_MS_MAX);
            let a = &mut self.agents[i];
            a.held[k].finish_at = Some(t + took);
            let (job_id, lease_id) = (a.held[k].assignment.job_id, a.held[k].assignment.lease_id);
            a.push(AgentMessage::JobAccepted { job_id, lease_id });
        }
    }

    /// The agent's link driver: the same event handling as `agent/src/link.rs`.
    fn drive_agent(&mut self, i: usize) {
        let now = self.instant();
        let latency = self.sc.latency_ms_max;
        let t = self.t;
        let Some((conn_id, mut session)) = self.agents[i].conn.take() else { return };
        // Input that has arrived.
        let coalesce = self.rng.gen_bool(0.5);
        if let Some(c) = self.conns.get_mut(&conn_id) {
            for bytes in c.to_agent.due(t, coalesce) {
                session.handle_input(&bytes, now);
            }
        }
        if session.poll_timeout().is_some_and(|d| d <= now) {
            session.handle_timeout(now);
        }
        let mut closed = false;
        let trace = env_u64("GAFFER_SIM_TRACE_FROM").is_some_and(|from| t >= from);
        while let Some(event) = session.poll_event() {
            if trace {
                eprintln!("t={t} agent {i} conn {conn_id}: {event:?}");
            }
            let a = &mut self.agents[i];
            match event {
                AgentEvent::Welcomed { .. } => a.backoff_ms = 500,
                AgentEvent::Assign(asg) => match a.held.iter_mut().find(|h| h.assignment.job_id == asg.job_id) {
                    // A newer lease for a job it holds: adopt it (as the real runner does), and
                    // say so if it is already running.
                    Some(h) if h.assignment.lease_id != asg.lease_id => {
                        h.assignment.lease_id = asg.lease_id;
                        let running = h.finish_at.is_some();
                        if running {
                            a.push(AgentMessage::JobAccepted { job_id: asg.job_id, lease_id: asg.lease_id });
                        }
                    }
                    Some(_) => {}
                    None => a.held.push(Held { assignment: asg, finish_at: None }),
                },
                AgentEvent::Cancel { job_id, .. } => a.held.retain(|h| h.assignment.job_id != job_id),
                AgentEvent::Acked(seq) | AgentEvent::Rejected { seq, .. } => {
                    a.outbox.remove(&seq);
                }
                AgentEvent::RetryLater { .. } => {}
                AgentEvent::HeartbeatDue => session.send_heartbeat(health(), now),
                AgentEvent::Closed { .. } => closed = true,
                // The simulation's agents keep one identity; certificates are tested at the real
                // QUIC endpoint (tests/tests/identity.rs).
                AgentEvent::Certificate { .. }
                | AgentEvent::CertificateRefused { .. }
                | AgentEvent::TrustBundle { .. }
                | AgentEvent::RenewCertificate { .. }
                | AgentEvent::ReleaseKey { .. }
                | AgentEvent::Update(_)
                | AgentEvent::UpdateWithdrawn { .. } => {}
            }
        }
        self.run_jobs(i);
        // Fill the outbox window.
        if let Some((after, max)) = session.outbox_window() {
            let batch: Vec<(u64, AgentMessage)> =
                self.agents[i].outbox.range(after + 1..).take(max).map(|(s, m)| (*s, m.clone())).collect();
            for (seq, msg) in batch {
                if trace {
                    eprintln!("t={t} agent {i} conn {conn_id}: sends {seq} {}", msg.kind());
                }
                if session.send_outbox(seq, msg).is_err() {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        while let Some(bytes) = session.poll_transmit() {
            out.push(bytes);
        }
        if let Some(c) = self.conns.get_mut(&conn_id) {
            for bytes in out {
                if c.cp_notices_at.is_none() {
                    c.to_cp.push(&mut self.rng, t, latency, bytes);
                }
            }
        }
        if closed || session.is_closed() {
            let backoff = self.agents[i].backoff_ms;
            self.agents[i].reconnect_at = t + self.rng.gen_range(0..=backoff);
            self.agents[i].backoff_ms = (backoff * 2).min(30_000);
            self.sever(conn_id);
        } else {
            self.agents[i].conn = Some((conn_id, session));
        }
    }

    // ---- control plane ----------------------------------------------------------------------

    fn drive_control_plane(&mut self) {
        let now = self.instant();
        let now_ms = self.cp_now_ms();
        let t = self.t;
        let latency = self.sc.latency_ms_max;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let coalesce = self.rng.gen_bool(0.5);
            let Some(c) = self.conns.get_mut(&id) else { continue };
            let Some(mut core) = c.core.take() else { continue };
            for bytes in c.to_cp.due(t, coalesce) {
                core.handle_input(&bytes, now);
            }
            let notice = c.cp_notices_at.is_some_and(|n| n <= t);
            if notice {
                core.session.handle_end_of_stream(now);
            }
            if core.session.poll_timeout().is_some_and(|d| d <= now) {
                core.session.handle_timeout(now);
            }
            let closed = core.process(now_ms);
            let mut out = Vec::new();
            while let Some(bytes) = core.session.poll_transmit() {
                out.push(bytes);
            }
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if !c.agent_gone {
                for bytes in out {
                    c.to_agent.push(&mut self.rng, t, latency, bytes);
                }
            }
            if closed.is_some() || notice {
                core.finish(now_ms);
                let agent = c.agent;
                self.conns.remove(&id);
                if let Some(a) = self.agents.get_mut(agent) {
                    if a.conn.as_ref().is_some_and(|(cid, _)| *cid == id) {
                        // The agent hears of the close with the last bytes; model it at once.
                        a.conn = None;
                        a.reconnect_at = t + 500;
                    }
                }
            } else if let Some(c) = self.conns.get_mut(&id) {
                c.core = Some(core);
            }
        }
        if t >= self.last_pass + 1000 {
            self.last_pass = t;
            if let Err(e) = self.state.scheduler.deadline_pass(now_ms) {
                self.fail(&format!("deadline pass failed: {e}"));
            }
            if let Err(e) = self.state.scheduler.drain_pass(now_ms) {
                self.fail(&format!("drain pass failed: {e}"));
            }
            let leased = match self.state.scheduler.lease_pass(now_ms) {
                Ok(n) => n,
                Err(e) => self.fail(&format!("lease pass failed: {e}")),
            };
            if env_u64("GAFFER_SIM_TRACE_FROM").is_some_and(|from| t >= from) {
                let queued = self.store.jobs_in_state(JobState::Queued, 10).map(|v| v.len());
                let fleet = self.state.scheduler.fleet();
                let conns: Vec<_> = self
                    .agents
                    .iter()
                    .map(|a| {
                        let leases: Vec<_> = fleet
                            .leases_of(a.id)
                            .into_iter()
                            .map(|j| (j, self.store.get_job(j).ok().flatten().map(|r| (r.state, r.lease))))
                            .collect();
                        (fleet.conn_id(a.id), leases)
                    })
                    .collect();
                eprintln!("t={t} pass leased {leased}, queued {queued:?}, fleet {conns:?}");
            }
            self.check_after_passes(now_ms);
        }
    }

    // ---- the loop -------------------------------------------------------------------------

    fn step(&mut self) {
        self.t += self.rng.gen_range(1..=STEP_MS_MAX);
        let sc = self.sc.clone();
        if self.rng.gen_bool(sc.p_submit) || (self.healed_at.is_some() && self.jobs.len() < sc.jobs) {
            self.submit();
        }
        if self.chaos() {
            if self.rng.gen_bool(sc.p_cancel) {
                self.operator_action(false);
            }
            if self.rng.gen_bool(sc.p_retry) {
                self.operator_action(true);
            }
            if self.rng.gen_bool(sc.p_clock_jump) {
                // NTP steps: mostly forward (past deadlines), sometimes back.
                self.clock_offset_ms += if self.rng.gen_bool(0.8) { self.rng.gen_range(1_000..90_000) } else { -5_000 };
            }
            if self.rng.gen_bool(sc.p_cordon) {
                self.cordon_action();
            }
            if self.cp_up && self.rng.gen_bool(sc.p_cp_crash) {
                self.crash_control_plane();
            }
            for i in 0..self.agents.len() {
                if self.agents[i].running && self.rng.gen_bool(sc.p_agent_crash) {
                    self.crash_agent(i);
                }
                if self.rng.gen_bool(sc.p_sever) {
                    if let Some((id, _)) = self.agents[i].conn.as_ref() {
                        let id = *id;
                        self.sever(id);
                    }
                }
                if self.agents[i].running && self.watched < sc.jobs / 2 && self.rng.gen_bool(sc.p_watch) {
                    // A file lands in the agent's watch folder: it asks for a job (pinned to it).
                    self.watched += 1;
                    let job_id = uuid::Uuid::from_u128(self.rng.gen());
                    let path = format!("/media/watch-{}.mov", self.watched);
                    // As the real agent: submit, and run it itself under lease 0.
                    let a = &mut self.agents[i];
                    a.push(AgentMessage::SubmitWatched { job_id, path: path.clone(), profile: Profile::Shots });
                    let assignment = Assignment {
                        job_id,
                        lease_id: gaffer_protocol::messages::LEASE_ID_NONE,
                        path,
                        profile: Profile::Shots,
                    };
                    a.held.push(Held { assignment, finish_at: None });
                }
                if self.rng.gen_bool(sc.p_partition) {
                    let until = self.t + self.rng.gen_range(1_000..60_000);
                    self.agents[i].partitioned_until = until;
                    if let Some((id, _)) = self.agents[i].conn.as_ref() {
                        let id = *id;
                        self.sever(id);
                    }
                }
            }
        }
        if !self.cp_up && self.t >= self.cp_restart_at {
            self.restart_control_plane();
        }
        for i in 0..self.agents.len() {
            let a = &self.agents[i];
            if !a.running && self.t >= a.restart_at {
                self.agents[i].running = true;
                self.agents[i].reconnect_at = self.t;
            }
            let a = &self.agents[i];
            if a.running && a.conn.is_none() && self.t >= a.reconnect_at && self.t >= a.partitioned_until {
                if self.cp_up {
                    self.connect(i);
                    self.calm_since = self.t;
                } else {
                    let backoff = self.agents[i].backoff_ms;
                    self.agents[i].reconnect_at = self.t + self.rng.gen_range(0..=backoff);
                    self.agents[i].backoff_ms = (backoff * 2).min(30_000);
                }
            }
            if self.agents[i].running {
                self.drive_agent(i);
            }
        }
        if self.cp_up {
            self.drive_control_plane();
        }
        self.check();
    }

    /// An operator cordons, drains or uncordons a random agent (through the scheduler, as the
    /// admin socket and the API do). Agents out of rotation take no new lease ([`Sim::check`]).
    fn cordon_action(&mut self) {
        let i = self.rng.gen_range(0..self.agents.len());
        let id = self.agents[i].id;
        let now = self.cp_now_ms();
        let scheduling = if self.cordoned.contains_key(&id) {
            Scheduling::Active
        } else if self.rng.gen_bool(0.5) {
            Scheduling::Cordoned { by: "op".into(), at_ms: now }
        } else {
            let deadline_ms = self.rng.gen_bool(0.7).then(|| now + self.rng.gen_range(0..60_000));
            Scheduling::Draining { by: "op".into(), at_ms: now, deadline_ms }
        };
        self.set_scheduling(id, scheduling);
    }

    /// Through the live scheduler, or (control plane down, as `gaffer-control agent uncordon`
    /// without a server) in the store, read when the agent next connects.
    fn set_scheduling(&mut self, id: AgentId, scheduling: Scheduling) {
        let set = if self.cp_up {
            self.state.scheduler.set_scheduling(id, scheduling.clone())
        } else {
            self.store.update_agent(id, &mut |a| a.scheduling = scheduling.clone())
        };
        match set {
            Ok(Some(_)) => {}
            Ok(None) => self.fail(&format!("set_scheduling: agent {id} not found")),
            Err(e) => self.fail(&format!("set_scheduling: {e}")),
        }
        if scheduling.is_active() {
            self.cordoned.remove(&id);
        } else {
            self.cordoned.insert(id, scheduling);
        }
    }

    fn heal(&mut self) {
        self.healed_at = Some(self.t);
        // The operator puts every agent back in rotation (jobs pinned to one must run).
        for id in self.cordoned.keys().copied().collect::<Vec<_>>() {
            self.set_scheduling(id, Scheduling::Active);
        }
        self.calm_since = self.t;
        if !self.cp_up {
            self.cp_restart_at = self.t;
        }
        for a in &mut self.agents {
            a.partitioned_until = 0;
            if !a.running {
                a.restart_at = a.restart_at.min(self.t);
            }
        }
    }

    /// The heal bound: the base, plus every job running once more (twice, for one that was
    /// cut short by the heal) on the fewest slots that can take it (agent 0's).
    fn heal_bound_ms(&self) -> u64 {
        let jobs = (self.sc.jobs + self.sc.jobs / 2) as u64;
        let slots = u64::from(self.agents[0].caps.job_slots.max(1));
        HEAL_BASE_MS + jobs.div_ceil(slots) * JOB_RUN_MS_MAX * 2
    }

    fn all_jobs(&self) -> Vec<JobRecord> {
        let mut out = Vec::new();
        let mut q = JobQuery { limit: 1000, ..JobQuery::default() };
        loop {
            let page = match self.store.list_jobs(&q) {
                Ok(p) => p,
                Err(e) => self.fail(&format!("list_jobs: {e}")),
            };
            out.extend(page.jobs);
            match page.next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        out
    }

    /// Invariants checked after every step.
    fn check(&mut self) {
        // Since when each agent has had a free slot without a break.
        for (i, a) in self.agents.iter().enumerate() {
            let busy = a.held.iter().filter(|h| h.finish_at.is_some()).count();
            if busy < a.caps.job_slots as usize {
                self.free_since.entry(i).or_insert(self.t);
            } else {
                self.free_since.remove(&i);
            }
        }
        let jobs = self.all_jobs();
        // A lease granted after an agent went out of rotation never names it (watch-folder
        // files the agent found itself run where they were found).
        for j in &jobs {
            let Some(l) = j.lease else { continue };
            if self.leases_seen.insert((j.id, l.lease_id), l.holder).is_none()
                && self.cordoned.contains_key(&l.holder)
                && !matches!(j.origin, JobOrigin::WatchFolder { agent } if agent == l.holder)
            {
                self.fail(&format!(
                    "job {} leased (lease {}) to agent {}, which is {:?}",
                    j.id, l.lease_id, l.holder, self.cordoned[&l.holder]
                ));
            }
        }
        // Counts kept by the store match the jobs.
        let counts = match self.store.job_counts() {
            Ok(c) => c,
            Err(e) => self.fail(&format!("job_counts: {e}")),
        };
        for st in JobState::ALL {
            let n = jobs.iter().filter(|j| j.state == st).count() as u64;
            if counts.get(st) != n {
                self.fail(&format!("store counts {} {} jobs, there are {n}", counts.get(st), st.as_str()));
            }
        }
        for j in &jobs {
            // A lease exactly while assigned or running; a failed job says why.
            if j.lease.is_some() != matches!(j.state, JobState::Assigned | JobState::Running) {
                self.fail(&format!("job {} is {} with lease {:?}", j.id, j.state.as_str(), j.lease));
            }
            if j.state == JobState::Failed && j.error.is_none() {
                self.fail(&format!("job {} failed without a reason", j.id));
            }
            // A digest is stored only from the current lease holder, under the current lease.
            let digest = match self.store.get_digest(j.id) {
                Ok(d) => d,
                Err(e) => self.fail(&format!("get_digest: {e}")),
            };
            if (j.state == JobState::Succeeded) != digest.is_some() {
                self.fail(&format!("job {} is {} and has digest: {}", j.id, j.state.as_str(), digest.is_some()));
            }
            if let (Some(d), Some(agent)) = (&digest, j.agent) {
                let expected = digest_marker(agent, j.lease_epoch);
                // A watch-folder job its agent ran on its own reports under lease 0.
                let own_run = matches!(j.origin, JobOrigin::WatchFolder { agent: a } if a == agent)
                    && d.technical.container == digest_marker(agent, gaffer_protocol::messages::LEASE_ID_NONE);
                if d.technical.container != expected && !own_run {
                    self.fail(&format!(
                        "job {} holds the digest of {} but succeeded under {expected}",
                        j.id, d.technical.container
                    ));
                }
            }
            // Every job ends at most once per operator retry.
            let t = self.t;
            let tr = self.track.entry(j.id).or_default();
            let was_final = tr.last_state.is_some_and(|s| s.is_terminal());
            if j.state.is_terminal() && !was_final {
                tr.finishes += 1;
            }
            if !j.state.is_terminal() && was_final {
                tr.retries += 1;
            }
            if j.state == JobState::Assigned {
                tr.assigned_since.get_or_insert(t);
            } else {
                tr.assigned_since = None;
            }
            tr.last_state = Some(j.state);
            let (finishes, retries, since) = (tr.finishes, tr.retries, tr.assigned_since);
            if finishes > retries + 1 {
                self.fail(&format!("job {} finished {finishes} times after {retries} retries", j.id));
            }
            // Calm network: an assignment is accepted within 5 s of its holder having a free slot
            // (a holder whose slots are taken queues it, as the real runner does).
            let calm = self.healed_at.is_some() && t > self.calm_since + 15_000;
            let holder_free_since = j
                .lease
                .and_then(|l| self.agents.iter().position(|a| a.id == l.holder))
                .and_then(|i| self.free_since.get(&i).copied());
            let waiting_since = since.zip(holder_free_since).map(|(s, f)| s.max(f));
            if calm && waiting_since.is_some_and(|s| s + 5_000 < t && s > self.calm_since) {
                self.fail(&format!("job {} assigned for {} ms on a calm network", j.id, t - since.unwrap_or(t)));
            }
        }
        // No message is applied twice: the watermarks only grow.
        for a in &self.agents {
            let w = match self.store.last_applied_seq(a.id) {
                Ok(w) => w.unwrap_or(0),
                Err(e) => self.fail(&format!("last_applied_seq: {e}")),
            };
            let before = self.watermarks.insert(a.id, w).unwrap_or(0);
            if w < before {
                self.fail(&format!("watermark of agent {} went back from {before} to {w}", a.id));
            }
            if w > a.next_seq {
                self.fail(&format!("watermark {w} of agent {} is past anything it sent", a.id));
            }
        }
    }

    /// Right after the scheduler's passes: no job waits queued while an eligible agent is idle,
    /// and no lease is past its deadline.
    fn check_after_passes(&self, now_ms: u64) {
        let fleet = self.state.scheduler.fleet();
        for j in self.all_jobs() {
            let own_start = matches!(j.origin, JobOrigin::WatchFolder { .. })
                && j.lease_epoch == 0
                && now_ms < j.created_at_ms + policy().assign_timeout_ms;
            if j.state == JobState::Queued && !own_start {
                for a in &self.agents {
                    let Some(_) = fleet.conn_id(a.id) else { continue };
                    if self.cordoned.contains_key(&a.id) {
                        continue;
                    }
                    let leased = fleet.leases_of(a.id).len();
                    let eligible = j.pinned_agent.is_none_or(|p| p == a.id)
                        && a.caps.volumes.iter().any(|v| gaffer_control::scheduler::path_is_under(&j.path, v));
                    if eligible && leased < a.caps.job_slots as usize && fleet.outgoing_len(a.id) < MAILBOX_ASSIGN_MAX {
                        self.fail(&format!(
                            "job {} ({}) waits queued while agent {} is connected with {leased}/{} slots busy",
                            j.id, j.path, a.id, a.caps.job_slots
                        ));
                    }
                }
            }
            // Right after the drain pass: nothing is left leased to a connected agent whose drain
            // deadline has passed.
            if let Some(l) = j.lease.filter(|l| fleet.conn_id(l.holder).is_some()) {
                if let Some(Scheduling::Draining { deadline_ms: Some(d), .. }) = self.cordoned.get(&l.holder) {
                    if *d <= now_ms {
                        self.fail(&format!(
                            "job {} still leased to agent {} {} ms after its drain deadline",
                            j.id,
                            l.holder,
                            now_ms - d
                        ));
                    }
                }
            }
            if let Some(d) = j.lease.and_then(|l| l.deadline_ms) {
                if d <= now_ms {
                    self.fail(&format!("job {} is {} past its deadline by {} ms", j.id, j.state.as_str(), now_ms - d));
                }
            }
        }
    }

    fn run(mut self) {
        while self.t < CHAOS_MS {
            self.step();
        }
        self.heal();
        let bound = self.heal_bound_ms();
        let deadline = self.t + bound;
        loop {
            self.step();
            let jobs = self.all_jobs();
            let open: Vec<&JobRecord> = jobs.iter().filter(|j| !j.state.is_terminal()).collect();
            let drained = self.agents.iter().all(|a| a.outbox.is_empty() && a.held.is_empty());
            if open.is_empty() && jobs.len() >= self.sc.jobs && drained {
                return;
            }
            if self.t > deadline {
                let open: Vec<String> = open
                    .iter()
                    .map(|j| format!("{j:?} pending_reason={:?}", self.state.scheduler.pending_reason(j.id)))
                    .collect();
                let outboxes: Vec<usize> = self.agents.iter().map(|a| a.outbox.len()).collect();
                self.fail(&format!(
                    "{} s after the heal: not final: {open:?}; outbox entries per agent {outboxes:?}",
                    bound / 1000
                ));
            }
        }
    }
}

fn control_plane(store: Arc<MemStore>) -> (AppState, Arc<Ingest>) {
    let cfg = SchedulerConfig { policy: policy(), ..SchedulerConfig::default() };
    let state = AppState::new(store, cfg);
    let ingest = Arc::new(Ingest::new(state.clone()));
    (state, ingest)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// How many test functions the seeds are shared out between, so the test runner can run them on
/// every core at once (each part runs every `SIM_PARTS`th quarter of the range, in order).
const SIM_PARTS: u64 = 4;

/// Runs part `part` (0-based) of the seed range: `GAFFER_SIM_SEEDS` seeds (default 2000) from
/// `GAFFER_SIM_FIRST_SEED` (default 0), split into [`SIM_PARTS`] contiguous ranges. With
/// `GAFFER_SIM_SEED` set, part 0 replays that one seed and the other parts do nothing.
fn simulate_part(part: u64) {
    if let Some(seed) = env_u64("GAFFER_SIM_SEED") {
        if part == 0 {
            Sim::new(seed).run();
        }
        return;
    }
    let first_all = env_u64("GAFFER_SIM_FIRST_SEED").unwrap_or(0);
    let n_all = env_u64("GAFFER_SIM_SEEDS").unwrap_or(2000);
    let first = first_all + n_all * part / SIM_PARTS;
    let end = first_all + n_all * (part + 1) / SIM_PARTS;
    let n = end - first;
    let started = Instant::now();
    if std::env::var_os("GAFFER_SIM_KEEP_GOING").is_some() {
        // Count every failing seed (for planted-bug runs) instead of stopping at the first.
        std::panic::set_hook(Box::new(|_| {}));
        let failed: Vec<u64> =
            (first..end).filter(|&seed| std::panic::catch_unwind(|| Sim::new(seed).run()).is_err()).collect();
        let _ = std::panic::take_hook();
        eprintln!(
            "simulation: {} of {n} seeds from {first} failed in {:.1} s; first failing seeds: {:?}",
            failed.len(),
            started.elapsed().as_secs_f64(),
            &failed[..failed.len().min(20)]
        );
        assert!(failed.is_empty(), "{} of {n} seeds failed", failed.len());
        return;
    }
    for seed in first..end {
        Sim::new(seed).run();
    }
    eprintln!("simulation: {n} seeds from {first} passed in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn fleet_core_simulation_keeps_its_invariants_part_1() {
    simulate_part(0);
}

#[test]
fn fleet_core_simulation_keeps_its_invariants_part_2() {
    simulate_part(1);
}

#[test]
fn fleet_core_simulation_keeps_its_invariants_part_3() {
    simulate_part(2);
}

#[test]
fn fleet_core_simulation_keeps_its_invariants_part_4() {
    simulate_part(3);
}

/// The regression the simulation was built for: jobs queued before any agent connects, agents
/// that come up 0–50 ms apart, every job done.
#[test]
fn jobs_queued_before_agents_connect_all_finish() {
    for seed in 0..200u64 {
        let mut sim = Sim::new(1_000_000 + seed);
        sim.sc = Scenario {
            agents: 1 + (seed % 3) as usize,
            jobs: 8,
            p_submit: 0.0,
            p_agent_crash: 0.0,
            p_cp_crash: 0.0,
            p_sever: 0.0,
            p_partition: 0.0,
            p_cancel: 0.0,
            p_retry: 0.0,
            p_clock_jump: 0.0,
            p_worker_crash: 0.0,
            p_watch: 0.0,
            latency_ms_max: 5,
            p_cordon: 0.0,
        };
        for _ in 0..8 {
            sim.submit();
        }
        for (k, a) in sim.agents.iter_mut().enumerate() {
            a.restart_at = 1 + (seed * 7 + k as u64 * 13) % 50;
        }
        sim.heal();
        let deadline = 120_000;
        while sim.t < deadline {
            sim.step();
            if sim.all_jobs().iter().all(|j| j.state.is_terminal()) {
                break;
            }
        }
        // Bad media fails (once, with its reason); everything else succeeds.
        let stuck: Vec<String> = sim
            .all_jobs()
            .iter()
            .filter(|j| j.state != if j.path.contains("/bad-") { JobState::Failed } else { JobState::Succeeded })
            .map(|j| format!("{j:?}"))
            .collect();
        assert!(stuck.is_empty(), "seed {}: jobs not done after {deadline} ms: {stuck:?}\n{}", sim.seed, sim.dump());
    }
}
