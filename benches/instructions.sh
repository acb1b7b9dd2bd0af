#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: Taproom's passthrough
# and the kit's floor (mini_proxy), each under callgrind, N sequential-ish requests (oha, c=4)
# after a warm-up, counters zeroed between the two. Unlike CPU time on a shared machine, the
# count is the same run to run, so it can judge a change worth ~1 %. (docs/BENCHMARKS.md, #9.)
#
# usage: benches/instructions.sh [OUT_DIR]
#   env: TAPROOM_BIN (default $CARGO_TARGET_DIR/release/taproom), KIT (/work/bench-kit), OHA,
#        N=3000 measured requests, WARM=300, TARGETS="taproom floor".
#   OUT_DIR keeps the callgrind files (callgrind_annotate OUT_DIR/taproom.out shows where).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$HERE/../target}
TAPROOM_BIN=${TAPROOM_BIN:-$TARGET_DIR/release/taproom}
KIT=${KIT:-/work/bench-kit}
OHA=${OHA:-$(command -v oha || echo /work/bench-tools/bin/oha)}
N=${N:-3000}; WARM=${WARM:-300}; TARGETS=${TARGETS:-taproom floor}
UP=18180 FLOOR=18181 TP=18787

for f in "$TAPROOM_BIN" "$KIT/target/release/fake_upstream" "$KIT/target/release/mini_proxy" \
         "$OHA" "$(command -v valgrind || echo valgrind)" "$(command -v callgrind_control || echo callgrind_control)"; do
  [[ -x $f ]] || { echo "missing executable: $f" >&2; exit 1; }
done
OUT=${1:-$(mktemp -d)}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_http() {
  for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done
  echo "not up: $1" >&2; exit 1
}

PORT=$UP CHUNKS=20 "$KIT/target/release/fake_upstream" >/dev/null 2>&1 & PIDS+=($!)
wait_http "http://127.0.0.1:$UP/v1/models"

BODY='{"model":"fake-model","messages":[{"role":"user","content":"hello"}]}'
# measure NAME URL [AUTH]: zero the counters after the warm-up, dump after N requests.
measure() {
  local name=$1 url=$2 auth=${3:-} pid=$4
  local a=(); [[ -n $auth ]] && a=(-H "authorization: Bearer $auth")
  "$OHA" -n "$WARM" -c 4 --no-tui -m POST -H 'content-type: application/json' "${a[@]}" \
    -d "$BODY" "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  local ok
  ok=$("$OHA" -n "$N" -c 4 --no-tui -m POST -H 'content-type: application/json' "${a[@]}" \
    -d "$BODY" "$url" | grep -c "\[200\] $N responses" || true)
  callgrind_control -d "$pid" >/dev/null
  sleep 0.5
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [[ $ok == 1 ]] || { echo "$name: not every request answered 200" >&2; exit 1; }
  local dump; dump=$(ls "$WORK"/cg."$name".* | sort | tail -1)
  mv "$dump" "$OUT/$name.out"
  awk -v n="$N" -v name="$name" '/^summary:/ {printf "%s: %.0f instructions per request\n", name, $2/n}' "$OUT/$name.out"
}

for t in $TARGETS; do
  case $t in
    taproom)
      cat >"$WORK/taproom.toml" <<EOF
listen = "127.0.0.1:$TP"
log = "warn"
[rate_limit]
interact_per_minute = 0
other_per_minute = 0
[plugins]
dir = "$WORK/plugins.d"
watch = false
[upstreams.main]
url = "http://127.0.0.1:$UP/v1"
model = "fake-model"
EOF
      mkdir -p "$WORK/data" "$WORK/plugins.d"
      valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.taproom.%p" \
        "$TAPROOM_BIN" serve --config "$WORK/taproom.toml" --data-dir "$WORK/data" \
        >"$WORK/taproom.log" 2>&1 & PIDS+=($!)
      pid=$!
      wait_http "http://127.0.0.1:$TP/healthz"
      jwt=$("$TAPROOM_BIN" token --sub bench --config "$WORK/taproom.toml" --data-dir "$WORK/data")
      measure taproom "http://127.0.0.1:$TP/v1/chat/completions" "$jwt" "$pid"
      ;;
    floor)
      PORT=$FLOOR UPSTREAM=http://127.0.0.1:$UP valgrind --tool=callgrind \
        --callgrind-out-file="$WORK/cg.floor.%p" "$KIT/target/release/mini_proxy" \
        >"$WORK/floor.log" 2>&1 & PIDS+=($!)
      pid=$!
      sleep 3
      wait_http "http://127.0.0.1:$FLOOR/v1/models"
      measure floor "http://127.0.0.1:$FLOOR/v1/chat/completions" "" "$pid"
      ;;
    *) echo "unknown target: $t" >&2; exit 1 ;;
  esac
done
echo "callgrind files: $OUT"
