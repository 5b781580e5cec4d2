r"""The two inference models of the paper, as Pyro guides for one :class:`~pyro_lvae.models.model.GenerativeModel`.

Both guides are built from a model instance, ``BottomUpGuide(model)`` or
``LadderGuide(model)``, and can be swapped on it without touching the model.

:class:`BottomUpGuide` (paper §2.1, eqs. 7–12) samples
:math:`q(z_1|x)\,q(z_2|z_1)\cdots q(z_L|z_{L-1})` with its own networks. Its sites
come in the order z1, z2, …, zL, the reverse of the model's, and each site's
distribution depends on the *lower* layer, whereas the model's
:math:`p(z_i|z_{i+1})` depends on the *upper* one. Pyro's
:class:`~pyro.infer.TraceMeanField_ELBO` replaces
:math:`\mathbb{E}_q[\log q(z_i|\cdot) - \log p(z_i|z_{i+1})]` by the analytic KL
with :math:`z_{i+1}` held fixed, but under this guide :math:`z_{i+1}` is drawn
*after* and *from* :math:`z_i`, so that substitution is wrong and the estimate is
biased by several nats (Pyro warns that it "failed to verify mean field
restriction"). The bottom-up guide therefore uses :class:`~pyro.infer.Trace_ELBO`.

:class:`LadderGuide` (paper §2.2, eqs. 13–19) runs a deterministic upward pass
:math:`d_n = \mathrm{MLP}(d_{n-1})`, :math:`d_0 = x`, with heads
:math:`\hat\mu_{q,i}, \hat\sigma^2_{q,i}`, then a stochastic top-down pass: it
samples :math:`z_L \sim \mathcal{N}(\hat\mu_{q,L}, \hat\sigma^2_{q,L})` and, for
i = L−1, …, 1, computes the model's own prior :math:`(\mu_{p,i}, \sigma^2_{p,i})`
from the sampled :math:`z_{i+1}` with the *model's* top-down networks and merges
it with the bottom-up estimate by precision weighting
(:func:`~pyro_lvae.models.merge.precision_weighted_merge`). Its sites come in the
model's top-down order and :math:`q(z_i|z_{i+1},x)` conditions on the same
:math:`z_{i+1}` as :math:`p(z_i|z_{i+1})`, so the analytic per-layer KL of
:class:`~pyro.infer.TraceMeanField_ELBO` is exact in expectation.

:func:`~pyro_lvae.inference.objectives.elbo_for` picks the right ELBO from the guide's
``mean_field_compatible`` attribute.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..config import ModelConfig
from ..inference.warmup import kl_weight
from .merge import precision_weighted_merge
from .model import GenerativeModel
from .nn import bottom_encoder_for, gaussian_head_for, mlp_for
from .protocol import HierarchicalGuide, check_input_width, parameter_dtype, require_model
from .registration import register_modules


def _mlps_and_heads(
    cfg: ModelConfig, inputs: tuple[int, ...], encoder: nn.Module | None
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """One MLP of width ``hidden_sizes[i]`` reading ``inputs[i]`` and one Gaussian head per layer;
    the first block reads x: ``encoder``, or the one of ``config.bottom``."""
    first = encoder if encoder is not None else bottom_encoder_for(cfg)
    mlps = nn.ModuleList([first] + [mlp_for(cfg, inputs[i], cfg.hidden_sizes[i]) for i in range(1, cfg.depth)])
    heads = nn.ModuleList(gaussian_head_for(cfg, cfg.hidden_sizes[i], cfg.latent_sizes[i]) for i in range(cfg.depth))
    return mlps, heads


def _top_down_networks(cfg: ModelConfig) -> nn.ModuleDict:
    """Networks of the shape of the model's top-down ones, for a ladder guide that does not share them."""
    sizes = cfg.latent_sizes
    mlps = nn.ModuleList(mlp_for(cfg, sizes[i + 1], cfg.hidden_sizes[i + 1]) for i in range(cfg.depth - 1))
    heads = nn.ModuleList(gaussian_head_for(cfg, cfg.hidden_sizes[i + 1], sizes[i]) for i in range(cfg.depth - 1))
    return nn.ModuleDict({"mlps": mlps, "heads": heads})


class BottomUpGuide(HierarchicalGuide):
    """The VAE inference model :math:`q(z_1|x)\\prod_{i\\ge2} q(z_i|z_{i-1})`.

    :param model: The generative model this guide approximates the posterior of;
        only its configuration is used (the networks are the guide's own).
    :param encoder: Your own first block instead of ``config.bottom``'s: a module mapping x of
        shape ``(N, input_dim)`` to ``(N, hidden_sizes[0])``.

    Registered in the param store as ``f"{model.name}.bottom_up"``.
    """

    #: Site order differs from the model's; use Trace_ELBO (see module docstring).
    mean_field_compatible = False

    def __init__(self, model: GenerativeModel, *, encoder: nn.Module | None = None) -> None:
        require_model(model, "BottomUpGuide")
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.name = f"{model.name}.bottom_up"
        # q(z_i | z_{i-1}) reads z_{i-1} (x for i = 1, through config.bottom's block or the user's).
        self.mlps, self.heads = _mlps_and_heads(cfg, (cfg.input_dim,) + cfg.latent_sizes[:-1], encoder)

    def register(self) -> None:
        """Register the guide's parameters in Pyro's param store under its ``name``."""
        self.name = register_modules(self.name, {"": self})

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None) -> None:
        """Sample z1, …, zL given ``x`` of shape ``(batch, input_dim)``.

        :param beta: Warm-up KL weight, as for the model.
        """
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        with pyro.plate("data", x.shape[0], dim=-1), kl_weight(beta):
            h = x
            for i in range(self.config.depth):
                loc, var = self.heads[i](self.mlps[i](h))
                h = pyro.sample(f"z{i + 1}", dist.Normal(loc, var.sqrt()).to_event(1))


