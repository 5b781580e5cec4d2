#!/bin/bash
# 10 epochs of lvae-bn-wu-5 eagerly and with --compile, same seed, one after the other (see README.md);
# `run.sh bf16` does the same under --precision bf16.
# Set PAUSE_PIDS to pause background jobs (SIGSTOP) while the runs are timed.
. "$(dirname "$0")/../timed-runs.sh"
precision=${1:-fp32}
prefix=$([ "$precision" = fp32 ] && echo "" || echo "$precision-")
# A fresh TorchInductor cache: the compiled run's first epoch includes a compile from scratch.
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
for c in false true; do
  pyro-lvae train $COMMON --precision $precision --compile $c --out runs/compile/${prefix}compile-$c \
    > runs/${prefix}compile-$c.log 2>&1 || exit 1
done
