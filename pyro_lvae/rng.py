"""The state of every random number generator a run draws from, saved and restored in one way.

Pyro's ``pyro.util.get_rng_state`` covers Python's ``random``, NumPy and torch's CPU
generator; :func:`rng_state` adds every CUDA device's. Checkpoints store it
(exact resume), the trainer's periodic evaluation runs inside :func:`preserved_rng` (so
that the training trajectory does not depend on when evaluations happen), and the
importance-sampling evaluation rewinds it to redraw a chunk that ran out of memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyro
import torch


def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (when present) every CUDA generator."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state from :func:`rng_state`.

    :param state: The saved state; a ``cuda`` entry is restored only where CUDA is available.
    """
    state = dict(state)
    cuda = state.pop("cuda", None)
    pyro.util.set_rng_state(state)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_rng(seed: int | None = None) -> Iterator[None]:
    """Run the block and put every generator back as it was, whatever the block drew.

    :param seed: Seed torch's generators with this inside the block (``None`` leaves
        them as they are).
    """
    saved = rng_state()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        yield
    finally:
        set_rng_state(saved)
