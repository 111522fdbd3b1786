//! Configuration files: `/etc/gaffer/agent.toml` ([`DEFAULT_CONFIG_PATH`]), read by
//! `gaffer-agent run --config FILE` and checked by `gaffer-agent validate --config FILE`.
//!
//! The file is TOML. Every setting of `run` is a top-level key named like its flag with `-`
//! written `_`: `--job-timeout 10m` is `job_timeout = "10m"`, `--watch /mnt/a --watch /mnt/b` is
//! `watch = ["/mnt/a", "/mnt/b"]`, `--offline` is `offline = true`. Durations and sizes are the
//! strings the flags take. A flag given on the command line overrides the file, and the file
//! overrides the defaults: [`RunOptions::or`] then [`RunOptions::resolve`], the one place where
//! defaults apply. `installers/config/agent.toml` lists every key with its default.
//!
//! [`check`] reports every problem of a file at once, each with its line and column
//! ([`Problem`]), with the checker of [`gaffer_service::config_file`]: the document is parsed with
//! spans (`toml::de::DeTable`, recovering after a syntax error), every key is looked up in
//! [`RUN_KEYS`], and every value goes on its own through the parser and range check its flag
//! uses. Unknown keys are errors (a misspelt key never quietly
//! means "the default"); paths must be absolute (the file is read from any working directory).
//!
//! Secrets never go in the file: the enrollment token is given to `enroll` only, and the agent's
//! key and certificate live in its data directory.
//!
//! Limits: a file larger than [`CONFIG_BYTES_MAX`] is refused before it is read; at most
//! [`PROBLEMS_MAX`] problems are listed.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gaffer_protocol::messages::Profile;
use gaffer_service::config_file::{
    self as file, boolean, dash_hint, flag_integer, flag_integer_u32, integer, integer_u32, parsed, string, Bad, Doc,
};
pub use gaffer_service::config_file::{Problem, CONFIG_BYTES_MAX, PROBLEMS_MAX};
use gaffer_service::ServiceError;
use toml::de::DeValue;
use toml::Spanned;

/// Where the packages install the agent's configuration file. Read only when given with
/// `--config` (or `GAFFER_AGENT_CONFIG`).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gaffer/agent.toml";

/// `slots` (`--slots`): jobs run at once, 1..=64.
pub const SLOTS_RANGE: RangeInclusive<u64> = 1..=64;
/// Default of `slots`: 1.
pub const SLOTS_DEFAULT: u32 = 1;
/// `watch_settle_secs` (`--watch-settle-secs`): any number of seconds.
pub const WATCH_SETTLE_SECS_RANGE: RangeInclusive<u64> = 0..=u64::MAX;
/// Default of `watch_profile`: `shots`.
pub const WATCH_PROFILE_DEFAULT: Profile = Profile::Shots;

/// The keys of the file: the settings of `run`, named like their flags.
pub const RUN_KEYS: &[&str] = &[
    "data_dir",
    "volume",
    "watch",
    "slots",
    "watch_settle_secs",
    "watch_profile",
    "offline",
    "job_timeout",
    "job_memory_max",
    "control",
];

/// Most control-plane addresses `control` may list.
pub const CONTROL_ADDRS_MAX: usize = 16;

