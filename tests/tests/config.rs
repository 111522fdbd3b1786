//! Configuration files on both programs: `gaffer-agent validate` and `run --config`,
//! `gaffer-control validate`, `serve --config` and `init --config` — the real binaries on real
//! files. For each program: every problem of a file is listed at once with its line and column
//! (text and `--json`); a bad file stops every command that reads it before anything is made;
//! the shipped example validates and shows every key with its default; flags override the file
//! (in `--print-config` and in what a running command does) and the file the defaults; a file
//! over 1 MiB (or an endless one) is refused unread; a flag and its key accept and refuse the
//! same values; every flag has its key. The checker's own parts are tested in
//! `installers/service/tests/config_file.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use gaffer_service::config_file::CONFIG_BYTES_MAX;

/// (line, column, key, a part of the message) of a mistake `validate` finds.
type Found = (usize, usize, &'static str, &'static str);
/// A file with a syntax error among other problems, and each problem's (line, key), the key
/// `None` for a syntax error.
type SyntaxCase = (&'static str, &'static [(usize, Option<&'static str>)]);
/// (flag, key, value as the flag takes it, the same as a TOML value, accepted).
type FlagCase = (&'static str, &'static str, &'static str, &'static str, bool);

/// One program under test, and the files and values it is tested with.
struct Program {
    /// The binary, e.g. `gaffer-agent`.
    bin: &'static str,
    /// The variable that names a configuration file; removed from every run unless set.
    env: &'static str,
    /// The commands that read `--config` and must not start with a bad file.
    starts: &'static [&'static str],
    /// The command that takes `--print-config`.
    prints: &'static str,
    /// The shipped example, in installers/config/.
    example: &'static str,
    /// A file with mistakes (`DATA_DIR` stands for the data directory)…
    mistakes: &'static str,
    /// …and every one of them, in file order.
    found: &'static [Found],
    /// Files with a syntax error among other problems.
    syntax: &'static [SyntaxCase],
    /// Values of each kind, as a flag and as its key.
    flag_cases: &'static [FlagCase],
}

const AGENT: Program = Program {
    bin: "gaffer-agent",
    env: "GAFFER_AGENT_CONFIG",
    starts: &["run"],
    prints: "run",
    example: "agent.toml",
    mistakes: r#"# An agent configuration with eight mistakes.
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
"#,
    found: &[
        (3, 9, "slots", "65 is out of range: 1..=64"),
        (4, 15, "job_timeout", "\"10 parsecs\" is not a duration"),
        (5, 21, "watch_settle_secs", "expected an integer (at least 0); found a string"),
        (6, 1, "volumes", "unknown key (the keys are: data_dir, volume, watch,"),
        (7, 21, "volume", "\"media\" is a relative path"),
        (8, 18, "job_memory_max", "\"lots\" is not a size"),
        (9, 1, "token", "secrets never go in this file"),
        (11, 2, "run", "go at the top of the file, not in a [run] table"),
    ],
    syntax: &[
        (
            "slots = 2\njob_timeout = 10m\nbogus = true\nslots_max = 3\n",
            &[(2, None), (3, Some("bogus")), (4, Some("slots_max"))],
        ),
        // An unclosed array at the end of the file: the line it is reported at is the last one.
        ("data_dir = \"/d\"\nvolume = [\"/a\",\n", &[(2, None)]),
    ],
    flag_cases: &[
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
    ],
};

const CONTROL: Program = Program {
    bin: "gaffer-control",
    env: "GAFFER_CONTROL_CONFIG",
    starts: &["serve", "init"],
    prints: "serve",
    example: "control.toml",
    mistakes: r#"# A control-plane configuration with nine mistakes.
data_dir = "DATA_DIR"
heartbeat_interval_secs = 0
lease_grace_secs = "30"
finished_job_retention = "a month"
http_tls = "yes"
http_tls_cert = "/etc/gaffer/dashboard.pem"
quic-listen = "0.0.0.0:7443"
metrics_token = "s3cret"

[init]
fleet_name = "studio"
server_names = ["gaffer.studio.lan"]
server_name = ["gaffer.studio.lan", 7]
"#,
    found: &[
        (3, 27, "heartbeat_interval_secs", "0 is out of range: 1..=3600"),
        (4, 20, "lease_grace_secs", "expected an integer (1..=86400); found a string"),
        (5, 26, "finished_job_retention", "\"a month\" is not a duration"),
        (6, 12, "http_tls", "\"yes\" is not one of on, off, auto"),
        (7, 1, "http_tls_cert", "needs `http_tls_key` too"),
        (8, 1, "quic-listen", "write `quic_listen`"),
        (9, 1, "metrics_token", "set `metrics_token_file`"),
        (13, 1, "init.server_names", "unknown key (the keys of [init] are: server_name, fleet_name, release_key_dir)"),
        (14, 37, "init.server_name", "expected a string"),
    ],
    syntax: &[(
        "max_attempts = 3\nfinished_job_retention = 30d\n\n[init]\nfleet = \"studio\"\n",
        &[(2, None), (5, Some("init.fleet"))],
    )],
    flag_cases: &[
        ("--heartbeat-interval-secs", "heartbeat_interval_secs", "0", "0", false),
        ("--heartbeat-interval-secs", "heartbeat_interval_secs", "3600", "3600", true),
        ("--heartbeat-interval-secs", "heartbeat_interval_secs", "3601", "3601", false),
        ("--idle-timeout-secs", "idle_timeout_secs", "1", "1", false),
        ("--idle-timeout-secs", "idle_timeout_secs", "2", "2", true),
        ("--max-attempts", "max_attempts", "100", "100", true),
        ("--max-attempts", "max_attempts", "101", "101", false),
        ("--lease-grace-secs", "lease_grace_secs", "86400", "86400", true),
        ("--lease-grace-secs", "lease_grace_secs", "86401", "86401", false),
        ("--assign-timeout-secs", "assign_timeout_secs", "0", "0", false),
        ("--agent-cert-ttl", "agent_cert_ttl", "60s", "\"60s\"", true),
        ("--agent-cert-ttl", "agent_cert_ttl", "59s", "\"59s\"", false),
        ("--agent-cert-ttl", "agent_cert_ttl", "826d", "\"826d\"", false),
        ("--finished-job-retention", "finished_job_retention", "12h", "\"12h\"", true),
        ("--finished-job-retention", "finished_job_retention", "a month", "\"a month\"", false),
        ("--quic-listen", "quic_listen", "[::]:7443", "\"[::]:7443\"", true),
        ("--quic-listen", "quic_listen", "localhost:7443", "\"localhost:7443\"", false),
        ("--http-tls", "http_tls", "auto", "\"auto\"", true),
        ("--http-tls", "http_tls", "yes", "\"yes\"", false),
    ],
};

const PROGRAMS: [&Program; 2] = [&AGENT, &CONTROL];

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Program {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(gaffer_tests::bin(self.bin));
        cmd.args(args).env_remove(self.env).env("RUST_BACKTRACE", "0").stdin(Stdio::null());
        cmd
    }

    /// Runs the program with `args` (with no config from the environment) and kills it after
    /// 60 s: a bound on correctness, so a read that never ends fails the test instead of hanging
    /// it.
    fn run(&self, args: &[&str]) -> Result<Output> {
        self.run_with(args, &[])
    }

    /// [`Program::run`] with `env` set.
    fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        // Read both pipes while it runs, so a long output cannot stall it.
        let stdout = reader(child.stdout.take().context("stdout")?);
        let stderr = reader(child.stderr.take().context("stderr")?);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                bail!("{} {args:?} ran for more than 60 s", self.bin);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let joined = |h: std::thread::JoinHandle<std::io::Result<String>>| {
            h.join().map_err(|_| anyhow::anyhow!("a pipe reader panicked"))?.context("reading the output")
        };
        Ok(Output { code: status.code(), stdout: joined(stdout)?, stderr: joined(stderr)? })
    }

    /// The settings `PRINTS --print-config ARGS` prints, parsed.
    fn print_config(&self, args: &[&str], env: &[(&str, &str)]) -> Result<toml::Table> {
        let mut all = vec![self.prints, "--print-config"];
        all.extend_from_slice(args);
        let out = self.run_with(&all, env)?;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        Ok(out.stdout.parse::<toml::Table>()?)
    }

    fn example(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/config").join(self.example)
    }
}

