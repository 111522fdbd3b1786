//! Releases: the release key and the signed agent artifacts this control plane hosts.
//!
//! ```text
//! RELEASE_KEY_DIR/            made by `gaffer-control release keygen --out DIR` (0700)
//!   release.key               the Ed25519 signing key pair, zipsign's 64 bytes, 0600 (keep it offline)
//!   release.pub               its public key, 32 bytes, 0644: what agents pin
//! DATA_DIR/
//!   release-key.json          {"release_key_dir": "/abs/dir"} (`init --release-key-dir`)
//!   releases/index.json       every added release (JSON, written atomically; at most RELEASES_MAX)
//!   releases/<version>/gaffer-agent-<version>-<arch>-linux.tar.gz   the signed artifact, 0644
//! ```
//!
//! **The key.** `init --release-key-dir DIR` records where the key lives. Small studios keep the
//! whole pair there, beside the data directory, and `release add` signs with it. Careful studios
//! keep only `release.pub` there and the pair offline: they sign with `gaffer-control release sign`
//! on the offline machine (no data directory needed) and add the result with
//! `--signature-already-embedded`, which only verifies. The recorded directory may be empty at
//! `init`: the key is read when it is needed ([`ReleaseKeySource`] notices a `release.pub` that
//! appears or changes), so agents enrolled before it existed get it over the link.
//!
//! **What is offered to agents.** [`ReleaseKeySource::current`]: the public key in the recorded
//! directory, sent in every enrollment answer and after every Welcome (protocol 4). Agents pin the
//! first one they see and refuse any other later (`gaffer_agent::release_key`).
//!
//! **Adding.** [`Releases::add`] (the admin socket's `add_release`, audited as `release_add`):
//! the artifact is refused over [`gaffer_certs::RELEASE_BYTES_MAX`] before it is read, signed (or,
//! signed offline, verified) and checked by [`gaffer_certs::verify_release`] against the release
//! public key, then stored. A release is identified by (version, architecture): the same bytes
//! again change nothing; other bytes under the same version and architecture are refused (a
//! release never changes: build a new version).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use gaffer_certs::{
    read_release_file, sign_bundle_file, sign_release, verify_release, ArtifactKind, CertError, ReleaseInfo,
    ReleaseKeyFingerprint, ReleaseName, ReleasePublicKey, ReleaseSigningKey, BUNDLE_FILE_PREFIX, RELEASE_KEY_FILE,
    RELEASE_PUB_FILE,
};
use serde::{Deserialize, Serialize};

use crate::admin::{self, AdminRequest, AdminResponse};
use crate::datadir::DataDir;
use crate::store::{audit_action, Actor, AuditRecord, Store, StoreError};

/// Most releases the index holds.
pub const RELEASES_MAX: usize = 1000;
/// Largest `releases/index.json` read, bytes (4 MiB; a release's entry is ~400 bytes).
pub const RELEASE_INDEX_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Largest `release-key.json` read, bytes.
const RELEASE_KEY_CONFIG_BYTES_MAX: u64 = 64 * 1024;

/// Errors of the release commands.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// No release key is known: neither `--release-key-dir` nor one recorded by `init`.
    #[error(
        "this control plane has no release key directory: pass --release-key-dir DIR (made by `gaffer-control \
         release keygen --out DIR`), or record one with `gaffer-control init --release-key-dir DIR`"
    )]
    NoReleaseKey,
    /// The release key directory lacks what the command needs, or holds keys that disagree.
    #[error("release key directory {dir}: {detail}")]
    KeyDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The key that would sign or verify the release is not the one agents are offered.
    #[error(
        "{dir} holds release key {given}, but this control plane offers agents {offered} (from {recorded}): agents \
         would refuse releases signed by it; use the recorded key directory"
    )]
    NotTheOfferedKey {
        /// The directory given.
        dir: PathBuf,
        /// Its key's fingerprint.
        given: ReleaseKeyFingerprint,
        /// The key agents are offered.
        offered: ReleaseKeyFingerprint,
        /// The recorded directory.
        recorded: PathBuf,
    },
    /// Other bytes are already added under this version and architecture.
    #[error(
        "release {version} ({arch}) is already added with other content (sha256 {sha256}); a release never \
         changes: build it as a new version"
    )]
    VersionTaken {
        /// The version.
        version: String,
        /// The architecture.
        arch: String,
        /// SHA-256 of the release already added.
        sha256: String,
    },
    /// The index holds [`RELEASES_MAX`] releases.
    #[error("the release index is full ({RELEASES_MAX} releases)")]
    IndexFull,
    /// The artifact or a key was refused (size, name, content, signature, key format).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file of the data or key directory is not what it should be.
    #[error("{path}: {detail}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The store failed (audit log).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory is not usable, or the running control plane refused the request.
    #[error("{0}")]
    Admin(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io { path: path.to_path_buf(), source }
}

