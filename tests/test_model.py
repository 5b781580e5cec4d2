"""The generative model: depth, likelihoods, sampling, reconstruction, batch norm in eval mode."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import Adam
from torch.distributions import kl_divergence

from pyro_lvae import BottomUpGuide, ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig, elbo_for
from pyro_lvae.training import train


@pytest.mark.parametrize("depth", [1, 2, 6])
@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_any_depth_trains(depth, guide_cls):
    cfg = ModelConfig(input_dim=10, latent_sizes=tuple(range(depth + 1, 1, -1)), hidden_sizes=(8,) * depth)
    model = GenerativeModel(cfg)
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((16, 10), 0.5))
    svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo_for(guide))
    losses = [svi.step(x) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    trace = poutine.trace(model).get_trace(x)
    assert [n for n in trace.nodes if n.startswith("z")] == [f"z{i}" for i in range(depth, 0, -1)]


def test_sample_and_reconstruct():
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(8, 8))).eval()
    guide = LadderGuide(model).eval()
    means = model.sample(7)
    assert means.shape == (7, 10) and ((means > 0) & (means < 1)).all()
    draws = model.sample(7, mean=False)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    recon = model.reconstruct(x, guide)
    assert recon.shape == x.shape and ((recon > 0) & (recon < 1)).all()
    with pytest.raises(ValueError):
        model.sample(0)


def test_batch_norm_uses_running_statistics_in_eval_mode():
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(8, 8), batch_norm=True))
    guide = LadderGuide(model)
    x = torch.rand(12, 10)
    with torch.no_grad():
        guide.train()
        alone, in_batch = guide.upward(x[:1].repeat(2, 1))[0][0][0], guide.upward(x)[0][0][0]
        assert not torch.allclose(alone, in_batch)  # batch statistics depend on the batch
        guide.eval()
        alone, in_batch = guide.upward(x[:1])[0][0][0], guide.upward(x)[0][0][0]
        torch.testing.assert_close(alone, in_batch)
        # Extra leading (particle) dimensions are flattened around batch norm.
        z = torch.randn(3, 12, 2)
        model.eval()
        loc, _ = model.prior_params(1, z)
        torch.testing.assert_close(loc[1, 5], model.prior_params(1, z[1, 5:6])[0][0])


def test_analytic_kl_matches_monte_carlo_per_layer():
    """The per-layer KL the mean-field ELBO uses equals E_q[log q − log p] on the ladder guide's sites."""
    torch.set_default_dtype(torch.float64)
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(8, 8), batch_norm=False))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    for name in ("z2", "z1"):
        q, p = guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]
        analytic = kl_divergence(q, p)  # with the upper layer at its sampled value
        z = q.sample((200000,))
        mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
        se = (q.log_prob(z) - p.log_prob(z)).std(0) / 200000**0.5
        assert (analytic - mc).abs().max() < 5 * se.max() + 1e-6


def test_gaussian_likelihood_trains(make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), activation="tanh", likelihood="gaussian"),
        train=TrainConfig(binarization="none", epochs=8, batch_size=16, eval_every=1, num_importance_samples=5),
    )
    result = train(config, dataset=make_synthetic(), progress=False)
    elbos = [m["test_elbo"] for m in result.metrics]
    assert all(torch.isfinite(torch.tensor(elbos)))
    assert elbos[-1] > elbos[0]


def test_a_second_model_with_the_default_name_trains_in_the_same_session():
    """The notebook trap: two models built with the default name, one after the other, in
    one Python session. Pyro's param store kept the first model's tensors, and SVI left the
    second model's weights unchanged without a word."""
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_lvae import LadderGuide, elbo_for

    cfg = ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8), batch_norm=False)
    x = torch.bernoulli(torch.full((8, 10), 0.5))
    names, moved = [], []
    for i in range(2):
        model = GenerativeModel(cfg)
        guide = LadderGuide(model)
        before = [p.detach().clone() for p in model.parameters()]
        svi = SVI(model, guide, Adam({"lr": 1e-2}), loss=elbo_for(guide))
        if i == 0:
            svi.step(x)
        else:
            with pytest.warns(UserWarning, match="registered as 'lvae_2'"):
                svi.step(x)
        svi.step(x)
        moved.append(all(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        names.append((model.name, guide.name))
    assert moved == [True, True]
    assert names == [("lvae", "lvae.ladder"), ("lvae_2", "lvae.ladder_2")]


def test_models_with_their_own_names_do_not_warn(recwarn):
    cfg = ModelConfig(input_dim=6, latent_sizes=(3,), hidden_sizes=(8,), batch_norm=False)
    first, second = GenerativeModel(cfg, name="a"), GenerativeModel(cfg, name="b")
    x = torch.ones(2, 6)
    first(x), second(x), first(x)
    assert (first.name, second.name) == ("a", "b")
    assert not [w for w in recwarn if "param store" in str(w.message)]
