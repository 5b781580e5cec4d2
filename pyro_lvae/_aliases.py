"""The module paths of the flat layout (``pyro_lvae.model``, ``pyro_lvae.engine``, …),
kept as aliases of the modules' places in the subpackages.

Code written before the subpackages existed (notebooks, scripts, pickles) imports
``from pyro_lvae.model import GenerativeModel``; :class:`AliasFinder` answers such an
import with the module itself (``pyro_lvae.models.model``), not a copy, so that classes,
functions and ``monkeypatch`` targets are the same objects under both names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: Old flat name → the module's place, both below ``pyro_lvae``.
FLAT_NAMES = {
    "nn": "models.nn",
    "model": "models.model",
    "merge": "models.merge",
    "guides": "models.guides",
    "vlae": "models.vlae",
    "vqvae": "models.vqvae",
    "families": "models.families",
    "registration": "models.registration",
    "warmup": "inference.warmup",
    "objectives": "inference.objectives",
    "evaluation": "inference.evaluation",
    "comparison": "inference.comparison",
    "engine": "training.steps",
    "checkpoint": "training.checkpoint",
    "distributed": "training.distributed",
    "run_files": "training.run_files",
    "plots": "analysis.plots",
    "report": "analysis.report",
    "paper": "repro.paper",
    "presets": "repro.presets",
    "sweep": "repro.sweep",
    "results_page": "repro.results_page",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.own = (module.__spec__, module.__loader__)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the module; give it back its own,
        # so that its __spec__ keeps naming the real place (its __name__ was kept).
        module.__spec__, module.__loader__ = self.own


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``pyro_lvae.<flat name>`` as the module of :data:`FLAT_NAMES`."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        """The spec of an old flat name, or ``None`` for every other module.

        :param fullname: The dotted name being imported.
        :param path: The parent package's ``__path__`` (unused).
        :param target: A module being reloaded (unused).
        """
        package, _, name = fullname.partition(".")
        if package != "pyro_lvae" or name not in FLAT_NAMES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"pyro_lvae.{FLAT_NAMES[name]}"))


def install() -> None:
    """Put :class:`AliasFinder` on ``sys.meta_path`` once."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