/// `DATA_DIR/release-key.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseKeyConfig {
    /// Absolute path of the release key directory.
    pub release_key_dir: PathBuf,
}

/// `DATA_DIR/release-key.json`.
pub fn release_key_config_path(dd: &DataDir) -> PathBuf {
    dd.root().join("release-key.json")
}

/// Records `dir` (made absolute) as the control plane's release key directory (`init
/// --release-key-dir`). The directory may not exist yet.
///
/// # Errors
/// [`ReleaseError::Io`].
pub fn record_release_key_dir(dd: &DataDir, dir: &Path) -> Result<PathBuf, ReleaseError> {
    let dir = std::path::absolute(dir).map_err(io_err(dir))?;
    let config = ReleaseKeyConfig { release_key_dir: dir.clone() };
    let json = serde_json::to_vec_pretty(&config).map_err(|e| ReleaseError::Admin(e.to_string()))?;
    write_public_atomic(&release_key_config_path(dd), &json)?;
    Ok(dir)
}

/// The recorded release key directory; None when `init` recorded none.
///
/// # Errors
/// [`ReleaseError::Io`], [`ReleaseError::BadFile`].
pub fn recorded_release_key_dir(dd: &DataDir) -> Result<Option<PathBuf>, ReleaseError> {
    let path = release_key_config_path(dd);
    let Some(bytes) = read_bounded(&path, RELEASE_KEY_CONFIG_BYTES_MAX)? else { return Ok(None) };
    let config: ReleaseKeyConfig = serde_json::from_slice(&bytes)
        .map_err(|e| ReleaseError::BadFile { path: path.clone(), detail: e.to_string() })?;
    Ok(Some(config.release_key_dir))
}

/// A release key directory (`release.key`, `release.pub`).
#[derive(Debug, Clone)]
pub struct ReleaseKeyDir {
    dir: PathBuf,
}

impl ReleaseKeyDir {
    /// The directory at `dir` (not checked).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `release.key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(RELEASE_KEY_FILE)
    }

    /// `release.pub`.
    pub fn pub_path(&self) -> PathBuf {
        self.dir.join(RELEASE_PUB_FILE)
    }

    /// The signing key; None when the directory holds none (the pair is kept offline).
    ///
    /// # Errors
    /// [`ReleaseError::Io`]; [`ReleaseError::Cert`] for a file that is not a key pair;
    /// [`ReleaseError::KeyDir`] when `release.pub` is another key's.
    pub fn signing_key(&self) -> Result<Option<ReleaseSigningKey>, ReleaseError> {
        let Some(bytes) = read_bounded(&self.key_path(), 1024)? else { return Ok(None) };
        let key = ReleaseSigningKey::from_key_file(&bytes)?;
        if let Some(public) = self.public_key_file()? {
            if public != key.public_key() {
                return Err(self.disagree(&key.public_key(), &public));
            }
        }
        Ok(Some(key))
    }

    /// The public key: `release.pub`, or the public half of `release.key` when there is no
    /// `release.pub`; None when the directory holds neither.
    ///
    /// # Errors
    /// As [`ReleaseKeyDir::signing_key`].
    pub fn public_key(&self) -> Result<Option<ReleasePublicKey>, ReleaseError> {
        match self.public_key_file()? {
            Some(public) => {
                // A pair beside it must be the same key.
                self.signing_key()?;
                Ok(Some(public))
            }
            None => Ok(self.signing_key()?.map(|k| k.public_key())),
        }
    }

    fn public_key_file(&self) -> Result<Option<ReleasePublicKey>, ReleaseError> {
        read_bounded(&self.pub_path(), 1024)?
            .map(|b| ReleasePublicKey::from_key_file(&b).map_err(Into::into))
            .transpose()
    }

    fn disagree(&self, pair: &ReleasePublicKey, public: &ReleasePublicKey) -> ReleaseError {
        ReleaseError::KeyDir {
            dir: self.dir.clone(),
            detail: format!(
                "{RELEASE_KEY_FILE} is key {} but {RELEASE_PUB_FILE} is key {}: keep the pair and its own public key",
                pair.fingerprint(),
                public.fingerprint()
            ),
        }
    }
}

