//! `gaffer-control validate`, `serve --config` and `init --config`: the real binary on real
//! files. Every problem of a file is listed at once with its line; the shipped example validates;
//! flags override the file (in `--print-config` and in what a running `serve` does); a file over
//! 1 MiB (or an endless one) is refused unread; a flag and its key accept and refuse the same
//! values.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use gaffer_control::config::{self, InitOptions, ServeOptions, CONFIG_BYTES_MAX, INIT_KEYS, SERVE_KEYS};

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gaffer-control"));
    cmd.args(args).env_remove("GAFFER_CONTROL_CONFIG").env("RUST_BACKTRACE", "0").stdin(Stdio::null());
    cmd
}

/// Runs `gaffer-control ARGS` (with no config from the environment) and kills it after 60 s: a
/// bound on correctness, so a read that never ends fails the test instead of hanging it.
fn control(args: &[&str]) -> Result<Output> {
    let mut child = command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            bail!("gaffer-control {args:?} ran for more than 60 s");
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

const MISTAKES: &str = r#"# A control-plane configuration with nine mistakes.
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
"#;

/// (line, column, key, a part of the message) of every mistake in [`MISTAKES`].
const MISTAKES_FOUND: [(usize, usize, &str, &str); 9] = [
    (3, 27, "heartbeat_interval_secs", "0 is out of range: 1..=3600"),
    (4, 20, "lease_grace_secs", "expected an integer (1..=86400); found a string"),
    (5, 26, "finished_job_retention", "\"a month\" is not a duration"),
    (6, 12, "http_tls", "\"yes\" is not one of on, off, auto"),
    (7, 1, "http_tls_cert", "needs `http_tls_key` too"),
    (8, 1, "quic-listen", "write `quic_listen`"),
    (9, 1, "metrics_token", "set `metrics_token_file`"),
    (13, 1, "init.server_names", "unknown key (the keys of [init] are: server_name, fleet_name, release_key_dir)"),
    (14, 37, "init.server_name", "expected a string"),
];

#[test]
fn validate_lists_every_mistake_with_its_line_and_column() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), "control.toml", &MISTAKES.replace("DATA_DIR", "/var/lib/gaffer-control"))?;
    let out = control(&["validate", "--config", s(&file)])?;
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let found = listed(&out.stdout, &file);
    assert_eq!(found.len(), MISTAKES_FOUND.len(), "{}", out.stdout);
    for ((line, column, rest), (want_line, want_column, key, message)) in found.iter().zip(MISTAKES_FOUND) {
        assert_eq!((*line, *column), (want_line, want_column), "{key}: {rest}");
        assert!(rest.starts_with(&format!("{key}: ")) && rest.contains(message), "line {line}: {rest}");
    }
    assert!(out.stdout.ends_with(&format!("{}: 9 problems\n", file.display())), "{}", out.stdout);

    let out = control(&["validate", "--config", s(&file), "--json"])?;
    assert_eq!(out.code, Some(1));
    let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(report["ok"], false);
    let errors = report["errors"].as_array().context("errors")?;
    let lines = errors.iter().map(|e| (e["line"].as_u64(), e["key"].as_str())).collect::<Vec<_>>();
    let want = MISTAKES_FOUND.iter().map(|m| (Some(m.0 as u64), Some(m.2))).collect::<Vec<_>>();
    assert_eq!(lines, want);
    Ok(())
}

#[test]
fn serve_and_init_refuse_to_start_with_a_bad_file_and_print_every_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("control");
    let file = write(dir.path(), "control.toml", &MISTAKES.replace("DATA_DIR", s(&data_dir)))?;
    for command in ["serve", "init"] {
        let out = control(&[command, "--config", s(&file)])?;
        assert_ne!(out.code, Some(0), "{command}");
        for (line, column, key, _) in MISTAKES_FOUND {
            let at = format!("{}:{line}:{column}: {key}: ", file.display());
            assert!(out.stderr.contains(&at), "{command}: {at} missing from:\n{}", out.stderr);
        }
        assert!(!data_dir.exists(), "{command} created nothing");
    }
    Ok(())
}

