//! `gaffer-agent validate` and `run --config`: the real binary on real files. Every problem of a
//! file is listed at once with its line; the shipped example validates; flags override the file;
//! a file over 1 MiB (or an endless one) is refused unread; a flag and its key accept and refuse
//! the same values.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use gaffer_agent::config::{self, RunOptions, CONFIG_BYTES_MAX, RUN_KEYS};

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `gaffer-agent ARGS` (with no config from the environment) and kills it after 60 s: a
/// bound on correctness, so a read that never ends fails the test instead of hanging it.
fn agent(args: &[&str]) -> Result<Output> {
    agent_with(args, &[])
}

fn agent_with(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gaffer-agent"));
    cmd.args(args).env_remove("GAFFER_AGENT_CONFIG").env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            bail!("gaffer-agent {args:?} ran for more than 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().context("stdout")?.read_to_string(&mut stdout)?;
    child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    Ok(Output { code: status.code(), stdout, stderr })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The `FILE:LINE:COLUMN: KEY: MESSAGE` lines of `validate` for `path`, as (line, column, rest).
fn listed(stdout: &str, path: &Path) -> Vec<(usize, usize, String)> {
    let prefix = format!("{}:", path.display());
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let column = parts.next()?.parse().ok()?;
            Some((line, column, parts.next()?.trim().to_owned()))
        })
        .collect()
}

const MISTAKES: &str = r#"# An agent configuration with eight mistakes.
data_dir = "DATA_DIR"
slots = 65
job_timeout = "10 parsecs"
watch_settle_secs = "2"
volumes = ["/mnt/a"]
volume = ["/mnt/a", "media"]
job_memory_max = "lots"
token = "gaffer-enroll-abc"

[run]
slots = 2
"#;

/// (line, column, key, a part of the message) of every mistake in [`MISTAKES`].
const MISTAKES_FOUND: [(usize, usize, &str, &str); 8] = [
    (3, 9, "slots", "65 is out of range: 1..=64"),
    (4, 15, "job_timeout", "\"10 parsecs\" is not a duration"),
    (5, 21, "watch_settle_secs", "expected an integer (at least 0); found a string"),
    (6, 1, "volumes", "unknown key (the keys are: data_dir, volume, watch,"),
    (7, 21, "volume", "\"media\" is a relative path"),
    (8, 18, "job_memory_max", "\"lots\" is not a size"),
    (9, 1, "token", "secrets never go in this file"),
    (11, 2, "run", "go at the top of the file, not in a [run] table"),
];

#[test]
fn validate_lists_every_mistake_with_its_line_and_column() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), "agent.toml", &MISTAKES.replace("DATA_DIR", "/var/lib/gaffer-agent"))?;
    let out = agent(&["validate", "--config", s(&file)])?;
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let found = listed(&out.stdout, &file);
    assert_eq!(found.len(), MISTAKES_FOUND.len(), "{}", out.stdout);
    for ((line, column, rest), (want_line, want_column, key, message)) in found.iter().zip(MISTAKES_FOUND) {
        assert_eq!((*line, *column), (want_line, want_column), "{key}: {rest}");
        assert!(rest.starts_with(&format!("{key}: ")) && rest.contains(message), "line {line}: {rest}");
    }
    assert!(out.stdout.ends_with(&format!("{}: 8 problems\n", file.display())), "{}", out.stdout);

    let out = agent(&["validate", "--config", s(&file), "--json"])?;
    assert_eq!(out.code, Some(1));
    let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(report["ok"], false);
    let errors = report["errors"].as_array().context("errors")?;
    let lines = errors.iter().map(|e| (e["line"].as_u64(), e["key"].as_str())).collect::<Vec<_>>();
    let want = MISTAKES_FOUND.iter().map(|m| (Some(m.0 as u64), Some(m.2))).collect::<Vec<_>>();
    assert_eq!(lines, want);
    for e in errors {
        let mut fields = e.as_object().context("an error object")?.keys().cloned().collect::<Vec<_>>();
        fields.sort();
        assert_eq!(fields, ["column", "key", "line", "message"]);
    }
    Ok(())
}

#[test]
fn run_refuses_to_start_with_a_bad_file_and_prints_every_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let file = write(dir.path(), "agent.toml", &MISTAKES.replace("DATA_DIR", s(&data_dir)))?;
    let out = agent(&["run", "--config", s(&file)])?;
    assert_ne!(out.code, Some(0));
    for (line, column, key, _) in MISTAKES_FOUND {
        let at = format!("{}:{line}:{column}: {key}: ", file.display());
        assert!(out.stderr.contains(&at), "{at} missing from:\n{}", out.stderr);
    }
    assert!(out.stderr.contains("8 problems"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("gaffer-agent validate --config {}", file.display())), "{}", out.stderr);
    assert!(!data_dir.exists(), "nothing was started or created");
    Ok(())
}