/// What `release keygen` made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeygenReport {
    /// The key directory.
    pub dir: PathBuf,
    /// `release.key` (0600).
    pub key_path: PathBuf,
    /// `release.pub` (0644).
    pub pub_path: PathBuf,
    /// SHA-256 of the public key, hex.
    pub fingerprint: ReleaseKeyFingerprint,
}

/// Makes a release key pair in `out` (created 0700 if missing): `release.key` 0600 and
/// `release.pub` 0644. Refuses to overwrite either.
///
/// # Errors
/// [`ReleaseError::KeyDir`] when a key file exists; [`ReleaseError::Io`], [`ReleaseError::Cert`].
pub fn keygen(out: &Path) -> Result<KeygenReport, ReleaseError> {
    let kd = ReleaseKeyDir::new(std::path::absolute(out).map_err(io_err(out))?);
    for path in [kd.key_path(), kd.pub_path()] {
        if path.exists() {
            return Err(ReleaseError::KeyDir {
                dir: kd.dir.clone(),
                detail: format!(
                    "{} exists; refusing to overwrite a release key (agents pin it): pick another --out",
                    path.display()
                ),
            });
        }
    }
    if !kd.dir.exists() {
        gaffer_certs::create_private_dir(&kd.dir)?;
    }
    let key = ReleaseSigningKey::generate();
    gaffer_certs::write_secret_file(&kd.key_path(), &key.to_key_file())?;
    write_public_atomic(&kd.pub_path(), key.public_key().as_bytes())?;
    Ok(KeygenReport {
        key_path: kd.key_path(),
        pub_path: kd.pub_path(),
        fingerprint: key.public_key().fingerprint(),
        dir: kd.dir,
    })
}

/// What `release sign` wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignReport {
    /// The signed file.
    pub path: PathBuf,
    /// What it is.
    pub version: String,
    /// Its architecture.
    pub arch: String,
    /// SHA-256 of the signed file, hex.
    pub sha256: String,
    /// Its size, bytes.
    pub size_bytes: u64,
    /// The signing key's fingerprint.
    pub signer_fingerprint: ReleaseKeyFingerprint,
}

/// Signs the release tarball or offline installer bundle `file` (told apart by name:
/// [`gaffer_certs::ArtifactKind`]) with the pair in `key_dir` and writes the signed file, under the
/// same name (the signature covers it), into the directory `out_dir`. For the offline machine: no
/// data directory is involved. Bundles are streamed (they may be GiBs).
///
/// # Errors
/// [`ReleaseError::KeyDir`] without a signing key or when the output exists;
/// [`ReleaseError::Cert`] for a refused artifact; [`ReleaseError::Io`].
pub fn sign_file(file: &Path, key_dir: &Path, out_dir: &Path) -> Result<SignReport, ReleaseError> {
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ReleaseError::BadFile { path: file.to_path_buf(), detail: "not a release file name".into() })?
        .to_owned();
    let kind = ArtifactKind::of(&file_name)?;
    let kd = ReleaseKeyDir::new(key_dir);
    let key = kd.signing_key()?.ok_or_else(|| ReleaseError::KeyDir {
        dir: kd.dir.clone(),
        detail: format!("it holds no {RELEASE_KEY_FILE}: sign on the machine that keeps the key pair"),
    })?;
    let out = out_dir.join(&file_name);
    if out.exists() {
        return Err(ReleaseError::KeyDir {
            dir: kd.dir.clone(),
            detail: format!("{} exists; refusing to overwrite it (give another --out directory)", out.display()),
        });
    }
    let info = match kind {
        ArtifactKind::Release(_) => {
            let signed = sign_release(&file_name, &read_release_file(file)?, &key)?;
            let info = verify_release(&file_name, &signed, &[key.public_key()])?;
            write_public_atomic(&out, &signed)?;
            info
        }
        ArtifactKind::OfflineBundle(_) => {
            let tmp = out_dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let signed = sign_bundle_file(&file_name, file, &tmp, &key).and_then(|info| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                    .and_then(|()| std::fs::rename(&tmp, &out))
                    .map_err(|source| CertError::Io { path: out.clone(), source })?;
                Ok(info)
            });
            if signed.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            signed?
        }
    };
    Ok(SignReport {
        path: out,
        version: info.version,
        arch: info.arch,
        sha256: info.sha256,
        size_bytes: info.size_bytes,
        signer_fingerprint: info.signer,
    })
}

