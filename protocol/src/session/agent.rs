//! The agent's end of the link.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::{
    encode_own, liveness_window, CloseReason, SessionError, TransmitQueue, AGENT_HEARTBEAT_MISSES_MAX_DEFAULT,
    INFLIGHT_MAX_DEFAULT, TRANSMIT_BYTES_MAX_DEFAULT, WELCOME_TIMEOUT_DEFAULT,
};
use crate::codec::{encode_frame, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use crate::health::Health;
use crate::messages::{AgentEnvelope, AgentId, AgentMessage, Assignment, Capabilities, ControlMessage, HeldJob, JobId};
use crate::version::{VersionRange, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

/// Settings of one [`AgentSession`] (one connection).
#[derive(Debug, Clone)]
pub struct AgentSessionConfig {
    /// This agent (its certificate's id); stamped on every envelope. Default: the nil UUID.
    pub agent_id: AgentId,
    /// The agent's build version, sent in the Hello. Default: empty.
    pub agent_version: String,
    /// The agent's host name, sent in the Hello. Default: empty.
    pub hostname: String,
    /// What the agent can do, sent in the Hello. Default: nothing (no GPUs, volumes, profiles,
    /// models; 0 slots).
    pub capabilities: Capabilities,
    /// Jobs the agent holds (queued or running) with their leases, sent in the Hello. Default:
    /// none.
    pub running_jobs: Vec<HeldJob>,
    /// How long to wait for the Welcome after the Hello. Default 10 s.
    pub welcome_timeout: Duration,
    /// After the Welcome, the session closes with [`CloseReason::HeartbeatTimeout`] when nothing at
    /// all was received for this many heartbeat intervals. Default 6.
    pub heartbeat_misses_max: u32,
    /// Largest frame payload accepted from the control plane or sent to it, bytes. Default
    /// [`FRAME_BYTES_MAX_DEFAULT`] (8 MiB).
    pub frame_bytes_max: usize,
    /// Outbox entries sent on this connection and not yet acknowledged, at most. Default 256.
    pub inflight_max: usize,
    /// Bound on queued-but-unpolled outgoing bytes for [`AgentSession::send_outbox`], bytes.
    /// Default 1 MiB.
    pub transmit_bytes_max: usize,
}

impl Default for AgentSessionConfig {
    fn default() -> Self {
        Self {
            agent_id: AgentId::nil(),
            agent_version: String::new(),
            hostname: String::new(),
            capabilities: Capabilities {
                gpus: Vec::new(),
                volumes: Vec::new(),
                watch_roots: Vec::new(),
                job_slots: 0,
                profiles: Vec::new(),
                models: Vec::new(),
            },
            running_jobs: Vec::new(),
            welcome_timeout: WELCOME_TIMEOUT_DEFAULT,
            heartbeat_misses_max: AGENT_HEARTBEAT_MISSES_MAX_DEFAULT,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            inflight_max: INFLIGHT_MAX_DEFAULT,
            transmit_bytes_max: TRANSMIT_BYTES_MAX_DEFAULT,
        }
    }
}

/// What happened on the link, for the agent's driver.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The control plane accepted the Hello; the link is up and the outbox window is open.
    Welcomed {
        /// The negotiated protocol version.
        protocol_version: u16,
        /// The control plane's build version.
        server_version: String,
        /// Heartbeat interval asked for, seconds (as sent; the session treats 0 as 1).
        heartbeat_interval_secs: u32,
    },
    /// Run this job.
    Assign(Assignment),
    /// Stop this job.
    Cancel {
        /// The job.
        job_id: JobId,
        /// Why, for the log.
        reason: String,
    },
    /// The outbox entry `seq` is durable at the control plane: delete it (idempotently; acks for
    /// entries not sent on this connection are reported too).
    Acked(u64),
    /// The control plane will never accept the outbox entry `seq` (nothing was applied): log the
    /// message and drop the entry.
    Rejected {
        /// The entry.
        seq: u64,
        /// The control plane's reason.
        message: String,
    },
    /// The control plane could not store the outbox entry `seq`: keep it. The session closes at
    /// the end of this input ([`CloseReason::RetryLater`]); reconnect with backoff and the outbox
    /// resends it.
    RetryLater {
        /// The entry.
        seq: u64,
        /// The control plane's reason.
        message: String,
    },
    /// Time for a heartbeat: sample health and call [`AgentSession::send_heartbeat`].
    HeartbeatDue,
    /// The new certificate asked for with [`AgentSession::send_certificate_request`], and the CAs to
    /// trust from now on.
    Certificate {
        /// The certificate, PEM.
        cert_pem: String,
        /// CA certificates, PEM, one per entry.
        ca_pems: Vec<String>,
    },
    /// The control plane would not sign the CSR: keep the current certificate, ask again later.
    CertificateRefused {
        /// Why.
        reason: String,
    },
    /// The CAs to trust for the control plane's certificate from now on (replaces the set).
    TrustBundle {
        /// CA certificates, PEM, one per entry.
        ca_pems: Vec<String>,
    },
    /// The control plane asks for a certificate renewal now (a CA rotation).
    RenewCertificate {
        /// Why, for the log.
        reason: String,
    },
    /// The control plane's release public key (protocol 4): pin it if no key is pinned yet;
    /// refuse it, loudly, if another one is.
    ReleaseKey {
        /// The 32 bytes of the Ed25519 public key.
        public_key: [u8; 32],
    },
    /// Update to this release (protocol 5).
    Update(crate::messages::UpdateOrder),
    /// Drop the update order of this rollout unless it is applied already (protocol 5).
    UpdateWithdrawn {
        /// The rollout.
        rollout_id: u64,
        /// Why, for the log.
        reason: String,
    },
    /// The session is over; write what `poll_transmit` still gives, then close the connection.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

#[derive(Debug)]
enum State {
    AwaitingWelcome { deadline: Option<Instant> },
    Up { interval: Duration, interval_secs: u32, next_heartbeat: Option<Instant>, protocol_version: u16 },
    Closed,
}

/// The agent's end of one connection (sans-IO). See the [module docs](super).
///
/// A fresh session's outbox window starts at sequence 0, so after a reconnect every entry the
/// outbox still holds (everything unacknowledged) is sent again, in order.
#[derive(Debug)]
pub struct AgentSession {
    cfg: AgentSessionConfig,
    state: State,
    decoder: FrameDecoder,
    events: VecDeque<AgentEvent>,
    transmit: TransmitQueue,
    last_rx: Instant,
    /// Outbox entries sent on this connection and not yet acknowledged or rejected.
    inflight: BTreeSet<u64>,
    /// Highest outbox sequence number sent on this connection (0: none).
    last_sent: u64,
    /// Set by `Error { retry: true }`: the session closes once the current input is handled.
    retry_later: Option<String>,
}

impl AgentSession {
    /// A session for a freshly opened stream: queues the Hello; the Welcome timeout starts at `now`.
    pub fn new(cfg: AgentSessionConfig, now: Instant) -> Self {
        let mut transmit = TransmitQueue::new(cfg.transmit_bytes_max);
        let hello = AgentEnvelope {
            agent_id: cfg.agent_id,
            seq: 0,
            body: AgentMessage::Hello {
                versions: VersionRange::ours(),
                agent_version: cfg.agent_version.clone(),
                hostname: cfg.hostname.clone(),
                capabilities: cfg.capabilities.clone(),
                running_jobs: cfg.running_jobs.clone(),
            },
        };
        let mut events = VecDeque::new();
        let mut state = State::AwaitingWelcome { deadline: now.checked_add(cfg.welcome_timeout) };
        match encode_frame(&hello, cfg.frame_bytes_max) {
            Ok(frame) => transmit.push_unbounded(frame),
            Err(e) => {
                // Capabilities too large to frame: nothing can work; say so at once.
                events.push_back(AgentEvent::Closed { reason: CloseReason::Codec(format!("hello: {e}")) });
                state = State::Closed;
            }
        }
        Self {
            decoder: FrameDecoder::new(cfg.frame_bytes_max),
            state,
            events,
            transmit,
            last_rx: now,
            inflight: BTreeSet::new(),
            last_sent: 0,
            retry_later: None,
            cfg,
        }
    }

    /// Feeds bytes read from the stream. Every complete frame among them is decoded and turned
    /// into state changes and events before this returns (a Welcome and an Assign in one read
    /// give `Welcomed` and `Assign`). Errors end the session with an [`AgentEvent::Closed`].
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || self.is_closed() {
            return;
        }
        self.last_rx = now;
        self.decoder.push(bytes);
        while !self.is_closed() {
            match self.decoder.next_message::<ControlMessage>() {
                Ok(Some(msg)) => {
                    self.on_message(msg, now);
                    if super::PLANTED_BUG_NO_DECODER_DRAIN {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => self.close(CloseReason::Codec(e.to_string())),
            }
        }
        if let Some(text) = self.retry_later.take() {
            self.close(CloseReason::RetryLater(text));
        }
    }

    /// The control plane finished its stream.
    pub fn handle_end_of_stream(&mut self, _now: Instant) {
        if self.is_closed() {
            return;
        }
        match self.decoder.finish() {
            Ok(()) => self.close(CloseReason::PeerFinished),
            Err(e) => self.close(CloseReason::Codec(e.to_string())),
        }
    }

    /// Call when `poll_timeout`'s instant has passed. Afterwards `poll_timeout` is `None` or
    /// later than `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitingWelcome { deadline: Some(deadline) } if deadline <= now => {
                self.close(CloseReason::WelcomeTimeout);
            }
            State::Up { interval, next_heartbeat, .. } => {
                if self.liveness_deadline().is_some_and(|d| d <= now) {
                    self.close(CloseReason::HeartbeatTimeout);
                } else if next_heartbeat.is_some_and(|t| t <= now) {
                    // Re-armed here too, so a driver that could not send one is asked again.
                    self.set_next_heartbeat(now.checked_add(interval));
                    self.events.push_back(AgentEvent::HeartbeatDue);
                }
            }
            _ => {}
        }
    }

    /// The next instant at which [`AgentSession::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingWelcome { deadline } => deadline,
            State::Up { next_heartbeat, .. } => match (next_heartbeat, self.liveness_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            State::Closed => None,
        }
    }

    /// The next event, oldest first. Drain it completely after every input, timeout and call.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// Encoded bytes to write to the stream (one or more whole frames, coalesced up to
    /// [`super::TRANSMIT_CHUNK_BYTES`]), in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.poll()
    }

    /// Which outbox entries to send next: those with a sequence number above `.0`, at most `.1` of
    /// them. `None` until welcomed, once closed or closing, and while `inflight_max` entries are
    /// unacknowledged. [`AgentSession::send_outbox`] can still push back when the transmit queue
    /// is full.
    pub fn outbox_window(&self) -> Option<(u64, usize)> {
        if !self.is_up() || self.retry_later.is_some() {
            return None;
        }
        let room = self.cfg.inflight_max.saturating_sub(self.inflight.len());
        (room > 0).then_some((self.last_sent, room))
    }

    /// Queues outbox entry `seq` (sequence numbers must increase on a session).
    ///
    /// # Errors
    /// [`SessionError::Backpressure`] when the transmit queue is full (nothing queued; send it
    /// again after writing what `poll_transmit` gives), [`SessionError::WindowFull`],
    /// [`SessionError::OutOfOrder`], [`SessionError::NotUp`], [`SessionError::Closed`],
    /// [`SessionError::NotAllowed`] for Hello and Heartbeat (the session sends those),
    /// [`SessionError::Codec`] when the entry exceeds `frame_bytes_max`, [`SessionError::PeerTooOld`] for a
    /// message the agreed protocol version does not have (the entry counts as sent; drop it).
    pub fn send_outbox(&mut self, seq: u64, msg: AgentMessage) -> Result<(), SessionError> {
        let agreed = match self.state {
            State::Up { protocol_version, .. } => protocol_version,
            State::Closed => return Err(SessionError::Closed),
            State::AwaitingWelcome { .. } => return Err(SessionError::NotUp),
        };
        if matches!(msg, AgentMessage::Hello { .. } | AgentMessage::Heartbeat(_)) {
            return Err(SessionError::NotAllowed("the session sends Hello and heartbeats itself"));
        }
        if seq <= self.last_sent {
            return Err(SessionError::OutOfOrder { seq, last: self.last_sent });
        }
        if self.inflight.len() >= self.cfg.inflight_max {
            return Err(SessionError::WindowFull { inflight_max: self.cfg.inflight_max });
        }
        let needed = match msg {
            AgentMessage::Custody { .. } => crate::version::CUSTODY_PROTOCOL_VERSION,
            AgentMessage::GpuXidErrors { .. } => crate::version::XID_PROTOCOL_VERSION,
            _ => PROTOCOL_VERSION_MIN,
        };
        if agreed < needed {
            self.last_sent = seq;
            return Err(SessionError::PeerTooOld { seq, needed, agreed });
        }
        let frame =
            encode_frame(&AgentEnvelope { agent_id: self.cfg.agent_id, seq, body: msg }, self.cfg.frame_bytes_max)?;
        self.transmit.push_bounded(frame)?;
        self.inflight.insert(seq);
        self.last_sent = seq;
        Ok(())
    }

    /// Queues a heartbeat (sequence 0) and schedules the next `HeartbeatDue` one interval after
    /// `now`. Ignored unless up (a heartbeat is not kept anywhere). Never refused by the transmit
    /// bound (one per interval).
    pub fn send_heartbeat(&mut self, health: Health, now: Instant) {
        let State::Up { interval, .. } = self.state else { return };
        let env = AgentEnvelope { agent_id: self.cfg.agent_id, seq: 0, body: AgentMessage::Heartbeat(health) };
        if let Some(frame) = encode_own(&env, self.cfg.frame_bytes_max) {
            self.transmit.push_unbounded(frame);
        }
        self.set_next_heartbeat(now.checked_add(interval));
    }

    /// Queues a certificate request (sequence 0; protocol 3) for a key the agent just generated.
    /// Ignored unless up. Never refused by the transmit bound (rare and small).
    ///
    /// # Errors
    /// [`SessionError::NotUp`] before the Welcome or after the close; [`SessionError::Codec`] when the
    /// CSR exceeds `frame_bytes_max`.
    pub fn send_certificate_request(&mut self, csr_pem: String) -> Result<(), SessionError> {
        if !self.is_up() {
            return Err(SessionError::NotUp);
        }
        let env =
            AgentEnvelope { agent_id: self.cfg.agent_id, seq: 0, body: AgentMessage::CertificateRequest { csr_pem } };
        let frame = encode_frame(&env, self.cfg.frame_bytes_max)?;
        self.transmit.push_unbounded(frame);
        Ok(())
    }

    /// Outbox entries sent on this connection and not yet acknowledged.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Bytes [`AgentSession::send_outbox`] may still queue before it pushes back.
    pub fn transmit_room_bytes(&self) -> usize {
        self.transmit.room()
    }

    /// Whether the Welcome arrived and the session is not closed.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Whether the session is over (a `Closed` event is queued or was polled).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    fn set_next_heartbeat(&mut self, at: Option<Instant>) {
        if let State::Up { next_heartbeat, .. } = &mut self.state {
            *next_heartbeat = at;
        }
    }

    fn liveness_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Up { interval_secs, .. } => {
                self.last_rx.checked_add(liveness_window(interval_secs, self.cfg.heartbeat_misses_max))
            }
            _ => None,
        }
    }

    fn on_message(&mut self, msg: ControlMessage, now: Instant) {
        match (&self.state, msg) {
            (State::Closed, _) => {}
            (_, ControlMessage::Refused { reason }) => self.close(CloseReason::Refused(reason)),
            (
                State::AwaitingWelcome { .. },
                ControlMessage::Welcome { protocol_version, server_version, heartbeat_interval_secs },
            ) => {
                if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&protocol_version) {
                    self.close(CloseReason::VersionMismatch(format!(
                        "the control plane chose protocol {protocol_version}, this agent speaks \
                         {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}"
                    )));
                    return;
                }
                let interval_secs = heartbeat_interval_secs.max(1);
                let interval = Duration::from_secs(u64::from(interval_secs));
                self.state =
                    State::Up { interval, interval_secs, next_heartbeat: now.checked_add(interval), protocol_version };
                self.events.push_back(AgentEvent::Welcomed {
                    protocol_version,
                    server_version,
                    heartbeat_interval_secs,
                });
            }
            (State::AwaitingWelcome { .. }, other) => {
                self.close(CloseReason::ProtocolViolation(format!("expected Welcome, got {}", kind(&other))));
            }
            (State::Up { .. }, ControlMessage::Welcome { .. }) => {
                self.close(CloseReason::ProtocolViolation("a second Welcome".into()));
            }
            (State::Up { .. }, ControlMessage::Assign(a)) => self.events.push_back(AgentEvent::Assign(a)),
            (State::Up { .. }, ControlMessage::Cancel { job_id, reason }) => {
                self.events.push_back(AgentEvent::Cancel { job_id, reason });
            }
            (State::Up { .. }, ControlMessage::Certificate { cert_pem, ca_pems }) => {
                self.events.push_back(AgentEvent::Certificate { cert_pem, ca_pems });
            }
            (State::Up { .. }, ControlMessage::CertificateRefused { reason }) => {
                self.events.push_back(AgentEvent::CertificateRefused { reason });
            }
            (State::Up { .. }, ControlMessage::TrustBundle { ca_pems }) => {
                self.events.push_back(AgentEvent::TrustBundle { ca_pems });
            }
            (State::Up { .. }, ControlMessage::RenewCertificate { reason }) => {
                self.events.push_back(AgentEvent::RenewCertificate { reason });
            }
            (State::Up { .. }, ControlMessage::ReleaseKey { public_key }) => {
                self.events.push_back(AgentEvent::ReleaseKey { public_key });
            }
            (State::Up { .. }, ControlMessage::Update(order)) => self.events.push_back(AgentEvent::Update(order)),
            (State::Up { .. }, ControlMessage::UpdateWithdrawn { rollout_id, reason }) => {
                self.events.push_back(AgentEvent::UpdateWithdrawn { rollout_id, reason });
            }
            // The heartbeat answer: liveness only (already counted as received bytes).
            (State::Up { .. }, ControlMessage::Ack { seq: 0 }) => {}
            (State::Up { .. }, ControlMessage::Ack { seq }) => {
                self.inflight.remove(&seq);
                self.events.push_back(AgentEvent::Acked(seq));
            }
            (State::Up { .. }, ControlMessage::Error { seq, message, retry: false }) => {
                self.inflight.remove(&seq);
                self.events.push_back(AgentEvent::Rejected { seq, message });
            }
            (State::Up { .. }, ControlMessage::Error { seq, message, retry: true }) => {
                if self.retry_later.is_none() {
                    self.retry_later = Some(format!("the control plane could not store message {seq}: {message}"));
                }
                self.events.push_back(AgentEvent::RetryLater { seq, message });
            }
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed;
        self.retry_later = None;
        self.events.push_back(AgentEvent::Closed { reason });
    }
}

fn kind(msg: &ControlMessage) -> &'static str {
    msg.kind()
}
