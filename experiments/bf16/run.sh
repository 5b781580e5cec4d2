#!/bin/bash
# 10 epochs of lvae-bn-wu-5 in fp32 and in bf16, same seed, one after the other (see README.md).
# Set PAUSE_PIDS to pause background jobs (SIGSTOP) while the runs are timed.
. "$(dirname "$0")/../timed-runs.sh"
for p in fp32 bf16; do
  pyro-lvae train $COMMON --precision $p --out runs/bf16/$p > runs/bf16-$p.log 2>&1 || exit 1
done
