//! Replicas: several `gaffer-control serve` processes sharing one store (PostgreSQL,
//! [`crate::store::pg_store`]), each on its own QUIC and HTTP addresses, any of them taking any
//! agent, API call or dashboard login.
//!
//! What replicas share is the store: every job, lease, agent record, user, session and token. What
//! each keeps to itself is its endpoint and the links on it ([`crate::scheduler::Fleet`]): a
//! replica leases queued jobs only to the agents connected to it (claims skip rows another
//! replica is writing: [`crate::store::Store::claim_job`]), and reaches agents on other replicas
//! through the store's events ([`StoreEvent`]): a job queued or a slot freed wakes every
//! replica's scheduler, a message for an agent connected elsewhere (a cancel, an update order) is
//! delivered by the replica that holds its link, a revocation closes the link wherever it is.
//!
//! **Liveness.** Every replica has a random id, new at every start ([`Replica::id`]), and writes a
//! heartbeat row every [`REPLICA_HEARTBEAT_INTERVAL`]; an agent's record names the replica holding
//! its link ([`crate::store::AgentRecord::link_replica`]). A replica whose row is older than
//! [`REPLICA_DEAD_AFTER_MS`] is dead: the leader (the oldest live replica) marks its agents
//! disconnected, which starts their leases' grace exactly as a closed link does, and removes the
//! row. Agents fail over to another address (`gaffer-agent run --control A --control B`) and their
//! Hello there reconciles their leases; a lease whose holder is on a live replica is never expired
//! by another one ([`Replica::holds_elsewhere`]).
//!
//! **The leader** runs what must run once for the whole control plane: the sweep of dead replicas,
//! rollout ticks and the retention sweep. It is the live replica that started first (ties by id),
//! which every replica computes alike from the same rows; for a heartbeat interval after a leader
//! dies two replicas may both act, and each of those tasks is safe to run twice.
//!
//! One `serve` on sled is a store with one replica: the same code, with nobody else's rows.

use std::sync::Mutex;
use std::time::Duration;

use gaffer_protocol::messages::{AgentId, ControlMessage};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::jobs::JobEvent;
use crate::store::{AgentRecord, ReplicaRecord, StoreError, StoreEvent, StoreEventEnvelope, UnixMs};
use crate::AppState;

/// How often a replica writes its heartbeat row and reads the others', 2 s.
pub const REPLICA_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A replica silent for longer than this is dead, ms (10 s: five missed heartbeats).
pub const REPLICA_DEAD_AFTER_MS: u64 = 10_000;
/// Events waiting to be published; past it, events are dropped with a warning (a dropped wake is
/// caught by the next scheduling tick, a dropped delivery by the agent's next Hello).
pub const PUBLISH_QUEUE_MAX: usize = 10_000;
/// Shortest gap between two "jobs changed" events one replica publishes: bursts of submissions
/// and finished jobs wake the other replicas once per gap, 20 ms.
pub const WAKE_PUBLISH_GAP: Duration = Duration::from_millis(20);

/// This process as a replica: its id and its last view of the live replicas.
#[derive(Debug)]
pub struct Replica {
    id: Uuid,
    started_at_ms: UnixMs,
    /// The live replicas (this one included) as of the last heartbeat.
    live: Mutex<Vec<ReplicaRecord>>,
    /// Where [`Replica::publish`] queues events for the publisher task; None until `serve`
    /// starts it (tools and tests: events stay in this process).
    publish: Mutex<Option<mpsc::Sender<StoreEvent>>>,
}

impl Replica {
    /// A new replica identity (random id) started at `now_ms`.
    pub fn new(now_ms: UnixMs) -> Self {
        Self { id: Uuid::new_v4(), started_at_ms: now_ms, live: Mutex::new(Vec::new()), publish: Mutex::new(None) }
    }

    /// This replica's id (new at every start).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// When this replica started, Unix ms.
    pub fn started_at_ms(&self) -> UnixMs {
        self.started_at_ms
    }

    fn live_lock(&self) -> std::sync::MutexGuard<'_, Vec<ReplicaRecord>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live replicas as of the last heartbeat (this one included once it has written one).
    pub fn live(&self) -> Vec<ReplicaRecord> {
        self.live_lock().clone()
    }

