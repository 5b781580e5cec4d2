r"""The closed-form training loss compiled by ``torch.compile``: ``compile=True``, ``--compile``.

For the paper's model the fast engine's loss is
:func:`~pyro_lvae.inference.closed_form.closed_form_loss`: no Pyro handler, no distribution
object and no host read between the minibatch and the loss, so that TorchDynamo captures it as
one graph, and TorchInductor fuses its elementwise work (batch norm, leaky ReLU, the heads'
softplus, the merge, the KL and the likelihood) around the matrix products, forward and
backward. Only the deterministic part is compiled; the noise is drawn eagerly, by the same
calls in the same order as the eager loss, so the draws are the same::

    eager:     check x and β ─ register the parameters ─ draw ε, one block per layer
    compiled:  upward pass ─ z = μ + ε·σ, top down, merged with the prior ─ KL per layer
               ─ log p(x|z1) ─ β, masked ─ loss                 (and its backward pass)

The eager loss runs the guide's upward pass before the first draw; here the draws come first.
That is the same computation for the library's networks, which draw nothing:
:func:`check_compilable` refuses a network holding a dropout layer.

The batch dimension is compiled as a symbol (``torch._dynamo.maybe_mark_dynamic``), so that the
shorter last minibatch of an epoch reuses the graph. Any other change compiles a variant: another
architecture, dtype, device or precision (bf16 autocast, ``precision="bf16"``), β or no β. Each
:class:`CompiledLoss` (each training step) keeps its own variants, up to
``torch._dynamo.config.recompile_limit`` (8); past it, it raises, naming the way out. A new step
of a model compiled before in the same process traces again (2 s for the paper's 5-layer model on
two CPU cores) and takes the rest from TorchInductor's caches. The first call compiles, about a minute on
two CPU cores (docs/performance.md), cached on disk by TorchInductor for later processes.
``tests/inference/test_compiled.py`` checks the loss, every gradient and the batch-norm statistics
against the eager closed form in float64.
"""

from __future__ import annotations

import functools
import types
import weakref

import torch
from torch import nn

from ..models.model import GenerativeModel
from .closed_form import closed_form_applies, negative_elbo


class CompiledLoss:
    """:func:`~pyro_lvae.inference.closed_form.negative_elbo` compiled once, for any batch size:
    the ``compiled`` argument of :func:`~pyro_lvae.inference.closed_form.closed_form_loss`.

    Each instance compiles a copy of its own of the function, and keeps its own variants.
    """

    def __init__(self) -> None:
        # fullgraph: a graph break would leave most of the loss eager; fail loudly instead.
        self._compiled = torch.compile(_own_copy(negative_elbo), fullgraph=True)
        # The guides checked by check_compilable, each with its model (weakly: no module kept alive).
        self._checked: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()

    def __call__(
        self,
        model: GenerativeModel,
        guide: nn.Module,
        x: torch.Tensor,
        noise: list[torch.Tensor],
        mask: torch.Tensor | None,
        scale: torch.Tensor | None,
        *,
        analytic_kl: bool,
    ) -> torch.Tensor:
        """The loss as :func:`~pyro_lvae.inference.closed_form.negative_elbo` computes it.

        :param model: The paper's model.
        :param guide: Its ladder or bottom-up guide.
        :param x: A minibatch, shape ``(batch, input_dim)``.
        :param noise: The noise blocks, one ``(batch, units)`` per layer.
        :param mask: Where β > 0, or ``None``.
        :param scale: β, clamped above 0, or ``None``.
        :param analytic_kl: The analytic KL per layer (ladder guide).
        :raises ValueError: on the first call with a pair :func:`check_compilable` refuses.
        :raises RuntimeError: when this call would compile one variant more than this instance
            may (see the module docstring).
        """
        known = self._checked.get(guide)
        if known is None or known() is not model:
            check_compilable(model, guide)
            self._checked[guide] = weakref.ref(model)
        for tensor in (x, *noise):
            # torch._dynamo's hint that the batch size varies: one graph for every minibatch size.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            return self._compiled(model, guide, x, noise, mask, scale, analytic_kl=analytic_kl)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            limit = torch._dynamo.config.recompile_limit
            raise RuntimeError(
                "torch.compile has reached its limit on variants of this compiled loss "
                f"(torch._dynamo.config.recompile_limit, now {limit}: one per architecture, dtype, device and "
                "precision); raise that limit, call torch._dynamo.reset() before this step, or set compile=False."
            ) from error


def _own_copy(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` with a code object of its own.

    TorchDynamo keeps the compiled variants of a function on its code object, and counts them there
    against ``torch._dynamo.config.recompile_limit``: sharing ``negative_elbo``'s, the ninth model
    compiled in one process (a sweep in a notebook, say) would fail. With its own copy, each
    :class:`CompiledLoss` counts only the variants it compiles; TorchInductor's on-disk caches still
    serve what an earlier copy compiled.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(copy, fn)


def check_compilable(model: nn.Module, guide: nn.Module) -> None:
    """Refuse, before any work, a model and guide whose loss ``compile=True`` cannot compile.

    :param model: The generative model.
    :param guide: A guide for it.
    :raises ValueError: unless the closed form covers them
        (:func:`~pyro_lvae.inference.closed_form.closed_form_applies`) and no network holds a
        dropout layer (the compiled loss draws its noise before the networks run).
    """
    if not closed_form_applies(model, guide):
        raise ValueError(
            f"compile applies to the closed-form loss of the paper's model with its ladder or bottom-up guide, "
            f"not {type(model).__name__} with {type(guide).__name__}; set compile=False."
        )
    for module in (*model.modules(), *guide.modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(
                f"compile needs networks that draw nothing, but {type(module).__name__} does; remove it or set "
                "compile=False."
            )
