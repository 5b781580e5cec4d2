"""The latent hierarchy as an API: encode, temperature, resample, interpolate, Predictive."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig, encode, interpolate, resample
from pyro_lvae.models.families import make_guide, make_model
from pyro_lvae.models.hierarchy import Temperature

CFG = ModelConfig(input_dim=6, latent_sizes=(4, 3, 2), hidden_sizes=(8, 8, 4), batch_norm=True)
VLAE = ModelConfig(family="vlae", guide="vae", input_dim=6, latent_sizes=(2, 2), hidden_sizes=(8, 8))


def _trained_looking(model: torch.nn.Module) -> None:
    """Batch-norm statistics away from their initial values, so that eval mode matters."""
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)


def _x(n: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 6), 0.4))


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_encode_gives_one_entry_per_layer_bottom_first(guide_cls):
    model = GenerativeModel(CFG)
    layers = encode(model, guide_cls(model), _x())
    assert [e.layer for e in layers] == [1, 2, 3]
    for e, size in zip(layers, CFG.latent_sizes):
        assert e.loc.shape == e.scale.shape == e.sample.shape == (5, size)
        assert (e.scale > 0).all()
    ladder = guide_cls is LadderGuide
    assert all((e.estimate_loc is not None) == ladder for e in layers)
    assert all((e.prior_loc is not None) == (ladder and e.layer < 3) for e in layers)


def test_encode_works_for_the_vlae():
    model = make_model(VLAE)
    assert [e.loc.shape for e in encode(model, make_guide(model), _x())] == [(5, 2), (5, 2)]


def test_the_ladder_posterior_is_the_product_of_the_recorded_gaussians():
    model = GenerativeModel(CFG)
    _trained_looking(model)
    guide = LadderGuide(model)
    x = _x()
    layers = encode(model, guide, x)
    with torch.no_grad():
        model.eval()
        guide.eval()
        estimates = guide.upward(x)
    for layer in layers:
        torch.testing.assert_close(layer.estimate_loc, estimates[layer.layer - 1][0])
        torch.testing.assert_close(layer.estimate_scale, estimates[layer.layer - 1][1].sqrt())
        if layer.prior_loc is not None:  # the model's prior on the guide's own draw of the layer above
            with torch.no_grad():
                loc, var = model.prior_params(layer.layer, layers[layer.layer].sample)
            torch.testing.assert_close(layer.prior_loc, loc)
            torch.testing.assert_close(layer.prior_scale, var.sqrt())
    for layer in layers:
        if layer.prior_loc is None:  # the top layer: q(z_L | x) is the estimate itself
            torch.testing.assert_close(layer.loc, layer.estimate_loc)
            continue
        p_est, p_prior = layer.estimate_scale**-2, layer.prior_scale**-2
        var = 1 / (p_est + p_prior)
        torch.testing.assert_close(layer.scale, var.sqrt())
        torch.testing.assert_close(layer.loc, var * (layer.estimate_loc * p_est + layer.prior_loc * p_prior))


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_encoded_samples_are_the_guide_sites_draws_in_eval_mode(guide_cls):
    model = GenerativeModel(CFG)
    guide = guide_cls(model)
    _trained_looking(model)
    _trained_looking(guide)
    x = _x()
    pyro.set_rng_seed(3)
    layers = encode(model, guide, x)
    assert model.training and guide.training  # the modes are restored
    model.eval()
    guide.eval()
    pyro.set_rng_seed(3)
    trace = poutine.trace(guide).get_trace(x)
    for e in layers:
        torch.testing.assert_close(e.sample, trace.nodes[f"z{e.layer}"]["value"])
        torch.testing.assert_close(e.loc, trace.nodes[f"z{e.layer}"]["fn"].base_dist.loc)


def test_temperature_zero_is_deterministic_and_one_is_the_model():
    model = GenerativeModel(CFG).eval()
    assert torch.equal(model.sample(4, temperature=0.0), model.sample(4, temperature=0.0))
    pyro.set_rng_seed(1)
    new = model.sample(4, temperature=1.0, mean=False)
    pyro.set_rng_seed(1)
    old = poutine.trace(poutine.uncondition(model)).get_trace(torch.zeros(4, 6)).nodes["x"]["value"]
    assert torch.equal(new, old)
    pyro.set_rng_seed(2)
    assert not torch.equal(model.sample(4), model.sample(4))


def test_temperature_scales_each_layers_standard_deviation():
    model = GenerativeModel(CFG).eval()
    temps = (0.5, 2.0, 0.25)
    trace = poutine.trace(Temperature(temps)(poutine.uncondition(model))).get_trace(torch.zeros(3, 6))
    replayed = poutine.trace(poutine.replay(poutine.uncondition(model), trace=trace)).get_trace(torch.zeros(3, 6))
    for i, t in enumerate(temps, start=1):
        scaled, plain = trace.nodes[f"z{i}"]["fn"].base_dist, replayed.nodes[f"z{i}"]["fn"].base_dist
        torch.testing.assert_close(scaled.scale, t * plain.scale)
        torch.testing.assert_close(scaled.loc, plain.loc)


def test_a_per_layer_temperature_fixes_only_the_layers_at_zero():
    model = GenerativeModel(CFG).eval()
    top_only = [model.sample(3, temperature=(0.0, 0.0, 1.0)) for _ in range(2)]
    assert not torch.equal(*top_only)  # z3 is drawn, z2 and z1 follow their means
    assert torch.equal(model.sample(3, temperature=(0.0, 0.0, 0.0)), model.sample(3, temperature=(0.0, 0.0, 0.0)))


def test_resample_keeps_the_encoded_layers_and_redraws_the_others():
    model = GenerativeModel(CFG)
    guide = LadderGuide(model)
    x = _x(2)
    pyro.set_rng_seed(5)
    encoded = encode(model, guide, x)
    pyro.set_rng_seed(5)
    images, zs = resample(model, guide, x, keep_from=2, num_samples=4, return_latents=True)
    assert images.shape == (4, 2, 6) and [z.shape for z in zs] == [(4, 2, 4), (4, 2, 3), (4, 2, 2)]
    for layer in (2, 3):
        torch.testing.assert_close(zs[layer - 1], encoded[layer - 1].sample.expand(4, -1, -1))
    assert not torch.allclose(zs[0][0], zs[0][1])  # z1 redrawn for every sample
    assert resample(model, guide, x, keep_from=1).shape == (2, 6)


def test_interpolate_moves_only_the_top_layer_between_the_two_posterior_means():
    model = GenerativeModel(CFG)
    guide = LadderGuide(model)
    x = _x(2)
    images = interpolate(model, guide, x[0], x[1], steps=5)
    assert images.shape == (5, 6) and images.min() >= 0 and images.max() <= 1
    top = encode(model, guide, x)[-1].loc
    assert not torch.allclose(top[0], top[1])

    def decoded(z_top):  # the means of the layers below, then the pixel means
        with torch.no_grad():
            model.eval()
            z = z_top
            for layer in (2, 1):
                z, _ = model.prior_params(layer, z)
            return model.likelihood(z).mean

    # The two ends, and the midpoint of the straight line between the top-layer means.
    torch.testing.assert_close(images[0:1], decoded(top[0:1]))
    torch.testing.assert_close(images[2:3], decoded((top[0:1] + top[1:2]) / 2))
    torch.testing.assert_close(images[4:5], decoded(top[1:2]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, g, x: m.sample(2, temperature=-0.5), "finite number ≥ 0"),
        (lambda m, g, x: m.sample(2, temperature=float("inf")), "finite number ≥ 0"),
        (lambda m, g, x: m.sample(2, temperature=(1.0, 1.0)), "has 2 entries but the model has 3 layers"),
        (lambda m, g, x: resample(m, g, x, keep_from=4), r"keep_from must be a layer in 1…3, got 4"),
        (lambda m, g, x: resample(m, g, x, keep_from=0), r"keep_from must be a layer in 1…3, got 0"),
        (
            lambda m, g, x: encode(m, g, x[:, :5]),
            r"x has shape \(5, 5\), but the model expects input_dim=6 features per example",
        ),
        (lambda m, g, x: encode(m, g, x[0]), r"shape \(N, input_dim\)"),
    ],
)
def test_bad_input_gets_one_clear_line(call, match):
    model = GenerativeModel(CFG)
    with pytest.raises(ValueError, match=match):
        call(model, LadderGuide(model), _x())


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_predictive_returns_every_latent_and_x_with_a_sample_dimension(guide_cls):
    model = GenerativeModel(CFG)
    guide = guide_cls(model)
    _trained_looking(model)
    _trained_looking(guide)
    model.eval()
    guide.eval()
    buffers = [b.clone() for b in list(model.buffers()) + list(guide.buffers())]
    x = _x(3)
    out = Predictive(model, guide=guide, num_samples=7)(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "z1": (7, 3, 4),
        "z2": (7, 3, 3),
        "z3": (7, 3, 2),
        "x": (7, 3, 6),
    }
    assert all(torch.equal(a, b) for a, b in zip(buffers, list(model.buffers()) + list(guide.buffers())))
    draws = Predictive(poutine.uncondition(model), guide=guide, num_samples=7)(x)["x"]
    assert draws.shape == (7, 3, 6) and not torch.equal(draws, x.expand(7, -1, -1))  # p(x | z) draws


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_interpolation_is_deterministic_and_checks_its_input_first(guide_cls):
    model = GenerativeModel(CFG)
    guide = guide_cls(model)
    x = _x(2)
    assert torch.equal(interpolate(model, guide, x[0], x[1], steps=4), interpolate(model, guide, x[0], x[1], steps=4))
    with pytest.raises(ValueError, match="finite number ≥ 0"):
        interpolate(model, guide, x[0], x[1], temperature=-1.0)
