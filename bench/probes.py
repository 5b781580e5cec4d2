"""Probes of speed-ups of the training step, timed against the fast engine with Pyro's traced objective.

    python bench/probes.py jit       # Pyro's JIT ELBOs (torch.jit.trace)
    python bench/probes.py jit-fixed # the same, with JitTraceMeanField_ELBO's cache bug worked around
    python bench/probes.py compile   # torch.compile of the fast engine's loss
    python bench/probes.py compile-networks  # torch.compile of each deterministic network only
    python bench/probes.py trace-mean-field  # the fast engine with Pyro's TraceMeanField_ELBO (ladder)
    python bench/probes.py stacked-heads     # each Gaussian head as one matrix product (mean and variance)
    python bench/probes.py lean-mc --guide vae  # a Monte Carlo ELBO without Trace_ELBO's per-site .item()
    python bench/probes.py float-beta --guide vae  # β as a Python float in the handlers (0 < β ≤ 1 only)
    python bench/probes.py op-count --guide vae # ATen operations dispatched by one fast-engine step
    python bench/probes.py kernel-count --guide vae # operations a CUDA graph would replay: engine against baseline
    python bench/probes.py combined --guide vae  # every small change at once, beside the baseline
    python bench/probes.py closed-form --guide vae  # the closed-form objective, beside the baseline
    python bench/probes.py finetune --guide vae  # a fine-tuning step (10 × 1 IW samples): traced against closed form

Each probe builds the paper's 5-layer model for one guide (``--guide``), times
the fast engine's step and the probed variant in interleaved rounds, and prints
both (or the error that stopped the variant). ``trace-mean-field``, ``stacked-heads``,
``lean-mc`` and ``float-beta`` are whole engine steps with one thing changed; ``combined`` is the
engine step with all the small changes together (heads built stacked, β as a float, a merge in
fewer operations, the lean Monte Carlo ELBO for the bottom-up guide), timed beside the fast
engine and ``bench/baseline.py``'s step; ``op-count``
counts operations and times nothing; ``kernel-count`` counts, on the CPU, the operations that
are not views (each launches a kernel on a GPU) in the body that the ``cuda-graph`` engine
records (:func:`~pyro_lvae.training.cuda_graph.update_on_device`) and in the baseline's step
with capturable Adam, which ``bench/run.py`` records on a GPU; the others time loss, backward and update without the
engine's finiteness check. docs/performance.md reports them.

Since 2026-11-25 the fast engine computes its objective in closed form for the paper's model
(:class:`~pyro_lvae.inference.objectives.ClosedFormMeanFieldELBO`,
:class:`~pyro_lvae.inference.objectives.ClosedFormTraceELBO`). The changes probed here act on
Pyro's traced path, so every step here is given the traced objective the engine used before
(``MeanFieldELBO`` for the ladder guide, ``Trace_ELBO`` for the bottom-up one), and
``closed-form`` times that traced step, the closed-form step (the engine as it is) and
the baseline together: what the closed form bought. ``finetune`` times a fast-engine step of the
fine-tuning objective (``lvae-bn-wu-5-ft``: 10 Monte Carlo × 1 importance sample per example,
β = 1) with its weights from Pyro's particle traces and in closed form, and checks first that the
two losses agree on the same draws.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _build, _median_ms, _traced_weights  # noqa: E402

from pyro_lvae import get_preset  # noqa: E402
from pyro_lvae.inference.objectives import MeanFieldELBO, elbo_for  # noqa: E402
from pyro_lvae.models.nn import MLP, GaussianHead  # noqa: E402
from pyro_lvae.training.steps import TrainingStep  # noqa: E402

ENGINE_VARIANTS = ("trace-mean-field", "stacked-heads", "lean-mc", "float-beta", "combined", "closed-form")


class LeanMonteCarloELBO(Trace_ELBO):
    """The single-sample ELBO of reparameterized guides, summed from the traces' log-densities
    without ``Trace_ELBO``'s ``.item()`` per site and score parts (a probe, not a library class)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        elbo = sum(s["log_prob_sum"] for s in model_trace.nodes.values() if s["type"] == "sample")
        return -(elbo - sum(s["log_prob_sum"] for s in guide_trace.nodes.values() if s["type"] == "sample"))