/// The settings of `gaffer-agent run` as one source gives them (the command line, or a
/// configuration file): `None` where that source does not set one. The field names are the
/// file's keys; the flags are the same names with `-`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct RunOptions {
    /// Data directory made by `enroll`. Required (as a flag or in the configuration file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory this agent may read job files from (repeatable). Given as flags, they replace
    /// the file's list. Default: none.
    #[arg(long)]
    pub volume: Option<Vec<PathBuf>>,
    /// Directory to watch for new media files; each becomes a job (repeatable; also a volume).
    /// Given as flags, they replace the file's list. Default: none.
    #[arg(long)]
    pub watch: Option<Vec<PathBuf>>,
    /// Jobs to run at once, 1..=64. Default: 1.
    #[arg(long, value_parser = |t: &str| flag_integer_u32(t, &SLOTS_RANGE))]
    pub slots: Option<u32>,
    /// Seconds a watched file must stay unchanged before it is analyzed. Default: 2.
    #[arg(long, value_parser = |t: &str| flag_integer(t, &WATCH_SETTLE_SECS_RANGE))]
    pub watch_settle_secs: Option<u64>,
    /// Profile of the jobs made from watch-folder files: `shots` or `full` (`full` needs the
    /// models: `gaffer-agent models fetch`). Default: shots.
    #[arg(long)]
    pub watch_profile: Option<Profile>,
    /// Air-gapped: no link to the control plane; results wait in the outbox for
    /// `gaffer-agent bundle export`. `--offline=false` overrides `offline = true` in the file.
    /// Default: false.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub offline: Option<bool>,
    /// Wall-time limit of one job's analysis worker, e.g. `20m`, `1h30m`, `90s` (units ms, s, m,
    /// h, d). Default: max(10 min, 4 × the media's duration), 60 min when the file does not say
    /// its duration. A job past it fails ("analysis worker exceeded the 20 min time limit").
    #[arg(long, value_parser = crate::worker::parse_duration)]
    pub job_timeout: Option<Duration>,
    /// Resident-memory limit of one job's analysis worker, in bytes or with a unit: `4GiB`,
    /// `512MiB`, `2G` (every unit is a power of 1024).
    /// Default: max(1 GiB, 75 % of this box's memory / slots). Polled every 200 ms; a worker
    /// above it is killed and its job fails ("analysis worker exceeded the 4 GiB memory limit").
    #[arg(long, value_parser = crate::worker::parse_bytes)]
    pub job_memory_max: Option<u64>,
    /// Control-plane QUIC address `HOST:PORT` to connect to (repeatable, at most 16): replicas of
    /// one control plane sharing one database. The link tries them in order and fails over to the
    /// next with jittered back-off when one is unreachable or goes away. Given as flags, they
    /// replace the file's list. Default: the address the agent enrolled with (`agent.json`).
    #[arg(long, value_parser = parse_control_addr)]
    pub control: Option<Vec<String>>,
}

/// Checks one control-plane address: `HOST:PORT` with a host and a port 1..=65535 (the host is
/// resolved only when connecting).
///
/// # Errors
/// A message saying what is wrong, e.g. `"cp.example" has no port; write HOST:PORT, e.g. "cp.example:7443"`.
pub fn parse_control_addr(text: &str) -> Result<String, String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port; write HOST:PORT, e.g. \"{text}:7443\""));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{text:?} has no host; write HOST:PORT, e.g. \"cp.example:{port}\""));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(text.to_owned()),
        _ => Err(format!("{text:?}: the port must be a number 1..=65535")),
    }
}

/// The settings `run` uses: [`RunOptions`] with the defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Directories job files may come from (the watch folders are added by `run`).
    pub volume: Vec<PathBuf>,
    /// Watch folders.
    pub watch: Vec<PathBuf>,
    /// Jobs run at once.
    pub slots: u32,
    /// Seconds a watched file must stay unchanged.
    pub watch_settle_secs: u64,
    /// Profile of watch-folder jobs.
    pub watch_profile: Profile,
    /// No link to the control plane.
    pub offline: bool,
    /// Fixed wall-time limit of a worker; `None`: scaled to each media file.
    pub job_timeout: Option<Duration>,
    /// Fixed memory limit of a worker, bytes; `None`: from this box's memory and `slots`.
    pub job_memory_max: Option<u64>,
    /// Control-plane addresses in failover order; empty: the one in `agent.json`.
    pub control: Vec<String>,
}

impl RunOptions {
    /// These options, with the settings they leave unset taken from `fallback` (the flags `or`
    /// the file).
    pub fn or(self, fallback: RunOptions) -> RunOptions {
        RunOptions {
            data_dir: self.data_dir.or(fallback.data_dir),
            volume: self.volume.or(fallback.volume),
            watch: self.watch.or(fallback.watch),
            slots: self.slots.or(fallback.slots),
            watch_settle_secs: self.watch_settle_secs.or(fallback.watch_settle_secs),
            watch_profile: self.watch_profile.or(fallback.watch_profile),
            offline: self.offline.or(fallback.offline),
            job_timeout: self.job_timeout.or(fallback.job_timeout),
            job_memory_max: self.job_memory_max.or(fallback.job_memory_max),
            control: self.control.or(fallback.control),
        }
    }

