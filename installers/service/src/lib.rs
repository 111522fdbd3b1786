//! `gaffer-service`: what `gaffer-agent` and `gaffer-control` share as installed services — the
//! binaries' side of `installers/` (packages, systemd units, example configuration).
//!
//! * [`config_file`]: configuration files under `/etc/gaffer` (TOML): reading them within a size
//!   limit, the spanned parse each program's checker is built from (every problem with its line
//!   and column, recovering after syntax errors), the value readers that share their parsers and
//!   ranges with the flags, and what `validate` prints (text or `--json`). Each program keeps its
//!   own keys, option structs and merging of flags over the file over the defaults.
//! * [`notify`]: the systemd notify protocol for `Type=notify` units (`READY=1`, `STATUS=`,
//!   `STOPPING=1`) and a watchdog task that feeds `WATCHDOG=1` only while the process is healthy.
//!   Each program supplies its own status report.
//!
//! Architecture invariant: nothing here requires systemd. Every [`notify`] call is a no-op without
//! `NOTIFY_SOCKET`, and a notification that cannot be sent is logged, never an error.
#![warn(missing_docs)]

use std::path::PathBuf;

pub mod config_file;
pub mod notify;

use config_file::Problem;

/// What can go wrong in this crate: a configuration file, or the settings that flags and the file
/// give together, cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The configuration file cannot be used. Fix every problem listed (`PROGRAM validate --config
    /// FILE` lists the same ones) and start again; nothing was started.
    #[error("{}", config_file::render_problems(.program, .path, .problems))]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The program that read it, e.g. `gaffer-agent`, for the `validate` command the message
        /// names.
        program: &'static str,
        /// Every problem found, in file order (at most [`config_file::PROBLEMS_MAX`]).
        problems: Vec<Problem>,
    },
    /// A setting without a default is set neither by a flag nor in the configuration file. Give
    /// the flag or set the key.
    #[error("{flag} is required (or `{key} = ...` in the configuration file)")]
    MissingSetting {
        /// The flag, e.g. `--data-dir`.
        flag: &'static str,
        /// The file's key, e.g. `data_dir`.
        key: &'static str,
    },
    /// A setting needs another one that is set neither by a flag nor in the configuration file.
    /// Give that flag or set its key too (or drop the first).
    #[error("{flag} needs {needs} (or `{needs_key} = ...` in the configuration file)")]
    SettingNeeds {
        /// The flag that is set, e.g. `--http-tls-cert`.
        flag: &'static str,
        /// The flag it needs, e.g. `--http-tls-key`.
        needs: &'static str,
        /// The file's key for it, e.g. `http_tls_key`.
        needs_key: &'static str,
    },
}
