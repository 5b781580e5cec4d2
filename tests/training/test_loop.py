"""Training on real MNIST, checkpoints, resume and run directories."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae.inference.evaluation import evaluate
from pyro_lvae.training import load_run, train
from pyro_lvae.training.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, load_checkpoint
from pyro_lvae.training.steps import FastStep


def _tiny(guide: str, **train_kw) -> ExperimentConfig:
    tc = dict(epochs=10, batch_size=100, train_subset=2000, test_subset=500, eval_every=5, num_importance_samples=20)
    tc.update(train_kw)
    return ExperimentConfig(
        model=ModelConfig(latent_sizes=(16, 8), hidden_sizes=(128, 64), batch_norm=True, guide=guide),
        train=TrainConfig(**tc),
    )


@pytest.mark.parametrize("guide", ["ladder", "vae"])
def test_both_guides_train_on_mnist_subset(mnist, guide):
    """200 SVI steps on 2000 real MNIST digits improve the test ELBO by a wide margin."""
    config = _tiny(guide)
    untrained = train(
        config.replace(epochs=1, learning_rate=1e-12), dataset=mnist, progress=False, final_evaluation=False
    )
    before = evaluate(untrained.model, untrained.guide, untrained.data.test, num_samples=5)["elbo"]
    result = train(config, dataset=mnist, progress=False)
    after = result.results["test_elbo"]
    assert after > before + 150, (before, after)
    assert result.results["test_log_likelihood"] >= after
    assert len(result.metrics) == 10
    assert "test_elbo" in result.metrics[4] and "test_elbo" not in result.metrics[3]
    assert {"epoch", "beta", "seconds", "train_objective"} <= set(result.metrics[3])
    last = result.metrics[-1]
    assert {"train_elbo", "test_elbo", "test_kl_per_layer"} <= set(last) and len(last["test_kl_per_layer"]) == 2
    assert last["train_elbo"] > before + 150


@pytest.mark.parametrize("engine", ["fast", "svi"])
def test_resume_gives_identical_parameters(tmp_path, make_synthetic, engine):
    data = make_synthetic()
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), batch_norm=True),
        train=TrainConfig(
            epochs=2, batch_size=16, warmup_epochs=3, eval_every=1, num_importance_samples=3, engine=engine
        ),
    )
    straight = train(config, out_dir=tmp_path / "a", dataset=data, progress=False)
    train(config.replace(epochs=1), out_dir=tmp_path / "b", dataset=data, progress=False)
    resumed = train(config, out_dir=tmp_path / "b", dataset=data, progress=False, resume=True)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(straight.guide.state_dict().items(), resumed.guide.state_dict().items()):
        assert torch.equal(a, b), name
    lines_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines_b] == [1, 2]
    assert [line["train_objective"] for line in lines_a] == [line["train_objective"] for line in lines_b]
    assert straight.results["test_log_likelihood"] == resumed.results["test_log_likelihood"]


def test_checkpoint_contents_and_fallback(tmp_path, make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3,), hidden_sizes=(8,), batch_norm=False),
        train=TrainConfig(epochs=2, batch_size=16, eval_every=1, num_importance_samples=2),
    )
    train(config, out_dir=tmp_path, dataset=make_synthetic(), progress=False)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["epoch"] == 2
    assert ExperimentConfig.from_dict(ckpt["config"]) == config
    assert {"model", "guide", "optimizer", "rng"} <= set(ckpt)
    # A truncated newest checkpoint falls back to the previous, complete one.
    data = (tmp_path / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    assert load_checkpoint(tmp_path)["epoch"] == 1
    (tmp_path / PREVIOUS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="--overwrite"):
        load_checkpoint(tmp_path)


def test_run_directory_rules(tmp_path, make_synthetic):
    data = make_synthetic()
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3,), hidden_sizes=(8,), batch_norm=False),
        train=TrainConfig(epochs=1, batch_size=16, num_importance_samples=2),
    )
    train(config, out_dir=tmp_path, dataset=data, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, out_dir=tmp_path, dataset=data, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(config.replace(latent_sizes=(4,)), out_dir=tmp_path, dataset=data, progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        train(config, out_dir=tmp_path / "new", dataset=data, progress=False, resume=True)
    train(config, out_dir=tmp_path, dataset=data, progress=False, overwrite=True)
    model, guide, loaded, _ = load_run(tmp_path)
    assert loaded == config and not model.training


def test_batch_size_larger_than_data(make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3,), hidden_sizes=(8,)),
        train=TrainConfig(epochs=1, batch_size=1000),
    )
    with pytest.raises(ValueError, match="lower batch_size"):
        train(config, dataset=make_synthetic(), progress=False)


def _updates_seen(monkeypatch) -> list[tuple[str, float]]:
    """For every update the fast step takes from now on: its objective's class and Adam's
    learning rate, as the update reads them."""
    seen: list[tuple[str, float]] = []
    update = FastStep._update

    def spy(self, x, beta):
        seen.append((type(self.elbo).__name__, float(self.optimizer.param_groups[0]["lr"])))
        return update(self, x, beta)

    monkeypatch.setattr(FastStep, "_update", spy)
    return seen


def test_finetuning_phase_schedule_and_resume(tmp_path, make_synthetic, monkeypatch):
    """Training epochs, then fine-tuning on the IWAE bound with β = 1 and the learning
    rate × decay every ``finetune_decay_every`` epochs; resuming in the middle of
    fine-tuning gives the uninterrupted run's parameters."""
    data = make_synthetic()
    updates = _updates_seen(monkeypatch)
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), batch_norm=True),
        train=TrainConfig(
            epochs=2,
            batch_size=16,
            warmup_epochs=2,
            eval_every=10,
            num_importance_samples=3,
            finetune_epochs=3,
            finetune_mc_samples=2,
            finetune_iw_samples=3,
            finetune_lr_decay=0.5,
            finetune_decay_every=2,
        ),
    )
    straight = train(config, out_dir=tmp_path / "a", dataset=data, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["beta"] for line in lines] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert [line.get("phase") for line in lines] == [None, None, "finetune", "finetune", "finetune"]
    assert [line.get("learning_rate") for line in lines[2:]] == [1e-3, 1e-3, 5e-4]
    assert straight.results["epochs"] == 5 and "test_elbo" in lines[-1]
    # What the optimizer did, not only what the metric lines say: two epochs on the ELBO at
    # the base rate, then the importance-weighted loss, its rate halved for the fifth epoch.
    per_epoch = len(updates) // 5
    assert len(updates) == 5 * per_epoch > 0
    elbo, iwae = "ClosedFormMeanFieldELBO", "ImportanceWeightedLoss"  # the fast engine's, ladder guide
    assert updates == [(elbo, 1e-3)] * 2 * per_epoch + [(iwae, 1e-3)] * 2 * per_epoch + [(iwae, 5e-4)] * per_epoch

    # Stop after the first fine-tuning epoch, then resume: the objective and rate come back too.
    train(config.replace(finetune_epochs=1), out_dir=tmp_path / "b", dataset=data, progress=False)
    updates.clear()
    resumed = train(config, out_dir=tmp_path / "b", dataset=data, progress=False, resume=True)
    assert updates == [(iwae, 1e-3)] * per_epoch + [(iwae, 5e-4)] * per_epoch
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    # A trained run may be fine-tuned with any settings; a fine-tuning run keeps its own.
    train(config.replace(finetune_epochs=0), out_dir=tmp_path / "c", dataset=data, progress=False)
    train(
        config.replace(finetune_iw_samples=2, finetune_epochs=1),
        out_dir=tmp_path / "c",
        dataset=data,
        progress=False,
        resume=True,
    )
    with pytest.raises(ValueError, match="different configuration"):
        train(config.replace(finetune_iw_samples=4), out_dir=tmp_path / "c", dataset=data, progress=False, resume=True)


