//! Enrollment: the one exchange on an `gaffer-enroll/1` connection.
//!
//! ```text
//! agent                                         control plane
//!   | (TLS: verifies the CA by SHA-256 fingerprint, sends no certificate)
//!   | -- EnrollRequest { token, CSR, agent id } -->  |
//!   | <-- EnrollResponse::Enrolled { cert, CA } ---  |   or Refused { reason }
//! ```
//!
//! The private key never leaves the agent: only the CSR crosses. Both messages travel as one frame
//! each of [`crate::codec`], with [`ENROLL_FRAME_BYTES_MAX`] as the limit.
//!
//! **Two layouts of the answer.** Protocol 4 added [`EnrollResponse::Enrolled`]'s
//! `release_public_key`, a trailing field in the bincode frame, which a protocol-3 agent would
//! refuse (trailing bytes) and which a protocol-3 control plane does not send. So the control plane
//! answers with [`EnrollResponse::encode_frame_for`] the agent's versions (protocol-3 agents get
//! the old layout), and the agent reads the answer with [`EnrollResponse::decode_payload`], which
//! takes either layout. The request is unchanged.

use serde::{Deserialize, Serialize};

use crate::codec::{decode_payload, encode_frame, CodecError};
use crate::messages::AgentId;
use crate::version::{VersionRange, RELEASE_KEY_PROTOCOL_VERSION};

/// Largest enrollment frame either side accepts, bytes (a CSR is ~500 bytes, a certificate chain a
/// few KiB).
pub const ENROLL_FRAME_BYTES_MAX: usize = 64 * 1024;
/// Largest token string accepted, bytes.
pub const TOKEN_BYTES_MAX: usize = 128;

/// Sent by the enrolling agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Protocol versions the agent speaks.
    pub versions: VersionRange,
    /// The one-time enrollment token (secret: never log it).
    pub token: String,
    /// Id the agent chose for itself (UUID v4); it becomes the certificate's URI SAN.
    pub agent_id: AgentId,
    /// PEM CSR for the agent's locally generated key.
    pub csr_pem: String,
    /// The agent's host name, for display.
    pub hostname: String,
    /// Site the operator expects (`--site`); refused if it differs from the token's site.
    pub site: Option<String>,
    /// The agent's build version.
    pub agent_version: String,
    /// The agent's age X25519 recipient (`age1...`) for offline-sync reply bundles; None from
    /// agents that predate offline sync.
    pub bundle_recipient: Option<String>,
    /// Re-enrollment (`gaffer-agent enroll --renew`, protocol 3): `agent_id` is already enrolled
    /// (its certificate expired while it was offline) and keeps its identity, site, job queue and
    /// outbox; the token must be for the agent's site. False for a first enrollment.
    ///
    /// Wire note: `#[serde(default)]` helps self-describing encodings (JSON) only. In the bincode
    /// frame this field is a trailing byte, so a protocol-2 agent's request (without it) does not
    /// decode as this struct; a control plane that must still enroll such agents decodes the
    /// frame's payload again without this field.
    #[serde(default)]
    pub renew: bool,
}

/// Sent by the control plane, then the connection closes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// Enrolled: the agent stores these and can run.
    Enrolled {
        /// The agent's id (as requested).
        agent_id: AgentId,
        /// The site the token was bound to.
        site: String,
        /// PEM certificate for the agent's key, signed by the fleet CA.
        cert_pem: String,
        /// PEM fleet CA certificate: the only root the agent trusts from now on.
        ca_pem: String,
        /// The control plane's age X25519 recipient (`age1...`): agent bundles are encrypted to
        /// it. None from control planes without offline sync.
        bundle_recipient: Option<String>,
        /// The control plane's Ed25519 release public key (the 32 bytes of zipsign's
        /// `release.pub`; protocol 4), which the agent pins like the CA: every release it installs
        /// must be signed by it. None when the control plane has no release key yet (the agent
        /// pins the one its link offers later) and in the protocol-3 layout.
        release_public_key: Option<[u8; 32]>,
    },
    /// Not enrolled; the reason tells the operator what to do.
    Refused {
        /// Why.
        reason: String,
    },
}

/// [`EnrollResponse`] as protocol 3 lays it out (no `release_public_key`).
#[derive(Serialize, Deserialize)]
enum EnrollResponseV3 {
    Enrolled { agent_id: AgentId, site: String, cert_pem: String, ca_pem: String, bundle_recipient: Option<String> },
    Refused { reason: String },
}

