"""The fast engine computes the reference Pyro ELBO's loss, gradients and updates."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pyro
import pytest
import torch

from pyro_lvae import BottomUpGuide, GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae import precision as precision_module
from pyro_lvae.inference.objectives import elbo_for
from pyro_lvae.training.skipping import SkipRule
from pyro_lvae.training.steps import (
    TrainingStep,
    clip_gradients,
    loss_and_grad_norm,
    loss_and_gradients_finite,
    model_buffers,
    trainable_parameters,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pair(guide_cls, device):
    """Two identical (model, guide) pairs in float64 on ``device``."""
    cfg = ModelConfig(input_dim=12, latent_sizes=(5, 4, 3), hidden_sizes=(16, 12, 8), batch_norm=True)
    model = GenerativeModel(cfg, name="a").double().to(device)
    guide = guide_cls(model).double().to(device)
    model_b = copy.deepcopy(model)
    model_b.name = "b"
    guide_b = guide_cls(model_b).double().to(device)
    guide_b.load_state_dict(guide.state_dict())
    return (model, guide), (model_b, guide_b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fast_loss_and_gradients_equal_reference_elbo(guide_cls, beta, device, compile):
    (model, guide), (model_ref, guide_ref) = _pair(guide_cls, device)
    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64)).to(device)
    b = torch.tensor(beta, dtype=torch.float64, device=device)
    step = TrainingStep(model, guide, learning_rate=1e-3, compile=compile)

    pyro.set_rng_seed(3)
    loss = step.loss(x, b)
    loss.backward()
    pyro.set_rng_seed(3)
    with pyro.validation_enabled(True):
        ref = elbo_for(guide_ref).differentiable_loss(model_ref, guide_ref, x, b)
    ref.backward()

    assert torch.isfinite(ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-12)
    params = trainable_parameters(model, guide)
    params_ref = trainable_parameters(model_ref, guide_ref)
    assert len(params) == len(params_ref)
    nonzero = 0
    for p, q in zip(params, params_ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9)
        nonzero += int(q.grad.abs().sum() > 0)
    # The comparison is not between zeros (at β = 0 only the reconstruction path has gradients).
    assert nonzero > (len(params) // 2 if beta > 0 else 5)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_fast_and_svi_engines_take_the_same_steps(guide_cls):
    (model, guide), (model_ref, guide_ref) = _pair(guide_cls, "cpu")
    fast = TrainingStep(model, guide, learning_rate=1e-2, engine="fast")
    svi = TrainingStep(model_ref, guide_ref, learning_rate=1e-2, engine="svi")
    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64))
    steps = 4
    for i in range(steps):
        beta = torch.tensor(i / steps, dtype=torch.float64)
        pyro.set_rng_seed(10 + i)
        a = fast(x, beta)
        pyro.set_rng_seed(10 + i)
        b = svi(x, beta)
        assert a.item() == pytest.approx(b.item(), rel=1e-9)
    # Fused and per-parameter Adam round differently; where a gradient is near zero
    # m / (sqrt(v) + eps) amplifies that to ~1e-9 absolute after a few steps.
    for p, q in zip(trainable_parameters(model, guide), trainable_parameters(model_ref, guide_ref)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # The one intended difference: under the ladder guide the SVI loop runs the model's
    # top-down networks twice per step (guide, then replayed model), so their batch-norm
    # statistics are updated twice; the fast engine shares the priors and updates them once.
    tracked = model.top_down_mlps[0].net[1].num_batches_tracked.item()
    tracked_ref = model_ref.top_down_mlps[0].net[1].num_batches_tracked.item()
    assert tracked == steps
    assert tracked_ref == (2 * steps if guide_cls is LadderGuide else steps)


def test_shared_priors_run_the_top_down_networks_once_and_expire():
    cfg = ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=False)
    model = GenerativeModel(cfg)
    calls = []
    model.top_down_mlps[0].register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(4, 2)
    with model.shared_priors():
        first = model.prior_params(1, z)
        again = model.prior_params(1, z)
        other = model.prior_params(1, z.clone())
    assert len(calls) == 2 and again[0] is first[0] and other[0] is not first[0]
    torch.testing.assert_close(other[0], first[0])
    with torch.no_grad():
        model.top_down_heads[0].loc.bias.add_(1.0)
    after = model.prior_params(1, z)  # outside the context: recomputed with the new parameters
    torch.testing.assert_close(after[0], first[0] + 1.0)


def test_engine_rejects_unknown_names_and_foreign_state():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    with pytest.raises(ValueError, match="engine"):
        TrainingStep(model, guide, learning_rate=1e-3, engine="turbo")
    fast = TrainingStep(model, guide, learning_rate=1e-3, engine="fast")
    svi_state = TrainingStep(model, guide, learning_rate=1e-3, engine="svi").state_dict()
    with pytest.raises(ValueError, match="resume with the engine"):
        fast.load_state_dict(svi_state)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_fast_engine_registers_once_with_the_per_call_names(guide_cls):
    cfg = ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    # The names SVI's per-call registration gives every parameter:
    model = GenerativeModel(cfg)
    TrainingStep(model, guide_cls(model), learning_rate=1e-3, engine="svi")(x, torch.tensor(1.0))
    svi_names = set(pyro.get_param_store().keys())
    pyro.clear_param_store()

    model = GenerativeModel(cfg)
    guide = guide_cls(model)
    step = TrainingStep(model, guide, learning_rate=1e-3)
    store = pyro.get_param_store()
    assert set(store.keys()) == svi_names
    assert {id(store[n]) for n in store.keys()} == {id(p) for p in trainable_parameters(model, guide)}
    with pyro.poutine.trace(param_only=True) as capture:
        step(x, torch.tensor(1.0))
    assert len(capture.trace.nodes) == 0  # no per-call registration inside the fast step
    assert model.register_params and guide.register_params  # restored afterwards
    with pyro.poutine.trace(param_only=True) as capture:
        model(x)
    assert len(capture.trace.nodes) == len(list(model.parameters()))


def test_clip_gradients_bounds_the_norm_then_every_entry():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([30.0, -40.0, 0.0])
    b.grad = torch.tensor([0.0, 0.5])
    clip_gradients([a, b], max_norm=4.0, max_value=0.0)
    norm = torch.cat([a.grad, b.grad]).norm()
    assert norm.item() == pytest.approx(4.0, rel=1e-5)
    torch.testing.assert_close(a.grad, torch.tensor([30.0, -40.0, 0.0]) * 4.0 / 50.0025, rtol=1e-4, atol=0)
    clip_gradients([a, b], max_norm=0.0, max_value=0.9)
    assert a.grad.abs().max().item() == pytest.approx(0.9) and b.grad[1].item() == pytest.approx(
        0.5 * 4 / 50.0025, rel=1e-4
    )


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_both_engines_clip_and_use_adam_eps(engine):
    """With every gradient entry clipped to 1e-12 and ε = 1, Adam's step m/(√v + ε) ≈ lr · 1e-12:
    the parameters stay put; without clipping they move by about lr · g/(|g| + 1)."""
    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64))
    moved = {}
    for clip in (0.0, 1e-12):
        pyro.clear_param_store()
        (model, guide), _ = _pair(LadderGuide, "cpu")
        before = [p.detach().clone() for p in trainable_parameters(model, guide)]
        step = TrainingStep(model, guide, learning_rate=0.1, engine=engine, adam_eps=1.0, grad_clip_value=clip)
        step(x, torch.tensor(1.0, dtype=torch.float64))
        assert not step.skipped
        moved[clip] = max((p - q).abs().max().item() for p, q in zip(trainable_parameters(model, guide), before))
    assert moved[0.0] > 1e-3
    assert moved[1e-12] < 1e-9


def test_engine_rejects_a_non_positive_adam_eps():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    with pytest.raises(ValueError, match="adam_eps"):
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3, adam_eps=0.0)


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_optimizer_state_round_trips_so_that_the_next_step_is_the_same(engine):
    """state_dict after some steps, through a file into a fresh step of a copy of the
    modules under the same names (as a resume rebuilds them): the next update is the same,
    and without the state it is not."""
    import io

    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64))
    beta = torch.tensor(1.0, dtype=torch.float64)
    (model, guide), (model_b, guide_b) = _pair(LadderGuide, "cpu")
    step = TrainingStep(model, guide, learning_rate=1e-2, engine=engine)
    for i in range(3):
        pyro.set_rng_seed(20 + i)
        step(x, beta)
    buffer = io.BytesIO()
    torch.save(step.state_dict(), buffer)  # as a checkpoint stores it
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict()))
    pyro.set_rng_seed(30)
    step(x, beta)
    expected = [p.detach().clone() for p in trainable_parameters(model, guide)]
    results = {}
    for load in (True, False):
        pyro.clear_param_store()  # a new process: the same names, a fresh store
        model_b.name, guide_b.name = model.name, guide.name
        model_b.load_state_dict(saved[0])
        guide_b.load_state_dict(saved[1])
        other = TrainingStep(model_b, guide_b, learning_rate=1e-2, engine=engine)
        if load:
            buffer.seek(0)
            other.load_state_dict(torch.load(buffer, weights_only=False))
        pyro.set_rng_seed(30)
        other(x, beta)
        results[load] = [p.detach().clone() for p in trainable_parameters(model_b, guide_b)]
    for p, q in zip(expected, results[True]):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
    assert max((p - q).abs().max().item() for p, q in zip(expected, results[False])) > 1e-4
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    with pytest.raises(ValueError, match="resume with the engine"):
        other.load_state_dict({**state, "engine": "svi" if engine == "fast" else "fast"})


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_a_learning_rate_set_after_restoring_the_state_is_the_one_used(engine):
    """Fine-tuning sets the annealed rate at the start of every epoch, also right after a
    resume, before the SVI engine has handed the restored Adam states to pyro.optim."""
    x = torch.bernoulli(torch.full((9, 12), 0.4, dtype=torch.float64))
    beta = torch.tensor(1.0, dtype=torch.float64)
    (model, guide), (model_b, guide_b) = _pair(LadderGuide, "cpu")
    step = TrainingStep(model, guide, learning_rate=1e-2, engine=engine)
    pyro.set_rng_seed(20)
    step(x, beta)
    state = copy.deepcopy(step.state_dict())
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict()))
    step.set_learning_rate(1e-1)
    pyro.set_rng_seed(30)
    step(x, beta)
    expected = [p.detach().clone() for p in trainable_parameters(model, guide)]

    pyro.clear_param_store()
    model_b.name, guide_b.name = model.name, guide.name
    model_b.load_state_dict(saved[0])
    guide_b.load_state_dict(saved[1])
    other = TrainingStep(model_b, guide_b, learning_rate=1e-2, engine=engine)
    other.load_state_dict(state)
    assert other.state_dict().keys() == state.keys()  # a checkpoint right after resuming keeps the state
    other.set_learning_rate(1e-1)
    pyro.set_rng_seed(30)
    other(x, beta)
    for p, q in zip(expected, trainable_parameters(model_b, guide_b)):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
    rates = (
        [g["lr"] for s in other.state_dict()["optimizer"].values() for g in s["param_groups"]]
        if engine == "svi"
        else [g["lr"] for g in other.state_dict()["optimizer"]["param_groups"]]
    )
    assert rates and set(rates) == {1e-1}


def test_the_engines_are_two_classes_built_by_one_factory():
    from pyro_lvae.training.steps import FastStep, SVIStep, make_step

    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)), name="f")
    guide = LadderGuide(model)
    assert type(make_step(model, guide, learning_rate=1e-3, engine="svi")) is SVIStep
    assert type(TrainingStep(model, guide, learning_rate=1e-3)) is FastStep
    with pytest.raises(ValueError, match="Unknown engine 'turbo'"):
        make_step(model, guide, learning_rate=1e-3, engine="turbo")
    with pytest.raises(ValueError, match="is the 'fast' engine"):
        FastStep(model, guide, learning_rate=1e-3, engine="svi")


def test_a_step_can_be_copied():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)), name="c")
    step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3, engine="svi")
    clone = copy.deepcopy(step)
    assert type(clone) is type(step) and clone.model is not step.model


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_bf16_runs_the_networks_in_bfloat16_and_the_densities_in_fp32(guide_cls):
    """Under precision="bf16" the linear layers compute in bfloat16, every sample site's
    distribution and the loss are fp32, the loss is close to the fp32 one on the same draws,
    and the gradients reach the fp32 parameters."""
    from pyro import poutine

    model = GenerativeModel(ModelConfig(input_dim=64, latent_sizes=(8, 4), hidden_sizes=(64, 32)), name="bf16")
    guide = guide_cls(model)
    x = torch.bernoulli(torch.full((32, 64), 0.3))
    beta = torch.tensor(1.0)
    fp32 = TrainingStep(model, guide, learning_rate=1e-3)
    bf16 = TrainingStep(model, guide, learning_rate=1e-3, precision="bf16")
    linear_dtypes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: linear_dtypes.append(o.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    pyro.set_rng_seed(4)
    reference = fp32.loss(x, beta)
    assert set(linear_dtypes) == {torch.float32}
    linear_dtypes.clear()
    pyro.set_rng_seed(4)
    lowered = bf16.loss(x, beta)
    assert set(linear_dtypes) == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the step wraps the loss in
        guide_trace = poutine.trace(guide).get_trace(x, beta)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, beta)
    for h in hooks:
        h.remove()
    sites = [s for t in (guide_trace, model_trace) for s in t.nodes.values() if s["type"] == "sample"]
    assert {s["name"] for s in sites} >= {"x", "z1", "z2"}
    for site in sites:
        fn = site["fn"].base_dist if hasattr(site["fn"], "base_dist") else site["fn"]
        assert all(
            v.dtype == torch.float32 for v in (getattr(fn, "loc", None), getattr(fn, "logits", None)) if v is not None
        ), site["name"]
    assert lowered.dtype == torch.float32
    torch.testing.assert_close(lowered, reference, rtol=2e-2, atol=0)
    lowered.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable_parameters(model, guide))


def test_bf16_is_refused_on_the_svi_engine():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    sentence = r"^precision='bf16' runs on the fast engine; set engine='fast' or precision='fp32'\.$"
    with pytest.raises(ValueError, match=sentence):
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3, engine="svi", precision="bf16")
    from pyro_lvae import TrainConfig

    with pytest.raises(ValueError, match="runs on the fast engine; set engine='fast' or precision='fp32'"):
        TrainConfig(engine="svi", precision="bf16")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_warns_on_a_cpu_without_bfloat16_instructions_and_only_there(native, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16_instructions", lambda: native)
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    sentence = (
        r"^precision='bf16' is 15-20x slower than fp32 on this CPU, which has no bfloat16 "
        r"instructions \(AVX512-BF16 or AMX\); use precision='fp32' here\.$"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3, precision="bf16")
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3)  # fp32 never warns
    bf16_warnings = [w for w in caught if re.match(sentence, str(w.message))]
    assert len(bf16_warnings) == (0 if native else 1)


def test_the_gradient_norm_ignores_missing_gradients_and_is_zero_without_any():
    loss = torch.tensor(2.5)
    grads = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    assert loss_and_grad_norm(loss, grads) == (2.5, 5.0)  # sqrt(9 + 16), the None skipped
    assert loss_and_grad_norm(loss, [None, None]) == (2.5, 0.0)
    assert math.isnan(loss_and_grad_norm(loss, [torch.tensor([float("nan")])])[1])


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_the_finiteness_check_finds_any_nan_or_infinity_and_leaves_the_gradients_as_they_were(default_dtype):
    """Also under a float64 default dtype (torch's check wants its scale in float32)."""
    torch.set_default_dtype(default_dtype)
    loss = torch.tensor(2.5)
    grads = [torch.tensor([3.0, -0.0, 1e-45]), None, torch.tensor([[4.0]], dtype=torch.float64)]
    kept = [g.clone() for g in grads if g is not None]
    assert loss_and_gradients_finite(loss, grads) == (2.5, True)
    assert all(torch.equal(a, b) for a, b in zip(kept, [g for g in grads if g is not None], strict=True))
    assert loss_and_gradients_finite(loss, [None, None]) == (2.5, True)
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads[2][0, 0] = bad
        assert loss_and_gradients_finite(loss, grads) == (2.5, False)


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_a_non_finite_gradient_under_a_finite_loss_is_skipped_without_a_threshold(engine):
    """The cheaper check, taken where the skip rule has no threshold, still refuses a NaN in
    one gradient entry: the parameters and batch-norm statistics stay as they were."""
    cfg = ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=True)
    model = GenerativeModel(cfg)
    guide = LadderGuide(model)
    step = TrainingStep(model, guide, learning_rate=1e-2, engine=engine)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    step(x, torch.tensor(1.0))  # one real step, so that every parameter exists
    params = [p.detach().clone() for p in trainable_parameters(model, guide)]
    buffers = [b.clone() for b in model_buffers(model, guide)]
    poisoned = model.decoder_head.weight
    hook = poisoned.register_hook(lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.nan)))
    loss = step(x, torch.tensor(1.0))
    hook.remove()
    assert torch.isfinite(loss) and step.skip_cause == "non_finite" and math.isnan(step.grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(params, trainable_parameters(model, guide), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model_buffers(model, guide), strict=True))