    /// Whether replica `id` was live at the last heartbeat (this one always is).
    pub fn is_live(&self, id: Uuid) -> bool {
        id == self.id || self.live_lock().iter().any(|r| r.id == id)
    }

    /// Whether this replica leads: no live replica started before it (ties by id). True before
    /// the first heartbeat and when it is alone.
    pub fn is_leader(&self) -> bool {
        let me = (self.started_at_ms, self.id);
        self.live_lock().iter().all(|r| r.id == self.id || (r.started_at_ms, r.id) > me)
    }

    /// Whether `agent`'s link is up on another live replica: its leases are that replica's to
    /// keep or expire, and its "disconnected" is that replica's to say.
    pub fn holds_elsewhere(&self, agent: &AgentRecord) -> bool {
        agent.connected && agent.link_replica.is_some_and(|r| r != self.id && self.is_live(r))
    }

    /// Queues `event` for the other replicas (no-op until `serve` started the publisher).
    pub fn publish(&self, event: StoreEvent) {
        let tx = self.publish.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            if tx.try_send(event).is_err() {
                tracing::warn!("replica event queue full; an event for the other replicas was dropped");
            }
        }
    }

    /// Writes this replica's heartbeat row and reads every row: returns the dead ones (silent for
    /// more than [`REPLICA_DEAD_AFTER_MS`]) and keeps the live ones as the current view. Blocking.
    ///
    /// # Errors
    /// Store errors (the view is kept as it was).
    pub fn heartbeat(
        &self,
        store: &dyn crate::store::Store,
        quic_addr: &str,
        http_addr: &str,
        now_ms: UnixMs,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        let rec = ReplicaRecord {
            id: self.id,
            quic_addr: quic_addr.to_owned(),
            http_addr: http_addr.to_owned(),
            started_at_ms: self.started_at_ms,
            seen_at_ms: now_ms,
            version: crate::build_version().to_owned(),
        };
        store.replica_heartbeat(&rec)?;
        self.observe(store, now_ms)
    }

    /// Reads every replica row (without writing this one's): returns the dead ones and keeps the
    /// live ones as the current view. Blocking.
    ///
    /// # Errors
    /// Store errors (the view is kept as it was).
    pub fn observe(&self, store: &dyn crate::store::Store, now_ms: UnixMs) -> Result<Vec<ReplicaRecord>, StoreError> {
        let (live, dead): (Vec<_>, Vec<_>) = store
            .list_replicas()?
            .into_iter()
            .partition(|r| r.id == self.id || r.seen_at_ms.saturating_add(REPLICA_DEAD_AFTER_MS) >= now_ms);
        *self.live_lock() = live;
        Ok(dead)
    }
}

/// Marks the agents whose link was on the dead replica `dead` disconnected and starts their
/// leases' grace, as if each link had closed; agents already connected again elsewhere are left
/// alone. Returns how many agents it disconnected. Blocking.
///
/// # Errors
/// Store errors (the sweep stops; the next heartbeat retries it).
pub fn sweep_dead_replica(state: &AppState, dead: Uuid, now_ms: UnixMs) -> Result<usize, StoreError> {
    let mut swept = 0;
    for agent in state.store.list_agents()? {
        if !(agent.connected && agent.link_replica == Some(dead)) {
            continue;
        }
        let mut flipped = false;
        state.store.update_agent(agent.id, &mut |a| {
            flipped = a.connected && a.link_replica == Some(dead);
            if flipped {
                a.connected = false;
                a.link_replica = None;
            }
        })?;
        if !flipped {
            continue;
        }
        swept += 1;
        for job in state.scheduler.jobs_leased_to(agent.id)? {
            // It may have reconnected to another replica since: that replica's Hello reconciled.
            if state.store.get_agent(agent.id)?.is_some_and(|a| a.connected) {
                break;
            }
            if let Err(crate::scheduler::SubmitError::Store(e)) =
                state.scheduler.apply(job.id, &JobEvent::HolderDisconnected { agent: agent.id }, now_ms)
            {
                return Err(e);
            }
        }
    }
    state.store.flush()?;
    if swept > 0 {
        tracing::warn!(replica = %dead, agents = swept, "replica stopped heartbeating; its agents' leases start their grace");
    }
    Ok(swept)
}

