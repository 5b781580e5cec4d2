"""TensorBoard event files: the scalars of every metric line and the image grids."""

from __future__ import annotations

import sys

import pytest
import torch

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae.data import Dataset
from pyro_lvae.training import train


def _images(n: int) -> Dataset:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 16, generator=g)  # 4×4 images, so that the grids are written
    return Dataset(
        "tiny-images", x, torch.zeros(n, dtype=torch.long), x[:8], torch.zeros(8, dtype=torch.long), binary=False
    )


def test_the_event_files_hold_every_epochs_scalars_and_the_image_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = ExperimentConfig(
        model=ModelConfig(input_dim=16, latent_sizes=(3, 2), hidden_sizes=(8, 8)),
        train=TrainConfig(epochs=3, warmup_epochs=2, batch_size=8, num_importance_samples=2, eval_every=2),
    )
    result = train(config, dataset=_images(32), progress=False, tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    metrics = result.metrics
    assert scalars["schedule/beta"] == [(m["epoch"], pytest.approx(m["beta"])) for m in metrics]
    assert scalars["elbo/train_objective"] == [(m["epoch"], pytest.approx(m["train_objective"])) for m in metrics]
    evaluated = [m for m in metrics if "test_elbo" in m]
    assert [m["epoch"] for m in evaluated] == [2, 3]
    assert scalars["elbo/test"] == [(m["epoch"], pytest.approx(m["test_elbo"])) for m in evaluated]
    assert scalars["elbo/train"] == [(m["epoch"], pytest.approx(m["train_elbo"])) for m in evaluated]
    for layer in (1, 2):
        expected = [(m["epoch"], pytest.approx(m["test_kl_per_layer"][layer - 1])) for m in evaluated]
        assert scalars[f"kl_test/z{layer}"] == expected
    assert {"samples/prior", "samples/reconstructions"} <= set(tags["images"])
    assert [e.step for e in events.Images("samples/prior")] == [2, 3]


def test_without_the_package_the_option_fails_in_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    config = ExperimentConfig(
        model=ModelConfig(input_dim=16, latent_sizes=(2,), hidden_sizes=(8,)), train=TrainConfig(epochs=1)
    )
    with pytest.raises(
        ValueError, match=r"--tensorboard needs the tensorboard package.*pip install 'pyro-lvae\[tensorboard\]'"
    ):
        train(config, dataset=_images(16), out_dir=tmp_path / "run", progress=False, tensorboard=tmp_path / "tb")
    assert not (tmp_path / "run").exists()  # nothing was started
