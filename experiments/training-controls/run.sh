#!/bin/bash
# Three 10-epoch runs of lvae-bn-wu-5, one after the other (see README.md). Set PAUSE_PIDS to
# the PIDs of background jobs to pause them (SIGSTOP) while the runs are timed.
. "$(dirname "$0")/../timed-runs.sh"
for v in base fb ema; do
  case $v in base) X="";; fb) X="--free-bits 0.5 --free-bits-mode layer";; ema) X="--ema 0.999";; esac
  pyro-lvae train $COMMON $X --out runs/ctl/$v > runs/ctl-$v.log 2>&1 || exit 1
done
