r"""The generative model shared by every guide (paper eqs. 1–3, 10–12).

.. math::

    p(x, z) = p(x | z_1)\, p(z_1 | z_2) \cdots p(z_{L-1} | z_L)\, p(z_L),

with :math:`p(z_L) = \mathcal{N}(0, I)`,
:math:`p(z_i | z_{i+1}) = \mathcal{N}(\mu_{p,i}(z_{i+1}), \sigma^2_{p,i}(z_{i+1}))`
and a Bernoulli (sigmoid mean) or Gaussian (linear mean, softplus variance)
observation model. Sample sites are named ``z{L}``, …, ``z1`` and ``x``, in that
(top-down) order, all inside one ``pyro.plate("data")`` over the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..config import ModelConfig
from ..inference.warmup import kl_weight
from .nn import decoder_for, gaussian_head_for, mlp_for
from .protocol import HierarchicalModel, check_input_width, parameter_dtype, require_model_config
from .registration import register_modules


class GenerativeModel(HierarchicalModel):
    """The LVAE/VAE generative model as a Pyro ``model``.

    Calling the module runs the model: ``model(x, beta=β)`` observes ``x`` of shape
    ``(batch, input_dim)``. Its parameters are registered in Pyro's param store
    under ``name`` (see :func:`pyro.module`), so a guide that uses the model's own
    networks (the :class:`~pyro_lvae.models.guides.LadderGuide`) shares them rather
    than copying them. Give two models in one Python session different names, or
    clear the param store between them.

    :param config: The architecture.
    :param name: Prefix of the parameters in Pyro's param store.
    :param decoder: Your own network for p(x | z1) instead of ``config.bottom``'s: a module
        mapping z1 of shape ``(N, latent_sizes[0])`` to the logits ``(N, input_dim)``
        (Bernoulli likelihood) or to ``(loc, variance)``, each ``(N, input_dim)`` (Gaussian).
        Leading particle dimensions arrive flattened into N only if your module flattens
        them: the L_K evaluation passes z1 of shape ``(K, N, latent_sizes[0])``.

    >>> import torch
    >>> from pyro_lvae.config import ModelConfig
    >>> model = GenerativeModel(ModelConfig(input_dim=6, latent_sizes=(3, 2), hidden_sizes=(8, 4)))
    >>> model.sample(5).shape
    torch.Size([5, 6])
    """

    #: Whether :meth:`forward` registers the parameters with :func:`pyro.module`, as
    #: a Pyro model must for ``SVI`` to find them. The fast training engine
    #: (:mod:`pyro_lvae.training.steps`) registers them once and switches this off inside its
    #: own steps only.
    register_params: bool = True

    def __init__(self, config: ModelConfig, *, name: str = "lvae", decoder: nn.Module | None = None) -> None:
        require_model_config(config, "GenerativeModel")
        super().__init__()
        self.config = config
        self.name = name
        sizes = config.latent_sizes
        # top_down[i] computes p(z_{i+1} | z_{i+2}) in 0-based layer terms: entry i maps
        # z of layer i+1 (size sizes[i+1]) to the Gaussian over layer i (size sizes[i]),
        # through an MLP of width hidden_sizes[i + 1] (the connection between the two).
        self.top_down_mlps = nn.ModuleList(
            mlp_for(config, sizes[i + 1], config.hidden_sizes[i + 1]) for i in range(config.depth - 1)
        )
        self.top_down_heads = nn.ModuleList(
            gaussian_head_for(config, config.hidden_sizes[i + 1], sizes[i]) for i in range(config.depth - 1)
        )
        # p(x | z1): an MLP and a linear or Gaussian head (the paper), the conv blocks of
        # config.bottom, or the user's decoder with no head of its own.
        if decoder is None:
            self.decoder_mlp, self.decoder_head = decoder_for(config)
        else:
            self.decoder_mlp, self.decoder_head = decoder, nn.Identity()
        # Memo of prior_params, live only inside shared_priors() (see there).
        self._prior_memo: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def register(self) -> None:
        """Register the parameters in Pyro's param store under its ``name`` (a free
        name if another module holds that one, see :mod:`pyro_lvae.models.registration`)."""
        self.name = register_modules(self.name, {"": self})

    @property
    def depth(self) -> int:
        return self.config.depth

    def prior_params(self, layer: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of :math:`p(z_{layer} | z_{layer+1})`.

        :param layer: 1-based index of the lower layer, 1 ≤ layer < L.
        :param z_above: A sample of :math:`z_{layer+1}`, shape ``(..., latent_sizes[layer])``.
        :returns: ``(loc, variance)``, each of shape ``(..., latent_sizes[layer - 1])``.
        """
        memo = self._prior_memo
        if memo is not None and layer in memo and memo[layer][0] is z_above:
            return memo[layer][1]
        d = self.top_down_mlps[layer - 1](z_above)
        params = self.top_down_heads[layer - 1](d)
        if memo is not None:
            memo[layer] = (z_above, params)
        return params

    @contextlib.contextmanager
    def shared_priors(self) -> Iterator[None]:
        """Compute each top-down prior once per sample inside this context.

        The :class:`~pyro_lvae.models.guides.LadderGuide` evaluates
        :math:`p(z_i | z_{i+1})` on its own sample of :math:`z_{i+1}` to merge it
        with the bottom-up estimate; the model, replayed on the guide's trace, then
        evaluates the same networks on the same tensor. Inside this context
        :meth:`prior_params` remembers its last result per layer and returns it when
        called again with the *same tensor object*, so the top-down networks run (and
        back-propagate, and update their batch-norm statistics) once per step instead
        of twice. The values and gradients are unchanged. The memo is dropped on exit,
        so parameter updates between two loss evaluations can never see a stale entry:
        wrap one loss evaluation, not a training loop.
        """
        if self._prior_memo is not None:  # nested: the outer context owns the memo
            yield
            return
        self._prior_memo = {}
        try:
            yield
        finally:
            self._prior_memo = None

    def likelihood(self, z1: torch.Tensor) -> dist.Distribution:
        """The observation distribution :math:`p(x | z_1)`, with event shape ``(input_dim,)``."""
        d = self.decoder_mlp(z1)
        # The log-likelihood in the precision of z1, also under bfloat16 autocast (precision="bf16").
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=self.decoder_head(d).to(z1.dtype)).to_event(1)
        loc, var = self.decoder_head(d)
        return dist.Normal(loc.to(z1.dtype), var.to(z1.dtype).sqrt()).to_event(1)

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None) -> torch.Tensor:
        """Run the model, observing ``x``.

        :param x: Data of shape ``(batch, input_dim)``.
        :param beta: Warm-up KL weight applied to the latent sites only (see
            :func:`~pyro_lvae.inference.warmup.kl_weight`); ``None`` for the plain model. It
            is positional on purpose: a JIT-compiled ELBO traces positional tensor
            arguments as inputs, so one compiled graph serves every β, whereas a
            keyword tensor would be baked in as a constant and recompiled.
        :returns: The bottom latent sample z1.
        """
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        cfg = self.config
        batch = x.shape[0]
        with pyro.plate("data", batch, dim=-1):
            with kl_weight(beta):
                top = x.new_zeros(batch, cfg.latent_sizes[-1])
                z = pyro.sample(f"z{cfg.depth}", dist.Normal(top, torch.ones_like(top)).to_event(1))
                for layer in range(cfg.depth - 1, 0, -1):
                    loc, var = self.prior_params(layer, z)
                    z = pyro.sample(f"z{layer}", dist.Normal(loc, var.sqrt()).to_event(1))
            pyro.sample("x", self.likelihood(z), obs=x)
        return z
