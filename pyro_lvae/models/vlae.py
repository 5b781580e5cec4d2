r"""The Variational Ladder Autoencoder (Zhao, Song & Ermon 2017) as a Pyro model and guide.

The VLAE keeps every latent layer independent *a priori*,
:math:`p(z_1, \dots, z_L) = \prod_l \mathcal{N}(z_l; 0, I)`, and puts the hierarchy
in the generator instead: a "ladder" of networks in which higher layers pass
through more nonlinear steps before they reach x,

.. math::

    \tilde z_L = f_L(z_L), \qquad
    \tilde z_l = f_l([\tilde z_{l+1}, z_l]), \qquad
    x \sim r(x; f_0(\tilde z_1)),

with :math:`[\cdot,\cdot]` concatenation and every :math:`f_l` a two-hidden-layer
MLP (:class:`~pyro_lvae.models.nn.MLP`); :math:`f_0` is a linear map to the Bernoulli
logits (or a Gaussian head). The inference network mirrors it bottom-up,

.. math::

    h_l = g_l(h_{l-1}),\ h_0 = x, \qquad
    q(z_l | x) = \mathcal{N}(\mu_l(h_l), \sigma_l^2(h_l)),

so each :math:`q(z_l|x)` reads a deeper feature of x than the one below it.
Because the prior layers are independent and each guide site depends on x only,
the analytic KL of :class:`~pyro.infer.TraceMeanField_ELBO` is exact here; the guide
samples in the model's site order (zL, …, z1) so that Pyro's mean-field check agrees.

Sites are named as in :class:`~pyro_lvae.models.model.GenerativeModel` (``z{L}``, …,
``z1``, ``x`` in one ``pyro.plate("data")``), so training, the ELBO, L_K and the
per-unit KL analysis run unchanged.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..config import ModelConfig
from ..inference.warmup import kl_weight
from .nn import gaussian_head_for, mlp_for
from .protocol import (
    HierarchicalGuide,
    HierarchicalModel,
    check_input_width,
    parameter_dtype,
    require_model,
    require_model_config,
)
from .registration import register_modules


class VLAEModel(HierarchicalModel):
    """The VLAE generative model: independent N(0, I) layers and a ladder generator.

    :param config: Architecture; ``latent_sizes[l-1]`` is the size of z_l and
        ``hidden_sizes[l-1]`` the width of f_l (and of g_l in the guide).
    :param name: Prefix of the parameters in Pyro's param store.

    >>> from pyro_lvae.config import ModelConfig
    >>> cfg = ModelConfig(family="vlae", guide="vae", input_dim=6, latent_sizes=(2, 2), hidden_sizes=(8, 8))
    >>> model = VLAEModel(cfg)
    >>> model.sample(3).shape
    torch.Size([3, 6])
    """

    def __init__(self, config: ModelConfig, *, name: str = "vlae") -> None:
        require_model_config(config, "VLAEModel")
        super().__init__()
        self.config = config
        self.name = name
        sizes, hidden = config.latent_sizes, config.hidden_sizes
        depth = config.depth
        # ladder[l-1] is f_l: f_L reads z_L, f_l (l < L) reads [z~_{l+1}, z_l].
        self.ladder = nn.ModuleList(
            mlp_for(config, sizes[i] + (hidden[i + 1] if i + 1 < depth else 0), hidden[i]) for i in range(depth)
        )
        if config.likelihood == "bernoulli":
            self.output: nn.Module = nn.Linear(hidden[0], config.input_dim)
        else:
            self.output = gaussian_head_for(config, hidden[0], config.input_dim)

    @property
    def depth(self) -> int:
        return self.config.depth

    def register(self) -> None:
        """Register the parameters in Pyro's param store under its ``name``."""
        self.name = register_modules(self.name, {"": self})

    def decode(self, zs: list[torch.Tensor]) -> dist.Distribution:
        """The observation distribution p(x | z_1, …, z_L) for ``zs = [z1, …, zL]``."""
        h = self.ladder[-1](zs[-1])
        for layer in range(self.depth - 1, 0, -1):
            z = zs[layer - 1]
            h = self.ladder[layer - 1](torch.cat([h, z], dim=-1))
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=self.output(h)).to_event(1)
        loc, var = self.output(h)
        return dist.Normal(loc, var.sqrt()).to_event(1)

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None) -> None:
        """Run the model, observing ``x`` of shape ``(batch, input_dim)``.

        :param beta: Warm-up KL weight on the latent sites (see :func:`~pyro_lvae.inference.warmup.kl_weight`).
        """
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        batch = x.shape[0]
        zs: list[torch.Tensor] = [x] * self.depth  # placeholders, filled top-down
        with pyro.plate("data", batch, dim=-1):
            with kl_weight(beta):
                for layer in range(self.depth, 0, -1):
                    zero = x.new_zeros(batch, self.config.latent_sizes[layer - 1])
                    zs[layer - 1] = pyro.sample(f"z{layer}", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
            pyro.sample("x", self.decode(zs), obs=x)

    @torch.no_grad()
    def traverse(
        self, layer: int, *, steps: int = 7, span: float = 2.0, fixed: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Decode a grid over one layer's code with the other layers held fixed.

        The first two units of z_layer (one, if the layer has a single unit) sweep
        ``[-span, span]`` in ``steps`` steps; every other unit and every other layer
        keeps its value in ``fixed`` (default: zero, the prior mode).

        :param layer: 1-based layer to vary.
        :returns: Means of p(x|z), shape ``(steps, steps, input_dim)`` (``(1, steps, input_dim)`` for a 1-unit layer).
        """
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer must be in 1..{self.depth}, got {layer}.")
        param = next(self.parameters())
        sizes = self.config.latent_sizes
        base = fixed or [torch.zeros(s, device=param.device, dtype=param.dtype) for s in sizes]
        grid = torch.linspace(-span, span, steps, device=param.device, dtype=param.dtype)
        two = sizes[layer - 1] >= 2
        rows = grid if two else grid[:1]
        zs = [b.expand(len(rows), steps, -1).clone() for b in base]
        zs[layer - 1][..., 0] = grid.expand(len(rows), steps)
        if two:
            zs[layer - 1][..., 1] = rows[:, None].expand(len(rows), steps)
        return self.decode([z.reshape(-1, z.shape[-1]) for z in zs]).mean.reshape(len(rows), steps, -1)


class VLAEGuide(HierarchicalGuide):
    """The VLAE inference network :math:`q(z_l|x) = \\mathcal{N}(\\mu_l(h_l), \\sigma_l^2(h_l))`.

    :param model: The :class:`VLAEModel` (its configuration sizes the networks).
    """

    mean_field_compatible = True

    def __init__(self, model: VLAEModel) -> None:
        require_model(model, "VLAEGuide")
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.name = f"{model.name}.guide"
        inputs = (cfg.input_dim,) + cfg.hidden_sizes[:-1]
        self.features = nn.ModuleList(mlp_for(cfg, inputs[i], cfg.hidden_sizes[i]) for i in range(cfg.depth))
        self.heads = nn.ModuleList(
            gaussian_head_for(cfg, cfg.hidden_sizes[i], cfg.latent_sizes[i]) for i in range(cfg.depth)
        )

    def register(self) -> None:
        """Register the guide's parameters in Pyro's param store under its ``name``."""
        self.name = register_modules(self.name, {"": self})

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None) -> None:
        """Sample zL, …, z1 given ``x`` of shape ``(batch, input_dim)``."""
        check_input_width(x, self.config.input_dim, dtype=parameter_dtype(self))
        if self.register_params:
            self.register()
        h, params = x, []
        for net, head in zip(self.features, self.heads):
            h = net(h)
            params.append(head(h))
        with pyro.plate("data", x.shape[0], dim=-1), kl_weight(beta):
            for layer in range(self.config.depth, 0, -1):
                loc, var = params[layer - 1]
                pyro.sample(f"z{layer}", dist.Normal(loc, var.sqrt()).to_event(1))
