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
mode, where batch norm uses its running statistics). There, each batch norm is folded into
the ``Linear`` before it (:func:`~pyro_lvae.models.nn.batch_norm_folded`): the same function,
with float32 rounding as far from the float64 values as before.

:func:`closed_form_loss` is the training loss in the same closed forms: the negative
β-weighted ELBO of one draw per example, summed over the batch, with the ladder guide's
analytic KL per layer (as :class:`~pyro.infer.TraceMeanField_ELBO`) or the Monte Carlo
:math:`\log q - \log p` (as :class:`~pyro.infer.Trace_ELBO`). For the ladder guide, with
:math:`q = \mathcal{N}(\mu, \sigma^2)` and :math:`p = \mathcal{N}(\mu_p, \sigma_p^2)`,

.. math::

    \mathrm{KL}(q \,\|\, p) = \tfrac12 \textstyle\sum_j \big(r_j + (\mu_j - \mu_{p,j})^2/\sigma_{p,j}^2
        - 1 - \log r_j\big), \qquad r_j = \sigma_j^2 / \sigma_{p,j}^2.

It draws its noise in the traced path's order and shapes too, so on the same seed its
value and gradients are those of Pyro's estimator (``tests/inference/test_closed_form.py``);
:mod:`pyro_lvae.inference.objectives` hands training to it where it applies. Its deterministic
part given the noise, :func:`negative_elbo`, is what ``compile=True`` compiles
(:mod:`pyro_lvae.inference.compiled`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from ..models.guides import BottomUpGuide, LadderGuide
from ..models.merge import precision_weighted_merge
from ..models.model import GenerativeModel
from ..models.nn import batch_norm_folded
from ..models.protocol import check_input_width, parameter_dtype
from .warmup import kl_mask_and_scale

_LOG_2PI = math.log(2 * math.pi)

#: On the CPU the particles of one chunk are weighed in slices of about this many
#: (particle, example) pairs: the 784 logits of 2,500 pairs take 8 MB, within the
#: cache of a server CPU, where a chunk of the default memory budget's size spills to
#: memory at every elementwise step (docs/performance.md has the measurement).
CPU_PAIRS_PER_SLICE = 2500


def closed_form_applies(model: torch.nn.Module, guide: torch.nn.Module) -> bool:
    """Whether the closed forms cover ``model`` and ``guide``: the paper's model (not a
    subclass) with its ladder or bottom-up guide, as built by the library, and no forward hook
    on either of them (the closed forms run their networks, never the two modules themselves,
    so such a hook would not run).

    :param model: A generative model.
    :param guide: A guide for it.
    """
    if type(model) is not GenerativeModel:
        return False
    if type(guide) is LadderGuide:
        return guide.model is model and not _has_forward_hooks(model, guide)
    return type(guide) is BottomUpGuide and not _has_forward_hooks(model, guide)


def _has_forward_hooks(*modules: torch.nn.Module) -> bool:
    # torch keeps forward hooks in private dicts, per module and process-wide (for
    # register_module_forward_hook); there is no public way to ask whether any is set.
    from torch.nn.modules import module as torch_module

    process_wide = torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    return bool(process_wide) or any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _register(model: GenerativeModel, guide: torch.nn.Module) -> None:
    """Register the parameters in Pyro's param store, as the model's and guide's own calls do
    where their ``register_params`` is on (``SVI`` finds them there)."""
    for module in (model, guide):
        if module.register_params:
            module.register()


def standard_normal(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape``: the numbers that the reparameterized ``Normal.rsample``
    of the traced path draws on the same seed (torch's ``_standard_normal``). Every draw of the
    closed forms goes through here, so that a test can fix them all.

    :param shape: The shape of the block.
    :param dtype: Its dtype.
    :param device: Its device.
    """
    return torch.randn(shape, dtype=dtype, device=device)


def _log_normal(z: torch.Tensor, loc: torch.Tensor | None, var: torch.Tensor | None) -> torch.Tensor:
    """log N(z; loc, var) per row; ``loc = var = None`` is the standard normal prior of the top layer."""
    if loc is None:
        return -0.5 * (z * z + _LOG_2PI).sum(-1)
    return -0.5 * ((z - loc) ** 2 / var + var.log() + _LOG_2PI).sum(-1)


def _draw(loc: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reparameterized draw ``loc + eps·σ`` and its log q."""
    return loc + eps * var.sqrt(), -0.5 * (eps * eps + var.log() + _LOG_2PI).sum(-1)


#: One layer's term of the negative ELBO from its noise, draw, q and p: ``(eps, z, loc, var, p_loc, p_var)``,
#: with ``p_loc = p_var = None`` for the top layer's standard normal prior.
LayerTerm = Callable[..., torch.Tensor]


def _monte_carlo_term(eps, z, loc, var, p_loc, p_var) -> torch.Tensor:
    """log q(z) − log p(z) at the draw ``z = loc + eps·σ``, per row."""
    return -0.5 * (eps * eps + var.log() + _LOG_2PI).sum(-1) - _log_normal(z, p_loc, p_var)


def _analytic_kl_term(eps, z, loc, var, p_loc, p_var) -> torch.Tensor:
    """KL(N(loc, var) ‖ N(p_loc, p_var)) per row (the module docstring's formula)."""
    if p_loc is None:
        return 0.5 * (var + loc * loc - 1 - var.log()).sum(-1)
    ratio = var / p_var
    return 0.5 * (ratio + (loc - p_loc) ** 2 / p_var - 1 - ratio.log()).sum(-1)


def _bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_j x_j \ell_j - \mathrm{softplus}(\ell_j)` per row of ``logits``.

    With :math:`\mathrm{softplus}(\ell) = \max(\ell, 0) + \log(1 + e^{-|\ell|})`. On the CPU,
    torch's float32 ``log1p`` (and so ``F.softplus``) is about ten times slower than ``exp``
    and ``log`` (docs/performance.md), and the likelihood of 784 pixels per draw is most of
    the time of L_5000 after the matrix products. Since :math:`1 + e^{-|\ell|}` lies in (1, 2],
    ``log`` of the rounded sum errs by at most one unit of rounding of 1 (6e-8 in float32),
    no more than the rounding of each term itself. It works in place, so it is for
    evaluation without gradients only.
    """
    rectified = logits.clamp_min(0)
    soft = logits.abs().neg_().exp_().add_(1).log_().add_(rectified)
    return (logits * x).sub_(soft).sum(-1)


def _log_likelihood(
    model: GenerativeModel, z1: torch.Tensor, x: torch.Tensor, *, grad: bool = False, total: bool = False
) -> torch.Tensor:
    """log p(x | z1) per particle and example, from the decoder's networks (no distribution object):
    differentiable with ``grad``, and summed over everything with ``total`` (the training loss);
    otherwise in place, for evaluation without gradients."""
    d = model.decoder_mlp(z1)
    # In the precision of z1, as the model's likelihood, also under a caller's bfloat16 autocast.
    if model.config.likelihood == "bernoulli":
        logits = model.decoder_head(d).to(z1.dtype)
        # The kernel of Pyro's Bernoulli.log_prob where gradients flow.
        if total:
            return -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        if grad:
            return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return _bernoulli_log_likelihood(logits, x)
    loc, var = model.decoder_head(d)
    log_p = _log_normal(x, loc.to(z1.dtype), var.to(z1.dtype))
    return log_p.sum() if total else log_p


def _ladder(
    model: GenerativeModel,
    guide: LadderGuide,
    noise: list[torch.Tensor],
    estimates: list,
    term: LayerTerm = _monte_carlo_term,
) -> tuple[torch.Tensor, list]:
    """The ladder guide's draws, top first, with each layer's ``term`` (z1 first): by default
    log q − log p at the draw.

    ``noise`` holds one block per layer, top first; ``estimates`` is ``guide.upward(x)``.
    """
    loc, var = estimates[-1]
    z = loc + noise[0] * var.sqrt()
    layer_terms = [term(noise[0], z, loc, var, None, None)]
    for layer, eps in zip(range(model.depth - 1, 0, -1), noise[1:]):
        # The guide's top-down pass (the model's own networks unless the guide has its
        # own), then the model's prior; inside shared_priors the second is the first, reused.
        loc, var = precision_weighted_merge(*estimates[layer - 1], *guide.prior_params(layer, z))
        p_loc, p_var = model.prior_params(layer, z)
        z_below = loc + eps * var.sqrt()
        layer_terms.insert(0, term(eps, z_below, loc, var, p_loc, p_var))
        z = z_below
    return z, layer_terms


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
    log_ps = [_log_normal(top, None, None)]
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
    """``num_particles`` log importance weights per example, in closed form (see the module
    docstring), without autograd: evaluation.

    :param model: The paper's model (:func:`closed_form_applies`).
    :param guide: Its ladder or bottom-up guide.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_particles: Draws per example.
    :returns: ``(total, reconstruction, layer_kl)``: ``log p(x, z) − log q(z|x)`` and
        ``log p(x|z1)`` of shape ``(particles, batch)``, and ``log q − log p`` per layer of
        shape ``(depth, particles, batch)``, z1 first.
    """
    return _log_weights(model, guide, x, num_particles, grad=False)


def closed_form_particle_log_weights(
    model: GenerativeModel, guide: torch.nn.Module, x: torch.Tensor, num_particles: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`closed_form_log_weights` keeping the autograd graph, for the fine-tuning loss
    (:func:`~pyro_lvae.inference.objectives.importance_weighted_loss`): every particle at once,
    and the likelihood without in-place operations. The traced counterpart is
    :func:`~pyro_lvae.inference.evaluation.particle_log_weights`.

    :param model: The paper's model (:func:`closed_form_applies`).
    :param guide: Its ladder or bottom-up guide.
    :param x: Data, shape ``(batch, input_dim)``.
    :param num_particles: Draws per example.
    :returns: As :func:`closed_form_log_weights`.
    """
    _register(model, guide)
    return _log_weights(model, guide, x, num_particles, grad=True)


def _log_weights(
    model: GenerativeModel, guide: torch.nn.Module, x: torch.Tensor, num_particles: int, *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two functions above; with ``grad``, in one slice and differentiable."""
    if num_particles <= 0:
        raise ValueError(f"num_particles must be positive, got {num_particles}.")
    ladder = isinstance(guide, LadderGuide)
    # What depends on x alone, once for every slice, before the first draw as in the guide.
    given_x = upward_pass(guide, x)
    # All the noise, one (particles, batch, units) block per layer in the guide's sampling
    # order: the traced path's draws, whatever the slices below.
    noise = latent_noise(model, guide, x, num_particles)
    draw = _ladder if ladder else _bottom_up
    step = num_particles if grad else _slice_size(model, guide, x, num_particles)
    totals, reconstructions, layer_kls = [], [], []
    # Without gradients, batch norm in evaluation mode folded into the Linears: 10% faster on the CPU.
    with contextlib.nullcontext() if grad else batch_norm_folded(model, guide):
        for start in range(0, num_particles, step):
            with model.shared_priors():
                z1, layer_kl = draw(model, guide, [eps[start : start + step] for eps in noise], given_x)
                reconstructions.append(_log_likelihood(model, z1, x, grad=grad))
            layer_kls.append(torch.stack(layer_kl))
            totals.append(reconstructions[-1] - layer_kls[-1].sum(0))
    if len(totals) == 1:
        return totals[0], reconstructions[0], layer_kls[0]
    return torch.cat(totals), torch.cat(reconstructions), torch.cat(layer_kls, dim=1)


def closed_form_loss(
    model: GenerativeModel,
    guide: torch.nn.Module,
    x: torch.Tensor,
    beta: float | torch.Tensor | None = None,
    *,
    analytic_kl: bool,
    compiled: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""The negative β-weighted ELBO of one draw per example, summed over the batch, in
    closed form (see the module docstring):

    .. math:: \text{loss} = \textstyle\sum_n \big( -\log p(x_n|z_{1,n})
        + \beta \sum_l t_{l,n} \big),

    where :math:`t_{l,n}` is layer l's analytic KL (``analytic_kl``, ladder guide only) or
    its :math:`\log q - \log p` at the draw. β is checked, masked and scaled as
    :func:`~pyro_lvae.inference.warmup.kl_weight` does for Pyro's sites, so β = 0 drops the
    KL terms exactly. The value and gradients are those of ``TraceMeanField_ELBO`` or
    ``Trace_ELBO`` on the same draws (the noise is drawn in the guide's order and shapes).

    :param model: The paper's model (:func:`closed_form_applies`).
    :param guide: Its ladder or bottom-up guide.
    :param x: A minibatch, shape ``(batch, input_dim)``.
    :param beta: The warm-up weight, or ``None`` for the plain ELBO.
    :param analytic_kl: The mean-field estimator's analytic KL rather than the Monte Carlo term.
    :param compiled: :func:`negative_elbo` compiled by ``torch.compile``
        (:class:`~pyro_lvae.inference.compiled.CompiledLoss`), to run instead of the eager one; the
        noise is then drawn before the networks run, the same draws where they draw nothing.
    :raises ValueError: for ``analytic_kl`` with a guide that is not the ladder guide, or bad
        β or data.
    """
    ladder = isinstance(guide, LadderGuide)
    if analytic_kl and not ladder:
        raise ValueError("The analytic KL is exact for the ladder guide only; use analytic_kl=False.")
    check_input_width(x, model.config.input_dim, dtype=parameter_dtype(model))
    mask, scale = kl_mask_and_scale(beta) or (None, None)
    _register(model, guide)
    if compiled is not None:
        return compiled(model, guide, x, latent_noise(model, guide, x), mask, scale, analytic_kl=analytic_kl)
    # What depends on x alone, before the first draw as in the guide (an encoder may draw too).
    given_x = upward_pass(guide, x)
    noise = latent_noise(model, guide, x)
    return negative_elbo(model, guide, x, noise, mask, scale, analytic_kl=analytic_kl, given_x=given_x)


def upward_pass(guide: torch.nn.Module, x: torch.Tensor) -> list | tuple:
    """What the guide computes from ``x`` alone: the ladder guide's deterministic upward pass
    (one ``(loc, variance)`` estimate per layer), or the bottom-up guide's q(z1|x).

    :param guide: The ladder or bottom-up guide.
    :param x: A minibatch, shape ``(batch, input_dim)``.
    """
    return guide.upward(x) if isinstance(guide, LadderGuide) else guide.heads[0](guide.mlps[0](x))


def latent_noise(
    model: GenerativeModel, guide: torch.nn.Module, x: torch.Tensor, *particles: int
) -> list[torch.Tensor]:
    """The standard normal noise of the draws: one ``(*particles, batch, units)`` block per layer,
    in the guide's sampling order (top first for the ladder guide, z1 first for the bottom-up one).

    :param model: The paper's model.
    :param guide: Its ladder or bottom-up guide.
    :param x: A minibatch, shape ``(batch, input_dim)``.
    :param particles: The particle shape, e.g. ``num_particles``; none for one draw per example.
    """
    sizes = model.config.latent_sizes[::-1] if isinstance(guide, LadderGuide) else model.config.latent_sizes
    return [standard_normal((*particles, x.shape[0], units), parameter_dtype(model), x.device) for units in sizes]


def negative_elbo(
    model: GenerativeModel,
    guide: torch.nn.Module,
    x: torch.Tensor,
    noise: list[torch.Tensor],
    mask: torch.Tensor | None,
    scale: torch.Tensor | None,
    *,
    analytic_kl: bool,
    given_x: list | tuple | None = None,
) -> torch.Tensor:
    """:func:`closed_form_loss` given its noise: a deterministic function of the parameters, ``x``
    and ``noise`` (the part that ``torch.compile`` may compile), without checks.

    :param model: The paper's model.
    :param guide: Its ladder or bottom-up guide.
    :param x: A minibatch, shape ``(batch, input_dim)``.
    :param noise: :func:`latent_noise`'s blocks.
    :param mask: Where β > 0 (:func:`~pyro_lvae.inference.warmup.kl_mask_and_scale`), or ``None``
        for no warm-up weight.
    :param scale: β, clamped above 0, or ``None``.
    :param analytic_kl: The analytic KL per layer rather than the Monte Carlo term (ladder guide).
    :param given_x: :func:`upward_pass` of ``x``, if already computed.
    """
    if given_x is None:
        given_x = upward_pass(guide, x)
    # The draws and each layer's term, then the likelihood of x given z1. The top-down priors
    # run twice, for the guide's merge and for the model, as on the traced path, unless the
    # caller shares them (model.shared_priors(), as the fast engine does).
    if isinstance(guide, LadderGuide):
        term = _analytic_kl_term if analytic_kl else _monte_carlo_term
        z1, layer_terms = _ladder(model, guide, noise, given_x, term)
    else:
        z1, layer_terms = _bottom_up(model, guide, noise, given_x)
    reconstruction = _log_likelihood(model, z1, x, total=True)
    # β on the latent terms, masked where it is 0, as Pyro's scale_and_mask.
    kl = torch.stack(layer_terms).sum(0)
    if mask is not None:
        kl = torch.where(mask, kl * scale, kl.new_zeros(()))
    return kl.sum() - reconstruction
