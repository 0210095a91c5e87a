#!/usr/bin/env bash
# The prepared GPU check (at most 10 minutes on one CUDA GPU): writes results/gpu.md, and given the
# CIFAR-10 folder, the GPU-minutes study's tables, per-run file and claims (about 8 minutes of it).
# See scripts/gpu_check.py for what it checks. Run from anywhere:
#   bash scripts/gpu_check.sh [CIFAR10_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
  timeout 590 python scripts/gpu_check.py --budget_s 80 --study_data "$(realpath "$1")" --study_s 490
else
  timeout 480 python scripts/gpu_check.py
fi
if [ -f scripts/fsdp_check.py ] && [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  timeout 120 torchrun --nproc_per_node 2 scripts/fsdp_check.py | tee -a results/gpu.md
fi
