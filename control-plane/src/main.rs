//! `gaffer-control`: command-line entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use gaffer_certs::{FleetCa, IssuedKeyPair};
use gaffer_control::admin::{self, AdminRequest, AdminResponse};
use gaffer_control::datadir::{ControlConfig, DataDir};
use gaffer_control::ingest::Ingest;
use gaffer_control::jobs::JobPolicy;
use gaffer_control::link::{self, Link, LinkConfig};
use gaffer_control::offline::{self, OfflineSync};
use gaffer_control::scheduler::SchedulerConfig;
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::Store;
use gaffer_control::AppState;

/// Gaffer control plane: assigns analysis jobs to agents, aggregates their health and results, and
/// serves the dashboard and API.
#[derive(Parser)]
#[command(name = "gaffer-control", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: fleet CA, server certificate, admin password.
    Init(InitArgs),
    /// Run the QUIC endpoint, the scheduler and the HTTP dashboard/API.
    Serve(ServeArgs),
    /// Enrollment tokens for new agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Bearer tokens for the JSON API.
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// Sign an air-gapped agent's offline enrollment request (an audited operator action).
    EnrollOffline {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Request file from `gaffer-agent enroll --offline-request`.
        #[arg(long)]
        request: PathBuf,
        /// Where to write the reply for `gaffer-agent enroll --offline-reply`.
        #[arg(long)]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Offline-sync bundles from air-gapped agents.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Manage enrolled agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Verify, decrypt and apply an agent's bundle, and write the reply bundle for it.
    Import {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The bundle from `gaffer-agent bundle export`.
        file: PathBuf,
        /// Where to write the reply bundle for `gaffer-agent bundle import`.
        #[arg(long)]
        reply_out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Revoke an agent's certificate: its bundles and link connections are refused.
    Revoke {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The agent's id.
        #[arg(long)]
        agent: uuid::Uuid,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// Data directory to create (mode 0700).
    #[arg(long)]
    data_dir: PathBuf,
    /// UDP address for agents (QUIC).
    #[arg(long, default_value = "0.0.0.0:7443")]
    quic_listen: SocketAddr,
    /// TCP address for the dashboard and API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// DNS name or IP address agents use to reach this control plane (repeatable). These become
    /// the server certificate's SANs. Default: localhost, 127.0.0.1 and this host's name.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Display name of the fleet (in the CA's name).
    #[arg(long, default_value = "studio")]
    fleet_name: String,
    /// Print the result as JSON (`admin_password`, `ca_fingerprint`, `data_dir`).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory made by `init`.
    #[arg(long)]
    data_dir: PathBuf,
    /// Override the QUIC address from config.json.
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
    /// Override the HTTP address from config.json.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// How long a disconnected agent keeps its running jobs before they are requeued, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_grace_secs: u64,
    /// How long an agent has to accept an assignment before it is requeued, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    assign_timeout_secs: u64,
    /// Attempts (leases) a job gets before it fails for good with "gave up after N attempts".
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// How long finished jobs (and their digests) are kept, e.g. 30d, 12h; older ones are deleted.
    #[arg(long, default_value = "30d")]
    finished_job_retention: humantime::Duration,
    /// Heartbeat interval agents are told to use, seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    heartbeat_interval_secs: u32,
    /// A link with no traffic for this long is considered dead, seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600))]
    idle_timeout_secs: u64,
    /// Append every frame received from agents to this file as JSON lines (audit of what leaves
    /// the boxes).
    #[arg(long)]
    wire_audit_log: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a one-time enrollment token bound to a site.
    Create {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Site the agent will belong to.
        #[arg(long)]
        site: String,
        /// Lifetime, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Print `{"token", "ca_fingerprint", "site", "expires_at"}`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApiTokenCommand {
    /// Mint a bearer token for the JSON API.
    Create {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print `{"token"}`.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Init(args) => init(args),
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Token { command: TokenCommand::Create { data_dir, site, ttl, json } } => {
            let ttl_secs = Duration::from(ttl).as_secs();
            let req = AdminRequest::CreateEnrollmentToken { site: site.clone(), ttl_secs };
            let minted = match rt.block_on(admin_or_local(&data_dir, &req))? {
                AdminResponse::EnrollmentToken(t) => t,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&minted)?);
            } else {
                println!("token:          {}", minted.token);
                println!("ca fingerprint: {}", minted.ca_fingerprint);
                println!("site:           {}", minted.site);
                println!("expires at:     {}", minted.expires_at);
                println!();
                println!("On the new agent box:");
                println!(
                    "  gaffer-agent enroll --data-dir /var/lib/gaffer-agent --control HOST:PORT --token {} --ca-fingerprint {}",
                    minted.token, minted.ca_fingerprint
                );
            }
            Ok(())
        }
        Command::EnrollOffline { data_dir, request, out, json } => {
            let req = AdminRequest::EnrollOffline {
                request: std::path::absolute(&request)?,
                out: std::path::absolute(&out)?,
                who: offline::os_user(),
            };
            let report = match rt.block_on(admin_or_local(&data_dir, &req))? {
                AdminResponse::OfflineEnrolled(r) => r,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("Enrolled agent {} into site {} (offline)", report.agent_id, report.site);
                println!("Reply written to {}; carry it to the agent and run:", report.reply_path.display());
                println!("  gaffer-agent enroll --data-dir DIR --offline-reply FILE --ca-fingerprint FINGERPRINT");
            }
            Ok(())
        }
        Command::Bundle { command: BundleCommand::Import { data_dir, file, reply_out, json } } => {
            let req = AdminRequest::ImportBundle {
                bundle: std::path::absolute(&file)?,
                reply_out: std::path::absolute(&reply_out)?,
                who: offline::os_user(),
            };
            let report = match rt.block_on(admin_or_local(&data_dir, &req))? {
                AdminResponse::BundleImported(r) => r,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                match report {
                    offline::ImportReport::Imported {
                        agent_id,
                        bundle_number,
                        applied,
                        duplicates,
                        rejected,
                        reply_number,
                        assignments,
                        reply_path,
                        ..
                    } => {
                        println!(
                            "Imported bundle {bundle_number} of agent {agent_id}: {applied} applied, {duplicates} already                              applied, {rejected} refused"
                        );
                        println!("Reply {reply_number} ({assignments} jobs) written to {}", reply_path.display());
                    }
                    offline::ImportReport::AlreadyImported { agent_id, bundle_number } => {
                        println!("Bundle {bundle_number} of agent {agent_id} was already imported; nothing changed");
                    }
                }
            }
            Ok(())
        }
        Command::Agent { command: AgentCommand::Revoke { data_dir, agent, json } } => {
            let req = AdminRequest::RevokeAgent { agent_id: agent, who: offline::os_user() };
            let report = match rt.block_on(admin_or_local(&data_dir, &req))? {
                AdminResponse::AgentRevoked(r) => r,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.newly_revoked {
                println!("Revoked agent {} (certificate serial {})", report.agent_id, report.serial_hex);
            } else {
                println!("Agent {} was already revoked", report.agent_id);
            }
            Ok(())
        }
        Command::ApiToken { command: ApiTokenCommand::Create { data_dir, json } } => {
            let minted = match rt.block_on(admin_or_local(&data_dir, &AdminRequest::CreateApiToken))? {
                AdminResponse::ApiToken(t) => t,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&minted)?);
            } else {
                println!("{}", minted.token);
            }
            Ok(())
        }
    }
}

