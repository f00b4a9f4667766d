"""Vectorized engine: a cohort of clients trains as one batched computation.

The K clients of a cohort hold their parameters stacked along a new leading dimension
([K, *shape] per tensor). Each local step gathers every client's minibatch into one
[K, B, ...] tensor, and ``torch.func.vmap(grad(loss))`` over ``functional_call`` computes all
K gradients at once, so K small matrix products become one batched product. The configured
optimizer then steps the stacked tensors directly: element-wise optimizers (SGD with
momentum and weight decay, Adam, ...) update every client independently, exactly as if each
had its own optimizer.

Clients differ in size, so in batch counts and in the size of the last batch of an epoch:

* a batch smaller than B is padded and masked: the loss is the mean over the real samples
  only, which gives the same gradient as the unpadded batch;
* clients are grouped into cohorts by step count (most steps first); a client that has
  finished its steps is frozen: its parameters are restored after the optimizer step.

Every client uses the same batch schedule as in the sequential engine (``trainer.batches``),
so results agree with it to float tolerance. Not supported (a ConfigError names
``engine=sequential`` as the alternative): BatchNorm in training mode (running statistics
are updated in place), ``local``-rule keys, and non-element-wise optimizers (LBFGS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from fedtorch import seeding
from fedtorch.client import ClientTrainer
from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult

_UNSUPPORTED_OPTIMIZERS = (torch.optim.LBFGS,)


def check_vectorizable(model: nn.Module) -> None:
    """Raise ConfigError if ``model`` cannot be trained with vmap (BatchNorm buffers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ConfigError(
                "engine",
                f"engine=vectorized cannot train {name or 'the model'} "
                f"({type(module).__name__} updates running statistics in place); use "
                "engine=sequential, or GroupNorm (e.g. model.norm=group for resnet18)",
            )


def _activation_bytes_per_sample(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of module outputs for one sample (kept for backward), via forward hooks."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return total


class VectorizedEngine:
    """Train each round's clients in cohorts with ``torch.func``.

    Args:
        cohort_size: clients trained together; null picks the largest cohort that fits
            ``memory_budget_mb`` (parameters, gradients, two optimizer states and
            activations per client).
        memory_budget_mb: memory the cohort may use when ``cohort_size`` is null.
        verbose: show a progress bar over cohorts.
    """

    def __init__(
        self, cohort_size: int | None = None, memory_budget_mb: int = 2048, verbose: bool = False
    ) -> None:
        if cohort_size is not None and (not isinstance(cohort_size, int) or cohort_size < 1):
            raise ConfigError("engine.cohort_size", f"must be null or >= 1, got {cohort_size!r}")
        if not isinstance(memory_budget_mb, (int, float)) or memory_budget_mb <= 0:
            raise ConfigError("engine.memory_budget_mb", f"must be > 0, got {memory_budget_mb!r}")
        self.cohort_size = cohort_size
        self.memory_budget_mb = memory_budget_mb
        self.verbose = verbose
        self._checked = False
        self._auto_size: int | None = None

    def _check(self, trainer: ClientTrainer) -> None:
        if self._checked:
            return
        check_vectorizable(trainer.model)
        if trainer.local_keys:
            raise ConfigError(
                "engine",
                "engine=vectorized does not support 'local' key_rules; use engine=sequential",
            )
        probe = trainer.optimizer([torch.zeros(1, requires_grad=True)])
        if isinstance(probe, _UNSUPPORTED_OPTIMIZERS):
            raise ConfigError(
                "client.optimizer",
                f"{type(probe).__name__} is not element-wise; use engine=sequential",
            )
        self._checked = True

    def auto_cohort_size(self, trainer: ClientTrainer) -> int:
        """Largest cohort whose estimated memory fits ``memory_budget_mb``."""
        if self._auto_size is None:
            params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
            acts = _activation_bytes_per_sample(trainer.model, trainer.train_x)
            per_client = 4 * params + 3 * acts * trainer.batch_size  # p, grad, 2 states
            self._auto_size = max(1, int(self.memory_budget_mb * 2**20 // per_client))
        return self._auto_size

    def run(
        self,
        trainer: ClientTrainer,
        client_ids: Sequence[int],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
    ) -> list[ClientResult]:
        """Train ``client_ids``; results come back in the order of ``client_ids``."""
        self._check(trainer)
        schedules = {
            int(c): trainer.schedule(int(c), shards[int(c)].to(trainer.device), round_idx)
            for c in client_ids
        }
        by_steps = sorted(schedules, key=lambda c: (-len(schedules[c][1]), c))
        size = self.cohort_size or self.auto_cohort_size(trainer)
        cohorts = [by_steps[i : i + size] for i in range(0, len(by_steps), size)]
        if self.verbose:
            cohorts = tqdm(cohorts, desc=f"round {round_idx} cohorts", leave=False)
        results: dict[int, ClientResult] = {}
        for cohort in cohorts:
            for result in self._train_cohort(
                trainer, cohort, schedules, shards, global_state, global_vector, round_idx
            ):
                results[result.client_id] = result
        return [results[int(c)] for c in client_ids]

    def _train_cohort(
        self,
        trainer: ClientTrainer,
        cohort: Sequence[int],
        schedules: Mapping[int, tuple[torch.Tensor, list[int]]],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
    ) -> list[ClientResult]:
        model, device, k = trainer.model, trainer.device, len(cohort)
        model.train()
        torch.manual_seed(
            seeding.derive_seed(trainer.seed, seeding.CLIENT_TRAINING, round_idx, cohort[0])
        )
        param_names = [n for n, _ in model.named_parameters()]
        params = {
            n: global_state[n].detach().unsqueeze(0).repeat_interleave(k, 0) for n in param_names
        }
        buffers = {n: b for n, b in global_state.items() if n not in params}
        optimizer = trainer.optimizer(list(params.values()))

        def loss_fn(p, x, y, w):
            logits = functional_call(model, (p, buffers), (x,))
            per_sample = F.cross_entropy(logits, y, reduction="none")
            return (per_sample * w).sum() / w.sum().clamp_min(1.0), (per_sample, logits)

        grad_fn = vmap(grad(loss_fn, has_aux=True), randomness="different")
        # [K, T, B] indices and 0/1 weights; rows past a client's last step stay zero.
        num_steps = [len(schedules[c][1]) for c in cohort]
        horizon, batch = max(num_steps), trainer.batch_size
        all_idx = torch.zeros(k, horizon, batch, dtype=torch.long, device=device)
        all_w = torch.zeros(k, horizon, batch, device=device)
        for row, c in enumerate(cohort):
            rows, sizes = schedules[c]
            all_idx[row, : len(sizes)] = rows
            sizes_t = torch.tensor(sizes, device=device)
            all_w[row, : len(sizes)] = (
                torch.arange(batch, device=device) < sizes_t[:, None]
            ).float()
        steps = torch.tensor(num_steps, device=device)
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device)
        seen = torch.zeros(k, device=device)
        for t in range(horizon):
            idx, w = all_idx[:, t], all_w[:, t]
            x, y = trainer.train_x[idx], trainer.train_y[idx]
            grads, (per_sample, logits) = grad_fn(params, x, y, w)
            active = steps > t
            frozen = None if t < min(num_steps) else {n: p.clone() for n, p in params.items()}
            for n, p in params.items():
                p.grad = grads[n]
            optimizer.step()
            if frozen is not None:
                with torch.no_grad():
                    for n, p in params.items():
                        mask = active.view(-1, *([1] * (p.ndim - 1)))
                        p.copy_(torch.where(mask, p, frozen[n]))
            loss_sum += (per_sample.detach() * w).sum(1)
            correct += ((logits.detach().argmax(-1) == y).float() * w).sum(1)
            seen += w.sum(1)

        layout = trainer.layout
        flat = (
            torch.cat(
                [
                    (params[s.name] if s.name in params else buffers[s.name].expand(k, *s.shape))
                    .reshape(k, -1)
                    .to(layout.dtype)
                    for s in layout.specs
                ],
                dim=1,
            )
            if layout.specs
            else torch.zeros(k, 0, device=device)
        )
        deltas = flat - global_vector
        loss_cpu, correct_cpu, seen_cpu = loss_sum.tolist(), correct.tolist(), seen.tolist()
        return [
            ClientResult(
                client_id=c,
                num_samples=len(shards[c]),
                delta=deltas[row],
                counters={key: global_state[key].clone() for key in trainer.counter_keys},
                metrics={
                    "train_loss": loss_cpu[row] / max(seen_cpu[row], 1),
                    "train_accuracy": correct_cpu[row] / max(seen_cpu[row], 1),
                    "steps": len(schedules[c][1]),
                },
            )
            for row, c in enumerate(cohort)
        ]
