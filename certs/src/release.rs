//! Release signing: Ed25519 release keys in zipsign's format and signed agent tarballs.
//!
//! A release artifact is the tarball `installers/build-packages.sh` writes,
//! `gaffer-agent-VERSION-ARCH-linux.tar.gz`, holding one top directory `gaffer-agent-VERSION/` with
//! the binary at `bin/gaffer-agent`. It is signed with [zipsign](https://github.com/Kijewski/zipsign)
//! (`zipsign-api`): the Ed25519ph signature travels *inside* the file, as the comment of a second,
//! empty gzip member appended to it, so the signed file is still a valid `.tar.gz` and
//! `self_update`'s `signatures` feature verifies it with `verifying_keys`. As zipsign's CLI and
//! `self_update` do, the signature's context is the artifact's **file name**: a signed file renamed
//! to another version or architecture no longer verifies.
//!
//! The name is signed, and so is the content; [`verify_release`] checks that they agree, so a
//! mislabelled artifact (renamed before it was signed) is refused too: the version is the tarball's
//! top directory (`gaffer-agent-VERSION/`), the architecture the ELF machine of `bin/gaffer-agent`.
//! The packager writes no separate manifest; these two are what the installer relies on anyway.
//!
//! Key files are zipsign's: `release.key` holds the 64-byte key pair (secret key, then public key;
//! write it with [`crate::write_secret_file`]), `release.pub` the 32-byte public key. A key's
//! fingerprint ([`ReleaseKeyFingerprint`]) is the SHA-256 of those 32 public key bytes.
//!
//! **Offline installer bundles** (`gaffer-offline-VERSION-ARCH-linux.tar.gz`, [`BundleName`]) are
//! signed the same way, streamed from their file ([`sign_bundle_file`], [`verify_bundle_file`]):
//! their content check is their layout and their own `SHA256SUMS`; [`ArtifactKind::of`] tells the
//! two apart by name.
//!
//! Limits: artifacts over [`RELEASE_BYTES_MAX`] are refused before they are read
//! ([`read_release_file`]) or parsed; unpacking reads at most [`RELEASE_UNPACKED_BYTES_MAX`] bytes
//! and [`RELEASE_ENTRIES_MAX`] tar entries.

use std::fmt;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path};
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};
use zipsign_api::{SigningKey, VerifyingKey};

use crate::error::CertError;

/// Largest release artifact accepted, bytes (512 MiB); larger ones are refused unread.
pub const RELEASE_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Most bytes a release tarball may unpack to, bytes (2 GiB): bounds a decompression bomb.
pub const RELEASE_UNPACKED_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;
/// Most entries (files and directories) a release tarball may hold.
pub const RELEASE_ENTRIES_MAX: usize = 256;
/// File name of the signing key (key pair, 64 bytes, 0600) in a release key directory.
pub const RELEASE_KEY_FILE: &str = "release.key";
/// File name of the public key (32 bytes) in a release key directory and an agent's data directory.
pub const RELEASE_PUB_FILE: &str = "release.pub";
/// Every release file name starts with this.
pub const RELEASE_FILE_PREFIX: &str = "gaffer-agent-";
/// Every release file name ends with this.
pub const RELEASE_FILE_SUFFIX: &str = "-linux.tar.gz";
/// Architectures a release may be built for (`uname -m` names), with their ELF machine numbers.
pub const RELEASE_ARCHES: &[(&str, u16)] = &[("x86_64", 62), ("aarch64", 183), ("riscv64", 243)];
/// Longest release version, bytes.
pub const RELEASE_VERSION_BYTES_MAX: usize = 64;

/// Path of the agent binary inside the tarball's top directory.
const BINARY_IN_TOP_DIR: &str = "bin/gaffer-agent";

/// An Ed25519 release signing key (zipsign's format). Keep it offline or 0600; `Debug` shows only
/// the fingerprint of its public key.
pub struct ReleaseSigningKey(SigningKey);

impl ReleaseSigningKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Self {
        let mut secret = [0u8; zipsign_api::KEYPAIR_LENGTH - zipsign_api::PUBLIC_KEY_LENGTH];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let key = SigningKey::from_bytes(&secret);
        secret.fill(0);
        ReleaseSigningKey(key)
    }

    /// Reads a `release.key` file's content: the 64-byte key pair (secret key, then public key).
    ///
    /// Errors: [`CertError::InvalidReleaseKey`] for another length or a public half that does not
    /// belong to the secret half.
    pub fn from_key_file(bytes: &[u8]) -> Result<Self, CertError> {
        let pair: &[u8; zipsign_api::KEYPAIR_LENGTH] = bytes.try_into().map_err(|_| CertError::InvalidReleaseKey {
            reason: format!(
                "a release signing key file holds {} bytes (zipsign's key pair), not {}",
                zipsign_api::KEYPAIR_LENGTH,
                bytes.len()
            ),
        })?;
        SigningKey::from_keypair_bytes(pair).map(ReleaseSigningKey).map_err(|_| CertError::InvalidReleaseKey {
            reason: "the key pair's two halves do not belong together".into(),
        })
    }

    /// The content of a `release.key` file (64 bytes, secret: write it with
    /// [`crate::write_secret_file`]).
    pub fn to_key_file(&self) -> Vec<u8> {
        self.0.to_keypair_bytes().to_vec()
    }

    /// The public key agents verify releases with.
    pub fn public_key(&self) -> ReleasePublicKey {
        ReleasePublicKey(self.0.verifying_key())
    }
}

impl fmt::Debug for ReleaseSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseSigningKey({})", self.public_key().fingerprint())
    }
}

/// An Ed25519 release public key: what agents pin and verify releases against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReleasePublicKey(VerifyingKey);

impl ReleasePublicKey {
    /// The key from its 32 bytes (the content of `release.pub`, or a key on the wire).
    ///
    /// Errors: [`CertError::InvalidReleaseKey`] when the bytes are not an Ed25519 public key.
    pub fn from_bytes(bytes: &[u8; zipsign_api::PUBLIC_KEY_LENGTH]) -> Result<Self, CertError> {
        VerifyingKey::from_bytes(bytes)
            .map(ReleasePublicKey)
            .map_err(|_| CertError::InvalidReleaseKey { reason: "not an Ed25519 public key".into() })
    }

