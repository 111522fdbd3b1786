//! Writing secrets (private keys, tokens) to disk without ever exposing them to other users.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::error::CertError;

/// Atomically writes `contents` to `path` with mode 0600 (owner read/write only).
///
/// The data goes to a new temporary file in the same directory, created with mode 0600 from the
/// start (never world- or group-readable, not even briefly), flushed to disk, then renamed over
/// `path`; the directory is synced afterwards. Readers see either the old file or the complete new
/// one. An existing file at `path` is replaced (and its old permissions with it).
///
/// Errors: [`CertError::Io`] naming the file that failed (the temporary file is removed on failure).
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| CertError::Io { path: p, source }
    };
    let file_name = path.file_name().ok_or_else(|| CertError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut suffix = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut suffix);
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), hex::encode(suffix)));

    let write_tmp = || -> Result<(), CertError> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
        file.write_all(contents).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    };
    if let Err(e) = write_tmp() {
        // Best effort: the temporary file may not exist if creating it failed.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    #[cfg(unix)]
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
    Ok(())
}

/// Creates `dir` (and its parents) and sets its mode to 0700, so secrets and sockets inside it are
/// reachable by the owner only. An existing directory gets its mode tightened.
///
/// Errors: [`CertError::Io`] naming the directory.
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    let io_err = |source| CertError::Io { path: dir.to_path_buf(), source };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir).map_err(io_err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)
    }
    #[cfg(not(unix))]
    builder.create(dir).map_err(io_err)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_files_are_0600_and_replace_atomically() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.key");
        // A pre-existing world-readable file is replaced, not reused.
        fs::write(&path, b"old")?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;

        write_secret_file(&path, b"secret key material")?;
        assert_eq!(fs::read(&path)?, b"secret key material");
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        assert_eq!(names, vec![std::ffi::OsString::from("agent.key")]);
        Ok(())
    }

    #[test]
    fn missing_directory_is_an_io_error_naming_the_path() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("no-such-dir").join("ca.key");
        match write_secret_file(&path, b"x") {
            Err(CertError::Io { path: p, .. }) => assert!(p.starts_with(dir.path())),
            other => panic!("expected an Io error, got {other:?}"),
        }
        Ok(())
    }
}