def test_a_clip_threshold_below_one_still_clips():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    clip_gradients([p], max_norm=0.5, max_value=0.0)
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(0.5)


@pytest.mark.parametrize("guide_cls", [LadderGuide, BottomUpGuide])
def test_the_svi_engine_skips_a_non_finite_batch_and_touches_nothing(guide_cls):
    """With Pyro's validation on, a NaN in the data raises inside SVI; the engine turns
    that into a skipped step: a NaN loss of the data's dtype, the cause recorded, and the
    parameters, batch-norm statistics and gradients as before the step."""
    cfg = ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=True)
    model = GenerativeModel(cfg)
    guide = guide_cls(model)
    step = TrainingStep(model, guide, learning_rate=1e-2, engine="svi")
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    step(x, torch.tensor(1.0))  # one real step, so that every parameter exists
    params = [p.detach().clone() for p in trainable_parameters(model, guide)]
    buffers = [b.clone() for b in list(model.buffers()) + list(guide.buffers())]
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pyro.validation_enabled(True):
        loss = step(bad, torch.tensor(1.0))
    assert loss.dtype == x.dtype and loss.device == x.device and torch.isnan(loss)
    assert step.skip_cause == "non_finite" and step.skipped and math.isnan(step.grad_norm)
    for before, p in zip(params, trainable_parameters(model, guide)):
        assert torch.equal(before, p)
        assert p.grad is None or not p.grad.any()
    assert all(torch.equal(a, b) for a, b in zip(buffers, list(model.buffers()) + list(guide.buffers())))
    # A ValueError that no NaN explains is not swallowed.
    with pytest.raises(ValueError), pyro.validation_enabled(True):
        step(x[:, :5], torch.tensor(1.0))


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_a_skipped_step_restores_the_statistics_of_the_step_before(engine):
    """The batch-norm statistics a skipped step restores are those after the previous
    (taken) step, not the ones saved at the first call."""
    cfg = ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4), batch_norm=True)
    model = GenerativeModel(cfg)
    guide = LadderGuide(model)
    step = TrainingStep(model, guide, learning_rate=1e-2, engine=engine)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    step(x, torch.tensor(1.0))
    step(x, torch.tensor(1.0))
    after_two = [b.clone() for b in model_buffers(model, guide)]  # the upward networks' too
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pyro.validation_enabled(engine == "svi"):
        step(bad, torch.tensor(1.0))
    assert step.skipped
    assert all(torch.equal(a, b) for a, b in zip(after_two, model_buffers(model, guide), strict=True))


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_the_skip_rule_travels_with_the_step_state_and_old_states_load(engine):
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    step = TrainingStep(model, guide, learning_rate=1e-3, engine=engine, skip_threshold="auto")
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    for _ in range(3):
        step(x, torch.tensor(1.0))
    state = step.state_dict()
    assert state["engine"] == engine and set(state) == {"engine", "optimizer", "skip_rule"}
    again = TrainingStep(model, guide, learning_rate=1e-3, engine=engine, skip_threshold="auto")
    again.load_state_dict(state)
    assert again.skip_rule.state_dict() == step.skip_rule.state_dict() != SkipRule("auto").state_dict()
    old = {k: v for k, v in state.items() if k != "skip_rule"}  # a checkpoint from before the rule
    fresh = TrainingStep(model, guide, learning_rate=1e-3, engine=engine, skip_threshold="auto")
    fresh.load_state_dict(old)
    assert fresh.skip_rule.state_dict() == SkipRule("auto").state_dict()


