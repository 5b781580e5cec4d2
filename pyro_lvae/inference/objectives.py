"""The training objectives: the ELBO estimator valid for a guide, and the
importance-weighted bound used for fine-tuning.

:class:`~pyro.infer.TraceMeanField_ELBO` replaces each latent site's
``log q - log p`` by its analytic KL divergence. That is unbiased only when every
guide site is drawn in the model's order and conditioned on the same upstream
values as the model's site: true for :class:`~pyro_lvae.models.guides.LadderGuide`,
false for :class:`~pyro_lvae.models.guides.BottomUpGuide` (several nats of bias, see
:mod:`pyro_lvae.models.guides`). Guides declare this with a ``mean_field_compatible``
attribute; any guide without it gets the always-valid
:class:`~pyro.infer.Trace_ELBO`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan
from torch.distributions import Independent, Normal

from ..config import is_count
from ..models.protocol import HierarchicalGuide, HierarchicalModel, check_input_width, parameter_dtype


def _normal_event_dims(fn: Any) -> int | None:
    """The event dimensions of a Normal wrapped in ``to_event``/``Independent``; ``None``
    for any other distribution."""
    dims = 0
    while isinstance(fn, Independent):
        dims, fn = dims + fn.reinterpreted_batch_ndims, fn.base_dist
    return dims if isinstance(fn, Normal) else None


def _every_kl_is_normal(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> bool:
    """Whether each latent site is a Normal in both traces with the same number of event
    dimensions, so that the mean-field loss reads its analytic KL and never its log-densities."""
    model_latents = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    guide_latents = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    if model_latents != guide_latents:
        return False
    for name in guide_latents:
        dims = _normal_event_dims(guide_trace.nodes[name]["fn"])
        if dims is None or dims != _normal_event_dims(model_trace.nodes[name]["fn"]):
            return False
    return True


class MeanFieldELBO(TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` that computes only the log-densities its loss reads.

    Pyro's ``get_importance_trace`` computes the log-density of every site of both traces.
    The mean-field loss then uses the analytic KL divergence for each latent site instead,
    so for the paper's 5-layer model 10 log-densities per step, and their autograd records,
    are computed for nothing (about 2% of a training step, docs/performance.md). With
    Pyro's validation off, and when every latent site is a Normal in both traces, this
    class computes the observed sites' log-densities only. Otherwise, and whenever
    validation is on, it is :class:`~pyro.infer.TraceMeanField_ELBO` itself, checks
    included. The loss and its gradients are the same
    (``tests/inference/test_objectives.py``); the fast training engine uses it.
    """

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled() or isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            return super()._get_trace(model, guide, args, kwargs)
        # Pyro's get_importance_trace (pyro/infer/enum.py), whose checks run only with
        # validation on, without computing every site's log-density: that is the change.
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        if _every_kl_is_normal(model_trace, guide_trace):
            model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        else:
            model_trace.compute_log_prob()
            guide_trace.compute_score_parts()
        return model_trace, guide_trace


