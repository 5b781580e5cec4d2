"""Loaders for every dataset format, the data root, and clear errors on bad data."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig
from pyro_lvae import data as data_module
from pyro_lvae.data import DATA_ENV, Dataset, binarize, check_data, data_root, load_dataset, read_amat, read_chardata
from pyro_lvae.training import epoch_batches, prepare_data


def test_mnist_from_shared_data(mnist):
    assert mnist.train_x.shape == (60000, 784) and mnist.test_x.shape == (10000, 784)
    assert mnist.train_x.dtype == torch.float32
    assert 0 <= mnist.train_x.min() and mnist.train_x.max() == 1.0
    assert set(mnist.test_y.unique().tolist()) == set(range(10))
    assert not mnist.binary


def test_fashion_and_omniglot28_from_shared_data(shared_data_root):
    fashion = load_dataset("fashion_mnist", root=shared_data_root, download=False)
    assert fashion.train_x.shape == (60000, 784)
    omni = load_dataset("omniglot28", root=shared_data_root)
    assert omni.train_x.shape == (19280, 784) and omni.test_x.shape == (13180, 784)
    assert 0 <= omni.train_x.min() and omni.train_x.max() <= 1


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("elsewhere").name == "elsewhere"
    monkeypatch.delenv(DATA_ENV)
    assert data_root().name == "data"


def test_amat_loader(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "SHA256", {})  # small files in the official format
    rng = np.random.default_rng(0)
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    arrays = {}
    for split, n in (("train", 5), ("valid", 3), ("test", 4)):
        a = (rng.random((n, 784)) < 0.3).astype(int)
        arrays[split] = a
        text = "\n".join(" ".join(map(str, row)) for row in a) + "\n"
        with gzip.open(folder / f"binarized_mnist_{split}.amat.gz", "wt") as f:
            f.write(text)
    ds = load_dataset("binarized_mnist", root=tmp_path)
    assert ds.binary and ds.train_x.shape == (8, 784) and ds.test_x.shape == (4, 784)
    np.testing.assert_array_equal(ds.train_x.numpy(), np.concatenate([arrays["train"], arrays["valid"]]))
    np.testing.assert_array_equal(ds.test_x.numpy(), arrays["test"])
    (folder / "bad.amat").write_text("0 1 0\n1 0\n")
    with pytest.raises(ValueError, match="corrupt"):
        read_amat(folder / "bad.amat")


def test_chardata_loader_orientation(tmp_path):
    """chardata.mat stores 784 × N column-major images; the loader returns them row-major."""
    from scipy.io import savemat

    n_train, n_test = 4, 2
    images = np.zeros((n_train + n_test, 28, 28), dtype=np.float64)
    for i in range(n_train + n_test):
        images[i, i, 27 - i] = 1.0  # one pixel at row i, column 27 - i
    columns = images.reshape(-1, 784, order="F").T  # the IWAE file's layout
    target = np.zeros((50, n_train))
    target[[3, 1, 4, 1], range(n_train)] = 1
    folder = tmp_path / "omniglot"
    folder.mkdir()
    savemat(
        folder / "chardata.mat",
        {
            "data": columns[:, :n_train],
            "testdata": columns[:, n_train:],
            "target": target,
            "testtarget": np.zeros((50, n_test)),
        },
    )
    train_x, train_y, test_x, _ = read_chardata(folder / "chardata.mat")
    assert train_x.shape == (4, 784) and test_x.shape == (2, 784)
    for i in range(n_train):
        assert train_x[i].reshape(28, 28)[i, 27 - i] == 1 and train_x[i].sum() == 1
    assert train_y.tolist() == [3, 1, 4, 1]
    ds = load_dataset("omniglot", root=tmp_path)
    assert ds.test_x.shape == (2, 784)
    savemat(folder / "chardata.mat", {"images": columns})
    with pytest.raises(ValueError, match="not the IWAE"):
        read_chardata(folder / "chardata.mat")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "binarized_mnist", "omniglot28", "omniglot", "norb"])
def test_missing_files_name_the_files_and_the_option(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "--data-root" in message and DATA_ENV in message
    assert "\n" not in message


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(FileNotFoundError, match="download failed"):
        load_dataset("mnist", root=tmp_path, download=True)


def test_idx_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "SHA256", {})  # the format check, without the checksum
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).write_bytes(header + bytes(100))
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", root=tmp_path, download=False)


@pytest.mark.parametrize(
    "x, likelihood, match",
    [
        (torch.zeros(4, 5), "bernoulli", "shape"),
        (torch.zeros(4, 6, dtype=torch.int64), "bernoulli", "floating-point"),
        (torch.zeros(0, 6), "bernoulli", "empty"),
        (torch.full((4, 6), float("nan")), "gaussian", "NaN"),
        (torch.full((4, 6), float("inf")), "gaussian", "NaN or Inf"),
        (torch.full((4, 6), 0.5), "bernoulli", "binarize"),
    ],
)
def test_check_data_errors(x, likelihood, match):
    with pytest.raises(ValueError, match=match):
        check_data(x, input_dim=6, likelihood=likelihood)


def test_binarize_range():
    x = torch.rand(100, 6)
    b = binarize(x)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="rescale"):
        binarize(x * 255)


def test_prepare_data_checks(make_synthetic):
    grey = make_synthetic(dim=6)
    static = ExperimentConfig(
        model=ModelConfig(input_dim=6, latent_sizes=(2,), hidden_sizes=(4,)),
        train=TrainConfig(binarization="static", batch_size=8),
    )
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        prepare_data(static, dataset=grey)
    dynamic = static.replace(binarization="dynamic")
    scaled = Dataset("x", grey.train_x * 255, grey.train_y, grey.test_x, grey.test_y, False)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        prepare_data(dynamic, dataset=scaled)
    data = prepare_data(dynamic, dataset=grey)
    assert set(data.test.unique().tolist()) <= {0.0, 1.0}  # the test set is binarized once
    # A fresh binarization every epoch, the same one when an epoch is rebuilt (resume).
    x0, b0 = epoch_batches(data, dynamic, 0)
    x1, _ = epoch_batches(data, dynamic, 1)
    assert data.dynamic and not torch.equal(x0, x1) and set(x0.unique().tolist()) <= {0.0, 1.0}
    x0_again, b0_again = epoch_batches(data, dynamic, 0)
    assert torch.equal(x0, x0_again) and all(torch.equal(a, b) for a, b in zip(b0, b0_again))


def _write_norb(path, array, magic):
    header = np.array([magic, array.ndim] + list(array.shape) + [1] * max(0, 3 - array.ndim), dtype="<i4")
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(header.tobytes() + array.astype(array.dtype.newbyteorder("<")).tobytes())


def test_norb_loader_reads_small_norb_files_and_reduces_to_32x32(tmp_path):
    """Small files in the small-NORB binary format: the first camera, 3×3 block means, /255."""
    from pyro_lvae.data import NORB_FILES, norb_to_32, read_norb

    rng = np.random.default_rng(0)
    folder = tmp_path / "norb"
    folder.mkdir()
    images = {s: rng.integers(0, 256, size=(n, 2, 96, 96), dtype=np.uint8) for s, n in (("train", 3), ("test", 2))}
    labels = {"train": np.array([0, 4, 2], dtype=np.int32), "test": np.array([1, 3], dtype=np.int32)}
    for split in ("train", "test"):
        _write_norb(folder / NORB_FILES[f"{split}_x"], images[split], 0x1E3D4C55)
        _write_norb(folder / (NORB_FILES[f"{split}_y"] + ".gz"), labels[split], 0x1E3D4C54)  # 1-D, gzipped
    ds = load_dataset("norb", root=tmp_path)
    assert ds.train_x.shape == (3, 1024) and ds.test_x.shape == (2, 1024)
    assert ds.train_y.tolist() == [0, 4, 2] and ds.test_y.tolist() == [1, 3]
    # Pixel (row 5, column 7) of the 32×32 image is the mean of rows 15-17, columns 21-23 of camera 0.
    block = images["train"][1, 0, 15:18, 21:24].astype(np.float64)
    assert ds.train_x[1, 5 * 32 + 7].item() == pytest.approx(block.mean() / 255, abs=1e-6)
    assert 0 <= ds.train_x.min() and ds.train_x.max() <= 1
    assert read_norb(folder / NORB_FILES["train_x"]).shape == (3, 2, 96, 96)
    with pytest.raises(ValueError, match=r"\(N, 2, 96, 96\)"):
        norb_to_32(np.zeros((2, 96, 96), dtype=np.uint8))
    # A truncated file and a foreign file are named, with the fix.
    raw = (folder / NORB_FILES["test_x"]).read_bytes()
    (folder / NORB_FILES["test_x"]).write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated.*re-download"):
        load_dataset("norb", root=tmp_path)
    (folder / NORB_FILES["test_x"]).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="magic number"):
        load_dataset("norb", root=tmp_path)


@pytest.mark.parametrize(
    "name, rel", [("mnist", "MNIST/raw/t10k-labels-idx1-ubyte"), ("omniglot28", "omniglot28/omniglot28_uint8.npz")]
)
def test_a_corrupt_data_file_fails_its_checksum(tmp_path, shared_data_root, name, rel):
    """A copy of the shared data with one byte changed in one file is refused, naming the file."""
    import shutil

    folder = rel.split("/")[0]
    shutil.copytree(shared_data_root / folder, tmp_path / folder)
    target = tmp_path / rel
    if not target.exists():  # MNIST is stored gzipped: corrupt the uncompressed contents
        gz = target.with_name(target.name + ".gz")
        raw = bytearray(gzip.open(gz).read())
        raw[-1] ^= 1
        gz.chmod(0o644)
        gz.write_bytes(gzip.compress(bytes(raw)))
    else:
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 1
        target.chmod(0o644)
        target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"fails its checksum .*delete it and download or copy it again") as err:
        load_dataset(name, root=tmp_path, download=False)
    assert rel.split("/")[-1] in str(err.value)


def test_the_real_static_binarized_mnist_files(shared_data_root):
    """Larochelle & Murray's .amat files: 50,000 train + 10,000 valid (trained on together,
    as in the IWAE and LVAE papers) and 10,000 test binary images."""
    ds = load_dataset("binarized_mnist", root=shared_data_root)
    assert ds.binary and ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert set(torch.unique(ds.test_x).tolist()) == {0.0, 1.0}
    # About 13% of MNIST's pixels are ink after binarization; a transposed or shifted read
    # would still be binary, so also check that the digits' centre is inked and the corners are not.
    assert 0.10 < ds.train_x.mean().item() < 0.16
    images = ds.test_x.reshape(-1, 28, 28)
    assert images[:, 10:18, 10:18].mean() > 5 * images[:, :4, :4].mean() and images[:, :2, :2].sum() == 0


def test_dequantize_fills_each_level_cell_uniformly():
    from pyro_lvae.data import dequantization_offset, dequantize

    k = torch.arange(256, dtype=torch.float64).repeat(400)
    y = dequantize(k / 255, generator=torch.Generator().manual_seed(0))
    cell = torch.floor(y * 256)
    assert torch.equal(cell, k)  # every value stays in its own level's cell [k/256, (k+1)/256)
    u = y * 256 - k
    assert 0.45 < u.mean().item() < 0.55 and u.min() >= 0 and u.max() < 1
    assert dequantization_offset(784) == pytest.approx(-784 * math.log(256))
    with pytest.raises(ValueError, match=r"grey levels in \[0, 1\]"):
        dequantize(torch.tensor([1.5]))
