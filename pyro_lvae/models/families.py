"""Building the model and guide that a :class:`~pyro_lvae.config.ModelConfig` names.

``config.family`` picks the model family and, for the LVAE family,
``config.guide`` picks the guide:

* ``lvae``: :class:`~pyro_lvae.models.model.GenerativeModel`, with the guide
  :class:`~pyro_lvae.models.guides.LadderGuide` (``guide="ladder"``) or
  :class:`~pyro_lvae.models.guides.BottomUpGuide` (``guide="vae"``);
* ``vlae``: :class:`~pyro_lvae.models.vlae.VLAEModel` and :class:`~pyro_lvae.models.vlae.VLAEGuide`;
* ``vqvae``: :class:`~pyro_lvae.models.vqvae.VQVAEModel` and :class:`~pyro_lvae.models.vqvae.VQVAEGuide`.

All of them name their sites ``z{L}``, …, ``z1`` and ``x`` inside one
``pyro.plate("data")``, so training, the ELBO and L_K work on each unchanged.

>>> from pyro_lvae.repro.presets import get_preset
>>> model = make_model(get_preset("vlae-3").model)
>>> type(model).__name__, type(make_guide(model)).__name__
('VLAEModel', 'VLAEGuide')
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .guides import BottomUpGuide, LadderGuide
from .model import GenerativeModel
from .protocol import require_model, require_model_config
from .vlae import VLAEGuide, VLAEModel
from .vqvae import VQVAEGuide, VQVAEModel


def make_model(config: ModelConfig, *, name: str | None = None) -> nn.Module:
    """The generative model of ``config.family``.

    :param config: The architecture; ``config.family`` selects the class.
    :param name: Param-store prefix (default: the family's name).
    """
    require_model_config(config, "make_model")
    if config.family == "vlae":
        return VLAEModel(config, name=name or "vlae")
    if config.family == "vqvae":
        return VQVAEModel(config, name=name or "vqvae")
    return GenerativeModel(config, name=name or "lvae")


def make_guide(model: nn.Module) -> nn.Module:
    """The guide for ``model`` named by its configuration.

    :param model: A model built by :func:`make_model` (or one of the model classes).
    """
    require_model(model, "make_guide")
    if isinstance(model, VLAEModel):
        return VLAEGuide(model)
    if isinstance(model, VQVAEModel):
        return VQVAEGuide(model)
    if model.config.guide == "ladder":
        return LadderGuide(model)
    return BottomUpGuide(model)
