"""Shared fixtures: seeded RNGs, a clean param store, Pyro validation, data root."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_lvae.data import DATA_ENV, Dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _pyro_state():
    """Every test starts from seed 0, an empty param store and validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)
    pyro.clear_param_store()


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def device(request) -> torch.device:
    """Each device a test should hold on: the CPU, and the GPU where there is one."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The verified datasets: $PYRO_LVAE_DATA, else ../shared/data beside the repository."""
    env = os.environ.get(DATA_ENV)
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not (root / "MNIST" / "raw").exists():
        if env:
            pytest.fail(f"{DATA_ENV}={env} has no MNIST/raw folder.")
        pytest.skip("no data root: set PYRO_LVAE_DATA or place shared/data beside the repository")
    return root


@pytest.fixture(scope="session")
def mnist(shared_data_root) -> Dataset:
    from pyro_lvae.data import load_dataset

    return load_dataset("mnist", root=shared_data_root, download=False)


def synthetic_dataset(n_train: int = 64, n_test: int = 32, dim: int = 12, seed: int = 1) -> Dataset:
    """Small grey-level data with structure (two prototypes plus noise), for fast training tests."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(2, dim, generator=g)

    def draw(n):
        labels = torch.randint(0, 2, (n,), generator=g)
        x = (protos[labels] * 0.8 + 0.2 * torch.rand(n, dim, generator=g)).clamp(0, 1)
        return x, labels

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, binary=False)


@pytest.fixture
def make_synthetic():
    """The :func:`synthetic_dataset` factory."""
    return synthetic_dataset