#[test]
fn a_syntax_error_is_reported_at_its_line_with_the_other_problems() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), "agent.toml", "slots = 2\njob_timeout = 10m\nbogus = true\nslots_max = 3\n")?;
    let out = agent(&["validate", "--config", s(&file)])?;
    assert_eq!(out.code, Some(1));
    let found = listed(&out.stdout, &file);
    assert_eq!(found.len(), 3, "{}", out.stdout);
    assert_eq!(found[0].0, 2, "the syntax error is on line 2: {}", out.stdout);
    assert!(found[0].2.starts_with("TOML syntax: "), "{}", out.stdout);
    assert_eq!((found[1].0, found[1].2.split(':').next()), (3, Some("bogus")));
    assert_eq!((found[2].0, found[2].2.split(':').next()), (4, Some("slots_max")));

    // An unclosed array at the end of the file: the line it is reported at is the last one.
    let file = write(dir.path(), "open.toml", "data_dir = \"/d\"\nvolume = [\"/a\",\n")?;
    let out = agent(&["validate", "--config", s(&file)])?;
    let found = listed(&out.stdout, &file);
    assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), [2], "{}", out.stdout);
    Ok(())
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/config/agent.toml")
}

#[test]
fn the_example_file_validates_and_lists_every_key_with_its_default() -> Result<()> {
    let out = agent(&["validate", "--config", s(&example())])?;
    assert_eq!((out.code, out.stdout.trim()), (Some(0), format!("{}: ok", example().display()).as_str()));
    let out = agent(&["validate", "--config", s(&example()), "--json"])?;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out.stdout)?, serde_json::json!({"ok": true, "errors": []}));

    // Uncommented, every `# key = value` line is a key of the file, and together they validate.
    let text = std::fs::read_to_string(example())?;
    let uncommented = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| RUN_KEYS.contains(&k)) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    for key in RUN_KEYS {
        assert!(uncommented.lines().any(|l| l.starts_with(&format!("{key} = "))), "the example lacks {key}");
    }
    let options = config::check(&uncommented).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    // The values shown for the settings with a fixed default are the defaults.
    let set = options.clone().resolve()?;
    let defaults = RunOptions { data_dir: options.data_dir.clone(), ..RunOptions::default() }.resolve()?;
    assert_eq!(
        (set.slots, set.watch_settle_secs, set.watch_profile, set.offline),
        (defaults.slots, defaults.watch_settle_secs, defaults.watch_profile, defaults.offline)
    );
    assert_eq!(set.data_dir, Path::new("/var/lib/gaffer-agent"));
    Ok(())
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> Result<toml::Table> {
    let mut all = vec!["run", "--print-config"];
    all.extend_from_slice(args);
    let out = agent_with(&all, env)?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    Ok(out.stdout.parse::<toml::Table>()?)
}

#[test]
fn flags_override_the_file_and_the_file_overrides_the_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(
        dir.path(),
        "agent.toml",
        "data_dir = \"/srv/from-file\"\nslots = 3\nvolume = [\"/mnt/file\"]\noffline = true\njob_timeout = \"10m\"\n",
    )?;
    let from_file = print_config(&["--config", s(&file)], &[])?;
    assert_eq!(from_file["data_dir"].as_str(), Some("/srv/from-file"));
    assert_eq!(from_file["slots"].as_integer(), Some(3));
    assert_eq!(from_file["volume"], toml::Value::Array(vec!["/mnt/file".into()]));
    assert_eq!(from_file["offline"].as_bool(), Some(true));
    assert_eq!(from_file["job_timeout"].as_str(), Some("10m"));
    assert_eq!(from_file["watch_settle_secs"].as_integer(), Some(2), "the default where the file is silent");

    let flags = [
        "--config",
        s(&file),
        "--data-dir",
        "/srv/from-flag",
        "--slots",
        "5",
        "--volume",
        "/mnt/flag",
        "--offline=false",
        "--job-timeout",
        "1h",
    ];
    let overridden = print_config(&flags, &[])?;
    assert_eq!(overridden["data_dir"].as_str(), Some("/srv/from-flag"));
    assert_eq!(overridden["slots"].as_integer(), Some(5));
    assert_eq!(overridden["volume"], toml::Value::Array(vec!["/mnt/flag".into()]), "flags replace the list");
    assert_eq!(overridden["offline"].as_bool(), Some(false));
    assert_eq!(overridden["job_timeout"].as_str(), Some("1h"));

    let defaults = print_config(&["--data-dir", "/srv/d"], &[])?;
    assert_eq!(defaults["slots"].as_integer(), Some(1));
    assert_eq!(defaults["volume"], toml::Value::Array(vec![]));
    assert_eq!(defaults["offline"].as_bool(), Some(false));
    assert!(!defaults.contains_key("job_timeout"), "scaled to each file when not set: {defaults}");

    let from_env = print_config(&[], &[("GAFFER_AGENT_CONFIG", s(&file))])?;
    assert_eq!(from_env["slots"].as_integer(), Some(3), "GAFFER_AGENT_CONFIG names the file");

    // What --print-config prints is itself a configuration file giving the same settings.
    let printed = write(dir.path(), "printed.toml", &toml::to_string(&overridden)?)?;
    assert_eq!(print_config(&["--config", s(&printed)], &[])?, overridden);
    Ok(())
}

