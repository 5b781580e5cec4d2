"""The closed-form log importance weights, and the closed-form training loss, equal the
traced ones on the same draws."""

from __future__ import annotations

import contextlib
import copy

import pyro
import pytest
import torch
from pyro import poutine

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.inference import closed_form, evaluation
from pyro_lvae.inference.closed_form import closed_form_applies, closed_form_log_weights, closed_form_loss
from pyro_lvae.inference.evaluation import evaluate, particle_log_weights
from pyro_lvae.inference.objectives import elbo_for
from pyro_lvae.models.registration import registered_once
from pyro_lvae.training.steps import model_buffers, trainable_parameters


def _pair(guide_cls, device="cpu", **model_kw):
    shape = {"input_dim": 10, "latent_sizes": (5, 4, 3), "hidden_sizes": (16, 12, 8)}
    cfg = ModelConfig(**{**shape, **model_kw})
    model = GenerativeModel(cfg, name="closed").double().to(device)
    guide = guide_cls(model).double().to(device)
    with torch.no_grad():  # statistics away from the initial ones, so that eval mode matters
        for m in list(model.modules()) + list(guide.modules()):
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), guide.eval()


CASES = [
    (LadderGuide, {}),
    (LadderGuide, {"ladder_share_params": False}),
    (LadderGuide, {"only_mu_up": True}),
    (BottomUpGuide, {}),
    (LadderGuide, {"likelihood": "gaussian"}),
    (BottomUpGuide, {"likelihood": "gaussian"}),
    (LadderGuide, {"batch_norm": False}),
    (BottomUpGuide, {"latent_sizes": (5,), "hidden_sizes": (16,)}),
    (LadderGuide, {"latent_sizes": (5,), "hidden_sizes": (16,)}),
    (LadderGuide, {"bottom": "conv", "input_dim": 16}),
    (BottomUpGuide, {"bottom": "conv", "input_dim": 16}),
]


