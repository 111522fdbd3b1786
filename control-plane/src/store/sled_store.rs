//! [`Store`] on sled 0.34: one embedded database directory, one tree per record kind.
//!
//! Records are serialized as JSON (serde_json) so that records written by an older control plane
//! still decode after fields are added (new fields must be `Option` or `#[serde(default)]`).
//!
//! # Key layout
//!
//! | tree               | key                                                   | value                                |
//! |--------------------|-------------------------------------------------------|--------------------------------------|
//! | `meta`             | `b"admin_password_hash"`                              | argon2 PHC string, UTF-8             |
//! | `enroll_tokens`    | SHA-256 of the token (32 bytes)                       | JSON [`EnrollmentTokenRecord`]       |
//! | `api_tokens`       | SHA-256 of the token (32 bytes)                       | JSON `{"created_at_ms": u64}`        |
//! | `sessions`         | SHA-256 of the cookie value (32 bytes)                | JSON [`SessionRecord`]               |
//! | `agents`           | agent UUID (16 bytes)                                 | JSON [`AgentRecord`]                 |
//! | `health`           | agent UUID (16) ++ `received_at_ms` u64 BE (8) ++ counter u64 BE (8) | JSON [`HealthSample`] |
//! | `jobs`             | job UUID (16 bytes)                                   | JSON [`JobRecord`]                   |
//! | `jobs_by_created`  | `created_at_ms` u64 BE (8) ++ insertion seq u64 BE (8) ++ job UUID (16) | empty         |
//! | `digests`          | job UUID (16 bytes)                                   | JSON [`Digest`]                      |
//! | `agent_seq`        | agent UUID (16 bytes)                                 | u64 BE (8): last applied sequence    |
//! | `audit`            | `at_ms` u64 BE (8) ++ counter u64 BE (8)              | JSON [`AuditRecord`]                 |
//! | `bundle_numbers`   | agent UUID (16 bytes)                                 | JSON [`BundleNumbers`]               |
//! | `revoked_certs`    | certificate serial, lowercase hex (UTF-8)             | JSON [`RevokedCertRecord`]           |
//!
//! Big-endian integers make sled's byte order the numeric order, so `health` scans one agent's
//! samples oldest → newest (the counter, from [`sled::Db::generate_id`], breaks ties within one
//! millisecond) and `jobs_by_created` lists jobs by creation time (reverse scan = newest first).
//!
//! # Atomicity
//!
//! * `update_agent`, `update_job` and `consume_enrollment_token` are compare-and-swap loops: read,
//!   apply, `compare_and_swap(old, new)`, retry on conflict. A concurrent writer is never lost, and
//!   of two concurrent token consumers exactly one sees the unused token.
//! * `insert_job` writes `jobs` and `jobs_by_created` in one multi-tree transaction.
//! * `push_health` inserts the sample, trims the agent's history to `keep_max`, then sets the
//!   agent's `last_health` with the CAS loop. Trimming races between two pushers for the same agent
//!   can only remove extra old samples, never keep more than `keep_max` afterwards.
//! * [`Store::flush`] is sled's `flush` (fsync of the shared log, so it covers every tree).

use std::path::Path;

use gaffer_protocol::digest::Digest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use uuid::Uuid;

use super::{
    AgentRecord, EnrollmentTokenRecord, HealthSample, JobRecord, JobState, SessionRecord, Store, StoreError,
    StoreResult, UnixMs,
};
use super::{AuditRecord, BundleNumbers, RevokedCertRecord};
use gaffer_protocol::messages::{AgentId, JobId};

const ADMIN_HASH_KEY: &[u8] = b"admin_password_hash";

/// The sled-backed store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    enroll_tokens: sled::Tree,
    api_tokens: sled::Tree,
    sessions: sled::Tree,
    agents: sled::Tree,
    health: sled::Tree,
    jobs: sled::Tree,
    jobs_by_created: sled::Tree,
    digests: sled::Tree,
    agent_seq: sled::Tree,
    audit: sled::Tree,
    bundle_numbers: sled::Tree,
    revoked_certs: sled::Tree,
}

#[derive(Serialize, Deserialize)]
struct ApiTokenRecord {
    created_at_ms: UnixMs,
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

/// `created_at_ms` BE ‖ insertion sequence BE ‖ job id: jobs created in the same millisecond
/// keep their submission order.
fn created_key(created_at_ms: UnixMs, seq: u64, id: JobId) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&created_at_ms.to_be_bytes());
    key[8..16].copy_from_slice(&seq.to_be_bytes());
    key[16..].copy_from_slice(id.as_bytes());
    key
}

fn health_key(agent: AgentId, received_at_ms: UnixMs, counter: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(agent.as_bytes());
    key[16..24].copy_from_slice(&received_at_ms.to_be_bytes());
    key[24..].copy_from_slice(&counter.to_be_bytes());
    key
}

