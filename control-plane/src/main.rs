//! `gaffer-control`: command-line entry point.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use gaffer_certs::FleetCa;
use gaffer_control::admin::{self, AdminRequest, AdminResponse};
use gaffer_control::config::{self, InitOptions, ServeOptions};
use gaffer_control::datadir::{ControlConfig, DataDir};
use gaffer_control::http::tls::{HttpServer, HttpServerOptions};
use gaffer_control::identity::{self, LinkCertPolicy, Pki};
use gaffer_control::ingest::Ingest;
use gaffer_control::jobs::JobPolicy;
use gaffer_control::link::{self, Link, LinkConfig};
use gaffer_control::offline::{self, OfflineSync};
use gaffer_control::replica::Replica;
use gaffer_control::scheduler::SchedulerConfig;
use gaffer_control::store::pg_store::{PgOptions, PgStore};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{Role, Store};
use gaffer_control::AppState;

/// The version this build reports: `GAFFER_BUILD_VERSION` at build time when it was set (and not
/// empty), else the crate version. Read here, in the binary's crate, so that building with another
/// version recompiles only this crate; the library gets it from [`gaffer_control::set_build_version`].
const BUILD_VERSION: &str = match option_env!("GAFFER_BUILD_VERSION") {
    Some(v) if !v.is_empty() => v,
    _ => env!("CARGO_PKG_VERSION"),
};

