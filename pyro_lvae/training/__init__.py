"""Training a run: the loop (:mod:`.loop`), the two step engines (:mod:`.steps`), the run
directory, checkpoints, signals, RNG state and data-parallel processes.

The names of :mod:`pyro_lvae.training.loop` are importable from here
(``from pyro_lvae.training import train``).
"""

from .loop import (
    PreparedData,
    TrainingInterrupted,
    TrainResult,
    can_resume_as,
    discrete_offset,
    epoch_batches,
    epoch_seed,
    evaluate_run,
    final_results,
    finetune_learning_rate,
    load_run,
    prepare_data,
    train,
    warn_about_schedule,
)

__all__ = [
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
]
