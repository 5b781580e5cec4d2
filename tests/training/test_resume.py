"""One rule for which configuration a run may be resumed with."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyro_lvae import get_preset
from pyro_lvae.training.resume import FINETUNE_SETTINGS, RESUMABLE_FIELDS, can_resume_as, changed_fields, check_resume

CHANGED = {
    "epochs": 3000,
    "eval_every": 7,
    "num_importance_samples": 100,
    "finetune_epochs": 10,
    "max_consecutive_skips": 3,
    "skip_threshold": "auto",
    "finetune_mc_samples": 3,
    "finetune_iw_samples": 4,
    "finetune_lr_decay": 0.5,
    "finetune_decay_every": 9,
}


@pytest.mark.parametrize("field", RESUMABLE_FIELDS)
def test_each_resumable_field_may_change(field):
    stored = get_preset("lvae-bn-wu-5")
    assert can_resume_as(stored, stored.replace(**{field: CHANGED[field]}), finetuning_started=True)


@pytest.mark.parametrize("field", FINETUNE_SETTINGS)
def test_fine_tuning_settings_may_change_only_until_fine_tuning_starts(field):
    stored = get_preset("lvae-bn-wu-5-ft")
    changed = stored.replace(**{field: CHANGED[field]})
    assert can_resume_as(stored, changed, finetuning_started=False)
    assert not can_resume_as(stored, changed, finetuning_started=True)


@pytest.mark.parametrize(
    "change", [{"learning_rate": 2e-3}, {"seed": 1}, {"batch_norm": False}, {"ema": 0.999}, {"valid_size": 100}]
)
def test_anything_else_may_not(change):
    stored = get_preset("lvae-bn-wu-5")
    assert not can_resume_as(stored, stored.replace(**change), finetuning_started=False)
    with pytest.raises(ValueError, match="only epochs, eval_every, num_importance_samples"):
        check_resume(stored, stored.replace(**change), epochs_done=3, run_dir=Path("run"))


def test_a_fine_tuning_run_keeps_its_number_of_training_epochs():
    stored = get_preset("lvae-bn-wu-5-ft").replace(epochs=10)
    with pytest.raises(ValueError, match="resume it with --epochs 10"):
        check_resume(stored, stored.replace(epochs=8), epochs_done=11, run_dir=Path("run"))


def test_a_resume_that_asks_for_fewer_epochs_than_done_is_refused_with_the_numbers():
    stored = get_preset("lvae-bn-wu-5").replace(epochs=10)
    with pytest.raises(
        ValueError, match=r"has done 8 epochs, more than the 5 asked for .*--epochs 10 --finetune-epochs 0"
    ):
        check_resume(stored, stored.replace(epochs=5), epochs_done=8, run_dir=Path("run"))
    with pytest.raises(ValueError, match=r"has done 12 epochs, more than the 11 asked for .*--finetune-epochs 2"):
        check_resume(
            stored.replace(finetune_epochs=3), stored.replace(finetune_epochs=1), epochs_done=12, run_dir=Path("r")
        )
    check_resume(stored, stored.replace(epochs=8), epochs_done=8, run_dir=Path("run"))  # as many as done: fine


def test_every_changed_setting_is_named_with_its_old_and_new_value():
    stored = get_preset("lvae-bn-wu-5").replace(epochs=10)
    assert changed_fields(stored, stored) == []
    changes = changed_fields(stored, stored.replace(epochs=2000, num_importance_samples=7))
    assert changes == ["epochs 10 → 2000", "num_importance_samples 5000 → 7"]
