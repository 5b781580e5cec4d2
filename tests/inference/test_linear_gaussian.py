"""ELBO and L_K against the exact log p(x) of a linear-Gaussian hierarchy.

With identity activations, no batch norm and the variance heads' weights set to
zero, every p(z_i | z_{i+1}) and p(x | z1) is Gaussian with an affine mean and a
constant diagonal variance, so p(x) and p(z | x) are Gaussian and known exactly.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.nn import functional as F

from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
from pyro_lvae.inference.evaluation import importance_sampled_bounds


def _affine(fn, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix A and offset b with fn(z) = A z + b, read off fn at 0 and the basis vectors."""
    zero = torch.zeros(1, in_dim)
    b = fn(zero)[0]
    A = torch.stack([fn(torch.eye(in_dim)[j : j + 1])[0] - b for j in range(in_dim)], dim=1)
    return A, b


class LinearGaussianHierarchy:
    """Exact joint Gaussian of (z_L, …, z_1, x) for a linear :class:`GenerativeModel`."""

    def __init__(self, model: GenerativeModel):
        cfg = model.config
        self.names = [f"z{i}" for i in range(cfg.depth, 0, -1)]
        self.sizes = [cfg.latent_sizes[i - 1] for i in range(cfg.depth, 0, -1)]
        # Each variable is v_j = A_j v_{j-1} + b_j + eps_j; write it as T_j eps + m_j.
        dims = self.sizes + [cfg.input_dim]
        total = sum(dims)
        offsets = [sum(dims[:j]) for j in range(len(dims))]
        noise_var = torch.zeros(total)
        T, m = [], []
        with torch.no_grad():
            for j, d in enumerate(dims):
                E = torch.zeros(d, total)
                E[:, offsets[j] : offsets[j] + d] = torch.eye(d)
                if j == 0:
                    T.append(E)
                    m.append(torch.zeros(d))
                    noise_var[:d] = 1.0
                    continue
                if j < len(dims) - 1:
                    layer = cfg.depth - j  # z_layer given z_{layer+1}
                    head = model.top_down_heads[layer - 1]
                    A, b = _affine(lambda z, layer=layer: model.prior_params(layer, z)[0], dims[j - 1])
                    var = F.softplus(head.var.bias)
                else:
                    A, b = _affine(lambda z: model.decoder_head(model.decoder_mlp(z))[0], dims[j - 1])
                    var = F.softplus(model.decoder_head.var.bias)
                T.append(A @ T[j - 1] + E)
                m.append(A @ m[j - 1] + b)
                noise_var[offsets[j] : offsets[j] + d] = var
        T_all, m_all = torch.cat(T), torch.cat(m)
        cov = T_all @ torch.diag(noise_var) @ T_all.T
        nz = sum(self.sizes)
        self.mean_z, self.mean_x = m_all[:nz], m_all[nz:]
        self.S_zz, self.S_zx, self.S_xx = cov[:nz, :nz], cov[:nz, nz:], cov[nz:, nz:]
        self.gain = self.S_zx @ torch.linalg.inv(self.S_xx)
        self.post_cov = self.S_zz - self.gain @ self.S_zx.T
        self.offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return dist.MultivariateNormal(self.mean_x, self.S_xx).log_prob(x)

    def post_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean_z + (x - self.mean_x) @ self.gain.T

    def guide(self, x: torch.Tensor, *, beta=None) -> None:
        """The exact posterior p(z_L, …, z_1 | x), one site per layer in the model's order."""
        mu = self.post_mean(x)
        S = self.post_cov
        with pyro.plate("data", x.shape[0], dim=-1):
            prev: list[torch.Tensor] = []
            for j, (name, d) in enumerate(zip(self.names, self.sizes)):
                a, b = self.offsets[j], self.offsets[j] + d
                loc, cov = mu[..., a:b], S[a:b, a:b]
                if prev:
                    z_prev = torch.cat(prev, -1)
                    S_jp, S_pp = S[a:b, :a], S[:a, :a]
                    K = S_jp @ torch.linalg.inv(S_pp)
                    loc = loc + (z_prev - mu[..., :a]) @ K.T
                    cov = cov - K @ S_jp.T
                prev.append(pyro.sample(name, dist.MultivariateNormal(loc, cov)))


def _linear_model(latents=(2, 2), input_dim=5) -> GenerativeModel:
    cfg = ModelConfig(
        input_dim=input_dim,
        latent_sizes=latents,
        hidden_sizes=(6,) * len(latents),
        activation="identity",
        batch_norm=False,
        likelihood="gaussian",
    )
    model = GenerativeModel(cfg)
    with torch.no_grad():
        heads = list(model.top_down_heads) + [model.decoder_head]
        for head in heads:
            head.var.weight.zero_()  # constant variances: a linear-Gaussian model
            head.var.bias.uniform_(-1.0, 0.5)
    return model.eval()


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("latents", [(2,), (2, 2), (3, 2, 2)])
def test_exact_posterior_guide_gives_log_px(float64, latents):
    model = _linear_model(latents)
    exact = LinearGaussianHierarchy(model)
    x = model.sample(20, mean=False)
    log_px = exact.log_px(x)
    for chunk in (1, 3, 7):
        out = importance_sampled_bounds(model, exact.guide, x, num_samples=10, chunk_size=chunk)
        torch.testing.assert_close(out["elbo"], log_px, atol=1e-4, rtol=0)
        torch.testing.assert_close(out["log_likelihood"], log_px, atol=1e-4, rtol=0)
    # Pyro's own estimator agrees: its loss is minus the summed ELBO.
    loss = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1).loss(model, exact.guide, x)
    assert abs(-loss - log_px.sum().item()) < 1e-4 * len(x)


def test_elbo_below_and_lk_rises_toward_log_px(float64):
    model = _linear_model((2, 2))
    guide = LadderGuide(model).eval()
    exact = LinearGaussianHierarchy(model)
    x = model.sample(200, mean=False)
    log_px = exact.log_px(x)
    bounds = {}
    for k in (1, 10, 1000):
        out = importance_sampled_bounds(model, guide, x, num_samples=k)
        bounds[k] = out["log_likelihood"].mean().item()
        if k == 1000:
            elbo = out["elbo"]
    truth = log_px.mean().item()
    # The ELBO (mean of 1000 log-weights per example) lies below log p(x) for the
    # average and for the vast majority of single examples.
    assert elbo.mean().item() < truth - 0.05
    assert (elbo < log_px).float().mean() > 0.95
    assert bounds[1] < bounds[10] < bounds[1000] <= truth + 0.02
    assert truth - bounds[1000] < 0.25 * (truth - bounds[1])
    assert math.isfinite(bounds[1])