/// Gaffer control plane: assigns analysis jobs to agents, aggregates their health and results, and
/// serves the dashboard and API.
#[derive(Parser)]
#[command(name = "gaffer-control", version = BUILD_VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: fleet CA, server certificate, user `admin` with a new password.
    Init(InitArgs),
    /// Run the QUIC endpoint, the scheduler and the HTTP dashboard/API.
    Serve(ServeArgs),
    /// Check a configuration file without running anything: every problem, with its line.
    Validate(ValidateArgs),
    /// Enrollment tokens for new agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Bearer tokens for the JSON API: named, with a role and an expiry.
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// Dashboard users and their roles (admin > operator > viewer).
    User {
        #[command(subcommand)]
        command: UserCommand,
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
    /// The fleet CA: rotation in phases (init, update-clients, update-servers, standby; rollback).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Manage enrolled agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Agent releases: the release key (keygen), signing (sign, offline), add, list.
    Release {
        #[command(subcommand)]
        command: gaffer_control::release::ReleaseCommand,
    },
    /// Staged rollouts of a release to the agents: start (canaries first), status, pause, resume,
    /// abort. Needs the running server (`serve`).
    Rollout {
        #[command(subcommand)]
        command: gaffer_control::rollout::RolloutCommand,
    },
    /// Webhooks and alert email: add (an HTTP URL or an SMTP mailbox, with its events), list,
    /// remove, test, deliveries. Alert thresholds and retries are in the config file's [alerts]
    /// and [webhooks] tables.
    Webhook {
        #[command(subcommand)]
        command: gaffer_control::webhook::WebhookCommand,
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
enum CaCommand {
    /// Move the CA rotation to the next phase: init (a new CA, trusted beside the current one and
    /// pushed to agents), update-clients (agents get certificates from the new CA), update-servers
    /// (the server certificate too), standby (the old CA is dropped); rollback from any phase before
    /// standby, then standby. Works while `serve` runs (through its admin socket).
    Rotate {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The phase to enter.
        #[arg(long, value_enum)]
        phase: identity::RotationPhase,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Where the rotation stands and which agents still hold certificates from another CA.
    Status {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
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
    /// Take an agent out of rotation for maintenance: no new jobs; the jobs it runs finish, and
    /// with --deadline those still running then are requeued for other agents (the attempt is
    /// given back). It stays out of rotation until `agent uncordon`.
    Drain {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The agent's id.
        #[arg(long)]
        agent: uuid::Uuid,
        /// How long its running jobs may take before they are requeued, e.g. `30m`, `2h`
        /// (default: no deadline, wait for them).
        #[arg(long)]
        deadline: Option<humantime::Duration>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// No new jobs for an agent; the jobs it runs finish (`agent uncordon` lifts it).
    Cordon {
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
    /// Put a cordoned or drained agent back in rotation.
    Uncordon {
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
    /// Configuration file (TOML) to take data_dir, quic_listen, http_listen, agent_cert_ttl and
    /// the [init] table from; the packages install /etc/gaffer/control.toml. Flags given here
    /// override it.
    #[arg(long, env = "GAFFER_CONTROL_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: InitOptions,
    /// Keep all state in this PostgreSQL database (`postgres://USER:PASSWORD@HOST:PORT/DB`)
    /// instead of the embedded sled store, so that replicas (copies of this data directory) can
    /// share it. Written to DATA_DIR/store.url (0600), which `serve` then uses. Not a
    /// configuration-file key: the URL may hold a password. Default: sled in DATA_DIR/store.
    #[arg(long, env = "GAFFER_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Print the result as JSON (`admin_user`, `admin_password`, `ca_fingerprint`, `data_dir`).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML: every flag below as a key, `-` written `_`); the packages install
    /// /etc/gaffer/control.toml. Flags given here override it.
    #[arg(long, env = "GAFFER_CONTROL_CONFIG")]
    config: Option<PathBuf>,
    /// Print the settings `serve` would use (flags over the file over the defaults) as a
    /// configuration file, and exit without starting.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    options: ServeOptions,
    /// PostgreSQL URL of the shared store, overriding DATA_DIR/store.url (see `init --store`).
    #[arg(long, env = "GAFFER_STORE", hide_env_values = true)]
    store: Option<String>,
}

/// Opens the data directory's store: PostgreSQL at `url` (or DATA_DIR/store.url), else sled.
fn open_store(dd: &DataDir, url: Option<&str>) -> anyhow::Result<Arc<dyn Store>> {
    let saved = match url {
        Some(_) => None,
        None => match std::fs::read_to_string(dd.store_url_path()) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => bail!("reading {}: {e}", dd.store_url_path().display()),
        },
    };
    match url.map(str::to_owned).or(saved) {
        Some(url) => {
            let store = PgStore::connect(&url, PgOptions::default())
                .context("opening the PostgreSQL store (is the database up, and the URL in store.url right?)")?;
            Ok(Arc::new(store))
        }
        None => Ok(Arc::new(
            SledStore::open(&dd.store_path())
                .context("opening the store (is another gaffer-control process using this data dir?)")?,
        )),
    }
}

#[derive(clap::Args)]
struct ValidateArgs {
    /// The configuration file to check.
    #[arg(long, env = "GAFFER_CONTROL_CONFIG")]
    config: PathBuf,
    /// Print `{"ok": bool, "errors": [{"line", "column", "key", "message"}]}`.
    #[arg(long)]
    json: bool,
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
    /// Mint a bearer token for the JSON API (shown once; stored only as its SHA-256).
    Create {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Unique name (a-z, 0-9, '.', '_', '-'): shown in listings and as the audit actor.
        #[arg(long)]
        name: String,
        /// What requests with it may do: viewer (read), operator (also jobs), admin (everything).
        #[arg(long)]
        role: Role,
        /// Lifetime, e.g. 30d, 12h (at most 365d).
        #[arg(long, default_value = "90d")]
        ttl: humantime::Duration,
        /// Print `{"token", "name", "role", "expires_at"}`.
        #[arg(long)]
        json: bool,
    },
    /// List API tokens: names, roles, created, expires, last used (never the secrets).
    List {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token: requests with it are refused at once.
    Revoke {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The token's name.
        #[arg(long)]
        name: String,
        /// Print the revoked token as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user. The password comes from --password-file, else a prompt on a terminal, else it
    /// is generated and printed once.
    Add {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Login name (a-z, 0-9, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// viewer (read), operator (also submit, cancel, retry jobs, drain agents) or admin.
        #[arg(long, default_value = "viewer")]
        role: Role,
        /// Read the password from the first line of this file.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Print the result as JSON (with `password` when it was generated).
        #[arg(long)]
        json: bool,
    },
    /// Remove a user and end its sessions (the last admin cannot be removed).
    Remove {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Login name.
        #[arg(long)]
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List users and their roles.
    List {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password and end its sessions. The password comes from --password-file,
    /// else a prompt on a terminal, else it is generated and printed once.
    Passwd {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Login name.
        #[arg(long)]
        name: String,
        /// Read the password from the first line of this file.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Print the result as JSON (with `password` when it was generated).
        #[arg(long)]
        json: bool,
    },
}

/// A new password for `name`: the first line of `file`, else typed twice at a terminal prompt,
/// else generated (then returned as the second value, to be printed once).
fn new_password(name: &str, file: Option<&std::path::Path>) -> anyhow::Result<(String, Option<String>)> {
    use std::io::IsTerminal as _;
    if let Some(path) = file {
        let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.len() > (admin::PASSWORD_BYTES_MAX + 2) as u64 {
            bail!("{} is larger than a password may be ({} bytes)", path.display(), admin::PASSWORD_BYTES_MAX);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let password = text.lines().next().unwrap_or_default().to_owned();
        return Ok((password, None));
    }
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("New password for {name}: "))?;
        let again = rpassword::prompt_password("Again: ")?;
        if first != again {
            bail!("the two passwords differ; nothing changed");
        }
        return Ok((first, None));
    }
    let generated = admin::generate_password();
    Ok((generated.clone(), Some(generated)))
}

fn main() -> anyhow::Result<()> {
    gaffer_control::set_build_version(BUILD_VERSION);
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Init(args) => init(args),
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Validate(args) => validate(args),
        Command::Release { command } => {
            print!("{}", rt.block_on(gaffer_control::release::run_command(command))?);
            Ok(())
        }
        Command::Rollout { command } => {
            print!("{}", rt.block_on(gaffer_control::rollout::run_command(command)).map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Command::Webhook { command } => {
            print!("{}", rt.block_on(gaffer_control::webhook::run_command(command)).map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { data_dir, site, ttl, json } } => {
            let ttl_secs = Duration::from(ttl).as_secs();
            let req = AdminRequest::CreateEnrollmentToken { site: site.clone(), ttl_secs };
            let minted = match rt.block_on(admin_or_local(&data_dir, &req))? {
                AdminResponse::EnrollmentToken(t) => t,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            // The one-line install (installers/install-agent.sh served by this control plane).
            let (url, control) = gaffer_control::http::install::install_endpoints(&DataDir::new(&data_dir))?;
            let install_command =
                gaffer_control::http::install::install_command(&url, &control, &minted.token, &minted.ca_fingerprint);
            if json {
                let mut value = serde_json::to_value(&minted)?;
                value["install_command"] = serde_json::Value::String(install_command);
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("token:          {}", minted.token);
                println!("ca fingerprint: {}", minted.ca_fingerprint);
                println!("site:           {}", minted.site);
                println!("expires at:     {}", minted.expires_at);
                println!();
                println!("Install an agent on a new box (as root; downloads, verifies, enrolls and starts it):");
                println!("  {install_command}");
                println!("Or, with gaffer-agent already installed:");
                println!(
                    "  gaffer-agent enroll --data-dir /var/lib/gaffer-agent --control {control} --token {} --ca-fingerprint {}",
                    minted.token, minted.ca_fingerprint
                );
            }
            Ok(())
        }
        Command::EnrollOffline { data_dir, request, out, json } => {
            let req = AdminRequest::EnrollOffline {
                request: std::path::absolute(&request)?,
                out: std::path::absolute(&out)?,
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
        Command::Agent { command: AgentCommand::Drain { data_dir, agent, deadline, json } } => {
            let deadline_secs = deadline.map(|d| std::time::Duration::from(d).as_secs());
            set_scheduling(&rt, &data_dir, agent, admin::SchedulingChange::Drain { deadline_secs }, json)
        }
        Command::Agent { command: AgentCommand::Cordon { data_dir, agent, json } } => {
            set_scheduling(&rt, &data_dir, agent, admin::SchedulingChange::Cordon, json)
        }
        Command::Agent { command: AgentCommand::Uncordon { data_dir, agent, json } } => {
            set_scheduling(&rt, &data_dir, agent, admin::SchedulingChange::Uncordon, json)
        }
        Command::Agent { command: AgentCommand::Revoke { data_dir, agent, json } } => {
            let req = AdminRequest::RevokeAgent { agent_id: agent };
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
        Command::Ca { command: CaCommand::Rotate { data_dir, phase, json } } => {
            let report = match rt.block_on(admin_or_local(&data_dir, &AdminRequest::RotateCa { phase }))? {
                AdminResponse::CaRotated(r) => r,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("CA rotation: {} → {}", report.from, report.phase);
                println!("  current CA:      {}", report.current_ca_fingerprint);
                if let Some(next) = &report.next_ca_fingerprint {
                    println!("  next CA:         {next}");
                }
                println!("  agents enroll with CA fingerprint {}", report.enroll_ca_fingerprint);
                println!("  connected agents told: {}", report.agents_notified);
                println!("Check `gaffer-control ca status` (or the dashboard) before the next phase.");
            }
            Ok(())
        }
        Command::Ca { command: CaCommand::Status { data_dir, json } } => {
            let status = match rt.block_on(admin_or_local(&data_dir, &AdminRequest::CaStatus))? {
                AdminResponse::CaStatus(s) => s,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("phase:       {}", status.phase);
                println!("current CA:  {}", status.current_ca_fingerprint);
                if let Some(next) = &status.next_ca_fingerprint {
                    println!("next CA:     {next}");
                }
                println!("issuing CA:  {}", status.issuing_ca_fingerprint);
                println!("agents with a certificate from another CA: {}", status.agents_on_other_ca.len());
                for a in &status.agents_on_other_ca {
                    println!("  {a}");
                }
            }
            Ok(())
        }
        Command::ApiToken { command } => rt.block_on(api_token_command(command)),
        Command::User { command } => rt.block_on(user_command(command)),
    }
}

async fn api_token_command(command: ApiTokenCommand) -> anyhow::Result<()> {
    match command {
        ApiTokenCommand::Create { data_dir, name, role, ttl, json } => {
            let req = AdminRequest::CreateApiToken { name, role, ttl_secs: Duration::from(ttl).as_secs() };
            let minted = match admin_or_local(&data_dir, &req).await? {
                AdminResponse::ApiToken(t) => t,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&minted)?);
            } else {
                println!("{}", minted.token);
                eprintln!(
                    "API token {} (role {}) expires at {}; it is shown once and stored only as its SHA-256.",
                    minted.name, minted.role, minted.expires_at
                );
            }
        }
        ApiTokenCommand::List { data_dir, json } => {
            let tokens = match admin_or_local(&data_dir, &AdminRequest::ListApiTokens).await? {
                AdminResponse::ApiTokens { tokens } => tokens,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else if tokens.is_empty() {
                println!("No API tokens. Mint one with `gaffer-control api-token create --name NAME --role ROLE`.");
            } else {
                println!("{:<24} {:<9} {:<21} {:<29} LAST USED", "NAME", "ROLE", "CREATED", "EXPIRES");
                for t in tokens {
                    let expires = if t.expired { format!("{} (expired)", t.expires_at) } else { t.expires_at };
                    let used = t.last_used_at.unwrap_or_else(|| "never".into());
                    println!("{:<24} {:<9} {:<21} {:<29} {used}", t.name, t.role, t.created_at, expires);
                }
            }
        }
        ApiTokenCommand::Revoke { data_dir, name, json } => {
            let revoked = match admin_or_local(&data_dir, &AdminRequest::RevokeApiToken { name }).await? {
                AdminResponse::ApiTokenRevoked(t) => t,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&revoked)?);
            } else {
                println!("Revoked API token {} (role {}); requests with it are refused.", revoked.name, revoked.role);
            }
        }
    }
    Ok(())
}

async fn user_command(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add { data_dir, name, role, password_file, json } => {
            admin::validate_name(&name, "user name")?;
            let (password, generated) = new_password(&name, password_file.as_deref())?;
            let password_phc = admin::hash_password(&password)?;
            let req = AdminRequest::AddUser { name, role, password_phc };
            let user = match admin_or_local(&data_dir, &req).await? {
                AdminResponse::UserAdded(u) => u,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                let mut v = serde_json::to_value(&user)?;
                if let Some(p) = generated {
                    v["password"] = p.into();
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("Added user {} (role {})", user.name, user.role);
                if let Some(p) = generated {
                    println!("  password: {p}");
                    println!("This password is shown once; it is stored only as an argon2 hash.");
                }
            }
        }
        UserCommand::Passwd { data_dir, name, password_file, json } => {
            let (password, generated) = new_password(&name, password_file.as_deref())?;
            let password_phc = admin::hash_password(&password)?;
            let change = match admin_or_local(&data_dir, &AdminRequest::SetPassword { name, password_phc }).await? {
                AdminResponse::PasswordChanged(c) => c,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                let mut v = serde_json::to_value(&change)?;
                if let Some(p) = generated {
                    v["password"] = p.into();
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("Changed the password of {}; {} sessions ended", change.name, change.sessions_ended);
                if let Some(p) = generated {
                    println!("  password: {p}");
                }
            }
        }
        UserCommand::Remove { data_dir, name, json } => {
            let change = match admin_or_local(&data_dir, &AdminRequest::RemoveUser { name }).await? {
                AdminResponse::UserRemoved(c) => c,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&change)?);
            } else {
                println!("Removed user {}; {} sessions ended", change.name, change.sessions_ended);
            }
        }
        UserCommand::List { data_dir, json } => {
            let users = match admin_or_local(&data_dir, &AdminRequest::ListUsers).await? {
                AdminResponse::Users { users } => users,
                other => bail!("unexpected answer from the control plane: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                println!("{:<24} {:<9} {:<21} PASSWORD CHANGED", "NAME", "ROLE", "CREATED");
                for u in users {
                    println!("{:<24} {:<9} {:<21} {}", u.name, u.role, u.created_at, u.password_changed_at);
                }
            }
        }
    }
    Ok(())
}

/// `agent drain|cordon|uncordon`: through the running server, or in the store for its next start.
fn set_scheduling(
    rt: &tokio::runtime::Runtime,
    data_dir: &std::path::Path,
    agent: uuid::Uuid,
    change: admin::SchedulingChange,
    json: bool,
) -> anyhow::Result<()> {
    let req = AdminRequest::SetScheduling { agent_id: agent, change };
    let report = match rt.block_on(admin_or_local(data_dir, &req))? {
        AdminResponse::Scheduling(r) => r,
        other => bail!("unexpected answer from the control plane: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let state = report.scheduling.describe(gaffer_control::now_ms()).unwrap_or_else(|| "back in rotation".to_owned());
    println!("Agent {}: {state}; it holds {} job(s)", report.agent_id, report.jobs_held);
    if !report.connected {
        println!("It is not connected to a running control plane here; the change applies when it connects");
    }
    Ok(())
}

/// Performs an admin action through the running server, or directly on the store if none runs.
async fn admin_or_local(data_dir: &std::path::Path, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    let dd = DataDir::new(data_dir);
    dd.load_config()?;
    if let Some(resp) = admin::request(&dd.admin_socket_path(), req).await? {
        return Ok(resp);
    }
    let store = open_store(&dd, None)?;
    let ca_fp = gaffer_certs::CaFingerprint::from_cert_pem(&dd.read(&dd.ca_cert_path())?)?;
    let offline_sync = match req {
        AdminRequest::EnrollOffline { .. }
        | AdminRequest::ImportBundle { .. }
        | AdminRequest::RevokeAgent { .. }
        | AdminRequest::RotateCa { .. }
        | AdminRequest::CaStatus => {
            let config = dd.load_config()?;
            // Without a running server, the default deadlines and attempts apply (only leases
            // for air-gapped agents, which have no deadline, are made here).
            let state = AppState::new(store.clone(), SchedulerConfig::default());
            let pki = Pki::open(&dd, config.server_names.clone(), config.agent_cert_ttl_secs, state.metrics.clone())?;
            let ingest = Arc::new(Ingest::new(state.clone()));
            let sync = OfflineSync::open(&dd, pki, state, ingest)?;
            return match admin::handle(store.as_ref(), &ca_fp, Some(&sync), &admin::local_actor(), req.clone()) {
                AdminResponse::Error { message } => bail!("{message}"),
                resp => Ok(resp),
            };
        }
        _ => None::<OfflineSync>,
    };
    match admin::handle(store.as_ref(), &ca_fp, offline_sync.as_ref(), &admin::local_actor(), req.clone()) {
        AdminResponse::Error { message } => bail!("{message}"),
        resp => Ok(resp),
    }
}

/// The user `init` creates.
const ADMIN_USER: &str = "admin";

/// `validate`: prints `FILE: ok`, or every problem (exit status 1).
fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let problems = gaffer_service::config_file::validate(&args.config, config::check);
    print!("{}", gaffer_service::config_file::report(&args.config, &problems, args.json));
    if !problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::load(path)?.init,
        None => InitOptions::default(),
    };
    let settings = args.options.or(file).resolve()?;
    let dd = DataDir::new(&settings.data_dir);
    dd.create()?;
    let mut server_names = settings.server_name.clone();
    if server_names.is_empty() {
        server_names = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(h) = hostname() {
            if !server_names.contains(&h) {
                server_names.push(h);
            }
        }
    }
    let agent_cert_ttl_secs = settings.agent_cert_ttl.as_secs();
    identity::check_ttl(agent_cert_ttl_secs)?;
    let ca = FleetCa::generate(&settings.fleet_name)?;
    let server = ca.issue_server_cert_secs(&server_names, agent_cert_ttl_secs)?;
    dd.write_pki(&ca, &server)?;
    offline::load_or_create_bundle_key(&dd)?;

    let password = admin::generate_password();
    let phc = admin::hash_password(&password)?;
    if let Some(url) = &args.store {
        gaffer_certs::write_secret_file(&dd.store_url_path(), format!("{url}\n").as_bytes())?;
    }
    let store = open_store(&dd, args.store.as_deref())?;
    if store.get_user(ADMIN_USER)?.is_some() {
        bail!(
            "the database already has an {ADMIN_USER} user: it belongs to another control plane. To add a \
             replica of it, copy that control plane's data directory (keys and store.url, 0600) instead of \
             running init; to start afresh, give init an empty database"
        );
    }
    admin::add_user(store.as_ref(), &admin::local_actor(), ADMIN_USER, Role::Admin, &phc)?;
    store.flush()?;

    let config = ControlConfig {
        quic_listen: settings.quic_listen,
        http_listen: settings.http_listen,
        server_names: server_names.clone(),
        fleet_name: settings.fleet_name.clone(),
        agent_cert_ttl_secs,
    };
    let release_key = match &settings.release_key_dir {
        Some(dir) => {
            let dir = gaffer_control::release::record_release_key_dir(&dd, dir)?;
            let key = gaffer_control::release::ReleaseKeyDir::new(&dir).public_key()?;
            Some((dir, key.map(|k| k.fingerprint().to_string())))
        }
        None => None,
    };
    dd.write_public(&dd.config_path(), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let fp = ca.fingerprint().to_string();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "data_dir": settings.data_dir,
                "ca_fingerprint": fp,
                "admin_user": ADMIN_USER,
                "admin_password": password,
                "server_names": server_names,
                "release_key_dir": release_key.as_ref().map(|(dir, _)| dir),
                "release_key_fingerprint": release_key.as_ref().and_then(|(_, fp)| fp.as_deref()),
            })
        );
    } else {
        println!("Initialized {}", settings.data_dir.display());
        println!("  CA fingerprint (SHA-256): {fp}");
        println!("  server names:             {}", server_names.join(", "));
        println!("  dashboard user:           {ADMIN_USER} (role admin)");
        println!("  its password:             {password}");
        match &release_key {
            Some((dir, Some(fp))) => println!("  release key (SHA-256):    {fp} in {}", dir.display()),
            Some((dir, None)) => println!(
                "  release key:              none in {} yet: `gaffer-control release keygen --out {}`",
                dir.display(),
                dir.display()
            ),
            None => {}
        }
        println!("This password is shown once; it is stored only as an argon2 hash.");
        println!("Add people with `gaffer-control user add --name NAME --role viewer|operator|admin`.");
        println!("Next: gaffer-control serve --data-dir {}", settings.data_dir.display());
    }
    Ok(())
}

fn hostname() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_owned())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let control_file = match &args.config {
        Some(path) => config::load(path)?,
        None => config::ControlFile::default(),
    };
    let (alert_settings, webhook_settings) = (control_file.alerts, control_file.webhooks);
    let file = control_file.serve;
    let settings = args.options.or(file).resolve()?;
    if args.print_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    let dd = DataDir::new(&settings.data_dir);
    let config = dd.load_config()?;
    let store = open_store(&dd, args.store.as_deref())?;
    let policy = JobPolicy {
        assign_timeout_ms: settings.assign_timeout_secs * 1000,
        lease_grace_ms: settings.lease_grace_secs * 1000,
        max_attempts: settings.max_attempts,
    };
    let state = AppState::new(store.clone(), SchedulerConfig { policy, ..SchedulerConfig::default() });
    // Nothing is connected to this process yet, whatever the last run recorded; agents connected
    // to another live replica stay as they are (their replica's heartbeat says so).
    {
        let st = state.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            st.replica.observe(st.store.as_ref(), gaffer_control::now_ms())?;
            for agent in st.store.list_agents()? {
                if agent.connected && !st.replica.holds_elsewhere(&agent) {
                    st.store.update_agent(agent.id, &mut |a| {
                        if !st.replica.holds_elsewhere(a) {
                            a.connected = false;
                            a.link_replica = None;
                        }
                    })?;
                }
            }
            Ok(())
        })
        .await??;
    }

    let agent_cert_ttl_secs = settings.agent_cert_ttl.map_or(config.agent_cert_ttl_secs, |d| d.as_secs());
    identity::check_ttl(agent_cert_ttl_secs)?;
    let pki = Pki::open(&dd, config.server_names.clone(), agent_cert_ttl_secs, state.metrics.clone())?;
    let mut state = state;
    state.pki = Some(pki.clone());
    // A server certificate past half its life (e.g. after a long stop) is renewed before serving.
    pki.renew_server_cert_if_due((gaffer_control::now_ms() / 1000) as i64)?;
    let link_cfg = LinkConfig {
        heartbeat_interval_secs: settings.heartbeat_interval_secs,
        idle_timeout: Duration::from_secs(settings.idle_timeout_secs),
        wire_audit_log: settings.wire_audit_log.clone(),
        bundle_recipient: Some(offline::load_or_create_bundle_key(&dd)?.recipient()),
        release_key: Some(Arc::new(gaffer_control::release::ReleaseKeySource::open(&dd)?)),
        releases: Some(gaffer_control::release::Releases::new(&dd)),
        admission: settings.admission,
    };
    // Staged rollouts: orders go to agents as they connect; the tick moves phases and deadlines.
    let rollouts = gaffer_control::rollout::Rollouts::load(
        store.clone(),
        state.scheduler.fleet().clone(),
        gaffer_control::release::Releases::new(&dd),
        state.metrics.clone(),
    )?;
    state.rollouts = Some(rollouts.clone());
    tokio::spawn(rollout_ticker(rollouts.clone(), state.replica.clone()));
    // Webhooks and alerts: events from the scheduler, ingest and rollouts; enrolled agents not
    // connected yet start their offline timer now; the worker delivers.
    let webhooks =
        gaffer_control::webhook::Webhooks::new(store.clone(), alert_settings, webhook_settings, state.metrics.clone());
    {
        let (st, hooks) = (state.clone(), webhooks.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let now = gaffer_control::now_ms();
            for agent in st.store.list_agents()? {
                if agent.revoked_at_ms.is_none() && !agent.offline && !st.replica.holds_elsewhere(&agent) {
                    hooks.agent_disconnected(agent.id, now);
                }
            }
            Ok(())
        })
        .await??;
    }
    state.scheduler.set_webhooks(webhooks.clone());
    rollouts.set_webhooks(webhooks.clone());
    tokio::spawn(gaffer_control::webhook::worker::run(webhooks));
    // Every agent handshake asks the live revocation set and counts its refusals.
    let cert_policy = LinkCertPolicy::new(state.revocations.clone(), state.metrics.clone());
    let tls = pki.quic_tls(cert_policy.clone())?;
    let quic_addr = settings.quic_listen.unwrap_or(config.quic_listen);
    let endpoint = quic_server_endpoint(link::quinn_server_config(tls, &link_cfg)?, quic_addr)?;
    let http_opts = HttpServerOptions {
        listen: settings.http_listen.unwrap_or(config.http_listen),
        tls: settings.http_tls,
        tls_cert_file: settings.http_tls_cert.clone(),
        tls_key_file: settings.http_tls_key.clone(),
        metrics_token_file: settings.metrics_token_file.clone(),
        metrics_listen: settings.metrics_listen,
    };
    // HTTPS (when on) serves the fleet server certificate through `http.fleet_cert()`, which
    // renewal can reload, or the operator's --http-tls-cert.
    let http = HttpServer::bind(&http_opts, &dd).await?;

    let scheduler = state.scheduler.clone();
    // Leases of agents that are not connected (all of them, now) start their grace.
    {
        let scheduler = scheduler.clone();
        tokio::task::spawn_blocking(move || scheduler.recover(gaffer_control::now_ms())).await??;
    }
    tokio::spawn(scheduler.clone().run());
    tokio::spawn(retention_sweeper(store.clone(), settings.finished_job_retention, state.replica.clone()));
    tokio::spawn(renew_server_cert(pki.clone()));
    tokio::spawn(reload_tls(pki.clone(), endpoint.clone(), cert_policy, link_cfg.clone(), http.fleet_cert()));
    let link = Link::new(state.clone(), pki.clone(), link_cfg)?;
    let bound_quic = endpoint.local_addr()?;
    let offline_sync = Arc::new(OfflineSync::open(&dd, pki.clone(), state.clone(), link.ingest())?);
    tokio::spawn(link.run(endpoint.clone()));
    let _admin = admin::serve_admin_socket_with(
        &dd.admin_socket_path(),
        store.clone(),
        pki.enroll_fingerprint(),
        Some(offline_sync),
        Some(admin::LiveFleet { rollouts, scheduler: scheduler.clone() }),
    )
    .await?;

    let bound_http = http.local_addr();
    gaffer_control::replica::spawn(state.clone(), bound_quic.to_string(), bound_http.to_string());
    let dashboard_url = http.dashboard_url();
    let serve_info = serde_json::json!({
        "pid": std::process::id(),
        "quic_addr": bound_quic,
        "http_addr": bound_http,
        "http_tls": http.security().tls,
        "metrics_addr": http.metrics_addr(),
        "dashboard_url": dashboard_url,
        "ca_fingerprint": pki.enroll_fingerprint().to_string(),
        "version": gaffer_control::build_version(),
    });
    dd.write_public(&dd.root().join("serve.json"), serde_json::to_string_pretty(&serve_info)?.as_bytes())?;
    tracing::info!(
        quic = %bound_quic, http = %bound_http, tls = http.security().tls, metrics = ?http.metrics_addr(),
        "control plane serving; dashboard at {dashboard_url}"
    );

    // systemd (Type=notify): ready once QUIC and HTTP are listening; the watchdog is fed only
    // while the runtime, the blocking pool and the store answer.
    let listening = format!("QUIC udp/{bound_quic}, dashboard {dashboard_url}");
    gaffer_control::service::ready(&listening);
    let _watchdog = gaffer_control::service::spawn_watchdog({
        let state = state.clone();
        move || gaffer_control::service::control_status(&listening, &state)
    });
    http.serve(state, shutdown_signal()).await.context("serving HTTP")?;
    endpoint.close(link::close_code::OK.into(), b"control plane shutting down");
    let _ = std::fs::remove_file(dd.admin_socket_path());
    let _ = std::fs::remove_file(dd.root().join("serve.json"));
    tracing::info!("control plane stopped");
    Ok(())
}

/// How often rollouts check their deadlines and phases, seconds (5).
const ROLLOUT_TICK_SECS: u64 = 5;

/// Ticks the rollouts every [`ROLLOUT_TICK_SECS`] (health-report deadlines, the next phase).
async fn rollout_ticker(rollouts: Arc<gaffer_control::rollout::Rollouts>, replica: Arc<Replica>) {
    let mut every = tokio::time::interval(Duration::from_secs(ROLLOUT_TICK_SECS));
    loop {
        every.tick().await;
        if !replica.is_leader() {
            continue;
        }
        let r = rollouts.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || r.tick(gaffer_control::now_ms())).await {
            tracing::error!(error = %e, "rollout tick failed");
        }
    }
}

/// Renews the server certificate at half its lifetime: checks every tenth of the certificate TTL
/// (between 5 s and 10 min).
async fn renew_server_cert(pki: Arc<Pki>) {
    loop {
        let every = Duration::from_secs((pki.agent_cert_ttl_secs() / 10).clamp(5, 600));
        tokio::time::sleep(every).await;
        let p = pki.clone();
        match tokio::task::spawn_blocking(move || p.renew_server_cert_if_due((gaffer_control::now_ms() / 1000) as i64))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "server certificate renewal failed; the current one stays in use")
            }
            Err(e) => tracing::error!(error = %e, "server certificate renewal panicked"),
        }
    }
}

/// Rebuilds the QUIC endpoint's TLS config (and the HTTPS certificate, when it serves the fleet's)
/// whenever the server certificate or the trusted CAs change. New connections use the new config;
/// open ones keep theirs.
async fn reload_tls(
    pki: Arc<Pki>,
    endpoint: quinn::Endpoint,
    cert_policy: Arc<LinkCertPolicy>,
    link_cfg: LinkConfig,
    https: Option<Arc<gaffer_control::http::tls::ReloadableCert>>,
) {
    let mut changed = pki.subscribe();
    while changed.changed().await.is_ok() {
        let quic = pki
            .quic_tls(cert_policy.clone())
            .map_err(anyhow::Error::from)
            .and_then(|tls| link::quinn_server_config(tls, &link_cfg).map_err(anyhow::Error::from));
        match quic {
            Ok(cfg) => {
                endpoint.set_server_config(Some(cfg));
                tracing::info!("QUIC endpoint now presents the renewed server certificate");
            }
            Err(e) => tracing::error!(error = %e, "could not rebuild the QUIC TLS config; keeping the old one"),
        }
        if let Some(https) = &https {
            let (server, _) = pki.server_pair();
            if let Err(e) = https.reload(&server.cert_pem, &server.key_pem) {
                tracing::error!(error = %e, "could not reload the HTTPS certificate; keeping the old one");
            }
        }
    }
}

/// Deletes finished jobs older than `retention`, a bounded batch at a time, once a minute.
async fn retention_sweeper(store: Arc<dyn Store>, retention: Duration, replica: Arc<Replica>) {
    const BATCH_MAX: usize = 1000;
    loop {
        if !replica.is_leader() {
            tokio::time::sleep(Duration::from_secs(60)).await;
            continue;
        }
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
    gaffer_control::service::stopping("control plane stopping");
}

/// UDP receive and send buffers asked for the control plane's QUIC socket: 8 MiB (the kernel caps
/// them at `net.core.rmem_max` / `wmem_max`). A reconnect storm of thousands of agents sends
/// bursts the default (about 200 KiB) drops.
const QUIC_SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// The QUIC server endpoint on its own UDP socket bound to `addr`, with
/// [`QUIC_SOCKET_BUFFER_BYTES`] of socket buffers (best effort; the sizes granted are logged).
fn quic_server_endpoint(config: quinn::ServerConfig, addr: std::net::SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
            .with_context(|| format!("creating the QUIC socket for udp/{addr}"))?;
    let _ = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
    tracing::info!(
        recv_buffer_bytes = socket.recv_buffer_size().unwrap_or(0),
        send_buffer_bytes = socket.send_buffer_size().unwrap_or(0),
        "QUIC socket buffers (raise net.core.rmem_max for more)"
    );
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding QUIC on udp/{addr}: is another process using the port?"))?;
    let runtime = quinn::default_runtime().context("no async runtime for the QUIC endpoint")?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket.into(), runtime)
        .with_context(|| format!("starting QUIC on udp/{addr}"))
}