fn release_file_name(file: &Path) -> Result<String, ReleaseError> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ReleaseError::BadFile { path: file.to_path_buf(), detail: "not a release file name".into() })?;
    ReleaseName::parse(name)?;
    Ok(name.to_owned())
}

/// The release key offered to agents (enrollment answers, `ReleaseKey` after each Welcome): the
/// public key in the recorded release key directory, re-read when `release.pub` appears or
/// changes (a stat per call). Cheap to share ([`std::sync::Arc`]).
#[derive(Debug)]
pub struct ReleaseKeySource {
    dir: Option<ReleaseKeyDir>,
    cache: Mutex<Option<CachedKey>>,
}

/// `release.pub`'s modification time and size (None: absent), and the key read then.
type CachedKey = (Option<(SystemTime, u64)>, Option<ReleasePublicKey>);

impl ReleaseKeySource {
    /// The source for the data directory `dd` (reads `release-key.json` once).
    ///
    /// # Errors
    /// As [`recorded_release_key_dir`].
    pub fn open(dd: &DataDir) -> Result<Self, ReleaseError> {
        Ok(Self { dir: recorded_release_key_dir(dd)?.map(ReleaseKeyDir::new), cache: Mutex::new(None) })
    }

    /// A source that offers no key (tests, tools).
    pub fn none() -> Self {
        Self { dir: None, cache: Mutex::new(None) }
    }

    /// The key to offer now; None when no directory is recorded or it holds no key yet. A key
    /// directory that cannot be read is logged (once per change) and offers nothing.
    pub fn current(&self) -> Option<ReleasePublicKey> {
        let kd = self.dir.as_ref()?;
        let stamp = std::fs::metadata(kd.pub_path()).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_stamp, key)) = cache.as_ref() {
            // Without release.pub the pair is read every time (rare: keygen writes both).
            if stamp.is_some() && *cached_stamp == stamp {
                return *key;
            }
        }
        let key = match kd.public_key() {
            Ok(key) => key,
            Err(e) => {
                tracing::error!(error = %e, "the release key cannot be read; agents are offered none");
                None
            }
        };
        *cache = Some((stamp, key));
        key
    }
}

/// One added release, as `releases/index.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRecord {
    /// The version.
    pub version: String,
    /// The architecture (`uname -m`), e.g. `x86_64`.
    pub arch: String,
    /// `gaffer-agent-VERSION-ARCH-linux.tar.gz`.
    pub file_name: String,
    /// SHA-256 of the signed artifact, hex.
    pub sha256: String,
    /// Size of the signed artifact, bytes.
    pub size_bytes: u64,
    /// When it was added, Unix milliseconds.
    pub added_at_ms: u64,
    /// Who added it (audit actor).
    pub added_by: String,
    /// Fingerprint of the release key that signed it.
    pub signer_fingerprint: ReleaseKeyFingerprint,
}

/// A release as `release list` shows it: the record and its time as RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseListing {
    /// The record.
    #[serde(flatten)]
    pub record: ReleaseRecord,
    /// `added_at_ms` as RFC 3339 UTC.
    pub added_at: String,
}

impl ReleaseListing {
    fn of(record: ReleaseRecord) -> Self {
        Self { added_at: admin::rfc3339_ms(record.added_at_ms), record }
    }
}

