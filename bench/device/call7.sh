#!/usr/bin/env bash
# Call 7 on a lent GPU machine (issue 16): the CUDA-graph tests alone, after the fresh memory pool on discard.
export PYRO_LVAE_DATA=$PWD/.devdata PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
timeout 80 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short -p no:randomly \
  tests/training/test_cuda_graph.py 2>&1 | grep -v "Warn\|warn" | tail -15
