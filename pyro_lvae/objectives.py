"""Choosing the ELBO estimator that is valid for a guide.

:class:`~pyro.infer.TraceMeanField_ELBO` replaces each latent site's
``log q - log p`` by its analytic KL divergence. That is unbiased only when every
guide site is drawn in the model's order and conditioned on the same upstream
values as the model's site: true for :class:`~pyro_lvae.guides.LadderGuide`,
false for :class:`~pyro_lvae.guides.BottomUpGuide` (several nats of bias, see
:mod:`pyro_lvae.guides`). Guides declare this with a ``mean_field_compatible``
attribute; any guide without it gets the always-valid
:class:`~pyro.infer.Trace_ELBO`.
"""

from __future__ import annotations

from typing import Any, Callable

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO


def elbo_for(guide: Callable[..., Any], **kwargs: Any) -> ELBO:
    """The ELBO estimator to train ``guide`` with.

    :param guide: A Pyro guide; ``guide.mean_field_compatible`` (default ``False``)
        selects :class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL per layer)
        over :class:`~pyro.infer.Trace_ELBO` (Monte Carlo KL).
    :param kwargs: Passed to the ELBO (e.g. ``num_particles``, ``vectorize_particles``).

    >>> from pyro_lvae import GenerativeModel, LadderGuide, BottomUpGuide, ModelConfig
    >>> model = GenerativeModel(ModelConfig(input_dim=4, latent_sizes=(2,), hidden_sizes=(8,)))
    >>> type(elbo_for(LadderGuide(model))).__name__, type(elbo_for(BottomUpGuide(model))).__name__
    ('TraceMeanField_ELBO', 'Trace_ELBO')
    """
    if getattr(guide, "mean_field_compatible", False):
        return TraceMeanField_ELBO(**kwargs)
    return Trace_ELBO(**kwargs)
