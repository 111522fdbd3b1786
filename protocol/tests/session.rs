//! Session state machines, driven with no sockets: a [`Pair`] of an [`AgentSession`] and a
//! [`ControlSession`] on a simulated clock, with byte transfer the test controls (split, delayed,
//! dropped; a dropped link is replaced by a fresh pair, as the drivers reconnect).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gaffer_protocol::codec::{decode_payload, encode_frame, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::*;
use gaffer_protocol::session::*;
use gaffer_protocol::version::{VersionRange, PROTOCOL_VERSION};
use proptest::prelude::*;
use uuid::Uuid;

const AGENT: Uuid = Uuid::from_u128(0xa6e7);
const INTERVAL_SECS: u32 = 5;
const INTERVAL: Duration = Duration::from_secs(INTERVAL_SECS as u64);
const MS: Duration = Duration::from_millis(1);

fn agent_cfg() -> AgentSessionConfig {
    AgentSessionConfig {
        agent_id: AGENT,
        agent_version: "0.1.0".into(),
        hostname: "gpu-01".into(),
        running_jobs: vec![HeldJob { job_id: Uuid::from_u128(77), lease_id: 3 }],
        ..Default::default()
    }
}

fn control_cfg() -> ControlSessionConfig {
    ControlSessionConfig {
        agent_id: AGENT,
        server_version: "0.1.0".into(),
        heartbeat_interval_secs: INTERVAL_SECS,
        ..Default::default()
    }
}

fn health() -> Health {
    Health {
        sampled_at_unix_ms: 1,
        source: HealthSource::CpuOnly { reason: "test".into() },
        cpu_percent: 1.0,
        load_avg_1m: 0.1,
        memory_used_bytes: 1,
        memory_total_bytes: 2,
        disks: vec![],
        gpus: vec![],
        inference: None,
        jobs_running: 0,
        job_slots: 1,
        jobs_queued: 0,
        outbox_pending: 0,
        outbox_full: false,
    }
}

fn assignment(n: u128) -> Assignment {
    Assignment {
        job_id: Uuid::from_u128(n),
        lease_id: n as u64 + 1,
        path: format!("/media/{n}.mov"),
        profile: Profile::Shots,
    }
}

fn progress(seq: u64) -> AgentMessage {
    AgentMessage::Progress { job_id: Uuid::from_u128(1), lease_id: 1, fraction: 0.5, frames_decoded: seq }
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    encode_frame(msg, FRAME_BYTES_MAX_DEFAULT).unwrap()
}

fn env(seq: u64, body: AgentMessage) -> Vec<u8> {
    frame(&AgentEnvelope { agent_id: AGENT, seq, body })
}

fn hello_with(versions: VersionRange) -> AgentMessage {
    AgentMessage::Hello {
        versions,
        agent_version: "0.1.0".into(),
        hostname: "gpu-01".into(),
        capabilities: AgentSessionConfig::default().capabilities,
        running_jobs: vec![],
    }
}

fn hello() -> AgentMessage {
    hello_with(VersionRange::ours())
}

fn drain_transmit_control(s: &mut ControlSession) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = s.poll_transmit() {
        out.extend(b);
    }
    out
}

fn drain_transmit_agent(s: &mut AgentSession) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = s.poll_transmit() {
        out.extend(b);
    }
    out
}

fn control_events(s: &mut ControlSession) -> Vec<ControlEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn agent_events(s: &mut AgentSession) -> Vec<AgentEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// Every control message in `bytes`, in order.
fn decode_control(bytes: &[u8]) -> Vec<ControlMessage> {
    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    dec.push(bytes);
    std::iter::from_fn(|| dec.next_message::<ControlMessage>().unwrap()).collect()
}

/// A control session that has taken a Hello and accepted it (the Welcome is drained).
fn control_up(now: Instant) -> ControlSession {
    let mut c = ControlSession::new(control_cfg(), now);
    c.handle_input(&env(0, hello()), now);
    assert!(matches!(control_events(&mut c).as_slice(), [ControlEvent::Hello { .. }]));
    c.accept().unwrap();
    assert!(matches!(decode_control(&drain_transmit_control(&mut c)).as_slice(), [ControlMessage::Welcome { .. }]));
    c
}

/// An agent session that has been welcomed (the Hello is drained).
fn agent_up(now: Instant) -> AgentSession {
    let mut a = AgentSession::new(agent_cfg(), now);
    drain_transmit_agent(&mut a);
    a.handle_input(&welcome(), now);
    assert!(matches!(agent_events(&mut a).as_slice(), [AgentEvent::Welcomed { .. }]));
    a
}

fn welcome() -> Vec<u8> {
    frame(&ControlMessage::Welcome {
        protocol_version: PROTOCOL_VERSION,
        server_version: "0.1.0".into(),
        heartbeat_interval_secs: INTERVAL_SECS,
    })
}

/// Both ends of one connection, a simulated clock, the bytes in flight each way, every event each
/// side produced, and the agent's outbox (a model of `agent/src/outbox.rs`: entries stay until
/// acknowledged or rejected). The control side's driver is written out by each test (accept,
/// acknowledge, ...), except that [`Pair::drive`] can answer heartbeats for the agent.
struct Pair {
    now: Instant,
    agent: AgentSession,
    control: ControlSession,
    to_control: Vec<u8>,
    to_agent: Vec<u8>,
    agent_log: Vec<AgentEvent>,
    control_log: Vec<ControlEvent>,
    outbox: BTreeMap<u64, AgentMessage>,
}

impl Pair {
    fn new() -> Self {
        Self::with(agent_cfg(), control_cfg(), Instant::now(), BTreeMap::new())
    }

    fn with(
        agent: AgentSessionConfig,
        control: ControlSessionConfig,
        now: Instant,
        outbox: BTreeMap<u64, AgentMessage>,
    ) -> Self {
        Self {
            now,
            agent: AgentSession::new(agent, now),
            control: ControlSession::new(control, now),
            to_control: Vec::new(),
            to_agent: Vec::new(),
            agent_log: Vec::new(),
            control_log: Vec::new(),
            outbox,
        }
    }

    /// A fresh connection after this one died: whatever was in flight is lost; the outbox stays.
    fn reconnect(self) -> Self {
        Self::with(agent_cfg(), control_cfg(), self.now, self.outbox)
    }

