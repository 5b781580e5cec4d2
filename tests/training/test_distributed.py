"""Data-parallel training and sharded evaluation: 2 processes with the gloo backend on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.inference.evaluation import evaluate
from pyro_lvae.training.distributed import SINGLE_PROCESS, DistributedContext, shard

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_shards_partition_every_global_batch():
    batch = torch.arange(11)
    parts = [shard(batch, DistributedContext(rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch) and [len(p) for p in parts] == [4, 4, 3]
    assert shard(batch, SINGLE_PROCESS) is batch


def test_one_two_process_step_equals_the_one_process_step_on_the_whole_batch(tmp_path):
    """The gradient of the global batch, not of the mean over processes: DDP averages the
    gradients, so each process's loss is scaled by the number of processes."""
    two = subprocess.run(
        TORCHRUN + [str(HERE / "ddp_step.py"), str(tmp_path / "two-")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(HERE / "ddp_step.py"), str(tmp_path / "one-")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single, rank0, rank1 = (torch.load(tmp_path / name)["params"] for name in ("one-0.pt", "two-0.pt", "two-1.pt"))
    pyro.set_rng_seed(0)
    initial = GenerativeModel(
        ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(16, 8), batch_norm=False)
    ).double()
    initial_params = [
        p.detach() for p in dict.fromkeys(list(initial.parameters()) + list(LadderGuide(initial).double().parameters()))
    ]
    for a, b, c, p0 in zip(rank0, rank1, single, initial_params):
        assert torch.equal(a, b)  # the processes stay identical
        torch.testing.assert_close(a - p0, c - p0, rtol=1e-6, atol=1e-12)  # the same update
    assert max((c - p0).abs().max().item() for c, p0 in zip(single, initial_params)) > 1e-7  # it moved


def test_a_non_finite_step_on_one_process_is_skipped_by_both(tmp_path):
    proc = subprocess.run(
        TORCHRUN + [str(HERE / "ddp_step.py"), str(tmp_path / "nan-"), "1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"nan-{r}.pt") for r in (0, 1))
    assert rank0["skipped"] and rank1["skipped"]  # rank 0's own loss was finite
    pyro.set_rng_seed(0)
    initial = GenerativeModel(
        ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(16, 8), batch_norm=False)
    ).double()
    initial_params = [
        p.detach() for p in dict.fromkeys(list(initial.parameters()) + list(LadderGuide(initial).double().parameters()))
    ]
    for a, b, p0 in zip(rank0["params"], rank1["params"], initial_params):
        assert torch.equal(a, p0) and torch.equal(b, p0)


def test_two_process_evaluation_gives_the_same_per_example_l_k(tmp_path):
    out = tmp_path / "ddp.pt"
    proc = subprocess.run(
        TORCHRUN + [str(HERE / "ddp_evaluate.py"), str(out)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    # Each process weighed its own share of the five batches of 7, 7, 7, 7 and 2 examples.
    shares = [torch.load(f"{out}.rank{r}") for r in (0, 1)]
    assert [s["world_size"] for s in shares] == [2, 2]
    assert [s["batch_sizes"] for s in shares] == [[7, 7, 2], [7, 7]]
    pyro.set_rng_seed(0)
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(16, 8), batch_norm=True))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((30, 10), 0.4), generator=torch.Generator().manual_seed(1))
    single = evaluate(model, guide, x, num_samples=20, batch_size=7, seed=3)
    assert ddp["log_likelihood_per_example"].shape == (30,)
    torch.testing.assert_close(
        ddp["log_likelihood_per_example"], single["log_likelihood_per_example"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(ddp["elbo_per_example"], single["elbo_per_example"], rtol=1e-5, atol=1e-5)
    assert ddp["kl_per_layer"] == pytest.approx(single["kl_per_layer"], rel=1e-5)


TRAIN = [
    "-m", "pyro_lvae", "train", "--preset", "lvae-bn-wu-2", "--latent-sizes", "16,8", "--hidden-sizes", "64,32",
    "--epochs", "6", "--warmup-epochs", "2", "--train-subset", "4000", "--test-subset", "200", "--batch-size", "200",
    "--num-importance-samples", "10", "--eval-every", "3", "--no-progress",
]  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_training_follows_the_one_process_loss_curve(tmp_path, shared_data_root):
    data = ["--data-root", str(shared_data_root)]
    one = subprocess.run(
        [sys.executable] + TRAIN + ["--out", str(tmp_path / "one")] + data, capture_output=True, text=True, env=ENV
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        TORCHRUN + TRAIN + ["--out", str(tmp_path / "two")] + data, capture_output=True, text=True, env=ENV
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Process 1 of 2 (gloo backend)" in two.stderr
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["epoch"] for m in b] == list(range(1, 7))  # rank 0 alone writes the metrics
    assert [m["beta"] for m in a] == [m["beta"] for m in b]  # the same warm-up
    curve_a = torch.tensor([m["train_objective"] for m in a])
    curve_b = torch.tensor([m["train_objective"] for m in b])
    # Same global batch and schedule: the curves agree within 2% (batch norm sees half
    # batches and the draws differ), while training itself moves them by far more.
    assert (curve_a[0] - curve_a[-1]).abs() > 20 * 0.02 * curve_a[-1].abs()
    torch.testing.assert_close(curve_b, curve_a, rtol=0.02, atol=0.0)
    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    assert rb["test_log_likelihood"] == pytest.approx(ra["test_log_likelihood"], rel=0.02)
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_by_rank"]) == 2
    # A 2-process checkpoint resumes in one process, with a warning that ranks > 0 restart their streams.
    more = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_lvae",
            "train",
            "--out",
            str(tmp_path / "two"),
            "--resume",
            "--epochs",
            "7",
            "--no-final-eval",
            "--no-progress",
        ]
        + data,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert "written by 2 processes, not 1" in more.stderr
    assert [m["epoch"] for m in _metrics(tmp_path / "two")] == list(range(1, 8))


def _worker_of_rank(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The PID of torchrun's worker process with ``RANK=rank`` (its child with that environment)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


def test_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path, shared_data_root):
    """SIGTERM reaches rank 1 only: the ranks agree to stop after the same step, rank 0 writes
    the mid-epoch checkpoint, and a resume with two processes finishes the run."""
    import signal
    import time

    run = tmp_path / "run"
    # Batches of 20 make an epoch 200 steps long, so that the signal, sent as soon as epoch 1's
    # checkpoint appears, lands inside epoch 2 even on a fast machine (with 20 steps per epoch the
    # whole run could finish before the signal arrived).
    # The moving average rides along: rank 0's is checkpointed and given to every rank.
    data = ["--data-root", str(shared_data_root), "--batch-size", "20", "--ema", "0.9"]
    proc = subprocess.Popen(
        TORCHRUN + TRAIN + ["--out", str(run)] + data,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()
    ):
        time.sleep(0.05)
    checkpoint = run / "checkpoint.pt"
    while time.time() < deadline and not (
        checkpoint.exists() and torch.load(checkpoint, weights_only=False)["epoch"] >= 1
    ):
        time.sleep(0.05)
    os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0, err[-2000:]  # the workers stopped with the signal's status
    ckpt = torch.load(checkpoint, weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["partial"] is not None and ckpt["partial"]["step"] > 0, err[-2000:]
    assert (
        len(ckpt["partial"]["seen"]) == 2 and ckpt["partial"]["seen"][0] == ckpt["partial"]["seen"][1]
    )  # the same steps
    more = subprocess.run(
        TORCHRUN + TRAIN + ["--out", str(run), "--resume"] + data, capture_output=True, text=True, env=ENV
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert [m["epoch"] for m in _metrics(run)] == list(range(1, 7))