@pytest.mark.parametrize("pairs_per_slice", [closed_form.CPU_PAIRS_PER_SLICE, 20], ids=["one-slice", "slices-of-2"])
@pytest.mark.parametrize("guide_cls, model_kw", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_the_closed_form_gives_the_traced_weights_on_the_same_draws(
    guide_cls, model_kw, pairs_per_slice, device, monkeypatch
):
    """Also when the 13 particles are weighed in slices of 2 (7 slices, the last of 1; on
    the CPU only: elsewhere a chunk is weighed in one piece)."""
    monkeypatch.setattr(closed_form, "CPU_PAIRS_PER_SLICE", pairs_per_slice)
    model, guide = _pair(guide_cls, device, **model_kw)
    gaussian = model_kw.get("likelihood") == "gaussian"
    width, depth = model.config.input_dim, model.config.depth
    x = torch.rand(7, width, dtype=torch.float64) if gaussian else torch.bernoulli(torch.full((7, width), 0.4)).double()
    x = x.to(device)
    assert closed_form_applies(model, guide)
    pyro.set_rng_seed(11)
    with torch.no_grad():
        traced = particle_log_weights(model, guide, x, 13)
    pyro.set_rng_seed(11)
    total, reconstruction, layer_kl = closed_form_log_weights(model, guide, x, 13)
    after = torch.rand((), device=device).item()
    assert total.shape == (13, 7) and layer_kl.shape == (depth, 13, 7)
    torch.testing.assert_close(total, traced.total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reconstruction, traced.reconstruction, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer_kl, traced.layer_kl, rtol=1e-10, atol=1e-10)
    assert after == _next_draw_after(model, guide, x, 13)  # both used the same amount of noise


def _next_draw_after(model, guide, x, k) -> float:
    """The draw that follows the traced path's noise on seed 11."""
    pyro.set_rng_seed(11)
    with torch.no_grad():
        particle_log_weights(model, guide, x, k)
    return torch.rand((), device=x.device).item()


def test_other_families_and_wrapped_guides_keep_the_traced_path():
    model, guide = _pair(LadderGuide)
    assert not closed_form_applies(model, poutine.scale(guide, scale=2.0))
    assert not closed_form_applies(model, LadderGuide(_pair(LadderGuide)[0]))  # a guide of another model
    from pyro_lvae.models.families import make_guide, make_model

    vlae = make_model(ModelConfig(family="vlae", guide="vae", input_dim=10, latent_sizes=(3, 2), hidden_sizes=(8, 8)))
    assert not closed_form_applies(vlae, make_guide(vlae))


def test_evaluate_gives_the_numbers_of_the_traced_path(device, monkeypatch):
    """float32, as evaluated in practice: per-example L_K and ELBO agree to rounding."""
    cfg = ModelConfig(input_dim=10, latent_sizes=(5, 3), hidden_sizes=(16, 8))
    model = GenerativeModel(cfg, name="eval").to(device).eval()
    guide = LadderGuide(model).to(device).eval()
    x = torch.bernoulli(torch.full((20, 10), 0.4)).to(device)
    fast = evaluate(model, guide, x, num_samples=300, seed=3, return_log_weights=True)
    monkeypatch.setattr(evaluation, "closed_form_applies", lambda *a: False)
    traced = evaluate(model, guide, x, num_samples=300, seed=3, return_log_weights=True)
    torch.testing.assert_close(fast["log_weights"], traced["log_weights"], rtol=1e-5, atol=1e-4)
    assert fast["log_likelihood"] == pytest.approx(traced["log_likelihood"], abs=1e-4)
    assert fast["elbo"] == pytest.approx(traced["elbo"], abs=1e-4)


def test_the_bernoulli_term_keeps_float32_accuracy_at_extreme_logits():
    """log(1 + e^{-|l|}) in place of softplus's log1p: finite and within float32 rounding of
    the float64 value, for logits from -200 to 200 (where e^{-|l|} underflows)."""
    logits = torch.linspace(-200, 200, 784).repeat(3, 1)
    logits[1] = torch.randn(784) * 3
    x = torch.bernoulli(torch.full((3, 784), 0.5))
    exact = (x.double() * logits.double() - torch.nn.functional.softplus(logits.double())).sum(-1)
    given = logits.clone()
    fast = closed_form._bernoulli_log_likelihood(logits, x)
    assert torch.equal(logits, given)  # the decoder's output is left as it was
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.double(), exact, rtol=1e-6, atol=1e-3)


def test_in_training_mode_the_particles_are_weighed_together_as_on_the_traced_path(monkeypatch):
    """Batch norm in training mode normalizes over all the pairs it is given: slices would
    change the weights, so a model in training mode is weighed in one piece."""
    monkeypatch.setattr(closed_form, "CPU_PAIRS_PER_SLICE", 20)
    model, guide = _pair(LadderGuide)
    model.train()
    guide.train()
    x = torch.bernoulli(torch.full((7, 10), 0.4)).double()
    pyro.set_rng_seed(11)
    with torch.no_grad():
        traced = particle_log_weights(model, guide, x, 13)
    pyro.set_rng_seed(11)
    total, _, _ = closed_form_log_weights(model, guide, x, 13)
    torch.testing.assert_close(total, traced.total, rtol=1e-10, atol=1e-10)