/// What `release add` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddReleaseReport {
    /// The release.
    pub release: ReleaseListing,
    /// Where the signed artifact is stored.
    pub path: PathBuf,
    /// True when these exact bytes were added before (nothing changed).
    pub already_present: bool,
    /// True when this control plane signed it (false: it came signed).
    pub signed_here: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseIndex {
    releases: Vec<ReleaseRecord>,
}

/// One writer of the index at a time in this process; other processes cannot open the data
/// directory's store meanwhile (sled's lock), and `add` runs only where the store is open.
static INDEX_LOCK: Mutex<()> = Mutex::new(());

/// The releases of a data directory.
#[derive(Debug, Clone)]
pub struct Releases {
    dd: DataDir,
}

impl Releases {
    /// The releases of `dd`.
    pub fn new(dd: &DataDir) -> Self {
        Self { dd: dd.clone() }
    }

    /// `DATA_DIR/releases`.
    pub fn dir(&self) -> PathBuf {
        self.dd.root().join("releases")
    }

    fn index_path(&self) -> PathBuf {
        self.dir().join("index.json")
    }

    /// Where the artifact of `record` is stored.
    pub fn artifact_path(&self, record: &ReleaseRecord) -> PathBuf {
        self.dir().join(&record.version).join(&record.file_name)
    }

    /// Every release, oldest first.
    ///
    /// # Errors
    /// [`ReleaseError::Io`], [`ReleaseError::BadFile`] for an unreadable index.
    pub fn list(&self) -> Result<Vec<ReleaseRecord>, ReleaseError> {
        Ok(self.load_index()?.releases)
    }

    /// The release `version` for `arch`, if added.
    ///
    /// # Errors
    /// As [`Releases::list`].
    pub fn get(&self, version: &str, arch: &str) -> Result<Option<ReleaseRecord>, ReleaseError> {
        Ok(self.list()?.into_iter().find(|r| r.version == version && r.arch == arch))
    }

    /// Adds the release artifact `file` (see the [module docs](self)): signs it with the pair in
    /// `key_dir` (default: the recorded directory), or with `signature_already_embedded` only
    /// verifies it against the directory's public key. Audited as `release_add` by `actor`
    /// unless nothing changed.
    ///
    /// # Errors
    /// [`ReleaseError::NoReleaseKey`], [`ReleaseError::KeyDir`] (no key, or no signing key
    /// without `signature_already_embedded`), [`ReleaseError::NotTheOfferedKey`],
    /// [`ReleaseError::Cert`] (too large, not a release, unsigned, signature invalid),
    /// [`ReleaseError::VersionTaken`], [`ReleaseError::IndexFull`], I/O and store errors.
    pub fn add(
        &self,
        store: &dyn Store,
        actor: &Actor,
        file: &Path,
        key_dir: Option<&Path>,
        signature_already_embedded: bool,
    ) -> Result<AddReleaseReport, ReleaseError> {
        let file_name = release_file_name(file)?;
        let recorded = recorded_release_key_dir(&self.dd)?;
        let kd =
            ReleaseKeyDir::new(key_dir.map(Path::to_path_buf).or(recorded.clone()).ok_or(ReleaseError::NoReleaseKey)?);
        let public = kd.public_key()?.ok_or_else(|| ReleaseError::KeyDir {
            dir: kd.dir.clone(),
            detail: format!(
                "it holds neither {RELEASE_PUB_FILE} nor {RELEASE_KEY_FILE}: make them with `gaffer-control release keygen --out {}`",
                kd.dir.display()
            ),
        })?;
        if let Some(recorded) = recorded.filter(|r| *r != kd.dir) {
            if let Some(offered) = ReleaseKeyDir::new(&recorded).public_key()? {
                if offered != public {
                    return Err(ReleaseError::NotTheOfferedKey {
                        dir: kd.dir.clone(),
                        given: public.fingerprint(),
                        offered: offered.fingerprint(),
                        recorded,
                    });
                }
            }
        }
        let bytes = read_release_file(file)?;
        let signed = if signature_already_embedded {
            bytes
        } else {
            let key = kd.signing_key()?.ok_or_else(|| ReleaseError::KeyDir {
                dir: kd.dir.clone(),
                detail: format!(
                    "it holds only {RELEASE_PUB_FILE}, no {RELEASE_KEY_FILE} to sign with: sign the artifact where the key \
                     pair is (`gaffer-control release sign --file FILE --release-key-dir DIR --out OUT`) and add the \
                     signed file with --signature-already-embedded"
                ),
            })?;
            sign_release(&file_name, &bytes, &key)?
        };
        let info = verify_release(&file_name, &signed, &[public])?;
        self.store_release(store, actor, info, &signed, !signature_already_embedded)
    }