/// Performs an admin action through the running server, or directly on the store if none runs.
async fn admin_or_local(data_dir: &std::path::Path, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    let dd = DataDir::new(data_dir);
    dd.load_config()?;
    if let Some(resp) = admin::request(&dd.admin_socket_path(), req).await? {
        return Ok(resp);
    }
    let store = SledStore::open(&dd.store_path())
        .context("opening the store (is another gaffer-control process using this data dir?)")?;
    let ca_fp = gaffer_certs::CaFingerprint::from_cert_pem(&dd.read(&dd.ca_cert_path())?)?;
    let offline_sync = match req {
        AdminRequest::EnrollOffline { .. } | AdminRequest::ImportBundle { .. } | AdminRequest::RevokeAgent { .. } => {
            let ca = Arc::new(FleetCa::from_pem(&dd.read(&dd.ca_cert_path())?, &dd.read(&dd.ca_key_path())?)?);
            let store: Arc<dyn Store> = Arc::new(store);
            // Without a running server, the default deadlines and attempts apply (only leases
            // for air-gapped agents, which have no deadline, are made here).
            let state = AppState::new(store.clone(), SchedulerConfig::default());
            let ingest = Arc::new(Ingest::new(state.clone()));
            let sync = OfflineSync::open(&dd, ca, state, ingest)?;
            return match admin::handle(store.as_ref(), &ca_fp, Some(&sync), req.clone()) {
                AdminResponse::Error { message } => bail!("{message}"),
                resp => Ok(resp),
            };
        }
        _ => None::<OfflineSync>,
    };
    match admin::handle(&store, &ca_fp, offline_sync.as_ref(), req.clone()) {
        AdminResponse::Error { message } => bail!("{message}"),
        resp => Ok(resp),
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let dd = DataDir::new(&args.data_dir);
    dd.create()?;
    let mut server_names = args.server_names.clone();
    if server_names.is_empty() {
        server_names = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(h) = hostname() {
            if !server_names.contains(&h) {
                server_names.push(h);
            }
        }
    }
    let ca = FleetCa::generate(&args.fleet_name)?;
    let server = ca.issue_server_cert(&server_names)?;
    gaffer_certs::write_secret_file(&dd.ca_key_path(), ca.key_pem().as_bytes())?;
    dd.write_public(&dd.ca_cert_path(), ca.cert_pem().as_bytes())?;
    gaffer_certs::write_secret_file(&dd.server_key_path(), server.key_pem.as_bytes())?;
    dd.write_public(&dd.server_cert_path(), server.cert_pem.as_bytes())?;
    offline::load_or_create_bundle_key(&dd)?;

    let password = gaffer_certs::ApiToken::generate().as_str()["gfa_".len()..].to_owned();
    let salt = SaltString::generate(&mut OsRng);
    let phc = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the admin password: {e}"))?
        .to_string();
    let store = SledStore::open(&dd.store_path())?;
    store.set_admin_password_hash(&phc)?;
    store.flush()?;

    let config = ControlConfig {
        quic_listen: args.quic_listen,
        http_listen: args.http_listen,
        server_names: server_names.clone(),
        fleet_name: args.fleet_name.clone(),
    };
    dd.write_public(&dd.config_path(), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let fp = ca.fingerprint().to_string();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "data_dir": args.data_dir,
                "ca_fingerprint": fp,
                "admin_password": password,
                "server_names": server_names,
            })
        );
    } else {
        println!("Initialized {}", args.data_dir.display());
        println!("  CA fingerprint (SHA-256): {fp}");
        println!("  server names:             {}", server_names.join(", "));
        println!("  admin password:           {password}");
        println!("This password is shown once; it is stored only as an argon2 hash.");
        println!("Next: gaffer-control serve --data-dir {}", args.data_dir.display());
    }
    Ok(())
}

