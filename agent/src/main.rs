//! `gaffer-agent`: command-line entry point.

mod cmd_analyze;
mod cmd_models;
mod cmd_release;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gaffer_agent::analysis::full::Models;
use gaffer_agent::config::{self, RunOptions};
use gaffer_agent::control_socket;
use gaffer_agent::datadir::DataDir;
use gaffer_agent::enroll::{self, EnrollParams};
use gaffer_agent::health::HealthSampler;
use gaffer_agent::link::{self, LinkParams, LinkStatus};
use gaffer_agent::outbox::Outbox;
use gaffer_agent::runner::{Runner, RunnerConfig, WatchLedger};
use gaffer_agent::watch::{self, WatchConfig};
use gaffer_protocol::messages::{Capabilities, Profile};

/// The version this build reports: `GAFFER_BUILD_VERSION` at build time when it was set (and not
/// empty), else the crate version. Read here, in the binary's crate, so that building with another
/// version recompiles only this crate; the library gets it from [`gaffer_agent::set_build_version`].
const BUILD_VERSION: &str = match option_env!("GAFFER_BUILD_VERSION") {
    Some(v) if !v.is_empty() => v,
    _ => env!("CARGO_PKG_VERSION"),
};

/// Gaffer agent: analyzes video on this box and reports metadata and health to the control plane.
#[derive(Parser)]
#[command(name = "gaffer-agent", version = BUILD_VERSION, about, long_about = None)]
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
    /// Outbox depth, oldest unacknowledged message, jobs and link state (also while `run` runs).
    Status(StatusArgs),
    /// Offline-sync bundles for air-gapped sites.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Install, verify and list the ONNX Runtime and the analysis models.
    Models(cmd_models::ModelsArgs),
    /// Check a configuration file without running anything: every problem, with its line.
    Validate(ValidateArgs),
    /// Verify signed release artifacts (a release tarball, an offline bundle) against a release key.
    Release(cmd_release::ReleaseArgs),
    /// Internal: one job's analysis in a worker process, started by `run` (job on stdin as one
    /// JSON line, result frames on stdout).
    #[command(hide = true)]
    Worker,
    /// Internal: watches a version on trial after a self-update without systemd, and starts the
    /// previous version if the new one dies before its health gate (started by `run`).
    #[command(hide = true)]
    UpdateWatch(UpdateWatchArgs),
}

#[derive(clap::Args)]
struct UpdateWatchArgs {
    /// Data directory of the agent.
    #[arg(long)]
    data_dir: PathBuf,
    /// Process id of the version on trial.
    #[arg(long)]
    pid: u32,
    /// Start the watcher as a separate process and return at once.
    #[arg(long)]
    detach: bool,
}

#[derive(clap::Args)]
struct EnrollArgs {
    /// Data directory to create (mode 0700).
    #[arg(long)]
    data_dir: PathBuf,
    /// Control plane QUIC address, HOST:PORT (HOST must be one of its server names). With
    /// --renew: defaults to the address in agent.json.
    #[arg(long, required_unless_present_any = ["offline_request", "offline_reply", "renew"])]
    control: Option<String>,
    /// One-time enrollment token from `gaffer-control token create`.
    #[arg(long, env = "GAFFER_ENROLL_TOKEN", hide_env_values = true,
          required_unless_present_any = ["offline_request", "offline_reply"])]
    token: Option<String>,
    /// SHA-256 fingerprint of the fleet CA, printed with the token (hex, colons optional).
    #[arg(long, required_unless_present = "offline_request")]
    ca_fingerprint: Option<gaffer_certs::CaFingerprint>,
    /// Air-gapped enrollment, step 1: write an enrollment request to this file (needs --site) for
    /// `gaffer-control enroll-offline`.
    #[arg(long, conflicts_with_all = ["control", "token", "offline_reply"], requires = "site")]
    offline_request: Option<PathBuf>,
    /// Air-gapped enrollment, step 2: install the reply from `gaffer-control enroll-offline`
    /// (with --ca-fingerprint).
    #[arg(long, conflicts_with_all = ["control", "token"])]
    offline_reply: Option<PathBuf>,
    /// Site this box belongs to; enrollment is refused if the token is for another site.
    #[arg(long)]
    site: Option<String>,
    /// Re-enroll the agent already enrolled in --data-dir (e.g. its certificate expired while it
    /// was offline) with a fresh token (--token, --ca-fingerprint): it keeps its agent id, site,
    /// job queue and outbox and gets a new key, made here. Works while `gaffer-agent run` runs (it
    /// picks up the new certificate at its next connection attempt).
    #[arg(long, conflicts_with_all = ["offline_request", "offline_reply", "site"])]
    renew: bool,
    /// Fail the enrollment unless the control plane offers the release key with this SHA-256
    /// fingerprint (printed by `gaffer-control release keygen`); the key is pinned either way.
    #[arg(long, conflicts_with_all = ["offline_request", "offline_reply", "renew"])]
    release_key_fingerprint: Option<gaffer_certs::ReleaseKeyFingerprint>,
    /// Print the result as JSON (`agent_id`, `site`; with --renew also `cert_serial`,
    /// `cert_not_after_ms`).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (TOML: every flag below as a key, `-` written `_`); the packages install
    /// /etc/gaffer/agent.toml. Flags given here override it.
    #[arg(long, env = "GAFFER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the settings `run` would use (flags over the file over the defaults) as a
    /// configuration file, and exit without starting.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    options: RunOptions,
}

