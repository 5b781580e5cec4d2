"""What each epoch trains, as a pure function of the configuration and the epoch."""

from __future__ import annotations

import pytest

from pyro_lvae import get_preset
from pyro_lvae.training.schedule import epoch_plan, is_evaluation_epoch


def test_the_plan_follows_warm_up_then_fine_tuning():
    cfg = get_preset("lvae-bn-wu-5-ft").replace(epochs=4, warmup_epochs=2, finetune_epochs=5, finetune_decay_every=2)
    plans = [epoch_plan(cfg, e) for e in range(9)]
    assert [p.beta for p in plans] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [p.finetuning for p in plans] == [False] * 4 + [True] * 5
    lr = cfg.train.learning_rate
    assert [p.learning_rate for p in plans] == pytest.approx([lr] * 6 + [lr * 0.75] * 2 + [lr * 0.75**2])


def test_evaluation_epochs_are_every_eval_every_and_the_last():
    cfg = get_preset("vae-1").replace(epochs=7, eval_every=3)
    assert [e + 1 for e in range(7) if is_evaluation_epoch(cfg, e)] == [3, 6, 7]