impl SledStore {
    /// Opens (creating if needed) the database directory at `path`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the directory cannot be created or read, or another process holds
    /// the database lock.
    pub fn open(path: &Path) -> StoreResult<SledStore> {
        let open_err = |e: sled::Error| StoreError::Open { path: path.display().to_string(), detail: e.to_string() };
        // Wait briefly for a holder that is letting go (a CLI command finishing, or the background
        // flusher of an instance dropped in this process); a running server keeps it and is
        // reported after the wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match sled::open(path) {
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
        Ok(SledStore {
            meta: tree("meta")?,
            enroll_tokens: tree("enroll_tokens")?,
            api_tokens: tree("api_tokens")?,
            sessions: tree("sessions")?,
            agents: tree("agents")?,
            health: tree("health")?,
            jobs: tree("jobs")?,
            jobs_by_created: tree("jobs_by_created")?,
            digests: tree("digests")?,
            agent_seq: tree("agent_seq")?,
            audit: tree("audit")?,
            bundle_numbers: tree("bundle_numbers")?,
            revoked_certs: tree("revoked_certs")?,
            db,
        })
    }

    fn get_json<T: DeserializeOwned>(&self, tree: &sled::Tree, name: &str, key: &[u8]) -> StoreResult<Option<T>> {
        match tree.get(key).map_err(io)? {
            Some(bytes) => Ok(Some(decode(name, key, &bytes)?)),
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
}

impl Store for SledStore {
    fn admin_password_hash(&self) -> StoreResult<Option<String>> {
        match self.meta.get(ADMIN_HASH_KEY).map_err(io)? {
            Some(bytes) => String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|e| StoreError::Corrupt { key: "meta/admin_password_hash".into(), detail: e.to_string() }),
            None => Ok(None),
        }
    }

    fn set_admin_password_hash(&self, phc: &str) -> StoreResult<()> {
        self.meta.insert(ADMIN_HASH_KEY, phc.as_bytes()).map_err(io)?;
        Ok(())
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

    fn insert_api_token(&self, hash: &[u8; 32], created_at_ms: UnixMs) -> StoreResult<()> {
        self.api_tokens.insert(hash, encode(&ApiTokenRecord { created_at_ms })?).map_err(io)?;
        Ok(())
    }

    fn api_token_exists(&self, hash: &[u8; 32]) -> StoreResult<bool> {
        self.api_tokens.contains_key(hash).map_err(io)
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

    fn insert_agent(&self, rec: &AgentRecord) -> StoreResult<()> {
        self.agents.insert(rec.id.as_bytes(), encode(rec)?).map_err(io)?;
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
        self.cas_loop(&self.agents, "agents", id.as_bytes(), &mut apply)
    }

    fn push_health(&self, id: AgentId, sample: &HealthSample, keep_max: usize) -> StoreResult<()> {
        let counter = self.db.generate_id().map_err(io)?;
        self.health.insert(health_key(id, sample.received_at_ms, counter), encode(sample)?).map_err(io)?;
        // Trim: keys of one agent sort oldest first, so drop the first (len - keep_max).
        let keys: Vec<sled::IVec> =
            self.health.scan_prefix(id.as_bytes()).keys().collect::<Result<_, _>>().map_err(io)?;
        let excess = keys.len().saturating_sub(keep_max);
        for key in keys.into_iter().take(excess) {
            self.health.remove(key).map_err(io)?;
        }
        let mut set = |rec: &mut AgentRecord| {
            let newer = rec.last_health.as_ref().is_none_or(|h| h.received_at_ms <= sample.received_at_ms);
            if newer {
                rec.last_health = Some(sample.clone());
            }
        };
        self.update_agent(id, &mut set)?;
        Ok(())
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
        let value = encode(job)?;
        let index_key = created_key(job.created_at_ms, self.db.generate_id().map_err(io)?, job.id);
        let result = (&self.jobs, &self.jobs_by_created).transaction(|(jobs, by_created)| {
            if jobs.get(job.id.as_bytes())?.is_some() {
                return Ok(false);
            }
            jobs.insert(job.id.as_bytes(), value.as_slice())?;
            by_created.insert(&index_key, &[] as &[u8])?;
            Ok::<bool, ConflictableTransactionError<StoreError>>(true)
        });
        match result {
            Ok(inserted) => Ok(inserted),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(io(e)),
        }
    }

    fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.get_json(&self.jobs, "jobs", id.as_bytes())
    }

    fn list_jobs(&self, limit: usize) -> StoreResult<Vec<JobRecord>> {
        let mut jobs = Vec::new();
        for item in self.jobs_by_created.iter().keys().rev() {
            if jobs.len() >= limit {
                break;
            }
            let key = item.map_err(io)?;
            if let Some(job) = self.job_for_index_key(&key)? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    fn jobs_in_state(&self, state: JobState) -> StoreResult<Vec<JobRecord>> {
        let mut jobs = Vec::new();
        for item in self.jobs_by_created.iter().keys() {
            let key = item.map_err(io)?;
            if let Some(job) = self.job_for_index_key(&key)? {
                if job.state == state {
                    jobs.push(job);
                }
            }
        }
        Ok(jobs)
    }

    fn update_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        let mut apply = |rec: &mut JobRecord| -> StoreResult<bool> { Ok(f(rec)) };
        self.cas_loop(&self.jobs, "jobs", id.as_bytes(), &mut apply)
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
            Some(bytes) => {
                let arr: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: format!("agent_seq/{agent}"),
                    detail: format!("expected 8 bytes, found {}", bytes.len()),
                })?;
                Ok(Some(u64::from_be_bytes(arr)))
            }
            None => Ok(None),
        }
    }

