"""Evaluation of the global model: test-set loss/accuracy and per-client accuracy.

:class:`Evaluator` is what the round loop calls: the global model on the test set, in one
process, shared by the ranks of ``engine=distributed`` (per-batch terms added in batch
order: the one-process totals bit for bit), or federated across silos (each silo's totals
on its own test split, added in silo order); with ``eval_local`` every client's own model
on its own test rows; with ``eval_clients`` the accuracy of each client's training data
(and, for a language model, each client's loss).

Memory: a language model's evaluation batch holds float32 logits [rows, T, V]; its rows are
``eval_batch_size`` or fewer, so that they fit in ``eval_memory_mb``. ``eval_max_batches``
evaluates only the first batches of the test set (a fixed subset, the same every round).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedtorch.data.datasets import DataBundle
from fedtorch.data.loading import DatasetInputs, in_order
from fedtorch.data.silos import Silos
from fedtorch.data.tasks import Classification, Task
from fedtorch.errors import ConfigError

log = logging.getLogger("fedtorch")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int = 2048,
    task: Task | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)``, in eval mode.

    Means are over the task's units: samples, or a language model's non-pad tokens.
    """
    loss, count, correct, predicted = evaluation_totals(model, x, y, batch_size, task).tolist()
    return loss / max(count, 1.0), correct / max(predicted, 1.0)


