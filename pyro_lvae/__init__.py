"""pyro-lvae: Ladder Variational Autoencoders (Sønderby et al., NIPS 2016) in Pyro.

The package is laid out by role: ``models`` (the model families and their contract),
``inference`` (warm-up, objectives, L_K, guide fitting), ``training`` (the loop, the step
engines, checkpoints), ``analysis`` (latent studies, plots, reports), ``repro`` (the
paper's numbers, presets, sweeps, the results page), ``pretrained``, and ``config``,
``data`` and ``cli`` at the top. The module paths of the earlier flat layout
(``pyro_lvae.model``, ``pyro_lvae.engine``, …) still import (:mod:`pyro_lvae._aliases`).
"""

from . import _aliases
from .config import ExperimentConfig, ModelConfig, TrainConfig
from .inference.comparison import compare, fit_guide
from .inference.evaluation import evaluate, importance_sampled_bounds, log_importance_weights
from .inference.objectives import elbo_for
from .inference.warmup import kl_weight, warmup_beta
from .models.families import make_guide, make_model
from .models.guides import BottomUpGuide, LadderGuide
from .models.merge import precision_weighted_merge
from .models.model import GenerativeModel
from .pretrained import load_pretrained
from .repro.presets import PRESETS, get_preset

_aliases.install()

__version__ = "0.1.0"

__all__ = [
    "BottomUpGuide",
    "ExperimentConfig",
    "GenerativeModel",
    "LadderGuide",
    "ModelConfig",
    "PRESETS",
    "TrainConfig",
    "compare",
    "elbo_for",
    "evaluate",
    "fit_guide",
    "get_preset",
    "importance_sampled_bounds",
    "kl_weight",
    "load_pretrained",
    "log_importance_weights",
    "make_guide",
    "make_model",
    "precision_weighted_merge",
    "warmup_beta",
]