    /// Moves everything each side has queued onto the wire (not delivered yet).
    fn transmit(&mut self) {
        self.to_control.extend(drain_transmit_agent(&mut self.agent));
        self.to_agent.extend(drain_transmit_control(&mut self.control));
    }

    /// Delivers up to `n` bytes of what is in flight to the control plane, as one read.
    fn deliver_to_control(&mut self, n: usize) {
        let n = n.min(self.to_control.len());
        let bytes: Vec<u8> = self.to_control.drain(..n).collect();
        self.control.handle_input(&bytes, self.now);
        self.control_log.extend(control_events(&mut self.control));
    }

    /// Delivers up to `n` bytes of what is in flight to the agent, as one read.
    fn deliver_to_agent(&mut self, n: usize) {
        let n = n.min(self.to_agent.len());
        let bytes: Vec<u8> = self.to_agent.drain(..n).collect();
        self.agent.handle_input(&bytes, self.now);
        self.agent_log.extend(agent_events(&mut self.agent));
    }

    /// Transmits and delivers both ways until nothing is in flight.
    fn drive(&mut self) {
        loop {
            self.transmit();
            if self.to_control.is_empty() && self.to_agent.is_empty() {
                return;
            }
            self.deliver_to_control(usize::MAX);
            self.deliver_to_agent(usize::MAX);
        }
    }

    /// Hello → accept → Welcome, all delivered.
    fn connect(&mut self) {
        self.drive();
        let hello = self.control_log.iter().any(|e| matches!(e, ControlEvent::Hello { .. }));
        assert!(hello, "no Hello: {:?}", self.control_log);
        self.control.accept().unwrap();
        self.drive();
        assert!(self.agent.is_up() && self.control.is_up(), "{:?}", self.agent_log);
    }

    /// What the link driver does on `outbox.pushed()`: fill the window from the outbox.
    fn fill_window(&mut self) -> usize {
        let mut sent = 0;
        while let Some((after, max)) = self.agent.outbox_window() {
            let batch: Vec<_> = self.outbox.range(after + 1..).take(max).map(|(s, m)| (*s, m.clone())).collect();
            if batch.is_empty() {
                break;
            }
            for (seq, msg) in batch {
                match self.agent.send_outbox(seq, msg) {
                    Ok(()) => sent += 1,
                    Err(SessionError::Backpressure { .. }) => return sent,
                    Err(e) => panic!("send_outbox({seq}): {e}"),
                }
            }
        }
        sent
    }

    /// What the link driver does with acknowledgement events (taken out of the log).
    fn apply_agent_acks(&mut self) {
        for ev in std::mem::take(&mut self.agent_log) {
            match ev {
                AgentEvent::Acked(seq) | AgentEvent::Rejected { seq, .. } => {
                    self.outbox.remove(&seq);
                }
                other => self.agent_log.push(other),
            }
        }
    }

    /// Sequence numbers of the messages the control plane received, in order, taken out of the log.
    fn take_control_seqs(&mut self) -> Vec<u64> {
        let mut seqs = Vec::new();
        for ev in std::mem::take(&mut self.control_log) {
            match ev {
                ControlEvent::Message(e) => seqs.push(e.seq),
                other => self.control_log.push(other),
            }
        }
        seqs
    }

    /// Advances the clock by `d` and runs both sides' timers (the agent's heartbeats answered at
    /// once when `heartbeats`), the way drivers do: timeouts in order, never skipping one.
    fn advance(&mut self, d: Duration, heartbeats: bool) {
        let until = self.now + d;
        loop {
            let next = [self.agent.poll_timeout(), self.control.poll_timeout()].into_iter().flatten().min();
            match next {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    self.agent.handle_timeout(self.now);
                    self.control.handle_timeout(self.now);
                    let evs = agent_events(&mut self.agent);
                    for ev in &evs {
                        if heartbeats && *ev == AgentEvent::HeartbeatDue {
                            self.agent.send_heartbeat(health(), self.now);
                        }
                    }
                    self.agent_log.extend(evs);
                    self.control_log.extend(control_events(&mut self.control));
                    if heartbeats {
                        self.drive();
                    }
                }
                _ => break,
            }
        }
        self.now = until;
    }
}

fn closed_reason_agent(log: &[AgentEvent]) -> Option<&CloseReason> {
    log.iter().find_map(|e| match e {
        AgentEvent::Closed { reason } => Some(reason),
        _ => None,
    })
}