fn reader(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<std::io::Result<String>> {
    std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text)?;
        Ok(text)
    })
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

#[test]
fn validate_lists_every_mistake_with_its_line_and_column() -> Result<()> {
    for p in PROGRAMS {
        let dir = tempfile::tempdir()?;
        let text = p.mistakes.replace("DATA_DIR", &format!("/var/lib/{}", p.bin));
        let file = write(dir.path(), p.example, &text)?;
        let out = p.run(&["validate", "--config", s(&file)])?;
        assert_eq!(out.code, Some(1), "{}: {}{}", p.bin, out.stdout, out.stderr);
        let found = listed(&out.stdout, &file);
        assert_eq!(found.len(), p.found.len(), "{}: {}", p.bin, out.stdout);
        for ((line, column, rest), (want_line, want_column, key, message)) in found.iter().zip(p.found) {
            assert_eq!((*line, *column), (*want_line, *want_column), "{}: {key}: {rest}", p.bin);
            assert!(rest.starts_with(&format!("{key}: ")) && rest.contains(message), "{}: line {line}: {rest}", p.bin);
        }
        let count = format!("{}: {} problems\n", file.display(), p.found.len());
        assert!(out.stdout.ends_with(&count), "{}: {}", p.bin, out.stdout);

        let out = p.run(&["validate", "--config", s(&file), "--json"])?;
        assert_eq!(out.code, Some(1), "{}", p.bin);
        let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
        assert_eq!(report["ok"], false, "{}", p.bin);
        let errors = report["errors"].as_array().context("errors")?;
        let lines = errors.iter().map(|e| (e["line"].as_u64(), e["key"].as_str())).collect::<Vec<_>>();
        let want = p.found.iter().map(|m| (Some(m.0 as u64), Some(m.2))).collect::<Vec<_>>();
        assert_eq!(lines, want, "{}", p.bin);
        for e in errors {
            let mut fields = e.as_object().context("an error object")?.keys().cloned().collect::<Vec<_>>();
            fields.sort();
            assert_eq!(fields, ["column", "key", "line", "message"], "{}", p.bin);
        }
    }
    Ok(())
}

