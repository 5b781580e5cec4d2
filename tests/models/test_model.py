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


def _kl_gradients_per_layer(model, guide, x) -> list[float]:
    """|∂ KL(q(z_i|·) ‖ p(z_i|·)) / ∂ θ| summed over the guide's and model's parameters, per layer z1 … zL."""
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    params = [p for p in list(model.parameters()) + list(guide.parameters()) if p.requires_grad]
    norms = []
    for i in range(1, model.depth + 1):
        q, p = guide_trace.nodes[f"z{i}"]["fn"], model_trace.nodes[f"z{i}"]["fn"]
        kl = kl_divergence(q, p).sum()
        grads = torch.autograd.grad(kl, params, allow_unused=True, retain_graph=True)
        norms.append(sum(g.abs().sum().item() for g in grads if g is not None))
    return norms


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
    assert sum(losses[-5:]) < 0.97 * sum(losses[:5])  # a relative drop, not noise
    trace = poutine.trace(model).get_trace(x)
    assert [n for n in trace.nodes if n.startswith("z")] == [f"z{i}" for i in range(depth, 0, -1)]
    # Every layer's KL term reaches the parameters: no layer is cut off from training.
    assert all(g > 0 for g in _kl_gradients_per_layer(model, guide, x))


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
        model=ModelConfig(
            input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), activation="tanh", likelihood="gaussian"
        ),
        train=TrainConfig(
            binarization="none", epochs=8, batch_size=16, eval_every=1, num_importance_samples=5, learning_rate=1e-2
        ),
    )
    result = train(config, dataset=make_synthetic(), progress=False)
    elbos = [m["test_elbo"] for m in result.metrics]
    assert all(torch.isfinite(torch.tensor(elbos)))
    assert elbos[-1] > elbos[0] + 0.3 * abs(elbos[0])  # a relative gain (measured: −10.9 → −4.3 nats)
    # The x site is Normal(loc, sqrt(variance)) of the decoder, variance = softplus, floored.
    model = result.model.eval()
    x = result.data.test[:5]
    z1 = torch.randn(5, 3)
    with torch.no_grad():
        loc, var = model.decoder_head(model.decoder_mlp(z1))
        expected = torch.distributions.Normal(loc, var.sqrt()).log_prob(x).sum(-1)
        torch.testing.assert_close(model.likelihood(z1).log_prob(x), expected)
        raw = torch.nn.functional.softplus(model.decoder_head.var(model.decoder_mlp(z1)))
        torch.testing.assert_close(var, raw.clamp_min(1e-5))
    assert all(
        g > 0 for g in _kl_gradients_per_layer(result.model.train(), result.guide.train(), result.data.train[:8])
    )


def test_ladder_guide_site_is_the_merge_of_the_upward_estimate_and_the_models_prior():
    """q(z_i | z_{i+1}, x) is the precision-weighted merge of upward(x)[i-1] and
    prior_params(i, z_{i+1}), with scale √variance; the top layer is the upward estimate."""
    from pyro_lvae import precision_weighted_merge

    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3, 2), hidden_sizes=(8, 8, 8), batch_norm=False))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    trace = poutine.trace(guide).get_trace(x)
    estimates = guide.upward(x)
    top = trace.nodes["z3"]["fn"].base_dist
    torch.testing.assert_close(top.loc, estimates[2][0])
    torch.testing.assert_close(top.scale, estimates[2][1].sqrt())
    for i in (2, 1):
        prior = model.prior_params(i, trace.nodes[f"z{i + 1}"]["value"])
        loc, var = precision_weighted_merge(*estimates[i - 1], *prior)
        site = trace.nodes[f"z{i}"]["fn"].base_dist
        torch.testing.assert_close(site.loc, loc)
        torch.testing.assert_close(site.scale, var.sqrt())


def test_a_second_model_with_the_default_name_trains_in_the_same_session():
    """The notebook trap: two models built with the default name, one after the other, in
    one Python session. Pyro's param store kept the first model's tensors, and SVI left the
    second model's weights unchanged without a word. Now the second registers as its own
    name, with a warning, and trains."""
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


def test_sampling_and_reconstructing_leave_the_batch_norm_statistics_and_the_mode_alone():
    """Right after training the model is in training mode; sampling from it must not move its
    running statistics (which would change every later evaluation)."""
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=True))
    guide = LadderGuide(model)
    model.train(), guide.train()
    before = [b.clone() for b in [*model.buffers(), *guide.buffers()]]
    model.sample(16)
    model.reconstruct(torch.bernoulli(torch.full((5, 6), 0.5)), guide)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.buffers(), *guide.buffers()], strict=True))
    assert model.training and guide.training
