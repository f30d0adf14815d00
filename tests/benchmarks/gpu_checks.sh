#!/usr/bin/env bash
# The GPU checks of one lent GPU session, in calls that each end within $DEADLINE seconds, the most wanted
# first:
#   1. a smoke test of the CUDA-graph step (ViT-T, 5 steps), then the graph step against the eager one
#      (check_graphs.py: losses of 12 steps, networks after; its last line says passed or FAILED);
#   2. the learning run of issue 23: the `short` profile, ViT-S/8 at 64 px, 50,000 generated images, its
#      epochs sized by bench_learn.py --fit-epochs so that the whole run, the data, the raw-pixel line, the
#      timing steps and every evaluation included, takes at most 5.5 minutes (the issue asks <= 10);
#   3. the loss from the logits against the loss per crop (bench_head_loss.py);
#   4. the step's speed (bench_train.py: variants, profiles, the step before a change, the official code)
#      with the time left.
# The shortened paper recipe was measured stalling on a GPU before (learn-gpu-paper-short.json); set
# PAPER=1 to run it again (1.8 minutes) if the time allows. Results go to $OUT (default /tmp/gpu-checks).
#   bash tests/benchmarks/gpu_checks.sh [OLD_NOTEBOOK.ipynb] [PATH_TO_facebookresearch_dino]
# Steps 1 and 2 alone can take the whole deadline, leaving step 4 nothing. With two calls on one warm machine
# each issue gets its own: PART=speed (1, 3 and 4: issue 26) and then PART=learn (1 and 2: issue 23); in the
# second call GRAPHS=true or GRAPHS=false (the first call's answer) skips the smoke test. PART=all is the
# default: one call, steps 1 to 4 in that order.
# A session's lease is 15 device-minutes, the machine's start (1-3 minutes) included, at most 600 s a call, so
# DEADLINE defaults to what each part may take of it: PART=speed 300 s, PART=learn 390 s (the learning run's
# 5.5 minutes and the start of Python and CUDA; 540 s with the smoke test, GRAPHS unset), PART=all 570 s (it
# then cuts what comes last, usually bench_train, and says so; so does PAPER=1 after a full learning run). A step that fails, runs out of time or is not started because less time is left
# than it needs says so on a line of its own ("FAILED (exit N)", "FAILED (timed out after N s)", "skipped for
# time"), and the script then ends with exit status 1, naming them. Each step's log is written line by line, so
# a call killed at its limit still brings back what its last step printed.
set -u
OUT=${OUT:-/tmp/gpu-checks}; mkdir -p "$OUT"
BEFORE=${1:-}; OFFICIAL=${2:-}; PAPER=${PAPER:-0}; PART=${PART:-all}; GRAPHS=${GRAPHS:-}
case "$PART" in all|learn|speed) ;; *) echo "PART must be all, learn or speed, not '$PART'" >&2; exit 2 ;; esac
case "$PART" in all) default=570 ;; speed) default=300 ;; learn) default=390; [ -z "$GRAPHS" ] && default=540 ;; esac
DEADLINE=${DEADLINE:-$default}
case "$GRAPHS" in ''|true|false) ;; *) echo "GRAPHS must be true, false or unset, not '$GRAPHS'" >&2; exit 2 ;; esac
wants() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
left() {  # seconds until the deadline, at most $1
    local rest=$((DEADLINE - SECONDS)); echo $((rest < $1 ? rest : $1))
}
failed=()
run() {   # run NEED LIMIT LOG COMMAND...: the command under `timeout` LIMIT (or what is left), skipped when
    # less than NEED seconds are left; its status
    local need=$1 limit; limit=$(left "$2"); local log=$3; shift 3
    if [ "$limit" -lt "$need" ]; then
        echo "skipped for time ($limit s left, $need s needed): $*" | tee -a "$log"; failed+=("${log##*/} (skipped)")
        return 1
    fi
    echo "\$ $* (limit $limit s, $(date -u '+%F %T UTC'))" | tee -a "$log"   # what ran, when, in each log
    timeout "$limit" "$@" 2>&1 | { grep --line-buffered -v Warning || true; } | tee -a "$log"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        local why="exit $status"; [ "$status" -eq 124 ] && why="timed out after $limit s"
        echo "FAILED ($why): $*" | tee -a "$log"; failed+=("${log##*/}")
    fi
    return "$status"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
graphs=$GRAPHS
if [ -z "$graphs" ]; then
    graphs=false; : > "$OUT/smoke.txt"; : > "$OUT/check_graphs.txt"   # this call's answer, not an older one's
    run 45 90 "$OUT/smoke.txt" python3 tests/benchmarks/bench_train.py --device cuda --archs vit_tiny --steps 5 \
        --variants graphs --no-profile
    grep -q "graphs .*images/s" "$OUT/smoke.txt" && graphs=true
    if [ "$graphs" = true ] && ! run 30 60 "$OUT/check_graphs.txt" python3 tests/benchmarks/check_graphs.py \
            --device cuda --steps 12; then
        graphs=false   # the graph step did not equal the eager one (or did not finish): the runs go without
    fi
fi
echo "CUDA graphs work: $graphs"
# one learning run at a time: four side by side on one GPU finished no epoch in 280 s (2026-12-04); compile
# off: its first step would cost the timing trainer of --fit-epochs and then the run a minute or more each.
# base_lr=0.0005: the peak learning rate of 5e-4 with which every `short` run on a CPU learned (batch 32), not
# the linear rule's 4e-3 at batch 256, with which the CPU runs stalled (learn-cpu-short-e15-lr4e-3.json at
# batch 32, learn-cpu-short-fit26-b256.json at 256). At 195 steps an epoch, 6 to 20 epochs are as many steps as the
# CPU runs that learned took (1,100-3,900)
wants learn && run 360 390 "$OUT/learn.txt" python3 tests/benchmarks/bench_learn.py --name gpu-short --profile short \
    --images 50000 --bank 20000 --minutes 5.5 --fit-epochs --out "$OUT" --set arch=vit_small batch_size=256 \
    base_lr=0.0005 num_workers=4 compile=false cuda_graphs=$graphs
wants speed && run 30 60 "$OUT/bench_head_loss.txt" python3 tests/benchmarks/bench_head_loss.py --device cuda --batch 256
wants speed && run 60 420 "$OUT/bench_train.txt" python3 tests/benchmarks/bench_train.py --device cuda --steps 15 \
    --variants eager graphs compile+graphs ${BEFORE:+--before "$BEFORE"} ${OFFICIAL:+--official "$OFFICIAL"}
if [ "$PAPER" = 1 ] && wants learn; then
    run 130 150 "$OUT/learn.txt" python3 tests/benchmarks/bench_learn.py --name gpu-paper-short --profile imagenet64 \
        --images 50000 --bank 20000 --minutes 1.8 --out "$OUT" --set epochs=5 num_workers=4 compile=false \
        cuda_graphs=$graphs warmup_epochs=1 warmup_teacher_temp_epochs=2 momentum_teacher=0.996
fi
echo "done in $SECONDS s"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