    /// Reads a `release.pub` file's content: exactly 32 bytes.
    ///
    /// Errors: [`CertError::InvalidReleaseKey`] for another length or an invalid key.
    pub fn from_key_file(bytes: &[u8]) -> Result<Self, CertError> {
        let raw: &[u8; zipsign_api::PUBLIC_KEY_LENGTH] =
            bytes.try_into().map_err(|_| CertError::InvalidReleaseKey {
                reason: format!(
                    "a release public key file holds {} bytes (zipsign's format), not {}",
                    zipsign_api::PUBLIC_KEY_LENGTH,
                    bytes.len()
                ),
            })?;
        Self::from_bytes(raw)
    }

    /// The 32 key bytes (the content of `release.pub`).
    pub fn as_bytes(&self) -> &[u8; zipsign_api::PUBLIC_KEY_LENGTH] {
        self.0.as_bytes()
    }

    /// SHA-256 of the 32 key bytes.
    pub fn fingerprint(&self) -> ReleaseKeyFingerprint {
        ReleaseKeyFingerprint(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleasePublicKey({})", self.fingerprint())
    }
}

/// SHA-256 of a release public key's 32 bytes: what `release keygen` prints and
/// `gaffer-agent enroll --release-key-fingerprint` checks.
///
/// `Display` gives 64 lowercase hex characters. `FromStr` accepts hex in either case, with or
/// without `:` between bytes, and surrounding whitespace. Serde uses the `Display` form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReleaseKeyFingerprint([u8; 32]);

impl ReleaseKeyFingerprint {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ReleaseKeyFingerprint(bytes)
    }

    /// The raw 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ReleaseKeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ReleaseKeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseKeyFingerprint({self})")
    }
}

impl FromStr for ReleaseKeyFingerprint {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // 32 bytes as hex with ':' separators is 95 characters; allow some whitespace around it.
        const INPUT_CHARS_MAX: usize = 128;
        let invalid = |reason: String| CertError::InvalidReleaseKey { reason: format!("fingerprint: {reason}") };
        if s.len() > INPUT_CHARS_MAX {
            return Err(invalid(format!("{} characters, expected 64 hex digits", s.len())));
        }
        let digits: String = s.trim().chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes)
            .map_err(|e| invalid(format!("expected 64 hex digits (SHA-256 of the public key): {e}")))?;
        Ok(ReleaseKeyFingerprint(bytes))
    }
}

impl serde::Serialize for ReleaseKeyFingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ReleaseKeyFingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Version and architecture of a release, as its file name states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseName {
    /// The version: an ASCII digit, then letters, digits, `.`, `+` and `~` (a Debian upstream
    /// version, as `build-packages.sh` requires), at most [`RELEASE_VERSION_BYTES_MAX`] bytes.
    pub version: String,
    /// One of [`RELEASE_ARCHES`], e.g. `x86_64`.
    pub arch: String,
}

/// `VERSION-ARCH` of a release or bundle name (what is between its prefix and suffix), checked:
/// the version by [`check_version`], the architecture one of [`RELEASE_ARCHES`]. Errors: why not.
fn version_and_arch(middle: &str) -> Result<(String, String), String> {
    let (version, arch) = middle.rsplit_once('-').ok_or("the name has no -ARCH after the version")?;
    check_version(version)?;
    if elf_machine_of(arch).is_none() {
        return Err(format!(
            "unknown architecture {arch:?} (known: {})",
            RELEASE_ARCHES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok((version.to_owned(), arch.to_owned()))
}

impl ReleaseName {
    /// Parses `gaffer-agent-VERSION-ARCH-linux.tar.gz`.
    ///
    /// Errors: [`CertError::InvalidRelease`] saying what does not fit.
    pub fn parse(file_name: &str) -> Result<Self, CertError> {
        let invalid = |reason: String| CertError::InvalidRelease { file_name: file_name.to_owned(), reason };
        let middle = file_name
            .strip_prefix(RELEASE_FILE_PREFIX)
            .and_then(|rest| rest.strip_suffix(RELEASE_FILE_SUFFIX))
            .ok_or_else(|| {
                invalid(format!(
                    "a release is named {RELEASE_FILE_PREFIX}VERSION-ARCH{RELEASE_FILE_SUFFIX} (as installers/build-packages.sh writes it)"
                ))
            })?;
        let (version, arch) = version_and_arch(middle).map_err(invalid)?;
        Ok(ReleaseName { version, arch })
    }

    /// The file name, `gaffer-agent-VERSION-ARCH-linux.tar.gz`.
    pub fn file_name(&self) -> String {
        format!("{RELEASE_FILE_PREFIX}{}-{}{RELEASE_FILE_SUFFIX}", self.version, self.arch)
    }
}

/// Checks a release version (see [`ReleaseName::version`]); the error says why not.
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= RELEASE_VERSION_BYTES_MAX
        && version.as_bytes()[0].is_ascii_digit()
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "version {version:?} is not a release version: a digit first, then letters, digits, '.', '+' or '~', \
             at most {RELEASE_VERSION_BYTES_MAX} bytes"
        ))
    }
}

fn elf_machine_of(arch: &str) -> Option<u16> {
    RELEASE_ARCHES.iter().find(|(a, _)| *a == arch).map(|(_, m)| *m)
}

/// What a verified release is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseInfo {
    /// `gaffer-agent-VERSION-ARCH-linux.tar.gz`.
    pub file_name: String,
    /// The version (file name and top directory agree).
    pub version: String,
    /// The architecture (file name and the binary's ELF machine agree).
    pub arch: String,
    /// SHA-256 of the signed file's bytes, lowercase hex.
    pub sha256: String,
    /// Size of the signed file, bytes.
    pub size_bytes: u64,
    /// Fingerprint of the key whose signature verified.
    pub signer: ReleaseKeyFingerprint,
}

/// Reads a release artifact, refusing one over [`RELEASE_BYTES_MAX`] before reading it.
///
/// Errors: [`CertError::TooLarge`]; [`CertError::Io`] naming the file.
pub fn read_release_file(path: &Path) -> Result<Vec<u8>, CertError> {
    read_release_file_limited(path, RELEASE_BYTES_MAX)
}

