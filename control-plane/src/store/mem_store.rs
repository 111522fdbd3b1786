//! [`Store`] in memory, for the deterministic simulation and tests.
//!
//! Everything lives in one [`std::sync::Mutex`] over `BTreeMap`s that mirror the trees and
//! indexes of [`super::sled_store::SledStore`], so every listing comes out in the same order as
//! from sled (including the bounded scans of `list_jobs` and `delete_finished_jobs`, which use the
//! same budgets). Nothing depends on hashing or on the clock: ids for `seq`, health and audit
//! entries come from one internal counter, so the same calls give the same results. `flush` does
//! nothing; [`MemStore::snapshot`] copies the whole state, which models a control-plane restart
//! that keeps what was stored.
//!
//! Closures passed to `update_job`, `claim_job` and `update_agent` run while the lock is held:
//! they must not call the store (they would deadlock). `claim_job` is `update_job` (no other
//! writer can hold a job between calls). Published events go to this store's subscribers through
//! an in-process broadcast channel; a snapshot has a channel of its own (a restarted process).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::broadcast;

use gaffer_protocol::digest::Digest;
use gaffer_protocol::messages::{AgentId, JobId};

use super::sled_store::{delete_scan_budget, finished_time, list_scan_budget, query_matches, state_rank};
use super::{
    AgentCommit, AgentRecord, ApiTokenRecord, AuditEntry, AuditPage, AuditQuery, AuditRecord, BundleNumbers,
    CommitOutcome, EnrollmentTokenRecord, HealthSample, JobCounts, JobCursor, JobPage, JobQuery, JobRecord, JobState,
    ReplicaRecord, RevokedCertRecord, Role, SessionRecord, Store, StoreError, StoreEventEnvelope, StoreResult, UnixMs,
    UserRecord, UserRemoval,
};

/// `jobs_by_created` key: (created_at_ms, seq, id).
type CreatedKey = (UnixMs, u64, JobId);
/// `jobs_by_state` key: (state index, rank, created_at_ms, seq, id).
type StateKey = (u8, u8, UnixMs, u64, JobId);

fn created_key(job: &JobRecord) -> CreatedKey {
    (job.created_at_ms, job.seq, job.id)
}

fn state_key(job: &JobRecord) -> StateKey {
    (job.state.index() as u8, state_rank(job.state, job.priority), job.created_at_ms, job.seq, job.id)
}

#[derive(Debug, Clone, Default)]
struct Inner {
    users: BTreeMap<String, UserRecord>,
    enroll_tokens: BTreeMap<[u8; 32], EnrollmentTokenRecord>,
    api_tokens: BTreeMap<[u8; 32], ApiTokenRecord>,
    api_token_names: BTreeMap<String, [u8; 32]>,
    sessions: BTreeMap<[u8; 32], SessionRecord>,
    agents: BTreeMap<AgentId, AgentRecord>,
    /// (agent, received_at_ms, counter) → (sample, its JSON size).
    health: BTreeMap<(AgentId, UnixMs, u64), (HealthSample, usize)>,
    jobs: BTreeMap<JobId, JobRecord>,
    jobs_by_created: BTreeSet<CreatedKey>,
    jobs_by_state: BTreeSet<StateKey>,
    counts: JobCounts,
    digests: BTreeMap<JobId, Digest>,
    agent_seq: BTreeMap<AgentId, u64>,
    /// Audit entries by id.
    audit: BTreeMap<u64, AuditRecord>,
    bundle_numbers: BTreeMap<AgentId, BundleNumbers>,
    revoked_certs: BTreeMap<String, RevokedCertRecord>,
    rollouts: BTreeMap<u64, crate::rollout::Rollout>,
    webhook_targets: BTreeMap<uuid::Uuid, crate::webhook::WebhookTarget>,
    /// Deliveries by id (UUID v7: creation order).
    webhook_deliveries: BTreeMap<uuid::Uuid, crate::webhook::WebhookDelivery>,
    /// (next_attempt_at_ms, id) of every pending delivery.
    webhook_due: BTreeSet<(UnixMs, uuid::Uuid)>,
    replicas: BTreeMap<uuid::Uuid, ReplicaRecord>,
    next_id: u64,
}

