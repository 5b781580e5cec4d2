"""pyro-lvae: Ladder Variational Autoencoders (Sønderby et al., NIPS 2016) in Pyro."""

from .comparison import compare, fit_guide
from .config import ExperimentConfig, ModelConfig, TrainConfig
from .evaluation import evaluate, importance_sampled_bounds, log_importance_weights
from .families import make_guide, make_model
from .guides import BottomUpGuide, LadderGuide
from .merge import precision_weighted_merge
from .model import GenerativeModel
from .objectives import elbo_for
from .presets import PRESETS, get_preset
from .pretrained import load_pretrained
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
