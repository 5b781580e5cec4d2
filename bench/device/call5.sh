#!/usr/bin/env bash
# Call 5 on a lent GPU machine (issue 16): the CUDA-graph engine's tests, then five
# MNIST epochs through the CLI on that engine. Logs under $OUT.
set -u
export PYRO_LVAE_DATA=$PWD/.devdata MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
echo "== graph tests"; date +%T
timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short \
  tests/training/test_cuda_graph.py tests/training/test_batches.py tests/training/test_steps.py > $OUT/graph-tests.log 2>&1
grep -v "Warning\|warn" $OUT/graph-tests.log | tail -30
echo "== CLI epochs, cuda-graph engine"; date +%T
timeout 80 python3 -m pyro_lvae train --preset lvae-bn-wu-5 --engine cuda-graph --epochs 5 --warmup-epochs 2 \
  --device cuda --out /tmp/ep --data-root .devdata --no-download --no-progress --final-eval-subset 10000 \
  --num-importance-samples 1000 > $OUT/epoch.log 2>&1
echo "epochs rc=$?"; grep -v Warning $OUT/epoch.log | tail -9; cp /tmp/ep/metrics.jsonl $OUT/epoch-metrics.jsonl
date +%T
