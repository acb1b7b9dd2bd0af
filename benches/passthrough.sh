#!/usr/bin/env bash
# Overhead benchmarks against baselines measured in the same run (docs/BENCHMARKS.md):
#   #9  POST /v1/chat/completions: direct to the fake upstream, through the kit's mini_proxy (the
#       floor), through Taproom's passthrough (JWT auth on), through LiteLLM, and a char-* model
#       (prompt assembly + persistence); JSON and SSE; sequential, 50 QPS fixed rate, closed c=32.
#   #5  POST /api/characters/{id}/interact, the same cases (its target is c=32).
#   #6  N_STREAMS (1,000) concurrent streams x CHUNKS (100): time to first delta vs direct, and
#       Taproom's peak RSS (VmHWM, also reset through /proc/PID/clear_refs), a fresh process per case.
# Each case runs ROUNDS times with the targets interleaved inside a round; the report gives
# medians. CPU used by other processes is recorded per case (cpu.tsv) and gates the cases.
#
# Usage: benches/passthrough.sh [OUTDIR]          (default: a temporary folder, removed at exit)
# Needs, built beforehand (commands in docs/BENCHMARKS.md):
#   TAPROOM_BIN    the release binary            (default $CARGO_TARGET_DIR/release/taproom)
#   BENCH_STREAMS  examples/bench_streams.rs     (default $CARGO_TARGET_DIR/release/examples/bench_streams)
#   KIT            the peer kit, built           (default /work/bench-kit: fake_upstream, mini_proxy, sse_load)
#   OHA            oha                           (default: oha on PATH, else /work/bench-tools/bin/oha)
#   LITELLM        LiteLLM's venv                (default /work/bench-tools/litellm; skipped when absent)
# Knobs: ROUNDS=3 LAT_SECS=10 (sequential, fixed rate) CLOSED_SECS=5 (c=32) RATE=50 CONC=32
#        N_STREAMS=1000 CHUNKS=100 CHUNK_DELAY_MS=20 STREAM_SECS=15 STREAM_ROUNDS=2
#        CASES="overhead streams" (either or both)
#        TARGETS="taproom char" (targets of both cases; default all, LiteLLM when installed;
#        direct and floor, the baselines, are always measured)
#        CHAR_CARD=path: the char and interact targets talk to this imported card (PNG, JSON or
#        CharX; e.g. ../shared/fixtures/sillytavern/default_Seraphina.png) instead of "Bench"
#        QUIET_CORES=0.25 QUIET_WAIT=180 ATTEMPTS=3: the machine is shared; before each case wait
#        (QUIET_WAIT s at most) until other processes use under QUIET_CORES, and measure a case
#        again (ATTEMPTS in all) when they used more during it.
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
QUIET_CORES=${QUIET_CORES:-0.25}; QUIET_WAIT=${QUIET_WAIT:-180}; ATTEMPTS=${ATTEMPTS:-3}
UP=18080 FLOOR=18081 TP=18787 LL=4000

for f in "$TAPROOM_BIN" "$BENCH_STREAMS" "$KIT/target/release/fake_upstream" \
         "$KIT/target/release/mini_proxy" "$KIT/target/release/sse_load" "$OHA"; do
  [[ -x $f ]] || { echo "missing executable: $f (see docs/BENCHMARKS.md)" >&2; exit 1; }
done

