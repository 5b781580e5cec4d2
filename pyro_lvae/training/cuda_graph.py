r"""The fast step replayed as one CUDA graph: engine ``"cuda-graph"``.

On a GPU the fast step is bound by the host, not the device: Pyro builds two traces and
their distribution objects on every step, and the step dispatches about 1,300 ATen
operations (counted on the CPU for the paper's 5-layer model), for 2.6 GFLOP that an H100
does in well under a millisecond. :class:`GraphStep` records the whole update once, per
minibatch shape, and then replays it::

    graph replay:  snapshot state ─ forward (the ELBO) ─ backward ─ ‖g‖, ok ─ clip ─ Adam
                   ─ state := ok ? new : snapshot ─ (loss, ‖g‖) to a static buffer
    host:          copy x, β and the skip threshold in ─ replay ─ read (loss, ‖g‖) ─ skip rule

The recorded forward pass is the fast step's objective: since 2026-11-25 the closed form of
the paper's model (:class:`~pyro_lvae.inference.objectives.ClosedFormMeanFieldELBO`,
:class:`~pyro_lvae.inference.objectives.ClosedFormTraceELBO`), which the H100 runs of
2026-11-24 predate. Those runs recorded Pyro's traced ELBO, and the closed form has not run
recorded on a GPU yet. Where the closed form does not apply, Pyro's traced ELBO is recorded, as
then (:func:`host_reads_deferred`).

It takes the same updates as :class:`~pyro_lvae.training.steps.FastStep` on the same
random draws (``tests/training/test_cuda_graph.py`` seeds both and compares the
parameters; the recorded body, :func:`update_on_device`, is also checked on the CPU for
equality and for host reads), with these differences in how, not what:

* Adam is built with ``capturable=True`` and its learning rate as a device tensor, so that
  :meth:`~GraphStep.set_learning_rate` reaches the recorded kernels;
* the skip decision is taken on the device: the parameters, Adam's moments and step
  counts, and the batch-norm statistics are snapshot at the start of the graph and
  written back where the loss or the gradient norm is not finite or the norm is above
  the threshold. The host reads the loss and the norm after the replay (one
  synchronization per step) and the :class:`~pyro_lvae.training.skipping.SkipRule`
  names the same cause;
* the first ``warmup_steps`` calls of each minibatch shape run eagerly (they are real
  updates), so that cuBLAS and the optimizer state exist before the capture;
* a graph is kept per minibatch shape and training mode of the model and the guide, and
  all are dropped when a parameter or buffer gets new storage (``.to()``, say);
* β is checked on the eager calls; a replay takes it as given (training's schedule keeps it
  in [0, 1]).

Not supported (a ``ValueError`` says so when the step is built): a model not on a CUDA
device, data-parallel runs, free bits (their floor reads a mask on the host), bf16,
``compile``, the VLAE and VQ-VAE families and the convolutional networks (none has run
recorded; the VQ-VAE's codebook update reads the host).
A restored optimizer state discards the recorded graphs, which are recaptured after new
warm-up calls; a new objective (:meth:`~GraphStep.use_objective`, fine-tuning's) makes every
later step eager.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import torch
from torch import nn

from ..config import is_count
from ..models.model import GenerativeModel
from .steps import FastStep, _check_options, clip_gradients, model_buffers

#: Eager calls of each minibatch shape before its graph is captured.
WARMUP_STEPS = 3


@contextlib.contextmanager
def host_reads_deferred() -> Iterator[None]:
    """Pyro's ELBOs without their host reads, for the duration of a capture.

    ``Trace_ELBO`` and ``TraceMeanField_ELBO`` convert the loss to a Python float
    (``torch_item``) and test it for NaN (``warn_if_nan``); both read the device from the
    host, which a CUDA graph capture forbids. Inside this context the float is the
    detached tensor, the value Pyro itself uses under ``torch.jit`` tracing, and the NaN
    warning is left out: the graph tests the loss itself. The two names are swapped in
    Pyro's two ELBO modules, where the step reads them, and restored on exit (``trace_struct``
    also imports ``warn_if_nan``, but calls it only with validation on, which the step turns off).
    """
    modules = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)
    saved = [(m, m.torch_item, m.warn_if_nan) for m in modules]
    try:
        for module in modules:
            module.torch_item = _detached
            module.warn_if_nan = _no_warning
        yield
    finally:
        for module, item, warn in saved:
            module.torch_item, module.warn_if_nan = item, warn


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Python's cycle collector off: a collection during the capture can free an old graph,
    whose teardown is not permitted while a stream is capturing and invalidates the capture
    (seen on an H100: ``cudaErrorStreamCaptureInvalidated``, then every random draw failing).
    The context is entered before ``torch.cuda.graph`` and left after it, so that the whole
    capture is covered."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _detached(x: Any) -> Any:
    return x.detach() if torch.is_tensor(x) else x


def _no_warning(value: Any, msg: str = "", **kwargs: Any) -> Any:
    return value


@dataclass
class _Graph:
    """One recorded update and its static input and output buffers."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # the batch, copied in before every replay
    readout: torch.Tensor  # (loss, gradient norm), written by every replay


