//! The [`Store`] contract, run against every implementation: `SledStore` (in a temporary
//! directory), `MemStore` and `PgStore` (a fresh database on the throwaway PostgreSQL of
//! `gaffer_tests::pg`). Each contract test is one function over a store factory; the `contract!`
//! macro instantiates it once per implementation (`sled::<name>`, `mem::<name>`, `pg::<name>`).
//! Tests named `pg_…` cover what only a shared database has (several stores on one database, held
//! rows, the listener, the schema version, an unreachable server). Proptests at the end run
//! random operation sequences against sled and against PostgreSQL, each side by side with
//! `MemStore`, and require every observation to agree.

use std::ops::Deref;
use std::time::{Duration, Instant};

use gaffer_control::store::mem_store::MemStore;
use gaffer_control::store::pg_store::{PgOptions, PgStore};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{
    Actor, AgentCommit, AgentCounts, AgentCursor, AgentQuery, AgentRecord, AgentState, ApiTokenRecord, AuditQuery,
    AuditRecord, CommitOutcome, HealthSample, JobCounts, JobCursor, JobOrigin, JobPage, JobQuery, JobRecord, JobState,
    JobWrite, Lease, Priority, ReplicaRecord, Role, Store, StoreError, StoreEvent, StoreEventEnvelope, UserRecord,
    UserRemoval, EVENT_BYTES_MAX, STORE_ORIGIN,
};
use gaffer_protocol::digest::{Digest, ShotAnalysis, SourceInfo, TechnicalMetadata, DIGEST_SCHEMA_VERSION};
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{AgentId, ControlMessage, JobId, Profile};
use gaffer_tests::pg::{test_database, TestDatabase};
use tokio::sync::broadcast;
use uuid::Uuid;

type TestResult = anyhow::Result<()>;

/// A store under test, with what must outlive it: the directory (sled) or the database (pg).
/// Fields drop in order: the store first.
struct Fixture {
    store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _db: Option<TestDatabase>,
}

impl Deref for Fixture {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

fn sled_fixture() -> anyhow::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    Ok(Fixture { store: Box::new(store), _dir: Some(dir), _db: None })
}

fn mem_fixture() -> anyhow::Result<Fixture> {
    Ok(Fixture { store: Box::new(MemStore::new()), _dir: None, _db: None })
}

/// Small pools (many stores run at once in one test process); a generous call timeout (a
/// loaded test machine).
fn pg_options() -> PgOptions {
    PgOptions { pool_size_max: 4, call_timeout: Duration::from_secs(30) }
}

fn pg_fixture() -> anyhow::Result<Fixture> {
    let db = test_database()?;
    let store = PgStore::connect(db.url(), pg_options())?;
    Ok(Fixture { store: Box::new(store), _dir: None, _db: Some(db) })
}

type Make = fn() -> anyhow::Result<Fixture>;

// ---- record builders ----

fn jid(n: u32) -> JobId {
    Uuid::from_u128(0x1000 + u128::from(n))
}

fn aid(n: u32) -> AgentId {
    Uuid::from_u128(0xa000 + u128::from(n))
}

fn job(n: u32, created_at_ms: u64) -> JobRecord {
    let id = jid(n);
    JobRecord {
        id,
        path: format!("/media/{n}.mov"),
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

fn with_priority(mut j: JobRecord, priority: Priority) -> JobRecord {
    j.priority = priority;
    j
}

fn finished(mut j: JobRecord, state: JobState, at_ms: u64) -> JobRecord {
    j.state = state;
    j.finished_at_ms = Some(at_ms);
    j.updated_at_ms = at_ms;
    j
}

fn agent(id: AgentId) -> AgentRecord {
    AgentRecord {
        cert_not_after_unix: 2_000_000_000,
        connected: true,
        ..AgentRecord::new(id, "stage-a", format!("gpu-{id}"), 1)
    }
}

fn digest(path: &str, analysis_secs: f64) -> Digest {
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo { path: path.into(), size_bytes: 2_000_000, modified_unix_secs: None },
        technical: TechnicalMetadata {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(5.3),
            bit_rate_bps: None,
            streams: vec![],
            primary_video_stream: None,
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 132,
            frames_corrupt: 0,
            cuts: vec![],
            shots: vec![],
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: vec![],
        analysis_secs,
    }
}

/// A health sample whose JSON size grows with `pad`.
fn sample(received_at_ms: u64, pad: usize) -> HealthSample {
    HealthSample {
        received_at_ms,
        health: Health {
            sampled_at_unix_ms: received_at_ms,
            source: HealthSource::CpuOnly { reason: "x".repeat(pad) },
            cpu_percent: 12.5,
            load_avg_1m: 0.5,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 8 << 30,
            disks: vec![],
            gpus: vec![],
            inference: None,
            jobs_running: 0,
            job_slots: 2,
            jobs_queued: 0,
            outbox_pending: 0,
            outbox_full: false,
        },
    }
}

fn sample_len(s: &HealthSample) -> anyhow::Result<usize> {
    Ok(serde_json::to_vec(s)?.len())
}

fn audit(at_ms: u64, detail: &str, job: Option<JobId>) -> AuditRecord {
    AuditRecord {
        at_ms,
        who: "agent".into(),
        action: "refused_report".into(),
        agent: Some(aid(1)),
        site: None,
        detail: detail.into(),
        job,
    }
}

fn ids(jobs: &[JobRecord]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

fn get(s: &dyn Store, n: u32) -> anyhow::Result<JobRecord> {
    s.get_job(jid(n))?.ok_or_else(|| anyhow::anyhow!("job {n} missing"))
}

fn all_pages(
    s: &dyn Store,
    state: Option<JobState>,
    agent: Option<AgentId>,
    limit: usize,
) -> anyhow::Result<Vec<JobRecord>> {
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = s.list_jobs(&JobQuery { state, agent, after, limit })?;
        assert!(page.jobs.len() <= limit, "page longer than its limit");
        out.extend(page.jobs);
        match page.next {
            Some(next) => {
                assert_ne!(Some(next), after, "cursor did not advance");
                after = Some(next);
            }
            None => return Ok(out),
        }
    }
    anyhow::bail!("paging did not end")
}

fn counts(pairs: &[(JobState, u64)]) -> JobCounts {
    let mut c = JobCounts::default();
    for &(s, n) in pairs {
        c.0[s.index()] = n;
    }
    c
}

/// Everything a commit could change, for "nothing written" checks.
#[derive(Debug, PartialEq)]
struct Observed {
    counts: JobCounts,
    jobs: Vec<Option<JobRecord>>,
    digests: Vec<Option<Digest>>,
    listed: Vec<JobRecord>,
    by_state: Vec<Vec<JobRecord>>,
    watermark: Option<u64>,
    audit: Vec<AuditRecord>,
    agent: Option<AgentRecord>,
}

fn observe(s: &dyn Store, jobs: &[u32], agent_id: AgentId) -> anyhow::Result<Observed> {
    Ok(Observed {
        counts: s.job_counts()?,
        jobs: jobs.iter().map(|n| s.get_job(jid(*n))).collect::<Result<_, _>>()?,
        digests: jobs.iter().map(|n| s.get_digest(jid(*n))).collect::<Result<_, _>>()?,
        listed: all_pages(s, None, None, 100)?,
        by_state: JobState::ALL.iter().map(|st| s.jobs_in_state(*st, 100)).collect::<Result<_, _>>()?,
        watermark: s.last_applied_seq(agent_id)?,
        audit: s.list_audit(100)?,
        agent: s.get_agent(agent_id)?,
    })
}

// ---- contract tests ----

fn insert_get_and_duplicate(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let mut j = job(1, 10);
    j.seq = 12345;
    assert!(s.insert_job(&j)?);
    let stored = get(s, 1)?;
    assert_eq!(JobRecord { seq: j.seq, ..stored.clone() }, j, "stored record differs beyond seq");
    let mut dup = job(1, 99);
    dup.path = "/elsewhere.mov".into();
    assert!(!s.insert_job(&dup)?, "a second insert with the same id must be refused");
    assert_eq!(get(s, 1)?, stored, "a refused insert changed the record");
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 1)]));
    assert_eq!(s.get_job(jid(2))?, None);
    Ok(())
}

fn seq_orders_insertions(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    for n in 0..5 {
        let mut j = job(n, 7);
        j.seq = u64::MAX - u64::from(n); // ignored
        assert!(s.insert_job(&j)?);
    }
    let seqs: Vec<u64> = (0..5).map(|n| get(s, n).map(|j| j.seq)).collect::<Result<_, _>>()?;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq must grow with insertion order: {seqs:?}");
    let listed = all_pages(s, None, None, 10)?;
    assert_eq!(ids(&listed), (0..5).rev().map(jid).collect::<Vec<_>>(), "same-ms jobs newest (highest seq) first");
    Ok(())
}

fn jobs_in_state_order_and_limit(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    // Inserted in this order; same-ms pairs (3, 5) and (4, 6) are ordered by seq.
    s.insert_job(&with_priority(job(1, 1), Priority::Low))?;
    s.insert_job(&with_priority(job(2, 5), Priority::Normal))?;
    s.insert_job(&with_priority(job(3, 9), Priority::High))?;
    s.insert_job(&with_priority(job(4, 2), Priority::Normal))?;
    s.insert_job(&with_priority(job(5, 9), Priority::High))?;
    s.insert_job(&with_priority(job(6, 2), Priority::Normal))?;
    s.insert_job(&with_priority(job(7, 0), Priority::Low))?;
    let queued = s.jobs_in_state(JobState::Queued, 100)?;
    assert_eq!(ids(&queued), [3, 5, 4, 6, 2, 7, 1].map(jid), "high, normal, low; each oldest first, then by seq");
    assert_eq!(ids(&s.jobs_in_state(JobState::Queued, 3)?), [3, 5, 4].map(jid));
    assert!(s.jobs_in_state(JobState::Queued, 0)?.is_empty());
    assert!(s.jobs_in_state(JobState::Running, 10)?.is_empty());
    // Other states ignore priority: oldest first.
    for n in [3, 1, 2] {
        s.update_job(jid(n), &mut |j| {
            j.state = JobState::Running;
            true
        })?;
    }
    assert_eq!(ids(&s.jobs_in_state(JobState::Running, 10)?), [1, 2, 3].map(jid));
    assert_eq!(ids(&s.jobs_in_state(JobState::Running, 2)?), [1, 2].map(jid));
    assert_eq!(ids(&s.jobs_in_state(JobState::Queued, 100)?), [5, 4, 6, 7].map(jid));
    Ok(())
}

