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
shorter last minibatch of an epoch reuses the graph. The first call compiles, about a minute on
two CPU cores (docs/performance.md), cached on disk by TorchInductor for later processes.
``tests/inference/test_compiled.py`` checks the loss, every gradient and the batch-norm statistics
against the eager closed form in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.model import GenerativeModel
from .closed_form import closed_form_applies, negative_elbo


class CompiledLoss:
    """:func:`~pyro_lvae.inference.closed_form.negative_elbo` compiled once, for any batch size:
    the ``compiled`` argument of :func:`~pyro_lvae.inference.closed_form.closed_form_loss`.

    Each instance holds its own ``torch.compile`` wrapper (TorchDynamo keeps the compiled code with
    the function, so instances share what compiled the same way).
    """

    def __init__(self) -> None:
        # fullgraph: a graph break would leave most of the loss eager; fail loudly instead.
        self._compiled = torch.compile(negative_elbo, fullgraph=True)

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
        """
        for tensor in (x, *noise):
            # torch._dynamo's hint that the batch size varies: one graph for every minibatch size.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self._compiled(model, guide, x, noise, mask, scale, analytic_kl=analytic_kl)


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
