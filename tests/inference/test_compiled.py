"""The compiled closed-form loss is the eager one: value, gradients, batch-norm statistics, updates.

The first test of each guide compiles (about a minute on two CPU cores without TorchInductor's
on-disk cache); the rest trace again and take the compiled code from TorchInductor's caches.
"""

from __future__ import annotations

import copy

import pyro
import pytest
import torch
from torch._dynamo.utils import counters

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.inference.closed_form import closed_form_loss
from pyro_lvae.inference.compiled import CompiledLoss, check_compilable
from pyro_lvae.inference.objectives import elbo_for
from pyro_lvae.models.families import make_guide, make_model
from pyro_lvae.training.distributed import DistributedContext
from pyro_lvae.training.steps import TrainingStep, model_buffers, trainable_parameters

GUIDES = [LadderGuide, BottomUpGuide]
CFG = ModelConfig(input_dim=12, latent_sizes=(5, 4, 3), hidden_sizes=(16, 12, 8), batch_norm=True)


def _pair(guide_cls):
    """Two identical (model, guide) pairs in float64, in training mode."""
    model = GenerativeModel(CFG, name="a").double()
    guide = guide_cls(model).double()
    model_b = copy.deepcopy(model)
    model_b.name = "b"
    guide_b = guide_cls(model_b).double()
    guide_b.load_state_dict(guide.state_dict())
    return (model, guide), (model_b, guide_b)


def _batch(seed: int, size: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((size, 12), 0.4, dtype=torch.float64), generator=g)


class _CallCount:
    """Wraps a callable and counts its calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("guide_cls", GUIDES)
@pytest.mark.parametrize("beta", [None, 0.0, 0.3])
def test_the_compiled_loss_is_the_eager_closed_form_with_its_gradients_and_statistics(guide_cls, beta):
    (model, guide), (model_e, guide_e) = _pair(guide_cls)
    compiled = CompiledLoss()
    compiled._compiled = spy = _CallCount(compiled._compiled)
    b = None if beta is None else torch.tensor(beta, dtype=torch.float64)
    analytic = guide_cls is LadderGuide
    for size in (9, 5):  # the shorter last minibatch of an epoch
        x = _batch(size, size)
        graphs = counters["stats"]["unique_graphs"]
        pyro.set_rng_seed(size)
        with model.shared_priors():
            loss = closed_form_loss(model, guide, x, b, analytic_kl=analytic, compiled=compiled)
        pyro.set_rng_seed(size)
        with model_e.shared_priors():
            eager = closed_form_loss(model_e, guide_e, x, b, analytic_kl=analytic)
        if size == 5:  # the batch size is a symbol of the compiled graph: no new graph
            assert counters["stats"]["unique_graphs"] == graphs
        assert loss.item() == pytest.approx(eager.item(), rel=1e-12)
        loss.backward()
        eager.backward()
    assert spy.calls == 2
    nonzero = 0
    for p, q in zip(trainable_parameters(model, guide), trainable_parameters(model_e, guide_e), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        nonzero += int(q.grad.abs().sum() > 0)
    assert nonzero > 5
    # Batch norm's running statistics moved as in the eager loss: once per network and step.
    for a, c in zip(model_buffers(model, guide), model_buffers(model_e, guide_e), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_a_compiled_fast_step_takes_the_fast_steps_updates(guide_cls):
    (model, guide), (model_e, guide_e) = _pair(guide_cls)
    compiled = TrainingStep(model, guide, learning_rate=1e-2, compile=True)
    eager = TrainingStep(model_e, guide_e, learning_rate=1e-2)
    assert compiled.elbo.compiled is not None and eager.elbo.compiled is None
    for seed, beta in [(1, 0.5), (2, 0.0), (3, 1.0)]:
        x, b = _batch(seed), torch.tensor(beta, dtype=torch.float64)
        pyro.set_rng_seed(seed)
        loss = compiled(x, b)
        pyro.set_rng_seed(seed)
        assert loss.item() == pytest.approx(eager(x, b).item(), rel=1e-12)
    for a, c in zip(compiled.optimizer.state_dict()["state"].values(), eager.optimizer.state_dict()["state"].values()):
        for key in a:
            torch.testing.assert_close(a[key], c[key], rtol=1e-10, atol=1e-12)
    # Adam divides by sqrt(v): where a gradient is near 0 (a batch-norm shift), the rounding of the
    # compiled gradient moves the update by up to 1e-8 relative; a wrong loss moves it by far more.
    for p, q in zip(trainable_parameters(model, guide), trainable_parameters(model_e, guide_e), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_a_compiled_step_skips_a_nan_batch_and_touches_nothing():
    (model, guide), _ = _pair(LadderGuide)
    step = TrainingStep(model, guide, learning_rate=1e-2, compile=True)
    step(_batch(1), torch.tensor(1.0, dtype=torch.float64))
    before = [t.clone() for t in trainable_parameters(model, guide) + model_buffers(model, guide)]
    x = _batch(2)
    x[0, 0] = float("nan")
    step(x, torch.tensor(1.0, dtype=torch.float64))
    assert step.skip_cause == "non_finite"
    for a, b in zip(before, trainable_parameters(model, guide) + model_buffers(model, guide), strict=True):
        assert torch.equal(a, b)


class _Dropped(GenerativeModel):
    """The paper's model under another class: the closed form does not cover it."""


