//! Model test of the outbox against an in-memory model, with a receiver that dedupes by watermark
//! the way the control plane does: whatever the interleaving of pushes, acknowledgements,
//! restarts, redeliveries and a full outbox, the stored entries equal the model's, sequence
//! numbers only grow (also across restarts), and the receiver applies every pushed message exactly
//! once.
//!
//! proptest prints the shrunk failing case and records it under `proptest-regressions/`, so a
//! failure replays on the next run.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;

use gaffer_agent::outbox::{Outbox, OutboxLimits};
use gaffer_protocol::messages::AgentMessage;
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    /// Push a message (the u8 picks a job id).
    Push(u8),
    /// The receiver takes everything pending, in order, applies what is above its watermark,
    /// and acknowledges the first `n` (the rest of the acks are "lost").
    Deliver(usize),
    /// The process dies and restarts: the outbox is reopened from disk.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Push),
        2 => (0usize..8).prop_map(Op::Deliver),
        1 => Just(Op::Restart),
    ]
}

const LIMITS: OutboxLimits = OutboxLimits { entries_max: 6, bytes_max: 1 << 20 };

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn outbox_matches_model_and_delivers_exactly_once(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut db = sled::open(dir.path()).unwrap();
        let mut outbox = Outbox::open_with(&db, LIMITS).unwrap();
        // Model: what must still be pending, by sequence.
        let mut model: BTreeMap<u64, AgentMessage> = BTreeMap::new();
        let mut highest_seq = 0u64;
        // Receiver: watermark dedupe, and how often each message was applied.
        let mut watermark = 0u64;
        let mut applied: BTreeMap<u64, u32> = BTreeMap::new();
        let mut pushed = 0usize;

        for op in ops {
            match op {
                Op::Push(j) => {
                    let msg = AgentMessage::JobAccepted { job_id: Uuid::from_u128(u128::from(j)), lease_id: 1 };
                    let seq = outbox.push(&msg).unwrap();
                    prop_assert!(seq > highest_seq, "sequence went backwards: {seq} after {highest_seq}");
                    highest_seq = seq;
                    model.insert(seq, msg);
                    pushed += 1;
                }
                Op::Deliver(acks) => {
                    let pending = outbox.pending_after(0, usize::MAX).unwrap();
                    for (i, (seq, _)) in pending.iter().enumerate() {
                        if *seq > watermark {
                            watermark = *seq;
                            *applied.entry(*seq).or_default() += 1;
                        }
                        if i < acks {
                            outbox.ack(*seq).unwrap();
                            model.remove(seq);
                        }
                    }
                }
                Op::Restart => {
                    drop(outbox);
                    db.flush().unwrap();
                    drop(db);
                    // As a restarted process may find the dying one still holding the lock.
                    db = gaffer_agent::datadir::open_state_db(dir.path(), std::time::Duration::from_secs(10)).unwrap();
                    outbox = Outbox::open_with(&db, LIMITS).unwrap();
                }
            }
            let stored: Vec<(u64, AgentMessage)> =
                outbox.entries().unwrap().into_iter().map(|e| (e.seq, e.message)).collect();
            let expected: Vec<(u64, AgentMessage)> = model.iter().map(|(s, m)| (*s, m.clone())).collect();
            prop_assert_eq!(&stored, &expected);
            prop_assert_eq!(outbox.len(), model.len() as u64);
            prop_assert_eq!(outbox.is_full(), model.len() as u64 >= LIMITS.entries_max);
        }
        // Drain: deliver and acknowledge everything.
        let pending = outbox.pending_after(0, usize::MAX).unwrap();
        for (seq, _) in pending {
            if seq > watermark {
                watermark = seq;
                *applied.entry(seq).or_default() += 1;
            }
            outbox.ack(seq).unwrap();
        }
        prop_assert!(outbox.is_empty());
        prop_assert_eq!(applied.len(), pushed, "every pushed message applied");
        prop_assert!(applied.values().all(|n| *n == 1), "applied more than once: {:?}", applied);
    }
}

/// A finished job's result waiting in the outbox keeps its lease: `unacknowledged_results` lists
/// digests and failures (with their lease ids) until they are acknowledged, and nothing else, so
/// Hello after a reconnect says the agent still holds them (issue 8: a job whose digest was in
/// flight during a certificate-renewal reconnect was requeued, and the digest then refused).
#[test]
fn unacknowledged_results_are_held_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let outbox = Outbox::open_with(&db, LIMITS).unwrap();
    let (done, failed, running) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    outbox.push(&AgentMessage::JobAccepted { job_id: running, lease_id: 3 }).unwrap();
    let digest_seq =
        outbox.push(&AgentMessage::Digest { job_id: done, lease_id: 7, digest: Box::new(small_digest()) }).unwrap();
    outbox
        .push(&AgentMessage::JobFailed { job_id: failed, lease_id: 2, reason: "bad".into(), retryable: false })
        .unwrap();
    let held = outbox.unacknowledged_results(100).unwrap();
    let pairs: Vec<(Uuid, u64)> = held.iter().map(|h| (h.job_id, h.lease_id)).collect();
    assert_eq!(pairs, vec![(done, 7), (failed, 2)]);
    outbox.ack(digest_seq).unwrap();
    let pairs: Vec<Uuid> = outbox.unacknowledged_results(100).unwrap().iter().map(|h| h.job_id).collect();
    assert_eq!(pairs, vec![failed]);
}

fn small_digest() -> gaffer_protocol::digest::Digest {
    use gaffer_protocol::digest::*;
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo { path: "/media/a.mov".into(), size_bytes: 1_000, modified_unix_secs: None },
        technical: TechnicalMetadata {
            container: "mov".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(1.0),
            bit_rate_bps: None,
            streams: vec![],
            primary_video_stream: None,
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 24,
            frames_corrupt: 0,
            cuts: vec![],
            shots: vec![],
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: vec![],
        analysis_secs: 0.1,
    }
}
