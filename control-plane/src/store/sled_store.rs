//! [`Store`] on sled 0.34: one embedded database directory, one tree per record kind.
//!
//! Records are serialized as JSON (serde_json) so that records written by an older control plane
//! still decode after fields are added (new fields must be `Option` or `#[serde(default)]`).
//!
//! # Key layout
//!
//! | tree               | key                                                   | value                                |
//! |--------------------|-------------------------------------------------------|--------------------------------------|
//! | `meta`             | `b"admin_password_hash"`                              | (before users existed) argon2 PHC string, UTF-8: migrated on open, then removed |
//! | `meta`             | `b"job_counts"`                                       | 6 × u64 BE (48 bytes): jobs per state, in [`JobState::ALL`] order |
//! | `meta`             | `b"holder_index"`                                     | `[1]`: `jobs_by_holder` is complete (absent in data directories from before it; built on open) |
//! | `enroll_tokens`    | SHA-256 of the token (32 bytes)                       | JSON [`EnrollmentTokenRecord`]       |
//! | `api_tokens`       | SHA-256 of the token (32 bytes)                       | JSON [`ApiTokenRecord`] (before names and roles: `{"created_at_ms": u64}`, migrated on open) |
//! | `api_token_names`  | token name (UTF-8)                                    | SHA-256 of the token (32 bytes)      |
//! | `users`            | user name (UTF-8)                                     | JSON [`UserRecord`]                  |
//! | `sessions`         | SHA-256 of the cookie value (32 bytes)                | JSON [`SessionRecord`]               |
//! | `agents`           | agent UUID (16 bytes)                                 | JSON [`AgentRecord`]                 |
//! | `health`           | agent UUID (16) ++ `received_at_ms` u64 BE (8) ++ counter u64 BE (8) | JSON [`HealthSample`] |
//! | `jobs`             | job UUID (16 bytes)                                   | JSON [`JobRecord`]                   |
//! | `jobs_by_created`  | `created_at_ms` u64 BE (8) ++ `seq` u64 BE (8) ++ job UUID (16) | empty               |
//! | `jobs_by_state`    | state (1: [`JobState::index`]) ++ rank (1) ++ `created_at_ms` u64 BE (8) ++ `seq` u64 BE (8) ++ job UUID (16) | empty |
//! | `jobs_by_holder`   | lease holder's agent UUID (16) ++ job UUID (16)       | empty: one entry per assigned or running job |
//! | `digests`          | job UUID (16 bytes)                                   | JSON [`Digest`]                      |
//! | `agent_seq`        | agent UUID (16 bytes)                                 | u64 BE (8): last applied sequence    |
//! | `audit_log`        | entry id u64 BE (8), from [`sled::Db::generate_id`]   | JSON [`AuditRecord`]                 |
//! | `audit`            | (before ids) `at_ms` u64 BE (8) ++ counter u64 BE (8) | JSON [`AuditRecord`]: moved to `audit_log` on open |
//! | `bundle_numbers`   | agent UUID (16 bytes)                                 | JSON [`BundleNumbers`]               |
//! | `revoked_certs`    | certificate serial, lowercase hex (UTF-8)             | JSON [`RevokedCertRecord`]           |
//! | `rollouts`         | rollout id u64 BE (8)                                 | JSON [`crate::rollout::Rollout`] with its targets (at most [`crate::rollout::ROLLOUTS_KEPT_MAX`] kept) |
//! | `replicas`         | replica UUID (16 bytes)                               | JSON [`ReplicaRecord`]               |
//! | `webhook_targets`  | target UUID (16 bytes)                                | JSON [`crate::webhook::WebhookTarget`] (with its secret) |
//! | `webhook_deliveries` | delivery UUID v7 (16 bytes: creation order)         | JSON [`crate::webhook::WebhookDelivery`] with its attempts |
//! | `webhook_due`      | `next_attempt_at_ms` u64 BE (8) ++ delivery UUID (16) | empty: one entry per pending delivery |
//!
//! Big-endian integers make sled's byte order the numeric order, so `health` scans one agent's
//! samples oldest → newest (the counter, from [`sled::Db::generate_id`], breaks ties within one
//! millisecond) and `jobs_by_created` lists jobs by creation time (reverse scan = newest first).
//! A job's `seq` ([`JobRecord::seq`]) also comes from [`sled::Db::generate_id`] when it is
//! inserted, so it orders jobs created in the same millisecond.
//!
//! The rank byte of `jobs_by_state` is `255 - priority` ([`Priority`]: low 0, normal 1, high 2)
//! for queued jobs, so a prefix scan of state `queued` yields high before normal before low, each
//! oldest first; it is 0 for every other state (oldest first). `job_counts` in `meta` always
//! equals the number of `jobs_by_state` entries per state byte.
//!
//! # Atomicity
//!
//! * Every write of a job (`insert_job`, `update_job`, `delete_finished_jobs`,
//!   `commit_agent_message`) is one sled multi-tree transaction over the record, the three indexes
//!   (`jobs_by_created`, `jobs_by_state`, `jobs_by_holder`) and `job_counts`, so the indexes and
//!   counts never disagree with the records. `jobs_by_holder` has an entry exactly for each job
//!   with a lease, under its holder: [`Store::leased_job_counts`] is one prefix count per agent. sled may run a
//!   transaction's closure more than once; `update_job`'s closure therefore may run more than once.
//! * `commit_agent_message` is one transaction over `jobs`, `jobs_by_state`, `jobs_by_created`,
//!   `meta`, `digests`, `agent_seq`, `audit` and `agents`: the watermark check, the `before` check
//!   and every write happen together or not at all.
//! * `update_agent` and `consume_enrollment_token` are compare-and-swap loops: read, apply,
//!   `compare_and_swap(old, new)`, retry on conflict. A concurrent writer is never lost, and of two
//!   concurrent token consumers exactly one sees the unused token.
//! * `push_health` inserts the sample, trims the agent's history to `keep_max` samples and
//!   `bytes_max` bytes of JSON (oldest first, always keeping the newest), then sets the agent's
//!   `last_health` with the CAS loop; `record_heartbeat` does the same and sets `last_seen_ms` in
//!   that one agent write. Pushes are serialized by an in-memory lock that also holds
//!   each agent's running sample count and byte total (computed from the tree on the agent's first
//!   push after opening, and recomputed after any failed push).
//! * Users: every write (`insert_user`, `set_user_password`, `remove_user`) holds one in-memory
//!   lock, so "is this the last admin?" and the removal cannot interleave with another write.
//! * API tokens: `create_api_token` and `revoke_api_token` are one transaction over `api_tokens`
//!   and `api_token_names`, so a name is unique and names and tokens never disagree.
//! * The audit log's ids come from [`sled::Db::generate_id`], which is monotonic across restarts
//!   (sled persists a high-water mark before handing ids out), so entry ids strictly increase.
//! * [`Store::flush`] is a group commit: sled's `flush` (which writes the log's buffers with
//!   `sync_file_range`, covering every tree) and then `fdatasync` of the log file (`store/db`),
//!   since `sync_file_range` alone neither flushes the disk's write cache nor the metadata of a
//!   grown file. Callers that arrive while a flush is running wait for the next one, which covers
//!   all of them; a caller returns once a flush that started after its call finished, so every
//!   write it made before calling is durable. Under load one flush serves many acknowledgements
//!   instead of one each.
//! * sled's page cache is bounded to [`SLED_CACHE_BYTES`] (sled's default is 1 GiB, most of a
//!   control plane's memory).
//! * `claim_job` is `update_job`: one process owns the database, so no other writer can hold a
//!   job. Events ([`Store::publish`]) go to this store's subscribers through an in-process
//!   broadcast channel ([`super::EVENT_CHANNEL_CAPACITY`]); they are not stored.
//!
//! # Durability of health
//!
//! Heartbeats (`record_heartbeat`) are never flushed by themselves: health is not a job result,
//! and at 10,000 agents every 5 s an fsync per sample would be 2,000 a second. A sample is durable
//! with the next [`Store::flush`] (any acknowledged agent message, job submission or operator
//! action; under load that is many times a second); sled's own background flush writes it out
//! within 500 ms in any case (without `fdatasync`). A crash loses at most the samples since then, which the agents replace with their next heartbeat. Everything that is acknowledged is
//! flushed before the acknowledgement.
//!
//! # The agent index (in memory)
//!
//! [`Store::list_agents_page`] (the fleet page, `GET /api/v1/agents`, `/metrics`) reads an index
//! kept in memory: for every agent its listing key (site, hostname, id) and its [`AgentState`], in
//! listing order, with the counts by state and site. It is built by one scan of `agents` when the
//! store opens and changed with every write that can change a key or a state — `insert_agent` and
//! `update_agent` (and so `push_health`) — under one lock held across the sled write and the
//! index change, so the index always describes the latest committed record (a write the index
//! has not seen yet cannot be committed). `commit_agent_message` writes only `last_seen_ms`, which
//! the index does not hold. A page costs one walk of the in-memory order (from the cursor; within
//! one site when filtered by site) and one `get` and decode per agent returned: the records are
//! read after the walk, and one whose state or site changed in between is left out, so a page
//! never shows an agent's state older than the call. Memory: about 200 bytes per agent.
//!
//! # Bounded scans
//!
//! * `list_jobs` walks `jobs_by_created` backwards from the cursor and reads each job to apply the
//!   state and agent filters. It stops after `limit` matches or after [`list_scan_budget`] index
//!   entries, whichever comes first, and then returns a `next` cursor (the last entry it looked
//!   at) whenever the index has further entries. A filtered page may therefore hold fewer than
//!   `limit` jobs — even none — and still have a `next`; paging on until `next` is `None` visits
//!   every job exactly once.
//! * `delete_finished_jobs` walks the state index of each terminal state oldest-created first,
//!   looking at no more than [`delete_scan_budget`] entries per state and stopping at the first job
//!   created at or after the cutoff. Among the jobs found finished before the cutoff (by
//!   `finished_at_ms`, or `updated_at_ms` when that is missing) it deletes the `limit` oldest
//!   finished. A call may therefore delete fewer than it could; the next call goes on.
//!
//! # Upgrading an older data directory
//!
//! A data directory written before the state index existed has no `job_counts` key. Opening it
//! rebuilds `jobs_by_state` and `job_counts` by one scan of `jobs`, and gives every job whose
//! record has no `seq` the seq of its `jobs_by_created` entry.
//!
//! One written before users and roles existed is upgraded too:
//! * the single `meta/admin_password_hash` becomes user `admin` (role admin) with that hash, when
//!   there are no users yet;
//! * API tokens without a name (`{"created_at_ms"}`) are kept, named `legacy-1`, `legacy-2`, … in
//!   the order they were minted, with role admin (they could do everything before) and an expiry
//!   [`LEGACY_TOKEN_TTL_MS`] (90 days) after the upgrade; a warning names them, so an operator can
//!   revoke them and mint named, scoped ones;
//! * entries of the old `audit` tree move to `audit_log` in their order, each with a new id.
//!
//! Sessions from before users existed have no user and are refused (their holders log in again).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use gaffer_protocol::digest::Digest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, TransactionResult, TransactionalTree,
};
use sled::Transactional;
use uuid::Uuid;