fn read_release_file_limited(path: &Path, bytes_max: u64) -> Result<Vec<u8>, CertError> {
    let io_err = |source| CertError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let too_large = |len: u64| CertError::TooLarge {
        what: "release artifact",
        len_bytes: usize::try_from(len).unwrap_or(usize::MAX),
        max_bytes: usize::try_from(bytes_max).unwrap_or(usize::MAX),
    };
    if len > bytes_max {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The file may grow while it is read: never past the limit.
    file.take(bytes_max + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() as u64 > bytes_max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Whether `bytes` end in a zipsign signature block (a signed `.tar.gz`). Says nothing about
/// whether the signature verifies.
pub fn release_is_signed(bytes: &[u8]) -> bool {
    zipsign_api::unsign::copy_and_unsign_tar(&mut Cursor::new(bytes), &mut Discard::default()).is_ok()
}

/// Signs the release tarball `tarball`, named `file_name` (the signature's context, as zipsign and
/// `self_update` use it), and returns the signed file: `tarball` with the signature appended.
///
/// The tarball is checked first as [`verify_release`] would check it (name, size, top directory,
/// the binary's architecture), so nothing mislabelled gets signed. Signing is deterministic: the
/// same tarball and key give the same bytes.
///
/// Errors: [`CertError::TooLarge`] over [`RELEASE_BYTES_MAX`]; [`CertError::InvalidRelease`];
/// [`CertError::ReleaseAlreadySigned`] for a tarball that already carries a signature.
pub fn sign_release(file_name: &str, tarball: &[u8], key: &ReleaseSigningKey) -> Result<Vec<u8>, CertError> {
    check_size(tarball.len(), RELEASE_BYTES_MAX)?;
    let name = ReleaseName::parse(file_name)?;
    if release_is_signed(tarball) {
        return Err(CertError::ReleaseAlreadySigned { file_name: file_name.to_owned() });
    }
    check_content(file_name, &name, tarball)?;
    let mut out = Cursor::new(Vec::with_capacity(tarball.len() + 256));
    zipsign_api::sign::copy_and_sign_tar(
        &mut Cursor::new(tarball),
        &mut out,
        std::slice::from_ref(&key.0),
        Some(file_name.as_bytes()),
    )
    .map_err(|e| CertError::ReleaseSigning { reason: e.to_string() })?;
    Ok(out.into_inner())
}

/// Verifies the signed release `signed`, named `file_name`, against `keys` (any one may have
/// signed it), and checks that its content matches its name.
///
/// Errors: [`CertError::TooLarge`] over [`RELEASE_BYTES_MAX`] (checked first);
/// [`CertError::InvalidRelease`] for a name that is not a release's or content that disagrees
/// with it; [`CertError::ReleaseUnsigned`] when it carries no signature;
/// [`CertError::ReleaseSignatureInvalid`] when no key's signature verifies (a byte changed, another
/// key signed it, or it was signed under another name).
pub fn verify_release(file_name: &str, signed: &[u8], keys: &[ReleasePublicKey]) -> Result<ReleaseInfo, CertError> {
    verify_release_limited(file_name, signed, keys, RELEASE_BYTES_MAX)
}

fn verify_release_limited(
    file_name: &str,
    signed: &[u8],
    keys: &[ReleasePublicKey],
    bytes_max: u64,
) -> Result<ReleaseInfo, CertError> {
    check_size(signed.len(), bytes_max)?;
    let name = ReleaseName::parse(file_name)?;
    if !release_is_signed(signed) {
        return Err(CertError::ReleaseUnsigned { file_name: file_name.to_owned() });
    }
    let trusted: Vec<VerifyingKey> = keys.iter().map(|k| k.0).collect();
    let invalid = || CertError::ReleaseSignatureInvalid {
        file_name: file_name.to_owned(),
        trusted: keys.iter().map(|k| k.fingerprint().to_string()).collect::<Vec<_>>().join(", "),
    };
    if trusted.is_empty() {
        return Err(invalid());
    }
    let signer = zipsign_api::verify::verify_tar(&mut Cursor::new(signed), &trusted, Some(file_name.as_bytes()))
        .map_err(|_| invalid())?;
    let signer = keys.get(signer).ok_or_else(invalid)?.fingerprint();
    // Only signed bytes are unpacked: the signature block is an empty gzip member.
    check_content(file_name, &name, signed)?;
    Ok(ReleaseInfo {
        file_name: file_name.to_owned(),
        version: name.version,
        arch: name.arch,
        sha256: hex::encode(Sha256::digest(signed)),
        size_bytes: signed.len() as u64,
        signer,
    })
}

fn check_size(len: usize, bytes_max: u64) -> Result<(), CertError> {
    if len as u64 > bytes_max {
        return Err(CertError::TooLarge {
            what: "release artifact",
            len_bytes: len,
            max_bytes: usize::try_from(bytes_max).unwrap_or(usize::MAX),
        });
    }
    Ok(())
}

/// Unpacks the tarball (bounded) and checks that its only top directory is
/// `gaffer-agent-VERSION/` and that `bin/gaffer-agent` in it is a regular file whose ELF machine is
/// the name's architecture.
fn check_content(file_name: &str, name: &ReleaseName, gz: &[u8]) -> Result<(), CertError> {
    let invalid = |reason: String| CertError::InvalidRelease { file_name: file_name.to_owned(), reason };
    let top = format!("{RELEASE_FILE_PREFIX}{}", name.version);
    let binary = Path::new(&top).join(BINARY_IN_TOP_DIR);
    let reader = Bounded {
        inner: flate2::read::MultiGzDecoder::new(gz),
        left_bytes: RELEASE_UNPACKED_BYTES_MAX,
        limit_bytes: RELEASE_UNPACKED_BYTES_MAX,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| invalid(format!("not a gzip-compressed tar archive: {e}")))?;
    let mut binary_machine = None;
    for (n, entry) in entries.enumerate() {
        if n >= RELEASE_ENTRIES_MAX {
            return Err(invalid(format!("more than {RELEASE_ENTRIES_MAX} entries")));
        }
        let mut entry = entry.map_err(|e| invalid(format!("unreadable tar archive: {e}")))?;
        let path = entry.path().map_err(|e| invalid(format!("unreadable entry name: {e}")))?.into_owned();
        let mut components = path.components().filter(|c| !matches!(c, Component::CurDir));
        match components.next() {
            Some(Component::Normal(first)) if first == top.as_str() => {}
            _ => {
                return Err(invalid(format!(
                    "entry {} is not inside {top}/: the tarball's top directory must name the release's version",
                    path.display()
                )))
            }
        }
        if !components.all(|c| matches!(c, Component::Normal(_))) {
            return Err(invalid(format!("entry {} leaves the top directory", path.display())));
        }
        let path_clean: std::path::PathBuf = path.components().filter(|c| !matches!(c, Component::CurDir)).collect();
        if path_clean == binary {
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(invalid(format!("{} is not a regular file", binary.display())));
            }
            let mut ident = [0u8; 20];
            entry
                .read_exact(&mut ident)
                .map_err(|_| invalid(format!("{} is too short to be a program", binary.display())))?;
            binary_machine = Some(
                elf_machine(&ident)
                    .ok_or_else(|| invalid(format!("{} is not a 64-bit ELF program", binary.display())))?,
            );
        }
    }
    let machine = binary_machine.ok_or_else(|| invalid(format!("it holds no {}", binary.display())))?;
    let expected = elf_machine_of(&name.arch).unwrap_or(0);
    if machine != expected {
        let built_for = RELEASE_ARCHES.iter().find(|(_, m)| *m == machine).map_or("another architecture", |(a, _)| *a);
        return Err(invalid(format!(
            "the name says {} but {} is built for {built_for} (ELF machine {machine})",
            name.arch,
            binary.display()
        )));
    }
    Ok(())
}

/// The ELF machine (`e_machine`) of a 64-bit ELF file from its first 20 bytes.
fn elf_machine(ident: &[u8; 20]) -> Option<u16> {
    const ELFCLASS64: u8 = 2;
    if ident[..4] != *b"\x7fELF" || ident[4] != ELFCLASS64 {
        return None;
    }
    let bytes = [ident[18], ident[19]];
    match ident[5] {
        1 => Some(u16::from_le_bytes(bytes)),
        2 => Some(u16::from_be_bytes(bytes)),
        _ => None,
    }
}

/// A reader that fails once more than `left_bytes` were read through it.
struct Bounded<R> {
    inner: R,
    left_bytes: u64,
    /// The limit, for the error message.
    limit_bytes: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left_bytes = self.left_bytes.checked_sub(n as u64).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("unpacks to more than {} bytes", self.limit_bytes))
        })?;
        Ok(n)
    }
}

