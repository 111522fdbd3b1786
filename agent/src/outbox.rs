//! The durable outbox: every agent message that matters is written here before it is sent, and
//! removed only when the control plane acknowledges that it has persisted it.
//!
//! sled key layout (database `DATA_DIR/state`):
//!
//! | tree     | key                      | value                                        |
//! |----------|--------------------------|----------------------------------------------|
//! | `outbox` | sequence number, u64 BE  | the message, bincode (the wire payload form) |
//!
//! Sequence numbers come from sled's `generate_id`, which is monotonic across restarts, plus one
//! (so 0, the "not durable" marker of heartbeats, is never used). Big-endian keys make sled's
//! ordered iteration the sending order.
//!
//! Delivery is at-least-once: after a reconnect every entry still here is sent again in order, and
//! the control plane acknowledges redeliveries without applying them twice.

use gaffer_protocol::codec::{decode_payload, encode_frame, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES};
use gaffer_protocol::messages::AgentMessage;

use crate::AgentError;

/// The outbox over an open sled database.
#[derive(Clone)]
pub struct Outbox {
    db: sled::Db,
    tree: sled::Tree,
    notify: std::sync::Arc<tokio::sync::Notify>,
    /// Serializes id generation and insert, so entries become visible in sequence order (the
    /// sender relies on it: it never looks below the last sequence it sent).
    push_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Outbox {
    /// Opens the outbox tree of `db`.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn open(db: &sled::Db) -> Result<Self, AgentError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("outbox")?,
            notify: Default::default(),
            push_lock: Default::default(),
        })
    }

    /// Appends `msg`, makes it durable (fsync), and returns its sequence number.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails; [`AgentError::Protocol`] if the message is larger than
    /// a frame may be.
    pub fn push(&self, msg: &AgentMessage) -> Result<u64, AgentError> {
        let frame = encode_frame(msg, FRAME_BYTES_MAX_DEFAULT)?;
        let seq = {
            let _order = self.push_lock.lock().unwrap_or_else(|p| p.into_inner());
            let seq = self.db.generate_id()? + 1;
            self.tree.insert(seq.to_be_bytes(), &frame[FRAME_HEADER_BYTES..])?;
            seq
        };
        self.tree.flush()?;
        self.notify.notify_one();
        Ok(seq)
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
            let seq =
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| AgentError::Config("bad outbox key".into()))?);
            out.push((seq, decode_payload(&v)?));
        }
        Ok(out)
    }

    /// Removes the entry `seq` (acknowledged). Removing an absent entry is a no-op.
    ///
    /// # Errors
    /// [`AgentError::State`] if sled fails.
    pub fn ack(&self, seq: u64) -> Result<(), AgentError> {
        self.tree.remove(seq.to_be_bytes())?;
        Ok(())
    }

    /// Entries waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether nothing waits for acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Resolves after the next [`Outbox::push`], or at once if a push happened since the last
    /// call returned (one stored permit). Meant for the single sending task.
    pub async fn pushed(&self) {
        self.notify.notified().await;
    }
}