#[test]
fn a_syntax_error_is_reported_at_its_line_with_the_other_problems() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = "max_attempts = 3\nfinished_job_retention = 30d\n\n[init]\nfleet = \"studio\"\n";
    let file = write(dir.path(), "control.toml", text)?;
    let out = control(&["validate", "--config", s(&file)])?;
    assert_eq!(out.code, Some(1));
    let found = listed(&out.stdout, &file);
    assert_eq!(found.len(), 2, "{}", out.stdout);
    assert_eq!(found[0].0, 2, "the syntax error is on line 2: {}", out.stdout);
    assert!(found[0].2.starts_with("TOML syntax: "), "{}", out.stdout);
    assert_eq!((found[1].0, found[1].2.split(':').next()), (5, Some("init.fleet")));
    Ok(())
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/config/control.toml")
}

#[test]
fn the_example_file_validates_and_lists_every_key_with_its_default() -> Result<()> {
    let out = control(&["validate", "--config", s(&example())])?;
    assert_eq!((out.code, out.stdout.trim()), (Some(0), format!("{}: ok", example().display()).as_str()));
    let out = control(&["validate", "--config", s(&example()), "--json"])?;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out.stdout)?, serde_json::json!({"ok": true, "errors": []}));

    // Uncommented, every `# key = value` line is a key of the file, and together they validate.
    let text = std::fs::read_to_string(example())?;
    let known = |k: &str| SERVE_KEYS.contains(&k) || INIT_KEYS.contains(&k);
    let uncommented = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| known(k)) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    for key in SERVE_KEYS.iter().chain(INIT_KEYS) {
        assert!(uncommented.lines().any(|l| l.starts_with(&format!("{key} = "))), "the example lacks {key}");
    }
    let file = config::check(&uncommented).map_err(|p| anyhow::anyhow!("{p:?}"))?;
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

fn print_config(args: &[&str]) -> Result<toml::Table> {
    let mut all = vec!["serve", "--print-config"];
    all.extend_from_slice(args);
    let out = control(&all)?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    Ok(out.stdout.parse::<toml::Table>()?)
}