#[test]
fn a_bad_file_stops_every_command_that_reads_it_and_every_problem_is_printed() -> Result<()> {
    for p in PROGRAMS {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let file = write(dir.path(), p.example, &p.mistakes.replace("DATA_DIR", s(&data_dir)))?;
        for command in p.starts {
            let out = p.run(&[command, "--config", s(&file)])?;
            assert_ne!(out.code, Some(0), "{} {command}", p.bin);
            for (line, column, key, _) in p.found {
                let at = format!("{}:{line}:{column}: {key}: ", file.display());
                assert!(out.stderr.contains(&at), "{} {command}: {at} missing from:\n{}", p.bin, out.stderr);
            }
            let count = format!("{} problems", p.found.len());
            assert!(out.stderr.contains(&count), "{} {command}: {}", p.bin, out.stderr);
            let check = format!("{} validate --config {}", p.bin, file.display());
            assert!(out.stderr.contains(&check), "{} {command}: {}", p.bin, out.stderr);
            assert!(!data_dir.exists(), "{} {command} started or created nothing", p.bin);
        }
    }
    Ok(())
}

#[test]
fn a_syntax_error_is_reported_at_its_line_with_the_other_problems() -> Result<()> {
    for p in PROGRAMS {
        let dir = tempfile::tempdir()?;
        for (i, (text, want)) in p.syntax.iter().enumerate() {
            let file = write(dir.path(), &format!("{i}.toml"), text)?;
            let out = p.run(&["validate", "--config", s(&file)])?;
            assert_eq!(out.code, Some(1), "{}: {text}", p.bin);
            let found = listed(&out.stdout, &file);
            assert_eq!(found.len(), want.len(), "{}: {}", p.bin, out.stdout);
            for ((line, _, rest), (want_line, want_key)) in found.iter().zip(want.iter()) {
                assert_eq!(line, want_line, "{}: {}", p.bin, out.stdout);
                match want_key {
                    None => assert!(rest.starts_with("TOML syntax: "), "{}: {}", p.bin, out.stdout),
                    Some(key) => assert_eq!(rest.split(':').next(), Some(*key), "{}: {}", p.bin, out.stdout),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_example_files_validate() -> Result<()> {
    for p in PROGRAMS {
        let example = p.example();
        let out = p.run(&["validate", "--config", s(&example)])?;
        assert_eq!((out.code, out.stdout.trim()), (Some(0), format!("{}: ok", example.display()).as_str()));
        let out = p.run(&["validate", "--config", s(&example), "--json"])?;
        let report = serde_json::from_str::<serde_json::Value>(&out.stdout)?;
        assert_eq!(report, serde_json::json!({"ok": true, "errors": []}), "{}", p.bin);
    }
    Ok(())
}

/// The example of `p` with every `# key = value` line whose key is `known` uncommented, after
/// checking that every key in `keys` has such a line.
fn uncommented<'k>(
    p: &Program,
    known: impl Fn(&str) -> bool,
    keys: impl IntoIterator<Item = &'k &'k str>,
) -> Result<String> {
    let text = std::fs::read_to_string(p.example())?;
    let uncommented = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| known(k)) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    for key in keys {
        assert!(uncommented.lines().any(|l| l.starts_with(&format!("{key} = "))), "the {} example lacks {key}", p.bin);
    }
    Ok(uncommented)
}

#[test]
fn the_agent_example_lists_every_key_with_its_default() -> Result<()> {
    use gaffer_agent::config::{self, RunOptions, RUN_KEYS};
    // Uncommented, every `# key = value` line is a key of the file, and together they validate.
    let text = uncommented(&AGENT, |k| RUN_KEYS.contains(&k), RUN_KEYS)?;
    let options = config::check(&text).map_err(|p| anyhow::anyhow!("{p:?}"))?;
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

#[test]
fn the_control_example_lists_every_key_with_its_default() -> Result<()> {
    use gaffer_control::config::{self, InitOptions, ServeOptions, ALERTS_KEYS, INIT_KEYS, SERVE_KEYS, WEBHOOKS_KEYS};
    // Uncommented, every `# key = value` line is a key of the file, and together they validate.
    let tables: Vec<&str> = ALERTS_KEYS.iter().chain(WEBHOOKS_KEYS).map(|(k, _)| *k).collect();
    let known = |k: &str| SERVE_KEYS.contains(&k) || INIT_KEYS.contains(&k) || tables.contains(&k);
    let text = uncommented(&CONTROL, known, SERVE_KEYS.iter().chain(INIT_KEYS).chain(&tables))?;
    let file = config::check(&text).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    // [alerts] and [webhooks] show their defaults.
    assert_eq!(file.alerts, gaffer_control::webhook::alerts::AlertSettings::default());
    assert_eq!(file.webhooks, gaffer_control::webhook::WebhookSettings::default());
    // The values shown for the settings with a fixed default are the defaults.
    let set = file.serve.clone().resolve()?;
    let defaults = ServeOptions { data_dir: file.serve.data_dir.clone(), ..ServeOptions::default() }.resolve()?;
    let fixed = |s: &config::ServeSettings| {
        (
            s.lease_grace_secs,
            s.assign_timeout_secs,
            s.max_attempts,
            s.finished_job_retention,
            s.heartbeat_interval_secs,
            s.idle_timeout_secs,
            s.http_tls,
        )
    };
    assert_eq!(fixed(&set), fixed(&defaults));
    let init = file.init.clone().resolve()?;
    let init_defaults = InitOptions { data_dir: file.init.data_dir.clone(), ..InitOptions::default() }.resolve()?;
    assert_eq!(
        (init.quic_listen, init.http_listen, &init.fleet_name, init.agent_cert_ttl),
        (init_defaults.quic_listen, init_defaults.http_listen, &init_defaults.fleet_name, init_defaults.agent_cert_ttl)
    );
    assert_eq!(set.data_dir, Path::new("/var/lib/gaffer-control"));
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
    text.push('\n');
    let over = write(dir.path(), "over.toml", &text)?;
    for p in PROGRAMS {
        let out = p.run(&["validate", "--config", s(&exactly)])?;
        assert_eq!(out.code, Some(0), "{}: 1 MiB is allowed: {}", p.bin, out.stdout);

        let out = p.run(&["validate", "--config", s(&over)])?;
        assert_eq!(out.code, Some(1), "{}", p.bin);
        let refused = format!(
            "{}: the file is 1048577 bytes; a configuration file may be at most 1048576 bytes (1 MiB): it was not read",
            over.display()
        );
        assert!(out.stdout.contains(&refused), "{}: {}", p.bin, out.stdout);
        for command in p.starts {
            let out = p.run(&[command, "--config", s(&over)])?;
            assert!(out.code != Some(0) && out.stderr.contains("at most 1048576 bytes"), "{command}: {}", out.stderr);
        }

        // An endless file (no size to look at first): reading stops after the limit.
        let out = p.run(&["validate", "--config", "/dev/zero"])?;
        assert_eq!(out.code, Some(1), "{}", p.bin);
        assert!(out.stdout.contains("at most 1048576 bytes"), "{}: {}", p.bin, out.stdout);
    }
    Ok(())
}

#[test]
fn a_flag_and_its_key_accept_and_refuse_the_same_values() -> Result<()> {
    for p in PROGRAMS {
        let dir = tempfile::tempdir()?;
        for (i, (flag, key, flag_value, toml_value, accepted)) in p.flag_cases.iter().enumerate() {
            let as_flag = format!("{flag}={flag_value}");
            let by_flag = p.run(&[p.prints, "--print-config", "--data-dir", "/d", &as_flag])?;
            let file = write(dir.path(), &format!("{i}.toml"), &format!("{key} = {toml_value}\n"))?;
            let by_file = p.run(&["validate", "--config", s(&file)])?;
            assert_eq!(by_flag.code == Some(0), *accepted, "{}: {as_flag}: {}", p.bin, by_flag.stderr);
            assert_eq!(by_file.code == Some(0), *accepted, "{}: {key} = {toml_value}: {}", p.bin, by_file.stdout);
        }
    }
    Ok(())
}

/// The long flags of an options struct, with `-` written `_`, in order.
fn longs(cmd: clap::Command) -> Vec<String> {
    cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect()
}

#[test]
fn the_agent_file_has_a_key_for_every_flag_of_run() {
    use gaffer_agent::config::{RunOptions, RUN_KEYS};
    assert_eq!(longs(<RunOptions as clap::Args>::augment_args(clap::Command::new("run"))), RUN_KEYS);
}

#[test]
fn the_control_file_has_a_key_for_every_flag_of_serve_and_init() {
    use gaffer_control::config::{InitOptions, ServeOptions, INIT_KEYS, SERVE_KEYS};
    let serve = longs(<ServeOptions as clap::Args>::augment_args(clap::Command::new("serve")));
    assert_eq!(serve, SERVE_KEYS);
    let mut init = longs(<InitOptions as clap::Args>::augment_args(clap::Command::new("init")));
    init.sort();
    let mut file_keys = ["data_dir", "quic_listen", "http_listen", "agent_cert_ttl"]
        .iter()
        .inspect(|k| assert!(SERVE_KEYS.contains(k), "{k} is a top-level key"))
        .chain(INIT_KEYS)
        .map(|k| k.to_string())
        .collect::<Vec<_>>();
    file_keys.sort();
    assert_eq!(init, file_keys);
}

#[test]
fn agent_flags_override_the_file_and_the_file_overrides_the_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(
        dir.path(),
        "agent.toml",
        "data_dir = \"/srv/from-file\"\nslots = 3\nvolume = [\"/mnt/file\"]\noffline = true\njob_timeout = \"10m\"\n",
    )?;
    let from_file = AGENT.print_config(&["--config", s(&file)], &[])?;
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
    let overridden = AGENT.print_config(&flags, &[])?;
    assert_eq!(overridden["data_dir"].as_str(), Some("/srv/from-flag"));
    assert_eq!(overridden["slots"].as_integer(), Some(5));
    assert_eq!(overridden["volume"], toml::Value::Array(vec!["/mnt/flag".into()]), "flags replace the list");
    assert_eq!(overridden["offline"].as_bool(), Some(false));
    assert_eq!(overridden["job_timeout"].as_str(), Some("1h"));

    let defaults = AGENT.print_config(&["--data-dir", "/srv/d"], &[])?;
    assert_eq!(defaults["slots"].as_integer(), Some(1));
    assert_eq!(defaults["volume"], toml::Value::Array(vec![]));
    assert_eq!(defaults["offline"].as_bool(), Some(false));
    assert!(!defaults.contains_key("job_timeout"), "scaled to each file when not set: {defaults}");

    let from_env = AGENT.print_config(&[], &[("GAFFER_AGENT_CONFIG", s(&file))])?;
    assert_eq!(from_env["slots"].as_integer(), Some(3), "GAFFER_AGENT_CONFIG names the file");

    // What --print-config prints is itself a configuration file giving the same settings.
    let printed = write(dir.path(), "printed.toml", &toml::to_string(&overridden)?)?;
    assert_eq!(AGENT.print_config(&["--config", s(&printed)], &[])?, overridden);
    Ok(())
}

#[test]
fn agent_run_uses_the_data_dir_of_the_file_unless_a_flag_names_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let from_file = dir.path().join("from-file");
    let file = write(dir.path(), "agent.toml", &format!("data_dir = \"{}\"\noffline = true\n", from_file.display()))?;
    let out = AGENT.run(&["run", "--config", s(&file)])?;
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains(&format!("{} is not enrolled", from_file.display())), "{}", out.stderr);
    let from_flag = dir.path().join("from-flag");
    let out = AGENT.run(&["run", "--config", s(&file), "--data-dir", s(&from_flag)])?;
    assert!(out.stderr.contains(&format!("{} is not enrolled", from_flag.display())), "{}", out.stderr);
    let out = AGENT.run(&["run"])?;
    assert!(out.stderr.contains("--data-dir is required (or `data_dir = ...` in the configuration file)"));
    Ok(())
}

#[test]
fn control_flags_override_the_file_and_the_file_overrides_the_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = "data_dir = \"/srv/control\"\nheartbeat_interval_secs = 7\nhttp_tls = \"off\"\n\
                finished_job_retention = \"12h\"\n";
    let file = write(dir.path(), "control.toml", text)?;
    let from_file = CONTROL.print_config(&["--config", s(&file)], &[])?;
    assert_eq!(from_file["heartbeat_interval_secs"].as_integer(), Some(7));
    assert_eq!(from_file["http_tls"].as_str(), Some("off"));
    assert_eq!(from_file["finished_job_retention"].as_str(), Some("12h"));
    assert_eq!(from_file["max_attempts"].as_integer(), Some(3), "the default where the file is silent");

    let flags = ["--config", s(&file), "--heartbeat-interval-secs", "2", "--http-tls", "on"];
    let overridden = CONTROL.print_config(&flags, &[])?;
    assert_eq!(overridden["heartbeat_interval_secs"].as_integer(), Some(2));
    assert_eq!(overridden["http_tls"].as_str(), Some("on"));
    assert_eq!(overridden["finished_job_retention"].as_str(), Some("12h"));

    let defaults = CONTROL.print_config(&["--data-dir", "/srv/control"], &[])?;
    assert_eq!(defaults["heartbeat_interval_secs"].as_integer(), Some(5));
    assert_eq!(defaults["http_tls"].as_str(), Some("auto"));
    assert!(!defaults.contains_key("quic_listen"), "config.json's when not set: {defaults}");

    // What --print-config prints is itself a configuration file giving the same settings.
    let printed = write(dir.path(), "printed.toml", &toml::to_string(&overridden)?)?;
    assert_eq!(CONTROL.print_config(&["--config", s(&printed)], &[])?, overridden);

    // An HTTPS certificate from a flag and its key from the file make a pair; either alone is refused.
    let key_file = write(dir.path(), "key.toml", "data_dir = \"/srv/control\"\nhttp_tls_key = \"/etc/k.pem\"\n")?;
    let out = CONTROL.run(&["serve", "--print-config", "--config", s(&key_file)])?;
    assert!(out.code != Some(0) && out.stderr.contains("http_tls_key: needs `http_tls_cert` too"), "{}", out.stderr);
    let out =
        CONTROL.run(&["serve", "--print-config", "--data-dir", "/srv/control", "--http-tls-cert", "/etc/c.pem"])?;
    assert!(out.code != Some(0) && out.stderr.contains("--http-tls-cert needs --http-tls-key"), "{}", out.stderr);
    Ok(())
}

