//! Chain of custody of a job's media file: its SHA-256, size and modification time, computed on the box.
//!
//! Only the hash crosses the network (`AgentMessage::Custody`), never the content. The file is streamed
//! through [`sha2::Sha256`] (`std::io::copy`, one [`HASH_BUFFER_BYTES`] read buffer), so memory stays bounded whatever the
//! file's size.

use std::path::Path;
use std::time::UNIX_EPOCH;

use sha2::{Digest as _, Sha256};

/// Size of the read buffer used while hashing, bytes (1 MiB).
pub const HASH_BUFFER_BYTES: usize = 1 << 20;

/// What the agent read of one media file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaCustody {
    /// SHA-256 of the file's bytes, 64 lowercase hex characters.
    pub sha256: String,
    /// Bytes read (the file's size when it was hashed).
    pub size_bytes: u64,
    /// Modification time, seconds since the Unix epoch (negative before 1970); `None` where the
    /// file system does not record one.
    pub modified_unix_secs: Option<i64>,
}

/// Hashes the file at `path` (blocking: call it off the async runtime).
///
/// # Errors
/// The [`std::io::Error`] of opening, stat-ing or reading the file.
pub fn hash_media_file(path: &Path) -> std::io::Result<MediaCustody> {
    let file = std::fs::File::open(path)?;
    let modified_unix_secs = file.metadata()?.modified().ok().map(|t| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    });
    let mut hasher = Sha256::new();
    // Streamed through one bounded buffer; `io::copy` retries interrupted reads.
    let size_bytes = std::io::copy(&mut std::io::BufReader::with_capacity(HASH_BUFFER_BYTES, file), &mut hasher)?;
    Ok(MediaCustody { sha256: hex::encode(hasher.finalize()), size_bytes, modified_unix_secs })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hashes_content_size_and_mtime_across_buffer_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.mov");
        let content: Vec<u8> = (0..HASH_BUFFER_BYTES * 2 + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let c = hash_media_file(&path).unwrap();
        assert_eq!(c.sha256, hex::encode(Sha256::digest(&content)));
        assert_eq!(c.size_bytes, content.len() as u64);
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap().duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(c.modified_unix_secs, Some(mtime.as_secs() as i64));
    }

    #[test]
    fn a_missing_file_is_an_error() {
        assert!(hash_media_file(Path::new("/nonexistent/gaffer/clip.mov")).is_err());
    }
}
