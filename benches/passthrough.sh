#!/usr/bin/env bash
# Overhead benchmarks against baselines measured in the same run (docs/BENCHMARKS.md):
#   #9  POST /v1/chat/completions: direct to the fake upstream, through the kit's mini_proxy (the
#       floor), through Taproom's passthrough (JWT auth on), through LiteLLM, and a char-* model
#       (prompt assembly + persistence); JSON and SSE; sequential, 50 QPS fixed rate, closed c=32.
#   #5  POST /api/characters/{id}/interact, same cases (the target is c=32).
#   #6  N_STREAMS (1,000) concurrent streams x 100 chunks: time to first delta and Taproom's RSS.
# Every case runs ROUNDS times, the targets interleaved inside each round (medians reported).
#
# Usage: benches/passthrough.sh [OUTDIR]          (default: a temporary folder, removed)
# Needs, built beforehand (see docs/BENCHMARKS.md):
#   TAPROOM_BIN    the release binary            (default $CARGO_TARGET_DIR/release/taproom)
#   BENCH_STREAMS  examples/bench_streams.rs     (default $CARGO_TARGET_DIR/release/examples/bench_streams)
#   KIT            the peer kit, built           (default /work/bench-kit: fake_upstream, mini_proxy, sse_load)
#   OHA            oha                           (default: oha on PATH, else /work/bench-tools/bin/oha)
#   LITELLM        LiteLLM's venv                (default /work/bench-tools/litellm; skipped when absent)
# Knobs: ROUNDS=3 LAT_SECS=10 (sequential / fixed rate) CLOSED_SECS=5 (c=32) RATE=50 CONC=32
#        N_STREAMS=1000 CHUNKS=100 CHUNK_DELAY_MS=20 STREAM_SECS=15 STREAM_ROUNDS=2
#        CASES="overhead streams" (either or both)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$HERE/../target}
TAPROOM_BIN=${TAPROOM_BIN:-$TARGET_DIR/release/taproom}
BENCH_STREAMS=${BENCH_STREAMS:-$TARGET_DIR/release/examples/bench_streams}
KIT=${KIT:-/work/bench-kit}
OHA=${OHA:-$(command -v oha || echo /work/bench-tools/bin/oha)}
LITELLM=${LITELLM:-/work/bench-tools/litellm}
ROUNDS=${ROUNDS:-3}; LAT_SECS=${LAT_SECS:-10}; CLOSED_SECS=${CLOSED_SECS:-5}
RATE=${RATE:-50}; CONC=${CONC:-32}
N_STREAMS=${N_STREAMS:-1000}; CHUNKS=${CHUNKS:-100}; CHUNK_DELAY_MS=${CHUNK_DELAY_MS:-20}
STREAM_SECS=${STREAM_SECS:-15}; STREAM_ROUNDS=${STREAM_ROUNDS:-2}
CASES=${CASES:-overhead streams}
UP=18080 FLOOR=18081 TP=18787 LL=4000

for f in "$TAPROOM_BIN" "$BENCH_STREAMS" "$KIT/target/release/fake_upstream" \
         "$KIT/target/release/mini_proxy" "$KIT/target/release/sse_load" "$OHA"; do
  [[ -x $f ]] || { echo "missing executable: $f (see docs/BENCHMARKS.md)" >&2; exit 1; }
done

