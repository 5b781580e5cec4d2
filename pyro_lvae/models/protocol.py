"""The contract every model family meets, so that training, evaluation and analysis need
no family-specific code.

A family is a pair of classes:

* a model, subclass of :class:`HierarchicalModel`: a Pyro model ``model(x, beta)`` with
  latent sites ``z{L}``, …, ``z1`` and an observed site ``x`` inside one
  ``pyro.plate("data")``;
* a guide, subclass of :class:`HierarchicalGuide`: the matching Pyro guide.

Both register their parameters in Pyro's param store on every call unless
``register_params`` is ``False``, through one helper
(:func:`~pyro_lvae.models.registration.register_modules`), which their ``register`` calls.
What differs between families is declared here as class attributes and methods:
whether the latents are Gaussian (so that KL per unit, active units and PSIS apply),
which ELBO is unbiased for the guide, and the extra test metrics the family reports.

The module also holds the two helpers every family uses on its inputs and modes,
:func:`check_examples` and :func:`eval_mode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pyro import poutine
from torch import nn

from ..config import ModelConfig, is_count
from .registration import registered_once


def _require_tensor(x: Any, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"{what} must be a torch.Tensor, got {type(x).__name__}; convert it with "
            "torch.as_tensor(x, dtype=torch.float32)."
        )


def check_examples(data: torch.Tensor) -> None:
    """Raise :class:`ValueError` unless ``data`` is a non-empty ``(N, input_dim)`` batch of examples.

    :param data: The tensor to check.
    """
    _require_tensor(data, "data")
    if data.dim() != 2 or data.shape[0] == 0:
        raise ValueError(
            f"data must have shape (N, input_dim) with N > 0, got {tuple(data.shape)}; "
            "flatten each image to one row (x.reshape(len(x), -1))."
        )


def check_input_width(x: torch.Tensor, input_dim: int, *, dtype: torch.dtype | None = None) -> None:
    """Raise :class:`ValueError` unless ``x`` is a tensor whose last dimension is the model's
    ``input_dim`` (every bottom, MLP or convolutional, reads each example as one flattened row)
    and, given ``dtype``, of the parameters' dtype.

    :param x: The data given to a model or guide.
    :param input_dim: The configured width.
    :param dtype: The parameters' dtype (``None``: not checked).
    """
    _require_tensor(x, "x")
    if x.dim() < 2 or x.shape[-2] == 0:
        raise ValueError(
            f"x must have shape (N, input_dim) with N > 0, got {tuple(x.shape)}; for one example use x[None]."
        )
    if dtype is not None and x.dtype != dtype:
        raise ValueError(
            f"x is {x.dtype} but the model's parameters are {dtype}; convert the data with x.to({dtype}) "
            "(or the model and guide with .to(x.dtype))."
        )
    if x.shape[-1] != input_dim:
        raise ValueError(
            f"x has shape {tuple(x.shape)}, but the model expects input_dim={input_dim} features per example "
            "in its last dimension; flatten each image to one row of that length (x.reshape(len(x), -1))."
        )


def require_model_config(config: Any, who: str) -> None:
    """Raise :class:`ValueError` unless ``config`` is a :class:`~pyro_lvae.config.ModelConfig`.

    :param config: What was passed.
    :param who: The class or function that needs it, named in the message.
    """
    if not isinstance(config, ModelConfig):
        hint = "pass config.model" if hasattr(config, "model") else "build one with ModelConfig(...)"
        raise ValueError(f"{who} needs a ModelConfig, got {type(config).__name__}; {hint}.")


def parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first parameter (``None`` without parameters).

    :param module: A model or guide.
    """
    first = next(module.parameters(), None)
    return None if first is None else first.dtype


@contextlib.contextmanager
def eval_mode(*modules: object) -> Iterator[None]:
    """Put every :class:`torch.nn.Module` among ``modules`` in evaluation mode (batch norm
    uses its running statistics) and restore each one's mode on exit. Other callables,
    such as a guide written as a plain function, are left alone.

    :param modules: Models, guides or any other objects.
    """
    nets = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in nets]
    for m in nets:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(nets, modes):
            m.train(mode)