def test_a_foreign_engines_state_is_named_in_the_error():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    svi_state = TrainingStep(model, guide, learning_rate=1e-3, engine="svi").state_dict()
    with pytest.raises(ValueError, match="The checkpoint's optimizer state is for engine 'svi', not"):
        TrainingStep(model, guide, learning_rate=1e-3, engine="fast").load_state_dict(svi_state)


def test_the_svi_engine_refuses_data_parallel_training_in_one_sentence():
    from pyro_lvae.training.distributed import DistributedContext

    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    two = DistributedContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"^Distributed training runs on the fast engine; set engine='fast'\.$"):
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3, engine="svi", distributed=two)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"learning_rate": 0.0}, r"^learning_rate must be positive, got 0\.0\.$"),
        (
            {"learning_rate": 1e-3, "grad_clip_value": -1.0},
            r"grad_clip, grad_clip_value non-negative, got 1e-08, 0.0, -1.0",
        ),
        ({"learning_rate": 1e-3, "grad_clip": -1.0}, r"grad_clip, grad_clip_value non-negative, got 1e-08, -1.0, 0.0"),
    ],
)
def test_bad_step_options_are_refused_with_their_values(options, match):
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    with pytest.raises(ValueError, match=match):
        TrainingStep(model, LadderGuide(model), **options)


