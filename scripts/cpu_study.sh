#!/usr/bin/env bash
# The CPU-scale study behind results/claims.md, on a 2-core machine: every run is single-threaded
# and two run side by side (the fastest use of 2 cores; nothing else should run), each lane one Python
# process taking the next run from a shared queue (scripts/run_commands.py --lanes 2: no interpreter start
# and torch import per run, and lanes that end together). Their tables
# flag the time ratios as contended: results/perf_resnet8.md has the quiet ones.
#   bash scripts/cpu_study.sh CIFAR10_DIR [STEP ...]     # CIFAR10_DIR e.g. ../shared/data/cifar10
# Steps (default: the study, in this order, then the claims; 2 h 03 min from no runs on a 2-core Intel Xeon, measured):
#   cifar10_noise40_cpu, cifar10_fit_cpu, cifar10_noise20_cpu: 250 real CIFAR-10 images that SGD fits
#     (40% noisy, clean and 20% noisy labels), 12 contenders each tuned with `launch.py tune` (3 points x
#     3 validation folds, an edge extended once), then 5 final seeds; their tables and plots.
# Named only (not in the default): cifar10_small_cpu (tuned, about 45 min), looksam_alpha_tune
# (LookSAM's default alpha by 3-fold validation, about 15 min), the swept suites digits, digits_noisy,
# cifar10_cpu, looksam_digits and looksam_cifar10_cpu (LookSAM's alpha x k grid, about 20 min).
# Last, `python launch.py claims` over every setting whose per-run file (results/*_runs.csv) exists, into
# results/claims.md (its command is at the top of that file).
# Interrupted, it resumes: finished runs are kept and never trained twice.
# STUDY_RESULTS=DIR writes the tables, their per-run files and claims.md into DIR instead of results/ (a table
# refuses to replace a committed per-run file that holds finished runs it would leave out, as a rerun on
# another machine, whose tuning chooses other points, would).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash scripts/cpu_study.sh CIFAR10_DIR [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(cifar10_noise40_cpu cifar10_fit_cpu cifar10_noise20_cpu)
log=${STUDY_LOG:-runs/cpu_study.log}
out=${STUDY_RESULTS:-results}
mkdir -p "$out"
mkdir -p "$(dirname "$log")"
start=$(date +%s)

in_lanes() {  # the printed commands in two lanes side by side taking lines from one queue, one thread each (the runs' lines go to the log)
  python scripts/run_commands.py --threads 1 --lanes 2 >>"$log" 2>&1 || echo "some runs failed; see $log (the tables name them)"
  echo "[$(( ($(date +%s) - start) / 60 )) min] $1 done"
}

for step in "${steps[@]}"; do
  # a recipe with a [tune] section (its own or one it extends) is tuned, else swept
  tuned=$(python -c 'import sys; from bench.studies.recipes import load_recipe; print(int(bool(load_recipe(sys.argv[1]).tune)))' "$step") ||
    { echo "$step: not a recipe (above)"; exit 1; }
  if [ "$tuned" = 0 ]; then  # swept, untuned: every run of its grid
      python launch.py sweep "$step" --data_dir "$data" --print_commands | in_lanes "$step"
      python launch.py sweep "$step" --data_dir "$data" --tables_only --results_dir "$out" || echo "$step: tables not written (above)"
  else  # tuned: each stage's pending runs (trials, trials past an edge, final runs) two at a time
      prev=
      while cmds=$(python launch.py tune "$step" --data_dir "$data" --print_commands) && [ -n "$cmds" ]; do
        [ "$cmds" != "$prev" ] || { echo "$step: the same runs are still pending after a try; see $log"; exit 1; }
        printf '%s\n' "$cmds" | in_lanes "$step ($(printf '%s\n' "$cmds" | wc -l) runs)"
        prev=$cmds
      done
      python launch.py tune "$step" --data_dir "$data" --results_dir "$out" || echo "$step: tables not written (above)"
  fi
done
settings=()  # every setting whose per-run file is here (in $out, else in results/), committed or just written
for setting in digits=digits_runs.csv digits_noisy=digits_noisy_runs.csv \
    cifar10_cpu=cifar10_cpu_runs.csv digits_tune=digits_tune_tuned_runs.csv \
    cifar10_small_cpu=cifar10_small_cpu_tuned_runs.csv cifar10_fit_cpu=cifar10_fit_cpu_tuned_runs.csv \
    cifar10_noise20_cpu=cifar10_noise20_cpu_tuned_runs.csv cifar10_noise40_cpu=cifar10_noise40_cpu_tuned_runs.csv; do
  for dir in "$out" results; do
    if [ -f "$dir/${setting#*=}" ]; then settings+=("${setting%%=*}=$dir/${setting#*=}"); break; fi
  done
done
python launch.py claims "${settings[@]}" --out "$out/claims.md"
echo "[$(( ($(date +%s) - start) / 60 )) min] study done"
