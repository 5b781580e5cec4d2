"""A run directory as the trainer uses it: created or checked against ``resume`` and
``overwrite``, its metric lines, configuration, results and checkpoints, and the model and
guide rebuilt from it (:func:`load_run`).

The file names are those of :mod:`pyro_lvae.training.run_files`. In a data-parallel run
every process holds a :class:`RunDirectory`, and only rank 0's (``writer=True``) writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyro
import torch

from ..config import ExperimentConfig
from ..models.families import make_guide, make_model
from .checkpoint import load_checkpoint, save_checkpoint
from .results_file import write_json_atomic
from .run_files import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, PREVIOUS_NAME, RESULTS_NAME

logger = logging.getLogger(__name__)


def read_metrics(run_dir: str | os.PathLike, up_to_epoch: int) -> list[dict[str, Any]]:
    """The metric lines of epochs ≤ ``up_to_epoch`` (later ones were not checkpointed).

    :param run_dir: The run directory.
    :param up_to_epoch: The last epoch to keep.
    """
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise ValueError(
                    f"Line {number} of {path} is not JSON ({exc.msg}); repair or delete that line, then resume."
                ) from exc
            # The last line was cut short (the process stopped or the disk filled while appending
            # it); its epoch was not checkpointed yet, since the line is written first.
            logger.warning("Ignoring the incomplete last line of %s.", path)
    return [r for r in records if r["epoch"] <= up_to_epoch]


class RunDirectory:
    """The files of one run.

    :param path: The directory.
    :param writer: Whether this process writes (rank 0); the others only read.
    """

    def __init__(self, path: str | os.PathLike, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    @classmethod
    def prepare(cls, path: str | os.PathLike, *, resume: bool, overwrite: bool, writer: bool = True) -> RunDirectory:
        """Check ``path`` against ``resume``/``overwrite``; the writer also clears or creates it.

        :param path: The run directory.
        :param resume: Continue the run in it.
        :param overwrite: Replace the run in it.
        :param writer: Whether this process writes.
        :raises ValueError: if both ``resume`` and ``overwrite`` are set.
        :raises FileNotFoundError: on ``resume`` with nothing to resume.
        :raises FileExistsError: if it holds a run and neither option is set.
        """
        run = cls(path, writer=writer)
        if resume and overwrite:
            raise ValueError("Choose either --resume or --overwrite, not both.")
        has_run = (run.path / CHECKPOINT_NAME).exists() or (run.path / METRICS_NAME).exists()
        if resume and not has_run:
            raise FileNotFoundError(f"Nothing to resume in {run.path}: no checkpoint; drop --resume to start the run.")
        checkpoints = [run.path / name for name in (CHECKPOINT_NAME, PREVIOUS_NAME)]
        if resume and not any(p.exists() for p in checkpoints):
            raise FileNotFoundError(
                f"Nothing to resume in {run.path}: the run stopped before its first checkpoint; start it again "
                "with --overwrite."
            )
        if has_run and not resume and not overwrite:
            raise FileExistsError(
                f"{run.path} already holds a run; pass --resume to continue it or --overwrite to replace it."
            )
        if writer:
            if has_run and not resume:
                shutil.rmtree(run.path)
            run.path.mkdir(parents=True, exist_ok=True)
        return run

    def metrics(self, up_to_epoch: int) -> list[dict[str, Any]]:
        """The metric lines of the checkpointed epochs.

        :param up_to_epoch: The checkpoint's completed epochs.
        """
        return read_metrics(self.path, up_to_epoch)

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` by ``records`` (on resume, the lines after the checkpoint go).

        :param records: The metric lines to keep.
        """
        if self.writer:  # through a temporary file and a rename: an interruption keeps the old lines
            tmp = self.path / (METRICS_NAME + ".tmp")
            tmp.write_text("".join(json.dumps(m) + "\n" for m in records))
            os.replace(tmp, self.path / METRICS_NAME)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's line to ``metrics.jsonl``.

        :param record: The epoch's metrics.
        """
        if self.writer:
            with open(self.path / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_config(self, config: ExperimentConfig) -> None:
        """Write ``config.json``.

        :param config: The run's configuration.
        """
        if self.writer:
            write_json_atomic(self.path / CONFIG_NAME, config.to_dict())

    def write_results(self, results: Any) -> None:
        """Write ``results.json`` (and ``per_example.npz``, :meth:`~pyro_lvae.training.results_file.RunResults.save`).

        :param results: A :class:`~pyro_lvae.training.results_file.RunResults`.
        """
        if self.writer:
            results.save(self.path / RESULTS_NAME)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write the checkpoint atomically (:func:`~pyro_lvae.training.checkpoint.save_checkpoint`).

        :param state: The checkpoint's contents.
        """
        if self.writer:
            save_checkpoint(self.path, state)

    def load_checkpoint(self) -> dict[str, Any]:
        """The newest complete checkpoint (:func:`~pyro_lvae.training.checkpoint.load_checkpoint`)."""
        return load_checkpoint(self.path)


#: The choices of :func:`load_run`'s ``weights``.
WEIGHTS = ("auto", "ema", "raw")


def load_run(
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    weights: str = "auto",
) -> tuple[torch.nn.Module, torch.nn.Module, ExperimentConfig, dict[str, Any]]:
    """Rebuild the model and guide of a run from its newest checkpoint.

    :param run_dir: The run directory.
    :param device: Where to put the model and guide.
    :param weights: ``"auto"``: the moving average of the weights when the run kept one
        (``ema`` > 0), else the raw weights; ``"ema"`` or ``"raw"`` to choose.
    :returns: ``(model, guide, config, checkpoint)``, in evaluation mode; ``checkpoint["weights"]``
        says which weights were loaded (``"ema"`` or ``"raw"``).
    :raises ValueError: for an unknown ``weights``, or ``"ema"`` for a run without an average.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}.")
    if Path(run_dir).is_file():
        raise ValueError(
            f"{run_dir} is a file; give load_run the run directory (a pretrained .pt loads with load_pretrained)."
        )
    ckpt = load_checkpoint(run_dir)
    average = ckpt.get("ema")
    if weights == "ema" and average is None:
        raise ValueError(f"{run_dir} kept no moving average of its weights (trained without --ema); use weights='raw'.")
    ckpt["weights"] = "ema" if average is not None and weights != "raw" else "raw"
    states = average if ckpt["weights"] == "ema" else ckpt
    config = ExperimentConfig.from_dict(ckpt["config"])
    pyro.clear_param_store()
    model = make_model(config.model)
    guide = make_guide(model)
    try:
        model.load_state_dict(states["model"])
        guide.load_state_dict(states["guide"])
    except RuntimeError as exc:
        raise ValueError(
            f"The checkpoint in {run_dir} does not match its own configuration ({exc}); it is corrupt."
        ) from exc
    model.to(device).eval()
    guide.to(device).eval()
    return model, guide, config, ckpt