fn update_job_moves_index_and_counts(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    for n in 0..4 {
        s.insert_job(&job(n, u64::from(n)))?;
    }
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 4)]));
    let before = get(s, 1)?;
    let after = s.update_job(jid(1), &mut |j| {
        j.state = JobState::Assigned;
        j.agent = Some(aid(1));
        j.lease_epoch += 1;
        j.lease = Some(Lease { holder: aid(1), lease_id: j.lease_epoch, deadline_ms: Some(100) });
        j.id = jid(99); // ignored: the id is the store's
        j.seq = 424_242; // ignored
        true
    })?;
    let after = after.ok_or_else(|| anyhow::anyhow!("update of an existing job returned None"))?;
    assert_eq!((after.id, after.seq, after.state), (jid(1), before.seq, JobState::Assigned));
    assert_eq!(get(s, 1)?, after, "update_job returns the record as stored");
    assert_eq!(s.get_job(jid(99))?, None);
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 3), (JobState::Assigned, 1)]));
    assert_eq!(ids(&s.jobs_in_state(JobState::Queued, 10)?), [0, 2, 3].map(jid));
    assert_eq!(ids(&s.jobs_in_state(JobState::Assigned, 10)?), [jid(1)]);

    // A closure that returns false writes nothing, even if it changed its copy.
    let kept = s.update_job(jid(2), &mut |j| {
        j.state = JobState::Failed;
        false
    })?;
    assert_eq!(kept.map(|j| j.state), Some(JobState::Queued));
    assert_eq!(get(s, 2)?.state, JobState::Queued);
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 3), (JobState::Assigned, 1)]));

    // A priority change reorders the queued index.
    s.update_job(jid(3), &mut |j| {
        j.priority = Priority::High;
        true
    })?;
    assert_eq!(ids(&s.jobs_in_state(JobState::Queued, 10)?), [3, 0, 2].map(jid));

    // Through every state and back.
    for state in JobState::ALL {
        s.update_job(jid(0), &mut |j| {
            j.state = state;
            true
        })?;
        let expected = match state {
            JobState::Queued => 3,   // 0, 2, 3
            JobState::Assigned => 2, // 0, 1
            _ => 1,
        };
        assert_eq!(s.job_counts()?.get(state), expected, "count of {state:?}");
        assert!(ids(&s.jobs_in_state(state, 10)?).contains(&jid(0)), "{state:?} index lacks the job");
    }
    assert_eq!(s.job_counts()?.0.iter().sum::<u64>(), 4);
    assert_eq!(s.update_job(jid(50), &mut |_| true)?, None);
    Ok(())
}

fn list_jobs_pages_cover_every_job_once(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let states = [JobState::Queued, JobState::Running, JobState::Succeeded];
    for n in 0..25u32 {
        let mut j = job(n, u64::from(n / 3)); // three jobs per millisecond
        j.state = states[(n % 3) as usize];
        j.agent = (n % 2 == 0).then(|| aid(n % 4));
        s.insert_job(&j)?;
    }
    let mut expected: Vec<JobRecord> = (0..25).map(|n| get(s, n)).collect::<Result<_, _>>()?;
    expected.sort_by_key(|j| std::cmp::Reverse((j.created_at_ms, j.seq)));
    for limit in [1, 4, 7, 25, 100] {
        assert_eq!(all_pages(s, None, None, limit)?, expected, "limit {limit}");
        for state in states {
            let want: Vec<JobRecord> = expected.iter().filter(|j| j.state == state).cloned().collect();
            assert_eq!(all_pages(s, Some(state), None, limit)?, want, "state {state:?} limit {limit}");
        }
        let want: Vec<JobRecord> = expected.iter().filter(|j| j.agent == Some(aid(2))).cloned().collect();
        assert!(!want.is_empty());
        assert_eq!(all_pages(s, None, Some(aid(2)), limit)?, want, "agent filter, limit {limit}");
        let want: Vec<JobRecord> = want.into_iter().filter(|j| j.state == JobState::Running).collect();
        assert_eq!(all_pages(s, Some(JobState::Running), Some(aid(2)), limit)?, want);
    }
    // The first page and its cursor.
    let page = s.list_jobs(&JobQuery { limit: 4, ..JobQuery::default() })?;
    assert_eq!(page.jobs, expected[..4]);
    assert_eq!(page.next, Some(JobCursor::of(&expected[3])));
    let cursor = page.next.ok_or_else(|| anyhow::anyhow!("no cursor"))?;
    assert_eq!(cursor.to_string().parse::<JobCursor>(), Ok(cursor));
    // The last page says so.
    let last = s.list_jobs(&JobQuery { limit: 5, after: Some(JobCursor::of(&expected[19])), ..JobQuery::default() })?;
    assert_eq!(last, JobPage { jobs: expected[20..].to_vec(), next: None });
    assert_eq!(s.list_jobs(&JobQuery { limit: 0, ..JobQuery::default() })?.jobs.len(), 0);
    Ok(())
}

/// A filter that matches one job under more index entries than one call may scan: pages come
/// back empty with a cursor until the scan reaches it.
fn list_jobs_scan_is_bounded(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let total = 1_300u32;
    for n in 0..total {
        let mut j = job(n, u64::from(n));
        if n == 0 {
            j.state = JobState::Failed;
        }
        s.insert_job(&j)?;
    }
    let first = s.list_jobs(&JobQuery { state: Some(JobState::Failed), limit: 1, ..JobQuery::default() })?;
    assert!(first.jobs.is_empty(), "the only match is beyond the scan budget");
    let next = first.next.ok_or_else(|| anyhow::anyhow!("a bounded page must return a cursor"))?;
    assert!(next.created_at_ms > 0 && next.created_at_ms < u64::from(total) - 1);
    let found = all_pages(s, Some(JobState::Failed), None, 1)?;
    assert_eq!(ids(&found), [jid(0)]);
    Ok(())
}

fn counts_follow_every_write(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    assert_eq!(s.job_counts()?, JobCounts::default());
    for n in 0..6 {
        s.insert_job(&job(n, 1))?;
    }
    s.insert_job(&job(0, 1))?; // refused: not counted
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 6)]));
    for (n, state) in [(0, JobState::Running), (1, JobState::Succeeded), (2, JobState::Cancelled)] {
        s.update_job(jid(n), &mut |j| {
            *j = finished(j.clone(), state, 5);
            true
        })?;
    }
    assert_eq!(
        s.job_counts()?,
        counts(&[(JobState::Queued, 3), (JobState::Running, 1), (JobState::Succeeded, 1), (JobState::Cancelled, 1)])
    );
    assert_eq!(s.delete_finished_jobs(10, 10)?, 2);
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 3), (JobState::Running, 1)]));
    let before = get(s, 3)?;
    let commit = AgentCommit {
        agent: aid(1),
        seq: 1,
        now_ms: 20,
        job: Some(JobWrite { after: finished(before.clone(), JobState::Failed, 20), before }),
        digest: None,
        new_job: Some(job(10, 20)),
        audit: vec![],
    };
    assert_eq!(s.commit_agent_message(&commit)?, CommitOutcome::Committed);
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 3), (JobState::Running, 1), (JobState::Failed, 1)]));
    Ok(())
}

/// An assigned job, a connected agent, and the commit of "job succeeded" from it.
fn commit_setup(s: &dyn Store) -> anyhow::Result<AgentCommit> {
    s.insert_agent(&agent(aid(1)))?;
    s.insert_job(&job(1, 5))?;
    s.insert_job(&job(2, 6))?;
    let running = s
        .update_job(jid(1), &mut |j| {
            j.state = JobState::Running;
            j.agent = Some(aid(1));
            j.lease_epoch = 1;
            j.lease = Some(Lease { holder: aid(1), lease_id: 1, deadline_ms: None });
            true
        })?
        .ok_or_else(|| anyhow::anyhow!("job 1 missing"))?;
    let mut done = finished(running.clone(), JobState::Succeeded, 50);
    done.lease = None;
    done.progress = 1.0;
    let mut watch = job(3, 40);
    watch.origin = JobOrigin::WatchFolder { agent: aid(1) };
    Ok(AgentCommit {
        agent: aid(1),
        seq: 5,
        now_ms: 50,
        job: Some(JobWrite { before: running, after: done }),
        digest: Some((jid(1), digest("/media/1.mov", 0.5))),
        new_job: Some(watch),
        audit: vec![audit(50, "first", Some(jid(2))), audit(50, "second", None)],
    })
}

fn commit_writes_everything(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let commit = commit_setup(s)?;
    let mut after = commit.job.as_ref().map(|w| w.after.clone()).ok_or_else(|| anyhow::anyhow!("no job"))?;
    after.seq = 777; // ignored: the stored seq stays
    let commit = AgentCommit { job: commit.job.clone().map(|w| JobWrite { after, ..w }), ..commit };
    let seq_before = get(s, 1)?.seq;
    assert_eq!(s.commit_agent_message(&commit)?, CommitOutcome::Committed);
    let stored = get(s, 1)?;
    assert_eq!((stored.state, stored.seq, stored.progress), (JobState::Succeeded, seq_before, 1.0));
    assert_eq!(s.get_digest(jid(1))?, Some(digest("/media/1.mov", 0.5)));
    let watch = get(s, 3)?;
    assert_eq!(watch.origin, JobOrigin::WatchFolder { agent: aid(1) });
    assert!(watch.seq > get(s, 2)?.seq, "the new job gets a fresh seq");
    assert_eq!(ids(&s.jobs_in_state(JobState::Queued, 10)?), [jid(2), jid(3)]);
    assert_eq!(ids(&s.jobs_in_state(JobState::Succeeded, 10)?), [jid(1)]);
    assert!(s.jobs_in_state(JobState::Running, 10)?.is_empty());
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 2), (JobState::Succeeded, 1)]));
    let details: Vec<String> = s.list_audit(10)?.into_iter().map(|a| a.detail).collect();
    assert_eq!(details, ["second", "first"], "audit newest first");
    assert_eq!(s.list_audit(10)?.last().and_then(|a| a.job), Some(jid(2)));
    assert_eq!(s.last_applied_seq(aid(1))?, Some(5));
    assert_eq!(s.get_agent(aid(1))?.and_then(|a| a.last_seen_ms), Some(50));
    assert_eq!(all_pages(s, None, None, 10)?.len(), 3);
    Ok(())
}

fn commit_duplicate_writes_nothing(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let commit = commit_setup(s)?;
    s.set_last_applied_seq(aid(1), 5)?;
    let before = observe(s, &[1, 2, 3], aid(1))?;
    for seq in [5, 4, 0] {
        let dup = AgentCommit { seq, ..commit.clone() };
        assert_eq!(s.commit_agent_message(&dup)?, CommitOutcome::Duplicate, "seq {seq}");
        assert_eq!(observe(s, &[1, 2, 3], aid(1))?, before, "a duplicate (seq {seq}) wrote something");
    }
    // After a commit, the same seq again is a duplicate too.
    let next = AgentCommit { seq: 6, ..commit.clone() };
    assert_eq!(s.commit_agent_message(&next)?, CommitOutcome::Committed);
    let committed = observe(s, &[1, 2, 3], aid(1))?;
    assert_eq!(s.commit_agent_message(&next)?, CommitOutcome::Duplicate);
    assert_eq!(observe(s, &[1, 2, 3], aid(1))?, committed);
    Ok(())
}

fn commit_conflict_writes_nothing(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let commit = commit_setup(s)?;
    s.set_last_applied_seq(aid(1), 2)?;
    // The job moved on after the commit was computed.
    s.update_job(jid(1), &mut |j| {
        j.frames_decoded += 10;
        true
    })?;
    let before = observe(s, &[1, 2, 3], aid(1))?;
    assert_eq!(s.commit_agent_message(&commit)?, CommitOutcome::Conflict);
    assert_eq!(observe(s, &[1, 2, 3], aid(1))?, before, "a conflicting commit wrote something");
    // A precondition on a job that does not exist conflicts too.
    let ghost = JobWrite { before: job(40, 1), after: finished(job(40, 1), JobState::Failed, 2) };
    let c = AgentCommit { job: Some(ghost), ..commit.clone() };
    assert_eq!(s.commit_agent_message(&c)?, CommitOutcome::Conflict);
    assert_eq!(observe(s, &[1, 2, 3, 40], aid(1))?.jobs[3], None);
    assert_eq!(observe(s, &[1, 2, 3], aid(1))?, before);
    // Recomputed from a fresh read, it commits.
    let fresh = get(s, 1)?;
    let mut after = commit.job.as_ref().map(|w| w.after.clone()).ok_or_else(|| anyhow::anyhow!("no job"))?;
    after.frames_decoded = fresh.frames_decoded;
    let c = AgentCommit { job: Some(JobWrite { before: fresh, after }), ..commit };
    assert_eq!(s.commit_agent_message(&c)?, CommitOutcome::Committed);
    assert_eq!(get(s, 1)?.state, JobState::Succeeded);
    Ok(())
}