@pytest.mark.parametrize(
    "options, match",
    [
        ({"compile": 1}, r"^compile must be True or False, got 1\.$"),
        (
            {"compile": True, "engine": "svi"},
            r"^compile runs on the fast engine, not 'svi'; set engine='fast' or compile=False\.$",
        ),
        ({"compile": True, "free_bits": 0.5}, r"^compile runs without free bits"),
        (
            {"compile": True, "distributed": DistributedContext(rank=0, world_size=2)},
            r"^compile runs in one process",
        ),
    ],
)
def test_the_step_refuses_a_compile_it_cannot_honour(options, match):
    model = GenerativeModel(CFG)
    with pytest.raises(ValueError, match=match):
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3, **options)


def test_compile_refuses_what_the_closed_form_does_not_cover_and_networks_that_draw():
    other = _Dropped(CFG)
    with pytest.raises(ValueError, match=r"^compile applies to the closed-form loss .* not _Dropped with LadderGuide"):
        check_compilable(other, LadderGuide(other))
    model = GenerativeModel(CFG)
    guide = LadderGuide(model)
    guide.upward_net["dropout"] = torch.nn.Dropout(0.1)
    with pytest.raises(ValueError, match=r"^compile needs networks that draw nothing, but Dropout does"):
        check_compilable(model, guide)
    vlae = make_model(ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 6), family="vlae", guide="vae"))
    with pytest.raises(ValueError, match=r"^compile applies to the closed-form loss"):
        TrainingStep(vlae, make_guide(vlae), learning_rate=1e-3, compile=True)
    for options in ({}, {"lean": True, "num_particles": 2}, {"lean": True, "free_bits": 0.5}):
        with pytest.raises(ValueError, match=r"^compile applies to the lean closed-form ELBO of one particle"):
            elbo_for(guide, compile=True, **options)


def _tiny(input_dim: int, name: str) -> tuple[GenerativeModel, LadderGuide]:
    """A model of a shape no other test compiles: its first compiled call compiles a new variant."""
    model = GenerativeModel(ModelConfig(input_dim=input_dim, latent_sizes=(2,), hidden_sizes=(4,)), name=name)
    return model, LadderGuide(model)


def test_the_loss_is_compiled_by_torchinductor():
    """TorchInductor, not an eager backend, builds the compiled loss: its counters move."""
    model, guide = _tiny(7, "inductor")
    step = TrainingStep(model, guide, learning_rate=1e-3, compile=True)
    graphs, inductor = counters["stats"]["unique_graphs"], sum(counters["inductor"].values())
    step(torch.ones(3, 7), torch.tensor(1.0))
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert sum(counters["inductor"].values()) > inductor


def test_each_compiled_loss_counts_its_own_variants_and_past_the_limit_names_the_way_out():
    """Under a limit of one variant: two steps of two architectures compile, each for itself (a
    sweep in one process); one compiled loss given a second architecture raises."""
    pairs = [_tiny(dim, f"limit{dim}") for dim in (8, 9)]
    x = {dim: _batch(dim, 3)[:, :dim].float() for dim in (8, 9)}
    with torch._dynamo.config.patch(recompile_limit=1):
        for (model, guide), dim in zip(pairs, (8, 9)):
            TrainingStep(model, guide, learning_rate=1e-3, compile=True)(x[dim], torch.tensor(1.0))
        shared = CompiledLoss()
        closed_form_loss(*pairs[0], x[8], analytic_kl=True, compiled=shared)
        with pytest.raises(RuntimeError, match=r"^torch.compile has reached its limit .*recompile_limit, now 1:"):
            closed_form_loss(*pairs[1], x[9], analytic_kl=True, compiled=shared)


