"""Checkpoints written by earlier code still load, evaluate and resume unchanged.

The fixture ``fixtures/checkpoint-13e79a1`` was written by the code of commit 13e79a1,
before the variance floor and the authors'-code options (its README says how).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pyro_lvae import ExperimentConfig
from pyro_lvae.training import evaluate_run, load_run, train
from pyro_lvae.training.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint-13e79a1"


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "old-run"
    shutil.copytree(FIXTURE, run)
    return run


def test_an_old_configuration_gets_the_new_fields_defaults(old_run):
    stored = load_checkpoint(old_run)["config"]
    assert "variance_floor" not in stored["model"] and "adam_eps" not in stored["train"]
    config = ExperimentConfig.from_dict(stored)
    assert config.model.variance_floor == 1e-5 and config.model.ladder_share_params
    assert config.train.adam_eps == 1e-8 and config.train.grad_clip == 0


def test_an_old_checkpoint_reproduces_its_own_results(old_run, shared_data_root):
    """Same seed, same L_K and ELBO: every variance of this run is above the floor."""
    written = json.loads((FIXTURE / "results.json").read_text())
    results = evaluate_run(old_run, data_root=shared_data_root, download=False, progress=False)
    assert results["num_test_examples"] == written["num_test_examples"] == 16
    assert results["test_log_likelihood"] == pytest.approx(written["test_log_likelihood"], abs=1e-4)
    assert results["test_elbo"] == pytest.approx(written["test_elbo"], abs=1e-4)
    assert results["test_kl_per_layer"] == pytest.approx(written["test_kl_per_layer"], abs=1e-5)


def _adam_steps(checkpoint: dict) -> set[float]:
    return {float(state["step"]) for state in checkpoint["optimizer"]["optimizer"]["state"].values()}


def test_an_old_checkpoint_resumes(old_run, shared_data_root):
    """Its weights, statistics and Adam's state are where training goes on from: one more
    epoch (4 steps of 32 of the 128 examples) moves no weight by more than Adam's largest step
    per update, lr (1 − β1) / √(1 − β2) = 3.2 lr, and Adam's count goes on from 8."""
    old = load_checkpoint(old_run)
    assert _adam_steps(old) == {8.0}
    _, _, config, _ = load_run(old_run)
    old_lines = (old_run / "metrics.jsonl").read_text().splitlines()
    result = train(
        config.replace(epochs=3),
        out_dir=old_run,
        resume=True,
        data_root=shared_data_root,
        download=False,
        progress=False,
        final_evaluation=False,
    )
    lines = (old_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert [json.loads(line) for line in lines[:2]] == [json.loads(line) for line in old_lines]  # kept as written
    assert result.metrics[-1]["skipped_steps"] == 0
    new = load_checkpoint(old_run)
    assert _adam_steps(new) == {12.0}
    for owner in ("model", "guide"):
        for name, value in new[owner].items():
            if value.is_floating_point() and "running" not in name:
                assert (value - old[owner][name]).abs().max() <= 4 * 3.2 * config.train.learning_rate, name
