//! The registry of installed, verified runtime libraries and models.

use std::path::{Path, PathBuf};

use gaffer_protocol::digest::ModelStamp;
use gaffer_protocol::messages::ModelRef;
use serde::{Deserialize, Serialize};

use super::manifest::{self, ItemKind, ManifestItem, MANIFEST};
use super::{sha256_file, ModelsError};

/// Largest `manifest.json` read, bytes (checked before reading).
const INSTALLED_MANIFEST_BYTES_MAX: u64 = 64 * 1024;

/// `manifest.json` written next to each installed item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledManifest {
    /// Registry name, e.g. `"silero-vad"`.
    pub name: String,
    /// `"model"` or `"runtime"`.
    pub kind: String,
    /// Package version, e.g. `"6.2.3"`.
    pub version: String,
    /// Where it came from: `pypi:<package>==<version>`.
    pub source: String,
    /// The wheel file it was extracted from.
    pub wheel_file: String,
    /// SHA-256 of that wheel, lowercase hex.
    pub wheel_sha256: String,
    /// SHA-256 of the primary file (model or `libonnxruntime.so.*`), lowercase hex.
    pub sha256: String,
    /// Installed files (names inside the item directory), primary first.
    pub files: Vec<String>,
    /// License as the package declares it.
    pub license: String,
    /// When it was installed, Unix milliseconds.
    pub installed_at_ms: u64,
}

impl InstalledManifest {
    pub(crate) fn for_item(item: &ManifestItem, installed_at_ms: u64) -> Self {
        Self {
            name: item.name.to_owned(),
            kind: kind_str(item.kind).to_owned(),
            version: item.version.to_owned(),
            source: item.source(),
            wheel_file: item.wheel_file.to_owned(),
            wheel_sha256: item.wheel_sha256.to_owned(),
            sha256: item.sha256().to_owned(),
            files: item.members.iter().map(|m| m.file_name().to_owned()).collect(),
            license: item.license.to_owned(),
            installed_at_ms,
        }
    }
}

fn kind_str(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Model => "model",
        ItemKind::Runtime => "runtime",
    }
}

/// Whether a manifest item is installed and verified.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemState {
    /// Not installed (no `manifest.json`).
    Missing,
    /// Installed and every file's SHA-256 matches the compiled-in manifest.
    Verified {
        /// When it was installed, Unix milliseconds.
        installed_at_ms: u64,
    },
    /// Installed but failed verification; the reason says why. It is treated as not installed.
    Broken {
        /// What failed.
        reason: String,
    },
}

/// One manifest item and its state on this box.
#[derive(Debug, Clone)]
pub struct ItemStatus {
    /// The compiled-in manifest entry.
    pub item: &'static ManifestItem,
    /// Installed, missing or broken.
    pub state: ItemState,
    /// The item's directory (`DATA_DIR/models/<name>` or `DATA_DIR/runtime/<name>`).
    pub dir: PathBuf,
}

impl ItemStatus {
    /// True when installed and verified.
    pub fn is_verified(&self) -> bool {
        matches!(self.state, ItemState::Verified { .. })
    }

    /// Path of the primary file (model or runtime library), whether or not it exists.
    pub fn primary_path(&self) -> PathBuf {
        self.dir.join(self.item.primary().file_name())
    }
}

/// The runtime libraries and models installed under an agent data directory, verified by
/// SHA-256 when opened (the result is cached; reopen to see later installs).
#[derive(Debug, Clone)]
pub struct Registry {
    data_dir: PathBuf,
    items: Vec<ItemStatus>,
}

