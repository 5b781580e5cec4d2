r"""How one training step is taken: the textbook ``SVI`` loop or the fast path.

Two small classes, :class:`SVIStep` and :class:`FastStep`, implement one contract, the base
class :class:`TrainingStep`: ``step(x, beta)`` takes one update and returns the loss,
:attr:`~TrainingStep.skipped` says whether the update was skipped, and the learning rate,
the objective and the optimizer state can be changed or saved. :func:`make_step` builds
the one an engine name asks for (``TrainingStep(..., engine=...)`` does the same). A third
engine, ``"cuda-graph"``, is the fast step recorded as a CUDA graph
(:class:`~pyro_lvae.training.cuda_graph.GraphStep`, in its own module).

Both engines minimize the same Pyro ELBO (:func:`~pyro_lvae.inference.objectives.elbo_for`)
of the same model and guide with Adam, and take the same update on the same
random draws (``tests/training/test_steps.py`` checks loss, gradients and parameters in
float64).

``"svi"`` is the loop of Pyro's tutorials::

    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=elbo)
    loss = svi.step(x, beta)

``pyro.optim.Adam`` keeps one ``torch.optim.Adam`` per parameter tensor (118 of
them for the paper's 5-layer ladder model), ``svi.step`` traces the parameters
it touched and converts the loss to a Python float, a host synchronization on a GPU.

``"fast"`` (the default) is the same objective written as Pyro's
"custom objectives" pattern::

    loss = elbo.differentiable_loss(model, guide, x, beta)
    loss.backward(); optimizer.step(); optimizer.zero_grad()

with these changes, each measured in ``docs/performance.md``:

* one ``torch.optim.Adam`` over every parameter, with the fused kernel where
  PyTorch has one for the device and dtype;
* Pyro's argument validation is switched off inside the step, because the data
  were checked once before training (:func:`~pyro_lvae.data.check_data`) and the
  distributions' parameters are positive by construction (softplus variances);
* the parameters are registered in Pyro's param store once, when the step is
  built, instead of by ``pyro.module`` on every call of the model and the guide
  (``register_params`` is switched off inside the step and restored after it;
  ``SVI`` needs the per-call registration to find the parameters, this engine
  optimizes the modules' parameters directly);
* the model's top-down priors are shared with the ladder guide
  (:meth:`~pyro_lvae.models.model.GenerativeModel.shared_priors`);
* without free bits, the objective is computed in closed form for the paper's model with
  either of its guides (:class:`~pyro_lvae.inference.objectives.ClosedFormMeanFieldELBO`,
  :class:`~pyro_lvae.inference.objectives.ClosedFormTraceELBO`): the same networks and the
  same draws, without Pyro's traces and distribution objects, whose per-site Python was
  most of the step's cost above plain PyTorch. The value and every gradient are those of
  ``TraceMeanField_ELBO`` and ``Trace_ELBO`` (float64 tests); any other model or guide goes
  through Pyro's traces (for the mean-field loss without the latent log-densities it never
  reads, :class:`~pyro_lvae.inference.objectives.MeanFieldELBO`);
* the loss stays a tensor; the caller sums it on the device.

Both engines skip an update whose loss or gradients are not finite (a NaN in a
batch, an overflow), and, with ``skip_threshold``, one whose gradient norm explodes
(:class:`~pyro_lvae.training.skipping.SkipRule`): the parameters, the batch-norm
statistics and the optimizer state are left as they were, and
:attr:`TrainingStep.skip_cause` says why. Without a threshold one multi-tensor check says
whether every gradient entry is finite (:func:`loss_and_gradients_finite`); with one, the
gradient norm is computed. Either is read from the device with the loss (one host
synchronization per step on a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, ClassVar

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads
from pyro.optim import Adam as PyroAdam
from torch import nn

from ..config import ENGINES, check_compile
from ..inference.compiled import check_compilable
from ..inference.objectives import elbo_for
from ..models.registration import registered_once
from ..precision import autocast_for, check_precision, warn_if_bf16_is_emulated
from .distributed import SINGLE_PROCESS, DistributedContext, all_true, max_over_processes
from .skipping import SkipRule


def trainable_parameters(model: nn.Module, guide: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` and ``guide``, each once (the ladder guide holds the model).

    :param model: The generative model.
    :param guide: A guide for it.
    """
    return _each_once(list(model.parameters()) + list(guide.parameters()))


