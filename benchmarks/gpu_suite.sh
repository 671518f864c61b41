#!/usr/bin/env bash
# Every performance figure of BENCHMARKS.md in one call.
#
#   bash benchmarks/gpu_suite.sh            # one GPU, the published shapes (1.78B), about 20-25 minutes
#   bash benchmarks/gpu_suite.sh --cpu      # a CPU, small shapes: the same scripts, so regressions show without a GPU
#   bash benchmarks/gpu_suite.sh --dry-run  # print the commands only
#   bash benchmarks/gpu_suite.sh --only sampling,train --budget 540   # a subset, inside 9 minutes
#   bash benchmarks/gpu_suite.sh --only curate,evaluate,train --batches 128 --compile-ab --budget 540
#
# GPU mode, in this order (each step under its own time limit, so the suite ends in time even
# when one step does not):
#   1. sampling   benchmarks.sampling_bench, g3m shapes, batch 64, top-10 and top-100, KV-cached vs recompute
#   2. evaluation benchmarks.evaluate_bench, g3m shapes, batch 64, 5000 images, 1 predictor actor
#   3. curate     benchmarks.curate_bench --clip-only: CLIP scoring (ViT-B/32 shapes) through the
#                 curation job's actor on the GPU, 1024 samples, batch 256, 1, 4 and 8 decode threads
#   4. training   benchmarks.train_bench --shapes g3m (1.78B, the paper's freezing policy), 1 rank,
#                 batch 16, then 32, 64, 128 until one runs out of memory: the largest that ran is
#                 the largest that fits (of those); --batches picks the list; --compile-ab then runs
#                 the largest batch that ran again with torch.compile of each block (A/B, same machine)
# Results: benchmarks/results/suite_<cuda|cpu>/ (each benchmark's JSON / Markdown, suite.log, and
# summary.md: the rows for BENCHMARKS.md), also copied into $OUT when that variable is set.
# Needs the project's Python environment and LLaMA-2's tokenizer.model ($NXTP_TOKENIZER, default
# assets/llama2_tokenizer.model; without it, `python -m benchmarks.stand_in_tokenizer FILE` writes a
# stand-in of the same size). $PYTHON picks the interpreter (default: python); $NXTP_EMBEDDING_MODEL, when
# set, is the evaluation job's --embedding-model (a sentence-transformers folder). --budget S caps the
# whole suite: each step's limit is cut to the time left, and the batch sweep stops early.
set -uo pipefail

usage() {
    echo "usage: benchmarks/gpu_suite.sh [--cpu] [--dry-run] [--only sampling,evaluate,train,curate] [--budget SECONDS] [--batches '16 32 64 128'] [--compile-ab]" >&2
    echo "  --cpu      small shapes on the CPU (no GPU needed)" >&2
    echo "  --dry-run  print the commands without running them" >&2
    echo "  --only     run only these steps, in the suite's order (default: all four)" >&2
    echo "  --budget   seconds for the whole suite (default 1500)" >&2
    echo "  --batches  GPU training batches, smallest first (default '16 32 64 128'; stops at the first that does not fit)" >&2
    echo "  --compile-ab  GPU: also train the largest batch that ran with torch.compile" >&2
}

MODE=cuda
DRY=0
ONLY=sampling,evaluate,train,curate
BUDGET=1500
BATCHES="16 32 64 128"
COMPILE_AB=0
ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --dry-run) DRY=1 ;;
        --only) ONLY=${2:?--only needs a list}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --batches) BATCHES=${2:?--batches needs a list}; shift ;;
        --compile-ab) COMPILE_AB=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage; exit 2 ;;
    esac
    shift
done
for b in $BATCHES; do
    [[ "$b" =~ ^[1-9][0-9]*$ ]] || { echo "--batches: not a positive number: $b" >&2; usage; exit 2; }
done
for s in ${ONLY//,/ }; do
    case "$s" in sampling | evaluate | train | curate) ;; *) echo "unknown step in --only: $s" >&2; usage; exit 2 ;; esac
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
export NXTP_TOKENIZER=${NXTP_TOKENIZER:-assets/llama2_tokenizer.model}
RES=benchmarks/results/suite_$MODE
STARTED=$(date +%s)
FAILED=0

say() { echo "[suite $(date +%H:%M:%S)] $*"; }

# step NAME LIMIT_S COMMAND...: run COMMAND with a time limit, its output in $RES/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    echo "\$ $*"
    [ "$DRY" = 1 ] && return 0
    local left=$((BUDGET - ($(date +%s) - STARTED) - 20))
    if [ "$left" -lt 60 ]; then
        say "$name: skipped (${left}s of the --budget left)"
        return 3
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    say "$name: start (limit ${limit}s)"
    timeout --signal=INT --kill-after=30 "$limit" "$@" > "$RES/$name.log" 2>&1
    local code=$?
    tail -n 5 "$RES/$name.log"
    if [ -n "${OUT:-}" ]; then  # what is done comes back even if a later step is cut short
        mkdir -p "$OUT/suite_$MODE" && cp -r "$RES/." "$OUT/suite_$MODE/"
    fi
    if [ "$code" = 0 ]; then
        say "$name: done in $(($(date +%s) - STARTED))s since the start"
    else
        say "$name: FAILED (exit $code$([ "$code" = 124 ] && echo ', time limit'))"
    fi
    return "$code"
}