@torch.inference_mode()
def evaluation_totals(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int = 2048,
    task: Task | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed loss, loss count, hits and predictions of ``model`` on ``(x, y)`` (float64
    [4]), so that evaluations of several models on several parts can be pooled. ``rows``
    restricts the evaluation to those rows."""
    task = task or Classification()
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=x.device)
    for xb, yb in in_order(x, y, batch_size, rows):
        totals += _terms(model, xb, yb, task)
    return totals


def _terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
    """One batch's summed loss, loss count, hits and predictions, float64 [4]: the only
    place they are computed, so totals made batch by batch anywhere agree bit for bit."""
    stats = task.per_sample(model(x), y)
    return torch.stack([s.sum(dtype=torch.float64) for s in stats])


def add_in_order(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Evaluation terms (float64 [4] each) added one after another, from zero, on the CPU:
    the same order gives the same bits."""
    total = torch.zeros(4, dtype=torch.float64)
    for term in terms:
        total += term.cpu()
    return total


@torch.inference_mode()
def batch_totals(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    batch_size: int,
    task: Task,
    batches: list[int],
) -> torch.Tensor:
    """:func:`evaluation_totals`' per-batch terms for the batches numbered ``batches``
    (batch b holds rows [b * batch_size, (b + 1) * batch_size)), float64 [len(batches),
    4]: added in batch order they give its totals bit for bit, wherever each was made."""
    model.eval()
    out = torch.zeros(len(batches), 4, dtype=torch.float64)
    for i, b in enumerate(batches):
        rows = torch.arange(b * batch_size, min((b + 1) * batch_size, len(y)))
        for xb, yb in in_order(x, y, batch_size, rows):
            out[i] = _terms(model, xb, yb, task).cpu()
    return out


def num_batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


@torch.inference_mode()
def per_client_accuracy(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    owner: torch.Tensor,
    num_clients: int,
    batch_size: int = 2048,
    task: Task | None = None,
) -> torch.Tensor:
    """Accuracy of ``model`` on each client's own data, shape [num_clients].

    ``owner[i]`` is the client holding training sample ``i`` (-1 if none). One pass over the
    training set, then a scatter by owner.
    """
    totals = per_client_totals(model, x, y, owner, num_clients, batch_size, task)
    return (totals[:, 2] / totals[:, 3].clamp_min(1)).float()


@torch.inference_mode()
def per_client_totals(
    model: nn.Module,
    x: torch.Tensor | DatasetInputs,
    y: torch.Tensor,
    owner: torch.Tensor,
    num_clients: int,
    batch_size: int = 2048,
    task: Task | None = None,
) -> torch.Tensor:
    """Each client's summed loss, loss count, hits and predictions on its own data,
    float64 [num_clients, 4] on the CPU. ``owner[i]`` is the client holding training
    sample ``i`` (-1 if none). One pass over the training set, then a scatter by owner."""
    task = task or Classification()
    model.eval()
    terms = torch.empty(len(y), 4, dtype=torch.float64, device=y.device)
    start = 0
    for xb, yb in in_order(x, y, batch_size):
        terms[start : start + len(yb)] = torch.stack(
            [t.to(torch.float64) for t in task.per_sample(model(xb), yb)], dim=1
        )
        start += len(yb)
    held = owner >= 0
    return torch.stack(
        [
            torch.bincount(owner[held], weights=terms[held, i], minlength=num_clients)
            for i in range(4)
        ],
        dim=1,
    ).cpu()


def worst_fraction_mean(values: torch.Tensor, fraction: float = 0.1) -> float:
    """Mean of the lowest ``fraction`` of ``values`` (at least one value)."""
    k = max(1, int(len(values) * fraction))
    return float(values.sort().values[:k].mean())


def pooled(totals: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_loss`` and ``{prefix}_accuracy`` from summed evaluation terms."""
    loss, count, correct, predicted = totals.tolist()
    return {
        f"{prefix}_loss": loss / max(count, 1.0),
        f"{prefix}_accuracy": correct / max(predicted, 1.0),
    }


class Evaluator:
    """The global model's test metrics each evaluated round (see the module docstring).

    Args:
        model: the model the global weights are loaded into.
        data: the run's data (test split; training split for ``eval_clients``).
        shards: every client's training rows.
        batch_size: ``eval_batch_size``.
        local: ``eval_local``; clients' own models from ``local_state()``.
        per_client: ``eval_clients``.
        silos: the silo map under ``data.silos``.
        engine: the round engine; one that evaluates across ranks has
            ``evaluate_shared``/``evaluate_silos``.
        local_state: each client's local keys (the client trainer's), read when evaluated.
        max_batches: ``eval_max_batches``: evaluate the first this many test batches only
            (None: all); ``data`` then holds only those test rows.
        memory_mb: ``eval_memory_mb``: a language model's evaluation batches hold fewer rows
            than ``batch_size`` where their logits would not fit in it.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        shards: Sequence[torch.Tensor],
        batch_size: int,
        *,
        local: bool = False,
        per_client: bool = False,
        silos: Silos | None = None,
        engine: Any = None,
        local_state: Any = None,
        max_batches: int | None = None,
        memory_mb: float | None = None,
    ) -> None:
        if memory_mb is not None and isinstance(data.test_x, torch.Tensor):
            rows = data.task.evaluation_rows(batch_size, data.test_x, data.num_classes, memory_mb)
            if rows < min(batch_size, len(data.test_y)):  # the cap changes the batches
                log.info(
                    "evaluation: batches of %d rows (eval_batch_size=%d, but %d rows of "
                    "[T=%d, V=%d] float32 logits fill eval_memory_mb=%g)",
                    rows,
                    batch_size,
                    rows,
                    data.test_x.shape[1],
                    data.num_classes,
                    memory_mb,
                )
            batch_size = rows
        self.all_test = data  # every test row: each client's own (eval_local) index into it
        if max_batches is not None:
            data = _first_batches(data, max_batches, batch_size, silos)
        self.model, self.data, self.batch_size = model, data, batch_size
        self.local, self.silos, self.engine = local, silos, engine
        self.local_state = local_state or dict
        self.num_clients = len(shards)
        self.owner = _owner_map(data.train_y, shards) if per_client else None

    def evaluate(
        self, global_state: Mapping[str, torch.Tensor], shared: bool = True
    ) -> dict[str, float]:
        """Test loss/accuracy of ``global_state`` (and the per-client metrics asked for).
        ``shared``: the ranks are free to evaluate with rank 0 (no round started early)."""
        self.model.load_state_dict(global_state)
        data, task = self.data, self.data.task
        if self.silos is not None:
            test = pooled(self._silo_totals(global_state), "test")
            loss, acc = test["test_loss"], test["test_accuracy"]
        elif shared and hasattr(self.engine, "evaluate_shared"):
            test = pooled(self._shared_totals(global_state), "test")
            loss, acc = test["test_loss"], test["test_accuracy"]
        else:
            loss, acc = evaluate(self.model, data.test_x, data.test_y, self.batch_size, task)
        out = {"test_loss": loss, "test_accuracy": acc, **task.extra_metrics(loss)}
        if self.local:
            out.update(self._evaluate_local(global_state))
        if self.owner is not None:
            totals = per_client_totals(
                self.model,
                data.train_x,
                data.train_y,
                self.owner,
                self.num_clients,
                self.batch_size,
                task,
            )
            accs = (totals[:, 2] / totals[:, 3].clamp_min(1)).float()
            out["client_accuracy_mean"] = float(accs.mean())
            out["client_accuracy_worst10"] = worst_fraction_mean(accs, 0.1)
            if task.name == "language_model":  # loss on the learned tokens, per client
                losses = (totals[:, 0] / totals[:, 1].clamp_min(1)).float()
                out["client_loss_mean"] = float(losses.mean())
                out["client_loss_worst10"] = -worst_fraction_mean(-losses, 0.1)
        return out

    def silo_totals_here(self) -> dict[int, torch.Tensor]:
        """Evaluation totals of the model as loaded on each silo held by this process."""
        data = self.data
        return {
            silo: evaluation_totals(
                self.model, data.test_x, data.test_y, self.batch_size, data.task, rows
            ).cpu()
            for silo, rows in self.silos.test_rows.items()
        }

    def test_batch_totals(self, batches: list[int]) -> torch.Tensor:
        """Per-batch evaluation terms of the model as loaded on test batches ``batches``."""
        data = self.data
        return batch_totals(
            self.model, data.test_x, data.test_y, self.batch_size, data.task, batches
        )

    def _shared_totals(self, global_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        count = num_batches(len(self.data.test_y), self.batch_size)
        return add_in_order(
            self.engine.evaluate_shared(global_state, count, self.test_batch_totals)
        )

    def _silo_totals(self, global_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if hasattr(self.engine, "evaluate_silos"):
            per_silo = self.engine.evaluate_silos(global_state, self.silo_totals_here)
        else:
            per_silo = self.silo_totals_here()
        return add_in_order(per_silo[silo] for silo in sorted(per_silo))

    def _evaluate_local(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Every client's own model (the global one with its ``local`` keys) on its own test
        rows, pooled over all clients' test data. A client that never trained uses the
        global model."""
        data = self.all_test
        own_keys = self.local_state()
        totals = torch.zeros(4, dtype=torch.float64, device=data.test_x.device)
        for client, rows in enumerate(data.test_client_indices or []):
            if len(rows) == 0:
                continue
            self.model.load_state_dict(global_state)
            own = own_keys.get(client)
            if own is not None:
                self.model.load_state_dict(own, strict=False)
            totals += evaluation_totals(
                self.model, data.test_x, data.test_y, self.batch_size, data.task, rows
            )
        self.model.load_state_dict(global_state)
        out = pooled(totals, "local_test")
        extra = data.task.extra_metrics(out["local_test_loss"])
        return out | {f"local_{k}": v for k, v in extra.items()}


def _first_batches(
    data: DataBundle, max_batches: int, batch_size: int, silos: Silos | None
) -> DataBundle:
    """``data`` with only its first ``max_batches`` test batches (``eval_max_batches``)."""
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ConfigError(
            "eval_max_batches", f"must be null or an integer >= 1, got {max_batches!r}"
        )
    if silos is not None or not isinstance(data.test_x, torch.Tensor):
        raise ConfigError(
            "eval_max_batches",
            "needs the test set in memory in one place (not data.silos or data.in_memory=false)",
        )
    rows = min(len(data.test_y), max_batches * batch_size)
    if rows < len(data.test_y):
        log.info(
            "evaluation: at most eval_max_batches=%d batches of %d rows: the first %d of the "
            "%d test rows",
            max_batches,
            batch_size,
            rows,
            len(data.test_y),
        )
    return replace(data, test_x=data.test_x[:rows], test_y=data.test_y[:rows])


def _owner_map(train_y: torch.Tensor, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """owner[i] = client holding training sample i, -1 if none (for per-client eval)."""
    owner = torch.full((len(train_y),), -1, dtype=torch.long, device=train_y.device)
    for cid, shard in enumerate(shards):
        owner[shard.to(train_y.device)] = cid
    return owner
