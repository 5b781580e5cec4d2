"""Faults during training: non-finite steps are skipped and counted, too many in a row stop
the run with the last good checkpoint intact, and SIGINT/SIGTERM or kill -9 lose no work."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae.training import loop as training
from pyro_lvae.training import train


def _config(engine: str = "fast", **train_kw) -> ExperimentConfig:
    tc = dict(epochs=3, batch_size=16, num_importance_samples=2, eval_every=1, engine=engine)
    tc.update(train_kw)
    return ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)), train=TrainConfig(**tc)
    )


def _lines(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_batch_is_skipped_logged_and_counted(tmp_path, make_synthetic, monkeypatch, caplog):
    original = training.epoch_batches

    def with_nan(data, config, epoch, **kw):
        x, batches = original(data, config, epoch, **kw)
        if epoch == 1:
            x = x.clone()
            x[batches[2][0]] = float("nan")  # one example of the third batch of epoch 2
        return x, batches

    monkeypatch.setattr(training, "epoch_batches", with_nan)
    # Evaluate only after epoch 3: the periodic train ELBO would read the NaN example too.
    result = train(_config(eval_every=3), out_dir=tmp_path, dataset=make_synthetic(), progress=False)
    assert [m["skipped_steps"] for m in _lines(tmp_path)] == [0, 1, 0]
    assert "Skipped step 3 of epoch 2: non-finite loss or gradient" in caplog.text
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # The skipped step's forward pass did not leave NaN in the batch-norm statistics.
    statistics = [b for b in [*result.model.buffers(), *result.guide.buffers()] if b.is_floating_point()]
    assert all(torch.isfinite(b).all() for b in statistics)
    model_modules = set(result.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) and m not in model_modules for m in result.guide.modules())
    assert all(torch.isfinite(torch.tensor(m["train_objective"])) for m in _lines(tmp_path))


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_a_nan_parameter_stops_after_n_consecutive_skips_with_the_checkpoint_intact(
    tmp_path, make_synthetic, monkeypatch, engine
):
    config = _config(engine, max_consecutive_skips=3)
    original = training.epoch_batches
    poisoned = {}

    def poison(data, cfg, epoch, **kw):
        if epoch == 2:  # the model's first weight becomes NaN at the start of epoch 3
            p = next(poisoned["model"].parameters())
            with torch.no_grad():
                p[0, 0] = float("nan")
        return original(data, cfg, epoch, **kw)

    original_make_model = training.make_model

    def make_model(cfg):
        poisoned["model"] = original_make_model(cfg)
        return poisoned["model"]

    monkeypatch.setattr(training, "epoch_batches", poison)
    monkeypatch.setattr(training, "make_model", make_model)
    with pytest.raises(
        FloatingPointError,
        match=r"3 consecutive training steps .*epoch 3.*checkpoint of epoch 2 .* intact; check the data "
        r".*--overwrite and a lower learning_rate",
    ):
        train(config, out_dir=tmp_path, dataset=make_synthetic(), progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [m["epoch"] for m in _lines(tmp_path)] == [1, 2]


# --- Whole processes: SIGINT / SIGTERM and kill -9 -----------------------------------------

TRAIN = [
    "train", "--preset", "lvae-bn-wu-2", "--latent-sizes", "8,4", "--hidden-sizes", "32,16",
    "--epochs", "10", "--warmup-epochs", "3", "--train-subset", "3000", "--test-subset", "100",
    "--batch-size", "100", "--num-importance-samples", "5", "--eval-every", "4", "--no-progress",
    # The moving average and the adaptive skip threshold carry state across a resume too.
    "--ema", "0.99", "--skip-threshold", "auto",
]  # fmt: skip


def _start(run_dir, data_root, *extra):
    cmd = [sys.executable, "-m", "pyro_lvae", *TRAIN, "--out", str(run_dir), "--data-root", str(data_root), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_epochs(proc, run_dir, at_least: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_least:
            return
        time.sleep(0.02)


def _wait_for_checkpoint_of_epoch(run_dir, epoch: int, timeout: float = 120) -> None:
    """Poll until checkpoint.pt holds ``epoch``. It is replaced by a rename, so a read sees a
    whole file; but between moving the old one to checkpoint.prev.pt and renaming the new one
    into place there is no checkpoint.pt for an instant, and a poll may fall in that gap."""
    deadline, seen = time.time() + timeout, None
    while time.time() < deadline:
        path = run_dir / "checkpoint.pt"
        try:
            stamp = path.stat().st_mtime_ns
            if stamp != seen:
                seen = stamp
                if torch.load(path, weights_only=False)["epoch"] >= epoch:
                    return
        except FileNotFoundError:
            pass  # the gap between the two renames: poll again
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint of epoch {epoch} in {run_dir} within {timeout} s")


def _final_state(run_dir):
    """The raw weights, their moving average and the skip rule's remembered norms."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    state = {f"raw.{k}": v for k, v in ckpt["model"].items()}
    state |= {f"ema.{k}": v for k, v in ckpt["ema"]["model"].items()}
    return state | {"norms": torch.tensor(ckpt["optimizer"]["skip_rule"]["norms"], dtype=torch.float64)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shared_data_root):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _start(run_dir, shared_data_root)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run_dir


def _assert_same_run(run_dir, reference):
    ours, theirs = _final_state(run_dir), _final_state(reference)
    assert ours.keys() == theirs.keys() and len(ours["norms"]) > 50
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert [m["train_objective"] for m in _lines(run_dir)] == [m["train_objective"] for m in _lines(reference)]
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((reference / "results.json").read_text())
    assert a["test_log_likelihood"] == b["test_log_likelihood"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_writes_a_checkpoint_and_resume_continues(
    tmp_path, shared_data_root, reference_run, sig
):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, shared_data_root)
    _wait_for_epochs(proc, run_dir, 2)
    # Epoch 2's metrics line comes before its checkpoint; once that checkpoint is on disk
    # the run is taking the 30 steps of epoch 3, and the signal stops it mid-epoch.
    _wait_for_checkpoint_of_epoch(run_dir, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    message = err.strip().splitlines()[-1]
    assert f"Interrupted by {signal.Signals(sig).name}" in message and "continue with --resume" in message
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2
    assert ckpt["partial"] is not None and ckpt["partial"]["step"] > 0  # the position inside epoch 3
    assert f"at epoch 3, step {ckpt['partial']['step']} of" in message
    proc = _start(run_dir, shared_data_root, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _assert_same_run(run_dir, reference_run)


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, shared_data_root, reference_run):
    run_dir = tmp_path / "run"
    rng = random.Random(2026)
    kills = 0
    for _attempt in range(4):
        proc = _start(
            run_dir,
            shared_data_root,
            *(
                ["--resume"]
                if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists()
                else ["--overwrite"]
            ),
        )
        done = len(_lines(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        _wait_for_epochs(proc, run_dir, done + 1)
        time.sleep(rng.uniform(0.0, 0.8))  # anywhere in the next epochs: steps, evaluation, checkpoint writes
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate()
    assert kills >= 3
    proc = _start(run_dir, shared_data_root, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _assert_same_run(run_dir, reference_run)
