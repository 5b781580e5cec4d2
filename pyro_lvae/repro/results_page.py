"""``pyro-lvae results-page``: ``docs/results.md`` from the sweeps' ``results.json`` files.

The page is generated, never typed: every number in it is read from a run's
``results.json`` (written by :func:`~pyro_lvae.training.loop.train`), every paper number
from :mod:`pyro_lvae.repro.paper`, and the same inputs give the same bytes (the text is
built in a fixed order, the figures are written without timestamps). For each
setting of the paper found among the runs (MNIST Fig. 3 and Table 1, OMNIGLOT and
NORB of Table 2, and the Fashion-MNIST stand-in for NORB) it shows:

* the runs' schedule against the paper's (epochs, warm-up, fine-tuning, K, test
  examples), hardware, library versions and dates, and the command that reproduces it;
* a table: paper L_5000 (where the paper prints it) beside the measured L1 and L_K;
* Fig. 3's plot (L1 and L_K against the number of layers for the four variants) and
  Figs. 4–5's comparison of VAE+BN+WU and LVAE+BN+WU at five layers (KL per layer and
  active units per layer);
* whether the paper's qualitative claims hold at the measured length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: the figures are drawn without a GUI backend

from ..config import ExperimentConfig
from ..training.results_file import RunResults
from ..training.run_files import RESULTS_NAME
from .paper import PAPER_BEST_VAE_L5000, PAPER_L1, PAPER_L5000
from .presets import PRESET_INFO, PRESETS, PresetInfo
from .presets import VARIANT_LABELS as VARIANTS
from .sweep import shorten_schedule

#: Each setting (a key of :data:`~pyro_lvae.repro.presets.SETTING_PREFIXES`): its title, and
#: what to say about its data.
SETTINGS = {
    "mnist": ("MNIST (Fig. 3 and Table 1)", ""),
    "omniglot": (
        "OMNIGLOT (Table 2)",
        "**Substituted data.** These runs use `omniglot28`, 28×28 OMNIGLOT built from Lake's "
        "original images with the 30 background alphabets for training and the 20 evaluation "
        "alphabets for testing. That is not the split of the IWAE/LVAE papers (whose "
        "`chardata.mat` could not be obtained), so the numbers are not comparable with the "
        "paper's column.",
    ),
    "norb-gauss": ("NORB (Table 2)", "Gaussian likelihood on 32×32 NORB grey levels."),
    "fashion-gauss": (
        "Gaussian setting on Fashion-MNIST, the stand-in for NORB (Table 2)",
        "**Substituted data.** NORB could not be obtained for these runs. They "
        "use the paper's NORB setting (Gaussian likelihood with linear mean and softplus variance, "
        "tanh MLPs, 2000 epochs) on Fashion-MNIST's 8-bit grey levels, dequantized: each level k "
        "becomes (k + u) / 256 with u uniform on [0, 1), and the bounds are reported for the discrete "
        "images, the density's bound minus 784 log 256 nats (Theis et al., 2016), in nats per image "
        "and in bits per dimension. The paper column shows "
        "its NORB numbers only for orientation: the data differ, so the values are not comparable; "
        "only the ordering of the variants is.",
    ),
}


@dataclass(frozen=True)
class RunResult:
    """One finished run.

    :param sweep: The sweep directory, as given (its name is the grid's).
    :param run: The run directory's name.
    :param results: Its ``results.json``.
    """

    sweep: str
    run: str
    results: RunResults

    @property
    def config(self) -> ExperimentConfig:
        """The run's configuration."""
        return self.results.config

    @property
    def preset(self) -> str:
        """The preset the run was made from."""
        return self.results.config.name


def split_preset(name: str) -> tuple[str, str, int, str] | None:
    """``(setting, variant, depth, fine-tuning suffix)`` of a paper preset, else ``None``.

    :param name: A preset name, e.g. ``"omniglot-vae-bn-3"``.

    >>> split_preset("omniglot-vae-bn-3"), split_preset("lvae-bn-wu-5-ft"), split_preset("vlae-3")
    (('omniglot', 'vae-bn', 3, ''), ('mnist', 'lvae-bn-wu', 5, '-ft'), None)
    """
    info = PRESET_INFO.get(name)
    if info is None or info.authors:
        return None
    return info.setting, info.variant, info.depth, info.finetune


def load_runs(sweeps: Sequence[str | os.PathLike]) -> list[RunResult]:
    """Every ``results.json`` one level below each sweep directory, in sorted order.

    :param sweeps: Sweep directories.
    :raises FileNotFoundError: if a directory is missing or holds no results.
    """
    runs = []
    for sweep in sweeps:
        sweep = Path(sweep)
        files = sorted(sweep.glob(f"*/{RESULTS_NAME}"))
        if not files:
            raise FileNotFoundError(f"{sweep} holds no */results.json; run `pyro-lvae sweep GRID --out {sweep}` first.")
        for f in files:
            runs.append(RunResult(sweep=sweep.as_posix(), run=f.parent.name, results=RunResults.load(f)))
    return runs


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _differences(config: ExperimentConfig, preset: ExperimentConfig) -> dict[str, Any]:
    """Fields of ``config.train`` that differ from the preset's, besides the seed."""
    a, b = config.to_dict()["train"], preset.to_dict()["train"]
    return {k: a[k] for k in a if a[k] != b[k] and k != "seed"}


def _schedule(runs: list[RunResult], *, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Lines describing how the runs differ from the paper's schedule (besides the fields in ``ignore``)."""
    lines = []
    diffs = [
        (r, {k: v for k, v in _differences(r.config, PRESETS[r.preset]).items() if k not in ignore})
        for r in runs
        if r.preset in PRESETS
    ]
    common = {k: v for k, v in diffs[0][1].items() if all(d.get(k) == v for _, d in diffs)} if diffs else {}

    def show(key: str, value: Any, r: RunResult) -> str:
        return f"`{key}` = {value} (paper: {getattr(PRESETS[r.preset].train, key)})"

    if diffs and not common and not any(d for _, d in diffs):
        lines.append("- The paper's full schedule (the presets' values).")
    if common:
        lines.append(
            "- **Shortened or changed from the paper, in every run:** "
            + "; ".join(show(k, v, diffs[0][0]) for k, v in common.items())
            + "."
        )
    groups: dict[str, list[str]] = {}
    for r, d in diffs:
        rest = "; ".join(show(k, v, r) for k, v in d.items() if k not in common)
        if rest:
            groups.setdefault(rest, []).append(f"`{r.preset}`")
    for rest, presets in groups.items():
        lines.append(f"- In {', '.join(presets)}: {rest}.")
    devices = sorted({r.results.device for r in runs})
    dates = sorted({r.results.date[:10] for r in runs})
    versions = sorted({f"torch {r.results.versions['torch']}, pyro-ppl {r.results.versions['pyro']}" for r in runs})
    tests = sorted({r.results.num_test_examples for r in runs})
    ks = sorted({r.results.num_importance_samples for r in runs})
    lines.append(
        f"- Test examples: {', '.join(map(str, tests))}; K of L_K: {', '.join(map(str, ks))} "
        "(paper: the whole test set and 5000)."
    )
    lines.append(f"- Hardware: {'; '.join(devices)}. Software: {'; '.join(versions)}. Dates: {', '.join(dates)}.")
    return lines


def _command(grid: str, runs: list[RunResult]) -> str:
    """The sweep command that reproduces ``runs``: ``--epochs`` for a shortened schedule
    (:func:`~pyro_lvae.repro.sweep.shorten_schedule`), then ``--set`` for the changes common
    to every run."""
    epochs = {r.config.train.epochs for r in runs if r.config.train.epochs != PRESETS[r.preset].train.epochs}
    shortened = epochs.pop() if len(epochs) == 1 else None
    common: dict[str, Any] | None = None
    for r in runs:
        base = PRESETS[r.preset]
        if shortened is not None:
            base = shorten_schedule(base, shortened)
        d = _differences(r.config, base)
        common = d if common is None else {k: v for k, v in common.items() if d.get(k) == v}
    sets = " ".join(f"--set {k}={v}" for k, v in sorted((common or {}).items()))
    name = Path(grid).name
    flags = f"--epochs {shortened} " if shortened is not None else ""
    return f"pyro-lvae sweep {name} --out runs/{name} --workers 2 {flags}{sets}".rstrip()


def _save(fig: Figure, path: Path) -> None:
    # No software/date metadata, so that the same numbers give the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _layers_figure(table: dict[tuple[str, int], list[RunResult]], title: str, path: Path) -> None:
    """Fig. 3: test L1 and L_K against the number of layers, one line per variant."""
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for variant, label in VARIANTS.items():
        depths = sorted(d for (v, d) in table if v == variant)
        if not depths:
            continue
        for ax, key in zip(axes, ("test_elbo", "test_log_likelihood")):
            ax.plot(
                depths, [_mean([getattr(r.results, key) for r in table[variant, d]]) for d in depths], "o-", label=label
            )
    k = sorted({r.results.num_importance_samples for rs in table.values() for r in rs})
    axes[0].set(xlabel="stochastic layers", ylabel="nats", title="test L1 (ELBO)")
    axes[1].set(xlabel="stochastic layers", ylabel="nats", title=f"test L_{'/'.join(map(str, k))}")
    for ax in axes:
        ax.set_xticks(range(1, 6))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _units_figure(runs: dict[str, RunResult], title: str, path: Path) -> None:
    """Figs. 4-5: per-layer KL and active units of the 5-layer VAE+BN+WU and LVAE+BN+WU,
    and each unit's KL, sorted, as in Fig. 4."""
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
    width = 0.8 / len(runs)
    for j, (label, r) in enumerate(runs.items()):
        depth = len(r.results.test_kl_per_layer)
        x = np.arange(depth) + j * width
        axes[0].bar(x, r.results.test_kl_per_layer, width=width, label=label)
        axes[1].bar(x, r.results.test_active_units, width=width, label=label)
        per_unit = np.concatenate([np.sort(np.asarray(k))[::-1] for k in r.results.test_kl_per_unit])
        axes[2].semilogy(np.arange(len(per_unit)), np.maximum(per_unit, 1e-6), ".", ms=3, label=label)
    depth = max(len(r.results.test_kl_per_layer) for r in runs.values())
    for ax in axes[:2]:
        ax.set_xticks(np.arange(depth) + 0.4 - width / 2, [f"z{i + 1}" for i in range(depth)])
    axes[0].set(ylabel="nats", title="KL per layer")
    axes[1].set(ylabel="units", title="active units (Cov_x E_q[u] > 0.01)")
    axes[2].set(xlabel="unit (z1 … z5, each layer sorted)", ylabel="KL (nats)", title="KL per unit")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


#: Differences of L_K smaller than this are called inconclusive. The depth-1 LVAE+BN+WU and
#: VAE+BN+WU are the same model (one Gaussian layer, q(z1|x) from one MLP) and differ only by
#: the randomness of their runs: by 0.20 (MNIST) and 0.62 (OMNIGLOT) nats in the committed
#: 5-epoch sweeps, 0.2–0.56 in earlier ones. Where a setting's pair differs by more, that
#: difference is its margin (see the claims of each setting).
TIE_MARGIN = 0.6


@dataclass(frozen=True)
class Difference:
    """A measured difference ``better − worse`` and, where it can be estimated, its
    standard error.

    :param mean: The difference (nats).
    :param se: Its standard error: paired over test examples for one seed, over seeds for
        several; ``None`` where neither is available.
    """

    mean: float
    se: float | None = None

    def __str__(self) -> str:
        return f"{self.mean:+.2f}" + ("" if self.se is None else f" ± {self.se:.2f}")


def _verdict(differences: list[Difference], margin: float = TIE_MARGIN) -> str:
    """``holds``, ``does not hold``, ``inconclusive`` or a count of each. A difference counts
    only beyond both the tie ``margin`` and two of its standard errors."""

    def sign(d: Difference) -> int:
        bar = max(margin, 2 * d.se) if d.se is not None else margin
        return (d.mean > bar) - (d.mean < -bar)

    signs = [sign(d) for d in differences]
    wins, losses = signs.count(1), signs.count(-1)
    ties = len(signs) - wins - losses
    if wins == len(signs):
        return "holds"
    if losses == len(signs):
        return "does not hold"
    if ties == len(signs):
        return "inconclusive"
    counts = [(wins, "holds"), (ties, "inconclusive"), (losses, "fails")]
    return "mixed: " + ", ".join(f"{what} at {n} of {len(signs)}" for n, what in counts if n)


def _difference(better: list[RunResult], worse: list[RunResult], key: str) -> Difference:
    """``better − worse`` on ``key``, paired by seed. With several common seeds, the mean over
    seeds and its standard error over seeds (training and test sampling together); with one,
    the difference paired by test example where both runs stored per-example values.

    :param better: The runs of one setting, one per seed.
    :param worse: The runs of the other.
    :param key: ``"test_log_likelihood"`` or ``"test_elbo"``.
    """
    by_seed = {r.config.train.seed: r for r in worse}
    pairs = [(b, by_seed[b.config.train.seed]) for b in better if b.config.train.seed in by_seed]
    if not pairs:  # no common seed: the means of each side, without a standard error
        return Difference(
            _mean([getattr(r.results, key) for r in better]) - _mean([getattr(r.results, key) for r in worse])
        )
    diffs = [getattr(b.results, key) - getattr(w.results, key) for b, w in pairs]
    if len(pairs) > 1:
        return Difference(_mean(diffs), float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))))
    ((b, w),) = pairs
    pe_b, pe_w = b.results.per_example, w.results.per_example
    if pe_b is None or pe_w is None or len(pe_b.elbo) != len(pe_w.elbo):
        return Difference(diffs[0])
    _, se = pe_b.paired_difference(pe_w, "elbo" if key == "test_elbo" else "log_likelihood")
    return Difference(diffs[0], se)


