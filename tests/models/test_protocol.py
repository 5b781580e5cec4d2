"""Every family meets the model/guide contract, and keeps its own behaviour with it."""

from __future__ import annotations

import pytest
import torch

from pyro_lvae import ModelConfig, elbo_for, make_guide, make_model
from pyro_lvae.models.protocol import HierarchicalGuide, HierarchicalModel
from pyro_lvae.models.registration import registered_once

FAMILIES = {
    "lvae-ladder": ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4)),
    "lvae-vae": ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), guide="vae"),
    "vlae": ModelConfig(family="vlae", guide="vae", input_dim=6, latent_sizes=(2, 2), hidden_sizes=(8, 8)),
    "vqvae": ModelConfig(
        family="vqvae", guide="vae", input_dim=6, latent_sizes=(2,), hidden_sizes=(8,), codebook_size=4, code_dim=3
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_a_hierarchical_model_and_guide(family):
    model = make_model(FAMILIES[family])
    guide = make_guide(model)
    assert isinstance(model, HierarchicalModel) and isinstance(guide, HierarchicalGuide)
    # Analytic KL where the guide is a product of per-layer Gaussians given x (ladder, VLAE);
    # Monte Carlo where a layer's guide depends on the sample below it (bottom-up) or is not
    # Gaussian (VQ-VAE).
    expected = {"lvae-ladder": "TraceMeanField_ELBO", "vlae": "TraceMeanField_ELBO"}.get(family, "Trace_ELBO")
    assert type(elbo_for(guide)).__name__ == expected
    with registered_once(model, guide):
        assert model.register_params is False and guide.register_params is False
    assert model.register_params is True and guide.register_params is True


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_reports_its_own_test_metrics(family):
    model = make_model(FAMILIES[family]).eval()
    guide = make_guide(model).eval()
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    metrics = model.test_metrics(guide, x)
    if family == "vqvae":
        assert model.gaussian_latents is False and set(metrics) == {"vq"}
        assert metrics["vq"]["codes_used"] >= 1
    else:
        sizes = FAMILIES[family].latent_sizes
        assert model.gaussian_latents is True and set(metrics) == {"test_kl_per_unit", "test_active_units"}
        assert [len(k) for k in metrics["test_kl_per_unit"]] == list(sizes)
        assert len(metrics["test_active_units"]) == len(sizes)
