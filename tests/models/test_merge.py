"""The precision-weighted merge (eqs. 17–18) is the normalized product of two Gaussians."""

from __future__ import annotations

import torch
from torch.distributions import Normal

from pyro_lvae.models.merge import precision_weighted_merge


def test_merge_is_normalized_product_of_gaussians():
    g = torch.Generator().manual_seed(0)
    shape = (50, 7)
    loc_hat = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    var_hat = torch.rand(shape, generator=g, dtype=torch.float64) * 4 + 1e-3
    loc_p = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    var_p = torch.rand(shape, generator=g, dtype=torch.float64) * 4 + 1e-3
    loc_q, var_q = precision_weighted_merge(loc_hat, var_hat, loc_p, var_p)

    # N(z; a, A) N(z; b, B) = N(a; b, A + B) N(z; c, C): the log-ratio of the product
    # to the merged density is the same constant for every z, and equals log N(a; b, A + B).
    expected_const = Normal(loc_p, (var_hat + var_p).sqrt()).log_prob(loc_hat)
    for _ in range(5):
        z = torch.randn(shape, generator=g, dtype=torch.float64) * 5
        log_product = Normal(loc_hat, var_hat.sqrt()).log_prob(z) + Normal(loc_p, var_p.sqrt()).log_prob(z)
        log_merged = Normal(loc_q, var_q.sqrt()).log_prob(z)
        torch.testing.assert_close(log_product - log_merged, expected_const, rtol=1e-10, atol=1e-10)


def test_merge_numerically_normalized_product():
    """Integrate the product on a grid: the merged mean and variance are its moments."""
    z = torch.linspace(-30, 30, 200001, dtype=torch.float64)
    loc_hat, var_hat, loc_p, var_p = (torch.tensor(v, dtype=torch.float64) for v in (1.3, 0.7, -2.0, 2.5))
    w = (Normal(loc_hat, var_hat**0.5).log_prob(z) + Normal(loc_p, var_p**0.5).log_prob(z)).exp()
    w = w / torch.trapezoid(w, z)
    mean = torch.trapezoid(w * z, z)
    var = torch.trapezoid(w * (z - mean) ** 2, z)
    loc_q, var_q = precision_weighted_merge(loc_hat, var_hat, loc_p, var_p)
    assert abs(mean - loc_q) < 1e-8
    assert abs(var - var_q) < 1e-8


def test_merge_limits():
    """A very confident bottom-up estimate dominates; an uninformative one returns the prior."""
    one = torch.tensor(1.0, dtype=torch.float64)
    loc, var = precision_weighted_merge(torch.tensor(3.0, dtype=torch.float64), 1e-12 * one, 0 * one, one)
    assert abs(loc - 3.0) < 1e-9 and var < 1e-11
    loc, var = precision_weighted_merge(torch.tensor(3.0, dtype=torch.float64), 1e12 * one, -1 * one, 2 * one)
    assert abs(loc + 1.0) < 1e-9 and abs(var - 2.0) < 1e-9
