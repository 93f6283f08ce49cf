#!/usr/bin/env bash
# Every GPU benchmark of the SNLP issue (decode and forward, d20 and paper-0.5b, bf16, batch 1) in
# about 8 minutes on one H100/H200:   bash benchmarks/run_gpu.sh OUT_DIR
# Writes OUT_DIR/{decode,forward}.{json,png}, frontier.png, results.md and log.txt. Each script
# starts no new variant once its per-preset budget is spent and is killed at a hard limit; the JSONs
# are rewritten after every row, so a cut run keeps what it measured. Knobs (environment):
# GRID (headline | minimal | full), BATCH ("1" or e.g. "1 4"), DECODE_BUDGET / FORWARD_BUDGET
# (seconds per preset), PYTHON.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
GRID=${GRID:-headline}
BATCH=${BATCH:-1}
DECODE_BUDGET=${DECODE_BUDGET:-100}
FORWARD_BUDGET=${FORWARD_BUDGET:-100}

run() {  # run BUDGET SCRIPT ARGS...: hard limit = 2 presets x budget + 120 s for the last compile
    local budget=$1 script=$2
    shift 2
    echo "== $(date +%T) $PY $script $*"
    timeout -k 10 $((2 * budget + 120)) "$PY" "$script" "$@" --grid "$GRID" --batch $BATCH --budget-s "$budget" --out "$OUT"
    echo "== $(date +%T) exit $?"
}

{
    echo "== $(date +%T) bash benchmarks/run_gpu.sh $*  (GRID=$GRID BATCH=$BATCH)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    run "$DECODE_BUDGET" benchmarks/bench_decode.py --preset d20 paper-0.5b --context 512
    run "$FORWARD_BUDGET" benchmarks/bench_forward.py --preset paper-0.5b d20 --seq-len 2048
    "$PY" benchmarks/frontier.py --inputs "$OUT/forward.json" "$OUT/decode.json" --out "$OUT"
    echo "== $(date +%T) done"
} 2>&1 | tee "$OUT/log.txt"
