r"""The log importance weights of the paper's model in closed form, for fast evaluation.

:func:`~pyro_lvae.inference.evaluation.particle_log_weights` traces the guide and the
replayed model under a particle plate and asks every site's distribution for its
log-density. For :class:`~pyro_lvae.models.model.GenerativeModel` with either of its
guides the same numbers have short closed forms. With :math:`z = \mu + \epsilon\sigma`,

.. math::

    \log q(z|\cdot) = -\tfrac12 \textstyle\sum_j (\epsilon_j^2 + \log\sigma_j^2 + \log 2\pi),

    \log p(z|\cdot) = -\tfrac12 \textstyle\sum_j
        \big((z_j - \mu_{p,j})^2/\sigma_{p,j}^2 + \log\sigma_{p,j}^2 + \log 2\pi\big),

and the Bernoulli likelihood is :math:`\log p(x|z_1) = \sum_j x_j \ell_j - \mathrm{softplus}(\ell_j)`
for logits :math:`\ell`. :func:`closed_form_log_weights` computes them with the model's and
guide's own networks, without traces or distribution objects. It draws its noise in the
order and shapes of the traced path (one ``(particles, batch, units)`` block per layer, in
the guide's sampling order), so on the same seed it gives the same weights, up to
floating-point rounding (``tests/inference/test_closed_form.py``).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..models.guides import BottomUpGuide, LadderGuide
from ..models.merge import precision_weighted_merge
from ..models.model import GenerativeModel

_LOG_2PI = math.log(2 * math.pi)


def closed_form_applies(model: torch.nn.Module, guide: torch.nn.Module) -> bool:
    """Whether :func:`closed_form_log_weights` covers ``model`` and ``guide``: the paper's
    model (not a subclass) with its ladder or bottom-up guide, as built by the library.

    :param model: A generative model.
    :param guide: A guide for it.
    """
    if type(model) is not GenerativeModel:
        return False
    if type(guide) is LadderGuide:
        return guide.model is model
    return type(guide) is BottomUpGuide


def _log_normal(z: torch.Tensor, loc: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z - loc) ** 2 / var + var.log() + _LOG_2PI).sum(-1)


def _draw(loc: torch.Tensor, var: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterized draw of ``shape`` and its log q, from the noise ε."""
    eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
    z = loc + eps * var.sqrt()
    return z, -0.5 * (eps * eps + var.log() + _LOG_2PI).sum(-1)


def _log_likelihood(model: GenerativeModel, z1: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z1) per particle and example."""
    base = model.likelihood(z1).base_dist
    if model.config.likelihood == "bernoulli":
        logits = base.logits
        return (x * logits - F.softplus(logits)).sum(-1)
    return _log_normal(x, base.loc, base.scale**2)


def _ladder(model: GenerativeModel, guide: LadderGuide, x: torch.Tensor, k: int) -> tuple[torch.Tensor, list]:
    """The ladder guide's draws, top first, with log q − log p per layer (z1 first)."""
    estimates = guide.upward(x)
    loc, var = estimates[-1]
    z, log_q = _draw(loc, var, torch.Size((k, *loc.shape)))
    layer_kl = [log_q - _log_normal(z, torch.zeros_like(z), torch.ones_like(z))]
    for layer in range(model.depth - 1, 0, -1):
        # The guide's top-down pass (the model's own networks unless the guide has its
        # own), then the model's prior; inside shared_priors the second is the first, reused.
        loc, var = precision_weighted_merge(*estimates[layer - 1], *guide.prior_params(layer, z))
        p_loc, p_var = model.prior_params(layer, z)
        z_below, log_q = _draw(loc, var, loc.shape)
        layer_kl.insert(0, log_q - _log_normal(z_below, p_loc, p_var))
        z = z_below
    return z, layer_kl


def _bottom_up(model: GenerativeModel, guide: BottomUpGuide, x: torch.Tensor, k: int) -> tuple[torch.Tensor, list]:
    """The bottom-up guide's draws, z1 first, with log q − log p per layer (z1 first)."""
    h, zs, log_qs = x, [], []
    for mlp, head in zip(guide.mlps, guide.heads):
        loc, var = head(mlp(h))
        shape = loc.shape if zs else torch.Size((k, *loc.shape))
        h, log_q = _draw(loc, var, shape)
        zs.append(h)
        log_qs.append(log_q)
    top = zs[-1]
    log_ps = [_log_normal(top, torch.zeros_like(top), torch.ones_like(top))]
    for layer in range(model.depth - 1, 0, -1):
        log_ps.insert(0, _log_normal(zs[layer - 1], *model.prior_params(layer, zs[layer])))
    return zs[0], [q - p for q, p in zip(log_qs, log_ps)]


@torch.no_grad()
def closed_form_log_weights(
    model: GenerativeModel, guide: torch.nn.Module, x: torch.Tensor, num_particles: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_particles`` log importance weights per example, in closed form (see the module docstring).

    :param model: The paper's model (:func:`closed_form_applies`).
    :param guide: Its ladder or bottom-up guide.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_particles: Draws per example.
    :returns: ``(total, reconstruction, layer_kl)``: ``log p(x, z) − log q(z|x)`` and
        ``log p(x|z1)`` of shape ``(particles, batch)``, and ``log q − log p`` per layer of
        shape ``(depth, particles, batch)``, z1 first.
    """
    if num_particles <= 0:
        raise ValueError(f"num_particles must be positive, got {num_particles}.")
    draw = _ladder if isinstance(guide, LadderGuide) else _bottom_up
    with model.shared_priors():
        z1, layer_kl = draw(model, guide, x, num_particles)
        reconstruction = _log_likelihood(model, z1, x)
    layer_kl = torch.stack(layer_kl)
    return reconstruction - layer_kl.sum(0), reconstruction, layer_kl