def test_the_fast_engine_uses_fused_adam_on_cpu():
    """One fused kernel for all parameters is the fast engine's Adam on CPU and CUDA
    (docs/performance.md); the update itself equals Pyro's Adam (tested above)."""
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3, engine="fast")
    assert step.optimizer.defaults["fused"] is True


def test_make_step_builds_the_fast_engine_by_default_and_names_the_choices():
    from pyro_lvae.training.steps import FastStep, make_step

    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    assert type(make_step(model, LadderGuide(model), learning_rate=1e-3)) is FastStep
    with pytest.raises(ValueError, match=r"^Unknown engine 'turbo'; choose one of fast, svi, cuda-graph\.$"):
        make_step(model, LadderGuide(model), engine="turbo", learning_rate=1e-3)


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_a_step_weighs_the_kl_term_by_the_beta_it_is_given(engine):
    """At β = 0 the step's loss is the reconstruction term alone, below the full ELBO's."""
    cfg = ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4))
    x = torch.bernoulli(torch.full((16, 6), 0.5))
    losses = []
    for beta in (0.0, 1.0):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = GenerativeModel(cfg)
        step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3, engine=engine)
        pyro.set_rng_seed(1)
        losses.append(step(x, torch.tensor(beta)).item())
    assert losses[0] < losses[1] - 0.1


