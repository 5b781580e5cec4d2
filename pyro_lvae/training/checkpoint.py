"""Atomic, resumable training checkpoints.

A checkpoint holds everything needed to continue a run exactly: the
configuration, the number of completed epochs, the state of the model and guide
modules (parameters and batch-norm statistics), the state of Pyro's optimizer
and every random number generator. It is written to a temporary file in the same
folder, flushed and fsynced, and renamed over ``checkpoint.pt``; the previous
checkpoint is kept as ``checkpoint.prev.pt``. A crash at any moment therefore
leaves at least one complete checkpoint, and :func:`load_checkpoint` falls back
to the previous one if the newest is missing or unreadable.

Checkpoints are loaded with ``torch.load(weights_only=False)`` (the RNG state
holds NumPy arrays): load only checkpoints you trust.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .run_files import CHECKPOINT_NAME, PREVIOUS_NAME

logger = logging.getLogger(__name__)

FORMAT = "pyro-lvae-checkpoint"
VERSION = 1


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` as ``run_dir/checkpoint.pt``.

    :param run_dir: The run directory (created if needed).
    :param state: Picklable checkpoint contents; ``format`` and ``version`` keys are added.
    :returns: The checkpoint path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    tmp = run_dir / (CHECKPOINT_NAME + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written copy; the last checkpoint stays
        raise
    if path.exists():
        os.replace(path, run_dir / PREVIOUS_NAME)
    os.replace(tmp, path)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro-lvae checkpoint.")
    if state.get("version") != VERSION:
        raise ValueError(
            f"{path} has checkpoint version {state.get('version')}, this pyro-lvae reads version {VERSION}; "
            "use the pyro-lvae release that wrote it."
        )
    return state


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read the newest complete checkpoint of ``run_dir``.

    :param run_dir: The run directory; its ``checkpoint.pt`` is read, or the
        previous one if that is unreadable.
    :raises FileNotFoundError: if the run has no checkpoint.
    :raises ValueError: if no checkpoint in it is readable.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_NAME]
    existing = [p for p in candidates if p.exists()]
    if not existing:
        raise FileNotFoundError(f"No checkpoint in {run_dir}; train the run first (pyro-lvae train --out {run_dir}).")
    errors = []
    for path in existing:
        try:
            return _read(path)
        except Exception as exc:  # truncated, corrupt or foreign file: try the previous one
            logger.warning("Could not read checkpoint %s (%s); trying the previous one.", path, exc)
            errors.append(f"{path.name}: {exc}")
    raise ValueError(
        f"Every checkpoint in {run_dir} is unreadable ({'; '.join(errors)}); start again with --overwrite."
    )