#[test]
fn flags_override_the_file_and_the_file_overrides_the_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = "data_dir = \"/srv/control\"\nheartbeat_interval_secs = 7\nhttp_tls = \"off\"\n\
                finished_job_retention = \"12h\"\n";
    let file = write(dir.path(), "control.toml", text)?;
    let from_file = print_config(&["--config", s(&file)])?;
    assert_eq!(from_file["heartbeat_interval_secs"].as_integer(), Some(7));
    assert_eq!(from_file["http_tls"].as_str(), Some("off"));
    assert_eq!(from_file["finished_job_retention"].as_str(), Some("12h"));
    assert_eq!(from_file["max_attempts"].as_integer(), Some(3), "the default where the file is silent");

    let flags = ["--config", s(&file), "--heartbeat-interval-secs", "2", "--http-tls", "on"];
    let overridden = print_config(&flags)?;
    assert_eq!(overridden["heartbeat_interval_secs"].as_integer(), Some(2));
    assert_eq!(overridden["http_tls"].as_str(), Some("on"));
    assert_eq!(overridden["finished_job_retention"].as_str(), Some("12h"));

    let defaults = print_config(&["--data-dir", "/srv/control"])?;
    assert_eq!(defaults["heartbeat_interval_secs"].as_integer(), Some(5));
    assert_eq!(defaults["http_tls"].as_str(), Some("auto"));
    assert!(!defaults.contains_key("quic_listen"), "config.json's when not set: {defaults}");

    // What --print-config prints is itself a configuration file giving the same settings.
    let printed = write(dir.path(), "printed.toml", &toml::to_string(&overridden)?)?;
    assert_eq!(print_config(&["--config", s(&printed)])?, overridden);

    // An HTTPS certificate from a flag and its key from the file make a pair; either alone is refused.
    let key_file = write(dir.path(), "key.toml", "data_dir = \"/srv/control\"\nhttp_tls_key = \"/etc/k.pem\"\n")?;
    let out = control(&["serve", "--print-config", "--config", s(&key_file)])?;
    assert!(out.code != Some(0) && out.stderr.contains("http_tls_key: needs `http_tls_cert` too"), "{}", out.stderr);
    let out = control(&["serve", "--print-config", "--data-dir", "/srv/control", "--http-tls-cert", "/etc/c.pem"])?;
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
fn init_and_serve_use_the_file_and_flags_override_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("control");
    let text = format!(
        "data_dir = \"{}\"\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         agent_cert_ttl = \"2d\"\nhttp_tls = \"on\"\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [init]\nfleet_name = \"from-the-file\"\nserver_name = [\"localhost\", \"gaffer.test\"]\n",
        data_dir.display()
    );
    let file = write(dir.path(), "control.toml", &text)?;
    let out = control(&["init", "--config", s(&file), "--json"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(data_dir.join("config.json"))?)?;
    assert_eq!(written["fleet_name"], "from-the-file");
    assert_eq!(written["server_names"], serde_json::json!(["localhost", "gaffer.test"]));
    assert_eq!(written["agent_cert_ttl_secs"], 2 * 86_400);
    assert_eq!(written["quic_listen"], "127.0.0.1:0");

    // The file says HTTPS on and a separate metrics address; the flag turns HTTPS off.
    let mut child = command(&["serve", "--config", s(&file), "--http-tls", "off"])
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

#[test]
fn a_file_over_one_mib_is_refused_unread() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut text = "data_dir = \"/d\"\n".to_owned();
    while (text.len() as u64) < CONFIG_BYTES_MAX {
        let room = (CONFIG_BYTES_MAX as usize - text.len()).min(1024);
        text.push_str(&format!("#{}\n", "x".repeat(room - 2)));
    }
    let exactly = write(dir.path(), "exactly.toml", &text)?;
    let out = control(&["validate", "--config", s(&exactly)])?;
    assert_eq!(out.code, Some(0), "1 MiB is allowed: {}", out.stdout);

    text.push('\n');
    let over = write(dir.path(), "over.toml", &text)?;
    let out = control(&["validate", "--config", s(&over)])?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.contains(&format!(
            "{}: the file is 1048577 bytes; a configuration file may be at most 1048576 bytes (1 MiB): it was not read",
            over.display()
        )),
        "{}",
        out.stdout
    );
    let out = control(&["serve", "--config", s(&over)])?;
    assert!(out.code != Some(0) && out.stderr.contains("at most 1048576 bytes"), "{}", out.stderr);

    // An endless file (no size to look at first): reading stops after the limit.
    let out = control(&["validate", "--config", "/dev/zero"])?;
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.contains("at most 1048576 bytes"), "{}", out.stdout);
    Ok(())
}

#[test]
fn a_flag_and_its_key_accept_and_refuse_the_same_values() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // (flag, key, value as the flag takes it, the same as a TOML value, accepted)
    let cases: &[(&str, &str, &str, &str, bool)] = &[
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
    ];
    for (i, (flag, key, flag_value, toml_value, accepted)) in cases.iter().enumerate() {
        let as_flag = format!("{flag}={flag_value}");
        let by_flag = control(&["serve", "--print-config", "--data-dir", "/d", &as_flag])?;
        let file = write(dir.path(), &format!("{i}.toml"), &format!("{key} = {toml_value}\n"))?;
        let by_file = control(&["validate", "--config", s(&file)])?;
        assert_eq!(by_flag.code == Some(0), *accepted, "{as_flag}: {}", by_flag.stderr);
        assert_eq!(by_file.code == Some(0), *accepted, "{key} = {toml_value}: {}", by_file.stdout);
    }
    Ok(())
}

#[test]
fn the_file_has_a_key_for_every_flag_of_serve_and_init() {
    let longs = |cmd: clap::Command| {
        cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect::<Vec<_>>()
    };
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