def _informative_units(results: RunResults) -> list[int]:
    """Units with a mean KL above 0.01 nats, per layer (none for runs without per-unit KL)."""
    return [sum(k > 0.01 for k in layer) for layer in results.test_kl_per_unit or []]


def _active_unit_claim(vae: RunResult, lvae: RunResult, *, upper: str = "z2–z5") -> str:
    """The units above z1 (``upper`` names them) of the two runs by both activity measures,
    each with its verdict."""
    counts = {}
    for name, run in (("vae", vae), ("lvae", lvae)):
        counts[name] = (run.results.test_active_units, _informative_units(run.results))
    (b_vae, k_vae), (b_lvae, k_lvae) = counts["vae"], counts["lvae"]
    parts = [
        f"Cov_x E_q[u] > 0.01 (Burda et al.): VAE+BN+WU {'/'.join(map(str, b_vae))}, LVAE+BN+WU "
        f"{'/'.join(map(str, b_lvae))}, {upper} {sum(b_vae[1:])} vs {sum(b_lvae[1:])}"
    ]
    verdicts = [sum(b_lvae[1:]) > sum(b_vae[1:])]
    if k_vae and k_lvae:
        parts.append(
            f"mean KL > 0.01 nats: VAE+BN+WU {'/'.join(map(str, k_vae))}, LVAE+BN+WU "
            f"{'/'.join(map(str, k_lvae))}, {upper} {sum(k_vae[1:])} vs {sum(k_lvae[1:])}"
        )
        verdicts.append(sum(k_lvae[1:]) > sum(k_vae[1:]))
    if all(verdicts):
        verdict = "holds by every measure"
    elif not any(verdicts):
        verdict = "does not hold"
    else:
        verdict = "the measures disagree"
    return (
        f"- *The LVAE uses more upper-layer units*: **{verdict}** (seed {vae.config.train.seed}; "
        + "; ".join(parts)
        + "). Burda's measure counts units whose posterior mean varies across "
        "examples; below the top layer it is inflated by variation passed down from the layers above "
        "([analysis](analysis.md)), so the KL count is the stricter one."
    )


