//! Protocol version negotiation.
//!
//! The agent's `Hello` carries the inclusive range of protocol versions it speaks. The control plane
//! picks the highest version both sides speak, or refuses the agent with a [`VersionError`] whose
//! `Display` text is sent back verbatim in `ControlMessage::Refused` so the operator sees why.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks natively (the highest it supports).
///
/// 6 adds messages that only a peer agreeing 6 is sent (each listed at its constant below):
/// `AgentMessage::Custody` ([`CUSTODY_PROTOCOL_VERSION`]) and `AgentMessage::GpuXidErrors`
/// ([`XID_PROTOCOL_VERSION`]).
/// 5 added self-update: `ControlMessage::{Update, UpdateWithdrawn}`, `AgentMessage::UpdateReport` and
/// the release fetch stream (`release_fetch`); a control plane orders updates only from agents that
/// agreed 5.
/// 4 added the release public key: `ControlMessage::ReleaseKey` on the link and
/// `EnrollResponse::Enrolled::release_public_key` at enrollment (see `enroll` for how both ends
/// still enroll with protocol-3 peers); a control plane sends those only to agents that speak 4.
/// 3 added online certificate renewal and trust bundles (`AgentMessage::CertificateRequest`,
/// `ControlMessage::{Certificate, CertificateRefused, TrustBundle, RenewCertificate}`); a control plane
/// sends those only to agents that agreed 3. 2 added leases with fencing.
pub const PROTOCOL_VERSION: u16 = 6;
/// The first protocol version with chain of custody (`AgentMessage::Custody`): an agent sends it only
/// over a link that agreed at least this version, and drops it unsent over an older one.
pub const CUSTODY_PROTOCOL_VERSION: u16 = 6;
/// The first protocol version with per-GPU critical XID error counts (`AgentMessage::GpuXidErrors`): an
/// agent sends them only over a link that agreed at least this version, and drops them unsent over an
/// older one.
pub const XID_PROTOCOL_VERSION: u16 = 6;
/// The first protocol version with self-update (`ControlMessage::Update`, the release fetch stream).
pub const UPDATE_PROTOCOL_VERSION: u16 = 5;
/// The first protocol version that carries the release public key (`ControlMessage::ReleaseKey`,
/// `EnrollResponse::Enrolled::release_public_key`).
pub const RELEASE_KEY_PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this build still speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 2;

/// An inclusive range of protocol versions, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// The range this build speaks: [`PROTOCOL_VERSION_MIN`]..=[`PROTOCOL_VERSION`].
    pub const fn ours() -> Self {
        Self { min: PROTOCOL_VERSION_MIN, max: PROTOCOL_VERSION }
    }
}

/// Why two peers cannot talk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The peer only speaks versions older than ours: upgrade the peer.
    #[error("peer speaks protocol {peer_min}..={peer_max}, we need at least {ours_min}: upgrade the peer (gaffer-agent self-update or reinstall)")]
    PeerTooOld {
        /// Peer's oldest version.
        peer_min: u16,
        /// Peer's newest version.
        peer_max: u16,
        /// Our oldest version.
        ours_min: u16,
    },
    /// The peer only speaks versions newer than ours: upgrade this side.
    #[error("peer speaks protocol {peer_min}..={peer_max}, we speak at most {ours_max}: upgrade the control plane")]
    PeerTooNew {
        /// Peer's oldest version.
        peer_min: u16,
        /// Peer's newest version.
        peer_max: u16,
        /// Our newest version.
        ours_max: u16,
    },
    /// The peer sent a range whose `min` is above its `max`.
    #[error("peer sent an empty protocol version range {min}..={max}")]
    EmptyRange {
        /// Claimed oldest version.
        min: u16,
        /// Claimed newest version.
        max: u16,
    },
}

/// Picks the highest protocol version in both `ours` and `peer`.
///
/// # Errors
/// [`VersionError`] when the ranges do not overlap or the peer's range is empty.
pub fn negotiate(ours: VersionRange, peer: VersionRange) -> Result<u16, VersionError> {
    if peer.min > peer.max {
        return Err(VersionError::EmptyRange { min: peer.min, max: peer.max });
    }
    if peer.max < ours.min {
        return Err(VersionError::PeerTooOld { peer_min: peer.min, peer_max: peer.max, ours_min: ours.min });
    }
    if peer.min > ours.max {
        return Err(VersionError::PeerTooNew { peer_min: peer.min, peer_max: peer.max, ours_max: ours.max });
    }
    Ok(ours.max.min(peer.max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(negotiate(r(1, 3), r(2, 5)), Ok(3));
        assert_eq!(negotiate(r(2, 5), r(1, 3)), Ok(3));
        assert_eq!(negotiate(r(1, 1), r(1, 1)), Ok(1));
    }

    #[test]
    fn refuses_disjoint_ranges_with_direction() {
        assert!(matches!(negotiate(r(3, 4), r(1, 2)), Err(VersionError::PeerTooOld { .. })));
        assert!(matches!(negotiate(r(1, 2), r(3, 4)), Err(VersionError::PeerTooNew { .. })));
        assert!(matches!(negotiate(r(1, 2), r(2, 1)), Err(VersionError::EmptyRange { .. })));
        let text = negotiate(r(3, 4), r(1, 2)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("upgrade the peer"), "{text}");
    }
}