fn commit_keeps_first_digest_and_existing_job(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let commit = commit_setup(s)?;
    assert!(s.put_digest(jid(1), &digest("/first.mov", 1.0))?);
    let existing = get(s, 2)?;
    let mut clash = job(2, 99);
    clash.path = "/clash.mov".into();
    let c = AgentCommit { new_job: Some(clash), ..commit };
    assert_eq!(s.commit_agent_message(&c)?, CommitOutcome::Committed);
    assert_eq!(s.get_digest(jid(1))?, Some(digest("/first.mov", 1.0)), "the first digest is kept");
    assert_eq!(get(s, 2)?, existing, "a new job with an existing id is skipped");
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 1), (JobState::Succeeded, 1)]));
    assert_eq!(all_pages(s, None, None, 10)?.len(), 2);
    assert!(!s.put_digest(jid(1), &digest("/third.mov", 3.0))?);
    Ok(())
}

fn commit_without_job_sets_watermark(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    // No job, unknown agent: only the watermark (and no agent record appears).
    let c = AgentCommit {
        agent: aid(7),
        seq: 3,
        now_ms: 9,
        job: None,
        digest: Some((jid(5), digest("/orphan.mov", 2.0))),
        new_job: None,
        audit: vec![],
    };
    assert_eq!(s.commit_agent_message(&c)?, CommitOutcome::Committed);
    assert_eq!(s.last_applied_seq(aid(7))?, Some(3));
    assert_eq!(s.get_agent(aid(7))?, None);
    assert_eq!(s.get_digest(jid(5))?, Some(digest("/orphan.mov", 2.0)));
    assert_eq!(s.job_counts()?, JobCounts::default());
    assert_eq!(s.commit_agent_message(&AgentCommit { seq: 4, ..c.clone() })?, CommitOutcome::Committed);
    assert_eq!(s.last_applied_seq(aid(7))?, Some(4));
    assert_eq!(s.last_applied_seq(aid(8))?, None);
    Ok(())
}

fn delete_finished_respects_cutoff_and_limit(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    // (n, created, state, finished)
    let rows = [
        (1, 1, JobState::Succeeded, Some(30)),
        (2, 2, JobState::Failed, Some(10)),
        (3, 3, JobState::Cancelled, Some(20)),
        (4, 4, JobState::Succeeded, Some(200)), // after the cutoff
        (5, 5, JobState::Queued, None),
        (6, 6, JobState::Running, None),
        (7, 7, JobState::Failed, Some(40)),
    ];
    for (n, created, state, fin) in rows {
        let mut j = job(n, created);
        j.state = state;
        j.finished_at_ms = fin;
        j.updated_at_ms = fin.unwrap_or(created);
        s.insert_job(&j)?;
        s.put_digest(jid(n), &digest(&j.path, 0.1))?;
    }
    assert_eq!(s.delete_finished_jobs(100, 0)?, 0);
    assert_eq!(s.delete_finished_jobs(100, 2)?, 2);
    // The two finished first (2 at 10, 3 at 20) went, with their digests.
    for n in [2, 3] {
        assert_eq!(s.get_job(jid(n))?, None, "job {n}");
        assert_eq!(s.get_digest(jid(n))?, None, "digest of {n}");
    }
    assert!(s.get_job(jid(1))?.is_some());
    assert_eq!(
        s.job_counts()?,
        counts(&[(JobState::Queued, 1), (JobState::Running, 1), (JobState::Succeeded, 2), (JobState::Failed, 1)])
    );
    assert_eq!(s.delete_finished_jobs(35, 10)?, 1, "only job 1 finished before 35");
    assert_eq!(s.get_job(jid(1))?, None);
    assert_eq!(s.delete_finished_jobs(100, 10)?, 1, "job 7");
    assert_eq!(s.delete_finished_jobs(100, 10)?, 0);
    let left: Vec<JobId> = all_pages(s, None, None, 10)?.iter().map(|j| j.id).collect();
    assert_eq!(left, [6, 5, 4].map(jid));
    assert!(s.get_digest(jid(4))?.is_some());
    assert_eq!(ids(&s.jobs_in_state(JobState::Failed, 10)?), Vec::<JobId>::new());
    assert_eq!(ids(&s.jobs_in_state(JobState::Succeeded, 10)?), [jid(4)]);
    assert_eq!(s.delete_finished_jobs(u64::MAX, 10)?, 1);
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 1), (JobState::Running, 1)]));
    Ok(())
}

fn heartbeats_set_last_health_and_last_seen_and_keep_the_bounds(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let a = aid(1);
    s.insert_agent(&AgentRecord { last_seen_ms: Some(5), ..agent(a) })?;
    for t in 0..8u64 {
        s.record_heartbeat(a, &sample(100 + t, 10), 3, usize::MAX)?;
    }
    let rec = s.get_agent(a)?.ok_or_else(|| anyhow::anyhow!("agent vanished"))?;
    assert_eq!(rec.last_seen_ms, Some(107));
    assert_eq!(rec.last_health.map(|h| h.received_at_ms), Some(107));
    assert!(rec.connected, "a heartbeat changes nothing else");
    let times: Vec<u64> = s.health_history(a, 100)?.iter().map(|h| h.received_at_ms).collect();
    assert_eq!(times, [105, 106, 107]);
    // An agent without a record gets history and no record.
    s.record_heartbeat(aid(2), &sample(9, 1), 3, usize::MAX)?;
    assert_eq!(s.health_history(aid(2), 10)?.len(), 1);
    assert_eq!(s.get_agent(aid(2))?, None);
    Ok(())
}

fn push_health_bounds_count_and_bytes(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let (a, b) = (aid(1), aid(2));
    s.insert_agent(&agent(a))?;
    for t in 0..12u64 {
        s.push_health(a, &sample(100 + t, 10), 5, usize::MAX)?;
    }
    let times =
        |id| -> anyhow::Result<Vec<u64>> { Ok(s.health_history(id, 100)?.iter().map(|h| h.received_at_ms).collect()) };
    assert_eq!(times(a)?, (107..112).collect::<Vec<_>>(), "count bound");
    assert_eq!(s.health_history(a, 2)?.iter().map(|h| h.received_at_ms).collect::<Vec<_>>(), [110, 111]);
    assert_eq!(s.get_agent(a)?.and_then(|r| r.last_health).map(|h| h.received_at_ms), Some(111));

    // Byte bound: room for exactly three samples of this size.
    let one = sample_len(&sample(200, 50))?;
    for t in 0..6u64 {
        s.push_health(b, &sample(200 + t, 50), 100, 3 * one + one / 2)?;
    }
    assert_eq!(times(b)?, [203, 204, 205], "byte bound");
    // A sample bigger than the whole budget is still kept (the newest always is), alone.
    s.push_health(b, &sample(300, 2000), 100, 3 * one)?;
    assert_eq!(times(b)?, [300]);
    let bytes: usize = s.health_history(b, 100)?.iter().map(sample_len).sum::<anyhow::Result<usize>>()?;
    assert!(bytes > 3 * one);
    // keep_max 0 still keeps the newest.
    s.push_health(b, &sample(301, 1), 0, usize::MAX)?;
    assert_eq!(times(b)?, [301]);
    // The other agent's history is untouched; an agent without a record still gets history.
    assert_eq!(times(a)?.len(), 5);
    assert_eq!(s.get_agent(b)?, None);
    // An older sample arriving late does not replace last_health.
    s.push_health(a, &sample(50, 10), 5, usize::MAX)?;
    assert_eq!(s.get_agent(a)?.and_then(|r| r.last_health).map(|h| h.received_at_ms), Some(111));
    assert_eq!(times(a)?, (107..112).collect::<Vec<_>>(), "the late sample sorts oldest and is trimmed first");
    Ok(())
}

/// `update_job` leasing job `n` to `holder` in `state` (None: back to queued without a lease).
fn lease_to(s: &dyn Store, n: u32, holder: Option<AgentId>, state: JobState) -> anyhow::Result<()> {
    s.update_job(jid(n), &mut |j| {
        j.state = state;
        j.agent = holder;
        j.lease_epoch += 1;
        j.lease = holder.map(|h| Lease { holder: h, lease_id: j.lease_epoch, deadline_ms: None });
        true
    })?
    .ok_or_else(|| anyhow::anyhow!("job {n} missing"))?;
    Ok(())
}

fn leased_jobs_follow_every_job_write(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let (a, b, c) = (aid(1), aid(2), aid(3));
    let leased = |holders: &[AgentId]| -> anyhow::Result<Vec<(AgentId, usize)>> {
        let mut v: Vec<(AgentId, usize)> = s.leased_job_counts(holders)?.into_iter().collect();
        v.sort();
        // `jobs_leased_to` agrees with the counts: the holder's assigned and running jobs,
        // assigned first.
        for holder in holders {
            let jobs = s.jobs_leased_to(*holder)?;
            let count = v.iter().find(|(h, _)| h == holder).map_or(0, |(_, n)| *n);
            assert_eq!(jobs.len(), count, "jobs_leased_to({holder}) against leased_job_counts");
            for j in &jobs {
                assert_eq!(j.lease.map(|l| l.holder), Some(*holder), "job {} is the holder's", j.id);
                assert!(matches!(j.state, JobState::Assigned | JobState::Running), "job {} is leased", j.id);
            }
            assert!(
                jobs.windows(2).all(|w| !(w[0].state == JobState::Running && w[1].state == JobState::Assigned)),
                "assigned jobs first"
            );
        }
        Ok(v)
    };
    // The commit below moves job 1 (running on agent 1) to succeeded; jobs 2 and 3 are queued.
    let commit = commit_setup(s)?;
    assert_eq!(leased(&[a, b, c])?, [(a, 1)]);
    for n in 4..=6 {
        s.insert_job(&job(n, 60 + u64::from(n)))?;
    }
    lease_to(s, 4, Some(a), JobState::Assigned)?;
    lease_to(s, 5, Some(b), JobState::Running)?;
    assert_eq!(leased(&[a, b, c])?, [(a, 2), (b, 1)]);
    assert_eq!(leased(&[b])?, [(b, 1)], "only the agents asked about");
    assert_eq!(leased(&[])?, []);
    // An agent's report finishes job 1: its lease is gone.
    assert_eq!(s.commit_agent_message(&commit)?, CommitOutcome::Committed);
    assert_eq!(leased(&[a, b, c])?, [(a, 1), (b, 1)]);
    // Leased again to another agent; back to the queue; claimed.
    lease_to(s, 4, Some(c), JobState::Assigned)?;
    assert_eq!(leased(&[a, b, c])?, [(b, 1), (c, 1)]);
    lease_to(s, 5, None, JobState::Queued)?;
    assert_eq!(leased(&[a, b, c])?, [(c, 1)]);
    s.claim_job(jid(6), &mut |j| {
        j.state = JobState::Assigned;
        j.lease_epoch += 1;
        j.lease = Some(Lease { holder: a, lease_id: j.lease_epoch, deadline_ms: None });
        true
    })?;
    assert_eq!(leased(&[a, b, c])?, [(a, 1), (c, 1)]);
    // Deleting finished jobs leaves the leases alone.
    assert_eq!(s.delete_finished_jobs(u64::MAX, 10)?, 1);
    assert_eq!(leased(&[a, b, c])?, [(a, 1), (c, 1)]);
    Ok(())
}

