"""The building blocks: the variance floor of every Gaussian head."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch.nn import functional as F

from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig, elbo_for
from pyro_lvae.models.nn import GaussianHead
from pyro_lvae.training.steps import TrainingStep, trainable_parameters


def test_variance_floor_clamps_below_and_is_bit_identical_above():
    head = GaussianHead(3, 200, variance_floor=1e-5)
    with torch.no_grad():
        head.var.bias.copy_(torch.linspace(-30.0, 5.0, 200))
    d = torch.randn(7, 3)
    loc, var = head(d)
    raw = F.softplus(head.var(d))
    above = raw >= 1e-5
    assert above.any() and (~above).any()  # both branches are exercised
    assert torch.equal(var[above], raw[above])  # bit-identical, not merely close
    assert torch.equal(var[~above], torch.full_like(var[~above], 1e-5))
    assert torch.equal(loc, head.loc(d))


def test_variance_floor_rejects_a_negative_value():
    with pytest.raises(ValueError, match="variance_floor"):
        GaussianHead(3, 2, variance_floor=-1.0)
    with pytest.raises(ValueError, match="variance_floor"):
        ModelConfig(variance_floor=-1e-5)


def _collapsed_prior_model(variance_floor: float) -> tuple[GenerativeModel, LadderGuide]:
    """A ladder model whose top-down prior variance of z1 underflows to 0 without a floor."""
    cfg = ModelConfig(
        input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8), batch_norm=False, variance_floor=variance_floor
    )
    model = GenerativeModel(cfg)
    with torch.no_grad():
        model.top_down_heads[0].var.weight.zero_()
        model.top_down_heads[0].var.bias.fill_(-1e4)  # softplus(-1e4) == 0 in float32
    return model, LadderGuide(model)


@pytest.mark.parametrize("variance_floor", [1e-5, 1e-3])
def test_head_far_below_the_floor_gives_a_finite_loss_and_gradients_through_the_merge(variance_floor):
    model, guide = _collapsed_prior_model(variance_floor)
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    with torch.no_grad():
        _, var = model.prior_params(1, torch.randn(6, 3))
    assert torch.equal(var, torch.full_like(var, variance_floor))
    loss = elbo_for(guide).differentiable_loss(model, guide, x, torch.tensor(1.0))
    loss.backward()
    assert torch.isfinite(loss)
    params = trainable_parameters(model, guide)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    # The gradient reaches the upward pass through the merge, and the prior's mean.
    assert guide.upward_net["heads"][0].loc.weight.grad.abs().sum() > 0
    assert model.top_down_heads[0].loc.weight.grad.abs().sum() > 0


def test_without_a_floor_the_collapsed_prior_breaks_training():
    """The failure the floor prevents: a zero prior variance makes every step non-finite."""
    model, guide = _collapsed_prior_model(0.0)
    step = TrainingStep(model, guide, learning_rate=1e-3)
    x = torch.bernoulli(torch.full((6, 10), 0.5))
    with pyro.validation_enabled(False):
        step(x, torch.tensor(1.0))
    assert step.skipped


def test_batch_norm_in_training_mode_on_one_example_says_to_call_eval():
    from pyro.infer import Importance

    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 3), hidden_sizes=(16, 8), batch_norm=True))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((1, 10), 0.5))
    with pytest.raises(ValueError, match=r"model\.eval\(\); guide\.eval\(\)") as info:
        Importance(model, guide, num_samples=5).run(x)
    # Pyro appends the trace shapes below; the first line is the whole message.
    assert "model.eval(); guide.eval()" in str(info.value).splitlines()[0]
    model.eval()
    guide.eval()
    assert torch.isfinite(Importance(model, guide, num_samples=5).run(x).get_log_normalizer())
