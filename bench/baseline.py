r"""The plain-PyTorch baseline: the library's training loss written without Pyro.

It calls the *same* ``nn.Module`` objects as the library's model and guides
(:class:`~pyro_lvae.models.model.GenerativeModel`, :class:`~pyro_lvae.models.guides.LadderGuide`,
:class:`~pyro_lvae.models.guides.BottomUpGuide`) and draws its noise with
``torch.randn`` in the same order and shapes as Pyro's reparameterized
``Normal.rsample``, so on the same seed it computes the same number as the
library's ELBO (the benchmark checks this before it times anything).

* Ladder guide, as :class:`~pyro.infer.TraceMeanField_ELBO`: the analytic KL of
  each layer given the sampled layer above, plus the Bernoulli log-likelihood,

  .. math:: -\mathcal{L}_\beta = -\log p(x|z_1) + \beta \sum_l \mathrm{KL}(q(z_l|\cdot)\,\|\,p(z_l|z_{l+1})).

* Bottom-up guide, as :class:`~pyro.infer.Trace_ELBO`: the single-sample estimate

  .. math:: -\mathcal{L}_\beta = -\log p(x|z_1) - \beta\,[\log p(z) - \log q(z|x)].

Both are summed over the batch, as Pyro's losses are.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from pyro_lvae.models.guides import BottomUpGuide, LadderGuide
from pyro_lvae.models.model import GenerativeModel

_LOG_2PI = math.log(2 * math.pi)


def _normal_log_prob(z: torch.Tensor, loc: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z - loc) ** 2 / var + var.log() + _LOG_2PI)


def _kl_normal(q_loc: torch.Tensor, q_var: torch.Tensor, p_loc: torch.Tensor, p_var: torch.Tensor) -> torch.Tensor:
    return 0.5 * (q_var / p_var + (q_loc - p_loc) ** 2 / p_var - 1 + p_var.log() - q_var.log())


def _reconstruction(model: GenerativeModel, z1: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    logits = model.decoder_head(model.decoder_mlp(z1))
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def ladder_loss(model: GenerativeModel, guide: LadderGuide, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Negative warm-up ELBO of the ladder guide, analytic KL per layer."""
    estimates = guide.upward(x)
    loc, var = estimates[-1]
    z = loc + torch.randn_like(loc) * var.sqrt()
    kl = _kl_normal(loc, var, torch.zeros_like(loc), torch.ones_like(var)).sum()
    for layer in range(model.depth - 1, 0, -1):
        p_loc, p_var = model.prior_params(layer, z)
        prec_hat, prec_p = estimates[layer - 1][1].reciprocal(), p_var.reciprocal()
        var = (prec_hat + prec_p).reciprocal()
        loc = (estimates[layer - 1][0] * prec_hat + p_loc * prec_p) * var
        z = loc + torch.randn_like(loc) * var.sqrt()
        kl = kl + _kl_normal(loc, var, p_loc, p_var).sum()
    return beta * kl - _reconstruction(model, z, x)


def bottom_up_loss(model: GenerativeModel, guide: BottomUpGuide, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Negative single-sample warm-up ELBO of the bottom-up guide."""
    h = x
    zs, log_q = [], x.new_zeros(())
    for mlp, head in zip(guide.mlps, guide.heads):
        loc, var = head(mlp(h))
        h = loc + torch.randn_like(loc) * var.sqrt()
        log_q = log_q + _normal_log_prob(h, loc, var).sum()
        zs.append(h)
    log_p = _normal_log_prob(zs[-1], torch.zeros_like(zs[-1]), torch.ones_like(zs[-1])).sum()
    for layer in range(model.depth - 1, 0, -1):
        p_loc, p_var = model.prior_params(layer, zs[layer])
        log_p = log_p + _normal_log_prob(zs[layer - 1], p_loc, p_var).sum()
    return -beta * (log_p - log_q) - _reconstruction(model, zs[0], x)


def plain_loss(model: GenerativeModel, guide: torch.nn.Module, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The baseline loss for either guide."""
    if isinstance(guide, LadderGuide):
        return ladder_loss(model, guide, x, beta)
    return bottom_up_loss(model, guide, x, beta)
