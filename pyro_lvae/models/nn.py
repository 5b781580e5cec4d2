"""The deterministic building blocks of paper eqs. 10–15.

``d(y) = MLP(y)`` is a two-hidden-layer perceptron; a :class:`GaussianHead` maps
``d`` to a mean ``Linear(d)`` and a variance ``max(Softplus(Linear(d)), floor)``. Each block
accepts inputs with any number of leading (particle, batch) dimensions: they are
flattened before batch normalization and restored afterwards. For evaluation without
gradients, :func:`batch_norm_folded` folds each evaluation-mode batch norm into the ``Linear``
before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from ..config import ModelConfig


#: The variance floor of the authors' code (``lv_eps_z = 1e-5``); see :class:`GaussianHead`.
DEFAULT_VARIANCE_FLOOR = 1e-5


def make_activation(name: str, *, leaky_slope: float = 0.1) -> nn.Module:
    """The nonlinearity called ``name`` in :class:`~pyro_lvae.config.ModelConfig`.

    :param name: ``"leaky_relu"`` (max(x, slope · x), paper §3), ``"tanh"`` or ``"identity"``.
    :param leaky_slope: Negative slope of the leaky rectifier (paper: 0.1; the authors'
        Lasagne code: 0.01).
    """
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_slope)
    if name == "tanh":
        return nn.Tanh()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"Unknown activation {name!r}; choose leaky_relu, tanh or identity.")


class MLP(nn.Module):
    """Two hidden layers: ``act(BN(W2 act(BN(W1 y + b1)) + b2))``.

    :param in_features: Input width.
    :param hidden: Width of both hidden layers.
    :param activation: Name of the nonlinearity (see :func:`make_activation`).
    :param batch_norm: Batch-normalize each hidden layer before its nonlinearity.
    :param leaky_slope: Negative slope when ``activation`` is ``"leaky_relu"``.
    """

    def __init__(
        self, in_features: int, hidden: int, *, activation: str, batch_norm: bool, leaky_slope: float = 0.1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(2):
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(make_activation(activation, leaky_slope=leaky_slope))
            width = hidden
        self.net = nn.Sequential(*layers)
        self.out_features = hidden
        self.batch_norm = batch_norm
        # ``(Wᵀ, b)`` per layer with batch norm folded in, inside batch_norm_folded() only.
        self._folded: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The two hidden layers on the last dimension of ``y``.

        :param y: Input of shape ``(…, in_features)``; leading dimensions (particles) are kept.
        """
        lead = y.shape[:-1]
        flat = y.reshape(-1, y.shape[-1])
        if self._folded is not None:
            out = flat
            for weight_t, bias in self._folded:
                out = F.leaky_relu_(torch.addmm(bias, out, weight_t), self.net[2].negative_slope)
        else:
            _check_batch(flat, self, self.batch_norm)
            out = self.net(flat)
        return out.reshape(*lead, self.out_features)

    def foldable(self) -> bool:
        """Whether :func:`batch_norm_folded` folds this MLP: in evaluation mode, with batch
        norm and the leaky ReLU."""
        return not self.training and self.batch_norm and isinstance(self.net[2], nn.LeakyReLU)

    def folded_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r"""Each layer's ``(W'ᵀ, b')`` with its evaluation-mode batch norm folded in:
        :math:`\mathrm{BN}(Wy + b) = W'y + b'` with :math:`W' = sW`, :math:`b' = s(b - \mu) + \beta`
        and :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}` from the running statistics."""
        layers = []
        for linear, norm in zip(self.net[0::3], self.net[1::3]):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            bias = (linear.bias - norm.running_mean) * scale + norm.bias
            layers.append(((linear.weight * scale[:, None]).t().contiguous(), bias))
        return layers


@contextlib.contextmanager
def batch_norm_folded(*modules: nn.Module) -> Iterator[None]:
    """Inside, every foldable :class:`MLP` of ``modules`` (:meth:`MLP.foldable`) computes each
    layer as one ``addmm`` and an in-place leaky ReLU, with its batch norm folded into the
    ``Linear`` (:meth:`MLP.folded_layers`): the same function in fewer passes over the
    activations, for evaluation without gradients. The others are left as they are.

    In float64 the folded networks agree with the unfolded ones to 1e-11; in float32 both
    are as far from the float64 values (``tests/models/test_nn.py``).

    :param modules: Models and guides; an MLP they share is folded once.
    :raises ValueError: When gradients are enabled (the folded layers work in place).
    """
    if torch.is_grad_enabled():
        raise ValueError("batch_norm_folded is for evaluation; call it inside torch.no_grad().")
    mlps = {id(m): m for module in modules for m in module.modules() if isinstance(m, MLP) and m.foldable()}
    for mlp in mlps.values():
        mlp._folded = mlp.folded_layers()
    try:
        yield
    finally:
        for mlp in mlps.values():
            mlp._folded = None


