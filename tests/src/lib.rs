//! End-to-end test harness: builders that run the real `gaffer-control` and `gaffer-agent`
//! binaries on loopback, each in its own temp directory with fresh certificates.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use gaffer_tests::{Agent, ControlPlane};
//! let cp = ControlPlane::start()?;
//! let mut agent = Agent::enroll(&cp, "stage-a")?;
//! agent.run(&[gaffer_tests::media_dir()])?;
//! let job = cp.submit_job(&gaffer_tests::media("bikes.mp4"), "stage-a")?;
//! cp.wait_job(&job, &["succeeded"], std::time::Duration::from_secs(60))?;
//! # Ok(()) }
//! ```
//!
//! Binaries are taken from the cargo target directory this test binary lives in
//! (`target/<profile>/`); build them first (`cargo build -p gaffer-control -p gaffer-agent`), which
//! the README's test command does.

pub mod pg;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

pub mod sim;

/// Directory of the sample media (`GAFFER_MEDIA_DIR`, default `~/.cache/gaffer/media`, filled by
/// `scripts/setup.sh`).
pub fn media_dir() -> PathBuf {
    std::env::var_os("GAFFER_MEDIA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gaffer/media"))
}

/// A sample media file, checked to exist.
pub fn media(name: &str) -> PathBuf {
    let p = media_dir().join(name);
    assert!(p.is_file(), "{} is missing: run scripts/setup.sh (or set GAFFER_MEDIA_DIR)", p.display());
    p
}

/// Path of one of the workspace binaries next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let p = dir.join(name);
    assert!(p.is_file(), "{} not built: run `cargo build -p gaffer-control -p gaffer-agent` first", p.display());
    p
}

fn json_output(out: &Output, what: &str) -> anyhow::Result<Value> {
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{what}: output is not JSON: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Calls `f` every 100 ms until it returns `Some`, for at most `timeout`; errors name `what`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The directory holding the .debs and the (unsigned) agent tarball of this build: the test
/// command's `GAFFER_PACKAGES_DIR`, else `installers/build-packages.sh --profile dev` run once for
/// these binaries. Under nextest every test is a process of its own: the processes of one run share
/// one build (`NEXTEST_RUN_ID`), made by the first of them under a lock; otherwise each test process
/// builds its own. Builds older than two hours are removed.
pub fn packages_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GAFFER_PACKAGES_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let agent = bin("gaffer-agent");
    let target = agent.parent().and_then(Path::parent).context("target dir of the binaries")?;
    let packages = target.join("packages");
    std::fs::create_dir_all(&packages)?;
    let out = match std::env::var("NEXTEST_RUN_ID") {
        Ok(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') => {
            packages.join(format!("test-run-{id}"))
        }
        _ => packages.join(format!("test-process-{}", std::process::id())),
    };
    let build = r#"
        [ -f "$OUT/.complete" ] && exit 0
        find "$PACKAGES" -maxdepth 1 \( -name 'test-run-*' -o -name 'test-process-*' \) -mmin +120 -exec rm -rf {} +
        "$SCRIPT" --profile dev --out "$OUT" >"$OUT.stdout"
        touch "$OUT/.complete"
    "#;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("repository root")?;
    let done = Command::new("flock")
        .arg(packages.join(".test-build.lock"))
        .args(["sh", "-ec", build])
        .env("OUT", &out)
        .env("PACKAGES", &packages)
        .env("SCRIPT", repo.join("installers/build-packages.sh"))
        .env("CARGO_TARGET_DIR", target)
        .env_remove("GAFFER_BUILD_VERSION")
        .output()?;
    if !done.status.success() {
        bail!("build-packages.sh failed ({}): {}", done.status, String::from_utf8_lossy(&done.stderr));
    }
    // The script's last line names the output directory.
    let printed = std::fs::read_to_string(out.with_extension("stdout"))?;
    let last = printed.lines().last().unwrap_or_default();
    anyhow::ensure!(Path::new(last) == out, "build-packages.sh printed {last:?} last, not {}", out.display());
    Ok(out)
}

