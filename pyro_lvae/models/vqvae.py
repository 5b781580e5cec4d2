r"""The VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017) as a Pyro model and guide.

The encoder maps x to P vectors :math:`z_e \in \mathbb{R}^{P \times D}`; each is
replaced by its nearest codebook vector :math:`e_k`, :math:`k = \arg\min_j \|z_e - e_j\|`,
and the decoder reconstructs x from the quantized vectors :math:`z_q`.

**In Pyro.** The latent site ``z1`` holds the P quantized vectors of an example.

* The model's prior on it is uniform over the codebook at every position
  (:class:`UniformCodebook`, the categorical prior over code indices
  :math:`p(k) = 1/K` pushed through the codebook), so
  :math:`\log p(z_q) = -P \log K`.
* The guide's posterior is a point mass at the nearest codes
  (:class:`pyro.distributions.Delta`), so :math:`\log q = 0` and the KL term is the
  constant :math:`P \log K`. The ELBO is
  :math:`\log p(x | z_q) - P \log K`, and L_K equals it for every K.
* The Delta's value is the straight-through sum :math:`z_e + \mathrm{sg}[e - z_e]`:
  numerically the codebook vectors, with the gradient of the decoder input passed
  unchanged to the encoder.
* The training loss adds the two VQ terms of the paper's eq. 3 per example,

  .. math::

      \|\mathrm{sg}[z_e] - e\|^2 + \beta\,\|z_e - \mathrm{sg}[e]\|^2 ,

  through ``pyro.factor("vq_loss", …)`` in the guide. A guide factor enters
  :math:`\log q`, so it is *added* to the loss :math:`-(\log p - \log q)`. With
  ``codebook_ema`` the first term is dropped and the codebook follows exponential
  moving averages of the encoder outputs assigned to each code (the paper's
  appendix A.1). The evaluation code reads only the ``z1`` and ``x`` sites, so
  reported ELBOs exclude the VQ terms.

Warm-up does not apply here: the KL term is a constant.
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from ..inference.warmup import kl_weight
from .nn import gaussian_head_for, mlp_for
from .protocol import (
    HierarchicalGuide,
    HierarchicalModel,
    check_examples,
    check_input_width,
    eval_mode,
    parameter_dtype,
    require_model,
    require_model_config,
)
from .registration import register_modules


class UniformCodebook(dist.TorchDistribution):
    """Uniform prior over the K codebook vectors at each of P positions.

    Event shape ``(P, D)``. :meth:`log_prob` is :math:`-P \\log K` for any value: it is
    only ever evaluated on quantized vectors, which are codebook vectors up to the
    rounding of the straight-through sum, so it does not test membership.

    :param codebook: Tensor of shape ``(K, D)``.
    :param positions: P.
    :param batch_shape: Batch shape of the distribution.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, codebook: torch.Tensor, positions: int, batch_shape: tuple[int, ...] = (), validate_args=None):
        self.codebook = codebook
        self.positions = positions
        super().__init__(
            torch.Size(batch_shape), torch.Size((positions, codebook.shape[-1])), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        """The same prior with batch shape ``batch_shape``."""
        return UniformCodebook(self.codebook, self.positions, torch.Size(batch_shape))

    def sample(self, sample_shape=()):
        """Codebook vectors drawn uniformly and independently at every position."""
        shape = torch.Size(sample_shape) + self.batch_shape + (self.positions,)
        idx = torch.randint(self.codebook.shape[0], shape, device=self.codebook.device)
        return self.codebook[idx]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`-P \\log K` for every value (see the class docstring)."""
        batch = value.shape[:-2]
        return value.new_full(batch, -self.positions * math.log(self.codebook.shape[0]))


class VQVAEModel(HierarchicalModel):
    """The VQ-VAE decoder with its codebook and the uniform prior over codes.

    :param config: ``latent_sizes[0]`` code positions P, ``code_dim`` D,
        ``codebook_size`` K, decoder MLP of width ``hidden_sizes[0]``.
    :param name: Prefix of the parameters in Pyro's param store.

    >>> from pyro_lvae.config import ModelConfig
    >>> cfg = ModelConfig(
    ...     family="vqvae", guide="vae", input_dim=6, latent_sizes=(2,), hidden_sizes=(8,), codebook_size=4, code_dim=3
    ... )
    >>> VQVAEModel(cfg).sample(5).shape
    torch.Size([5, 6])
    """

    gaussian_latents = False

    def __init__(self, config: ModelConfig, *, name: str = "vqvae") -> None:
        require_model_config(config, "VQVAEModel")
        super().__init__()
        self.config = config
        self.name = name
        k, d = config.codebook_size, config.code_dim
        init = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        if config.codebook_ema:
            # Updated by the guide from moving averages, not by the optimizer.
            self.register_buffer("codebook", init)
            # Both averages start at zero, so that a code's first update is the (smoothed)
            # mean of the encodings assigned to it; codes without assignments keep their vector.
            self.register_buffer("ema_count", torch.zeros(k))
            self.register_buffer("ema_sum", torch.zeros(k, d))
        else:
            self.codebook = nn.Parameter(init)
        self.decoder_mlp = mlp_for(config, self.positions * d, config.hidden_sizes[0])
        if config.likelihood == "bernoulli":
            self.output: nn.Module = nn.Linear(config.hidden_sizes[0], config.input_dim)
        else:
            self.output = gaussian_head_for(config, config.hidden_sizes[0], config.input_dim)

    @property
    def positions(self) -> int:
        """Number P of code positions per example."""
        return self.config.latent_sizes[0]

    @property
    def depth(self) -> int:
        return 1

    def register(self) -> None:
        """Register the parameters in Pyro's param store under its ``name``."""
        self.name = register_modules(self.name, {"": self})

    def test_metrics(self, guide: nn.Module, data: torch.Tensor) -> dict[str, Any]:
        """``vq``: the codebook statistics of :func:`vq_statistics` (the latents are codes, not
        Gaussian, so KL per unit and active units do not apply).

        :param guide: The trained :class:`VQVAEGuide`.
        :param data: Test examples on the model's device.
        """
        return {"vq": vq_statistics(self, guide, data)}

    def likelihood(self, z_q: torch.Tensor) -> dist.Distribution:
        """p(x | z_q) for quantized vectors of shape ``(..., P, D)``."""
        h = self.decoder_mlp(z_q.flatten(-2))
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=self.output(h)).to_event(1)
        loc, var = self.output(h)
        return dist.Normal(loc, var.sqrt()).to_event(1)

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None) -> None:
        """Run the model, observing ``x`` of shape ``(batch, input_dim)``."""
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        with pyro.plate("data", x.shape[0], dim=-1):
            with kl_weight(beta):
                z_q = pyro.sample("z1", UniformCodebook(self.codebook, self.positions))
            pyro.sample("x", self.likelihood(z_q), obs=x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, guide: nn.Module) -> torch.Tensor:
        """Encode, quantize, decode: the mean of p(x | z_q(x))."""
        _, z_q, _ = guide.quantize(guide.encode(x))
        return self.likelihood(z_q).mean


