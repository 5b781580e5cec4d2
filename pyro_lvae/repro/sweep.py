"""``pyro-lvae sweep``: a grid of presets × depths × seeds, run as parallel processes.

A grid file is TOML::

    # Figure 3 of the paper: four variants at 1-5 layers on MNIST.
    description = "Fig. 3: MNIST, VAE / VAE+BN / VAE+BN+WU / LVAE+BN+WU at 1-5 layers"
    presets = ["vae", "vae-bn", "vae-bn-wu", "lvae-bn-wu"]  # preset names without the depth
    depths = [1, 2, 3, 4, 5]                               # appended: "vae-bn-3"
    seeds = [0]

    [overrides]                                            # any configuration field
    num_importance_samples = 5000

Each (preset, depth, seed) is one run of ``pyro-lvae train`` in its own process, in
``OUT/{preset}-{depth}-seed{seed}``, with its log in ``train.log`` there. Leave
``depths`` out to name complete presets (``presets = ["lvae-bn-wu-5-ft"]``).

Two options of the sweep itself change every run:

* ``--epochs N`` shortens the paper's schedule to N training epochs and scales the
  rest of it by the same factor: warm-up (at least one epoch where the preset has
  warm-up, none where it has none), fine-tuning and its learning-rate decay interval
  (see :func:`shorten_schedule`). ``--set warmup_epochs=1`` would instead give
  warm-up to the variants without it.
* ``--set KEY=VALUE`` sets a field literally in every run, after the grid's own
  ``[overrides]`` and after ``--epochs``.

The sweep is resumable: a run whose ``results.json`` was written with the same
configuration is skipped, and a run with a checkpoint continues from it (``--resume``),
so an interrupted sweep is finished by running the same command again, and a sweep
whose ``epochs`` was raised continues every run from where it stopped. A failed run
does not stop the others; its log names the error.

At the end the results are aggregated into ``OUT/summary.json`` and
``OUT/summary.md`` (one row per run, and mean ± standard deviation over seeds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..config import ExperimentConfig, field_types, is_count, parse_field
from ..training.results_file import RunResults
from ..training.resume import can_resume_as
from ..training.run_files import CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME, PREVIOUS_NAME, RESULTS_NAME
from .presets import at_depth, get_preset

logger = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
GRID_KEYS = {"description", "presets", "depths", "seeds", "overrides"}


@dataclass(frozen=True)
class Grid:
    """A sweep: presets × depths × seeds with common overrides.

    :param presets: Preset names, without the depth when ``depths`` is given.
    :param depths: Depths appended to each preset name (``()`` = none).
    :param seeds: Seeds of every combination.
    :param overrides: Configuration fields set in every run.
    :param description: What the grid reproduces.
    :param epochs: Shorten every run's schedule to this many training epochs
        (:func:`shorten_schedule`; ``None`` keeps the presets' schedule).
    """

    presets: tuple[str, ...]
    depths: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    epochs: int | None = None

    def __post_init__(self) -> None:
        if not self.presets:
            raise ValueError("A grid needs at least one preset; add presets = [...] to the grid file.")
        if not self.seeds:
            raise ValueError("A grid needs at least one seed; add seeds = [0] to the grid file.")
        if self.epochs is not None and (
            isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs <= 0
        ):
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}.")
        self.runs()  # unknown presets and invalid overrides fail here, before any run

    def runs(self) -> list[Run]:
        """Every run of the grid, in file order (preset, then depth, then seed)."""
        names = [at_depth(p, d) for p in self.presets for d in self.depths] if self.depths else list(self.presets)
        runs = []
        for name in names:
            for seed in self.seeds:
                config = get_preset(name)
                if self.epochs is not None:
                    config = shorten_schedule(config, self.epochs)
                runs.append(Run(preset=name, seed=seed, config=config.replace(**{**self.overrides, "seed": seed})))
        return runs


def shorten_schedule(config: ExperimentConfig, epochs: int) -> ExperimentConfig:
    """The paper's schedule shortened to ``epochs`` training epochs, the rest scaled alike.

    Warm-up, fine-tuning epochs and the fine-tuning decay interval are multiplied by
    ``epochs / config.train.epochs`` and rounded, and kept at one epoch or more where
    the preset has them (a preset without warm-up keeps none).

    :param config: A preset.
    :param epochs: Training epochs of the shortened run.

    >>> from pyro_lvae.repro.presets import get_preset
    >>> t = shorten_schedule(get_preset("lvae-bn-wu-5-ft"), 100).train
    >>> t.epochs, t.warmup_epochs, t.finetune_epochs, t.finetune_decay_every
    (100, 10, 100, 10)
    >>> shorten_schedule(get_preset("vae-bn-5"), 100).train.warmup_epochs
    0
    """
    t = config.train
    factor = epochs / t.epochs

    def scaled(n: int) -> int:
        return 0 if n == 0 else max(1, round(n * factor))

    return config.replace(
        epochs=epochs,
        warmup_epochs=scaled(t.warmup_epochs),
        finetune_epochs=scaled(t.finetune_epochs),
        finetune_decay_every=scaled(t.finetune_decay_every) if t.finetune_epochs else t.finetune_decay_every,
    )


@dataclass(frozen=True)
class Run:
    """One run of a grid.

    :param preset: Full preset name, e.g. ``"vae-bn-3"``.
    :param seed: Its seed.
    :param config: Its configuration: the preset's, with the grid's changes.
    """

    preset: str
    seed: int
    config: ExperimentConfig

    @property
    def name(self) -> str:
        """Directory name of the run."""
        return f"{self.preset}-seed{self.seed}"

    def changes(self) -> dict[str, Any]:
        """The configuration fields in which the run differs from its preset."""
        preset = get_preset(self.preset).to_dict()
        ours = self.config.to_dict()
        return {
            key: value
            for section in ("model", "train")
            for key, value in ours[section].items()
            if value != preset[section][key]
        }

    def command(self, out_dir: Path, *, resume: bool, device: str, data_root: str | None) -> list[str]:
        """The ``pyro-lvae train`` command line of this run.

        :param out_dir: The run directory.
        :param resume: Continue from the checkpoint in it.
        :param device: ``cpu`` or ``cuda``.
        :param data_root: The data root, or ``None`` for the default.
        """
        cmd = [sys.executable, "-m", "pyro_lvae", "train", "--preset", self.preset, "--out", str(out_dir)]
        for key, value in sorted(self.changes().items()):
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = str(value).lower()
            cmd += ["--" + key.replace("_", "-"), str(value)]
        cmd += ["--device", device, "--no-progress"]
        if data_root is not None:
            cmd += ["--data-root", data_root]
        # Without a checkpoint nothing can be resumed: a partial metrics file of an
        # attempt killed in its first epoch is replaced.
        cmd.append("--resume" if resume else "--overwrite")
        return cmd


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` (``--set epochs=10``) into a configuration field and a typed value.

    :param text: The option's value.
    :raises ValueError: if the key is unknown or the value has the wrong type.
    """
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in field_types():
        raise ValueError(
            f"--set needs KEY=VALUE with a configuration field as KEY, got {text!r}; see `pyro-lvae train --help`."
        )
    try:
        return key, parse_field(key, raw)
    except ValueError as exc:
        raise ValueError(f"--set {exc}") from None


#: The grid files shipped with the package (``pyro-lvae sweep fig3`` finds ``fig3.toml``).
GRIDS_DIR = Path(__file__).parent / "grids"


def shipped_grids() -> list[str]:
    """Names of the grid files shipped with the package."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))


def load_grid(path: str | os.PathLike, *, overrides: dict[str, Any] | None = None, epochs: int | None = None) -> Grid:
    """Read a grid file.

    :param path: The TOML file, or the name of a shipped grid (:func:`shipped_grids`).
    :param overrides: Fields that replace the grid's own overrides (the sweep's ``--set``).
    :param epochs: Shorten the schedule to this many epochs (the sweep's ``--epochs``).
    :raises FileNotFoundError: if the file is missing.
    :raises ValueError: if it is not valid TOML or names unknown keys, presets or fields.
    """
    path = Path(path)
    if not path.exists() and (GRIDS_DIR / f"{path}.toml").exists():
        path = GRIDS_DIR / f"{path}.toml"
    if not path.exists():
        raise FileNotFoundError(
            f"Grid file {path} not found; give a path or a shipped grid: {', '.join(shipped_grids())}."
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"Grid file {path} is not valid TOML ({exc}); fix its syntax.") from exc
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise ValueError(f"Grid file {path} has unknown keys {sorted(unknown)}; use {sorted(GRID_KEYS)}.")
    grid_overrides = dict(data.get("overrides", {}))
    for key, value in grid_overrides.items():
        if isinstance(value, list):
            grid_overrides[key] = tuple(value)
    grid_overrides.update(overrides or {})
    return Grid(
        presets=tuple(data.get("presets", ())),
        depths=tuple(data.get("depths", ())),
        seeds=tuple(data.get("seeds", (0,))),
        overrides=grid_overrides,
        description=str(data.get("description", "")),
        epochs=epochs,
    )


def _stored_config(path: Path) -> ExperimentConfig | None:
    try:
        data = json.loads(path.read_text())
        return ExperimentConfig.from_dict(data.get("config", data))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, unreadable or foreign


def run_state(run: Run, out_dir: Path) -> str:
    """``"done"`` (results of this configuration exist), ``"resume"`` (a checkpoint of
    a run that this configuration extends exists) or ``"new"`` (nothing, or a run of
    another configuration, which is replaced).

    :param run: The run.
    :param out_dir: Its directory.
    """
    if _stored_config(out_dir / RESULTS_NAME) == run.config:
        return "done"
    has_checkpoint = (out_dir / CHECKPOINT_NAME).exists() or (out_dir / PREVIOUS_NAME).exists()
    if not has_checkpoint:
        return "new"
    stored = _stored_config(out_dir / CONFIG_NAME)
    # Without reading the checkpoint the sweep cannot tell whether fine-tuning has
    # started, so it allows only the changes that are valid either way.
    if stored is not None and not can_resume_as(stored, run.config, finetuning_started=True):
        logger.warning("%s holds a run of another configuration; it is replaced.", out_dir)
        return "new"
    return "resume"


def run_sweep(
    grid: Grid,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    device: str = "cpu",
    data_root: str | os.PathLike | None = None,
    threads_per_worker: int | None = None,
) -> list[dict[str, Any]]:
    """Run every run of ``grid`` that is not done, ``workers`` at a time, then aggregate.

    :param grid: The grid.
    :param out: The sweep directory.
    :param workers: Runs in parallel. On a GPU they share the device.
    :param device: ``cpu`` or ``cuda``.
    :param data_root: Data root passed to every run.
    :param threads_per_worker: CPU threads per run (default: the machine's cores
        divided by ``workers``).
    :returns: The summary rows (see :func:`aggregate`).
    """
    if not is_count(workers):
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = []
    for run in grid.runs():
        state = run_state(run, out / run.name)
        if state == "done":
            logger.info("%s: finished earlier, skipped.", run.name)
        else:
            pending.append((run, state))
    running: list[tuple[Run, subprocess.Popen, Any, float]] = []
    failed = []
    while pending or running:
        while pending and len(running) < workers:
            run, state = pending.pop(0)
            run_dir = out / run.name
            if state == "new" and run_dir.exists():
                shutil.rmtree(run_dir)  # a run of another configuration, or a failed start
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / LOG_NAME, "a")
            cmd = run.command(
                run_dir,
                resume=state == "resume",
                device=device,
                data_root=None if data_root is None else str(data_root),
            )
            log.write(" ".join(cmd) + "\n")
            log.flush()
            logger.info("%s: %s.", run.name, "resuming" if state == "resume" else "starting")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((run, proc, log, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            run, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode == 0:
                logger.info("%s: finished in %.0f s.", run.name, time.perf_counter() - t0)
            else:
                failed.append(run.name)
                logger.error("%s: failed (exit %d); see %s.", run.name, proc.returncode, out / run.name / LOG_NAME)
    rows = aggregate(grid, out)
    if failed:
        logger.error("%d run(s) failed: %s.", len(failed), ", ".join(failed))
    return rows


def aggregate(grid: Grid, out: str | os.PathLike) -> list[dict[str, Any]]:
    """Collect the runs' ``results.json`` into ``summary.json`` and ``summary.md``.

    :param grid: The grid.
    :param out: The sweep directory.
    :returns: One row per run: ``run``, ``preset``, ``seed``, ``status`` (``done`` or
        ``missing``) and, when done, ``epochs``, ``test_elbo``, ``test_log_likelihood``,
        ``num_importance_samples``, ``num_test_examples``, ``device`` and ``date``.
    """
    out = Path(out)
    rows = []
    for run in grid.runs():
        row: dict[str, Any] = {"run": run.name, "preset": run.preset, "seed": run.seed}
        r = _finished(run, out / run.name)
        if r is not None:
            row |= {
                "status": "done",
                "epochs": r.epochs,
                "test_elbo": r.test_elbo,
                "test_log_likelihood": r.test_log_likelihood,
                "num_importance_samples": r.num_importance_samples,
                "num_test_examples": r.num_test_examples,
                "device": r.device,
                "date": r.date,
            }
        else:
            row["status"] = "missing"
        rows.append(row)
    (out / SUMMARY_JSON).write_text(json.dumps({"description": grid.description, "runs": rows}, indent=2) + "\n")
    (out / SUMMARY_MD).write_text(summary_markdown(grid, rows))
    return rows


def _finished(run: Run, out_dir: Path) -> RunResults | None:
    """The run's results, or ``None`` when it is not done or its results.json is unreadable."""
    if run_state(run, out_dir) != "done":
        return None
    try:
        return RunResults.load(out_dir / RESULTS_NAME)
    except (ValueError, KeyError, TypeError) as exc:  # written by another pyro-lvae version, or damaged
        logger.warning("Counting %s as missing: %s", out_dir.name, exc)
        return None


def _mean_std(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def summary_markdown(grid: Grid, rows: list[dict[str, Any]]) -> str:
    """The aggregate table of a sweep, one row per preset, mean ± std over its finished seeds.

    :param grid: The grid.
    :param rows: The rows from :func:`aggregate`.
    """
    lines = [
        f"# Sweep summary\n\n{grid.description}\n",
        "| preset | seeds done | epochs | test L1 | test L_K | K | test examples |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        done = [r for r in rows if r["preset"] == preset and r["status"] == "done"]
        total = sum(1 for r in rows if r["preset"] == preset)
        if not done:
            lines.append(f"| `{preset}` | 0/{total} | | | | | |")
            continue
        lines.append(
            f"| `{preset}` | {len(done)}/{total} | {done[0]['epochs']} | {_mean_std([r['test_elbo'] for r in done])} "
            f"| {_mean_std([r['test_log_likelihood'] for r in done])} | {done[0]['num_importance_samples']} "
            f"| {done[0]['num_test_examples']} |"
        )
    return "\n".join(lines) + "\n"
