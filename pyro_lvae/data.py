"""Datasets of the paper, read from a local data root, and checks on data.

Every loader returns a :class:`Dataset` of float32 tensors in [0, 1] with shape
``(N, 784)``. The data root is, in order: the ``root`` argument (CLI
``--data-root``), the environment variable ``PYRO_LVAE_DATA``, or ``./data``.
The layout under it is the one torchvision and the original releases use:

================  ====================================================================
dataset           files under the data root
================  ====================================================================
mnist             ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
fashion_mnist     ``FashionMNIST/raw/`` (same names)
binarized_mnist   ``binarized_mnist/binarized_mnist_{train,valid,test}.amat[.gz]``
omniglot28        ``omniglot28/omniglot28_uint8.npz``
omniglot          ``omniglot/chardata.mat`` (the IWAE release)
================  ====================================================================

MNIST and Fashion-MNIST are downloaded through torchvision when missing and
``download=True``; the others have no torchvision loader, and a missing file
raises :class:`FileNotFoundError` naming it and the options. Files are read in
place (``.gz`` included), so a read-only data root works.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Environment variable naming the data root.
DATA_ENV = "PYRO_LVAE_DATA"

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


@dataclass(frozen=True)
class Dataset:
    """Train and test split of one dataset.

    :param name: The dataset's name.
    :param train_x: Training data, float32 ``(N, 784)`` in [0, 1] (grey levels or binary).
    :param train_y: Integer labels ``(N,)`` (class, or alphabet for OMNIGLOT).
    :param test_x: Test data, like ``train_x``.
    :param test_y: Test labels.
    :param binary: Whether the stored values are already 0/1.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    binary: bool


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: ``root``, else ``$PYRO_LVAE_DATA``, else ``./data``.

    :param root: An explicit data root, or ``None``.
    """
    if root is not None:
        return Path(root)
    return Path(os.environ.get(DATA_ENV, "data"))


def _missing(name: str, paths: list[Path], hint: str) -> FileNotFoundError:
    shown = ", ".join(str(p) for p in paths)
    return FileNotFoundError(
        f"{name} not found: missing {shown}; point --data-root or ${DATA_ENV} at a folder that has them{hint}."
    )


def _open_maybe_gz(path: Path):
    """Open ``path``, or ``path.gz`` if only the compressed file exists."""
    if path.exists():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rb")
    raise FileNotFoundError(str(path))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a uint8 array.

    :param path: The file, e.g. ``MNIST/raw/train-images-idx3-ubyte.gz``.
    :raises ValueError: if the file is not an unsigned-byte IDX file or is truncated.
    """
    with _open_maybe_gz(Path(path)) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file; re-download it.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); re-download it.")
    return data.reshape(dims)


def read_amat(path: Path) -> np.ndarray:
    """Read a Larochelle–Murray ``.amat`` file (rows of 784 space-separated 0/1), plain or gzipped.

    :param path: The file, e.g. ``binarized_mnist_train.amat``.
    :raises ValueError: if its rows have different lengths.
    """
    with _open_maybe_gz(Path(path)) as f:
        text = f.read().decode("ascii")
    rows = [line.split() for line in text.strip().splitlines()]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path} has rows of different lengths {sorted(widths)}; the file is corrupt.")
    return np.asarray(rows, dtype=np.float32)