    /// The settings with the defaults applied where nothing is set.
    ///
    /// # Errors
    /// [`ServiceError::MissingSetting`] without a data directory.
    pub fn resolve(self) -> Result<RunSettings, ServiceError> {
        Ok(RunSettings {
            data_dir: self.data_dir.ok_or(ServiceError::MissingSetting { flag: "--data-dir", key: "data_dir" })?,
            volume: self.volume.unwrap_or_default(),
            watch: self.watch.unwrap_or_default(),
            slots: self.slots.unwrap_or(SLOTS_DEFAULT),
            watch_settle_secs: self.watch_settle_secs.unwrap_or(crate::watch::SETTLE_SECS_DEFAULT),
            watch_profile: self.watch_profile.unwrap_or(WATCH_PROFILE_DEFAULT),
            offline: self.offline.unwrap_or(false),
            job_timeout: self.job_timeout,
            job_memory_max: self.job_memory_max,
            control: self.control.unwrap_or_default(),
        })
    }
}

impl RunSettings {
    /// The settings as a configuration file that [`check`] reads back to the same settings (what
    /// `run --print-config` prints). Settings whose default depends on the box or the media are
    /// left out when not set, with a comment.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        let path = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned());
        table.insert("data_dir".into(), path(&self.data_dir));
        table.insert("volume".into(), toml::Value::Array(self.volume.iter().map(|p| path(p)).collect()));
        table.insert("watch".into(), toml::Value::Array(self.watch.iter().map(|p| path(p)).collect()));
        table.insert("slots".into(), toml::Value::Integer(self.slots.into()));
        table.insert(
            "watch_settle_secs".into(),
            match i64::try_from(self.watch_settle_secs) {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => toml::Value::String(self.watch_settle_secs.to_string()),
            },
        );
        table.insert("watch_profile".into(), toml::Value::String(self.watch_profile.to_string()));
        table.insert("offline".into(), toml::Value::Boolean(self.offline));
        if !self.control.is_empty() {
            let addrs = self.control.iter().map(|a| toml::Value::String(a.clone())).collect();
            table.insert("control".into(), toml::Value::Array(addrs));
        }
        let mut notes = String::new();
        match self.job_timeout {
            Some(d) => {
                table.insert("job_timeout".into(), toml::Value::String(humantime::format_duration(d).to_string()));
            }
            None => notes.push_str("# job_timeout: not set: max(10 min, 4 × each media file's duration)\n"),
        }
        match self.job_memory_max {
            Some(bytes) => {
                table.insert("job_memory_max".into(), toml::Value::String(size_text(bytes)));
            }
            None => notes.push_str("# job_memory_max: not set: max(1 GiB, 75 % of this box's memory / slots)\n"),
        }
        format!("{table}{notes}")
    }
}