/// A writer that keeps nothing (zipsign's unsign wants `Write + Seek`).
#[derive(Default)]
struct Discard {
    pos: u64,
}

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Discard {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match pos {
            SeekFrom::Current(0) | SeekFrom::End(0) => Ok(self.pos),
            _ => Err(io::Error::new(io::ErrorKind::Unsupported, "discarded output cannot seek")),
        }
    }
}

// --- Offline installer bundles ---------------------------------------------------------------------

/// Every offline installer bundle's file name starts with this
/// (`gaffer-offline-VERSION-ARCH-linux.tar.gz`, written by `installers/build-offline-bundle.sh`).
pub const BUNDLE_FILE_PREFIX: &str = "gaffer-offline-";
/// Largest offline bundle accepted, bytes (4 GiB: the CUDA ONNX Runtime wheel alone is ~300 MiB);
/// larger ones are refused before they are read. Bundles are streamed from their file, never held
/// in memory.
pub const BUNDLE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// Most bytes an offline bundle may unpack to, bytes (8 GiB).
pub const BUNDLE_UNPACKED_BYTES_MAX: u64 = 8 * 1024 * 1024 * 1024;
/// Most entries (files and directories) an offline bundle may hold.
pub const BUNDLE_ENTRIES_MAX: usize = 256;
/// The checksum file in a bundle's top directory: `sha256sum` lines for every other file in it.
pub const BUNDLE_SUMS_FILE: &str = "SHA256SUMS";
/// The installer in a bundle's top directory.
pub const BUNDLE_INSTALLER_FILE: &str = "install-agent.sh";
/// Largest `SHA256SUMS` read from a bundle, bytes.
const BUNDLE_SUMS_BYTES_MAX: u64 = 64 * 1024;

/// Version and architecture of an offline installer bundle, as its file name states them.
///
/// A bundle is `gaffer-offline-VERSION-ARCH-linux.tar.gz` holding one top directory
/// `gaffer-offline-VERSION/` with [`BUNDLE_SUMS_FILE`], [`BUNDLE_INSTALLER_FILE`], the agent
/// release `packages/gaffer-agent-VERSION-ARCH-linux.tar.gz` (itself signed) and whatever else the
/// builder adds (`packages/*.deb`, `wheels/*.whl`, `release.pub`), regular files and directories
/// only. It is signed like a release: zipsign, the file name as the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleName {
    /// The version of the agent it installs (see [`ReleaseName::version`]).
    pub version: String,
    /// One of [`RELEASE_ARCHES`].
    pub arch: String,
}

impl BundleName {
    /// Parses `gaffer-offline-VERSION-ARCH-linux.tar.gz`.
    ///
    /// Errors: [`CertError::InvalidRelease`] saying what does not fit.
    pub fn parse(file_name: &str) -> Result<Self, CertError> {
        let invalid = |reason: String| CertError::InvalidRelease { file_name: file_name.to_owned(), reason };
        let middle = file_name
            .strip_prefix(BUNDLE_FILE_PREFIX)
            .and_then(|rest| rest.strip_suffix(RELEASE_FILE_SUFFIX))
            .ok_or_else(|| {
                invalid(format!(
                    "an offline bundle is named {BUNDLE_FILE_PREFIX}VERSION-ARCH{RELEASE_FILE_SUFFIX} (as \
                     installers/build-offline-bundle.sh writes it)"
                ))
            })?;
        // The same rules as a release's name.
        let (version, arch) = version_and_arch(middle).map_err(invalid)?;
        Ok(BundleName { version, arch })
    }

    /// The file name, `gaffer-offline-VERSION-ARCH-linux.tar.gz`.
    pub fn file_name(&self) -> String {
        format!("{BUNDLE_FILE_PREFIX}{}-{}{RELEASE_FILE_SUFFIX}", self.version, self.arch)
    }

    /// The agent release the bundle carries (`packages/` + its file name).
    pub fn agent_release(&self) -> ReleaseName {
        ReleaseName { version: self.version.clone(), arch: self.arch.clone() }
    }