def test_a_compiled_elbo_refuses_a_call_it_would_run_uncompiled():
    """``elbo_for(..., compile=True)`` used directly: each call the closed form does not cover
    raises, naming the reason, before anything compiles."""
    from pyro import poutine

    model = GenerativeModel(CFG)
    guide = LadderGuide(model)
    elbo = elbo_for(guide, lean=True, compile=True)
    x, beta = _batch(1).float(), torch.tensor(0.5)
    prefix = r"^compile=True cannot compile this call: "
    with pytest.raises(ValueError, match=prefix + r"Pyro's validation is on .*pyro.enable_validation\(False\)"):
        elbo.differentiable_loss(model, guide, x, beta)  # the tests run with validation on
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match=prefix + "an effect handler is active"), poutine.scale(scale=2.0):
            elbo.differentiable_loss(model, guide, x, beta)
        with pytest.raises(ValueError, match=prefix + r"the closed form takes the arguments \(x\) or \(x, beta\)"):
            elbo.differentiable_loss(model, guide, x, beta=beta)
        guide.upward_net["dropout"] = torch.nn.Dropout(0.1)
        with pytest.raises(ValueError, match=r"^compile needs networks that draw nothing, but Dropout does"):
            elbo.differentiable_loss(model, guide, x, beta)


def test_svi_on_a_compiled_elbo_runs_the_compiled_loss_and_pyros_steps():
    from pyro.infer import SVI
    from pyro.optim import Adam

    (model, guide), (model_e, guide_e) = _pair(LadderGuide)
    compiled = elbo_for(guide, lean=True, compile=True)
    compiled.compiled._compiled = spy = _CallCount(compiled.compiled._compiled)
    eager = elbo_for(guide_e)
    svis = [SVI(model, guide, Adam({"lr": 1e-2}), compiled), SVI(model_e, guide_e, Adam({"lr": 1e-2}), eager)]
    with pyro.validation_enabled(False):
        for seed in (1, 2):
            losses = []
            for svi in svis:
                pyro.set_rng_seed(seed)
                losses.append(svi.step(_batch(seed), torch.tensor(0.5, dtype=torch.float64)))
            assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert spy.calls == 2
    for p, q in zip(trainable_parameters(model, guide), trainable_parameters(model_e, guide_e), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_under_bf16_the_compiled_loss_is_the_eager_bf16_loss(guide_cls):
    """``precision="bf16"`` compiled: the networks' matrix products in bfloat16 as in the eager
    bf16 step, the densities and the loss in fp32. Inductor rounds the bfloat16 work at other
    points, so the two agree to bfloat16's precision: their gradients are as far from the eager
    fp32 ones (about 5e-2 relative here), where the compiled fp32 loss is within 1e-6."""
    torch.manual_seed(0)
    model = GenerativeModel(CFG, name="bf")
    guide = guide_cls(model)
    x, beta = _batch(4, 64).float(), torch.tensor(0.5)
    losses, grads = {}, {}
    for precision, compile in (("fp32", False), ("bf16", False), ("bf16", True), ("fp32", True)):
        step = TrainingStep(model, guide, learning_rate=1e-3, precision=precision, compile=compile)
        pyro.set_rng_seed(4)
        loss = step.loss(x, beta)
        assert loss.dtype == torch.float32
        parameters = trainable_parameters(model, guide)
        losses[precision, compile] = loss.item()
        grads[precision, compile] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])
    exact = grads["fp32", False]
    error = {key: ((g - exact).norm() / exact.norm()).item() for key, g in grads.items()}
    assert losses["bf16", True] == pytest.approx(losses["bf16", False], rel=2e-3)
    assert 1e-3 < error["bf16", True] < 3 * error["bf16", False]
    assert error["fp32", True] < 1e-5  # the control: without autocast the compiled loss is fp32's
