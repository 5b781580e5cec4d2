#!/bin/bash
# Three 10-epoch runs of lvae-bn-wu-5, one after the other (see README.md). Set PAUSE_PIDS to
# the PIDs of background jobs to pause them (SIGSTOP) while the runs are timed.
set -u
cd "$(git rev-parse --show-toplevel)" && . .venv/bin/activate
export PYRO_LVAE_DATA=${PYRO_LVAE_DATA:-../shared/data}
if [ -n "${PAUSE_PIDS:-}" ]; then
  kill -STOP $PAUSE_PIDS
  trap 'kill -CONT $PAUSE_PIDS' EXIT
fi
COMMON="--preset lvae-bn-wu-5 --epochs 10 --warmup-epochs 5 --eval-every 5 --num-importance-samples 1000 --final-eval-subset 1000 --no-progress --overwrite"
for v in base fb ema; do
  case $v in base) X="";; fb) X="--free-bits 0.5 --free-bits-mode layer";; ema) X="--ema 0.999";; esac
  pyro-lvae train $COMMON $X --out runs/ctl/$v > runs/ctl-$v.log 2>&1 || exit 1
done
