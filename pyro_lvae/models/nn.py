"""The deterministic building blocks of paper eqs. 10–15.

``d(y) = MLP(y)`` is a two-hidden-layer perceptron; a :class:`GaussianHead` maps
``d`` to a mean ``Linear(d)`` and a variance ``max(Softplus(Linear(d)), floor)``. Each block
accepts inputs with any number of leading (particle, batch) dimensions: they are
flattened before batch normalization and restored afterwards.
"""

from __future__ import annotations

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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        lead = y.shape[:-1]
        flat = y.reshape(-1, y.shape[-1])
        if self.batch_norm and self.training and flat.shape[0] == 1:
            raise ValueError(
                "Batch norm in training mode needs more than one example, got one; call "
                "model.eval(); guide.eval() first to use the running statistics (as for pyro.infer.Importance)."
            )
        out = self.net(flat)
        return out.reshape(*lead, self.out_features)


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
        return self.loc(d), F.softplus(self.var(d)).clamp_min(self.variance_floor)


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