use super::{
    AgentCommit, AgentCounts, AgentCursor, AgentPage, AgentQuery, AgentRecord, AgentState, ApiTokenRecord, AuditEntry,
    AuditPage, AuditQuery, AuditRecord, BundleNumbers, CommitOutcome, EnrollmentTokenRecord, HealthSample, JobCounts,
    JobCursor, JobPage, JobQuery, JobRecord, JobState, Priority, ReplicaRecord, RevokedCertRecord, Role, SessionRecord,
    Store, StoreError, StoreEventEnvelope, StoreResult, UnixMs, UserRecord, UserRemoval,
};
use gaffer_protocol::messages::{AgentId, JobId};

const ADMIN_HASH_KEY: &[u8] = b"admin_password_hash";
/// How long a migrated legacy API token stays valid after the upgrade, ms (90 days).
pub const LEGACY_TOKEN_TTL_MS: UnixMs = 90 * 24 * 3600 * 1000;
const COUNTS_KEY: &[u8] = b"job_counts";
/// Present once `jobs_by_holder` is complete.
const HOLDER_INDEX_KEY: &[u8] = b"holder_index";
const EMPTY: &[u8] = &[];

/// The terminal states, in the order `delete_finished_jobs` walks them.
const TERMINAL: [JobState; 3] = [JobState::Succeeded, JobState::Failed, JobState::Cancelled];

/// Most index entries one [`Store::list_jobs`] call looks at: `10 × limit + 1000`.
pub fn list_scan_budget(limit: usize) -> usize {
    limit.saturating_mul(10).saturating_add(1000)
}

/// Most index entries one [`Store::delete_finished_jobs`] call looks at per terminal state:
/// `10 × limit + 100`.
pub fn delete_scan_budget(limit: usize) -> usize {
    limit.saturating_mul(10).saturating_add(100)
}

/// The time a finished job counts as finished for retention: `finished_at_ms`, else its last
/// update.
pub(crate) fn finished_time(job: &JobRecord) -> UnixMs {
    job.finished_at_ms.unwrap_or(job.updated_at_ms)
}

/// Whether `job` matches the filters of `query` (not the cursor).
pub(crate) fn query_matches(query: &JobQuery, job: &JobRecord) -> bool {
    query.state.is_none_or(|s| job.state == s) && query.agent.is_none_or(|a| job.agent == Some(a))
}

/// The rank byte of a job's `jobs_by_state` key: `255 - priority` for queued jobs (high first),
/// 0 otherwise.
pub(crate) fn state_rank(state: JobState, priority: Priority) -> u8 {
    if state == JobState::Queued {
        255 - priority as u8
    } else {
        0
    }
}

/// The sled-backed store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    enroll_tokens: sled::Tree,
    api_tokens: sled::Tree,
    api_token_names: sled::Tree,
    users: sled::Tree,
    sessions: sled::Tree,
    agents: sled::Tree,
    health: sled::Tree,
    jobs: sled::Tree,
    jobs_by_created: sled::Tree,
    jobs_by_state: sled::Tree,
    jobs_by_holder: sled::Tree,
    digests: sled::Tree,
    agent_seq: sled::Tree,
    audit: sled::Tree,
    audit_log: sled::Tree,
    bundle_numbers: sled::Tree,
    revoked_certs: sled::Tree,
    rollouts: sled::Tree,
    replicas: sled::Tree,
    webhook_targets: sled::Tree,
    webhook_deliveries: sled::Tree,
    webhook_due: sled::Tree,
    /// Serializes webhook delivery writes (enqueue with its bound, updates, deletes), so the
    /// pending count and the due index never race.
    webhook_writes: Mutex<()>,
    /// Published events, to this store's subscribers.
    events: tokio::sync::broadcast::Sender<StoreEventEnvelope>,
    /// Serializes user writes (see the module docs).
    user_writes: Mutex<()>,
    /// Running sample count and JSON byte total of each agent's health history (see the module
    /// docs); the lock also serializes `push_health`.
    health_tally: Mutex<HashMap<AgentId, HealthTally>>,
    /// The agent listing's index (see the module docs); its lock also serializes agent writes.
    agent_index: Mutex<AgentIndex>,
    /// Group commit of [`Store::flush`] (see the module docs).
    commit: GroupCommit,
}

/// Bytes of sled's page cache (`sled::Config::cache_capacity`): 128 MiB, against sled's default
/// of 1 GiB. Records not in the cache are read from the log (the page cache of the OS).
pub const SLED_CACHE_BYTES: u64 = 128 << 20;

/// Group commit state: tickets handed to callers of [`Store::flush`], and how far the flushes
/// that finished reach.
struct GroupCommit {
    /// The log file (`store/db`), for `fdatasync` after sled's own flush.
    log: std::fs::File,
    /// Tickets handed out so far (the last one's number).
    requested: AtomicU64,
    state: Mutex<CommitState>,
    finished: Condvar,
    /// Flushes run (each serving one or more callers).
    flushes: AtomicU64,
}

#[derive(Default)]
struct CommitState {
    /// A flush is running.
    flushing: bool,
    /// Every ticket up to this one is durable.
    durable: u64,
}

impl GroupCommit {
    /// Makes every write made before the call durable, sharing the flush with concurrent callers.
    fn flush(&self, db: &sled::Db) -> StoreResult<()> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let lock = || self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = lock();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.flushing {
                state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.flushing = true;
            // Every ticket up to here was taken after its writes; the flush starts after this.
            let covers = self.requested.load(Ordering::SeqCst);
            drop(state);
            self.flushes.fetch_add(1, Ordering::Relaxed);
            let flushed =
                db.flush().map_err(io).and_then(|_| self.log.sync_data().map_err(|e| StoreError::Io(e.to_string())));
            state = lock();
            state.flushing = false;
            if flushed.is_ok() {
                state.durable = state.durable.max(covers);
            }
            self.finished.notify_all();
            // A failed flush is reported to its caller; the waiters try again themselves.
            flushed?;
        }
    }
}

/// Every agent's listing key and state, in listing order, with the counts (see the module docs).
#[derive(Debug, Default)]
struct AgentIndex {
    /// Listing key of each agent.
    keys: HashMap<AgentId, AgentCursor>,
    /// Every agent by listing key, with its state.
    order: BTreeMap<AgentCursor, AgentState>,
    /// Counts of `order` by state and site.
    counts: AgentCounts,
}

impl AgentIndex {
    /// Records `rec` as it is now stored, replacing what was known of it.
    fn put(&mut self, rec: &AgentRecord) {
        let state = AgentState::of(rec);
        let unchanged = self
            .keys
            .get(&rec.id)
            .is_some_and(|k| k.site == rec.site && k.hostname == rec.hostname && self.order.get(k) == Some(&state));
        if unchanged {
            // A heartbeat or any other write that moves neither the key nor the state.
            return;
        }
        if let Some(old) = self.keys.remove(&rec.id) {
            if let Some(state) = self.order.remove(&old) {
                self.counts.remove(&old.site, state);
            }
        }
        let key = AgentCursor::of(rec);
        self.counts.add(&key.site, state);
        self.order.insert(key.clone(), state);
        self.keys.insert(rec.id, key);
    }

    /// Up to `query.limit` listing keys matching `query` after its cursor, and the cursor of the
    /// next page if another key matches.
    fn page(&self, query: &AgentQuery) -> (Vec<AgentCursor>, Option<AgentCursor>) {
        if query.limit == 0 {
            return (Vec::new(), None);
        }
        let site_start = |site: &str| AgentCursor { site: site.to_owned(), hostname: String::new(), id: Uuid::nil() };
        let lower = match (&query.after, &query.site) {
            (Some(c), Some(site)) if c.site < *site => Bound::Included(site_start(site)),
            (Some(c), _) => Bound::Excluded(c.clone()),
            (None, Some(site)) => Bound::Included(site_start(site)),
            (None, None) => Bound::Unbounded,
        };
        let mut keys = Vec::new();
        for (key, state) in self.order.range((lower, Bound::Unbounded)) {
            if query.site.as_ref().is_some_and(|s| key.site != *s) {
                break;
            }
            if query.state.is_some_and(|st| st != *state) {
                continue;
            }
            if keys.len() == query.limit {
                let next = keys.last().cloned();
                return (keys, next);
            }
            keys.push(key.clone());
        }
        (keys, None)
    }
}

#[derive(Debug, Clone, Copy)]
struct HealthTally {
    count: usize,
    bytes: usize,
}

/// An API token record from before names and roles.
#[derive(Serialize, Deserialize)]
struct LegacyApiToken {
    created_at_ms: UnixMs,
}

/// The `webhook_due` key of a pending delivery.
fn webhook_due_key(next_attempt_at_ms: UnixMs, id: Uuid) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&next_attempt_at_ms.to_be_bytes());
    key[8..].copy_from_slice(id.as_bytes());
    key
}

impl SledStore {
    /// [`Store::update_webhook_delivery`] with `webhook_writes` held by the caller.
    fn write_webhook_delivery(
        &self,
        id: Uuid,
        f: &mut dyn FnMut(&mut crate::webhook::WebhookDelivery) -> bool,
    ) -> StoreResult<Option<crate::webhook::WebhookDelivery>> {
        let Some(old) = self.get_json::<crate::webhook::WebhookDelivery>(
            &self.webhook_deliveries,
            "webhook_deliveries",
            id.as_bytes(),
        )?
        else {
            return Ok(None);
        };
        let mut new = old.clone();
        if !f(&mut new) {
            return Ok(None);
        }
        new.id = id;
        let value = encode(&new)?;
        let was_pending = old.state == crate::webhook::DeliveryState::Pending;
        let is_pending = new.state == crate::webhook::DeliveryState::Pending;
        let (old_key, new_key) =
            (webhook_due_key(old.next_attempt_at_ms, id), webhook_due_key(new.next_attempt_at_ms, id));
        tx_out((&self.webhook_deliveries, &self.webhook_due).transaction(|(deliveries, due)| {
            deliveries.insert(id.as_bytes(), value.as_slice())?;
            if was_pending {
                due.remove(&old_key[..])?;
            }
            if is_pending {
                due.insert(&new_key[..], &[][..])?;
            }
            Ok(())
        }))?;
        Ok(Some(new))
    }
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    // Serializing our own plain record types to JSON cannot fail in practice (no maps with
    // non-string keys); report it as an I/O error rather than panicking if it ever does.
    serde_json::to_vec(value).map_err(|e| StoreError::Io(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(tree: &str, key: &[u8], bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: format!("{tree}/{}", hex::encode(key)), detail: e.to_string() })
}

fn corrupt_key(tree: &str, key: &[u8], detail: &str) -> StoreError {
    StoreError::Corrupt { key: format!("{tree}/{}", hex::encode(key)), detail: detail.into() }
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn uuid_at(bytes: &[u8]) -> Option<Uuid> {
    let arr: [u8; 16] = bytes.try_into().ok()?;
    Some(Uuid::from_bytes(arr))
}

/// `created_at_ms` BE ‖ seq BE ‖ job id: jobs created in the same millisecond keep their
/// submission order.
fn created_key(created_at_ms: UnixMs, seq: u64, id: JobId) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&created_at_ms.to_be_bytes());
    key[8..16].copy_from_slice(&seq.to_be_bytes());
    key[16..].copy_from_slice(id.as_bytes());
    key
}