/// Every page of `query` (at `query.limit` per page) until `next` is None: the agents' ids.
fn all_agent_pages(s: &dyn Store, query: &AgentQuery) -> anyhow::Result<Vec<AgentId>> {
    let mut ids = Vec::new();
    let mut q = query.clone();
    for _ in 0..1000 {
        let page = s.list_agents_page(&q)?;
        anyhow::ensure!(page.agents.len() <= q.limit, "a page holds {} agents, limit {}", page.agents.len(), q.limit);
        ids.extend(page.agents.iter().map(|a| a.id));
        match page.next {
            Some(next) => q.after = Some(next),
            None => return Ok(ids),
        }
    }
    anyhow::bail!("paging did not end")
}

fn agent_pages_filter_count_and_cover_every_agent_once(make: Make) -> TestResult {
    let s = make()?;
    // 24 agents over three sites, hostnames inserted out of order, in every state.
    for n in 0..24u32 {
        let site = ["stage-b", "stage-a", "stage-c"][n as usize % 3];
        let rec = AgentRecord {
            cert_not_after_unix: 2_000_000_000,
            connected: n % 4 != 1,
            offline: n % 8 == 5,
            revoked_at_ms: (n % 8 == 7).then_some(5),
            ..AgentRecord::new(aid(n), site, format!("gpu-{:02}", (n * 7) % 24), 1)
        };
        s.insert_agent(&rec)?;
    }
    let listed = s.list_agents()?;
    let want_counts = AgentCounts::of(&listed);
    assert_eq!(want_counts.all.total(), 24);
    assert!(AgentState::ALL.iter().all(|&st| want_counts.all.get(st) > 0), "every state occurs: {want_counts:?}");

    // Counts only.
    let page = s.list_agents_page(&AgentQuery { limit: 0, ..AgentQuery::default() })?;
    assert!(page.agents.is_empty() && page.next.is_none());
    assert_eq!(page.counts, want_counts);
    assert_eq!(page.counts.by_site.len(), 3);

    // Unfiltered pages of 5 visit every agent once, in listing order (site, hostname, id).
    let order: Vec<AgentId> = listed.iter().map(|a| a.id).collect();
    assert_eq!(all_agent_pages(&*s, &AgentQuery { limit: 5, ..AgentQuery::default() })?, order);
    let sorted: Vec<(String, String)> = listed.iter().map(|a| (a.site.clone(), a.hostname.clone())).collect();
    assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "listing order: {sorted:?}");
    // A page exactly as long as what is left has no next.
    let page = s.list_agents_page(&AgentQuery { limit: 24, ..AgentQuery::default() })?;
    assert_eq!(page.agents.len(), 24);
    assert!(page.next.is_none());

    // Every filter combination, paged by 2, gives exactly the matching agents in order.
    for site in [None, Some("stage-a"), Some("stage-c"), Some("stage-z")] {
        for state in std::iter::once(None).chain(AgentState::ALL.map(Some)) {
            let q = AgentQuery { site: site.map(str::to_owned), state, after: None, limit: 2 };
            let want: Vec<AgentId> = listed.iter().filter(|a| q.matches(a)).map(|a| a.id).collect();
            assert_eq!(all_agent_pages(&*s, &q)?, want, "site {site:?} state {state:?}");
            assert_eq!(s.list_agents_page(&q)?.counts.matching(&q), want.len() as u64, "site {site:?} state {state:?}");
        }
    }

    // A cursor from another site's page continues in the filtered site from its start.
    let first = s.list_agents_page(&AgentQuery { limit: 1, ..AgentQuery::default() })?;
    let q = AgentQuery {
        site: Some("stage-b".into()),
        after: first.next,
        ..AgentQuery { limit: 100, ..Default::default() }
    };
    let want: Vec<AgentId> = listed.iter().filter(|a| a.site == "stage-b").map(|a| a.id).collect();
    assert_eq!(all_agent_pages(&*s, &q)?, want);

    // The state follows every write at once: a link going down, a revocation, a new hostname.
    let online = listed
        .iter()
        .find(|a| AgentState::of(a) == AgentState::Online)
        .map(|a| a.id)
        .ok_or_else(|| anyhow::anyhow!("no online agent"))?;
    s.update_agent(online, &mut |a| a.connected = false)?;
    let q = AgentQuery { state: Some(AgentState::Online), limit: 100, ..AgentQuery::default() };
    let page = s.list_agents_page(&q)?;
    assert!(page.agents.iter().all(|a| a.id != online && a.connected), "a disconnected agent is listed online");
    assert_eq!(page.counts.all.get(AgentState::Online), want_counts.all.get(AgentState::Online) - 1);
    assert_eq!(page.counts.all.get(AgentState::Offline), want_counts.all.get(AgentState::Offline) + 1);
    s.update_agent(online, &mut |a| a.revoked_at_ms = Some(9))?;
    let page =
        s.list_agents_page(&AgentQuery { state: Some(AgentState::Revoked), limit: 100, ..AgentQuery::default() })?;
    assert!(page.agents.iter().any(|a| a.id == online));
    assert_eq!(page.counts.all.get(AgentState::Revoked), want_counts.all.get(AgentState::Revoked) + 1);
    assert_eq!(page.counts.all.total(), 24);
    s.update_agent(online, &mut |a| a.hostname = "aaa-first".into())?;
    let site = s.get_agent(online)?.map(|a| a.site).unwrap_or_default();
    let page = s.list_agents_page(&AgentQuery { site: Some(site), limit: 1, ..AgentQuery::default() })?;
    assert_eq!(page.agents.first().map(|a| a.id), Some(online), "a renamed agent moves in the listing");

    // A new agent in a new site is counted and listed.
    s.insert_agent(&AgentRecord::new(aid(99), "stage-d", "new-box", 2))?;
    let page = s.list_agents_page(&AgentQuery { site: Some("stage-d".into()), limit: 10, ..AgentQuery::default() })?;
    assert_eq!(page.agents.iter().map(|a| a.id).collect::<Vec<_>>(), [aid(99)]);
    assert_eq!(page.counts.by_site.get("stage-d").map(|c| c.get(AgentState::Offline)), Some(1));
    assert_eq!(page.counts.all.total(), 25);

    // Cursors round-trip as text; garbage is refused with a message.
    let c = AgentCursor::of(&AgentRecord::new(aid(1), "stage-a", "gpu-01", 1));
    assert_eq!(c.to_string().parse::<AgentCursor>().map_err(anyhow::Error::msg)?, c);
    assert!("not-a-cursor!".parse::<AgentCursor>().is_err());
    assert!("A".repeat(AgentCursor::TEXT_BYTES_MAX + 1).parse::<AgentCursor>().is_err());
    Ok(())
}

fn other_records_roundtrip(make: Make) -> TestResult {
    use gaffer_control::store::{BundleNumbers, EnrollmentTokenRecord, RevokedCertRecord, StoreError};
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let tok = EnrollmentTokenRecord {
        hash: [1; 32],
        site: "s".into(),
        created_at_ms: 0,
        expires_at_ms: 100,
        used_at_ms: None,
        used_by: None,
    };
    s.insert_enrollment_token(&tok)?;
    assert!(matches!(s.consume_enrollment_token(&[2; 32], aid(1), 5), Err(StoreError::TokenUnknown)));
    let used = s.consume_enrollment_token(&[1; 32], aid(1), 5)?;
    assert_eq!((used.used_at_ms, used.used_by), (Some(5), Some(aid(1))));
    assert!(matches!(s.consume_enrollment_token(&[1; 32], aid(2), 6), Err(StoreError::TokenAlreadyUsed)));
    s.insert_enrollment_token(&EnrollmentTokenRecord { hash: [3; 32], ..tok })?;
    assert!(matches!(s.consume_enrollment_token(&[3; 32], aid(2), 100), Err(StoreError::TokenExpired)));
    let sess = session(6, "alice", 2);
    s.insert_session(&sess)?;
    assert_eq!(s.get_session(&[6; 32])?, Some(sess));
    s.delete_session(&[6; 32])?;
    assert_eq!(s.get_session(&[6; 32])?, None);
    let mut z = agent(aid(9));
    z.site = "a-site".into();
    s.insert_agent(&agent(aid(1)))?;
    s.insert_agent(&z)?;
    assert_eq!(s.list_agents()?.iter().map(|a| a.id).collect::<Vec<_>>(), [aid(9), aid(1)], "by site then hostname");
    assert_eq!(s.update_agent(aid(1), &mut |a| a.connected = false)?.map(|a| a.connected), Some(false));
    assert_eq!(s.update_agent(aid(3), &mut |a| a.connected = false)?, None);
    assert_eq!(s.bundle_numbers(aid(1))?, BundleNumbers::default());
    let nums = BundleNumbers { last_imported_bundle: 3, last_reply_number: 4 };
    s.set_bundle_numbers(aid(1), &nums)?;
    assert_eq!(s.bundle_numbers(aid(1))?, nums);
    for serial in ["0b", "0a"] {
        s.insert_revoked_cert(&RevokedCertRecord { serial_hex: serial.into(), agent: aid(1), revoked_at_ms: 1 })?;
    }
    let serials: Vec<String> = s.list_revoked_certs()?.into_iter().map(|r| r.serial_hex).collect();
    assert_eq!(serials, ["0a", "0b"]);
    for t in [5, 3, 9] {
        s.append_audit(&audit(t, &t.to_string(), None))?;
    }
    let details: Vec<String> = s.list_audit(2)?.into_iter().map(|a| a.detail).collect();
    assert_eq!(details, ["9", "3"], "newest appended first, whatever the clock said");
    s.flush()?;
    Ok(())
}

/// A rollout with two targets, as the book makes them, under `id`.
fn rollout(id: u64) -> anyhow::Result<gaffer_control::rollout::Rollout> {
    use gaffer_control::rollout::{Candidate, RolloutBook, RolloutRelease, RolloutSpec};
    let candidates: Vec<Candidate> = (1..=2)
        .map(|n| Candidate {
            agent_id: aid(n),
            site: "stage-a".into(),
            hostname: format!("gpu{n}"),
            agent_version: Some("1.0.0".into()),
            connected: n == 1,
            offline: false,
            revoked: false,
        })
        .collect();
    let release = RolloutRelease {
        version: "1.1.0".into(),
        file_name: "gaffer-agent-1.1.0-x86_64-linux.tar.gz".into(),
        size_bytes: 10,
        sha256: "ab".repeat(32),
    };
    let spec = RolloutSpec { version: "1.1.0".into(), site: None, canary: 1, health_wait_secs: 60 };
    let mut book = RolloutBook::new();
    let first = book.start(&release, &spec, &candidates, "alice", 5)?;
    let mut r = book.get(first).cloned().ok_or_else(|| anyhow::anyhow!("started rollout missing"))?;
    r.id = id;
    Ok(r)
}

fn rollouts_roundtrip_by_id(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    assert!(s.list_rollouts()?.is_empty());
    let (r3, r1, r256) = (rollout(3)?, rollout(1)?, rollout(256)?);
    for r in [&r256, &r3, &r1] {
        s.put_rollout(r)?;
    }
    let ids: Vec<u64> = s.list_rollouts()?.iter().map(|r| r.id).collect();
    assert_eq!(ids, [1, 3, 256], "by id, numerically");
    assert_eq!(s.list_rollouts()?[1], r3, "every field and target comes back");
    let mut changed = r3.clone();
    changed.state = gaffer_control::rollout::RolloutState::Paused;
    changed.updated_at_ms = 99;
    s.put_rollout(&changed)?;
    assert_eq!(s.list_rollouts()?.len(), 3, "same id replaces");
    assert_eq!(s.list_rollouts()?[1], changed);
    assert!(s.delete_rollout(1)?);
    assert!(!s.delete_rollout(1)?, "gone");
    assert_eq!(s.list_rollouts()?.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 256]);
    s.flush()?;
    Ok(())
}

