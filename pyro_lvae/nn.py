"""The deterministic building blocks of paper eqs. 10–15.

``d(y) = MLP(y)`` is a two-hidden-layer perceptron; a :class:`GaussianHead` maps
``d`` to a mean ``Linear(d)`` and a variance ``Softplus(Linear(d))``. Each block
accepts inputs with any number of leading (particle, batch) dimensions: they are
flattened before batch normalization and restored afterwards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def make_activation(name: str) -> nn.Module:
    """The nonlinearity called ``name`` in :class:`~pyro_lvae.config.ModelConfig`.

    :param name: ``"leaky_relu"`` (max(x, 0.1 x), paper §3), ``"tanh"`` or ``"identity"``.
    """
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
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
    """

    def __init__(self, in_features: int, hidden: int, *, activation: str, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(2):
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(make_activation(activation))
            width = hidden
        self.net = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        lead = y.shape[:-1]
        out = self.net(y.reshape(-1, y.shape[-1]))
        return out.reshape(*lead, self.out_features)


class GaussianHead(nn.Module):
    """Mean and variance heads of eqs. 11–12 (and 14–15).

    :param in_features: Width of the shared deterministic input ``d``.
    :param out_features: Number of Gaussian units.
    :returns: ``(loc, variance)``, with ``variance = softplus(Linear(d))``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.loc = nn.Linear(in_features, out_features)
        self.var = nn.Linear(in_features, out_features)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(d), F.softplus(self.var(d))
