#!/usr/bin/env bash
# End-to-end HTTP benchmark: a real lineside server under concurrent load from
# wrk, next to the raw model throughput measured by `lineside bench` in the
# same run, before and after each wrk run (this VM's speed drifts by tens of
# percent within minutes, so the ratio takes the median of raw runs
# interleaved with the HTTP runs); then open-loop load (bench/openloop.py) at
# 50% and 90% of the saturation wrk found. Prints img/s, p50/p99 latency, the
# server's CPU time per image, its RSS and the e2e/raw ratio.
#
#   bench/http.sh [--connections 16] [--duration 20] [--batch 8] [--image FILE] [--no-records]
#                 [--jpeg-decode full|scaled] [--model SOURCE]
#
# --model is a model source as in config (default builtin:steel-surface, the
# built-in mobilenetv2_100; or a timm hub-format folder such as resnet18's).
#
# --jpeg-decode sets server.jpeg_decode (full, the default: every pixel;
# scaled: DCT-scaled JPEG decoding, docs/performance.md).
#
# Records are on (as in production), in a temporary data directory.
#
# Needs wrk (apt-get install wrk) and a release build (cargo build --release),
# or another binary in LINESIDE_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=16 DURATION=20 BATCH=8 RUNS=3 RECORDS= JPEG=full MODEL=builtin:steel-surface
IMG=../shared/data/neu-det/NEU-DET/IMAGES/scratches_1.jpg
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) CONNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --image) IMG=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --no-records) RECORDS=--no-records; shift ;;
    --jpeg-decode) JPEG=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=${LINESIDE_BIN:-target/release/lineside}
[ -x "$BIN" ] || cargo build --release
PORT=$((20000 + RANDOM % 20000))
CFG=$(mktemp --suffix .toml)
cat > "$CFG" <<TOML
[server]
addr = "127.0.0.1:$PORT"
jpeg_decode = "$JPEG"
[[models]]
name = "steel-surface"
source = "$MODEL"
max_batch_size = $BATCH
max_queue_delay_ms = 2
queue_capacity = 256
TOML
DATA=$(mktemp -d)
RUST_LOG=warn "$BIN" serve --config "$CFG" --data-dir "$DATA" $RECORDS & SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$CFG" "$DATA"' EXIT
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do sleep 0.2; done

raw() { "$BIN" bench --model "$MODEL" --batch-sizes "$BATCH" --runs 1 --json | tail -1; }
echo "== raw model $MODEL (lineside bench, batch $BATCH), before and after each HTTP run"
RAWS=("$(raw)")
echo "raw: ${RAWS[0]}"
echo "== end to end: wrk -c $CONNS -d ${DURATION}s, $RUNS runs, $(basename "$IMG"), jpeg_decode = $JPEG"
IMG=$IMG wrk -t2 -c"$CONNS" -d2s -s bench/post_image.lua "http://127.0.0.1:$PORT/v1/inspect" >/dev/null # warm-up
# The server's user + system CPU time in clock ticks (fields 14 and 15 of
# /proc/PID/stat, counted after the parenthesised command name).
cpu_ticks() { sed 's/.*) //' "/proc/$SERVER/stat" | awk '{print $12 + $13}'; }
RESULTS=()
for i in $(seq "$RUNS"); do
  T0=$(cpu_ticks)
  R=$(IMG=$IMG wrk -t2 -c"$CONNS" -d"${DURATION}s" --timeout 10s -s bench/post_image.lua "http://127.0.0.1:$PORT/v1/inspect" | sed -n 's/^WRK_JSON //p')
  T1=$(cpu_ticks)
  # CPU per request (every one carries an image) is steadier than img/s on a shared machine: it
  # shows what a change to decoding saves even when throughput is noisy.
  R=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r["server_cpu_ms_per_image"] = round((int(sys.argv[3]) - int(sys.argv[2])) * 1000 / int(sys.argv[4]) / max(r["requests"], 1), 2); print(json.dumps(r))' "$R" "$T0" "$T1" "$(getconf CLK_TCK)")
  echo "run $i: $R"
  RESULTS+=("$R")
  RAWS+=("$(raw)")
  echo "raw: ${RAWS[-1]}"
done
SAT=$(printf '%s\n' "${RESULTS[@]}" | python3 -c 'import json,statistics,sys; print(statistics.median(json.loads(l)["images_per_second"] for l in sys.stdin))')
echo "== open loop at 50% and 90% of saturation ($SAT img/s), ${DURATION}s each"
OPEN=()
for pct in 50 90; do
  RATE=$(python3 -c "print(round($SAT * $pct / 100, 2))")
  R=$(python3 bench/openloop.py --url "http://127.0.0.1:$PORT/v1/inspect" --image "$IMG" --rate "$RATE" --duration "$DURATION")
  echo "$pct%: $R"
  OPEN+=("$R")
done
RSS=$(awk '/VmHWM/ {print $2/1024}' /proc/$SERVER/status)
RAW_JSON=$(printf '%s\n' "${RAWS[@]}" | python3 -c 'import json, sys; print(json.dumps([json.loads(l) for l in sys.stdin]))')
python3 - "$RAW_JSON" "$RSS" "${OPEN[@]}" "${RESULTS[@]}" <<'PY'
import json, statistics, sys
raws = json.loads(sys.argv[1]); rss = float(sys.argv[2])
open50, open90 = json.loads(sys.argv[3]), json.loads(sys.argv[4])
runs = [json.loads(r) for r in sys.argv[5:]]
med = lambda k: statistics.median(r[k] for r in runs)
e2e = med("images_per_second")
raw = dict(raws[0], images_per_second=statistics.median(r["images_per_second"] for r in raws))
print(f"== summary (medians of {len(runs)} runs)")
print(f"raw model  batch {raw['batch']}: {raw['images_per_second']:.1f} img/s "
      f"(median of {len(raws)} runs: {', '.join(format(r['images_per_second'], '.1f') for r in raws)})")
print(f"end to end HTTP at saturation: {e2e:.1f} img/s, p50 {med('p50_ms'):.1f} ms, p99 {med('p99_ms'):.1f} ms, "
      f"non-2xx {sum(r['non_2xx'] for r in runs)}, server peak RSS {rss:.0f} MiB")
print(f"server CPU per image at saturation: {med('server_cpu_ms_per_image'):.2f} ms "
      f"(the raw model on {raw['threads']} threads: at most {raw['threads'] * 1000 / raw['images_per_second']:.2f} ms)")
for name, o in (("50%", open50), ("90%", open90)):
    print(f"open loop at {name} of saturation ({o['offered_rps']} req/s offered, {o['achieved_rps']} answered): "
          f"p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms, non-2xx {o['non_2xx']}, errors {o['errors']}")
print(f"ratio end-to-end / raw model: {e2e / raw['images_per_second']:.2f}")
PY
