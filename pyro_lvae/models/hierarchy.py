r"""The latent hierarchy as an API: each layer's posterior, prior samples at a temperature,
resampling the lower layers with the upper ones fixed, and interpolation in :math:`z_L`.

* :func:`encode` runs a guide on ``x`` and returns one :class:`LayerEncoding` per layer,
  bottom (:math:`z_1`) first: the Gaussian :math:`q(z_i|\cdot)` the guide sampled from and
  its sample. With the :class:`~pyro_lvae.models.guides.LadderGuide` each entry also holds
  the two terms of the precision-weighted merge (eqs. 17–19): the bottom-up estimate
  :math:`(\hat\mu_{q,i}, \hat\sigma_{q,i})` of the upward pass and the top-down prior
  :math:`(\mu_{p,i}, \sigma_{p,i})` evaluated on the guide's sample of :math:`z_{i+1}`
  (none at the top layer, where :math:`q(z_L|x)` is the estimate itself);
* :meth:`HierarchicalModel.sample(n, temperature=τ)
  <pyro_lvae.models.protocol.HierarchicalModel.sample>` draws ancestrally from the prior
  with every layer's standard deviation multiplied by τ (:class:`Temperature`): τ = 1 is
  the model, τ = 0 follows the means, :math:`z_i = \mu_{p,i}(z_{i+1})`;
* :func:`resample` keeps the posterior draws of layers ≥ ``keep_from`` and redraws the
  layers below from the prior, the paper's figure of samples with the upper layers fixed;
* :func:`interpolate` decodes a straight line between two examples' posterior means of
  :math:`z_L`, the layers below at a temperature (by default their means).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn

from ..config import is_count
from .protocol import HierarchicalModel, check_examples, check_input_width, check_pair, eval_mode, parameter_dtype
from .registration import registered_once


@dataclass(frozen=True)
class LayerEncoding:
    """The posterior of one layer for a batch, tensors of shape ``(batch, latent_size)``.

    :param layer: The 1-based layer.
    :param loc: Mean of :math:`q(z_i|\\cdot)`.
    :param scale: Standard deviation of :math:`q(z_i|\\cdot)`.
    :param sample: The guide's draw of :math:`z_i`.
    :param prior_loc: Ladder guide, below the top: :math:`\\mu_{p,i}(z_{i+1})` that was merged in.
    :param prior_scale: Its standard deviation :math:`\\sigma_{p,i}`.
    :param estimate_loc: Ladder guide: the bottom-up estimate :math:`\\hat\\mu_{q,i}`.
    :param estimate_scale: Its standard deviation :math:`\\hat\\sigma_{q,i}`.
    """

    layer: int
    loc: torch.Tensor
    scale: torch.Tensor
    sample: torch.Tensor
    prior_loc: torch.Tensor | None = None
    prior_scale: torch.Tensor | None = None
    estimate_loc: torch.Tensor | None = None
    estimate_scale: torch.Tensor | None = None


def layer_temperatures(depth: int, temperature: float | tuple[float, ...]) -> tuple[float, ...]:
    """One temperature per layer, bottom first, from one number or a tuple of ``depth``.

    :param depth: The number of latent layers.
    :param temperature: τ ≥ 0 for every layer, or one per layer (z1 first).
    :raises ValueError: for a wrong length, or a τ that is negative or not finite.
    """
    temps = tuple(temperature) if isinstance(temperature, (tuple, list)) else (temperature,) * depth
    if len(temps) != depth:
        raise ValueError(f"temperature has {len(temps)} entries but the model has {depth} layers; give one per layer.")
    for t in temps:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number ≥ 0 (1 = the model, 0 = the means), got {t!r}.")
    return tuple(float(t) for t in temps)


class Temperature(Messenger):
    """Multiply the standard deviation of the latent sites ``z{i}`` by their temperature.

    A site at τ = 1 is left untouched (the same draws as the model), one at τ = 0 becomes a
    point mass at its mean.

    :param temperatures: τ per layer, bottom first (:func:`layer_temperatures`).
    """

    def __init__(self, temperatures: tuple[float, ...]) -> None:
        super().__init__()
        self.by_site = {f"z{i + 1}": t for i, t in enumerate(temperatures)}

    def _pyro_sample(self, msg: dict) -> None:
        t = self.by_site.get(msg["name"], 1.0)
        if t == 1.0 or msg["is_observed"]:
            return
        normal = getattr(msg["fn"], "base_dist", msg["fn"])
        if not isinstance(normal, dist.Normal):
            raise ValueError(f"temperature applies to Gaussian latents; site {msg['name']} is {type(normal).__name__}.")
        msg["fn"] = (
            dist.Delta(normal.loc, event_dim=1) if t == 0 else dist.Normal(normal.loc, normal.scale * t).to_event(1)
        )


def _check_input(model: HierarchicalModel, guide: nn.Module, x: torch.Tensor) -> None:
    check_pair(model, guide)
    check_examples(x)
    check_input_width(x, model.config.input_dim, dtype=parameter_dtype(model))
    if not model.gaussian_latents:
        raise ValueError(f"{type(model).__name__} has no Gaussian latent layers to encode.")


@torch.no_grad()
def encode(model: HierarchicalModel, guide: nn.Module, x: torch.Tensor, *, eval: bool = True) -> list[LayerEncoding]:
    """Each layer's posterior for ``x``, bottom (z1) first (see the module docstring).

    :param model: The generative model.
    :param guide: Its guide (ladder, bottom-up or VLAE).
    :param x: Examples, shape ``(batch, input_dim)``.
    :param eval: Run in evaluation mode (batch norm with its running statistics), restoring
        the modules' modes afterwards; ``False`` keeps the current modes.
    """
    from .guides import LadderGuide

    _check_input(model, guide, x)
    merged: dict[int, tuple] = {}
    kwargs = {"record": merged} if isinstance(guide, LadderGuide) else {}
    modes = eval_mode(model, guide) if eval else contextlib.nullcontext()
    with modes, registered_once(model, guide), model.shared_priors():
        trace = poutine.trace(guide).get_trace(x, None, **kwargs)
    layers = []
    for layer in range(1, model.config.depth + 1):
        site = trace.nodes[f"z{layer}"]
        normal = site["fn"].base_dist
        extra = {}
        if layer in merged:
            (est_loc, est_var), prior = merged[layer]
            extra = {"estimate_loc": est_loc, "estimate_scale": est_var.sqrt()}
            if prior is not None:
                extra |= {"prior_loc": prior[0], "prior_scale": prior[1].sqrt()}
        layers.append(LayerEncoding(layer, normal.loc, normal.scale, site["value"], **extra))
    return layers


def decode_with(
    model: HierarchicalModel, fixed: dict[str, torch.Tensor], n: int, temperature: float | tuple, mean: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the model's prior for ``n`` examples with the sites in ``fixed`` set and the others
    drawn at ``temperature``; return x (its mean, or a sample) and the layers' values, z1 first.
    :meth:`HierarchicalModel.sample <pyro_lvae.models.protocol.HierarchicalModel.sample>` is
    this with nothing fixed.

    :param model: The generative model.
    :param fixed: Values of ``z{i}`` sites to keep, each with ``n`` rows.
    :param n: Examples to draw.
    :param temperature: τ per layer, or one for all (:func:`layer_temperatures`).
    :param mean: Return the mean of :math:`p(x|z_1)` rather than a sample of x.
    """
    temps = layer_temperatures(model.config.depth, temperature)
    param = next(model.parameters())
    dummy = torch.zeros(n, model.config.input_dim, device=param.device, dtype=param.dtype)
    fn = poutine.condition(Temperature(temps)(poutine.uncondition(model)), data=fixed)
    with registered_once(model):  # decoding reads the module's tensors and adds nothing to the param store
        trace = poutine.trace(fn).get_trace(dummy)
    x = trace.nodes["x"]["fn"].mean if mean else trace.nodes["x"]["value"]
    return x, [trace.nodes[f"z{i}"]["value"] for i in range(1, model.config.depth + 1)]


