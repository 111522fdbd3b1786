//! Staged rollouts: a seeded simulation of the sans-IO [`RolloutBook`] against modelled agents,
//! and the [`Rollouts`] driver over the in-memory store and a real [`Fleet`].
//!
//! **The simulation.** A few agents (some speaking an older protocol, some air-gapped, some already
//! on the version, in two sites), each a model of the updating agent: it takes an order, fetches
//! (which may fail), reports `Staged`, restarts into the new version (reconnecting with its new
//! version), heartbeats for the health wait and reports `Healthy`, or crashes in its health gate,
//! puts the old version back, reconnects on it and reports `Failed { rolled_back: true }`. Reports
//! sit in the agent's outbox until acknowledged: they are delivered in any order, duplicated, and
//! only while the agent is connected. Agents connect and disconnect at random, before and after a
//! rollout starts; the operator starts (also while one is active), pauses, resumes and aborts;
//! old and unknown rollout ids are reported; the clock sometimes jumps far forward. Messages from
//! the book reach an agent only if it is connected when they are taken (as [`Fleet::send`]).
//! Air-gapped agents never connect: they sync by bundles at random moments, each carrying every
//! report of their outbox and their version, and take the order a reply carries
//! ([`RolloutBook::order_for_bundle`]); replies are sometimes never imported; their health gate
//! counts time, not link time.
//!
//! After every step [`Sim::check`] checks the invariants: at most one rollout is active; no order
//! reaches a non-canary before every canary is healthy (or skipped); no order for a rollout after
//! it halted or was aborted, and none while it is paused except a staged target's resend; no agent
//! is ordered to the version it runs, nor one speaking an older protocol; a halted rollout names
//! an agent whose target failed; an active rollout has no failed target; the holds the fleet was
//! given match the book. After the chaos the network heals: every agent connects and behaves,
//! a paused rollout is resumed, and the active rollout must end — completed, with every target
//! healthy or skipped and running the version, unless a target failed, in which case it halted
//! naming it.
//!
//! A failure prints its seed; `GAFFER_ROLLOUT_SEED=<seed>` replays exactly that run,
//! `GAFFER_ROLLOUT_SEEDS=N` sets how many run (default 500).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gaffer_control::metrics::Metrics;
use gaffer_control::release::{ReleaseRecord, Releases};
use gaffer_control::rollout::{
    Candidate, Phase, RolloutBook, RolloutError, RolloutRelease, RolloutSpec, RolloutState, Rollouts, TargetState,
    HEALTH_REPORT_GRACE_SECS,
};
use gaffer_control::scheduler::{AgentConn, Fleet};
use gaffer_control::store::mem_store::MemStore;
use gaffer_control::store::{audit_action, Actor, AgentRecord, Store};
use gaffer_protocol::messages::{AgentId, Capabilities, ControlMessage, UpdateOrder, UpdateOutcome, UpdateReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OLD: &str = "1.0.0";
const VERSIONS: [&str; 2] = ["1.1.0", "1.2.0"];

fn release(version: &str) -> RolloutRelease {
    RolloutRelease {
        version: version.to_owned(),
        file_name: format!("gaffer-agent-{version}-x86_64-linux.tar.gz"),
        size_bytes: 1234,
        sha256: "ab".repeat(32),
    }
}

/// Where a model agent is in applying an order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Fetching and verifying the artifact.
    Fetching,
    /// Verified; restarts when idle.
    Staged,
    /// Running the new version in its health gate since `since_ms`.
    Gate { since_ms: u64 },
}

#[derive(Debug, Clone)]
struct Update {
    order: UpdateOrder,
    stage: Stage,
    previous: String,
}

#[derive(Debug)]
struct Agent {
    id: AgentId,
    site: String,
    hostname: String,
    version: String,
    protocol: u16,
    offline: bool,
    connected: bool,
    /// The version from its last Hello (what the store knows).
    hello_version: Option<String>,
    update: Option<Update>,
    /// Reports not acknowledged yet.
    outbox: Vec<UpdateReport>,
    /// Final outcome per rollout id (an order for a finished rollout is answered with it again).
    done: BTreeMap<u64, UpdateReport>,
    /// Whether the fetch of the next order fails.
    bad_fetch: bool,
    /// Whether the new version crashes in its health gate.
    bad_version: bool,
    /// The hold the fleet has for it (set on connect and by hold changes while connected).
    hold: Option<String>,
}