    fn top_dir(&self) -> String {
        format!("{BUNDLE_FILE_PREFIX}{}", self.version)
    }
}

/// What a signed artifact is, from its file name: an agent release or an offline installer bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactKind {
    /// `gaffer-agent-VERSION-ARCH-linux.tar.gz` ([`sign_release`], [`verify_release`]).
    Release(ReleaseName),
    /// `gaffer-offline-VERSION-ARCH-linux.tar.gz` ([`sign_bundle_file`], [`verify_bundle_file`]).
    OfflineBundle(BundleName),
}

impl ArtifactKind {
    /// The kind of the artifact named `file_name`.
    ///
    /// Errors: [`CertError::InvalidRelease`] for a name that is neither.
    pub fn of(file_name: &str) -> Result<Self, CertError> {
        if file_name.starts_with(BUNDLE_FILE_PREFIX) {
            BundleName::parse(file_name).map(ArtifactKind::OfflineBundle)
        } else {
            ReleaseName::parse(file_name).map(ArtifactKind::Release)
        }
    }
}

/// Signs the offline bundle `input`, named `file_name`, into the new file `output` (the bundle
/// with the signature appended; the caller renames it into place). Streams: the bundle is never
/// held in memory. The bundle is checked first as [`verify_bundle_file`] checks it (name, size,
/// layout, `SHA256SUMS` against the files), so nothing mislabelled gets signed.
///
/// Errors: [`CertError::TooLarge`] over [`BUNDLE_BYTES_MAX`]; [`CertError::InvalidRelease`] for
/// a name or content that is not a bundle's; [`CertError::ReleaseAlreadySigned`];
/// [`CertError::Io`].
pub fn sign_bundle_file(
    file_name: &str,
    input: &Path,
    output: &Path,
    key: &ReleaseSigningKey,
) -> Result<ReleaseInfo, CertError> {
    let name = BundleName::parse(file_name)?;
    let mut file = open_bounded(input, BUNDLE_BYTES_MAX)?;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    if zipsign_api::unsign::copy_and_unsign_tar(&mut file, &mut Discard::default()).is_ok() {
        return Err(CertError::ReleaseAlreadySigned { file_name: file_name.to_owned() });
    }
    file.rewind().map_err(io_err(input))?;
    check_bundle_content(file_name, &name, &mut file)?;
    file.rewind().map_err(io_err(input))?;
    let mut out = std::fs::File::create_new(output).map_err(io_err(output))?;
    zipsign_api::sign::copy_and_sign_tar(&mut file, &mut out, std::slice::from_ref(&key.0), Some(file_name.as_bytes()))
        .map_err(|e| CertError::ReleaseSigning { reason: e.to_string() })?;
    out.sync_all().map_err(io_err(output))?;
    drop(out);
    verify_bundle_file(file_name, output, &[key.public_key()])
}

/// Verifies the signed offline bundle at `path`, named `file_name`, against `keys` (any one may
/// have signed it), and checks its content: one top directory `gaffer-offline-VERSION/`, regular
/// files and directories only, inside it; [`BUNDLE_SUMS_FILE`] listing every other file with its
/// SHA-256 (all present and matching); [`BUNDLE_INSTALLER_FILE`] and the agent release in
/// `packages/`. Streams from the file.
///
/// Errors: [`CertError::TooLarge`] over [`BUNDLE_BYTES_MAX`] (checked first, from the file's
/// size); [`CertError::InvalidRelease`]; [`CertError::ReleaseUnsigned`];
/// [`CertError::ReleaseSignatureInvalid`]; [`CertError::Io`].
pub fn verify_bundle_file(file_name: &str, path: &Path, keys: &[ReleasePublicKey]) -> Result<ReleaseInfo, CertError> {
    let name = BundleName::parse(file_name)?;
    let mut file = open_bounded(path, BUNDLE_BYTES_MAX)?;
    let io_err = |source| CertError::Io { path: path.to_path_buf(), source };
    if zipsign_api::unsign::copy_and_unsign_tar(&mut file, &mut Discard::default()).is_err() {
        return Err(CertError::ReleaseUnsigned { file_name: file_name.to_owned() });
    }
    let invalid = || CertError::ReleaseSignatureInvalid {
        file_name: file_name.to_owned(),
        trusted: keys.iter().map(|k| k.fingerprint().to_string()).collect::<Vec<_>>().join(", "),
    };
    let trusted: Vec<VerifyingKey> = keys.iter().map(|k| k.0).collect();
    if trusted.is_empty() {
        return Err(invalid());
    }
    file.rewind().map_err(io_err)?;
    let signer =
        zipsign_api::verify::verify_tar(&mut file, &trusted, Some(file_name.as_bytes())).map_err(|_| invalid())?;
    let signer = keys.get(signer).ok_or_else(invalid)?.fingerprint();
    file.rewind().map_err(io_err)?;
    check_bundle_content(file_name, &name, &mut file)?;
    file.rewind().map_err(io_err)?;
    let (sha256, size_bytes) = sha256_reader(&mut file).map_err(io_err)?;
    Ok(ReleaseInfo {
        file_name: file_name.to_owned(),
        version: name.version,
        arch: name.arch,
        sha256,
        size_bytes,
        signer,
    })
}

/// Opens `path`, refusing a file over `bytes_max` from its size.
fn open_bounded(path: &Path, bytes_max: u64) -> Result<std::fs::File, CertError> {
    let io_err = |source| CertError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > bytes_max {
        return Err(CertError::TooLarge {
            what: "offline bundle",
            len_bytes: usize::try_from(len).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(bytes_max).unwrap_or(usize::MAX),
        });
    }
    Ok(file)
}

