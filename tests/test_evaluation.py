"""Per-example L_K: agreement with pyro.infer.Importance on single examples, chunking, memory."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Importance

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.evaluation import evaluate, importance_sampled_bounds, particle_chunk_size


def _model() -> GenerativeModel:
    return GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(2, 2), hidden_sizes=(8, 8), batch_norm=True)).eval()


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_lk_matches_pyro_importance_on_single_examples(guide_cls):
    """On the very draws of ``Importance`` run example by example, the batched estimator
    gives the same log-weights and the same L_K for every example."""
    torch.set_default_dtype(torch.float64)
    model = _model()
    guide = guide_cls(model).eval()
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    k = 200
    runs = [Importance(model, guide, num_samples=k).run(x[i : i + 1]) for i in range(len(x))]
    # Stack each run's latent draws into (k, batch, dim) and feed them to the guide.
    draws = {
        f"z{j}": torch.stack([torch.cat([tr.nodes[f"z{j}"]["value"] for tr in run.exec_traces]) for run in runs], 1)
        for j in (1, 2)
    }
    with pyro.plate("particles", k, dim=-2):
        fixed = poutine.trace(poutine.condition(guide, data=draws)).get_trace(x)
    for name in draws:
        fixed.nodes[name]["is_observed"] = False  # replay these values as ordinary draws
    ours = importance_sampled_bounds(model, poutine.replay(guide, trace=fixed), x, num_samples=k, chunk_size=k)
    for i, run in enumerate(runs):
        theirs = torch.stack([torch.as_tensor(w) for w in run.log_weights])
        torch.testing.assert_close(ours["log_weights"][:, i], theirs, rtol=1e-10, atol=1e-10)
        assert ours["log_likelihood"][i].item() == pytest.approx(run.get_log_normalizer().item(), abs=1e-9)
    # Importance on the whole batch estimates log p(batch) = the sum over examples, not a per-example bound.
    fresh = importance_sampled_bounds(model, guide, x, num_samples=3000)
    whole = Importance(model, guide, num_samples=k).run(x).get_log_normalizer().item()
    assert abs(whole - fresh["log_likelihood"].sum().item()) < 1.0
    assert abs(whole - fresh["log_likelihood"].mean().item()) > 5.0


def test_lk_bounds_are_ordered_and_shaped():
    model = _model()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((10, 6), 0.5))
    out = importance_sampled_bounds(model, guide, x, num_samples=50, chunk_size=7)
    assert out["log_weights"].shape == (50, 10)
    assert out["layer_kl"].shape == (2, 10)
    assert (out["log_likelihood"] >= out["elbo"]).all()  # Jensen, holds for every sample set
    torch.testing.assert_close(out["elbo"], out["reconstruction"] - out["layer_kl"].sum(0))


def test_chunk_size_respects_memory_budget():
    model = GenerativeModel(ModelConfig())
    big = particle_chunk_size(model, 500, memory_budget=4 * 2**30)
    small = particle_chunk_size(model, 500, memory_budget=2**20)
    assert big > small >= 1
    assert particle_chunk_size(model, 500, memory_budget=1) == 1


def test_evaluate_restores_training_mode_and_validates():
    model = _model()
    guide = LadderGuide(model)
    model.train()
    guide.train()
    x = torch.bernoulli(torch.full((9, 6), 0.5))
    out = evaluate(model, guide, x, num_samples=4, batch_size=4)
    assert model.training and guide.training
    assert out["num_examples"] == 9 and len(out["kl_per_layer"]) == 2
    assert out["log_likelihood_per_example"].shape == (9,)
    with pytest.raises(ValueError, match="shape"):
        evaluate(model, guide, x[0], num_samples=4)
