"""Training a run.

* :mod:`.loop` — :func:`~pyro_lvae.training.loop.train`, the epoch loop;
* :mod:`.steps` — one optimization step, with the ``fast`` or the ``svi`` engine;
* :mod:`.skipping` — which updates are skipped (non-finite, or an exploding gradient norm);
* :mod:`.ema` — the moving average of the weights that evaluations use;
* :mod:`.schedule` — what each epoch trains (β, learning rate, objective);
* :mod:`.batches` — the data on the device and each epoch's minibatches;
* :mod:`.run_dir`, :mod:`.run_files`, :mod:`.checkpoint` — the run directory;
* :mod:`.resume` — which configuration a run may be resumed with;
* :mod:`.signals` — stopping cleanly on SIGINT/SIGTERM;
* :mod:`.results` — the final evaluation, ``results.json``;
* :mod:`.distributed` — data-parallel processes;
* :mod:`.tensorboard` — TensorBoard event files.

The names below are importable from here (``from pyro_lvae.training import train``), as
they were from the single module this package replaced.
"""

import importlib
from typing import Any

# Loaded on first use, so that the modules below ``training`` (the run-file names, the
# distributed helpers) can be imported by analysis code without importing the loop.
_NAMES = {
    "PreparedData": "batches",
    "epoch_batches": "batches",
    "epoch_seed": "batches",
    "prepare_data": "batches",
    "TrainResult": "loop",
    "train": "loop",
    "can_resume_as": "resume",
    "RunResults": "results_file",
    "discrete_offset": "results",
    "evaluate_run": "results",
    "final_results": "results",
    "load_run": "run_dir",
    "RESULTS_NAME": "run_files",
    "finetune_learning_rate": "schedule",
    "warn_about_schedule": "schedule",
    "TrainingInterrupted": "signals",
}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))


__all__ = sorted(_NAMES)
