"""The benchmark harness runs end to end in its quick mode (a smoke test; no times are asserted),
and its baselines compute the library's loss and gradients."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.precision import cpu_has_bf16_instructions
from pyro_lvae.training.steps import TrainingStep

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from baseline import CompactLVAE, compact_loss  # noqa: E402


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_the_compact_baseline_has_the_librarys_loss_and_gradients(guide_cls):
    """In float64 on the same draws: the same loss, and every gradient the same once the fused
    heads' gradients are split back into mean and variance parts."""
    cfg = ModelConfig(input_dim=12, latent_sizes=(5, 4, 3), hidden_sizes=(16, 12, 8))
    model = GenerativeModel(cfg, name="bench").double()
    guide = guide_cls(model).double()
    compact = CompactLVAE(model, guide)
    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64))
    beta = torch.tensor(0.7, dtype=torch.float64)
    pyro.set_rng_seed(5)
    library = TrainingStep(model, guide, learning_rate=1e-3).loss(x, beta)
    library.backward()
    pyro.set_rng_seed(5)
    ours = compact_loss(compact, x, beta)
    ours.backward()
    torch.testing.assert_close(ours, library, rtol=1e-12, atol=0)
    heads = guide.upward_net["heads"] if guide_cls is LadderGuide else guide.heads
    for head, fused in [*zip(heads, compact.up_heads), *zip(model.top_down_heads, compact.down_heads)]:
        torch.testing.assert_close(fused.weight.grad, torch.cat([head.loc.weight.grad, head.var.weight.grad]))
        torch.testing.assert_close(fused.bias.grad, torch.cat([head.loc.bias.grad, head.var.bias.grad]))
    torch.testing.assert_close(compact.decoder[-1].weight.grad, model.decoder_head.weight.grad)
    torch.testing.assert_close(compact.down[0][0].weight.grad, model.top_down_mlps[0].net[0].weight.grad)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_the_combined_probe_keeps_the_fast_engines_loss(guide_cls):
    """``bench/probes.py combined`` (stacked heads, β as a float, the rewritten merge, the lean
    Monte Carlo ELBO) computes the fast engine's loss on the same parameters and draws, in float64."""
    from probes import check_combined_loss, stack_heads

    cfg = ModelConfig(input_dim=12, latent_sizes=(5, 4, 3), hidden_sizes=(16, 12, 8))
    model = GenerativeModel(cfg, name="fast").double()
    guide = guide_cls(model).double()
    copy_model = GenerativeModel(cfg, name="combined").double()
    copy_guide = guide_cls(copy_model).double()
    copy_model.load_state_dict(model.state_dict())
    copy_guide.load_state_dict(guide.state_dict())
    stack_heads(copy_model, copy_guide)
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 5 for m in copy_guide.modules())
    fast = TrainingStep(model, guide, learning_rate=1e-3)
    combined = TrainingStep(copy_model, copy_guide, learning_rate=1e-3)
    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64))
    assert check_combined_loss(fast, combined, x, torch.tensor(0.7, dtype=torch.float64)) < 1e-12


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
    assert "| vae | fast engine, timed alone with the baseline (" in proc.stdout
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["matmul_roofline_flops"] > 0
    if not torch.cuda.is_available():  # the CPU's instruction level: without bfloat16 ones bf16 is emulated
        assert results["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert results["cpu_native_bf16"] is cpu_has_bf16_instructions()
    for guide in ("ladder", "vae"):
        r = results["guides"][guide]
        assert set(r["step_ms"]) == {
            "svi engine",
            "+torch Adam",
            "+no validation",
            "+registered once",
            "fast engine",
            "plain, library modules",
            "baseline",
        }
        assert all(v > 0 for v in r["step_ms"].values())
        assert r["ratio_to_baseline"]["baseline"] == 1.0
        assert set(r["head_to_head_ms"]) == {"fast engine", "baseline"}
        assert all(v > 0 for v in r["head_to_head_ms"].values())
        assert r["baseline_loss_rel_diff"] < 1e-4  # the baseline computes the library's loss
        assert (
            r["step_flops"] > 0
            and r["epoch_seconds"] > 0
            and r["epoch_seconds_svi_engine"] > 0
            and r["lk_pairs_per_second"] > 0
            and r["lk_seconds_traced"] > 0
        )
        assert r["peak_memory_bytes"] > 0


def _run_lk_probe(*args: str) -> str:
    """The standard output of ``bench/lk_probes.py args``, which must exit cleanly."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lk_probes.py"), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_lk_probes_run_and_every_slice_size_gives_the_same_bound(shared_data_root):
    """A smoke test of bench/lk_probes.py at tiny sizes: the slice size changes the speed only,
    so each model prints the same L_K for every size, up to float32 rounding."""
    tiny = ["--data-root", str(shared_data_root), "--examples", "7", "--num-samples", "5", "--rounds", "1"]
    out = _run_lk_probe("slices", *tiny, "--sizes", "10,1000000")
    for name in ("lvae-bn-wu-5", "vae-bn-wu-3"):
        rows = [line for line in out.splitlines() if line.startswith(f"{name}:")]
        assert len(rows) == 2
        bounds = [float(row.rsplit("(L_K ", 1)[1].rstrip(")")) for row in rows]
        assert abs(bounds[0] - bounds[1]) < 1e-3  # float32 rounding of matrix products of other sizes
    out = _run_lk_probe("elementwise", "--rounds", "1")
    assert "the closed form's term" in out and "log1p" in out
    assert re.search(r"^inference_mode +median", _run_lk_probe("inference-mode", *tiny), re.M)
    out = _run_lk_probe("folded-batch-norm", *tiny)
    assert re.search(r"^unfolded +median", out, re.M) and re.search(r"^folded +median", out, re.M)
    assert float(out.split("largest difference ", 1)[1].split(" nats")[0]) < 1e-1  # float32 rounding only
    out = _run_lk_probe("bf16", *tiny)
    assert re.search(r"^fp32 +median", out, re.M) and re.search(r"^bf16 +median", out, re.M)
    assert float(re.search(r"largest ([0-9.]+) nats", out).group(1)) < 1.0  # bf16 rounding, not another bound
    out = _run_lk_probe("evaluate-bf16", *tiny)
    assert re.search(r"^bf16 / fp32, medians: [0-9.]+x$", out, re.M)
    bounds = {
        p: float(re.search(rf"^{p}: L_5 (-[0-9.]+), L1 -[0-9.]+ on 7 images$", out, re.M).group(1))
        for p in ("fp32", "bf16")
    }
    assert bounds["fp32"] != bounds["bf16"] and abs(bounds["fp32"] - bounds["bf16"]) < 1.0  # bf16 rounding of one bound


def test_lk_pretrained_records_the_precision_it_evaluated_in(shared_data_root, tmp_path):
    """bench/lk_pretrained.py at K = 2 in bf16: it writes its row with the precision, and an ELBO
    near the manifest's fp32 one (Monte Carlo error of 10,000 images, and bf16 rounding)."""
    out = tmp_path / "lk.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lk_pretrained.py"), "--device", "cpu", "--num-samples", "2"]
        + ["--models", "lvae-bn-wu-5", "--data-root", str(shared_data_root), "--precision", "bf16", "--json", str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["precision"] == "bf16" and row["num_samples"] == 2 and row["num_examples"] == 10_000
    assert abs(row["elbo"] - row["manifest_elbo"]) < 0.5


def test_count_operations_counts_what_a_step_dispatches():
    from probes import count_operations

    x = torch.ones(3)
    assert count_operations(lambda: (x + 1) * 2) == 2
    counts = []
    batch, beta = torch.ones(5, 4), torch.tensor(0.5)
    for depth, sizes in enumerate(((3,), (3, 2))):
        model = GenerativeModel(
            ModelConfig(input_dim=4, latent_sizes=sizes, hidden_sizes=(8,) * len(sizes)), name=f"c{depth}"
        )
        step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3)
        step(batch, beta)
        counts.append(count_operations(lambda step=step: step(batch, beta)))
    assert 0 < counts[0] < counts[1]  # a second layer dispatches more