impl EnrollResponse {
    /// Encodes the answer as one frame for an agent that speaks `agent_versions` (from its
    /// request): this layout for agents that speak protocol 4, else the protocol-3 layout, which
    /// leaves `release_public_key` out.
    ///
    /// # Errors
    /// [`CodecError::FrameTooLarge`] above `frame_bytes_max`.
    pub fn encode_frame_for(
        &self,
        agent_versions: VersionRange,
        frame_bytes_max: usize,
    ) -> Result<Vec<u8>, CodecError> {
        if agent_versions.max >= RELEASE_KEY_PROTOCOL_VERSION {
            return encode_frame(self, frame_bytes_max);
        }
        let v3 = match self.clone() {
            EnrollResponse::Enrolled { agent_id, site, cert_pem, ca_pem, bundle_recipient, release_public_key: _ } => {
                EnrollResponseV3::Enrolled { agent_id, site, cert_pem, ca_pem, bundle_recipient }
            }
            EnrollResponse::Refused { reason } => EnrollResponseV3::Refused { reason },
        };
        encode_frame(&v3, frame_bytes_max)
    }

    /// Decodes an answer's payload in either layout: this one, or the protocol-3 layout of older
    /// control planes (then `release_public_key` is None).
    ///
    /// # Errors
    /// [`CodecError::Malformed`] when it is neither.
    pub fn decode_payload(payload: &[u8]) -> Result<Self, CodecError> {
        match decode_payload::<EnrollResponse>(payload) {
            Ok(resp) => Ok(resp),
            Err(current) => match decode_payload::<EnrollResponseV3>(payload) {
                Ok(EnrollResponseV3::Enrolled { agent_id, site, cert_pem, ca_pem, bundle_recipient }) => {
                    Ok(EnrollResponse::Enrolled {
                        agent_id,
                        site,
                        cert_pem,
                        ca_pem,
                        bundle_recipient,
                        release_public_key: None,
                    })
                }
                Ok(EnrollResponseV3::Refused { reason }) => Ok(EnrollResponse::Refused { reason }),
                Err(_) => Err(current),
            },
        }
    }
}

/// Offline enrollment request, written by `gaffer-agent enroll --offline-request FILE` and carried
/// to the control plane on removable media. JSON; holds nothing secret (a CSR and public keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineEnrollRequest {
    /// Protocol versions the agent speaks.
    pub versions: VersionRange,
    /// Id the agent chose for itself (UUID v4).
    pub agent_id: AgentId,
    /// PEM CSR for the agent's locally generated key.
    pub csr_pem: String,
    /// The agent's host name, for display.
    pub hostname: String,
    /// Site the agent asks to join.
    pub site: String,
    /// The agent's build version.
    pub agent_version: String,
    /// The agent's age X25519 recipient (`age1...`) for reply bundles.
    pub bundle_recipient: String,
}

/// What the control plane grants an offline agent: the signed content of an offline enrollment
/// reply ([`OfflineEnrollReply::grant_json`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineEnrollGrant {
    /// The agent's id (as requested).
    pub agent_id: AgentId,
    /// The site it was enrolled into.
    pub site: String,
    /// PEM certificate for the agent's key, signed by the fleet CA.
    pub cert_pem: String,
    /// PEM fleet CA certificate; the agent checks its SHA-256 against `--ca-fingerprint`.
    pub ca_pem: String,
    /// PEM certificate of the control plane's server key, which signed this grant (it chains to
    /// the CA and carries EKU serverAuth).
    pub server_cert_pem: String,
    /// The control plane's age X25519 recipient (`age1...`): agent bundles are encrypted to it.
    pub bundle_recipient: String,
    /// When it was granted, Unix milliseconds.
    pub granted_at_ms: u64,
    /// The control plane's Ed25519 release public key, which the agent pins as an online one
    /// does from its enrollment answer (releases reach it in reply bundles). Absent when the
    /// control plane has no release key: then the field is not written, so agents that predate it
    /// (this struct denies unknown fields) still take such a grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_public_key: Option<[u8; 32]>,
}

/// Offline enrollment reply, written by `gaffer-control enroll-offline --out FILE`. JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineEnrollReply {
    /// The exact JSON text of an [`OfflineEnrollGrant`] that the signature covers (kept as text so
    /// the signed bytes survive re-serialization).
    pub grant_json: String,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER, standard base64) over the UTF-8 bytes of
    /// `grant_json`, by the key of the grant's `server_cert_pem`.
    pub signature_b64: String,
}

/// Largest offline enrollment request or reply file accepted, bytes (they are ~3 KiB).
pub const OFFLINE_ENROLL_BYTES_MAX: u64 = 64 * 1024;