@torch.no_grad()
def resample(
    model: HierarchicalModel,
    guide: nn.Module,
    x: torch.Tensor,
    *,
    keep_from: int,
    temperature: float | tuple[float, ...] = 1.0,
    num_samples: int | None = None,
    mean: bool = True,
    return_latents: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Keep one posterior draw of layers ``keep_from`` … L for each example of ``x`` and redraw
    the layers below from the prior :math:`p(z_i|z_{i+1})` at ``temperature``; decode. In
    evaluation mode.

    :param model: The generative model.
    :param guide: Its guide.
    :param x: Examples, shape ``(batch, input_dim)``.
    :param keep_from: The lowest kept layer, 1 … L (1 keeps every layer: a reconstruction).
    :param temperature: τ of the redrawn layers, one number or one per layer (z1 first).
    :param num_samples: Redraw this many times below the same kept draws; the results then
        have a leading sample dimension. ``None``: once, no sample dimension.
    :param mean: Return the mean of :math:`p(x|z_1)` rather than a sample of x.
    :param return_latents: Also return every layer's values, z1 first.
    :returns: Shape ``(batch, input_dim)``, or ``(num_samples, batch, input_dim)``; with
        ``return_latents``, ``(x, [z1, …, zL])`` with the same leading dimensions.
    """
    depth = model.config.depth
    if not is_count(keep_from) or keep_from > depth:
        raise ValueError(f"keep_from must be a layer in 1…{depth}, got {keep_from!r}.")
    if num_samples is not None and (not is_count(num_samples)):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}.")
    layer_temperatures(depth, temperature)  # checked before any work
    layers = encode(model, guide, x)
    copies = num_samples or 1
    kept = {f"z{e.layer}": e.sample.repeat(copies, 1) for e in layers if e.layer >= keep_from}
    with eval_mode(model):
        images, zs = decode_with(model, kept, copies * x.shape[0], temperature, mean)
    if num_samples is not None:
        images, zs = images.reshape(copies, x.shape[0], -1), [z.reshape(copies, x.shape[0], -1) for z in zs]
    return (images, zs) if return_latents else images


@torch.no_grad()
def interpolate(
    model: HierarchicalModel,
    guide: nn.Module,
    x_from: torch.Tensor,
    x_to: torch.Tensor,
    *,
    steps: int = 8,
    temperature: float | tuple[float, ...] = 0.0,
) -> torch.Tensor:
    """Decode ``steps`` points on the line between the guide's means of :math:`z_L` for two
    examples, the layers below drawn at ``temperature`` (0: their means). In evaluation mode.
    With the bottom-up guide, whose :math:`z_L` depends on :math:`z_{L-1}`, every guide layer
    is taken at its mean.

    :param model: The generative model.
    :param guide: Its guide.
    :param x_from: One example, shape ``(input_dim,)`` or ``(1, input_dim)``.
    :param x_to: The other.
    :param steps: Points on the line, ends included (≥ 2).
    :param temperature: τ of the layers below z_L, one number or one per layer (z1 first).
    :returns: Means of :math:`p(x|z_1)`, shape ``(steps, input_dim)``.
    """
    if not is_count(steps, least=2):
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}.")
    depth = model.config.depth
    layer_temperatures(depth, temperature)  # checked before any work
    ends = torch.cat([x_from.reshape(1, -1), x_to.reshape(1, -1)])
    _check_input(model, guide, ends)
    # The guide at temperature 0: every layer at its mean, so that z_L's mean does not depend
    # on a draw below it (the bottom-up guide reads z_{L-1}; the ladder's z_L reads x only).
    with eval_mode(model, guide), registered_once(model, guide):
        trace = poutine.trace(Temperature((0.0,) * depth)(guide)).get_trace(ends, None)
    top = trace.nodes[f"z{depth}"]["value"]
    t = torch.linspace(0, 1, steps, device=top.device, dtype=top.dtype)[:, None]
    line = (1 - t) * top[0] + t * top[1]
    with eval_mode(model):
        return decode_with(model, {f"z{depth}": line}, steps, temperature, mean=True)[0]
