"""pyro-lvae: Ladder Variational Autoencoders (Sønderby et al., NIPS 2016) in Pyro."""

from .config import ExperimentConfig, ModelConfig, TrainConfig
from .evaluation import evaluate, importance_sampled_bounds, log_importance_weights
from .families import make_guide, make_model
from .guides import BottomUpGuide, LadderGuide
from .merge import precision_weighted_merge
from .model import GenerativeModel
from .objectives import elbo_for
from .presets import PRESETS, get_preset
from .warmup import kl_weight, warmup_beta

__version__ = "0.1.0"

__all__ = [
    "BottomUpGuide",
    "ExperimentConfig",
    "GenerativeModel",
    "LadderGuide",
    "ModelConfig",
    "PRESETS",
    "TrainConfig",
    "elbo_for",
    "evaluate",
    "get_preset",
    "importance_sampled_bounds",
    "kl_weight",
    "log_importance_weights",
    "make_guide",
    "make_model",
    "precision_weighted_merge",
    "warmup_beta",
]
