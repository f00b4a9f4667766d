"""Datasets, loaded once into memory as tensors, or read sample by sample.

Every loader returns a :class:`DataBundle`: float inputs already normalised, integer labels,
the class count and the input shape. By default training slices these tensors by index;
there is no per-sample decoding or PIL conversion during training. With
``data.in_memory=false`` the built-in image loaders return their inputs as a
:class:`~fedtorch.data.loading.DatasetInputs` instead: a map-style dataset that converts (and,
for CIFAR-10 with ``augment``, augments) each sample when a DataLoader reads it.

A plug-in dataset is any callable (``data._target_=pkg.fn``) returning a ``DataBundle``, or a
``(train, test)`` pair of ``torch.utils.data.Dataset`` objects yielding ``(x, y)``: that pair
is materialised into tensors once, or with ``data.in_memory=false`` read through DataLoaders.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedtorch import seeding
from fedtorch.data.idx import read_idx
from fedtorch.data.loading import DatasetInputs, labels_of
from fedtorch.data.tasks import Classification, Task
from fedtorch.errors import ConfigError, DataError


@dataclass
class DataBundle:
    """A train/test split held in memory.

    Attributes:
        train_x: inputs, shape [N_train, *input_shape]: float32 images, or int64 token ids
            [N_train, T] for a language model; or a :class:`DatasetInputs` reading them
            through a DataLoader (``data.in_memory=false``).
        train_y: labels [N_train] int64 in [0, num_classes), or next-token targets
            [N_train, T].
        test_x: inputs, shape [N_test, *input_shape] (or a :class:`DatasetInputs`).
        test_y: labels or targets for ``test_x``.
        num_classes: number of classes (the vocabulary size for a language model).
        name: short name used in logs.
        task: what the labels mean (:mod:`fedtorch.data.tasks`): classification by default.
        client_indices: the dataset's own clients (``partition=natural``): one tensor of
            training-row indices per client, or None.
        client_names: a name per natural client (for logs and ``dataset.json``).
        test_client_indices: each natural client's own test rows (``eval_local``), or None.
        partition_labels: a class per training row for the label-based partitioners when
            ``train_y`` is not one (a language model's play, say); None: ``train_y``.
        stats: statistics of the dataset, written to the run folder as ``dataset.json``.
        vocab_size: a text dataset's vocabulary (the model's embedding rows) when
            ``num_classes`` is not it (classification); None: ``num_classes``.
        pad_id: the input id that pads a row of token ids (the model masks it), or None.
        row_tokens: real (non-pad) input tokens of each training row [N_train], for the
            per-client statistics of a text dataset; None for other data.
    """

    train_x: torch.Tensor | DatasetInputs
    train_y: torch.Tensor
    test_x: torch.Tensor | DatasetInputs
    test_y: torch.Tensor
    num_classes: int
    name: str = "custom"
    task: Task = field(default_factory=Classification)
    client_indices: list[torch.Tensor] | None = None
    client_names: list[str] | None = None
    test_client_indices: list[torch.Tensor] | None = None
    partition_labels: torch.Tensor | None = None
    stats: dict[str, Any] | None = None
    vocab_size: int | None = None
    pad_id: int | None = None
    row_tokens: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device) -> DataBundle:
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def configure_reading(self, in_memory: bool, num_workers: int, pin_memory: bool) -> None:
        """Apply ``data.num_workers``/``pin_memory`` to the DataLoader path, or refuse them
        (and ``in_memory=false``) where the data is in memory."""
        streamed = isinstance(self.train_x, DatasetInputs)
        if not in_memory and not streamed:
            raise ConfigError(
                "data.in_memory",
                f"false needs data read sample by sample, but {self.name} loads its tensors "
                "at once; give a loader that returns a (train, test) pair of Datasets",
            )
        if streamed:
            for inputs in (self.train_x, self.test_x):
                inputs.configure(num_workers, pin_memory)
            return
        for key, value, default in (
            ("num_workers", num_workers, 0),
            ("pin_memory", pin_memory, False),
        ):
            if value != default:
                raise ConfigError(
                    f"data.{key}", "applies to the DataLoader path only; set data.in_memory=false"
                )

    @property
    def labels_for_partition(self) -> torch.Tensor:
        """One class per training row, for the label-based partitioners; a language model
        without ``partition_labels`` has one class (all zeros: see ``has_row_classes``)."""
        if self.partition_labels is not None:
            return self.partition_labels
        if self.train_y.ndim > 1:
            return torch.zeros(len(self.train_y), dtype=torch.long, device=self.train_y.device)
        return self.train_y

    @property
    def has_row_classes(self) -> bool:
        """Whether each training row has a class of its own (labels or partition labels)."""
        return self.partition_labels is not None or self.train_y.ndim == 1


class ImageArrayDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] converted one at a time, as a DataLoader reads them.

    The conversion is the in-memory path's (scale to [0, 1], subtract ``mean``, divide by
    ``std``, per channel), so without ``augment`` both paths see the same numbers.
    ``augment`` (a transform on the uint8 image, e.g. a random crop) runs first.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        augment: Any = None,
    ) -> None:
        self.images = images
        self.targets = labels
        channels = images.shape[1]
        self.mean = None if mean is None else torch.tensor(mean).view(channels, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(channels, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        x = image.to(torch.float32).div_(255.0)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, self.targets[index]


def _streamed(
    train: ImageArrayDataset, test: ImageArrayDataset, num_classes: int, name: str
) -> DataBundle:
    return DataBundle(
        DatasetInputs(train), train.targets, DatasetInputs(test), test.targets, num_classes, name
    )


def stream(train: torch.utils.data.Dataset, test: torch.utils.data.Dataset) -> DataBundle:
    """A ``(train, test)`` pair of map-style datasets read through DataLoaders: only their
    labels are loaded now (``targets`` when the datasets have them, else one pass)."""
    train_y, test_y = labels_of(train), labels_of(test)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return DataBundle(
        DatasetInputs(train),
        train_y,
        DatasetInputs(test),
        test_y,
        num_classes,
        type(train).__name__,
    )


# ---------------------------------------------------------------------------- MNIST family

_IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _candidate_dirs(root: Path, torchvision_name: str) -> list[Path]:
    return [root, root / "raw", root / torchvision_name / "raw", root / torchvision_name]


def _find_idx_files(dirs: Sequence[Path]) -> dict[str, Path] | None:
    """The four IDX files from the first folder that holds all of them, plain or .gz."""
    for folder in dirs:
        found = {}
        for part, stem in _IDX_NAMES.items():
            for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
                if (folder / name).is_file():
                    found[part] = folder / name
                    break
        if len(found) == len(_IDX_NAMES):
            return found
    return None


def _download_torchvision(cls_name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            getattr(tvd, cls_name)(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError offline
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise DataError(
            f"could not download {cls_name} into {root} ({reason}). Offline? Copy the files "
            "there, or set data.root=/folder/with/the/files (and data.download=false)"
        ) from exc


def _load_idx_dataset(
    name: str,
    torchvision_name: str,
    root: str,
    download: bool,
    search_paths: Sequence[str],
    mean: float,
    std: float,
    normalize: bool,
    in_memory: bool = True,
) -> DataBundle:
    root_path = Path(root).expanduser()
    dirs = _candidate_dirs(root_path, torchvision_name)
    dirs += [Path(p) for p in search_paths]
    files = _find_idx_files(dirs)
    if files is None and download:
        _download_torchvision(torchvision_name, root_path)
        files = _find_idx_files(dirs)
    if files is None:
        wanted = ", ".join(f"{s}[.gz]" for s in _IDX_NAMES.values())
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(
            f"{name}: data files not found. Looked for {wanted} in {looked}. "
            f"Set data.root=/folder/with/those/files, or data.download=true with internet"
        )
    tensors = {part: read_idx(path) for part, path in files.items()}
    for split in ("train", "test"):
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{files[split + '_x']}: expected images [N,H,W] and labels [N], "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )

    if not in_memory:
        stats = ([mean], [std]) if normalize else (None, None)
        train, test = (
            ImageArrayDataset(
                tensors[f"{split}_x"].unsqueeze(1), tensors[f"{split}_y"].long(), *stats
            )
            for split in ("train", "test")
        )
        return _streamed(train, test, 10, name)

    def images(t: torch.Tensor) -> torch.Tensor:
        x = t.to(torch.float32).div_(255.0).unsqueeze(1)
        return x.sub_(mean).div_(std) if normalize else x

    return DataBundle(
        train_x=images(tensors["train_x"]),
        train_y=tensors["train_y"].long(),
        test_x=images(tensors["test_x"]),
        test_y=tensors["test_y"].long(),
        num_classes=10,
        name=name,
    )


def mnist(
    root: str = "data",
    download: bool = True,
    search_paths: Sequence[str] = ("/usr/share/datasets/mnist",),
    normalize: bool = True,
    in_memory: bool = True,
) -> DataBundle:
    """MNIST (LeCun et al. 1998): 60k/10k grey 28x28 digits, normalised to mean 0, std 1.

    ``in_memory=False`` converts each image when a DataLoader reads it (same numbers).
    """
    return _load_idx_dataset(
        "mnist", "MNIST", root, download, search_paths, 0.1307, 0.3081, normalize, in_memory
    )


def fashion_mnist(
    root: str = "data",
    download: bool = True,
    search_paths: Sequence[str] = ("/usr/share/datasets/fashion-mnist",),
    normalize: bool = True,
    in_memory: bool = True,
) -> DataBundle:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k grey 28x28 clothing images, 10 classes.

    ``in_memory=False`` converts each image when a DataLoader reads it (same numbers).
    """
    return _load_idx_dataset(
        "fashion_mnist",
        "FashionMNIST",
        root,
        download,
        search_paths,
        0.2860,
        0.3530,
        normalize,
        in_memory,
    )


