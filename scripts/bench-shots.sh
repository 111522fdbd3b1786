#!/usr/bin/env bash
# Benchmarks `gaffer-agent analyze --profile shots` (release build) against decode-only FFmpeg
# (`ffmpeg -threads 2 -i FILE -an -f null -`) and PySceneDetect (`scenedetect -i FILE detect-content`)
# on test.mp4 and bbb-720p-x10.mp4, and prints a table of median wall times and ratios, and the
# median CPU times of ours and decode-only (steadier than wall times on a shared machine).
#
#   scripts/bench-shots.sh
#
# Environment: GAFFER_MEDIA_DIR (default ~/.cache/gaffer/media), GAFFER_BENCH_REPS (default 5),
# GAFFER_BENCH_FILES (comma-separated names; default test.mp4,bbb-720p-x10.mp4),
# CARGO_TARGET_DIR (as for any cargo build). The table is agent/benches/shots.rs's output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo bench -p gaffer-agent --bench shots