def _claims(table: dict[tuple[str, int], list[RunResult]], key: str) -> list[str]:
    """The paper's qualitative claims, checked on the measured ``key`` (L_K) against a tie
    margin and the differences' standard errors (:func:`_difference`, :func:`_verdict`).
    The margin is :data:`TIE_MARGIN`, or the difference between the two runs of one model
    (the depth-1 LVAE and VAE+BN+WU) where that is larger."""

    def diff(better: str, worse: str, depth: int) -> Difference | None:
        b, w = table.get((better, depth)), table.get((worse, depth))
        return _difference(b, w, key) if b and w else None

    noise = diff("lvae-bn-wu", "vae-bn-wu", 1)
    margin = max(TIE_MARGIN, abs(noise.mean)) if noise is not None else TIE_MARGIN
    seeds = max((len(rs) for rs in table.values()), default=0)
    measured = (
        f", and differ by {abs(noise.mean):.2f} nats here, so the margin is {margin:.2f} nats"
        if noise is not None
        else ""
    )
    spread = (
        "One seed per setting: the ± is the standard error of the difference paired by test image, which "
        "covers the sampling of the test images only."
        if seeds <= 1
        else f"Up to {seeds} seeds per setting, averaged: the ± is the standard error over seeds."
    )
    lines = [
        "A difference holds only beyond both the tie margin and two of its standard errors; inside, it is "
        f"called inconclusive. The tie margin is {TIE_MARGIN} nats or, where larger, the difference between two "
        f"runs of one model: the depth-1 LVAE and VAE+BN+WU are the same model{measured}. {spread}",
        "",
    ]
    margins = []
    for depth in (3, 4, 5):
        vaes = [d for d in (diff("lvae-bn-wu", v, depth) for v in ("vae", "vae-bn", "vae-bn-wu")) if d is not None]
        if vaes:
            margins.append((depth, min(vaes, key=lambda d: d.mean)))  # against the best VAE variant
    if margins:
        detail = ", ".join(f"{d} layers {m}" for d, m in margins)
        lines.append(
            f"- *The LVAE beats the VAE at depth ≥ 3*: **{_verdict([m for _, m in margins], margin)}** "
            f"(LVAE+BN+WU minus the best VAE variant: {detail} nats)."
        )
    for better, worse, what in (("vae-bn", "vae", "batch normalization"), ("vae-bn-wu", "vae-bn", "warm-up")):
        pairs = [(d, diff(better, worse, d)) for d in range(1, 6)]
        pairs = [(d, m) for d, m in pairs if m is not None]
        if pairs:
            detail = ", ".join(f"{d}: {m}" for d, m in pairs)
            lines.append(
                f"- *{what.capitalize()} helps* ({VARIANTS[better]} vs {VARIANTS[worse]}): "
                f"**{_verdict([m for _, m in pairs], margin)}** (difference by number of layers {detail} nats)."
            )
    vae5, lvae5 = table.get(("vae-bn-wu", 5)), table.get(("lvae-bn-wu", 5))
    if vae5 and lvae5 and "test_active_units" in vae5[0].results and "test_active_units" in lvae5[0].results:
        lines.append(_active_unit_claim(vae5[0], lvae5[0]))
    return lines if len(lines) > 2 else []


