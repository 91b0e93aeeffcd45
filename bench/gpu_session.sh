#!/bin/bash
# One GPU session as one command (issues 8 and 13), over a folder that `bench_gpu.py pack` wrote:
#   here:  python bench/bench_gpu.py pack --data DATA_DIR --to .devdata   (.devdata ignored, ~62 MB)
#   there: bash bench/gpu_session.sh .devdata 2>&1 | tee $OUT/log.txt     (device tool: carry .devdata)
# Steps, each cut at a deadline so that the whole fits BUDGET seconds (default 585, under a 600 s call):
#   1. a CUDA smoke of the curve (1,000 rows, every 60th date): stops the session at once if it fails;
#   2. Llama-3-8B architecture, LoRA r=16, batch 16 x 256: tokens/s, MFU, peak memory;
#   3. the gpu profile's learning curve, the LLM's half (SIZES, default 24000,96000,all: one seed of each
#      size first, then seeds 1-2 at 24k; OVERRIDE='learning_rate=1e-3' trains a candidate gpu profile),
#      each record copied to $OUT/curve-gpu as it finishes;
#   4. the same Llama-3-8B step with activation checkpointing.
# Back here: copy $OUT/curve-gpu/*.json to bench/out/curve-gpu/ and run
#   python bench/bench_regressor.py curve --profile gpu --sizes <the sizes that finished> --seeds 1
# (with --override "$OVERRIDE" for a candidate: paired with the profile's own runs of the same seeds)
# which fits ridge and the feature MLP on the same rows and writes the BENCHMARKS.md section.
DATA=${1:-.devdata}
BUDGET=${BUDGET:-585}
SIZES=${SIZES:-24000,96000,all}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1
T0=$(date +%s)
left() { echo $(($1 - ($(date +%s) - T0))); }
quiet() { grep -v "Warn\|warn\|UNEXPECTED\|^$\|Notes\|can be ignored\|lm_head\|Loading weights\|LOAD REPORT\|^Key\|^---"; }
nvidia-smi -L
python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
echo "== smoke $(date +%T)"
OUT=/tmp/smoke timeout 150 python3 bench/bench_gpu.py curve --data "$DATA" --sizes 1000 --seeds 1 \
    --date-step 60 --work /tmp/smoke-work >/tmp/smoke.log 2>&1
rc=$?
quiet </tmp/smoke.log | tail -25
echo "smoke rc=$rc"
[ $rc = 0 ] || exit 3
echo "== llama8b $(date +%T)"
OUT=/tmp/l8 timeout 150 python3 bench/bench_gpu.py llama8b 2>&1 | quiet | tail -12
cat /tmp/l8/*.json
echo "== curve $(date +%T)"
timeout "$(left $((BUDGET - 65)))" python3 bench/bench_gpu.py curve --data "$DATA" --sizes "$SIZES" \
    --work /tmp/curve ${OVERRIDE:+--override "$OVERRIDE"} 2>&1 | quiet
echo "curve rc=${PIPESTATUS[0]} $(date +%T)"
echo "== llama8b grad-ckpt $(date +%T)"
OUT=/tmp/l8c timeout "$(left "$BUDGET")" python3 bench/bench_gpu.py llama8b --grad-ckpt 2>&1 | quiet | tail -12
cat /tmp/l8c/*.json
echo "== end $(date +%T), $(left "$BUDGET") s of the budget left"