fn hostname() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_owned())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let dd = DataDir::new(&args.data_dir);
    let config = dd.load_config()?;
    let ca_pem = dd.read(&dd.ca_cert_path())?;
    let ca = Arc::new(FleetCa::from_pem(&ca_pem, &dd.read(&dd.ca_key_path())?)?);
    let server = IssuedKeyPair { cert_pem: dd.read(&dd.server_cert_path())?, key_pem: dd.read(&dd.server_key_path())? };
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(&dd.store_path())
            .context("opening the store (is another gaffer-control serve running on this data dir?)")?,
    );
    // Nothing is connected yet, whatever the last run recorded.
    for agent in store.list_agents()? {
        if agent.connected {
            store.update_agent(agent.id, &mut |a| a.connected = false)?;
        }
    }

    let link_cfg = LinkConfig {
        heartbeat_interval_secs: args.heartbeat_interval_secs,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        wire_audit_log: args.wire_audit_log.clone(),
        bundle_recipient: Some(offline::load_or_create_bundle_key(&dd)?.recipient()),
        ..LinkConfig::default()
    };
    // Revoked agents fail the handshake (this list is read at start; agents revoked while serving
    // are refused by the link's enrollment check on the agent record).
    let crls = FleetCa::crls_from_pem(&offline::crl_pem(&ca, store.as_ref())?)?;
    let tls = gaffer_certs::server_config(&ca_pem, &server, crls)?;
    let quic_addr = args.quic_listen.unwrap_or(config.quic_listen);
    let endpoint = quinn::Endpoint::server(link::quinn_server_config(tls, &link_cfg)?, quic_addr)
        .with_context(|| format!("binding QUIC on udp/{quic_addr}"))?;
    let http_addr = args.http_listen.unwrap_or(config.http_listen);
    let http_listener =
        tokio::net::TcpListener::bind(http_addr).await.with_context(|| format!("binding HTTP on tcp/{http_addr}"))?;

    let policy = JobPolicy {
        assign_timeout_ms: args.assign_timeout_secs * 1000,
        lease_grace_ms: args.lease_grace_secs * 1000,
        max_attempts: args.max_attempts,
    };
    let state = AppState::new(store.clone(), SchedulerConfig { policy, ..SchedulerConfig::default() });
    let scheduler = state.scheduler.clone();
    // Leases of agents that are not connected (all of them, now) start their grace.
    {
        let scheduler = scheduler.clone();
        tokio::task::spawn_blocking(move || scheduler.recover(gaffer_control::now_ms())).await??;
    }
    tokio::spawn(scheduler.clone().run());
    tokio::spawn(retention_sweeper(store.clone(), Duration::from(args.finished_job_retention)));
    let link = Link::new(state.clone(), ca.clone(), link_cfg)?;
    let bound_quic = endpoint.local_addr()?;
    let offline_sync = Arc::new(OfflineSync::open(&dd, ca.clone(), state.clone(), link.ingest())?);
    tokio::spawn(link.run(endpoint.clone()));
    let _admin =
        admin::serve_admin_socket(&dd.admin_socket_path(), store.clone(), ca.fingerprint(), Some(offline_sync)).await?;

    let bound_http = http_listener.local_addr()?;
    let serve_info = serde_json::json!({
        "pid": std::process::id(),
        "quic_addr": bound_quic,
        "http_addr": bound_http,
        "dashboard_url": format!("http://{bound_http}/"),
        "ca_fingerprint": ca.fingerprint().to_string(),
    });
    dd.write_public(&dd.root().join("serve.json"), serde_json::to_string_pretty(&serve_info)?.as_bytes())?;
    tracing::info!(quic = %bound_quic, http = %bound_http, "control plane serving; dashboard at http://{bound_http}/");

    let app = gaffer_control::http::router(state);
    axum::serve(http_listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    endpoint.close(link::close_code::OK.into(), b"control plane shutting down");
    let _ = std::fs::remove_file(dd.admin_socket_path());
    let _ = std::fs::remove_file(dd.root().join("serve.json"));
    tracing::info!("control plane stopped");
    Ok(())
}

/// Deletes finished jobs older than `retention`, a bounded batch at a time, once a minute.
async fn retention_sweeper(store: Arc<dyn Store>, retention: Duration) {
    const BATCH_MAX: usize = 1000;
    loop {
        let store = store.clone();
        let swept = tokio::task::spawn_blocking(move || -> Result<usize, gaffer_control::store::StoreError> {
            let cutoff = gaffer_control::now_ms().saturating_sub(retention.as_millis() as u64);
            let mut total = 0;
            loop {
                let n = store.delete_finished_jobs(cutoff, BATCH_MAX)?;
                total += n;
                if n < BATCH_MAX {
                    break;
                }
            }
            if total > 0 {
                store.flush()?;
            }
            Ok(total)
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(jobs = n, "deleted finished jobs past the retention"),
            Ok(Err(e)) => tracing::error!(error = %e, "retention sweep failed; retrying in a minute"),
            Err(e) => tracing::error!(error = %e, "retention sweep panicked; retrying in a minute"),
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
