"""data.in_memory=false: clients train through DataLoaders over their index subsets.

The DataLoader path draws the in-memory path's batches, so without random transforms both
give the same bits; random transforms are seeded per (seed, round, client, step), so the
numbers do not depend on num_workers or on an interruption.
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from fedtorch.data.datasets import _CIFAR_MEAN as CIFAR_MEAN
from fedtorch.data.datasets import _CIFAR_STD as CIFAR_STD
from fedtorch.data.datasets import ImageArrayDataset, cifar10
from fedtorch.data.loading import DatasetInputs, _SeededBatches
from fedtorch.errors import ConfigError
from fedtorch.train import train
from tests.conftest import FAST, FAST_NO_MODEL, compose_config
from tests.kill_child import run_and_kill
from tests.test_data import write_mnist_like
from tests.test_resume import assert_same


def write_cifar_like(root, per_batch=16, seed=0):
    """A CIFAR-10 folder in torchvision's pickle layout, with random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (per_batch, 3 * 32 * 32), generator=gen, dtype=torch.uint8)
        labels = (torch.arange(per_batch) % 10).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data.numpy(), "labels": labels}, fh)


def run(tmp_path, name, overrides):
    run_dir = tmp_path / name
    train(compose_config(overrides), run_dir)
    return run_dir


IMAGES = ["rounds=2", "num_clients=4", "clients_per_round=2", "client.batch_size=8"]
CNN = ["model=simple_cnn", "eval_clients=true"]


def test_synthetic_through_dataloaders_matches_memory(tmp_path):
    memory = run(tmp_path, "memory", FAST)
    loaded = run(tmp_path, "loaded", [*FAST, "data.in_memory=false"])
    assert_same(loaded, memory)


def test_fashion_mnist_files_with_workers_match_memory(tmp_path):
    write_mnist_like(tmp_path / "fm", n_train=80, n_test=24)
    base = [
        *FAST_NO_MODEL,
        *IMAGES,
        *CNN,
        "dataset=fashion_mnist",
        f"data.root={tmp_path / 'fm'}",
        "data.search_paths=[]",
        "data.download=false",
    ]
    memory = run(tmp_path, "memory", base)
    loaded = run(tmp_path, "loaded", [*base, "data.in_memory=false", "data.num_workers=2"])
    assert_same(loaded, memory)


@pytest.fixture
def cifar_base(tmp_path):
    write_cifar_like(tmp_path / "c10")
    return [
        *FAST_NO_MODEL,
        *IMAGES,
        *CNN,
        "dataset=cifar10",
        f"data.root={tmp_path / 'c10'}",
        "data.download=false",
        "data.in_memory=false",
    ]


def test_cifar_augmentation_is_the_same_whatever_the_workers(tmp_path, cifar_base):
    plain = run(tmp_path, "plain", cifar_base)
    one = run(tmp_path, "aug0", [*cifar_base, "data.augment=true"])
    two = run(tmp_path, "aug2", [*cifar_base, "data.augment=true", "data.num_workers=2"])
    assert_same(two, one)
    augmented = torch.load(one / "model.pt")
    unaugmented = torch.load(plain / "model.pt")
    assert any(not torch.equal(augmented[k], unaugmented[k]) for k in augmented)


def test_crop_and_flip_are_seeded_per_batch_and_leave_global_rngs(tmp_path):
    write_cifar_like(tmp_path)
    data = cifar10(str(tmp_path), download=False, in_memory=False, augment=True)
    plain = cifar10(str(tmp_path), download=False, in_memory=False)
    wrapped = _SeededBatches(data.train_x.dataset)
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(123)
    first = wrapped.__getitems__([(7, 0), (7, 1)])
    assert torch.equal(torch.rand(1), expected_torch) and random.random() == expected_py
    again = wrapped.__getitems__([(7, 0), (7, 1)])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    original = plain.train_x.dataset[0][0]
    seen = {crop_of(wrapped.__getitems__([(s, 0)])[0][0], original) for s in range(40)}
    assert None not in seen  # every output is a 32x32 window of the padded image, maybe flipped
    assert {flip for _, _, flip in seen} == {False, True}
    assert any((dy, dx) != (4, 4) for dy, dx, _ in seen)