struct Sim {
    rng: StdRng,
    book: RolloutBook,
    agents: Vec<Agent>,
    now_ms: u64,
    /// Rollouts seen halted or aborted: no order for them may ever be sent again.
    stopped: BTreeSet<u64>,
    log: Vec<String>,
    starts: usize,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(1..=7);
        let agents = (0..n)
            .map(|i| {
                let already = rng.gen_bool(0.1);
                Agent {
                    id: AgentId::from_u128(0x1000 + rng.gen_range(0..1000u128) * 16 + i as u128),
                    site: if rng.gen_bool(0.3) { "b".into() } else { "a".into() },
                    hostname: format!("gpu{i}"),
                    version: if already { VERSIONS[0].into() } else { OLD.into() },
                    protocol: if rng.gen_bool(0.1) { 4 } else { 5 },
                    offline: rng.gen_bool(0.2),
                    connected: false,
                    hello_version: rng.gen_bool(0.7).then(|| if already { VERSIONS[0].into() } else { OLD.into() }),
                    update: None,
                    outbox: Vec::new(),
                    done: BTreeMap::new(),
                    bad_fetch: rng.gen_bool(0.05),
                    bad_version: rng.gen_bool(0.1),
                    hold: None,
                }
            })
            .collect();
        Sim {
            rng,
            book: RolloutBook::new(),
            agents,
            now_ms: 1_700_000_000_000,
            stopped: BTreeSet::new(),
            log: Vec::new(),
            starts: 0,
        }
    }

    fn fail(&self, what: String) -> anyhow::Error {
        let tail: Vec<&String> = self.log.iter().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        anyhow::anyhow!("{what}\nlast steps:\n  {}", tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "))
    }

    /// Delivers the book's output: messages to connected agents (the rest are dropped, as
    /// `Fleet::send` drops them), hold changes to connected agents; checks each order.
    fn pump(&mut self) -> anyhow::Result<()> {
        for (agent, hold) in self.book.take_hold_changes() {
            if let Some(a) = self.agents.iter_mut().find(|a| a.id == agent).filter(|a| a.connected) {
                a.hold = hold;
            }
        }
        for (agent, msg) in self.book.take_messages() {
            let Some(i) = self.agents.iter().position(|a| a.id == agent) else {
                return Err(self.fail(format!("message {msg:?} to an unknown agent {agent}")));
            };
            if let ControlMessage::Update(order) = &msg {
                self.check_order(i, order)?;
            }
            if !self.agents[i].connected {
                continue;
            }
            self.log.push(format!("  -> {} {}", self.agents[i].hostname, msg.kind()));
            let a = &mut self.agents[i];
            match msg {
                ControlMessage::Update(order) => {
                    if let Some(report) = a.done.get(&order.rollout_id) {
                        a.outbox.push(report.clone());
                    } else if a.update.as_ref().is_none_or(|u| u.order.rollout_id != order.rollout_id) {
                        a.update = Some(Update { order, stage: Stage::Fetching, previous: a.version.clone() });
                    }
                }
                ControlMessage::UpdateWithdrawn { rollout_id, .. } => {
                    if a.update
                        .as_ref()
                        .is_some_and(|u| u.order.rollout_id == rollout_id && !matches!(u.stage, Stage::Gate { .. }))
                    {
                        a.update = None;
                    }
                }
                other => return Err(self.fail(format!("unexpected message {other:?}"))),
            }
        }
        Ok(())
    }

    /// An order the book emitted for agent `i`.
    fn check_order(&self, i: usize, order: &UpdateOrder) -> anyhow::Result<()> {
        let a = &self.agents[i];
        let id = order.rollout_id;
        if self.stopped.contains(&id) {
            return Err(self.fail(format!("order of rollout {id} to {} after it halted or was aborted", a.hostname)));
        }
        let Some(r) = self.book.get(id) else { return Err(self.fail(format!("order of unknown rollout {id}"))) };
        let Some(t) = r.targets.get(&a.id) else {
            return Err(self.fail(format!("order of rollout {id} to {}, not a target", a.hostname)));
        };
        if a.connected && a.version == order.version {
            return Err(self.fail(format!("{} ordered to {}, the version it runs", a.hostname, order.version)));
        }
        if a.connected && a.protocol < 5 {
            return Err(self.fail(format!("{} speaks protocol {} and got an order", a.hostname, a.protocol)));
        }
        if !t.canary {
            if let Some((c, ct)) = r.targets.iter().find(|(_, ct)| ct.canary && !ct.state.is_done()) {
                return Err(self.fail(format!(
                    "order to non-canary {} while canary {c} is {}",
                    a.hostname,
                    ct.state.as_str()
                )));
            }
        }
        match &r.state {
            RolloutState::Running => {}
            RolloutState::Paused if t.state == TargetState::Staged => {}
            other => {
                return Err(self.fail(format!(
                    "order to {} ({}) while rollout {id} is {}",
                    a.hostname,
                    t.state.as_str(),
                    other.as_str()
                )))
            }
        }
        Ok(())
    }

    fn connect(&mut self, i: usize) -> anyhow::Result<()> {
        let a = &mut self.agents[i];
        if a.offline || a.connected {
            return Ok(());
        }
        a.connected = true;
        a.hold = None;
        a.hello_version = Some(a.version.clone());
        let (id, version, protocol) = (a.id, a.version.clone(), a.protocol);
        self.log.push(format!("{} connects on {version} (protocol {protocol})", a.hostname));
        self.book.on_agent_connected(id, &version, protocol, self.now_ms);
        self.agents[i].hold = self.book.hold(id);
        self.pump()
    }

    fn disconnect(&mut self, i: usize) {
        let a = &mut self.agents[i];
        if a.connected {
            a.connected = false;
            a.hold = None;
            self.log.push(format!("{} disconnects", a.hostname));
        }
    }

    fn report(&mut self, i: usize, outcome: UpdateOutcome) {
        let a = &mut self.agents[i];
        let Some(u) = &a.update else { return };
        let report = UpdateReport { rollout_id: u.order.rollout_id, version: u.order.version.clone(), outcome };
        if !matches!(report.outcome, UpdateOutcome::Staged) {
            a.done.insert(report.rollout_id, report.clone());
        }
        a.outbox.push(report);
    }

    /// Moves agent `i`'s update one step on.
    fn progress(&mut self, i: usize, healing: bool) -> anyhow::Result<()> {
        let Some(u) = self.agents[i].update.clone() else { return Ok(()) };
        let host = self.agents[i].hostname.clone();
        match u.stage {
            Stage::Fetching => {
                if self.agents[i].bad_fetch && !healing {
                    self.agents[i].bad_fetch = false;
                    self.log.push(format!("{host} fetch fails"));
                    let running_version = self.agents[i].version.clone();
                    self.report(
                        i,
                        UpdateOutcome::Failed {
                            reason: "signature does not verify".into(),
                            rolled_back: false,
                            running_version,
                        },
                    );
                    self.agents[i].update = None;
                } else {
                    self.log.push(format!("{host} staged"));
                    self.report(i, UpdateOutcome::Staged);
                    if let Some(u) = &mut self.agents[i].update {
                        u.stage = Stage::Staged;
                    }
                }
            }
            Stage::Staged => {
                // Restart into the new version: the link goes down and comes back.
                self.log.push(format!("{host} restarts into {}", u.order.version));
                self.disconnect(i);
                let a = &mut self.agents[i];
                a.version = u.order.version.clone();
                if let Some(u) = &mut a.update {
                    u.stage = Stage::Gate { since_ms: self.now_ms };
                }
                self.connect(i)?;
            }
            Stage::Gate { since_ms } => {
                // Without a link, the gate counts time run.
                if !self.agents[i].connected && !self.agents[i].offline {
                    return Ok(());
                }
                if self.agents[i].bad_version && !healing {
                    self.log.push(format!("{host} crashes in its health gate and rolls back"));
                    self.disconnect(i);
                    self.agents[i].version = u.previous.clone();
                    self.connect(i)?;
                    self.report(
                        i,
                        UpdateOutcome::Failed {
                            reason: format!("version {} exited with status 3", u.order.version),
                            rolled_back: true,
                            running_version: u.previous.clone(),
                        },
                    );
                    self.agents[i].update = None;
                } else if self.now_ms >= since_ms + u64::from(u.order.health_wait_secs) * 1000 {
                    self.log.push(format!("{host} healthy"));
                    self.report(i, UpdateOutcome::Healthy);
                    self.agents[i].update = None;
                }
            }
        }
        Ok(())
    }

    /// Delivers one report of agent `i`'s outbox, picked at random; it stays (a duplicate later)
    /// unless acknowledged.
    fn deliver_report(&mut self, i: usize) -> anyhow::Result<()> {
        let a = &self.agents[i];
        if !a.connected || a.outbox.is_empty() {
            return Ok(());
        }
        let k = self.rng.gen_range(0..a.outbox.len());
        let report = a.outbox[k].clone();
        let (id, host) = (a.id, a.hostname.clone());
        let changed = self.book.on_report(id, &report, self.now_ms);
        self.log.push(format!(
            "{host} reports {:?} for rollout {} (changed: {changed})",
            report.outcome, report.rollout_id
        ));
        if self.rng.gen_bool(0.7) {
            self.agents[i].outbox.remove(k);
        }
        self.pump()
    }

    /// An air-gapped agent `i` syncs: its bundle carries every report of its outbox (in order) and
    /// the version it runs; the reply (lost at times, but never while healing) acknowledges them
    /// and may carry an order, which it takes as a linked agent takes one.
    fn sync_bundle(&mut self, i: usize, healing: bool) -> anyhow::Result<()> {
        if !self.agents[i].offline {
            return Ok(());
        }
        let (id, host, version) = (self.agents[i].id, self.agents[i].hostname.clone(), self.agents[i].version.clone());
        let reports = self.agents[i].outbox.clone();
        for report in &reports {
            let changed = self.book.on_report(id, report, self.now_ms);
            self.log.push(format!(
                "{host} bundle reports {:?} for rollout {} (changed: {changed})",
                report.outcome, report.rollout_id
            ));
        }
        self.book.on_agent_bundle(id, Some(&version), self.now_ms);
        self.pump()?;
        let order = self.book.order_for_bundle(id);
        if let Some(order) = &order {
            if version == order.version {
                return Err(self.fail(format!("{host} ordered in a bundle to {version}, the version it runs")));
            }
            self.check_order(i, order)?;
            let id_state = |b: &RolloutBook| b.get(order.rollout_id).and_then(|r| r.targets.get(&id).cloned());
            self.book.on_bundle_order_written(id, order, self.now_ms);
            if id_state(&self.book).is_none_or(|t| t.state != TargetState::Ordered && !t.state.is_final()) {
                return Err(self.fail(format!("{host} not ordered after its reply carried the order")));
            }
            self.pump()?;
        }
        self.log.push(format!(
            "{host} syncs a bundle on {version}: reply carries {:?}",
            order.as_ref().map(|o| o.rollout_id)
        ));
        if !healing && self.rng.gen_bool(0.2) {
            self.log.push(format!("{host} never imports the reply"));
            return Ok(());
        }
        let a = &mut self.agents[i];
        a.outbox.drain(..reports.len());
        if let Some(order) = order {
            if let Some(report) = a.done.get(&order.rollout_id) {
                a.outbox.push(report.clone());
            } else if a.update.as_ref().is_none_or(|u| u.order.rollout_id != order.rollout_id) {
                a.update = Some(Update { order, stage: Stage::Fetching, previous: a.version.clone() });
            }
        }
        Ok(())
    }

    fn candidates(&mut self) -> Vec<Candidate> {
        self.agents
            .iter()
            .map(|a| Candidate {
                agent_id: a.id,
                site: a.site.clone(),
                hostname: a.hostname.clone(),
                agent_version: a.hello_version.clone(),
                connected: a.connected,
                offline: a.offline,
                revoked: false,
            })
            .collect()
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let version = VERSIONS[self.rng.gen_range(0..VERSIONS.len())];
        let spec = RolloutSpec {
            version: version.to_owned(),
            site: if self.rng.gen_bool(0.2) { Some("a".into()) } else { None },
            canary: self.rng.gen_range(0..=3),
            health_wait_secs: self.rng.gen_range(1..=120),
        };
        let active = self.book.active().map(|r| r.id);
        let candidates = self.candidates();
        match self.book.start(&release(version), &spec, &candidates, "operator", self.now_ms) {
            Ok(id) => {
                if let Some(a) = active {
                    return Err(self.fail(format!("rollout {id} started while {a} was active")));
                }
                self.starts += 1;
                self.log.push(format!("start rollout {id}: {spec:?}"));
            }
            Err(RolloutError::AlreadyActive { id, .. }) if Some(id) == active => {}
            Err(RolloutError::NothingToUpdate { .. }) => {}
            Err(e) => return Err(self.fail(format!("start refused: {e}"))),
        }
        self.pump()
    }

    fn step(&mut self, healing: bool) -> anyhow::Result<()> {
        let n = self.agents.len();
        let i = self.rng.gen_range(0..n);
        match self.rng.gen_range(0..100) {
            0..=24 => self.progress(i, healing)?,
            25..=49 => self.deliver_report(i)?,
            50..=59 => self.connect(i)?,
            60..=64 if !healing => self.disconnect(i),
            65..=79 => {
                let step = if !healing && self.rng.gen_bool(0.05) {
                    // A clock jump past every report deadline.
                    (HEALTH_REPORT_GRACE_SECS + 200) * 1000 + self.rng.gen_range(0..3_600_000)
                } else {
                    self.rng.gen_range(0..30_000)
                };
                self.now_ms += step;
                self.book.tick(self.now_ms);
                self.pump()?;
            }
            80..=83 if !healing => self.start()?,
            84..=85 if !healing => {
                let r = self.book.pause(self.now_ms);
                self.log.push(format!("pause: {r:?}"));
                self.pump()?;
            }
            86..=88 => {
                let r = self.book.resume(self.now_ms);
                self.log.push(format!("resume: {r:?}"));
                self.pump()?;
            }
            89 if !healing => {
                let r = self.book.abort("operator", self.now_ms);
                self.log.push(format!("abort: {r:?}"));
                self.pump()?;
            }
            93..=97 => self.sync_bundle(i, healing)?,
            90..=92 => {
                // A report for a rollout that does not exist, or an old one's final report again.
                let a = &self.agents[i];
                let old = a.done.values().next().cloned();
                let report = match old {
                    Some(r) if self.rng.gen_bool(0.5) => r,
                    _ => UpdateReport {
                        rollout_id: if self.rng.gen_bool(0.5) { 0 } else { 10_000 },
                        version: VERSIONS[0].into(),
                        outcome: UpdateOutcome::Healthy,
                    },
                };
                if a.connected {
                    let id = a.id;
                    let known = self.book.get(report.rollout_id).is_some();
                    let changed = self.book.on_report(id, &report, self.now_ms);
                    if changed && !known {
                        return Err(
                            self.fail(format!("a report for unknown rollout {} changed the book", report.rollout_id))
                        );
                    }
                    self.pump()?;
                }
            }
            _ => {}
        }
        self.check()
    }

    fn check(&mut self) -> anyhow::Result<()> {
        let active: Vec<u64> = self.book.rollouts().filter(|r| r.state.is_active()).map(|r| r.id).collect();
        if active.len() > 1 {
            return Err(self.fail(format!("rollouts {active:?} are active at once")));
        }
        for r in self.book.rollouts() {
            let failed: Vec<&AgentId> = r
                .targets
                .iter()
                .filter(|(_, t)| matches!(t.state, TargetState::Failed { .. }))
                .map(|(a, _)| a)
                .collect();
            match &r.state {
                RolloutState::Running | RolloutState::Paused if !failed.is_empty() => {
                    return Err(self.fail(format!(
                        "rollout {} is {} with failed targets {failed:?}",
                        r.id,
                        r.state.as_str()
                    )));
                }
                RolloutState::Halted { agent_id, reason } => {
                    let ok = agent_id.is_some_and(|a| failed.contains(&&a));
                    if !ok {
                        return Err(self.fail(format!(
                            "rollout {} halted ({reason}) naming {agent_id:?}, failed: {failed:?}",
                            r.id
                        )));
                    }
                }
                RolloutState::Completed if !r.targets.values().all(|t| t.state.is_done()) => {
                    return Err(self.fail(format!("rollout {} completed with targets not done", r.id)));
                }
                _ => {}
            }
            if r.phase == Phase::General && r.state.is_active() {
                if let Some((a, t)) = r.targets.iter().find(|(_, t)| t.canary && !t.state.is_done()) {
                    return Err(self.fail(format!("general phase with canary {a} {}", t.state.as_str())));
                }
            }
            if matches!(r.state, RolloutState::Halted { .. } | RolloutState::Aborted { .. }) {
                self.stopped.insert(r.id);
            }
        }
        for a in self.agents.iter().filter(|a| a.connected) {
            let want = self.book.hold(a.id);
            if a.hold != want {
                return Err(self.fail(format!("{} has hold {:?}, the book says {want:?}", a.hostname, a.hold)));
            }
        }
        Ok(())
    }

    /// Heals: everyone connects and behaves; the active rollout must end.
    fn heal(&mut self) -> anyhow::Result<()> {
        for i in 0..self.agents.len() {
            self.connect(i)?;
        }
        for _ in 0..20_000 {
            if self.book.active().is_none() {
                break;
            }
            if self.book.active().is_some_and(|r| r.state == RolloutState::Paused) {
                self.book.resume(self.now_ms).map_err(|e| self.fail(format!("resume: {e}")))?;
                self.pump()?;
            }
            self.step(true)?;
        }
        if let Some(r) = self.book.active() {
            return Err(self.fail(format!("rollout {} still {} after healing", r.id, r.state.as_str())));
        }
        let Some(last) = self.book.rollouts().next_back() else { return Ok(()) };
        let failed = last.targets.values().any(|t| matches!(t.state, TargetState::Failed { .. }));
        match &last.state {
            RolloutState::Completed => {
                for (id, t) in &last.targets {
                    let a = self.agents.iter().find(|a| a.id == *id).ok_or_else(|| anyhow::anyhow!("agent"))?;
                    if t.state == TargetState::Healthy && a.version != last.version {
                        return Err(self.fail(format!("{} healthy but runs {}", a.hostname, a.version)));
                    }
                }
            }
            RolloutState::Halted { .. } if failed => {}
            RolloutState::Aborted { .. } => {}
            other => {
                return Err(self.fail(format!(
                    "rollout {} ended {} (failed targets: {failed})",
                    last.id,
                    other.as_str()
                )))
            }
        }
        Ok(())
    }
}