# ---------------------------------------------------------------------------- CIFAR-10

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _read_cifar_batches(folder: Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")  # noqa: S301 - CIFAR's own format
        xs.append(torch.as_tensor(entry["data"]).view(-1, 3, 32, 32))
        ys.append(torch.as_tensor(entry.get("labels", entry.get("fine_labels"))))
    return torch.cat(xs), torch.cat(ys).long()


def cifar10(
    root: str = "data",
    download: bool = True,
    normalize: bool = True,
    in_memory: bool = True,
    augment: bool = False,
) -> DataBundle:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k colour 32x32 images, torchvision's folder layout.

    Reads ``ROOT/cifar-10-batches-py`` (the python pickles torchvision downloads).
    ``augment`` applies the standard training augmentation (He et al. 2016): a random
    32x32 crop of the image padded by 4 pixels, then a random horizontal flip; it runs per
    sample as the DataLoader reads it, so it needs ``in_memory=False``.
    """
    if augment and in_memory:
        raise ConfigError(
            "data.augment",
            "true needs data.in_memory=false (the crop and flip run per sample in the DataLoader)",
        )
    root_path = Path(root).expanduser()
    folder = root_path / "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / n).is_file() for n in [*train_names, "test_batch"]) and download:
        _download_torchvision("CIFAR10", root_path)
    missing = [n for n in [*train_names, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"cifar10: missing {', '.join(missing)} in {folder}. Set data.root to the folder "
            "holding cifar-10-batches-py, or data.download=true with internet"
        )
    train_x, train_y = _read_cifar_batches(folder, train_names)
    test_x, test_y = _read_cifar_batches(folder, ["test_batch"])
    if not in_memory:
        stats = (_CIFAR_MEAN, _CIFAR_STD) if normalize else (None, None)
        crop_and_flip = _crop_and_flip() if augment else None
        train = ImageArrayDataset(train_x, train_y, *stats, augment=crop_and_flip)
        return _streamed(train, ImageArrayDataset(test_x, test_y, *stats), 10, "cifar10")
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)

    def images(t: torch.Tensor) -> torch.Tensor:
        x = t.to(torch.float32).div_(255.0)
        return (x - mean) / std if normalize else x

    return DataBundle(images(train_x), train_y, images(test_x), test_y, 10, "cifar10")


def _crop_and_flip() -> Any:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])


# ---------------------------------------------------------------------------- synthetic


def synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 8, 8),
    noise: float = 1.0,
    seed: int = 0,
    in_memory: bool = True,
) -> DataBundle:
    """A learnable Gaussian-mixture task: class ``k`` has a random mean, inputs add noise.

    With the defaults a small MLP reaches high accuracy in a few rounds, which makes it the
    dataset of choice for tests and smoke runs. ``seed`` fixes the task itself (not the run).
    ``in_memory=False`` reads the same tensors through DataLoaders (to try that path).
    """
    gen = seeding.generator(seed, seeding.DATASET)
    shape = tuple(int(s) for s in input_shape)
    dim = int(torch.tensor(shape).prod())
    means = torch.randn(num_classes, dim, generator=gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        x = means[y] + noise * torch.randn(n, dim, generator=gen)
        return x.view(n, *shape), y

    train_x, train_y = sample(num_train)
    test_x, test_y = sample(num_test)
    if not in_memory:
        train = torch.utils.data.TensorDataset(train_x, train_y)
        test = torch.utils.data.TensorDataset(test_x, test_y)
        train_x, test_x = DatasetInputs(train), DatasetInputs(test)
    return DataBundle(train_x, train_y, test_x, test_y, num_classes, "synthetic")


# ---------------------------------------------------------------------------- plug-ins


def materialize(train: torch.utils.data.Dataset, test: torch.utils.data.Dataset) -> DataBundle:
    """Turn a ``(train, test)`` pair of map-style datasets into a :class:`DataBundle`."""

    def stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack([torch.as_tensor(x) for x in xs]).float(), torch.as_tensor(ys).long()

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return DataBundle(train_x, train_y, test_x, test_y, num_classes, type(train).__name__)