#[test]
fn run_uses_the_data_dir_of_the_file_unless_a_flag_names_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let from_file = dir.path().join("from-file");
    let file = write(dir.path(), "agent.toml", &format!("data_dir = \"{}\"\noffline = true\n", from_file.display()))?;
    let out = agent(&["run", "--config", s(&file)])?;
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains(&format!("{} is not enrolled", from_file.display())), "{}", out.stderr);
    let from_flag = dir.path().join("from-flag");
    let out = agent(&["run", "--config", s(&file), "--data-dir", s(&from_flag)])?;
    assert!(out.stderr.contains(&format!("{} is not enrolled", from_flag.display())), "{}", out.stderr);
    let out = agent(&["run"])?;
    assert!(out.stderr.contains("--data-dir is required (or `data_dir = ...` in the configuration file)"));
    Ok(())
}

#[test]
fn a_file_over_one_mib_is_refused_unread() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut text = "data_dir = \"/d\"\n".to_owned();
    while (text.len() as u64) < CONFIG_BYTES_MAX {
        let room = (CONFIG_BYTES_MAX as usize - text.len()).min(1024);
        text.push_str(&format!("#{}\n", "x".repeat(room - 2)));
    }
    assert_eq!(text.len() as u64, CONFIG_BYTES_MAX);
    let exactly = write(dir.path(), "exactly.toml", &text)?;
    let out = agent(&["validate", "--config", s(&exactly)])?;
    assert_eq!(out.code, Some(0), "1 MiB is allowed: {}", out.stdout);

    text.push('\n');
    let over = write(dir.path(), "over.toml", &text)?;
    let out = agent(&["validate", "--config", s(&over)])?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.contains(&format!(
            "{}: the file is 1048577 bytes; a configuration file may be at most 1048576 bytes (1 MiB): it was not read",
            over.display()
        )),
        "{}",
        out.stdout
    );
    let out = agent(&["run", "--config", s(&over)])?;
    assert!(out.code != Some(0) && out.stderr.contains("at most 1048576 bytes"), "{}", out.stderr);

    // An endless file (no size to look at first): reading stops after the limit.
    let out = agent(&["validate", "--config", "/dev/zero"])?;
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.contains("at most 1048576 bytes"), "{}", out.stdout);
    Ok(())
}

#[test]
fn a_flag_and_its_key_accept_and_refuse_the_same_values() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // (flag, key, value as the flag takes it, the same as a TOML value, accepted)
    let cases: &[(&str, &str, &str, &str, bool)] = &[
        ("--slots", "slots", "0", "0", false),
        ("--slots", "slots", "1", "1", true),
        ("--slots", "slots", "64", "64", true),
        ("--slots", "slots", "65", "65", false),
        ("--watch-settle-secs", "watch_settle_secs", "0", "0", true),
        ("--watch-settle-secs", "watch_settle_secs", "-1", "-1", false),
        ("--watch-profile", "watch_profile", "full", "\"full\"", true),
        ("--watch-profile", "watch_profile", "fast", "\"fast\"", false),
        ("--job-timeout", "job_timeout", "90s", "\"90s\"", true),
        ("--job-timeout", "job_timeout", "1h 30m", "\"1h 30m\"", true),
        ("--job-timeout", "job_timeout", "0s", "\"0s\"", false),
        ("--job-timeout", "job_timeout", "10 parsecs", "\"10 parsecs\"", false),
        ("--job-memory-max", "job_memory_max", "512MiB", "\"512MiB\"", true),
        ("--job-memory-max", "job_memory_max", "2G", "\"2G\"", true),
        ("--job-memory-max", "job_memory_max", "4096", "4096", true),
        ("--job-memory-max", "job_memory_max", "0", "0", false),
        ("--job-memory-max", "job_memory_max", "lots", "\"lots\"", false),
        ("--offline", "offline", "true", "true", true),
        ("--offline", "offline", "yes", "\"yes\"", false),
    ];
    for (i, (flag, key, flag_value, toml_value, accepted)) in cases.iter().enumerate() {
        let as_flag = format!("{flag}={flag_value}");
        let by_flag = agent(&["run", "--print-config", "--data-dir", "/d", &as_flag])?;
        let file = write(dir.path(), &format!("{i}.toml"), &format!("{key} = {toml_value}\n"))?;
        let by_file = agent(&["validate", "--config", s(&file)])?;
        assert_eq!(by_flag.code == Some(0), *accepted, "{as_flag}: {}", by_flag.stderr);
        assert_eq!(by_file.code == Some(0), *accepted, "{key} = {toml_value}: {}", by_file.stdout);
    }
    Ok(())
}

#[test]
fn the_file_has_a_key_for_every_flag_of_run() {
    let cmd = <RunOptions as clap::Args>::augment_args(clap::Command::new("run"));
    let flags = cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect::<Vec<_>>();
    assert_eq!(flags, RUN_KEYS);
}
