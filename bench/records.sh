#!/usr/bin/env bash
# The write cost of inspection records: end-to-end img/s and latency with
# records on and off, same binary, image and load, alternating off/on rounds
# so drift on this noisy machine hits both alike. Prints every round and the
# medians, and the on/off ratio.
#
#   bench/records.sh [--image FILE | --images DIR] [--rounds 3] [--duration 15] [--connections 16] [--database-url URL]
#
# Every NEU image is a defect, so every request retains its image. With
# --images, each request sends a different file from DIR (*.jpg), so every
# one is a new file written and synced: the worst case for the image store. Needs wrk and a release build (or LINESIDE_BIN).
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=../shared/data/neu-det/NEU-DET/IMAGES/scratches_1.jpg ROUNDS=3 DURATION=15 CONNS=16 DB=() IMG_LIST=
while [ $# -gt 0 ]; do
  case "$1" in
    --image) IMG=$2; shift 2 ;;
    --images) IMG_LIST=$(mktemp); ls "$2"/*.jpg > "$IMG_LIST"; IMG=$(head -n 1 "$IMG_LIST"); shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --database-url) DB=(--database-url "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=${LINESIDE_BIN:-target/release/lineside}
[ -x "$BIN" ] || cargo build --release
OUT=$(mktemp)
run() { # mode: off | on
  local mode=$1 port=$((20000 + RANDOM % 20000)) data
  data=$(mktemp -d)
  local flags=(--data-dir "$data")
  if [ "$mode" = off ]; then flags+=(--no-records); else flags+=("${DB[@]}"); fi
  RUST_LOG=warn "$BIN" serve --addr "127.0.0.1:$port" "${flags[@]}" & local pid=$!
  until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.2; done
  IMG=$IMG IMG_LIST=$IMG_LIST wrk -t2 -c"$CONNS" -d2s -s bench/post_image.lua "http://127.0.0.1:$port/v1/inspect" >/dev/null
  local r
  r=$(IMG=$IMG IMG_LIST=$IMG_LIST wrk -t2 -c"$CONNS" -d"${DURATION}s" --timeout 10s -s bench/post_image.lua \
      "http://127.0.0.1:$port/v1/inspect" | sed -n 's/^WRK_JSON //p')
  local rss
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local stored
  stored=$(du -sk "$data" | cut -f1)
  rm -rf "$data"
  echo "$mode $r rss_kib=$rss store_kib=$stored" | tee -a "$OUT"
}
echo "== ${IMG_LIST:+$(wc -l < "$IMG_LIST") different images from }$(basename "$IMG"), wrk -c$CONNS -d${DURATION}s, $ROUNDS rounds of off/on"
for i in $(seq "$ROUNDS"); do run off; run on; done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = {"off": [], "on": []}
for line in open(sys.argv[1]):
    mode, rest = line.split(" ", 1)
    rows[mode].append(json.loads(rest.split(" rss_kib")[0]))
med = {m: {k: statistics.median(r[k] for r in v) for k in ("images_per_second", "p50_ms", "p99_ms")} for m, v in rows.items()}
for m in ("off", "on"):
    print(f"records {m:3}: median {med[m]['images_per_second']:.1f} img/s, p50 {med[m]['p50_ms']:.1f} ms, p99 {med[m]['p99_ms']:.1f} ms")
ratio = med["on"]["images_per_second"] / med["off"]["images_per_second"]
print(f"on/off throughput: {ratio:.3f} ({(1 - ratio) * 100:+.1f}% slower with records)")
PY
rm -f "$OUT"
