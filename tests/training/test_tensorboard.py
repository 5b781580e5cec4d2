"""TensorBoard event files: the scalars of every metric line and the image grids."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae.data import Dataset
from pyro_lvae.training import train

#: The tag of each metric (the specification: what the event files must hold).
TAGS = {
    "beta": "schedule/beta",
    "learning_rate": "schedule/learning_rate",
    "train_objective": "elbo/train_objective",
    "train_elbo": "elbo/train",
    "valid_elbo": "elbo/valid",
    "test_elbo": "elbo/test",
    "seconds": "time/seconds_per_epoch",
    "skipped_steps": "steps/skipped",
}


def _tiles(event, *, side: int) -> np.ndarray:
    """The images of a ``make_grid`` picture (8 per row, 2 pixels of padding), in [0, 1]."""
    from PIL import Image

    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)), dtype=np.float64)[..., 0] / 255
    step = side + 2
    rows, cols = (grid.shape[0] - 2) // step, (grid.shape[1] - 2) // step
    return np.stack(
        [
            grid[2 + r * step : 2 + r * step + side, 2 + c * step : 2 + c * step + side]
            for r in range(rows)
            for c in range(cols)
        ]
    )


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
    data = _images(32)
    result = train(config, dataset=data, progress=False, tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    metrics = result.metrics
    evaluated = [m for m in metrics if "test_elbo" in m]
    assert [m["epoch"] for m in evaluated] == [2, 3]
    # Each metric of the lines under its tag, at its epoch (the learning rate is on fine-tuning's
    # lines only, in test_the_learning_rate_is_logged_while_fine_tuning).
    for key, tag in TAGS.items():
        if key in ("learning_rate", "valid_elbo"):
            continue
        assert scalars[tag] == [(m["epoch"], pytest.approx(m[key])) for m in metrics if key in m], tag
    for layer in (1, 2):
        expected = [(m["epoch"], pytest.approx(m["test_kl_per_layer"][layer - 1])) for m in evaluated]
        assert scalars[f"kl_test/z{layer}"] == expected
    # The grids: 64 prior samples, and each test image (on the left) beside its reconstruction.
    assert [e.step for e in events.Images("samples/prior")] == [2, 3]
    samples = _tiles(events.Images("samples/prior")[-1], side=4)
    assert samples.shape == (64, 4, 4) and samples.std() > 0.05
    pairs = _tiles(events.Images("samples/reconstructions")[-1], side=4)[:16]
    np.testing.assert_allclose(pairs[0::2].reshape(8, 16), result.data.test.numpy(), atol=0.5 / 255 + 1e-6)
    assert pairs[1::2].std() > 0.01 and np.abs(pairs[1::2].reshape(8, 16) - result.data.test.numpy()).max() > 0.05


def test_the_learning_rate_is_logged_while_fine_tuning(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = ExperimentConfig(
        model=ModelConfig(input_dim=16, latent_sizes=(2,), hidden_sizes=(8,)),
        train=TrainConfig(
            epochs=1,
            batch_size=8,
            num_importance_samples=2,
            finetune_epochs=2,
            finetune_mc_samples=1,
            finetune_iw_samples=2,
            finetune_lr_decay=0.5,
            finetune_decay_every=1,
        ),
    )
    result = train(config, dataset=_images(16), progress=False, tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    logged = [(e.step, e.value) for e in events.Scalars(TAGS["learning_rate"])]
    assert logged == [(m["epoch"], pytest.approx(m["learning_rate"])) for m in result.metrics if "learning_rate" in m]
    assert [value for _, value in logged] == pytest.approx([1e-3, 5e-4])


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