class HierarchicalModel(nn.Module):
    """The model side of a family.

    Subclasses set :attr:`config` and :attr:`name` and implement ``forward(x, beta)`` and
    :meth:`register`.
    """

    #: The architecture.
    config: ModelConfig
    #: Prefix of the parameters in Pyro's param store.
    name: str
    #: Whether each call registers the parameters with ``pyro.module`` (``SVI`` needs it;
    #: the fast engine and evaluation switch it off, see ``registered_once``).
    register_params: bool = True
    #: Whether the latent layers are Gaussian, so that KL per unit, active units and
    #: PSIS diagnostics apply.
    gaussian_latents: ClassVar[bool] = True

    def register(self) -> None:
        """Register the parameters in Pyro's param store (once, or on every call)."""
        raise NotImplementedError

    def shared_priors(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the guide may reuse the model's prior of the same draw
        (the ladder guide does, see :meth:`~pyro_lvae.models.model.GenerativeModel.shared_priors`);
        by default nothing is shared."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def sample(
        self, num_samples: int, *, mean: bool = True, temperature: float | tuple[float, ...] = 1.0
    ) -> torch.Tensor:
        r"""Ancestral samples from the prior, :math:`z_L \to \cdots \to z_1 \to x`.

        Batch norm runs in evaluation mode (the running statistics, which sampling leaves
        as they were), whatever the model's mode.

        :param num_samples: How many samples.
        :param mean: Return the mean of :math:`p(x|z_1)` (grey levels, as in the
            paper's Fig. 9) rather than a sample of x.
        :param temperature: Multiply every prior layer's standard deviation by τ ≥ 0
            (0: the means, deterministic); a tuple gives one τ per layer, z1 first
            (:class:`~pyro_lvae.models.hierarchy.Temperature`). Gaussian latents only.
        :returns: Tensor of shape ``(num_samples, input_dim)``.
        """
        from .hierarchy import decode_with  # it builds on this module

        if not is_count(num_samples):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        with eval_mode(self):
            return decode_with(self, {}, num_samples, temperature, mean)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, guide: nn.Module) -> torch.Tensor:
        """Reconstruct ``x``: z ~ q(z|x) from ``guide``, then the mean of p(x|z1), with batch
        norm in evaluation mode (the running statistics stay as they were).

        :param x: Data of shape ``(batch, input_dim)``.
        :param guide: A guide for this model.
        :returns: Tensor of the same shape as ``x``.
        """
        check_examples(x)
        with registered_once(self, guide), eval_mode(self, guide):  # nothing is added to the param store
            guide_trace = poutine.trace(guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(self, trace=guide_trace)).get_trace(x)
        return model_trace.nodes["x"]["fn"].mean

    def test_metrics(self, guide: nn.Module, data: torch.Tensor) -> dict[str, Any]:
        """The family's entries of ``results.json`` besides the bounds.

        For Gaussian latents: ``test_kl_per_unit`` (one list per layer) and
        ``test_active_units`` (count per layer), the paper's Figs. 4-5.

        :param guide: The trained guide.
        :param data: Test examples on the model's device.
        """
        # The §3.2 studies live with the analysis code, which builds on the models.
        from ..analysis.latents import active_units, kl_per_unit

        return {
            "test_kl_per_unit": [k.tolist() for k in kl_per_unit(self, guide, data)],
            "test_active_units": [int(c) for c in active_units(self, guide, data)["counts"]],
        }


def require_model(model: Any, who: str) -> None:
    """Raise :class:`ValueError` unless ``model`` is a generative model (a guide is built on one).

    :param model: What was passed.
    :param who: The guide class or function, named in the message.
    """
    if not isinstance(model, HierarchicalModel):
        raise ValueError(
            f"{who} is built on the generative model, got {type(model).__name__}; build the model first "
            f"(model = make_model(config.model)) and pass it: {who}(model)."
        )


class HierarchicalGuide(nn.Module):
    """The guide side of a family. Subclasses set :attr:`name` and implement
    ``forward(x, beta)`` and :meth:`register`."""

    #: Prefix of the parameters in Pyro's param store.
    name: str
    #: As :attr:`HierarchicalModel.register_params`.
    register_params: bool = True
    #: Whether the guide's layers factorize like the model's, so that
    #: ``TraceMeanField_ELBO`` (analytic KL per layer) is unbiased for it; otherwise
    #: ``Trace_ELBO`` is used (:func:`~pyro_lvae.inference.objectives.elbo_for`).
    mean_field_compatible: ClassVar[bool] = False

    def register(self) -> None:
        """Register the parameters in Pyro's param store (once, or on every call)."""
        raise NotImplementedError


def check_pair(model: Any, guide: Any) -> None:
    """Raise :class:`ValueError` unless ``model`` is a generative model and ``guide``, if it is one
    of this package's guides, was built for it (a notebook cell re-run rebuilds one but not the
    other; the pair would then give numbers of neither).

    :param model: The generative model.
    :param guide: Its guide (a plain-function guide is not checked).
    """
    if not isinstance(model, HierarchicalModel):
        raise ValueError(
            f"model must be the generative model, got {type(model).__name__}; pass the model first, then its guide."
        )
    if isinstance(guide, HierarchicalGuide) and (
        guide.config != model.config or getattr(guide, "model", model) is not model
    ):
        raise ValueError(
            "guide was built for another model (re-created, or of another configuration); build it for this "
            "one with make_guide(model)."
        )