def test_under_a_callers_bf16_autocast_the_likelihood_stays_in_the_models_precision():
    """The traced model casts the decoder's logits back to z1's dtype; so does the closed form,
    so that both weigh the same bf16 networks with an fp32 likelihood."""
    cfg = ModelConfig(input_dim=64, latent_sizes=(5, 4), hidden_sizes=(32, 16))
    model = GenerativeModel(cfg, name="autocast").eval()
    guide = LadderGuide(model).eval()
    x = torch.bernoulli(torch.full((6, 64), 0.3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pyro.set_rng_seed(3)
        with torch.no_grad():
            traced = particle_log_weights(model, guide, x, 5)
        pyro.set_rng_seed(3)
        total, reconstruction, _ = closed_form_log_weights(model, guide, x, 5)
    assert total.dtype == torch.float32
    torch.testing.assert_close(reconstruction, traced.reconstruction, rtol=0, atol=1e-3)
    torch.testing.assert_close(total, traced.total, rtol=0, atol=1e-3)


def _data(model, rows: int, device) -> torch.Tensor:
    width = model.config.input_dim
    if model.config.likelihood == "gaussian":
        return torch.rand(rows, width, dtype=torch.float64, device=device)
    return torch.bernoulli(torch.full((rows, width), 0.4, dtype=torch.float64)).to(device)


def _maybe_shared(model, shared: bool):
    return model.shared_priors() if shared else contextlib.nullcontext()


@pytest.mark.parametrize("shared", [True, False], ids=["priors-shared", "priors-twice"])
@pytest.mark.parametrize("beta", [None, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("guide_cls, model_kw", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_the_closed_form_loss_is_pyros_elbo_with_its_gradients_and_statistics(
    guide_cls, model_kw, beta, shared, device
):
    """In training mode, as in training: the loss, every gradient, the batch-norm statistics it
    updates and the amount of noise it draws are those of Pyro's estimator for the guide
    (``TraceMeanField_ELBO`` for the ladder guide, ``Trace_ELBO`` for the bottom-up one), in
    float64; with the top-down priors shared, as the fast engine runs it, and without, where the
    ladder guide and the model each run the top-down networks (their statistics move twice)."""
    model, guide = _pair(guide_cls, device, **model_kw)
    model.train(), guide.train()
    model_ref, guide_ref = copy.deepcopy((model, guide))
    x = _data(model, 9, device)
    b = None if beta is None else torch.tensor(beta, dtype=torch.float64, device=device)

    pyro.set_rng_seed(5)
    with registered_once(model, guide), _maybe_shared(model, shared):
        loss = closed_form_loss(model, guide, x, b, analytic_kl=guide_cls is LadderGuide)
    after = torch.rand((), device=device).item()
    loss.backward()
    pyro.set_rng_seed(5)
    with registered_once(model_ref, guide_ref), _maybe_shared(model_ref, shared):
        ref = elbo_for(guide_ref).differentiable_loss(model_ref, guide_ref, x, b)
    after_ref = torch.rand((), device=device).item()
    ref.backward()

    assert torch.isfinite(ref) and after == after_ref
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    params, params_ref = trainable_parameters(model, guide), trainable_parameters(model_ref, guide_ref)
    with_gradient = 0
    for p, q in zip(params, params_ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        with_gradient += int(q.grad.abs().sum() > 0)
    # Not a comparison of zeros (at β = 0 only the reconstruction's path has gradients).
    assert with_gradient > (len(params) // 3 if beta != 0 else 5)
    for a, c in zip(model_buffers(model, guide), model_buffers(model_ref, guide_ref), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_at_beta_zero_the_kl_terms_are_dropped_exactly():
    """β = 0 masks the latent terms, as Pyro's mask does: a non-finite term (a prior variance
    of 0 with the floor off, under the bottom-up guide, whose draws do not read the prior)
    leaves the loss finite, and equal to −log p(x|z1)."""
    model, guide = _pair(BottomUpGuide, variance_floor=0.0)
    model.train(), guide.train()
    x = _data(model, 6, "cpu")
    with torch.no_grad():
        model.top_down_heads[0].var.bias.fill_(-1e4)  # softplus underflows: σ²_p = 0
    losses = {}
    for beta in (0.0, 1.0):
        pyro.set_rng_seed(2)
        losses[beta] = closed_form_loss(model, guide, x, torch.tensor(beta, dtype=torch.float64), analytic_kl=False)
    pyro.set_rng_seed(2)
    with pyro.validation_enabled(False):  # Pyro's checks would refuse the zero scale
        traced = elbo_for(guide).differentiable_loss(model, guide, x, torch.tensor(0.0, dtype=torch.float64))
    assert torch.isfinite(losses[0.0]) and not torch.isfinite(losses[1.0])
    assert losses[0.0].item() == pytest.approx(traced.item(), rel=1e-12)


def test_the_closed_form_loss_refuses_what_it_cannot_compute():
    model, guide = _pair(BottomUpGuide)
    x = _data(model, 4, "cpu")
    with pytest.raises(ValueError, match="ladder guide only; use analytic_kl=False"):
        closed_form_loss(model, guide, x, analytic_kl=True)
    with pytest.raises(ValueError, match="beta must be a non-negative number"):
        closed_form_loss(model, guide, x, torch.tensor(-0.5, dtype=torch.float64), analytic_kl=False)
    with pytest.raises(ValueError, match="10"):
        closed_form_loss(model, guide, x[:, :5], analytic_kl=False)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_the_closed_form_loss_registers_the_parameters_as_the_traced_calls_do(guide_cls):
    model, guide = _pair(guide_cls)
    x = _data(model, 4, "cpu")
    with pyro.validation_enabled(False):
        elbo_for(guide).differentiable_loss(model, guide, x)
    traced = set(pyro.get_param_store().keys())
    pyro.clear_param_store()
    closed_form_loss(model, guide, x, analytic_kl=guide_cls is LadderGuide)
    assert len(traced) == len(trainable_parameters(model, guide))
    assert set(pyro.get_param_store().keys()) == traced


class _NoisyEncoder(torch.nn.Module):
    """A user's first block that draws random numbers (dropout in training mode)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Dropout(0.5), torch.nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_an_encoder_that_draws_runs_before_the_first_latent_draw_as_in_the_guide(guide_cls):
    """The guide runs its first block before its first latent draw; the closed forms too, so an
    encoder with dropout pairs the same random numbers with the same draws (training loss and
    the differentiable particle weights of fine-tuning)."""
    cfg = ModelConfig(input_dim=10, latent_sizes=(5, 3), hidden_sizes=(16, 8))
    model = GenerativeModel(cfg, name="noisy").double()
    guide = guide_cls(model, encoder=_NoisyEncoder(10, 16)).double()
    x = _data(model, 6, "cpu")
    b = torch.tensor(0.7, dtype=torch.float64)
    values = []
    for compute in (
        lambda: closed_form_loss(model, guide, x, b, analytic_kl=guide_cls is LadderGuide),
        lambda: elbo_for(guide).differentiable_loss(model, guide, x, b),
        lambda: closed_form.closed_form_particle_log_weights(model, guide, x, 4)[0],
        lambda: particle_log_weights(model, guide, x, 4).total,
    ):
        pyro.set_rng_seed(9)
        with registered_once(model, guide):
            values.append(compute().detach())
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values[2], values[3], rtol=1e-12, atol=1e-12)


def test_a_forward_hook_on_the_model_or_guide_keeps_the_traced_path():
    """The closed forms never call the model or the guide themselves, so a hook there would not run."""
    model, guide = _pair(LadderGuide)
    calls = []
    for module in (model, guide):
        handle = module.register_forward_hook(lambda *args: calls.append(1))
        assert not closed_form_applies(model, guide)
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *args: None)
    assert not closed_form_applies(model, guide)
    handle.remove()
    assert closed_form_applies(model, guide)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_the_differentiable_particle_weights_register_the_parameters_as_the_traced_ones_do(guide_cls):
    model, guide = _pair(guide_cls)
    x = _data(model, 4, "cpu")
    particle_log_weights(model, guide, x, 3)
    traced = set(pyro.get_param_store().keys())
    pyro.clear_param_store()
    closed_form.closed_form_particle_log_weights(model, guide, x, 3)
    assert len(traced) == len(trainable_parameters(model, guide))
    assert set(pyro.get_param_store().keys()) == traced