class ClosedFormWhereItApplies:
    """Mixin for a Pyro ELBO class: ``differentiable_loss`` and ``loss_and_grads`` (what
    :class:`~pyro.infer.SVI` calls) computed in closed form
    (:func:`~pyro_lvae.inference.closed_form.closed_form_loss`) where that is exactly what the
    traced estimator would compute, and the ELBO's own otherwise. The closed form applies with
    one particle, Pyro's validation off (its checks live in the traced path), no effect handler
    around the call but ``SVI.step``'s parameter capture (a caller's ``poutine.scale`` or
    ``condition`` acts on traced sites only), and the library's model with its ladder guide
    (analytic KL) or either guide (Monte Carlo), called as ``(x)`` or ``(x, beta)``
    (:func:`~pyro_lvae.inference.closed_form.closed_form_applies`). Compiled (``compile=True``
    of :func:`elbo_for`), a call the closed form does not cover raises instead, in one sentence
    naming the reason: it would otherwise run uncompiled without a word.
    """

    #: Whether the closed form takes the analytic KL per layer (the mean-field estimator).
    analytic_kl: bool
    #: The closed form compiled by ``torch.compile``
    #: (:class:`~pyro_lvae.inference.compiled.CompiledLoss`), or ``None``: eager.
    compiled: Any = None

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The loss to differentiate, in closed form where it applies (see the class docstring).

        :param model: The model.
        :param guide: The guide.
        :param args: The model's and guide's arguments, ``(x)`` or ``(x, beta)``.
        :param kwargs: Their keyword arguments (none for the closed form).
        :raises ValueError: compiled, for a call the closed form does not cover.
        """
        if not self._takes_closed_form(model, guide, args, kwargs):
            return super().differentiable_loss(model, guide, *args, **kwargs)
        return self._closed_form_loss(model, guide, args)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """SVI's call: the loss as a float, its gradients accumulated; in closed form where it
        applies, as :meth:`differentiable_loss` (``Trace_ELBO``'s own would trace instead), the
        coverage checked once.

        :param model: The model.
        :param guide: The guide.
        :param args: The model's and guide's arguments, ``(x)`` or ``(x, beta)``.
        :param kwargs: Their keyword arguments (none for the closed form).
        """
        if not self._takes_closed_form(model, guide, args, kwargs):
            return super().loss_and_grads(model, guide, *args, **kwargs)
        loss = self._closed_form_loss(model, guide, args)
        if loss.requires_grad:
            loss.backward()
        value = loss.item()
        warn_if_nan(value, "loss")
        return value

    def _closed_form_loss(self, model: Any, guide: Any, args: tuple) -> torch.Tensor:
        """The closed form, for a call :meth:`_takes_closed_form` admitted."""
        from .closed_form import closed_form_loss  # it imports the models, which import this package

        return closed_form_loss(model, guide, *args, analytic_kl=self.analytic_kl, compiled=self.compiled)

    def _takes_closed_form(self, model: Any, guide: Any, args: tuple, kwargs: dict) -> bool:
        """Whether this call takes the closed form; compiled, a call it does not cover raises."""
        refusal = self._why_not_closed_form(model, guide, args, kwargs)
        if refusal is not None and self.compiled is not None:
            raise ValueError(f"compile=True cannot compile this call: {refusal}, or build the ELBO with compile=False.")
        return refusal is None

    def _why_not_closed_form(self, model: Any, guide: Any, args: tuple, kwargs: dict) -> str | None:
        """Why the closed form does not cover this call, with the way to make it, or ``None``."""
        from .closed_form import closed_form_applies

        if is_validation_enabled():
            return "Pyro's validation is on and its checks run in the traced loss; call pyro.enable_validation(False)"
        if _caller_handler_active():
            return "an effect handler is active and acts on traced sites only; call it outside the handler"
        if self.num_particles != 1:
            return f"num_particles is {self.num_particles} and the closed form draws one particle; set num_particles=1"
        if kwargs or not 1 <= len(args) <= 2:
            return "the closed form takes the arguments (x) or (x, beta), none by keyword; pass them so"
        if not closed_form_applies(model, guide):
            return (
                f"the closed form covers the paper's model with its ladder or bottom-up guide, not "
                f"{type(model).__name__} with {type(guide).__name__}; use those"
            )
        if self.analytic_kl and not guide.mean_field_compatible:
            return "the analytic KL is exact for the ladder guide only; use the Monte Carlo estimator"
        return None


def _caller_handler_active() -> bool:
    """Whether an effect handler other than ``SVI.step``'s parameter capture is active."""
    # Pyro keeps its active handlers on the internal stack pyro.poutine.runtime._PYRO_STACK
    # (am_i_wrapped() only says whether it is empty). SVI.step wraps every call in a param-only
    # trace, which records the pyro.param calls and no sample site; the closed form makes the same
    # pyro.param calls, so that handler, and only that one, leaves the closed form exact.
    return any(not (isinstance(m, TraceMessenger) and m.param_only) for m in _PYRO_STACK)


class ClosedFormMeanFieldELBO(ClosedFormWhereItApplies, MeanFieldELBO):
    """:class:`MeanFieldELBO` whose ``differentiable_loss`` is computed in closed form, without
    traces or distribution objects, for :class:`~pyro_lvae.models.model.GenerativeModel` with
    its :class:`~pyro_lvae.models.guides.LadderGuide` (see :class:`ClosedFormWhereItApplies`).
    The value and gradients are ``TraceMeanField_ELBO``'s on the same draws
    (``tests/inference/test_closed_form.py``); the fast training engine uses it.
    Anything else goes through :class:`MeanFieldELBO`.
    """

    analytic_kl = True


class ClosedFormTraceELBO(ClosedFormWhereItApplies, Trace_ELBO):
    r""":class:`~pyro.infer.Trace_ELBO` whose ``differentiable_loss`` is computed in closed form
    for :class:`~pyro_lvae.models.model.GenerativeModel` with either of its guides: the
    single-sample Monte Carlo :math:`\log q - \log p` per layer (see
    :class:`ClosedFormWhereItApplies`). The fast training engine uses it for the bottom-up
    guide; anything else goes through ``Trace_ELBO``.
    """

    analytic_kl = False


def elbo_for(
    guide: Callable[..., Any],
    *,
    free_bits: float = 0.0,
    free_bits_mode: str = "layer",
    lean: bool = False,
    compile: bool = False,
    **kwargs: Any,
) -> ELBO:
    """The ELBO estimator to train ``guide`` with.

    :param guide: A Pyro guide; ``guide.mean_field_compatible`` (default ``False``)
        selects :class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL per layer)
        over :class:`~pyro.infer.Trace_ELBO` (Monte Carlo KL).
    :param free_bits: λ > 0 puts the free-bits floor under each layer's KL term
        (:mod:`pyro_lvae.inference.free_bits`); 0 is the plain ELBO.
    :param free_bits_mode: ``"layer"`` or ``"unit"``: where the floor applies.
    :param lean: The fast engine's choice: the same loss, computed in closed form where it
        applies (:class:`ClosedFormMeanFieldELBO`, :class:`ClosedFormTraceELBO`), and
        otherwise without the log-densities it does not read (:class:`MeanFieldELBO`) or as
        ``Trace_ELBO``. The free-bits estimators are built on Pyro's classes either way.
    :param compile: With ``lean``, one particle and no free bits: the closed form compiled by
        ``torch.compile`` (:mod:`pyro_lvae.inference.compiled`), the same loss on the same draws.
        It needs Pyro's validation off; a call the closed form does not cover raises
        (:class:`ClosedFormWhereItApplies`).
    :param kwargs: Passed to the ELBO (e.g. ``num_particles``, ``vectorize_particles``).

    >>> from pyro_lvae import GenerativeModel, LadderGuide, BottomUpGuide, ModelConfig
    >>> model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    >>> type(elbo_for(LadderGuide(model))).__name__, type(elbo_for(BottomUpGuide(model))).__name__
    ('TraceMeanField_ELBO', 'Trace_ELBO')
    """
    from ..config import check_free_bits
    from .free_bits import FreeBitsMeanFieldELBO, FreeBitsTraceELBO

    check_free_bits(free_bits, free_bits_mode)
    if not isinstance(lean, bool):
        raise ValueError(f"lean must be True or False, got {lean!r}.")
    particles = kwargs.get("num_particles", 1)
    if not is_count(particles):
        raise ValueError(f"num_particles must be a positive integer, got {particles!r} (0 would give a zero loss).")
    _check_compile(compile, lean=lean, free_bits=free_bits, particles=particles)
    mean_field = isinstance(guide, HierarchicalGuide) and guide.mean_field_compatible
    if free_bits > 0:
        estimator = FreeBitsMeanFieldELBO if mean_field else FreeBitsTraceELBO
        return estimator(free_bits=free_bits, mode=free_bits_mode, **kwargs)
    if not lean:
        return TraceMeanField_ELBO(**kwargs) if mean_field else Trace_ELBO(**kwargs)
    estimator = ClosedFormMeanFieldELBO(**kwargs) if mean_field else ClosedFormTraceELBO(**kwargs)
    if compile:
        from .compiled import CompiledLoss  # it imports the models, which import this package

        estimator.compiled = CompiledLoss()
    return estimator


def _check_compile(compile: Any, *, lean: bool, free_bits: float, particles: int) -> None:
    """Refuse a ``compile`` of :func:`elbo_for` that has nothing to compile."""
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}.")
    if compile and (not lean or free_bits > 0 or particles != 1):
        raise ValueError(
            "compile applies to the lean closed-form ELBO of one particle without free bits; pass lean=True, "
            "free_bits=0 and num_particles=1, or compile=False."
        )


