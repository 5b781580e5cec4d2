"""What each epoch trains: the warm-up weight β, the learning rate and the objective, as a
pure function of the configuration and the epoch number.

Training epochs use β from the linear warm-up (eq. 20,
:func:`~pyro_lvae.inference.warmup.warmup_beta`) and the configured learning rate; the
``finetune_epochs`` after them use β = 1, the importance-weighted bound and a learning
rate multiplied by ``finetune_lr_decay`` every ``finetune_decay_every`` epochs (paper §3).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..config import ExperimentConfig
from ..inference.warmup import warmup_beta


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains.

    :param beta: The warm-up weight β of the KL terms.
    :param learning_rate: Adam's learning rate.
    :param finetuning: Whether the epoch fine-tunes on the importance-weighted bound.
    """

    beta: float
    learning_rate: float
    finetuning: bool


def epoch_plan(config: ExperimentConfig, epoch: int) -> EpochPlan:
    """The plan of 0-based ``epoch``, counting the training epochs first.

    :param config: The run's configuration.
    :param epoch: The 0-based epoch.

    >>> from pyro_lvae.repro.presets import get_preset
    >>> epoch_plan(get_preset("lvae-bn-wu-5-ft"), 100)
    EpochPlan(beta=0.5, learning_rate=0.001, finetuning=False)
    >>> epoch_plan(get_preset("lvae-bn-wu-5-ft"), 2000).finetuning
    True
    """
    finetuning = epoch >= config.train.epochs
    beta = 1.0 if finetuning else warmup_beta(epoch, config.train.warmup_epochs)
    return EpochPlan(beta=beta, learning_rate=finetune_learning_rate(config, epoch), finetuning=finetuning)


def finetune_learning_rate(config: ExperimentConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch``: ``learning_rate`` during training, then
    multiplied by ``finetune_lr_decay`` after every ``finetune_decay_every``
    fine-tuning epochs (paper §3: × 0.75 every 200).

    :param config: The run's configuration.
    :param epoch: The 0-based epoch, counting the training epochs first.

    >>> from pyro_lvae.repro.presets import get_preset
    >>> cfg = get_preset("lvae-bn-wu-5-ft")
    >>> [round(finetune_learning_rate(cfg, e), 8) for e in (1999, 2000, 2199, 2200, 2400)]
    [0.001, 0.001, 0.001, 0.00075, 0.0005625]
    """
    tc = config.train
    if epoch < tc.epochs:
        return tc.learning_rate
    decays = (epoch - tc.epochs) // tc.finetune_decay_every
    return tc.learning_rate * tc.finetune_lr_decay**decays


def is_evaluation_epoch(config: ExperimentConfig, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with the periodic evaluation: every ``eval_every``
    epochs, and the last.

    :param config: The run's configuration.
    :param epoch: The 0-based epoch.
    """
    tc = config.train
    return (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs + tc.finetune_epochs


def warn_about_schedule(config: ExperimentConfig) -> None:
    """Warn when the warm-up is longer than training, so that training ends at β < 1, and
    when free bits are combined with a warm-up.

    The final ELBO and L_K are always scored at β = 1, so such a run is scored on an
    objective it was never trained on. Free bits and a KL warm-up both keep the KL terms
    from collapsing early; most runs use one of them.

    :param config: The run's configuration.
    """
    tc = config.train
    if tc.free_bits > 0 and tc.warmup_epochs > 0:
        warnings.warn(
            f"free_bits={tc.free_bits} is combined with a KL warm-up of {tc.warmup_epochs} epochs; "
            "if you meant free bits alone, set warmup_epochs=0 (--warmup-epochs 0).",
            UserWarning,
            stacklevel=3,
        )
    final_beta = warmup_beta(tc.epochs - 1, tc.warmup_epochs)
    if final_beta < 1 and not tc.finetune_epochs:  # fine-tuning trains at β = 1
        warnings.warn(
            f"warmup_epochs={tc.warmup_epochs} is not shorter than epochs={tc.epochs}: training ends at "
            f"β = {final_beta:.3f} but is scored at β = 1; set warmup_epochs below epochs "
            f"(e.g. --warmup-epochs {max(1, tc.epochs // 2)}) or 0 for a variant without warm-up.",
            UserWarning,
            stacklevel=3,
        )
