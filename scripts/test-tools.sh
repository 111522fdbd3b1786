# Sourced by scripts/test.sh (not run on its own): installs the tools the tests drive that Gaffer
# itself does not need, and exports where they are.
#
#   Debian packages  chromium, chromium-driver (browser tests), prometheus (promtool)
#   Python venv      tests/python/requirements.txt, every package pinned by version and SHA-256
#                    (pip --require-hashes): opentimelineio + its CMX 3600 adapter (exports),
#                    schemathesis (the OpenAPI description against a live control plane)
#   npm              tests/browser/package-lock.json (axe-core, integrity-checked by `npm ci`)
#
# Exports GAFFER_TEST_PYTHON (the venv's python), GAFFER_AXE_JS (axe.min.js), GAFFER_CHROMIUM,
# GAFFER_CHROMEDRIVER and GAFFER_PROMTOOL; a test that needs one and finds it unset fails naming it.
# The venv lives in the cache (GAFFER_CACHE_DIR, default ~/.cache/gaffer), keyed by the
# requirements file's digest, so a later clone reuses it and a changed pin builds a new one.

_tt_log() { printf '\033[1m[test-tools]\033[0m %s\n' "$*" >&2; }
_tt_die() { printf '[test-tools] error: %s\n' "$*" >&2; exit 1; }

_tt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_tt_cache="${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}"

_tt_missing=()
for _tt_p in chromium chromium-driver prometheus nodejs npm python3-venv; do
  dpkg-query -W -f='${Status}' "$_tt_p" 2>/dev/null | grep -q "install ok installed" || _tt_missing+=("$_tt_p")
done
# A machine whose Node.js and npm came from elsewhere (nodesource, nvm) keeps them.
if command -v node >/dev/null && command -v npm >/dev/null; then
  _tt_kept=()
  for _tt_p in "${_tt_missing[@]}"; do [ "$_tt_p" = nodejs ] || [ "$_tt_p" = npm ] || _tt_kept+=("$_tt_p"); done
  _tt_missing=("${_tt_kept[@]}")
fi
if [ ${#_tt_missing[@]} -gt 0 ]; then
  _tt_log "installing test tools: ${_tt_missing[*]}"
  _tt_sudo=""; [ "$(id -u)" -eq 0 ] || _tt_sudo="sudo"
  $_tt_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $_tt_sudo apt-get install -y -qq --no-install-recommends "${_tt_missing[@]}" >/dev/null \
    || _tt_die "apt-get install ${_tt_missing[*]} failed: run 'apt-get update' and retry"
fi
# Debian's prometheus package starts a Prometheus server; the tests need only promtool.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus 2>/dev/null || true
fi

_tt_req="$_tt_root/tests/python/requirements.txt"
_tt_digest="$(sha256sum "$_tt_req" | cut -c1-16)"
_tt_venv="$_tt_cache/test-venv-$_tt_digest"
if [ ! -x "$_tt_venv/bin/python" ] || [ ! -f "$_tt_venv/.complete" ]; then
  _tt_log "making the test venv $_tt_venv (pinned, hash-checked)"
  rm -rf "$_tt_venv"
  python3 -m venv "$_tt_venv" || _tt_die "python3 -m venv failed: apt-get install python3-venv"
  "$_tt_venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
    --only-binary=:all: -r "$_tt_req" || _tt_die "pip install -r $_tt_req failed (see above)"
  touch "$_tt_venv/.complete"
fi
export GAFFER_TEST_PYTHON="$_tt_venv/bin/python"

_tt_browser="$_tt_root/tests/browser"
if [ ! -f "$_tt_browser/node_modules/axe-core/axe.min.js" ]; then
  _tt_log "installing axe-core (tests/browser/package-lock.json)"
  (cd "$_tt_browser" && npm ci --silent --no-audit --no-fund) || _tt_die "npm ci in $_tt_browser failed (see above)"
fi
export GAFFER_AXE_JS="$_tt_browser/node_modules/axe-core/axe.min.js"
export GAFFER_CHROMIUM="${GAFFER_CHROMIUM:-/usr/bin/chromium}"
export GAFFER_CHROMEDRIVER="${GAFFER_CHROMEDRIVER:-/usr/bin/chromedriver}"
export GAFFER_PROMTOOL="${GAFFER_PROMTOOL:-$(command -v promtool || echo /usr/bin/promtool)}"
