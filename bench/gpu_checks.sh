#!/usr/bin/env bash
# The standing GPU checks in one script, for a session that is lent a GPU for a few minutes: each check has its
# own time limit, so one that hangs or runs long leaves the others' results. Everything goes to OUT (default
# gpu_checks/), one file per check, and each check's JSON lines are what docs/performance.md's tables take.
#
#     bash bench/gpu_checks.sh [OUT]                # on the GPU machine: about 9 minutes
#     DEVICE=cpu SIZE=small bash bench/gpu_checks.sh /tmp/dry   # the same commands on a CPU: that each starts
#                                                              # (bf16 is slow there: most run into their limits)
#
# 1 eager table, bf16 and fp32: every step (sup, mean teacher +- ReCo, FixMatch, UniMatch +- ReCo), s/iter, peak
#   memory, host launches, kernels, GPU busy time, and the host-sync check (target: semisup+reco bf16 at most
#   0.10 s/iter and 5.4 GiB)
# 2 --deterministic's cost: the mean teacher + ReCo and UniMatch + ReCo steps with deterministic kernels only
# 3 --compile modes on the mean teacher + ReCo step, bf16 (each mode compiles for a minute or two)
# 4 prediction speed (bench/predict.py)
set -u
export PYTHONUNBUFFERED=1  # a check stopped at its limit keeps the lines it printed
OUT=${1:-gpu_checks}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-pascal}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 1  # absolute, so the cd below keeps it where it was meant
cd "$(dirname "$0")/.."

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, output to OUT/NAME.txt, exit code noted
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python -c "import torch; print(torch.__version__)"; } \
    >"$OUT/machine.txt" 2>&1
check eager 180 python bench/train_step.py --device "$DEVICE" --size "$SIZE" --amp bf16 off --compile off \
    --sync_check --kernels
check deterministic 90 python bench/train_step.py --device "$DEVICE" --size "$SIZE" --amp bf16 --compile off \
    --configs semisup+reco unimatch+reco --deterministic
check compile 240 python bench/train_step.py --device "$DEVICE" --size "$SIZE" --amp bf16 \
    --configs semisup+reco --compile off default reduce-overhead
check predict 60 python bench/predict.py --device "$DEVICE" --amp off bf16 --images 64 --num_workers 8
echo "results in $OUT/"