KEEP_OUT=1
if [[ $# -ge 1 ]]; then OUT=$1; mkdir -p "$OUT"; else OUT=$(mktemp -d); KEEP_OUT=0; fi
OUT=$(cd "$OUT" && pwd)
# Absolute, so machine.txt names the card unambiguously (the report labels the target by it).
if [[ -n ${CHAR_CARD:-} ]]; then
  CHAR_CARD=$(realpath -e "$CHAR_CARD") || { echo "CHAR_CARD: no such file" >&2; exit 1; }
fi
WORK=$(mktemp -d)   # Taproom's data dirs and config, the logs; removed at exit
declare -A STARTED  # pid -> name, every process started here (LiteLLM: its process group)
cleanup() {
  set +e
  for p in "${!STARTED[@]}"; do
    [[ ${STARTED[$p]} == litellm ]] && { kill -CONT -- "-$p"; kill -TERM -- "-$p"; continue; }
    kill -TERM "$p"
  done 2>/dev/null
  wait 2>/dev/null
  rm -rf "$WORK"
  [[ $KEEP_OUT == 1 ]] || rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "benches/passthrough.sh: command failed at line $LINENO" >&2' ERR
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; unset "STARTED[$1]"; }

wait_http() { # url: until it answers (any status), 60 s at most
  for _ in $(seq 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}

{
  echo "commit $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null)$(git -C "$HERE" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | grep -q . && echo ' (working tree has uncommitted src changes at run time)')"
  echo "taproom binary $(stat -c '%y' "$TAPROOM_BIN")"
  echo "cores $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "oha $("$OHA" --version | cut -d' ' -f2)"
  echo "character: ${CHAR_CARD:-Bench (a short card created here)}"
} >"$OUT/machine.txt"

# ---- the processes -------------------------------------------------------------------------
start_upstream() { # chunks chunk_delay_ms
  [[ -n ${UP_PID:-} ]] && stop "$UP_PID"
  PORT=$UP CHUNKS=$1 CHUNK_DELAY_MS=$2 "$KIT/target/release/fake_upstream" 2>>"$WORK/upstream.log" &
  UP_PID=$!; STARTED[$UP_PID]=upstream
  wait_http "http://127.0.0.1:$UP/v1/models"
}

start_taproom() { # a fresh data dir, a token and the Bench character each time
  [[ -n ${TP_PID:-} ]] && { stop "$TP_PID"; rm -rf "$TP_DATA"; }
  local data; data=$(mktemp -d -p "$WORK" data.XXXX); TP_DATA=$data
  "$TAPROOM_BIN" serve --config "$WORK/taproom.toml" --data-dir "$data" 2>>"$WORK/taproom.log" &
  TP_PID=$!; STARTED[$TP_PID]=taproom
  wait_http "http://127.0.0.1:$TP/healthz"
  JWT=$("$TAPROOM_BIN" token --sub bench --config "$WORK/taproom.toml" --data-dir "$data")
  if [[ -n ${CHAR_CARD:-} ]]; then
    local made; made=$(curl -sf "http://127.0.0.1:$TP/api/characters/import" \
      -H "authorization: Bearer $JWT" -H 'content-type: application/octet-stream' \
      --data-binary "@$CHAR_CARD" |
      python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["id"], c["slug"])')
    CHAR_ID=${made% *}
    JBODY[char]=${JBODY[char]/char-bench/char-${made#* }}
    SBODY[char]=${SBODY[char]/char-bench/char-${made#* }}
  else
    CHAR_ID=$(curl -sf "http://127.0.0.1:$TP/api/characters" -H "authorization: Bearer $JWT" \
      -H 'content-type: application/json' \
      -d '{"name":"Bench","description":"A terse test character who answers briefly.","personality":{"personality":"calm, precise","scenario":"A quiet benchmark room.","firstMes":"Hello, {{user}}."}}' |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  fi
  AUTH[taproom]="Bearer $JWT"; AUTH[taproom_id]="Bearer $JWT"; AUTH[char]="Bearer $JWT"
  AUTH[interact]="Bearer $JWT"
  URL[interact]=http://127.0.0.1:$TP/api/characters/$CHAR_ID/interact
}

cat >"$WORK/taproom.toml" <<EOF
listen = "127.0.0.1:$TP"
# "info" writes one line per request; the floor and the upstream log nothing per request.
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

# ---- the targets ---------------------------------------------------------------------------
JSON_BODY='{"model":"fake-model","messages":[{"role":"user","content":"hello"}]}'
SSE_BODY='{"model":"fake-model","messages":[{"role":"user","content":"hello"}],"stream":true}'
OPENAI_PATH=/v1/chat/completions
declare -A URL AUTH JBODY SBODY HDR
URL[direct]=http://127.0.0.1:$UP$OPENAI_PATH
URL[floor]=http://127.0.0.1:$FLOOR$OPENAI_PATH
URL[taproom]=http://127.0.0.1:$TP$OPENAI_PATH
URL[taproom_id]=${URL[taproom]}
URL[char]=${URL[taproom]}
URL[litellm]=http://127.0.0.1:$LL$OPENAI_PATH
for t in direct floor taproom taproom_id char interact litellm; do
  AUTH[$t]=""; HDR[$t]=""; JBODY[$t]=$JSON_BODY; SBODY[$t]=$SSE_BODY
done
# oha, like browsers, sends accept-encoding: gzip, deflate, br; Taproom then compresses JSON
# replies (the floor and the upstream never do). taproom_id asks for identity to show that cost.
HDR[taproom_id]="accept-encoding: identity"
JBODY[char]='{"model":"char-bench","messages":[{"role":"user","content":"hello"}]}'
SBODY[char]='{"model":"char-bench","messages":[{"role":"user","content":"hello"}],"stream":true}'
JBODY[interact]='{"message":"hello"}'
SBODY[interact]='{"message":"hello","parameters":{"stream":true}}'

start_upstream 20 0
PORT=$FLOOR UPSTREAM=http://127.0.0.1:$UP "$KIT/target/release/mini_proxy" 2>>"$WORK/floor.log" &
STARTED[$!]=floor
start_taproom
wait_http "http://127.0.0.1:$FLOOR/v1/models"

LL_PID=""
if [[ -x $LITELLM/bin/litellm ]]; then
  # shellcheck disable=SC1091
  LL_KEY=$(. "$KIT/litellm-env.sh" && echo "$LITELLM_MASTER_KEY")
  AUTH[litellm]="Bearer $LL_KEY"
  ( . "$KIT/litellm-env.sh"; export LITELLM_MASTER_KEY=$LL_KEY
    exec setsid "$LITELLM/bin/litellm" --config "$KIT/litellm.yaml" --host 127.0.0.1 --port $LL \
      --num_workers 1 ) >>"$WORK/litellm.log" 2>&1 &
  LL_PID=$!; STARTED[$LL_PID]=litellm
  for _ in $(seq 1200); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LL/health/liveliness") == 200 ]] && break
    sleep 0.1
  done
else
  echo "LiteLLM not installed at $LITELLM: skipped" >&2
fi
# LiteLLM is stopped (SIGSTOP) except while it is measured, so it cannot disturb the others.
pause_litellm()  { [[ -z $LL_PID ]] || kill -STOP -- "-$LL_PID"; }
resume_litellm() { [[ -z $LL_PID ]] || kill -CONT -- "-$LL_PID"; }

if [[ -n ${TARGETS:-} ]]; then
  read -ra TARGETS <<<"$TARGETS"
  # direct and the floor are the baselines every added latency and ratio in the report is
  # taken against; a run without them could not be reported.
  for base in floor direct; do
    [[ " ${TARGETS[*]} " == *" $base "* ]] || TARGETS=("$base" "${TARGETS[@]}")
  done
else
  TARGETS=(direct floor taproom taproom_id char interact)
  [[ -n $LL_PID ]] && TARGETS+=(litellm)
fi

# One request of each kind by hand: every target must answer 200 with the expected shape.
for t in "${TARGETS[@]}"; do
  a=(); [[ -n ${AUTH[$t]} ]] && a=(-H "authorization: ${AUTH[$t]}")
  j=$(curl -s -w '\n%{http_code}' "${URL[$t]}" "${a[@]}" -H 'content-type: application/json' -d "${JBODY[$t]}")
  s=$(curl -sN -w '\n%{http_code}' "${URL[$t]}" "${a[@]}" -H 'content-type: application/json' -d "${SBODY[$t]}")
  [[ ${j##*$'\n'} == 200 && ${s##*$'\n'} == 200 ]] || { echo "$t failed: $j / $s" >&2; exit 1; }
  { # (no `| head`: with pipefail, an early-closed pipe would end the script)
    echo "## $t: ${URL[$t]}"
    echo "json: ${j:0:300}"
    echo "sse: $(grep -c '^data:' <<<"$s") data lines; the first two events:"
    awk 'NF && n++ < 4' <<<"$s"
  } >>"$OUT/checks.txt"
done
pause_litellm

# ---- measurement helpers -------------------------------------------------------------------
rss() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; } # pid VmRSS|VmHWM -> kB
ticks_of() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
ours_ticks() { # this script's finished children (the clients) plus the running servers
  local t; t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$$/stat")
  for p in "${!STARTED[@]}"; do
    if [[ ${STARTED[$p]} == litellm ]]; then
      for q in $(pgrep -g "$p"); do t=$((t + $(ticks_of "$q"))); done
    else
      t=$((t + $(ticks_of "$p")))
    fi
  done
  echo "$t"
}
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; } # user nice system irq softirq
wait_quiet() { # until CPU used outside this run stays under QUIET_CORES for 1 s (QUIET_WAIT s at most)
  local deadline=$((SECONDS + QUIET_WAIT)) b0 o0 b1 o1
  while :; do
    b0=$(busy_ticks); o0=$(ours_ticks); sleep 1; b1=$(busy_ticks); o1=$(ours_ticks)
    awk -v x=$(((b1 - b0) - (o1 - o0))) -v q="$QUIET_CORES" 'BEGIN { exit !(x / 100 <= q) }' && return 0
    ((SECONDS < deadline)) || { echo "machine still busy after ${QUIET_WAIT}s; measuring anyway" >&2; return 0; }
  done
}
measure() { # label cmd...: waits for a quiet machine, runs, and repeats (ATTEMPTS at most) while
  # other processes took more than QUIET_CORES; appends "label wall ours other attempt" to cpu.tsv
  local label=$1 attempt b0 o0 s0 b1 o1 s1 other; shift
  for attempt in $(seq "$ATTEMPTS"); do
    wait_quiet
    b0=$(busy_ticks); o0=$(ours_ticks); s0=$(date +%s.%N)
    "$@"
    b1=$(busy_ticks); o1=$(ours_ticks); s1=$(date +%s.%N)
    other=$(awk -v b=$((b1 - b0)) -v o=$((o1 - o0)) -v s="$s0" -v e="$s1" \
      'BEGIN { printf "%.2f", (b - o) / 100 / (e - s) }')
    awk -v l="$label" -v o=$((o1 - o0)) -v s="$s0" -v e="$s1" -v x="$other" -v a="$attempt" \
      'BEGIN { w = e - s; printf "%s\t%.1f\t%.2f\t%s\t%d\n", l, w, o / 100 / w, x, a }' >>"$OUT/cpu.tsv"
    awk -v x="$other" -v q="$QUIET_CORES" 'BEGIN { exit !(x <= q) }' && break
    echo "  $label: $other cores used by other processes; again" >&2
  done
}

run_oha() { # target out [oha args]: a non-streaming case
  local t=$1 out=$2; shift 2
  local a=(); [[ -n ${AUTH[$t]} ]] && a+=(-H "authorization: ${AUTH[$t]}")
  [[ -n ${HDR[$t]} ]] && a+=(-H "${HDR[$t]}")
  "$OHA" --no-tui --output-format json "$@" -m POST -T application/json "${a[@]}" \
    -d "${JBODY[$t]}" "${URL[$t]}" >"$out" 2>/dev/null
}
run_streams() { # target out [bench_streams args]: a streaming case
  local t=$1 out=$2; shift 2
  local a=(); [[ -n ${AUTH[$t]} ]] && a=(--auth "${AUTH[$t]}")
  "$BENCH_STREAMS" "${URL[$t]}" "${a[@]}" --body "${SBODY[$t]}" "$@" >"$out"
}
run_kit_sse() { # target out: the kit's closed-loop SSE client (OpenAI bodies only)
  local t=$1 out=$2 model
  model=$(echo "${SBODY[$t]}" | sed 's/.*"model":"\([^"]*\)".*/\1/')
  MODEL=$model "$KIT/target/release/sse_load" "${URL[$t]}" "$CONC" "$CLOSED_SECS" \
    ${AUTH[$t]:+"${AUTH[$t]}"} >"$out" 2>/dev/null
}

# ---- #9 and #5: overhead -------------------------------------------------------------------
if [[ " $CASES " == *" overhead "* ]]; then
  for r in $(seq "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
      echo "$(date +%T) round $r/$ROUNDS: $t" >&2
      [[ $t == litellm ]] && resume_litellm
      p="$OUT/r${r}_$t"
      run_oha "$t" /dev/null -z 2s -c "$CONC" # warm-up
      measure "r$r $t seq_json" run_oha "$t" "${p}_seq_json.json" -z "${LAT_SECS}s" -c 1
      measure "r$r $t rate_json" run_oha "$t" "${p}_rate_json.json" -z "${LAT_SECS}s" -c "$CONC" \
        -q "$RATE" --latency-correction
      measure "r$r $t c32_json" run_oha "$t" "${p}_c32_json.json" -z "${CLOSED_SECS}s" -c "$CONC"
      if [[ $t != taproom_id ]]; then # SSE is never compressed
        measure "r$r $t seq_sse" run_streams "$t" "${p}_seq_sse.json" --conc 1 --secs "$LAT_SECS"
        measure "r$r $t rate_sse" run_streams "$t" "${p}_rate_sse.json" --rate "$RATE" --secs "$LAT_SECS"
        measure "r$r $t c32_sse" run_streams "$t" "${p}_c32_sse.json" --conc "$CONC" --secs "$CLOSED_SECS"
        [[ $t == interact ]] || measure "r$r $t c32_sse_kit" run_kit_sse "$t" "${p}_c32_sse_kit.txt"
      fi
      [[ $t == litellm ]] && pause_litellm
    done
  done
  echo "taproom RSS after the overhead cases: $(rss "$TP_PID" VmRSS) kB, VmHWM $(rss "$TP_PID" VmHWM) kB" >>"$OUT/machine.txt"
fi

# ---- #6: streams at scale ------------------------------------------------------------------
if [[ " $CASES " == *" streams "* ]]; then
  start_upstream "$CHUNKS" "$CHUNK_DELAY_MS"
  stream_ms=$((CHUNKS * CHUNK_DELAY_MS))
  warm=$(awk -v m="$stream_ms" 'BEGIN { print m / 1000 + 1 }')
  for r in $(seq "$STREAM_ROUNDS"); do
    for t in direct floor taproom char interact; do
      [[ " ${TARGETS[*]} " == *" $t "* ]] || continue
      echo "$(date +%T) streams round $r/$STREAM_ROUNDS: $t" >&2
      # Each Taproom case gets a fresh process and database: its peak is what these streams cost.
      [[ $t == direct || $t == floor ]] || start_taproom
      before=$(rss "$TP_PID" VmRSS)
      echo 5 >"/proc/$TP_PID/clear_refs" # VmHWM := VmRSS, so the peak below is this case's
      measure "s$r $t streams" run_streams "$t" "$OUT/s${r}_$t.json" --conc "$N_STREAMS" \
        --ramp-ms "$stream_ms" --warmup-secs "$warm" --secs "$STREAM_SECS"
      printf '{"rss_before_kb":%s,"vmhwm_kb":%s,"rss_after_kb":%s,"threads":%s}\n' "$before" \
        "$(rss "$TP_PID" VmHWM)" "$(rss "$TP_PID" VmRSS)" \
        "$(awk '$1=="Threads:" {print $2}' "/proc/$TP_PID/status")" >"$OUT/s${r}_${t}_rss.json"
    done
  done
fi

errors=$(grep -ciE 'error|panic' "$WORK/taproom.log" || true)
echo "taproom log lines with error/panic: $errors" >>"$OUT/machine.txt"
[[ $errors == 0 ]] || grep -iE 'error|panic' "$WORK/taproom.log" | sort | uniq -c | sort -rn | awk 'NR <= 5' >>"$OUT/machine.txt"
python3 "$HERE/passthrough_report.py" "$OUT" | tee "$OUT/report.md"