fn session(n: u8, user: &str, expires_at_ms: u64) -> gaffer_control::store::SessionRecord {
    gaffer_control::store::SessionRecord {
        id_hash: [n; 32],
        csrf_token: format!("csrf-{n}"),
        created_at_ms: 1,
        expires_at_ms,
        user: user.into(),
        role: Role::Viewer,
        password_changed_at_ms: 1,
    }
}

fn user(name: &str, role: Role) -> UserRecord {
    UserRecord {
        name: name.into(),
        role,
        password_phc: format!("$argon2id$v=19$m=19456,t=2,p=1${name}$hash"),
        created_at_ms: 10,
        password_changed_at_ms: 10,
    }
}

fn users_are_unique_and_the_last_admin_stays(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    assert!(s.insert_user(&user("root", Role::Admin))?);
    assert!(s.insert_user(&user("bob", Role::Viewer))?);
    assert!(!s.insert_user(&user("bob", Role::Admin))?, "names are unique");
    assert_eq!(s.get_user("bob")?.map(|u| u.role), Some(Role::Viewer), "the first one stays");
    let names: Vec<String> = s.list_users()?.into_iter().map(|u| u.name).collect();
    assert_eq!(names, ["bob", "root"], "by name");
    assert_eq!(s.remove_user("root")?, UserRemoval::LastAdmin);
    assert!(s.get_user("root")?.is_some());
    assert!(s.insert_user(&user("carol", Role::Admin))?);
    assert!(matches!(s.remove_user("root")?, UserRemoval::Removed(u) if u.name == "root"));
    assert_eq!(s.remove_user("carol")?, UserRemoval::LastAdmin);
    assert_eq!(s.remove_user("nobody")?, UserRemoval::NotFound);
    assert!(matches!(s.remove_user("bob")?, UserRemoval::Removed(_)), "non-admins go freely");
    // The password change time strictly increases, even when the clock does not.
    let changed = s.set_user_password("carol", "$argon2id$new", 5)?.map(|u| (u.password_phc, u.password_changed_at_ms));
    assert_eq!(changed, Some(("$argon2id$new".to_string(), 11)));
    assert_eq!(s.set_user_password("carol", "$argon2id$x", 500)?.map(|u| u.password_changed_at_ms), Some(500));
    assert_eq!(s.set_user_password("nobody", "$argon2id$x", 500)?, None);
    Ok(())
}

fn sessions_end_per_user_and_by_expiry(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    for (n, u, exp) in [(1, "alice", 100), (2, "alice", 300), (3, "bob", 100), (4, "bob", 300)] {
        s.insert_session(&session(n, u, exp))?;
    }
    assert_eq!(s.delete_user_sessions("alice")?, 2);
    assert_eq!(s.get_session(&[1; 32])?, None);
    assert_eq!(s.delete_user_sessions("alice")?, 0);
    assert_eq!(s.delete_expired_sessions(200)?, 1);
    assert_eq!(s.get_session(&[3; 32])?, None);
    assert_eq!(s.get_session(&[4; 32])?.map(|x| x.user), Some("bob".to_string()));
    Ok(())
}

fn token(n: u8, name: &str, role: Role) -> ApiTokenRecord {
    ApiTokenRecord {
        hash: [n; 32],
        name: name.into(),
        role,
        created_at_ms: 1,
        expires_at_ms: 1000,
        last_used_at_ms: None,
        created_by: "uid 0 (root)".into(),
    }
}

fn api_tokens_have_unique_names_and_revoke_at_once(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    assert!(s.create_api_token(&token(1, "ci", Role::Operator))?);
    assert!(!s.create_api_token(&token(2, "ci", Role::Admin))?, "names are unique");
    assert!(!s.create_api_token(&token(1, "other", Role::Admin))?, "so are hashes");
    assert!(s.api_token(&[2; 32])?.is_none(), "a refused token leaves nothing behind");
    assert!(s.create_api_token(&token(3, "a-viewer", Role::Viewer))?);
    let names: Vec<String> = s.list_api_tokens()?.into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["a-viewer", "ci"], "by name");
    s.touch_api_token(&[1; 32], 77)?;
    s.touch_api_token(&[9; 32], 77)?;
    assert_eq!(s.api_token(&[1; 32])?.and_then(|t| t.last_used_at_ms), Some(77));
    assert_eq!(s.revoke_api_token("ci")?.map(|t| t.hash), Some([1; 32]));
    assert!(s.api_token(&[1; 32])?.is_none(), "a revoked token is gone at once");
    assert_eq!(s.revoke_api_token("ci")?, None);
    assert!(s.create_api_token(&token(4, "ci", Role::Viewer))?, "a revoked name can be used again");
    Ok(())
}

fn audit_ids_increase_and_queries_page_through_filters(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    // 30 entries: three actors, alternating actions, one job and agent now and then; the clock
    // goes backwards half-way (ids still increase).
    for i in 0..30u64 {
        let at = if i < 15 { 1000 + i } else { 500 + i };
        let mut rec = AuditRecord::new(
            &Actor::User(format!("user{}", i % 3)),
            if i % 2 == 0 { "login" } else { "job_submit" },
            at,
        )
        .detail(i.to_string());
        if i % 5 == 0 {
            rec = rec.job(jid(1)).agent(aid(2));
        }
        s.append_audit(&rec)?;
    }
    let all = s.query_audit(&AuditQuery { limit: 100, ..AuditQuery::default() })?;
    assert_eq!(all.next, None);
    let details: Vec<u64> = all.entries.iter().map(|e| e.record.detail.parse().unwrap_or(999)).collect();
    assert_eq!(details, (0..30).rev().collect::<Vec<_>>(), "newest appended first");
    assert!(all.entries.windows(2).all(|w| w[0].id > w[1].id), "ids strictly decrease down the page");
    // Paging with a filter visits every match once.
    let q = AuditQuery { actor: Some("user1".into()), action: Some("login".into()), limit: 2, ..AuditQuery::default() };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.query_audit(&AuditQuery { after, ..q.clone() })?;
        seen.extend(page.entries.iter().map(|e| e.record.detail.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, ["28", "22", "16", "10", "4"]);
    let by_job =
        s.query_audit(&AuditQuery { job: Some(jid(1)), agent: Some(aid(2)), limit: 100, ..AuditQuery::default() })?;
    assert_eq!(by_job.entries.len(), 6);
    let since = s.query_audit(&AuditQuery { since_ms: Some(1010), limit: 100, ..AuditQuery::default() })?;
    let since: Vec<&str> = since.entries.iter().map(|e| e.record.detail.as_str()).collect();
    assert_eq!(since, ["14", "13", "12", "11", "10"]);
    Ok(())
}

// ---- replicas, leasing claims and events ----

fn claim_job_without_contention_is_update_job(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    s.insert_job(&job(1, 5))?;
    s.insert_job(&job(2, 6))?;
    let claimed = s
        .claim_job(jid(1), &mut |j| {
            j.state = JobState::Assigned;
            j.lease_epoch += 1;
            j.lease = Some(Lease { holder: aid(1), lease_id: j.lease_epoch, deadline_ms: Some(100) });
            j.agent = Some(aid(1));
            j.seq = 999; // ignored
            true
        })?
        .ok_or_else(|| anyhow::anyhow!("an unheld job was not claimed"))?;
    assert_eq!((claimed.state, claimed.lease.map(|l| l.holder)), (JobState::Assigned, Some(aid(1))));
    assert_eq!(get(s, 1)?, claimed, "claim_job returns the record as stored");
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 1), (JobState::Assigned, 1)]));
    assert_eq!(ids(&s.jobs_in_state(JobState::Assigned, 10)?), [jid(1)]);
    // A closure that declines writes nothing.
    let kept = s.claim_job(jid(2), &mut |j| {
        j.state = JobState::Failed;
        false
    })?;
    assert_eq!(kept.map(|j| j.state), Some(JobState::Queued));
    assert_eq!(get(s, 2)?.state, JobState::Queued);
    assert_eq!(s.claim_job(jid(3), &mut |_| true)?, None, "a missing job");
    Ok(())
}

fn replica(n: u128, seen_at_ms: u64) -> ReplicaRecord {
    ReplicaRecord {
        id: Uuid::from_u128(0xbeef_0000 + n),
        quic_addr: format!("10.0.0.{n}:7443"),
        http_addr: format!("10.0.0.{n}:8443"),
        started_at_ms: 100,
        seen_at_ms,
        version: "0.1.0".into(),
    }
}

fn replicas_register_heartbeat_and_leave(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    assert!(s.list_replicas()?.is_empty());
    s.replica_heartbeat(&replica(2, 1000))?;
    s.replica_heartbeat(&replica(1, 1000))?;
    assert_eq!(s.list_replicas()?, [replica(1, 1000), replica(2, 1000)], "by id");
    s.replica_heartbeat(&replica(2, 5000))?;
    assert_eq!(s.list_replicas()?, [replica(1, 1000), replica(2, 5000)], "a heartbeat replaces the record");
    assert!(s.remove_replica(replica(1, 0).id)?);
    assert!(!s.remove_replica(replica(1, 0).id)?, "already gone");
    assert_eq!(s.list_replicas()?, [replica(2, 5000)]);
    Ok(())
}

fn envelope(origin: u128, event: StoreEvent) -> StoreEventEnvelope {
    StoreEventEnvelope { origin: Uuid::from_u128(origin), event }
}

/// The next event on `rx`, waiting at most 30 s (a generous bound: notifications take
/// milliseconds).
fn next_event(rx: &mut broadcast::Receiver<StoreEventEnvelope>) -> anyhow::Result<StoreEventEnvelope> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.try_recv() {
            Ok(ev) => return Ok(ev),
            Err(broadcast::error::TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => anyhow::bail!("no event within 30 s: {e:?}"),
        }
    }
}

fn events() -> [StoreEventEnvelope; 4] {
    [
        envelope(1, StoreEvent::JobsChanged),
        envelope(
            1,
            StoreEvent::Deliver {
                agent: aid(3),
                msg: ControlMessage::Cancel { job_id: jid(4), reason: "cancelled by an operator".into() },
            },
        ),
        envelope(2, StoreEvent::AgentRevoked { agent: aid(5) }),
        envelope(2, StoreEvent::CertsRevoked),
    ]
}

fn events_reach_every_subscriber_in_order(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let (mut first, mut second) = (s.subscribe(), s.subscribe());
    for ev in events() {
        s.publish(&ev)?;
    }
    for rx in [&mut first, &mut second] {
        for ev in events() {
            assert_eq!(next_event(rx)?, ev, "subscribers see every publish, their own store's included");
        }
    }
    // Too large for one notification: refused on every store, nothing sent.
    let big = envelope(
        1,
        StoreEvent::Deliver { agent: aid(3), msg: ControlMessage::Refused { reason: "x".repeat(EVENT_BYTES_MAX) } },
    );
    match s.publish(&big) {
        Err(StoreError::EventTooLarge { bytes, bytes_max }) => {
            assert!(bytes > bytes_max && bytes_max == EVENT_BYTES_MAX);
        }
        other => anyhow::bail!("an oversized event gave {other:?}"),
    }
    let after = envelope(9, StoreEvent::JobsChanged);
    s.publish(&after)?;
    assert_eq!(next_event(&mut first)?, after, "the refused event was not delivered");
    // A subscriber sees what is published after it subscribed.
    let mut late = s.subscribe();
    s.publish(&events()[3])?;
    assert_eq!(next_event(&mut late)?, events()[3]);
    Ok(())
}