def importance_weighted_loss(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    x: torch.Tensor,
    *,
    mc_samples: int,
    iw_samples: int,
) -> torch.Tensor:
    r"""The fine-tuning objective of paper §3: the importance-weighted bound (eq. 6)
    with ``iw_samples`` samples, averaged over ``mc_samples`` Monte Carlo draws, per
    example, negated and summed over the batch:

    .. math::

        \text{loss}(x) = -\frac{1}{M} \sum_{m=1}^{M}
            \log \frac{1}{K} \sum_{k=1}^{K} \frac{p(x, z^{(m,k)})}{q(z^{(m,k)} | x)},
        \qquad z^{(m,k)} \sim q(z|x).

    With K = 1 this is the Monte Carlo ELBO averaged over M samples; with M = 1 it
    is the IWAE bound of Burda et al. Its value equals the vectorized L_K estimator
    (:func:`~pyro_lvae.inference.evaluation.importance_sampled_bounds`) on the same draws.
    For the paper's model with Pyro's validation off (as inside the fast engine's step) the
    weights are computed in closed form
    (:func:`~pyro_lvae.inference.closed_form.closed_form_particle_log_weights`), with the
    same value and gradients on the same draws; otherwise by Pyro's particle traces.

    Why not ``pyro.infer.RenyiELBO(alpha=0)``: it takes the logsumexp over particles
    of log-weights summed over the whole minibatch, which bounds log p(batch) and is
    not the sum of per-example bounds (they agree for a batch of one example, which
    ``tests/inference/test_objectives.py`` checks). Here the logsumexp is per example.

    :param model: The generative model.
    :param guide: A guide for it.
    :param x: A minibatch, shape ``(batch, input_dim)``.
    :param mc_samples: M, Monte Carlo samples (paper: 10).
    :param iw_samples: K, importance-weighted samples per Monte Carlo sample.
    :returns: A 0-dim tensor, differentiable with respect to every parameter
        (reparameterized draws).
    """
    from .closed_form import closed_form_applies, closed_form_particle_log_weights
    from .evaluation import particle_log_weights

    for name, value in (("mc_samples", mc_samples), ("iw_samples", iw_samples)):
        if not is_count(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if closed_form_applies(model, guide) and not is_validation_enabled():
        # The same weights on the same draws without traces; Pyro's checks live in the traced path.
        check_input_width(x, model.config.input_dim, dtype=parameter_dtype(model))
        log_w = closed_form_particle_log_weights(model, guide, x, mc_samples * iw_samples)[0]
    else:
        log_w = particle_log_weights(model, guide, x, mc_samples * iw_samples).total
    log_w = log_w.reshape(mc_samples, iw_samples, x.shape[0])
    bound = torch.logsumexp(log_w, dim=1) - math.log(iw_samples)
    return -bound.mean(0).sum()


class ImportanceWeightedLoss:
    """:func:`importance_weighted_loss` as a Pyro loss callable, ``loss(model, guide, x, beta)``,
    usable as ``SVI(model, guide, optim, loss=ImportanceWeightedLoss(...))``.

    The particle traces run inside ``poutine.block``, so the parameters are registered
    (:func:`pyro.module`) before them, where ``SVI`` records which parameters to update.
    ``beta`` is accepted for the trainer's calling convention and must be 1: fine-tuning
    optimizes the true bound.

    :param mc_samples: M.
    :param iw_samples: K.
    """

    def __init__(self, *, mc_samples: int, iw_samples: int) -> None:
        self.mc_samples = mc_samples
        self.iw_samples = iw_samples

    def differentiable_loss(self, model: Any, guide: Any, x: torch.Tensor, beta: Any = None) -> torch.Tensor:
        """The loss as a tensor (see :func:`importance_weighted_loss`).

        :param model: The generative model.
        :param guide: A guide for it.
        :param x: A minibatch.
        :param beta: Ignored unless it differs from 1, which raises :class:`ValueError`.
        """
        if beta is not None and float(beta) != 1.0:
            raise ValueError(
                f"The importance-weighted objective has no warm-up weight; got beta={float(beta)}, pass 1."
            )
        for module in (model, guide):
            if isinstance(module, (HierarchicalModel, HierarchicalGuide)) and module.register_params:
                module.register()
        return importance_weighted_loss(model, guide, x, mc_samples=self.mc_samples, iw_samples=self.iw_samples)

    __call__ = differentiable_loss
