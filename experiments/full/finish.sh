#!/usr/bin/env bash
# What follows the end of the paper-length runs, in order (see README.md). Run from the
# repository root with its venv active, once both runs have reached epoch 2000:
#   bash experiments/full/finish.sh RUNS_DIR COMMIT
# RUNS_DIR: the runs' folder (the worktree's runs/full); COMMIT: the code that trained them.
#
# 1. results.json of each run: `train` writes it itself at the end (L_5000 on all 10,000
#    test images, with the code of the run's worktree). A run stopped during that final
#    evaluation is evaluated here instead, with this repository's code (the closed-form
#    weights, equal to the traced ones on the same draws; tests/inference/test_closed_form.py).
# 2. the run folders' small files into experiments/full/ (sync.sh);
# 3. the report (figures, PSIS, active units) into docs/report-full;
# 4. the pretrained files and manifest entries into pyro_lvae/pretrained.
set -euo pipefail
runs="${1:?usage: finish.sh RUNS_DIR COMMIT}"
commit="${2:?usage: finish.sh RUNS_DIR COMMIT}"
here="$(cd "$(dirname "$0")" && pwd)"
declare -A preset=([lvae-bn-wu-5-seed0]=lvae-bn-wu-5 [vae-bn-wu-3-seed0]=vae-bn-wu-3)
for run in lvae-bn-wu-5-seed0 vae-bn-wu-3-seed0; do
  epochs=$(python -c "import json,sys; print(sum(1 for _ in open('$runs/$run/metrics.jsonl')))")
  if [ "$epochs" -lt 2000 ]; then echo "$run has $epochs epochs, not 2000: resume it first" >&2; exit 1; fi
  if [ ! -f "$runs/$run/results.json" ]; then
    pyro-lvae evaluate "$runs/$run" --num-samples 5000 --no-progress
  fi
done
bash "$here/sync.sh" "$runs"
pyro-lvae report "$runs/lvae-bn-wu-5-seed0" "$runs/vae-bn-wu-3-seed0" --out docs/report-full --num-samples 1000 --no-progress
for run in lvae-bn-wu-5-seed0 vae-bn-wu-3-seed0; do
  pyro-lvae export "$runs/$run" --name "${preset[$run]}" --out pyro_lvae/pretrained --commit "$commit"
done