def read_chardata(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the IWAE OMNIGLOT file ``chardata.mat``.

    The file holds ``data`` (784 × 24345) and ``testdata`` (784 × 8070) grey
    levels in column-major 28×28 layout, and one-hot alphabet ``target`` /
    ``testtarget`` (50 × N). Images are returned row-major, as the IWAE code does.

    :param path: The ``chardata.mat`` file.
    :returns: ``(train_x, train_y, test_x, test_y)``.
    """
    from scipy.io import loadmat

    mat = loadmat(str(path))
    for key in ("data", "testdata"):
        if key not in mat:
            raise ValueError(f"{path} has no {key!r} array; it is not the IWAE chardata.mat file.")

    def images(a: np.ndarray) -> np.ndarray:
        a = a.T.astype(np.float32)
        return a.reshape(-1, 28, 28).reshape(-1, 784, order="F")

    def labels(key: str, n: int) -> np.ndarray:
        return mat[key].argmax(0).astype(np.int64) if key in mat else np.zeros(n, dtype=np.int64)

    train_x, test_x = images(mat["data"]), images(mat["testdata"])
    return train_x, labels("target", len(train_x)), test_x, labels("testtarget", len(test_x))


def _load_idx_dataset(name: str, root: Path, download: bool) -> Dataset:
    raw = root / _TORCHVISION_DIRS[name] / "raw"
    paths = {k: raw / v for k, v in _IDX_FILES.items()}
    missing = [p for p in paths.values() if not p.exists() and not p.with_name(p.name + ".gz").exists()]
    if missing and download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except Exception as exc:  # no network, HTTP error, unwritable root
            raise _missing(name, missing, f" (download failed: {type(exc).__name__})") from exc
        missing = [p for p in paths.values() if not p.exists() and not p.with_name(p.name + ".gz").exists()]
    if missing:
        raise _missing(name, missing, ", or allow the download (no --no-download)")
    arr = {k: read_idx(p) for k, p in paths.items()}
    return Dataset(
        name=name,
        train_x=torch.from_numpy(arr["train_x"].reshape(-1, 784).astype(np.float32) / 255.0),
        train_y=torch.from_numpy(arr["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arr["test_x"].reshape(-1, 784).astype(np.float32) / 255.0),
        test_y=torch.from_numpy(arr["test_y"].astype(np.int64)),
        binary=False,
    )


def _load_binarized_mnist(root: Path) -> Dataset:
    folder = root / "binarized_mnist"
    paths = [folder / f"binarized_mnist_{s}.amat" for s in ("train", "valid", "test")]
    missing = [p for p in paths if not p.exists() and not p.with_name(p.name + ".gz").exists()]
    if missing:
        raise _missing("binarized_mnist", missing, " (Larochelle & Murray's static binarization)")
    train, valid, test = (read_amat(p) for p in paths)
    train_x = torch.from_numpy(np.concatenate([train, valid]))
    test_x = torch.from_numpy(test)
    # The .amat release carries no labels.
    return Dataset(
        "binarized_mnist",
        train_x,
        torch.zeros(len(train_x), dtype=torch.int64),
        test_x,
        torch.zeros(len(test_x), dtype=torch.int64),
        binary=True,
    )


def _load_omniglot28(root: Path) -> Dataset:
    path = root / "omniglot28" / "omniglot28_uint8.npz"
    if not path.exists():
        raise _missing("omniglot28", [path], "")
    with np.load(path) as f:
        arrays = {k: f[k] for k in ("x_train", "x_test", "alphabet_train", "alphabet_test")}
    return Dataset(
        "omniglot28",
        torch.from_numpy(arrays["x_train"].reshape(-1, 784).astype(np.float32) / 255.0),
        torch.from_numpy(arrays["alphabet_train"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].reshape(-1, 784).astype(np.float32) / 255.0),
        torch.from_numpy(arrays["alphabet_test"].astype(np.int64)),
        binary=False,
    )


def _load_omniglot(root: Path) -> Dataset:
    path = root / "omniglot" / "chardata.mat"
    if not path.exists():
        raise _missing("omniglot", [path], " (the IWAE release of OMNIGLOT)")
    train_x, train_y, test_x, test_y = read_chardata(path)
    return Dataset(
        "omniglot",
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        binary=False,
    )


def load_dataset(name: str, *, root: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name from the data root.

    :param name: ``mnist``, ``fashion_mnist``, ``binarized_mnist``, ``omniglot28`` or ``omniglot``.
    :param root: Data root; see :func:`data_root`.
    :param download: Download MNIST / Fashion-MNIST through torchvision when missing.
    :raises FileNotFoundError: naming the missing files and the options to fix it.
    """
    root_path = data_root(root)
    if name in _TORCHVISION_DIRS:
        return _load_idx_dataset(name, root_path, download)
    if name == "binarized_mnist":
        return _load_binarized_mnist(root_path)
    if name == "omniglot28":
        return _load_omniglot28(root_path)
    if name == "omniglot":
        return _load_omniglot(root_path)
    raise ValueError(
        f"Unknown dataset {name!r}; choose mnist, fashion_mnist, binarized_mnist, omniglot28 or omniglot."
    )


def check_data(x: torch.Tensor, *, input_dim: int, likelihood: str, what: str = "data") -> None:
    """Raise :class:`ValueError` with a one-line fix if ``x`` cannot be modelled.

    :param x: Data of shape ``(N, input_dim)``.
    :param input_dim: The model's input dimension.
    :param likelihood: ``"bernoulli"`` needs values in {0, 1}; ``"gaussian"`` any finite values.
    :param what: Name of the data in the message (e.g. ``"training data"``).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}; convert it with .float().")
    if x.dim() != 2 or x.shape[1] != input_dim:
        raise ValueError(
            f"{what} must have shape (N, {input_dim}), got {tuple(x.shape)}; flatten images with x.reshape(len(x), -1)."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty; check the data root and the subset size.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf; clean or drop those examples.")
    if likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
        raise ValueError(
            f"{what} has values other than 0 and 1, but the likelihood is Bernoulli; "
            "binarize it (binarization='dynamic') or use likelihood='gaussian'."
        )


def binarize(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample binary data x_b ~ Bernoulli(x) from grey levels ``x`` in [0, 1].

    :param x: Grey levels, any shape.
    :param generator: Random generator (default: torch's global one).
    :raises ValueError: if ``x`` has values outside [0, 1].
    """
    if not ((x >= 0) & (x <= 1)).all():
        raise ValueError("binarization needs grey levels in [0, 1]; rescale the data (e.g. divide by 255).")
    return torch.bernoulli(x, generator=generator)