if [ "$DRY" = 0 ]; then
    if [ ! -f "$NXTP_TOKENIZER" ]; then
        echo "error: no LLaMA-2 tokenizer at $NXTP_TOKENIZER: set NXTP_TOKENIZER" >&2
        exit 2
    fi
    if [ "$MODE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA device visible to torch: run with --cpu for the small-shape suite" >&2
        exit 2
    fi
    rm -rf "$RES"
    mkdir -p "$RES"
    exec > >(tee "$RES/suite.log") 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    [ "$MODE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [ "$MODE" = cuda ]; then
    if wants sampling; then
        step sampling 420 "$PY" -m benchmarks.sampling_bench --device cuda --config g3m --batch 64 --ks 10 100 --repeats 3 \
            --out "$RES/sampling_cuda_g3m.json" || FAILED=1
    fi
    if wants evaluate; then
        step evaluate 540 "$PY" -m benchmarks.evaluate_bench --device cuda --config g3m --batch 64 --images 5000 --actors 1 \
            --model-only-images 1280 --workdir .cache/evaluate_bench_g3m --out "$RES/evaluate_cuda_g3m" \
            ${NXTP_EMBEDDING_MODEL:+--embedding-model "$NXTP_EMBEDDING_MODEL"} || FAILED=1
    fi
    if wants curate; then
        step curate 240 "$PY" -m benchmarks.curate_bench --clip-only --clip-images 1024 --clip-batch 256 --clip-threads 1 4 8 \
            --out "$RES/curate_clip_cuda.json" || FAILED=1
    fi
    if wants train; then
        FITS=""
        for batch in $BATCHES; do
            if [ -n "$FITS" ] && [ "$DRY" = 0 ] && [ $((BUDGET - ($(date +%s) - STARTED))) -lt 360 ]; then
                say "train_b$batch: skipped (less than 6 minutes of the --budget left)"
                break
            fi
            if [ -z "$FITS" ]; then  # the first batch: more steps, and no sweep after it fails
                step "train_b$batch" 360 "$PY" -m benchmarks.train_bench --shapes g3m --ranks 1 --batch "$batch" --steps 60 --skip 20 --log-every 5 \
                    --out "$RES/train_b$batch" || { FAILED=1; break; }
            elif ! step "train_b$batch" 300 "$PY" -m benchmarks.train_bench --shapes g3m --ranks 1 --batch "$batch" --steps 40 --skip 15 --log-every 4 \
                --out "$RES/train_b$batch"; then
                grep -qiE "out of memory|OutOfMemoryError" "$RES/train_b$batch.log" 2>/dev/null && say "batch $batch does not fit" || FAILED=1
                break
            fi
            FITS=$batch
        done
        if [ "$COMPILE_AB" = 1 ] && [ -n "$FITS" ]; then
            step "train_b${FITS}_compile" 420 "$PY" -m benchmarks.train_bench --shapes g3m --ranks 1 --batch "$FITS" --steps 40 --skip 15 --log-every 4 \
                --compile --out "$RES/train_b${FITS}_compile" || FAILED=1
        fi
    fi
else
    if wants sampling; then
        step sampling 900 "$PY" -m benchmarks.sampling_bench --device cpu --config small --batch 4 --ks 10 100 --repeats 2 \
            --recompute-batch 1 --out "$RES/sampling_cpu_small.json" || FAILED=1
    fi
    if wants evaluate; then
        step evaluate 900 "$PY" -m benchmarks.evaluate_bench --device cpu --config small --batch 16 --images 240 --actors 1 \
            --model-only-images 80 --workdir .cache/evaluate_bench_small --out "$RES/evaluate_cpu_small" || FAILED=1
    fi
    if wants train; then
        step train 900 "$PY" -m benchmarks.train_bench --steps 60 --skip 20 --out "$RES/train" || FAILED=1
    fi
    if wants curate; then
        step curate 600 "$PY" -m benchmarks.curate_bench --clip-only --clip-images 128 --clip-batch 32 --clip-threads 1 2 \
            --out "$RES/curate_clip_cpu.json" || FAILED=1
    fi
fi

[ "$DRY" = 1 ] && exit 0
"$PY" -m benchmarks.suite_report "$RES" --command "bash benchmarks/gpu_suite.sh $ARGS" || FAILED=1
say "total $(($(date +%s) - STARTED))s; results in $RES"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/suite_$MODE"
    cp -r "$RES/." "$OUT/suite_$MODE/"
    say "copied to $OUT/suite_$MODE"
fi
exit "$FAILED"
