//! Throwaway PostgreSQL for tests: one database per call of [`test_database`], dropped with it.
//!
//! * With `GAFFER_TEST_POSTGRES_URL` set (the superuser URL of a running server, e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`), each [`test_database`] is a fresh
//!   `gaffer_test_<random>` database on that server.
//! * Otherwise the first call in a process starts a cluster of its own with Debian's `initdb` and
//!   `pg_ctl` (the newest `/usr/lib/postgresql/*/bin`): data and unix socket in a temporary
//!   directory, a free TCP port on 127.0.0.1, `trust` authentication (local test use only),
//!   `fsync` off (a throwaway cluster has nothing to keep across a crash). When the tests run as
//!   root it runs as the unprivileged `postgres` user (`nobody` without one), since PostgreSQL
//!   refuses to run as root. A watchdog process stops the cluster (immediate shutdown) and
//!   removes its directory when the test process exits, however it exits.
//!
//! Without PostgreSQL installed every call fails, naming the package (`postgresql`, which
//! `scripts/setup.sh` installs): the tests that need it fail, they never skip. SQL is run with
//! `psql` (from the same installation, or `PATH`).

use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context as _};

/// Environment variable naming a running server to create test databases on.
pub const POSTGRES_URL_ENV: &str = "GAFFER_TEST_POSTGRES_URL";

const NOT_INSTALLED: &str =
    "PostgreSQL is not installed: install the `postgresql` package (scripts/setup.sh does), or set \
     GAFFER_TEST_POSTGRES_URL to the superuser URL of a running server";

/// A database that exists until this is dropped (`DROP DATABASE … WITH (FORCE)`, which also
/// ends connections still open to it).
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    psql: PathBuf,
}

impl TestDatabase {
    /// URL of the database (`postgres://USER@HOST:PORT/gaffer_test_…`), for `PgStore::connect`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name, `gaffer_test_` and 16 hex digits.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `sql` on this database with `psql` (stops at the first error) and returns what it
    /// printed: rows unaligned, fields separated by `|`, without headers.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        run_psql(&self.psql, &self.url, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = run_psql(&self.psql, &self.admin_url, &sql) {
            eprintln!("[gaffer-tests] could not drop test database {}: {e:#}", self.name);
        }
    }
}

/// A fresh, empty database on the test server (see the module docs).
///
/// # Errors
/// PostgreSQL is not installed (the message names the package), the cluster does not start
/// (with its log), or `CREATE DATABASE` fails.
pub fn test_database() -> anyhow::Result<TestDatabase> {
    let server = server()?;
    let name = format!("gaffer_test_{:016x}", rand::random::<u64>());
    run_psql(&server.psql, &server.admin_url, &format!("CREATE DATABASE \"{name}\""))
        .with_context(|| format!("creating test database {name}"))?;
    let mut url = url::Url::parse(&server.admin_url).context("the server URL does not parse")?;
    url.set_path(&format!("/{name}"));
    Ok(TestDatabase { name, url: url.to_string(), admin_url: server.admin_url.clone(), psql: server.psql.clone() })
}

/// The server every [`test_database`] of this process goes to.
struct Server {
    admin_url: String,
    psql: PathBuf,
    /// The cluster this process started, if it started one (never dropped: the watchdog stops it).
    _cluster: Option<PgCluster>,
    /// Its watchdog's stdin: closed when this process exits, which tells the watchdog to stop the
    /// cluster and remove its directory.
    _watchdog: Option<Mutex<ChildStdin>>,
}