#[derive(clap::Args)]
struct ValidateArgs {
    /// The configuration file to check.
    #[arg(long, env = "GAFFER_AGENT_CONFIG")]
    config: PathBuf,
    /// Print `{"ok": bool, "errors": [{"line", "column", "key", "message"}]}`.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Write everything not yet acknowledged into an encrypted, signed bundle for the control plane.
    Export {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The bundle file to write.
        #[arg(long)]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a reply bundle from `gaffer-control bundle import`: acknowledged messages leave the
    /// outbox, assigned jobs are queued.
    Import {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The reply bundle.
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Print `{outbox_pending, oldest_unacked_age_secs, jobs_running, jobs_queued, link, ...}`.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    gaffer_agent::set_build_version(BUILD_VERSION);
    let cli = Cli::parse();
    if let Command::Worker = cli.command {
        // Logs as JSON lines on stderr, which the agent forwards into its own log.
        std::process::exit(gaffer_agent::worker::worker_main());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GAFFER_LOG").unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Analyze(args) => cmd_analyze::run(args),
        Command::Models(args) => cmd_models::run(args),
        Command::Validate(args) => validate_cmd(args),
        Command::Release(args) => cmd_release::run(args),
        Command::Status(args) => tokio::runtime::Runtime::new()?.block_on(status_cmd(args)),
        Command::Enroll(args) => tokio::runtime::Runtime::new()?.block_on(enroll_cmd(args)),
        Command::Bundle { command } => tokio::runtime::Runtime::new()?.block_on(bundle_cmd(command)),
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run_cmd(args)),
        Command::UpdateWatch(args) => update_watch_cmd(args),
        Command::Worker => Ok(()),
    }
}

/// Bundle commands go through `agent.sock` when the agent runs (it holds the state database), and
/// open the state themselves when it does not.
async fn bundle_cmd(command: BundleCommand) -> anyhow::Result<()> {
    use gaffer_agent::bundle::{ExportReport, ReplyImportReport};
    use gaffer_agent::control_socket::{ControlRequest, ControlResponse};
    enum Done {
        Exported(ExportReport),
        Imported(ReplyImportReport),
    }
    let (data_dir, req, json) = match &command {
        BundleCommand::Export { data_dir, out, json } => {
            (data_dir, ControlRequest::BundleExport { out: std::path::absolute(out)? }, *json)
        }
        BundleCommand::Import { data_dir, file, json } => {
            (data_dir, ControlRequest::BundleImport { file: std::path::absolute(file)? }, *json)
        }
    };
    let dd = DataDir::new(data_dir);
    let done = match control_socket::request(&dd.socket_path(), &req).await? {
        Some(ControlResponse::BundleExported(r)) => Done::Exported(r),
        Some(ControlResponse::BundleImported(r)) => Done::Imported(r),
        Some(other) => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        None => {
            let db = open_state_waiting(&dd).await?;
            let outbox = Outbox::open(&db)?;
            let done = match req {
                ControlRequest::BundleExport { out } => {
                    Done::Exported(gaffer_agent::bundle::export(&db, &dd, &outbox, &out)?)
                }
                ControlRequest::BundleImport { file } => {
                    Done::Imported(gaffer_agent::bundle::import(&db, &dd, &outbox, &file)?)
                }
                ControlRequest::Status => unreachable!("only bundle requests are built above"),
            };
            db.flush()?;
            done
        }
    };
    match done {
        Done::Exported(report) if json => println!("{}", serde_json::to_string_pretty(&report)?),
        Done::Exported(report) => println!(
            "Wrote bundle {} ({} messages, {} bytes) to {}",
            report.bundle_number,
            report.messages,
            report.size_bytes,
            report.path.display()
        ),
        Done::Imported(report) if json => println!("{}", serde_json::to_string_pretty(&report)?),
        Done::Imported(ReplyImportReport::Imported {
            reply_number,
            acked,
            assignments,
            outbox_pending,
            release,
            ..
        }) => {
            println!(
                "Imported reply {reply_number}: {acked} acknowledged, {assignments} jobs queued, \
             {outbox_pending} messages still waiting"
            );
            use gaffer_agent::update::BundledOutcome;
            match release {
                Some(BundledOutcome::Staged { version, .. }) => println!(
                    "Release {version} verified and staged: the agent restarts into it once it runs no job \
                     (now if it runs, else at its next start)"
                ),
                Some(BundledOutcome::Refused { version, reason }) => {
                    println!("Release {version} refused, this agent stays on its version: {reason}")
                }
                Some(BundledOutcome::Skipped { version, reason }) => println!("Release {version} not staged: {reason}"),
                None => {}
            }
        }
        Done::Imported(ReplyImportReport::AlreadyImported { reply_number }) => {
            println!("Reply {reply_number} was already imported; nothing changed")
        }
    }
    Ok(())
}

async fn enroll_cmd(args: EnrollArgs) -> anyhow::Result<()> {
    let dd = DataDir::new(&args.data_dir);
    if let Some(out) = &args.offline_request {
        let site = args.site.clone().unwrap_or_default();
        let req = enroll::write_offline_request(&dd, &site, out)?;
        if args.json {
            println!("{}", serde_json::json!({ "agent_id": req.agent_id, "site": req.site, "request": out }));
        } else {
            println!("Wrote the offline enrollment request for agent {} to {}", req.agent_id, out.display());
            println!("Carry it to the control plane: gaffer-control enroll-offline --request FILE --out REPLY");
        }
        return Ok(());
    }
    let ca_fingerprint = args.ca_fingerprint.context("--ca-fingerprint is required")?;
    if args.renew {
        let params = enroll::RenewParams {
            control_addr: args.control.clone(),
            token: args.token.clone().context("--token is required")?,
            ca_fingerprint,
        };
        let identity = enroll::renew(&dd, &params).await?;
        let creds = gaffer_agent::credentials::Credentials::load(&dd, identity.agent_id)?;
        let pair = creds.current.as_ref().context("the new key and certificate are not on disk")?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "agent_id": identity.agent_id, "site": identity.site,
                    "cert_serial": pair.serial_hex, "cert_not_after_ms": pair.not_after_ms })
            );
        } else {
            println!(
                "Re-enrolled agent {} (site {}): new certificate {} valid until {}; job queue and outbox kept",
                identity.agent_id,
                identity.site,
                pair.serial_hex,
                gaffer_agent::rfc3339_ms(pair.not_after_ms)
            );
            println!(
                "A running agent uses it at its next connection attempt; else: gaffer-agent run --data-dir {}",
                args.data_dir.display()
            );
        }
        return Ok(());
    }
    let identity = if let Some(reply) = &args.offline_reply {
        enroll::install_offline_reply(&dd, reply, ca_fingerprint)?
    } else {
        let params = EnrollParams {
            control_addr: args.control.clone().context("--control is required")?,
            token: args.token.clone().context("--token is required")?,
            ca_fingerprint,
            site: args.site.clone(),
        };
        enroll::enroll_expecting_release_key(&dd, &params, args.release_key_fingerprint).await?
    };
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

