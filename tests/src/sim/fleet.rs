//! The simulated fleet's identities: one enrolled agent per index, each with its own key (made here,
//! only its CSR crosses), its own one-time token (minted through the control plane's admin socket)
//! and its own certificate, through `gaffer_agent::enroll::enroll` itself — the agent's enrollment
//! code, the `gaffer-enroll/1` exchange and the data directory it writes.
//!
//! Layout under the state directory (`--state-dir`, else a temporary one removed at exit):
//!
//! ```text
//! STATE_DIR/agents/00000/   an agent data directory (agent.json, agent.key 0600, agent.pem, ca.pem, …)
//! STATE_DIR/agents/00001/
//! ```
//!
//! A later run with the same state directory reuses every agent whose `agent.json` names this
//! control plane's CA fingerprint and the site, and whose certificate is valid for another hour;
//! any other directory there is removed and that agent enrolled again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gaffer_agent::datadir::DataDir;
use gaffer_agent::enroll::EnrollParams;
use gaffer_certs::CaFingerprint;
use gaffer_control::admin::{AdminRequest, AdminResponse};

use super::agent::AgentSpec;

/// Lifetime of the enrollment tokens the simulator mints, seconds (unused ones expire).
pub const ENROLL_TOKEN_TTL_SECS: u64 = 3600;
/// Enrollment attempts per agent (each with a fresh token) before the run gives up.
pub const ENROLL_ATTEMPTS_MAX: u32 = 5;
/// A cached certificate must be valid at least this much longer to be reused, seconds.
const CACHED_CERT_VALIDITY_MIN_SECS: i64 = 3600;

/// What [`enroll_fleet`] needs.
pub struct FleetEnrollment<'a> {
    /// The control plane's admin socket (`CONTROL_DIR/control.sock`).
    pub admin_socket: &'a Path,
    /// `--control HOST:PORT`.
    pub control_addr: &'a str,
    /// The CA fingerprint agents check the control plane against.
    pub ca_fingerprint: CaFingerprint,
    /// `--site`.
    pub site: &'a str,
    /// `--agents`.
    pub agents: usize,
    /// Where the agents' data directories live.
    pub state_dir: &'a Path,
    /// Enrollments in flight at most.
    pub concurrency: usize,
}

/// How the fleet's identities came about.
#[derive(Debug, Clone, Copy)]
pub struct EnrollSummary {
    /// Agents enrolled by this run.
    pub enrolled: usize,
    /// Agents reused from the state directory.
    pub reused: usize,
    /// Wall time of the enrollment phase.
    pub elapsed: Duration,
}

/// The data directory of agent `index`.
pub fn agent_dir(state_dir: &Path, index: usize) -> PathBuf {
    state_dir.join("agents").join(format!("{index:05}"))
}

/// Enrolls (or reuses) `agents` identities with bounded concurrency and returns them in index
/// order with their QUIC client configs.
///
/// # Errors
/// The first agent that could not be enrolled after [`ENROLL_ATTEMPTS_MAX`] attempts, with the
/// control plane's reason.
pub async fn enroll_fleet(p: FleetEnrollment<'_>) -> anyhow::Result<(Vec<AgentSpec>, EnrollSummary)> {
    let started = Instant::now();
    std::fs::create_dir_all(p.state_dir.join("agents"))
        .with_context(|| format!("creating {}", p.state_dir.join("agents").display()))?;
    let permits = Arc::new(tokio::sync::Semaphore::new(p.concurrency.max(1)));
    let (enrolled, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..p.agents {
        let permits = permits.clone();
        let (enrolled, done) = (enrolled.clone(), done.clone());
        let dd = DataDir::new(agent_dir(p.state_dir, index));
        let admin_socket = p.admin_socket.to_path_buf();
        let (control_addr, site, fp) = (p.control_addr.to_owned(), p.site.to_owned(), p.ca_fingerprint);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.context("enrollment stopped")?;
            let spec = match reuse(&dd, index, &fp, &site)? {
                Some(spec) => spec,
                None => {
                    let spec = enroll_one(&dd, index, &admin_socket, &control_addr, fp, &site).await?;
                    enrolled.fetch_add(1, Ordering::Relaxed);
                    spec
                }
            };
            done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(spec)
        });
    }
    let mut specs: Vec<Option<AgentSpec>> = (0..p.agents).map(|_| None).collect();
    let mut last_log = Instant::now();
    while let Some(joined) = tasks.join_next().await {
        let spec = match joined.context("an enrollment task failed")? {
            Ok(spec) => spec,
            Err(e) => {
                tasks.abort_all();
                return Err(e);
            }
        };
        let i = spec.index;
        specs[i] = Some(spec);
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(done = done.load(Ordering::Relaxed), of = p.agents, "enrolling the simulated agents");
        }
    }
    let specs: Vec<AgentSpec> = specs.into_iter().flatten().collect();
    let enrolled = enrolled.load(Ordering::Relaxed);
    Ok((specs, EnrollSummary { enrolled, reused: p.agents - enrolled, elapsed: started.elapsed() }))
}

