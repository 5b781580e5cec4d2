"""The Variational Ladder Autoencoder: sites, a valid mean-field ELBO, training and traversals."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_lvae import get_preset, make_guide, make_model
from pyro_lvae.config import ModelConfig
from pyro_lvae.inference.objectives import elbo_for
from pyro_lvae.models.vlae import VLAEGuide, VLAEModel
from pyro_lvae.training import train


def _small(batch_norm: bool = False) -> tuple[VLAEModel, VLAEGuide]:
    cfg = ModelConfig(
        family="vlae",
        guide="vae",
        input_dim=10,
        latent_sizes=(3, 2, 2),
        hidden_sizes=(16, 12, 8),
        batch_norm=batch_norm,
    )
    model = make_model(cfg)
    return model, make_guide(model)


def _latent_sites(fn, x) -> list[str]:
    tr = poutine.trace(fn).get_trace(x)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n.startswith("z")]


def test_model_and_guide_sample_the_same_sites_in_the_same_order():
    model, guide = _small()
    x = torch.bernoulli(torch.full((4, 10), 0.5))
    assert _latent_sites(model, x) == _latent_sites(guide, x) == ["z3", "z2", "z1"]
    # Every prior layer is N(0, I), independent of the others.
    tr = poutine.trace(model).get_trace(x)
    for name in ("z1", "z2", "z3"):
        base = tr.nodes[name]["fn"].base_dist
        assert torch.equal(base.loc, torch.zeros_like(base.loc)) and torch.equal(
            base.scale, torch.ones_like(base.scale)
        )


def test_mean_field_elbo_is_valid_and_unbiased():
    model, guide = _small()
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    assert isinstance(elbo_for(guide), TraceMeanField_ELBO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed to verify mean field restriction"
        mf = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True).loss(model, guide, x)
    mc = Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(model, guide, x)
    assert mf == pytest.approx(mc, abs=0.5)  # same expectation; MC standard error ≈ 0.1 here


def test_the_top_layer_reaches_x_through_more_networks():
    model, _ = _small()
    z = [torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 2)]
    calls = []
    hooks = [net.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, net in enumerate(model.ladder)]
    model.decode(z)
    for h in hooks:
        h.remove()
    assert calls == [2, 1, 0]  # f_3, then f_2([z~3, z2]), then f_1([z~2, z1])


def test_traverse_varies_one_layer_only():
    model, _ = _small()
    model.eval()
    grid = model.traverse(2, steps=5)
    assert grid.shape == (5, 5, 10)
    assert not torch.allclose(grid[0, 0], grid[-1, -1])
    with pytest.raises(ValueError, match="layer"):
        model.traverse(4)
    # Codes built by hand: layer 2's first two units sweep the grid, everything else is `fixed`.
    sizes = model.config.latent_sizes
    fixed = [torch.randn(s) for s in sizes]
    values = torch.linspace(-1.5, 1.5, 4)
    grid = model.traverse(2, steps=4, span=1.5, fixed=fixed)
    for r in range(4):
        for c in range(4):
            z2 = fixed[1].clone()
            z2[0], z2[1] = values[c], values[r]
            codes = [fixed[0][None], z2[None]] + [f[None] for f in fixed[2:]]
            torch.testing.assert_close(grid[r, c], model.decode(codes).mean[0])


def test_vlae_trains_from_its_preset_and_its_elbo_improves(mnist):
    config = get_preset("vlae-3").replace(
        epochs=3,
        train_subset=2000,
        test_subset=300,
        hidden_sizes=(128, 128, 128),
        eval_every=1,
        num_importance_samples=50,
        batch_size=100,
    )
    result = train(config, dataset=mnist, progress=False)
    elbos = [m["test_elbo"] for m in result.metrics]
    assert all(torch.isfinite(torch.tensor(elbos)))
    assert elbos[-1] > elbos[0] + 5  # nats per example
    assert result.results["test_log_likelihood"] >= result.results["test_elbo"]
    assert len(result.metrics[-1]["test_kl_per_unit"]) == 3
    assert pyro.get_param_store().keys()  # registered under the vlae prefix


def test_traversal_figure_has_one_panel_per_layer(tmp_path):
    from PIL import Image

    from pyro_lvae.analysis.plots import vlae_traversals

    cfg = ModelConfig(family="vlae", guide="vae", input_dim=16, latent_sizes=(2, 1), hidden_sizes=(8, 8))
    fig = vlae_traversals(make_model(cfg), steps=3, image_shape=(4, 4), path=tmp_path / "t.png")
    assert len(fig.axes) == 2
    assert Image.open(tmp_path / "t.png").size == (640, 350)
