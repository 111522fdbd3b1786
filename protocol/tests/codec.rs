//! Codec properties: every message round-trips, and hostile byte streams fail with typed errors.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use gaffer_protocol::codec::{decode_payload, encode_frame, CodecError, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use gaffer_protocol::digest::*;
use gaffer_protocol::health::*;
use gaffer_protocol::messages::*;
use gaffer_protocol::version::VersionRange;
use proptest::prelude::*;
use uuid::Uuid;

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn finite() -> impl Strategy<Value = f64> {
    -1e9f64..1e9
}

fn health() -> impl Strategy<Value = Health> {
    (
        any::<u64>(),
        prop_oneof![
            text().prop_map(|driver_version| HealthSource::Nvml { driver_version }),
            text().prop_map(|reason| HealthSource::CpuOnly { reason }),
        ],
        0f32..100.0,
        finite(),
        any::<(u64, u64)>(),
        prop::collection::vec((text(), any::<u64>(), any::<u64>()), 0..3),
        prop::collection::vec(
            (any::<u32>(), text(), any::<(u32, u64, u64, u32)>(), prop::option::of(0f32..1000.0)),
            0..3,
        ),
        any::<(u32, u32)>(),
    )
        .prop_map(|(at, source, cpu, load, (mu, mt), disks, gpus, (jr, js))| Health {
            sampled_at_unix_ms: at,
            source,
            cpu_percent: cpu,
            load_avg_1m: load,
            memory_used_bytes: mu,
            memory_total_bytes: mt,
            disks: disks
                .into_iter()
                .map(|(path, a, t)| DiskHealth { path, available_bytes: a, total_bytes: t })
                .collect(),
            gpus: gpus
                .into_iter()
                .map(|(index, name, (u, mu, mt, t), p)| GpuHealth {
                    index,
                    name,
                    utilization_percent: u,
                    memory_used_bytes: mu,
                    memory_total_bytes: mt,
                    temperature_c: t,
                    power_w: p,
                })
                .collect(),
            inference: None,
            jobs_running: jr,
            job_slots: js,
            jobs_queued: 0,
            outbox_pending: mu % 100,
            outbox_full: mt % 2 == 0,
        })
}

