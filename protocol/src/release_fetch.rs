//! The release fetch stream (protocol 5): how an agent downloads a signed release artifact over its
//! authenticated link connection, so the download is authenticated by the agent's fleet
//! certificate (mutual TLS, checked for revocation like every link) and needs no second listener.
//!
//! The agent opens a new bidirectional QUIC stream on its link connection and writes one frame,
//! a [`ReleaseFetchRequest`], then finishes its side. The control plane answers with one frame, a
//! [`ReleaseFetchReply`]; after [`ReleaseFetchReply::Artifact`] come exactly `size_bytes` raw bytes
//! of the signed artifact and the end of the stream. Frames are the codec's length-prefixed
//! bincode, at most [`RELEASE_FETCH_FRAME_BYTES_MAX`] bytes.
//!
//! The bytes are not trusted for what they are: the agent checks the size and SHA-256 the
//! [`crate::messages::UpdateOrder`] announced (transfer errors), then the zipsign signature against
//! the release key it pinned at enrollment (the trust).
use serde::{Deserialize, Serialize};

/// Largest request or reply frame, bytes (4 KiB: a file name and a reason).
pub const RELEASE_FETCH_FRAME_BYTES_MAX: usize = 4096;
/// Longest file name in a request, bytes (128).
pub const RELEASE_FILE_NAME_BYTES_MAX: usize = 128;

/// The agent's request: the artifact it was ordered to update to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseFetchRequest {
    /// `gaffer-agent-<version>-<arch>-linux.tar.gz`, as in the order; at most
    /// [`RELEASE_FILE_NAME_BYTES_MAX`] bytes.
    pub file_name: String,
}

/// The control plane's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseFetchReply {
    /// The artifact follows: `size_bytes` raw bytes, then the end of the stream.
    Artifact {
        /// Length of what follows, bytes.
        size_bytes: u64,
        /// SHA-256 of what follows, lowercase hex.
        sha256: String,
    },
    /// No artifact: unknown file, not a release of this control plane, or a read error.
    Refused {
        /// Why, in words an operator can act on.
        reason: String,
    },
}
