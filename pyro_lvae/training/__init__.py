"""Training a run: the loop (:mod:`.loop`), the two step engines (:mod:`.steps`), the run
directory, checkpoints, signals, RNG state and data-parallel processes.

The names of :mod:`pyro_lvae.training.loop` are importable from here
(``from pyro_lvae.training import train``).
"""

import importlib
from typing import Any

# Loaded on first use, so that modules below ``training`` (the run-file names, the
# distributed helpers) can be imported by analysis code without importing the loop.
_LOOP_NAMES = {
    "PreparedData",
    "TrainResult",
    "TrainingInterrupted",
    "can_resume_as",
    "discrete_offset",
    "epoch_batches",
    "epoch_seed",
    "evaluate_run",
    "final_results",
    "finetune_learning_rate",
    "load_run",
    "prepare_data",
    "train",
    "warn_about_schedule",
}


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        return getattr(importlib.import_module(".loop", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LOOP_NAMES)
