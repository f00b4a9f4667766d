"""Local training of one client.

One :class:`ClientTrainer` (one model instance, on the training device) serves every
client: for each client it loads the global weights, trains on the client's index slice of
the dataset, and returns the delta. No per-client model copies. The dataset is in memory
(batches are tensor slices) or, with ``data.in_memory=false``, read through a DataLoader
(:mod:`fedtorch.data.loading`) that draws the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from fedtorch import seeding
from fedtorch.data.loading import DatasetInputs, in_order
from fedtorch.data.tasks import Classification, Task
from fedtorch.errors import ConfigError
from fedtorch.results import ClientError, ClientResult, ClientTask, resolve
from fedtorch.state.layout import StateLayout

OptimizerFactory = Callable[..., torch.optim.Optimizer]
LR_SCHEDULES = ("constant", "cosine")


class ClientTrainer:
    """Runs local SGD-style training for any client.

    Args:
        model: the reusable model instance (already on the training device).
        layout: the state layout (which keys are exchanged and how).
        train_x: all training inputs [N, ...] on the training device, or a
            :class:`DatasetInputs` that reads them through a DataLoader.
        train_y: all training labels [N] on the training device.
        optimizer: ``params -> Optimizer`` (a ``_partial_`` optimizer from the config).
            One instance serves all clients; its state (momentum, Adam moments) is cleared
            before each client trains, as if each client had a fresh optimizer.
        epochs: local epochs E over the client's data (ignored when ``steps`` is set).
        steps: exact number of local minibatch steps instead of epochs.
        batch_size: local minibatch size B; the last batch of an epoch may be smaller.
        prox_mu: FedProx (Li et al. 2020) proximal weight mu: the local objective becomes
            F_k(w) + mu/2 ||w - w_t||^2, i.e. mu (w - w_t) is added to every gradient.
            0 is plain local training.
        train_accuracy: also report local training accuracy (costs three small kernels
            per step, which matters for tiny models).
        seed: the run seed; batch order and any randomness inside the model (dropout)
            derive from ``(seed, round, client)``, so results do not depend on client order.
        task: what ``train_y`` means (:mod:`fedtorch.data.tasks`); the builder passes the
            dataset's. Classification by default.
        grad_accum_steps: split each minibatch into this many micro-batches and add up
            their gradients before the step (the same update, less activation memory).
        precision: ``32``, ``bf16-mixed`` (autocast to bfloat16; CPU or CUDA) or
            ``16-mixed`` (autocast to float16 with a gradient scaler; CUDA only). The
            builder passes the top-level ``precision``.
        lr_schedule: the local learning rate over rounds: ``constant`` (the optimizer's
            ``lr``) or ``cosine`` (FlowerTune's: round r of R trains with
            ``lr_min + (lr - lr_min) (1 + cos(pi r / R)) / 2``, so the last round uses
            ``lr_min``). It depends on the round only, so a resumed run continues exactly.
        lr_min: the learning rate the cosine schedule ends at.
        rounds: the run's rounds R (the builder passes the top-level ``rounds``).

    Raises:
        ConfigError: ``epochs``, ``steps`` or ``batch_size`` out of range; an unknown
            ``lr_schedule`` or an ``lr_min`` that is not in [0, lr].
    """

    # Whether local training is correct with channels_last conv weights (memory_format).
    supports_channels_last = True

    def __init__(
        self,
        model: nn.Module,
        layout: StateLayout,
        train_x: torch.Tensor | DatasetInputs,
        train_y: torch.Tensor,
        optimizer: OptimizerFactory,
        epochs: int = 1,
        steps: int | None = None,
        batch_size: int = 32,
        train_accuracy: bool = False,
        prox_mu: float = 0.0,
        seed: int = 0,
        task: Task | None = None,
        grad_accum_steps: int = 1,
        precision: str | int = "32",
        lr_schedule: str = "constant",
        lr_min: float = 0.0,
        rounds: int | None = None,
    ) -> None:
        if steps is None and (not isinstance(epochs, int) or epochs < 1):
            raise ConfigError("client.epochs", f"must be an integer >= 1, got {epochs!r}")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ConfigError("client.steps", f"must be null or an integer >= 1, got {steps!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("client.batch_size", f"must be an integer >= 1, got {batch_size!r}")
        self.model = model
        self.layout = layout
        self.train_x = train_x
        self.train_y = train_y
        self.optimizer = optimizer
        self.local_optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
        self.base_lrs = [group["lr"] for group in self.local_optimizer.param_groups]
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                "client.lr_schedule",
                f"must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}",
            )
        if (
            isinstance(lr_min, bool)
            or not isinstance(lr_min, (int, float))
            or not (0 <= lr_min <= min(self.base_lrs))
        ):
            raise ConfigError(
                "client.lr_min",
                f"must be in [0, client.optimizer.lr={min(self.base_lrs)}], got {lr_min!r}",
            )
        self.lr_schedule, self.lr_min, self.rounds = lr_schedule, float(lr_min), rounds
        self.epochs = epochs
        self.steps = steps
        self.batch_size = batch_size
        self.train_accuracy = train_accuracy
        if isinstance(prox_mu, bool) or not isinstance(prox_mu, (int, float)) or prox_mu < 0:
            raise ConfigError("client.prox_mu", f"must be a number >= 0, got {prox_mu!r}")
        self.prox_mu = float(prox_mu)
        self._param_names = [n for n, _ in model.named_parameters()]
        self.seed = seed
        self.task = task or Classification()
        if (
            isinstance(grad_accum_steps, bool)
            or not isinstance(grad_accum_steps, int)
            or grad_accum_steps < 1
        ):
            raise ConfigError(
                "client.grad_accum_steps", f"must be an integer >= 1, got {grad_accum_steps!r}"
            )
        self.grad_accum_steps = grad_accum_steps
        self.precision = str(precision)
        self.autocast_dtype = _autocast_dtype(self.precision, train_x.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "16-mixed" else None
        self.device = train_x.device
        self.num_classes = int(train_y.max()) + 1 if len(train_y) else 0
        # Each training row's weight in its client's size (1, or its tokens).
        self.sample_sizes = self.task.sizes(train_y)
        self.local_keys = layout.keys("local")
        self.counter_keys = layout.keys("max")
        # Per-client values of `local`-rule keys, kept on the CPU between rounds. A round's
        # new values wait in `pending_local_state` until the server accepts the round
        # (commit_local_state), so an interrupted round leaves no trace.
        self.local_state: dict[int, dict[str, torch.Tensor]] = {}
        self.pending_local_state: dict[int, dict[str, torch.Tensor]] = {}

    def learning_rates(self, round_idx: int) -> list[float]:
        """Each parameter group's learning rate in round ``round_idx`` (1-based)."""
        if self.lr_schedule == "constant" or not self.rounds:
            return list(self.base_lrs)
        scale = 0.5 * (1.0 + math.cos(math.pi * min(round_idx, self.rounds) / self.rounds))
        return [self.lr_min + (lr - self.lr_min) * scale for lr in self.base_lrs]

    def num_steps(self, num_samples: int, steps: int | None = None) -> int:
        """Local steps a client with ``num_samples`` samples takes in one round.

        ``steps`` (a :class:`ClientTask` override) wins over the configured epochs/steps.
        """
        if steps is not None:
            return steps
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(num_samples / self.batch_size)

    def schedule(
        self, client_id: int, indices: torch.Tensor, round_idx: int, steps: int | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """The client's minibatches this round, as a padded index matrix.

        Returns ``(batches, sizes)``: ``batches`` is [S, B] (S = ``num_steps(n, steps)``), row ``s``
        holding the indices of step ``s`` in its first ``sizes[s]`` entries (the last batch
        of an epoch may be short; the rest is padding). Samples are reshuffled every epoch
        with a generator seeded by (seed, round, client). Every engine uses this schedule,
        so they all see the same batches.
        """
        gen = seeding.generator(self.seed, seeding.CLIENT_TRAINING, round_idx, client_id)
        n, width = len(indices), self.batch_size
        per_epoch = math.ceil(n / width)
        total = self.num_steps(n, steps)
        epochs = math.ceil(total / per_epoch)
        padded = torch.zeros(epochs, per_epoch * width, dtype=torch.long, device=indices.device)
        for epoch in range(epochs):
            padded[epoch, :n] = indices[torch.randperm(n, generator=gen).to(indices.device)]
        sizes = ([width] * (per_epoch - 1) + [n - (per_epoch - 1) * width]) * epochs
        return padded.view(epochs * per_epoch, width)[:total], sizes[:total]

    def minibatches(
        self, batches: torch.Tensor, sizes: Sequence[int], client_id: int, round_idx: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """``(x, y, size)`` for each step of a :meth:`schedule`: tensor slices in memory, or
        the same rows read through the DataLoader, whose random transforms are seeded by
        (seed, round, client, step)."""
        if not isinstance(self.train_x, DatasetInputs):
            for row, size in zip(batches, sizes):
                batch = row[:size]
                yield self.train_x[batch], self.train_y[batch], size
            return
        rows = [row[:size].cpu() for row, size in zip(batches, sizes)]
        seeds = [
            seeding.derive_seed(self.seed, seeding.AUGMENTATION, round_idx, client_id, step)
            for step in range(len(rows))
        ]
        for (x, y), size in zip(self.train_x.batches(rows, seeds), sizes):
            yield x, y, size

    def client_size(self, indices: torch.Tensor) -> int:
        """The client's size in the task's unit (samples, or tokens): its FedAvg weight."""
        if isinstance(self.task, Classification):
            return len(indices)
        return int(self.sample_sizes[indices.to(self.sample_sizes.device)].sum())

    def loss_at_current_weights(
        self, indices: torch.Tensor, batch_size: int | None = None
    ) -> float:
        """Mean loss of the model as loaded on the client's data (eval mode). Batches of
        2048 rows for a classifier; a language model's logits [B, T, V] are large, so its
        batches are the training batch size (whose logits fit, with their gradients)."""
        if batch_size is None:
            batch_size = 2048 if isinstance(self.task, Classification) else self.batch_size
        model = self.model
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        model.eval()
        with torch.inference_mode():
            for x, y in in_order(self.train_x, self.train_y, batch_size, indices):
                loss, n, _, _ = self.task.per_sample(model(x), y)
                total += loss.sum()
                count += n.sum()
        return float(total) / max(float(count), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for a batch (DP-SGD wraps the model to get per-sample grads)."""
        return self.model(x)

    def _accumulate(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """Backward over ``grad_accum_steps`` micro-batches (under autocast if asked), each
        loss weighted by its share of the batch's samples or tokens, so the summed gradient
        is the whole batch's. Returns the logits, the batch's mean loss and its count."""
        pieces = [
            (xm, ym)
            for xm, ym in zip(
                x.tensor_split(self.grad_accum_steps), y.tensor_split(self.grad_accum_steps)
            )
            if len(xm)
        ]
        counts = [self.task.loss_count(ym) for _, ym in pieces]
        total = sum(counts)
        outputs, loss_sum = [], torch.zeros((), device=x.device)
        for (xm, ym), count in zip(pieces, counts):
            with torch.autocast(
                self.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                logits = self.forward(xm)
                loss, _ = self.task.loss(logits, ym)
            share = loss.float() * (count / total)
            (self.scaler.scale(share) if self.scaler is not None else share).backward()
            outputs.append(logits.detach())
            loss_sum += share.detach()
        return torch.cat(outputs), loss_sum, total

    def privatize_gradients(
        self, batch_size: int, client_id: int, round_idx: int, step: int
    ) -> None:
        """Hook between backward and the optimizer step; DP-SGD clips and noises here."""

    def state_dict(self) -> dict:
        """Trainer state the next round depends on, besides ``local_state`` (checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`."""

    def commit_local_state(self, client_ids: Sequence[int]) -> None:
        """Keep the round's new local-key values of ``client_ids``; discard the rest."""
        for c in client_ids:
            if c in self.pending_local_state:
                self.local_state[c] = self.pending_local_state[c]
        self.pending_local_state.clear()

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """The client's model state after local training (what it would send).

        Checked against the global layout before use: a plug-in trainer that overrides
        this and returns missing, extra or wrongly shaped keys has its client dropped.
        """
        return self.model.state_dict()

    def _param_views(self, flat: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-parameter views of a flat [P] vector on the device ({} for None)."""
        if flat is None:
            return {}
        return self.layout.split(flat.to(self.device), self._param_names)

    def train(
        self,
        task: ClientTask,
        indices: torch.Tensor,
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
        delta_out: torch.Tensor,
    ) -> ClientResult:
        """Train client ``task.client_id`` from the global weights, as ``task`` asks.

        Writes the client's delta (local minus global ``mean`` keys, [P]) into ``delta_out``
        and returns its sample count, counters and training statistics.
        """
        client_id = task.client_id
        model = self.model
        model.load_state_dict(global_state)
        if client_id in self.local_state:
            model.load_state_dict(self.local_state[client_id], strict=False)
        before = self.loss_at_current_weights(indices) if task.initial_loss else None
        if not model.training:  # set recursively: a walk over every module, so only if needed
            model.train()
        seeding.seed_torch(
            seeding.derive_seed(self.seed, seeding.CLIENT_TRAINING, round_idx, client_id),
            self.device,
        )
        optimizer = self.local_optimizer
        optimizer.state.clear()
        if self.lr_schedule != "constant":
            for group, lr in zip(optimizer.param_groups, self.learning_rates(round_idx)):
                group["lr"] = lr
        mu = self.prox_mu + task.prox_mu
        params = dict(model.named_parameters())
        anchors = {n: global_state[n] for n in params} if mu else {}
        corrections = self._param_views(resolve(task.correction))
        step_corrections = self._param_views(resolve(task.step_correction))

        # Per-step statistics stay on the device as a list of scalars: no host sync and
        # no extra kernels in the loop; they are reduced once at the end.
        losses, counts, hits, predicted = [], [], [], []
        batches, sizes = self.schedule(client_id, indices.to(self.device), round_idx, task.steps)
        for step, (x, y, size) in enumerate(self.minibatches(batches, sizes, client_id, round_idx)):
            if task.flip_labels:
                y = self.num_classes - 1 - y
            if self.grad_accum_steps == 1 and self.autocast_dtype is None:
                logits = self.forward(x)
                loss, count = self.task.loss(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            else:
                optimizer.zero_grad(set_to_none=True)
                logits, loss, count = self._accumulate(x, y)
            self.privatize_gradients(size, client_id, round_idx, step)
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            if mu or corrections:
                _add_gradient_terms(params, anchors, mu, corrections)
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            if step_corrections:
                _apply_step_corrections(params, step_corrections, optimizer)
            losses.append(loss.detach())
            counts.append(count)
            if self.train_accuracy:
                correct, total = self.task.hits(logits.detach(), y)
                hits.append(correct)
                predicted.append(total)

        optimizer.zero_grad(set_to_none=True)  # the gradients are not needed past here
        state = self.local_state_dict()
        problem = self.layout.mismatch(state)
        if problem:
            raise ClientError(f"returned a bad state_dict: {problem}")
        self.layout.flatten_into(state, delta_out)
        delta_out.sub_(global_vector)
        if self.local_keys:
            self.pending_local_state[client_id] = {
                k: state[k].detach().cpu().clone() for k in self.local_keys
            }
        weights = _as_vector(counts, self.device)
        metrics = {
            "train_loss": float(torch.stack(losses) @ weights) / max(float(weights.sum()), 1.0),
            "steps": len(sizes),
        }
        if self.train_accuracy:
            seen = max(float(_as_vector(predicted, self.device).sum()), 1.0)
            metrics["train_accuracy"] = float(torch.stack(hits).sum()) / seen
        if before is not None:
            metrics["initial_loss"] = before
        return ClientResult(
            client_id=client_id,
            num_samples=self.client_size(indices),
            counters={k: state[k].detach().clone() for k in self.counter_keys},
            metrics=metrics,
        )


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: full precision)."""
    if precision == "32":
        return None
    if precision == "bf16-mixed":
        return torch.bfloat16
    if precision == "16-mixed":
        if device.type != "cuda":
            raise ConfigError(
                "precision",
                "16-mixed needs CUDA (float16 autocast with a gradient scaler); on the CPU "
                "use bf16-mixed or 32",
            )
        return torch.float16
    raise ConfigError("precision", f"must be 32, bf16-mixed or 16-mixed, got {precision!r}")


def _as_vector(values: Sequence[int | torch.Tensor], device: torch.device) -> torch.Tensor:
    """Python ints or 0-d tensors (per-step counts) as one float32 vector on ``device``."""
    if values and isinstance(values[0], torch.Tensor):
        return torch.stack(list(values)).float()
    return torch.tensor(values, dtype=torch.float32, device=device)


def _apply_step_corrections(
    params: Mapping[str, torch.Tensor],
    corrections: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    """w <- w - lr * v after the optimizer step (SCAFFOLD's correction outside momentum)."""
    lr = optimizer.param_groups[0]["lr"]
    with torch.no_grad():
        for name, param in params.items():
            if name in corrections:
                param.sub_(corrections[name], alpha=lr)


def _add_gradient_terms(
    params: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
    mu: float,
    corrections: Mapping[str, torch.Tensor],
) -> None:
    """grad += mu (w - w_global) + correction, for every parameter that has a gradient.

    The proximal part is FedProx's (and FedDyn's alpha term); the constant part is
    SCAFFOLD's ``c - c_i`` or FedDyn's ``-grad_k``.
    """
    for name, param in params.items():
        if param.grad is None:
            continue
        if mu:
            param.grad.add_(param.detach() - anchors[name], alpha=mu)
        if name in corrections:
            param.grad.add_(corrections[name])