impl Inner {
    fn generate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Writes a job that does not exist yet (its seq already set), with index entries and count.
    fn insert_job(&mut self, job: JobRecord) {
        self.jobs_by_created.insert(created_key(&job));
        self.jobs_by_state.insert(state_key(&job));
        self.counts.0[job.state.index()] += 1;
        self.jobs.insert(job.id, job);
    }

    /// Replaces `old` (as stored) by `new` (same id), moving index entries and counts.
    fn replace_job(&mut self, old: &JobRecord, new: JobRecord) {
        self.jobs_by_created.remove(&created_key(old));
        self.jobs_by_created.insert(created_key(&new));
        self.jobs_by_state.remove(&state_key(old));
        self.jobs_by_state.insert(state_key(&new));
        let from = &mut self.counts.0[old.state.index()];
        *from = from.saturating_sub(1);
        self.counts.0[new.state.index()] += 1;
        self.jobs.insert(new.id, new);
    }

    fn remove_job(&mut self, id: JobId) -> bool {
        let Some(old) = self.jobs.remove(&id) else { return false };
        self.jobs_by_created.remove(&created_key(&old));
        self.jobs_by_state.remove(&state_key(&old));
        let n = &mut self.counts.0[old.state.index()];
        *n = n.saturating_sub(1);
        self.digests.remove(&id);
        true
    }

    /// Index entries of `state`, in index order.
    fn state_range(&self, state: JobState) -> impl Iterator<Item = &StateKey> {
        let s = state.index() as u8;
        self.jobs_by_state.range((s, 0, 0, 0, JobId::nil())..).take_while(move |k| k.0 == s)
    }
}

/// The in-memory store. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct MemStore {
    inner: Mutex<Inner>,
    events: broadcast::Sender<StoreEventEnvelope>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::with_inner(Inner::default())
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn with_inner(inner: Inner) -> MemStore {
        MemStore { inner: Mutex::new(inner), events: broadcast::channel(super::EVENT_CHANNEL_CAPACITY).0 }
    }

    /// A deep copy of everything stored (a restart that keeps the durable state). A poisoned
    /// lock is recovered: every method leaves the state consistent before anything can panic.
    pub fn snapshot(&self) -> MemStore {
        let inner = match self.inner.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        MemStore::with_inner(inner)
    }

    fn lock(&self) -> StoreResult<MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| StoreError::Io("in-memory store lock poisoned".into()))
    }
}

fn json_len(sample: &HealthSample) -> StoreResult<usize> {
    serde_json::to_vec(sample).map(|v| v.len()).map_err(|e| StoreError::Io(format!("cannot encode record: {e}")))
}