/// SHA-256 (lowercase hex) and length of everything `reader` yields.
fn sha256_reader(reader: &mut impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// Unpacks the bundle (bounded) and checks its layout and `SHA256SUMS` (see
/// [`verify_bundle_file`]).
fn check_bundle_content(file_name: &str, name: &BundleName, gz: &mut impl Read) -> Result<(), CertError> {
    use std::collections::BTreeMap;
    let invalid = |reason: String| CertError::InvalidRelease { file_name: file_name.to_owned(), reason };
    let top = name.top_dir();
    let reader = Bounded {
        inner: flate2::read::MultiGzDecoder::new(gz),
        left_bytes: BUNDLE_UNPACKED_BYTES_MAX,
        limit_bytes: BUNDLE_UNPACKED_BYTES_MAX,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| invalid(format!("not a gzip-compressed tar archive: {e}")))?;
    // Path inside the top directory → SHA-256 of every regular file; the sums file's text.
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let mut sums: Option<String> = None;
    for (n, entry) in entries.enumerate() {
        if n >= BUNDLE_ENTRIES_MAX {
            return Err(invalid(format!("more than {BUNDLE_ENTRIES_MAX} entries")));
        }
        let mut entry = entry.map_err(|e| invalid(format!("unreadable tar archive: {e}")))?;
        let path = entry.path().map_err(|e| invalid(format!("unreadable entry name: {e}")))?.into_owned();
        let mut components = path.components().filter(|c| !matches!(c, Component::CurDir));
        match components.next() {
            Some(Component::Normal(first)) if first == top.as_str() => {}
            _ => {
                return Err(invalid(format!(
                    "entry {} is not inside {top}/: the bundle's top directory must name its version",
                    path.display()
                )))
            }
        }
        let mut inner = Vec::new();
        for c in components {
            match c {
                Component::Normal(part) => inner.push(part.to_string_lossy().into_owned()),
                _ => return Err(invalid(format!("entry {} leaves the top directory", path.display()))),
            }
        }
        let inner = inner.join("/");
        match entry.header().entry_type() {
            tar::EntryType::Directory => continue,
            tar::EntryType::Regular => {}
            other => {
                return Err(invalid(format!(
                    "entry {} is a {other:?}: a bundle holds only regular files and directories",
                    path.display()
                )))
            }
        }
        if inner == BUNDLE_SUMS_FILE {
            let mut text = String::new();
            (&mut entry)
                .take(BUNDLE_SUMS_BYTES_MAX + 1)
                .read_to_string(&mut text)
                .map_err(|e| invalid(format!("{BUNDLE_SUMS_FILE} is not text: {e}")))?;
            if text.len() as u64 > BUNDLE_SUMS_BYTES_MAX {
                return Err(invalid(format!("{BUNDLE_SUMS_FILE} is larger than {BUNDLE_SUMS_BYTES_MAX} bytes")));
            }
            sums = Some(text);
        } else {
            let (digest, _) = sha256_reader(&mut entry).map_err(|e| invalid(format!("reading {inner}: {e}")))?;
            if digests.insert(inner.clone(), digest).is_some() {
                return Err(invalid(format!("{inner} appears twice")));
            }
        }
    }
    let sums = sums.ok_or_else(|| invalid(format!("it holds no {top}/{BUNDLE_SUMS_FILE}")))?;
    let mut listed: BTreeMap<String, String> = BTreeMap::new();
    for (i, line) in sums.lines().enumerate() {
        // sha256sum's format: 64 hex digits, two spaces (or space and '*'), the path.
        let (digest, file) = line
            .split_once("  ")
            .or_else(|| line.split_once(" *"))
            .filter(|(d, f)| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) && !f.is_empty())
            .ok_or_else(|| invalid(format!("{BUNDLE_SUMS_FILE} line {} is not `SHA256  FILE`", i + 1)))?;
        let file = file.strip_prefix("./").unwrap_or(file);
        if listed.insert(file.to_owned(), digest.to_ascii_lowercase()).is_some() {
            return Err(invalid(format!("{BUNDLE_SUMS_FILE} lists {file} twice")));
        }
    }
    if listed != digests {
        let missing: Vec<&String> = digests.keys().filter(|f| !listed.contains_key(*f)).collect();
        let absent: Vec<&String> = listed.keys().filter(|f| !digests.contains_key(*f)).collect();
        let differ: Vec<&String> =
            digests.iter().filter(|(f, d)| listed.get(*f).is_some_and(|l| l != *d)).map(|(f, _)| f).collect();
        return Err(invalid(format!(
            "{BUNDLE_SUMS_FILE} does not match the files: unlisted {missing:?}, listed but absent {absent:?}, \
             other content {differ:?}"
        )));
    }
    let release = format!("packages/{}", name.agent_release().file_name());
    for required in [BUNDLE_INSTALLER_FILE, release.as_str()] {
        if !digests.contains_key(required) {
            return Err(invalid(format!("it holds no {top}/{required}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// The first bytes of a 64-bit little-endian ELF program for `machine`, then some code.
    fn elf(machine: u16) -> Vec<u8> {
        let mut b = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
        b.resize(18, 0);
        b.extend_from_slice(&machine.to_le_bytes());
        b.resize(4096, 0x90);
        b
    }

    /// A tarball laid out as build-packages.sh writes it.
    fn tarball(top: &str, binary: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut add = |path: String, data: &[u8], mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_cksum();
            builder.append_data(&mut h, path, data)
        };
        add(format!("{top}/README.md"), b"Gaffer agent\n", 0o644)?;
        add(format!("{top}/bin/gaffer-agent"), binary, 0o755)?;
        add(format!("{top}/config/agent.toml"), b"# data_dir = \"/var/lib/gaffer-agent\"\n", 0o644)?;
        Ok(builder.into_inner()?.finish()?)
    }

    const NAME: &str = "gaffer-agent-1.2.3-x86_64-linux.tar.gz";

    fn good_tarball() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        tarball("gaffer-agent-1.2.3", &elf(62))
    }

    #[test]
    fn a_signed_release_verifies_and_says_what_it_is() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let signed = sign_release(NAME, &good_tarball()?, &key)?;
        let other = ReleaseSigningKey::generate().public_key();
        let info = verify_release(NAME, &signed, &[other, key.public_key()])?;
        assert_eq!(info.version, "1.2.3");
        assert_eq!(info.arch, "x86_64");
        assert_eq!(info.size_bytes, signed.len() as u64);
        assert_eq!(info.sha256, hex::encode(Sha256::digest(&signed)));
        assert_eq!(info.signer, key.public_key().fingerprint());
        // Deterministic: the same tarball signs to the same bytes.
        assert_eq!(sign_release(NAME, &good_tarball()?, &key)?, signed);
        Ok(())
    }

    #[test]
    fn the_signed_file_is_still_a_tarball_with_the_same_content() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let signed = sign_release(NAME, &good_tarball()?, &key)?;
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&signed[..]));
        let mut binary = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            if entry.path()?.ends_with("bin/gaffer-agent") {
                entry.read_to_end(&mut binary)?;
            }
        }
        assert_eq!(binary, elf(62));
        Ok(())
    }

    #[test]
    fn a_changed_byte_is_refused() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let signed = sign_release(NAME, &good_tarball()?, &key)?;
        for at in [0, 12, signed.len() / 2] {
            let mut tampered = signed.clone();
            tampered[at] ^= 0x01;
            let result = verify_release(NAME, &tampered, &[key.public_key()]);
            assert!(matches!(result, Err(CertError::ReleaseSignatureInvalid { .. })), "byte {at}: {result:?}");
        }
        Ok(())
    }

    #[test]
    fn another_key_or_another_name_is_refused() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let signed = sign_release(NAME, &good_tarball()?, &key)?;
        let other = ReleaseSigningKey::generate();
        let result = verify_release(NAME, &signed, &[other.public_key()]);
        match result {
            Err(CertError::ReleaseSignatureInvalid { trusted, .. }) => {
                assert!(trusted.contains(&other.public_key().fingerprint().to_string()))
            }
            other => panic!("expected ReleaseSignatureInvalid, got {other:?}"),
        }
        assert!(matches!(verify_release(NAME, &signed, &[]), Err(CertError::ReleaseSignatureInvalid { .. })));
        // The name is the signature's context: renamed to another version, it no longer verifies.
        let renamed = "gaffer-agent-1.2.4-x86_64-linux.tar.gz";
        let result = verify_release(renamed, &signed, &[key.public_key()]);
        assert!(matches!(result, Err(CertError::ReleaseSignatureInvalid { .. })), "{result:?}");
        Ok(())
    }

    #[test]
    fn an_unsigned_tarball_is_refused() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let result = verify_release(NAME, &good_tarball()?, &[key.public_key()]);
        assert!(matches!(result, Err(CertError::ReleaseUnsigned { .. })), "{result:?}");
        assert!(matches!(verify_release(NAME, b"short", &[key.public_key()]), Err(CertError::ReleaseUnsigned { .. })));
        Ok(())
    }

    #[test]
    fn oversize_artifacts_are_refused_before_they_are_read() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let signed = sign_release(NAME, &good_tarball()?, &key)?;
        let result = verify_release_limited(NAME, &signed, &[key.public_key()], signed.len() as u64 - 1);
        assert!(matches!(result, Err(CertError::TooLarge { .. })), "{result:?}");
        // A sparse file just over 512 MiB: refused from its size, nothing read.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(NAME);
        std::fs::File::create(&path)?.set_len(RELEASE_BYTES_MAX + 1)?;
        match read_release_file(&path) {
            Err(CertError::TooLarge { len_bytes, max_bytes, .. }) => {
                assert_eq!(len_bytes as u64, RELEASE_BYTES_MAX + 1);
                assert_eq!(max_bytes as u64, RELEASE_BYTES_MAX);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        std::fs::write(&path, &signed)?;
        assert_eq!(read_release_file(&path)?, signed);
        Ok(())
    }

    #[test]
    fn signing_refuses_mislabelled_or_signed_tarballs() -> TestResult {
        let key = ReleaseSigningKey::generate();
        // Top directory of another version.
        let result = sign_release(NAME, &tarball("gaffer-agent-1.2.2", &elf(62))?, &key);
        assert!(matches!(&result, Err(CertError::InvalidRelease { reason, .. }) if reason.contains("top directory")));
        // An aarch64 binary named x86_64.
        let result = sign_release(NAME, &tarball("gaffer-agent-1.2.3", &elf(183))?, &key);
        assert!(matches!(&result, Err(CertError::InvalidRelease { reason, .. }) if reason.contains("aarch64")));
        // Not a program.
        let result = sign_release(NAME, &tarball("gaffer-agent-1.2.3", b"#!/bin/sh\necho hi\n")?, &key);
        assert!(matches!(result, Err(CertError::InvalidRelease { .. })), "{result:?}");
        // Not a tarball at all.
        let result = sign_release(NAME, b"not gzip at all", &key);
        assert!(matches!(result, Err(CertError::InvalidRelease { .. })), "{result:?}");
        // Names that are not a release's.
        for bad in [
            "gaffer-agent-1.2.3.tar.gz",
            "gaffer-agent-1.2.3-sparc-linux.tar.gz",
            "gaffer-agent-../x-x86_64-linux.tar.gz",
        ] {
            let result = sign_release(bad, &good_tarball()?, &key);
            assert!(matches!(result, Err(CertError::InvalidRelease { .. })), "{bad}: {result:?}");
        }
        // Already signed.
        let signed = sign_release(NAME, &good_tarball()?, &key)?;
        assert!(matches!(sign_release(NAME, &signed, &key), Err(CertError::ReleaseAlreadySigned { .. })));
        Ok(())
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() -> TestResult {
        let key = ReleaseSigningKey::generate();
        let file = key.to_key_file();
        assert_eq!(file.len(), 64);
        let back = ReleaseSigningKey::from_key_file(&file)?;
        assert_eq!(back.public_key(), key.public_key());
        let public = ReleasePublicKey::from_key_file(key.public_key().as_bytes())?;
        assert_eq!(public, key.public_key());
        assert!(matches!(ReleaseSigningKey::from_key_file(&file[..63]), Err(CertError::InvalidReleaseKey { .. })));
        let mut mismatched = file.clone();
        mismatched[32..].copy_from_slice(ReleaseSigningKey::generate().public_key().as_bytes());
        assert!(matches!(ReleaseSigningKey::from_key_file(&mismatched), Err(CertError::InvalidReleaseKey { .. })));
        assert!(matches!(ReleasePublicKey::from_key_file(&file), Err(CertError::InvalidReleaseKey { .. })));
        assert!(!format!("{key:?}").contains(&hex::encode(&file[..32])), "Debug must not show the secret key");
        Ok(())
    }

    #[test]
    fn fingerprints_are_the_sha256_of_the_public_key_and_parse_back() -> TestResult {
        let public = ReleaseSigningKey::generate().public_key();
        let fp = public.fingerprint();
        assert_eq!(fp.to_string(), hex::encode(Sha256::digest(public.as_bytes())));
        let colons = fp.as_bytes().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        assert_eq!(colons.parse::<ReleaseKeyFingerprint>()?, fp);
        assert!(fp.to_string()[..60].parse::<ReleaseKeyFingerprint>().is_err());
        assert_eq!(serde_json::from_str::<ReleaseKeyFingerprint>(&serde_json::to_string(&fp)?)?, fp);
        Ok(())
    }

    /// A bundle laid out as build-offline-bundle.sh writes it; `sums` overrides SHA256SUMS.
    fn bundle(top: &str, sums: Option<&str>) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let files: Vec<(String, Vec<u8>)> = vec![
            ("install-agent.sh".into(), b"#!/bin/sh\nmain() { :; }\nmain \"$@\"\n".to_vec()),
            ("packages/gaffer-agent-1.2.3-x86_64-linux.tar.gz".into(), good_tarball()?),
            ("wheels/nudenet-3.4.2-py3-none-any.whl".into(), b"PK wheel".to_vec()),
        ];
        let listed: String =
            files.iter().map(|(p, d)| format!("{}  {p}\n", hex::encode(Sha256::digest(d)))).collect::<String>();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut add = |path: String, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append_data(&mut h, path, data)
        };
        add(format!("{top}/SHA256SUMS"), sums.unwrap_or(&listed).as_bytes())?;
        for (p, d) in &files {
            add(format!("{top}/{p}"), d)?;
        }
        Ok(builder.into_inner()?.finish()?)
    }

    const BUNDLE: &str = "gaffer-offline-1.2.3-x86_64-linux.tar.gz";

    #[test]
    fn a_signed_bundle_verifies_streamed_from_its_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let key = ReleaseSigningKey::generate();
        let unsigned = dir.path().join("unsigned.tar.gz");
        std::fs::write(&unsigned, bundle("gaffer-offline-1.2.3", None)?)?;
        let signed = dir.path().join(BUNDLE);
        let info = sign_bundle_file(BUNDLE, &unsigned, &signed, &key)?;
        assert_eq!((info.version.as_str(), info.arch.as_str()), ("1.2.3", "x86_64"));
        let bytes = std::fs::read(&signed)?;
        assert_eq!(info.sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(info.size_bytes, bytes.len() as u64);
        assert_eq!(verify_bundle_file(BUNDLE, &signed, &[key.public_key()])?, info);
        // Signing again is refused; the output is never overwritten.
        let again = dir.path().join("again.tar.gz");
        assert!(matches!(sign_bundle_file(BUNDLE, &signed, &again, &key), Err(CertError::ReleaseAlreadySigned { .. })));
        assert!(matches!(sign_bundle_file(BUNDLE, &unsigned, &signed, &key), Err(CertError::Io { .. })));
        // Another key, a changed byte, another name, no signature: refused.
        let other = ReleaseSigningKey::generate().public_key();
        assert!(matches!(
            verify_bundle_file(BUNDLE, &signed, &[other]),
            Err(CertError::ReleaseSignatureInvalid { .. })
        ));
        let mut tampered = bytes.clone();
        tampered[bytes.len() / 3] ^= 0x01;
        let tampered_path = dir.path().join("tampered.tar.gz");
        std::fs::write(&tampered_path, &tampered)?;
        let result = verify_bundle_file(BUNDLE, &tampered_path, &[key.public_key()]);
        assert!(matches!(result, Err(CertError::ReleaseSignatureInvalid { .. })), "{result:?}");
        let result = verify_bundle_file("gaffer-offline-1.2.4-x86_64-linux.tar.gz", &signed, &[key.public_key()]);
        assert!(matches!(result, Err(CertError::ReleaseSignatureInvalid { .. })), "{result:?}");
        let result = verify_bundle_file(BUNDLE, &unsigned, &[key.public_key()]);
        assert!(matches!(result, Err(CertError::ReleaseUnsigned { .. })), "{result:?}");
        Ok(())
    }

    #[test]
    fn bundles_whose_content_disagrees_are_not_signed() -> TestResult {
        let dir = tempfile::tempdir()?;
        let key = ReleaseSigningKey::generate();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("other version", bundle("gaffer-offline-1.2.2", None)?, "top directory"),
            (
                "wrong sums",
                bundle("gaffer-offline-1.2.3", Some(&format!("{}  install-agent.sh\n", "0".repeat(64))))?,
                "SHA256SUMS",
            ),
            ("no sums", tarball("gaffer-offline-1.2.3", &elf(62))?, "SHA256SUMS"),
        ];
        for (what, bytes, says) in cases {
            let input = dir.path().join(format!("{what}.tar.gz"));
            std::fs::write(&input, bytes)?;
            let result = sign_bundle_file(BUNDLE, &input, &dir.path().join(format!("{what}.signed")), &key);
            assert!(
                matches!(&result, Err(CertError::InvalidRelease { reason, .. }) if reason.contains(says)),
                "{what}: {result:?}"
            );
        }
        // A symlink inside is refused.
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        builder.append_link(&mut h, "gaffer-offline-1.2.3/install-agent.sh", "/etc/passwd")?;
        let input = dir.path().join("link.tar.gz");
        std::fs::write(&input, builder.into_inner()?.finish()?)?;
        let result = sign_bundle_file(BUNDLE, &input, &dir.path().join("link.signed"), &key);
        assert!(
            matches!(&result, Err(CertError::InvalidRelease { reason, .. }) if reason.contains("Symlink")),
            "{result:?}"
        );
        Ok(())
    }

    #[test]
    fn artifact_kinds_come_from_the_name() -> TestResult {
        assert!(matches!(ArtifactKind::of(NAME)?, ArtifactKind::Release(_)));
        match ArtifactKind::of(BUNDLE)? {
            ArtifactKind::OfflineBundle(b) => {
                assert_eq!(b.file_name(), BUNDLE);
                assert_eq!(b.agent_release().file_name(), NAME);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "gaffer-offline-1.2.3.tar.gz",
            "gaffer-offline-x-x86_64-linux.tar.gz",
            "gaffer-offline-1-sparc-linux.tar.gz",
        ] {
            assert!(matches!(ArtifactKind::of(bad), Err(CertError::InvalidRelease { .. })), "{bad}");
        }
        Ok(())
    }
}
