//! Shared by the agent's integration tests: where the sample media and the provisioned models
//! are, and the skip-or-fail rule for tests that need the models.
#![allow(dead_code)] // each test binary uses a subset

use std::path::PathBuf;

use gaffer_agent::models::{manifest, Registry, Runtime};

fn home_cache(sub: &str) -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gaffer").join(sub)
}

/// The sample media (`GAFFER_MEDIA_DIR`, default `~/.cache/gaffer/media`, filled by `scripts/setup.sh`).
pub fn media_dir() -> PathBuf {
    std::env::var_os("GAFFER_MEDIA_DIR").map(PathBuf::from).unwrap_or_else(|| home_cache("media"))
}

/// A data dir with the runtime and models (`GAFFER_MODELS_DIR`, default
/// `~/.cache/gaffer/models-datadir`, filled by `scripts/fetch-models.sh`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("GAFFER_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| home_cache("models-datadir"))
}

/// What to do when the models a test needs are missing: fail if `GAFFER_REQUIRE_MODELS` is set
/// (the test command sets it), otherwise print why the test is skipped.
pub fn models_missing(why: &str) {
    assert!(
        std::env::var_os("GAFFER_REQUIRE_MODELS").is_none(),
        "GAFFER_REQUIRE_MODELS is set but {} is not provisioned ({why}): run scripts/fetch-models.sh",
        models_dir().display()
    );
    eprintln!(
        "SKIPPED: runtime/models not provisioned in {} ({why}; run scripts/fetch-models.sh, set GAFFER_REQUIRE_MODELS=1 to fail instead)",
        models_dir().display()
    );
}

/// Registry + CPU runtime when `models` and the CPU runtime are installed; None (skip) otherwise.
pub fn registry_and_runtime(models: &[&str]) -> Option<(Registry, Runtime)> {
    let registry = Registry::open(&models_dir()).expect("open registry");
    if !(registry.has_all(models) && registry.runtime(manifest::RUNTIME_CPU).is_some()) {
        models_missing(&format!("need {models:?} and the CPU runtime"));
        return None;
    }
    let runtime = Runtime::init(&registry, 0).expect("runtime");
    Some((registry, runtime))
}
