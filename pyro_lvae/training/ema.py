r"""An exponential moving average of the weights, for evaluation (``--ema DECAY``).

After every update that was taken, each parameter and floating-point buffer θ of the
model and the guide moves its average θ̄ towards it::

    θ̄ ← d_t θ̄ + (1 − d_t) θ,    d_t = min(decay, (1 + t) / (10 + t))

where t counts the updates so far. The ramp ``(1 + t)/(10 + t)`` (as in TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``) keeps the random initial weights
from lingering: with a constant d = 0.999, 10 epochs of 235 steps would still give them
weight 0.999^2350 ≈ 0.1. Integer buffers (batch norm's ``num_batches_tracked``) are
copied. The batch-norm running statistics are averaged like the parameters.

The average is held apart from the live weights. :meth:`ExponentialMovingAverage.applied`
swaps it in for evaluation and back; :meth:`~ExponentialMovingAverage.state_dict` gives
the model and guide state dicts of the averaged weights, which a checkpoint stores and
:func:`~pyro_lvae.training.run_dir.load_run` loads into a fresh model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import check_ema_decay
from .distributed import DistributedContext, broadcast_from_main


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay d_t used for update number ``updates`` (0-based): ``min(decay, (1 + t)/(10 + t))``.

    :param decay: The configured decay.
    :param updates: Updates averaged before this one.
    """
    return min(decay, (1 + updates) / (10 + updates))


class ExponentialMovingAverage:
    """The moving average of the parameters and buffers of ``model`` and ``guide``.

    :param model: The generative model.
    :param guide: Its guide (tensors it shares with the model are averaged once).
    :param decay: The decay, in (0, 1).

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> ema = ExponentialMovingAverage(lin, torch.nn.Module(), decay=0.9)
    >>> ema.update(); ema.updates
    1
    """

    def __init__(self, model: nn.Module, guide: nn.Module, *, decay: float) -> None:
        check_ema_decay(decay)
        if decay == 0:
            raise ValueError("ExponentialMovingAverage needs a decay in (0, 1); 0 means no average.")
        self.decay = float(decay)
        self.updates = 0
        self._owners = {"model": model, "guide": guide}
        live: dict[int, torch.Tensor] = {}
        for owner in self._owners.values():
            for tensor in owner.state_dict(keep_vars=True).values():
                live.setdefault(id(tensor), tensor)
        self._live = list(live.values())
        self._average = [t.detach().clone() for t in self._live]
        self._slot = {key: i for i, key in enumerate(live)}

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (call after every update taken)."""
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        floats = [(a, t) for a, t in zip(self._average, self._live) if a.is_floating_point()]
        if floats:
            averages, currents = zip(*floats)
            # torch's private multi-tensor lerp: one kernel for all ~120 tensors instead of one
            # each (torch.optim and torch.optim.swa_utils use the same _foreach family).
            torch._foreach_lerp_(list(averages), [t.detach() for t in currents], weight)
        for a, t in zip(self._average, self._live):
            if not a.is_floating_point():
                a.copy_(t)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Use the averaged weights inside the block, the live ones again after it."""
        saved = [t.detach().clone() for t in self._live]
        with torch.no_grad():
            for t, a in zip(self._live, self._average):
                t.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(self._live, saved):
                    t.copy_(s)

    def broadcast_from_main(self, ctx: DistributedContext) -> None:
        """Give every process rank 0's average (in a data-parallel run).

        The parameters agree across processes, but each process updates its batch-norm
        statistics from its own share of the batch until DDP broadcasts rank 0's again, so the
        averages of those statistics drift apart. Rank 0's is the one checkpointed; calling this
        before every use of the average makes all processes use that one.

        :param ctx: The distributed context.
        """
        broadcast_from_main(self._average, ctx)

    @torch.no_grad()
    def copy_to_live(self) -> None:
        """Overwrite the live weights with the average (for good: the end of training)."""
        for t, a in zip(self._live, self._average):
            t.copy_(a)

    def state_dict(self) -> dict[str, Any]:
        """The decay, the update count and the averaged ``model`` and ``guide`` state dicts."""
        state: dict[str, Any] = {"decay": self.decay, "updates": self.updates}
        for name, owner in self._owners.items():
            state[name] = {
                key: self._average[self._slot[id(t)]].clone() for key, t in owner.state_dict(keep_vars=True).items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        :param state: A dict from :meth:`state_dict` of an average of the same model and guide.
        :raises ValueError: if its tensors do not match the model's.
        """
        for name, owner in self._owners.items():
            live = owner.state_dict(keep_vars=True)
            if live.keys() != state[name].keys():
                raise ValueError(f"The stored moving average does not match the {name}'s tensors; it is corrupt.")
            for key, t in live.items():
                self._average[self._slot[id(t)]].copy_(state[name][key])
        self.updates = int(state["updates"])