def _label(r: RunResult) -> str:
    """The paper's name of a run's variant and its depth, e.g. ``"LVAE+BN+WU, 5 layers"``."""
    info = PRESET_INFO[r.preset]
    return f"{VARIANTS[info.variant]}, {info.depth} layers"


#: Fields that set only how a run is watched (the periodic test ELBO, whose draws do not
#: touch the training's random stream), not what is trained or how it is finally evaluated.
MONITORING_FIELDS = frozenset({"eval_every", "eval_particles"})


def is_full_length(r: RunResult) -> bool:
    """Whether a run followed its paper preset unchanged to the last epoch (besides the seed
    and :data:`MONITORING_FIELDS`), so that it is evaluated under the paper's protocol.

    :param r: A finished run.
    """
    preset = PRESETS.get(r.preset)
    if preset is None or split_preset(r.preset) is None:
        return False
    changed = set(_differences(r.config, preset)) - MONITORING_FIELDS
    same_model = r.config.model == preset.model
    epochs = preset.train.epochs + preset.train.finetune_epochs
    k = r.results.num_importance_samples == preset.train.num_importance_samples
    return not changed and same_model and k and r.results.epochs == epochs


def _paired_claim(claim: str, key: str, better: RunResult, worse: RunResult, paper: float | None) -> str:
    """One claim ``better − worse > 0`` on ``key``, paired by example where both runs stored
    their per-example values, with its verdict (:func:`_verdict`)."""
    d = _difference([better], [worse], key)
    if d.se is not None:
        spread = f" (paired standard error over the {better.results.num_test_examples:,} test images)"
    else:
        spread = " (no per-example values stored, so no paired standard error)"
    quoted = "" if paper is None else f"; paper {paper:+.2f}"
    return f"- *{claim}*: **{_verdict([d])}** (measured {d}{spread}{quoted})."