/// `validate`: prints `FILE: ok`, or every problem (exit status 1).
fn validate_cmd(args: ValidateArgs) -> anyhow::Result<()> {
    let problems = gaffer_service::config_file::validate(&args.config, config::check);
    print!("{}", gaffer_service::config_file::report(&args.config, &problems, args.json));
    if !problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// `update-watch`: with `--detach`, starts itself without it (so the watcher is nobody's child)
/// and returns; else watches the trial until it is confirmed, failed, or its process is gone.
fn update_watch_cmd(args: UpdateWatchArgs) -> anyhow::Result<()> {
    if args.detach {
        let me = std::env::current_exe().context("which binary is this")?;
        std::process::Command::new(me)
            .arg("update-watch")
            .arg("--data-dir")
            .arg(&args.data_dir)
            .arg("--pid")
            .arg(args.pid.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting the update watcher")?;
        return Ok(());
    }
    let _span = tracing::info_span!("update_watch", pid = args.pid).entered();
    gaffer_agent::update::watch_trial(&DataDir::new(&args.data_dir), args.pid)?;
    Ok(())
}

/// Where a start of `run` stands with self-update: re-executes into the selected version when
/// that is another binary (returns only if that fails), rolls back a trial that died, and returns
/// the trial this process is, if it is one.
fn start_decision(dd: &DataDir) -> Option<gaffer_agent::update::Trial> {
    use gaffer_agent::update::{self, StartDecision};
    match update::at_start(dd, BUILD_VERSION, std::process::id(), gaffer_agent::now_ms()) {
        Ok(StartDecision::Run { trial }) => trial,
        Ok(StartDecision::Exec { exe, why }) => {
            tracing::info!(exe = %exe.display(), "{why}: re-executing into it");
            let e = update::exec_into(&exe);
            tracing::error!(error = %e, "could not start the selected version; running {BUILD_VERSION}");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the self-update state; running this binary ({BUILD_VERSION})");
            None
        }
    }
}

async fn run_cmd(args: RunArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => RunOptions::default(),
    };
    let settings = args.options.or(file).resolve()?;
    if args.print_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    let dd = DataDir::new(&settings.data_dir);
    let identity = dd.load_identity()?;
    let trial = start_decision(&dd);
    if let Some(t) = &trial {
        tracing::info!(rollout_id = t.order.rollout_id, version = BUILD_VERSION, fallback = %t.fallback.version,
            health_wait_secs = t.order.health_wait_secs, "this version is on trial: self-test, then the health gate");
    }
    let watch_roots = canonical_dirs(&settings.watch, "--watch")?;
    let mut volumes = canonical_dirs(&settings.volume, "--volume")?;
    for w in &watch_roots {
        if !volumes.contains(w) {
            volumes.push(w.clone());
        }
    }
    if volumes.is_empty() {
        tracing::warn!(
            "no volume or watch folder given (--volume, --watch or the config file): this agent can run no jobs"
        );
    }
    gaffer_agent::analysis::init_ffmpeg()?;

    let db = open_state_waiting(&dd).await?;
    let outbox = Outbox::open(&db)?;
    match tokio::task::block_in_place(|| gaffer_agent::update::flush_reports(&dd, &outbox)) {
        Ok(0) => {}
        Ok(n) => tracing::info!(reports = n, "update reports queued for the control plane"),
        Err(e) => tracing::error!(error = %e, "could not queue the update reports; trying at the next start"),
    }
    let ledger = WatchLedger::open(&db)?;
    let mut health = HealthSampler::new(volumes.clone());
    let registry = gaffer_agent::models::Registry::open(dd.root())?;
    let installed_models = registry.installed();
    let mut profiles = vec![Profile::Shots];
    let mut models = None;
    match gaffer_agent::models::Runtime::init(&registry, health.gpus().len()) {
        Ok(runtime) => {
            let provider = runtime.provider();
            tracing::info!(provider = %provider.provider, runtime = %provider.runtime_version, note = %provider.note, "ONNX Runtime ready");
            health.set_inference(Some(provider));
            let m = Models { runtime, registry };
            let missing = m.missing();
            if missing.is_empty() {
                profiles.push(Profile::Full);
                models = Some(Arc::new(m));
            } else {
                tracing::warn!(missing = %missing.join(", "), "profile `full` is unavailable: models missing (run `gaffer-agent models fetch`)");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no ONNX Runtime: profile `full` is unavailable (run `gaffer-agent models fetch`)")
        }
    }
    tracing::info!(profiles = ?profiles.iter().map(|p| p.as_str()).collect::<Vec<_>>(), "analysis profiles available");
    if let Some(t) = &trial {
        // The self-test of a new version: the built-in clip decodes with its one cut, and the
        // models load (the `full` profile runs on it) when they are installed.
        match tokio::task::block_in_place(|| gaffer_agent::update::self_test(&dd, models.as_deref())) {
            Ok(()) => tracing::info!("self-test passed"),
            Err(reason) => {
                tracing::error!(%reason, "self-test failed; rolling back");
                db.flush()?;
                drop(db);
                let exe = gaffer_agent::update::fail_trial(&dd, t, &reason)?;
                return Err(gaffer_agent::update::exec_into(&exe).into());
            }
        }
    }
    let runner = Runner::new(
        RunnerConfig {
            volumes: volumes.clone(),
            job_slots: settings.slots,
            models,
            job_timeout: settings.job_timeout,
            job_memory_max_bytes: settings.job_memory_max,
            ..RunnerConfig::default()
        },
        outbox.clone(),
        &db,
    )?;
    let to_strings = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    let capabilities = Capabilities {
        gpus: health.gpus(),
        volumes: to_strings(&volumes),
        watch_roots: to_strings(&watch_roots),
        job_slots: settings.slots,
        profiles,
        models: installed_models,
    };
    let health = Arc::new(Mutex::new(health));
    std::fs::write(dd.capabilities_path(), serde_json::to_vec_pretty(&capabilities)?)
        .with_context(|| format!("writing {}", dd.capabilities_path().display()))?;

    // Jobs held before a restart, and assignments a bundle import left while the agent was down,
    // start now, link or no link.
    runner.enqueue_offline_assignments()?;
    runner.dispatch();

    let watch_profile = settings.watch_profile;
    if !watch_roots.is_empty() && !capabilities.profiles.contains(&watch_profile) {
        anyhow::bail!(
            "--watch-profile {watch_profile} is not available on this agent (it runs: {}); install the models with \
             `gaffer-agent models fetch --data-dir {}`",
            capabilities.profiles.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "),
            settings.data_dir.display()
        );
    }
    let _watcher = if watch_roots.is_empty() {
        None
    } else {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let seen = ledger.clone();
        let handle = watch::spawn_watcher(
            WatchConfig {
                roots: watch_roots.clone(),
                settle_secs: settings.watch_settle_secs,
                ..WatchConfig::default()
            },
            move |f| seen.contains(f),
            tx,
        )?;
        let runner = runner.clone();
        tokio::spawn(async move {
            while let Some(file) = rx.recv().await {
                // Watched files are on this box: the agent runs them itself, with or without a
                // link; the control plane learns of each job through the outbox.
                while runner.outbox().is_full() {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
                // Ledger, outbox and job queue writes fsync: not on an async worker thread.
                tokio::task::block_in_place(|| match ledger.submit(runner.outbox(), &file, watch_profile) {
                    Ok(Some(assignment)) => {
                        tracing::info!(job_id = %assignment.job_id, path = %file.path.display(), "new file in watch folder");
                        runner.enqueue_assignment(assignment);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(path = %file.path.display(), error = %e, "could not submit watched file"),
                });
            }
        });
        Some(handle)
    };

    let updates =
        gaffer_agent::update::Updater::spawn(dd.clone(), BUILD_VERSION, runner.clone(), outbox.clone(), db.clone());
    let link_status = (!settings.offline).then(|| Arc::new(LinkStatus::default()));
    // Without a link (`--offline`) the gate counts the time run since the self-test.
    let _health_gate = trial
        .as_ref()
        .map(|t| gaffer_agent::update::spawn_health_gate(dd.clone(), t.clone(), link_status.clone(), outbox.clone()));
    // A release a reply bundle staged while no agent ran: applied like a link order, once idle.
    if let Some(staged) = gaffer_agent::update::bundled_staged(&dd) {
        tracing::info!(version = %staged.order.version, "a reply bundle staged this release; applying it once idle");
        let _ = updates.try_send(gaffer_agent::update::UpdateCommand::Staged { order: staged.order, exe: staged.exe });
    }
    let handles = Arc::new(control_socket::AgentHandles {
        agent_id: identity.agent_id.to_string(),
        site: identity.site.clone(),
        outbox: outbox.clone(),
        runner: runner.clone(),
        link: link_status.clone(),
        db: db.clone(),
        data_dir: dd.clone(),
        updates: updates.clone(),
    });
    let _socket = control_socket::serve(&dd.socket_path(), handles).await?;
    let control = gaffer_agent::link::control_addrs(&identity, &settings.control).join(",");
    tracing::info!(agent_id = %identity.agent_id, site = %identity.site, %control,
        offline = settings.offline, volumes = ?volumes, slots = settings.slots, pending = outbox.len(), "agent starting");
    // systemd (Type=notify): ready once the control socket and watch folders are up and the link
    // task is about to start; the watchdog is fed only while the runtime and the runner answer.
    let control_addr = identity.control_addr.clone();
    let first_status = tokio::task::block_in_place(|| {
        gaffer_agent::service::agent_status(&control_addr, link_status.as_deref(), &runner)
    });
    gaffer_agent::service::ready(&first_status);
    let _watchdog = gaffer_agent::service::spawn_watchdog({
        let (link, runner) = (link_status.clone(), runner.clone());
        move || Ok(gaffer_agent::service::agent_status(&control_addr, link.as_deref(), &runner))
    });

    match link_status {
        Some(status) => {
            let params = LinkParams {
                identity: identity.clone(),
                data_dir: dd.clone(),
                capabilities,
                updates: Some(updates),
                control_addrs: settings.control.clone(),
            };
            tokio::select! {
                r = link::run_link(params, outbox, runner, health, status) => r?,
                _ = shutdown_signal() => tracing::info!("agent stopping; held jobs resume at the next start"),
            }
        }
        None => {
            tracing::info!("offline mode: no link; results stay in the outbox for `gaffer-agent bundle export`");
            shutdown_signal().await;
            tracing::info!("agent stopping; held jobs resume at the next start");
        }
    }
    let _ = std::fs::remove_file(dd.socket_path());
    db.flush()?;
    Ok(())
}

async fn status_cmd(args: StatusArgs) -> anyhow::Result<()> {
    let dd = DataDir::new(&args.data_dir);
    let identity = dd.load_identity()?;
    // An agent that is starting holds the database before its socket is up: retry for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let report = loop {
        match control_socket::request(&dd.socket_path(), &control_socket::ControlRequest::Status).await? {
            Some(control_socket::ControlResponse::Status(r)) => break r,
            Some(other) => anyhow::bail!("unexpected answer from the agent: {other:?}"),
            None => {}
        }
        match sled::open(dd.state_path()) {
            Ok(db) => {
                let outbox = Outbox::open(&db)?;
                let mut r = control_socket::StatusReport::collect(
                    &identity.agent_id.to_string(),
                    &identity.site,
                    "stopped",
                    &outbox,
                    None,
                )?;
                r.jobs_queued = db.open_tree("jobs")?.len() as u32;
                break r.with_certificate(&dd, identity.agent_id, None);
            }
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "state database busy; waiting for the agent's socket");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!(
                "cannot read {}: {e}; if gaffer-agent run is starting, try again in a moment",
                dd.state_path().display()
            ),
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("agent:          {} (site {})", report.agent_id, report.site);
        println!("link:           {}", report.link);
        println!(
            "jobs:           {} running, {} queued, {} slots",
            report.jobs_running, report.jobs_queued, report.job_slots
        );
        let full = if report.outbox_full { " (FULL: not taking new jobs)" } else { "" };
        println!("outbox:         {} messages, {} bytes{full}", report.outbox_pending, report.outbox_bytes);
        match report.oldest_unacked_age_secs {
            Some(age) => println!("oldest unacked: {age:.1} s ago"),
            None => println!("oldest unacked: -"),
        }
        let time = |ms: Option<u64>| ms.map_or_else(|| "-".to_owned(), gaffer_agent::rfc3339_ms);
        match &report.cert_serial {
            Some(serial) => println!("certificate:    {serial}, valid until {}", time(report.cert_not_after_ms)),
            None => println!("certificate:    none usable: re-enroll with `gaffer-agent enroll --renew`"),
        }
        let pending = if report.cert_renewal_pending { " (renewal under way)" } else { "" };
        println!("renewal:        {}{pending}", time(report.cert_renewal_at_ms));
        if let Some(e) = &report.cert_renewal_error {
            println!("renewal error:  {e}");
        }
        match &report.release_key_fingerprint {
            Some(fp) => println!("release key:    {fp}"),
            None => println!("release key:    none pinned yet (pinned when the control plane offers one)"),
        }
    }
    Ok(())
}

/// Opens the state database, waiting up to 10 s while another short-lived command (`status`,
/// `bundle`) holds it; a second `run` on the same data dir holds it for good and is reported.
async fn open_state_waiting(dd: &DataDir) -> anyhow::Result<sled::Db> {
    let path = dd.state_path();
    tokio::task::spawn_blocking(move || {
        gaffer_agent::datadir::open_state_db(&path, std::time::Duration::from_secs(10))
            .with_context(|| format!("opening {} (is another gaffer-agent running on this data dir?)", path.display()))
    })
    .await?
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
    gaffer_agent::service::stopping("agent stopping; held jobs resume at the next start");
}