class GraphStep(FastStep):
    """The fast step, recorded once per minibatch shape and training mode as a CUDA graph
    and replayed.

    Parameters as :class:`~pyro_lvae.training.steps.TrainingStep`; see the module
    docstring for the data flow and what is not supported.

    :param warmup_steps: Eager calls of each minibatch shape before its capture.
    """

    engine = "cuda-graph"

    def __init__(self, model: nn.Module, guide: nn.Module, *, warmup_steps: int = WARMUP_STEPS, **options: Any) -> None:
        _check_graph_options(model, options, warmup_steps)
        self.warmup_steps = warmup_steps
        self._recording = True
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._eager_calls: dict[tuple[Any, ...], int] = {}
        self._fingerprint: tuple[int, ...] = ()
        self._buffer_slots: list[tuple[nn.Module, str]] | None = None
        super().__init__(model, guide, **options)
        parameter = next(model.parameters())
        self._beta = torch.zeros((), device=parameter.device, dtype=parameter.dtype)
        self._threshold = torch.full((), math.inf, device=parameter.device, dtype=torch.float64)
        # A capture stream of the model's device (torch.cuda.graph's default is one stream for
        # the whole process, made on whichever device was current first).
        self._capture_stream = torch.cuda.Stream(device=parameter.device)
        self._pool = torch.cuda.graph_pool_handle()

    def _adam(self, params: list[nn.Parameter], learning_rate: float, adam_eps: float) -> torch.optim.Adam:
        # A tensor learning rate is read by the recorded kernels, so that it can still be changed.
        lr = _device_learning_rate(learning_rate, params[0].device)
        return torch.optim.Adam(params, lr=lr, eps=adam_eps, fused=True, capturable=True)

    def __call__(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Take one step on ``x`` with warm-up weight ``beta``: eagerly for the first
        calls of its shape, then by replaying its graph.

        :param x: A minibatch, shape ``(batch, input_dim)``, on the step's device.
        :param beta: The warm-up weight, a 0-dim tensor.
        """
        # A graph holds the addresses of the parameters, buffers and Adam's state, and the
        # training mode.
        fingerprint = self._storage_fingerprint()
        if fingerprint != self._fingerprint:
            self._discard_graphs()
            self._fingerprint = fingerprint
        key = (x.shape, x.dtype, x.device, self.model.training, self.guide.training)
        with torch.cuda.device(x.device):
            if key not in self._graphs:
                calls = self._eager_calls.get(key, 0)
                if not self._recording or calls < self.warmup_steps or not self.optimizer.state:
                    self._eager_calls[key] = calls + 1
                    return self._eager(x, beta)
                self._graphs[key] = self._capture(x)
            return self._replay(self._graphs[key], x, beta)

    def _eager(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        # A replay leaves its gradients in place (the graph writes them anew); an eager
        # backward would add to them.
        self.optimizer.zero_grad(set_to_none=True)
        # On a side stream, as PyTorch's capture recipe warms up.
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            loss = super().__call__(x, beta)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return loss

    def _replay(self, recorded: _Graph, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        # Inputs into the static buffers: the batch, β and this step's skip threshold.
        recorded.x.copy_(x)
        self._beta.copy_(torch.as_tensor(beta))
        self._threshold.fill_(self.skip_rule.current_threshold())
        recorded.graph.replay()
        # One host read: the rule names the cause the graph acted on (same threshold, same norm).
        loss, self.grad_norm = recorded.readout.tolist()
        self.skip_cause = self.skip_rule.cause(loss_finite=math.isfinite(loss), grad_norm=self.grad_norm)
        return recorded.readout[0].clone()

    def _capture(self, x: torch.Tensor) -> _Graph:
        """Record one whole update for minibatches of ``x``'s shape."""
        static_x = x.detach().clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream)
        with _garbage_collection_paused(), capture, host_reads_deferred():
            readout = update_on_device(self, static_x, self._beta, threshold=self._threshold)
        return _Graph(graph, static_x, readout)

    def _storage_fingerprint(self) -> tuple[int, ...]:
        """The addresses of every parameter and buffer (``.to()`` gives parameters new storage
        and replaces buffers), of the learning rates, and the identity of Adam's state (which
        ``load_state_dict`` replaces). The modules holding buffers are listed once: walking the
        modules on every step would take about 0.1 ms of the host's time."""
        if self._buffer_slots is None:
            modules = {id(m): m for m in [*self.model.modules(), *self.guide.modules()]}.values()
            self._buffer_slots = [(m, name) for m in modules for name, _ in m.named_buffers(recurse=False)]
        buffers = [getattr(m, name) for m, name in self._buffer_slots]
        rates = [g["lr"] for g in self.optimizer.param_groups if torch.is_tensor(g["lr"])]
        return (id(self.optimizer.state), *(t.data_ptr() for t in self._params() + buffers + rates))

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def use_objective(self, objective: Any) -> None:
        """Minimize ``objective`` from now on, with eager steps: only the ELBO the step was
        built with has run recorded (fine-tuning's loss has not).

        :param objective: As for :meth:`~pyro_lvae.training.steps.TrainingStep.use_objective`.
        """
        super().use_objective(objective)
        self._discard_graphs()
        self._recording = False

    def set_learning_rate(self, learning_rate: float) -> None:  # noqa: D102
        _check_options(learning_rate, 1.0, 0.0, 0.0)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(float(learning_rate))

    def _optimizer_state(self) -> Any:
        # The learning rate as a number: the device tensor is changed in place later on.
        state = self.optimizer.state_dict()
        state["param_groups"] = [{**group, "lr": float(group["lr"])} for group in state["param_groups"]]
        return state

    def _load_optimizer_state(self, state: Any) -> None:
        super()._load_optimizer_state(state)
        # Loading replaces Adam's state tensors, whose addresses the graphs hold, and its
        # learning rate by the stored one, a number or a CPU tensor after a checkpoint loaded to
        # the CPU: the kernels would take that as a constant, so it goes back to the device.
        device = self._params()[0].device
        for group in self.optimizer.param_groups:
            group["lr"] = _device_learning_rate(group["lr"], device)
        self._discard_graphs()

    def _discard_graphs(self) -> None:
        self._graphs.clear()
        self._eager_calls.clear()
        # A memory pool whose graphs are all gone may be released; the next capture takes a
        # new one (reusing the old handle trips an internal assert of PyTorch's allocator).
        self._pool = torch.cuda.graph_pool_handle()


