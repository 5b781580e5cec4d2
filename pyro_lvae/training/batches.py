"""The data of a run: the tensors on the training device, and each epoch's batches.

Every epoch draws a fresh binarization x ~ Bernoulli(grey) (paper §3), or a fresh
dequantization, and an index permutation from a generator seeded by (seed, epoch), so
that the data randomness is a function of the seed and the epoch alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import ExperimentConfig
from ..data import Dataset, binarize, check_data, dequantize, load_dataset


@dataclass(frozen=True)
class PreparedData:
    """Training and test tensors on the training device.

    :param train: Grey levels (dynamic binarization) or the data itself, ``(N, D)``.
    :param test: Test data as evaluated (binarized once for dynamic binarization).
    :param train_labels: Labels of ``train``.
    :param test_labels: Labels of ``test``.
    :param dynamic: Whether ``train`` is re-binarized every epoch.
    :param dequantized: Whether ``train`` is dequantized afresh every epoch (``test`` is, once).
    :param valid: The held-out validation images (``valid_size`` > 0), prepared like ``test``; else ``None``.
    """

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    dynamic: bool
    dequantized: bool = False
    valid: torch.Tensor | None = None

    @property
    def evaluation_set(self) -> tuple[str, torch.Tensor]:
        """The set the periodic evaluation uses: ``("valid", valid)`` when held out, else ``("test", test)``."""
        return ("valid", self.valid) if self.valid is not None else ("test", self.test)


#: Seed of the choice of validation images: fixed, so that every run holds out the same ones.
VALID_SPLIT_SEED = 20161205


def split_validation(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Hold out ``size`` examples, chosen with :data:`VALID_SPLIT_SEED`; both parts keep their order.

    :param x: Training examples.
    :param y: Their labels.
    :param size: How many to hold out, fewer than ``len(x)``.
    :returns: ``(train_x, train_y, valid_x, valid_y)``.
    """
    if size >= len(x):
        raise ValueError(
            f"valid_size={size} would hold out all {len(x)} training examples; set valid_size below {len(x)}."
        )
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(VALID_SPLIT_SEED))[:size]
    held = torch.zeros(len(x), dtype=torch.bool)
    held[chosen] = True
    return x[~held], y[~held], x[held], y[held]


def prepare_data(
    config: ExperimentConfig,
    *,
    dataset: Dataset | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
) -> PreparedData:
    """Load, subset, check and move the data named by ``config`` to ``device``.

    :param config: The experiment: its dataset, subsets, validation split and binarization.
    :param dataset: Use this :class:`~pyro_lvae.data.Dataset` instead of loading
        ``config.train.dataset`` (tests and custom data).
    :param data_root: Data folder (default: ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Download missing data files.
    :param device: Where the data go.
    :raises ValueError: with a one-line fix if the data cannot be modelled.
    """
    tc, mc = config.train, config.model
    if dataset is None:
        dataset = load_dataset(tc.dataset, root=data_root, download=download)
    elif not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset must be a pyro_lvae.data.Dataset, got {type(dataset).__name__}; build one with "
            "Dataset(name, train_x, train_y, test_x, test_y, binary)."
        )
    train_x, train_y = dataset.train_x, dataset.train_y
    test_x, test_y = dataset.test_x, dataset.test_y
    if tc.train_subset:
        train_x, train_y = train_x[: tc.train_subset], train_y[: tc.train_subset]
    if tc.test_subset:
        test_x, test_y = test_x[: tc.test_subset], test_y[: tc.test_subset]
    for what, x in (("training data", train_x), ("test data", test_x)):
        if tc.binarization == "dynamic":
            check_data(x, input_dim=mc.input_dim, likelihood="gaussian", what=what)
            if not ((x >= 0) & (x <= 1)).all():
                raise ValueError(
                    f"{what} has values outside [0, 1], but dynamic binarization samples "
                    "Bernoulli(grey level); rescale it to [0, 1] (e.g. divide by 255)."
                )
        else:
            check_data(x, input_dim=mc.input_dim, likelihood=mc.likelihood, what=what)
    valid_x = None
    if tc.valid_size:  # after the checks above, which covered these images as training data
        train_x, train_y, valid_x, _ = split_validation(train_x, train_y, tc.valid_size)
    if tc.batch_size > len(train_x):
        raise ValueError(
            f"batch_size {tc.batch_size} is larger than the {len(train_x)} training examples; lower batch_size."
        )
    # On the device, in the dtype the model will be built in (float64 images from numpy, say).
    device, dtype = torch.device(device), torch.get_default_dtype()
    train_x = train_x.to(device, dtype)
    test_x = _fixed_draw(test_x, config, seed=tc.seed).to(device, dtype)
    if valid_x is not None:
        valid_x = _fixed_draw(valid_x, config, seed=tc.seed + VALID_SPLIT_SEED).to(device, dtype)
    return PreparedData(
        train=train_x,
        test=test_x,
        train_labels=train_y,
        test_labels=test_y,
        dynamic=tc.binarization == "dynamic",
        dequantized=tc.dequantize,
        valid=valid_x,
    )


def _fixed_draw(x: torch.Tensor, config: ExperimentConfig, *, seed: int) -> torch.Tensor:
    """An evaluation set as evaluated: binarized (dynamic binarization) or dequantized once,
    with a CPU generator seeded by ``seed``; otherwise ``x`` itself.

    The draw is made on the CPU whatever the training device, so that a GPU run is scored
    on the same test images as a CPU run and as the shipped models' manifest (a CUDA
    generator with the same seed draws other images).
    """
    x = x.cpu()
    if config.train.binarization == "dynamic":
        return binarize(x, generator=torch.Generator().manual_seed(seed))
    if config.train.dequantize:
        return dequantize(x, generator=torch.Generator().manual_seed(seed))
    return x


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data randomness (binarization and order) of 0-based ``epoch``.

    Drawing these from their own generator makes them a function of (seed, epoch)
    alone: a run resumed inside an epoch rebuilds the same batches, and every process
    of a distributed run draws the same permutation without communicating.

    :param seed: The run's seed.
    :param epoch: The epoch.
    """
    return (seed * 1_000_003 + epoch) % 2**63


def epoch_batches(
    data: PreparedData, config: ExperimentConfig, epoch: int, *, world_size: int = 1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training data of ``epoch`` (a fresh binarization when dynamic) and its global
    minibatches of indices.

    :param data: The prepared data.
    :param config: The run's configuration.
    :param epoch: The 0-based epoch.
    :param world_size: Processes that split every minibatch
        (:func:`~pyro_lvae.training.distributed.shard`); a last minibatch too small to give every
        process an example (two with batch norm) is dropped.
    """
    gen = torch.Generator(device=data.train.device).manual_seed(epoch_seed(config.train.seed, epoch))
    x_epoch = data.train
    if data.dynamic:
        x_epoch = binarize(data.train, generator=gen)
    elif data.dequantized:
        x_epoch = dequantize(data.train, generator=gen)
    batches = list(
        torch.randperm(len(data.train), generator=gen, device=data.train.device).split(config.train.batch_size)
    )
    smallest = 2 if config.model.batch_norm else 1  # batch norm cannot normalize one example
    if len(batches) > 1 and len(batches[-1]) // world_size < smallest:
        batches = batches[:-1]
    return x_epoch, batches
