r"""Comparing inference networks on one generative model.

The gap between :math:`\log p(x)` and the ELBO of a guide is the *inference gap*: the
part of it due to the guide's family, plus the *amortization gap* of predicting each
posterior with one network (Cremer et al., 2018). To measure it for the bottom-up VAE
guide and the ladder guide, hold one trained model fixed and fit each guide to it:

.. code-block:: python

    model, _ = load_pretrained("lvae-bn-wu-5")
    ladder, bottom_up = LadderGuide(model), BottomUpGuide(model)
    fit_guide(model, ladder, x_train, epochs=50)
    fit_guide(model, bottom_up, x_train, epochs=50)
    table = compare(model, {"ladder": ladder, "bottom-up": bottom_up}, x_test, num_samples=1000)

Both guides then bound the same :math:`\log p(x)`, so their per-example ELBOs and
L_K can be compared *paired*, example by example: :func:`compare` reports the mean
difference with its standard error over the test examples, which is much smaller than
the spread of either bound across examples.

:func:`fit_guide` trains only the guide's own parameters. The ladder guide computes its
top-down term with the *model's* networks (paper §2.2), so those stay fixed too: fitting
a ladder guide to a fixed model fits its upward pass (the bottom-up estimates
:math:`\hat\mu_{q,i}, \hat\sigma^2_{q,i}`) only. The model is kept in evaluation mode,
so its batch-norm statistics do not change either.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyro
import torch
from torch import nn

from ..config import is_count
from ..data import binarize
from ..models.protocol import HierarchicalModel
from ..models.registration import registered_once
from .evaluation import check_examples, evaluate
from .objectives import elbo_for

logger = logging.getLogger(__name__)


def own_parameters(model: nn.Module, guide: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``guide`` that are not the model's (the ladder guide holds the model).

    :param model: The generative model.
    :param guide: A guide for it.
    """
    shared = {id(p) for p in model.parameters()}
    return [p for p in guide.parameters() if id(p) not in shared]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model in evaluation mode with gradients off, restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def fit_guide(
    model: nn.Module,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    dynamic_binarization: bool = False,
    seed: int = 0,
) -> list[float]:
    """Train ``guide`` on the ELBO of a fixed ``model`` (β = 1); the model does not change.

    :param model: A trained generative model; its parameters and batch-norm statistics stay as they are.
    :param guide: A guide for it, e.g. a new :class:`~pyro_lvae.models.guides.BottomUpGuide` or
        :class:`~pyro_lvae.models.guides.LadderGuide` of ``model``.
    :param data: Training examples, shape ``(N, input_dim)``: binary, or grey levels in
        [0, 1] with ``dynamic_binarization``.
    :param epochs: Passes over ``data``.
    :param batch_size: Minibatch size.
    :param learning_rate: Adam's learning rate.
    :param dynamic_binarization: Redraw x ~ Bernoulli(grey level) every epoch (paper §3).
    :param seed: Seed of the shuffling, the binarization and the guide's draws.
    :returns: The mean negative ELBO of each epoch, in nats per example. The guide is
        left in evaluation mode, the model in the mode it was in.
    """
    check_examples(data)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not is_count(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
    if isinstance(model, HierarchicalModel) and not model.gaussian_latents:
        raise ValueError("fit_guide fits Gaussian guides; a VQ-VAE guide's EMA codebook would change the model.")
    params = own_parameters(model, guide)
    if not params:
        raise ValueError("The guide has no parameters of its own to fit; pass a guide, not the model.")
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    elbo = elbo_for(guide)
    generator = torch.Generator(device=data.device).manual_seed(seed)
    pyro.set_rng_seed(seed)
    losses = []
    # The parameters are optimized directly, so nothing needs Pyro's param store: several
    # guides of one model can be fitted in one session without registering under one name.
    with _frozen(model), registered_once(model, guide):
        guide.train()
        model.eval()  # the guide may hold the model (the ladder guide does): train() reached it
        for _ in range(epochs):
            x = binarize(data, generator=generator) if dynamic_binarization else data
            batches = list(torch.randperm(len(x), generator=generator, device=data.device).split(batch_size))
            if len(batches) > 1 and len(batches[-1]) < 2:  # batch norm cannot normalize one example
                batches = batches[:-1]
            total, seen = 0.0, 0
            for idx in batches:
                # One ELBO step on the guide's own parameters.
                loss = elbo.differentiable_loss(model, guide, x[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                seen += len(idx)
            losses.append(total / seen)
            logger.debug("fit_guide epoch %d: -ELBO %.3f", len(losses), losses[-1])
        guide.eval()  # ready for compare and Importance; the model's own mode is restored on exit
    return losses


@dataclass(frozen=True)
class PairedDifference:
    """The mean over examples of ``bound(guide) − bound(reference)`` and its standard error.

    :param mean: Mean paired difference, nats per example.
    :param standard_error: Its standard error, ``std(d) / sqrt(N)`` with ``N − 1`` degrees of freedom.
    """

    mean: float
    standard_error: float

    def __str__(self) -> str:
        return f"{self.mean:+.3f} ± {self.standard_error:.3f}"


@dataclass(frozen=True)
class GuideComparison:
    """What :func:`compare` measured.

    :param reference: The name of the guide the others are compared with (the first one).
    :param num_samples: K of L_K and of the PSIS diagnostic.
    :param num_examples: Number of test examples.
    :param elbo: Mean ELBO per guide.
    :param log_likelihood: Mean L_K per guide.
    :param elbo_difference: Paired ELBO difference to the reference, per other guide.
    :param log_likelihood_difference: Paired L_K difference to the reference, per other guide.
    :param khat_threshold: The PSIS threshold used, min(1 − 1/log10 K, 0.7) (Vehtari et al., 2024).
    :param share_khat_above: Per guide, the share of examples whose k̂ exceeds it.
    """

    reference: str
    num_samples: int
    num_examples: int
    elbo: dict[str, float]
    log_likelihood: dict[str, float]
    elbo_difference: dict[str, PairedDifference] = field(default_factory=dict)
    log_likelihood_difference: dict[str, PairedDifference] = field(default_factory=dict)
    khat_threshold: float = 0.7
    share_khat_above: dict[str, float] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """A Markdown table, one row per guide."""
        k = self.num_samples
        lines = [
            f"| guide | ELBO | L_{k} | ELBO − {self.reference} | L_{k} − {self.reference} "
            f"| k̂ > {self.khat_threshold:.2f} |",
            "|---|---|---|---|---|---|",
        ]
        for name in self.elbo:
            d_elbo = self.elbo_difference.get(name, "reference")
            d_ll = self.log_likelihood_difference.get(name, "reference")
            lines.append(
                f"| {name} | {self.elbo[name]:.3f} | {self.log_likelihood[name]:.3f} | {d_elbo} | {d_ll} "
                f"| {100 * self.share_khat_above[name]:.1f}% |"
            )
        return "\n".join(lines)


def paired_difference(values: torch.Tensor, reference: torch.Tensor) -> PairedDifference:
    """Mean and standard error of ``values − reference``, paired by example.

    :param values: Per-example values of one guide, shape ``(N,)``.
    :param reference: Per-example values of the reference guide on the same examples.
    """
    if values.shape != reference.shape or values.ndim != 1 or len(values) < 2:
        raise ValueError(f"Need two (N,) tensors with N >= 2, got {tuple(values.shape)} and {tuple(reference.shape)}.")
    d = (values - reference).double()
    return PairedDifference(mean=d.mean().item(), standard_error=(d.std(unbiased=True) / math.sqrt(len(d))).item())


def khat_threshold(num_samples: int) -> float:
    """The sample-size-dependent PSIS threshold min(1 − 1/log10 S, 0.7) (Vehtari et al., 2024).

    :param num_samples: S, the number of importance draws.

    >>> round(khat_threshold(100), 3), khat_threshold(5000)
    (0.5, 0.7)
    """
    return min(1 - 1 / math.log10(num_samples), 0.7)


def compare(
    model: nn.Module,
    guides: dict[str, nn.Module],
    data: torch.Tensor,
    *,
    num_samples: int = 1000,
    seed: int = 0,
) -> GuideComparison:
    """ELBO, L_K and PSIS k̂ of several guides of one model on the same examples, paired.

    :param model: The generative model all guides approximate the posterior of.
    :param guides: Guides by name; the first is the reference of the differences.
    :param data: Test examples, shape ``(N, input_dim)``, N ≥ 2.
    :param num_samples: K of L_K and of the PSIS diagnostic (K ≥ 11 so that the threshold is positive).
    :param seed: Evaluation seed, the same for every guide.
    """
    from ..analysis.latents import psis_khat

    if len(guides) < 1:
        raise ValueError("Give at least one guide, as {name: guide}.")
    if num_samples < 11:
        raise ValueError(f"num_samples must be at least 11 for the PSIS diagnostic, got {num_samples}.")
    results = {
        name: evaluate(model, guide, data, num_samples=num_samples, seed=seed, return_log_weights=True)
        for name, guide in guides.items()
    }
    reference = next(iter(guides))
    ref = results[reference]
    threshold = khat_threshold(num_samples)
    return GuideComparison(
        reference=reference,
        num_samples=num_samples,
        num_examples=len(data),
        elbo={n: r["elbo"] for n, r in results.items()},
        log_likelihood={n: r["log_likelihood"] for n, r in results.items()},
        elbo_difference={
            n: paired_difference(r["elbo_per_example"], ref["elbo_per_example"])
            for n, r in results.items()
            if n != reference
        },
        log_likelihood_difference={
            n: paired_difference(r["log_likelihood_per_example"], ref["log_likelihood_per_example"])
            for n, r in results.items()
            if n != reference
        },
        khat_threshold=threshold,
        share_khat_above={n: float((psis_khat(r["log_weights"]) > threshold).mean()) for n, r in results.items()},
    )
