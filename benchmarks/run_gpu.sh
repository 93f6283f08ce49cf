#!/usr/bin/env bash
# Every GPU benchmark (decode and forward, d20 and paper-0.5b, bf16, batch 1) in
# about 8 minutes on one H100/H200:   bash benchmarks/run_gpu.sh OUT_DIR
# Writes OUT_DIR/{decode,forward,eager_interleaved}.{json,png}, speculative.json, frontier.png,
# results.md and log.txt. Each script starts no new variant once its per-preset budget is spent and
# is killed at a hard limit that also keeps the whole run within TOTAL seconds; the JSONs are
# rewritten after every row, so a cut run keeps what it measured. Knobs (environment): GRID (headline | minimal | full), BATCH ("1" or
# e.g. "1 4"), DECODE_BUDGET / FORWARD_BUDGET (seconds per preset), TOTAL (seconds), EXTRA (more
# flags for the decode and forward scripts, e.g. "--max-autotune baseline": the autotuned sequential
# baseline, the best one for decode, at 75-115 s more compile per preset; raise the budgets), PYTHON.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
# shellcheck source=benchmarks/setup_run.sh
source "$(dirname "$0")/setup_run.sh"
GRID=${GRID:-headline}
BATCH=${BATCH:-1}
DECODE_BUDGET=${DECODE_BUDGET:-120}
FORWARD_BUDGET=${FORWARD_BUDGET:-75}
TOTAL=${TOTAL:-510}
EXTRA=${EXTRA:-}

run() {  # run BUDGET SCRIPT ARGS...: killed after 2 presets x BUDGET + 120 s, or when TOTAL is near
    local budget=$1 script=$2 limit rc
    shift 2
    limit=$((2 * budget + 120))
    ((limit > TOTAL - SECONDS - 15)) && limit=$((TOTAL - SECONDS - 15))
    echo "== $(date +%T) $PY $script $* (hard limit ${limit} s)"
    # shellcheck disable=SC2086  # BATCH and EXTRA are word lists
    timeout -k 10 "$limit" "$PY" "$script" "$@" --grid "$GRID" --batch $BATCH --budget-s "$budget" --out "$OUT" $EXTRA
    rc=$?
    echo "== $(date +%T) exit $rc"
}

{
    echo "== $(date +%T) bash benchmarks/run_gpu.sh $*  (GRID=$GRID BATCH=$BATCH TOTAL=$TOTAL)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    run "$DECODE_BUDGET" benchmarks/bench_decode.py --preset d20 paper-0.5b --context 512
    run "$FORWARD_BUDGET" benchmarks/bench_forward.py --preset paper-0.5b d20 --seq-len 2048
    timeout -k 10 $((TOTAL - SECONDS > 105 ? 90 : 15)) "$PY" benchmarks/bench_eager_interleaved.py --preset paper-0.5b --out "$OUT"
    timeout -k 10 $((TOTAL - SECONDS > 30 ? TOTAL - SECONDS - 15 : 15)) "$PY" benchmarks/bench_speculative.py \
        --preset d20 --context 512 --new-tokens 64 --out "$OUT"
    "$PY" benchmarks/frontier.py --inputs "$OUT/forward.json" "$OUT/decode.json" --out "$OUT"
    echo "== $(date +%T) done after ${SECONDS} s"
} 2>&1 | tee "$OUT/log.txt"