fn concurrent_token_consumers_have_one_winner(make: Make) -> TestResult {
    use gaffer_control::store::EnrollmentTokenRecord;
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    for round in 0..4u8 {
        let hash = [round; 32];
        s.insert_enrollment_token(&EnrollmentTokenRecord {
            hash,
            site: "stage-a".into(),
            created_at_ms: 0,
            expires_at_ms: 10_000,
            used_at_ms: None,
            used_by: None,
        })?;
        let barrier = std::sync::Barrier::new(6);
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6u32)
                .map(|n| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        (aid(n), s.consume_enrollment_token(&hash, aid(n), 100))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("consumer panicked")))
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let mut winners = Vec::new();
        for (me, result) in results {
            match result {
                Ok(rec) => {
                    assert_eq!(rec.used_by, Some(me));
                    winners.push(me);
                }
                Err(StoreError::TokenAlreadyUsed) => {}
                Err(e) => anyhow::bail!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one consumer wins, not {winners:?}");
    }
    Ok(())
}

// ---- webhooks ----

fn webhook_target(n: u128, name: &str) -> gaffer_control::webhook::WebhookTarget {
    use gaffer_control::webhook::{BodyFormat, Destination, EventKind, WebhookTarget};
    WebhookTarget {
        id: Uuid::from_u128(0xbeef_0000 + n),
        name: name.into(),
        destination: Destination::Http { url: format!("https://hooks.example.com/{name}"), format: BodyFormat::Json },
        events: vec![EventKind::JobSucceeded, EventKind::JobFailed],
        secret: Some(format!("secret-{n}")),
        created_at_ms: 1_000 + n as u64,
        created_by: "os:test".into(),
    }
}

/// A pending delivery created at `created_at_ms` (its UUID v7 carries that time), due then.
fn webhook_delivery(n: u64, created_at_ms: u64) -> gaffer_control::webhook::WebhookDelivery {
    use gaffer_control::webhook::{DeliveryState, EventKind, WebhookDelivery};
    let ts =
        uuid::Timestamp::from_unix(uuid::NoContext, created_at_ms / 1000, (created_at_ms % 1000) as u32 * 1_000_000);
    WebhookDelivery {
        id: Uuid::new_v7(ts),
        target_id: Uuid::from_u128(0xbeef_0001),
        target_name: "one".into(),
        event: EventKind::JobSucceeded,
        payload: format!("{{\"event\":\"job.succeeded\",\"n\":{n},\"s\":\"\\u0000 é\"}}"),
        summary: format!("delivery {n}"),
        created_at_ms,
        state: DeliveryState::Pending,
        next_attempt_at_ms: created_at_ms,
        attempts_total: 0,
        attempts: Vec::new(),
        finished_at_ms: None,
    }
}

fn webhook_targets_roundtrip(make: Make) -> TestResult {
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    assert!(s.list_webhook_targets()?.is_empty());
    let (a, b) = (webhook_target(2, "two"), webhook_target(1, "one"));
    s.put_webhook_target(&a)?;
    s.put_webhook_target(&b)?;
    let listed = s.list_webhook_targets()?;
    assert_eq!(listed, [b.clone(), a.clone()], "by id, every field (the secret too) back");
    let mut changed = a.clone();
    changed.events = vec![gaffer_control::webhook::EventKind::AgentOffline];
    s.put_webhook_target(&changed)?;
    assert_eq!(s.list_webhook_targets()?, [b.clone(), changed], "same id replaces");
    assert!(s.delete_webhook_target(a.id)?);
    assert!(!s.delete_webhook_target(a.id)?, "gone");
    assert_eq!(s.list_webhook_targets()?, [b]);
    s.flush()?;
    Ok(())
}

fn webhook_deliveries_due_update_and_list(make: Make) -> TestResult {
    use gaffer_control::webhook::{DeliveryAttempt, DeliveryState};
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let (d1, d2, d3) = (webhook_delivery(1, 1_000), webhook_delivery(2, 2_000), webhook_delivery(3, 3_000));
    for d in [&d2, &d1, &d3] {
        assert!(s.enqueue_webhook_delivery(d, 100)?.is_empty(), "under the bound nothing is dropped");
    }
    assert_eq!(s.webhook_pending_count()?, 3);
    let ids = |v: Vec<gaffer_control::webhook::WebhookDelivery>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(ids(s.webhook_deliveries_due(2_000, 10)?), [d1.id, d2.id], "due ones, soonest first");
    assert_eq!(ids(s.webhook_deliveries_due(10_000, 2)?), [d1.id, d2.id], "limit");
    assert_eq!(s.webhook_deliveries_due(10_000, 10)?[0], d1, "every field back (payload bytes exact)");

    // A claim moves the due time: d1 is no longer due at 2 s; a declined update changes nothing.
    let claimed = s.update_webhook_delivery(d1.id, &mut |d| {
        d.next_attempt_at_ms = 50_000;
        true
    })?;
    assert_eq!(claimed.map(|d| d.next_attempt_at_ms), Some(50_000));
    assert_eq!(ids(s.webhook_deliveries_due(3_000, 10)?), [d2.id, d3.id]);
    assert_eq!(s.update_webhook_delivery(d2.id, &mut |_| false)?, None);
    assert_eq!(s.update_webhook_delivery(Uuid::from_u128(7), &mut |_| true)?, None, "unknown id");
    assert_eq!(ids(s.webhook_deliveries_due(60_000, 10)?), [d2.id, d3.id, d1.id]);

    // Delivered: out of the due index and the pending count, attempts kept.
    let attempt = DeliveryAttempt { at_ms: 3_000, duration_ms: 12, status: Some(200), error: None };
    let done = s.update_webhook_delivery(d2.id, &mut |d| {
        d.state = DeliveryState::Delivered;
        d.attempts_total = 1;
        d.attempts.push(attempt.clone());
        d.finished_at_ms = Some(3_000);
        true
    })?;
    assert_eq!(done.as_ref().map(|d| d.attempts.clone()), Some(vec![attempt]));
    assert_eq!(ids(s.webhook_deliveries_due(u64::MAX, 10)?), [d3.id, d1.id]);
    assert_eq!(s.webhook_pending_count()?, 2);
    assert_eq!(ids(s.list_webhook_deliveries(10)?), [d3.id, d2.id, d1.id], "newest first, finished ones too");
    assert_eq!(s.list_webhook_deliveries(10)?[1], done.unwrap_or_else(|| d2.clone()));
    assert_eq!(ids(s.list_webhook_deliveries(1)?), [d3.id]);

    // Retention deletes finished ones before the cutoff, never pending ones.
    assert_eq!(s.delete_finished_webhook_deliveries(10_000, 10)?, 1);
    assert_eq!(ids(s.list_webhook_deliveries(10)?), [d3.id, d1.id]);
    assert_eq!(s.webhook_pending_count()?, 2);
    s.flush()?;
    Ok(())
}

fn webhook_pending_bound_drops_the_oldest(make: Make) -> TestResult {
    use gaffer_control::webhook::DeliveryState;
    let fixture = make()?;
    let s: &dyn Store = &*fixture;
    let ds: Vec<_> = (1..=4).map(|n| webhook_delivery(n, n * 1_000)).collect();
    // The oldest is due last: the drop goes by age, not by due time.
    let mut first = ds[0].clone();
    first.next_attempt_at_ms = 99_000;
    assert!(s.enqueue_webhook_delivery(&first, 3)?.is_empty());
    assert!(s.enqueue_webhook_delivery(&ds[1], 3)?.is_empty());
    assert!(s.enqueue_webhook_delivery(&ds[2], 3)?.is_empty());
    assert_eq!(s.enqueue_webhook_delivery(&ds[3], 3)?, [first.id], "the fourth drops the oldest");
    assert_eq!(s.webhook_pending_count()?, 3);
    let all = s.list_webhook_deliveries(10)?;
    let dropped = all.iter().find(|d| d.id == first.id);
    assert_eq!(dropped.map(|d| d.state), Some(DeliveryState::Dropped), "kept, marked dropped");
    assert!(s.webhook_deliveries_due(u64::MAX, 10)?.iter().all(|d| d.id != first.id));
    s.flush()?;
    Ok(())
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $( #[test] fn $name() -> super::TestResult { super::$name(super::sled_fixture) } )*
        }
        mod mem {
            $( #[test] fn $name() -> super::TestResult { super::$name(super::mem_fixture) } )*
        }
        mod pg {
            $( #[test] fn $name() -> super::TestResult { super::$name(super::pg_fixture) } )*
        }
    };
}

contract!(
    insert_get_and_duplicate,
    seq_orders_insertions,
    jobs_in_state_order_and_limit,
    update_job_moves_index_and_counts,
    list_jobs_pages_cover_every_job_once,
    list_jobs_scan_is_bounded,
    counts_follow_every_write,
    commit_writes_everything,
    commit_duplicate_writes_nothing,
    commit_conflict_writes_nothing,
    commit_keeps_first_digest_and_existing_job,
    commit_without_job_sets_watermark,
    delete_finished_respects_cutoff_and_limit,
    push_health_bounds_count_and_bytes,
    heartbeats_set_last_health_and_last_seen_and_keep_the_bounds,
    other_records_roundtrip,
    users_are_unique_and_the_last_admin_stays,
    sessions_end_per_user_and_by_expiry,
    api_tokens_have_unique_names_and_revoke_at_once,
    audit_ids_increase_and_queries_page_through_filters,
    rollouts_roundtrip_by_id,
    webhook_targets_roundtrip,
    webhook_deliveries_due_update_and_list,
    webhook_pending_bound_drops_the_oldest,
    agent_pages_filter_count_and_cover_every_agent_once,
    leased_jobs_follow_every_job_write,
    claim_job_without_contention_is_update_job,
    replicas_register_heartbeat_and_leave,
    events_reach_every_subscriber_in_order,
    concurrent_token_consumers_have_one_winner,
);

// ---- implementation-specific ----

/// Writes that must survive closing and opening the store again (`open` opens the same data).
fn records_survive_reopen(open: &dyn Fn() -> anyhow::Result<Box<dyn Store>>) -> TestResult {
    let before;
    {
        let s = open()?;
        let commit = commit_setup(&*s)?;
        assert_eq!(s.commit_agent_message(&commit)?, CommitOutcome::Committed);
        s.push_health(aid(1), &sample(10, 5), 3, usize::MAX)?;
        s.push_health(aid(1), &sample(11, 5), 3, usize::MAX)?;
        before = observe(&*s, &[1, 2, 3], aid(1))?;
        s.put_rollout(&rollout(7)?)?;
        s.replica_heartbeat(&replica(1, 10))?;
        s.flush()?;
    }
    let s = open()?;
    assert_eq!(observe(&*s, &[1, 2, 3], aid(1))?, before);
    assert_eq!(s.list_rollouts()?, vec![rollout(7)?], "rollouts survive a reopen");
    assert_eq!(s.list_replicas()?, [replica(1, 10)], "replicas survive a reopen");
    assert_eq!(s.health_history(aid(1), 10)?.len(), 2);
    // Seqs keep growing across the reopen.
    let max_seq = before.listed.iter().map(|j| j.seq).max().unwrap_or_default();
    assert!(s.insert_job(&job(9, 1))?);
    assert!(get(&*s, 9)?.seq > max_seq);
    // The health tally is recomputed: one more push trims to three.
    s.push_health(aid(1), &sample(12, 5), 3, usize::MAX)?;
    s.push_health(aid(1), &sample(13, 5), 3, usize::MAX)?;
    let times: Vec<u64> = s.health_history(aid(1), 10)?.iter().map(|h| h.received_at_ms).collect();
    assert_eq!(times, [11, 12, 13]);
    Ok(())
}

#[test]
fn sled_records_survive_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    records_survive_reopen(&|| Ok(Box::new(SledStore::open(dir.path())?)))
}

