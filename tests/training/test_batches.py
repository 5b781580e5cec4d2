"""The data of a run: the held-out validation split, and how the periodic evaluation uses it."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae.data import Dataset
from pyro_lvae.training import train
from pyro_lvae.training.batches import prepare_data, split_validation


def _numbered(n_train: int = 40, n_test: int = 10) -> Dataset:
    """Grey-level images whose first pixel is their index, so that the split can be traced."""
    train_x = torch.rand(n_train, 12) * 0.5
    train_x[:, 0] = torch.arange(n_train) / 100
    test_x = torch.rand(n_test, 12)
    return Dataset(
        "numbered", train_x, torch.arange(n_train), test_x, torch.zeros(n_test, dtype=torch.long), binary=False
    )


def _config(**kw) -> ExperimentConfig:
    tc = dict(epochs=2, batch_size=8, num_importance_samples=2, eval_every=1, binarization="dynamic") | kw
    return ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(3, 2), hidden_sizes=(8, 8)), train=TrainConfig(**tc)
    )


def test_the_split_is_disjoint_ordered_and_the_same_for_every_seed():
    data = _numbered()
    a = prepare_data(_config(valid_size=10, seed=0), dataset=data)
    b = prepare_data(_config(valid_size=10, seed=7), dataset=data)
    assert len(a.train) == 30 and len(a.valid) == 10 and torch.equal(a.train, b.train)  # same images held out
    kept = a.train_labels.tolist()
    held = sorted(set(range(40)) - set(kept))
    assert kept == sorted(kept) and len(held) == 10
    # The held-out images are binarized once, like the test set; their grey levels are the held-out ones.
    assert set(a.valid.unique().tolist()) <= {0.0, 1.0}
    x, _, vx, vy = split_validation(data.train_x, data.train_y, 10)
    assert vy.tolist() == held and torch.equal(vx, data.train_x[held]) and len(x) == 30
    assert prepare_data(_config(), dataset=data).valid is None


def test_a_split_as_large_as_the_training_set_is_refused_before_training():
    with pytest.raises(ValueError, match="valid_size=40 leaves no training data of train_subset=40"):
        _config(valid_size=40, train_subset=40)
    with pytest.raises(ValueError, match="valid_size=40 would hold out all 40 training examples"):
        prepare_data(_config(valid_size=40), dataset=_numbered())
    with pytest.raises(ValueError, match="valid_size must be a non-negative integer"):
        _config(valid_size=-1)


def test_periodic_numbers_come_from_the_validation_set_and_the_test_set_is_used_once(tmp_path, monkeypatch):
    """With a split, every periodic line has valid_* keys and no test_* key, and the only
    evaluation of the test set is the final one."""
    from pyro_lvae.training import loop

    seen = []
    original = loop.evaluate

    def spy(model, guide, x, **kw):
        seen.append(len(x))
        return original(model, guide, x, **kw)

    monkeypatch.setattr(loop, "evaluate", spy)
    per_unit_seen = []
    per_unit = loop.kl_per_unit
    monkeypatch.setattr(
        loop, "kl_per_unit", lambda m, g, x, **kw: per_unit_seen.append(len(x)) or per_unit(m, g, x, **kw)
    )
    data = _numbered(n_test=7)
    result = train(_config(valid_size=12), dataset=data, progress=False)
    for m in result.metrics:
        assert "valid_elbo" in m and "valid_kl_per_layer" in m and "valid_kl_per_unit" in m
        assert not any(key.startswith("test_") for key in m)
    assert seen == [12, 12] * 2  # train ELBO on 12 examples, then the validation set, each epoch
    assert per_unit_seen == [12, 12]  # the KL per unit of each epoch: the validation set too
    assert result.results.num_test_examples == 7
    pyro.clear_param_store()
    plain = train(_config(), dataset=data, progress=False)
    assert "test_elbo" in plain.metrics[-1] and "valid_elbo" not in plain.metrics[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_run_is_scored_on_the_cpu_runs_test_images(make_synthetic):
    config = ExperimentConfig(
        model=ModelConfig(input_dim=12, latent_sizes=(2,), hidden_sizes=(8,)),
        train=TrainConfig(epochs=1, batch_size=16, valid_size=8),
    )
    data = make_synthetic()
    on_cpu = prepare_data(config, dataset=data, device="cpu")
    on_gpu = prepare_data(config, dataset=data, device="cuda")
    assert on_gpu.test.is_cuda
    assert torch.equal(on_gpu.test.cpu(), on_cpu.test) and torch.equal(on_gpu.valid.cpu(), on_cpu.valid)
