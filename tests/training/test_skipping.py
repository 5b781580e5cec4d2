"""Skipping updates: non-finite steps always, exploding gradient norms with a fixed or an
adaptive ("auto") threshold that cannot freeze training."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch

from pyro_lvae import ExperimentConfig, GenerativeModel, LadderGuide, ModelConfig, TrainConfig
from pyro_lvae.training import train
from pyro_lvae.training.skipping import SkipRule
from pyro_lvae.training.steps import TrainingStep, model_buffers, trainable_parameters


def test_a_fixed_threshold_skips_exactly_the_norms_above_it():
    rule = SkipRule(5.0)
    causes = [rule.cause(loss_finite=True, grad_norm=n) for n in (1.0, 5.0, 5.0001, 100.0)]
    assert causes == [None, None, "threshold", "threshold"]
    assert rule.cause(loss_finite=False, grad_norm=1.0) == "non_finite"
    assert rule.cause(loss_finite=True, grad_norm=math.inf) == "non_finite"
    assert SkipRule(0.0).cause(loss_finite=True, grad_norm=1e30) is None  # 0 = off
    # Without a threshold the norm need not be measured: the finiteness alone decides.
    assert SkipRule(0.0).cause(loss_finite=True, grad_norm=None) is None
    assert SkipRule(0.0).cause(loss_finite=False, grad_norm=None) == "non_finite"
    for active in (SkipRule(5.0), SkipRule("auto")):
        with pytest.raises(ValueError, match="pass grad_norm"):
            active.cause(loss_finite=True, grad_norm=None)


def test_auto_waits_for_history_then_uses_a_multiple_of_the_quantile():
    rule = SkipRule("auto", window=100, quantile=0.9, factor=2.0, min_history=20)
    # Distinct norms, so that the quantile falls between two different order statistics.
    norms = [1e6 if i == 5 else float(i + 1) for i in range(19)] + [20.0]
    for norm in norms[:19]:
        assert rule.cause(loss_finite=True, grad_norm=norm) is None  # no history yet, even for 1e6
    assert rule.current_threshold() == math.inf
    rule.cause(loss_finite=True, grad_norm=norms[19])
    expected = 2.0 * float(torch.quantile(torch.tensor(norms, dtype=torch.float64), 0.9))
    # Sorted, the norms are 1…5, 7…20, 1e6: position 0.9 × 19 = 17.1 lies between 19 and 20.
    assert expected == pytest.approx(2.0 * 19.1)
    assert rule.current_threshold() == pytest.approx(expected, rel=1e-12)


def test_auto_skips_a_spike_and_resumes_after_a_permanent_upward_shift():
    """After 300 norms near 1, one norm of 100 is skipped; then every norm is 100 for good:
    the first few are skipped, and within (1 − q) × window + 2 steps updates resume and stay on."""
    rule = SkipRule("auto", window=500, quantile=0.99, factor=2.0, min_history=50)
    g = torch.Generator().manual_seed(0)
    for n in 1.0 + 0.1 * torch.rand(300, generator=g):
        assert rule.cause(loss_finite=True, grad_norm=float(n)) is None
    assert rule.cause(loss_finite=True, grad_norm=100.0) == "threshold"  # a spike
    causes = [rule.cause(loss_finite=True, grad_norm=100.0 + float(e)) for e in torch.rand(200, generator=g)]
    first_taken = causes.index(None)
    assert 0 < first_taken <= 0.01 * 500 + 2
    assert all(c is None for c in causes[first_taken:])  # it does not freeze


def test_auto_state_round_trips_so_that_a_resumed_rule_decides_the_same():
    a = SkipRule("auto", min_history=5)
    for n in (1.0, 2.0, 1.5, 1.2, 1.1, 1.3):
        a.cause(loss_finite=True, grad_norm=n)
    b = SkipRule("auto", min_history=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through JSON-able types
    assert b.current_threshold() == a.current_threshold() < math.inf
    for n in (2.9, 3.0, 10.0):
        assert a.cause(loss_finite=True, grad_norm=n) == b.cause(loss_finite=True, grad_norm=n)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "sometimes", True])
def test_a_bad_threshold_is_refused_in_one_line_naming_the_option(bad):
    with pytest.raises(ValueError, match="skip_threshold must be 'auto' or a finite gradient norm"):
        TrainConfig(skip_threshold=bad)


def _tensors(state):
    """Every tensor in a nested optimizer state, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state.clone()]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


def _model_and_guide():
    model = GenerativeModel(ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)), name="skip")
    return model, LadderGuide(model)


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_an_injected_huge_gradient_is_skipped_and_leaves_weights_statistics_and_adam_alone(engine):
    model, guide = _model_and_guide()
    step = TrainingStep(model, guide, learning_rate=1e-2, engine=engine, skip_threshold="auto")
    step.skip_rule.min_history = 10
    x = torch.bernoulli(torch.full((16, 12), 0.4))
    beta = torch.tensor(1.0)
    for _ in range(12):
        step(x, beta)
        assert not step.skipped
    params = trainable_parameters(model, guide)
    before = [p.detach().clone() for p in params]
    buffers = [b.clone() for b in model_buffers(model, guide)]  # the guide's own batch norm too
    adam = _tensors(step.state_dict()["optimizer"])
    assert adam  # Adam has moments to compare
    hooks = [p.register_hook(lambda g: g * 1e6) for p in params]  # the gradient explodes once
    step(x, beta)
    for h in hooks:
        h.remove()
    assert step.skip_cause == "threshold" and step.grad_norm > step.skip_rule.last_threshold
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.equal(b, c) for b, c in zip(model_buffers(model, guide), buffers, strict=True))
    after = _tensors(step.state_dict()["optimizer"])
    assert len(after) == len(adam) and all(torch.equal(a, b) for a, b in zip(after, adam))
    step(x, beta)
    assert not step.skipped and any(not torch.equal(p, q) for p, q in zip(params, before))


def test_the_metrics_count_skips_by_cause_and_a_freezing_fixed_threshold_stops_with_the_fix(tmp_path, make_synthetic):
    """A threshold below every norm skips each step: the run stops after max_consecutive_skips,
    names the threshold and the fix, and the metrics of the epochs before say why steps were skipped."""
    base = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)),
        train=TrainConfig(epochs=2, batch_size=16, num_importance_samples=2, eval_every=1, skip_threshold=1e-9),
    )
    with pytest.raises(RuntimeError, match=r"skip_threshold=1e-09 .*use --skip-threshold auto"):
        train(base.replace(max_consecutive_skips=3), out_dir=tmp_path / "a", dataset=make_synthetic(), progress=False)
    result = train(base.replace(max_consecutive_skips=100), dataset=make_synthetic(), progress=False)
    steps = 64 // 16
    assert [m["skipped_by_cause"] for m in result.metrics] == [{"non_finite": 0, "threshold": steps}] * 2
    assert [m["skipped_steps"] for m in result.metrics] == [steps, steps]
    pyro.clear_param_store()
    auto = train(base.replace(skip_threshold="auto"), dataset=make_synthetic(), progress=False)
    assert all(m["skip_threshold"] is None for m in auto.metrics)  # fewer than 50 norms seen: nothing skipped yet
    assert [m["skipped_steps"] for m in auto.metrics] == [0, 0]
