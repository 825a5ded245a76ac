#!/usr/bin/env bash
# Overload proof: find the saturation rate with wrk, then offer FACTOR× that
# rate open-loop for DURATION seconds (examples/overload.rs) and report how
# the server answered: 429s and their latency, accepted requests against
# their deadline, errors, server RSS, and readiness right after the load.
#
#   bench/overload.sh [--factor 10] [--duration 60] [--deadline-ms 5000] [--image FILE] [--no-records]
#
# Loopback only. Needs wrk (apt-get install wrk) and a release build
# (cargo build --release --example overload), or another server binary in LINESIDE_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
FACTOR=10 DURATION=60 DEADLINE=5000 RECORDS=
IMG=../shared/data/neu-det/NEU-DET/IMAGES/scratches_1.jpg
while [ $# -gt 0 ]; do
  case "$1" in
    --factor) FACTOR=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --deadline-ms) DEADLINE=$2; shift 2 ;;
    --image) IMG=$2; shift 2 ;;
    --no-records) RECORDS=--no-records; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=${LINESIDE_BIN:-target/release/lineside}
LOAD=target/release/examples/overload
[ -x "$BIN" ] && [ -x "$LOAD" ] || cargo build --release --bin lineside --example overload
PORT=$((20000 + RANDOM % 20000))
DATA=$(mktemp -d)
# Defaults throughout: the admission bound is queue_capacity + max_batch_size.
RUST_LOG=warn "$BIN" serve --addr "127.0.0.1:$PORT" --data-dir "$DATA" $RECORDS & SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do sleep 0.2; done

echo "== saturation: wrk -c16, 3 × 10 s, median"
RATES=()
for _ in 1 2 3; do
  R=$(IMG=$IMG wrk -t2 -c16 -d10s --timeout 10s -s bench/post_image.lua "http://127.0.0.1:$PORT/v1/inspect" | sed -n 's/^WRK_JSON //p')
  echo "$R"
  RATES+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["images_per_second"])' "$R")")
done
SAT=$(printf '%s\n' "${RATES[@]}" | sort -g | sed -n 2p)
OFFER=$(python3 -c "print(round($SAT * $FACTOR, 1))")
echo "== saturation $SAT img/s; offering ${FACTOR}× = $OFFER req/s open-loop for ${DURATION}s (deadline ${DEADLINE} ms)"
"$LOAD" --url "http://127.0.0.1:$PORT" --image "$IMG" --rate "$OFFER" --duration "$DURATION" \
  --pid "$SERVER" --deadline-ms "$DEADLINE"
kill -0 "$SERVER" && echo "== server still up (pid $SERVER)"
