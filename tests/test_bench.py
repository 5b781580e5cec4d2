"""The benchmark harness runs end to end in its quick mode (a smoke test; no times are asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_writes_every_measurement(shared_data_root, tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--data-root",
            str(shared_data_root),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ladder | fast engine |" in proc.stdout and "| vae | baseline |" in proc.stdout
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["matmul_roofline_flops"] > 0
    for guide in ("ladder", "vae"):
        r = results["guides"][guide]
        assert set(r["step_ms"]) == {
            "svi engine",
            "+torch Adam",
            "+no validation",
            "+registered once",
            "fast engine",
            "baseline",
        }
        assert all(v > 0 for v in r["step_ms"].values())
        assert r["ratio_to_baseline"]["baseline"] == 1.0
        assert r["baseline_loss_rel_diff"] < 1e-4  # the baseline computes the library's loss
        assert (
            r["step_flops"] > 0
            and r["epoch_seconds"] > 0
            and r["epoch_seconds_svi_engine"] > 0
            and r["lk_pairs_per_second"] > 0
        )
        assert r["peak_memory_bytes"] > 0
