"""Datasets of the paper, read from a local data root, and checks on data.

Every loader returns a :class:`Dataset` of float32 tensors in [0, 1] with shape
``(N, 784)`` (``(N, 1024)`` for NORB). The data root is, in order: the ``root`` argument (CLI
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
norb              ``norb/smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat}.mat`` and
                  ``norb/smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat}.mat``
                  (LeCun et al.'s small NORB, ``.gz`` accepted), reduced to 32×32
================  ====================================================================

Files whose official contents are known (:data:`SHA256`: MNIST, Fashion-MNIST,
the binarized MNIST and omniglot28) are verified on every load, and a mismatch
raises :class:`ValueError` naming the file. MNIST and Fashion-MNIST are downloaded
through torchvision when missing and ``download=True``; the others have no torchvision loader, and a missing file
raises :class:`FileNotFoundError` naming it and the options. Files are read in
place (``.gz`` included), so a read-only data root works.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Environment variable naming the data root.
DATA_ENV = "PYRO_LVAE_DATA"

#: SHA-256 of the (uncompressed) official files, by path under the data root. A file
#: that does not match is corrupt or not the official release, and loading it raises.
SHA256 = {
    "MNIST/raw/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "MNIST/raw/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "MNIST/raw/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "MNIST/raw/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "FashionMNIST/raw/train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "FashionMNIST/raw/train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "FashionMNIST/raw/t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "binarized_mnist/binarized_mnist_train.amat": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "binarized_mnist/binarized_mnist_valid.amat": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "binarized_mnist/binarized_mnist_test.amat": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    "omniglot28/omniglot28_uint8.npz": "6180eab21be0f097d02a2a603be4b3a146b8d459e41342128622b4574a36441c",
}


def verify_checksum(raw: bytes, path: Path, key: str) -> None:
    """Raise :class:`ValueError` if ``raw`` (the contents of ``path``) does not have the
    SHA-256 that :data:`SHA256` lists for ``key``; files it does not list pass.

    :param raw: The uncompressed contents.
    :param path: The file they were read from (for the message).
    :param key: The file's path under the data root, without ``.gz``.
    """
    expected = SHA256.get(key)
    if expected is None:
        return
    got = hashlib.sha256(raw).hexdigest()
    if got != expected:
        raise ValueError(
            f"{path} fails its checksum (SHA-256 {got[:12]}…, expected {expected[:12]}…): it is corrupt or "
            "not the official release; delete it and download or copy it again."
        )


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


def read_idx(path: Path, *, checksum_key: str | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a uint8 array.

    :param path: The file, e.g. ``MNIST/raw/train-images-idx3-ubyte.gz``.
    :param checksum_key: Verify the contents against :data:`SHA256` under this key.
    :raises ValueError: if the file is not an unsigned-byte IDX file, is truncated or
        fails its checksum.
    """
    with _open_maybe_gz(Path(path)) as f:
        raw = f.read()
    if checksum_key is not None:
        verify_checksum(raw, Path(path), checksum_key)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file; re-download it.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); re-download it.")
    return data.reshape(dims)


def read_amat(path: Path, *, checksum_key: str | None = None) -> np.ndarray:
    """Read a Larochelle–Murray ``.amat`` file (rows of 784 space-separated 0/1), plain or gzipped.

    :param path: The file, e.g. ``binarized_mnist_train.amat``.
    :param checksum_key: Verify the contents against :data:`SHA256` under this key.
    :raises ValueError: if its rows have different lengths or it fails its checksum.
    """
    with _open_maybe_gz(Path(path)) as f:
        raw = f.read()
    if checksum_key is not None:
        verify_checksum(raw, Path(path), checksum_key)
    text = raw.decode("ascii")
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


_NORB_MAGIC = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.int32}
NORB_FILES = {
    "train_x": "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
    "train_y": "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
    "test_x": "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
    "test_y": "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat",
}


def read_norb(path: Path) -> np.ndarray:
    """Read a small-NORB binary matrix file (``*-dat.mat`` or ``*-cat.mat``), plain or gzipped.

    The format (LeCun et al.): a little-endian int32 magic number (``0x1E3D4C55``
    for bytes, ``0x1E3D4C54`` for int32), the number of dimensions, at least three
    int32 dimensions, then the values. These are not MATLAB files despite the name.

    :param path: The file.
    :raises ValueError: if the magic number is unknown or the file is truncated.
    """
    with _open_maybe_gz(Path(path)) as f:
        raw = f.read()
    if len(raw) < 20:
        raise ValueError(f"{path} is too short to be a small-NORB file; re-download it.")
    magic, ndim = np.frombuffer(raw[:8], dtype="<i4")
    if int(magic) not in _NORB_MAGIC:
        raise ValueError(
            f"{path} has magic number {int(magic):#x}, not a small-NORB byte or int matrix; re-download it."
        )
    header = 8 + 4 * max(3, int(ndim))
    dims = tuple(int(d) for d in np.frombuffer(raw[8:header], dtype="<i4")[:ndim])
    dtype = np.dtype(_NORB_MAGIC[int(magic)]).newbyteorder("<")
    data = np.frombuffer(raw, dtype=dtype, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); re-download it.")
    return data.reshape(dims)


