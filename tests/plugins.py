"""A user's own components, defined outside fedtorch, used by the plug-in tests."""

from __future__ import annotations

import torch
from torch import nn

from fedtorch.data.datasets import DataBundle
from fedtorch.strategies import Strategy
from fedtorch.strategies.aggregate import weighted_average
from fedtorch.strategies.streaming import RunningMean


class TinyNet(nn.Module):
    """A model that knows nothing of fedtorch: its sizes are its own arguments."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class WrongOutputNet(nn.Module):
    """Outputs 3 logits whatever the dataset: the builder must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def blobs(n: int = 600, seed: int = 0) -> DataBundle:
    """A user dataset: two well-separated Gaussian blobs in 4 dimensions."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen) + 3.0 * y[:, None].float()
    cut = n * 4 // 5
    return DataBundle(x[:cut], y[:cut], x[cut:], y[cut:], num_classes=2, name="blobs")


def tensor_datasets(n: int = 300) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """A user dataset given as a (train, test) pair of torch Datasets."""
    bundle = blobs(n)
    return (
        torch.utils.data.TensorDataset(bundle.train_x, bundle.train_y),
        torch.utils.data.TensorDataset(bundle.test_x, bundle.test_y),
    )


def first_half_split(labels: torch.Tensor, num_clients: int, seed: int) -> list[torch.Tensor]:
    """A user partitioner: only the first half of the data, dealt round-robin."""
    idx = torch.arange(len(labels) // 2)
    return [idx[c::num_clients] for c in range(num_clients)]


class HalfStepStreaming(Strategy):
    """The same rule in streaming form: one running sum instead of the round's rows."""

    def __init__(self, step: float = 0.5) -> None:
        self.step = step

    def start_round(self, global_vector, round_idx, rows):
        return HalfStepRound(global_vector, self.step)


class HalfStepRound:
    def __init__(self, global_vector, step):
        self.x, self.step, self.mean = global_vector, step, RunningMean()

    def add(self, client, delta):
        self.mean.add(delta, client.num_samples)

    def finish(self):
        return self.x + self.step * self.mean.mean()


class HalfStepFedAvg(Strategy):
    """A user strategy: move the global model half way towards the FedAvg average."""

    def __init__(self, step: float = 0.5) -> None:
        self.step = step
        self.calls = 0

    def aggregate(self, global_vector, results, round_idx):
        self.calls += 1
        return global_vector + self.step * weighted_average(results.deltas, results.sample_counts())


class LastTokenClassifier(nn.Module):
    """A model with the wrong output for a language model: one prediction per sequence."""

    def __init__(self, vocab_size: int = 90) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 4)
        self.head = nn.Linear(4, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens[:, -1]))


class BigramLM(nn.Module):
    """A language model without recurrence (each position sees its own token), so the
    vectorized engine can batch it: tests the language-model path of both engines."""

    def __init__(self, vocab_size: int = 90, width: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embedding(tokens)))


def recorded_fashion_mnist(record: str, **kwargs) -> DataBundle:
    """fashion_mnist that first notes, in a file of ``record``, which root this process
    read (with the SILO_TAG environment variable the test gives each process)."""
    import os
    from pathlib import Path

    from fedtorch.data.datasets import fashion_mnist

    Path(record).mkdir(parents=True, exist_ok=True)
    with open(Path(record) / f"{os.getpid()}.txt", "a") as fh:
        fh.write(f"{os.environ.get('SILO_TAG', '')} {kwargs['root']}\n")
    return fashion_mnist(**kwargs)