impl Registry {
    /// Opens the registry of `data_dir`, hashing every installed file (a few hundred MB at
    /// most, about a second). A data dir with nothing installed gives an empty registry.
    ///
    /// # Errors
    /// [`ModelsError::Io`] only when a directory exists but cannot be read; individual items
    /// that fail verification are reported as [`ItemState::Broken`], not as errors.
    pub fn open(data_dir: &Path) -> Result<Registry, ModelsError> {
        let mut items = Vec::with_capacity(MANIFEST.len());
        for item in MANIFEST {
            let dir = item_dir(data_dir, item);
            let state = match verify_item(item, &dir) {
                Ok(state) => state,
                Err(ModelsError::Io { path, source }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(ModelsError::Io { path, source })
                }
                Err(e) => {
                    tracing::warn!(item = item.name, error = %e, "installed item failed verification; treating it as not installed");
                    ItemState::Broken { reason: e.to_string() }
                }
            };
            items.push(ItemStatus { item, state, dir });
        }
        Ok(Registry { data_dir: data_dir.to_path_buf(), items })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Every manifest item with its state, in manifest order (runtimes first).
    pub fn items(&self) -> &[ItemStatus] {
        &self.items
    }

    /// Models installed and verified, for [`Capabilities::models`](gaffer_protocol::messages::Capabilities::models).
    pub fn installed(&self) -> Vec<ModelRef> {
        self.items
            .iter()
            .filter(|s| s.item.kind == ItemKind::Model && s.is_verified())
            .map(|s| ModelRef {
                name: s.item.name.to_owned(),
                version: s.item.version.to_owned(),
                sha256: s.item.sha256().to_owned(),
            })
            .collect()
    }

    /// True when every model in `names` is installed and verified (e.g. [`Profile::required_models`](gaffer_protocol::messages::Profile::required_models)).
    pub fn has_all(&self, names: &[&str]) -> bool {
        names.iter().all(|n| self.verified(n).is_some())
    }

    /// Path of the verified model file named `name`.
    ///
    /// # Errors
    /// [`ModelsError::NotInstalled`] when it is not installed or failed verification.
    pub fn model_path(&self, name: &str) -> Result<PathBuf, ModelsError> {
        self.verified(name).filter(|s| s.item.kind == ItemKind::Model).map(ItemStatus::primary_path).ok_or_else(|| {
            ModelsError::NotInstalled { name: name.to_owned(), data_dir: self.data_dir.display().to_string() }
        })
    }

    /// The digest stamp (name, version, SHA-256) of the verified model `name`.
    pub fn stamp(&self, name: &str) -> Option<ModelStamp> {
        self.verified(name).filter(|s| s.item.kind == ItemKind::Model).map(|s| ModelStamp {
            name: s.item.name.to_owned(),
            version: s.item.version.to_owned(),
            sha256: s.item.sha256().to_owned(),
        })
    }

    /// The verified runtime named `name` ([`manifest::RUNTIME_CPU`] or [`manifest::RUNTIME_GPU`]).
    pub fn runtime(&self, name: &str) -> Option<&ItemStatus> {
        self.verified(name).filter(|s| s.item.kind == ItemKind::Runtime)
    }

    fn verified(&self, name: &str) -> Option<&ItemStatus> {
        self.items.iter().find(|s| s.item.name == name && s.is_verified())
    }
}

/// `DATA_DIR/models/<name>` or `DATA_DIR/runtime/<name>`.
pub(crate) fn item_dir(data_dir: &Path, item: &ManifestItem) -> PathBuf {
    let sub = match item.kind {
        ItemKind::Model => "models",
        ItemKind::Runtime => "runtime",
    };
    data_dir.join(sub).join(item.name)
}

/// Reads `dir/manifest.json` and hashes every file of `item` in `dir`.
pub(crate) fn verify_item(item: &ManifestItem, dir: &Path) -> Result<ItemState, ModelsError> {
    let manifest_path = dir.join("manifest.json");
    let meta = match std::fs::metadata(&manifest_path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ItemState::Missing),
        Err(e) => return Err(ModelsError::io(&manifest_path, e)),
    };
    let bad = |detail: String| ModelsError::BadManifest { path: manifest_path.display().to_string(), detail };
    if meta.len() > INSTALLED_MANIFEST_BYTES_MAX {
        return Err(bad(format!("{} bytes, more than {INSTALLED_MANIFEST_BYTES_MAX}", meta.len())));
    }
    let text = std::fs::read(&manifest_path).map_err(|e| ModelsError::io(&manifest_path, e))?;
    let installed: InstalledManifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if installed.name != item.name || installed.version != item.version || installed.sha256 != item.sha256() {
        return Err(bad(format!(
            "records {} {} (sha256 {}), this agent pins {} {} (sha256 {}); run `models fetch` again",
            installed.name,
            installed.version,
            installed.sha256,
            item.name,
            item.version,
            item.sha256()
        )));
    }
    for member in item.members {
        let path = dir.join(member.file_name());
        let actual = sha256_file(&path)?;
        if actual != member.sha256 {
            return Err(ModelsError::MemberHashMismatch {
                member: path.display().to_string(),
                expected: member.sha256.to_owned(),
                actual,
            });
        }
    }
    Ok(ItemState::Verified { installed_at_ms: installed.installed_at_ms })
}

/// The manifest entry named `name`.
///
/// # Errors
/// [`ModelsError::UnknownItem`] listing the known names.
pub fn known_item(name: &str) -> Result<&'static ManifestItem, ModelsError> {
    manifest::item(name).ok_or_else(|| ModelsError::UnknownItem {
        name: name.to_owned(),
        known: MANIFEST.iter().map(|i| i.name).collect::<Vec<_>>().join(", "),
    })
}