impl Store for MemStore {
    fn insert_user(&self, rec: &UserRecord) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        if inner.users.contains_key(&rec.name) {
            return Ok(false);
        }
        inner.users.insert(rec.name.clone(), rec.clone());
        Ok(true)
    }

    fn get_user(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        Ok(self.lock()?.users.get(name).cloned())
    }

    fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        Ok(self.lock()?.users.values().cloned().collect())
    }

    fn set_user_password(&self, name: &str, password_phc: &str, now_ms: UnixMs) -> StoreResult<Option<UserRecord>> {
        let mut inner = self.lock()?;
        let Some(user) = inner.users.get_mut(name) else {
            return Ok(None);
        };
        user.password_phc = password_phc.to_owned();
        user.password_changed_at_ms = now_ms.max(user.password_changed_at_ms + 1);
        Ok(Some(user.clone()))
    }

    fn remove_user(&self, name: &str) -> StoreResult<UserRemoval> {
        let mut inner = self.lock()?;
        let Some(user) = inner.users.get(name) else {
            return Ok(UserRemoval::NotFound);
        };
        if user.role == Role::Admin && inner.users.values().filter(|u| u.role == Role::Admin).count() <= 1 {
            return Ok(UserRemoval::LastAdmin);
        }
        Ok(inner.users.remove(name).map_or(UserRemoval::NotFound, UserRemoval::Removed))
    }

    fn insert_enrollment_token(&self, rec: &EnrollmentTokenRecord) -> StoreResult<()> {
        self.lock()?.enroll_tokens.insert(rec.hash, rec.clone());
        Ok(())
    }

    fn consume_enrollment_token(
        &self,
        hash: &[u8; 32],
        agent: AgentId,
        now_ms: UnixMs,
    ) -> StoreResult<EnrollmentTokenRecord> {
        let mut inner = self.lock()?;
        let rec = inner.enroll_tokens.get_mut(hash).ok_or(StoreError::TokenUnknown)?;
        if rec.used_at_ms.is_some() {
            return Err(StoreError::TokenAlreadyUsed);
        }
        if now_ms >= rec.expires_at_ms {
            return Err(StoreError::TokenExpired);
        }
        rec.used_at_ms = Some(now_ms);
        rec.used_by = Some(agent);
        Ok(rec.clone())
    }

    fn create_api_token(&self, rec: &ApiTokenRecord) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        if inner.api_token_names.contains_key(&rec.name) || inner.api_tokens.contains_key(&rec.hash) {
            return Ok(false);
        }
        inner.api_token_names.insert(rec.name.clone(), rec.hash);
        inner.api_tokens.insert(rec.hash, rec.clone());
        Ok(true)
    }

    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>> {
        Ok(self.lock()?.api_tokens.get(hash).cloned())
    }

    fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenRecord>> {
        let inner = self.lock()?;
        Ok(inner.api_token_names.values().filter_map(|h| inner.api_tokens.get(h).cloned()).collect())
    }

    fn revoke_api_token(&self, name: &str) -> StoreResult<Option<ApiTokenRecord>> {
        let mut inner = self.lock()?;
        let Some(hash) = inner.api_token_names.remove(name) else {
            return Ok(None);
        };
        Ok(inner.api_tokens.remove(&hash))
    }

    fn touch_api_token(&self, hash: &[u8; 32], now_ms: UnixMs) -> StoreResult<()> {
        if let Some(rec) = self.lock()?.api_tokens.get_mut(hash) {
            rec.last_used_at_ms = Some(now_ms);
        }
        Ok(())
    }

    fn insert_session(&self, rec: &SessionRecord) -> StoreResult<()> {
        self.lock()?.sessions.insert(rec.id_hash, rec.clone());
        Ok(())
    }

    fn get_session(&self, id_hash: &[u8; 32]) -> StoreResult<Option<SessionRecord>> {
        Ok(self.lock()?.sessions.get(id_hash).cloned())
    }

    fn delete_session(&self, id_hash: &[u8; 32]) -> StoreResult<()> {
        self.lock()?.sessions.remove(id_hash);
        Ok(())
    }

    fn delete_user_sessions(&self, user: &str) -> StoreResult<usize> {
        let mut inner = self.lock()?;
        let before = inner.sessions.len();
        inner.sessions.retain(|_, s| s.user != user);
        Ok(before - inner.sessions.len())
    }

    fn delete_expired_sessions(&self, now_ms: UnixMs) -> StoreResult<usize> {
        let mut inner = self.lock()?;
        let before = inner.sessions.len();
        inner.sessions.retain(|_, s| s.expires_at_ms > now_ms);
        Ok(before - inner.sessions.len())
    }

    fn insert_agent(&self, rec: &AgentRecord) -> StoreResult<()> {
        self.lock()?.agents.insert(rec.id, rec.clone());
        Ok(())
    }

    fn get_agent(&self, id: AgentId) -> StoreResult<Option<AgentRecord>> {
        Ok(self.lock()?.agents.get(&id).cloned())
    }

    fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let mut agents: Vec<AgentRecord> = self.lock()?.agents.values().cloned().collect();
        agents.sort_by(|a, b| (&a.site, &a.hostname, a.id).cmp(&(&b.site, &b.hostname, b.id)));
        Ok(agents)
    }

    fn update_agent(&self, id: AgentId, f: &mut dyn FnMut(&mut AgentRecord)) -> StoreResult<Option<AgentRecord>> {
        let mut inner = self.lock()?;
        Ok(inner.agents.get_mut(&id).map(|rec| {
            f(rec);
            rec.clone()
        }))
    }

    fn push_health(&self, id: AgentId, sample: &HealthSample, keep_max: usize, bytes_max: usize) -> StoreResult<()> {
        let len = json_len(sample)?;
        let mut inner = self.lock()?;
        let counter = inner.generate_id();
        inner.health.insert((id, sample.received_at_ms, counter), (sample.clone(), len));
        let range = (id, 0, 0)..=(id, UnixMs::MAX, u64::MAX);
        let (mut count, mut bytes) =
            inner.health.range(range.clone()).fold((0usize, 0usize), |(c, b), (_, (_, l))| (c + 1, b + l));
        let over = |count: usize, bytes: usize| count > 1 && (count > keep_max || bytes > bytes_max);
        let mut drop_keys = Vec::new();
        for (key, (_, l)) in inner.health.range(range) {
            if !over(count, bytes) {
                break;
            }
            drop_keys.push(*key);
            count -= 1;
            bytes = bytes.saturating_sub(*l);
        }
        for key in drop_keys {
            inner.health.remove(&key);
        }
        if let Some(rec) = inner.agents.get_mut(&id) {
            if rec.last_health.as_ref().is_none_or(|h| h.received_at_ms <= sample.received_at_ms) {
                rec.last_health = Some(sample.clone());
            }
        }
        Ok(())
    }

    fn health_history(&self, id: AgentId, limit: usize) -> StoreResult<Vec<HealthSample>> {
        let inner = self.lock()?;
        let mut samples: Vec<HealthSample> = inner
            .health
            .range((id, 0, 0)..=(id, UnixMs::MAX, u64::MAX))
            .rev()
            .take(limit)
            .map(|(_, (s, _))| s.clone())
            .collect();
        samples.reverse();
        Ok(samples)
    }

    fn insert_job(&self, job: &JobRecord) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        // Drawn even when the id exists, like sled's `generate_id` before its transaction.
        let seq = inner.generate_id();
        if inner.jobs.contains_key(&job.id) {
            return Ok(false);
        }
        let mut job = job.clone();
        job.seq = seq;
        inner.insert_job(job);
        Ok(true)
    }

    fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        Ok(self.lock()?.jobs.get(&id).cloned())
    }

    fn list_jobs(&self, query: &JobQuery) -> StoreResult<JobPage> {
        let mut page = JobPage::default();
        if query.limit == 0 {
            return Ok(page);
        }
        let inner = self.lock()?;
        let budget = list_scan_budget(query.limit);
        let mut keys: Box<dyn Iterator<Item = &CreatedKey>> = match query.after {
            Some(c) => Box::new(inner.jobs_by_created.range(..(c.created_at_ms, c.seq, JobId::nil())).rev()),
            None => Box::new(inner.jobs_by_created.iter().rev()),
        };
        let mut scanned = 0usize;
        let mut last: Option<JobCursor> = None;
        loop {
            if page.jobs.len() >= query.limit || scanned >= budget {
                if keys.next().is_some() {
                    page.next = last;
                }
                break;
            }
            let Some(&(created_at_ms, seq, id)) = keys.next() else { break };
            scanned += 1;
            last = Some(JobCursor { created_at_ms, seq });
            if let Some(job) = inner.jobs.get(&id) {
                if query_matches(query, job) {
                    page.jobs.push(job.clone());
                }
            }
        }
        Ok(page)
    }

    fn jobs_in_state(&self, state: JobState, limit: usize) -> StoreResult<Vec<JobRecord>> {
        let inner = self.lock()?;
        Ok(inner.state_range(state).filter_map(|k| inner.jobs.get(&k.4)).take(limit).cloned().collect())
    }

    fn job_counts(&self) -> StoreResult<JobCounts> {
        Ok(self.lock()?.counts)
    }

    fn update_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        let mut inner = self.lock()?;
        let Some(old) = inner.jobs.get(&id).cloned() else {
            return Ok(None);
        };
        let mut new = old.clone();
        if !f(&mut new) {
            return Ok(Some(old));
        }
        new.id = old.id;
        new.seq = old.seq;
        inner.replace_job(&old, new.clone());
        Ok(Some(new))
    }

    fn delete_finished_jobs(&self, finished_before_ms: UnixMs, limit: usize) -> StoreResult<usize> {
        if limit == 0 {
            return Ok(0);
        }
        let mut inner = self.lock()?;
        let budget = delete_scan_budget(limit);
        let mut found: Vec<(UnixMs, UnixMs, u64, JobId)> = Vec::new();
        for state in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            for &(_, _, created_at_ms, seq, id) in inner.state_range(state).take(budget) {
                if created_at_ms >= finished_before_ms {
                    break;
                }
                if let Some(job) = inner.jobs.get(&id) {
                    let finished = finished_time(job);
                    if job.state == state && finished < finished_before_ms {
                        found.push((finished, created_at_ms, seq, id));
                    }
                }
            }
        }
        found.sort_unstable();
        found.truncate(limit);
        Ok(found.into_iter().filter(|&(_, _, _, id)| inner.remove_job(id)).count())
    }

    fn commit_agent_message(&self, commit: &AgentCommit) -> StoreResult<CommitOutcome> {
        let mut inner = self.lock()?;
        if inner.agent_seq.get(&commit.agent).is_some_and(|&last| commit.seq <= last) {
            return Ok(CommitOutcome::Duplicate);
        }
        if let Some(write) = &commit.job {
            if inner.jobs.get(&write.before.id) != Some(&write.before) {
                return Ok(CommitOutcome::Conflict);
            }
        }
        let new_job_seq = commit.new_job.as_ref().map(|_| inner.generate_id());
        let audit_ids: Vec<u64> = commit.audit.iter().map(|_| inner.generate_id() + 1).collect();
        if let Some(write) = &commit.job {
            let mut after = write.after.clone();
            after.id = write.before.id;
            after.seq = write.before.seq;
            inner.replace_job(&write.before, after);
        }
        if let Some((id, digest)) = &commit.digest {
            inner.digests.entry(*id).or_insert_with(|| digest.clone());
        }
        if let (Some(job), Some(seq)) = (&commit.new_job, new_job_seq) {
            if !inner.jobs.contains_key(&job.id) {
                let mut job = job.clone();
                job.seq = seq;
                inner.insert_job(job);
            }
        }
        for (rec, id) in commit.audit.iter().zip(audit_ids) {
            inner.audit.insert(id, rec.clone());
        }
        if let Some(agent) = inner.agents.get_mut(&commit.agent) {
            agent.last_seen_ms = Some(commit.now_ms);
        }
        inner.agent_seq.insert(commit.agent, commit.seq);
        Ok(CommitOutcome::Committed)
    }

    fn put_digest(&self, id: JobId, digest: &Digest) -> StoreResult<bool> {
        let mut inner = self.lock()?;
        if inner.digests.contains_key(&id) {
            return Ok(false);
        }
        inner.digests.insert(id, digest.clone());
        Ok(true)
    }

    fn get_digest(&self, id: JobId) -> StoreResult<Option<Digest>> {
        Ok(self.lock()?.digests.get(&id).cloned())
    }

    fn last_applied_seq(&self, agent: AgentId) -> StoreResult<Option<u64>> {
        Ok(self.lock()?.agent_seq.get(&agent).copied())
    }

    fn set_last_applied_seq(&self, agent: AgentId, seq: u64) -> StoreResult<()> {
        self.lock()?.agent_seq.insert(agent, seq);
        Ok(())
    }

    fn append_audit(&self, rec: &AuditRecord) -> StoreResult<()> {
        let mut inner = self.lock()?;
        let id = inner.generate_id() + 1;
        inner.audit.insert(id, rec.clone());
        Ok(())
    }

    fn query_audit(&self, query: &AuditQuery) -> StoreResult<AuditPage> {
        let inner = self.lock()?;
        let budget = list_scan_budget(query.limit);
        let mut page = AuditPage::default();
        let mut last = None;
        for (looked, (&id, record)) in inner.audit.range(..query.after.unwrap_or(u64::MAX)).rev().enumerate() {
            if page.entries.len() >= query.limit || looked >= budget {
                page.next = last;
                break;
            }
            last = Some(id);
            if query.matches(record) {
                page.entries.push(AuditEntry { id, record: record.clone() });
            }
        }
        Ok(page)
    }

    fn list_audit(&self, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        Ok(self.lock()?.audit.values().rev().take(limit).cloned().collect())
    }

    fn bundle_numbers(&self, agent: AgentId) -> StoreResult<BundleNumbers> {
        Ok(self.lock()?.bundle_numbers.get(&agent).copied().unwrap_or_default())
    }

    fn set_bundle_numbers(&self, agent: AgentId, numbers: &BundleNumbers) -> StoreResult<()> {
        self.lock()?.bundle_numbers.insert(agent, *numbers);
        Ok(())
    }

    fn insert_revoked_cert(&self, rec: &RevokedCertRecord) -> StoreResult<()> {
        self.lock()?.revoked_certs.insert(rec.serial_hex.clone(), rec.clone());
        Ok(())
    }

    fn list_revoked_certs(&self) -> StoreResult<Vec<RevokedCertRecord>> {
        Ok(self.lock()?.revoked_certs.values().cloned().collect())
    }

    fn put_rollout(&self, rollout: &crate::rollout::Rollout) -> StoreResult<()> {
        self.lock()?.rollouts.insert(rollout.id, rollout.clone());
        Ok(())
    }

    fn list_rollouts(&self) -> StoreResult<Vec<crate::rollout::Rollout>> {
        Ok(self.lock()?.rollouts.values().cloned().collect())
    }

    fn delete_rollout(&self, id: u64) -> StoreResult<bool> {
        Ok(self.lock()?.rollouts.remove(&id).is_some())
    }

    fn put_webhook_target(&self, target: &crate::webhook::WebhookTarget) -> StoreResult<()> {
        self.lock()?.webhook_targets.insert(target.id, target.clone());
        Ok(())
    }

    fn list_webhook_targets(&self) -> StoreResult<Vec<crate::webhook::WebhookTarget>> {
        Ok(self.lock()?.webhook_targets.values().cloned().collect())
    }

    fn delete_webhook_target(&self, id: uuid::Uuid) -> StoreResult<bool> {
        Ok(self.lock()?.webhook_targets.remove(&id).is_some())
    }

    fn enqueue_webhook_delivery(
        &self,
        d: &crate::webhook::WebhookDelivery,
        pending_max: usize,
    ) -> StoreResult<Vec<uuid::Uuid>> {
        use crate::webhook::DeliveryState;
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        let mut dropped = Vec::new();
        while inner.webhook_due.len() >= pending_max.max(1) {
            let Some(&(due, oldest)) = inner.webhook_due.iter().min_by_key(|(_, id)| *id) else { break };
            inner.webhook_due.remove(&(due, oldest));
            if let Some(old) = inner.webhook_deliveries.get_mut(&oldest) {
                old.state = DeliveryState::Dropped;
                old.finished_at_ms = Some(d.created_at_ms);
            }
            dropped.push(oldest);
        }
        if let Some(old) = inner.webhook_deliveries.insert(d.id, d.clone()) {
            inner.webhook_due.remove(&(old.next_attempt_at_ms, old.id));
        }
        if d.state == DeliveryState::Pending {
            inner.webhook_due.insert((d.next_attempt_at_ms, d.id));
        }
        Ok(dropped)
    }

    fn webhook_deliveries_due(
        &self,
        now_ms: UnixMs,
        limit: usize,
    ) -> StoreResult<Vec<crate::webhook::WebhookDelivery>> {
        let inner = self.lock()?;
        Ok(inner
            .webhook_due
            .iter()
            .take_while(|(due, _)| *due <= now_ms)
            .take(limit)
            .filter_map(|(_, id)| inner.webhook_deliveries.get(id).cloned())
            .collect())
    }

    fn update_webhook_delivery(
        &self,
        id: uuid::Uuid,
        f: &mut dyn FnMut(&mut crate::webhook::WebhookDelivery) -> bool,
    ) -> StoreResult<Option<crate::webhook::WebhookDelivery>> {
        let mut inner = self.lock()?;
        let Some(old) = inner.webhook_deliveries.get(&id).cloned() else { return Ok(None) };
        let mut new = old.clone();
        if !f(&mut new) {
            return Ok(None);
        }
        new.id = id;
        inner.webhook_due.remove(&(old.next_attempt_at_ms, id));
        if new.state == crate::webhook::DeliveryState::Pending {
            inner.webhook_due.insert((new.next_attempt_at_ms, id));
        }
        inner.webhook_deliveries.insert(id, new.clone());
        Ok(Some(new))
    }

    fn list_webhook_deliveries(&self, limit: usize) -> StoreResult<Vec<crate::webhook::WebhookDelivery>> {
        Ok(self.lock()?.webhook_deliveries.values().rev().take(limit).cloned().collect())
    }

    fn webhook_pending_count(&self) -> StoreResult<u64> {
        Ok(self.lock()?.webhook_due.len() as u64)
    }

    fn delete_finished_webhook_deliveries(&self, created_before_ms: UnixMs, limit: usize) -> StoreResult<usize> {
        let mut inner = self.lock()?;
        let doomed: Vec<uuid::Uuid> = inner
            .webhook_deliveries
            .values()
            .filter(|d| d.state != crate::webhook::DeliveryState::Pending && d.created_at_ms < created_before_ms)
            .take(limit)
            .map(|d| d.id)
            .collect();
        for id in &doomed {
            inner.webhook_deliveries.remove(id);
        }
        Ok(doomed.len())
    }

    fn claim_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        self.update_job(id, f)
    }

    fn replica_heartbeat(&self, rec: &ReplicaRecord) -> StoreResult<()> {
        self.lock()?.replicas.insert(rec.id, rec.clone());
        Ok(())
    }

    fn list_replicas(&self) -> StoreResult<Vec<ReplicaRecord>> {
        Ok(self.lock()?.replicas.values().cloned().collect())
    }

    fn remove_replica(&self, id: uuid::Uuid) -> StoreResult<bool> {
        Ok(self.lock()?.replicas.remove(&id).is_some())
    }

    fn publish(&self, ev: &StoreEventEnvelope) -> StoreResult<()> {
        // The same size limit as the PostgreSQL store; having no subscriber is not an error.
        ev.to_json()?;
        let _ = self.events.send(ev.clone());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEventEnvelope> {
        self.events.subscribe()
    }

    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}