def crop_of(output, image):
    """(dy, dx, flipped) such that ``output`` is that window of ``image`` padded by 4 (the
    window flipped if ``flipped``), or None. Padding is 0 before normalisation."""
    padded = torch.nn.functional.pad(
        (image * torch.tensor(CIFAR_STD).view(3, 1, 1) + torch.tensor(CIFAR_MEAN).view(3, 1, 1)),
        (4, 4, 4, 4),
    )
    for dy in range(9):
        for dx in range(9):
            window = padded[:, dy : dy + 32, dx : dx + 32]
            for flipped in (False, True):
                candidate = window.flip(-1) if flipped else window
                renormalised = (candidate - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(
                    CIFAR_STD
                ).view(3, 1, 1)
                if torch.allclose(renormalised, output, atol=1e-5):
                    return dy, dx, flipped
    return None


def test_image_dataset_converts_as_the_in_memory_path():
    images = torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8)
    ds = ImageArrayDataset(images, torch.arange(5), [0.2860], [0.3530])
    expected = images.to(torch.float32).div_(255.0).sub_(0.2860).div_(0.3530)
    assert all(torch.equal(ds[i][0], expected[i]) for i in range(5))


class CountingDataset(torch.utils.data.Dataset):
    """A user dataset without ``targets`` whose transform counts the samples it sees."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i] * 1.0, int(self.y[i])


def test_dataset_pair_reads_labels_then_samples_through_the_loader():
    from fedtorch.config.build import _setup_data
    from tests.plugins import blobs

    bundle = blobs(50)
    train_ds = CountingDataset(bundle.train_x, bundle.train_y)
    test_ds = CountingDataset(bundle.test_x, bundle.test_y)
    cfg = compose_config(
        [*FAST, "data._target_=tests.plugins.tensor_datasets", "+data.n=50", "data.in_memory=false"]
    )
    from fedtorch.data.datasets import stream

    data = stream(train_ds, test_ds)
    assert torch.equal(data.train_y, bundle.train_y) and train_ds.reads == len(train_ds)
    before = train_ds.reads
    batches = list(data.train_x.batches([torch.tensor([3, 1]), torch.tensor([0])]))
    assert train_ds.reads == before + 3
    assert torch.equal(batches[0][0], bundle.train_x[[3, 1]])
    assert torch.equal(batches[0][1], bundle.train_y[[3, 1]])
    built = _setup_data(cfg, torch.device("cpu"))
    assert isinstance(built.train_x, DatasetInputs) and built.train_x.shape == (40, 4)


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (["data.num_workers=2"], "data.num_workers", "data.in_memory=false"),
        (["data.pin_memory=true"], "data.pin_memory", "data.in_memory=false"),
        (["data.in_memory=false", "data.num_workers=-1"], "data.num_workers", ">= 0"),
        (["data.in_memory=no"], "data.in_memory", "true or false"),
        (
            ["data._target_=tests.plugins.blobs", "data.in_memory=false"],
            "data.in_memory",
            "(train, test) pair of Datasets",
        ),
        (["data.in_memory=false", "engine=vectorized"], "engine", "engine=sequential"),
    ],
)
def test_bad_reading_options_stop_before_training(tmp_path, overrides, key, says):
    cfg = compose_config([*FAST, *overrides])
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path)
    assert info.value.key == key and says in str(info.value)
    assert not (tmp_path / "metrics.csv").exists()


def test_cifar_augment_needs_the_dataloader_path(tmp_path, cifar_base):
    cfg = compose_config([*cifar_base, "data.in_memory=true", "data.augment=true"])
    with pytest.raises(ConfigError, match="data.in_memory=false") as info:
        train(cfg, tmp_path)
    assert info.value.key == "data.augment"


RESUMED = [*FAST, "rounds=4", "checkpoint.every=1", "data.in_memory=false"]


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
def test_killed_run_resumes_exactly_with_other_workers(tmp_path):
    reference = run(tmp_path, "reference", RESUMED)
    killed = tmp_path / "killed"
    run_and_kill(killed, "mid-round:3", [*RESUMED, "data.num_workers=2"])
    train(compose_config([*RESUMED, "resume=true"]), killed)
    assert_same(killed, reference)