fn digest() -> impl Strategy<Value = Digest> {
    (text(), any::<u64>(), prop::collection::vec((any::<u64>(), finite(), finite(), any::<u64>()), 0..20), finite())
        .prop_map(|(path, size, shots, secs)| Digest {
            schema_version: DIGEST_SCHEMA_VERSION,
            profile: "shots".into(),
            source: SourceInfo { path, size_bytes: size, modified_unix_secs: Some(size as i64 / 3) },
            technical: TechnicalMetadata {
                container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
                container_long_name: "QuickTime / MOV".into(),
                duration_secs: Some(secs),
                bit_rate_bps: None,
                streams: vec![StreamInfo {
                    index: 0,
                    kind: StreamKind::Video,
                    codec: "h264".into(),
                    time_base: (1, 12800),
                    duration_secs: Some(secs),
                    frames_declared: Some(size),
                    width: Some(1920),
                    height: Some(1080),
                    frame_rate_fps: Some(23.976),
                    pixel_format: Some("yuv420p".into()),
                    sample_rate_hz: None,
                    channels: None,
                    bit_rate_bps: Some(8_000_000),
                    language: None,
                }],
                primary_video_stream: Some(0),
            },
            shots: ShotAnalysis {
                detector: "content".into(),
                threshold: 27.0,
                min_shot_frames: 15,
                frames_decoded: size,
                frames_corrupt: 0,
                cuts: shots.iter().map(|&(f, t, s, _)| Cut { frame: f, time_secs: t, score: s }).collect(),
                shots: shots
                    .iter()
                    .enumerate()
                    .map(|(i, &(f, t, e, h))| Shot {
                        index: i as u32,
                        start_frame: f,
                        end_frame: f.saturating_add(1),
                        start_secs: t,
                        end_secs: e,
                        keyframe: Keyframe { frame: f, time_secs: t, phash: format!("{h:016x}") },
                    })
                    .collect(),
            },
            moderation: None,
            text: None,
            speech: None,
            analyzers: vec![AnalyzerInfo {
                name: "shots.content".into(),
                version: "1".into(),
                parameters: vec![("threshold".into(), "27".into())],
            }],
            analysis_secs: secs.abs(),
        })
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        (
            any::<(u16, u16)>(),
            text(),
            text(),
            prop::collection::vec(text(), 0..4),
            any::<u32>(),
            prop::collection::vec((uuid(), any::<u64>()), 0..3)
        )
            .prop_map(|((min, max), agent_version, hostname, volumes, job_slots, running_jobs)| {
                AgentMessage::Hello {
                    versions: VersionRange { min, max },
                    agent_version,
                    hostname,
                    capabilities: Capabilities {
                        gpus: vec![GpuInfo {
                            index: 0,
                            name: "NVIDIA RTX A6000".into(),
                            uuid: "GPU-1".into(),
                            memory_total_bytes: 48 << 30,
                        }],
                        watch_roots: volumes.iter().take(1).cloned().collect(),
                        volumes,
                        job_slots,
                        profiles: vec![Profile::Shots],
                        models: vec![ModelRef {
                            name: "silero-vad".into(),
                            version: "6.2.3".into(),
                            sha256: "ab".repeat(32),
                        }],
                    },
                    running_jobs: running_jobs
                        .into_iter()
                        .map(|(job_id, lease_id)| HeldJob { job_id, lease_id })
                        .collect(),
                }
            }),
        health().prop_map(AgentMessage::Heartbeat),
        (uuid(), any::<u64>()).prop_map(|(job_id, lease_id)| AgentMessage::JobAccepted { job_id, lease_id }),
        (uuid(), any::<u64>(), text()).prop_map(|(job_id, lease_id, reason)| AgentMessage::JobRejected {
            job_id,
            lease_id,
            reason
        }),
        (uuid(), any::<u64>(), 0f32..=1.0, any::<u64>()).prop_map(|(job_id, lease_id, fraction, frames_decoded)| {
            AgentMessage::Progress { job_id, lease_id, fraction, frames_decoded }
        }),
        (uuid(), any::<u64>(), digest()).prop_map(|(job_id, lease_id, d)| AgentMessage::Digest {
            job_id,
            lease_id,
            digest: Box::new(d)
        }),
        (uuid(), any::<u64>(), text(), any::<bool>()).prop_map(|(job_id, lease_id, reason, retryable)| {
            AgentMessage::JobFailed { job_id, lease_id, reason, retryable }
        }),
        (uuid(), text()).prop_map(|(job_id, path)| AgentMessage::SubmitWatched {
            job_id,
            path,
            profile: Profile::Shots
        }),
        (uuid(), any::<u64>(), "[0-9a-f]{64}", any::<u64>(), proptest::option::of(any::<i64>())).prop_map(
            |(job_id, lease_id, sha256, size_bytes, modified_unix_secs)| AgentMessage::Custody {
                job_id,
                lease_id,
                sha256,
                size_bytes,
                modified_unix_secs
            }
        ),
        prop::collection::vec((any::<u32>(), any::<u64>(), proptest::option::of(any::<u64>())), 0..4).prop_map(
            |counts| AgentMessage::GpuXidErrors {
                counts: counts
                    .into_iter()
                    .map(|(index, errors, last_xid)| GpuXidCount { index, errors, last_xid })
                    .collect()
            }
        ),
    ]
}

fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (any::<u16>(), text(), any::<u32>()).prop_map(|(protocol_version, server_version, heartbeat_interval_secs)| {
            ControlMessage::Welcome { protocol_version, server_version, heartbeat_interval_secs }
        }),
        text().prop_map(|reason| ControlMessage::Refused { reason }),
        (uuid(), any::<u64>(), text()).prop_map(|(job_id, lease_id, path)| ControlMessage::Assign(Assignment {
            job_id,
            lease_id,
            path,
            profile: Profile::Shots
        })),
        (uuid(), text()).prop_map(|(job_id, reason)| ControlMessage::Cancel { job_id, reason }),
        any::<u64>().prop_map(|seq| ControlMessage::Ack { seq }),
        (any::<u64>(), text(), any::<bool>()).prop_map(|(seq, message, retry)| ControlMessage::Error {
            seq,
            message,
            retry
        }),
    ]
}

proptest! {
    /// Any sequence of envelopes, cut into arbitrary chunks, decodes back to the same sequence.
    #[test]
    fn agent_envelopes_round_trip_through_any_chunking(
        msgs in prop::collection::vec((uuid(), any::<u64>(), agent_message()), 1..6),
        chunk in 1usize..64,
    ) {
        let envelopes: Vec<AgentEnvelope> = msgs.into_iter().map(|(agent_id, seq, body)| AgentEnvelope { agent_id, seq, body }).collect();
        let mut wire = Vec::new();
        for e in &envelopes {
            wire.extend(encode_frame(e, FRAME_BYTES_MAX_DEFAULT).unwrap());
        }
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            dec.push(piece);
            while let Some(m) = dec.next_message::<AgentEnvelope>().unwrap() {
                out.push(m);
            }
        }
        dec.finish().unwrap();
        prop_assert_eq!(out, envelopes);
    }

    #[test]
    fn control_messages_round_trip(msg in control_message()) {
        let frame = encode_frame(&msg, FRAME_BYTES_MAX_DEFAULT).unwrap();
        let back: ControlMessage = decode_payload(&frame[4..]).unwrap();
        prop_assert_eq!(back, msg);
    }

    /// Arbitrary bytes never panic the decoder; they give a message, "need more", or a typed error.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&bytes);
        for _ in 0..4 {
            match dec.next_message::<AgentEnvelope>() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// The digest survives JSON (the API form) unchanged too.
    #[test]
    fn digest_json_round_trip(d in digest()) {
        let json = serde_json::to_string(&d).unwrap();
        let back: Digest = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, d);
    }
}