def test_a_new_step_has_skipped_nothing_and_measured_no_norm():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3, free_bits=0.5, free_bits_mode="unit")
    assert step.skip_cause is None and not step.skipped and math.isnan(step.grad_norm)
    assert step.elbo.mode == "unit" and step.elbo.free_bits == 0.5


def test_engine_and_precision_mistakes_are_named():
    from pyro_lvae.training.steps import FastStep

    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    with pytest.raises(ValueError, match=r"^FastStep is the 'fast' engine, not 'svi'; use make_step\.$"):
        FastStep(model, LadderGuide(model), learning_rate=1e-3, engine="svi")
    with pytest.raises(ValueError, match=r"^precision must be one of fp32, bf16, got 'fp16'\.$"):
        TrainingStep(model, LadderGuide(model), learning_rate=1e-3, precision="fp16")


def test_a_skipped_svi_step_reports_its_nan_loss_in_the_datas_dtype():
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,))).double()
    guide = LadderGuide(model).double()
    step = TrainingStep(model, guide, learning_rate=1e-3, engine="svi")
    x = torch.bernoulli(torch.full((3, 4), 0.5, dtype=torch.float64))
    x[0, 0] = float("nan")
    with pyro.validation_enabled(True):
        loss = step(x, torch.tensor(1.0, dtype=torch.float64))
    assert loss.dtype == torch.float64 and torch.isnan(loss) and step.skipped


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_a_new_objective_is_the_steps_objective(engine):
    from pyro_lvae.inference.objectives import ImportanceWeightedLoss

    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3, engine=engine)
    objective = ImportanceWeightedLoss(mc_samples=1, iw_samples=2)
    step.use_objective(objective)
    assert step.elbo is objective
    if engine == "svi":  # SVI holds the loss it steps on: it must be rebuilt with the new one
        assert step.svi.loss is objective