fn created_key_of(job: &JobRecord) -> [u8; 32] {
    created_key(job.created_at_ms, job.seq, job.id)
}

/// The `jobs_by_created` prefix of a cursor: every key below it comes after the cursor in the
/// newest-first listing.
fn cursor_prefix(cursor: JobCursor) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&cursor.created_at_ms.to_be_bytes());
    key[8..].copy_from_slice(&cursor.seq.to_be_bytes());
    key
}

/// (created_at_ms, seq, id) of a `jobs_by_created` key.
fn parse_created_key(key: &[u8]) -> StoreResult<(UnixMs, u64, JobId)> {
    let bad = || corrupt_key("jobs_by_created", key, "index key is not 32 bytes");
    if key.len() != 32 {
        return Err(bad());
    }
    Ok((be_u64(&key[..8]).ok_or_else(bad)?, be_u64(&key[8..16]).ok_or_else(bad)?, uuid_at(&key[16..]).ok_or_else(bad)?))
}

fn state_key(job: &JobRecord) -> [u8; 34] {
    let mut key = [0u8; 34];
    key[0] = job.state.index() as u8;
    key[1] = state_rank(job.state, job.priority);
    key[2..10].copy_from_slice(&job.created_at_ms.to_be_bytes());
    key[10..18].copy_from_slice(&job.seq.to_be_bytes());
    key[18..].copy_from_slice(job.id.as_bytes());
    key
}

/// (created_at_ms, seq, id) of a `jobs_by_state` key.
fn parse_state_key(key: &[u8]) -> StoreResult<(UnixMs, u64, JobId)> {
    let bad = || corrupt_key("jobs_by_state", key, "index key is not 34 bytes");
    if key.len() != 34 {
        return Err(bad());
    }
    Ok((
        be_u64(&key[2..10]).ok_or_else(bad)?,
        be_u64(&key[10..18]).ok_or_else(bad)?,
        uuid_at(&key[18..]).ok_or_else(bad)?,
    ))
}

fn health_key(agent: AgentId, received_at_ms: UnixMs, counter: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(agent.as_bytes());
    key[16..24].copy_from_slice(&received_at_ms.to_be_bytes());
    key[24..].copy_from_slice(&counter.to_be_bytes());
    key
}

fn encode_counts(counts: &JobCounts) -> [u8; 48] {
    let mut out = [0u8; 48];
    for (i, n) in counts.0.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&n.to_be_bytes());
    }
    out
}

fn decode_counts(bytes: &[u8]) -> StoreResult<JobCounts> {
    if bytes.len() != 48 {
        return Err(corrupt_key("meta", COUNTS_KEY, &format!("expected 48 bytes, found {}", bytes.len())));
    }
    let mut counts = JobCounts::default();
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        counts.0[i] = be_u64(chunk).unwrap_or_default();
    }
    Ok(counts)
}

fn decode_seq(agent: &[u8], bytes: &[u8]) -> StoreResult<u64> {
    be_u64(bytes).ok_or_else(|| corrupt_key("agent_seq", agent, &format!("expected 8 bytes, found {}", bytes.len())))
}

type Tx<T> = ConflictableTransactionResult<T, StoreError>;

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

fn tx_out<T>(result: TransactionResult<T, StoreError>) -> StoreResult<T> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(io(e)),
    }
}

/// The job trees inside one transaction: every job write keeps record, indexes and counts
/// together.
struct JobTx<'a> {
    jobs: &'a TransactionalTree,
    by_state: &'a TransactionalTree,
    by_created: &'a TransactionalTree,
    by_holder: &'a TransactionalTree,
    meta: &'a TransactionalTree,
}

/// The `jobs_by_holder` key of `job`, if it has a lease.
fn holder_key(job: &JobRecord) -> Option<[u8; 32]> {
    let lease = job.lease.as_ref()?;
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(lease.holder.as_bytes());
    key[16..].copy_from_slice(job.id.as_bytes());
    Some(key)
}

impl JobTx<'_> {
    fn get(&self, id: JobId) -> Tx<Option<JobRecord>> {
        match self.jobs.get(id.as_bytes())? {
            Some(bytes) => decode("jobs", id.as_bytes(), &bytes).map(Some).map_err(abort),
            None => Ok(None),
        }
    }

    fn counts(&self) -> Tx<JobCounts> {
        match self.meta.get(COUNTS_KEY)? {
            Some(bytes) => decode_counts(&bytes).map_err(abort),
            None => Ok(JobCounts::default()),
        }
    }

    fn set_counts(&self, counts: &JobCounts) -> Tx<()> {
        self.meta.insert(COUNTS_KEY, &encode_counts(counts)[..])?;
        Ok(())
    }

    /// Writes a job that does not exist yet, with both index entries.
    fn insert(&self, job: &JobRecord, counts: &mut JobCounts) -> Tx<()> {
        self.jobs.insert(job.id.as_bytes(), encode(job).map_err(abort)?)?;
        self.by_created.insert(&created_key_of(job), EMPTY)?;
        self.by_state.insert(&state_key(job)[..], EMPTY)?;
        if let Some(key) = holder_key(job) {
            self.by_holder.insert(&key[..], EMPTY)?;
        }
        counts.0[job.state.index()] += 1;
        Ok(())
    }

    /// Replaces `old` (as stored) by `new` (same id), moving index entries that changed.
    fn replace(&self, old: &JobRecord, new: &JobRecord, counts: &mut JobCounts) -> Tx<()> {
        self.jobs.insert(new.id.as_bytes(), encode(new).map_err(abort)?)?;
        let (old_created, new_created) = (created_key_of(old), created_key_of(new));
        if old_created != new_created {
            self.by_created.remove(&old_created)?;
            self.by_created.insert(&new_created, EMPTY)?;
        }
        let (old_state, new_state) = (state_key(old), state_key(new));
        if old_state != new_state {
            self.by_state.remove(&old_state[..])?;
            self.by_state.insert(&new_state[..], EMPTY)?;
        }
        let (old_holder, new_holder) = (holder_key(old), holder_key(new));
        if old_holder != new_holder {
            if let Some(key) = old_holder {
                self.by_holder.remove(&key[..])?;
            }
            if let Some(key) = new_holder {
                self.by_holder.insert(&key[..], EMPTY)?;
            }
        }
        if old.state != new.state {
            let from = &mut counts.0[old.state.index()];
            *from = from.saturating_sub(1);
            counts.0[new.state.index()] += 1;
        }
        Ok(())
    }

    /// Deletes `old` (as stored) and its index entries.
    fn remove(&self, old: &JobRecord, counts: &mut JobCounts) -> Tx<()> {
        self.jobs.remove(old.id.as_bytes())?;
        self.by_created.remove(&created_key_of(old))?;
        self.by_state.remove(&state_key(old)[..])?;
        if let Some(key) = holder_key(old) {
            self.by_holder.remove(&key[..])?;
        }
        let n = &mut counts.0[old.state.index()];
        *n = n.saturating_sub(1);
        Ok(())
    }
}