    fn store_release(
        &self,
        store: &dyn Store,
        actor: &Actor,
        info: ReleaseInfo,
        signed: &[u8],
        signed_here: bool,
    ) -> Result<AddReleaseReport, ReleaseError> {
        let _guard = INDEX_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut index = self.load_index()?;
        if let Some(existing) = index.releases.iter().find(|r| r.version == info.version && r.arch == info.arch) {
            if existing.sha256 != info.sha256 {
                return Err(ReleaseError::VersionTaken {
                    version: info.version,
                    arch: info.arch,
                    sha256: existing.sha256.clone(),
                });
            }
            return Ok(AddReleaseReport {
                path: self.artifact_path(existing),
                release: ReleaseListing::of(existing.clone()),
                already_present: true,
                signed_here,
            });
        }
        if index.releases.len() >= RELEASES_MAX {
            return Err(ReleaseError::IndexFull);
        }
        let now = crate::now_ms();
        let record = ReleaseRecord {
            version: info.version,
            arch: info.arch,
            file_name: info.file_name,
            sha256: info.sha256,
            size_bytes: info.size_bytes,
            added_at_ms: now,
            added_by: actor.to_string(),
            signer_fingerprint: info.signer,
        };
        let path = self.artifact_path(&record);
        let version_dir = self.dir().join(&record.version);
        std::fs::create_dir_all(&version_dir).map_err(io_err(&version_dir))?;
        // The artifact first, then the index that makes it a release.
        write_public_atomic(&path, signed)?;
        index.releases.push(record.clone());
        let json = serde_json::to_vec_pretty(&index).map_err(|e| ReleaseError::Admin(e.to_string()))?;
        write_public_atomic(&self.index_path(), &json)?;
        store.append_audit(&AuditRecord::new(actor, audit_action::RELEASE_ADD, now).detail(format!(
            "gaffer-agent {} ({}), sha256 {}, {} bytes, signed by {}{}",
            record.version,
            record.arch,
            record.sha256,
            record.size_bytes,
            record.signer_fingerprint,
            if signed_here { " (signed here)" } else { " (signed offline)" }
        )))?;
        store.flush()?;
        Ok(AddReleaseReport { release: ReleaseListing::of(record), path, already_present: false, signed_here })
    }

    fn load_index(&self) -> Result<ReleaseIndex, ReleaseError> {
        let path = self.index_path();
        match read_bounded(&path, RELEASE_INDEX_BYTES_MAX)? {
            None => Ok(ReleaseIndex::default()),
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| ReleaseError::BadFile { path, detail: e.to_string() })
            }
        }
    }
}

/// Reads `path` whole if it exists and is at most `bytes_max` bytes.
fn read_bounded(path: &Path, bytes_max: u64) -> Result<Option<Vec<u8>>, ReleaseError> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReleaseError::Io { path: path.to_path_buf(), source: e }),
    };
    let mut bytes = Vec::new();
    file.take(bytes_max + 1).read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() as u64 > bytes_max {
        return Err(ReleaseError::BadFile {
            path: path.to_path_buf(),
            detail: format!("larger than {bytes_max} bytes"),
        });
    }
    Ok(Some(bytes))
}

/// Writes a public file atomically: a temporary file in the same directory, fsync, mode 0644,
/// rename over `path`, fsync of the directory.
fn write_public_atomic(path: &Path, contents: &[u8]) -> Result<(), ReleaseError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ReleaseError::Io { path: path.to_path_buf(), source }
    })
}