def test_the_kernel_count_leaves_out_views_and_counts_both_recorded_bodies():
    from probes import _recorded_bodies, kernel_count

    from pyro_lvae import ExperimentConfig

    x = torch.ones(3)
    assert kernel_count(lambda: (x + 1).view(3, 1).t() * 2) == 2
    config = ExperimentConfig(model=ModelConfig(input_dim=4, latent_sizes=(3, 2), hidden_sizes=(8, 8), batch_norm=True))
    counts = _recorded_bodies(config, torch.bernoulli(torch.full((6, 4), 0.5)), torch.tensor(0.3))
    # The engine's update adds the snapshot, the skip decision and the write-back to a step.
    assert counts["cuda-graph engine's recorded update"] > counts["baseline's recorded step"] > 50


def test_the_float_beta_probe_takes_the_same_step_as_the_engine():
    from probes import engine_variant

    x, beta = torch.bernoulli(torch.full((6, 4), 0.5)), torch.tensor(0.3)
    after = []
    for probe in ("engine", "float-beta"):
        torch.manual_seed(0)  # the same initial parameters for both
        model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(3, 2), hidden_sizes=(8, 8)), name=probe)
        step = TrainingStep(model, BottomUpGuide(model), learning_rate=1e-2)
        run = engine_variant(probe, step, x, beta) if probe == "float-beta" else (lambda step=step: step(x, beta))
        pyro.set_rng_seed(5)
        run()
        after.append([p.detach().clone() for p in [*step.model.parameters(), *step.guide.parameters()]])
    for a, b in zip(*after):
        torch.testing.assert_close(a, b)


def test_the_operator_view_of_profile_step_counts_calls_per_step(capsys):
    """``bench/profile_step.py``'s torch.profiler view: calls and self time per step of each
    operator, the wall clock apart, and a table of the operators that differ most."""
    from profile_step import WALL, _print_operator_table, operator_times

    a, b = torch.ones(8, 8), torch.ones(8, 8)
    ops = {"fast engine": operator_times(lambda: (a @ b).sum(), steps=4), "baseline": operator_times(lambda: a @ b, 4)}
    assert ops["fast engine"]["aten::mm"][1] == 1.0 and ops["fast engine"]["aten::sum"][1] == 1.0
    assert "aten::sum" not in ops["baseline"] and ops["baseline"][WALL][0] > 0
    _print_operator_table(ops, rows=3)
    table = capsys.readouterr().out
    assert "| `aten::sum` |" in table and "| all operators |" in table