fn closed_reason_control(log: &[ControlEvent]) -> Option<&CloseReason> {
    log.iter().find_map(|e| match e {
        ControlEvent::Closed { reason } => Some(reason),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Issue 7: queued jobs stayed `assigned` forever because the Assign arrived in the same read as
/// the Welcome and the old agent loop waited for another read before looking at its decoder.
#[test]
fn issue_7_welcome_and_assign_in_one_read_are_both_handled() {
    let mut p = Pair::new();
    p.drive();
    p.control.accept().unwrap();
    p.control.send(ControlMessage::Assign(assignment(1))).unwrap();
    p.control.send(ControlMessage::Assign(assignment(2))).unwrap();
    p.transmit();
    // One read carrying the Welcome and both Assigns; then no further input at all.
    p.deliver_to_agent(usize::MAX);
    assert!(p.to_agent.is_empty());
    assert_eq!(
        p.agent_log,
        vec![
            AgentEvent::Welcomed {
                protocol_version: PROTOCOL_VERSION,
                server_version: "0.1.0".into(),
                heartbeat_interval_secs: INTERVAL_SECS
            },
            AgentEvent::Assign(assignment(1)),
            AgentEvent::Assign(assignment(2)),
        ]
    );
}

#[test]
fn hello_event_carries_what_the_agent_said() {
    let mut p = Pair::new();
    p.drive();
    assert_eq!(
        p.control_log,
        vec![ControlEvent::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            hostname: "gpu-01".into(),
            capabilities: AgentSessionConfig::default().capabilities,
            running_jobs: vec![HeldJob { job_id: Uuid::from_u128(77), lease_id: 3 }],
        }]
    );
    assert!(!p.control.is_up(), "up only after accept");
    assert!(matches!(p.control.send(ControlMessage::Assign(assignment(1))), Err(SessionError::NotUp)));
    assert_eq!(p.agent.outbox_window(), None, "no window before the Welcome");
    p.control.accept().unwrap();
    assert!(matches!(p.control.accept(), Err(SessionError::NotAllowed(_))), "accept only once");
    p.drive();
    assert_eq!(p.agent.outbox_window(), Some((0, INFLIGHT_MAX_DEFAULT)));
}

#[test]
fn hello_timeout_closes_and_tells_the_agent() {
    let t0 = Instant::now();
    let mut c = ControlSession::new(control_cfg(), t0);
    assert_eq!(c.poll_timeout(), Some(t0 + HELLO_TIMEOUT_DEFAULT));
    c.handle_timeout(t0 + HELLO_TIMEOUT_DEFAULT - MS);
    assert_eq!(c.poll_event(), None);
    assert!(!c.is_closed());
    c.handle_timeout(t0 + HELLO_TIMEOUT_DEFAULT);
    assert_eq!(control_events(&mut c), vec![ControlEvent::Closed { reason: CloseReason::HelloTimeout }]);
    assert!(c.is_closed());
    assert_eq!(c.poll_timeout(), None);
    match decode_control(&drain_transmit_control(&mut c)).as_slice() {
        [ControlMessage::Refused { reason }] => assert!(reason.contains("no Hello"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    // A late Hello changes nothing.
    c.handle_input(&env(0, hello()), t0 + HELLO_TIMEOUT_DEFAULT);
    assert_eq!(c.poll_event(), None);
}

#[test]
fn welcome_timeout_closes_the_agent() {
    let t0 = Instant::now();
    let mut a = AgentSession::new(agent_cfg(), t0);
    assert_eq!(a.poll_timeout(), Some(t0 + WELCOME_TIMEOUT_DEFAULT));
    a.handle_timeout(t0 + WELCOME_TIMEOUT_DEFAULT - MS);
    assert_eq!(a.poll_event(), None);
    a.handle_timeout(t0 + WELCOME_TIMEOUT_DEFAULT);
    assert_eq!(agent_events(&mut a), vec![AgentEvent::Closed { reason: CloseReason::WelcomeTimeout }]);
}

#[test]
fn version_mismatch_is_refused_with_the_reason() {
    let t0 = Instant::now();
    let mut c = ControlSession::new(control_cfg(), t0);
    let too_new = VersionRange { min: PROTOCOL_VERSION + 1, max: PROTOCOL_VERSION + 3 };
    c.handle_input(&env(0, hello_with(too_new)), t0);
    let events = control_events(&mut c);
    let [ControlEvent::Closed { reason: CloseReason::VersionMismatch(text) }] = events.as_slice() else {
        panic!("expected only Closed(VersionMismatch), got {events:?}");
    };
    assert!(text.contains("upgrade the control plane"), "{text}");
    let sent = decode_control(&drain_transmit_control(&mut c));
    assert_eq!(sent, vec![ControlMessage::Refused { reason: text.clone() }]);

    // The agent that reads it closes with the control plane's reason.
    let mut a = AgentSession::new(agent_cfg(), t0);
    a.handle_input(&frame(&sent[0]), t0);
    assert_eq!(agent_events(&mut a), vec![AgentEvent::Closed { reason: CloseReason::Refused(text.clone()) }]);
    assert!(a.is_closed());
}

#[test]
fn agent_refuses_a_welcome_for_a_version_it_does_not_speak() {
    let t0 = Instant::now();
    let mut a = AgentSession::new(agent_cfg(), t0);
    let w = ControlMessage::Welcome {
        protocol_version: PROTOCOL_VERSION + 1,
        server_version: "9".into(),
        heartbeat_interval_secs: 5,
    };
    a.handle_input(&frame(&w), t0);
    assert!(matches!(
        agent_events(&mut a).as_slice(),
        [AgentEvent::Closed { reason: CloseReason::VersionMismatch(_) }]
    ));
    assert!(!a.is_up());
}

#[test]
fn agent_id_mismatch_is_closed() {
    let mut p = Pair::with(
        AgentSessionConfig { agent_id: Uuid::from_u128(0xbad), ..agent_cfg() },
        control_cfg(),
        Instant::now(),
        BTreeMap::new(),
    );
    p.drive();
    assert!(!p.control_log.iter().any(|e| matches!(e, ControlEvent::Hello { .. })), "{:?}", p.control_log);
    match closed_reason_control(&p.control_log) {
        Some(CloseReason::IdentityMismatch(t)) => assert!(t.contains("does not match"), "{t}"),
        other => panic!("expected a protocol violation, got {other:?}"),
    }
    assert!(p.control.is_closed());
    assert!(matches!(closed_reason_agent(&p.agent_log), Some(CloseReason::Refused(t)) if t.contains("does not match")));
    assert!(matches!(p.control.accept(), Err(SessionError::Closed)));
}

#[test]
fn refuse_sends_the_reason_and_closes_both_ends() {
    let mut p = Pair::new();
    p.drive();
    p.control.refuse("agent revoked");
    assert!(p.control.is_closed());
    let events = control_events(&mut p.control);
    assert_eq!(closed_reason_control(&events), Some(&CloseReason::Refused("agent revoked".into())));
    assert!(matches!(p.control.send(ControlMessage::Assign(assignment(1))), Err(SessionError::Closed)));
    p.drive();
    assert_eq!(closed_reason_agent(&p.agent_log), Some(&CloseReason::Refused("agent revoked".into())));
    assert!(p.control.is_closed() && p.agent.is_closed());
}

#[test]
fn refuse_queues_a_closed_event() {
    let t0 = Instant::now();
    let mut c = ControlSession::new(control_cfg(), t0);
    c.handle_input(&env(0, hello()), t0);
    control_events(&mut c);
    c.refuse("not in this site");
    assert_eq!(
        control_events(&mut c),
        vec![ControlEvent::Closed { reason: CloseReason::Refused("not in this site".into()) }]
    );
    assert_eq!(
        decode_control(&drain_transmit_control(&mut c)),
        vec![ControlMessage::Refused { reason: "not in this site".into() }]
    );
}

// ---------------------------------------------------------------------------------------------
// Protocol violations and the byte stream

#[test]
fn first_message_must_be_hello() {
    let t0 = Instant::now();
    let mut c = ControlSession::new(control_cfg(), t0);
    c.handle_input(&env(1, progress(1)), t0);
    assert!(matches!(
        control_events(&mut c).as_slice(),
        [ControlEvent::Closed { reason: CloseReason::ProtocolViolation(t) }] if t.contains("not hello")
    ));
}

#[test]
fn messages_before_the_welcome_are_a_violation() {
    let t0 = Instant::now();
    let mut c = ControlSession::new(control_cfg(), t0);
    c.handle_input(&[env(0, hello()), env(1, progress(1))].concat(), t0);
    let events = control_events(&mut c);
    assert!(matches!(events.first(), Some(ControlEvent::Hello { .. })), "{events:?}");
    assert!(matches!(events.get(1), Some(ControlEvent::Closed { reason: CloseReason::ProtocolViolation(_) })));
    assert!(matches!(c.accept(), Err(SessionError::Closed)));
}

#[test]
fn sequence_numbers_must_increase_on_a_connection() {
    let t0 = Instant::now();
    let mut c = control_up(t0);
    c.handle_input(&[env(5, progress(5)), env(5, progress(5))].concat(), t0);
    let events = control_events(&mut c);
    assert!(
        matches!(events.as_slice(), [ControlEvent::Message(e), ControlEvent::Closed { reason: CloseReason::ProtocolViolation(t) }] if e.seq == 5 && t.contains("sequence 5 after 5")),
        "{events:?}"
    );
    let mut c = control_up(t0);
    c.handle_input(&env(0, progress(0)), t0);
    assert!(matches!(
        control_events(&mut c).as_slice(),
        [ControlEvent::Closed { reason: CloseReason::ProtocolViolation(_) }]
    ));
}

/// Messages decoded before a bad frame are still reported, and the acknowledgements the driver
/// queues for them go out before the Refused.
#[test]
fn acks_for_messages_before_a_bad_frame_precede_the_refusal() {
    let t0 = Instant::now();
    let mut c = control_up(t0);
    let mut bytes = env(1, progress(1));
    bytes.extend([0, 0, 0, 2, 0xff, 0xff]);
    c.handle_input(&bytes, t0);
    let Some(ControlEvent::Message(e)) = c.poll_event() else { panic!("message 1 not reported") };
    c.acknowledge(e.seq);
    assert!(matches!(c.poll_event(), Some(ControlEvent::Closed { reason: CloseReason::Codec(_) })));
    let sent = decode_control(&drain_transmit_control(&mut c));
    assert!(matches!(sent.as_slice(), [ControlMessage::Ack { seq: 1 }, ControlMessage::Refused { .. }]), "{sent:?}");
}

#[test]
fn oversize_frame_closes_before_the_payload_arrives() {
    let t0 = Instant::now();
    let mut a = AgentSession::new(AgentSessionConfig { frame_bytes_max: 1024, ..agent_cfg() }, t0);
    a.handle_input(&(1u32 << 30).to_be_bytes(), t0);
    assert!(
        matches!(agent_events(&mut a).as_slice(), [AgentEvent::Closed { reason: CloseReason::Codec(t) }] if t.contains("exceeds"))
    );
}

#[test]
fn end_of_stream_is_peer_finished_or_truncated() {
    let t0 = Instant::now();
    let mut a = agent_up(t0);
    a.handle_end_of_stream(t0);
    assert_eq!(agent_events(&mut a), vec![AgentEvent::Closed { reason: CloseReason::PeerFinished }]);

    let mut c = control_up(t0);
    let partial = env(1, progress(1));
    c.handle_input(&partial[..partial.len() - 1], t0);
    c.handle_end_of_stream(t0);
    assert!(
        matches!(control_events(&mut c).as_slice(), [ControlEvent::Closed { reason: CloseReason::Codec(t) }] if t.contains("inside a frame"))
    );
}

#[test]
fn send_takes_only_assign_and_cancel() {
    let mut c = control_up(Instant::now());
    assert!(matches!(c.send(ControlMessage::Ack { seq: 1 }), Err(SessionError::NotAllowed(_))));
    assert!(matches!(c.send(ControlMessage::Refused { reason: "x".into() }), Err(SessionError::NotAllowed(_))));
    c.send(ControlMessage::Cancel { job_id: Uuid::from_u128(9), reason: "lease expired".into() }).unwrap();
    assert_eq!(
        decode_control(&drain_transmit_control(&mut c)),
        vec![ControlMessage::Cancel { job_id: Uuid::from_u128(9), reason: "lease expired".into() }]
    );
}

#[test]
fn cancel_follows_assign_in_order() {
    let mut p = Pair::new();
    p.connect();
    p.control.send(ControlMessage::Assign(assignment(4))).unwrap();
    p.control
        .send(ControlMessage::Cancel { job_id: Uuid::from_u128(4), reason: "cancelled by an operator".into() })
        .unwrap();
    p.drive();
    assert_eq!(
        p.agent_log[1..],
        [
            AgentEvent::Assign(assignment(4)),
            AgentEvent::Cancel { job_id: Uuid::from_u128(4), reason: "cancelled by an operator".into() }
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Heartbeats and liveness

#[test]
fn heartbeat_is_due_every_interval_and_answered() {
    let mut p = Pair::new();
    p.connect();
    let up_at = p.now;
    assert_eq!(p.agent.poll_timeout(), Some(up_at + INTERVAL));
    p.agent.handle_timeout(up_at + INTERVAL - MS);
    assert_eq!(p.agent.poll_event(), None);
    p.now = up_at + INTERVAL;
    p.agent.handle_timeout(p.now);
    assert_eq!(agent_events(&mut p.agent), vec![AgentEvent::HeartbeatDue]);
    // The driver samples health (it takes a while), then sends.
    let sent_at = p.now + Duration::from_millis(50);
    p.now = sent_at;
    p.agent.send_heartbeat(health(), sent_at);
    assert_eq!(p.agent.poll_timeout(), Some(sent_at + INTERVAL));
    p.transmit();
    p.deliver_to_control(usize::MAX);
    assert_eq!(p.control_log.last(), Some(&ControlEvent::Heartbeat(health())));
    p.transmit();
    assert_eq!(decode_control(&p.to_agent), vec![ControlMessage::Ack { seq: 0 }], "heartbeats are answered");
    p.deliver_to_agent(usize::MAX);
    assert_eq!(p.agent_log.len(), 1, "a heartbeat ack is no event: {:?}", p.agent_log);
}

#[test]
fn an_idle_healthy_link_never_times_out() {
    let mut p = Pair::new();
    p.connect();
    p.advance(Duration::from_secs(3600), true);
    assert!(p.agent.is_up() && p.control.is_up());
    assert_eq!(closed_reason_agent(&p.agent_log), None);
    assert_eq!(closed_reason_control(&p.control_log), None);
    let beats = p.control_log.iter().filter(|e| matches!(e, ControlEvent::Heartbeat(_))).count();
    assert!((700..=721).contains(&beats), "{beats} heartbeats in an hour at 5 s");
}

#[test]
fn control_plane_closes_a_silent_agent() {
    let mut p = Pair::new();
    p.connect();
    let last_rx = p.now;
    let window = INTERVAL * CONTROL_HEARTBEAT_MISSES_MAX_DEFAULT;
    assert_eq!(p.control.poll_timeout(), Some(last_rx + window));
    // One byte of a frame counts as life.
    p.now = last_rx + window - MS;
    p.control.handle_timeout(p.now);
    assert!(p.control.is_up());
    let partial = env(1, progress(1));
    p.control.handle_input(&partial[..1], p.now);
    assert_eq!(p.control.poll_timeout(), Some(p.now + window));
    let alive_at = p.now;
    p.control.handle_timeout(alive_at + window - MS);
    assert!(p.control.is_up());
    p.control.handle_timeout(alive_at + window);
    assert_eq!(control_events(&mut p.control), vec![ControlEvent::Closed { reason: CloseReason::HeartbeatTimeout }]);
    assert_eq!(p.control.poll_timeout(), None);
}

#[test]
fn agent_closes_when_the_control_plane_goes_silent() {
    let mut p = Pair::new();
    p.connect();
    // The agent keeps sending heartbeats, but nothing comes back (the answers are lost).
    let window = INTERVAL * AGENT_HEARTBEAT_MISSES_MAX_DEFAULT;
    let up_at = p.now;
    while p.now < up_at + window - MS {
        let t = p.agent.poll_timeout().unwrap();
        p.now = t.min(up_at + window - MS);
        p.agent.handle_timeout(p.now);
        if agent_events(&mut p.agent).contains(&AgentEvent::HeartbeatDue) {
            p.agent.send_heartbeat(health(), p.now);
        }
    }
    assert!(p.agent.is_up());
    p.agent.handle_timeout(up_at + window);
    assert_eq!(agent_events(&mut p.agent), vec![AgentEvent::Closed { reason: CloseReason::HeartbeatTimeout }]);
    assert_eq!(p.agent.outbox_window(), None);
}

// ---------------------------------------------------------------------------------------------
// Outbox window, acknowledgements, reconnect

fn outbox_of(n: u64) -> BTreeMap<u64, AgentMessage> {
    (1..=n).map(|s| (s, progress(s))).collect()
}

#[test]
fn outbox_window_is_bounded_by_inflight_max_and_acks_open_it() {
    let cfg = AgentSessionConfig { inflight_max: 4, ..agent_cfg() };
    let mut p = Pair::with(cfg, control_cfg(), Instant::now(), outbox_of(10));
    p.connect();
    assert_eq!(p.fill_window(), 4);
    assert_eq!(p.agent.outbox_window(), None);
    assert!(matches!(p.agent.send_outbox(5, progress(5)), Err(SessionError::WindowFull { inflight_max: 4 })));
    p.drive();
    assert_eq!(p.take_control_seqs(), vec![1, 2, 3, 4]);
    p.control.acknowledge(1);
    p.control.acknowledge(2);
    p.drive();
    assert_eq!(p.agent_log[1..], [AgentEvent::Acked(1), AgentEvent::Acked(2)]);
    p.apply_agent_acks();
    assert_eq!(p.agent.outbox_window(), Some((4, 2)));
    assert_eq!(p.fill_window(), 2);
    p.drive();
    assert_eq!(p.take_control_seqs(), vec![5, 6]);
    assert_eq!(p.agent.inflight_len(), 4);
}

#[test]
fn acks_for_entries_not_in_flight_are_still_reported() {
    let mut p = Pair::new();
    p.connect();
    p.control.acknowledge(42);
    p.drive();
    assert_eq!(p.agent_log.last(), Some(&AgentEvent::Acked(42)));
}

#[test]
fn outbox_sequence_numbers_must_increase() {
    let mut a = agent_up(Instant::now());
    a.send_outbox(3, progress(3)).unwrap();
    assert!(matches!(a.send_outbox(3, progress(3)), Err(SessionError::OutOfOrder { seq: 3, last: 3 })));
    assert!(matches!(a.send_outbox(2, progress(2)), Err(SessionError::OutOfOrder { seq: 2, last: 3 })));
    assert!(matches!(a.send_outbox(4, AgentMessage::Heartbeat(health())), Err(SessionError::NotAllowed(_))));
    let before = AgentSession::new(agent_cfg(), Instant::now()).send_outbox(1, progress(1));
    assert!(matches!(before, Err(SessionError::NotUp)));
}

#[test]
fn reconnect_resends_unacknowledged_entries_in_order() {
    let mut p = Pair::with(agent_cfg(), control_cfg(), Instant::now(), outbox_of(5));
    p.connect();
    assert_eq!(p.fill_window(), 5);
    p.drive();
    assert_eq!(p.take_control_seqs(), vec![1, 2, 3, 4, 5]);
    for seq in 1..=3 {
        p.control.acknowledge(seq);
    }
    p.transmit();
    // The link dies after the ack of 1 arrived and before the rest did.
    let ack_len = frame(&ControlMessage::Ack { seq: 1 }).len();
    p.deliver_to_agent(ack_len);
    p.apply_agent_acks();
    assert_eq!(p.outbox.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    // Meanwhile the agent records more.
    p.outbox.insert(6, progress(6));

    let mut p = p.reconnect();
    p.connect();
    assert_eq!(p.agent.outbox_window(), Some((0, INFLIGHT_MAX_DEFAULT)), "a new session starts at 0");
    assert_eq!(p.fill_window(), 5);
    p.drive();
    assert_eq!(p.take_control_seqs(), vec![2, 3, 4, 5, 6]);
}

#[test]
fn rejected_drops_the_entry_and_retry_later_ends_the_session() {
    let mut p = Pair::with(agent_cfg(), control_cfg(), Instant::now(), outbox_of(3));
    p.connect();
    p.fill_window();
    p.drive();
    p.control.reject(1, "report under lease 1, current lease is 2", false);
    p.drive();
    assert_eq!(
        p.agent_log.last(),
        Some(&AgentEvent::Rejected { seq: 1, message: "report under lease 1, current lease is 2".into() })
    );
    assert!(p.agent.is_up(), "a permanent rejection does not end the session");
    p.apply_agent_acks();
    assert!(!p.outbox.contains_key(&1));

    // A store error, followed in the same read by an ack and an assignment: all are reported,
    // then the session ends.
    p.control.reject(2, "store unavailable", true);
    p.control.acknowledge(3);
    p.control.send(ControlMessage::Assign(assignment(8))).unwrap();
    p.agent_log.clear();
    p.transmit();
    p.deliver_to_agent(usize::MAX);
    assert_eq!(
        p.agent_log,
        vec![
            AgentEvent::RetryLater { seq: 2, message: "store unavailable".into() },
            AgentEvent::Acked(3),
            AgentEvent::Assign(assignment(8)),
            AgentEvent::Closed {
                reason: CloseReason::RetryLater(
                    "the control plane could not store message 2: store unavailable".into()
                )
            },
        ]
    );
    assert_eq!(p.agent.outbox_window(), None);
    p.apply_agent_acks();
    assert_eq!(p.outbox.keys().copied().collect::<Vec<_>>(), vec![2], "kept for the next connection");
    let mut p = p.reconnect();
    p.connect();
    p.fill_window();
    p.drive();
    assert_eq!(p.take_control_seqs(), vec![2]);
}

#[test]
fn send_pushes_back_when_transmit_is_full_and_nothing_is_lost() {
    let cfg = ControlSessionConfig { transmit_bytes_max: 256, ..control_cfg() };
    let mut p = Pair::with(agent_cfg(), cfg, Instant::now(), BTreeMap::new());
    p.connect();
    let mut kept = Vec::new();
    let mut sent = 0u128;
    for n in 0..20u128 {
        match p.control.send(ControlMessage::Assign(assignment(n))) {
            Ok(()) => sent += 1,
            Err(SessionError::Backpressure { queued_bytes, max_bytes, .. }) => {
                assert!(queued_bytes <= max_bytes);
                kept.push(n);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent > 0 && !kept.is_empty(), "sent {sent}, kept {kept:?}");
    assert!(p.control.transmit_room_bytes() < 256);
    // Acks and rejections are never refused, even when full.
    p.control.acknowledge(1);
    p.control.reject(2, "no", false);
    // Drain, then the caller sends what it kept.
    p.drive();
    assert_eq!(p.control.transmit_room_bytes(), 256);
    for n in kept {
        p.control.send(ControlMessage::Assign(assignment(n))).unwrap();
        p.drive();
    }
    let assigned: Vec<u128> = p
        .agent_log
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Assign(a) => Some(a.job_id.as_u128()),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, (0..20).collect::<Vec<_>>());
    assert!(p.agent_log.contains(&AgentEvent::Acked(1)));
}

#[test]
fn send_outbox_pushes_back_when_transmit_is_full() {
    let cfg = AgentSessionConfig { transmit_bytes_max: 200, ..agent_cfg() };
    let mut p = Pair::with(cfg, control_cfg(), Instant::now(), outbox_of(30));
    p.connect();
    let first = p.fill_window();
    assert!(first > 0 && first < 30, "{first}");
    assert!(matches!(p.agent.send_outbox(first as u64 + 1, progress(1)), Err(SessionError::Backpressure { .. })));
    let mut got = Vec::new();
    loop {
        p.drive();
        got.extend(p.take_control_seqs());
        if p.fill_window() == 0 {
            break;
        }
    }
    assert_eq!(got, (1..=30).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// Properties

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    DeliverToAgent(usize),
    DeliverToControl(usize),
    Transmit,
    Accept,
    Push,
    Fill,
    AckAll,
    Heartbeat,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..40_000).prop_map(Op::Advance),
        (0usize..200).prop_map(Op::DeliverToAgent),
        (0usize..200).prop_map(Op::DeliverToControl),
        Just(Op::Transmit),
        Just(Op::Accept),
        Just(Op::Push),
        Just(Op::Fill),
        Just(Op::AckAll),
        Just(Op::Heartbeat),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Timers: `handle_timeout` before `poll_timeout` does nothing, and after `handle_timeout(now)`
    /// the next timeout is later than `now` (a driver never spins), whatever happens on the link.
    #[test]
    fn poll_timeout_moves_past_every_handled_instant(ops in prop::collection::vec(op(), 1..60)) {
        let mut p = Pair::new();
        let mut next_seq = 1u64;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    let until = p.now + Duration::from_millis(ms);
                    // Just before its deadline a side does nothing.
                    if let Some(t) = p.agent.poll_timeout().filter(|t| *t > p.now + MS && *t <= until) {
                        p.agent.handle_timeout(t - MS);
                        prop_assert_eq!(p.agent.poll_event(), None);
                    }
                    if let Some(t) = p.control.poll_timeout().filter(|t| *t > p.now + MS && *t <= until) {
                        p.control.handle_timeout(t - MS);
                        prop_assert_eq!(p.control.poll_event(), None);
                    }
                    p.now = until;
                    p.agent.handle_timeout(p.now);
                    p.control.handle_timeout(p.now);
                    prop_assert!(p.agent.poll_timeout().is_none_or(|t| t > p.now));
                    prop_assert!(p.control.poll_timeout().is_none_or(|t| t > p.now));
                    p.agent_log.extend(agent_events(&mut p.agent));
                    p.control_log.extend(control_events(&mut p.control));
                }
                Op::DeliverToAgent(n) => p.deliver_to_agent(n),
                Op::DeliverToControl(n) => p.deliver_to_control(n),
                Op::Transmit => p.transmit(),
                Op::Accept => { let _ = p.control.accept(); }
                Op::Push => { p.outbox.insert(next_seq, progress(next_seq)); next_seq += 1; }
                Op::Fill => { p.fill_window(); }
                Op::AckAll => {
                    for ev in std::mem::take(&mut p.control_log) {
                        if let ControlEvent::Message(e) = ev { p.control.acknowledge(e.seq); }
                    }
                }
                Op::Heartbeat => p.agent.send_heartbeat(health(), p.now),
            }
        }
    }

    /// The byte stream cut into arbitrary reads gives the same events as one read, both ways.
    #[test]
    fn any_chunking_gives_identical_events(
        assigns in prop::collection::vec((any::<u128>(), any::<bool>(), any::<u64>()), 0..12),
        cuts in prop::collection::vec(1usize..90, 1..40),
    ) {
        let t0 = Instant::now();
        // Control → agent: Welcome then a mix of Assign, Cancel and Ack.
        let mut wire = welcome();
        for (n, cancel, seq) in &assigns {
            let msg = if *cancel {
                ControlMessage::Cancel { job_id: Uuid::from_u128(*n), reason: format!("r{seq}") }
            } else if seq % 3 == 0 {
                ControlMessage::Ack { seq: *seq }
            } else {
                ControlMessage::Assign(assignment(*n))
            };
            wire.extend(frame(&msg));
        }
        let whole = {
            let mut a = AgentSession::new(agent_cfg(), t0);
            a.handle_input(&wire, t0);
            agent_events(&mut a)
        };
        let chunked = {
            let mut a = AgentSession::new(agent_cfg(), t0);
            let mut rest = wire.as_slice();
            let mut evs = Vec::new();
            for c in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let (now, later) = rest.split_at((*c).min(rest.len()));
                a.handle_input(now, t0);
                evs.extend(agent_events(&mut a));
                rest = later;
            }
            evs
        };
        prop_assert_eq!(&chunked, &whole);
        prop_assert_eq!(whole.len(), 1 + assigns.iter().filter(|(_, c, s)| *c || s % 3 != 0 || *s > 0).count());

        // Agent → control: after the accept, outbox entries and heartbeats.
        let mut wire = Vec::new();
        for (i, (_, beat, _)) in assigns.iter().enumerate() {
            wire.extend(if *beat { env(0, AgentMessage::Heartbeat(health())) } else { env(i as u64 + 1, progress(i as u64)) });
        }
        let run = |chunks: &[usize]| {
            let mut c = control_up(t0);
            let mut rest = wire.as_slice();
            let mut evs = Vec::new();
            for n in chunks.iter().cycle() {
                if rest.is_empty() { break; }
                let (now, later) = rest.split_at((*n).min(rest.len()));
                c.handle_input(now, t0);
                evs.extend(control_events(&mut c));
                rest = later;
            }
            (evs, decode_control(&drain_transmit_control(&mut c)))
        };
        let (whole, whole_tx) = run(&[usize::MAX]);
        let (chunked, chunked_tx) = run(&cuts);
        prop_assert_eq!(&chunked, &whole);
        prop_assert_eq!(chunked_tx, whole_tx);
        prop_assert_eq!(whole.len(), assigns.len());
        let closed = whole.iter().any(|e| matches!(e, ControlEvent::Closed { .. }));
        prop_assert!(!closed, "closed: {:?}", whole);
    }
}

#[test]
fn control_payload_round_trips_through_the_session() {
    // Sanity for the helpers above: what the control session writes is what the codec reads.
    let mut c = control_up(Instant::now());
    c.send(ControlMessage::Assign(assignment(3))).unwrap();
    let bytes = drain_transmit_control(&mut c);
    let back: ControlMessage = decode_payload(&bytes[4..]).unwrap();
    assert_eq!(back, ControlMessage::Assign(assignment(3)));
}

/// Online renewal end to end through both sessions: the agent's CSR arrives as a
/// `CertificateRequest` event (sequence 0, never acknowledged), and the control plane's
/// `Certificate`, `TrustBundle` and `RenewCertificate` reach the agent as events. (Issue 8: the
/// control session refused to send them, so renewals were signed and never delivered.)
#[test]
fn certificate_messages_cross_both_sessions() {
    let now = Instant::now();
    let mut c = control_up(now);
    let mut a = agent_up(now);
    a.send_certificate_request("-----BEGIN CERTIFICATE REQUEST-----".into()).unwrap();
    c.handle_input(&drain_transmit_agent(&mut a), now);
    assert!(
        matches!(control_events(&mut c).as_slice(), [ControlEvent::CertificateRequest { csr_pem }] if csr_pem.starts_with("-----BEGIN")),
    );
    assert!(drain_transmit_control(&mut c).is_empty(), "a certificate request is not acknowledged");
    for msg in [
        ControlMessage::TrustBundle { ca_pems: vec!["ca-1".into(), "ca-2".into()] },
        ControlMessage::Certificate { cert_pem: "cert".into(), ca_pems: vec!["ca-1".into()] },
        ControlMessage::CertificateRefused { reason: "busy".into() },
        ControlMessage::RenewCertificate { reason: "CA rotation: update-clients".into() },
    ] {
        c.send(msg).unwrap();
    }
    a.handle_input(&drain_transmit_control(&mut c), now);
    let events = agent_events(&mut a);
    assert!(
        matches!(
            events.as_slice(),
            [
                AgentEvent::TrustBundle { ca_pems },
                AgentEvent::Certificate { cert_pem, .. },
                AgentEvent::CertificateRefused { .. },
                AgentEvent::RenewCertificate { .. },
            ] if ca_pems.len() == 2 && cert_pem == "cert"
        ),
        "{events:?}"
    );
    assert!(a.is_up() && c.is_up());
}

/// An agent that agreed protocol 2 is never sent a certificate message (it could not decode one).
#[test]
fn certificate_messages_are_not_sent_to_a_protocol_2_agent() {
    let now = Instant::now();
    let mut c = ControlSession::new(control_cfg(), now);
    c.handle_input(&env(0, hello_with(VersionRange { min: 2, max: 2 })), now);
    assert!(matches!(control_events(&mut c).as_slice(), [ControlEvent::Hello { protocol_version: 2, .. }]));
    c.accept().unwrap();
    drain_transmit_control(&mut c);
    assert!(c.send(ControlMessage::TrustBundle { ca_pems: vec!["ca".into()] }).is_err());
    assert!(c.send(ControlMessage::Assign(assignment(1))).is_ok());
}

/// Protocol 4: the control plane's release key reaches a protocol-4 agent as an event; a
/// protocol-3 agent (which could not decode the message) is never sent one.
#[test]
fn the_release_key_reaches_protocol_4_agents_only() {
    let now = Instant::now();
    let mut c = control_up(now);
    assert_eq!(c.protocol_version(), Some(PROTOCOL_VERSION));
    let mut a = agent_up(now);
    c.send(ControlMessage::ReleaseKey { public_key: [9; 32] }).unwrap();
    a.handle_input(&drain_transmit_control(&mut c), now);
    assert_eq!(agent_events(&mut a), vec![AgentEvent::ReleaseKey { public_key: [9; 32] }]);
    assert!(a.is_up());

    let mut c3 = ControlSession::new(control_cfg(), now);
    c3.handle_input(&env(0, hello_with(VersionRange { min: 2, max: 3 })), now);
    assert!(matches!(control_events(&mut c3).as_slice(), [ControlEvent::Hello { protocol_version: 3, .. }]));
    c3.accept().unwrap();
    drain_transmit_control(&mut c3);
    assert!(matches!(c3.send(ControlMessage::ReleaseKey { public_key: [9; 32] }), Err(SessionError::NotAllowed(_))));
    assert!(drain_transmit_control(&mut c3).is_empty(), "nothing was queued for the protocol-3 agent");
    assert!(c3.send(ControlMessage::TrustBundle { ca_pems: vec!["ca".into()] }).is_ok());
}

/// Update orders (protocol 5) reach agents that agreed 5, arrive as events in order, and are
/// refused for a protocol-4 agent without anything being queued.
#[test]
fn update_orders_reach_protocol_5_agents_only() {
    use gaffer_protocol::messages::UpdateOrder;
    let now = Instant::now();
    let mut c = control_up(now);
    let mut a = agent_up(now);
    let order = UpdateOrder {
        rollout_id: 3,
        version: "9.1.0".into(),
        file_name: "gaffer-agent-9.1.0-x86_64-linux.tar.gz".into(),
        size_bytes: 1234,
        sha256: "ab".repeat(32),
        health_wait_secs: 600,
    };
    c.send(ControlMessage::Update(order.clone())).unwrap();
    c.send(ControlMessage::UpdateWithdrawn { rollout_id: 3, reason: "halted".into() }).unwrap();
    a.handle_input(&drain_transmit_control(&mut c), now);
    assert_eq!(
        agent_events(&mut a),
        vec![AgentEvent::Update(order.clone()), AgentEvent::UpdateWithdrawn { rollout_id: 3, reason: "halted".into() }]
    );
    assert!(a.is_up());

    let mut c4 = ControlSession::new(control_cfg(), now);
    c4.handle_input(&env(0, hello_with(VersionRange { min: 2, max: 4 })), now);
    assert!(matches!(control_events(&mut c4).as_slice(), [ControlEvent::Hello { protocol_version: 4, .. }]));
    c4.accept().unwrap();
    drain_transmit_control(&mut c4);
    assert!(matches!(c4.send(ControlMessage::Update(order)), Err(SessionError::NotAllowed(_))));
    assert!(drain_transmit_control(&mut c4).is_empty(), "nothing was queued for the protocol-4 agent");
    assert!(c4.send(ControlMessage::ReleaseKey { public_key: [9; 32] }).is_ok());
}

/// A release key before the Welcome is a protocol violation, like every other message.
#[test]
fn a_release_key_before_the_welcome_closes_the_agent() {
    let now = Instant::now();
    let mut a = AgentSession::new(agent_cfg(), now);
    drain_transmit_agent(&mut a);
    a.handle_input(&frame(&ControlMessage::ReleaseKey { public_key: [1; 32] }), now);
    assert!(matches!(
        agent_events(&mut a).as_slice(),
        [AgentEvent::Closed { reason: CloseReason::ProtocolViolation(_) }]
    ));
}

fn custody(seq: u64) -> AgentMessage {
    AgentMessage::Custody {
        job_id: Uuid::from_u128(u128::from(seq)),
        lease_id: 1,
        sha256: "ab".repeat(32),
        size_bytes: 1024,
        modified_unix_secs: Some(1_700_000_000),
    }
}

fn xid_counts() -> AgentMessage {
    AgentMessage::GpuXidErrors {
        counts: vec![
            gaffer_protocol::health::GpuXidCount { index: 0, errors: 0, last_xid: None },
            gaffer_protocol::health::GpuXidCount { index: 1, errors: 2, last_xid: Some(79) },
        ],
    }
}

/// The protocol-6 messages (custody, GPU XID counts) reach a control plane that agreed 6; over a link
/// that agreed 5 they are never put on the wire (a protocol-5 control plane could not decode them),
/// their sequence number counts as sent (so the outbox window moves past it), and later entries
/// still go out.
#[test]
fn protocol_6_messages_are_sent_only_to_a_peer_that_agreed_their_version() {
    for msg in [custody(1), xid_counts()] {
        let now = Instant::now();
        let mut a = agent_up(now);
        a.send_outbox(1, msg.clone()).unwrap();
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        dec.push(&drain_transmit_agent(&mut a));
        let sent: Vec<AgentEnvelope> = std::iter::from_fn(|| dec.next_message::<AgentEnvelope>().unwrap()).collect();
        assert_eq!(sent.len(), 1, "{}", msg.kind());
        assert_eq!((sent[0].seq, &sent[0].body), (1, &msg));

        let mut old = AgentSession::new(agent_cfg(), now);
        drain_transmit_agent(&mut old);
        old.handle_input(
            &frame(&ControlMessage::Welcome {
                protocol_version: gaffer_protocol::UPDATE_PROTOCOL_VERSION,
                server_version: "0.1.0".into(),
                heartbeat_interval_secs: INTERVAL_SECS,
            }),
            now,
        );
        assert!(matches!(agent_events(&mut old).as_slice(), [AgentEvent::Welcomed { protocol_version: 5, .. }]));
        let err = old.send_outbox(1, msg.clone()).unwrap_err();
        assert!(matches!(err, SessionError::PeerTooOld { seq: 1, needed: 6, agreed: 5 }), "{}: {err}", msg.kind());
        assert!(drain_transmit_agent(&mut old).is_empty(), "{}: nothing on the wire", msg.kind());
        assert_eq!(old.outbox_window().map(|w| w.0), Some(1), "the window moved past the dropped entry");
        assert_eq!(old.inflight_len(), 0);
        old.send_outbox(2, AgentMessage::JobAccepted { job_id: Uuid::from_u128(2), lease_id: 1 }).unwrap();
        assert!(!drain_transmit_agent(&mut old).is_empty(), "later entries still go out");
    }
}