impl SledStore {
    /// Opens (creating if needed) the database directory at `path`. An older data directory
    /// without the state index is upgraded (see the module docs).
    ///
    /// # Errors
    /// [`StoreError::Open`] when the directory cannot be created or read, or another process holds
    /// the database lock; [`StoreError::Corrupt`] when upgrading meets an unreadable job record.
    pub fn open(path: &Path) -> StoreResult<SledStore> {
        let open_err = |e: sled::Error| StoreError::Open { path: path.display().to_string(), detail: e.to_string() };
        // Wait briefly for a holder that is letting go (a CLI command finishing, or the background
        // flusher of an instance dropped in this process); a running server keeps it and is
        // reported after the wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match sled::Config::new().path(path).cache_capacity(SLED_CACHE_BYTES).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(open_err(e)),
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        let store = SledStore {
            meta: tree("meta")?,
            enroll_tokens: tree("enroll_tokens")?,
            api_tokens: tree("api_tokens")?,
            api_token_names: tree("api_token_names")?,
            users: tree("users")?,
            sessions: tree("sessions")?,
            agents: tree("agents")?,
            health: tree("health")?,
            jobs: tree("jobs")?,
            jobs_by_created: tree("jobs_by_created")?,
            jobs_by_state: tree("jobs_by_state")?,
            jobs_by_holder: tree("jobs_by_holder")?,
            digests: tree("digests")?,
            agent_seq: tree("agent_seq")?,
            audit: tree("audit")?,
            audit_log: tree("audit_log")?,
            bundle_numbers: tree("bundle_numbers")?,
            revoked_certs: tree("revoked_certs")?,
            rollouts: tree("rollouts")?,
            replicas: tree("replicas")?,
            webhook_targets: tree("webhook_targets")?,
            webhook_deliveries: tree("webhook_deliveries")?,
            webhook_due: tree("webhook_due")?,
            webhook_writes: Mutex::new(()),
            events: tokio::sync::broadcast::channel(super::EVENT_CHANNEL_CAPACITY).0,
            user_writes: Mutex::new(()),
            health_tally: Mutex::new(HashMap::new()),
            agent_index: Mutex::new(AgentIndex::default()),
            commit: GroupCommit {
                log: std::fs::File::open(path.join("db")).map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    detail: format!("cannot open the log file db: {e}"),
                })?,
                requested: AtomicU64::new(0),
                state: Mutex::new(CommitState::default()),
                finished: Condvar::new(),
                flushes: AtomicU64::new(0),
            },
            db,
        };
        store.upgrade()?;
        store.upgrade_holder_index()?;
        store.upgrade_auth(crate::now_ms())?;
        store.upgrade_audit()?;
        store.build_agent_index()?;
        Ok(store)
    }

    /// Builds `jobs_by_holder` for a data directory from before it existed (see the module docs):
    /// one scan of `jobs`, then the marker. Runs before the store is shared.
    fn upgrade_holder_index(&self) -> StoreResult<()> {
        if self.meta.get(HOLDER_INDEX_KEY).map_err(io)?.is_some() {
            return Ok(());
        }
        self.jobs_by_holder.clear().map_err(io)?;
        for item in self.jobs.iter() {
            let (key, value) = item.map_err(io)?;
            if let Some(k) = holder_key(&decode::<JobRecord>("jobs", &key, &value)?) {
                self.jobs_by_holder.insert(k, EMPTY).map_err(io)?;
            }
        }
        self.meta.insert(HOLDER_INDEX_KEY, &[1u8][..]).map_err(io)?;
        self.commit.flush(&self.db)?;
        Ok(())
    }

    /// Builds the agent index from `agents` (see the module docs). Runs before the store is shared.
    fn build_agent_index(&self) -> StoreResult<()> {
        let mut index = AgentIndex::default();
        for item in self.agents.iter() {
            let (key, value) = item.map_err(io)?;
            index.put(&decode::<AgentRecord>("agents", &key, &value)?);
        }
        *self.lock_agent_index()? = index;
        Ok(())
    }

    fn lock_agent_index(&self) -> StoreResult<std::sync::MutexGuard<'_, AgentIndex>> {
        self.agent_index.lock().map_err(|_| StoreError::Io("agent index lock poisoned".into()))
    }

    /// Users and named API tokens for a data directory from before they existed (see the module
    /// docs). Runs before the store is shared.
    fn upgrade_auth(&self, now_ms: UnixMs) -> StoreResult<()> {
        if let Some(bytes) = self.meta.get(ADMIN_HASH_KEY).map_err(io)? {
            if self.users.is_empty() {
                let phc = String::from_utf8(bytes.to_vec()).map_err(|e| StoreError::Corrupt {
                    key: "meta/admin_password_hash".into(),
                    detail: e.to_string(),
                })?;
                let admin = UserRecord {
                    name: "admin".into(),
                    role: Role::Admin,
                    password_phc: phc,
                    created_at_ms: now_ms,
                    password_changed_at_ms: now_ms,
                };
                self.users.insert(admin.name.as_bytes(), encode(&admin)?).map_err(io)?;
                tracing::warn!("upgraded the single admin password to user `admin` (role admin); log in as `admin`");
            }
            self.meta.remove(ADMIN_HASH_KEY).map_err(io)?;
        }
        let mut legacy = Vec::new();
        for item in self.api_tokens.iter() {
            let (key, value) = item.map_err(io)?;
            if serde_json::from_slice::<ApiTokenRecord>(&value).is_ok() {
                continue;
            }
            let old: LegacyApiToken = decode("api_tokens", &key, &value)?;
            let hash: [u8; 32] =
                key.as_ref().try_into().map_err(|_| corrupt_key("api_tokens", &key, "key is not 32 bytes"))?;
            legacy.push((old.created_at_ms, hash));
        }
        legacy.sort();
        let mut n = 0u32;
        let mut names = Vec::new();
        for (created_at_ms, hash) in legacy {
            let name = loop {
                n += 1;
                let name = format!("legacy-{n}");
                if !self.api_token_names.contains_key(name.as_bytes()).map_err(io)? {
                    break name;
                }
            };
            let rec = ApiTokenRecord {
                hash,
                name: name.clone(),
                role: Role::Admin,
                created_at_ms,
                expires_at_ms: now_ms + LEGACY_TOKEN_TTL_MS,
                last_used_at_ms: None,
                created_by: String::new(),
            };
            self.api_token_names.insert(name.as_bytes(), &hash[..]).map_err(io)?;
            self.api_tokens.insert(hash, encode(&rec)?).map_err(io)?;
            names.push(name);
        }
        if !names.is_empty() {
            tracing::warn!(
                tokens = %names.join(", "),
                "API tokens minted before token names and roles were kept with role admin and expire in 90 days; \
                 revoke them (`gaffer-control api-token revoke --name NAME`) and mint named tokens with the role they need"
            );
        }
        self.commit.flush(&self.db)?;
        Ok(())
    }

    /// Moves entries of the old `audit` tree (keyed by time) to `audit_log` (keyed by id), oldest
    /// first, one transaction per entry (an interrupted move goes on at the next open).
    fn upgrade_audit(&self) -> StoreResult<()> {
        if self.audit.is_empty() {
            return Ok(());
        }
        for item in self.audit.iter() {
            let (key, value) = item.map_err(io)?;
            let id = self.db.generate_id().map_err(io)? + 1;
            tx_out((&self.audit, &self.audit_log).transaction(|(old, new)| {
                new.insert(&id.to_be_bytes(), value.as_ref())?;
                old.remove(key.as_ref())?;
                Ok(())
            }))?;
        }
        self.commit.flush(&self.db)?;
        Ok(())
    }

    /// The next audit id (> 0).
    fn next_audit_id(&self) -> StoreResult<u64> {
        Ok(self.db.generate_id().map_err(io)? + 1)
    }

    /// Builds `jobs_by_state` and `job_counts` for a data directory that lacks them, and fills in
    /// missing `seq`s from `jobs_by_created`. Runs before the store is shared, so plain (not
    /// transactional) writes are safe; `job_counts` is written last, so an interrupted upgrade
    /// runs again on the next open.
    fn upgrade(&self) -> StoreResult<()> {
        if self.meta.get(COUNTS_KEY).map_err(io)?.is_some() {
            return Ok(());
        }
        // Pass 1: take each job's seq from its creation-index entry; drop entries that point at
        // nothing.
        for key in self.jobs_by_created.iter().keys() {
            let key = key.map_err(io)?;
            let (created_at_ms, seq, id) = parse_created_key(&key)?;
            match self.get_job(id)? {
                Some(mut job) if job.created_at_ms == created_at_ms && job.seq == 0 && seq != 0 => {
                    job.seq = seq;
                    self.jobs.insert(id.as_bytes(), encode(&job)?).map_err(io)?;
                }
                Some(job) if job.created_at_ms == created_at_ms && job.seq == seq => {}
                _ => {
                    self.jobs_by_created.remove(&key).map_err(io)?;
                }
            }
        }
        // Pass 2: rebuild the state index and the counts; give a job without a creation entry one.
        self.jobs_by_state.clear().map_err(io)?;
        let mut counts = JobCounts::default();
        for item in self.jobs.iter() {
            let (key, value) = item.map_err(io)?;
            let mut job: JobRecord = decode("jobs", &key, &value)?;
            if !self.jobs_by_created.contains_key(created_key_of(&job)).map_err(io)? {
                job.seq = self.db.generate_id().map_err(io)?;
                self.jobs.insert(&key, encode(&job)?).map_err(io)?;
                self.jobs_by_created.insert(created_key_of(&job), EMPTY).map_err(io)?;
            }
            self.jobs_by_state.insert(&state_key(&job)[..], EMPTY).map_err(io)?;
            counts.0[job.state.index()] += 1;
        }
        self.meta.insert(COUNTS_KEY, &encode_counts(&counts)[..]).map_err(io)?;
        self.commit.flush(&self.db)?;
        Ok(())
    }

    fn get_json<T: DeserializeOwned>(&self, tree: &sled::Tree, name: &str, key: &[u8]) -> StoreResult<Option<T>> {
        match tree.get(key).map_err(io)? {
            Some(bytes) => decode(name, key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Compare-and-swap loop over one JSON record. `f` returns `Ok(true)` to write the changed
    /// record, `Ok(false)` to leave it, or an error to abort (nothing written). Returns the record
    /// as stored afterwards, `None` if the key is absent.
    fn cas_loop<T, E>(
        &self,
        tree: &sled::Tree,
        name: &str,
        key: &[u8],
        f: &mut dyn FnMut(&mut T) -> Result<bool, E>,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<StoreError>,
    {
        loop {
            let Some(old) = tree.get(key).map_err(io)? else {
                return Ok(None);
            };
            let mut rec: T = decode(name, key, &old)?;
            if !f(&mut rec)? {
                return Ok(Some(rec));
            }
            let new = encode(&rec)?;
            match tree.compare_and_swap(key, Some(&old), Some(new)).map_err(io)? {
                Ok(()) => return Ok(Some(rec)),
                Err(_conflict) => continue,
            }
        }
    }

    /// Runs `f` in one transaction over the job trees.
    fn job_transaction<T>(&self, f: impl Fn(&JobTx<'_>) -> Tx<T>) -> StoreResult<T> {
        tx_out((&self.jobs, &self.jobs_by_state, &self.jobs_by_created, &self.jobs_by_holder, &self.meta).transaction(
            |(jobs, by_state, by_created, by_holder, meta)| f(&JobTx { jobs, by_state, by_created, by_holder, meta }),
        ))
    }

    /// Deletes the sessions for which `pred` holds; returns how many.
    fn delete_sessions_where(&self, pred: &dyn Fn(&SessionRecord) -> bool) -> StoreResult<usize> {
        let mut deleted = 0;
        for item in self.sessions.iter() {
            let (key, value) = item.map_err(io)?;
            // An unreadable session is as good as gone: delete it too.
            let gone = serde_json::from_slice::<SessionRecord>(&value).map_or(true, |s| pred(&s));
            if gone && self.sessions.compare_and_swap(&key, Some(&value), None as Option<&[u8]>).map_err(io)?.is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// [`Store::push_health`], and with `seen` also `last_seen_ms` = the sample's receive time, in
    /// the same agent write ([`Store::record_heartbeat`]).
    fn push_health_then(
        &self,
        id: AgentId,
        sample: &HealthSample,
        keep_max: usize,
        bytes_max: usize,
        seen: bool,
    ) -> StoreResult<()> {
        let value = encode(sample)?;
        let key = health_key(id, sample.received_at_ms, self.db.generate_id().map_err(io)?);
        {
            let mut tallies =
                self.health_tally.lock().map_err(|_| StoreError::Io("health history lock poisoned".into()))?;
            let pushed = self.push_health_locked(&mut tallies, id, &key, value, keep_max, bytes_max);
            if pushed.is_err() {
                // Recount from the tree on the next push.
                tallies.remove(&id);
            }
            pushed?;
        }
        let mut set = |rec: &mut AgentRecord| {
            let newer = rec.last_health.as_ref().is_none_or(|h| h.received_at_ms <= sample.received_at_ms);
            if newer {
                rec.last_health = Some(sample.clone());
            }
            if seen {
                rec.last_seen_ms = Some(sample.received_at_ms);
            }
        };
        self.update_agent(id, &mut set)?;
        Ok(())
    }

    /// Inserts the sample and trims the agent's history; the caller holds the tally lock.
    fn push_health_locked(
        &self,
        tallies: &mut HashMap<AgentId, HealthTally>,
        id: AgentId,
        key: &[u8],
        value: Vec<u8>,
        keep_max: usize,
        bytes_max: usize,
    ) -> StoreResult<()> {
        let tally = match tallies.get(&id) {
            Some(t) => *t,
            None => {
                let mut t = HealthTally { count: 0, bytes: 0 };
                for item in self.health.scan_prefix(id.as_bytes()).values() {
                    t.count += 1;
                    t.bytes += item.map_err(io)?.len();
                }
                t
            }
        };
        let mut tally = HealthTally { count: tally.count + 1, bytes: tally.bytes + value.len() };
        self.health.insert(key, value).map_err(io)?;
        let over = |t: &HealthTally| t.count > 1 && (t.count > keep_max || t.bytes > bytes_max);
        if over(&tally) {
            for item in self.health.scan_prefix(id.as_bytes()) {
                if !over(&tally) {
                    break;
                }
                let (k, v) = item.map_err(io)?;
                self.health.remove(&k).map_err(io)?;
                tally.count -= 1;
                tally.bytes = tally.bytes.saturating_sub(v.len());
            }
        }
        tallies.insert(id, tally);
        Ok(())
    }
}

impl Store for SledStore {
    fn insert_user(&self, rec: &UserRecord) -> StoreResult<bool> {
        let _guard = self.user_writes.lock().map_err(|_| StoreError::Io("user lock poisoned".into()))?;
        let swapped =
            self.users.compare_and_swap(rec.name.as_bytes(), None as Option<&[u8]>, Some(encode(rec)?)).map_err(io)?;
        Ok(swapped.is_ok())
    }

    fn get_user(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        self.get_json(&self.users, "users", name.as_bytes())
    }

    fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        self.users
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("users", &k, &v)
            })
            .collect()
    }

    fn set_user_password(&self, name: &str, password_phc: &str, now_ms: UnixMs) -> StoreResult<Option<UserRecord>> {
        let _guard = self.user_writes.lock().map_err(|_| StoreError::Io("user lock poisoned".into()))?;
        let Some(mut user) = self.get_user(name)? else {
            return Ok(None);
        };
        user.password_phc = password_phc.to_owned();
        user.password_changed_at_ms = now_ms.max(user.password_changed_at_ms + 1);
        self.users.insert(name.as_bytes(), encode(&user)?).map_err(io)?;
        Ok(Some(user))
    }

    fn remove_user(&self, name: &str) -> StoreResult<UserRemoval> {
        let _guard = self.user_writes.lock().map_err(|_| StoreError::Io("user lock poisoned".into()))?;
        let Some(user) = self.get_user(name)? else {
            return Ok(UserRemoval::NotFound);
        };
        if user.role == Role::Admin {
            let admins = self.list_users()?.iter().filter(|u| u.role == Role::Admin).count();
            if admins <= 1 {
                return Ok(UserRemoval::LastAdmin);
            }
        }
        self.users.remove(name.as_bytes()).map_err(io)?;
        Ok(UserRemoval::Removed(user))
    }

    fn insert_enrollment_token(&self, rec: &EnrollmentTokenRecord) -> StoreResult<()> {
        self.enroll_tokens.insert(rec.hash, encode(rec)?).map_err(io)?;
        Ok(())
    }

    fn consume_enrollment_token(
        &self,
        hash: &[u8; 32],
        agent: AgentId,
        now_ms: UnixMs,
    ) -> StoreResult<EnrollmentTokenRecord> {
        let mut apply = |rec: &mut EnrollmentTokenRecord| -> StoreResult<bool> {
            if rec.used_at_ms.is_some() {
                return Err(StoreError::TokenAlreadyUsed);
            }
            if now_ms >= rec.expires_at_ms {
                return Err(StoreError::TokenExpired);
            }
            rec.used_at_ms = Some(now_ms);
            rec.used_by = Some(agent);
            Ok(true)
        };
        self.cas_loop(&self.enroll_tokens, "enroll_tokens", hash, &mut apply)?.ok_or(StoreError::TokenUnknown)
    }

    fn create_api_token(&self, rec: &ApiTokenRecord) -> StoreResult<bool> {
        let value = encode(rec)?;
        tx_out((&self.api_tokens, &self.api_token_names).transaction(|(tokens, names)| {
            if names.get(rec.name.as_bytes())?.is_some() || tokens.get(rec.hash)?.is_some() {
                return Ok(false);
            }
            names.insert(rec.name.as_bytes(), &rec.hash[..])?;
            tokens.insert(&rec.hash[..], value.as_slice())?;
            Ok(true)
        }))
    }

    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>> {
        self.get_json(&self.api_tokens, "api_tokens", hash)
    }

    fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenRecord>> {
        let mut out = Vec::new();
        for item in self.api_token_names.iter() {
            let (name, hash) = item.map_err(io)?;
            match self.get_json::<ApiTokenRecord>(&self.api_tokens, "api_tokens", &hash)? {
                Some(rec) => out.push(rec),
                None => return Err(corrupt_key("api_token_names", &name, "names a token that does not exist")),
            }
        }
        Ok(out)
    }

    fn revoke_api_token(&self, name: &str) -> StoreResult<Option<ApiTokenRecord>> {
        tx_out((&self.api_tokens, &self.api_token_names).transaction(|(tokens, names)| {
            let Some(hash) = names.remove(name.as_bytes())? else {
                return Ok(None);
            };
            let rec = match tokens.remove(hash.as_ref())? {
                Some(bytes) => Some(decode::<ApiTokenRecord>("api_tokens", &hash, &bytes).map_err(abort)?),
                None => None,
            };
            Ok(rec)
        }))
    }

    fn touch_api_token(&self, hash: &[u8; 32], now_ms: UnixMs) -> StoreResult<()> {
        self.cas_loop::<ApiTokenRecord, StoreError>(&self.api_tokens, "api_tokens", hash, &mut |rec| {
            rec.last_used_at_ms = Some(now_ms);
            Ok(true)
        })?;
        Ok(())
    }

    fn insert_session(&self, rec: &SessionRecord) -> StoreResult<()> {
        self.sessions.insert(rec.id_hash, encode(rec)?).map_err(io)?;
        Ok(())
    }

    fn get_session(&self, id_hash: &[u8; 32]) -> StoreResult<Option<SessionRecord>> {
        self.get_json(&self.sessions, "sessions", id_hash)
    }

    fn delete_session(&self, id_hash: &[u8; 32]) -> StoreResult<()> {
        self.sessions.remove(id_hash).map_err(io)?;
        Ok(())
    }

    fn delete_user_sessions(&self, user: &str) -> StoreResult<usize> {
        self.delete_sessions_where(&|s| s.user == user)
    }

    fn delete_expired_sessions(&self, now_ms: UnixMs) -> StoreResult<usize> {
        self.delete_sessions_where(&|s| s.expires_at_ms <= now_ms)
    }

    fn insert_agent(&self, rec: &AgentRecord) -> StoreResult<()> {
        let value = encode(rec)?;
        let mut index = self.lock_agent_index()?;
        self.agents.insert(rec.id.as_bytes(), value).map_err(io)?;
        index.put(rec);
        Ok(())
    }

    fn get_agent(&self, id: AgentId) -> StoreResult<Option<AgentRecord>> {
        self.get_json(&self.agents, "agents", id.as_bytes())
    }

    fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let mut agents = Vec::new();
        for item in self.agents.iter() {
            let (key, value) = item.map_err(io)?;
            agents.push(decode::<AgentRecord>("agents", &key, &value)?);
        }
        agents.sort_by(|a, b| (&a.site, &a.hostname, a.id).cmp(&(&b.site, &b.hostname, b.id)));
        Ok(agents)
    }

    fn update_agent(&self, id: AgentId, f: &mut dyn FnMut(&mut AgentRecord)) -> StoreResult<Option<AgentRecord>> {
        let mut apply = |rec: &mut AgentRecord| -> StoreResult<bool> {
            f(rec);
            Ok(true)
        };
        let mut index = self.lock_agent_index()?;
        let stored = self.cas_loop(&self.agents, "agents", id.as_bytes(), &mut apply)?;
        if let Some(rec) = &stored {
            index.put(rec);
        }
        Ok(stored)
    }

    fn leased_job_counts(&self, holders: &[AgentId]) -> StoreResult<HashMap<AgentId, usize>> {
        let mut counts = HashMap::new();
        for holder in holders {
            let mut n = 0;
            for key in self.jobs_by_holder.scan_prefix(holder.as_bytes()).keys() {
                key.map_err(io)?;
                n += 1;
            }
            if n > 0 {
                counts.insert(*holder, n);
            }
        }
        Ok(counts)
    }

    fn jobs_leased_to(&self, holder: AgentId) -> StoreResult<Vec<JobRecord>> {
        let mut assigned = Vec::new();
        let mut running = Vec::new();
        for key in self.jobs_by_holder.scan_prefix(holder.as_bytes()).keys() {
            let key = key.map_err(io)?;
            let Some(job_key) = key.get(16..32) else { continue };
            let Some(job) = self.get_json::<JobRecord>(&self.jobs, "jobs", job_key)? else { continue };
            if job.lease.is_none_or(|l| l.holder != holder) {
                continue;
            }
            match job.state {
                JobState::Assigned => assigned.push(job),
                JobState::Running => running.push(job),
                _ => {}
            }
        }
        for jobs in [&mut assigned, &mut running] {
            jobs.sort_by_key(|j| (j.created_at_ms, j.seq));
        }
        assigned.extend(running);
        Ok(assigned)
    }

    fn list_agents_page(&self, query: &AgentQuery) -> StoreResult<AgentPage> {
        let (keys, next, counts) = {
            let index = self.lock_agent_index()?;
            let (keys, next) = index.page(query);
            (keys, next, index.counts.clone())
        };
        let mut agents = Vec::with_capacity(keys.len());
        for key in keys {
            // Read after the walk: one that changed state or site since is left out.
            if let Some(rec) = self.get_agent(key.id)? {
                if query.matches(&rec) {
                    agents.push(rec);
                }
            }
        }
        Ok(AgentPage { agents, counts, next })
    }

    fn push_health(&self, id: AgentId, sample: &HealthSample, keep_max: usize, bytes_max: usize) -> StoreResult<()> {
        self.push_health_then(id, sample, keep_max, bytes_max, false)
    }

    fn record_heartbeat(
        &self,
        id: AgentId,
        sample: &HealthSample,
        keep_max: usize,
        bytes_max: usize,
    ) -> StoreResult<()> {
        self.push_health_then(id, sample, keep_max, bytes_max, true)
    }

    fn health_history(&self, id: AgentId, limit: usize) -> StoreResult<Vec<HealthSample>> {
        let mut samples = Vec::new();
        for item in self.health.scan_prefix(id.as_bytes()).rev().take(limit) {
            let (key, value) = item.map_err(io)?;
            samples.push(decode::<HealthSample>("health", &key, &value)?);
        }
        samples.reverse();
        Ok(samples)
    }

    fn insert_job(&self, job: &JobRecord) -> StoreResult<bool> {
        let mut job = job.clone();
        job.seq = self.db.generate_id().map_err(io)?;
        self.job_transaction(|tx| {
            if tx.jobs.get(job.id.as_bytes())?.is_some() {
                return Ok(false);
            }
            let mut counts = tx.counts()?;
            tx.insert(&job, &mut counts)?;
            tx.set_counts(&counts)?;
            Ok(true)
        })
    }

    fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.get_json(&self.jobs, "jobs", id.as_bytes())
    }

    fn list_jobs(&self, query: &JobQuery) -> StoreResult<JobPage> {
        let mut page = JobPage::default();
        if query.limit == 0 {
            return Ok(page);
        }
        let budget = list_scan_budget(query.limit);
        let mut keys = match query.after {
            Some(cursor) => self.jobs_by_created.range(..cursor_prefix(cursor)),
            None => self.jobs_by_created.iter(),
        }
        .keys()
        .rev();
        let mut scanned = 0usize;
        let mut last: Option<JobCursor> = None;
        loop {
            if page.jobs.len() >= query.limit || scanned >= budget {
                if keys.next().transpose().map_err(io)?.is_some() {
                    page.next = last;
                }
                break;
            }
            let Some(key) = keys.next() else { break };
            let (created_at_ms, seq, id) = parse_created_key(&key.map_err(io)?)?;
            scanned += 1;
            last = Some(JobCursor { created_at_ms, seq });
            if let Some(job) = self.get_job(id)? {
                if query_matches(query, &job) {
                    page.jobs.push(job);
                }
            }
        }
        Ok(page)
    }

    fn jobs_in_state(&self, state: JobState, limit: usize) -> StoreResult<Vec<JobRecord>> {
        let mut jobs = Vec::new();
        if limit == 0 {
            return Ok(jobs);
        }
        for key in self.jobs_by_state.scan_prefix([state.index() as u8]).keys() {
            let (_, _, id) = parse_state_key(&key.map_err(io)?)?;
            // A job that changed state between the index read and this read is skipped.
            if let Some(job) = self.get_job(id)? {
                if job.state == state {
                    jobs.push(job);
                    if jobs.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(jobs)
    }

    fn job_counts(&self) -> StoreResult<JobCounts> {
        match self.meta.get(COUNTS_KEY).map_err(io)? {
            Some(bytes) => decode_counts(&bytes),
            None => Ok(JobCounts::default()),
        }
    }

    fn update_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        let f = RefCell::new(f);
        self.job_transaction(|tx| {
            let Some(old) = tx.get(id)? else {
                return Ok(None);
            };
            let mut new = old.clone();
            if !(*f.borrow_mut())(&mut new) {
                return Ok(Some(old));
            }
            // The id and seq are the store's.
            new.id = old.id;
            new.seq = old.seq;
            let mut counts = tx.counts()?;
            tx.replace(&old, &new, &mut counts)?;
            if old.state != new.state {
                tx.set_counts(&counts)?;
            }
            Ok(Some(new))
        })
    }

    fn delete_finished_jobs(&self, finished_before_ms: UnixMs, limit: usize) -> StoreResult<usize> {
        if limit == 0 {
            return Ok(0);
        }
        let budget = delete_scan_budget(limit);
        // (finished, created, seq, id) of the jobs found finished before the cutoff.
        let mut found: Vec<(UnixMs, UnixMs, u64, JobId)> = Vec::new();
        for state in TERMINAL {
            for key in self.jobs_by_state.scan_prefix([state.index() as u8]).keys().take(budget) {
                let (created_at_ms, seq, id) = parse_state_key(&key.map_err(io)?)?;
                if created_at_ms >= finished_before_ms {
                    break;
                }
                if let Some(job) = self.get_job(id)? {
                    let finished = finished_time(&job);
                    if job.state == state && finished < finished_before_ms {
                        found.push((finished, created_at_ms, seq, id));
                    }
                }
            }
        }
        found.sort_unstable();
        found.truncate(limit);
        let mut deleted = 0;
        for chunk in found.chunks(256) {
            deleted += tx_out(
                (
                    &self.jobs,
                    &self.jobs_by_state,
                    &self.jobs_by_created,
                    &self.jobs_by_holder,
                    &self.meta,
                    &self.digests,
                )
                    .transaction(|(jobs, by_state, by_created, by_holder, meta, digests)| {
                        let tx = JobTx { jobs, by_state, by_created, by_holder, meta };
                        let mut counts = tx.counts()?;
                        let mut n = 0usize;
                        for &(_, _, _, id) in chunk {
                            // Re-checked here: it may have been retried since the scan.
                            let Some(job) = tx.get(id)? else { continue };
                            if !job.state.is_terminal() || finished_time(&job) >= finished_before_ms {
                                continue;
                            }
                            tx.remove(&job, &mut counts)?;
                            digests.remove(id.as_bytes())?;
                            n += 1;
                        }
                        if n > 0 {
                            tx.set_counts(&counts)?;
                        }
                        Ok(n)
                    }),
            )?;
        }
        Ok(deleted)
    }

    fn commit_agent_message(&self, commit: &AgentCommit) -> StoreResult<CommitOutcome> {
        // Ids come from outside the transaction (a retried closure must not draw new ones).
        let new_job = match &commit.new_job {
            Some(job) => {
                let mut job = job.clone();
                job.seq = self.db.generate_id().map_err(io)?;
                Some(job)
            }
            None => None,
        };
        let mut audit = Vec::with_capacity(commit.audit.len());
        for rec in &commit.audit {
            audit.push((self.next_audit_id()?.to_be_bytes(), encode(rec)?));
        }
        let digest = match &commit.digest {
            Some((id, digest)) => Some((*id, encode(digest)?)),
            None => None,
        };
        let agent_key = commit.agent.as_bytes();
        tx_out(
            (
                &self.jobs,
                &self.jobs_by_state,
                &self.jobs_by_created,
                &self.jobs_by_holder,
                &self.meta,
                &self.digests,
                &self.agent_seq,
                &self.audit_log,
                &self.agents,
            )
                .transaction(
                    |(jobs, by_state, by_created, by_holder, meta, digests, agent_seq, audit_tree, agents)| {
                        if let Some(bytes) = agent_seq.get(agent_key)? {
                            if commit.seq <= decode_seq(agent_key, &bytes).map_err(abort)? {
                                return Ok(CommitOutcome::Duplicate);
                            }
                        }
                        let tx = JobTx { jobs, by_state, by_created, by_holder, meta };
                        let mut counts = tx.counts()?;
                        let counted = counts;
                        if let Some(write) = &commit.job {
                            let current = tx.get(write.before.id)?;
                            if current.as_ref() != Some(&write.before) {
                                return Ok(CommitOutcome::Conflict);
                            }
                            let mut after = write.after.clone();
                            after.id = write.before.id;
                            after.seq = write.before.seq;
                            tx.replace(&write.before, &after, &mut counts)?;
                        }
                        if let Some((id, bytes)) = &digest {
                            if digests.get(id.as_bytes())?.is_none() {
                                digests.insert(id.as_bytes(), bytes.as_slice())?;
                            }
                        }
                        if let Some(job) = &new_job {
                            if jobs.get(job.id.as_bytes())?.is_none() {
                                tx.insert(job, &mut counts)?;
                            }
                        }
                        for (key, value) in &audit {
                            audit_tree.insert(&key[..], value.as_slice())?;
                        }
                        if let Some(bytes) = agents.get(agent_key)? {
                            let mut agent: AgentRecord = decode("agents", agent_key, &bytes).map_err(abort)?;
                            agent.last_seen_ms = Some(commit.now_ms);
                            agents.insert(agent_key, encode(&agent).map_err(abort)?)?;
                        }
                        agent_seq.insert(agent_key, &commit.seq.to_be_bytes())?;
                        if counts != counted {
                            tx.set_counts(&counts)?;
                        }
                        Ok(CommitOutcome::Committed)
                    },
                ),
        )
    }

    fn put_digest(&self, id: JobId, digest: &Digest) -> StoreResult<bool> {
        let value = encode(digest)?;
        let swapped = self.digests.compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(value)).map_err(io)?;
        Ok(swapped.is_ok())
    }

    fn get_digest(&self, id: JobId) -> StoreResult<Option<Digest>> {
        self.get_json(&self.digests, "digests", id.as_bytes())
    }

    fn last_applied_seq(&self, agent: AgentId) -> StoreResult<Option<u64>> {
        match self.agent_seq.get(agent.as_bytes()).map_err(io)? {
            Some(bytes) => decode_seq(agent.as_bytes(), &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn set_last_applied_seq(&self, agent: AgentId, seq: u64) -> StoreResult<()> {
        self.agent_seq.insert(agent.as_bytes(), &seq.to_be_bytes()).map_err(io)?;
        Ok(())
    }

    fn append_audit(&self, rec: &AuditRecord) -> StoreResult<()> {
        let id = self.next_audit_id()?;
        self.audit_log.insert(id.to_be_bytes(), encode(rec)?).map_err(io)?;
        Ok(())
    }

    fn query_audit(&self, query: &AuditQuery) -> StoreResult<AuditPage> {
        let iter = match query.after {
            Some(after) => self.audit_log.range(..after.to_be_bytes()),
            None => self.audit_log.iter(),
        };
        let budget = list_scan_budget(query.limit);
        let mut page = AuditPage::default();
        let mut last = None;
        for (looked, item) in iter.rev().enumerate() {
            let (key, value) = item.map_err(io)?;
            let id = be_u64(&key).ok_or_else(|| corrupt_key("audit_log", &key, "key is not 8 bytes"))?;
            if page.entries.len() >= query.limit || looked >= budget {
                page.next = last;
                break;
            }
            last = Some(id);
            let record: AuditRecord = decode("audit_log", &key, &value)?;
            if query.matches(&record) {
                page.entries.push(AuditEntry { id, record });
            }
        }
        Ok(page)
    }

    fn list_audit(&self, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.audit_log
            .iter()
            .rev()
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("audit_log", &k, &v)
            })
            .collect()
    }

    fn bundle_numbers(&self, agent: AgentId) -> StoreResult<BundleNumbers> {
        Ok(self.get_json(&self.bundle_numbers, "bundle_numbers", agent.as_bytes())?.unwrap_or_default())
    }

    fn set_bundle_numbers(&self, agent: AgentId, numbers: &BundleNumbers) -> StoreResult<()> {
        self.bundle_numbers.insert(agent.as_bytes(), encode(numbers)?).map_err(io)?;
        Ok(())
    }

    fn insert_revoked_cert(&self, rec: &RevokedCertRecord) -> StoreResult<()> {
        self.revoked_certs.insert(rec.serial_hex.as_bytes(), encode(rec)?).map_err(io)?;
        Ok(())
    }

    fn list_revoked_certs(&self) -> StoreResult<Vec<RevokedCertRecord>> {
        self.revoked_certs
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("revoked_certs", &k, &v)
            })
            .collect()
    }

    fn put_rollout(&self, rollout: &crate::rollout::Rollout) -> StoreResult<()> {
        self.rollouts.insert(rollout.id.to_be_bytes(), encode(rollout)?).map_err(io)?;
        Ok(())
    }

    fn list_rollouts(&self) -> StoreResult<Vec<crate::rollout::Rollout>> {
        self.rollouts
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("rollouts", &k, &v)
            })
            .collect()
    }

    fn delete_rollout(&self, id: u64) -> StoreResult<bool> {
        Ok(self.rollouts.remove(id.to_be_bytes()).map_err(io)?.is_some())
    }

    fn put_webhook_target(&self, target: &crate::webhook::WebhookTarget) -> StoreResult<()> {
        self.webhook_targets.insert(target.id.as_bytes(), encode(target)?).map_err(io)?;
        Ok(())
    }

    fn list_webhook_targets(&self) -> StoreResult<Vec<crate::webhook::WebhookTarget>> {
        self.webhook_targets
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("webhook_targets", &k, &v)
            })
            .collect()
    }

    fn delete_webhook_target(&self, id: Uuid) -> StoreResult<bool> {
        Ok(self.webhook_targets.remove(id.as_bytes()).map_err(io)?.is_some())
    }

    fn enqueue_webhook_delivery(
        &self,
        d: &crate::webhook::WebhookDelivery,
        pending_max: usize,
    ) -> StoreResult<Vec<Uuid>> {
        let _one = self.webhook_writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = Vec::new();
        let pending = self.webhook_due.len();
        if pending >= pending_max.max(1) {
            // The oldest pending ones by id (creation order); the due index is ordered by due time.
            let mut ids = Vec::with_capacity(pending);
            for item in self.webhook_due.iter().keys() {
                let key = item.map_err(io)?;
                ids.push(uuid_at(&key[8..]).ok_or_else(|| corrupt_key("webhook_due", &key, "not 24 bytes"))?);
            }
            ids.sort_unstable();
            ids.truncate(pending + 1 - pending_max.max(1));
            for id in ids {
                if self
                    .write_webhook_delivery(id, &mut |old| {
                        old.state = crate::webhook::DeliveryState::Dropped;
                        old.finished_at_ms = Some(d.created_at_ms);
                        true
                    })?
                    .is_some()
                {
                    dropped.push(id);
                }
            }
        }
        let value = encode(d)?;
        let due_key = webhook_due_key(d.next_attempt_at_ms, d.id);
        let pending = d.state == crate::webhook::DeliveryState::Pending;
        tx_out((&self.webhook_deliveries, &self.webhook_due).transaction(|(deliveries, due)| {
            deliveries.insert(d.id.as_bytes(), value.as_slice())?;
            if pending {
                due.insert(&due_key[..], &[][..])?;
            }
            Ok(())
        }))?;
        Ok(dropped)
    }

    fn webhook_deliveries_due(
        &self,
        now_ms: UnixMs,
        limit: usize,
    ) -> StoreResult<Vec<crate::webhook::WebhookDelivery>> {
        let mut out = Vec::new();
        for item in self.webhook_due.iter().keys() {
            if out.len() >= limit {
                break;
            }
            let key = item.map_err(io)?;
            let due =
                be_u64(&key[..8.min(key.len())]).ok_or_else(|| corrupt_key("webhook_due", &key, "not 24 bytes"))?;
            if due > now_ms {
                break;
            }
            let id = uuid_at(&key[8..]).ok_or_else(|| corrupt_key("webhook_due", &key, "not 24 bytes"))?;
            if let Some(d) = self.get_json(&self.webhook_deliveries, "webhook_deliveries", id.as_bytes())? {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn update_webhook_delivery(
        &self,
        id: Uuid,
        f: &mut dyn FnMut(&mut crate::webhook::WebhookDelivery) -> bool,
    ) -> StoreResult<Option<crate::webhook::WebhookDelivery>> {
        let _one = self.webhook_writes.lock().unwrap_or_else(|p| p.into_inner());
        self.write_webhook_delivery(id, f)
    }

    fn list_webhook_deliveries(&self, limit: usize) -> StoreResult<Vec<crate::webhook::WebhookDelivery>> {
        self.webhook_deliveries
            .iter()
            .rev()
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("webhook_deliveries", &k, &v)
            })
            .collect()
    }

    fn webhook_pending_count(&self) -> StoreResult<u64> {
        Ok(self.webhook_due.len() as u64)
    }

    fn delete_finished_webhook_deliveries(&self, created_before_ms: UnixMs, limit: usize) -> StoreResult<usize> {
        let _one = self.webhook_writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut deleted = 0;
        for item in self.webhook_deliveries.iter() {
            if deleted >= limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            let d: crate::webhook::WebhookDelivery = decode("webhook_deliveries", &k, &v)?;
            if d.created_at_ms >= created_before_ms {
                break;
            }
            if d.state != crate::webhook::DeliveryState::Pending {
                self.webhook_deliveries.remove(&k).map_err(io)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn claim_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        self.update_job(id, f)
    }

    fn replica_heartbeat(&self, rec: &ReplicaRecord) -> StoreResult<()> {
        self.replicas.insert(rec.id.as_bytes(), encode(rec)?).map_err(io)?;
        Ok(())
    }

    fn list_replicas(&self) -> StoreResult<Vec<ReplicaRecord>> {
        self.replicas
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("replicas", &k, &v)
            })
            .collect()
    }

    fn remove_replica(&self, id: Uuid) -> StoreResult<bool> {
        Ok(self.replicas.remove(id.as_bytes()).map_err(io)?.is_some())
    }

    fn publish(&self, ev: &StoreEventEnvelope) -> StoreResult<()> {
        // The same size limit as PostgreSQL's notifications, so an event that works here works
        // there; having no subscriber is not an error.
        ev.to_json()?;
        let _ = self.events.send(ev.clone());
        Ok(())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreEventEnvelope> {
        self.events.subscribe()
    }

    fn flush(&self) -> StoreResult<()> {
        self.commit.flush(&self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_flushes_share_one_and_every_write_survives() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let threads = 16u8;
        let rounds = 40u8;
        {
            let store = std::sync::Arc::new(SledStore::open(dir.path())?);
            std::thread::scope(|scope| -> anyhow::Result<()> {
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let store = store.clone();
                        scope.spawn(move || -> anyhow::Result<()> {
                            for r in 0..rounds {
                                store.meta.insert([b'g', t, r], &[1u8][..])?;
                                store.flush()?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().map_err(|_| anyhow::anyhow!("a flushing thread panicked"))??;
                }
                Ok(())
            })?;
            let calls = u64::from(threads) * u64::from(rounds);
            let flushes = store.commit.flushes.load(Ordering::Relaxed);
            assert!(flushes >= 1 && flushes < calls, "{flushes} flushes for {calls} concurrent calls");
        }
        let store = SledStore::open(dir.path())?;
        let written = store.meta.scan_prefix(b"g").count();
        assert_eq!(written, usize::from(threads) * usize::from(rounds), "every flushed write is there after a reopen");
        Ok(())
    }
    use crate::store::JobOrigin;
    use gaffer_protocol::health::{Health, HealthSource};
    use gaffer_protocol::messages::Profile;
    use std::sync::{Arc, Barrier};

    fn job(id: JobId, created_at_ms: UnixMs) -> JobRecord {
        JobRecord {
            id,
            path: format!("/media/{id}.mp4"),
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

    fn agent(id: AgentId) -> AgentRecord {
        AgentRecord { cert_not_after_unix: 2_000_000_000, ..AgentRecord::new(id, "stage-a", "gpu-01", 1) }
    }

    fn sample(received_at_ms: UnixMs) -> HealthSample {
        HealthSample {
            received_at_ms,
            health: Health {
                sampled_at_unix_ms: received_at_ms,
                source: HealthSource::CpuOnly { reason: "no NVML".into() },
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

    #[test]
    fn records_survive_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let job_id = Uuid::new_v4();
        let agent_id = Uuid::new_v4();
        let stored;
        {
            let store = SledStore::open(dir.path())?;
            assert!(store.insert_user(&UserRecord {
                name: "alice".into(),
                role: Role::Operator,
                password_phc: "$argon2id$v=19$m=19456,t=2,p=1$abc$def".into(),
                created_at_ms: 1,
                password_changed_at_ms: 1,
            })?);
            assert!(store.insert_job(&job(job_id, 10))?);
            stored = store.get_job(job_id)?;
            store.insert_agent(&agent(agent_id))?;
            store.set_last_applied_seq(agent_id, 41)?;
            assert!(store.create_api_token(&ApiTokenRecord {
                hash: [7; 32],
                name: "ci".into(),
                role: Role::Viewer,
                created_at_ms: 5,
                expires_at_ms: 6,
                last_used_at_ms: None,
                created_by: "alice".into(),
            })?);
            store.append_audit(&AuditRecord::new(&crate::store::Actor::ControlPlane, "x", 1))?;
            store.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        assert_eq!(store.get_user("alice")?.map(|u| u.role), Some(Role::Operator));
        assert!(stored.is_some());
        assert_eq!(store.get_job(job_id)?, stored);
        assert_eq!(store.list_jobs(&JobQuery { limit: 10, ..JobQuery::default() })?.jobs.len(), 1);
        assert_eq!(store.job_counts()?.get(JobState::Queued), 1);
        assert_eq!(store.jobs_in_state(JobState::Queued, 10)?.len(), 1);
        assert_eq!(store.get_agent(agent_id)?.map(|a| a.hostname), Some("gpu-01".to_string()));
        assert_eq!(store.last_applied_seq(agent_id)?, Some(41));
        assert_eq!(store.api_token(&[7; 32])?.map(|t| t.name), Some("ci".to_string()));
        assert!(store.api_token(&[8; 32])?.is_none());
        // Audit ids go on increasing after a reopen.
        let first = store.query_audit(&AuditQuery { limit: 10, ..AuditQuery::default() })?.entries[0].id;
        store.append_audit(&AuditRecord::new(&crate::store::Actor::ControlPlane, "y", 2))?;
        let ids: Vec<u64> = store
            .query_audit(&AuditQuery { limit: 10, ..AuditQuery::default() })?
            .entries
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] > first && ids[1] == first, "audit ids after reopen: {ids:?}");
        Ok(())
    }

    /// A data directory from before users and roles: the single admin password, unnamed API
    /// tokens, time-keyed audit entries. Opening it keeps every credential working under the new
    /// model and every audit entry in order.
    #[test]
    fn data_dir_from_before_users_is_upgraded_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let db = sled::open(dir.path())?;
            db.open_tree("meta")?.insert(ADMIN_HASH_KEY, &b"$argon2id$v=19$m=19456,t=2,p=1$abc$def"[..])?;
            let tokens = db.open_tree("api_tokens")?;
            tokens.insert([2u8; 32], &br#"{"created_at_ms":20}"#[..])?;
            tokens.insert([1u8; 32], &br#"{"created_at_ms":10}"#[..])?;
            let audit = db.open_tree("audit")?;
            for (at, who) in [(5u64, "first"), (9, "second")] {
                let mut key = [0u8; 16];
                key[..8].copy_from_slice(&at.to_be_bytes());
                let rec = AuditRecord::new(&crate::store::Actor::User(who.into()), "enroll_offline", at);
                audit.insert(key, serde_json::to_vec(&rec)?)?;
            }
            db.flush()?;
        }
        let before = crate::now_ms();
        let store = SledStore::open(dir.path())?;
        let admin = store.get_user("admin")?.expect("user admin from the old admin password");
        assert_eq!((admin.role, admin.password_phc.as_str()), (Role::Admin, "$argon2id$v=19$m=19456,t=2,p=1$abc$def"));
        let tokens = store.list_api_tokens()?;
        let named: Vec<(&str, [u8; 32], Role)> = tokens.iter().map(|t| (t.name.as_str(), t.hash, t.role)).collect();
        assert_eq!(named, vec![("legacy-1", [1; 32], Role::Admin), ("legacy-2", [2; 32], Role::Admin)]);
        assert!(tokens.iter().all(|t| t.expires_at_ms >= before + LEGACY_TOKEN_TTL_MS));
        let whos: Vec<String> = store.list_audit(10)?.into_iter().map(|a| a.who).collect();
        assert_eq!(whos, vec!["second", "first"]);
        drop(store);
        // A second open changes nothing.
        let store = SledStore::open(dir.path())?;
        assert_eq!(store.list_users()?.len(), 1);
        assert_eq!(store.list_api_tokens()?, tokens);
        assert_eq!(store.list_audit(10)?.len(), 2);
        Ok(())
    }

    /// A data directory from before the state index: records without `seq`/`priority`, a
    /// creation index, no counts. Opening it builds the state index and the counts.
    #[test]
    fn old_data_dir_is_upgraded_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (a, b, c) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]), Uuid::from_bytes([3; 16]));
        {
            let db = sled::open(dir.path())?;
            let jobs = db.open_tree("jobs")?;
            let by_created = db.open_tree("jobs_by_created")?;
            for (id, created, seq, state) in
                [(a, 5, 7, JobState::Queued), (b, 5, 9, JobState::Succeeded), (c, 3, 11, JobState::Queued)]
            {
                let mut rec = job(id, created);
                rec.state = state;
                let mut value = serde_json::to_value(&rec)?;
                let obj = value.as_object_mut().ok_or_else(|| anyhow::anyhow!("not an object"))?;
                for field in ["seq", "priority", "lease", "lease_epoch"] {
                    obj.remove(field);
                }
                jobs.insert(id.as_bytes(), serde_json::to_vec(&value)?)?;
                by_created.insert(created_key(created, seq, id), EMPTY)?;
            }
            db.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        let counts = store.job_counts()?;
        assert_eq!(counts.get(JobState::Queued), 2);
        assert_eq!(counts.get(JobState::Succeeded), 1);
        assert_eq!(store.get_job(a)?.map(|j| j.seq), Some(7));
        assert_eq!(store.get_job(b)?.map(|j| j.seq), Some(9));
        let queued: Vec<JobId> = store.jobs_in_state(JobState::Queued, 10)?.iter().map(|j| j.id).collect();
        assert_eq!(queued, [c, a]);
        let listed: Vec<JobId> =
            store.list_jobs(&JobQuery { limit: 10, ..JobQuery::default() })?.jobs.iter().map(|j| j.id).collect();
        assert_eq!(listed, [b, a, c]);
        // The upgraded store keeps working: a state change moves the index entry.
        store.update_job(c, &mut |j| {
            j.state = JobState::Failed;
            true
        })?;
        assert_eq!(store.job_counts()?.get(JobState::Failed), 1);
        assert_eq!(store.jobs_in_state(JobState::Queued, 10)?.iter().map(|j| j.id).collect::<Vec<_>>(), [a]);
        Ok(())
    }

    #[test]
    fn health_history_is_bounded_and_sets_last_health() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let a = Uuid::new_v4();
        let other = Uuid::new_v4();
        store.insert_agent(&agent(a))?;
        for t in 0..25u64 {
            store.push_health(a, &sample(1000 + t), 10, usize::MAX)?;
        }
        store.push_health(other, &sample(5), 10, usize::MAX)?;
        let history = store.health_history(a, 100)?;
        assert_eq!(history.len(), 10);
        let times: Vec<u64> = history.iter().map(|s| s.received_at_ms).collect();
        assert_eq!(times, (1015..1025).collect::<Vec<_>>());
        assert_eq!(
            store.health_history(a, 3)?.iter().map(|s| s.received_at_ms).collect::<Vec<_>>(),
            [1022, 1023, 1024]
        );
        assert_eq!(store.get_agent(a)?.and_then(|r| r.last_health).map(|h| h.received_at_ms), Some(1024));
        assert_eq!(store.health_history(other, 100)?.len(), 1);
        Ok(())
    }

    /// The running tally is rebuilt from the tree after a reopen, so the bounds still hold.
    #[test]
    fn health_bounds_hold_across_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let a = Uuid::new_v4();
        let one = serde_json::to_vec(&sample(1000))?.len();
        {
            let store = SledStore::open(dir.path())?;
            for t in 0..8u64 {
                store.push_health(a, &sample(1000 + t), 100, usize::MAX)?;
            }
            store.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        store.push_health(a, &sample(2000), 100, one * 3)?;
        let times: Vec<u64> = store.health_history(a, 100)?.iter().map(|s| s.received_at_ms).collect();
        assert_eq!(times, [1006, 1007, 2000]);
        Ok(())
    }

    /// The agent index agrees with the records: counts from a full read, and every record in the
    /// state it is listed under.
    fn assert_index_agrees(store: &SledStore) -> anyhow::Result<()> {
        let all = store.list_agents()?;
        let page = store.list_agents_page(&AgentQuery { limit: all.len().max(1), ..AgentQuery::default() })?;
        assert_eq!(page.counts, AgentCounts::of(&all));
        assert_eq!(page.agents, all);
        Ok(())
    }

    #[test]
    fn holder_index_is_built_for_an_older_data_directory() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        {
            let store = SledStore::open(dir.path())?;
            for (n, holder) in [Some(a), Some(a), Some(b), None].into_iter().enumerate() {
                let mut j = job(Uuid::new_v4(), n as u64);
                if let Some(h) = holder {
                    j.state = JobState::Running;
                    j.lease = Some(crate::store::Lease { holder: h, lease_id: 1, deadline_ms: None });
                }
                store.insert_job(&j)?;
            }
            // As written before the index existed.
            store.jobs_by_holder.clear()?;
            store.meta.remove(HOLDER_INDEX_KEY)?;
            store.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        let counts = store.leased_job_counts(&[a, b, Uuid::new_v4()])?;
        assert_eq!(counts, HashMap::from([(a, 2), (b, 1)]));
        Ok(())
    }

    #[test]
    fn agent_index_is_rebuilt_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ids: Vec<AgentId> = (0..10).map(|_| Uuid::new_v4()).collect();
        {
            let store = SledStore::open(dir.path())?;
            for (n, id) in ids.iter().enumerate() {
                let rec = AgentRecord { connected: n % 2 == 0, ..AgentRecord::new(*id, "stage-a", format!("h{n}"), 1) };
                store.insert_agent(&rec)?;
            }
            store.update_agent(ids[0], &mut |a| a.revoked_at_ms = Some(7))?;
            store.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        assert_index_agrees(&store)?;
        let counts = store.list_agents_page(&AgentQuery::default())?.counts;
        assert_eq!(counts.all.get(AgentState::Online), 4);
        assert_eq!(counts.all.get(AgentState::Offline), 5);
        assert_eq!(counts.all.get(AgentState::Revoked), 1);
        Ok(())
    }

    #[test]
    fn agent_index_follows_concurrent_writers() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let ids: Vec<AgentId> = (0..4).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            store.insert_agent(&AgentRecord::new(*id, "stage-a", "box", 1))?;
        }
        // Links coming and going, renames and heartbeats on the same agents from 4 threads.
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (store, ids, barrier) = (store.clone(), ids.clone(), barrier.clone());
                std::thread::spawn(move || -> anyhow::Result<()> {
                    barrier.wait();
                    for i in 0..200u64 {
                        let id = ids[((i + t) % 4) as usize];
                        match (i + t) % 3 {
                            0 => store.update_agent(id, &mut |a| a.connected = !a.connected).map(drop)?,
                            1 => store.update_agent(id, &mut |a| a.hostname = format!("box-{t}-{i}")).map(drop)?,
                            _ => store.push_health(id, &sample(i), 10, usize::MAX)?,
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        assert_index_agrees(&store)?;
        Ok(())
    }

    #[test]
    fn concurrent_consume_has_exactly_one_winner() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let hash = [3u8; 32];
        store.insert_enrollment_token(&EnrollmentTokenRecord {
            hash,
            site: "stage-a".into(),
            created_at_ms: 0,
            expires_at_ms: 10_000,
            used_at_ms: None,
            used_by: None,
        })?;
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let me = Uuid::new_v4();
                    barrier.wait();
                    (me, store.consume_enrollment_token(&hash, me, 100))
                })
            })
            .collect();
        let mut winners = Vec::new();
        for h in handles {
            let (me, result) = h.join().map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
            match result {
                Ok(rec) => {
                    assert_eq!(rec.used_by, Some(me));
                    winners.push(me);
                }
                Err(StoreError::TokenAlreadyUsed) => {}
                Err(e) => anyhow::bail!("unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one consumer must win");
        Ok(())
    }

    #[test]
    fn concurrent_updates_are_not_lost() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let id = Uuid::new_v4();
        store.insert_job(&job(id, 1))?;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || -> StoreResult<()> {
                    for _ in 0..50 {
                        store.update_job(id, &mut |j| {
                            j.frames_decoded += 1;
                            true
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("updater thread panicked"))??;
        }
        assert_eq!(store.get_job(id)?.map(|j| j.frames_decoded), Some(200));
        Ok(())
    }

    /// Threads moving jobs between states concurrently: the counts and the state index always
    /// agree with the records afterwards.
    #[test]
    fn concurrent_state_changes_keep_counts_and_index() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(dir.path())?);
        let ids: Vec<JobId> = (0..8u8).map(|n| Uuid::from_bytes([n + 1; 16])).collect();
        for (i, id) in ids.iter().enumerate() {
            store.insert_job(&job(*id, i as u64))?;
        }
        let handles: Vec<_> = (0..4usize)
            .map(|t| {
                let store = store.clone();
                let ids = ids.clone();
                std::thread::spawn(move || -> StoreResult<()> {
                    for round in 0..40usize {
                        let id = ids[(t + round) % ids.len()];
                        let state = JobState::ALL[(t * 7 + round) % JobState::ALL.len()];
                        store.update_job(id, &mut |j| {
                            j.state = state;
                            true
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("updater thread panicked"))??;
        }
        let counts = store.job_counts()?;
        let mut total = 0;
        for state in JobState::ALL {
            let records = ids.iter().filter_map(|id| store.get_job(*id).ok().flatten()).filter(|j| j.state == state);
            let n = records.count() as u64;
            assert_eq!(counts.get(state), n, "count of {state:?}");
            assert_eq!(store.jobs_in_state(state, 100)?.len() as u64, n, "index of {state:?}");
            assert_eq!(store.jobs_by_state.scan_prefix([state.index() as u8]).count() as u64, n);
            total += n;
        }
        assert_eq!(total, ids.len() as u64);
        Ok(())
    }

    #[test]
    fn corrupt_record_is_a_typed_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let id = Uuid::new_v4();
        store.jobs.insert(id.as_bytes(), b"{not json".as_slice())?;
        assert!(matches!(store.get_job(id), Err(StoreError::Corrupt { .. })));
        assert!(matches!(store.update_job(id, &mut |_| true), Err(StoreError::Corrupt { .. })));
        Ok(())
    }
}
