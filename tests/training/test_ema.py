"""The exponential moving average of the weights: its formula, its use by every evaluation,
its checkpoint, and what results.json says about it."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch

from pyro_lvae import ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig
from pyro_lvae.inference.evaluation import evaluate
from pyro_lvae.training import train
from pyro_lvae.training.batches import epoch_seed
from pyro_lvae.training.ema import ExponentialMovingAverage, ema_decay_at
from pyro_lvae.training.run_dir import load_run


def _pair():
    model = GenerativeModel(ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)), name="ema")
    return model, LadderGuide(model)


def test_the_average_of_a_constant_is_the_constant_bit_for_bit():
    model, guide = _pair()
    ema = ExponentialMovingAverage(model, guide, decay=0.999)
    for _ in range(50):
        ema.update()
    state = ema.state_dict()
    for owner, module in (("model", model), ("guide", guide)):
        for key, value in module.state_dict().items():
            assert torch.equal(state[owner][key], value), key


def test_the_average_follows_the_ramped_decay_formula():
    """θ̄ after updates with θ = 1, 2, 3, …: θ̄_t = d_t θ̄_{t-1} + (1 − d_t) θ_t, d_t = min(decay, (1+t)/(10+t))."""
    lin, empty = torch.nn.Linear(1, 1, bias=False), torch.nn.Module()
    with torch.no_grad():
        lin.weight.fill_(0.0)
    # decay 0.2: the ramp (1 + n)/(10 + n) exceeds it from the third update on, so both branches act.
    ema = ExponentialMovingAverage(lin, empty, decay=0.2)
    expected = 0.0
    for t in range(1, 8):
        with torch.no_grad():
            lin.weight.fill_(float(t))
        ema.update()
        d = min(0.2, t / (9 + t))  # written out: n = t - 1 updates before this one
        expected = d * expected + (1 - d) * t
    assert ema_decay_at(0.5, 0) == pytest.approx(0.1) and ema_decay_at(0.5, 100) == 0.5
    assert ema.state_dict()["model"]["weight"].item() == pytest.approx(expected, rel=1e-6)


def test_shared_tensors_are_averaged_once_and_applied_swaps_back():
    model, guide = _pair()
    ema = ExponentialMovingAverage(model, guide, decay=0.9)
    unique = {id(t) for m in (model, guide) for t in m.state_dict(keep_vars=True).values()}
    assert len(ema._live) == len(unique) < len(model.state_dict()) + len(guide.state_dict())
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    after = model.state_dict()
    assert all(torch.equal(after[k], moved[k]) for k in moved)  # restored
    weight = 1 - ema_decay_at(0.9, 0)
    for k, v in inside.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, live[k] + weight * (moved[k] - live[k]))


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, math.nan, math.inf, True])
def test_a_bad_decay_is_refused_in_one_line_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"ema must be a decay in \[0, 1\)"):
        TrainConfig(ema=bad)


def _config(**kw) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)),
        train=TrainConfig(epochs=3, batch_size=16, num_importance_samples=3, eval_every=1, **kw),
    )


def test_every_evaluation_uses_the_average_and_says_so(tmp_path, make_synthetic):
    run = tmp_path / "run"
    result = train(_config(ema=0.9), out_dir=run, dataset=make_synthetic(), progress=False)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert result.results.weights == "ema" and json.loads((run / "results.json").read_text())["weights"] == "ema"
    assert all(m["weights"] == "ema" for m in result.metrics)
    # The returned model holds the average; the checkpoint keeps both.
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, ckpt["ema"]["model"][key]), key
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"]["model"][k]) for k in ckpt["model"])
    # The last periodic evaluation is the average's own number, on the same draws; the raw
    # weights give another.
    tc = _config(ema=0.9).train
    options = {"num_samples": tc.eval_particles, "seed": epoch_seed(tc.seed, tc.epochs - 1)}
    averaged = evaluate(result.model, result.guide, result.data.test, **options)["elbo"]
    assert result.metrics[-1]["test_elbo"] == pytest.approx(averaged, rel=1e-6)
    raw_model, raw_guide, _, _ = load_run(run, weights="raw")
    assert evaluate(raw_model, raw_guide, result.data.test, **options)["elbo"] != pytest.approx(averaged, rel=1e-4)
    # evaluate / report / export load the average by default, the raw weights on request.
    model, _, _, loaded = load_run(run)
    assert loaded["weights"] == "ema"
    assert all(torch.equal(v, ckpt["ema"]["model"][k]) for k, v in model.state_dict().items())
    raw, _, _, loaded = load_run(run, weights="raw")
    assert loaded["weights"] == "raw" and all(torch.equal(v, ckpt["model"][k]) for k, v in raw.state_dict().items())


def test_without_ema_the_raw_weights_are_evaluated_and_ema_cannot_be_asked_for(tmp_path, make_synthetic):
    run = tmp_path / "run"
    result = train(_config(), out_dir=run, dataset=make_synthetic(), progress=False)
    assert result.results.weights == "raw" and "weights" not in result.metrics[-1]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["ema"] is None
    with pytest.raises(ValueError, match="kept no moving average"):
        load_run(run, weights="ema")
    pyro.clear_param_store()
