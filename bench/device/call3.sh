#!/usr/bin/env bash
# Call 3 on a lent GPU machine (issue 16): the CUDA-graph engine's tests, then
# bench/run.py --device cuda (which now times the cuda-graph engine and a graphed
# baseline, and two graph-engine epochs), L_5000 of the shipped models on the test set
# drawn on the CPU, and the whole test suite with CUDA present. Logs under $OUT.
set -u
export PYRO_LVAE_DATA=$PWD/.devdata MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
echo "== graph tests"; date +%T
timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short \
  tests/training/test_cuda_graph.py tests/training/test_batches.py tests/training/test_steps.py > $OUT/graph-tests.log 2>&1; grep -v "Warning\|warn" $OUT/graph-tests.log | tail -40
echo "== bench"; date +%T
timeout ${BENCH_LIMIT:-200} python3 bench/run.py --device cuda --data-root .devdata --json $OUT/cuda.json > $OUT/bench.log 2>&1
echo "bench rc=$?"; grep -v Warning $OUT/bench.log | tail -32
echo "== suite"; date +%T
OMP_NUM_THREADS=1 timeout ${TEST_LIMIT:-200} python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 12 -o addopts="" -rfE -v --tb=short \
  --ignore=tests/test_docs.py --ignore=tests/test_notebooks.py tests > $OUT/tests.log 2>&1
echo "suite rc=$?"; pkill -f pytest; grep -E "FAILED|ERROR|passed|failed" $OUT/tests.log | grep -v "^E " | tail -40
date +%T