/// Waits up to 60 s for `serve.json` in `data_dir` (written once QUIC and HTTP listen).
fn serve_json(child: &mut Child, data_dir: &Path) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = std::fs::read(data_dir.join("serve.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            return Ok(v);
        }
        if let Some(status) = child.try_wait()? {
            bail!("serve exited with {status} before listening");
        }
        if Instant::now() > deadline {
            bail!("serve did not write serve.json within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn control_init_and_serve_use_the_file_and_flags_override_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("control");
    let text = format!(
        "data_dir = \"{}\"\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         agent_cert_ttl = \"2d\"\nhttp_tls = \"on\"\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [init]\nfleet_name = \"from-the-file\"\nserver_name = [\"localhost\", \"gaffer.test\"]\n",
        data_dir.display()
    );
    let file = write(dir.path(), "control.toml", &text)?;
    let out = CONTROL.run(&["init", "--config", s(&file), "--json"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(data_dir.join("config.json"))?)?;
    assert_eq!(written["fleet_name"], "from-the-file");
    assert_eq!(written["server_names"], serde_json::json!(["localhost", "gaffer.test"]));
    assert_eq!(written["agent_cert_ttl_secs"], 2 * 86_400);
    assert_eq!(written["quic_listen"], "127.0.0.1:0");

    // The file says HTTPS on and a separate metrics address; the flag turns HTTPS off.
    let mut child = CONTROL
        .command(&["serve", "--config", s(&file), "--http-tls", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let info = serve_json(&mut child, &data_dir);
    child.kill()?;
    child.wait()?;
    let info = info?;
    assert_eq!(info["http_tls"], false, "the flag overrides the file: {info}");
    assert!(info["metrics_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "from the file: {info}");
    assert_ne!(info["metrics_addr"], info["http_addr"], "{info}");
    Ok(())
}
