r"""Free bits (Kingma et al. 2016): a floor λ under each layer's (or unit's) KL term.

The training objective replaces the KL term of layer :math:`i`, averaged over the
minibatch, by :math:`\max(\lambda, \mathrm{KL}_i)`, so that a layer whose KL falls below λ
nats per example is no longer pushed further towards the prior:

.. math::

    \mathcal{L}_\lambda = \mathbb{E}_q[\log p(x|z)]
      - \beta \sum_i B \max\Big(\lambda, \tfrac{1}{B}\textstyle\sum_{b} \mathrm{KL}_{i,b}\Big),

summed over the B examples of the minibatch; with ``mode="unit"`` the maximum is taken per
unit of each layer. It is the ELBO plus the penalty
:math:`\beta \sum_i \mathrm{relu}(\lambda B - \mathrm{KL}_i)` (:func:`free_bits_penalty`),
computed from the same traces as the ELBO's own KL terms, so below λ the penalty's gradient
cancels the KL's exactly and above it the gradient is the ELBO's.

Each estimator is the guide's ELBO with one method overridden (as Pyro's own ELBOs are
built): :class:`FreeBitsMeanFieldELBO` for the analytic per-layer KL of
:class:`~pyro.infer.TraceMeanField_ELBO` (the ladder guide), :class:`FreeBitsTraceELBO` for
the Monte Carlo KL of :class:`~pyro.infer.Trace_ELBO` (the bottom-up guide). Only training
sees the floor: the ELBO and L_K that :func:`~pyro_lvae.inference.evaluation.evaluate`
reports are the true bounds.
"""

from __future__ import annotations

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from ..config import check_free_bits


def _unit_kl(model_site: dict, guide_site: dict, *, analytic: bool) -> torch.Tensor:
    """KL(q || p) of one latent site per example and unit, shape ``batch + (units,)``."""
    q, p = guide_site["fn"].base_dist, model_site["fn"].base_dist
    if analytic:
        return kl_divergence(q, p).expand(q.batch_shape)
    value = guide_site["value"]
    return q.log_prob(value) - p.log_prob(value)


def free_bits_penalty(model_trace, guide_trace, free_bits: float, *, mode: str, analytic: bool) -> torch.Tensor:
    """:math:`\\sum_i \\beta_i\\,\\mathrm{relu}(\\lambda B - \\mathrm{KL}_i)` over the latent sites,
    per layer or per unit; 0 when every KL is above the floor.

    :param model_trace: The model's trace, replayed on the guide's.
    :param guide_trace: The guide's trace.
    :param free_bits: λ, nats per example.
    :param mode: ``"layer"`` or ``"unit"``.
    :param analytic: Use the analytic KL (as ``TraceMeanField_ELBO``) rather than the
        Monte Carlo one at the guide's sample (as ``Trace_ELBO``).
    """
    penalty: torch.Tensor | float = 0.0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample" or model_site["is_observed"]:
            continue
        guide_site = guide_trace.nodes[name]
        mask = guide_site["mask"]
        if mask is not None:
            mask = torch.as_tensor(mask, device=guide_site["value"].device).unsqueeze(-1)
            if not mask.any():  # β = 0 (masked, see warmup.kl_weight): no KL term to floor
                continue
        kl = scale_and_mask(_unit_kl(model_site, guide_site, analytic=analytic), mask=mask)
        examples = kl[..., 0].numel()
        totals = kl.reshape(-1, kl.shape[-1]).sum(0)  # per unit, summed over the minibatch
        if mode == "layer":
            totals = totals.sum(0, keepdim=True)
        scale = guide_site["scale"]
        penalty = penalty + scale * torch.relu(free_bits * examples - totals).sum()
    return penalty


class FreeBits:
    """The free-bits floor on top of a Pyro ELBO class: a mixin whose one method,
    ``_differentiable_loss_particle``, adds :func:`free_bits_penalty` to the ELBO's loss.

    :param free_bits: λ, nats per example (per layer, or per unit).
    :param mode: ``"layer"`` or ``"unit"``.
    :param kwargs: Passed to the ELBO.
    """

    analytic: bool

    def __init__(self, *, free_bits: float, mode: str = "layer", **kwargs) -> None:
        check_free_bits(free_bits, mode)
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)
        self.mode = mode

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The objective's value (Pyro's ``Trace_ELBO.loss`` would leave the floor out).

        :param model: The model.
        :param guide: The guide.
        :param args: The model's and guide's arguments.
        :param kwargs: Their keyword arguments.
        """
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        penalty = free_bits_penalty(model_trace, guide_trace, self.free_bits, mode=self.mode, analytic=self.analytic)
        return loss + float(torch.as_tensor(penalty).detach()), surrogate + penalty


class FreeBitsMeanFieldELBO(FreeBits, TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` with the free-bits floor (the ladder guide).

    :param free_bits: λ, nats per example (per layer, or per unit).
    :param mode: ``"layer"`` or ``"unit"``.
    :param kwargs: Passed to the ELBO.
    """

    analytic = True


class FreeBitsTraceELBO(FreeBits, Trace_ELBO):
    """:class:`~pyro.infer.Trace_ELBO` with the free-bits floor (the bottom-up guide).

    :param free_bits: λ, nats per example (per layer, or per unit).
    :param mode: ``"layer"`` or ``"unit"``.
    :param kwargs: Passed to the ELBO.
    """

    analytic = False
