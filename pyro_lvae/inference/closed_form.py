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
floating-point rounding (``tests/inference/test_closed_form.py``). All the noise is drawn
first; on the CPU the particles are then weighed in slices small enough for the cache
(:data:`CPU_PAIRS_PER_SLICE`), which changes the speed and not the draws (in evaluation
mode, where batch norm uses its running statistics).
"""

from __future__ import annotations

import math

import torch

from ..models.guides import BottomUpGuide, LadderGuide
from ..models.merge import precision_weighted_merge
from ..models.model import GenerativeModel

_LOG_2PI = math.log(2 * math.pi)

#: On the CPU the particles of one chunk are weighed in slices of about this many
#: (particle, example) pairs: the 784 logits of 2,500 pairs take 8 MB, within the
#: cache of a server CPU, where a chunk of the default memory budget's size spills to
#: memory at every elementwise step (docs/performance.md has the measurement).
CPU_PAIRS_PER_SLICE = 2500


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


def _draw(loc: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reparameterized draw ``loc + eps·σ`` and its log q."""
    return loc + eps * var.sqrt(), -0.5 * (eps * eps + var.log() + _LOG_2PI).sum(-1)


def _bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_j x_j \ell_j - \mathrm{softplus}(\ell_j)` per row of ``logits``.

    With :math:`\mathrm{softplus}(\ell) = \max(\ell, 0) + \log(1 + e^{-|\ell|})`. On the CPU,
    torch's float32 ``log1p`` (and so ``F.softplus``) is about ten times slower than ``exp``
    and ``log`` (docs/performance.md), and the likelihood of 784 pixels per draw is most of
    the time of L_5000 after the matrix products. Since :math:`1 + e^{-|\ell|}` lies in (1, 2],
    ``log`` of the rounded sum errs by at most one unit of rounding of 1 (6e-8 in float32),
    no more than the rounding of each term itself.
    """
    rectified = logits.clamp_min(0)
    soft = logits.abs().neg_().exp_().add_(1).log_().add_(rectified)
    return (logits * x).sub_(soft).sum(-1)


def _log_likelihood(model: GenerativeModel, z1: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z1) per particle and example, from the decoder's networks (no distribution object)."""
    d = model.decoder_mlp(z1)
    # In the precision of z1, as the model's likelihood, also under a caller's bfloat16 autocast.
    if model.config.likelihood == "bernoulli":
        return _bernoulli_log_likelihood(model.decoder_head(d).to(z1.dtype), x)
    loc, var = model.decoder_head(d)
    return _log_normal(x, loc.to(z1.dtype), var.to(z1.dtype))


def _ladder(
    model: GenerativeModel, guide: LadderGuide, noise: list[torch.Tensor], estimates: list
) -> tuple[torch.Tensor, list]:
    """The ladder guide's draws, top first, with log q − log p per layer (z1 first).

    ``noise`` holds one block per layer, top first; ``estimates`` is ``guide.upward(x)``.
    """
    loc, var = estimates[-1]
    z, log_q = _draw(loc, var, noise[0])
    layer_kl = [log_q - _log_normal(z, torch.zeros_like(z), torch.ones_like(z))]
    for layer, eps in zip(range(model.depth - 1, 0, -1), noise[1:]):
        # The guide's top-down pass (the model's own networks unless the guide has its
        # own), then the model's prior; inside shared_priors the second is the first, reused.
        loc, var = precision_weighted_merge(*estimates[layer - 1], *guide.prior_params(layer, z))
        p_loc, p_var = model.prior_params(layer, z)
        z_below, log_q = _draw(loc, var, eps)
        layer_kl.insert(0, log_q - _log_normal(z_below, p_loc, p_var))
        z = z_below
    return z, layer_kl


def _bottom_up(
    model: GenerativeModel, guide: BottomUpGuide, noise: list[torch.Tensor], first: tuple
) -> tuple[torch.Tensor, list]:
    """The bottom-up guide's draws, z1 first, with log q − log p per layer (z1 first).

    ``noise`` holds one block per layer, z1 first; ``first`` is q(z1|x)'s ``(loc, variance)``.
    """
    h, log_q = _draw(*first, noise[0])
    zs, log_qs = [h], [log_q]
    for mlp, head, eps in zip(guide.mlps[1:], guide.heads[1:], noise[1:]):
        h, log_q = _draw(*head(mlp(h)), eps)
        zs.append(h)
        log_qs.append(log_q)
    top = zs[-1]
    log_ps = [_log_normal(top, torch.zeros_like(top), torch.ones_like(top))]
    for layer in range(model.depth - 1, 0, -1):
        log_ps.insert(0, _log_normal(zs[layer - 1], *model.prior_params(layer, zs[layer])))
    return zs[0], [q - p for q, p in zip(log_qs, log_ps)]


def _slice_size(model: GenerativeModel, guide: torch.nn.Module, x: torch.Tensor, num_particles: int) -> int:
    """Particles weighed at once: all of them, except on the CPU, where a slice of about
    :data:`CPU_PAIRS_PER_SLICE` (particle, example) pairs keeps the activations in cache.

    Also all of them when a module is in training mode: batch norm then normalizes over
    every (particle, example) pair it is given, as on the traced path, so a slice would
    change the weights.
    """
    if x.device.type != "cpu" or any(m.training for m in (*model.modules(), *guide.modules())):
        return num_particles
    return max(1, CPU_PAIRS_PER_SLICE // x.shape[0])


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
    ladder = isinstance(guide, LadderGuide)
    sizes = model.config.latent_sizes[::-1] if ladder else model.config.latent_sizes
    # All the noise first, one (particles, batch, units) block per layer in the guide's
    # sampling order: the traced path's draws, whatever the slices below.
    dtype = next(model.parameters()).dtype
    noise = [torch.randn((num_particles, x.shape[0], units), dtype=dtype, device=x.device) for units in sizes]
    # What depends on x alone, once for every slice.
    given_x = guide.upward(x) if ladder else guide.heads[0](guide.mlps[0](x))
    draw = _ladder if ladder else _bottom_up
    step = _slice_size(model, guide, x, num_particles)
    totals, reconstructions, layer_kls = [], [], []
    for start in range(0, num_particles, step):
        with model.shared_priors():
            z1, layer_kl = draw(model, guide, [eps[start : start + step] for eps in noise], given_x)
            reconstructions.append(_log_likelihood(model, z1, x))
        layer_kls.append(torch.stack(layer_kl))
        totals.append(reconstructions[-1] - layer_kls[-1].sum(0))
    return torch.cat(totals), torch.cat(reconstructions), torch.cat(layer_kls, dim=1)
