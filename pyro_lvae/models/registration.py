"""Registering modules in Pyro's param store under names no other module holds.

``pyro.module(name, module)`` registers each parameter as ``name$$$param``. When the
store already holds a tensor under that name, Pyro keeps the stored one and records
*it* in the trace, while the module computes with its own parameters. ``SVI`` then
optimizes the stored tensors, which nothing uses, and the new module never changes:
training a second model built with the default name in the same Python session
(one notebook kernel) silently does nothing.

:func:`register_modules` prevents this: when a name is held by tensors of another
module, the module is registered under a free name instead (``lvae_2``, ``lvae_3``, …)
and a warning says so. Give each model its own ``name=``, or call
``pyro.clear_param_store()``, to avoid the renaming.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator

import pyro
from pyro.params import param_with_module_name
from torch import nn


def _held_by_others(name: str, parts: dict[str, nn.Module]) -> bool:
    """Whether the store holds, under ``name``, a tensor that is not the module's own."""
    store = pyro.get_param_store()
    for suffix, module in parts.items():
        for param_name, param in module.named_parameters():
            full = param_with_module_name(name + suffix, param_name)
            if full in store and store[full] is not param:
                return True
    return False


def register_modules(name: str, parts: dict[str, nn.Module]) -> str:
    """Register ``parts`` as ``pyro.module(name + suffix, module)`` under a name that is theirs.

    :param name: The preferred prefix, e.g. the model's ``name``.
    :param parts: Modules by name suffix; ``{"": module}`` registers one module as ``name``.
    :returns: The prefix used: ``name``, or ``name_2``, ``name_3``, … when ``name``
        holds another module's tensors. Store it as the module's name.
    """
    chosen = name
    if _held_by_others(name, parts):
        chosen = next(f"{name}_{k}" for k in itertools.count(2) if not _held_by_others(f"{name}_{k}", parts))
        warnings.warn(
            f"Pyro's param store already holds parameters named {name!r} that belong to another module; "
            f"this one is registered as {chosen!r} instead, so that training updates it. Pass name= to "
            "choose a name, or call pyro.clear_param_store() before building a new model.",
            stacklevel=3,
        )
    for suffix, module in parts.items():
        pyro.module(chosen + suffix, module)
    return chosen


@contextlib.contextmanager
def registered_once(*modules: nn.Module) -> Iterator[None]:
    """Switch off the per-call ``pyro.module`` registration of ``modules`` (objects
    of the families, :mod:`pyro_lvae.models.protocol`) and restore each one's setting on exit.

    For code that needs no param store: the fast training engine (which registers once
    and optimizes the parameters directly), evaluation and guide fitting.

    :param modules: Models and guides; objects without ``register_params`` are ignored.
    """
    from .protocol import HierarchicalGuide, HierarchicalModel  # the protocol registers through this module

    saved = [(m, m.register_params) for m in modules if isinstance(m, (HierarchicalModel, HierarchicalGuide))]
    for m, _ in saved:
        m.register_params = False
    try:
        yield
    finally:
        for m, value in saved:
            m.register_params = value