/// Runs this replica's side of the shared store for the life of `serve`: heartbeats (and, as the
/// leader, sweeps of dead replicas), the publisher of this replica's events, and the listener that
/// acts on the others'.
pub fn spawn(state: AppState, quic_addr: String, http_addr: String) {
    let (tx, rx) = mpsc::channel(PUBLISH_QUEUE_MAX);
    *state.replica.publish.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    tokio::spawn(heartbeats(state.clone(), quic_addr, http_addr));
    tokio::spawn(publisher(state.clone(), rx));
    tokio::spawn(listener(state));
}

async fn heartbeats(state: AppState, quic_addr: String, http_addr: String) {
    let mut tick = tokio::time::interval(REPLICA_HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = state.clone();
        let (q, h) = (quic_addr.clone(), http_addr.clone());
        let done = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let now = crate::now_ms();
            let dead = st.replica.heartbeat(st.store.as_ref(), &q, &h, now)?;
            st.metrics.set_replicas(st.replica.live().len(), st.replica.is_leader());
            if st.replica.is_leader() {
                for r in dead {
                    sweep_dead_replica(&st, r.id, now)?;
                    st.store.remove_replica(r.id)?;
                    tracing::info!(replica = %r.id, quic = %r.quic_addr, "removed a dead replica");
                }
            }
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "replica heartbeat failed; retrying"),
            Err(e) => tracing::error!(error = %e, "replica heartbeat panicked; retrying"),
        }
    }
}

async fn publisher(state: AppState, mut rx: mpsc::Receiver<StoreEvent>) {
    let mut last_wake = tokio::time::Instant::now() - WAKE_PUBLISH_GAP;
    while let Some(mut event) = rx.recv().await {
        if matches!(event, StoreEvent::JobsChanged) {
            // Coalesce a burst of wakes into one.
            tokio::time::sleep_until(last_wake + WAKE_PUBLISH_GAP).await;
            last_wake = tokio::time::Instant::now();
            loop {
                match rx.try_recv() {
                    Ok(StoreEvent::JobsChanged) => {}
                    Ok(other) => {
                        send_event(&state, StoreEvent::JobsChanged).await;
                        event = other;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        send_event(&state, event).await;
    }
}

async fn send_event(state: &AppState, event: StoreEvent) {
    let envelope = StoreEventEnvelope { origin: state.replica.id(), event };
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.publish(&envelope)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not publish an event to the other replicas"),
        Err(e) => tracing::warn!(error = %e, "publishing an event panicked"),
    }
}

async fn listener(state: AppState) {
    let mut rx = state.store.subscribe();
    loop {
        let envelope = match rx.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "missed events from other replicas; rescheduling");
                state.scheduler.wake_local();
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if envelope.origin == state.replica.id() {
            continue;
        }
        on_event(&state, envelope.event).await;
    }
}

async fn on_event(state: &AppState, event: StoreEvent) {
    match event {
        StoreEvent::JobsChanged => state.scheduler.wake_local(),
        StoreEvent::Deliver { agent, msg } => deliver(state, agent, msg),
        StoreEvent::AgentRevoked { agent } => {
            state.revocations.revoke(agent);
            if let Some(notify) = state.scheduler.fleet().notifier(agent) {
                notify.notify_one();
            }
        }
        StoreEvent::SchedulingChanged { agent } => {
            let scheduler = state.scheduler.clone();
            match tokio::task::spawn_blocking(move || scheduler.reload_scheduling(agent)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(agent_id = %agent, error = %e, "could not reload an agent's cordon or drain")
                }
                Err(e) => {
                    tracing::warn!(agent_id = %agent, error = %e, "reloading an agent's cordon or drain panicked")
                }
            }
        }
        StoreEvent::CertsRevoked => {
            let (st, revocations) = (state.store.clone(), state.revocations.clone());
            match tokio::task::spawn_blocking(move || revocations.reload(st.as_ref())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not reload the revoked agents"),
                Err(e) => tracing::warn!(error = %e, "reloading the revoked agents panicked"),
            }
        }
    }
}

/// A message another replica could not deliver itself: queue it if the agent's link is here.
fn deliver(state: &AppState, agent: AgentId, msg: ControlMessage) {
    if state.scheduler.fleet().is_connected(agent) {
        state.scheduler.fleet().send_local(agent, msg);
    }
}
