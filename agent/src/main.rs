//! `gaffer-agent`: command-line entry point.

mod cmd_analyze;
mod cmd_models;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gaffer_agent::datadir::DataDir;
use gaffer_agent::enroll::{self, EnrollParams};
use gaffer_agent::health::HealthSampler;
use gaffer_agent::link::{self, LinkParams, LinkStatus};
use gaffer_agent::outbox::Outbox;
use gaffer_agent::runner::{Runner, RunnerConfig, WatchLedger};
use gaffer_agent::watch::{self, WatchConfig};
use gaffer_protocol::messages::{Capabilities, Profile};

/// Gaffer agent: analyzes video on this box and reports metadata and health to the control plane.
#[derive(Parser)]
#[command(name = "gaffer-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this box with a one-time token (the private key is generated here and never leaves).
    Enroll(EnrollArgs),
    /// Connect to the control plane, report health, run assigned jobs and watch folders.
    Run(RunArgs),
    /// Analyze one media file locally, with no control plane, and print its digest.
    Analyze(cmd_analyze::AnalyzeArgs),
    /// Install, verify and list the ONNX Runtime and the analysis models.
    Models(cmd_models::ModelsArgs),
}

#[derive(clap::Args)]
struct EnrollArgs {
    /// Data directory to create (mode 0700).
    #[arg(long)]
    data_dir: PathBuf,
    /// Control plane QUIC address, HOST:PORT (HOST must be one of its server names).
    #[arg(long)]
    control: String,
    /// One-time enrollment token from `gaffer-control token create`.
    #[arg(long, env = "GAFFER_ENROLL_TOKEN", hide_env_values = true)]
    token: String,
    /// SHA-256 fingerprint of the fleet CA, printed with the token (hex, colons optional).
    #[arg(long)]
    ca_fingerprint: gaffer_certs::CaFingerprint,
    /// Site this box belongs to; enrollment is refused if the token is for another site.
    #[arg(long)]
    site: Option<String>,
    /// Print the result as JSON (`agent_id`, `site`).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Data directory made by `enroll`.
    #[arg(long)]
    data_dir: PathBuf,
    /// Directory this agent may read job files from (repeatable).
    #[arg(long = "volume")]
    volumes: Vec<PathBuf>,
    /// Directory to watch for new media files; each becomes a job (repeatable; also a volume).
    #[arg(long = "watch")]
    watches: Vec<PathBuf>,
    /// Jobs to run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    slots: u32,
    /// Seconds a watched file must stay unchanged before it is analyzed.
    #[arg(long, default_value_t = 2)]
    watch_settle_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Analyze(args) => cmd_analyze::run(args),
        Command::Models(args) => cmd_models::run(args),
        Command::Enroll(args) => tokio::runtime::Runtime::new()?.block_on(enroll_cmd(args)),
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run_cmd(args)),
    }
}

async fn enroll_cmd(args: EnrollArgs) -> anyhow::Result<()> {
    let dd = DataDir::new(&args.data_dir);
    let params = EnrollParams {
        control_addr: args.control.clone(),
        token: args.token.clone(),
        ca_fingerprint: args.ca_fingerprint,
        site: args.site.clone(),
    };
    let identity = enroll::enroll(&dd, &params).await?;
    if args.json {
        println!("{}", serde_json::json!({ "agent_id": identity.agent_id, "site": identity.site }));
    } else {
        println!("Enrolled agent {} into site {}", identity.agent_id, identity.site);
        println!("Next: gaffer-agent run --data-dir {} --volume /path/to/media", args.data_dir.display());
    }
    Ok(())
}

fn canonical_dirs(dirs: &[PathBuf], what: &str) -> anyhow::Result<Vec<PathBuf>> {
    dirs.iter()
        .map(|d| {
            let c = d.canonicalize().with_context(|| format!("{what} {}: create it or fix the path", d.display()))?;
            anyhow::ensure!(c.is_dir(), "{what} {} is not a directory", d.display());
            Ok(c)
        })
        .collect()
}

async fn run_cmd(args: RunArgs) -> anyhow::Result<()> {
    let dd = DataDir::new(&args.data_dir);
    let identity = dd.load_identity()?;
    let watch_roots = canonical_dirs(&args.watches, "--watch")?;
    let mut volumes = canonical_dirs(&args.volumes, "--volume")?;
    for w in &watch_roots {
        if !volumes.contains(w) {
            volumes.push(w.clone());
        }
    }
    if volumes.is_empty() {
        tracing::warn!("no --volume or --watch given: this agent can run no jobs");
    }
    gaffer_agent::analysis::init_ffmpeg()?;

    let db = sled::open(dd.state_path()).with_context(|| {
        format!("opening {} (is another gaffer-agent running on this data dir?)", dd.state_path().display())
    })?;
    let outbox = Outbox::open(&db)?;
    let ledger = WatchLedger::open(&db)?;
    let runner = Runner::new(
        RunnerConfig {
            volumes: volumes.clone(),
            job_slots: args.slots,
            progress_interval: std::time::Duration::from_secs(2),
        },
        outbox.clone(),
    );
    let mut health = HealthSampler::new(volumes.clone());
    let registry = gaffer_agent::models::Registry::open(dd.root())?;
    let installed_models = registry.installed();
    match gaffer_agent::models::Runtime::init(&registry, health.gpus().len()) {
        Ok(runtime) => {
            let provider = runtime.provider();
            tracing::info!(provider = %provider.provider, runtime = %provider.runtime_version, note = %provider.note, "ONNX Runtime ready");
            health.set_inference(Some(provider));
        }
        Err(e) => {
            tracing::warn!(error = %e, "no ONNX Runtime: profile `full` is unavailable (run `gaffer-agent models fetch`)")
        }
    }
    let to_strings = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    let capabilities = Capabilities {
        gpus: health.gpus(),
        volumes: to_strings(&volumes),
        watch_roots: to_strings(&watch_roots),
        job_slots: args.slots,
        profiles: vec![Profile::Shots],
        models: installed_models,
    };
    let health = Arc::new(Mutex::new(health));

    let _watcher = if watch_roots.is_empty() {
        None
    } else {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let seen = ledger.clone();
        let handle = watch::spawn_watcher(
            WatchConfig { roots: watch_roots.clone(), settle_secs: args.watch_settle_secs, ..WatchConfig::default() },
            move |f| seen.contains(f),
            tx,
        )?;
        let outbox = outbox.clone();
        tokio::spawn(async move {
            while let Some(file) = rx.recv().await {
                match ledger.submit(&outbox, &file) {
                    Ok(Some(job_id)) => {
                        tracing::info!(%job_id, path = %file.path.display(), "new file in watch folder")
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(path = %file.path.display(), error = %e, "could not submit watched file"),
                }
            }
        });
        Some(handle)
    };

    let params = LinkParams {
        agent_id: identity.agent_id,
        control_addr: identity.control_addr.clone(),
        ca_pem: dd.read(&dd.ca_path())?,
        cert_pem: dd.read(&dd.cert_path())?,
        key_pem: dd.read(&dd.key_path())?,
        capabilities,
    };
    tracing::info!(agent_id = %identity.agent_id, site = %identity.site, control = %identity.control_addr,
        volumes = ?volumes, slots = args.slots, pending = outbox.len(), "agent starting");
    let status = Arc::new(LinkStatus::default());
    tokio::select! {
        r = link::run_link(params, outbox, runner, health, status) => r?,
        _ = shutdown_signal() => tracing::info!("agent stopping; unfinished jobs return to the queue"),
    }
    db.flush()?;
    Ok(())
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
