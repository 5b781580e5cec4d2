#!/usr/bin/env bash
# Call 4 on a lent GPU machine (issue 16): the CUDA-graph engine's tests and
# bench/run.py --device cuda. Logs under $OUT.
set -u
export PYRO_LVAE_DATA=$PWD/.devdata MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
echo "== graph tests"; date +%T
timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short \
  tests/training/test_cuda_graph.py tests/training/test_batches.py > $OUT/graph-tests.log 2>&1
grep -v "Warning\|warn" $OUT/graph-tests.log | tail -30
echo "== bench"; date +%T
timeout ${BENCH_LIMIT:-240} python3 bench/run.py --device cuda --data-root .devdata --json $OUT/cuda.json > $OUT/bench.log 2>&1
echo "bench rc=$?"; grep -v Warning $OUT/bench.log | tail -34
date +%T