def _stacked_forward(head: GaussianHead, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.cat([head.loc.weight, head.var.weight])
    loc, pre_var = F.linear(d, weight, torch.cat([head.loc.bias, head.var.bias])).chunk(2, dim=-1)
    return loc, F.softplus(pre_var).clamp_min(head.variance_floor)


class _StackedHead(GaussianHead):
    """A Gaussian head built as one ``Linear`` of twice the width (a probe, not a library class)."""

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, pre_var = self.stacked(d).chunk(2, dim=-1)
        return loc, F.softplus(pre_var).clamp_min(self.variance_floor)


def stack_heads(*modules: torch.nn.Module) -> None:
    """Rebuild every Gaussian head of ``modules`` as :class:`_StackedHead`, with the same values;
    call it before the step is built, so that the optimizer sees the new parameters."""
    heads = {id(m): m for root in modules for m in root.modules() if type(m) is GaussianHead}.values()
    for head in heads:
        stacked = torch.nn.Linear(head.loc.in_features, 2 * head.loc.out_features).to(head.loc.weight)
        with torch.no_grad():
            stacked.weight.copy_(torch.cat([head.loc.weight, head.var.weight]))
            stacked.bias.copy_(torch.cat([head.loc.bias, head.var.bias]))
        del head.loc, head.var
        head.stacked = stacked
        head.__class__ = _StackedHead


def _merge_in_fewer_operations(loc_hat, var_hat, loc_prior, var_prior):
    """Eqs. 17–18 as a weight w = σ²_p / (σ̂²_q + σ²_p): μ_q = μ_p + w (μ̂_q − μ_p), σ²_q = w σ̂²_q."""
    w = var_prior / (var_hat + var_prior)
    return loc_prior + w * (loc_hat - loc_prior), var_hat * w


def traced(step: TrainingStep) -> TrainingStep:
    """``step`` with the traced objective the fast engine used before its closed form."""
    step.elbo = MeanFieldELBO() if step.guide.mean_field_compatible else Trace_ELBO()
    return step


def engine_variant(probe: str, step: TrainingStep, x: torch.Tensor, beta: torch.Tensor):
    """A whole fast-engine step with the one change ``probe`` names (``combined``: all of them;
    its heads must have been stacked with :func:`stack_heads` before the step was built)."""
    if probe == "combined":
        if not step.guide.mean_field_compatible:
            step.elbo = LeanMonteCarloELBO()
        return _with_float_beta(step, x, beta, merge=_merge_in_fewer_operations)
    if probe == "closed-form":
        step.elbo = elbo_for(step.guide, lean=True)
    elif probe == "trace-mean-field":
        step.elbo = TraceMeanField_ELBO()
    elif probe == "lean-mc":
        step.elbo = LeanMonteCarloELBO()
    if probe == "float-beta":
        return _with_float_beta(step, x, beta)
    if probe != "stacked-heads":
        return lambda: step(x, beta)
    # Each head once: the ladder guide holds the model's heads too.
    heads = {id(m): m for m in [*step.model.modules(), *step.guide.modules()] if isinstance(m, GaussianHead)}.values()

    def stacked() -> None:
        for head in heads:  # an instance attribute shadows the class's forward for this step only
            head.forward = _stacked_forward.__get__(head)
        try:
            step(x, beta)
        finally:
            for head in heads:
                del head.forward

    return stacked


@contextlib.contextmanager
def float_beta(*, merge=None):
    """Inside, the model's and the guide's KL weight is a Python float: Pyro's scale handlers
    then multiply numbers instead of tensors (valid for 0 < β ≤ 1, no mask needed); with
    ``merge``, the ladder guide's merge is that function."""
    import pyro_lvae.models.guides as guides_module
    import pyro_lvae.models.model as model_module

    original, original_merge = model_module.kl_weight, guides_module.precision_weighted_merge

    @contextlib.contextmanager
    def float_kl_weight(b):
        with poutine.scale(scale=float(b)) if b is not None else contextlib.nullcontext():
            yield

    model_module.kl_weight = guides_module.kl_weight = float_kl_weight
    guides_module.precision_weighted_merge = merge or original_merge
    try:
        yield
    finally:
        model_module.kl_weight = guides_module.kl_weight = original
        guides_module.precision_weighted_merge = original_merge


def _with_float_beta(step: TrainingStep, x: torch.Tensor, beta: torch.Tensor, *, merge=None):
    """The step under :func:`float_beta`."""

    def step_with_float_beta() -> None:
        with float_beta(merge=merge):
            step(x, beta)

    return step_with_float_beta


def check_combined_loss(fast: TrainingStep, combined: TrainingStep, x: torch.Tensor, beta: torch.Tensor) -> float:
    """The relative difference between the losses of the fast engine and of ``combined`` (built
    on a copy of the same parameters) on the same random draws."""
    pyro.set_rng_seed(1)
    expected = fast.loss(x, beta).item()
    pyro.set_rng_seed(1)
    with float_beta(merge=_merge_in_fewer_operations):
        got = combined.loss(x, beta).item()
    return abs(got - expected) / abs(expected)


def count_operations(fn) -> int:
    """How many ATen operations ``fn()`` dispatches, backward and optimizer included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


#: ATen operations that only make views or read metadata: no kernel on a GPU.
VIEW_OPERATIONS = frozenset(
    "aten." + name
    for name in (
        "view _unsafe_view t transpose expand split split_with_sizes unsqueeze squeeze detach slice select "
        "alias as_strided permute reshape _reshape_alias unbind chunk lift_fresh"
    ).split()
)


def kernel_count(fn) -> int:
    """How many ATen operations other than views ``fn()`` dispatches, backward and optimizer included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += str(func.overloadpacket) not in VIEW_OPERATIONS
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def _recorded_bodies(config, x: torch.Tensor, beta: torch.Tensor) -> dict[str, int]:
    """Kernels of the update the cuda-graph engine records, and of the baseline's step as
    ``bench/run.py`` records it, both with capturable fused Adam, on the CPU."""
    import math

    from baseline import CompactLVAE, compact_loss

    from pyro_lvae.inference import warmup
    from pyro_lvae.training.cuda_graph import GraphStep, update_on_device
    from pyro_lvae.training.steps import FastStep

    class Capturable(FastStep):  # the graph engine's Adam, on the CPU
        _adam = GraphStep._adam

    step = Capturable(*_build(config, x.device, "recorded"), learning_rate=1e-3)
    step(x, beta)  # Adam's state first, as the engine's eager warm-up calls make it
    step.optimizer.zero_grad(set_to_none=True)
    threshold = torch.tensor(math.inf, dtype=torch.float64)
    sign_readable, warmup._sign_readable = warmup._sign_readable, lambda beta: False  # as while recording
    try:
        engine = kernel_count(lambda: update_on_device(step, x, beta, threshold=threshold))
    finally:
        warmup._sign_readable = sign_readable
    compact = CompactLVAE(*_build(config, x.device, "baseline"))
    opt = torch.optim.Adam(list(compact.parameters()), lr=torch.tensor(1e-3), fused=True, capturable=True)

    def baseline():
        compact_loss(compact, x, beta).backward()
        opt.step()

    baseline()
    opt.zero_grad(set_to_none=True)
    return {"cuda-graph engine's recorded update": engine, "baseline's recorded step": kernel_count(baseline)}


LOSS_VARIANTS = ("jit", "jit-fixed", "compile", "compile-networks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    counts = ("op-count", "kernel-count", "finetune")
    parser.add_argument("probe", choices=(*LOSS_VARIANTS, *counts, *ENGINE_VARIANTS))
    parser.add_argument("--guide", choices=("ladder", "vae"), default="ladder")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    config = get_preset("lvae-bn-wu-5").replace(guide=args.guide)
    x = torch.bernoulli(torch.rand(config.train.batch_size, config.model.input_dim))
    beta = torch.tensor(0.5)
    if args.probe == "finetune":
        _finetune(config, x, args.rounds)
    elif args.probe == "kernel-count":
        for label, count in _recorded_bodies(config, x, beta).items():
            print(f"kernel-count ({args.guide}): {count} operations other than views in the {label}")
    elif args.probe == "op-count":
        _op_counts(config, x, beta, args.guide)
    else:
        _timed_probe(args.probe, config, x, beta, guide_name=args.guide, rounds=args.rounds)


def _op_counts(config, x: torch.Tensor, beta: torch.Tensor, guide_name: str) -> None:
    """ATen operations of one step of the fast engine, traced and in closed form."""
    fast = traced(TrainingStep(*_build(config, x.device, "fast"), learning_rate=1e-3))
    closed = TrainingStep(*_build(config, x.device, "closed"), learning_rate=1e-3)
    for label, step in (("traced", fast), ("closed form", closed)):
        step(x, beta)  # registration and optimizer state first
        operations = count_operations(lambda step=step: step(x, beta))
        print(f"op-count ({guide_name}, {label}): {operations} ATen operations in one step")


def _timed_probe(probe: str, config, x: torch.Tensor, beta: torch.Tensor, *, guide_name: str, rounds: int) -> None:
    """Time the variant ``probe`` against the fast engine's traced step, in interleaved rounds."""
    model, guide = _build(config, x.device, "fast")
    fast = traced(TrainingStep(model, guide, learning_rate=1e-3))
    fns = {"fast engine, traced": lambda: fast(x, beta)}
    model2, guide2 = _build(config, x.device, "probe")
    if probe == "combined":  # the same parameter values, heads stacked
        model2.load_state_dict(model.state_dict())
        guide2.load_state_dict(guide.state_dict())
        stack_heads(model2, guide2)
    probe_step = traced(TrainingStep(model2, guide2, learning_rate=1e-3))
    if probe in ENGINE_VARIANTS:
        fns[probe] = engine_variant(probe, probe_step, x, beta)
        if probe == "combined":
            print(
                f"combined ({guide_name}): loss relative to the fast engine's on the same draws "
                f"{check_combined_loss(fast, probe_step, x, beta):.1e}"
            )
        if probe in ("combined", "closed-form"):
            fns["baseline"] = _baseline_step(config, x, beta)
        _report(fns, rounds, x)
        return
    step = _loss_variant(probe, probe_step, x, beta)
    t0 = time.perf_counter()
    try:
        step()
    except Exception as exc:  # the probe's outcome is what we report
        print(
            f"{probe} ({guide_name}): the first step failed after {time.perf_counter() - t0:.1f} s: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        )
        return
    print(f"{probe} ({guide_name}): first step (compilation included) {time.perf_counter() - t0:.1f} s")
    fns[probe] = step
    _report(fns, rounds, x)


def _loss_variant(probe: str, step: TrainingStep, x: torch.Tensor, beta: torch.Tensor):
    """A step of loss, backward and update with the loss of ``probe`` (one of
    :data:`LOSS_VARIANTS`), on ``step``'s networks and optimizer, without the engine's
    finiteness check."""
    model, guide, opt = step.model, step.guide, step.optimizer
    if probe == "jit":
        elbo = (JitTraceMeanField_ELBO if guide.mean_field_compatible else JitTrace_ELBO)(ignore_jit_warnings=True)
        loss_fn = lambda: elbo.differentiable_loss(model, guide, x, beta)  # noqa: E731
    elif probe == "jit-fixed":
        # Pyro 1.9's JitTraceMeanField_ELBO checks for its compiled function under
        # `_loss_and_surrogate_loss` but stores it as `_differentiable_loss`, so it
        # recompiles on every call. Compile the same loss once instead.
        mean_field = TraceMeanField_ELBO() if guide.mean_field_compatible else Trace_ELBO()
        compiled_loss = pyro.ops.jit.trace(
            lambda x, beta: mean_field.differentiable_loss(model, guide, x, beta), ignore_warnings=True
        )
        loss_fn = lambda: compiled_loss(x, beta)  # noqa: E731
    elif probe == "compile":
        compiled = torch.compile(step.loss)
        loss_fn = lambda: compiled(x, beta)  # noqa: E731
    else:
        # Each MLP and Gaussian head compiled in place (their parameters and state_dict
        # keys stay as they are); Pyro's sample sites and handlers stay in Python.
        for module in list(model.modules()) + list(guide.modules()):
            if isinstance(module, (MLP, GaussianHead)):
                module.compile()
        loss_fn = lambda: step.loss(x, beta)  # noqa: E731

    def loss_backward_update() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return loss_backward_update


def _baseline_step(config, x: torch.Tensor, beta: torch.Tensor):
    """``bench/baseline.py``'s compact plain-PyTorch step, as ``bench/run.py`` times it."""
    from run import CompactLVAE, _fused_adam, compact_loss

    compact = CompactLVAE(*_build(config, x.device, "baseline"))
    opt = _fused_adam(list(compact.parameters()), 1e-3)

    def baseline() -> None:
        compact_loss(compact, x, beta).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return baseline


def _finetune(config, x: torch.Tensor, rounds: int) -> None:
    """The fine-tuning step, traced and closed form, on twin networks (see the module docstring)."""
    from pyro_lvae.inference.objectives import ImportanceWeightedLoss

    train = get_preset("lvae-bn-wu-5-ft").train
    loss = ImportanceWeightedLoss(mc_samples=train.finetune_mc_samples, iw_samples=train.finetune_iw_samples)
    beta = torch.tensor(1.0)
    steps = {}
    for name in ("traced", "closed form"):
        model, guide = _build(config, x.device, name.replace(" ", "-"))
        steps[name] = TrainingStep(model, guide, learning_rate=1e-3)
        steps[name].use_objective(loss)
    steps["closed form"].model.load_state_dict(steps["traced"].model.state_dict())
    steps["closed form"].guide.load_state_dict(steps["traced"].guide.state_dict())
    values = []
    for name, step in steps.items():
        pyro.set_rng_seed(1)
        with _traced_weights() if name == "traced" else contextlib.nullcontext():
            values.append(step.loss(x, beta).item())
    print(
        f"finetune: loss {values[0]:.4f} traced, {values[1]:.4f} closed form (relative difference "
        f"{abs(values[0] - values[1]) / abs(values[0]):.1e}), M = {loss.mc_samples}, K = {loss.iw_samples}"
    )

    def traced() -> None:
        with _traced_weights():
            steps["traced"](x, beta)

    ms = _median_ms(
        {"traced": traced, "closed form": lambda: steps["closed form"](x, beta)},
        device=x.device,
        rounds=rounds,
        per_round=2,
        warmup=1,
    )
    for name, value in ms.items():
        print(f"finetune step, {name:12s} {value:8.1f} ms")


def _report(fns: dict, rounds: int, x: torch.Tensor) -> None:
    ms = _median_ms(fns, device=x.device, rounds=rounds, per_round=10, warmup=3)
    for name, value in ms.items():
        ratio = f"  {value / ms['baseline']:.3f}× the baseline" if "baseline" in ms else ""
        print(f"{name:12s} {value:7.2f} ms/step{ratio}")
    pyro.clear_param_store()


if __name__ == "__main__":
    main()