/// What the seeds did, to show the runs reach every outcome.
#[derive(Debug, Default)]
struct Tally {
    starts: usize,
    completed: usize,
    halted: usize,
    aborted: usize,
    general_after_canaries: usize,
    /// Air-gapped targets that ended healthy.
    offline_healthy: usize,
}

fn run_seed(seed: u64, tally: &mut Tally) -> anyhow::Result<()> {
    let mut sim = Sim::new(seed);
    let steps = sim.rng.gen_range(50..400);
    for _ in 0..steps {
        sim.step(false)?;
    }
    if sim.book.active().is_none() && sim.rng.gen_bool(0.5) {
        sim.start()?;
    }
    sim.heal()?;
    tally.starts += sim.starts;
    for r in sim.book.rollouts() {
        match r.state {
            RolloutState::Completed => tally.completed += 1,
            RolloutState::Halted { .. } => tally.halted += 1,
            RolloutState::Aborted { .. } => tally.aborted += 1,
            _ => {}
        }
        if r.phase == Phase::General && r.targets.values().any(|t| t.canary) {
            tally.general_after_canaries += 1;
        }
        tally.offline_healthy += r.targets.values().filter(|t| t.offline && t.state == TargetState::Healthy).count();
    }
    Ok(())
}

#[test]
fn simulated_rollouts_keep_their_invariants() {
    let seeds: Vec<u64> = match std::env::var("GAFFER_ROLLOUT_SEED") {
        Ok(s) => vec![s.parse().expect("GAFFER_ROLLOUT_SEED is a number")],
        Err(_) => {
            let n = std::env::var("GAFFER_ROLLOUT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(500u64);
            (0..n).collect()
        }
    };
    let mut tally = Tally::default();
    for seed in seeds.iter().copied() {
        if let Err(e) = run_seed(seed, &mut tally) {
            panic!("seed {seed} failed (replay with GAFFER_ROLLOUT_SEED={seed}): {e:#}");
        }
    }
    println!("{} seeds: {tally:?}", seeds.len());
    if seeds.len() >= 100 {
        // The runs reach every outcome.
        assert!(
            tally.completed > 0
                && tally.halted > 0
                && tally.aborted > 0
                && tally.general_after_canaries > 0
                && tally.offline_healthy > 0,
            "{tally:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The driver over the in-memory store and a real fleet.

struct Driver {
    _dir: tempfile::TempDir,
    store: Arc<MemStore>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    releases: Releases,
    agents: Vec<AgentId>,
}

fn caps() -> Capabilities {
    Capabilities {
        gpus: Vec::new(),
        volumes: vec!["/media".into()],
        watch_roots: Vec::new(),
        job_slots: 2,
        profiles: Vec::new(),
        models: Vec::new(),
    }
}

impl Driver {
    /// Three agents on `OLD` in site `a` (the first revoked if `revoked`), release 1.1.0 added.
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let dd = gaffer_control::datadir::DataDir::new(dir.path());
        let releases = Releases::new(&dd);
        std::fs::create_dir_all(releases.dir())?;
        let r = release(VERSIONS[0]);
        let record = ReleaseRecord {
            version: r.version,
            arch: "x86_64".into(),
            file_name: r.file_name,
            sha256: r.sha256,
            size_bytes: r.size_bytes,
            added_at_ms: 1,
            added_by: "test".into(),
            signer_fingerprint: serde_json::from_value(serde_json::json!("cd".repeat(32)))?,
        };
        std::fs::write(
            releases.dir().join("index.json"),
            serde_json::to_vec(&serde_json::json!({ "releases": [record] }))?,
        )?;
        let store = Arc::new(MemStore::new());
        let agents: Vec<AgentId> = (1..=3).map(AgentId::from_u128).collect();
        for (n, id) in agents.iter().enumerate() {
            store.insert_agent(&AgentRecord {
                cert_not_after_unix: 2_000_000_000,
                agent_version: Some(OLD.into()),
                ..AgentRecord::new(*id, "a", format!("gpu{n}"), 1)
            })?;
        }
        Ok(Driver {
            _dir: dir,
            store,
            fleet: Arc::new(Fleet::default()),
            metrics: Arc::new(Metrics::new()),
            releases,
            agents,
        })
    }

    fn load(&self) -> anyhow::Result<Arc<Rollouts>> {
        Ok(Rollouts::load(self.store.clone(), self.fleet.clone(), self.releases.clone(), self.metrics.clone())?)
    }

    fn connect(&self, rollouts: &Rollouts, agent: AgentId, version: &str, now_ms: u64) {
        self.fleet.connect(agent, AgentConn { conn_id: now_ms, site: "a".into(), capabilities: caps() });
        rollouts.on_agent_connected(agent, version, 5, now_ms);
    }

    fn outgoing(&self, agent: AgentId) -> Vec<ControlMessage> {
        match self.fleet.conn_id(agent) {
            Some(c) => self.fleet.take_outgoing(agent, c, 100),
            None => Vec::new(),
        }
    }
}

fn spec(canary: u32) -> RolloutSpec {
    RolloutSpec { version: VERSIONS[0].into(), site: None, canary, health_wait_secs: 60 }
}

fn report(outcome: UpdateOutcome) -> UpdateReport {
    UpdateReport { rollout_id: 1, version: VERSIONS[0].into(), outcome }
}

#[test]
fn driver_orders_canary_first_persists_and_resends_after_restart() -> anyhow::Result<()> {
    let d = Driver::new()?;
    let admin = Actor::User("alice".into());
    let rollouts = d.load()?;
    // Agent 2 and 3 are connected; agent 1 is not.
    d.connect(&rollouts, d.agents[1], OLD, 10);
    d.connect(&rollouts, d.agents[2], OLD, 10);

    let err = rollouts
        .start(RolloutSpec { version: "9.9.9".into(), ..spec(1) }, &admin, 20)
        .expect_err("an unknown release is refused");
    assert!(matches!(err, RolloutError::UnknownRelease { .. }), "{err}");
    assert!(err.to_string().contains("gaffer-control release add"), "{err}");

    let status = rollouts.start(spec(1), &admin, 20)?;
    assert_eq!(status.state, "running");
    assert_eq!(status.phase, "canary");
    // The canary is the first connected agent in host name order: gpu1.
    let canary = d.agents[1];
    let canaries: Vec<AgentId> = status.targets.iter().filter(|t| t.canary).map(|t| t.agent_id).collect();
    assert_eq!(canaries, vec![canary]);
    let out = d.outgoing(canary);
    assert!(
        matches!(&out[..], [ControlMessage::Update(o)] if o.rollout_id == 1 && o.version == VERSIONS[0]),
        "{out:?}"
    );
    assert!(d.outgoing(d.agents[2]).is_empty(), "no order to a non-canary before the canary is healthy");
    let again = rollouts.start(spec(0), &admin, 21).expect_err("one rollout at a time");
    assert!(matches!(again, RolloutError::AlreadyActive { id: 1, .. }), "{again}");

    // Staged: the canary takes no new jobs until it is healthy.
    rollouts.on_report(canary, &report(UpdateOutcome::Staged), 30)?;
    assert!(d.fleet.hold(canary).is_some());

    // The control plane restarts: the rollout comes back from the store, and the canary's order
    // and hold come back when it connects.
    let fleet = Arc::new(Fleet::default());
    let d = Driver { fleet, ..d };
    let rollouts = d.load()?;
    let status = rollouts.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].targets.iter().find(|t| t.agent_id == canary).map(|t| t.state.as_str()), Some("staged"));
    d.connect(&rollouts, canary, OLD, 40);
    assert!(matches!(&d.outgoing(canary)[..], [ControlMessage::Update(_)]), "order resent on connect");
    assert!(d.fleet.hold(canary).is_some(), "hold set again on the new connection");
    d.connect(&rollouts, d.agents[2], OLD, 40);
    assert!(d.outgoing(d.agents[2]).is_empty());

    // It restarts into the new version and reports healthy (twice: at-least-once).
    d.connect(&rollouts, canary, VERSIONS[0], 50);
    assert!(d.outgoing(canary).is_empty(), "no order to an agent on the version");
    rollouts.on_report(canary, &report(UpdateOutcome::Healthy), 60)?;
    rollouts.on_report(canary, &report(UpdateOutcome::Healthy), 61)?;
    assert_eq!(d.fleet.hold(canary), None);
    let status = &rollouts.status()[0];
    assert_eq!(status.phase, "general");
    assert!(matches!(&d.outgoing(d.agents[2])[..], [ControlMessage::Update(_)]));
    // Agent 1 is not connected: its order waits for its Hello.
    d.connect(&rollouts, d.agents[0], OLD, 70);
    assert!(matches!(&d.outgoing(d.agents[0])[..], [ControlMessage::Update(_)]));

    // Agent 3 fails: the rollout halts naming it, agent 1's unapplied order is withdrawn.
    let failed = d.agents[2];
    rollouts.on_report(
        failed,
        &report(UpdateOutcome::Failed {
            reason: "version 1.1.0 exited with status 3 before its self-test".into(),
            rolled_back: true,
            running_version: OLD.into(),
        }),
        80,
    )?;
    let status = &rollouts.status()[0];
    assert_eq!(status.state, "halted");
    assert_eq!(status.failed_agent, Some(failed));
    let reason = status.halt_reason.clone().unwrap_or_default();
    assert!(reason.contains("gpu2") && reason.contains("exited with status 3"), "{reason}");
    assert!(matches!(&d.outgoing(d.agents[0])[..], [ControlMessage::UpdateWithdrawn { rollout_id: 1, .. }]));
    let actions: Vec<String> = d.store.list_audit(100)?.into_iter().map(|a| a.action).collect();
    for action in [audit_action::ROLLOUT_START, audit_action::ROLLOUT_HALTED] {
        assert!(actions.iter().any(|a| a == action), "{action} audited: {actions:?}");
    }
    let halted = d.store.list_audit(100)?.into_iter().find(|a| a.action == audit_action::ROLLOUT_HALTED);
    assert_eq!(halted.and_then(|a| a.agent), Some(failed));
    let text = d.metrics.encode(d.store.as_ref());
    assert!(text.contains("gaffer_rollout_targets{state=\"failed\"} 1"), "{text}");
    assert!(text.contains("gaffer_rollout_targets{state=\"healthy\"} 1"), "{text}");
    assert!(text.contains("gaffer_update_reports_total{outcome=\"healthy\"} 2"), "{text}");
    assert!(text.contains("gaffer_update_reports_total{outcome=\"failed\"} 1"), "{text}");

    // A finished rollout stays listed; a new one may start.
    let next = rollouts.start(spec(0), &admin, 90)?;
    assert_eq!(next.id, 2);
    assert_eq!(rollouts.status().iter().map(|s| s.id).collect::<Vec<_>>(), vec![2, 1]);
    Ok(())
}

#[test]
fn driver_pause_resume_abort_and_nothing_to_do() -> anyhow::Result<()> {
    let d = Driver::new()?;
    let admin = Actor::User("alice".into());
    let rollouts = d.load()?;
    for a in &d.agents {
        d.connect(&rollouts, *a, OLD, 1);
    }
    assert!(matches!(rollouts.pause(&admin, 2), Err(RolloutError::NoActiveRollout)));
    rollouts.start(spec(0), &admin, 3)?;
    for a in &d.agents {
        assert!(matches!(&d.outgoing(*a)[..], [ControlMessage::Update(_)]), "canary 0: everyone at once");
    }
    rollouts.on_report(d.agents[0], &report(UpdateOutcome::Staged), 4)?;
    let paused = rollouts.pause(&admin, 5)?;
    assert_eq!(paused.state, "paused");
    // Unstaged orders are withdrawn; the staged agent goes ahead.
    assert!(d.outgoing(d.agents[0]).is_empty());
    for a in &d.agents[1..] {
        assert!(matches!(&d.outgoing(*a)[..], [ControlMessage::UpdateWithdrawn { .. }]));
    }
    assert!(matches!(rollouts.pause(&admin, 6), Err(RolloutError::WrongState { .. })));
    rollouts.resume(&admin, 7)?;
    assert!(d.outgoing(d.agents[0]).is_empty(), "the staged agent keeps its order");
    for a in &d.agents[1..] {
        assert!(matches!(&d.outgoing(*a)[..], [ControlMessage::Update(_)]), "resume orders again");
    }
    let aborted = rollouts.abort(&admin, 8)?;
    assert_eq!(aborted.state, "aborted");
    assert_eq!(aborted.aborted_by.as_deref(), Some("alice"));
    for a in &d.agents {
        assert!(matches!(&d.outgoing(*a)[..], [ControlMessage::UpdateWithdrawn { .. }]), "abort withdraws staged too");
        assert_eq!(d.fleet.hold(*a), None);
    }
    let actions: Vec<String> = d.store.list_audit(100)?.into_iter().map(|a| a.action).collect();
    for action in [audit_action::ROLLOUT_PAUSE, audit_action::ROLLOUT_RESUME, audit_action::ROLLOUT_ABORT] {
        assert!(actions.iter().any(|a| a == action), "{action} audited: {actions:?}");
    }

    // Everyone on the version: nothing to do.
    let d = Driver::new()?;
    let rollouts = d.load()?;
    for a in &d.agents {
        d.connect(&rollouts, *a, VERSIONS[0], 1);
    }
    let err = rollouts.start(spec(1), &admin, 2).expect_err("nothing to update");
    assert!(matches!(err, RolloutError::NothingToUpdate { .. }), "{err}");
    Ok(())
}

#[test]
fn silent_restarted_target_fails_after_the_health_wait_and_grace() -> anyhow::Result<()> {
    let d = Driver::new()?;
    let rollouts = d.load()?;
    let a = d.agents[0];
    d.connect(&rollouts, a, OLD, 1_000);
    rollouts.start(RolloutSpec { site: Some("a".into()), ..spec(1) }, &Actor::ControlPlane, 1_000)?;
    d.connect(&rollouts, a, VERSIONS[0], 2_000);
    let deadline = 2_000 + (60 + HEALTH_REPORT_GRACE_SECS) * 1000;
    rollouts.tick(deadline - 1);
    assert_eq!(rollouts.status()[0].state, "running");
    rollouts.tick(deadline);
    let status = &rollouts.status()[0];
    assert_eq!(status.state, "halted");
    assert_eq!(status.failed_agent, Some(a));
    assert!(status.halt_reason.as_deref().unwrap_or("").contains("no health report within 660 s"), "{status:?}");
    Ok(())
}