def test_a_restored_svi_state_is_the_steps_own_copy():
    """Changing the state dict after loading it does not reach the step (the resume path
    reads it from a file, but a caller holding the dict must not share it)."""
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    step = TrainingStep(model, guide, learning_rate=1e-3, engine="svi")
    step(torch.bernoulli(torch.full((6, 4), 0.5)), torch.tensor(1.0))
    state = step.state_dict()
    fresh = TrainingStep(model, guide, learning_rate=1e-3, engine="svi")
    fresh.load_state_dict(state)
    name = next(iter(state["optimizer"]))
    state["optimizer"][name]["param_groups"][0]["lr"] = 123.0
    assert fresh.state_dict()["optimizer"][name]["param_groups"][0]["lr"] == 1e-3


def test_the_svi_engine_keeps_restored_states_of_parameters_it_has_not_seen():
    """A restored optimizer state whose parameter no step has used yet stays in the step
    (and in the next checkpoint) instead of being handed to pyro.optim early and lost."""
    model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    step = TrainingStep(model, guide, learning_rate=1e-3, engine="svi")
    step(x, torch.tensor(1.0))
    state = step.state_dict()
    some = next(iter(state["optimizer"]))
    state["optimizer"]["not_used_yet"] = copy.deepcopy(state["optimizer"][some])
    resumed = TrainingStep(model, guide, learning_rate=1e-3, engine="svi")
    resumed.load_state_dict(state)
    resumed(x, torch.tensor(1.0))
    assert "not_used_yet" in resumed.state_dict()["optimizer"]


@pytest.mark.parametrize(
    "engine, guide_cls, expected",
    [
        ("fast", LadderGuide, "ClosedFormMeanFieldELBO"),
        ("svi", LadderGuide, "TraceMeanField_ELBO"),
        ("fast", BottomUpGuide, "ClosedFormTraceELBO"),
        ("svi", BottomUpGuide, "Trace_ELBO"),
    ],
)
def test_the_fast_engine_takes_the_closed_form_elbos_and_svi_pyros_own(engine, guide_cls, expected):
    model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4)))
    step = TrainingStep(model, guide_cls(model), learning_rate=1e-2, engine=engine)
    assert type(step.elbo).__name__ == expected