def norb_to_32(images: np.ndarray) -> np.ndarray:
    """The LVAE paper's 32×32 NORB from small NORB's ``(N, 2, 96, 96)`` stereo pairs:
    the first camera's image, averaged over 3×3 blocks, as float32 grey levels in [0, 1],
    flattened to ``(N, 1024)``.

    :param images: uint8 array of shape ``(N, 2, 96, 96)``.
    """
    if images.ndim != 4 or images.shape[1:] != (2, 96, 96):
        raise ValueError(f"small-NORB images must have shape (N, 2, 96, 96), got {images.shape}.")
    left = images[:, 0].astype(np.float32) / 255.0
    small = left.reshape(len(left), 32, 3, 32, 3).mean(axis=(2, 4))
    return small.reshape(len(left), 1024)


def _load_norb(root: Path) -> Dataset:
    folder = root / "norb"
    paths = {k: folder / v for k, v in NORB_FILES.items()}
    missing = [p for p in paths.values() if not p.exists() and not p.with_name(p.name + ".gz").exists()]
    if missing:
        raise _missing("norb", missing, " (small NORB from https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/)")
    arrays = {k: read_norb(p) for k, p in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise ValueError(f"The small-NORB {split} images and labels differ in length; re-download them.")
    return Dataset(
        "norb",
        torch.from_numpy(norb_to_32(arrays["train_x"])),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        torch.from_numpy(norb_to_32(arrays["test_x"])),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        binary=False,
    )


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
    folder = _TORCHVISION_DIRS[name]
    arr = {k: read_idx(p, checksum_key=f"{folder}/raw/{p.name}") for k, p in paths.items()}
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
    train, valid, test = (read_amat(p, checksum_key=f"binarized_mnist/{p.name}") for p in paths)
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
    verify_checksum(path.read_bytes(), path, "omniglot28/omniglot28_uint8.npz")
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

    :param name: ``mnist``, ``fashion_mnist``, ``binarized_mnist``, ``omniglot28``, ``omniglot`` or ``norb``.
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
    if name == "norb":
        return _load_norb(root_path)
    raise ValueError(
        f"Unknown dataset {name!r}; choose mnist, fashion_mnist, binarized_mnist, omniglot28, omniglot or norb."
    )


def check_data(x: torch.Tensor, *, input_dim: int, likelihood: str, what: str = "data") -> None:
    """Raise :class:`ValueError` with a one-line fix if ``x`` cannot be modelled.

    :param x: Data of shape ``(N, input_dim)``.
    :param input_dim: The model's input dimension.
    :param likelihood: ``"bernoulli"`` needs values in {0, 1}; ``"gaussian"`` any finite values.
    :param what: Name of the data in the message (e.g. ``"training data"``).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"{what} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}; convert it with .float()."
        )
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


#: Grey levels of 8-bit images.
LEVELS = 256


def dequantize(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit grey levels: ``y = (k + u) / 256`` with
    ``k = round(255 x)`` and ``u ~ U[0, 1)`` per pixel.

    A continuous density p(y) on [0, 1)^D then bounds the probability of the discrete
    image: log P(k) ≥ E_u[log p(y)] − D log 256 (Theis et al., 2016), which is finite,
    whereas a density fitted to the 256 discrete values themselves can grow without bound.
    :func:`dequantization_offset` is that −D log 256.

    :param x: Grey levels ``k / 255`` in [0, 1], any shape.
    :param generator: Random generator (default: torch's global one).
    :raises ValueError: if ``x`` has values outside [0, 1].
    """
    if not ((x >= 0) & (x <= 1)).all():
        raise ValueError("dequantization needs grey levels in [0, 1]; rescale the data (e.g. divide by 255).")
    k = torch.round(x * (LEVELS - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + u) / LEVELS


def dequantization_offset(input_dim: int) -> float:
    """−D log 256: the log-density of a dequantized image minus that of its discrete values.

    :param input_dim: D, the number of pixels.
    """
    return -input_dim * math.log(LEVELS)


def binarize(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample binary data x_b ~ Bernoulli(x) from grey levels ``x`` in [0, 1].

    :param x: Grey levels, any shape.
    :param generator: Random generator (default: torch's global one).
    :raises ValueError: if ``x`` has values outside [0, 1].
    """
    if not ((x >= 0) & (x <= 1)).all():
        raise ValueError("binarization needs grey levels in [0, 1]; rescale the data (e.g. divide by 255).")
    return torch.bernoulli(x, generator=generator)
