#!/usr/bin/env bash
# The training runs of benchmarks/RESULTS.md ("Training quality") on one GPU or several: baseline and
# SNLP-regularised GPT and MHCGPT trained side by side, then the validation-perplexity grid of
# examples/eval_snlp.py over every best-validation checkpoint.
#     bash benchmarks/run_training_gpu.sh DATA OUT_DIR
#     bash benchmarks/run_training_gpu.sh --copy-data   # ../shared/data/python-stdlib-{train,val}.txt -> data/
# Default runs: char level, 8 x 384, context 256, batch 64, bf16. DEEP=1: the 32-layer byte-level GPT on real
# code (25M parameters, 32 x 256, 4 heads, vocab 256, context 512, batch 32), its baseline and one regularised
# run side by side on one GPU; DATA is data/python-stdlib-train.txt after --copy-data (data/ is git-ignored:
# take it along to the GPU machine). DEEP=1 sets (each knob below still overrides it): MODELS=gpt GPT_WEIGHTS=4
# NPAR="16 32" EXTRA="--reg-iters 1 2" WARMUP=150 STEPS=1000 VAL_DATA=data/python-stdlib-val.txt
# TRAIN_LIMIT=570, TRAIN_FLAGS="--vocab 256 --n-layer 32 --n-embd 256 --n-head 4 --seq 512 --batch 32
# --eval-batches 16 --lr-warmup 100 --patience 6 --time-limit 510 --resume", EVAL_FLAGS="--batch 32 --seq 512
# --eval-batches 16 --speed --time-limit 420" EVAL_LIMIT=560. STAGES=train then STAGES=eval are meant for one
# 10-minute call each: an estimate, not a measurement (a baseline step near 70 ms, a regularised one near 300
# ms: 1000 steps of both in about 400 s). A run the time limit stopped says so in train_summary.txt;
# STAGES=train again continues it (--resume; a finished run does nothing). Checkpoints stay in OUT_DIR: the eval
# and resumed calls need the machine that wrote them, or a copy of OUT_DIR (COPY_TO receives no checkpoints).
# Knobs (environment): STEPS (default 800), WEIGHTS (regulariser lambdas, default "0.5 2"; GPT_WEIGHTS and
# MHC_WEIGHTS override it per model, empty: no regularised run of that model), NPAR (default "4 8"), WARMUP
# (default 100), EXTRA (more train_char_lm.py flags for the regularised runs, e.g. "--reg-iters 1 2"; GPT_EXTRA
# and MHC_EXTRA override it per model), TRAIN_FLAGS (flags for every run, after the defaults, e.g. "--compile"),
# TRAIN_LIMIT (seconds after which a training is interrupted (SIGINT) and evaluated at its best checkpoint so
# far; default none), BASELINES (0: skip the unregularised runs, e.g. when a run of the same code, steps and
# seed already measured them; default 1), MODELS (default "gpt mhc"), VAL_DATA (a validation file for training
# and evaluation: then all of DATA trains), STAGES (default "train eval"; "eval" evaluates the runs' existing
# model.pt), EVAL_FLAGS (more eval_snlp.py flags), EVAL_LIMIT (seconds after which the evaluation is interrupted
# (SIGINT): the speed measured so far is kept; default none), COPY_TO (a folder that receives results.tar.gz:
# OUT_DIR without checkpoints; and train_summary.txt, eval.md, frontier.png), EXPORT_RUN (with COPY_TO: that run's
# model.pt in bf16 parts of <= 15 MiB, COPY_TO/EXPORT_RUN/model.pt.partNN + .sha256, to carry to a later machine and
# rebuild with `python3 benchmarks/checkpoint_parts.py join DIR OUT_DIR/EXPORT_RUN/model.pt`), GPUS (CUDA device indices the runs
# are spread over round-robin, e.g. "0 1 2 3", set as each run's CUDA_VISIBLE_DEVICES (not indices into an
# inherited one); default: the current device), PYTHON. Writes OUT_DIR/<run>/{model.pt,last.pt,metrics.json},
# OUT_DIR/eval/{eval.json,eval.md,frontier.png}, OUT_DIR/train_summary.txt and the logs. Memory: a regularised
# 8-layer MHCGPT run peaked near 31 GiB and a GPT one near 17 GiB (n_par 4 8, K 1 2) before the counts K shared
# their iterations (3 -> 2 layer evaluations per n_par; not re-measured): four regularised runs did not fit one
# 80 GB GPU. EXTRA="--reg-checkpoint" recomputes the solves in backward and keeps none of their activations.
set -uo pipefail
if [[ ${1:-} == --copy-data ]]; then
    cd "$(dirname "$0")/.." && install -D -m 644 -t data ../shared/data/python-stdlib-{train,val}.txt && ls -l data
    exit
fi
DATA=${1:?usage: bash benchmarks/run_training_gpu.sh DATA OUT_DIR}
OUT=${2:?usage: bash benchmarks/run_training_gpu.sh DATA OUT_DIR}
# shellcheck source=benchmarks/setup_run.sh
source "$(dirname "$0")/setup_run.sh"
if [[ ${DEEP:-0} == 1 ]]; then
    : "${MODELS=gpt}" "${GPT_WEIGHTS=4}" "${NPAR=16 32}" "${EXTRA=--reg-iters 1 2}" "${WARMUP=150}" "${STEPS=1000}"
    : "${VAL_DATA=data/python-stdlib-val.txt}" "${TRAIN_LIMIT=570}"
    deep="--vocab 256 --n-layer 32 --n-embd 256 --n-head 4 --seq 512 --batch 32 --eval-batches 16 --lr-warmup 100"
    : "${TRAIN_FLAGS=$deep --patience 6 --time-limit 510 --resume}"
    : "${EVAL_FLAGS=--batch 32 --seq 512 --eval-batches 16 --speed --time-limit 420}" "${EVAL_LIMIT=560}"
