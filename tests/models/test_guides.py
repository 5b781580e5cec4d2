"""Both guides on one model: site order, parameter sharing, the ELBO choice and its bias."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_lvae import (
    BottomUpGuide,
    GenerativeModel,
    LadderGuide,
    ModelConfig,
    elbo_for,
    make_guide,
    precision_weighted_merge,
)
from pyro_lvae.inference.evaluation import log_importance_weights


def _small_model(**kw) -> GenerativeModel:
    cfg = dict(input_dim=10, latent_sizes=(4, 3, 2), hidden_sizes=(16, 8, 8), batch_norm=False)
    cfg.update(kw)
    return GenerativeModel(ModelConfig(**cfg))


def _sample_sites(fn, x):
    tr = poutine.trace(fn).get_trace(x)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"]


def test_site_order():
    model = _small_model()
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    assert _sample_sites(model, x) == ["z3", "z2", "z1"]
    assert _sample_sites(LadderGuide(model), x) == ["z3", "z2", "z1"]
    assert _sample_sites(BottomUpGuide(model), x) == ["z1", "z2", "z3"]


def test_ladder_guide_shares_model_parameters():
    model = _small_model(batch_norm=True)
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo_for(guide))
    svi.step(x)
    store = pyro.get_param_store()
    # One store entry per tensor: the guide registered the model's own parameters.
    ids = [id(store[name]) for name in store.keys()]
    assert len(ids) == len(set(ids))
    # The store holds the model's own tensors, not copies the guide made.
    assert {id(p) for p in model.parameters()} <= set(ids)
    assert len([n for n in store.keys() if n.startswith("lvae$$$top_down")]) == len(
        list(model.top_down_mlps.parameters())
    ) + len(list(model.top_down_heads.parameters()))
    # The guide's q(z1 | z2, x) depends on the model's top-down networks.
    guide_trace = poutine.trace(guide).get_trace(x)
    log_q = guide_trace.nodes["z1"]["fn"].log_prob(guide_trace.nodes["z1"]["value"].detach()).sum()
    grads = torch.autograd.grad(log_q, list(model.top_down_heads[0].parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_guides_swap_on_one_model_instance():
    model = _small_model()
    x = torch.bernoulli(torch.full((8, 10), 0.5))
    for guide in (LadderGuide(model), BottomUpGuide(model)):
        svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo_for(guide))
        before = [p.detach().clone() for p in model.parameters()]
        loss = svi.step(x)
        assert torch.isfinite(torch.tensor(loss))
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_elbo_choice_per_guide():
    model = _small_model()
    assert type(elbo_for(LadderGuide(model))) is TraceMeanField_ELBO
    assert type(elbo_for(BottomUpGuide(model))) is Trace_ELBO
    assert type(elbo_for(lambda x: None)) is Trace_ELBO
    assert isinstance(make_guide(model), LadderGuide)
    assert isinstance(make_guide(_small_model(guide="vae")), BottomUpGuide)


def _mean_field_gap(guide_cls) -> tuple[float, float, list]:
    """(TraceMeanField_ELBO − Monte Carlo ELBO, standard error, warnings) on one batch."""
    torch.set_default_dtype(torch.float64)
    model = _small_model(input_dim=20, latent_sizes=(4, 4, 4), hidden_sizes=(16, 16, 16), activation="tanh")
    with torch.no_grad():  # strong dependence between layers, as after training
        for p in model.parameters():
            p.mul_(3.0)
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((64, 20), 0.5))
    k = 10000
    lw = log_importance_weights(model, guide, x, k).total
    mc = lw.mean(0).sum().item()
    se = (lw.var(0) / k).sum().sqrt().item()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tmf = -TraceMeanField_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x)
    return tmf - mc, se, caught


def test_trace_mean_field_elbo_is_biased_for_bottom_up_guide():
    gap, se, caught = _mean_field_gap(BottomUpGuide)
    # Far outside the noise of both estimators (each has standard error <= se).
    assert abs(gap) > 6 * 2**0.5 * se and abs(gap) > 5.0, (gap, se)
    assert any("mean field" in str(w.message) for w in caught)


def test_trace_mean_field_elbo_is_unbiased_for_ladder_guide():
    gap, se, caught = _mean_field_gap(LadderGuide)
    # The analytic-KL estimate has no more variance than the Monte Carlo one: 2 se bounds both.
    assert abs(gap) < 4 * 2**0.5 * se, (gap, se)
    assert not any("mean field" in str(w.message) for w in caught)


def test_ladder_guide_with_its_own_top_down_networks_merges_their_prior():
    """``ladder_share_params=False``: q(z1 | z2, x) merges the guide's own prior, not the model's."""
    model = _small_model(ladder_share_params=False)
    guide = LadderGuide(model)
    own = {id(p) for p in guide.top_down_net.parameters()}
    assert own and own.isdisjoint(id(p) for p in model.parameters())
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    trace = poutine.trace(guide).get_trace(x)
    z2 = trace.nodes["z2"]["value"]
    d = guide.top_down_net["mlps"][0](z2)
    prior_loc, prior_var = guide.top_down_net["heads"][0](d)
    loc, var = precision_weighted_merge(*guide.upward(x)[0], prior_loc, prior_var)
    fn = trace.nodes["z1"]["fn"].base_dist
    torch.testing.assert_close(fn.loc, loc)
    torch.testing.assert_close(fn.scale, var.sqrt())
    # The model's top-down networks do not enter the guide, the guide's own do.
    log_q = trace.nodes["z1"]["fn"].log_prob(trace.nodes["z1"]["value"].detach()).sum()
    model_grads = torch.autograd.grad(
        log_q, list(model.top_down_heads.parameters()), allow_unused=True, retain_graph=True
    )
    assert all(g is None for g in model_grads)
    own_grads = torch.autograd.grad(log_q, list(guide.top_down_net["heads"].parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in own_grads)
    # Both sets are registered, under distinct names.
    guide.register()
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith("lvae.ladder.top_down$$$") for n in names)
    assert any(n.startswith("lvae$$$top_down_heads") for n in names)


def test_ladder_guide_upward_pass_reads_the_mean_below_with_only_mu_up():
    model = _small_model(only_mu_up=True)
    guide = LadderGuide(model)
    # MLP n (n >= 2) reads μ̂_{n-1}, of the latent width, instead of d_{n-1}.
    assert guide.upward_net["mlps"][1].net[0].in_features == 4
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    estimates = guide.upward(x)
    mlps, heads = guide.upward_net["mlps"], guide.upward_net["heads"]
    first = heads[0](mlps[0](x))
    second = heads[1](mlps[1](first[0]))
    third = heads[2](mlps[2](second[0]))
    for got, want in zip(estimates, (first, second, third)):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    # The default reads d_{n-1} (the paper's eq. 13).
    default = LadderGuide(_small_model())
    assert default.upward_net["mlps"][1].net[0].in_features == 16


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_every_site_of_model_and_guide_is_in_the_data_plate(guide_cls):
    """The batch is one plate, named "data", of the batch's size, at dim −1, in the model
    and in both guides, as Pyro's estimators and Predictive expect."""
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4)))
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    for trace in (guide_trace, model_trace):
        sites = [s for s in trace.nodes.values() if s["type"] == "sample" and s["name"] != "data"]  # not the plate
        assert sites
        for site in sites:
            (frame,) = site["cond_indep_stack"]
            assert (frame.name, frame.size, frame.dim) == ("data", 5, -1), site["name"]


def test_the_bottom_up_guide_registers_its_parameters_under_its_own_name():
    pyro.clear_param_store()
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3,), hidden_sizes=(8,)), name="m")
    guide = BottomUpGuide(model)
    guide(torch.ones(2, 6))
    names = list(pyro.get_param_store().keys())
    assert names and all(n.startswith("m.bottom_up$$$") for n in names), names
    pyro.clear_param_store()
    LadderGuide(model)(torch.ones(2, 6))
    assert {n.split("$$$")[0] for n in pyro.get_param_store().keys()} == {"m", "m.ladder"}