class GaussianHead(nn.Module):
    """Mean and variance heads of eqs. 11–12 (and 14–15), with a variance floor.

    The paper writes ``σ² = Softplus(Linear(d))``. Trained to full length, the
    ladder model drives some top-down prior variances towards 0 (for a unit whose
    merged posterior follows the prior, a smaller σ²_p lowers the KL of the merge)
    until softplus underflows and the precision-weighted merge divides by zero. The
    authors' code guards against this by adding ``lv_eps_z = 1e-5`` to every latent
    variance; this head clamps at the floor instead, which leaves every variance
    above it bit-identical (docs/reproduce.md lists this deviation).

    :param in_features: Width of the shared deterministic input ``d``.
    :param out_features: Number of Gaussian units.
    :param variance_floor: Smallest variance returned; 0 gives the paper's text exactly.
    :returns: ``(loc, variance)``, with ``variance = softplus(Linear(d)).clamp_min(variance_floor)``.
    """

    def __init__(self, in_features: int, out_features: int, *, variance_floor: float = DEFAULT_VARIANCE_FLOOR) -> None:
        super().__init__()
        if not variance_floor >= 0:
            raise ValueError(f"variance_floor must be a non-negative number, got {variance_floor!r}.")
        self.loc = nn.Linear(in_features, out_features)
        self.var = nn.Linear(in_features, out_features)
        self.variance_floor = float(variance_floor)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, variance)`` of eqs. 11–12 from ``d``.

        :param d: The deterministic features, shape ``(…, in_features)``.
        """
        # In the parameters' precision: under bfloat16 autocast (precision="bf16") the linear
        # layers compute in bf16, and the softplus, the merge and the densities get fp32 back.
        dtype = self.loc.weight.dtype
        return self.loc(d).to(dtype), F.softplus(self.var(d).to(dtype)).clamp_min(self.variance_floor)


def mlp_for(config: ModelConfig, in_features: int, hidden: int) -> MLP:
    """An :class:`MLP` with the nonlinearity, slope and batch norm of ``config``.

    :param config: The architecture.
    :param in_features: Input width.
    :param hidden: Width of both hidden layers.
    """
    return MLP(
        in_features, hidden, activation=config.activation, batch_norm=config.batch_norm, leaky_slope=config.leaky_slope
    )


def gaussian_head_for(config: ModelConfig, in_features: int, out_features: int) -> GaussianHead:
    """A :class:`GaussianHead` with the variance floor of ``config``.

    :param config: The architecture.
    :param in_features: Width of ``d``.
    :param out_features: Number of Gaussian units.
    """
    return GaussianHead(in_features, out_features, variance_floor=config.variance_floor)


def _check_batch(flat: torch.Tensor, module: nn.Module, batch_norm: bool) -> None:
    if batch_norm and module.training and flat.shape[0] == 1:
        raise ValueError(
            "Batch norm in training mode needs more than one example, got one; call "
            "model.eval(); guide.eval() first to use the running statistics (as for pyro.infer.Importance)."
        )


def _conv_block(conv: nn.Module, channels: int, *, activation: str, batch_norm: bool, leaky_slope: float) -> list:
    norm = [nn.BatchNorm2d(channels)] if batch_norm else []
    return [conv, *norm, make_activation(activation, leaky_slope=leaky_slope)]


class ConvEncoder(nn.Module):
    """The guides' bottom block for ``bottom='conv'``: x → d1.

    Data flow for a 28×28 image (``C = conv_channels``)::

        x (…, 784) ─reshape─> (1, 28, 28) ─conv 4×4 /2─> (C, 14, 14) ─conv 4×4 /2─> (2C, 7, 7)
                   ─flatten─> Linear ─> d1 (…, out_features)

    each convolution and the linear layer followed by batch norm (if enabled) and the
    nonlinearity. A user's own encoder may replace it: any module mapping ``(N, input_dim)``
    to ``(N, hidden_sizes[0])``.

    :param side: Side of the square image (a multiple of 4).
    :param out_features: Width of d1, ``hidden_sizes[0]``.
    :param channels: Channels of the first convolution.
    :param activation: Name of the nonlinearity (:func:`make_activation`).
    :param batch_norm: Batch-normalize after each convolution and the linear layer.
    :param leaky_slope: Negative slope of the leaky rectifier.
    """

    def __init__(
        self, side: int, out_features: int, *, channels: int, activation: str, batch_norm: bool, leaky_slope: float
    ) -> None:
        super().__init__()
        opts = {"activation": activation, "batch_norm": batch_norm, "leaky_slope": leaky_slope}
        self.side, self.out_features, self.batch_norm = side, out_features, batch_norm
        self.convs = nn.Sequential(
            *_conv_block(nn.Conv2d(1, channels, 4, stride=2, padding=1), channels, **opts),
            *_conv_block(nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), 2 * channels, **opts),
        )
        norm = [nn.BatchNorm1d(out_features)] if batch_norm else []
        self.out = nn.Sequential(
            nn.Linear(2 * channels * (side // 4) ** 2, out_features),
            *norm,
            make_activation(activation, leaky_slope=leaky_slope),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """d1 from flattened images.

        :param x: Images of shape ``(…, side²)``.
        """
        lead = x.shape[:-1]
        flat = x.reshape(-1, 1, self.side, self.side)
        _check_batch(flat, self, self.batch_norm)
        return self.out(self.convs(flat).flatten(1)).reshape(*lead, self.out_features)


class ConvDecoder(nn.Module):
    """The model's bottom block for ``bottom='conv'``: z1 → a feature map, the transpose of
    :class:`ConvEncoder`::

        z1 (…, latent) ─Linear─> (2C, 7, 7) ─convT 4×4 ×2─> (C, 14, 14) ─convT 4×4 ×2─> (C, 28, 28)

    :class:`ConvOutput` turns the map into the parameters of p(x | z1).

    :param latent: Units of z1.
    :param side: Side of the square image.
    :param channels: Channels of the last map.
    :param activation: Name of the nonlinearity.
    :param batch_norm: Batch-normalize after the linear layer and each convolution.
    :param leaky_slope: Negative slope of the leaky rectifier.
    """

    def __init__(
        self, latent: int, side: int, *, channels: int, activation: str, batch_norm: bool, leaky_slope: float
    ) -> None:
        super().__init__()
        opts = {"activation": activation, "batch_norm": batch_norm, "leaky_slope": leaky_slope}
        self.side, self.channels, self.batch_norm = side, channels, batch_norm
        width = 2 * channels * (side // 4) ** 2
        norm = [nn.BatchNorm1d(width)] if batch_norm else []
        self.inp = nn.Sequential(nn.Linear(latent, width), *norm, make_activation(activation, leaky_slope=leaky_slope))
        self.convs = nn.Sequential(
            *_conv_block(nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1), channels, **opts),
            *_conv_block(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), channels, **opts),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The feature map of shape ``(…, channels, side, side)``.

        :param z: Samples of z1, shape ``(…, latent)``.
        """
        lead = z.shape[:-1]
        flat = z.reshape(-1, z.shape[-1])
        _check_batch(flat, self, self.batch_norm)
        h = self.inp(flat).reshape(-1, 2 * self.channels, self.side // 4, self.side // 4)
        return self.convs(h).reshape(*lead, self.channels, self.side, self.side)


class ConvOutput(nn.Module):
    """1×1 convolutions from :class:`ConvDecoder`'s map to the parameters of p(x | z1), flattened
    to ``(…, side²)``: Bernoulli logits, or a Gaussian ``(loc, variance)`` with the variance floor.

    :param channels: Channels of the map.
    :param gaussian: Return ``(loc, variance)`` instead of logits.
    :param variance_floor: Smallest variance (Gaussian).
    """

    def __init__(self, channels: int, *, gaussian: bool, variance_floor: float = DEFAULT_VARIANCE_FLOOR) -> None:
        super().__init__()
        self.loc = nn.Conv2d(channels, 1, 1)
        self.var = nn.Conv2d(channels, 1, 1) if gaussian else None
        self.variance_floor = float(variance_floor)

    def forward(self, h: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or ``(loc, variance)``, of shape ``(…, side²)``.

        :param h: The decoder's map, shape ``(…, channels, side, side)``.
        """
        lead = h.shape[:-3]
        flat = h.reshape(-1, *h.shape[-3:])
        dtype = self.loc.weight.dtype  # fp32 out under bfloat16 autocast, as GaussianHead
        loc = self.loc(flat).reshape(*lead, -1).to(dtype)
        if self.var is None:
            return loc
        return loc, F.softplus(self.var(flat).reshape(*lead, -1).to(dtype)).clamp_min(self.variance_floor)


def bottom_encoder_for(config: ModelConfig) -> nn.Module:
    """The guides' first upward block x → d1 of ``config.bottom``.

    :param config: The architecture.
    """
    if config.bottom == "conv":
        return ConvEncoder(
            config.image_side,
            config.hidden_sizes[0],
            channels=config.conv_channels,
            activation=config.activation,
            batch_norm=config.batch_norm,
            leaky_slope=config.leaky_slope,
        )
    return mlp_for(config, config.input_dim, config.hidden_sizes[0])


def decoder_for(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The model's ``(decoder_mlp, decoder_head)`` from z1 to the parameters of p(x | z1), for
    ``config.bottom`` and ``config.likelihood``.

    :param config: The architecture.
    """
    gaussian = config.likelihood == "gaussian"
    if config.bottom == "conv":
        body = ConvDecoder(
            config.latent_sizes[0],
            config.image_side,
            channels=config.conv_channels,
            activation=config.activation,
            batch_norm=config.batch_norm,
            leaky_slope=config.leaky_slope,
        )
        return body, ConvOutput(config.conv_channels, gaussian=gaussian, variance_floor=config.variance_floor)
    body = mlp_for(config, config.latent_sizes[0], config.hidden_sizes[0])
    if gaussian:
        return body, gaussian_head_for(config, config.hidden_sizes[0], config.input_dim)
    return body, nn.Linear(config.hidden_sizes[0], config.input_dim)
