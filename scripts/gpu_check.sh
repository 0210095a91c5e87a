#!/usr/bin/env bash
# The prepared GPU check (at most 8 minutes on one CUDA GPU): writes results/gpu.md.
# See scripts/gpu_check.py for what it checks. Run from anywhere:
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 480 python scripts/gpu_check.py "$@"
if [ -f scripts/fsdp_check.py ] && [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  timeout 120 torchrun --nproc_per_node 2 scripts/fsdp_check.py | tee -a results/gpu.md
fi
