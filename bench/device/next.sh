#!/usr/bin/env bash
# The next call on a lent GPU machine (issue 16), prepared so that one call of about eight minutes
# does the GPU work in the order of the issue. Build the carried folders first
# (bash bench/device/prepare.sh), then call the device tool with
#   command: bash bench/device/next.sh    carry: [".whl", ".devdata"]    timeout_s: 560
# Each stage has its own limit and writes its log under $OUT; a stage cut short leaves the rest.
# STAGES picks stages (default: all, in this order):
#   tests   the tests that run on CUDA (the CUDA-graph engine, the engines' equality in float64,
#           the closed form and the compiled loss on the GPU, bf16 evaluation, the test-image draw,
#           the run directory)
#   epochs  MNIST epochs through the CLI: the cuda-graph engine (target 0.5 s per epoch), then the
#           fast engine with --compile
#   lk      L_5000 of the shipped models on the 10,000 test images (target 60 s), then of
#           lvae-bn-wu-5 in bf16 (evaluate(precision="bf16"), never run on CUDA before)
#   bench   bench/run.py --device cuda --steps-only: every step variant, the CUDA graphs, compiled
#   suite   the whole suite with CUDA present (docs and notebooks left out), if time is left
# REHEARSAL=1 runs the same stages on this CPU at tiny sizes (fast engine, --quick), to check the
# commands before device time is spent on them: REHEARSAL=1 OUT=$(mktemp -d) bash bench/device/next.sh
set -u
OUT=${OUT:?set OUT to a folder for the logs}
STAGES=${STAGES:-tests epochs lk bench suite}
export PYRO_LVAE_DATA=$PWD/.devdata MPLBACKEND=Agg PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( ${BUDGET:-530} - ($(date +%s) - start) )); }
# A stage's limit: at most N seconds and what is left (never 0, which would mean no limit to timeout).
lim() { local l; l=$(left); [ "$l" -lt "$1" ] && echo $(( l > 5 ? l : 5 )) || echo "$1"; }
stage() { echo "== $1 ($(date +%T), $(left) s left)"; }

if [ "${REHEARSAL:-0}" = 1 ]; then
  device=cpu; graph_engine=fast; epochs_subset="--train-subset 512"; bench_size="--quick"; lk="--num-samples 20"
  [ -d .devdata ] || export PYRO_LVAE_DATA=$(cd .. && pwd)/shared/data
else
  device=cuda; graph_engine=cuda-graph; epochs_subset=""; bench_size="--rounds 6"; lk="--num-samples 5000 --memory-budget-gib 16"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed (compile on the GPU needs it)"
pytest_opts=(-q -p no:cacheprovider -o addopts="" -rfE --tb=short)

for s in $STAGES; do
  case $s in
  tests)
    stage tests
    timeout $(lim 180) python3 -m pytest "${pytest_opts[@]}" \
      tests/training/test_cuda_graph.py tests/training/test_steps.py tests/training/test_batches.py \
      tests/training/test_run_dir.py tests/inference/test_closed_form.py tests/inference/test_compiled.py \
      tests/inference/test_evaluation.py \
      > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -20 ;;
  epochs)
    stage epochs
    timeout $(lim 90) python3 -m pyro_lvae train --preset lvae-bn-wu-5 \
      --engine $graph_engine --epochs 4 --warmup-epochs 2 --device $device $epochs_subset --out /tmp/ep-graph --overwrite \
      --data-root "$PYRO_LVAE_DATA" --no-download --no-progress --final-eval-subset 1000 \
      --num-importance-samples 100 > "$OUT/epochs-graph.log" 2>&1
    echo "graph epochs rc=$?"; cp /tmp/ep-graph/metrics.jsonl "$OUT/epochs-graph-metrics.jsonl" 2>/dev/null
    grep -v Warning "$OUT/epochs-graph.log" | tail -8
    timeout $(lim 120) python3 -m pyro_lvae train --preset lvae-bn-wu-5 --compile \
      --epochs 3 --warmup-epochs 2 --device $device $epochs_subset --out /tmp/ep-compiled --overwrite \
      --data-root "$PYRO_LVAE_DATA" --no-download --no-progress --no-final-eval > "$OUT/epochs-compiled.log" 2>&1
    echo "compiled epochs rc=$?"; cp /tmp/ep-compiled/metrics.jsonl "$OUT/epochs-compiled-metrics.jsonl" 2>/dev/null
    grep -v Warning "$OUT/epochs-compiled.log" | tail -5 ;;
  bench)
    stage bench
    timeout $(lim 180) python3 bench/run.py --device $device --steps-only $bench_size \
      --data-root "$PYRO_LVAE_DATA" --json "$OUT/bench-steps.json" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?"; grep -v Warning "$OUT/bench.log" | tail -30 ;;
  lk)
    stage lk
    timeout $(lim 60) python3 bench/lk_pretrained.py --device $device \
      $lk --data-root "$PYRO_LVAE_DATA" --json "$OUT/lk5000.json" > "$OUT/lk.log" 2>&1
    echo "lk rc=$?"; grep -v Warning "$OUT/lk.log" | tail -6
    timeout $(lim 40) python3 bench/lk_pretrained.py --device $device --precision bf16 --models lvae-bn-wu-5 \
      $lk --data-root "$PYRO_LVAE_DATA" --json "$OUT/lk5000-bf16.json" > "$OUT/lk-bf16.log" 2>&1
    echo "lk bf16 rc=$?"; grep -v Warning "$OUT/lk-bf16.log" | tail -3 ;;
  suite)
    stage suite
    [ "$(left)" -gt 60 ] || { echo "suite: no time left"; continue; }
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")
    OMP_NUM_THREADS=1 timeout $(( $(left) - 10 )) python3 -m pytest "${pytest_opts[@]}" $workers \
      --ignore=tests/test_docs.py --ignore=tests/test_notebooks.py tests > "$OUT/suite.log" 2>&1
    echo "suite rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/suite.log" | tail -20 ;;
  *) echo "unknown stage $s" ;;
  esac
done
stage done