class VQVAEGuide(HierarchicalGuide):
    """The VQ-VAE encoder and quantizer, a deterministic (Delta) guide.

    :param model: The :class:`VQVAEModel`, whose codebook it quantizes with.
    """

    #: The Delta posterior has no analytic KL against the codebook prior; Trace_ELBO
    #: computes log q - log p = P log K exactly from the site log-densities.
    mean_field_compatible = False

    def __init__(self, model: VQVAEModel) -> None:
        require_model(model, "VQVAEGuide")
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.model = model
        self.name = f"{model.name}.encoder"
        self.encoder = mlp_for(cfg, cfg.input_dim, cfg.hidden_sizes[0])
        self.project = nn.Linear(cfg.hidden_sizes[0], model.positions * cfg.code_dim)

    def register(self) -> None:
        """Register the encoder's parameters and the model's (the codebook) in Pyro's param store."""
        self.model.register()
        self.name = register_modules(self.name, {".mlp": self.encoder, ".project": self.project})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder outputs z_e, shape ``(batch, P, D)``."""
        return self.project(self.encoder(x)).unflatten(-1, (self.model.positions, self.config.code_dim))

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codebook vectors.

        :returns: ``(indices, e, z_st)``: code indices ``(batch, P)``, the codebook
            vectors ``e`` and the straight-through value ``z_e + sg[e - z_e]``
            (equal to ``e``, with the gradient of ``z_e``).
        """
        codebook = self.model.codebook
        dist2 = z_e.pow(2).sum(-1, keepdim=True) - 2 * z_e @ codebook.T + codebook.pow(2).sum(-1)
        indices = dist2.argmin(-1)
        e = codebook[indices]
        return indices, e, z_e + (e - z_e).detach()

    @torch.no_grad()
    def _ema_update(self, z_e: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step (the paper's appendix A.1) for the codes this batch assigned.

        ``N_i ← γ N_i + (1 − γ) n_i`` and ``m_i ← γ m_i + (1 − γ) Σ_j z_e,j`` for every code,
        then ``e_i = m_i / Ñ_i`` (Ñ: Laplace-smoothed counts) for the codes with
        ``n_i > 0`` only. A code no encoding has been assigned to keeps its vector:
        dividing its (zero) sum by a smoothed count of about 1e-5 would destroy it.
        """
        m, k = self.model, self.config.codebook_size
        gamma = self.config.ema_decay
        onehot = F.one_hot(indices.reshape(-1), k).to(z_e.dtype)
        counts = onehot.sum(0)
        m.ema_count.mul_(gamma).add_(counts, alpha=1 - gamma)
        m.ema_sum.mul_(gamma).add_(onehot.T @ z_e.reshape(-1, z_e.shape[-1]), alpha=1 - gamma)
        n = m.ema_count.sum()
        smoothed = (m.ema_count + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing
        used = counts > 0
        m.codebook[used] = m.ema_sum[used] / smoothed[used, None]

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None) -> None:
        """Quantize the encoding of ``x`` and add the VQ loss terms."""
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        z_e = self.encode(x)
        indices, e, z_st = self.quantize(z_e)
        commitment = (z_e - e.detach()).pow(2).sum((-2, -1))
        vq_loss = self.config.commitment_cost * commitment
        if self.config.codebook_ema:
            if self.training and torch.is_grad_enabled():
                self._ema_update(z_e.detach(), indices)
        else:
            vq_loss = vq_loss + (z_e.detach() - e).pow(2).sum((-2, -1))  # the codebook term
        with pyro.plate("data", x.shape[0], dim=-1):
            with kl_weight(beta):
                pyro.sample("z1", dist.Delta(z_st, event_dim=2))
            # A guide factor enters log q, so +vq_loss is added to the loss -(log p - log q).
            pyro.factor("vq_loss", vq_loss, has_rsample=True)


@torch.no_grad()
def vq_statistics(
    model: VQVAEModel, guide: VQVAEGuide, data: torch.Tensor, *, batch_size: int = 1000
) -> dict[str, float]:
    """Reconstruction, codebook usage and the ELBO under the uniform prior.

    :param model: The VQ-VAE's generative model.
    :param guide: Its encoder.
    :param data: Examples of shape ``(N, input_dim)`` on the model's device.
    :param batch_size: Examples per forward pass.
    :returns: ``reconstruction_nll`` (−log p(x|z_q), nats per example),
        ``reconstruction_mse`` (mean squared error of the mean of p(x|z_q), per pixel),
        ``elbo`` (``-reconstruction_nll - P log K``), ``perplexity`` (exp of the
        entropy of the average code usage; K if every code is used equally, 1 if
        one code is used), ``codes_used`` (codes chosen at least once) and
        ``kl`` (P log K).
    """
    check_examples(data)
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64, device=data.device)
    nll = mse = 0.0
    with eval_mode(model, guide):
        for xb in data.split(batch_size):
            indices, _, z_q = guide.quantize(guide.encode(xb))
            px = model.likelihood(z_q)
            nll -= px.log_prob(xb).sum().item()
            mse += (px.mean - xb).pow(2).sum().item()
            counts += torch.bincount(indices.reshape(-1), minlength=counts.numel()).double()
    n = data.shape[0]
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    kl = model.positions * math.log(model.config.codebook_size)
    return {
        "reconstruction_nll": nll / n,
        "reconstruction_mse": mse / (n * data.shape[1]),
        "elbo": -nll / n - kl,
        "kl": kl,
        "perplexity": math.exp(entropy),
        "codes_used": int((counts > 0).sum().item()),
    }
