#!/usr/bin/env bash
# The README screenshots of a run: docs/images/report.png (python -m ddpm_dist.report) and
# docs/images/tensorboard.png (TensorBoard's time series of the same run).
#
#   make demo            # trains with metrics.tensorboard=true and renders the report
#   docs/screenshots.sh [RUN_DIR]        # default runs/digits, the demo's run
#
# Needs chromium (`make system-deps`) and, for the second picture, tensorboard in the venv. Everything stays
# on this machine: the report is one file, TensorBoard listens on 127.0.0.1, and chromium runs with the flags
# that keep it off the network, in a fresh profile each time.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/digits}
OUT=${OUT:-docs/images}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
REPORT_SIZE=${REPORT_SIZE:-1200,2400}
TB_SIZE=${TB_SIZE:-1400,1000}

WORK=$(mktemp -d)
TB_PID=""
cleanup() {
  if [ -n "$TB_PID" ]; then kill "$TB_PID" 2>/dev/null || true; wait "$TB_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

shoot() {  # URL PNG WIDTH,HEIGHT [chromium flags]
  local url=$1 png=$2 size=$3
  shift 3
  if ! chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
      --disable-component-update --disable-sync --user-data-dir="$(mktemp -d -p "$WORK")" --hide-scrollbars \
      --window-size="$size" "$@" --screenshot="$png" "$url" >"$WORK/chromium.log" 2>&1; then
    cat "$WORK/chromium.log" >&2
    echo "error: chromium could not screenshot $url" >&2
    exit 1
  fi
}

command -v chromium >/dev/null || { echo "error: chromium is not installed (make system-deps)" >&2; exit 1; }
mkdir -p "$OUT"
"$PY" -m ddpm_dist.report --run "$RUN" --out "$RUN/report.html"
shoot "file://$(realpath "$RUN/report.html")" "$OUT/report.png" "$REPORT_SIZE"
echo "report: $OUT/report.png"

if [ ! -d "$RUN/tensorboard" ]; then
  echo "no $RUN/tensorboard (train with metrics.tensorboard=true): no TensorBoard screenshot" >&2
  exit 0
fi
TB=$(dirname "$PY")/tensorboard
[ -x "$TB" ] || TB=$(command -v tensorboard) || { echo "error: tensorboard is not installed" >&2; exit 1; }
"$TB" --logdir "$RUN/tensorboard" --host 127.0.0.1 --port 0 >"$WORK/tensorboard.log" 2>&1 &
TB_PID=$!
PORT=""
for _ in $(seq 600); do  # "TensorBoard 2.x at http://127.0.0.1:PORT/ (Press CTRL+C to quit)", within a minute
  PORT=$(sed -n 's|^TensorBoard .* at http://127\.0\.0\.1:\([0-9][0-9]*\)/.*|\1|p' "$WORK/tensorboard.log" | head -n 1)
  [ -n "$PORT" ] && break
  kill -0 "$TB_PID" 2>/dev/null || { cat "$WORK/tensorboard.log" >&2; echo "error: tensorboard exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$WORK/tensorboard.log" >&2; echo "error: tensorboard named no port in 60 s" >&2; exit 1; }
"$PY" - "$PORT" <<'EOF'  # until it answers, and its data is loaded (the runs list names a run)
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/data/runs"
for _ in range(600):
    try:
        if urllib.request.urlopen(url, timeout=2).read().strip() not in (b"", b"[]"):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"error: tensorboard at {url} did not answer with a run in 60 s")
EOF
# the classic Scalars view: the time-series view draws its lines with WebGL, which headless chromium lacks here
shoot "http://127.0.0.1:$PORT/${TB_VIEW:-#scalars&tagFilter=train%2F}" "$OUT/tensorboard.png" "$TB_SIZE" --virtual-time-budget=20000
echo "tensorboard: $OUT/tensorboard.png"