/// `bytes` as `parse_bytes` reads it back: with the largest binary unit that divides it.
fn size_text(bytes: u64) -> String {
    for (unit, name) in [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Reads the configuration file at `path` and checks it with [`check`] (`validate` runs
/// [`file::validate`] with it).
///
/// # Errors
/// [`ServiceError::ConfigFile`] with every problem; the file is read only up to [`CONFIG_BYTES_MAX`].
pub fn load(path: &Path) -> Result<RunOptions, ServiceError> {
    file::load(path, "gaffer-agent", check)
}

/// Checks a configuration file's text and gives the options it sets.
///
/// # Errors
/// Every problem found, in file order (at most [`PROBLEMS_MAX`], the last one then counting the
/// rest): syntax errors, unknown keys (with a hint when the key is a flag's spelling, a table or a
/// secret), values of the wrong type, and values the key's flag would refuse (same parser, same
/// range). Values a syntax error damaged are not checked further.
pub fn check(text: &str) -> Result<RunOptions, Vec<Problem>> {
    let (mut doc, root) = Doc::parse(text);
    let mut options = RunOptions::default();
    for (key, value) in root.get_ref() {
        let name = key.get_ref().as_ref();
        if !RUN_KEYS.contains(&name) {
            doc.report(key.span(), Some(name), unknown_key(name));
            continue;
        }
        if doc.is_damaged(&value.span()) {
            continue;
        }
        match apply_run_key(&mut options, name, value) {
            Ok(true) => {}
            Ok(false) => doc.report(key.span(), Some(name), unknown_key(name)),
            Err(bad) => doc.report(bad.span, Some(name), bad.message),
        }
    }
    doc.finish().map(|()| options)
}

/// Sets `key` from `value`: `Ok(false)` for a key `run` does not have.
fn apply_run_key(o: &mut RunOptions, key: &str, value: &Spanned<DeValue<'_>>) -> Result<bool, Bad> {
    match key {
        "data_dir" => o.data_dir = Some(path(value)?),
        "volume" => o.volume = Some(paths(value)?),
        "watch" => o.watch = Some(paths(value)?),
        "slots" => o.slots = Some(integer_u32(value, &SLOTS_RANGE)?),
        "watch_settle_secs" => o.watch_settle_secs = Some(integer(value, &WATCH_SETTLE_SECS_RANGE)?),
        "watch_profile" => o.watch_profile = Some(parsed(value, "\"shots\"", |s| s.parse::<Profile>())?),
        "offline" => o.offline = Some(boolean(value)?),
        "control" => o.control = Some(control_addrs(value)?),
        "job_timeout" => o.job_timeout = Some(parsed(value, "\"20m\"", crate::worker::parse_duration)?),
        "job_memory_max" => {
            o.job_memory_max = Some(match value.get_ref() {
                // A plain number of bytes reads as the flag would read its digits.
                DeValue::Integer(_) => crate::worker::parse_bytes(&integer(value, &(1..=u64::MAX))?.to_string())
                    .map_err(|e| Bad::at(value, e))?,
                _ => parsed(value, "\"4GiB\"", crate::worker::parse_bytes)?,
            })
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The message for an unknown key, with a hint where one helps.
fn unknown_key(key: &str) -> String {
    if let Some(hint) = dash_hint(key, |k| RUN_KEYS.contains(&k)) {
        return hint;
    }
    let lower = key.to_ascii_lowercase();
    if ["token", "password", "secret", "private_key"].iter().any(|s| lower.contains(s)) {
        return "unknown key: secrets never go in this file; the enrollment token is given to \
                `gaffer-agent enroll --token` only, and the agent's key stays in its data directory"
            .into();
    }
    if key == "run" {
        return "unknown key: the settings of `gaffer-agent run` go at the top of the file, not in a [run] table"
            .into();
    }
    format!("unknown key (the keys are: {})", RUN_KEYS.join(", "))
}

/// Paths are shown as this in messages.
const PATH_EXAMPLE: &str = "\"/var/lib/gaffer-agent\"";

/// An absolute path.
fn path(value: &Spanned<DeValue<'_>>) -> Result<PathBuf, Bad> {
    if string(value, PATH_EXAMPLE)?.is_empty() {
        return Err(Bad::at(value, "empty path"));
    }
    file::absolute_path(value, PATH_EXAMPLE)
}

/// An array of absolute paths; a bad element is reported where it is.
fn paths(value: &Spanned<DeValue<'_>>) -> Result<Vec<PathBuf>, Bad> {
    match value.get_ref() {
        DeValue::Array(items) => items.iter().map(path).collect(),
        other => Err(Bad::at(
            value,
            format!("expected an array of paths, e.g. [\"/mnt/media\"]; found {}", file::kind(other)),
        )),
    }
}

/// A non-empty array of at most [`CONTROL_ADDRS_MAX`] `HOST:PORT` strings; a bad element is
/// reported where it is.
fn control_addrs(value: &Spanned<DeValue<'_>>) -> Result<Vec<String>, Bad> {
    const EXAMPLE: &str = "[\"cp-a.example:7443\", \"cp-b.example:7443\"]";
    match value.get_ref() {
        DeValue::Array(items) if items.is_empty() => Err(Bad::at(
            value,
            format!("an empty list; leave the key out to use agent.json's address, or write {EXAMPLE}"),
        )),
        DeValue::Array(items) if items.len() > CONTROL_ADDRS_MAX => {
            Err(Bad::at(value, format!("{} addresses; at most {CONTROL_ADDRS_MAX}", items.len())))
        }
        DeValue::Array(items) => items
            .iter()
            .map(|item| parse_control_addr(string(item, "\"cp.example:7443\"")?).map_err(|m| Bad::at(item, m)))
            .collect(),
        other => Err(Bad::at(
            value,
            format!("expected an array of HOST:PORT strings, e.g. {EXAMPLE}; found {}", file::kind(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_accepted_with_a_good_value_and_nothing_else_is() {
        let good = [
            ("data_dir", "\"/d\""),
            ("volume", "[\"/v\"]"),
            ("watch", "[]"),
            ("slots", "2"),
            ("watch_settle_secs", "0"),
            ("watch_profile", "\"full\""),
            ("offline", "true"),
            ("job_timeout", "\"1h 30m\""),
            ("job_memory_max", "\"4GiB\""),
            ("control", "[\"cp:7443\"]"),
        ];
        assert_eq!(good.map(|(k, _)| k).as_slice(), RUN_KEYS);
        for (key, value) in good {
            let opts = check(&format!("{key} = {value}\n")).unwrap_or_else(|p| panic!("{key}: {p:?}"));
            assert_ne!(opts, RunOptions::default(), "{key} set nothing");
        }
    }

    #[test]
    fn a_truncated_list_counts_the_rest() {
        let text: String = (0..150).map(|i| format!("unknown_{i} = 1\n")).collect();
        let problems = check(&text).expect_err("all unknown");
        assert_eq!(problems.len(), PROBLEMS_MAX);
        assert_eq!(problems[PROBLEMS_MAX - 1].message, "51 more problems not listed");
    }

    #[test]
    fn control_addresses_are_checked_where_they_are() {
        let problems = check("control = [\"cp-a:7443\", \"cp-b\"]\n").expect_err("a bad address");
        let messages: Vec<_> = problems.iter().map(|p| (p.column.unwrap_or(0), p.message.as_str())).collect();
        assert_eq!(messages, [(25, "\"cp-b\" has no port; write HOST:PORT, e.g. \"cp-b:7443\"")]);
        let problems = check("control = [\":9\"]\n").expect_err("no host");
        assert_eq!(problems[0].message, "\":9\" has no host; write HOST:PORT, e.g. \"cp.example:9\"");
        assert!(check("control = []\n").is_err(), "an empty list is refused");
        let ok = check("control = [\"cp-a:7443\", \"cp-b:7443\"]\n").expect("good list");
        assert_eq!(ok.control, Some(vec!["cp-a:7443".to_owned(), "cp-b:7443".to_owned()]));
    }

    #[test]
    fn printed_settings_read_back_the_same() {
        let settings = RunSettings {
            data_dir: "/var/lib/gaffer-agent".into(),
            volume: vec!["/mnt/a".into(), "/mnt/b b".into()],
            watch: vec!["/mnt/w".into()],
            slots: 4,
            watch_settle_secs: 7,
            watch_profile: Profile::Full,
            offline: true,
            job_timeout: Some(Duration::from_millis(5_400_250)),
            job_memory_max: Some(3 << 29),
            control: vec!["cp-a.test:7443".into(), "[::1]:7443".into()],
        };
        let text = settings.to_toml();
        let back = check(&text).unwrap_or_else(|p| panic!("{p:?}\n{text}")).resolve().map_err(|e| e.to_string());
        assert_eq!(back, Ok(settings), "{text}");
    }
}