/// Agent `index` from its data directory when it is enrolled with this CA and site and its
/// certificate is valid for another hour; otherwise removes the directory and returns None.
fn reuse(dd: &DataDir, index: usize, fp: &CaFingerprint, site: &str) -> anyhow::Result<Option<AgentSpec>> {
    if !dd.root().exists() {
        return Ok(None);
    }
    let usable =
        dd.load_identity().ok().filter(|id| id.ca_fingerprint == fp.to_string() && id.site == site).filter(|_| {
            let now = (gaffer_agent::now_ms() / 1000) as i64;
            std::fs::read(dd.cert_path())
                .ok()
                .and_then(|pem| gaffer_certs::cert_not_after_unix(&pem).ok())
                .is_some_and(|not_after| not_after > now + CACHED_CERT_VALIDITY_MIN_SECS)
        });
    match usable {
        Some(identity) => match spec_of(dd, index, identity.agent_id) {
            Ok(spec) => Ok(Some(spec)),
            Err(e) => {
                tracing::warn!(index, error = %e, "cached agent unusable; enrolling it again");
                remove_dir(dd)?;
                Ok(None)
            }
        },
        None => {
            remove_dir(dd)?;
            Ok(None)
        }
    }
}

fn remove_dir(dd: &DataDir) -> anyhow::Result<()> {
    std::fs::remove_dir_all(dd.root()).with_context(|| format!("removing the stale {}", dd.root().display()))
}

/// The QUIC client config of the agent enrolled in `dd`, built as the agent builds it.
fn spec_of(dd: &DataDir, index: usize, agent_id: uuid::Uuid) -> anyhow::Result<AgentSpec> {
    let ca = dd.read(&dd.ca_path())?;
    let cert = dd.read(&dd.cert_path())?;
    let key = dd.read(&dd.key_path())?;
    let tls = gaffer_certs::client_config_link(&ca, &cert, &key)?;
    let quic = gaffer_agent::link::client_config(tls)?;
    Ok(AgentSpec { index, agent_id, quic })
}

/// Mints a token and runs the agent's own enrollment into `dd`, retrying with the agent's
/// back-off when the control plane is unreachable or busy.
async fn enroll_one(
    dd: &DataDir,
    index: usize,
    admin_socket: &Path,
    control_addr: &str,
    fp: CaFingerprint,
    site: &str,
) -> anyhow::Result<AgentSpec> {
    let mut backoff = gaffer_agent::link::RECONNECT_BACKOFF_MIN;
    let mut attempt = 1;
    loop {
        let token = mint_enrollment_token(admin_socket, site).await?;
        let params = EnrollParams {
            control_addr: control_addr.to_owned(),
            token,
            ca_fingerprint: fp,
            site: Some(site.to_owned()),
        };
        // The agent's enrollment does blocking file I/O (fsynced key and certificate files): it
        // runs on the blocking pool, driving its QUIC exchange on the runtime from there.
        let handle = tokio::runtime::Handle::current();
        let dir = dd.clone();
        let result = tokio::task::spawn_blocking(move || handle.block_on(gaffer_agent::enroll::enroll(&dir, &params)))
            .await
            .context("the enrollment thread failed")?;
        match result {
            Ok(identity) => return spec_of(dd, index, identity.agent_id),
            Err(e @ gaffer_agent::AgentError::Refused(_))
            | Err(e @ gaffer_agent::AgentError::ReleaseKeyMismatch(_)) => {
                bail!("the control plane refused to enroll simulated agent {index}: {e}")
            }
            Err(e) if attempt >= ENROLL_ATTEMPTS_MAX => {
                bail!("could not enroll simulated agent {index} after {attempt} attempts: {e}")
            }
            Err(e) => {
                tracing::debug!(index, attempt, error = %e, "enrollment failed; trying again");
                tokio::time::sleep(gaffer_agent::link::reconnect_delay(backoff)).await;
                backoff = gaffer_agent::link::next_backoff(backoff);
                attempt += 1;
            }
        }
    }
}

/// Asks the running control plane for a one-time enrollment token for `site`.
async fn mint_enrollment_token(admin_socket: &Path, site: &str) -> anyhow::Result<String> {
    let req = AdminRequest::CreateEnrollmentToken { site: site.to_owned(), ttl_secs: ENROLL_TOKEN_TTL_SECS };
    match super::admin(admin_socket, &req).await? {
        AdminResponse::EnrollmentToken(t) => Ok(t.token),
        other => bail!("unexpected answer to an enrollment token request: {other:?}"),
    }
}
