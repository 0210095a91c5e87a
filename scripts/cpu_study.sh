#!/usr/bin/env bash
# The CPU-scale CIFAR-10 study behind results/claims.md, on a 2-core machine: every run is
# single-threaded and two run side by side (the fastest use of 2 cores; nothing else should run).
#   bash scripts/cpu_study.sh CIFAR10_DIR          # e.g. ../shared/data/cifar10
# 1. cifar10_small_cpu and cifar10_noisy_cpu, each tuned with `launch.py tune` (trials, then the
#    final seeds), their tables and plots; 2. LookSAM's alpha x k grid (looksam_cifar10_cpu);
# 3. digits_noisy with every optimizer; 4. results/claims.md from all of them.
# Interrupted, it resumes: finished runs are kept and never trained twice.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash scripts/cpu_study.sh CIFAR10_DIR}
log=${STUDY_LOG:-runs/cpu_study.log}
mkdir -p "$(dirname "$log")"
start=$(date +%s)

in_pairs() {  # run the printed commands two at a time, one thread each (each run's own lines go to the log)
  sed -e 's/^accelerate launch /python /' -e 's/$/ --threads 1/' |
    xargs -P 2 -I{} sh -c '{} >>"$0" 2>&1' "$log" || echo "some runs failed; see $log (the tables name them)"
  echo "[$(( ($(date +%s) - start) / 60 )) min] $1 done"
}

for recipe in cifar10_small_cpu cifar10_noisy_cpu; do
  python launch.py tune "$recipe" --data_dir "$data" --print_commands | in_pairs "$recipe trials"
  python launch.py tune "$recipe" --data_dir "$data" --print_commands | in_pairs "$recipe final runs"
  python launch.py tune "$recipe" --data_dir "$data"
done
python launch.py sweep looksam_cifar10_cpu --data_dir "$data" --print_commands | in_pairs looksam_cifar10_cpu
python launch.py sweep looksam_cifar10_cpu --data_dir "$data" --tables_only
python launch.py sweep digits_noisy --print_commands | in_pairs digits_noisy
python launch.py sweep digits_noisy --tables_only
echo "[$(( ($(date +%s) - start) / 60 )) min] study done"
