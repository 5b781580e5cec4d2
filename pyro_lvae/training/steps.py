r"""How one training step is taken: the textbook ``SVI`` loop or the fast path.

Both engines minimize the same Pyro ELBO (:func:`~pyro_lvae.inference.objectives.elbo_for`)
of the same model and guide with Adam, and take the same update on the same
random draws (``tests/test_engine.py`` checks loss, gradients and parameters in
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
* the loss stays a tensor; the caller sums it on the device.

Both engines skip an update whose loss or gradients are not finite (a NaN in a
batch, an overflow): the parameters and the optimizer state are left as they were,
and :attr:`TrainingStep.skipped` says so. The check reads one flag per step from the
device (one host synchronization per step on a GPU).
"""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads
from pyro.optim import Adam as PyroAdam
from torch import nn

from ..config import ENGINES
from .distributed import SINGLE_PROCESS, DistributedContext, all_true
from ..models.model import GenerativeModel
from ..inference.objectives import elbo_for
from ..models.registration import registered_once


def trainable_parameters(model: GenerativeModel, guide: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` and ``guide``, each once (the ladder guide holds the model).

    :param model: The generative model.
    :param guide: A guide for it.
    """
    seen: dict[int, nn.Parameter] = {}
    for p in list(model.parameters()) + list(guide.parameters()):
        seen.setdefault(id(p), p)
    return list(seen.values())


class _ScaledLoss(nn.Module):
    """The fast engine's loss as a module for DDP: ``world_size × loss(x, beta)``."""

    def __init__(self, step: "TrainingStep") -> None:
        super().__init__()
        self.model = step.model
        self.guide = step.guide
        self._step = [step]  # a list, so that the step is not registered as a submodule

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        step = self._step[0]
        return step.loss(x, beta) * step.distributed.world_size


def _all_finite(loss: torch.Tensor, grads: list[torch.Tensor | None]) -> bool:
    """Whether ``loss`` and every gradient are finite (one host synchronization)."""
    grads = [g for g in grads if g is not None]
    total = loss.detach().float()
    if grads:
        # The 2-norm of all gradients is finite exactly when every entry is.
        total = total + torch.nn.utils.get_total_norm(grads).to(total.device)
    return bool(torch.isfinite(total))


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


def _fused_available(params: list[nn.Parameter]) -> bool:
    # torch ships fused Adam kernels for CPU and CUDA floating-point tensors.
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class TrainingStep:
    """One optimization step on a minibatch, with either engine.

    :param model: The generative model.
    :param guide: A guide for it.
    :param learning_rate: Adam's learning rate.
    :param engine: ``"fast"`` or ``"svi"`` (see the module docstring).
    :param distributed: In a data-parallel run (:mod:`pyro_lvae.training.distributed`), the
        fast engine's loss goes through
        :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the
        gradients across processes; the loss is multiplied by the number of processes
        so that the average is the gradient of the whole global batch.
    :param adam_eps: Adam's ε.
    :param grad_clip: Clip the global gradient norm to this before each update (0 = off).
    :param grad_clip_value: Then clip each gradient entry to ± this (0 = off).

    Call it as ``step(x, beta)``; it returns the minibatch loss (the negative
    β-weighted ELBO summed over the batch) as a 0-dim tensor on the
    parameters' device. When that loss or any gradient is not finite the update is
    skipped and :attr:`skipped` is ``True`` until the next call.

    >>> import torch
    >>> from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
    >>> model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    >>> step = TrainingStep(model, LadderGuide(model), learning_rate=1e-3)
    >>> step(torch.ones(3, 4), torch.tensor(1.0)).shape
    torch.Size([])
    """

    def __init__(
        self,
        model: GenerativeModel,
        guide: nn.Module,
        *,
        learning_rate: float,
        engine: str = "fast",
        distributed: DistributedContext = SINGLE_PROCESS,
        adam_eps: float = 1e-8,
        grad_clip: float = 0.0,
        grad_clip_value: float = 0.0,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        if distributed.enabled and engine != "fast":
            raise ValueError("Distributed training runs on the fast engine; set engine='fast'.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
        if not adam_eps > 0 or not grad_clip >= 0 or not grad_clip_value >= 0:
            raise ValueError(
                f"adam_eps must be positive and grad_clip, grad_clip_value non-negative, got "
                f"{adam_eps!r}, {grad_clip!r}, {grad_clip_value!r}."
            )
        self.clip = {"max_norm": float(grad_clip), "max_value": float(grad_clip_value)}
        self.model = model
        self.guide = guide
        self.engine = engine
        self.distributed = distributed
        self.elbo = elbo_for(guide)
        #: Whether the last call skipped its update (non-finite loss or gradient).
        self.skipped = False
        if engine == "svi":
            self.optimizer: Any = PyroAdam({"lr": learning_rate, "eps": adam_eps})
            self.svi = SVI(model, guide, self.optimizer, loss=self.elbo)
        else:
            # Register every parameter in Pyro's param store once, under the names the
            # per-call registration of model and guide uses.
            model.register()
            if hasattr(guide, "register"):
                guide.register()
            params = trainable_parameters(model, guide)
            self.optimizer = torch.optim.Adam(
                params, lr=learning_rate, eps=adam_eps, fused=_fused_available(params) or None
            )
            self._ddp: nn.Module | None = None
            if distributed.enabled:
                from torch.nn.parallel import DistributedDataParallel

                # DDP broadcasts rank 0's parameters and buffers now and its buffers
                # before every forward pass; the backward pass all-reduces the gradients.
                self._ddp = DistributedDataParallel(_ScaledLoss(self))

    def __call__(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Take one step on ``x`` with warm-up weight ``beta`` (a 0-dim tensor)."""
        # Batch-norm statistics change in the forward pass; a skipped step restores them.
        buffers = [b.clone() for b in self._buffers()]
        loss = self._svi_step(x, beta) if self.engine == "svi" else self._fast_step(x, beta)
        if self.skipped:
            with torch.no_grad():
                for b, saved in zip(self._buffers(), buffers):
                    b.copy_(saved)
        return loss

    def _buffers(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for b in list(self.model.buffers()) + list(self.guide.buffers()):
            seen.setdefault(id(b), b)
        return list(seen.values())

    def _svi_step(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
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
            self.skipped = True
            return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
        params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
        loss = torch.as_tensor(loss, dtype=x.dtype, device=x.device).detach()
        self.skipped = not _all_finite(loss, [p.grad for p in params])
        if not self.skipped:
            clip_gradients(list(params), **self.clip)
            self.optimizer(params)
        zero_grads(params)
        return loss

    def _fast_step(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        if self._ddp is not None:
            # DDP averages the gradients over the processes, and each process's loss is
            # world_size × its part, so the average is the gradient of the global batch.
            # The division below is for the reported loss only, not for the backward pass.
            scaled = self._ddp(x, beta)
            scaled.backward()
            loss = scaled.detach() / self.distributed.world_size
        else:
            loss = self.loss(x, beta)
            loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        finite = _all_finite(loss, [p.grad for p in params])
        # Every process must take the same decision, or their parameters would drift apart.
        self.skipped = not all_true(finite, self.distributed, loss.device)
        if not self.skipped:
            clip_gradients(params, **self.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The differentiable loss the fast engine minimizes, without a step.

        It is ``elbo.differentiable_loss(model, guide, x, beta)`` with validation off,
        the parameters registered once and the top-down priors shared; its value and gradients equal the reference
        ELBO's on the same random draws.

        :param x: A minibatch, shape ``(batch, input_dim)``.
        :param beta: The warm-up weight, a 0-dim tensor.
        """
        with pyro.validation_enabled(False), self.model.shared_priors(), registered_once(self.model, self.guide):
            return self.elbo.differentiable_loss(self.model, self.guide, x, beta)

    def use_objective(self, objective: Any) -> None:
        """Minimize ``objective`` from now on, with the same optimizer and its state.

        :param objective: A Pyro ELBO or a loss with the same interface, such as
            :class:`~pyro_lvae.inference.objectives.ImportanceWeightedLoss` for fine-tuning.
        """
        self.elbo = objective
        if self.engine == "svi":
            self.svi = SVI(self.model, self.guide, self.optimizer, loss=objective)

    def set_learning_rate(self, learning_rate: float) -> None:
        """Set Adam's learning rate for every parameter (fine-tuning anneals it).

        :param learning_rate: The new rate, positive.
        """
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
        optimizers = self.optimizer.optim_objs.values() if self.engine == "svi" else [self.optimizer]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        if self.engine == "svi":
            # pyro.optim builds each parameter's optimizer when SVI first sees it, from
            # these defaults and, after a resume, from the saved state that waits for it.
            self.optimizer.pt_optim_args["lr"] = learning_rate
            for state in self.optimizer._state_waiting_to_be_consumed.values():
                for group in state["param_groups"]:
                    group["lr"] = learning_rate

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, for checkpoints."""
        if self.engine == "svi":
            return {"engine": "svi", "optimizer": self.optimizer.get_state()}
        return {"engine": "fast", "optimizer": self.optimizer.state_dict()}

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
        if self.engine == "svi":
            self.optimizer.set_state(state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