    fn set_last_applied_seq(&self, agent: AgentId, seq: u64) -> StoreResult<()> {
        self.agent_seq.insert(agent.as_bytes(), &seq.to_be_bytes()).map_err(io)?;
        Ok(())
    }

    fn append_audit(&self, rec: &AuditRecord) -> StoreResult<()> {
        let counter = self.db.generate_id().map_err(io)?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&rec.at_ms.to_be_bytes());
        key[8..].copy_from_slice(&counter.to_be_bytes());
        self.audit.insert(key, encode(rec)?).map_err(io)?;
        Ok(())
    }

    fn list_audit(&self, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.audit
            .iter()
            .rev()
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                decode("audit", &k, &v)
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

    fn flush(&self) -> StoreResult<()> {
        self.db.flush().map_err(io)?;
        Ok(())
    }
}

impl SledStore {
    fn job_for_index_key(&self, key: &[u8]) -> StoreResult<Option<JobRecord>> {
        let id_bytes: [u8; 16] =
            key.get(16..32).and_then(|s| s.try_into().ok()).ok_or_else(|| StoreError::Corrupt {
                key: format!("jobs_by_created/{}", hex::encode(key)),
                detail: "index key is not 32 bytes".into(),
            })?;
        self.get_job(Uuid::from_bytes(id_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            origin: super::super::JobOrigin::Api,
            state: JobState::Queued,
            agent: None,
            progress: 0.0,
            frames_decoded: 0,
            error: None,
            attempts: 0,
            created_at_ms,
            updated_at_ms: created_at_ms,
            finished_at_ms: None,
        }
    }

    fn agent(id: AgentId) -> AgentRecord {
        AgentRecord {
            id,
            site: "stage-a".into(),
            hostname: "gpu-01".into(),
            enrolled_at_ms: 1,
            cert_not_after_unix: 2_000_000_000,
            agent_version: None,
            capabilities: None,
            connected: false,
            last_seen_ms: None,
            last_health: None,
            bundle_recipient: None,
            csr_pem: None,
            cert_serial_hex: None,
            revoked_at_ms: None,
            offline: false,
        }
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
        {
            let store = SledStore::open(dir.path())?;
            store.set_admin_password_hash("$argon2id$v=19$m=19456,t=2,p=1$abc$def")?;
            assert!(store.insert_job(&job(job_id, 10))?);
            store.insert_agent(&agent(agent_id))?;
            store.set_last_applied_seq(agent_id, 41)?;
            store.insert_api_token(&[7; 32], 5)?;
            store.flush()?;
        }
        let store = SledStore::open(dir.path())?;
        assert_eq!(store.admin_password_hash()?.as_deref(), Some("$argon2id$v=19$m=19456,t=2,p=1$abc$def"));
        assert_eq!(store.get_job(job_id)?, Some(job(job_id, 10)));
        assert_eq!(store.list_jobs(10)?.len(), 1);
        assert_eq!(store.get_agent(agent_id)?.map(|a| a.hostname), Some("gpu-01".to_string()));
        assert_eq!(store.last_applied_seq(agent_id)?, Some(41));
        assert!(store.api_token_exists(&[7; 32])?);
        assert!(!store.api_token_exists(&[8; 32])?);
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
            store.push_health(a, &sample(1000 + t), 10)?;
        }
        store.push_health(other, &sample(5), 10)?;
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

    #[test]
    fn corrupt_record_is_a_typed_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        let id = Uuid::new_v4();
        store.jobs.insert(id.as_bytes(), b"{not json".as_slice())?;
        assert!(matches!(store.get_job(id), Err(StoreError::Corrupt { .. })));
        Ok(())
    }
}