class LadderGuide(HierarchicalGuide):
    """The ladder inference model of eqs. 13–19, sharing the model's top-down networks.

    Data flow, for L = 3 (``d_0 = x``; ``⊕`` is the precision-weighted merge of eqs. 17–18)::

        upward (eqs. 13–15)          top-down (eqs. 16–19)
        x ─MLP─> d1 ─> (μ̂1, σ̂²1) ───────────────────────────> ⊕ ─> z1 ~ q(z1 | z2, x)
                 │                                               ↑
                 MLP─> d2 ─> (μ̂2, σ̂²2) ───────> ⊕ ─> z2 ─> p(z1 | z2)
                       │                         ↑
                       MLP─> d3 ─> (μ̂3, σ̂²3) ─> z3 ~ q(z3 | x) ─> p(z2 | z3)

    The priors ``p(z_i | z_{i+1})`` are the model's own networks, evaluated on the
    guide's sample of ``z_{i+1}``.

    :param model: The generative model. Its top-down networks compute
        :math:`(\\mu_{p,i}, \\sigma^2_{p,i})` inside the guide; they are the same
        ``nn.Parameter`` objects (registered under the model's name), not copies.
        With ``config.ladder_share_params = False`` the guide has top-down networks of
        its own instead (the authors' code), and with ``config.only_mu_up = True`` its
        upward pass reads :math:`\\hat\\mu_{q,n-1}` instead of :math:`d_{n-1}`.
    :param encoder: Your own first upward block x → d1 instead of ``config.bottom``'s: a module
        mapping ``(N, input_dim)`` to ``(N, hidden_sizes[0])``.

    The guide's own (upward) parameters are registered as ``f"{model.name}.ladder"``,
    its own top-down networks, if any, as ``f"{model.name}.ladder.top_down"`` (or under
    a free variant of that name when another module holds it, see
    :mod:`pyro_lvae.models.registration`).
    """

    #: Sites come in the model's order, conditioned like the model's: TraceMeanField_ELBO is valid.
    mean_field_compatible = True

    def __init__(self, model: GenerativeModel, *, encoder: nn.Module | None = None) -> None:
        require_model(model, "LadderGuide")
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.name = f"{model.name}.ladder"
        self.model = model
        # The guide's own parameters: the deterministic upward pass d_n = MLP(d_{n-1}),
        # which reads d_{n-1} (x for n = 1), or μ̂_{n-1} with only_mu_up, and its heads.
        below = cfg.latent_sizes[:-1] if cfg.only_mu_up else cfg.hidden_sizes[:-1]
        mlps, heads = _mlps_and_heads(cfg, (cfg.input_dim,) + below, encoder)
        self.upward_net = nn.ModuleDict({"mlps": mlps, "heads": heads})
        self.top_down_net = None if cfg.ladder_share_params else _top_down_networks(cfg)

    def upward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic upward pass (eqs. 13–15).

        :returns: ``[(loc_hat_1, var_hat_1), …, (loc_hat_L, var_hat_L)]``.
        """
        h = x
        estimates = []
        for mlp, head in zip(self.upward_net["mlps"], self.upward_net["heads"]):
            d = mlp(h)
            estimates.append(head(d))
            h = estimates[-1][0] if self.config.only_mu_up else d
        return estimates

    def prior_params(self, layer: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-down :math:`(\\mu_{p,layer}, \\sigma^2_{p,layer})` merged at ``layer``:
        the model's own (:meth:`~pyro_lvae.models.model.GenerativeModel.prior_params`) unless the guide has
        its own networks.

        :param layer: 1-based index of the lower layer, 1 ≤ layer < L.
        :param z_above: A sample of :math:`z_{layer+1}`.
        """
        if self.top_down_net is None:
            return self.model.prior_params(layer, z_above)
        d = self.top_down_net["mlps"][layer - 1](z_above)
        return self.top_down_net["heads"][layer - 1](d)

    def register(self) -> None:
        """Register the model's parameters (used here by the top-down pass) and the
        guide's own upward networks in Pyro's param store."""
        self.model.register()
        parts = {"": self.upward_net} | ({".top_down": self.top_down_net} if self.top_down_net is not None else {})
        self.name = register_modules(self.name, parts)

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None, *, record: dict | None = None) -> None:
        """Sample zL, …, z1 given ``x`` of shape ``(batch, input_dim)``.

        :param beta: Warm-up KL weight, as for the model.
        :param record: If given, filled with the merge's terms per layer,
            ``{layer: ((loc_hat, var_hat), (prior_loc, prior_var) or None)}``
            (:func:`~pyro_lvae.models.hierarchy.encode` reads them).
        """
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        depth = self.config.depth
        estimates = self.upward(x)
        with pyro.plate("data", x.shape[0], dim=-1), kl_weight(beta):
            loc, var = estimates[-1]
            z = pyro.sample(f"z{depth}", dist.Normal(loc, var.sqrt()).to_event(1))
            if record is not None:
                record[depth] = (estimates[-1], None)
            for layer in range(depth - 1, 0, -1):
                prior = self.prior_params(layer, z)
                loc, var = precision_weighted_merge(*estimates[layer - 1], *prior)
                z = pyro.sample(f"z{layer}", dist.Normal(loc, var.sqrt()).to_event(1))
                if record is not None:
                    record[layer] = (estimates[layer - 1], prior)
