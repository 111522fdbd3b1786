//! Model test: `SledStore` jobs and enrollment tokens against a plain in-memory model.
//!
//! Random operation sequences run against both; every observation (insert result, update result,
//! listing order and cursor, state-index order, counts, consume outcome) must agree. The store
//! assigns each job a `seq`; the model has none, so records are compared with `seq` cleared (the
//! orderings check that seqs follow insertion order). Failing cases are shrunk and persisted by proptest
//! under `proptest-regressions/` so they replay.

use std::collections::BTreeMap;

use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{
    EnrollmentTokenRecord, JobCounts, JobOrigin, JobQuery, JobRecord, JobState, Priority, Store, StoreError,
};
use gaffer_protocol::messages::Profile;
use proptest::prelude::*;
use uuid::Uuid;

const IDS: u8 = 6;
const STATES: [JobState; 6] = JobState::ALL;
const PRIORITIES: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

#[derive(Debug, Clone)]
enum Op {
    InsertJob { id: u8, created_at_ms: u64, priority: usize },
    UpdateJob { id: u8, state: usize, priority: usize, frames: u64, write: bool },
    ListJobs { limit: usize },
    JobsInState { state: usize, limit: usize },
    Counts,
    InsertToken { id: u8, expires_at_ms: u64 },
    Consume { id: u8, agent: u8, now_ms: u64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..IDS, 0..20u64, 0..PRIORITIES.len()).prop_map(|(id, created_at_ms, priority)| Op::InsertJob {
            id,
            created_at_ms,
            priority
        }),
        (0..IDS, 0..STATES.len(), 0..PRIORITIES.len(), 0..1000u64, any::<bool>())
            .prop_map(|(id, state, priority, frames, write)| Op::UpdateJob { id, state, priority, frames, write }),
        (0..10usize).prop_map(|limit| Op::ListJobs { limit }),
        (0..STATES.len(), 0..8usize).prop_map(|(state, limit)| Op::JobsInState { state, limit }),
        Just(Op::Counts),
        (0..IDS, 0..100u64).prop_map(|(id, expires_at_ms)| Op::InsertToken { id, expires_at_ms }),
        (0..IDS, 0..3u8, 0..100u64).prop_map(|(id, agent, now_ms)| Op::Consume { id, agent, now_ms }),
        Just(Op::Reopen),
    ]
}

fn uuid(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn new_job(id: Uuid, created_at_ms: u64) -> JobRecord {
    JobRecord {
        id,
        path: format!("/media/{id}.mov"),
        site: "stage-a".into(),
        profile: Profile::Shots,
        pinned_agent: None,
        origin: JobOrigin::Api,
        priority: Priority::Normal,
        state: JobState::Queued,
        agent: None,
        lease: None,
        lease_epoch: 0,
        progress: 0.0,
        frames_decoded: 0,
        error: None,
        attempts: 0,
        seq: 0,
        created_at_ms,
        updated_at_ms: created_at_ms,
        finished_at_ms: None,
        custody: None,
        submitted_by: None,
        history: Vec::new(),
    }
}

#[derive(Default)]
struct Model {
    jobs: BTreeMap<Uuid, JobRecord>,
    /// Insertion order of each job, to break ties between jobs created in the same millisecond.
    inserted: BTreeMap<Uuid, usize>,
    tokens: BTreeMap<[u8; 32], EnrollmentTokenRecord>,
}

impl Model {
    /// Oldest first by (created_at_ms, insertion order), the store's index order.
    fn ordered(&self) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> = self.jobs.values().cloned().collect();
        v.sort_by_key(|j| (j.created_at_ms, self.inserted.get(&j.id).copied().unwrap_or(usize::MAX)));
        v
    }

    /// The state index order: queued jobs by priority (high first), then every state by age.
    fn in_state(&self, state: JobState) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> = self.ordered().into_iter().filter(|j| j.state == state).collect();
        if state == JobState::Queued {
            v.sort_by_key(|j| std::cmp::Reverse(j.priority)); // stable: keeps age order within one
        }
        v
    }

    fn counts(&self) -> JobCounts {
        let mut c = JobCounts::default();
        for j in self.jobs.values() {
            c.0[j.state.index()] += 1;
        }
        c
    }
}

