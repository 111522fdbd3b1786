//! `gaffer-agent release verify`: checks a signed release tarball or offline installer bundle
//! against a release public key, as `installers/install-agent.sh` does before it installs
//! anything, and as an operator can by hand.

use std::path::PathBuf;

use anyhow::Context as _;
use gaffer_certs::{ArtifactKind, ReleaseInfo, ReleasePublicKey};

/// Largest release key file read, bytes (a key is 32).
const KEY_FILE_BYTES_MAX: u64 = 1024;

/// Signed release artifacts.
#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    #[command(subcommand)]
    pub command: ReleaseCommand,
}

/// The `release` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Verify the zipsign signature of a release tarball (gaffer-agent-VERSION-ARCH-linux.tar.gz)
    /// or an offline bundle (gaffer-offline-VERSION-ARCH-linux.tar.gz) and that its content
    /// matches its name; exit 1 if it does not. The file name is part of what is signed: verify
    /// it under the name it was signed with.
    Verify(VerifyArgs),
}

/// `release verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The signed artifact.
    #[arg(long)]
    pub file: PathBuf,
    /// The release public key: a `release.pub` file (32 bytes, `gaffer-control release keygen`),
    /// e.g. the one this agent pinned in its data directory.
    #[arg(long)]
    pub key: PathBuf,
    /// Print `{file_name, version, arch, sha256, size_bytes, signer}` as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `release` subcommand.
pub fn run(args: ReleaseArgs) -> anyhow::Result<()> {
    match args.command {
        ReleaseCommand::Verify(a) => verify(a),
    }
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let key = read_key(&args.key)?;
    let file_name = args
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a release file name", args.file.display()))?
        .to_owned();
    let (what, info): (&str, ReleaseInfo) = match ArtifactKind::of(&file_name)? {
        ArtifactKind::Release(_) => {
            let bytes = gaffer_certs::read_release_file(&args.file)?;
            ("release gaffer-agent", gaffer_certs::verify_release(&file_name, &bytes, &[key])?)
        }
        ArtifactKind::OfflineBundle(_) => {
            ("offline bundle for gaffer-agent", gaffer_certs::verify_bundle_file(&file_name, &args.file, &[key])?)
        }
    };
    if args.json {
        let json = serde_json::json!({
            "file_name": info.file_name,
            "version": info.version,
            "arch": info.arch,
            "sha256": info.sha256,
            "size_bytes": info.size_bytes,
            "signer": info.signer,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("verified {what} {} ({}), signed by release key {}", info.version, info.arch, info.signer);
        println!("  {} ({} bytes, sha256 {})", args.file.display(), info.size_bytes, info.sha256);
    }
    Ok(())
}

fn read_key(path: &std::path::Path) -> anyhow::Result<ReleasePublicKey> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("opening the release key {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(KEY_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the release key {}", path.display()))?;
    ReleasePublicKey::from_key_file(&bytes).with_context(|| format!("{}: not a release public key", path.display()))
}