#: How grave each skip decision is, for the reduction across processes.
_CAUSE_RANK = {None: 0, "threshold": 1, "non_finite": 2}
_CAUSE_OF_RANK = {rank: cause for cause, rank in _CAUSE_RANK.items()}


def model_buffers(model: nn.Module, guide: nn.Module) -> list[torch.Tensor]:
    """Every buffer (batch-norm statistics) of ``model`` and ``guide``, each once.

    :param model: The generative model.
    :param guide: A guide for it.
    """
    return _each_once(list(model.buffers()) + list(guide.buffers()))


def _each_once(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` without repeats, in order (the ladder guide holds the model's tensors too)."""
    return list({id(t): t for t in tensors}.values())  # a repeat keeps its first place


def loss_and_grad_norm(loss: torch.Tensor, grads: list[torch.Tensor | None]) -> tuple[float, float]:
    """The loss and the global 2-norm of the gradients, read together (one host synchronization).

    The norm is finite exactly when every gradient entry is.

    :param loss: The 0-dim loss.
    :param grads: The gradients; ``None`` entries are ignored.
    """
    grads = [g for g in grads if g is not None]
    norm = torch.nn.utils.get_total_norm(grads).to(loss.device) if grads else loss.new_zeros(())
    value, total = torch.stack([loss.detach().float(), norm.float()]).tolist()
    return value, total


def loss_and_gradients_finite(loss: torch.Tensor, grads: list[torch.Tensor | None]) -> tuple[float, bool]:
    """The loss, and whether every gradient entry is finite, read together (one host synchronization).

    One pass of torch's multi-tensor non-finite check, the one ``torch.amp.GradScaler`` runs:
    about a third of the cost of the gradient norm (docs/performance.md).

    :param loss: The 0-dim loss.
    :param grads: The gradients; ``None`` entries are ignored.
    """
    grads = [g for g in grads if g is not None]
    found = torch.zeros((), dtype=torch.float32, device=loss.device)
    if grads:
        # torch's private check behind GradScaler (whose public API also unscales): it sets
        # `found` where an entry is NaN or infinite, and multiplies every gradient by the
        # scale, 1 here, which leaves each one exactly as it was.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=loss.device).float())
    value, bad = torch.stack([loss.detach().float(), found]).tolist()
    return value, bad == 0


def clip_gradients(params: list[torch.Tensor], *, max_norm: float, max_value: float) -> None:
    """Clip the gradients of ``params`` in place, as the authors' code does: first the
    global 2-norm to ``max_norm``, then every entry to ±``max_value`` (0 switches either off).

    :param params: Parameters whose ``.grad`` is clipped; ``None`` gradients are ignored.
    :param max_norm: Largest global gradient norm.
    :param max_value: Largest absolute gradient entry.
    """
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if max_value > 0:
        torch.nn.utils.clip_grad_value_(params, max_value)


def _check_options(learning_rate: float, adam_eps: float, grad_clip: float, grad_clip_value: float) -> None:
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
    if not adam_eps > 0 or not grad_clip >= 0 or not grad_clip_value >= 0:
        raise ValueError(
            f"adam_eps must be positive and grad_clip, grad_clip_value non-negative, got "
            f"{adam_eps!r}, {grad_clip!r}, {grad_clip_value!r}."
        )


class TrainingStep:
    """One optimization step on a minibatch: the contract of both engines.

    :param model: The generative model.
    :param guide: A guide for it.
    :param learning_rate: Adam's learning rate.
    :param engine: ``"fast"``, ``"svi"`` or ``"cuda-graph"``; only read when the base class itself is
        called, which builds that engine's class (see :func:`make_step`).
    :param distributed: The data-parallel context (:mod:`pyro_lvae.training.distributed`);
        only the fast engine runs distributed.
    :param adam_eps: Adam's ε.
    :param grad_clip: Clip the global gradient norm to this before each update (0 = off).
    :param grad_clip_value: Then clip each gradient entry to ± this (0 = off).
    :param free_bits: λ of the free-bits floor under each layer's KL (0 = off,
        :mod:`pyro_lvae.inference.free_bits`).
    :param free_bits_mode: ``"layer"`` or ``"unit"``.
    :param skip_threshold: Also skip an update whose gradient norm (before clipping)
        exceeds this: a number, ``"auto"`` (a running quantile of recent norms) or 0 (off);
        see :class:`~pyro_lvae.training.skipping.SkipRule`.
    :param precision: ``"fp32"`` or ``"bf16"`` (fast engine only): the networks run under
        bfloat16 autocast; the Gaussian heads and the likelihood return the parameters'
        precision, so that the log-densities, the KL, the merge and the loss stay in fp32. On a
        CPU without bfloat16 instructions it warns (:func:`~pyro_lvae.precision.warn_if_bf16_is_emulated`).
    :param compile: Fast engine only, one process, no free bits: the closed-form loss compiled
        by ``torch.compile`` (:mod:`pyro_lvae.inference.compiled`; the first step compiles, about
        a minute on a CPU), in fp32 or under bf16. The same loss on the same draws, to rounding.

    Call it as ``step(x, beta)``; it returns the minibatch loss (the negative
    β-weighted ELBO summed over the batch) as a 0-dim tensor on the
    parameters' device. When that loss or any gradient is not finite, or the gradient
    norm is above the skip threshold, the update is skipped, the batch-norm statistics
    are restored, and :attr:`skip_cause` says why until the next call. A subclass
    implements ``_build_optimizer``, ``_update`` and the optimizer's learning rate and state.

    >>> import torch
    >>> from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
    >>> model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)), name="doc")
    >>> step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3)
    >>> type(step).__name__, step(torch.ones(3, 4), torch.tensor(1.0)).shape
    ('FastStep', torch.Size([]))
    """

    #: The engine name this class implements.
    engine: ClassVar[str]
    #: Whether the objective is :func:`~pyro_lvae.inference.objectives.elbo_for`'s lean one (the
    #: closed form where it applies, see the module docstring) rather than Pyro's own class
    #: (same loss).
    lean_objective: ClassVar[bool] = False

    def __new__(cls, *args: Any, engine: str = "fast", **options: Any) -> TrainingStep:
        if cls is TrainingStep:
            if engine not in ENGINES:
                raise ValueError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
            cls = _engine_classes()[engine]
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        *,
        learning_rate: float,
        engine: str | None = None,
        distributed: DistributedContext = SINGLE_PROCESS,
        adam_eps: float = 1e-8,
        grad_clip: float = 0.0,
        grad_clip_value: float = 0.0,
        free_bits: float = 0.0,
        free_bits_mode: str = "layer",
        skip_threshold: float | str = 0.0,
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        if engine is not None and engine != self.engine:
            raise ValueError(f"{type(self).__name__} is the {self.engine!r} engine, not {engine!r}; use make_step.")
        _check_options(learning_rate, adam_eps, grad_clip, grad_clip_value)
        check_precision(precision)
        if precision == "bf16":
            warn_if_bf16_is_emulated(model)
        check_compile(compile, engine=self.engine, free_bits=free_bits, data_parallel=distributed.enabled)
        if compile:
            check_compilable(model, guide)
        self.precision = precision
        self.model = model
        self.guide = guide
        self.distributed = distributed
        self.clip = {"max_norm": float(grad_clip), "max_value": float(grad_clip_value)}
        #: The objective minimized (:func:`~pyro_lvae.inference.objectives.elbo_for` of the guide).
        self.elbo = elbo_for(
            guide, free_bits=free_bits, free_bits_mode=free_bits_mode, lean=self.lean_objective, compile=compile
        )
        #: Decides which updates are skipped, and why.
        self.skip_rule = SkipRule(skip_threshold)
        #: Why the last call skipped its update (``"non_finite"`` or ``"threshold"``), or ``None``.
        self.skip_cause: str | None = None
        #: The global gradient norm of the last call, before clipping (``nan`` if not computed).
        self.grad_norm = math.nan
        self._build_optimizer(learning_rate, adam_eps)

    @property
    def skipped(self) -> bool:
        """Whether the last call skipped its update."""
        return self.skip_cause is not None

    def _decide(self, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Set :attr:`skip_cause` and :attr:`grad_norm` from the loss and the gradients of
        ``params``, with the same decision on every process. The norm is computed only where
        the skip rule compares it with a threshold; otherwise a cheaper check says whether
        every gradient is finite (:func:`loss_and_gradients_finite`), and the norm is ``nan``."""
        grads = [p.grad for p in params]
        if self.skip_rule.active:
            value, self.grad_norm = loss_and_grad_norm(loss, grads)
            measured: float | None = self.grad_norm
            finite = math.isfinite(value)
        else:
            value, grads_finite = loss_and_gradients_finite(loss, grads)
            self.grad_norm, measured = math.nan, None
            finite = math.isfinite(value) and grads_finite
        finite = all_true(finite, self.distributed, loss.device)
        cause = self.skip_rule.cause(loss_finite=finite, grad_norm=measured)
        if self.distributed.enabled:
            # The averaged gradients, and so the norms, agree across processes, but the
            # decision is reduced too, so that no rounding can split it: the gravest cause wins.
            cause = _CAUSE_OF_RANK[max_over_processes(_CAUSE_RANK[cause], self.distributed, loss.device)]
        self.skip_cause = cause

    def __call__(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Take one step on ``x`` with warm-up weight ``beta`` (a 0-dim tensor).

        :param x: A minibatch, shape ``(batch, input_dim)``.
        :param beta: The warm-up weight.
        """
        # Batch-norm statistics change in the forward pass; a skipped step restores them.
        buffers = self._buffers()
        saved = self._save_buffers(buffers)
        loss = self._update(x, beta)
        if self.skipped and buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
        return loss

    def _save_buffers(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of ``buffers`` in storage kept from step to step.

        torch's private multi-tensor copy writes all the batch-norm buffers (60 in the paper's
        5-layer model) in one call, instead of allocating a clone of each on every step
        (docs/performance.md has the saving).
        """
        # New tensors (after .to(device) or .double(), say) get new storage.
        key = tuple((b.data_ptr(), b.dtype, b.device) for b in buffers)
        saved = getattr(self, "_saved_buffers", None)
        if saved is None or self._saved_for != key:
            saved = self._saved_buffers = [b.detach().clone() for b in buffers]
            self._saved_for = key
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(saved, buffers)
        return saved

    def _buffers(self) -> list[torch.Tensor]:
        return model_buffers(self.model, self.guide)

    def _build_optimizer(self, learning_rate: float, adam_eps: float) -> None:
        raise NotImplementedError

    def _update(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Compute the loss and gradients, set :attr:`skipped`, and update unless skipped."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The differentiable loss both engines minimize, without a step.

        It is ``elbo.differentiable_loss(model, guide, x, beta)`` with validation off,
        the parameters registered once and the top-down priors shared; its value and
        gradients equal the reference ELBO's on the same random draws.

        :param x: A minibatch, shape ``(batch, input_dim)``.
        :param beta: The warm-up weight, a 0-dim tensor.
        """
        with (
            pyro.validation_enabled(False),
            self.model.shared_priors(),
            registered_once(self.model, self.guide),
            self._autocast(x.device),
        ):
            return self.elbo.differentiable_loss(self.model, self.guide, x, beta)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bfloat16 autocast for ``precision="bf16"``: it lowers the matrix products of the
        networks; the heads hand fp32 back to the densities (see the class docstring)."""
        return autocast_for(self.precision, device)

    def use_objective(self, objective: Any) -> None:
        """Minimize ``objective`` from now on, with the same optimizer and its state.

        :param objective: A Pyro ELBO or a loss with the same interface, such as
            :class:`~pyro_lvae.inference.objectives.ImportanceWeightedLoss` for fine-tuning.
        """
        self.elbo = objective

    def set_learning_rate(self, learning_rate: float) -> None:
        """Set Adam's learning rate for every parameter (fine-tuning anneals it).

        :param learning_rate: The new rate, positive.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and the skip rule's, for checkpoints, tagged with the engine."""
        return {"engine": self.engine, "optimizer": self._optimizer_state(), "skip_rule": self.skip_rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the engines' states are not interchangeable.

        :param state: A dict from :meth:`state_dict`.
        :raises ValueError: if it was written by the other engine.
        """
        if state.get("engine") != self.engine:
            raise ValueError(
                f"The checkpoint's optimizer state is for engine {state.get('engine')!r}, not "
                f"{self.engine!r}; resume with the engine the run was started with."
            )
        self._load_optimizer_state(state["optimizer"])
        self.skip_rule.load_state_dict(state.get("skip_rule", {}))  # absent in checkpoints before it existed

    def _optimizer_state(self) -> Any:
        raise NotImplementedError

    def _load_optimizer_state(self, state: Any) -> None:
        raise NotImplementedError


class SVIStep(TrainingStep):
    """The loop of Pyro's tutorials: ``SVI(model, guide, pyro.optim.Adam(...), loss=elbo)``,
    with the finiteness check between the gradients and the update (see the module docstring).

    Parameters as :class:`TrainingStep`.
    """

    engine = "svi"

    def __init__(self, model: nn.Module, guide: nn.Module, *, learning_rate: float, **options: Any) -> None:
        if options.get("distributed", SINGLE_PROCESS).enabled:
            raise ValueError("Distributed training runs on the fast engine; set engine='fast'.")
        if options.get("precision", "fp32") != "fp32":
            raise ValueError("precision='bf16' runs on the fast engine; set engine='fast' or precision='fp32'.")
        super().__init__(model, guide, learning_rate=learning_rate, **options)

    def _build_optimizer(self, learning_rate: float, adam_eps: float) -> None:
        self.optimizer = PyroAdam({"lr": learning_rate, "eps": adam_eps})
        self.svi = SVI(self.model, self.guide, self.optimizer, loss=self.elbo)
        # Optimizer states restored from a checkpoint and not yet handed to pyro.optim,
        # which builds each parameter's optimizer when SVI first sees the parameter.
        self._restored: dict[str, Any] = {}

    def _update(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The body of ``SVI.step``, with the finiteness check between gradients and update."""
        try:
            with poutine.trace(param_only=True) as param_capture:
                loss = self.svi.loss_and_grads(self.model, self.guide, x, beta)
        except ValueError:
            # With Pyro's validation on, a NaN reaching a distribution raises here
            # instead of giving a NaN loss: skip the step when that is the cause.
            everything = trainable_parameters(self.model, self.guide)
            if torch.isfinite(x).all() and all(torch.isfinite(p).all() for p in everything):
                raise
            zero_grads(set(everything))
            self.skip_cause, self.grad_norm = "non_finite", math.nan
            return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
        store = pyro.get_param_store()
        # In the order of their names, so that the gradient norm sums in the same order in
        # every process (a set's order follows object ids).
        params = sorted(
            {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}, key=store.param_name
        )
        loss = torch.as_tensor(loss, dtype=x.dtype, device=x.device).detach()
        self._decide(loss, params)
        if not self.skipped:
            clip_gradients(params, **self.clip)
            self._hand_over_restored_state(params)
            self.optimizer(set(params))
        zero_grads(set(params))
        return loss

    def _hand_over_restored_state(self, params: list[torch.Tensor]) -> None:
        """Give pyro.optim the restored states of the parameters it is about to see for the
        first time; the others stay here, where set_learning_rate and state_dict reach them."""
        if not self._restored:
            return
        store = pyro.get_param_store()
        names = {store.param_name(p) for p in params} & self._restored.keys()
        self.optimizer.set_state({name: self._restored.pop(name) for name in names})

    def use_objective(self, objective: Any) -> None:  # noqa: D102 - documented on the base class
        super().use_objective(objective)
        self.svi = SVI(self.model, self.guide, self.optimizer, loss=objective)

    def set_learning_rate(self, learning_rate: float) -> None:  # noqa: D102
        _check_options(learning_rate, 1.0, 0.0, 0.0)
        for optimizer in self.optimizer.optim_objs.values():
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        self.optimizer.pt_optim_args["lr"] = learning_rate  # for parameters SVI has not seen yet
        for state in self._restored.values():
            for group in state["param_groups"]:
                group["lr"] = learning_rate

    def _optimizer_state(self) -> Any:
        return {**self._restored, **self.optimizer.get_state()}

    def _load_optimizer_state(self, state: Any) -> None:
        self._restored = copy.deepcopy(state)


class _ScaledLoss(nn.Module):
    """The fast engine's loss as a module for DDP: ``world_size × loss(x, beta)``."""

    def __init__(self, step: FastStep) -> None:
        super().__init__()
        self.model = step.model
        self.guide = step.guide
        self._step = [step]  # a list, so that the step is not registered as a submodule

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        step = self._step[0]
        return step.loss(x, beta) * step.distributed.world_size


def _fused_available(params: list[nn.Parameter]) -> bool:
    # torch ships fused Adam kernels for CPU and CUDA floating-point tensors.
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class FastStep(TrainingStep):
    """Pyro's "custom objectives" pattern: ``elbo.differentiable_loss``, ``backward`` and
    one ``torch.optim.Adam`` over every parameter (see the module docstring).

    Parameters as :class:`TrainingStep`. In a data-parallel run the loss goes through
    :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients
    across processes; the loss is multiplied by the number of processes so that the
    average is the gradient of the whole global batch.
    """

    engine = "fast"
    lean_objective = True

    def _build_optimizer(self, learning_rate: float, adam_eps: float) -> None:
        # Register every parameter in Pyro's param store once, under the names the
        # per-call registration of model and guide uses.
        self.model.register()
        self.guide.register()
        params = trainable_parameters(self.model, self.guide)
        self.optimizer = self._adam(params, learning_rate, adam_eps)
        self._ddp: nn.Module | None = None
        if self.distributed.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's parameters and buffers now and its buffers
            # before every forward pass; the backward pass all-reduces the gradients.
            self._ddp = DistributedDataParallel(_ScaledLoss(self))

    def _adam(self, params: list[nn.Parameter], learning_rate: float, adam_eps: float) -> torch.optim.Adam:
        """One Adam over ``params``, with the fused kernel where PyTorch has one."""
        return torch.optim.Adam(params, lr=learning_rate, eps=adam_eps, fused=_fused_available(params) or None)

    def _update(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        # Forward and backward: through DDP, each process's loss is world_size × its part,
        # so that the averaged gradient is the global batch's.
        if self._ddp is not None:
            loss = self._ddp(x, beta)
            loss.backward()
            loss = loss.detach() / self.distributed.world_size  # the reported loss only
        else:
            loss = self.loss(x, beta)
            loss.backward()
        # Skip on a non-finite loss or gradient, or an exploding gradient norm: the same
        # decision on every process.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._decide(loss, params)
        # Clip, update, clear.
        if not self.skipped:
            clip_gradients(params, **self.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def set_learning_rate(self, learning_rate: float) -> None:  # noqa: D102
        _check_options(learning_rate, 1.0, 0.0, 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

    def _optimizer_state(self) -> Any:
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: Any) -> None:
        self.optimizer.load_state_dict(state)


def _engine_classes() -> dict[str, type[TrainingStep]]:
    """The step class of each engine name (the CUDA-graph step builds on :class:`FastStep`)."""
    from .cuda_graph import GraphStep

    return {cls.engine: cls for cls in (FastStep, SVIStep, GraphStep)}


def make_step(model: nn.Module, guide: nn.Module, *, engine: str = "fast", **options: Any) -> TrainingStep:
    """The training step of ``engine`` for ``model`` and ``guide``.

    :param model: The generative model.
    :param guide: A guide for it.
    :param engine: ``"fast"`` (:class:`FastStep`), ``"svi"`` (:class:`SVIStep`) or
        ``"cuda-graph"`` (:class:`~pyro_lvae.training.cuda_graph.GraphStep`).
    :param options: The keyword options of :class:`TrainingStep`.
    :raises ValueError: for an unknown engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    return _engine_classes()[engine](model, guide, **options)
