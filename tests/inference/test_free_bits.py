"""Free bits: a floor under each layer's KL during training, the reported bounds untouched."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from pyro_lvae import BottomUpGuide, ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig, elbo_for
from pyro_lvae.training import train
from pyro_lvae.training.steps import TrainingStep, trainable_parameters

CFG = ModelConfig(input_dim=8, latent_sizes=(4, 3), hidden_sizes=(12, 8), batch_norm=False)


def _setup(guide_cls):
    pyro.set_rng_seed(0)
    model = GenerativeModel(CFG).double()
    guide = guide_cls(model).double()
    x = torch.bernoulli(torch.full((6, 8), 0.4, dtype=torch.float64))
    return model, guide, x


def _loss_and_grads(elbo, model, guide, x, beta, seed=1):
    params = trainable_parameters(model, guide)
    for p in params:
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, x, beta)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _layer_kls(model, guide, x, beta, *, analytic, seed=1):
    """Each layer's KL summed over the batch, on the same draws, written out here."""
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(guide).get_trace(x, beta)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, beta)
    kls = {}
    for name in ("z1", "z2"):
        q, p = guide_trace.nodes[name]["fn"].base_dist, model_trace.nodes[name]["fn"].base_dist
        value = guide_trace.nodes[name]["value"]
        kls[name] = (kl_divergence(q, p) if analytic else q.log_prob(value) - p.log_prob(value)).detach()
    return kls


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
@pytest.mark.parametrize("mode", ["layer", "unit"])
def test_the_objective_is_the_elbo_plus_the_floor_penalty(guide_cls, mode):
    model, guide, x = _setup(guide_cls)
    beta = torch.tensor(0.7, dtype=torch.float64)
    base, _ = _loss_and_grads(elbo_for(guide), model, guide, x, beta)
    kls = _layer_kls(model, guide, x, beta, analytic=guide_cls is LadderGuide)
    lam = float(sum(k.sum() for k in kls.values()) / 6 / 2)  # the layers' mean KL: one layer is below it
    floored, _ = _loss_and_grads(elbo_for(guide, free_bits=lam, free_bits_mode=mode), model, guide, x, beta)
    totals = [k.sum(0) if mode == "unit" else k.sum().reshape(1) for k in kls.values()]
    penalty = sum(beta * torch.relu(lam * 6 - t).sum() for t in totals)
    assert penalty > 0
    torch.testing.assert_close(floored - base, penalty)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_below_the_floor_the_kl_gradient_vanishes_and_above_it_is_unchanged(guide_cls):
    model, guide, x = _setup(guide_cls)
    beta = torch.tensor(1.0, dtype=torch.float64)
    # λ above every layer's KL: only the reconstruction term is left to differentiate.
    _, floored = _loss_and_grads(elbo_for(guide, free_bits=1e4), model, guide, x, beta)
    params = trainable_parameters(model, guide)
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(guide).get_trace(x, beta)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, beta)
    recon = -model_trace.nodes["x"]["fn"].log_prob(x).sum()
    expected = torch.autograd.grad(recon, params, allow_unused=True)
    for g, e in zip(floored, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e)
    # λ below every KL: exactly the ELBO's gradient.
    _, plain = _loss_and_grads(elbo_for(guide), model, guide, x, beta)
    _, tiny = _loss_and_grads(elbo_for(guide, free_bits=1e-9), model, guide, x, beta)
    for a, b in zip(plain, tiny):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, floored))


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_both_engines_take_the_free_bits_step(engine):
    model, guide, x = _setup(LadderGuide)
    beta = torch.tensor(1.0, dtype=torch.float64)
    expected = {}
    for lam in (0.5, 0.0):  # the floored loss and the plain one, on the draws the step will make
        pyro.set_rng_seed(2)
        expected[lam] = elbo_for(guide, free_bits=lam).differentiable_loss(model, guide, x, beta).item()
    step = TrainingStep(model, guide, learning_rate=1e-2, engine=engine, free_bits=0.5)
    pyro.set_rng_seed(2)
    loss = float(step(x, beta))
    assert not step.skipped and type(step.elbo).__name__ == "FreeBitsMeanFieldELBO"
    assert loss == pytest.approx(expected[0.5], rel=1e-9) and expected[0.5] != pytest.approx(expected[0.0], rel=1e-6)


def test_the_reported_elbo_is_the_true_bound_whatever_the_floor(make_synthetic):
    data = make_synthetic()
    ends = {}
    for lam in (0.0, 5.0):
        config = ExperimentConfig(
            model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 4)),
            train=TrainConfig(epochs=1, warmup_epochs=0, batch_size=16, learning_rate=1e-12, free_bits=lam),
        )
        run = train(config, dataset=data, progress=False, final_evaluation=False)
        ends[lam] = run.metrics[-1]
    assert ends[5.0]["train_objective"] < ends[0.0]["train_objective"] - 1  # the floor is in the objective
    assert ends[5.0]["test_elbo"] == pytest.approx(ends[0.0]["test_elbo"], abs=1e-4)  # not in the bound


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(free_bits=-0.5), "free_bits must be a finite number ≥ 0"),
        (dict(free_bits=float("nan")), "free_bits must be a finite number ≥ 0"),
        (dict(free_bits=float("inf")), "free_bits must be a finite number ≥ 0"),
        (dict(free_bits=0.5, free_bits_mode="group"), "free_bits_mode must be one of layer, unit"),
    ],
)
def test_a_bad_floor_is_refused_before_any_work(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_free_bits_with_a_warm_up_is_warned_about(make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 4)),
        train=TrainConfig(epochs=2, warmup_epochs=1, batch_size=16, free_bits=0.5),
    )
    with pytest.warns(UserWarning, match="combined with a KL warm-up of 1 epochs"):
        train(config, dataset=make_synthetic(), progress=False, final_evaluation=False)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_loss_and_differentiable_loss_agree_and_beta_zero_has_no_floor(guide_cls):
    model, guide, x = _setup(guide_cls)
    elbo = elbo_for(guide, free_bits=5.0)
    for beta in (torch.tensor(0.6, dtype=torch.float64), 0.6):  # a tensor, or a plain number
        pyro.set_rng_seed(4)
        value = elbo.loss(model, guide, x, beta)
        pyro.set_rng_seed(4)
        assert value == pytest.approx(float(elbo.differentiable_loss(model, guide, x, beta)))
    zero = torch.tensor(0.0, dtype=torch.float64)
    floored, _ = _loss_and_grads(elbo, model, guide, x, zero)
    plain, _ = _loss_and_grads(elbo_for(guide), model, guide, x, zero)
    assert floored == plain  # β = 0: the KL terms are masked out, and so is their floor
