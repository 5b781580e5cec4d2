r"""The precision-weighted merge of the ladder guide (paper eqs. 17–18).

At each layer below the top, the ladder guide combines the bottom-up estimate
:math:`\mathcal{N}(\hat\mu_q, \hat\sigma_q^2)` with the generative model's
top-down prior :math:`\mathcal{N}(\mu_p, \sigma_p^2)`:

.. math::

    \sigma_q^2 = \frac{1}{\hat\sigma_q^{-2} + \sigma_p^{-2}}, \qquad
    \mu_q = \frac{\hat\mu_q \hat\sigma_q^{-2} + \mu_p \sigma_p^{-2}}
                 {\hat\sigma_q^{-2} + \sigma_p^{-2}}.

This is the normalized product of the two Gaussian densities, i.e. Bayes' rule
with the bottom-up term read as a Gaussian likelihood. (Eq. 17 in the paper is
printed with σ on the left; the right-hand side is a variance.)
"""

from __future__ import annotations

import torch


def precision_weighted_merge(
    loc_hat: torch.Tensor,
    var_hat: torch.Tensor,
    loc_prior: torch.Tensor,
    var_prior: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two diagonal Gaussians by precision weighting.

    All arguments broadcast against each other.

    :param loc_hat: Bottom-up mean :math:`\\hat\\mu_q`.
    :param var_hat: Bottom-up variance :math:`\\hat\\sigma_q^2` (positive).
    :param loc_prior: Top-down mean :math:`\\mu_p`.
    :param var_prior: Top-down variance :math:`\\sigma_p^2` (positive).
    :returns: ``(loc_q, var_q)`` of eqs. 17–18.

    >>> import torch
    >>> precision_weighted_merge(torch.tensor(0.), torch.tensor(1.), torch.tensor(2.), torch.tensor(1.))
    (tensor(1.), tensor(0.5000))
    """
    prec_hat = var_hat.reciprocal()
    prec_prior = var_prior.reciprocal()
    var_q = (prec_hat + prec_prior).reciprocal()
    loc_q = (loc_hat * prec_hat + loc_prior * prec_prior) * var_q
    return loc_q, var_q
