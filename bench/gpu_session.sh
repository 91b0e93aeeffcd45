#!/bin/bash
# One GPU session as one command (issues 8 and 13), over a folder that `bench_gpu.py pack` wrote:
#   here:  python bench/bench_gpu.py pack --data DATA_DIR --to .devdata   (.devdata ignored, ~62 MB)
#   there: bash bench/gpu_session.sh .devdata 2>&1 | tee $OUT/log.txt     (device tool: carry .devdata)
# Steps, each cut at a deadline so that the whole fits BUDGET seconds (default 585, under a 600 s call):
#   1. a CUDA smoke of the curve (1,000 rows, every 60th date): stops the session at once if it fails;
#   2. Llama-3-8B architecture, the gpu profile's adapters and head (`--former`: session x's r=16 and
#      1024-256 head), 256 tokens: tokens/s, MFU, peak memory, for each variant of
#      L8 ('|'-separated option sets; default: batch 16 as measured, then the routes at MFU >= 40% and
#      <= 40 GB: batch 32, checkpointing in 8 of 32 layers at batch 16 and 32, torch.compile);
#   3. the gpu profile's learning curve, the LLM's half (SIZES, default 24000: one seed of each size
#      first, then seeds 1-2 at 24k; OVERRIDE='learning_rate=2e-4' trains a candidate gpu profile),
#      each record copied to $OUT/curve-gpu as it finishes;
#   4. (L8_AFTER, default none) more Llama-3-8B variants if time is left, e.g. '--grad-ckpt'.
# The default is the 8B throughput session (the unmet MFU and memory targets) plus the curve's 24k point
# (about 2 minutes: 1,514 steps at about 43 ms and 208,590 rows scored). The profile's two passes make
# 96k rows about 5 minutes more and every row about 17, so the curve at 24k and 96k is a session of its
# own: `L8= SIZES=24000,96000 bash bench/gpu_session.sh .devdata` (about 8 minutes with the smoke).
# Back here: copy $OUT/curve-gpu/*.json to bench/runs/curve-gpu/ and run the command the curve printed
# after its last finished run, e.g.
#   python bench/bench_regressor.py curve --profile gpu --epochs 2 --sizes 24000 --seeds 1
# (--epochs: the profile's passes, part of the records' keys; --override "$OVERRIDE" for a candidate,
# paired with the profile's own runs of the same seeds), which fits ridge and the feature MLP on the same
# rows and writes the BENCHMARKS.md section.
DATA=${1:-.devdata}
BUDGET=${BUDGET:-585}
# empty: no curve. 96k and every row are not in the default (above)
SIZES=${SIZES-24000}
CURVE_S=${CURVE_S:-170}  # seconds the 8B variants leave for the curve (24k: about 110 s plus start-up)
L8=${L8-"|--batch 32|--ckpt-layers 8|--ckpt-layers 8 --batch 32|--compile"}
L8_AFTER=${L8_AFTER:-}
RESERVE=${L8_AFTER:+65}  # seconds the curve leaves for L8_AFTER
RESERVE=${RESERVE:-0}
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
llama8b() {  # one variant per '|'-separated option set ($2), each cut at $1 s, keeping $3 s of the budget
    local variants variant opts limit
    IFS='|' read -r -a variants <<<"$2"
    for variant in "${variants[@]}"; do
        read -r -a opts <<<"$variant"
        limit=$(($(left "$BUDGET") - $3))
        [ "$limit" -gt "$1" ] && limit=$1
        if [ "$limit" -lt 30 ]; then echo "== llama8b ${variant:-(batch 16)}: skipped, no time left"; continue; fi
        echo "== llama8b ${variant:-(batch 16)} $(date +%T)"
        OUT=/tmp/l8 timeout "$limit" python3 bench/bench_gpu.py llama8b "${opts[@]}" 2>&1 | quiet | tail -6
    done
    mkdir -p "${OUT:-/tmp/out}/llama8b" && cp /tmp/l8/*.json "${OUT:-/tmp/out}/llama8b/" 2>/dev/null
}
[ -n "$L8" ] && llama8b 120 "$L8" "$([ -n "$SIZES" ] && echo "$CURVE_S" || echo 0)"
if [ -n "$SIZES" ]; then
    echo "== curve $(date +%T)"
    timeout "$(left $((BUDGET - RESERVE)))" python3 bench/bench_gpu.py curve --data "$DATA" --sizes "$SIZES" \
        --work /tmp/curve ${OVERRIDE:+--override "$OVERRIDE"} 2>&1 | quiet
    echo "curve rc=${PIPESTATUS[0]} $(date +%T)"
fi
[ -n "$L8_AFTER" ] && llama8b 600 "$L8_AFTER" 0
echo "== end $(date +%T), $(left "$BUDGET") s of the budget left"
