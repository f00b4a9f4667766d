"""Dataset loading: IDX files plain and gzipped, torchvision layout, clear errors."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from fedtorch.data import datasets
from fedtorch.data.idx import read_idx
from fedtorch.errors import DataError
from tests.conftest import FMNIST_DIR


def idx_bytes(array: torch.Tensor) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", s) for s in array.shape
    )
    return header + array.to(torch.uint8).numpy().tobytes()


def write_mnist_like(folder, n_train=20, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    parts = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=gen),
        "train-labels-idx1-ubyte": torch.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=gen),
        "t10k-labels-idx1-ubyte": torch.arange(n_test) % 10,
    }
    for name, array in parts.items():
        payload = idx_bytes(array)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    parts = write_mnist_like(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / ("train-images-idx3-ubyte" + suffix))
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images.long(), parts["train-images-idx3-ubyte"])


def test_loader_flat_folder_normalises(tmp_path):
    write_mnist_like(tmp_path)
    bundle = datasets.mnist(root=str(tmp_path), download=False, search_paths=[], normalize=False)
    assert bundle.train_x.shape == (20, 1, 28, 28) and bundle.test_x.shape == (10, 1, 28, 28)
    assert (
        bundle.train_x.dtype == torch.float32
        and bundle.train_x.min() >= 0
        and bundle.train_x.max() <= 1
    )
    assert bundle.train_y.tolist() == [i % 10 for i in range(20)]
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 28, 28)


def test_loader_torchvision_layout(tmp_path):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", gz=False)
    bundle = datasets.fashion_mnist(root=str(tmp_path), download=False, search_paths=[])
    assert len(bundle.train_y) == 20


def test_missing_files_offline_error(tmp_path):
    with pytest.raises(DataError) as err:
        datasets.mnist(root=str(tmp_path / "nothing"), download=False, search_paths=[])
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "data.root=" in message
    assert "\n" not in message


def test_truncated_gzip(tmp_path):
    write_mnist_like(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        datasets.mnist(root=str(tmp_path), download=False, search_paths=[])


def test_wrong_magic(tmp_path):
    write_mnist_like(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        datasets.mnist(root=str(tmp_path), download=False, search_paths=[])


def test_size_mismatch(tmp_path):
    write_mnist_like(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        datasets.mnist(root=str(tmp_path), download=False, search_paths=[])


def test_synthetic_is_deterministic_and_shaped():
    a = datasets.synthetic(num_train=50, num_test=20, input_shape=(1, 4, 4), seed=3)
    b = datasets.synthetic(num_train=50, num_test=20, input_shape=(1, 4, 4), seed=3)
    assert a.train_x.shape == (50, 1, 4, 4) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(
        a.train_x,
        datasets.synthetic(num_train=50, num_test=20, input_shape=(1, 4, 4), seed=4).train_x,
    )


@pytest.mark.skipif(
    not FMNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist():
    bundle = datasets.fashion_mnist(
        root="/nonexistent", download=False, search_paths=[str(FMNIST_DIR)]
    )
    assert bundle.train_x.shape == (60000, 1, 28, 28) and bundle.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(bundle.train_y).tolist() == [6000] * 10
    assert abs(float(bundle.train_x.mean())) < 0.01 and abs(float(bundle.train_x.std()) - 1) < 0.01
