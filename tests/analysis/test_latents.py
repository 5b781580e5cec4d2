"""The analysis toolkit: KL per unit and per layer, active units, codes, curves, PSIS k̂."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_lvae import ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig, encode
from pyro_lvae.analysis import (
    active_units,
    importance_inference_data,
    kl_per_layer,
    kl_per_unit,
    latent_codes,
    psis_khat,
    training_curves,
)
from pyro_lvae.inference.warmup import kl_weight
from pyro_lvae.training import train


def _model(**kw) -> GenerativeModel:
    cfg = dict(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(8, 8), batch_norm=False)
    cfg.update(kw)
    return GenerativeModel(ModelConfig(**cfg)).eval()


def test_kl_per_unit_sums_to_the_mean_field_kl_term():
    model = _model()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((7, 10), 0.5))
    # loss(β=1) − loss(β=0) on the same draws is the analytic KL term of TraceMeanField_ELBO.
    pyro.set_rng_seed(1)
    full = TraceMeanField_ELBO().loss(model, guide, x, torch.tensor(1.0))
    pyro.set_rng_seed(1)
    recon_only = TraceMeanField_ELBO().loss(model, guide, x, torch.tensor(0.0))
    pyro.set_rng_seed(1)
    per_unit = kl_per_unit(model, guide, x)
    assert [u.shape for u in per_unit] == [(4,), (3,)]
    assert sum(u.sum() for u in per_unit) * len(x) == pytest.approx(full - recon_only, rel=1e-5)
    assert all((u >= 0).all() for u in per_unit)


def test_kl_per_layer_matches_the_per_unit_split_in_expectation():
    torch.set_default_dtype(torch.float64)
    model = _model()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((20, 10), 0.5))
    layers = kl_per_layer(model, guide, x, num_samples=4000)
    units = kl_per_unit(model, guide, x, num_samples=4000)
    np.testing.assert_allclose(layers, [u.sum() for u in units], atol=0.02)


def _prior_guide(model):
    """A guide that ignores x: q(z|x) = p(z)."""

    def guide(x, beta=None):
        with pyro.plate("data", x.shape[0], dim=-1), kl_weight(beta):
            top = x.new_zeros(x.shape[0], model.config.latent_sizes[-1])
            z = pyro.sample(f"z{model.depth}", pyro.distributions.Normal(top, 1.0).to_event(1))
            for layer in range(model.depth - 1, 0, -1):
                loc, var = model.prior_params(layer, z)
                z = pyro.sample(f"z{layer}", pyro.distributions.Normal(loc, var.sqrt()).to_event(1))

    return guide


def test_guide_ignoring_x_has_no_active_units():
    model = _model()
    x = torch.bernoulli(torch.full((50, 10), 0.5))
    out = active_units(model, _prior_guide(model), x, num_samples=200)
    assert out["counts"].tolist() == [0, 0]
    assert kl_per_layer(model, _prior_guide(model), x) == pytest.approx([0.0, 0.0], abs=1e-6)


def test_trained_model_has_active_units(mnist):
    config = ExperimentConfig(
        model=ModelConfig(latent_sizes=(8, 4), hidden_sizes=(64, 32), guide="ladder"),
        train=TrainConfig(epochs=3, batch_size=100, train_subset=1000, test_subset=300, num_importance_samples=2),
    )
    result = train(config, dataset=mnist, progress=False, final_evaluation=False)
    out = active_units(result.model, result.guide, result.data.test)
    assert out["counts"][0] > 0
    assert len(out["variances"]) == 2 and out["variances"][0].shape == (8,)


def test_latent_codes_shapes_labels_and_values():
    model = _model()
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((9, 10), 0.5))
    codes = latent_codes(model, guide, x, torch.arange(9) % 3, batch_size=4)
    assert codes["mean_z1"].shape == (9, 4) and codes["sample_z2"].shape == (9, 3)
    assert codes["label"].values.tolist() == [0, 1, 2] * 3
    # The top layer's posterior mean depends on x alone (batch norm in eval mode): the guide's
    # own, in the examples' order, whatever the batch size.
    top = encode(model, guide, x)[-1].loc.numpy()
    np.testing.assert_allclose(codes["mean_z2"].values, top, rtol=1e-5, atol=1e-6)
    whole = latent_codes(model, guide, x, batch_size=9)
    np.testing.assert_allclose(whole["mean_z2"].values, top, rtol=1e-5, atol=1e-6)
    assert not np.allclose(codes["sample_z2"].values, codes["mean_z2"].values)  # draws, not means


def test_training_curves(tmp_path, make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)),
        train=TrainConfig(epochs=3, batch_size=16, eval_every=2, num_importance_samples=2),
    )
    train(config, out_dir=tmp_path, dataset=make_synthetic(), progress=False)
    curves = training_curves(tmp_path)
    assert curves.epoch.values.tolist() == [1, 2, 3]
    assert np.isnan(curves["test_elbo"].values[0]) and not np.isnan(curves["test_elbo"].values[1])
    assert curves["test_kl_z1"].shape == (3, 3) and curves["test_kl_per_layer"].shape == (3, 2)
    # Each evaluated epoch's row holds that epoch's numbers, in layer order; the others are NaN.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row, line in enumerate(lines):
        if "test_kl_per_layer" in line:
            np.testing.assert_allclose(curves["test_kl_per_layer"].values[row], line["test_kl_per_layer"])
            np.testing.assert_allclose(curves["test_kl_z1"].values[row], line["test_kl_per_unit"][0])
        else:
            assert np.isnan(curves["test_kl_per_layer"].values[row]).all()
    assert sum("test_kl_per_layer" in line for line in lines) == 2
    with pytest.raises(FileNotFoundError, match="run directory"):
        training_curves(tmp_path / "missing")


def test_psis_khat_ranges():
    rng = np.random.default_rng(0)
    k = 5000
    # Weights with a Pareto tail of index alpha have shape k = 1/alpha.
    heavy = np.log(rng.pareto(1 / 0.9, size=(k, 20)) + 1)  # k = 0.9
    light = np.log(rng.pareto(1 / 0.2, size=(k, 20)) + 1)  # k = 0.2
    equal = np.zeros((k, 3))  # the exact posterior as guide: all weights equal
    kh_heavy, kh_light, kh_equal = psis_khat(heavy), psis_khat(light), psis_khat(equal)
    assert np.median(kh_heavy) > 0.75 and (kh_heavy > 0.7).mean() > 0.7
    assert np.median(kh_light) < 0.35 and (kh_light < 0.5).all()
    assert (kh_equal == 0).all()
    with pytest.raises(ValueError, match="shape"):
        psis_khat(np.zeros((1, 4)))


def test_inference_data_round_trip(tmp_path):
    lw = torch.randn(50, 6, dtype=torch.float64)
    ll = torch.logsumexp(lw, 0) - np.log(50)
    model = _model()
    codes = latent_codes(model, LadderGuide(model), torch.bernoulli(torch.full((6, 10), 0.5)))
    idata = importance_inference_data(lw, ll, psis_khat(lw), codes)
    path = tmp_path / "is.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_allclose(back.sample_stats["log_weight"].values[0], lw.numpy())
    np.testing.assert_allclose(back.observed_data["log_likelihood"].values, ll.numpy())
    np.testing.assert_allclose(back.observed_data["khat"].values, psis_khat(lw))
    np.testing.assert_allclose(back.constant_data["mean_z1"].values, codes["mean_z1"].values)


def test_the_analyses_register_nothing_in_the_param_store(recwarn):
    """Analysing, sampling or reconstructing with one of two models of the same (default)
    name registers neither: no renaming warning, and the param store stays empty."""
    config = ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(16, 8))
    x = torch.bernoulli(torch.full((30, 10), 0.4))
    first, second = GenerativeModel(config), GenerativeModel(config)
    for model in (first, second):
        guide = LadderGuide(model)
        active_units(model, guide, x, num_samples=2)
        kl_per_unit(model, guide, x)
        latent_codes(model, guide, x)
        model.eval().sample(3)
        model.reconstruct(x, guide.eval())
    assert not list(pyro.get_param_store().keys())
    assert not [w for w in recwarn if "param store" in str(w.message)]