def test_the_seed_changes_the_run_and_eval_particles_change_only_the_evaluation(make_synthetic):
    data = make_synthetic()
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), batch_norm=True),
        train=TrainConfig(epochs=2, batch_size=16, eval_every=1, num_importance_samples=3),
    )
    runs = {
        "a": train(config, dataset=data, progress=False, final_evaluation=False),
        "again": train(config, dataset=data, progress=False, final_evaluation=False),
        "seed": train(config.replace(seed=1), dataset=data, progress=False, final_evaluation=False),
        "particles": train(config.replace(eval_particles=8), dataset=data, progress=False, final_evaluation=False),
    }
    objective = {k: [m["train_objective"] for m in r.metrics] for k, r in runs.items()}
    test_elbo = {k: [m["test_elbo"] for m in r.metrics] for k, r in runs.items()}
    assert objective["again"] == objective["a"] and test_elbo["again"] == test_elbo["a"]  # a seed fixes the run
    assert objective["seed"] != objective["a"] and test_elbo["seed"] != test_elbo["a"]
    # More evaluation particles change the periodic ELBO estimate, never the training trajectory.
    assert objective["particles"] == objective["a"] and test_elbo["particles"] != test_elbo["a"]
    for (name, p), (_, q) in zip(runs["particles"].model.state_dict().items(), runs["a"].model.state_dict().items()):
        assert torch.equal(p, q), name


def test_dequantized_gaussian_runs_report_bounds_on_the_discrete_images(make_synthetic):
    import math

    from pyro_lvae import evaluate
    from pyro_lvae.data import dequantization_offset

    config = ExperimentConfig(
        model=ModelConfig(
            input_dim=12, latent_sizes=(3, 2), hidden_sizes=(16, 8), activation="tanh", likelihood="gaussian"
        ),
        train=TrainConfig(
            binarization="none",
            dequantize=True,
            epochs=3,
            batch_size=16,
            eval_every=1,
            num_importance_samples=10,
            learning_rate=1e-2,
        ),
    )
    result = train(config, dataset=make_synthetic(), progress=False)
    r = result.results
    offset = dequantization_offset(12)
    # The test set was dequantized once: values inside their level's cell, off the 1/255 grid.
    levels = torch.round(make_synthetic().test_x * 255)
    assert torch.equal(torch.floor(result.data.test * 256), levels)
    ev = evaluate(result.model, result.guide, result.data.test, num_samples=10, seed=config.train.seed)
    assert r["test_log_likelihood"] == pytest.approx(ev["log_likelihood"] + offset, abs=1e-4)
    assert r["test_elbo"] == pytest.approx(ev["elbo"] + offset, abs=1e-4)
    # A bound on the probability of a discrete image is at most 0 nats.
    assert r["test_elbo"] <= r["test_log_likelihood"] < 0
    assert r["test_bits_per_dim"] == pytest.approx(-r["test_log_likelihood"] / (12 * math.log(2)))
    assert r["dequantized"] is True and result.metrics[-1]["test_elbo"] < 0
    with pytest.raises(ValueError, match="dequantize applies to grey levels"):
        TrainConfig(binarization="dynamic", dequantize=True)
