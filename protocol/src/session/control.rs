//! The control plane's end of the agent link.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{
    encode_own, liveness_window, truncate_reason, CloseReason, SessionError, TransmitQueue,
    CONTROL_HEARTBEAT_MISSES_MAX_DEFAULT, HEARTBEAT_INTERVAL_SECS_DEFAULT, HELLO_TIMEOUT_DEFAULT,
    TRANSMIT_BYTES_MAX_DEFAULT,
};
use crate::codec::{encode_frame, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use crate::health::Health;
use crate::messages::{AgentEnvelope, AgentId, AgentMessage, Capabilities, ControlMessage, HeldJob};
use crate::version::{negotiate, VersionRange, RELEASE_KEY_PROTOCOL_VERSION};

/// Settings of one [`ControlSession`].
#[derive(Debug, Clone)]
pub struct ControlSessionConfig {
    /// The agent this connection authenticated as (from the client certificate's URI SAN). Every
    /// envelope must carry it. Default: the nil UUID (set it).
    pub agent_id: AgentId,
    /// The control plane's build version, sent in the Welcome. Default: empty.
    pub server_version: String,
    /// How often the agent is told to send a heartbeat, in seconds (0 counts as 1). Default 5.
    pub heartbeat_interval_secs: u32,
    /// How long to wait for the Hello after the session starts. Default 10 s.
    pub hello_timeout: Duration,
    /// After the Welcome, the session closes with [`CloseReason::HeartbeatTimeout`] when nothing
    /// at all was received for this many heartbeat intervals. Default 3.
    pub heartbeat_misses_max: u32,
    /// Largest frame payload accepted from the agent or sent to it, bytes. Default
    /// [`FRAME_BYTES_MAX_DEFAULT`] (8 MiB).
    pub frame_bytes_max: usize,
    /// Bound on queued-but-unpolled outgoing bytes for [`ControlSession::send`], bytes. Default
    /// 1 MiB.
    pub transmit_bytes_max: usize,
}

impl Default for ControlSessionConfig {
    fn default() -> Self {
        Self {
            agent_id: AgentId::nil(),
            server_version: String::new(),
            heartbeat_interval_secs: HEARTBEAT_INTERVAL_SECS_DEFAULT,
            hello_timeout: HELLO_TIMEOUT_DEFAULT,
            heartbeat_misses_max: CONTROL_HEARTBEAT_MISSES_MAX_DEFAULT,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            transmit_bytes_max: TRANSMIT_BYTES_MAX_DEFAULT,
        }
    }
}

/// What happened on the link, for the control plane's driver.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlEvent {
    /// A Hello whose envelope agent id matched `agent_id` and whose versions negotiated. The
    /// driver calls [`ControlSession::accept`] or [`ControlSession::refuse`].
    Hello {
        /// The negotiated protocol version (sent back in the Welcome).
        protocol_version: u16,
        /// The agent's build version.
        agent_version: String,
        /// The agent's host name.
        hostname: String,
        /// What the agent can do.
        capabilities: Capabilities,
        /// Jobs the agent holds from an earlier connection, with their lease ids.
        running_jobs: Vec<HeldJob>,
    },
    /// A message with `seq > 0` (agent id checked, sequence increasing on this connection). The
    /// driver persists its effect, then calls [`ControlSession::acknowledge`] or
    /// [`ControlSession::reject`].
    Message(AgentEnvelope),
    /// A heartbeat (seq 0, not acknowledged; the session already queued its `Ack { seq: 0 }`).
    Heartbeat(Health),
    /// The agent asks for a new certificate (seq 0, protocol 3): sign `csr_pem` and answer with
    /// [`ControlSession::send`] of `ControlMessage::Certificate` or `ControlMessage::CertificateRefused`.
    CertificateRequest {
        /// The CSR, PEM, as received (the signer checks it).
        csr_pem: String,
    },
    /// The session is over. The driver writes what `poll_transmit` still gives, then closes the
    /// connection with `reason`.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

#[derive(Debug)]
enum State {
    AwaitingHello { deadline: Option<Instant> },
    HelloReceived { protocol_version: u16 },
    Up,
    Closed,
}

/// The control plane's end of one agent connection (sans-IO). See the [module docs](super).
#[derive(Debug)]
pub struct ControlSession {
    cfg: ControlSessionConfig,
    state: State,
    decoder: FrameDecoder,
    events: VecDeque<ControlEvent>,
    transmit: TransmitQueue,
    /// When a byte was last received (the Hello's arrival at least, once up).
    last_rx: Instant,
    /// Highest message sequence number seen on this connection.
    last_seq: u64,
    /// The protocol version agreed in the handshake (None before the Hello).
    protocol_version: Option<u16>,
    /// A `Refused` reason to queue when the `Closed` event is polled, so that acknowledgements
    /// the driver queues for messages decoded before the error still go out before it.
    refuse_on_close: Option<String>,
}

impl ControlSession {
    /// A session for a freshly opened stream; the Hello timeout starts at `now`.
    pub fn new(cfg: ControlSessionConfig, now: Instant) -> Self {
        let deadline = now.checked_add(cfg.hello_timeout);
        Self {
            decoder: FrameDecoder::new(cfg.frame_bytes_max),
            transmit: TransmitQueue::new(cfg.transmit_bytes_max),
            state: State::AwaitingHello { deadline },
            events: VecDeque::new(),
            last_rx: now,
            last_seq: 0,
            protocol_version: None,
            refuse_on_close: None,
            cfg,
        }
    }

    /// Feeds bytes read from the stream. Every complete frame among them is decoded and turned
    /// into state changes and events before this returns. Errors (codec, protocol, version) end
    /// the session with a [`ControlEvent::Closed`], queuing a `Refused` frame telling the agent why.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || self.is_closed() {
            return;
        }
        self.last_rx = now;
        self.decoder.push(bytes);
        while !self.is_closed() {
            match self.decoder.next_message::<AgentEnvelope>() {
                Ok(Some(env)) => {
                    self.on_envelope(env);
                    if super::PLANTED_BUG_NO_DECODER_DRAIN {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let text = e.to_string();
                    self.close(CloseReason::Codec(text.clone()), Some(text));
                }
            }
        }
    }

    /// The agent finished its stream.
    pub fn handle_end_of_stream(&mut self, _now: Instant) {
        if self.is_closed() {
            return;
        }
        match self.decoder.finish() {
            Ok(()) => self.close(CloseReason::PeerFinished, None),
            Err(e) => self.close(CloseReason::Codec(e.to_string()), None),
        }
    }

    /// Call when `poll_timeout`'s instant has passed. Afterwards `poll_timeout` is `None` or
    /// later than `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitingHello { deadline: Some(deadline) } if deadline <= now => {
                let secs = self.cfg.hello_timeout.as_secs_f64();
                self.close(CloseReason::HelloTimeout, Some(format!("no Hello within {secs} s")));
            }
            State::Up if self.liveness_deadline().is_some_and(|d| d <= now) => {
                self.close(CloseReason::HeartbeatTimeout, None);
            }
            _ => {}
        }
    }

    /// The next instant at which [`ControlSession::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingHello { deadline } => deadline,
            State::Up => self.liveness_deadline(),
            State::HelloReceived { .. } | State::Closed => None,
        }
    }

    /// The next event, oldest first. Drain it completely after every input, timeout and call.
    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        let ev = self.events.pop_front()?;
        if matches!(ev, ControlEvent::Closed { .. }) {
            if let Some(reason) = self.refuse_on_close.take() {
                self.queue_refused(&reason);
            }
        }
        Some(ev)
    }

    /// Encoded bytes to write to the stream (one or more whole frames, coalesced up to
    /// [`super::TRANSMIT_CHUNK_BYTES`]), in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.poll()
    }

    /// Accepts the agent after a [`ControlEvent::Hello`]: queues the Welcome; the session is up.
    ///
    /// # Errors
    /// [`SessionError::NotAllowed`] without a pending Hello, [`SessionError::Closed`] when closed.
    pub fn accept(&mut self) -> Result<(), SessionError> {
        let protocol_version = match self.state {
            State::HelloReceived { protocol_version } => protocol_version,
            State::Closed => return Err(SessionError::Closed),
            _ => return Err(SessionError::NotAllowed("accept() answers a Hello event, and only once")),
        };
        let welcome = ControlMessage::Welcome {
            protocol_version,
            server_version: self.cfg.server_version.clone(),
            heartbeat_interval_secs: self.cfg.heartbeat_interval_secs,
        };
        let frame = encode_frame(&welcome, self.cfg.frame_bytes_max)?;
        self.transmit.push_unbounded(frame);
        self.state = State::Up;
        Ok(())
    }

    /// Refuses the agent (after a Hello, or later, e.g. on revocation): queues `Refused { reason }`
    /// and ends the session with [`CloseReason::Refused`]. No-op when already closed.
    pub fn refuse(&mut self, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.queue_refused(reason);
        self.close(CloseReason::Refused(reason.to_owned()), None);
    }

    /// Queues `Ack { seq }`: the message `seq` is durable. Never refused by the transmit bound.
    pub fn acknowledge(&mut self, seq: u64) {
        if let Some(frame) = encode_own(&ControlMessage::Ack { seq }, self.cfg.frame_bytes_max) {
            self.transmit.push_unbounded(frame);
        }
    }

    /// Queues `Error { seq, message, retry }`: the message `seq` was not applied; `retry` says
    /// whether resending may help. Never refused by the transmit bound (the message text is cut to
    /// [`super::REASON_BYTES_MAX`] bytes).
    pub fn reject(&mut self, seq: u64, message: &str, retry: bool) {
        let msg = ControlMessage::Error { seq, message: truncate_reason(message), retry };
        if let Some(frame) = encode_own(&msg, self.cfg.frame_bytes_max) {
            self.transmit.push_unbounded(frame);
        }
    }

    /// Queues an `Assign`, `Cancel`, certificate message, `ReleaseKey`, `Update` or
    /// `UpdateWithdrawn` for the agent.
    ///
    /// # Errors
    /// [`SessionError::Backpressure`] when queuing it would pass `transmit_bytes_max` (nothing
    /// queued: the caller keeps the message and retries after writing what `poll_transmit`
    /// gives); [`SessionError::NotUp`] before `accept`; [`SessionError::Closed`];
    /// [`SessionError::NotAllowed`] for other message kinds, for the certificate messages
    /// (`Certificate`, `CertificateRefused`, `TrustBundle`, `RenewCertificate`) to an agent that
    /// agreed protocol 2, for `ReleaseKey` to one that agreed less than 4, and for `Update` and
    /// `UpdateWithdrawn` to one that agreed less than 5;
    /// [`SessionError::Codec`] when the message exceeds `frame_bytes_max`.
    pub fn send(&mut self, msg: ControlMessage) -> Result<(), SessionError> {
        match self.state {
            State::Up => {}
            State::Closed => return Err(SessionError::Closed),
            _ => return Err(SessionError::NotUp),
        }
        match msg {
            ControlMessage::Assign(_) | ControlMessage::Cancel { .. } => {}
            ControlMessage::Certificate { .. }
            | ControlMessage::CertificateRefused { .. }
            | ControlMessage::TrustBundle { .. }
            | ControlMessage::RenewCertificate { .. } => {
                if self.protocol_version.is_none_or(|v| v < 3) {
                    return Err(SessionError::NotAllowed("certificate messages need protocol 3"));
                }
            }
            ControlMessage::ReleaseKey { .. } => {
                if self.protocol_version.is_none_or(|v| v < RELEASE_KEY_PROTOCOL_VERSION) {
                    return Err(SessionError::NotAllowed("the release key needs protocol 4"));
                }
            }
            ControlMessage::Update(_) | ControlMessage::UpdateWithdrawn { .. } => {
                if self.protocol_version.is_none_or(|v| v < crate::version::UPDATE_PROTOCOL_VERSION) {
                    return Err(SessionError::NotAllowed("update orders need protocol 5"));
                }
            }
            _ => {
                return Err(SessionError::NotAllowed(
                    "send() carries Assign, Cancel, the certificate messages, ReleaseKey and the update orders; use \
                 accept, refuse, acknowledge or reject",
                ))
            }
        }
        let frame = encode_frame(&msg, self.cfg.frame_bytes_max)?;
        self.transmit.push_bounded(frame)
    }

    /// Bytes [`ControlSession::send`] may still queue before it pushes back.
    pub fn transmit_room_bytes(&self) -> usize {
        self.transmit.room()
    }

    /// The protocol version agreed with the agent (None until its Hello arrived). Messages of a
    /// later protocol than this must not be sent to the agent.
    pub fn protocol_version(&self) -> Option<u16> {
        self.protocol_version
    }

    /// Whether the agent was accepted and the session is not closed.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up)
    }

    /// Whether the session is over (a `Closed` event is queued or was polled).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    fn liveness_deadline(&self) -> Option<Instant> {
        self.last_rx.checked_add(liveness_window(self.cfg.heartbeat_interval_secs, self.cfg.heartbeat_misses_max))
    }

    fn on_envelope(&mut self, env: AgentEnvelope) {
        if env.agent_id != self.cfg.agent_id {
            let text = format!(
                "envelope agent id {} does not match the certificate's agent id {}",
                env.agent_id, self.cfg.agent_id
            );
            self.close(CloseReason::IdentityMismatch(text.clone()), Some(text));
            return;
        }
        match self.state {
            State::AwaitingHello { .. } => self.on_first(env),
            State::HelloReceived { .. } => {
                let text = format!("{} before the Welcome", env.body.kind());
                self.close(CloseReason::ProtocolViolation(text.clone()), Some(text));
            }
            State::Up => self.on_up(env),
            State::Closed => {}
        }
    }

    fn on_first(&mut self, env: AgentEnvelope) {
        let AgentMessage::Hello { versions, agent_version, hostname, capabilities, running_jobs } = env.body else {
            let text = format!("first message was {}, not hello", env.body.kind());
            self.close(CloseReason::ProtocolViolation(text.clone()), Some(text));
            return;
        };
        match negotiate(VersionRange::ours(), versions) {
            Ok(protocol_version) => {
                self.state = State::HelloReceived { protocol_version };
                self.protocol_version = Some(protocol_version);
                self.events.push_back(ControlEvent::Hello {
                    protocol_version,
                    agent_version,
                    hostname,
                    capabilities,
                    running_jobs,
                });
            }
            Err(e) => {
                let text = e.to_string();
                self.close(CloseReason::VersionMismatch(text.clone()), Some(text));
            }
        }
    }

    fn on_up(&mut self, env: AgentEnvelope) {
        let violation = match (&env.body, env.seq) {
            (AgentMessage::Hello { .. }, _) => Some("a second hello".to_owned()),
            (AgentMessage::Heartbeat(_), 0) => None,
            (AgentMessage::Heartbeat(_), seq) => Some(format!("heartbeat with sequence {seq} (must be 0)")),
            (AgentMessage::CertificateRequest { .. }, 0) => None,
            (AgentMessage::CertificateRequest { .. }, seq) => {
                Some(format!("certificate request with sequence {seq} (must be 0)"))
            }
            (body, 0) => Some(format!("{} with sequence 0", body.kind())),
            (_, seq) if seq <= self.last_seq => {
                Some(format!("sequence {seq} after {} on the same connection", self.last_seq))
            }
            _ => None,
        };
        if let Some(text) = violation {
            self.close(CloseReason::ProtocolViolation(text.clone()), Some(text));
            return;
        }
        match env.body {
            AgentMessage::Heartbeat(health) => {
                // The heartbeat answer keeps the agent's liveness deadline moving on an idle link.
                self.acknowledge(0);
                self.events.push_back(ControlEvent::Heartbeat(health));
            }
            AgentMessage::CertificateRequest { csr_pem } => {
                self.events.push_back(ControlEvent::CertificateRequest { csr_pem });
            }
            _ => {
                self.last_seq = env.seq;
                self.events.push_back(ControlEvent::Message(env));
            }
        }
    }

    fn queue_refused(&mut self, reason: &str) {
        let msg = ControlMessage::Refused { reason: truncate_reason(reason) };
        if let Some(frame) = encode_own(&msg, self.cfg.frame_bytes_max) {
            self.transmit.push_unbounded(frame);
        }
    }

    fn close(&mut self, reason: CloseReason, refusal: Option<String>) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed;
        self.refuse_on_close = refusal;
        self.events.push_back(ControlEvent::Closed { reason });
    }
}