def _device_learning_rate(learning_rate: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The learning rate as a float32 tensor on ``device``: CUDA's fused Adam reads a tensor
    rate as float32, whatever the parameters' dtype."""
    return torch.tensor(float(learning_rate), device=device, dtype=torch.float32)


def update_on_device(step: FastStep, x: torch.Tensor, beta: torch.Tensor, *, threshold: torch.Tensor) -> torch.Tensor:
    """One whole update of ``step`` that reads no value on the host: the body that
    :class:`GraphStep` records (see the module docstring for the data flow).

    The update is kept where the loss and the gradient norm are finite and the norm is at most
    ``threshold``; elsewhere the parameters, Adam's state and the batch-norm statistics are
    written back as they were. Nothing here is specific to CUDA, so that the tests run this
    body on the CPU (``tests/training/test_cuda_graph.py``): there it must equal the fast
    step's eager update, and make no host read (which a capture forbids).

    :param step: A fast step whose Adam is ``capturable`` and already has its state (one
        eager step has run), with no gradients left from an earlier step.
    :param x: The minibatch, shape ``(batch, input_dim)``.
    :param beta: The warm-up weight, a 0-dim tensor on ``x``'s device; read only inside the
        objective.
    :param threshold: The skip rule's gradient-norm threshold, a 0-dim float64 tensor
        (``inf`` for none).
    :returns: ``(loss, gradient norm)``, stacked, as computed before the decision.
    """
    params = [p for group in step.optimizer.param_groups for p in group["params"]]
    groups = _state_groups(params, step.optimizer, model_buffers(step.model, step.guide))
    # Snapshot the state a skipped update must leave as it was.
    with torch.no_grad():
        saved = [torch.cat([t.reshape(-1) for t in group]) for group in groups]
    # Forward and backward.
    loss = step.loss(x, beta)
    loss.backward()
    # Decide on the device: finite loss and norm, and the norm within the threshold.
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).to(loss.dtype)
    ok = torch.isfinite(loss) & torch.isfinite(norm) & (norm.double() <= threshold)
    # Clip and update, then put the snapshot back where the update is skipped.
    clip_gradients(params, **step.clip)
    step.optimizer.step()
    with torch.no_grad():
        for group, old in zip(groups, saved):
            kept = torch.where(ok, torch.cat([t.reshape(-1) for t in group]), old)
            pieces = kept.split([t.numel() for t in group])
            # torch's private multi-tensor copy: one launch for the group, not one per tensor.
            torch._foreach_copy_(group, [k.view_as(t) for k, t in zip(pieces, group)])
    return torch.stack([loss.detach(), norm])


