#!/usr/bin/env bash
# Call 1 on a lent GPU machine (issue 16): the environment, the test suite with CUDA
# present, bench/run.py --device cuda (steps, one full epoch, L_K throughput), a 3-epoch
# CLI run on cuda, and L_5000 of the shipped models on the 10,000 test images.
# Run from the repository root with .whl (pyro-ppl, pyro-api wheels) and .devdata (MNIST,
# binarized MNIST, OMNIGLOT-28) carried; writes its logs under $OUT.
set -u
export PYRO_LVAE_DATA=$PWD/.devdata MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, torch.cuda.get_device_name())"
echo "== tests"; date +%T
timeout ${TEST_LIMIT:-200} python3 -m pytest -q -p no:cacheprovider -n 14 -o addopts="" \
  --ignore=tests/test_docs.py --ignore=tests/test_notebooks.py tests > $OUT/tests.log 2>&1
echo "tests rc=$?"; tail -25 $OUT/tests.log
echo "== bench"; date +%T
timeout ${BENCH_LIMIT:-170} python3 bench/run.py --device cuda --data-root .devdata --json $OUT/cuda.json > $OUT/bench.log 2>&1
echo "bench rc=$?"; tail -30 $OUT/bench.log
echo "== L_5000"; date +%T
timeout ${LK_LIMIT:-150} python3 bench/lk_pretrained.py --device cuda --num-samples 5000 --data-root .devdata \
  --memory-budget-gib 16 --json $OUT/lk5000.json 2>&1 | tail -5
echo "== CLI epochs"; date +%T
timeout ${EPOCH_LIMIT:-60} python3 -m pyro_lvae train --preset lvae-bn-wu-5 --epochs 3 --device cuda --out /tmp/ep \
  --data-root .devdata --no-download --no-progress --final-eval-subset 1000 --num-importance-samples 100 > $OUT/epoch.log 2>&1
echo "epochs rc=$?"; tail -8 $OUT/epoch.log; cp /tmp/ep/metrics.jsonl $OUT/epoch-metrics.jsonl 2>/dev/null
python3 - <<'PY'
import json
for line in open("/tmp/ep/metrics.jsonl"):
    m = json.loads(line)
    if "seconds" in m: print("epoch", m.get("epoch"), "seconds", m["seconds"])
PY
date +%T
