#!/usr/bin/env bash
# The CPU-scale study behind results/claims.md, on a 2-core machine: every run is single-threaded
# and two run side by side (the fastest use of 2 cores; nothing else should run). Their tables
# flag the time ratios as contended: results/perf_resnet8.md has the quiet ones.
#   bash scripts/cpu_study.sh CIFAR10_DIR [STEP ...]     # CIFAR10_DIR e.g. ../shared/data/cifar10
# Steps (default: all, in this order; about 3 h 50 min on 2 cores: cifar10_noisy_cpu 78 min,
# cifar10_overfit_cpu 75 min, the other three about 75 min together):
#   cifar10_small_cpu, cifar10_noisy_cpu, cifar10_overfit_cpu: tuned with `launch.py tune` (trials,
#     then the final seeds), their tables and plots;
#   looksam_cifar10_cpu: LookSAM's alpha x k grid; digits_noisy: every optimizer (swept).
# Then `python launch.py claims ...` (its command is at the top of results/claims.md).
# Interrupted, it resumes: finished runs are kept and never trained twice.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash scripts/cpu_study.sh CIFAR10_DIR [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(cifar10_small_cpu cifar10_noisy_cpu cifar10_overfit_cpu looksam_cifar10_cpu digits_noisy)
log=${STUDY_LOG:-runs/cpu_study.log}
mkdir -p "$(dirname "$log")"
start=$(date +%s)

in_pairs() {  # run the printed commands two at a time, one thread each (each run's own lines go to the log)
  sed -e 's/^accelerate launch /python /' -e 's/$/ --threads 1/' |
    xargs -P 2 -I{} sh -c '{} >>"$0" 2>&1' "$log" || echo "some runs failed; see $log (the tables name them)"
  echo "[$(( ($(date +%s) - start) / 60 )) min] $1 done"
}

for step in "${steps[@]}"; do
  case $step in
    looksam_cifar10_cpu)
      python launch.py sweep "$step" --data_dir "$data" --print_commands | in_pairs "$step"
      python launch.py sweep "$step" --data_dir "$data" --tables_only ;;
    digits_noisy)
      python launch.py sweep "$step" --print_commands | in_pairs "$step"
      python launch.py sweep "$step" --tables_only ;;
    *)  # a tuned regime
      python launch.py tune "$step" --data_dir "$data" --print_commands | in_pairs "$step trials"
      python launch.py tune "$step" --data_dir "$data" --print_commands | in_pairs "$step final runs"
      python launch.py tune "$step" --data_dir "$data" ;;
  esac
done
echo "[$(( ($(date +%s) - start) / 60 )) min] study done"