def _full_length_section(runs: list[RunResult], figures: Path, figures_rel: str) -> list[str]:
    """The runs made at the paper's full protocol: their numbers beside the paper's, how long
    they took, and the paper's claims at that length (LVAE vs best VAE, Figs. 4-6)."""
    out = [
        "## Full-length runs",
        "",
        "These runs use the paper's presets unchanged (§3: 2000 epochs, warm-up N_t = 200, Adam 1e-3, "
        "batch 256, fp32), with the variance floor of the authors' code, and are evaluated as the paper "
        "is: L1 and L_K on the whole test set. One seed each, so the comparison says how these runs "
        "came out, not how the variants compare on average over seeds.",
        "",
        "| run | epochs | paper L_5000 | L_K | paper L1 | L1 | training | evaluation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        res = r.results
        paper_lk = PAPER_L5000.get(r.preset, PAPER_BEST_VAE_L5000 if r.preset == "vae-bn-wu-3" else None)
        out.append(
            f"| {_label(r)} (`{r.preset}`) | {res.epochs} | {_fmt(paper_lk)} "
            f"| **{_fmt(res.test_log_likelihood)}** (K = {res.num_importance_samples}) "
            f"| {_fmt(PAPER_L1.get(r.preset))} "
            f"| **{_fmt(res.test_elbo)}** | {res.train_seconds / 3600:.2f} h | {res.eval_seconds / 60:.0f} min |"
        )
    out += [
        "",
        "The paper does not say which depth its best VAE (L_5000 −82.74) has; its L1 of −87.49 is "
        "quoted for the 3-layer VAE. Training time is the sum of the epoch times. Reproduce with:",
        "",
        "```bash",
        *(_train_command(r) for r in runs),
        "```",
        "",
    ]
    monitoring = sorted({k for r in runs for k in _differences(r.config, PRESETS[r.preset]) if k in MONITORING_FIELDS})
    out += _schedule(runs, ignore=MONITORING_FIELDS)
    if monitoring:
        out.append(
            f"- Changed for watching the runs only (not part of the paper's protocol): `{'`, `'.join(monitoring)}`."
        )
    return out + _full_length_claims(runs, figures, figures_rel) + [""]


def _full_length_claims(runs: list[RunResult], figures: Path, figures_rel: str) -> list[str]:
    """The paper's MNIST claims on the full-length runs: its 5-layer LVAE against the best
    VAE of the same seed, paired by example, and their units per layer (Figs. 4-6)."""
    out: list[str] = []
    mnist = [r for r in runs if PRESET_INFO[r.preset].setting == "mnist"]
    lvae = [r for r in mnist if r.preset == "lvae-bn-wu-5"]
    seed = lvae[0].config.train.seed if lvae else None
    vaes = [r for r in mnist if PRESET_INFO[r.preset].variant != "lvae-bn-wu" and r.config.train.seed == seed]
    vae = sorted(vaes, key=lambda r: -r.results.test_log_likelihood)  # the best VAE first
    if lvae and vae:
        paper_lk = PAPER_L5000["lvae-bn-wu-5"] - PAPER_BEST_VAE_L5000
        paper_l1 = PAPER_L1["lvae-bn-wu-5"] - PAPER_L1["vae-bn-wu-3"]
        out += [
            "",
            f"The paper's claims at full length. The standard errors cover the sampling of the test "
            f"images only; how much a second training seed would move a run is not measured here, so "
            f"differences within the tie margin of ±{TIE_MARGIN} nats (the sections below) are called "
            "inconclusive however small their standard error.",
            "",
        ]
        claim = "The LVAE beats the best VAE"
        out.append(_paired_claim(f"{claim} in L_K", "test_log_likelihood", lvae[0], vae[0], paper_lk))
        out.append(_paired_claim(f"{claim} in L1", "test_elbo", lvae[0], vae[0], paper_l1))
        if len(lvae[0].results.test_kl_per_layer) == len(vae[0].results.test_kl_per_layer):
            out.append(_active_unit_claim(vae[0], lvae[0], upper="above z1"))
        else:  # Figs. 4-5 compare models of one depth: side by side only
            out += ["", "The two runs have different depths, so their units are shown side by side, without a verdict."]
        out += _units_table([lvae[0], vae[0]])
        name = "full_units.png"
        labels = {_label(r): r for r in (lvae[0], vae[0])}
        _units_figure(labels, "Full-length runs: KL and active units per layer (Figs. 4-6)", figures / name)
        out += ["", f"![KL and active units per layer]({figures_rel}/{name})"]
    return out


def _train_command(r: RunResult) -> str:
    """The ``pyro-lvae train`` command of a full-length run: its preset and the monitoring
    options it changed."""
    changed = _differences(r.config, PRESETS[r.preset])
    options = "".join(f" --{key.replace('_', '-')} {value}" for key, value in sorted(changed.items()))
    return f"pyro-lvae train --preset {r.preset}{options} --out runs/full/{r.run}"


def _units_table(runs: list[RunResult]) -> list[str]:
    """Active units per layer (Figs. 4-6) by both measures, and KL per layer."""
    depth = max(len(r.results.test_kl_per_layer) for r in runs)
    out = [
        "",
        "Active units per layer (Figs. 4–6), by Burda's measure (Cov_x E_q[u] > 0.01) / by a "
        "mean KL above 0.01 nats, and KL per layer in nats:",
        "",
        "| layer | " + " | ".join(_label(r) for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i in range(depth):
        cells = []
        for r in runs:
            res = r.results
            if i >= len(res.test_kl_per_layer):
                cells.append("—")
                continue
            informative = _informative_units(res)[i] if res.test_kl_per_unit else "—"
            active = res.test_active_units[i] if res.test_active_units else "—"
            size = r.config.model.latent_sizes[i]
            cells.append(f"{active} / {informative} of {size}; KL {res.test_kl_per_layer[i]:.2f}")
        out.append(f"| z{i + 1} | " + " | ".join(cells) + " |")
    return out


def _setting_section(setting: str, runs: list[RunResult], figures: Path, figures_rel: str) -> list[str]:
    title, note = SETTINGS[setting]
    out = [f"## {title}", ""] + ([note, ""] if note else [])
    out += ["Reproduce with:", "", "```bash"]
    for grid in sorted({r.sweep for r in runs}):
        out.append(_command(grid, [r for r in runs if r.sweep == grid]))
    out += ["```", ""] + _schedule(runs) + [""]
    table, finetuned = _by_variant_and_depth(runs)
    k = "/".join(map(str, sorted({r.results.num_importance_samples for r in runs})))
    out += _depth_table(setting, table, k)
    if finetuned:
        out += _finetuning_table(table.get(("lvae-bn-wu", 5), []), finetuned)
    if len({v for v, _ in table}) > 1:
        name = f"{setting}_layers.png"
        _layers_figure(table, title, figures / name)
        out += [f"![L1 and L_K against the number of layers]({figures_rel}/{name})", ""]
    pair = {VARIANTS[v]: table[v, 5][0] for v in ("vae-bn-wu", "lvae-bn-wu") if (v, 5) in table}
    if len(pair) == 2 and all(r.results.test_active_units is not None for r in pair.values()):
        name = f"{setting}_units.png"
        _units_figure(pair, f"{title}: five layers", figures / name)
        out += [f"![KL and active units per layer, 5 layers]({figures_rel}/{name})", ""]
    claims = _claims(table, "test_log_likelihood")
    if claims:
        out += [f"**The paper's claims at this length** (on the measured L_{k}):", ""] + claims + [""]
    return out


def _by_variant_and_depth(
    runs: list[RunResult],
) -> tuple[dict[tuple[str, int], list[RunResult]], dict[str, list[RunResult]]]:
    """The runs by (variant, depth), and the fine-tuned ones by preset."""
    table: dict[tuple[str, int], list[RunResult]] = {}
    finetuned: dict[str, list[RunResult]] = {}
    for r in runs:
        _, variant, depth, ft = split_preset(r.preset)  # type: ignore[misc]
        if ft:
            finetuned.setdefault(r.preset, []).append(r)
        else:
            table.setdefault((variant, depth), []).append(r)
    return table, finetuned


def _depth_table(setting: str, table: dict[tuple[str, int], list[RunResult]], k: str) -> list[str]:
    """Fig. 3 / Table 2 as a table: one row per variant and depth, paper beside measured
    (and −L_K in bits per dimension for dequantized runs)."""
    density = setting in ("norb-gauss", "fashion-gauss")
    bits = bool(table) and all(r.results.test_bits_per_dim is not None for rs in table.values() for r in rs)
    unit = "nats per example (a density: higher is better)" if density else "nats per example"
    if bits:
        unit = (
            "nats per image of the discrete 8-bit images (higher is better); −L_K in bits per "
            "dimension (lower is better)"
        )
    extra = f" measured −L_{k}, bits/dim |" if bits else ""
    out = [
        f"| model | layers | paper L_5000 | measured L_{k} | measured L1 (ELBO) |{extra} epochs | seeds |",
        "|---|---|---|---|---|---|---|" + ("---|" if bits else ""),
    ]
    for variant, label in VARIANTS.items():
        for depth in range(1, 6):
            rs = table.get((variant, depth))
            if not rs:
                continue
            preset = PresetInfo(setting, variant, depth).name
            bpd = f" {_fmt(_mean([r.results.test_bits_per_dim for r in rs]), 3)} |" if bits else ""
            out.append(
                f"| {label} (`{preset}`) | {depth} | {_fmt(PAPER_L5000.get(preset))} "
                f"| {_fmt(_mean([r.results.test_log_likelihood for r in rs]))} "
                f"| {_fmt(_mean([r.results.test_elbo for r in rs]))} |{bpd}"
                f" {rs[0].results.epochs} | {', '.join(str(r.config.train.seed) for r in rs)} |"
            )
    out += ["", f"Units: {unit}.", ""]
    if setting == "mnist":
        out.append(
            f"The paper quotes test L1 = {PAPER_L1['lvae-bn-wu-5']} for the 5-layer LVAE and "
            f"{PAPER_L1['vae-bn-wu-3']} for the best VAE (3 layers), and L_5000 = {PAPER_BEST_VAE_L5000} for the "
            "best VAE; Fig. 3's other values are not printed in the paper."
        )
        out.append("")
    return out


def _finetuning_table(base: list[RunResult], finetuned: dict[str, list[RunResult]]) -> list[str]:
    """Table 1: the 5-layer LVAE without and with fine-tuning."""
    out = [
        "### Fine-tuning (Table 1)",
        "",
        "| model | paper L_5000 | measured L_K | measured L1 | training + fine-tuning epochs | M × K samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in base[:1]:
        out.append(
            f"| LVAE, 5-layer (`{r.preset}`) | {_fmt(PAPER_L5000.get(r.preset))} "
            f"| {_fmt(r.results.test_log_likelihood)} "
            f"| {_fmt(r.results.test_elbo)} | {r.results.epochs} + 0 | 1 × 1 |"
        )
    for preset in sorted(finetuned):
        for r in finetuned[preset]:
            t = r.config.train
            out.append(
                f"| LVAE, 5-layer + fine-tuning{' + IW=10' if preset.endswith('iw10') else ''} (`{preset}`) "
                f"| {_fmt(PAPER_L5000.get(preset))} | {_fmt(r.results.test_log_likelihood)} "
                f"| {_fmt(r.results.test_elbo)} "
                f"| {t.epochs} + {t.finetune_epochs} | {t.finetune_mc_samples} × {t.finetune_iw_samples} |"
            )
    base_cfg = base[0].config.to_dict()["train"] if base else None
    for rs in finetuned.values():
        ft_cfg = rs[0].config.to_dict()["train"]
        same = base_cfg is not None and all(ft_cfg[k] == base_cfg[k] for k in base_cfg if not k.startswith("finetune_"))
        if not same:
            out += [
                "",
                f"Note: `{rs[0].preset}` was not trained with the same settings as the row without fine-tuning.",
            ]
            break
    out.append("")
    return out


#: Settings whose runs without dequantization are not shown, and why: one paragraph each.
WITHDRAWN = {
    "fashion-gauss": (
        "**Withdrawn.** These runs fit a continuous density (Gaussian likelihood) to 8-bit "
        "grey levels without dequantization. Such a density can grow without bound on the 256 "
        "discrete values, so the nats measure nothing comparable: one run shows an ELBO of "
        "−3.90 against an L_1000 of +153.04, and the effects of batch norm appear as hundreds "
        "of nats. The runs stay in `experiments/table2-fashion-gauss` for the record; the table "
        "returns when the setting is rerun with dequantization (uniform noise on the 256 levels "
        "and the matching −D log 256 offset) and reported in nats and bits per dimension."
    ),
}


def render_results_page(runs: list[RunResult], figures: Path, figures_rel: str) -> str:
    """The Markdown of the results page; writes its figures into ``figures``.

    :param runs: The finished runs (:func:`load_runs`).
    :param figures: Folder for the PNGs.
    :param figures_rel: That folder as the page links it.
    """
    figures.mkdir(parents=True, exist_ok=True)
    by_setting: dict[str, list[RunResult]] = {}
    other = []
    full = []
    for r in runs:
        parts = split_preset(r.preset)
        if is_full_length(r):
            full.append(r)
        elif parts is None:
            other.append(r)
        else:
            by_setting.setdefault(parts[0], []).append(r)
    lines = [
        "# Results",
        "",
        "<!-- Generated by `pyro-lvae results-page`; do not edit by hand. Regenerate with the command below. -->",
        "",
        "Every measured number on this page is read from a run's `results.json`, and every paper number "
        "from `pyro_lvae/repro/paper.py`. The page was generated by:",
        "",
        "```bash",
        f"pyro-lvae results-page {' '.join(dict.fromkeys(r.sweep for r in runs))} --out docs/results.md",
        "```",
        "",
        "L_K is the importance-weighted bound of eq. 6 and L1 the ELBO, both averaged over the "
        "test examples, in nats per example. BN is batch normalization and WU the KL warm-up (β raised "
        "from 0 to 1 over the first epochs), as in the paper's names VAE+BN+WU and LVAE+BN+WU. "
        "The paper trains for 1500–2000 epochs and evaluates "
        "L_5000 on the full test set. Where a run is shorter, the schedule lines under its table "
        "say so, and its numbers are those of the shortened run, not estimates of the paper's.",
        "",
    ]
    if full:
        lines += _full_length_section(full, figures, figures_rel)
    for setting in SETTINGS:
        runs_here = by_setting.get(setting, [])
        if setting in WITHDRAWN:
            # Runs made with dequantization are shown; the others are withdrawn.
            valid = [r for r in runs_here if r.results.dequantized]
            if len(valid) < len(runs_here) and not valid:
                lines += [f"## {SETTINGS[setting][0]}", "", WITHDRAWN[setting], ""]
                continue
            runs_here = valid
        if runs_here:
            lines += _setting_section(setting, runs_here, figures, figures_rel)
    if other:
        lines += ["## Other runs", "", "| run | preset | L_K | L1 | K | epochs |", "|---|---|---|---|---|---|"]
        for r in other:
            lines.append(
                f"| {r.sweep}/{r.run} | `{r.preset}` | {_fmt(r.results.test_log_likelihood)} "
                f"| {_fmt(r.results.test_elbo)} "
                f"| {r.results.num_importance_samples} | {r.results.epochs} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_results_page(sweeps: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the results page ``out`` and its figures (in ``<out stem>_figures/`` beside it).

    :param sweeps: Sweep directories (each holding run directories with ``results.json``).
    :param out: The Markdown file, e.g. ``docs/results.md``.
    :returns: The path of the page.
    """
    out = Path(out)
    figures_rel = f"{out.stem}_figures"
    text = render_results_page(load_runs(sweeps), out.parent / figures_rel, figures_rel)
    out.write_text(text)
    return out
