#!/usr/bin/env bash
# Copy the paper-length runs' small text files into experiments/full/<run>/ for the record:
# config.json, metrics.jsonl and train.log (and results.json and per_example.npz once a run is evaluated).
# Checkpoints stay in the run directories (optimizer state is never committed).
# Usage: bash experiments/full/sync.sh RUNS_DIR   (e.g. the worktree's runs/full)
set -euo pipefail
runs="${1:?usage: sync.sh RUNS_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
for run in lvae-bn-wu-5-seed0 vae-bn-wu-3-seed0; do
  mkdir -p "$here/$run"
  for f in config.json metrics.jsonl train.log results.json per_example.npz; do
    if [ -f "$runs/$run/$f" ]; then cp "$runs/$run/$f" "$here/$run/$f"; fi
  done
done
