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

use serde::{Deserialize, Serialize};

use crate::messages::AgentId;
use crate::version::VersionRange;

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
    },
    /// Not enrolled; the reason tells the operator what to do.
    Refused {
        /// Why.
        reason: String,
    },
}
