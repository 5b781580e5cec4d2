"""Warm-up (eq. 20): β schedule, β on latent sites only, and β = 0 without poutine.scale(0)."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_lvae import BottomUpGuide, ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig
from pyro_lvae.inference.warmup import kl_weight, warmup_beta
from pyro_lvae.training import train


def _model() -> GenerativeModel:
    return GenerativeModel(ModelConfig(input_dim=8, latent_sizes=(3, 2), hidden_sizes=(12, 6), batch_norm=False))


def test_schedule_is_linear_from_zero_to_one():
    assert [warmup_beta(e, 4) for e in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_beta(e, 0) for e in range(3)] == [1.0, 1.0, 1.0]
    assert warmup_beta(100, 200) == 0.5
    with pytest.raises(ValueError):
        warmup_beta(-1, 10)


def test_poutine_scale_zero_raises_so_we_mask():
    """The pitfall that motivates kl_weight: poutine.scale(0) is refused by Pyro."""
    with pytest.raises(ValueError):
        poutine.scale(scale=0.0)
    with kl_weight(torch.tensor(0.0)):  # no error
        pass


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
@pytest.mark.parametrize("beta", [0.0, 1e-30, 0.25, 0.75, 1.0])
def test_effective_weight_on_latent_sites_only(guide_cls, beta):
    model = _model()
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((5, 8), 0.5))
    beta_t = torch.tensor(beta)
    guide_trace = poutine.trace(guide).get_trace(x, beta=beta_t)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, beta=beta_t)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or name == "data":
                continue
            raw = site["fn"].log_prob(site["value"])
            if name == "x":
                # The observation term is never scaled or masked.
                assert site["mask"] is None
                torch.testing.assert_close(site["log_prob"], raw)
            else:
                torch.testing.assert_close(site["log_prob"], beta * raw, atol=0, rtol=1e-6)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_loss_is_reconstruction_plus_beta_kl(guide_cls):
    """With the same draws, loss(β) = −E log p(x|z) + β · (log q − log p) exactly."""
    model = _model()
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((7, 8), 0.5))
    elbo = Trace_ELBO()
    losses = {}
    for beta in (0.0, 0.3, 1.0):
        pyro.set_rng_seed(3)
        losses[beta] = elbo.loss(model, guide, x, beta=torch.tensor(beta))
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    recon = model_trace.nodes["x"]["fn"].log_prob(x).sum().item()
    kl = sum(
        (
            guide_trace.nodes[n]["fn"].log_prob(guide_trace.nodes[n]["value"])
            - model_trace.nodes[n]["fn"].log_prob(model_trace.nodes[n]["value"])
        )
        .sum()
        .item()
        for n in ("z1", "z2")
    )
    for beta, loss in losses.items():
        assert loss == pytest.approx(-recon + beta * kl, rel=1e-5, abs=1e-4)


def test_step_at_beta_zero_carries_no_kl_gradient():
    """For the bottom-up guide the model's top-down networks enter only through KL terms."""
    model = _model()
    guide = BottomUpGuide(model)
    x = torch.bernoulli(torch.full((16, 8), 0.5))
    top_down = list(model.top_down_mlps.parameters()) + list(model.top_down_heads.parameters())
    for beta, expect_zero in ((0.0, True), (0.5, False)):
        loss = Trace_ELBO().differentiable_loss(model, guide, x, beta=torch.tensor(beta))
        grads = torch.autograd.grad(loss, top_down, allow_unused=True)
        total = sum(g.abs().sum() for g in grads if g is not None)
        assert (total == 0) == expect_zero, (beta, total)


def test_training_uses_the_schedule_per_epoch(make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), batch_norm=True),
        train=TrainConfig(epochs=6, batch_size=16, warmup_epochs=4, eval_every=100, num_importance_samples=2),
    )
    result = train(config, dataset=make_synthetic(), progress=False, final_evaluation=False)
    assert [m["beta"] for m in result.metrics] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_kl_weight_rejects_bad_beta():
    with pytest.raises(ValueError):
        with kl_weight(-0.1):
            pass
    with pytest.raises(ValueError):
        with kl_weight(torch.tensor([0.1, 0.2])):
            pass


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_jit_elbo_with_beta_as_positional_tensor(guide_cls):
    """One compiled JIT ELBO serves every β, applies it exactly, and matches the uncompiled loss."""
    import warnings

    from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO

    model = _model()
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((6, 8), 0.5))
    jit_mc, jit_mf = JitTrace_ELBO(ignore_jit_warnings=True), JitTraceMeanField_ELBO(ignore_jit_warnings=True)
    losses = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for elbo in (jit_mc, jit_mf):
            elbo.loss_and_grads(model, guide, x, torch.tensor(1.0))  # compiles (tracing draws its own samples)
        for beta in (0.0, 0.5, 1.0):
            b = torch.tensor(beta)
            pyro.set_rng_seed(5)
            jit_loss = jit_mc.loss_and_grads(model, guide, x, b)
            pyro.set_rng_seed(5)
            assert jit_loss == pytest.approx(Trace_ELBO().loss(model, guide, x, b), rel=1e-5)
            pyro.set_rng_seed(5)
            losses[beta] = jit_mf.loss_and_grads(model, guide, x, b)
    # The compiled mean-field loss is linear in β on the same draws (it orders its
    # random draws differently from the uncompiled one, so compare it with itself).
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=1e-5)
    assert losses[0.0] != pytest.approx(losses[1.0], rel=1e-3)
    # JitTrace_ELBO compiled once for all three β. (Pyro 1.9's JitTraceMeanField_ELBO
    # cannot show this: it caches its compiled function under a different attribute
    # from the one it checks, so it rebuilds and recompiles it on every call whatever
    # β is; docs/performance.md.)
    assert len(jit_mc._loss_and_surrogate_loss.compiled) == 1


def test_a_negative_epoch_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"^epoch and warmup_epochs must be non-negative, got -1, 5\.$"):
        warmup_beta(-1, warmup_epochs=5)
