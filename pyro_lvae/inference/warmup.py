r"""Deterministic warm-up (paper §2.3, eq. 20).

The warm-up objective is

.. math::

    \mathcal{L}_\beta(x) = -\beta\,\mathrm{KL}(q(z|x)\,\|\,p(z))
                         + \mathbb{E}_q[\log p(x|z)],

with β rising linearly from 0 to 1 over the first N_t epochs. In Pyro this is a
scale of β on the log-densities of the *latent* sites, in both the model and the
guide; the observation site is never scaled.

``poutine.scale(scale=0.0)`` raises, so :func:`kl_weight` combines two handlers:
``poutine.mask(mask=β > 0)`` zeroes the latent terms exactly when β = 0 (the
reconstruction-only start of warm-up), and ``poutine.scale`` applies
``max(β, tiny)`` with ``tiny = torch.finfo(dtype).tiny`` (1.2e-38 in float32).
The effective weight is therefore exactly β for β = 0 and for every
representable β ≥ tiny. Pass β to the model and guide as a positional tensor
argument (``svi.step(x, beta)``): a JIT-compiled ELBO then traces it as an input
and one compiled graph serves every β, instead of recompiling for each value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pyro import poutine


def warmup_beta(epoch: int, warmup_epochs: int) -> float:
    """The KL weight β used during ``epoch`` (0-based).

    β = epoch / N_t for epoch < N_t and 1 afterwards, so the first epoch trains
    the reconstruction term alone and epoch N_t is the first with β = 1.

    :param epoch: Zero-based epoch index.
    :param warmup_epochs: N_t; 0 means no warm-up (β = 1 from the start).

    >>> [warmup_beta(e, 4) for e in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"epoch and warmup_epochs must be non-negative, got {epoch}, {warmup_epochs}.")
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, epoch / warmup_epochs)


def kl_mask_and_scale(beta: float | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mask ``β > 0`` and the scale ``max(β, tiny)`` that :func:`kl_weight` puts on the
    latent sites (see the module docstring), after checking β; ``None`` for ``β = None``.

    The closed-form training loss (:func:`~pyro_lvae.inference.closed_form.closed_form_loss`)
    weighs each layer's KL term with the same two tensors, as Pyro's ``scale_and_mask`` does.

    :param beta: β in [0, 1], a float or a 0-dim tensor, or ``None``.
    :raises ValueError: if β is negative, NaN or not a scalar (a CUDA tensor's
        sign is not read while a CUDA graph is being recorded).
    """
    if beta is None:
        return None
    beta = torch.as_tensor(beta)
    if beta.dim() != 0:
        raise ValueError(f"beta must be a scalar, got shape {tuple(beta.shape)}.")
    if not beta.is_floating_point():
        beta = beta.to(torch.get_default_dtype())
    if _sign_readable(beta) and not bool(beta >= 0):
        raise ValueError(f"beta must be a non-negative number, got {beta.item()!r}.")
    return beta > 0, beta.clamp(min=torch.finfo(beta.dtype).tiny)


def _sign_readable(beta: torch.Tensor) -> bool:
    """Whether β's value may be read on the host: not under ``torch.jit`` tracing, nor while
    a CUDA graph is being recorded on β's device, which forbids host reads (the CUDA-graph
    engine's replays take β as given; training's schedule keeps it in [0, 1])."""
    recording = beta.is_cuda and torch.cuda.is_current_stream_capturing()
    return not recording and not torch.jit.is_tracing()


@contextlib.contextmanager
def kl_weight(beta: float | torch.Tensor | None) -> Iterator[None]:
    """Context manager that weights the latent sites inside it by β.

    :param beta: β in [0, 1], a float or a 0-dim tensor; ``None`` means no
        weighting (β = 1, the plain ELBO), which adds no handler at all.
    :raises ValueError: if β is negative, NaN or not a scalar (a CUDA tensor's
        sign is not read while a CUDA graph is being recorded).
    """
    weight = kl_mask_and_scale(beta)
    if weight is None:
        yield
        return
    mask, scale = weight
    with poutine.mask(mask=mask), poutine.scale(scale=scale):
        yield