fi
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
EVAL_FLAGS=${EVAL_FLAGS:-}
BASELINES=${BASELINES:-1}
MODELS=${MODELS:-gpt mhc}
STAGES=${STAGES:-train eval}
VAL=()
[[ -n ${VAL_DATA:-} ]] && VAL=(--val-data "$VAL_DATA")
read -ra GPU_LIST <<<"${GPUS:-}"
# shellcheck disable=SC2206  # TRAIN_FLAGS is a word list
TRAIN=(timeout -s INT "$TRAIN_LIMIT" "$PY" examples/train_char_lm.py --data "$DATA" "${VAL[@]}" --device cuda
    --dtype bfloat16 --batch 64 --seq 256 --eval-every 100 --steps "$STEPS" $TRAIN_FLAGS)

names=()
declare -A flags surrogate=([gpt]="" [mhc]="--reg-surrogate hc") weights=([gpt]=$GPT_WEIGHTS [mhc]=$MHC_WEIGHTS)
declare -A extra=([gpt]=$GPT_EXTRA [mhc]=$MHC_EXTRA)
plan() {  # plan NAME FLAGS...: a run of this invocation
    names+=("$1")
    flags[$1]=${*:2}
}
for model in $MODELS; do
    ((BASELINES)) && plan "${model}_base" --model "$model"
    for w in ${weights[$model]}; do
        plan "${model}_reg_w$w" --model "$model" --reg-weight "$w" --reg-n-par $NPAR --reg-warmup "$WARMUP" \
            ${surrogate[$model]} ${extra[$model]}
    done
done

start=$SECONDS
if [[ " $STAGES " == *" train "* ]]; then
    for i in "${!names[@]}"; do  # one training per run in the background, on the next GPU, logged to OUT/NAME.log
        device=()
        ((${#GPU_LIST[@]})) && device=("CUDA_VISIBLE_DEVICES=${GPU_LIST[i % ${#GPU_LIST[@]}]}")
        # shellcheck disable=SC2086  # the planned flags are a word list
        env "${device[@]}" "${TRAIN[@]}" ${flags[${names[i]}]} --out "$OUT/${names[i]}" >>"$OUT/${names[i]}.log" 2>&1 &
    done
    wait
    {
        echo "trained ${#names[@]} runs side by side in $((SECONDS - start)) s (STEPS=$STEPS MODELS=$MODELS" \
            "GPT_WEIGHTS=$GPT_WEIGHTS MHC_WEIGHTS=$MHC_WEIGHTS NPAR=$NPAR WARMUP=$WARMUP BASELINES=$BASELINES" \
            "GPT_EXTRA=$GPT_EXTRA MHC_EXTRA=$MHC_EXTRA TRAIN_FLAGS=$TRAIN_FLAGS TRAIN_LIMIT=$TRAIN_LIMIT" \
            "VAL_DATA=${VAL_DATA:-} GPUS=${GPU_LIST[*]})"
        for r in "${names[@]}"; do
            best=$(grep -o "step [0-9]*: val loss [0-9.]* (ppl [0-9.]*)" "$OUT/$r.log" | sort -k5,5g | head -1)
            echo "$r: $best (best); $(grep -o "step [0-9]*: stopped ([a-z_]*)" "$OUT/$r.log" | tail -1)"
        done
    } | tee -a "$OUT/train_summary.txt"
fi
if [[ " $STAGES " == *" eval "* ]]; then
    checkpoints=()
    for r in "${names[@]}"; do
        [[ -f "$OUT/$r/model.pt" ]] && checkpoints+=("$OUT/$r/model.pt") || echo "no checkpoint $OUT/$r/model.pt"
    done
    # shellcheck disable=SC2086  # EVAL_FLAGS is a word list
    ((${#checkpoints[@]})) && timeout -s INT "${EVAL_LIMIT:-0}" "$PY" examples/eval_snlp.py "${checkpoints[@]}" \
        --data "$DATA" "${VAL[@]}" --device cuda --dtype bfloat16 $EVAL_FLAGS --out "$OUT/eval" 2>&1 |
        grep -v Warning | tee "$OUT/eval.log"
fi
echo "total $((SECONDS - start)) s"
if [[ -n ${COPY_TO:-} ]]; then
    mkdir -p "$COPY_TO"
    tar czf "$COPY_TO/results.tar.gz" -C "$OUT" --exclude='*.pt' --exclude='*.tmp' .
    cp "$OUT"/train_summary.txt "$OUT"/eval/eval.md "$OUT"/eval/frontier.png "$COPY_TO"/ 2>/dev/null
    if [[ -n ${EXPORT_RUN:-} ]]; then
        "$PY" benchmarks/checkpoint_parts.py split "$OUT/$EXPORT_RUN/model.pt" "$COPY_TO/$EXPORT_RUN"
    fi
    ls -l "$COPY_TO"
fi
