//! The durable outbox: every agent message that matters is written here before it is sent, and
//! removed only when the control plane acknowledges that it has persisted it.
//!
//! sled key layout (database `DATA_DIR/state`):
//!
//! | tree     | key                      | value                                                        |
//! |----------|--------------------------|--------------------------------------------------------------|
//! | `outbox` | sequence number, u64 BE  | enqueue time (Unix ms, u64 BE) ‖ the message, bincode (wire payload form) |
//!
//! Sequence numbers come from sled's `generate_id`, which is monotonic across restarts, plus one
//! (so 0, the "not durable" marker of heartbeats, is never used). Big-endian keys make sled's
//! ordered iteration the sending order, and one lock around id generation and insert makes
//! entries appear in that order.
//!
//! Durability: [`Outbox::push`] returns after sled's flush (fsync) of the entry. What is durable
//! across power loss is exactly what `push` returned for; acknowledgements ([`Outbox::ack`]) are
//! flushed lazily (sled flushes every 500 ms), so after a crash an acknowledged entry may be sent
//! again — which the control plane's dedupe makes harmless.
//!
//! Bound: the outbox counts entries and bytes. Past [`OutboxLimits`] it reports itself full: the
//! agent then takes no new jobs (and says `outbox_full` in health) but still records the results
//! of jobs already running, so nothing is lost; the limit is a brake, not a wall.
//!
//! Delivery is at-least-once: after a reconnect every entry still here is sent again in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gaffer_protocol::codec::{decode_payload, encode_frame, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES};
use gaffer_protocol::messages::{AgentMessage, HeldJob};

use crate::AgentError;

const TIME_PREFIX_BYTES: usize = 8;

/// When the outbox counts as full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Entries. Default 100 000 (weeks of progress checkpoints and digests of an offline box).
    pub entries_max: u64,
    /// Bytes of stored messages. Default 256 MiB.
    pub bytes_max: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self { entries_max: 100_000, bytes_max: 256 * 1024 * 1024 }
    }
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Sequence number.
    pub seq: u64,
    /// When it was enqueued, Unix ms (agent clock).
    pub enqueued_at_ms: u64,
    /// The message.
    pub message: AgentMessage,
}

/// The outbox over an open sled database. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Outbox {
    db: sled::Db,
    tree: sled::Tree,
    notify: Arc<tokio::sync::Notify>,
    /// Serializes id generation and insert, so entries become visible in sequence order (the
    /// sender relies on it: it never looks below the last sequence it sent).
    push_lock: Arc<Mutex<()>>,
    entries: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    limits: OutboxLimits,
}

impl Outbox {
    /// Opens the outbox tree of `db` with default limits.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn open(db: &sled::Db) -> Result<Self, AgentError> {
        Self::open_with(db, OutboxLimits::default())
    }

    /// Opens the outbox tree of `db` with `limits`.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn open_with(db: &sled::Db, limits: OutboxLimits) -> Result<Self, AgentError> {
        let tree = db.open_tree("outbox")?;
        let (mut entries, mut bytes) = (0u64, 0u64);
        for item in tree.iter() {
            let (_, v) = item?;
            entries += 1;
            bytes += v.len() as u64;
        }
        Ok(Self {
            db: db.clone(),
            tree,
            notify: Default::default(),
            push_lock: Default::default(),
            entries: Arc::new(AtomicU64::new(entries)),
            bytes: Arc::new(AtomicU64::new(bytes)),
            limits,
        })
    }

    /// Appends `msg`, makes it durable (fsync), and returns its sequence number. Succeeds even
    /// when the outbox is full (see the module docs).
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails; [`AgentError::Protocol`] if the message is larger than
    /// a frame may be.
    pub fn push(&self, msg: &AgentMessage) -> Result<u64, AgentError> {
        let frame = encode_frame(msg, FRAME_BYTES_MAX_DEFAULT)?;
        let mut value = Vec::with_capacity(TIME_PREFIX_BYTES + frame.len() - FRAME_HEADER_BYTES);
        value.extend_from_slice(&crate::now_ms().to_be_bytes());
        value.extend_from_slice(&frame[FRAME_HEADER_BYTES..]);
        let seq = {
            let _order = self.push_lock.lock().unwrap_or_else(|p| p.into_inner());
            let seq = self.db.generate_id()? + 1;
            self.tree.insert(seq.to_be_bytes(), value.as_slice())?;
            seq
        };
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(value.len() as u64, Ordering::Relaxed);
        self.tree.flush()?;
        self.notify.notify_one();
        Ok(seq)
    }

    fn decode(k: &[u8], v: &[u8]) -> Result<OutboxEntry, AgentError> {
        let bad = || AgentError::Config("unreadable outbox entry".into());
        let seq = u64::from_be_bytes(k.try_into().map_err(|_| bad())?);
        let (at, payload) = v.split_at_checked(TIME_PREFIX_BYTES).ok_or_else(bad)?;
        let enqueued_at_ms = u64::from_be_bytes(at.try_into().map_err(|_| bad())?);
        Ok(OutboxEntry { seq, enqueued_at_ms, message: decode_payload(payload)? })
    }

    /// Up to `limit` entries with a sequence number above `after`, in order.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails or an entry does not decode.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, AgentMessage)>, AgentError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for item in self.tree.range(start..).take(limit) {
            let (k, v) = item?;
            let e = Self::decode(&k, &v)?;
            out.push((e.seq, e.message));
        }
        Ok(out)
    }

    /// The jobs whose final report (digest or failure) is still waiting here, with the lease each
    /// ran under, from the oldest `scan_max` entries: the agent still holds those leases until the
    /// control plane has the result, so Hello lists them (a finished job missing from Hello would be
    /// requeued and its digest then refused).
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails or an entry does not decode.
    pub fn unacknowledged_results(&self, scan_max: usize) -> Result<Vec<HeldJob>, AgentError> {
        let mut out = Vec::new();
        for item in self.tree.iter().take(scan_max) {
            let (k, v) = item?;
            match Self::decode(&k, &v)?.message {
                AgentMessage::Digest { job_id, lease_id, .. } | AgentMessage::JobFailed { job_id, lease_id, .. } => {
                    out.push(HeldJob { job_id, lease_id });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every entry, in order (for bundles).
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails or an entry does not decode.
    pub fn entries(&self) -> Result<Vec<OutboxEntry>, AgentError> {
        self.tree.iter().map(|item| item.map_err(AgentError::from).and_then(|(k, v)| Self::decode(&k, &v))).collect()
    }

    /// Removes the entry `seq` (acknowledged). Removing an absent entry is a no-op.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn ack(&self, seq: u64) -> Result<(), AgentError> {
        if let Some(old) = self.tree.remove(seq.to_be_bytes())? {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Entries waiting for acknowledgement.
    pub fn len(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Bytes waiting for acknowledgement.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether nothing waits for acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the outbox is at or past its limits: take no new work.
    pub fn is_full(&self) -> bool {
        self.len() >= self.limits.entries_max || self.bytes() >= self.limits.bytes_max
    }

    /// Enqueue time of the oldest unacknowledged entry, Unix ms.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn oldest_enqueued_at_ms(&self) -> Result<Option<u64>, AgentError> {
        match self.tree.first()? {
            Some((k, v)) => Ok(Some(Self::decode(&k, &v)?.enqueued_at_ms)),
            None => Ok(None),
        }
    }

    /// Resolves after the next [`Outbox::push`], or at once if a push happened since the last
    /// call returned (one stored permit). Meant for the single sending task.
    pub async fn pushed(&self) {
        self.notify.notified().await;
    }
}
