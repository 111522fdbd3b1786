//! The Gaffer wire contract, shared by `gaffer-agent` and `gaffer-control`.
//!
//! This crate is **sans-IO** in the manner of `quinn-proto`: it owns the message types, the framing
//! codec, the version negotiation and the link's session state machines, and it never touches a
//! socket, a clock, a thread or the disk. The agent and the control plane each own a small driver
//! that pumps a QUIC stream through a [`session::AgentSession`] / [`session::ControlSession`].
//!
//! * [`messages`]: what the agent and the control plane say to each other ([`messages::AgentMessage`],
//!   [`messages::ControlMessage`]), with the (agent id, sequence) envelope used for dedupe.
//! * [`codec`]: length-prefixed bincode 2 frames, with the frame size checked before any allocation.
//! * [`version`]: protocol version negotiation.
//! * [`session`]: the two ends of the agent link as state machines (handshake, acknowledgements,
//!   outbox window, heartbeat deadlines): bytes and `now` in, frames, timers and events out.
//! * [`digest`]: the versioned analysis result schema (shots, cuts, keyframes, technical metadata).
//! * [`health`]: the host/GPU health report sent on every heartbeat.
//! * [`bundle`]: the offline-sync bundle file format (air-gapped sites).
//! * [`release_fetch`]: the stream on which an agent downloads a signed release (self-update).
//!
//! Architecture invariant: the serde types in this crate *are* the wire format. Changing a field's
//! type, order or meaning requires bumping [`version::PROTOCOL_VERSION`]; changing the digest requires
//! bumping [`digest::DIGEST_SCHEMA_VERSION`].
#![warn(missing_docs)]

pub mod bundle;
pub mod codec;
pub mod digest;
pub mod enroll;
pub mod health;
pub mod messages;
pub mod release_fetch;
pub mod session;
pub mod version;

pub use codec::{encode_frame, CodecError, FrameDecoder, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES};
pub use messages::{AgentEnvelope, AgentMessage, ControlMessage};
pub use version::{
    negotiate, VersionError, CUSTODY_PROTOCOL_VERSION, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
    RELEASE_KEY_PROTOCOL_VERSION, UPDATE_PROTOCOL_VERSION, XID_PROTOCOL_VERSION,
};

/// ALPN protocol id of the authenticated (mutual TLS) agent link.
pub const ALPN_AGENT_LINK: &[u8] = b"gaffer/1";
/// ALPN protocol id of enrollment connections (server-authenticated only; the agent has no
/// certificate yet).
pub const ALPN_ENROLL: &[u8] = b"gaffer-enroll/1";