#[test]
fn pg_records_survive_reconnect() -> TestResult {
    let db = test_database()?;
    records_survive_reopen(&|| Ok(Box::new(PgStore::connect(db.url(), pg_options())?)))
}

/// `claim_job` skips a job another writer holds right now (here an `update_job` whose closure
/// waits), answering at once; it neither waits for the row nor writes anything.
#[test]
fn pg_claim_job_skips_a_row_another_writer_holds() -> TestResult {
    let db = test_database()?;
    let (a, b) = (PgStore::connect(db.url(), pg_options())?, PgStore::connect(db.url(), pg_options())?);
    a.insert_job(&job(1, 5))?;
    a.insert_job(&job(2, 6))?;
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holding = &a;
    std::thread::scope(|scope| -> TestResult {
        let holder = scope.spawn(move || {
            holding.update_job(jid(1), &mut |j| {
                // The transaction holds the row while this runs.
                let _ = held_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(60));
                j.frames_decoded = 7;
                true
            })
        });
        held_rx.recv_timeout(Duration::from_secs(30))?;
        let mut ran = false;
        let skipped = b.claim_job(jid(1), &mut |j| {
            ran = true;
            j.state = JobState::Assigned;
            true
        });
        // A claim on the same store skips too.
        let skipped_here = a.claim_job(jid(1), &mut |_| true);
        let other = b.claim_job(jid(2), &mut |j| {
            j.state = JobState::Assigned;
            true
        });
        release_tx.send(())?;
        let held = holder.join().map_err(|_| anyhow::anyhow!("holder panicked"))??;
        assert_eq!(skipped?, None, "a held row is skipped");
        assert!(!ran, "the closure of a skipped claim does not run");
        assert_eq!(skipped_here?, None);
        assert_eq!(other?.map(|j| j.state), Some(JobState::Assigned), "other rows are not held");
        assert_eq!(held.map(|j| j.frames_decoded), Some(7));
        Ok(())
    })?;
    let stored = get(&a, 1)?;
    assert_eq!((stored.state, stored.frames_decoded), (JobState::Queued, 7), "only the holder wrote");
    assert_eq!(b.job_counts()?, counts(&[(JobState::Queued, 1), (JobState::Assigned, 1)]));
    Ok(())
}

