"""Which configuration a run may be resumed with: one rule, used by the trainer and the sweep.

A run may be continued with a configuration that differs from the stored one only in
:data:`RESUMABLE_FIELDS`, and, until fine-tuning has started, in
:data:`FINETUNE_SETTINGS`. Everything else (the model, the data, the seed, the
optimizer settings) would make the resumed run a different experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ExperimentConfig

#: ``TrainConfig`` fields a resumed run may change: it may be extended, evaluated
#: differently or allowed more skipped steps, or skip by another gradient-norm threshold
#: (to rescue a run that a fixed threshold froze).
RESUMABLE_FIELDS = (
    "epochs",
    "eval_every",
    "num_importance_samples",
    "finetune_epochs",
    "max_consecutive_skips",
    "skip_threshold",
)

#: The fine-tuning settings, which may change until fine-tuning has started.
FINETUNE_SETTINGS = ("finetune_mc_samples", "finetune_iw_samples", "finetune_lr_decay", "finetune_decay_every")


def _comparable(config: ExperimentConfig, *, finetuning_started: bool) -> dict[str, Any]:
    d = config.to_dict()
    free = RESUMABLE_FIELDS if finetuning_started else RESUMABLE_FIELDS + FINETUNE_SETTINGS
    for key in free:
        d["train"].pop(key)
    return d


def changed_fields(stored: ExperimentConfig, config: ExperimentConfig) -> list[str]:
    """The training settings ``config`` changes from ``stored``, each as ``"name old → new"``
    (the trainer logs them on resume, so that none changes unnoticed).

    :param stored: The configuration in the checkpoint.
    :param config: The configuration to continue with.
    """
    old, new = stored.to_dict()["train"], config.to_dict()["train"]
    return [f"{name} {old[name]!r} → {new[name]!r}" for name in old if old[name] != new.get(name)]


def can_resume_as(stored: ExperimentConfig, config: ExperimentConfig, *, finetuning_started: bool) -> bool:
    """Whether a run written with ``stored`` may be resumed with ``config``.

    :param stored: The configuration in the checkpoint.
    :param config: The configuration to continue with.
    :param finetuning_started: Whether the checkpoint is past the training epochs.
    """
    return _comparable(stored, finetuning_started=finetuning_started) == _comparable(
        config, finetuning_started=finetuning_started
    )


def check_resume(stored: ExperimentConfig, config: ExperimentConfig, *, epochs_done: int, run_dir: Path) -> None:
    """Raise when the run in ``run_dir`` cannot be continued with ``config``.

    :param stored: The configuration in its checkpoint.
    :param config: The configuration to continue with.
    :param epochs_done: Completed epochs in the checkpoint.
    :param run_dir: The run directory, named in the error.
    :raises ValueError: with the fix, if fewer epochs are asked for than are done, if the
        configurations differ beyond the rule, or if a fine-tuning run is resumed with another
        number of training epochs.
    """
    started = epochs_done > stored.train.epochs
    asked = config.train.epochs + config.train.finetune_epochs
    if asked < epochs_done:
        raise ValueError(
            f"The run in {run_dir} has done {epochs_done} epochs, more than the {asked} asked for "
            f"(epochs + finetune_epochs); resume it with at least that many, e.g. --epochs {stored.train.epochs} "
            f"--finetune-epochs {max(0, epochs_done - stored.train.epochs)}."
        )
    if not can_resume_as(stored, config, finetuning_started=started):
        raise ValueError(
            f"The checkpoint in {run_dir} was written with a different configuration; "
            f"resume with the same preset and options (only {', '.join(RESUMABLE_FIELDS)} may change, and the "
            "other fine-tuning settings until fine-tuning starts), or use --overwrite."
        )
    if epochs_done > config.train.epochs and stored.train.epochs != config.train.epochs:
        raise ValueError(
            f"The run in {run_dir} is fine-tuning after {stored.train.epochs} training epochs; "
            f"resume it with --epochs {stored.train.epochs}."
        )
