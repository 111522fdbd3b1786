#!/usr/bin/env bash
# Regenerates the reference cut list that agent/tests/shots_reference.rs checks the agent's
# shot detector against: PySceneDetect 0.7.2 `detect-content` with its defaults on test.mp4.
#
#   scripts/make-reference-cuts.sh
#
# Writes tests/fixtures/shots/test.mp4.scenedetect-0.7.2.csv (RFC 4180 CSV, one row per scene;
# "Start Frame" is 1-based, so a scene starting at frame F means a cut before 0-based frame F-1).
# Update tests/fixtures/shots/README.md (date, versions) when you regenerate it.
#
# Environment:
#   GAFFER_MEDIA_DIR   sample media directory (default: ~/.cache/gaffer/media; scripts/setup.sh
#                      fetches it)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MEDIA_DIR="${GAFFER_MEDIA_DIR:-$HOME/.cache/gaffer/media}"
INPUT="$MEDIA_DIR/test.mp4"
INPUT_SHA256="f912ecc64858dc0d5cdd93392d50c1463debeac98c53409e4542f74c11892750"
OUT_DIR="$ROOT/tests/fixtures/shots"
OUT_NAME="test.mp4.scenedetect-0.7.2.csv"

die() { printf 'make-reference-cuts: error: %s\n' "$*" >&2; exit 1; }

[ -f "$INPUT" ] || die "$INPUT not found: run scripts/setup.sh (or set GAFFER_MEDIA_DIR)"
[ "$(sha256sum "$INPUT" | cut -d' ' -f1)" = "$INPUT_SHA256" ] \
  || die "$INPUT does not have the pinned SHA-256 $INPUT_SHA256: re-fetch it with scripts/setup.sh"
command -v scenedetect >/dev/null \
  || die "scenedetect not found: pip install 'scenedetect-headless==0.7.2'"
version="$(python3 -c 'import scenedetect; print(scenedetect.__version__)')"
[ "$version" = "0.7.2" ] || die "PySceneDetect $version installed, the reference needs 0.7.2: pip install 'scenedetect-headless==0.7.2'"

mkdir -p "$OUT_DIR"
# Defaults everywhere: OpenCV backend, auto downscale, detect-content threshold 27, min scene
# length 0.6 s (15 frames at 25 fps), flash filter in merge mode. --skip-cuts drops the extra
# "Timecode List" row so the file is plain CSV.
scenedetect -i "$INPUT" -o "$OUT_DIR" detect-content list-scenes --skip-cuts --quiet -f "$OUT_NAME"
rows=$(($(wc -l < "$OUT_DIR/$OUT_NAME") - 1))
printf 'wrote %s: %d scenes (%d cuts)\n' "$OUT_DIR/$OUT_NAME" "$rows" "$((rows - 1))" >&2