def _state_groups(
    params: list[torch.Tensor], optimizer: torch.optim.Optimizer, buffers: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """The tensors one update writes, grouped by dtype: parameters, Adam's state, buffers."""
    tensors = list(params)
    for p in params:
        tensors += [v for v in optimizer.state[p].values() if torch.is_tensor(v)]
    tensors += buffers
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in {id(t): t for t in tensors}.values():
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _check_graph_options(model: nn.Module, options: dict[str, Any], warmup_steps: int) -> None:
    """Refuse, before anything is built, what the recorded step cannot do."""
    if options.get("distributed") is not None and options["distributed"].enabled:
        raise ValueError("engine 'cuda-graph' runs in one process; use engine 'fast' for data-parallel training.")
    if options.get("precision", "fp32") != "fp32":
        raise ValueError("engine 'cuda-graph' runs in fp32 (bf16 has not run recorded); use engine 'fast' for bf16.")
    if options.get("free_bits", 0.0) > 0:
        raise ValueError(
            "engine 'cuda-graph' does not support free bits (their floor reads the host); use engine 'fast'."
        )
    if not isinstance(model, GenerativeModel) or model.config.bottom != "mlp":
        raise ValueError(
            "engine 'cuda-graph' has run recorded for the LVAE family with MLP networks only, not this "
            f"{type(model).__name__}; use engine 'fast'."
        )
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"engine 'cuda-graph' records CUDA graphs, but the model is on {device}; use engine 'fast'.")
    if not is_count(warmup_steps):
        raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps!r}.")
