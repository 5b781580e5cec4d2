#!/bin/bash
# 10 epochs of lvae-bn-wu-5 in fp32 and in bf16, same seed, one after the other (see README.md).
# Set PAUSE_PIDS to pause background jobs (SIGSTOP) while the runs are timed.
set -u
cd "$(git rev-parse --show-toplevel)" && . .venv/bin/activate
export PYRO_LVAE_DATA=${PYRO_LVAE_DATA:-../shared/data}
if [ -n "${PAUSE_PIDS:-}" ]; then
  kill -STOP $PAUSE_PIDS
  trap 'kill -CONT $PAUSE_PIDS' EXIT
fi
COMMON="--preset lvae-bn-wu-5 --epochs 10 --warmup-epochs 5 --eval-every 5 --num-importance-samples 1000 --final-eval-subset 1000 --no-progress --overwrite"
for p in fp32 bf16; do
  pyro-lvae train $COMMON --precision $p --out runs/bf16/$p > runs/bf16-$p.log 2>&1 || exit 1
done
