r"""How a trained hierarchy is used: the paper's §3.2 studies and importance-sampling diagnostics.

Every function here returns arrays or :mod:`xarray` objects and draws nothing;
:mod:`pyro_lvae.analysis.plots` draws them.

* :func:`kl_per_unit` — mean :math:`\mathrm{KL}[q(z_{i,k}|\cdot)\,\|\,p(z_{i,k}|\cdot)]` for every
  unit k of every layer i (paper Fig. 4).
* :func:`kl_per_layer` — the layer-wise split of the ELBO's KL term (Fig. 5).
* :func:`active_units` — Burda et al.'s activity :math:`\mathrm{Cov}_x(\mathbb E_q[u]) > 0.01`.
* :func:`latent_codes` — posterior means and samples per layer, with labels (Fig. 6).
* :func:`training_curves` — a run's ``metrics.jsonl`` as an :class:`xarray.Dataset`.
* :func:`psis_khat` and :func:`importance_inference_data` — Pareto-smoothed importance
  sampling diagnostics of L_K with :mod:`arviz`.

**What k̂ says.** L_K averages importance weights :math:`w = p(x,z)/q(z|x)`. PSIS fits a
generalized Pareto distribution to the largest weights of each example; its shape k̂
estimates how heavy their tail is (Vehtari et al., 2024). For k̂ < 0.5 the weights have
finite variance and L_K converges quickly. From k̂ > 0.5 their variance is infinite;
PSIS stays reliable up to min(1 − 1/log10 S, 0.7) for S draws, and above it a few weights
dominate, so L_K with K = 5000 may still be far below log p(x). From k̂ > 1 even their
mean is infinite. When comparing guides, a guide with a higher L_K *and* a small share of
k̂ above the threshold is genuinely better; a share near 1 means the
guide's q is much narrower than the posterior and the reported L_K understates log p(x).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.distributions import kl_divergence

from ..config import is_count
from ..inference.evaluation import check_examples, eval_mode, evaluate, particle_traces
from ..models.model import GenerativeModel
from ..models.protocol import check_input_width, check_pair, parameter_dtype
from ..models.registration import registered_once
from ..training.run_files import METRICS_NAME

if TYPE_CHECKING:  # xarray is imported where a Dataset is built, so that training and the CLI do not load it
    import xarray as xr

#: Burda et al.'s threshold on Cov_x(E_q[u]) for an active unit.
ACTIVE_THRESHOLD = 0.01
#: k̂ above this marks an unreliable importance-sampling estimate.
KHAT_THRESHOLD = 0.7


def _layers(model: GenerativeModel) -> list[str]:
    return [f"z{i}" for i in range(1, model.config.depth + 1)]


@torch.no_grad()
def _posterior_passes(
    model: GenerativeModel, guide: nn.Module, data: torch.Tensor, *, num_samples: int, batch_size: int
):
    """Yield, per batch, ``{site: (q, p, value)}`` with base Normal distributions of shape (K, B, D)."""
    for option, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not is_count(value):
            raise ValueError(f"{option} must be a positive integer, got {value!r}.")
    check_pair(model, guide)
    check_examples(data)
    check_input_width(data, model.config.input_dim, dtype=parameter_dtype(model))
    # Registered once: analysing a model must not add it to Pyro's param store (where it
    # could be renamed beside another model of the same name) or read the store's tensors.
    with eval_mode(model, guide), registered_once(model, guide):
        for xb in data.split(batch_size):
            guide_trace, model_trace = particle_traces(model, guide, xb, num_samples)
            shape = (num_samples, xb.shape[0])
            out = {}
            for name in _layers(model):
                q = guide_trace.nodes[name]["fn"].base_dist
                p = model_trace.nodes[name]["fn"].base_dist
                value = guide_trace.nodes[name]["value"]
                event = value.shape[-1:]
                out[name] = (q.expand(shape + event), p.expand(shape + event), value.expand(shape + event))
            yield out


def kl_per_unit(
    model: GenerativeModel,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    num_samples: int = 1,
    batch_size: int = 500,
) -> list[np.ndarray]:
    r"""Mean analytic KL of every latent unit, in nats.

    For unit k of layer i this is the average over examples and ``num_samples`` draws
    of :math:`\mathrm{KL}[q(z_{i,k}|\cdot)\,\|\,p(z_{i,k}|z_{i+1})]` with the upper layers at
    their drawn values. For the ladder guide the units of all layers sum to the KL term
    of :class:`~pyro.infer.TraceMeanField_ELBO`. For the bottom-up guide this is the
    per-unit picture of the paper's Fig. 4 but, summed, not its ELBO's KL term (see
    :mod:`pyro_lvae.models.guides`); use :func:`kl_per_layer` for that.

    :param model: The generative model.
    :param guide: A guide for it.
    :param data: Data of shape ``(N, input_dim)`` on the model's device.
    :param num_samples: Draws per example.
    :param batch_size: Examples per forward pass.
    :returns: One array of shape ``(latent_sizes[i],)`` per layer, z1 first.
    """
    sums = [torch.zeros(d, dtype=torch.float64) for d in model.config.latent_sizes]
    n = 0
    for out in _posterior_passes(model, guide, data, num_samples=num_samples, batch_size=batch_size):
        for i, name in enumerate(_layers(model)):
            q, p, _ = out[name]
            sums[i] += kl_divergence(q, p).sum((0, 1)).double().cpu()
        n += out["z1"][2].shape[1]
    return [(s / (n * num_samples)).numpy() for s in sums]


def kl_per_layer(
    model: GenerativeModel,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    num_samples: int = 1,
    batch_size: int = 500,
) -> np.ndarray:
    r"""The layer-wise split of the ELBO's KL term, in nats per example.

    Monte Carlo :math:`\mathbb E_q[\log q(z_i|\cdot) - \log p(z_i|z_{i+1})]`, valid for every
    guide; the layers sum to the KL term of the ELBO.

    :param model: The generative model.
    :param guide: A guide for it.
    :param data: Examples of shape ``(N, input_dim)`` on the model's device.
    :param num_samples: Draws per example.
    :param batch_size: Examples per evaluation batch.
    :returns: Array of shape ``(depth,)``, z1 first.
    """
    return np.array(evaluate(model, guide, data, num_samples=num_samples, batch_size=batch_size)["kl_per_layer"])


def active_units(
    model: GenerativeModel,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    threshold: float = ACTIVE_THRESHOLD,
    num_samples: int = 50,
    batch_size: int = 500,
) -> dict[str, object]:
    r"""Active units per layer by Burda et al.'s measure :math:`\mathrm{Cov}_x(\mathbb E_{q(u|x)}[u]) > 0.01`.

    :math:`\mathbb E_q[u]` is the mean over ``num_samples`` draws of the guide's mean for u
    (exact for the top layer; for lower layers it averages over the upper layers' draws).

    :param model: The generative model.
    :param guide: A guide for it.
    :param data: Examples of shape ``(N, input_dim)`` on the model's device.
    :param threshold: A unit is active when its variance across examples exceeds this.
    :param num_samples: Draws per example for :math:`\mathbb E_q[u]`.
    :param batch_size: Examples per evaluation batch.
    :returns: ``{"counts": (depth,) int array, "variances": list of per-unit arrays}``.
    """
    means: list[list[torch.Tensor]] = [[] for _ in model.config.latent_sizes]
    for out in _posterior_passes(model, guide, data, num_samples=num_samples, batch_size=batch_size):
        for i, name in enumerate(_layers(model)):
            means[i].append(out[name][0].loc.mean(0).double().cpu())
    variances = [torch.cat(m).var(0, unbiased=True).numpy() for m in means]
    return {"counts": np.array([(v > threshold).sum() for v in variances]), "variances": variances}


def latent_codes(
    model: GenerativeModel,
    guide: nn.Module,
    data: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 500,
) -> xr.Dataset:
    """Posterior means and one sample per layer for every example (for the PCA plots of Fig. 6).

    :param model: The generative model.
    :param guide: A guide for it.
    :param data: Examples of shape ``(N, input_dim)`` on the model's device.
    :param labels: Class labels of ``data`` (stored as the ``label`` coordinate).
    :param batch_size: Examples per forward pass (batch norm runs in eval mode, so it does not
        change the codes).
    :returns: Dataset with ``mean_z{i}`` and ``sample_z{i}`` of dims ``(example, z{i}_unit)``.
    """
    import xarray as xr

    means: dict[str, list] = {n: [] for n in _layers(model)}
    samples: dict[str, list] = {n: [] for n in _layers(model)}
    for out in _posterior_passes(model, guide, data, num_samples=1, batch_size=batch_size):
        for name in _layers(model):
            q, _, z = out[name]
            means[name].append(q.loc[0].cpu())
            samples[name].append(z[0].cpu())
    variables = {}
    for name in _layers(model):
        dims = ("example", f"{name}_unit")
        variables[f"mean_{name}"] = (dims, torch.cat(means[name]).numpy())
        variables[f"sample_{name}"] = (dims, torch.cat(samples[name]).numpy())
    coords = {"example": np.arange(data.shape[0])}
    if labels is not None:
        coords["label"] = ("example", labels.cpu().numpy())
    return xr.Dataset(variables, coords=coords)


def training_curves(run_dir: str | os.PathLike) -> xr.Dataset:
    """A run's ``metrics.jsonl`` as a Dataset indexed by ``epoch``.

    Scalar metrics (``beta``, ``seconds``, ``train_objective``, ``train_elbo``,
    ``valid_elbo``, ``test_elbo``) become variables, NaN in epochs where they were not
    evaluated; ``test_kl_per_layer`` becomes ``(epoch, layer)`` and ``test_kl_per_unit`` one
    ``test_kl_z{i}`` of dims ``(epoch, z{i}_unit)`` per layer (``valid_…`` for a run whose
    periodic evaluation used a validation split, ``valid_size`` > 0).

    :param run_dir: A run directory written by :func:`~pyro_lvae.training.loop.train`.
    """
    import xarray as xr

    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; point at a run directory written by `pyro-lvae train`.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty; train the run for at least one epoch.")
    epochs = np.array([r["epoch"] for r in records])
    variables: dict[str, tuple] = {}
    for key in ("beta", "seconds", "train_objective", "train_elbo", "valid_elbo", "test_elbo"):
        variables[key] = ("epoch", np.array([r.get(key, np.nan) for r in records], dtype=float))
    for split in ("valid", "test"):
        variables |= _kl_curves(records, split)
    return xr.Dataset(variables, coords={"epoch": epochs})


def _kl_curves(records: list[dict], split: str) -> dict[str, tuple]:
    """The per-layer and per-unit KL curves of the periodic evaluation on ``split``."""
    variables: dict[str, tuple] = {}
    layered = [r for r in records if f"{split}_kl_per_layer" in r]
    if layered:
        kl = np.full((len(records), len(layered[0][f"{split}_kl_per_layer"])), np.nan)
        for j, r in enumerate(records):
            if f"{split}_kl_per_layer" in r:
                kl[j] = r[f"{split}_kl_per_layer"]
        variables[f"{split}_kl_per_layer"] = (("epoch", "layer"), kl)
    units = [r for r in records if f"{split}_kl_per_unit" in r]
    for i, layer in enumerate(units[0][f"{split}_kl_per_unit"] if units else []):
        arr = np.full((len(records), len(layer)), np.nan)
        for j, r in enumerate(records):
            if f"{split}_kl_per_unit" in r:
                arr[j] = r[f"{split}_kl_per_unit"][i]
        variables[f"{split}_kl_z{i + 1}"] = (("epoch", f"z{i + 1}_unit"), arr)
    return variables


def psis_khat(log_weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pareto-smoothed importance sampling shape k̂ per example, with :func:`arviz.psislw`.

    :param log_weights: Log importance weights of shape ``(K, N)`` (particles first, as
        returned by :func:`~pyro_lvae.inference.evaluation.evaluate` with ``return_log_weights=True``).
    :returns: Array of shape ``(N,)``. Examples whose weights are all equal (the guide
        is the exact posterior) have bounded weights and get k̂ = 0; arviz's fit is
        undefined there.
    """
    import arviz as az

    lw = torch.as_tensor(log_weights).double().cpu().numpy().T  # (N, K): arviz wants samples last
    if lw.ndim != 2 or lw.shape[1] < 2:
        raise ValueError(f"log_weights must have shape (K >= 2, N), got {tuple(lw.T.shape)}.")
    constant = (lw.max(1) - lw.min(1)) <= 1e-12 * np.maximum(1.0, np.abs(lw).max(1))
    khat = np.zeros(lw.shape[0])
    if (~constant).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arviz warns per example when k̂ > 0.7
            _, k = az.psislw(lw[~constant], reff=1.0)
        khat[~constant] = np.asarray(k)
    return khat


def importance_inference_data(
    log_weights: torch.Tensor,
    log_likelihood: torch.Tensor,
    khat: np.ndarray,
    codes: xr.Dataset | None = None,
):
    """Per-example importance-sampling results as an :class:`arviz.InferenceData`.

    Groups: ``sample_stats`` holds ``log_weight`` with dims ``(chain, draw, example)``
    (one chain, K draws); ``observed_data`` holds the per-example ``log_likelihood``
    (L_K) and ``khat``; ``constant_data`` holds the latent codes, if given. Save it with
    ``.to_netcdf(path)`` and read it back with :func:`arviz.from_netcdf`.

    :param log_weights: Log importance weights, shape ``(K, N)``.
    :param log_likelihood: L_K per example, shape ``(N,)``.
    :param khat: PSIS k̂ per example (:func:`psis_khat`), shape ``(N,)``.
    :param codes: Latent codes of the examples (:func:`latent_codes`), or ``None``.
    """
    import arviz as az
    import xarray as xr

    lw = torch.as_tensor(log_weights).double().cpu().numpy()
    example = np.arange(lw.shape[1])
    sample_stats = xr.Dataset(
        {"log_weight": (("chain", "draw", "example"), lw[None])},
        coords={"chain": [0], "draw": np.arange(lw.shape[0]), "example": example},
    )
    observed = xr.Dataset(
        {
            "log_likelihood": ("example", torch.as_tensor(log_likelihood).double().cpu().numpy()),
            "khat": ("example", np.asarray(khat)),
        },
        coords={"example": example},
    )
    groups = {"sample_stats": sample_stats, "observed_data": observed}
    if codes is not None:
        groups["constant_data"] = codes.rename({"example": "code_example"})
    return az.InferenceData(**groups)
