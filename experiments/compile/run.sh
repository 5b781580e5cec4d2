#!/bin/bash
# 10 epochs of lvae-bn-wu-5 eagerly and with --compile, same seed, one after the other (see README.md);
# `run.sh bf16` does the same under --precision bf16.
# Set PAUSE_PIDS to pause background jobs (SIGSTOP) while the runs are timed.
set -u
cd "$(git rev-parse --show-toplevel)" && . .venv/bin/activate
export PYRO_LVAE_DATA=${PYRO_LVAE_DATA:-../shared/data}
if [ -n "${PAUSE_PIDS:-}" ]; then
  kill -STOP $PAUSE_PIDS
  trap 'kill -CONT $PAUSE_PIDS' EXIT
fi
precision=${1:-fp32}
prefix=$([ "$precision" = fp32 ] && echo "" || echo "$precision-")
# A fresh TorchInductor cache: the compiled run's first epoch includes a compile from scratch.
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
COMMON="--preset lvae-bn-wu-5 --epochs 10 --warmup-epochs 5 --eval-every 5 --num-importance-samples 1000 --final-eval-subset 1000 --no-progress --overwrite"
for c in false true; do
  pyro-lvae train $COMMON --precision $precision --compile $c --out runs/compile/${prefix}compile-$c \
    > runs/${prefix}compile-$c.log 2>&1 || exit 1
done