KEEP_OUT=1
if [[ $# -ge 1 ]]; then OUT=$1; mkdir -p "$OUT"; else OUT=$(mktemp -d); KEEP_OUT=0; fi
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)   # Taproom's data dir and config, the logs; removed at exit
PIDS=()             # every process started here (LiteLLM: its process group)
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do
    if [[ $p == -* ]]; then kill -CONT -- "$p" 2>/dev/null; fi
    kill -TERM -- "$p" 2>/dev/null
  done
  wait 2>/dev/null
  rm -rf "$WORK"
  [[ $KEEP_OUT == 1 ]] || rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url: until it answers (any status), 60 s at most
  for _ in $(seq 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}

start_upstream() { # chunks chunk_delay_ms
  if [[ -n ${UP_PID:-} ]]; then kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; fi
  PORT=$UP CHUNKS=$1 CHUNK_DELAY_MS=$2 "$KIT/target/release/fake_upstream" 2>>"$WORK/upstream.log" &
  UP_PID=$!; PIDS+=("$UP_PID")
  wait_http "http://127.0.0.1:$UP/v1/models"
}

# ---- the processes -------------------------------------------------------------------------
start_upstream 20 0
PORT=$FLOOR UPSTREAM=http://127.0.0.1:$UP "$KIT/target/release/mini_proxy" 2>>"$WORK/floor.log" &
PIDS+=($!)

mkdir -p "$WORK/data"
cat >"$WORK/taproom.toml" <<EOF
listen = "127.0.0.1:$TP"
# One line per request at info; the other peers log nothing per request either.
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
"$TAPROOM_BIN" serve --config "$WORK/taproom.toml" --data-dir "$WORK/data" 2>>"$WORK/taproom.log" &
TP_PID=$!; PIDS+=("$TP_PID")
wait_http "http://127.0.0.1:$TP/healthz"
wait_http "http://127.0.0.1:$FLOOR/v1/models"
JWT=$("$TAPROOM_BIN" token --sub bench --config "$WORK/taproom.toml" --data-dir "$WORK/data")
CHAR_ID=$(curl -sf "http://127.0.0.1:$TP/api/characters" -H "authorization: Bearer $JWT" \
  -H 'content-type: application/json' \
  -d '{"name":"Bench","description":"A terse test character who answers briefly.","personality":{"personality":"calm, precise","scenario":"A quiet benchmark room.","firstMes":"Hello, {{user}}."}}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["id"] if "data" in (d:=json.load(open(0)) if False else {}) else "")' 2>/dev/null || true)
if [[ -z $CHAR_ID ]]; then
  CHAR_ID=$(curl -sf "http://127.0.0.1:$TP/api/characters?limit=1" -H "authorization: Bearer $JWT" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d=d.get("data",d); d=d.get("characters",d) if isinstance(d,dict) else d; print(d[0]["id"])')
fi
echo "character $CHAR_ID (model char-bench)"

LL_KEY=""
if [[ -x $LITELLM/bin/litellm ]]; then
  # shellcheck disable=SC1091
  LL_KEY=$(. "$KIT/litellm-env.sh" && echo "$LITELLM_MASTER_KEY")
  ( . "$KIT/litellm-env.sh"; export LITELLM_MASTER_KEY=$LL_KEY
    exec setsid "$LITELLM/bin/litellm" --config "$KIT/litellm.yaml" --host 127.0.0.1 --port $LL \
      --num_workers 1 ) >>"$WORK/litellm.log" 2>&1 &
  LL_PID=$!; PIDS+=("-$LL_PID")
  for _ in $(seq 1200); do
    curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LL/health/liveliness" 2>/dev/null | grep -q 200 && break
    sleep 0.1
  done
else
  echo "LiteLLM not installed at $LITELLM: skipped" >&2
fi

# ---- the targets ---------------------------------------------------------------------------
JSON_BODY='{"model":"fake-model","messages":[{"role":"user","content":"hello"}]}'
SSE_BODY='{"model":"fake-model","messages":[{"role":"user","content":"hello"}],"stream":true}'
CHAR_JSON='{"model":"char-bench","messages":[{"role":"user","content":"hello"}]}'
CHAR_SSE='{"model":"char-bench","messages":[{"role":"user","content":"hello"}],"stream":true}'
INT_JSON='{"message":"hello"}'
INT_SSE='{"message":"hello","parameters":{"stream":true}}'
OPENAI_PATH=/v1/chat/completions
declare -A URL AUTH JBODY SBODY
URL[direct]=http://127.0.0.1:$UP$OPENAI_PATH;   AUTH[direct]=""
URL[floor]=http://127.0.0.1:$FLOOR$OPENAI_PATH; AUTH[floor]=""
URL[taproom]=http://127.0.0.1:$TP$OPENAI_PATH;  AUTH[taproom]="Bearer $JWT"
URL[char]=http://127.0.0.1:$TP$OPENAI_PATH;     AUTH[char]="Bearer $JWT"
URL[interact]=http://127.0.0.1:$TP/api/characters/$CHAR_ID/interact; AUTH[interact]="Bearer $JWT"
URL[litellm]=http://127.0.0.1:$LL$OPENAI_PATH;  AUTH[litellm]="Bearer $LL_KEY"
for t in direct floor taproom litellm; do JBODY[$t]=$JSON_BODY; SBODY[$t]=$SSE_BODY; done
JBODY[char]=$CHAR_JSON; SBODY[char]=$CHAR_SSE; JBODY[interact]=$INT_JSON; SBODY[interact]=$INT_SSE
TARGETS=(direct floor taproom char interact)
[[ -n $LL_KEY ]] && TARGETS+=(litellm)

# One request of each kind by hand: every target must answer 200 with the expected shape.
for t in "${TARGETS[@]}"; do
  a=(); [[ -n ${AUTH[$t]} ]] && a=(-H "authorization: ${AUTH[$t]}")
  j=$(curl -s -w '\n%{http_code}' "${URL[$t]}" "${a[@]}" -H 'content-type: application/json' -d "${JBODY[$t]}")
  s=$(curl -sN -w '\n%{http_code}' "${URL[$t]}" "${a[@]}" -H 'content-type: application/json' -d "${SBODY[$t]}")
  [[ ${j##*$'\n'} == 200 && ${s##*$'\n'} == 200 ]] || { echo "$t failed: $j / $s" >&2; exit 1; }
  echo "check $t: json $(echo "$j" | head -c 160 | tr '\n' ' ')" >&2
  echo "check $t: sse  $(echo "$s" | grep -c '^data:') data lines, first: $(echo "$s" | grep -m1 '^data:' | head -c 120)" >&2
done

pause_litellm()  { [[ -n ${LL_PID:-} ]] && kill -STOP -- "-$LL_PID" 2>/dev/null || true; }
resume_litellm() { [[ -n ${LL_PID:-} ]] && kill -CONT -- "-$LL_PID" 2>/dev/null || true; }

rss() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; } # pid VmRSS|VmHWM -> kB

run_oha() { # target out [extra oha args]: a non-streaming case
  local t=$1 out=$2; shift 2
  local a=(); [[ -n ${AUTH[$t]} ]] && a=(-H "authorization: ${AUTH[$t]}")
  "$OHA" --no-tui --output-format json "$@" -m POST -T application/json "${a[@]}" \
    -d "${JBODY[$t]}" "${URL[$t]}" >"$out" 2>/dev/null
}
run_streams() { # target out [bench_streams args]: a streaming case
  local t=$1 out=$2; shift 2
  local a=(); [[ -n ${AUTH[$t]} ]] && a=(--auth "${AUTH[$t]}")
  "$BENCH_STREAMS" "${URL[$t]}" "${a[@]}" --body "${SBODY[$t]}" "$@" >"$out"
}

# ---- #9 and #5: overhead -------------------------------------------------------------------
if [[ " $CASES " == *" overhead "* ]]; then
  for r in $(seq "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
      [[ $t == litellm ]] && resume_litellm
      echo "round $r: $t" >&2
      p="$OUT/r${r}_$t"
      run_oha "$t" /dev/null -z 2s -c "$CONC"                                   # warm-up
      run_oha "$t" "${p}_seq_json.json" -z "${LAT_SECS}s" -c 1
      run_oha "$t" "${p}_rate_json.json" -z "${LAT_SECS}s" -c "$CONC" -q "$RATE" --latency-correction
      run_oha "$t" "${p}_c32_json.json" -z "${CLOSED_SECS}s" -c "$CONC"
      run_streams "$t" "${p}_seq_sse.json" --conc 1 --secs "$LAT_SECS"
      run_streams "$t" "${p}_rate_sse.json" --rate "$RATE" --secs "$LAT_SECS"
      run_streams "$t" "${p}_c32_sse.json" --conc "$CONC" --secs "$CLOSED_SECS"
      if [[ $t != interact ]]; then # the kit's closed-loop SSE client, as a cross-check
        MODEL=$(echo "${SBODY[$t]}" | sed 's/.*"model":"\([^"]*\)".*/\1/') \
          "$KIT/target/release/sse_load" "${URL[$t]}" "$CONC" "$CLOSED_SECS" ${AUTH[$t]:+"${AUTH[$t]}"} \
          >"${p}_c32_sse_kit.txt" 2>/dev/null
      fi
      [[ $t == litellm ]] && pause_litellm
    done
  done
fi
echo "taproom_rss_after_overhead_kb=$(rss "$TP_PID" VmRSS)" >"$OUT/rss_overhead.txt"

# ---- #6: streams at scale ------------------------------------------------------------------
if [[ " $CASES " == *" streams "* ]]; then
  start_upstream "$CHUNKS" "$CHUNK_DELAY_MS"
  STREAM_MS=$((CHUNKS * CHUNK_DELAY_MS))
  for r in $(seq "$STREAM_ROUNDS"); do
    for t in direct taproom char interact; do
      echo "streams round $r: $t" >&2
      idle=$(rss "$TP_PID" VmRSS)
      echo 5 >"/proc/$TP_PID/clear_refs" # VmHWM := VmRSS, so the peak is this case's
      peak=0
      ( while kill -0 "$TP_PID" 2>/dev/null; do
          v=$(rss "$TP_PID" VmRSS); ((v > peak)) && peak=$v; echo "$peak" >"$WORK/peak"; sleep 0.2
        done ) &
      watcher=$!
      run_streams "$t" "$OUT/s${r}_$t.json" --conc "$N_STREAMS" --ramp-ms "$STREAM_MS" \
        --warmup-secs "$(awk -v m="$STREAM_MS" 'BEGIN{print m/1000 + 1}')" --secs "$STREAM_SECS"
      kill "$watcher"; wait "$watcher" 2>/dev/null || true
      echo "{\"rss_before_kb\":$idle,\"rss_peak_sampled_kb\":$(cat "$WORK/peak"),\"vmhwm_kb\":$(rss "$TP_PID" VmHWM),\"rss_after_kb\":$(rss "$TP_PID" VmRSS),\"threads\":$(awk '$1=="Threads:"{print $2}' "/proc/$TP_PID/status")}" \
        >"$OUT/s${r}_${t}_rss.json"
    done
  done
fi

grep -ciE 'error|panic' "$WORK/taproom.log" | sed 's/^/taproom log error lines: /' >&2 || true
python3 "$HERE/passthrough_report.py" "$OUT" | tee "$OUT/report.md"