/// Two stores on one database (two replicas), two threads each, leasing 200 queued jobs with
/// `jobs_in_state` + `claim_job`: every job is leased exactly once, to the claimer the record names.
#[test]
fn pg_racing_claims_lease_each_job_once() -> TestResult {
    let db = test_database()?;
    let (a, b) = (PgStore::connect(db.url(), pg_options())?, PgStore::connect(db.url(), pg_options())?);
    let total = 200u32;
    for n in 0..total {
        a.insert_job(&job(n, u64::from(n)))?;
    }
    let claimers: [(&PgStore, AgentId); 4] = [(&a, aid(1)), (&a, aid(2)), (&b, aid(3)), (&b, aid(4))];
    let leases: Vec<(JobId, AgentId)> = std::thread::scope(|scope| {
        let handles: Vec<_> = claimers
            .into_iter()
            .map(|(store, me)| {
                scope.spawn(move || -> anyhow::Result<Vec<(JobId, AgentId)>> {
                    let mut mine = Vec::new();
                    for _ in 0..10_000 {
                        let queued = store.jobs_in_state(JobState::Queued, 16)?;
                        if queued.is_empty() {
                            return Ok(mine);
                        }
                        for candidate in queued {
                            let mut leased = false;
                            store.claim_job(candidate.id, &mut |j| {
                                leased = false;
                                if j.state != JobState::Queued {
                                    return false;
                                }
                                j.state = JobState::Assigned;
                                j.agent = Some(me);
                                j.lease_epoch += 1;
                                j.lease = Some(Lease { holder: me, lease_id: j.lease_epoch, deadline_ms: Some(1) });
                                j.attempts += 1;
                                leased = true;
                                true
                            })?;
                            if leased {
                                mine.push((candidate.id, me));
                            }
                        }
                    }
                    anyhow::bail!("claimer {me} did not see the queue empty")
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("claimer panicked"))??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let mut leased_jobs: Vec<JobId> = leases.iter().map(|l| l.0).collect();
    leased_jobs.sort();
    leased_jobs.dedup();
    assert_eq!(leases.len(), total as usize, "one lease per job, no more");
    assert_eq!(leased_jobs.len(), total as usize, "every job leased");
    for (id, holder) in &leases {
        let stored = b.get_job(*id)?.ok_or_else(|| anyhow::anyhow!("job {id} missing"))?;
        assert_eq!(stored.lease.map(|l| (l.holder, l.lease_id)), Some((*holder, 1)), "job {id}");
        assert_eq!(stored.attempts, 1, "job {id} leased once");
    }
    assert_eq!(a.job_counts()?, counts(&[(JobState::Assigned, u64::from(total))]));
    assert!(a.jobs_in_state(JobState::Queued, 10)?.is_empty());
    Ok(())
}

/// Events published by one store reach the subscribers of every store on the database.
#[test]
fn pg_events_cross_stores_on_one_database() -> TestResult {
    let db = test_database()?;
    let (a, b) = (PgStore::connect(db.url(), pg_options())?, PgStore::connect(db.url(), pg_options())?);
    let (mut on_a, mut on_b) = (a.subscribe(), b.subscribe());
    let [first, second, third, fourth] = events();
    a.publish(&first)?;
    b.publish(&second)?;
    for rx in [&mut on_a, &mut on_b] {
        assert_eq!(next_event(rx)?, first);
        assert_eq!(next_event(rx)?, second);
    }
    // Another database's events stay there.
    let elsewhere = test_database()?;
    let c = PgStore::connect(elsewhere.url(), pg_options())?;
    c.publish(&third)?;
    a.publish(&fourth)?;
    assert_eq!(next_event(&mut on_b)?, fourth, "an event of another database arrived");
    Ok(())
}

/// After its listener loses the connection, the store listens again and tells subscribers that
/// events may have been missed.
#[test]
fn pg_listener_reconnects_and_says_jobs_changed() -> TestResult {
    let db = test_database()?;
    let s = PgStore::connect(db.url(), pg_options())?;
    let mut rx = s.subscribe();
    let killed = db.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'gaffer-control events' AND datname = current_database()",
    )?;
    assert_eq!(killed, "1", "the listener's connection");
    assert_eq!(next_event(&mut rx)?, StoreEventEnvelope { origin: STORE_ORIGIN, event: StoreEvent::JobsChanged });
    let ev = envelope(4, StoreEvent::CertsRevoked);
    s.publish(&ev)?;
    assert_eq!(next_event(&mut rx)?, ev, "events flow again");
    Ok(())
}

/// The last-admin rule holds across replicas: two stores removing the only two admins at once
/// leave exactly one.
#[test]
fn pg_last_admin_holds_across_stores() -> TestResult {
    let db = test_database()?;
    let (a, b) = (PgStore::connect(db.url(), pg_options())?, PgStore::connect(db.url(), pg_options())?);
    for name in ["x", "y"] {
        assert!(a.insert_user(&user(name, Role::Admin))?);
    }
    for round in 0..8 {
        let barrier = std::sync::Barrier::new(2);
        let (rx, ry) = std::thread::scope(|scope| {
            let hx = scope.spawn(|| {
                barrier.wait();
                a.remove_user("x")
            });
            let hy = scope.spawn(|| {
                barrier.wait();
                b.remove_user("y")
            });
            (hx.join(), hy.join())
        });
        let (rx, ry) = (rx.map_err(|_| anyhow::anyhow!("panicked"))??, ry.map_err(|_| anyhow::anyhow!("panicked"))??);
        let removed: Vec<bool> = [&rx, &ry].iter().map(|r| matches!(r, UserRemoval::Removed(_))).collect();
        assert_eq!(removed.iter().filter(|r| **r).count(), 1, "round {round}: {rx:?} / {ry:?}");
        assert!([&rx, &ry].contains(&&UserRemoval::LastAdmin), "round {round}");
        let admins: Vec<String> =
            b.list_users()?.into_iter().filter(|u| u.role == Role::Admin).map(|u| u.name).collect();
        assert_eq!(admins.len(), 1, "round {round}: {admins:?}");
        let gone = if admins[0] == "x" { "y" } else { "x" };
        assert!(a.insert_user(&user(gone, Role::Admin))?);
    }
    Ok(())
}

/// A database migrated by a newer gaffer-control is refused with a message saying to upgrade,
/// and left as it was.
#[test]
fn pg_refuses_a_newer_schema() -> TestResult {
    let db = test_database()?;
    drop(PgStore::connect(db.url(), pg_options())?);
    db.psql(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer gaffer-control', true, '\\x00', 0)",
    )?;
    match PgStore::connect(db.url(), pg_options()) {
        Err(e @ StoreError::SchemaTooNew { found: 9999, .. }) => {
            assert!(e.to_string().contains("upgrade gaffer-control"), "{e}");
        }
        other => anyhow::bail!("a newer schema gave {other:?}"),
    }
    // This binary's migrations plus the newer one.
    let expected = (gaffer_control::store::pg_store::schema_version() + 1).to_string();
    assert_eq!(db.psql("SELECT count(*) FROM _sqlx_migrations")?, expected, "nothing applied or removed");
    Ok(())
}

/// No server, or no such database: a typed error within the call timeout that says what to check
/// and never shows the password.
#[test]
fn pg_unreachable_server_is_a_clear_error_without_the_password() -> TestResult {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let opts = PgOptions { call_timeout: Duration::from_secs(5), ..pg_options() };
    let url = format!("postgres://gaffer:s3cret-pw@127.0.0.1:{port}/gaffer");
    match PgStore::connect(&url, opts.clone()) {
        Err(e @ StoreError::Unavailable { .. }) => {
            let msg = e.to_string();
            assert!(!msg.contains("s3cret-pw"), "the password leaked: {msg}");
            assert!(msg.contains(&format!("gaffer:***@127.0.0.1:{port}")), "{msg}");
            assert!(msg.contains("check that PostgreSQL is running"), "{msg}");
        }
        other => anyhow::bail!("no server gave {other:?}"),
    }
    let db = test_database()?;
    let mut missing = url::Url::parse(db.url())?;
    missing.set_path("/no_such_database");
    let _ = missing.set_password(Some("s3cret-pw"));
    match PgStore::connect(missing.as_str(), opts) {
        Err(e @ StoreError::Unavailable { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("no_such_database") && !msg.contains("s3cret-pw"), "{msg}");
        }
        other => anyhow::bail!("a missing database gave {other:?}"),
    }
    assert!(matches!(PgStore::connect("not a URL", pg_options()), Err(StoreError::Open { .. })));
    Ok(())
}

/// The store is used from async tasks too: calls, connecting and dropping inside a tokio runtime
/// (current-thread and multi-thread) neither panic nor deadlock.
#[test]
fn pg_works_from_inside_a_tokio_runtime() -> TestResult {
    let db = test_database()?;
    let url = db.url().to_owned();
    let current = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    current.block_on(async {
        let s = PgStore::connect(&url, pg_options())?;
        assert!(s.insert_job(&job(1, 1))?);
        assert_eq!(get(&s, 1)?.state, JobState::Queued);
        drop(s);
        anyhow::Ok(())
    })?;
    let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let s = std::sync::Arc::new(PgStore::connect(&url, pg_options())?);
    multi.block_on(async move {
        let tasks: Vec<_> = (2..10u32)
            .map(|n| {
                let s = s.clone();
                tokio::spawn(async move { s.insert_job(&job(n, u64::from(n))) })
            })
            .collect();
        for t in tasks {
            assert!(t.await??);
        }
        // The last reference dropped on an async worker.
        let last = s.clone();
        drop(s);
        tokio::spawn(async move { drop(last) }).await?;
        anyhow::Ok(())
    })?;
    let s = PgStore::connect(&url, pg_options())?;
    assert_eq!(s.job_counts()?, counts(&[(JobState::Queued, 9)]));
    Ok(())
}

#[test]
fn mem_snapshot_is_a_deep_copy() -> TestResult {
    let s = MemStore::new();
    let commit = commit_setup(&s)?;
    assert_eq!(s.commit_agent_message(&commit)?, CommitOutcome::Committed);
    let snap = s.snapshot();
    let before = observe(&snap, &[1, 2, 3], aid(1))?;
    assert_eq!(observe(&s, &[1, 2, 3], aid(1))?, before);
    s.update_job(jid(2), &mut |j| {
        j.state = JobState::Cancelled;
        true
    })?;
    s.set_last_applied_seq(aid(1), 99)?;
    assert_eq!(observe(&snap, &[1, 2, 3], aid(1))?, before, "writes to the original reached the snapshot");
    assert_ne!(observe(&s, &[1, 2, 3], aid(1))?, before);
    // The snapshot goes on drawing seqs after the ones it has.
    assert!(snap.insert_job(&job(9, 1))?);
    let max_seq = before.listed.iter().map(|j| j.seq).max().unwrap_or_default();
    assert!(get(&snap, 9)?.seq > max_seq);
    Ok(())
}

// ---- both stores side by side ----

mod differential {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert {
            n: u32,
            created: u64,
            priority: usize,
        },
        Update {
            n: u32,
            state: usize,
            priority: usize,
            agent: Option<u32>,
            finished: Option<u64>,
            write: bool,
        },
        List {
            state: Option<usize>,
            agent: Option<u32>,
            limit: usize,
        },
        InState {
            state: usize,
            limit: usize,
        },
        Delete {
            cutoff: u64,
            limit: usize,
        },
        Commit {
            agent: u32,
            seq: u64,
            job: Option<(u32, bool, usize)>,
            digest: Option<u32>,
            new_job: Option<(u32, u64)>,
            audits: usize,
        },
        Health {
            agent: u32,
            t: u64,
            pad: usize,
            keep: usize,
            bytes: usize,
        },
        History {
            agent: u32,
            limit: usize,
        },
        Restart,
    }

    const PRIORITIES: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..8u32, 0..6u64, 0..3usize).prop_map(|(n, created, priority)| Op::Insert { n, created, priority }),
            3 => (0..8u32, 0..6usize, 0..3usize, proptest::option::of(0..3u32), proptest::option::of(0..12u64), any::<bool>())
                .prop_map(|(n, state, priority, agent, finished, write)| Op::Update { n, state, priority, agent, finished, write }),
            2 => (proptest::option::of(0..6usize), proptest::option::of(0..3u32), 1..4usize)
                .prop_map(|(state, agent, limit)| Op::List { state, agent, limit }),
            2 => (0..6usize, 0..5usize).prop_map(|(state, limit)| Op::InState { state, limit }),
            1 => (0..14u64, 0..3usize).prop_map(|(cutoff, limit)| Op::Delete { cutoff, limit }),
            3 => (0..2u32, 0..6u64, proptest::option::of((0..8u32, any::<bool>(), 0..6usize)), proptest::option::of(0..8u32),
                  proptest::option::of((0..8u32, 0..6u64)), 0..3usize)
                .prop_map(|(agent, seq, job, digest, new_job, audits)| Op::Commit { agent, seq, job, digest, new_job, audits }),
            2 => (0..2u32, 0..20u64, 0..40usize, 1..4usize, 300..1200usize)
                .prop_map(|(agent, t, pad, keep, bytes)| Op::Health { agent, t, pad, keep, bytes }),
            1 => (0..2u32, 0..5usize).prop_map(|(agent, limit)| Op::History { agent, limit }),
            1 => Just(Op::Restart),
        ]
    }

    /// The stores assign different seqs (sled's come from `generate_id`): compare without them.
    fn norm(jobs: Vec<JobRecord>) -> Vec<JobRecord> {
        jobs.into_iter().map(|j| JobRecord { seq: 0, ..j }).collect()
    }

    fn norm1(job: Option<JobRecord>) -> Option<JobRecord> {
        job.map(|j| JobRecord { seq: 0, ..j })
    }

    /// A store that keeps its data across a restart, run beside `MemStore`.
    #[allow(clippy::large_enum_variant)] // two of them in a test
    enum Durable {
        Sled { store: Option<SledStore>, dir: tempfile::TempDir },
        Pg { store: Option<PgStore>, db: TestDatabase },
    }

    impl Durable {
        fn sled() -> anyhow::Result<Durable> {
            let dir = tempfile::tempdir()?;
            Ok(Durable::Sled { store: Some(SledStore::open(dir.path())?), dir })
        }

        fn pg() -> anyhow::Result<Durable> {
            let db = test_database()?;
            Ok(Durable::Pg { store: Some(PgStore::connect(db.url(), pg_options())?), db })
        }

        fn name(&self) -> &'static str {
            match self {
                Durable::Sled { .. } => "sled",
                Durable::Pg { .. } => "pg",
            }
        }

        fn store(&self) -> anyhow::Result<&dyn Store> {
            match self {
                Durable::Sled { store: Some(s), .. } => Ok(s),
                Durable::Pg { store: Some(s), .. } => Ok(s),
                _ => anyhow::bail!("{} store missing", self.name()),
            }
        }

        /// Closes the store and opens it again on the same data.
        fn restart(&mut self) -> anyhow::Result<()> {
            match self {
                Durable::Sled { store, dir } => {
                    if let Some(s) = store.take() {
                        s.flush()?;
                    }
                    *store = Some(SledStore::open(dir.path())?);
                }
                Durable::Pg { store, db } => {
                    drop(store.take());
                    *store = Some(PgStore::connect(db.url(), pg_options())?);
                }
            }
            Ok(())
        }
    }

    fn apply(s: &dyn Store, op: &Op) -> anyhow::Result<String> {
        Ok(match op.clone() {
            Op::Insert { n, created, priority } => {
                format!("{:?}", s.insert_job(&with_priority(job(n, created), PRIORITIES[priority]))?)
            }
            Op::Update { n, state, priority, agent, finished, write } => {
                let got = s.update_job(jid(n), &mut |j| {
                    j.state = JobState::ALL[state];
                    j.priority = PRIORITIES[priority];
                    j.agent = agent.map(aid);
                    j.finished_at_ms = finished;
                    j.updated_at_ms += 1;
                    write
                })?;
                format!("{:?} {:?}", norm1(got), s.job_counts()?)
            }
            Op::List { state, agent, limit } => {
                let pages = all_pages(s, state.map(|i| JobState::ALL[i]), agent.map(aid), limit)?;
                format!("{:?}", norm(pages))
            }
            Op::InState { state, limit } => format!("{:?}", norm(s.jobs_in_state(JobState::ALL[state], limit)?)),
            Op::Delete { cutoff, limit } => {
                format!(
                    "{} {:?} {:?}",
                    s.delete_finished_jobs(cutoff, limit)?,
                    s.job_counts()?,
                    norm(all_pages(s, None, None, 50)?)
                )
            }
            Op::Commit { agent: a, seq, job: jw, digest: d, new_job, audits } => {
                let write = match jw {
                    Some((n, stale, state)) => {
                        let mut before = s.get_job(jid(n))?.unwrap_or_else(|| job(n, 0));
                        let mut after = before.clone();
                        after.state = JobState::ALL[state];
                        after.progress = 0.5;
                        if stale {
                            before.frames_decoded += 1;
                        }
                        Some(JobWrite { before, after })
                    }
                    None => None,
                };
                let commit = AgentCommit {
                    agent: aid(a),
                    seq,
                    now_ms: 1000 + seq,
                    job: write,
                    digest: d.map(|n| (jid(n), digest(&format!("/d/{n}/{seq}"), 0.1))),
                    new_job: new_job.map(|(n, created)| job(n, created)),
                    audit: (0..audits).map(|i| audit(seq, &format!("{a}-{seq}-{i}"), None)).collect(),
                };
                let outcome = s.commit_agent_message(&commit)?;
                format!(
                    "{outcome:?} {:?} {:?} {:?} {:?} {:?}",
                    s.job_counts()?,
                    s.last_applied_seq(aid(a))?,
                    s.get_agent(aid(a))?,
                    s.list_audit(100)?,
                    (0..8)
                        .map(|n| s.get_digest(jid(n)).map(|d| d.map(|d| d.source.path)))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            Op::Health { agent: a, t, pad, keep, bytes } => {
                s.push_health(aid(a), &sample(t, pad), keep, bytes)?;
                format!("{:?} {:?}", s.health_history(aid(a), 100)?, s.get_agent(aid(a))?)
            }
            Op::History { agent: a, limit } => format!("{:?}", s.health_history(aid(a), limit)?),
            Op::Restart => String::new(),
        })
    }

    fn run(ops: Vec<Op>, make: fn() -> anyhow::Result<Durable>) -> anyhow::Result<()> {
        let mut durable = make()?;
        let name = durable.name();
        let mut mem = MemStore::new();
        for s in [durable.store()?, &mem as &dyn Store] {
            s.insert_agent(&agent(aid(0)))?;
        }
        for (i, op) in ops.iter().enumerate() {
            if let Op::Restart = op {
                durable.restart()?;
                mem = mem.snapshot();
                continue;
            }
            let (stored, mem) = (durable.store()?, &mem as &dyn Store);
            let (a, b) = (apply(stored, op)?, apply(mem, op)?);
            anyhow::ensure!(a == b, "step {i} {op:?}:\n {name}: {a}\n  mem: {b}");
            let (ca, cb) = (stored.job_counts()?, mem.job_counts()?);
            anyhow::ensure!(ca == cb, "step {i}: counts differ: {name} {ca:?}, mem {cb:?}");
            // The counts always equal the index contents.
            for st in JobState::ALL {
                let n = mem.jobs_in_state(st, 1000)?.len() as u64;
                anyhow::ensure!(ca.get(st) == n, "step {i}: count of {st:?} is {} but {n} indexed", ca.get(st));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn sled_and_mem_agree(ops in proptest::collection::vec(op(), 1..40)) {
            run(ops, Durable::sled).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        }
    }

    proptest! {
        // A database per case (CREATE DATABASE is most of a case's time): fewer cases than
        // sled's, about 20 s on a loaded 2-core machine.
        #![proptest_config(ProptestConfig { cases: 20, ..ProptestConfig::default() })]

        #[test]
        fn pg_and_mem_agree(ops in proptest::collection::vec(op(), 1..40)) {
            run(ops, Durable::pg).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        }
    }
}