fn server() -> anyhow::Result<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    SERVER.get_or_init(|| start_server().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

fn start_server() -> anyhow::Result<Server> {
    if let Some(url) = std::env::var(POSTGRES_URL_ENV).ok().filter(|u| !u.is_empty()) {
        let psql = find_bin("psql")?;
        run_psql(&psql, &url, "SELECT 1")
            .with_context(|| format!("{POSTGRES_URL_ENV} names a server psql cannot use"))?;
        return Ok(Server { admin_url: url, psql, _cluster: None, _watchdog: None });
    }
    let dir = tempfile::Builder::new().prefix("gaffer-pg-").tempdir().context("creating the cluster directory")?.keep();
    let cluster = start_cluster(&dir)?;
    // The watchdog outlives this process: it waits for its stdin to close, then stops the
    // postmaster (SIGQUIT: immediate shutdown) and removes the directory. Its own process group,
    // so a Ctrl-C meant for the tests does not stop it before it has cleaned up.
    let script = r#"read -r _
pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null)
[ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null
i=0
while [ -e "$1/postmaster.pid" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
rm -rf "$2""#;
    let mut watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("gaffer-pg-watchdog")
        .arg(cluster.data_dir())
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the cluster's watchdog (sh)")?;
    let stdin = watchdog.stdin.take().ok_or_else(|| anyhow!("the watchdog has no stdin"))?;
    // Reaped by init once this process is gone; nothing to wait for before.
    drop(watchdog);
    let (admin_url, psql) = (cluster.admin_url(), cluster.bin_dir.join("psql"));
    Ok(Server { admin_url, psql, _cluster: Some(cluster.into_unstopped()), _watchdog: Some(Mutex::new(stdin)) })
}

/// A PostgreSQL cluster started by [`start_cluster`]; stopped (immediate shutdown) when dropped.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    run_as: Option<String>,
    stop_on_drop: bool,
}

impl PgCluster {
    /// Superuser URL: `postgres://postgres@127.0.0.1:PORT/postgres` (trust authentication).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (`DIR/data`); the server log is `DIR/postgres.log`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`).
    ///
    /// # Errors
    /// `pg_ctl` failed (its output is in the error).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.stop_on_drop = false;
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["stop", "-m", "immediate", "-w", "-t", "30"])
            .output()
            .context("running pg_ctl stop")?;
        if !out.status.success() {
            bail!("pg_ctl stop failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// This cluster, no longer stopped when dropped (someone else stops it).
    fn into_unstopped(mut self) -> PgCluster {
        self.stop_on_drop = false;
        self
    }

    /// `bin` of this installation, run as the cluster's user.
    fn pg_command(&self, bin: &str) -> Command {
        let exe = self.bin_dir.join(bin);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        // The unprivileged user may not be able to enter the tests' working directory.
        cmd.current_dir(&self.dir);
        cmd
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.stop_on_drop {
            if let Err(e) = self.stop() {
                eprintln!("[gaffer-tests] {e:#}");
            }
        }
    }
}

/// Starts a new PostgreSQL cluster in `dir` (created if needed; data in `dir/data`, the log in
/// `dir/postgres.log`, the unix socket in `dir`) on a free port of 127.0.0.1, with trust
/// authentication and `fsync` off: for tests only. When running as root, `dir` is handed to the
/// unprivileged `postgres` user (`nobody` without one), which must be able to reach it.
///
/// # Errors
/// PostgreSQL is not installed (the message names the package), or `initdb` / `pg_ctl start`
/// failed (with their output and the server log).
pub fn start_cluster(dir: &Path) -> anyhow::Result<PgCluster> {
    let bin_dir = server_bin_dir()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let run_as = unprivileged_user()?;
    if let Some(user) = &run_as {
        let out = Command::new("chown").arg("-R").arg(format!("{user}:")).arg(dir).output().context("running chown")?;
        if !out.status.success() {
            bail!("chown {user} {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
    let mut cluster = PgCluster { dir: dir.to_path_buf(), bin_dir, port: 0, run_as, stop_on_drop: false };
    let out = cluster
        .pg_command("initdb")
        .arg("-D")
        .arg(cluster.data_dir())
        .args(["-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"])
        .output()
        .context("running initdb")?;
    if !out.status.success() {
        bail!(
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = dir.join("postgres.log");
    let mut last_error = String::new();
    // A port picked free may be taken before the server binds it: try a few.
    for _ in 0..5 {
        let port = free_port()?;
        let server_opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{}' -c fsync=off \
             -c full_page_writes=off -c synchronous_commit=off -c max_connections=300 -c shared_buffers=32MB",
            dir.display()
        );
        let out = cluster
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(cluster.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &server_opts, "start"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        if out.status.success() {
            cluster.port = port;
            cluster.stop_on_drop = true;
            return Ok(cluster);
        }
        last_error = format!(
            "pg_ctl start failed ({}): {}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    bail!("{last_error}")
}

/// The newest `/usr/lib/postgresql/N/bin` with `initdb` and `pg_ctl`, else the directory of an
/// `initdb` on `PATH`.
fn server_bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let initdb =
        on_path("initdb").ok_or_else(|| anyhow!("{NOT_INSTALLED} (no initdb in /usr/lib/postgresql/*/bin)"))?;
    let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    real.parent().map(Path::to_path_buf).ok_or_else(|| anyhow!("{NOT_INSTALLED}"))
}

/// A client binary (`psql`) of the installation, else from `PATH`.
fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(bin) = server_bin_dir() {
        if bin.join(name).is_file() {
            return Ok(bin.join(name));
        }
    }
    on_path(name).ok_or_else(|| anyhow!("{NOT_INSTALLED} (no {name} found)"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The user to run the server as: none unless this process is root (PostgreSQL refuses root).
fn unprivileged_user() -> anyhow::Result<Option<String>> {
    // /proc/self belongs to this process's effective user.
    let uid = std::fs::metadata("/proc/self").context("reading /proc/self")?.uid();
    if uid != 0 {
        return Ok(None);
    }
    let exists = |user: &str| Command::new("id").arg("-u").arg(user).output().is_ok_and(|o| o.status.success());
    for user in ["postgres", "nobody"] {
        if exists(user) {
            return Ok(Some(user.to_owned()));
        }
    }
    bail!("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn run_psql(psql: &Path, url: &str, sql: &str) -> anyhow::Result<String> {
    let mut child = Command::new(psql)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", psql.display()))?;
    child.stdin.take().ok_or_else(|| anyhow!("psql has no stdin"))?.write_all(sql.as_bytes())?;
    let out = child.wait_with_output().context("waiting for psql")?;
    if !out.status.success() {
        bail!("psql failed ({}) on {sql:?}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
}
