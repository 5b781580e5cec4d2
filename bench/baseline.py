r"""Plain-PyTorch baselines: the library's training loss written without Pyro, twice.

**The baseline** (:class:`CompactLVAE`, :func:`compact_loss`) is the fastest plain step
written here for the same model and loss. It holds its own compact copy of the networks,
with the same parameter values copied in:

* every MLP is one ``nn.Sequential`` (Linear, BatchNorm1d, LeakyReLU, twice);
* every Gaussian head is one ``Linear`` producing mean and pre-variance together (the two
  weight matrices stacked), split by ``chunk``;
* the log-densities and the KL are written in closed form on variances, with no
  ``torch.distributions`` object;
* the caller steps it with one fused ``torch.optim.Adam``.

**The plain loss** (:func:`plain_loss`) calls the *library's own* ``nn.Module`` objects
(:class:`~pyro_lvae.models.model.GenerativeModel`, :class:`~pyro_lvae.models.guides.LadderGuide`,
:class:`~pyro_lvae.models.guides.BottomUpGuide`) in plain PyTorch. Between the two, the
benchmark separates the cost of the library's module structure from that of Pyro.

Both draw their noise with ``torch.randn_like`` in the same order and shapes as Pyro's
reparameterized ``Normal.rsample``, so on the same seed they compute the library's ELBO
(the benchmark checks this before it times anything):

* Ladder guide, as :class:`~pyro.infer.TraceMeanField_ELBO`: the analytic KL of
  each layer given the sampled layer above, plus the Bernoulli log-likelihood,

  .. math:: -\mathcal{L}_\beta = -\log p(x|z_1) + \beta \sum_l \mathrm{KL}(q(z_l|\cdot)\,\|\,p(z_l|z_{l+1})).

* Bottom-up guide, as :class:`~pyro.infer.Trace_ELBO`: the single-sample estimate

  .. math:: -\mathcal{L}_\beta = -\log p(x|z_1) - \beta\,[\log p(z) - \log q(z|x)].

Both are summed over the batch, as Pyro's losses are.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
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


# --- The compact baseline --------------------------------------------------------------


def _compact_mlp(mlp: nn.Module) -> nn.Sequential:
    """A copy of the library's :class:`~pyro_lvae.models.nn.MLP` as one ``nn.Sequential``."""
    return copy.deepcopy(mlp.net)


def _fused_head(head: nn.Module) -> nn.Linear:
    """One ``Linear`` computing a :class:`~pyro_lvae.models.nn.GaussianHead`'s two, stacked."""
    fused = nn.Linear(head.loc.in_features, 2 * head.loc.out_features)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([head.loc.weight, head.var.weight]))
        fused.bias.copy_(torch.cat([head.loc.bias, head.var.bias]))
    return fused.to(head.loc.weight)


class CompactLVAE(nn.Module):
    """The networks of a model and its guide, compact, with the same values (see the module docstring).

    :param model: The library's model (MLP bottom, Bernoulli likelihood).
    :param guide: Its ladder guide (sharing the model's top-down networks) or bottom-up guide.
    """

    def __init__(self, model: GenerativeModel, guide: nn.Module) -> None:
        super().__init__()
        cfg = model.config
        if cfg.bottom != "mlp" or cfg.likelihood != "bernoulli" or cfg.only_mu_up:
            raise ValueError("The compact baseline covers the paper's MLP model with a Bernoulli likelihood.")
        self.ladder = isinstance(guide, LadderGuide)
        if self.ladder and guide.top_down_net is not None:
            raise ValueError("The compact baseline covers the ladder guide that shares the model's top-down networks.")
        encoder = guide.upward_net if self.ladder else {"mlps": guide.mlps, "heads": guide.heads}
        self.up = nn.ModuleList(_compact_mlp(m) for m in encoder["mlps"])
        self.up_heads = nn.ModuleList(_fused_head(h) for h in encoder["heads"])
        self.down = nn.ModuleList(_compact_mlp(m) for m in model.top_down_mlps)
        self.down_heads = nn.ModuleList(_fused_head(h) for h in model.top_down_heads)
        self.decoder = nn.Sequential(_compact_mlp(model.decoder_mlp), copy.deepcopy(model.decoder_head))
        self.floor = cfg.variance_floor

    def gaussian(self, head: nn.Linear, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of a fused head.

        :param head: One of the fused heads.
        :param d: Its input.
        """
        loc, pre = head(d).chunk(2, dim=-1)
        return loc, F.softplus(pre).clamp_min(self.floor)

    def prior(self, layer: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of p(z_layer | z_layer+1).

        :param layer: The lower layer, 1-based.
        :param z_above: A sample of the layer above.
        """
        return self.gaussian(self.down_heads[layer - 1], self.down[layer - 1](z_above))


def _compact_ladder(c: CompactLVAE, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    h, estimates = x, []
    for mlp, head in zip(c.up, c.up_heads):
        h = mlp(h)
        estimates.append(c.gaussian(head, h))
    loc, var = estimates[-1]
    z = loc + torch.randn_like(loc) * var.sqrt()
    kl = 0.5 * (var + loc * loc - 1 - var.log()).sum()
    for layer in range(len(c.up) - 1, 0, -1):
        p_loc, p_var = c.prior(layer, z)
        hat_loc, hat_var = estimates[layer - 1]
        var = hat_var * p_var / (hat_var + p_var)  # the precision-weighted merge, eqs. 18-19
        loc = (hat_loc * p_var + p_loc * hat_var) / (hat_var + p_var)
        z = loc + torch.randn_like(loc) * var.sqrt()
        kl = kl + _kl_normal(loc, var, p_loc, p_var).sum()
    logits = c.decoder(z)
    return beta * kl + F.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def _compact_bottom_up(c: CompactLVAE, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    h, zs, log_q = x, [], x.new_zeros(())
    for mlp, head in zip(c.up, c.up_heads):
        loc, var = c.gaussian(head, mlp(h))
        eps = torch.randn_like(loc)
        h = loc + eps * var.sqrt()
        log_q = log_q - 0.5 * (eps * eps + var.log() + _LOG_2PI).sum()
        zs.append(h)
    log_p = -0.5 * (zs[-1] * zs[-1] + _LOG_2PI).sum()
    for layer in range(len(c.up) - 1, 0, -1):
        p_loc, p_var = c.prior(layer, zs[layer])
        log_p = log_p + _normal_log_prob(zs[layer - 1], p_loc, p_var).sum()
    logits = c.decoder(zs[0])
    return -beta * (log_p - log_q) + F.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def compact_loss(c: CompactLVAE, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The baseline's loss: the negative β-weighted ELBO of ``c``'s guide, summed over the batch.

    :param c: The compact networks.
    :param x: A minibatch, ``(batch, input_dim)``.
    :param beta: The warm-up weight, a 0-dim tensor.
    """
    return _compact_ladder(c, x, beta) if c.ladder else _compact_bottom_up(c, x, beta)
