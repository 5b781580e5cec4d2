"""A run directory survives what can happen to it: a metric line cut short, an interrupted
rewrite, an --overwrite that cannot start, an evaluation or an event file that fails after a
trained epoch, a checkpoint that cannot be written, a signal in the last epoch, a run stopped
before its first checkpoint, a resume on another device; and bad runtime options are refused
before the directory exists."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae.training import loop, train
from pyro_lvae.training.checkpoint import load_checkpoint
from pyro_lvae.training.run_dir import RunDirectory, read_metrics
from pyro_lvae.training.run_files import METRICS_NAME
from pyro_lvae.training.signals import TrainingInterrupted


def _config(**train_kw) -> ExperimentConfig:
    tc = dict(epochs=3, batch_size=16, num_importance_samples=2, eval_every=1)
    tc.update(train_kw)
    return ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3,), hidden_sizes=(8,)), train=TrainConfig(**tc)
    )


def _lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_NAME).read_text().splitlines()]


def test_a_metric_line_cut_short_is_ignored_and_the_run_resumes(tmp_path, make_synthetic, caplog):
    data = make_synthetic()
    train(_config(epochs=2), out_dir=tmp_path, dataset=data, progress=False, final_evaluation=False)
    with open(tmp_path / METRICS_NAME, "a") as f:
        f.write('{"epoch": 3, "be')  # the process stopped while appending epoch 3's line
    with caplog.at_level(logging.WARNING):
        result = train(_config(), out_dir=tmp_path, dataset=data, progress=False, resume=True, final_evaluation=False)
    assert "Ignoring the incomplete last line" in caplog.text
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3] == [m["epoch"] for m in _lines(tmp_path)]


def test_a_damaged_line_before_the_last_is_named_with_the_fix(tmp_path):
    (tmp_path / METRICS_NAME).write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"^Line 2 of .*metrics.jsonl is not JSON .*; repair or delete that line"):
        read_metrics(tmp_path, up_to_epoch=3)


def test_an_interrupted_rewrite_keeps_the_old_lines(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    run.rewrite_metrics([{"epoch": 1}, {"epoch": 2}])

    def full_disk(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        run.rewrite_metrics([{"epoch": 1}])
    assert _lines(tmp_path) == [{"epoch": 1}, {"epoch": 2}]


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, make_synthetic):
    data = make_synthetic()
    train(_config(epochs=1), out_dir=tmp_path, dataset=data, progress=False, final_evaluation=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="lower batch_size"):
        train(_config(batch_size=10_000), out_dir=tmp_path, dataset=data, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and load_checkpoint(tmp_path)["epoch"] == 1


def test_a_failed_evaluation_keeps_the_trained_epoch(tmp_path, make_synthetic, monkeypatch):
    data = make_synthetic()
    evaluate = loop._Trainer.evaluate

    def fails_after_epoch_two(self, epoch, x_epoch):
        if epoch == 1:
            raise RuntimeError("out of memory in the evaluation")
        return evaluate(self, epoch, x_epoch)

    monkeypatch.setattr(loop._Trainer, "evaluate", fails_after_epoch_two)
    with pytest.raises(RuntimeError, match="out of memory in the evaluation"):
        train(_config(), out_dir=tmp_path, dataset=data, progress=False, final_evaluation=False)
    assert load_checkpoint(tmp_path)["epoch"] == 2  # the trained epoch, without its evaluation
    assert [("test_elbo" in m) for m in _lines(tmp_path)] == [True, False]
    monkeypatch.setattr(loop._Trainer, "evaluate", evaluate)
    result = train(_config(), out_dir=tmp_path, dataset=data, progress=False, resume=True, final_evaluation=False)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"memory_budget": 0}, r"^memory_budget must be a positive, finite number of bytes, got 0\.$"),
        ({"memory_budget": float("inf")}, r"^memory_budget must be a positive, finite number of bytes, got inf\.$"),
        ({"device": "gpu"}, r"^device 'gpu' is not a device torch knows; use cpu or cuda"),
    ],
)
def test_bad_runtime_options_are_refused_before_the_run_directory_exists(tmp_path, make_synthetic, options, match):
    with pytest.raises(ValueError, match=match):
        train(_config(), out_dir=tmp_path / "run", dataset=make_synthetic(), progress=False, **options)
    assert not (tmp_path / "run").exists()


def test_a_signal_in_the_last_epoch_stops_before_the_final_evaluation(tmp_path, make_synthetic, monkeypatch):
    data = make_synthetic()
    evaluate = loop._Trainer.evaluate

    def signalled_after_the_last_step(self, epoch, x_epoch):
        if epoch == 1:
            signal.raise_signal(signal.SIGTERM)  # the handler asks the loop to stop
        return evaluate(self, epoch, x_epoch)

    monkeypatch.setattr(loop._Trainer, "evaluate", signalled_after_the_last_step)
    with pytest.raises(TrainingInterrupted, match=r"at the end of epoch 2; the checkpoint .* continue with --resume"):
        train(_config(epochs=2), out_dir=tmp_path, dataset=data, progress=False)
    assert load_checkpoint(tmp_path)["epoch"] == 2 and not (tmp_path / "results.json").exists()
    monkeypatch.setattr(loop._Trainer, "evaluate", evaluate)
    result = train(_config(epochs=2), out_dir=tmp_path, dataset=data, progress=False, resume=True)
    assert result.results is not None and (tmp_path / "results.json").exists()


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_file_and_the_last_one_intact(tmp_path, monkeypatch):
    from pyro_lvae.training import checkpoint

    checkpoint.save_checkpoint(tmp_path, {"epoch": 1})

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(tmp_path, {"epoch": 2})
    assert not (tmp_path / (checkpoint.CHECKPOINT_NAME + ".tmp")).exists()
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_a_resume_on_another_device_type_says_so(tmp_path, make_synthetic, caplog):
    from pyro_lvae.training import checkpoint

    data = make_synthetic()
    train(_config(epochs=1), out_dir=tmp_path, dataset=data, progress=False, final_evaluation=False)
    state = load_checkpoint(tmp_path)
    assert state["device_type"] == "cpu"
    checkpoint.save_checkpoint(tmp_path, {**state, "device_type": "cuda"})  # as if trained on a GPU
    with caplog.at_level(logging.WARNING):
        train(_config(epochs=2), out_dir=tmp_path, dataset=data, progress=False, resume=True, final_evaluation=False)
    assert "trained on cuda and continues on cpu" in caplog.text and "--device cuda" in caplog.text
    assert "Resuming with a changed setting: epochs 1 → 2." in caplog.text


def test_a_run_that_stopped_before_its_first_checkpoint_is_started_again_with_overwrite(tmp_path, make_synthetic):
    (tmp_path / METRICS_NAME).write_text('{"epoch": 1}\n')  # the line is written, the checkpoint was not
    data = make_synthetic()
    with pytest.raises(
        FileNotFoundError, match=r"stopped before its first checkpoint; start it again with --overwrite"
    ):
        train(_config(epochs=1), out_dir=tmp_path, dataset=data, progress=False, resume=True)
    train(_config(epochs=1), out_dir=tmp_path, dataset=data, progress=False, overwrite=True, final_evaluation=False)
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_a_full_disk_is_one_line_that_says_the_checkpoints_are_intact(tmp_path, monkeypatch, capsys, shared_data_root):
    from pyro_lvae import cli
    from pyro_lvae.training import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    monkeypatch.setattr(loop.RunDirectory, "save_checkpoint", lambda self, state: full_disk())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--preset", "lvae-bn-wu-2", "--epochs", "1", "--train-subset", "64", "--test-subset", "16",
                  "--batch-size", "32", "--latent-sizes", "4,2", "--hidden-sizes", "16,8", "--no-progress",
                  "--out", str(tmp_path / "run"), "--data-root", str(shared_data_root)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1
    assert err.startswith("pyro-lvae: error: [Errno 28] No space left on device; every checkpoint written before")


def test_a_warning_during_an_epoch_prints_on_its_own_line_above_the_progress_bar(tmp_path, make_synthetic, capsys):
    import sys

    from pyro_lvae.training.batches import epoch_batches

    def with_nan(data, cfg, epoch, **kw):
        x, batches = epoch_batches(data, cfg, epoch, **kw)
        x = x.clone()
        x[batches[1][0]] = float("nan")  # one example of the second batch
        return x, batches

    handler = logging.StreamHandler(sys.stderr)  # the console handler the CLI sets up
    logging.getLogger().addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop, "epoch_batches", with_nan)
            train(_config(epochs=1), out_dir=tmp_path, dataset=make_synthetic(), progress=True, final_evaluation=False)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    skipped = [line for line in lines if "Skipped step 2 of epoch 1" in line]
    assert skipped and all(line.startswith("Skipped step") for line in skipped)  # not glued to the bar


def test_a_failing_tensorboard_write_comes_after_the_epochs_checkpoint(tmp_path, make_synthetic, monkeypatch):
    from pyro_lvae.training.tensorboard import TensorBoardLog

    def broken_event_file(self, record):
        raise OSError("the event file cannot be written")

    monkeypatch.setattr(TensorBoardLog, "log_epoch", broken_event_file)
    with pytest.raises(OSError, match="event file"):
        train(_config(), out_dir=tmp_path, dataset=make_synthetic(), progress=False, final_evaluation=False)
    assert load_checkpoint(tmp_path)["epoch"] == 1 and [m["epoch"] for m in _lines(tmp_path)] == [1]