/// The value of the cookie `name` set by `resp`.
pub fn cookie(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    cookie_in(resp.headers(), name)
}

/// The value of the cookie `name` set by the `Set-Cookie` headers of `headers` (a blocking or an
/// async response's).
pub fn cookie_in(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers.get_all(reqwest::header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        let (pair, _) = c.split_once(';').unwrap_or((c, ""));
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name && !v.is_empty()).then(|| v.to_owned())
    })
}

/// The value of the hidden `csrf` field of the first form in `html`.
pub fn csrf_of(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    let end = html[at..].find('"')?;
    Some(html[at..at + end].to_owned())
}

/// Sends SIGKILL to a child and reaps it.
fn sigkill(child: &mut Child) {
    let _ = Command::new("kill").arg("-KILL").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// Settings for [`ControlPlane::start_with`].
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// `--lease-grace-secs`.
    pub lease_grace_secs: u64,
    /// `--idle-timeout-secs`.
    pub idle_timeout_secs: u64,
    /// `--heartbeat-interval-secs`.
    pub heartbeat_interval_secs: u32,
    /// `--assign-timeout-secs`.
    pub assign_timeout_secs: u64,
    /// `--max-attempts`.
    pub max_attempts: u32,
    /// More `serve` flags, e.g. `["--http-tls", "on"]`.
    pub serve_args: Vec<String>,
    /// More `init` flags, e.g. `["--agent-cert-ttl", "60s"]`.
    pub init_args: Vec<String>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            lease_grace_secs: 2,
            idle_timeout_secs: 3,
            heartbeat_interval_secs: 1,
            assign_timeout_secs: 30,
            max_attempts: 3,
            serve_args: Vec::new(),
            init_args: Vec::new(),
        }
    }
}

/// A running `gaffer-control serve` in a temp data dir.
pub struct ControlPlane {
    /// The temp dir holding the data dir, logs and the wire audit log.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// QUIC address agents connect to.
    pub quic_addr: String,
    /// HTTP base URL, e.g. `http://127.0.0.1:1234` (`https://…` under `--http-tls on`).
    pub http_url: String,
    /// Dashboard user `init` made (`admin`, role admin).
    pub admin_user: String,
    /// Its password, printed by `init`.
    pub admin_password: String,
    /// CA fingerprint printed by `init`.
    pub ca_fingerprint: String,
    /// An API bearer token.
    pub api_token: String,
    opts: ControlPlaneOptions,
}

