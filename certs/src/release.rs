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
        let (version, arch) =
            middle.rsplit_once('-').ok_or_else(|| invalid("the name has no -ARCH after the version".into()))?;
        check_version(version).map_err(invalid)?;
        if elf_machine_of(arch).is_none() {
            return Err(invalid(format!(
                "unknown architecture {arch:?} (known: {})",
                RELEASE_ARCHES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(ReleaseName { version: version.to_owned(), arch: arch.to_owned() })
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
    let reader = Bounded { inner: flate2::read::MultiGzDecoder::new(gz), left_bytes: RELEASE_UNPACKED_BYTES_MAX };
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
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left_bytes = self.left_bytes.checked_sub(n as u64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unpacks to more than {RELEASE_UNPACKED_BYTES_MAX} bytes"),
            )
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
}
