"""Partitioners: coverage, disjointness, determinism, skew behaviour, errors."""

from __future__ import annotations

import time

import pytest
import torch

from fedtorch.data import partition as P
from fedtorch.errors import ConfigError


def labels(n: int = 6000, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


SPLITS = {
    "iid": lambda y, k, s: P.iid(y, k, s),
    "dirichlet": lambda y, k, s: P.dirichlet(y, k, s, alpha=0.3),
    "quantity": lambda y, k, s: P.quantity(y, k, s, alpha=0.5),
    "shards": lambda y, k, s: P.shards(y, k, s, shards_per_client=2),
    "label_skew": lambda y, k, s: P.label_skew(y, k, s, classes_per_client=3),
}


@pytest.mark.parametrize("name", SPLITS)
def test_disjoint_deterministic_and_covering(name):
    y = labels()
    parts = SPLITS[name](y, 20, 7)
    assert len(parts) == 20
    joined = torch.cat(parts)
    assert joined.dtype == torch.int64
    assert len(joined) == len(set(joined.tolist())), "a sample went to two clients"
    assert joined.min() >= 0 and joined.max() < len(y)
    if name != "label_skew":  # label_skew may leave classes nobody holds unassigned
        assert len(joined) == len(y)
    again = SPLITS[name](y, 20, 7)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = SPLITS[name](y, 20, 8)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_equal():
    sizes = [len(p) for p in P.iid(labels(1000), 7, 0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000


def mean_classes(parts, y):
    return sum(len(torch.unique(y[p])) for p in parts) / len(parts)


def test_dirichlet_alpha_controls_skew():
    y = labels(20000)
    skewed = mean_classes(P.dirichlet(y, 50, 0, alpha=0.05, min_size=0), y)
    mild = mean_classes(P.dirichlet(y, 50, 0, alpha=100.0, min_size=0), y)
    assert skewed < 4 < 9.5 < mild


def test_dirichlet_min_size_and_no_spin():
    y = labels(60000)
    start = time.perf_counter()
    parts = P.dirichlet(y, 1000, 0, alpha=0.05, min_size=10)
    elapsed = time.perf_counter() - start
    assert min(len(p) for p in parts) >= 10
    assert sum(len(p) for p in parts) == 60000
    # Loose bound that only catches re-draw loops; the real figure is a few ms.
    assert elapsed < 10


def test_shards_pathological():
    y = torch.arange(10).repeat_interleave(600)  # 6000 samples, sorted classes
    parts = P.shards(y, 100, 0, shards_per_client=2)
    assert all(len(p) == 60 for p in parts)
    assert all(len(torch.unique(y[p])) <= 2 for p in parts)


def test_label_skew_classes_per_client():
    y = labels()
    for k in (1, 2, 3):
        parts = P.label_skew(y, 10, 0, classes_per_client=k)
        assert all(len(torch.unique(y[p])) == k for p in parts)
    one = P.label_skew(y, 10, 0, classes_per_client=1)
    assert [int(y[p[0]]) for p in one] == list(range(10))


def test_quantity_keeps_labels_iid_but_sizes_skewed():
    y = labels(20000)
    parts = P.quantity(y, 20, 0, alpha=0.3)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 4 * sizes[len(sizes) // 2] or sizes[-1] > 3000
    big = max(parts, key=len)
    assert len(torch.unique(y[big])) == 10


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda y: P.dirichlet(y, 10, 0, alpha=0.0), "partition.alpha"),
        (lambda y: P.dirichlet(y, 10, 0, alpha=-1.0), "partition.alpha"),
        (lambda y: P.quantity(y, 10, 0, alpha=0.0), "partition.alpha"),
        (lambda y: P.iid(y, 101, 0), "num_clients"),
        (lambda y: P.dirichlet(y, 20, 0, min_size=10), "partition.min_size"),
        (lambda y: P.shards(y, 3, 0, shards_per_client=7), "partition.shards_per_client"),
        (lambda y: P.label_skew(y, 5, 0, classes_per_client=11), "partition.classes_per_client"),
        (lambda y: P.iid(y, 0, 0), "num_clients"),
    ],
)
def test_impossible_requests_name_the_key(call, key):
    with pytest.raises(ConfigError) as err:
        call(labels(100))
    assert str(err.value).startswith(key + ":")
    assert "\n" not in str(err.value)


def test_statistics():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    parts = [torch.tensor([0, 1, 2]), torch.tensor([3]), torch.tensor([4])]
    stats = P.statistics(parts, y, num_classes=3)
    assert stats["sizes"] == [3, 1, 1]
    assert stats["label_histograms"] == [[2, 1, 0], [0, 1, 0], [0, 0, 1]]
    s = stats["summary"]
    assert (s["min_size"], s["median_size"], s["max_size"]) == (1, 1.0, 3)
    assert s["unassigned_samples"] == 1
    assert s["mean_classes_per_client"] == pytest.approx(4 / 3, abs=1e-3)
