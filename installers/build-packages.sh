#!/usr/bin/env bash
# Builds the Debian packages gaffer-agent and gaffer-control (cargo-deb) and the release tarball
# gaffer-agent-VERSION-ARCH-linux.tar.gz (binary, systemd unit, example config, README) for boxes
# without dpkg, with a SHA256SUMS file; prints the output directory on its last line (stdout; the
# progress goes to stderr).
#
#   installers/build-packages.sh                    release build, then packages
#   installers/build-packages.sh --profile dev      packages the debug binaries already built
#                                                   (by scripts/test.sh's build): no second build
#   installers/build-packages.sh --out DIR          output directory (default:
#                                                   $CARGO_TARGET_DIR/packages/PROFILE)
#
# Package contents and maintainer scripts: [package.metadata.deb] in agent/Cargo.toml and
# control-plane/Cargo.toml, installers/debian/, installers/systemd/, installers/config/.
#
# Environment:
#   GAFFER_BUILD_VERSION  the version of the packages and the tarball (and, for a release build,
#                         of the binaries); default: the crate version in Cargo.toml
#   CARGO_TARGET_DIR      the cargo target dir (default: ~/.cache/gaffer/target)
#   GAFFER_CACHE_DIR      cargo-deb (pinned, installed on first use) goes to its tools/ (default:
#                         ~/.cache/gaffer)
#   SOURCE_DATE_EPOCH     file times in the tarball (default: the last commit's time)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CACHE_DIR="${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}"
TOOLS_DIR="$CACHE_DIR/tools"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gaffer/target}"

log() { printf '\033[1m[packages]\033[0m %s\n' "$*" >&2; }
die() { printf '[packages] error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

profile=release
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) [ $# -ge 2 ] || usage; profile=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$profile" in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) die "--profile takes release or dev, not '$profile'" ;;
esac
[ -n "$out" ] || out="$CARGO_TARGET_DIR/packages/$profile"

# --- tools ---------------------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) and re-run"
# cargo-deb stages every package in $CARGO_TARGET_DIR/debian/: one run of this script at a time
# per target dir.
mkdir -p "$CARGO_TARGET_DIR"
exec 9>"$CARGO_TARGET_DIR/.build-packages.lock"
flock -n 9 || { log "waiting for another build-packages.sh on $CARGO_TARGET_DIR"; flock 9; }
for tool in dpkg-deb dpkg-shlibdeps strip; do
  # dpkg-shlibdeps finds the shared libraries (FFmpeg's sonames) for the packages' Depends.
  command -v "$tool" >/dev/null || die "$tool not found: run scripts/setup.sh (it installs dpkg-dev)"
done
export PATH="$TOOLS_DIR/bin:$PATH"
if [ "$(cargo deb --version 2>/dev/null || true)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  log "installing cargo-deb $CARGO_DEB_VERSION into $TOOLS_DIR (once)"
  cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION" --root "$TOOLS_DIR" >&2
  [ "$(cargo deb --version)" = "cargo-deb $CARGO_DEB_VERSION" ] || die "cargo-deb $CARGO_DEB_VERSION did not install"
fi

# --- version -------------------------------------------------------------------------------------
crate_version=$(cargo pkgid --offline -p gaffer-agent 2>/dev/null | sed 's/.*[@#]//') \
  || die "cannot read the crate version (cargo pkgid -p gaffer-agent)"
version="${GAFFER_BUILD_VERSION:-$crate_version}"
# The Debian revision follows after a hyphen, so the upstream version has none.
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~]*$ ]] \
  || die "version '$version' is not a Debian upstream version (digits first, then letters, digits, . + ~)"
deb_version="$version-1"

# --- binaries ------------------------------------------------------------------------------------
bin_dir="$CARGO_TARGET_DIR/$profile_dir"
if [ "$profile" = release ]; then
  log "building gaffer-agent and gaffer-control $version (release)"
  GAFFER_BUILD_VERSION="$version" cargo build --locked --release -p gaffer-agent -p gaffer-control --bins >&2
else
  for b in gaffer-agent gaffer-control; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is not built: run 'cargo build -p gaffer-agent -p gaffer-control' (or scripts/test.sh) first"
  done
fi

# --- packages ------------------------------------------------------------------------------------
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Only what an earlier run of this script left; anything else in --out stays.
rm -f "$out"/gaffer-agent_*.deb "$out"/gaffer-control_*.deb "$out"/gaffer-agent-*-linux.tar.gz "$out/SHA256SUMS"
deb_flags=(--no-build --profile "$profile" --deb-version "$deb_version" --output "$out/")
# The dev profile packages test builds: lighter compression (cargo-deb warns that the dev
# profile is not meant for releases; it still strips and packages the binaries).
[ "$profile" = release ] || deb_flags+=(--fast)
for pkg in gaffer-agent gaffer-control; do
  log "packaging $pkg $deb_version ($profile binaries)"
  cargo deb -p "$pkg" "${deb_flags[@]}" >&2
done
arch=$(dpkg --print-architecture)
agent_deb="$out/gaffer-agent_${deb_version}_${arch}.deb"
control_deb="$out/gaffer-control_${deb_version}_${arch}.deb"
[ -f "$agent_deb" ] && [ -f "$control_deb" ] || die "cargo deb did not write $agent_deb and $control_deb"

# --- tarball -------------------------------------------------------------------------------------
# The agent binary exactly as packaged (stripped), its unit, the example config and a README.
tarball="$out/gaffer-agent-$version-$(uname -m)-linux.tar.gz"
log "writing $(basename "$tarball")"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
top="$stage/gaffer-agent-$version"
mkdir -p "$top/bin" "$top/systemd" "$top/config" "$stage/deb"
dpkg-deb --fsys-tarfile "$agent_deb" | tar -x -C "$stage/deb" ./usr/bin/gaffer-agent
install -m 0755 "$stage/deb/usr/bin/gaffer-agent" "$top/bin/gaffer-agent"
install -m 0644 installers/systemd/gaffer-agent.service "$top/systemd/gaffer-agent.service"
install -m 0644 installers/config/agent.toml "$top/config/agent.toml"
sed "s/@VERSION@/$version/g" installers/tarball/README.md >"$top/README.md"
chmod 0644 "$top/README.md"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
# Reproducible: sorted names, root-owned, fixed times, no gzip timestamp.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -C "$stage" -cf - "gaffer-agent-$version" \
  | gzip -9 -n >"$tarball.part"
mv "$tarball.part" "$tarball"

(cd "$out" && sha256sum "$(basename "$agent_deb")" "$(basename "$control_deb")" "$(basename "$tarball")" >SHA256SUMS)
log "built $(basename "$agent_deb"), $(basename "$control_deb"), $(basename "$tarball")"
echo "$out"
