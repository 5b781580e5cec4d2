"""``pyro-lvae report``: every analysis figure and a summary table for one or more runs.

For each run directory it reloads the newest checkpoint and the run's test set, then
computes the test ELBO and L_K with the per-example PSIS k̂, the KL per layer, the
active units and the latent codes, and writes into ``out_dir``:

* ``{run}_kl_units.png`` (KL per unit over epochs), ``{run}_pca.png``,
  ``{run}_samples.png``, ``{run}_reconstructions.png``;
* ``{run}_importance.nc``: an :class:`arviz.InferenceData` with the per-example
  log-weights, L_K, k̂ and latent codes (see
  :func:`~pyro_lvae.analysis.latents.importance_inference_data`);
* ``layer_kl.png`` and ``elbo_curves.png`` comparing all runs;
* ``report.md``: the table and links to every figure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import nn

from ..config import is_count
from ..inference.comparison import khat_threshold
from ..inference.evaluation import DEFAULT_MEMORY_BUDGET, evaluate
from ..training.batches import prepare_data
from ..training.results import discrete_offset
from ..training.run_dir import load_run
from . import plots
from .latents import (
    active_units,
    importance_inference_data,
    kl_per_unit,
    latent_codes,
    psis_khat,
    training_curves,
)

logger = logging.getLogger(__name__)

#: A unit whose mean KL exceeds this many nats carries information in the report's second count.
KL_UNIT_THRESHOLD = 0.01


@dataclass(frozen=True)
class RunAnalysis:
    """One run's diagnostics, a row of the report (nats per example; on the discrete images
    for a dequantized run, as in ``results.json``).

    :param name: Prefix of the run's files in the report folder.
    :param run_dir: The run directory.
    :param epochs: Epochs trained.
    :param guide: ``"ladder"`` or ``"vae"``.
    :param test_elbo: Test ELBO over the K draws.
    :param test_log_likelihood: Test L_K.
    :param num_samples: K.
    :param num_test_examples: Test examples analysed.
    :param khat_share_above: Share of examples with PSIS k̂ above the sample-size threshold
        min(1 − 1/log10 K, 0.7) (:func:`~pyro_lvae.inference.comparison.khat_threshold`).
    :param khat_median: Median k̂.
    :param khat_share_above_one: Share of examples with k̂ > 1, where the mean of the weights is infinite.
    :param active_units: Active units per layer (Burda et al.).
    :param informative_units: Units with mean KL above ``KL_UNIT_THRESHOLD``, per layer.
    :param latent_sizes: Units per layer.
    :param kl_per_layer: KL per layer, z1 first.
    :param figures: The run's figure files by kind.
    :param netcdf: Its netCDF file of log-weights, L_K, k̂ and latent codes.
    :param curves: Its training curves (:func:`~pyro_lvae.analysis.latents.training_curves`).
    :param weights: Which weights were analysed, ``"raw"`` or ``"ema"`` (their moving average).
    """

    name: str
    run_dir: str
    epochs: int
    guide: str
    test_elbo: float
    test_log_likelihood: float
    num_samples: int
    num_test_examples: int
    khat_share_above: float
    khat_median: float
    khat_share_above_one: float
    active_units: list[int]
    informative_units: list[int]
    latent_sizes: list[int]
    kl_per_layer: list[float]
    figures: dict[str, str]
    netcdf: str
    curves: Any = field(repr=False)
    weights: str = "raw"


def _check_analysis_options(name: str, *, num_samples: int, max_codes: int, active_samples: int) -> None:
    """Refuse, before the evaluation, what :func:`analyse_run` would fail on after it."""
    counts = {"num_samples": (num_samples, 2), "max_codes": (max_codes, 1), "active_samples": (active_samples, 1)}
    for option, (value, least) in counts.items():
        if not is_count(value, least=least):
            raise ValueError(f"{option} must be an integer of at least {least}, got {value!r}.")
    if not name or any(sep in name for sep in ("/", "\\")):
        raise ValueError(f"name must be a plain file-name prefix (no folders), got {name!r}.")


def analyse_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    num_samples: int = 1000,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_codes: int = 2000,
    active_samples: int = 20,
    test_subset: int | None = None,
    weights: str = "auto",
) -> RunAnalysis:
    """Compute one run's diagnostics and write its figures and netCDF file.

    :param run_dir: The run directory (a training run's ``--out``).
    :param out_dir: Where the figures and the netCDF file go.
    :param name: Prefix of the files written for this run.
    :param data_root: Data folder (default: ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Download missing data files.
    :param device: Where to evaluate.
    :param memory_budget: Bytes per particle chunk of L_K.
    :param num_samples: K of L_K and of the PSIS diagnostics.
    :param max_codes: Test examples in the PCA plot and in the stored latent codes.
    :param active_samples: Draws per example for E_q[u] in :func:`~pyro_lvae.analysis.latents.active_units`.
    :param test_subset: Analyse the first this many test examples (default: the run's setting).
    :param weights: ``"auto"`` (the moving average when the run kept one), ``"ema"`` or ``"raw"``.
    :returns: The run's row of the report table, with its figure file names and curves.
    """
    _check_analysis_options(name, num_samples=num_samples, max_codes=max_codes, active_samples=active_samples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # before the evaluation, which takes minutes
    model, guide, config, ckpt = load_run(run_dir, device=device, weights=weights)
    if not model.gaussian_latents:
        raise ValueError(
            f"{run_dir} is a run of family {config.model.family!r}, whose latents are not Gaussian: "
            "the report's per-unit KL, "
            "active units and PSIS analyses do not apply; see the family's entries in its results.json instead."
        )
    if test_subset is not None:
        config = config.replace(test_subset=test_subset)
    pyro.set_rng_seed(config.train.seed)
    data = prepare_data(config, data_root=data_root, download=download, device=device)
    test = data.test
    ev = evaluate(model, guide, test, num_samples=num_samples, memory_budget=memory_budget, return_log_weights=True)
    khat = psis_khat(ev["log_weights"])
    n_codes = min(max_codes, len(test))
    codes = latent_codes(model, guide, test[:n_codes], data.test_labels[:n_codes])
    importance_inference_data(ev["log_weights"], ev["log_likelihood_per_example"], khat, codes).to_netcdf(
        str(out / f"{name}_importance.nc")
    )
    layers = np.array(ev["kl_per_layer"])  # the Monte Carlo split over the same K draws
    active = active_units(model, guide, test, num_samples=active_samples)
    units_kl = kl_per_unit(model, guide, test)
    curves = training_curves(run_dir)

    figures = _write_figures(model, guide, curves, codes, test[:20], name=name, out=out)
    offset = discrete_offset(config)
    return RunAnalysis(
        name=name,
        run_dir=str(run_dir),
        epochs=int(ckpt["epoch"]),
        guide=config.model.guide,
        test_elbo=ev["elbo"] + offset,
        test_log_likelihood=ev["log_likelihood"] + offset,
        num_samples=num_samples,
        num_test_examples=ev["num_examples"],
        khat_share_above=float((khat > khat_threshold(num_samples)).mean()),
        khat_median=float(np.median(khat)),
        khat_share_above_one=float((khat > 1).mean()),
        active_units=active["counts"].tolist(),
        informative_units=[int((u > KL_UNIT_THRESHOLD).sum()) for u in units_kl],
        latent_sizes=list(config.model.latent_sizes),
        kl_per_layer=layers.tolist(),
        figures=figures,
        netcdf=f"{name}_importance.nc",
        curves=curves,
        weights=ckpt["weights"],
    )


def _unique_names(run_dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for path in run_dirs:
        base = path.resolve().name or "run"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def write_report(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    num_samples: int = 1000,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    test_subset: int | None = None,
    weights: str = "auto",
) -> Path:
    """Analyse every run in ``run_dirs`` and write figures and ``report.md`` into ``out_dir``.

    :param run_dirs: Run directories written by :func:`~pyro_lvae.training.loop.train`.
    :param out_dir: Where the figures, netCDF files and ``report.md`` go.
    :param num_samples: K of L_K and of the PSIS diagnostics.
    :param data_root: Data root (default ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Allow torchvision to download missing MNIST files.
    :param device: Where to evaluate.
    :param memory_budget: Bytes per particle chunk of the L_K evaluation.
    :param test_subset: Analyse the first this many test examples of each run (default:
        each run's setting, usually all of them).
    :param weights: Which weights of each run (:func:`~pyro_lvae.training.run_dir.load_run`).
    :returns: The path of ``report.md``.
    """
    if not run_dirs:
        raise ValueError("Name at least one run directory to report on.")
    paths = [Path(r) for r in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, name in zip(paths, _unique_names(paths)):
        logger.info("Analysing %s", path)
        rows.append(
            analyse_run(
                path,
                out,
                name=name,
                num_samples=num_samples,
                data_root=data_root,
                download=download,
                device=device,
                memory_budget=memory_budget,
                test_subset=test_subset,
                weights=weights,
            )
        )
    plots.layer_kl_bars({r.name: np.array(r.kl_per_layer) for r in rows}, path=out / "layer_kl.png")
    plots.elbo_curves({r.name: r.curves for r in rows}, path=out / "elbo_curves.png")

    report = out / "report.md"
    report.write_text("\n".join(_report_lines(rows, num_samples)))
    return report


def _report_lines(rows: list[RunAnalysis], k: int) -> list[str]:
    """The Markdown of ``report.md``: the table of every run, then each run's figures."""
    threshold = khat_threshold(k)
    lines = [
        "# pyro-lvae report",
        "",
        f"Test-set diagnostics, in nats per example. L_{k} uses K = {k} importance samples per example; "
        f"k̂ is the Pareto-smoothed importance-sampling shape of each example's {k} log-weights (arviz). "
        f"Following Vehtari et al. (2024), the weights have infinite variance where k̂ > 0.5, the estimate "
        f"of log p(x) is unreliable where k̂ exceeds min(1 − 1/log10 K, 0.7) = {threshold:.2f}, and the "
        'mean of the weights is infinite where k̂ > 1 (docs/analysis.md, "What k̂ says"). Active units: '
        "Cov_x(E_q[u]) > 0.01 (Burda et al.); below the top layer a unit can pass it through the top-down "
        f"prior alone, so units with mean KL > {KL_UNIT_THRESHOLD} nats are counted too. "
        "KL per layer: E_q[log q(z_i|·) − log p(z_i|·)], z1 first.",
        "",
        f"| run | guide | epochs | test ELBO | test L_{k} | share k̂ > {threshold:.2f} | share k̂ > 1 | median k̂ "
        f"| active units per layer | units with KL > {KL_UNIT_THRESHOLD} | KL per layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        active = " / ".join(f"{a}/{s}" for a, s in zip(r.active_units, r.latent_sizes))
        informative = " / ".join(f"{a}/{s}" for a, s in zip(r.informative_units, r.latent_sizes))
        kl = " / ".join(f"{v:.2f}" for v in r.kl_per_layer)
        label = f"{r.name} (EMA weights)" if r.weights == "ema" else r.name
        lines.append(
            f"| {label} | {r.guide} | {r.epochs} | {r.test_elbo:.2f} | {r.test_log_likelihood:.2f} "
            f"| {r.khat_share_above:.3f} | {r.khat_share_above_one:.3f} | {r.khat_median:.2f} | {active} "
            f"| {informative} | {kl} |"
        )
    lines += ["", "## Comparisons", "", "![layer-wise KL](layer_kl.png)", "", "![ELBO curves](elbo_curves.png)", ""]
    for r in rows:
        lines += [f"## {r.name}", "", f"Per-example log-weights, L_K, k̂ and latent codes: `{r.netcdf}`.", ""]
        lines += [f"![{key}]({file})" for key, file in r.figures.items()]
        lines.append("")
    return lines


def _write_figures(
    model: nn.Module, guide: nn.Module, curves: Any, codes: Any, x: torch.Tensor, *, name: str, out: Path
) -> dict[str, str]:
    """One run's figures (KL per unit over training, PCA of the codes, samples and
    reconstructions of ``x``), written into ``out``; returns their file names by kind."""
    figures = {
        "kl_units": f"{name}_kl_units.png",
        "pca": f"{name}_pca.png",
        "samples": f"{name}_samples.png",
        "reconstructions": f"{name}_reconstructions.png",
    }
    plots.kl_heatmap(curves, title=f"{name}: log KL per unit", path=out / figures["kl_units"])
    plots.pca_scatter(codes, title=f"{name}: PCA of q(z_i|·)", path=out / figures["pca"])
    plots.samples_grid(model, title=f"{name}: prior samples", path=out / figures["samples"])
    plots.reconstructions(model, guide, x, title=name, path=out / figures["reconstructions"])
    return figures