impl ControlPlane {
    /// `init` + `serve` with test timings (short lease grace and idle timeout).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(ControlPlaneOptions::default())
    }

    /// `init` + `serve` with `opts`.
    pub fn start_with(opts: ControlPlaneOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("control");
        let out = Command::new(bin("gaffer-control"))
            .args(["init", "--json", "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--server-name", "localhost", "--server-name", "127.0.0.1"])
            .args(&opts.init_args)
            .arg("--data-dir")
            .arg(&data)
            .output()?;
        let init = json_output(&out, "gaffer-control init")?;
        let mut cp = ControlPlane {
            admin_user: init["admin_user"].as_str().unwrap_or("admin").to_owned(),
            admin_password: init["admin_password"].as_str().unwrap_or_default().to_owned(),
            ca_fingerprint: init["ca_fingerprint"].as_str().unwrap_or_default().to_owned(),
            dir,
            child: None,
            quic_addr: String::new(),
            http_url: String::new(),
            api_token: String::new(),
            opts,
        };
        cp.serve()?;
        let out = Command::new(bin("gaffer-control"))
            .args(["api-token", "create", "--name", "e2e", "--role", "admin", "--json", "--data-dir"])
            .arg(&data)
            .output()?;
        cp.api_token = json_output(&out, "api-token create")?["token"].as_str().unwrap_or_default().to_owned();
        Ok(cp)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("control")
    }

    /// The wire audit log (every frame agents sent, as JSON lines).
    pub fn wire_audit_log(&self) -> PathBuf {
        self.dir.path().join("wire-audit.jsonl")
    }

    /// The server's stderr log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let serve_json = self.data_dir().join("serve.json");
        let _ = std::fs::remove_file(&serve_json);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("control.log"))?;
        let mut cmd = Command::new(bin("gaffer-control"));
        cmd.arg("serve").arg("--data-dir").arg(self.data_dir());
        cmd.args(["--lease-grace-secs", &self.opts.lease_grace_secs.to_string()]);
        cmd.args(["--idle-timeout-secs", &self.opts.idle_timeout_secs.to_string()]);
        cmd.args(["--heartbeat-interval-secs", &self.opts.heartbeat_interval_secs.to_string()]);
        cmd.args(["--assign-timeout-secs", &self.opts.assign_timeout_secs.to_string()]);
        cmd.args(["--max-attempts", &self.opts.max_attempts.to_string()]);
        cmd.arg("--wire-audit-log").arg(self.wire_audit_log());
        cmd.args(&self.opts.serve_args);
        if !self.quic_addr.is_empty() {
            // Restart on the same ports so agents find it again.
            let http_addr = self.http_url.split_once("://").map_or(self.http_url.as_str(), |(_, a)| a);
            cmd.args(["--quic-listen", &self.quic_addr, "--http-listen", http_addr]);
        }
        cmd.env("GAFFER_LOG", "info,gaffer_control=debug").stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn()?);
        let info: Value = wait_for(Duration::from_secs(20), "serve.json", || {
            Ok(std::fs::read(&serve_json).ok().and_then(|b| serde_json::from_slice(&b).ok()))
        })
        .with_context(|| format!("control plane did not start; log:\n{}", self.log()))?;
        self.quic_addr = info["quic_addr"].as_str().unwrap_or_default().to_owned();
        // `https://…` when serve speaks TLS.
        self.http_url = match info["dashboard_url"].as_str() {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", info["http_addr"].as_str().unwrap_or_default()),
        };
        Ok(())
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    /// Starts the server again on the same addresses.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.serve()
    }

    /// Runs `gaffer-control ARGS… --data-dir D --json` and returns its JSON output.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = Command::new(bin("gaffer-control"))
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--json")
            .output()?;
        json_output(&out, &format!("gaffer-control {}", args.join(" ")))
    }

    /// `gaffer-control token create --json`, with `ttl` like "1h" or "1s".
    pub fn token(&self, site: &str, ttl: &str) -> anyhow::Result<Value> {
        let out = Command::new(bin("gaffer-control"))
            .args(["token", "create", "--json", "--site", site, "--ttl", ttl, "--data-dir"])
            .arg(self.data_dir())
            .output()?;
        json_output(&out, "token create")
    }

    fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default()
    }

    /// GET an API path (under `/api/v1`) and return the JSON body.
    pub fn api_get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self.http().get(format!("{}/api/v1{path}", self.http_url)).bearer_auth(&self.api_token).send()?;
        let status = resp.status();
        let body: Value = resp.json()?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// Submits a `shots` job for `path` in `site` and returns its id.
    pub fn submit_job(&self, path: &Path, site: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({ "path": path, "site": site, "profile": "shots" });
        let resp = self
            .http()
            .post(format!("{}/api/v1/jobs", self.http_url))
            .bearer_auth(&self.api_token)
            .json(&body)
            .send()?;
        let status = resp.status();
        let v: Value = resp.json()?;
        if !status.is_success() {
            bail!("POST /jobs: {status}: {v}");
        }
        v["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no id in {v}"))
    }

    /// Waits until the job is in one of `states` and returns it (with its digest).
    pub fn wait_job(&self, id: &str, states: &[&str], timeout: Duration) -> anyhow::Result<Value> {
        let mut last = Value::Null;
        wait_for(timeout, &format!("job {id} to be {states:?}"), || {
            let job = self.api_get(&format!("/jobs/{id}"))?;
            let state = job["state"].as_str().unwrap_or_default().to_owned();
            last = job.clone();
            Ok(states.contains(&state.as_str()).then_some(job))
        })
        .with_context(|| format!("last seen: {last}\ncontrol plane log:\n{}", self.log()))
    }

    /// Submits a job with a JSON body of our choosing; returns the HTTP status and body.
    pub fn api_post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http()
            .post(format!("{}/api/v1{path}", self.http_url))
            .bearer_auth(&self.api_token)
            .json(body)
            .send()?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().unwrap_or(Value::Null)))
    }

    fn dashboard_client() -> anyhow::Result<reqwest::blocking::Client> {
        Ok(reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .build()?)
    }

    /// Logs in to the dashboard as `admin` (the user `init` made) through the real form (login
    /// CSRF cookie + hidden field) and returns the session cookie's value.
    pub fn login(&self) -> anyhow::Result<String> {
        let client = Self::dashboard_client()?;
        let form = client.get(format!("{}/login", self.http_url)).send()?;
        let csrf = cookie(&form, "gaffer_login_csrf").context("the login form sets its CSRF cookie")?;
        let resp = client
            .post(format!("{}/login", self.http_url))
            .header(reqwest::header::COOKIE, format!("gaffer_login_csrf={csrf}"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("user", self.admin_user.as_str()),
                ("password", self.admin_password.as_str()),
            ])
            .send()?;
        cookie(&resp, "gaffer_session").with_context(|| format!("login did not set a session: {}", resp.status()))
    }

    /// GET a dashboard page with the session cookie; returns the status and the HTML.
    pub fn page(&self, session: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let resp = Self::dashboard_client()?
            .get(format!("{}{path}", self.http_url))
            .header(reqwest::header::COOKIE, format!("gaffer_session={session}"))
            .send()?;
        Ok((resp.status().as_u16(), resp.text()?))
    }

    /// POSTs a dashboard form with the session cookie; returns the status.
    pub fn post_form(&self, session: &str, path: &str, fields: &[(&str, &str)]) -> anyhow::Result<u16> {
        let resp = Self::dashboard_client()?
            .post(format!("{}{path}", self.http_url))
            .header(reqwest::header::COOKIE, format!("gaffer_session={session}"))
            .form(fields)
            .send()?;
        Ok(resp.status().as_u16())
    }

    /// The value of one Prometheus sample, e.g. `gaffer_jobs_finished_total{state="succeeded"}`
    /// (0 when absent).
    pub fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let text = self.http().get(format!("{}/metrics", self.http_url)).send()?.text()?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0))
    }

    /// The whole `/metrics` text (OpenMetrics) as served now.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        let resp = self.http().get(format!("{}/metrics", self.http_url)).send()?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            bail!("GET /metrics: {status}: {text}");
        }
        Ok(text)
    }

    /// `/metrics` in the Prometheus text format 0.0.4 (`Accept: text/plain`), the one promtool
    /// lints.
    pub fn metrics_text_prometheus(&self) -> anyhow::Result<String> {
        let resp = self
            .http()
            .get(format!("{}/metrics", self.http_url))
            .header(reqwest::header::ACCEPT, "text/plain; version=0.0.4")
            .send()?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            bail!("GET /metrics: {status}: {text}");
        }
        Ok(text)
    }

    /// Every enrolled agent, by site then hostname: all pages of `GET /api/v1/agents` (1000 a
    /// page, following `next_cursor`).
    pub fn agents(&self) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut path = "/agents?limit=1000".to_owned();
        // A bound on the pages read: 10 000 000 agents.
        for _ in 0..10_000 {
            let page = self.api_get(&path)?;
            all.extend(page["agents"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(cursor) => path = format!("/agents?limit=1000&cursor={cursor}"),
                None => return Ok(all),
            }
        }
        bail!("GET /api/v1/agents did not stop returning a next_cursor")
    }

    /// The fleet's agent counts from `GET /api/v1/agents`: `{"total", "online", "offline",
    /// "air_gapped", "revoked", "sites": {…}}`.
    pub fn agent_counts(&self) -> anyhow::Result<Value> {
        Ok(self.api_get("/agents?limit=1")?["counts"].clone())
    }

    /// All jobs (newest first, up to 1000).
    pub fn jobs(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self.api_get("/jobs?limit=1000")?.as_array().cloned().unwrap_or_default())
    }

    /// `gaffer-control bundle import --json FILE --reply-out REPLY`; returns the raw output.
    pub fn bundle_import_raw(&self, file: &Path, reply_out: &Path) -> anyhow::Result<Output> {
        Ok(Command::new(bin("gaffer-control"))
            .args(["bundle", "import", "--json", "--data-dir"])
            .arg(self.data_dir())
            .arg(file)
            .arg("--reply-out")
            .arg(reply_out)
            .output()?)
    }

    /// Waits until `agent_id` is listed online (or offline when `online` is false).
    pub fn wait_agent_online(&self, agent_id: &str, online: bool, timeout: Duration) -> anyhow::Result<Value> {
        wait_for(timeout, &format!("agent {agent_id} online={online}"), || {
            let found = self.agents()?.into_iter().find(|a| a["id"] == agent_id);
            Ok(found.filter(|a| a["online"] == online))
        })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An enrolled `gaffer-agent` in a temp data dir.
pub struct Agent {
    /// The temp dir holding the data dir and the log.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// The agent's id.
    pub agent_id: String,
}

impl Agent {
    /// Runs `gaffer-agent enroll` into `data_dir` with the given arguments; returns the output
    /// whatever the outcome (for tests of refusals).
    pub fn enroll_raw(
        data_dir: &Path,
        control: &str,
        token: &str,
        fingerprint: &str,
        site: Option<&str>,
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("gaffer-agent"));
        cmd.args([
            "enroll",
            "--json",
            "--control",
            control,
            "--token",
            token,
            "--ca-fingerprint",
            fingerprint,
            "--data-dir",
        ])
        .arg(data_dir);
        if let Some(s) = site {
            cmd.args(["--site", s]);
        }
        Ok(cmd.output()?)
    }

    /// Mints a token on `cp` and enrolls a new agent into `site`.
    pub fn enroll(cp: &ControlPlane, site: &str) -> anyhow::Result<Agent> {
        let token = cp.token(site, "10m")?;
        let dir = tempfile::tempdir()?;
        let out = Self::enroll_raw(
            &dir.path().join("agent"),
            &cp.quic_addr,
            token["token"].as_str().unwrap_or_default(),
            &cp.ca_fingerprint,
            Some(site),
        )?;
        let v = json_output(&out, "gaffer-agent enroll")?;
        let agent_id = v["agent_id"].as_str().unwrap_or_default().to_owned();
        Ok(Agent { dir, child: None, agent_id })
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// Air-gapped enrollment: `gaffer-agent enroll --offline-request`, then `gaffer-control
    /// enroll-offline` on `cp` (through its admin socket while it serves), then `gaffer-agent enroll
    /// --offline-reply` with the CA fingerprint.
    pub fn enroll_offline(cp: &ControlPlane, site: &str) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("agent");
        let request = dir.path().join("enroll-request.json");
        let reply = dir.path().join("enroll-reply.json");
        let out = Command::new(bin("gaffer-agent"))
            .args(["enroll", "--json", "--site", site, "--offline-request"])
            .arg(&request)
            .arg("--data-dir")
            .arg(&data)
            .output()?;
        let agent_id = json_output(&out, "gaffer-agent enroll --offline-request")?["agent_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let out = Command::new(bin("gaffer-control"))
            .args(["enroll-offline", "--json", "--data-dir"])
            .arg(cp.data_dir())
            .arg("--request")
            .arg(&request)
            .arg("--out")
            .arg(&reply)
            .output()?;
        json_output(&out, "gaffer-control enroll-offline")?;
        let out = Command::new(bin("gaffer-agent"))
            .args(["enroll", "--json", "--ca-fingerprint", &cp.ca_fingerprint, "--offline-reply"])
            .arg(&reply)
            .arg("--data-dir")
            .arg(&data)
            .output()?;
        let v = json_output(&out, "gaffer-agent enroll --offline-reply")?;
        anyhow::ensure!(v["agent_id"] == agent_id.as_str(), "offline reply installed {v}, expected agent {agent_id}");
        Ok(Agent { dir, child: None, agent_id })
    }

    /// Starts `gaffer-agent run --offline` watching `watches`.
    pub fn run_offline(&mut self, watches: &[PathBuf]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log"))?;
        let mut cmd = Command::new(bin("gaffer-agent"));
        cmd.arg("run").arg("--offline").arg("--data-dir").arg(self.data_dir());
        for w in watches {
            cmd.arg("--watch").arg(w).args(["--watch-settle-secs", "1"]);
        }
        cmd.env("GAFFER_LOG", "info,gaffer_agent=debug").stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// `gaffer-agent bundle export --json --out FILE`, returning its report.
    pub fn bundle_export(&self, out: &Path) -> anyhow::Result<Value> {
        let o = Command::new(bin("gaffer-agent"))
            .args(["bundle", "export", "--json", "--data-dir"])
            .arg(self.data_dir())
            .arg("--out")
            .arg(out)
            .output()?;
        json_output(&o, "gaffer-agent bundle export")
    }

    /// `gaffer-agent bundle import --json FILE`; returns the raw output (for refusal tests).
    pub fn bundle_import_raw(&self, file: &Path) -> anyhow::Result<Output> {
        Ok(Command::new(bin("gaffer-agent"))
            .args(["bundle", "import", "--json", "--data-dir"])
            .arg(self.data_dir())
            .arg(file)
            .output()?)
    }

    /// The agent's stderr log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Starts `gaffer-agent run` with these volumes.
    pub fn run(&mut self, volumes: &[PathBuf]) -> anyhow::Result<()> {
        self.run_with(volumes, &[], 1)
    }

    /// Starts `gaffer-agent run` with volumes, watch folders and slots.
    pub fn run_with(&mut self, volumes: &[PathBuf], watches: &[PathBuf], slots: u32) -> anyhow::Result<()> {
        self.run_args(volumes, watches, slots, &[])
    }

    /// Starts `gaffer-agent run` with volumes, watch folders, slots and extra arguments
    /// (e.g. `["--job-timeout", "2s"]`).
    pub fn run_args(
        &mut self,
        volumes: &[PathBuf],
        watches: &[PathBuf],
        slots: u32,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log"))?;
        let mut cmd = Command::new(bin("gaffer-agent"));
        cmd.arg("run").arg("--data-dir").arg(self.data_dir()).args(["--slots", &slots.to_string()]);
        for v in volumes {
            cmd.arg("--volume").arg(v);
        }
        for w in watches {
            cmd.arg("--watch").arg(w).args(["--watch-settle-secs", "1"]);
        }
        cmd.args(extra);
        cmd.env("GAFFER_LOG", "info,gaffer_agent=debug").stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Process ids of the analysis workers the running agent has started now (its child
    /// processes), read from `/proc`.
    pub fn worker_pids(&self) -> Vec<u32> {
        let Some(parent) = self.child.as_ref().map(Child::id) else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|pid| {
                // /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain spaces.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|st| st.rsplit_once(')').map(|(_, rest)| rest.to_owned()))
                    .and_then(|rest| rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()))
                    == Some(parent)
            })
            .collect()
    }

    /// Sends SIGKILL to every analysis worker of the running agent; returns how many.
    pub fn kill_workers(&self) -> usize {
        let pids = self.worker_pids();
        for pid in &pids {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
        pids.len()
    }

    /// `gaffer-agent status --json` (works whether or not `run` is running).
    pub fn status(&self) -> anyhow::Result<Value> {
        let out =
            Command::new(bin("gaffer-agent")).args(["status", "--json", "--data-dir"]).arg(self.data_dir()).output()?;
        json_output(&out, "gaffer-agent status")
    }

    /// Whether the `run` process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops `run` the way systemd does: SIGTERM, then up to 20 s for it to exit (SIGKILL after
    /// that). Returns whether it exited on the SIGTERM.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sigkill(&mut c);
        false
    }

    /// Kills `run` with SIGKILL (no goodbye on the link).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to `cp` with `agent`'s own certificate and key (as the real agent would, but without
/// running it), says Hello through the real [`AgentSession`], sends `messages` as outbox entries
/// numbered from `first_seq`, and returns what the control plane answered for each sequence
/// number: `Ok(())` for an acknowledgement, `Err(message)` for an error. A tool for testing what
/// the control plane accepts from an enrolled, authenticated but misbehaving box.
pub fn send_as_agent(
    cp: &ControlPlane,
    agent: &Agent,
    first_seq: u64,
    messages: Vec<gaffer_protocol::AgentMessage>,
) -> anyhow::Result<Vec<(u64, Result<(), String>)>> {
    use gaffer_protocol::session::{AgentEvent, AgentSession, AgentSessionConfig};
    let data = agent.data_dir();
    let ca = std::fs::read_to_string(data.join("ca.pem"))?;
    let cert = std::fs::read_to_string(data.join("agent.pem"))?;
    let key = std::fs::read_to_string(data.join("agent.key"))?;
    let tls = gaffer_certs::client_config_link(&ca, &cert, &key)?;
    let agent_id: uuid::Uuid = agent.agent_id.parse()?;
    let addr: std::net::SocketAddr = cp.quic_addr.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
        let conn = endpoint.connect(addr, "localhost")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let capabilities = gaffer_protocol::messages::Capabilities {
            gpus: vec![],
            volumes: vec![],
            watch_roots: vec![],
            job_slots: 0,
            profiles: vec![],
            models: vec![],
        };
        let cfg = AgentSessionConfig { agent_id, capabilities, ..AgentSessionConfig::default() };
        let mut session = AgentSession::new(cfg, Instant::now());
        let mut pending: Vec<(u64, gaffer_protocol::AgentMessage)> =
            messages.into_iter().enumerate().map(|(i, m)| (first_seq + i as u64, m)).collect();
        let expected = pending.len();
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(20);
        while answers.len() < expected {
            if session.is_up() && !pending.is_empty() {
                for (seq, msg) in pending.drain(..) {
                    session.send_outbox(seq, msg)?;
                }
            }
            while let Some(bytes) = session.poll_transmit() {
                send.write_all(&bytes).await?;
            }
            anyhow::ensure!(Instant::now() < deadline, "no answer from the control plane within 20 s: {answers:?}");
            match tokio::time::timeout(Duration::from_millis(500), recv.read(&mut buf)).await {
                Ok(read) => match read? {
                    Some(n) => session.handle_input(&buf[..n], Instant::now()),
                    None => bail!("the control plane closed the stream; answers so far {answers:?}"),
                },
                Err(_) => session.handle_timeout(Instant::now()),
            }
            while let Some(event) = session.poll_event() {
                match event {
                    AgentEvent::Acked(seq) if seq >= first_seq => answers.push((seq, Ok(()))),
                    AgentEvent::Rejected { seq, message } | AgentEvent::RetryLater { seq, message } => {
                        answers.push((seq, Err(message)))
                    }
                    AgentEvent::Closed { reason } => bail!("session closed: {reason}; answers so far {answers:?}"),
                    _ => {}
                }
            }
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(answers)
    })
}
