"""pyro-lvae: Ladder Variational Autoencoders (Sønderby et al., NIPS 2016) in Pyro.

The package is laid out by role: ``models`` (the model families and their contract),
``inference`` (warm-up, objectives, L_K, guide fitting), ``training`` (the loop, the step
engines, checkpoints), ``analysis`` (latent studies, plots, reports), ``repro`` (the
paper's numbers, presets, sweeps, the results page), ``pretrained``, and ``config``,
``data`` and ``cli`` at the top. The module paths of the earlier flat layout
(``pyro_lvae.model``, ``pyro_lvae.engine``, …) still import (:mod:`pyro_lvae._aliases`).
"""

import importlib
from typing import Any

from . import _aliases

_aliases.install()

__version__ = "0.1.0"

# Each public name and the module that defines it. They load on first use, so that
# `import pyro_lvae` (and the CLI's --help) does not import torch and Pyro.
_PUBLIC = {
    "compare": "inference.comparison",
    "fit_guide": "inference.comparison",
    "ExperimentConfig": "config",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "evaluate": "inference.evaluation",
    "importance_sampled_bounds": "inference.evaluation",
    "log_importance_weights": "inference.evaluation",
    "make_guide": "models.families",
    "make_model": "models.families",
    "BottomUpGuide": "models.guides",
    "LadderGuide": "models.guides",
    "precision_weighted_merge": "models.merge",
    "GenerativeModel": "models.model",
    "elbo_for": "inference.objectives",
    "PRESETS": "repro.presets",
    "get_preset": "repro.presets",
    "load_pretrained": "pretrained",
    "kl_weight": "inference.warmup",
    "LayerEncoding": "models.hierarchy",
    "encode": "models.hierarchy",
    "interpolate": "models.hierarchy",
    "resample": "models.hierarchy",
    "warmup_beta": "inference.warmup",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES or name in _aliases.FLAT_NAMES:  # pyro_lvae.presets, pyro_lvae.models, …
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SUBMODULES = ("analysis", "cli", "config", "data", "inference", "models", "pretrained", "repro", "rng", "training")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = sorted(_PUBLIC)
