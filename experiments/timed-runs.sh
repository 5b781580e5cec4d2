# Sourced by the experiments' run.sh scripts that time 10-epoch runs one after the other
# (bf16, compile, training-controls): from the repository root, in its .venv, with the data
# at $PYRO_LVAE_DATA (default ../shared/data). Set PAUSE_PIDS to the PIDs of background jobs
# to pause them (SIGSTOP) while the runs are timed; they continue when the script exits.
# COMMON holds the flags the runs share: lvae-bn-wu-5, 10 epochs with 5 of warm-up, the
# test bounds every 5 epochs and L_1000 on the first 1,000 test images at the end.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." && . .venv/bin/activate || exit 1
export PYRO_LVAE_DATA=${PYRO_LVAE_DATA:-../shared/data}
if [ -n "${PAUSE_PIDS:-}" ]; then
  kill -STOP $PAUSE_PIDS
  trap 'kill -CONT $PAUSE_PIDS' EXIT
fi
COMMON="--preset lvae-bn-wu-5 --epochs 10 --warmup-epochs 5 --eval-every 5 --num-importance-samples 1000 --final-eval-subset 1000 --no-progress --overwrite"
