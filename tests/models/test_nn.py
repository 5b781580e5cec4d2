"""The building blocks: the variance floor of every Gaussian head, and batch norm folded for evaluation."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch.nn import functional as F

from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig, elbo_for
from pyro_lvae.models.nn import MLP, GaussianHead, batch_norm_folded
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


def _mlp_with_statistics(**kw) -> MLP:
    """An MLP in float64 whose batch norms are away from their initial values."""
    mlp = MLP(6, 9, activation=kw.pop("activation", "leaky_relu"), batch_norm=kw.pop("batch_norm", True)).double()
    with torch.no_grad():
        for m in mlp.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return mlp.eval()


@torch.no_grad()
def test_batch_norm_folded_computes_the_same_function_and_is_undone_on_exit():
    mlp = _mlp_with_statistics()
    y = torch.randn(4, 5, 6, dtype=torch.float64)
    expected = mlp(y)
    with batch_norm_folded(mlp, mlp):  # one MLP named twice is folded once
        assert mlp._folded is not None and len(mlp._folded) == 2
        folded = mlp(y)
    assert mlp._folded is None
    assert folded.shape == (4, 5, 9)
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(mlp(y), expected)  # the unfolded path again, bit for bit


@torch.no_grad()
@pytest.mark.parametrize(
    "kw, training", [({}, True), ({"batch_norm": False}, False), ({"activation": "tanh"}, False)], ids=str
)
def test_batch_norm_folded_leaves_training_mode_no_batch_norm_and_other_activations_alone(kw, training):
    mlp = _mlp_with_statistics(**kw).train(training)
    y = torch.randn(8, 6, dtype=torch.float64)
    torch.manual_seed(0)
    expected = mlp(y)
    with batch_norm_folded(mlp):
        assert mlp._folded is None
        assert torch.equal(mlp(y), expected)


def test_batch_norm_folded_refuses_to_run_with_gradients():
    with pytest.raises(ValueError, match="torch.no_grad"):
        with batch_norm_folded(_mlp_with_statistics()):
            pass


@torch.no_grad()
def test_batch_norm_folded_in_float32_is_as_close_to_float64_as_the_unfolded_mlp():
    exact = _mlp_with_statistics()
    mlp = MLP(6, 9, activation="leaky_relu", batch_norm=True)
    mlp.load_state_dict({k: v.float() for k, v in exact.state_dict().items()})
    mlp.eval()
    y = torch.randn(500, 6, dtype=torch.float64)
    reference = exact(y)
    unfolded_error = (mlp(y.float()).double() - reference).abs().max()
    with batch_norm_folded(mlp):
        folded_error = (mlp(y.float()).double() - reference).abs().max()
    assert 0 < unfolded_error < 1e-5
    assert folded_error < 3 * unfolded_error