/// `gaffer-control release …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ReleaseCommand {
    /// Make an Ed25519 release key pair (zipsign's format) in --out: release.key (0600, keep it
    /// offline or beside the data directory) and release.pub (what agents pin). Refuses to
    /// overwrite. Needs no data directory.
    Keygen {
        /// Directory for the key files (created 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Print `{"dir", "key_path", "pub_path", "fingerprint"}`.
        #[arg(long)]
        json: bool,
    },
    /// Sign a release tarball (or an offline installer bundle) with the key pair in
    /// --release-key-dir, on the machine that keeps it (no data directory needed); add a signed
    /// release with `release add --signature-already-embedded`.
    Sign {
        /// The tarball, `gaffer-agent-VERSION-ARCH-linux.tar.gz` (installers/build-packages.sh), or
        /// an offline bundle, `gaffer-offline-VERSION-ARCH-linux.tar.gz`
        /// (installers/build-offline-bundle.sh).
        #[arg(long)]
        file: PathBuf,
        /// Directory holding release.key.
        #[arg(long)]
        release_key_dir: PathBuf,
        /// Directory to write the signed file to, under the same name (the signature covers it).
        #[arg(long)]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a release tarball to the control plane: sign it with the release key (or, with
    /// --signature-already-embedded, only verify an artifact signed offline) and keep it for
    /// rollouts. Works while `serve` runs (through its admin socket).
    Add {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The tarball, `gaffer-agent-VERSION-ARCH-linux.tar.gz`.
        #[arg(long)]
        file: PathBuf,
        /// Release key directory (default: the one `init --release-key-dir` recorded).
        #[arg(long)]
        release_key_dir: Option<PathBuf>,
        /// The file is signed already (`gaffer-control release sign` on the offline machine):
        /// verify it against the release public key, do not sign.
        #[arg(long)]
        signature_already_embedded: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the releases added: version, architecture, SHA-256, size, when, signing key.
    List {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `release` command and returns what to print. `add` and `list` go through the running
/// server's admin socket, or act on the data directory themselves when none runs.
///
/// # Errors
/// [`ReleaseError`] saying what to do.
pub async fn run_command(command: ReleaseCommand) -> Result<String, ReleaseError> {
    match command {
        ReleaseCommand::Keygen { out, json } => {
            let r = keygen(&out)?;
            Ok(if json {
                to_json(&r)
            } else {
                format!(
                    "Release key {}\n  signing key: {} (0600: keep it offline, or beside the data directory for a small studio)\n  public key:  {}\nAgents pin this key at enrollment; record the directory with `gaffer-control init --release-key-dir {}`.\n",
                    r.fingerprint,
                    r.key_path.display(),
                    r.pub_path.display(),
                    r.dir.display()
                )
            })
        }
        ReleaseCommand::Sign { file, release_key_dir, out, json } => {
            let r = sign_file(&file, &release_key_dir, &out)?;
            let bundle = r.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(BUNDLE_FILE_PREFIX));
            Ok(if json {
                to_json(&r)
            } else if bundle {
                format!(
                    "Signed the offline bundle for gaffer-agent {} ({}) with release key {}\n  {} ({} bytes, sha256 {})\nOn the box: `sh install-agent.sh --offline-bundle FILE --bundle-sha256 {} ...`.\n",
                    r.version,
                    r.arch,
                    r.signer_fingerprint,
                    r.path.display(),
                    r.size_bytes,
                    r.sha256,
                    r.sha256
                )
            } else {
                format!(
                    "Signed gaffer-agent {} ({}) with release key {}\n  {} ({} bytes, sha256 {})\nAdd it with `gaffer-control release add --file {} --signature-already-embedded`.\n",
                    r.version,
                    r.arch,
                    r.signer_fingerprint,
                    r.path.display(),
                    r.size_bytes,
                    r.sha256,
                    r.path.display()
                )
            })
        }
        ReleaseCommand::Add { data_dir, file, release_key_dir, signature_already_embedded, json } => {
            let req = AdminRequest::AddRelease {
                file: std::path::absolute(&file).map_err(io_err(&file))?,
                release_key_dir: release_key_dir
                    .as_deref()
                    .map(|d| std::path::absolute(d).map_err(io_err(d)))
                    .transpose()?,
                signature_already_embedded,
            };
            let report = match admin_or_local(&data_dir, &req).await? {
                AdminResponse::ReleaseAdded(r) => r,
                other => {
                    return Err(ReleaseError::Admin(format!("unexpected answer from the control plane: {other:?}")))
                }
            };
            Ok(if json {
                to_json(&report)
            } else {
                let r = &report.release.record;
                let what = match (report.already_present, report.signed_here) {
                    (true, _) => "was already added (same bytes); nothing changed",
                    (false, true) => "added, signed here",
                    (false, false) => "added, signed offline",
                };
                format!(
                    "gaffer-agent {} ({}) {what}\n  {} ({} bytes, sha256 {})\n  signed by release key {}\n",
                    r.version,
                    r.arch,
                    report.path.display(),
                    r.size_bytes,
                    r.sha256,
                    r.signer_fingerprint
                )
            })
        }
        ReleaseCommand::List { data_dir, json } => {
            let releases = match admin_or_local(&data_dir, &AdminRequest::ListReleases).await? {
                AdminResponse::Releases { releases } => releases,
                other => {
                    return Err(ReleaseError::Admin(format!("unexpected answer from the control plane: {other:?}")))
                }
            };
            if json {
                return Ok(to_json(&releases));
            }
            let mut out =
                format!("{:<16} {:<8} {:>11} {:<21} {:<16} SHA256\n", "VERSION", "ARCH", "BYTES", "ADDED", "SIGNED BY");
            for l in &releases {
                let r = &l.record;
                let signer = r.signer_fingerprint.to_string();
                out.push_str(&format!(
                    "{:<16} {:<8} {:>11} {:<21} {:<16} {}\n",
                    r.version,
                    r.arch,
                    r.size_bytes,
                    l.added_at,
                    &signer[..16],
                    r.sha256
                ));
            }
            if releases.is_empty() {
                out.push_str("(none: add one with `gaffer-control release add --file TARBALL`)\n");
            }
            Ok(out)
        }
    }
}

/// The admin socket of a running server, or this process on the data directory.
async fn admin_or_local(data_dir: &Path, req: &AdminRequest) -> Result<AdminResponse, ReleaseError> {
    let dd = DataDir::new(data_dir);
    dd.load_config().map_err(|e| ReleaseError::Admin(e.to_string()))?;
    if let Some(resp) =
        admin::request(&dd.admin_socket_path(), req).await.map_err(|e| ReleaseError::Admin(e.to_string()))?
    {
        return Ok(resp);
    }
    let store = crate::store::sled_store::SledStore::open(&dd.store_path()).map_err(|e| {
        ReleaseError::Admin(format!("opening the store (is another gaffer-control process using this data dir?): {e}"))
    })?;
    let dd2 = dd.clone();
    let req = req.clone();
    tokio::task::spawn_blocking(move || handle_admin(&dd2, &store, &admin::local_actor(), req))
        .await
        .map_err(|e| ReleaseError::Admin(format!("internal error: {e}")))?
}

/// Performs a release admin request ([`AdminRequest::AddRelease`],
/// [`AdminRequest::ListReleases`]) on the data directory `dd` by `actor`; the admin socket and
/// the CLI without a server both call it.
///
/// # Errors
/// [`ReleaseError`]; [`ReleaseError::Admin`] for a request that is not a release request.
pub fn handle_admin(
    dd: &DataDir,
    store: &dyn Store,
    actor: &Actor,
    req: AdminRequest,
) -> Result<AdminResponse, ReleaseError> {
    let releases = Releases::new(dd);
    match req {
        AdminRequest::AddRelease { file, release_key_dir, signature_already_embedded } => releases
            .add(store, actor, &file, release_key_dir.as_deref(), signature_already_embedded)
            .map(AdminResponse::ReleaseAdded),
        AdminRequest::ListReleases => {
            Ok(AdminResponse::Releases { releases: releases.list()?.into_iter().map(ReleaseListing::of).collect() })
        }
        other => Err(ReleaseError::Admin(format!("{} is not a release request", other.action()))),
    }
}

/// Pretty JSON of a command's result, with a line end.
fn to_json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}
