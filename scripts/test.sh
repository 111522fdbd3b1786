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
cargo test --locked --workspace --no-fail-fast
