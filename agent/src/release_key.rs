//! The release public key this agent trusts, pinned in its data directory.
//!
//! `DATA_DIR/release.pub` holds the control plane's Ed25519 release public key, 32 bytes in
//! zipsign's format, mode 0644 (it is public). It is pinned like the CA fingerprint:
//!
//! * at enrollment, from the enrollment answer (`gaffer-agent enroll`; with
//!   `--release-key-fingerprint` the enrollment fails if the offered key is another one);
//! * for an agent enrolled before the control plane had a release key, from the first
//!   `ReleaseKey` its link offers after a Welcome (protocol 4).
//!
//! It is never replaced over the network: a different key offered later is refused and logged as
//! an error every time it is offered, and the pinned key stays. Every release this agent installs
//! must verify against it ([`gaffer_certs::verify_release`]). To trust another key on purpose,
//! remove `release.pub` (the next offer pins the new one) or re-enroll.

use std::path::PathBuf;

use gaffer_certs::{ReleaseKeyFingerprint, ReleasePublicKey, RELEASE_PUB_FILE};

use crate::datadir::DataDir;
use crate::AgentError;

/// `DATA_DIR/release.pub`.
pub fn release_key_path(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join(RELEASE_PUB_FILE)
}

/// The pinned release key; None when none is pinned yet.
///
/// # Errors
/// [`AgentError::Io`] when it cannot be read; [`AgentError::Cert`]
/// ([`gaffer_certs::CertError::InvalidReleaseKey`]) when the file is not a 32-byte key.
pub fn load(data_dir: &DataDir) -> Result<Option<ReleasePublicKey>, AgentError> {
    let path = release_key_path(data_dir);
    // A key file is 32 bytes; read a little more to see a wrong one, never a large one.
    let mut bytes = Vec::with_capacity(64);
    match std::fs::File::open(&path) {
        Ok(file) => {
            use std::io::Read as _;
            file.take(64).read_to_end(&mut bytes).map_err(|e| AgentError::io(&path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AgentError::io(&path, e)),
    }
    Ok(Some(ReleasePublicKey::from_key_file(&bytes)?))
}

/// What [`pin`] did with an offered key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// No key was pinned; this one is now.
    Pinned,
    /// This key was pinned already.
    AlreadyPinned,
    /// Another key is pinned: the offered one was refused and nothing changed.
    Refused {
        /// The pinned key's fingerprint.
        pinned: ReleaseKeyFingerprint,
        /// The offered key's fingerprint.
        offered: ReleaseKeyFingerprint,
    },
}

/// Pins `offered` if no key is pinned yet (written atomically, 0644); never replaces another key.
///
/// # Errors
/// [`AgentError::Io`], [`AgentError::Cert`] when the pinned file is unreadable or not a key (it
/// is left as it is).
pub fn pin(data_dir: &DataDir, offered: &ReleasePublicKey) -> Result<PinOutcome, AgentError> {
    match load(data_dir)? {
        Some(pinned) if pinned == *offered => Ok(PinOutcome::AlreadyPinned),
        Some(pinned) => Ok(PinOutcome::Refused { pinned: pinned.fingerprint(), offered: offered.fingerprint() }),
        None => {
            write(data_dir, offered)?;
            Ok(PinOutcome::Pinned)
        }
    }
}

/// Pins the key a control plane offered, logging what happened: `info` when it is pinned now, an
/// `error` when another key is pinned (the offered one is refused). For the link's `ReleaseKey`
/// and re-enrollment; never fails the caller.
pub fn pin_offered(data_dir: &DataDir, public_key: &[u8; 32], via: &str) {
    let offered = match ReleasePublicKey::from_bytes(public_key) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, via, "the control plane offered an invalid release key; refused");
            return;
        }
    };
    match pin(data_dir, &offered) {
        Ok(PinOutcome::Pinned) => {
            tracing::info!(fingerprint = %offered.fingerprint(), via, "pinned the control plane's release key")
        }
        Ok(PinOutcome::AlreadyPinned) => {}
        Ok(PinOutcome::Refused { pinned, offered }) => tracing::error!(
            %pinned, %offered, via,
            "REFUSED a different release key from the control plane: this agent keeps the key it pinned and \
             installs only releases signed by it. If the release key was replaced on purpose, remove {} and \
             restart the agent; otherwise someone is offering a key that is not your studio's",
            release_key_path(data_dir).display()
        ),
        Err(e) => tracing::error!(error = %e, via, "could not pin the control plane's release key"),
    }
}

/// The pinned key's fingerprint, for `status`; None when none is pinned or the file is unreadable.
pub fn pinned_fingerprint(data_dir: &DataDir) -> Option<ReleaseKeyFingerprint> {
    load(data_dir).ok().flatten().map(|k| k.fingerprint())
}

fn write(data_dir: &DataDir, key: &ReleasePublicKey) -> Result<(), AgentError> {
    let path = release_key_path(data_dir);
    // Atomic (temporary file, fsync, rename); created 0600, then opened up: the key is public.
    gaffer_certs::write_secret_file(&path, key.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| AgentError::io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gaffer_certs::ReleaseSigningKey;

    #[test]
    fn the_first_key_is_pinned_and_another_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let dd = DataDir::new(dir.path());
        assert_eq!(load(&dd)?, None);
        let first = ReleaseSigningKey::generate().public_key();
        assert_eq!(pin(&dd, &first)?, PinOutcome::Pinned);
        assert_eq!(pin(&dd, &first)?, PinOutcome::AlreadyPinned);
        let other = ReleaseSigningKey::generate().public_key();
        assert_eq!(
            pin(&dd, &other)?,
            PinOutcome::Refused { pinned: first.fingerprint(), offered: other.fingerprint() }
        );
        pin_offered(&dd, other.as_bytes(), "test");
        assert_eq!(load(&dd)?, Some(first), "a different key never replaces the pinned one");
        assert_eq!(std::fs::read(release_key_path(&dd))?, first.as_bytes().to_vec());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(release_key_path(&dd))?.permissions().mode() & 0o777, 0o644);
        }
        assert_eq!(pinned_fingerprint(&dd), Some(first.fingerprint()));
        Ok(())
    }

    #[test]
    fn a_damaged_key_file_is_an_error_and_is_left_alone() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let dd = DataDir::new(dir.path());
        std::fs::write(release_key_path(&dd), b"not a key")?;
        let offered = ReleaseSigningKey::generate().public_key();
        assert!(pin(&dd, &offered).is_err());
        assert_eq!(std::fs::read(release_key_path(&dd))?, b"not a key");
        assert_eq!(pinned_fingerprint(&dd), None);
        Ok(())
    }
}
