#!/usr/bin/env bash
# The GPU checks of one lent GPU session, in one call of about 8 minutes: a smoke test of the CUDA-graph
# step, two learning runs (bench_learn.py: the paper's recipe shortened, and the `short` profile; ViT-S/8,
# 64 px, 50,000 generated images, 5 epochs), the loss from the logits against the loss per crop
# (bench_head_loss.py), then the step's speed (bench_train.py: variants, profiles, the step before this
# change, the official code). Results go to $OUT (default /tmp/gpu-checks).
#   bash tests/benchmarks/gpu_checks.sh OLD_NOTEBOOK.ipynb PATH_TO_facebookresearch_dino
set -u
OUT=${OUT:-/tmp/gpu-checks}; mkdir -p "$OUT"
BEFORE=${1:-}; OFFICIAL=${2:-}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
graphs=false
timeout 120 python3 tests/benchmarks/bench_train.py --device cuda --archs vit_tiny --steps 5 --variants graphs \
    --no-profile 2>&1 | grep -v Warning | tee "$OUT/smoke.txt"
grep -q "graphs .*images/s" "$OUT/smoke.txt" && graphs=true
echo "CUDA graphs work: $graphs"
# the learning runs one after the other: four side by side on one GPU finished no epoch in 280 s (2026-12-04)
common=(--images 50000 --bank 20000 --minutes 1.8 --out "$OUT" --set epochs=5 num_workers=4 cuda_graphs=$graphs)
timeout 150 python3 tests/benchmarks/bench_learn.py --name gpu-paper-short --profile imagenet64 "${common[@]}" \
    warmup_epochs=1 warmup_teacher_temp_epochs=2 momentum_teacher=0.996 2>&1 | grep -v Warning | tee "$OUT/learn.txt"
timeout 150 python3 tests/benchmarks/bench_learn.py --name gpu-short --profile short "${common[@]}" \
    arch=vit_small batch_size=256 2>&1 | grep -v Warning | tee -a "$OUT/learn.txt"
timeout 60 python3 tests/benchmarks/bench_head_loss.py --device cuda --batch 256 2>&1 | grep -v Warning \
    | tee "$OUT/bench_head_loss.txt"
timeout 200 python3 tests/benchmarks/bench_train.py --device cuda --steps 15 --variants eager graphs compile+graphs \
    ${BEFORE:+--before "$BEFORE"} ${OFFICIAL:+--official "$OFFICIAL"} 2>&1 | grep -v Warning | tee "$OUT/bench_train.txt"
