//! Writes the fuzz fixtures (the test fleet) and the seed corpus of every target.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --bin write_corpus              # keep fuzz/fixtures/
//! cargo run --manifest-path fuzz/Cargo.toml --bin write_corpus -- --new-fleet
//! ```
//!
//! Each `fuzz/corpus/<target>/` is rewritten, so a seed whose format changed does not linger;
//! files named `regression-*` (inputs that once crashed the target, added by hand) are kept.
//! Inputs the fuzzer finds are not kept there (scripts/fuzz.sh runs on a copy).

use anyhow::Context as _;
// `cargo fuzz build` instruments every binary of this package; libFuzzer provides the
// instrumentation's symbols (its `main` is not used: this binary has its own).
use gaffer_fuzz::{corpus, corpus_dir, fixtures_dir, Fleet};
use libfuzzer_sys as _;

/// Inputs that once crashed a target start with this and are kept when the seeds are rewritten.
const REGRESSION_PREFIX: &str = "regression-";

fn main() -> anyhow::Result<()> {
    let new_fleet = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--new-fleet") => true,
        Some(other) => anyhow::bail!("unknown argument {other:?}; usage: write_corpus [--new-fleet]"),
    };
    let fleet = if new_fleet || !fixtures_dir().join("ca.pem").exists() {
        let fleet = Fleet::generate()?;
        fleet.save(&fixtures_dir())?;
        eprintln!("wrote a new test fleet to {}", fixtures_dir().display());
        fleet
    } else {
        Fleet::load(&fixtures_dir())?
    };
    let targets: [(&str, Vec<corpus::Seed>); 4] = [
        ("frame_decoder", corpus::frame_decoder(&fleet)?),
        ("bundle", corpus::bundle(&fleet)?),
        ("enroll_request", corpus::enroll_request(&fleet)?),
        ("config_files", corpus::config_files(&fleet)?),
    ];
    for (target, seeds) in targets {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(REGRESSION_PREFIX)) {
                std::fs::remove_file(&path).with_context(|| format!("{}", path.display()))?;
            }
        }
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).with_context(|| format!("{}", dir.join(name).display()))?;
        }
        eprintln!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