/// The record without its store-assigned `seq`.
fn norm(j: JobRecord) -> JobRecord {
    JobRecord { seq: 0, ..j }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let open = || SledStore::open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()));
    let mut store = Some(open()?);
    let mut model = Model::default();
    for op in ops {
        let s = store.as_ref().ok_or_else(|| TestCaseError::fail("store missing"))?;
        match op {
            Op::InsertJob { id, created_at_ms, priority } => {
                let rec = JobRecord { priority: PRIORITIES[priority], ..new_job(uuid(id), created_at_ms) };
                let inserted = s.insert_job(&rec).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expected = !model.jobs.contains_key(&rec.id);
                prop_assert_eq!(inserted, expected);
                let order = model.inserted.len();
                model.inserted.entry(rec.id).or_insert(order);
                model.jobs.entry(rec.id).or_insert(rec);
            }
            Op::UpdateJob { id, state, priority, frames, write } => {
                let mut f = |j: &mut JobRecord| {
                    j.state = STATES[state];
                    j.priority = PRIORITIES[priority];
                    j.frames_decoded = frames;
                    write
                };
                let got = s.update_job(uuid(id), &mut f).map_err(|e| TestCaseError::fail(e.to_string()))?;
                // The record as stored afterwards: the changed one if written, else the old one.
                let expected = model.jobs.get_mut(&uuid(id)).map(|j| {
                    let mut changed = j.clone();
                    if f(&mut changed) {
                        *j = changed;
                    }
                    j.clone()
                });
                prop_assert_eq!(got.map(norm), expected);
            }
            Op::ListJobs { limit } => {
                let page = s
                    .list_jobs(&JobQuery { limit, ..JobQuery::default() })
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expected: Vec<JobRecord> = model.ordered().into_iter().rev().take(limit).collect();
                prop_assert_eq!(page.next.is_some(), limit > 0 && model.jobs.len() > limit);
                prop_assert_eq!(page.jobs.into_iter().map(norm).collect::<Vec<_>>(), expected);
            }
            Op::JobsInState { state, limit } => {
                let got = s.jobs_in_state(STATES[state], limit).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expected: Vec<JobRecord> = model.in_state(STATES[state]).into_iter().take(limit).collect();
                prop_assert_eq!(got.into_iter().map(norm).collect::<Vec<_>>(), expected);
            }
            Op::Counts => {
                let got = s.job_counts().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, model.counts());
            }
            Op::InsertToken { id, expires_at_ms } => {
                let rec = EnrollmentTokenRecord {
                    hash: [id; 32],
                    site: "stage-a".into(),
                    created_at_ms: 0,
                    expires_at_ms,
                    used_at_ms: None,
                    used_by: None,
                };
                s.insert_enrollment_token(&rec).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.tokens.insert(rec.hash, rec);
            }
            Op::Consume { id, agent, now_ms } => {
                let got = s.consume_enrollment_token(&[id; 32], uuid(agent), now_ms);
                let expected = match model.tokens.get_mut(&[id; 32]) {
                    None => Err("unknown"),
                    Some(t) if t.used_at_ms.is_some() => Err("used"),
                    Some(t) if now_ms >= t.expires_at_ms => Err("expired"),
                    Some(t) => {
                        t.used_at_ms = Some(now_ms);
                        t.used_by = Some(uuid(agent));
                        Ok(t.clone())
                    }
                };
                match (got, expected) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                    (Err(StoreError::TokenUnknown), Err("unknown"))
                    | (Err(StoreError::TokenAlreadyUsed), Err("used"))
                    | (Err(StoreError::TokenExpired), Err("expired")) => {}
                    (got, expected) => {
                        prop_assert!(false, "consume: store {got:?}, model {expected:?}")
                    }
                }
            }
            Op::Reopen => {
                s.flush().map_err(|e| TestCaseError::fail(e.to_string()))?;
                drop(store.take());
                store = Some(open()?);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sled_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