/// Protocol 6 appended `GpuXidErrors` after `Custody`: the variants older peers know keep their bincode
/// tags (a protocol-5 control plane still reads every message it was ever sent), and the new one is
/// tag 11.
#[test]
fn gpu_xid_errors_is_appended_without_moving_older_tags() {
    let tag = |msg: &AgentMessage| encode_frame(msg, FRAME_BYTES_MAX_DEFAULT).unwrap()[4];
    assert_eq!(tag(&AgentMessage::JobAccepted { job_id: Uuid::nil(), lease_id: 1 }), 2);
    let custody = AgentMessage::Custody {
        job_id: Uuid::nil(),
        lease_id: 1,
        sha256: "ab".repeat(32),
        size_bytes: 1,
        modified_unix_secs: None,
    };
    assert_eq!(tag(&custody), 10);
    let xid = AgentMessage::GpuXidErrors {
        counts: vec![
            GpuXidCount { index: 0, errors: 0, last_xid: None },
            GpuXidCount { index: 1, errors: 3, last_xid: Some(79) },
        ],
    };
    assert_eq!(tag(&xid), 11);
    assert_eq!(xid.kind(), "gpu_xid_errors");
    let frame = encode_frame(&xid, FRAME_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(decode_payload::<AgentMessage>(&frame[4..]).unwrap(), xid);
}

fn ack_frame() -> Vec<u8> {
    encode_frame(&ControlMessage::Ack { seq: 7 }, FRAME_BYTES_MAX_DEFAULT).unwrap()
}

#[test]
fn oversize_header_is_refused_before_the_payload_arrives() {
    let mut dec = FrameDecoder::new(1024);
    // Announce 1 GiB and send only the header: the decoder must refuse at once, not wait or allocate.
    dec.push(&(1u32 << 30).to_be_bytes());
    match dec.next_message::<ControlMessage>() {
        Err(CodecError::FrameTooLarge { len_bytes, max_bytes }) => {
            assert_eq!(len_bytes, 1 << 30);
            assert_eq!(max_bytes, 1024);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert!(dec.buffered_bytes() <= 4, "nothing beyond the header is buffered");
    // Poisoned afterwards: the stream is out of sync.
    dec.push(&ack_frame());
    assert!(matches!(dec.next_message::<ControlMessage>(), Err(CodecError::Poisoned)));
}

#[test]
fn sender_refuses_oversize_messages() {
    let big = ControlMessage::Refused { reason: "x".repeat(2000) };
    assert!(matches!(encode_frame(&big, 1000), Err(CodecError::FrameTooLarge { .. })));
}

#[test]
fn truncated_frame_is_reported_at_end_of_stream() {
    let frame = ack_frame();
    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    dec.push(&frame[..frame.len() - 1]);
    assert!(dec.next_message::<ControlMessage>().unwrap().is_none());
    assert!(matches!(dec.finish(), Err(CodecError::Truncated { buffered_bytes }) if buffered_bytes == frame.len() - 1));
    dec.push(&frame[frame.len() - 1..]);
    assert_eq!(dec.next_message::<ControlMessage>().unwrap(), Some(ControlMessage::Ack { seq: 7 }));
    dec.finish().unwrap();
}

#[test]
fn garbage_payload_is_malformed() {
    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let payload = [0xffu8; 16];
    dec.push(&(payload.len() as u32).to_be_bytes());
    dec.push(&payload);
    assert!(matches!(dec.next_message::<ControlMessage>(), Err(CodecError::Malformed(_))));
}

#[test]
fn trailing_bytes_inside_a_frame_are_malformed() {
    let mut frame = ack_frame();
    frame.push(0);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    dec.push(&frame);
    assert!(matches!(dec.next_message::<ControlMessage>(), Err(CodecError::Malformed(m)) if m.contains("trailing")));
}

#[test]
fn a_control_message_is_not_an_agent_envelope() {
    // Type confusion between directions is caught as malformed, not misread.
    let frame = encode_frame(&ControlMessage::Refused { reason: "no".into() }, FRAME_BYTES_MAX_DEFAULT).unwrap();
    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    dec.push(&frame);
    assert!(dec.next_message::<AgentEnvelope>().is_err());
}
