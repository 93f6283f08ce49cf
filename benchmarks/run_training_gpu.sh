#!/usr/bin/env bash
# The training reproduction of benchmarks/RESULTS.md ("Training quality") on one GPU or several:
# baseline and SNLP-regularised char-level GPT and MHCGPT (8 x 384, context 256, batch 64, bf16),
# trained side by side, then the validation-perplexity grid of examples/eval_snlp.py over every
# best-validation checkpoint.
#     bash benchmarks/run_training_gpu.sh DATA OUT_DIR
# Knobs (environment): STEPS (default 800), WEIGHTS (regulariser lambdas, default "0.5 2";
# GPT_WEIGHTS and MHC_WEIGHTS override it per model, empty: no regularised run of that model), NPAR
# (default "4 8"), WARMUP (default 100), EXTRA (more train_char_lm.py flags for the regularised runs,
# e.g. "--reg-iters 1 2"; GPT_EXTRA and MHC_EXTRA override it per model), TRAIN_FLAGS (flags for
# every run, e.g. "--compile"), TRAIN_LIMIT (seconds after which a training is stopped and evaluated
# at its best checkpoint so far; default none), BASELINES (0: skip the two unregularised runs, e.g.
# when a run of the same code, steps and seed already measured them; default 1), GPUS (CUDA device
# indices the runs are spread over round-robin, e.g. "0 1 2 3", set as each run's CUDA_VISIBLE_DEVICES
# (not indices into an inherited one); default: the current device), PYTHON. Writes
# OUT_DIR/<run>/{model.pt,metrics.json}, OUT_DIR/eval/{eval.json,frontier.png},
# OUT_DIR/train_summary.txt and the per-run logs. Memory: a regularised MHCGPT run peaked near 31 GiB
# and a GPT one near 17 GiB (n_par 4 8, K 1 2) before the counts K shared their iterations (3 -> 2
# layer evaluations per n_par; not re-measured): four regularised runs did not fit one 80 GB GPU.
# EXTRA="--reg-checkpoint" recomputes the solves in backward and keeps none of their activations.
set -uo pipefail
DATA=${1:?usage: bash benchmarks/run_training_gpu.sh DATA OUT_DIR}
OUT=${2:?usage: bash benchmarks/run_training_gpu.sh DATA OUT_DIR}
# shellcheck source=benchmarks/setup_run.sh
source "$(dirname "$0")/setup_run.sh"
STEPS=${STEPS:-800}
WEIGHTS=${WEIGHTS:-0.5 2}
GPT_WEIGHTS=${GPT_WEIGHTS-$WEIGHTS}
MHC_WEIGHTS=${MHC_WEIGHTS-$WEIGHTS}
TRAIN_LIMIT=${TRAIN_LIMIT:-0}
NPAR=${NPAR:-4 8}
WARMUP=${WARMUP:-100}
EXTRA=${EXTRA:-}
GPT_EXTRA=${GPT_EXTRA-$EXTRA}
MHC_EXTRA=${MHC_EXTRA-$EXTRA}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
BASELINES=${BASELINES:-1}
read -ra GPU_LIST <<<"${GPUS:-}"
# shellcheck disable=SC2206  # TRAIN_FLAGS is a word list
TRAIN=(timeout -s INT "$TRAIN_LIMIT" "$PY" examples/train_char_lm.py --data "$DATA" --device cuda --dtype bfloat16 --batch 64 --seq 256
    --eval-every 100 --steps "$STEPS" $TRAIN_FLAGS)

runs=()
launch() {  # launch NAME ARGS...: one training in the background on the next GPU, logged to OUT/NAME.log
    local name=$1
    shift
    local device=()
    ((${#GPU_LIST[@]})) && device=("CUDA_VISIBLE_DEVICES=${GPU_LIST[${#runs[@]} % ${#GPU_LIST[@]}]}")
    runs+=("$name")
    env "${device[@]}" "${TRAIN[@]}" "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1 &
}
start=$SECONDS
if ((BASELINES)); then
    launch gpt_base --model gpt
    launch mhc_base --model mhc
fi
# shellcheck disable=SC2086  # NPAR and *_EXTRA are word lists
for w in $GPT_WEIGHTS; do
    launch "gpt_reg_w$w" --model gpt --reg-weight "$w" --reg-n-par $NPAR --reg-warmup "$WARMUP" $GPT_EXTRA
done
# shellcheck disable=SC2086
for w in $MHC_WEIGHTS; do
    launch "mhc_reg_w$w" --model mhc --reg-weight "$w" --reg-n-par $NPAR --reg-warmup "$WARMUP" --reg-surrogate hc $MHC_EXTRA
done
wait
{
    echo "trained ${#runs[@]} runs side by side in $((SECONDS - start)) s (STEPS=$STEPS GPT_WEIGHTS=$GPT_WEIGHTS" \
        "MHC_WEIGHTS=$MHC_WEIGHTS NPAR=$NPAR WARMUP=$WARMUP BASELINES=$BASELINES GPT_EXTRA=$GPT_EXTRA" \
        "MHC_EXTRA=$MHC_EXTRA TRAIN_FLAGS=$TRAIN_FLAGS TRAIN_LIMIT=$TRAIN_LIMIT GPUS=${GPU_LIST[*]})"
    for r in "${runs[@]}"; do
        echo "$r: $(grep -o "step [0-9]*: val loss [0-9.]* (ppl [0-9.]*)" "$OUT/$r.log" | sort -k5,5g | head -1) (best)"
    done
} | tee "$OUT/train_summary.txt"
checkpoints=()
for r in "${runs[@]}"; do
    [[ -f "$OUT/$r/model.pt" ]] && checkpoints+=("$OUT/$r/model.pt")
done
"$PY" examples/eval_snlp.py "${checkpoints[@]}" --data "$DATA" --device cuda --dtype bfloat16 --out "$OUT/eval" 2>&1 |
    grep -v Warning
echo "total $((SECONDS - start)) s"
