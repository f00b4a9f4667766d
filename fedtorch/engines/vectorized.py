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
* the round's clients are split into cohorts of consecutive clients (cohort order, a size
  that does not depend on timing); inside a cohort they train sorted by step count (most
  steps first), so the clients still training are always a prefix; when clients finish,
  their deltas are read out and the stacked parameters and optimizer state shrink to the
  rest. When a cohort is done its deltas go to the update pipeline in cohort order, so
  the engine holds at most one cohort's deltas.

Every client uses the same batch schedule as in the sequential engine (``trainer.schedule``),
so results agree with it to float tolerance. Not supported (a ConfigError names
``engine=sequential`` as the alternative): BatchNorm in training mode (running statistics
are updated in place), recurrent layers (``nn.LSTM``/``GRU``/``RNN`` have no vmap batching
rule: vmap would run them client by client, slower than the sequential engine),
``local``-rule keys, and non-element-wise optimizers (LBFGS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from fedtorch import seeding
from fedtorch.client.trainer import ClientTrainer
from fedtorch.engines.sequential import reusable_buffer
from fedtorch.errors import ConfigError, FedtorchError
from fedtorch.pipeline.pipeline import UpdateSink
from fedtorch.results import ClientFailure, ClientResult, ClientTask, resolve

_UNSUPPORTED_OPTIMIZERS = (torch.optim.LBFGS,)


def check_vectorizable(model: nn.Module) -> None:
    """Raise ConfigError if ``model`` cannot be trained with vmap (BatchNorm buffers) or
    gains nothing from it (recurrent layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            raise ConfigError(
                "engine",
                f"engine=vectorized cannot batch {name or 'the model'} ({type(module).__name__}"
                " has no vmap rule, so vmap runs it client by client: 6x slower than "
                "engine=sequential on a character LSTM); use engine=sequential",
            )
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
        self._deltas: torch.Tensor | None = None

    def check(self, trainer: ClientTrainer) -> None:
        """Raise ConfigError if this run cannot be vectorized (called before training)."""
        if self._checked:
            return
        check_vectorizable(trainer.model)
        if not isinstance(trainer.train_x, torch.Tensor):
            raise ConfigError(
                "engine",
                "engine=vectorized stacks clients' batches from tensors in memory; use "
                "engine=sequential with data.in_memory=false",
            )
        if getattr(trainer, "per_sample_clipping", False):
            raise ConfigError("engine", "client=dpsgd needs engine=sequential")
        if trainer.precision != "32" or trainer.grad_accum_steps != 1:
            raise ConfigError(
                "engine",
                "engine=vectorized trains in full precision without micro-batches; use "
                "engine=sequential for precision=bf16-mixed/16-mixed or client.grad_accum_steps",
            )
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
        tasks: Sequence[ClientTask],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
        sink: UpdateSink,
    ) -> None:
        """Run ``tasks`` cohort by cohort, handing the results to ``sink`` in task order."""
        self.check(trainer)
        size = self.cohort_size or self.auto_cohort_size(trainer)
        cohorts = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        if self.verbose:
            cohorts = tqdm(cohorts, desc=f"round {round_idx} cohorts", leave=False)
        for cohort in cohorts:
            schedules = {
                t.client_id: trainer.schedule(
                    t.client_id, shards[t.client_id].to(trainer.device), round_idx, t.steps
                )
                for t in cohort
            }
            order = sorted(
                range(len(cohort)), key=lambda i: (-len(schedules[cohort[i].client_id][1]), i)
            )
            self._deltas = reusable_buffer(self._deltas, len(cohort), global_vector)
            try:
                trained = self._train_cohort(
                    trainer,
                    [cohort[i] for i in order],
                    schedules,
                    shards,
                    global_state,
                    global_vector,
                    round_idx,
                    self._deltas,
                    order,
                )
            except FedtorchError:
                raise
            except Exception as exc:  # the cohort trains as one computation: all fail
                reason = f"{type(exc).__name__} in its cohort: {exc}"
                for task in cohort:
                    sink.fail(ClientFailure(task.client_id, reason))
                continue
            results = {r.client_id: r for r in trained}
            for i, task in enumerate(cohort):
                sink.add(results[task.client_id], self._deltas[i])

    def _train_cohort(
        self,
        trainer: ClientTrainer,
        tasks: Sequence[ClientTask],
        schedules: Mapping[int, tuple[torch.Tensor, list[int]]],
        shards: Sequence[torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        global_vector: torch.Tensor,
        round_idx: int,
        deltas: torch.Tensor,
        delta_rows: Sequence[int],
    ) -> list[ClientResult]:
        """Train one cohort (sorted by step count, most first) as a batched computation.

        Because the cohort is sorted, the clients still training at step t are always a
        prefix of it. When the last clients of that prefix finish, their parameters are
        read out and the stacked tensors and optimizer state shrink to the clients left,
        so no compute is spent on finished clients.
        """
        cohort = [t.client_id for t in tasks]
        model, device, k = trainer.model, trainer.device, len(cohort)
        model.train()
        seeding.seed_torch(
            seeding.derive_seed(trainer.seed, seeding.CLIENT_TRAINING, round_idx, cohort[0]), device
        )
        # Only trainable parameters are stacked per client; frozen ones (a base model under
        # LoRA) are shared by the cohort like buffers.
        param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = {
            n: global_state[n].detach().unsqueeze(0).repeat_interleave(k, 0) for n in param_names
        }
        buffers = {n: b for n, b in global_state.items() if n not in params}
        optimizer = trainer.optimizer(list(params.values()))
        terms = _GradientTerms.of(trainer, tasks, params)

        task = trainer.task

        def loss_fn(p, x, y, w):
            logits = functional_call(model, (p, buffers), (x,))
            loss, count, hits, predicted = task.per_sample(logits, y)
            mean = (loss * w).sum() / (count * w).sum().clamp_min(1.0)
            return mean, (loss, count, hits, predicted)

        grad_fn = vmap(grad(loss_fn, has_aux=True), randomness="different")
        # [K, T, B] indices and 0/1 sample weights (padding of short batches has weight 0).
        num_steps = [len(schedules[c][1]) for c in cohort]
        horizon, batch = num_steps[0], trainer.batch_size
        all_idx = torch.zeros(k, horizon, batch, dtype=torch.long, device=device)
        all_w = torch.zeros(k, horizon, batch, device=device)
        for row, c in enumerate(cohort):
            rows, sizes = schedules[c]
            all_idx[row, : len(sizes)] = rows
            sizes_t = torch.tensor(sizes, device=device)
            all_w[row, : len(sizes)] = (
                torch.arange(batch, device=device) < sizes_t[:, None]
            ).float()
        loss_sum = torch.zeros(k, device=device)
        loss_count = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device)
        seen = torch.zeros(k, device=device)
        active = k
        for t in range(horizon):
            idx, w = all_idx[:active, t], all_w[:active, t]
            x, y = trainer.train_x[idx], trainer.train_y[idx]
            if terms.flip is not None:
                y = torch.where(terms.flip[:active, None], trainer.num_classes - 1 - y, y)
            grads, (loss, count, hits, predicted) = grad_fn(params, x, y, w)
            for n, p in params.items():
                p.grad = grads[n]
            terms.add_to(params, global_state, active)
            optimizer.step()
            terms.after_step(params, optimizer, active)
            loss_sum[:active] += (loss.detach() * w).sum(1)
            loss_count[:active] += (count * w).sum(1)
            correct[:active] += (hits * w).sum(1)
            seen[:active] += (predicted * w).sum(1)
            still = sum(1 for s in num_steps[:active] if s > t + 1)
            if still < active:
                flat = self._flatten_stacked(trainer, params, buffers, still, active)
                for row in range(still, active):
                    torch.sub(flat[row - still], global_vector, out=deltas[delta_rows[row]])
                params, optimizer = _shrink(params, optimizer, trainer, still)
                active = still

        loss_cpu, count_cpu = loss_sum.tolist(), loss_count.tolist()
        correct_cpu, seen_cpu = correct.tolist(), seen.tolist()
        initial = {}
        if any(t.initial_loss for t in tasks):  # the global model's loss on each client
            model.load_state_dict(global_state)
            initial = {
                t.client_id: trainer.loss_at_current_weights(shards[t.client_id])
                for t in tasks
                if t.initial_loss
            }
        return [
            ClientResult(
                client_id=c,
                num_samples=trainer.client_size(shards[c]),
                counters={key: global_state[key].clone() for key in trainer.counter_keys},
                metrics={
                    "train_loss": loss_cpu[row] / max(count_cpu[row], 1),
                    **(
                        {"train_accuracy": correct_cpu[row] / max(seen_cpu[row], 1)}
                        if trainer.train_accuracy
                        else {}
                    ),
                    "steps": num_steps[row],
                    **({"initial_loss": initial[c]} if c in initial else {}),
                },
            )
            for row, c in enumerate(cohort)
        ]

    @staticmethod
    def _flatten_stacked(
        trainer: ClientTrainer,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        start: int,
        end: int,
    ) -> torch.Tensor:
        """The ``mean`` keys of clients ``start`` to ``end`` - 1 as a [rows, P] matrix (only
        the clients that finish are read out, not every client still training)."""
        layout, rows = trainer.layout, end - start
        if not layout.specs:
            return torch.zeros(rows, 0, device=trainer.device)
        parts = [
            (
                params[s.name][start:end]
                if s.name in params
                else buffers[s.name].expand(rows, *s.shape)
            )
            .detach()
            .reshape(rows, -1)
            .to(layout.dtype)
            for s in layout.specs
        ]
        return torch.cat(parts, dim=1)


class _GradientTerms:
    """The cohort's client-side gradient terms, stacked like its parameters.

    ``mu`` is [K] (client.prox_mu plus each task's own), ``corrections[name]`` and
    ``step_corrections[name]`` are [K, *shape] (zero rows for tasks without one), ``flip``
    is [K] bool. Absent terms are
    None/empty so the common case costs nothing. Clients are a prefix of the cohort at
    every step, so slicing ``[:active]`` selects the ones still training.
    """

    def __init__(self, mu, corrections, step_corrections, flip) -> None:
        self.mu = mu
        self.corrections = corrections
        self.step_corrections = step_corrections
        self.flip = flip

    @classmethod
    def of(
        cls, trainer: ClientTrainer, tasks: Sequence[ClientTask], params: Mapping[str, torch.Tensor]
    ) -> _GradientTerms:
        device, k = trainer.device, len(tasks)
        mus = [trainer.prox_mu + t.prox_mu for t in tasks]
        mu = torch.tensor(mus, device=device) if any(mus) else None

        def stacked(vectors: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
            if all(v is None for v in vectors):
                return {}
            rows = torch.zeros(k, trainer.layout.size, dtype=trainer.layout.dtype, device=device)
            for i, v in enumerate(vectors):
                if v is not None:
                    rows[i] = resolve(v).to(device)
            return trainer.layout.split(rows, list(params))

        flips = [t.flip_labels for t in tasks]
        return cls(
            mu,
            stacked([t.correction for t in tasks]),
            stacked([t.step_correction for t in tasks]),
            torch.tensor(flips, device=device) if any(flips) else None,
        )

    def add_to(
        self,
        params: Mapping[str, torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        active: int,
    ) -> None:
        """grad += mu_i (w_i - w_global) + correction_i for each of the ``active`` clients."""
        if self.mu is None and not self.corrections:
            return
        for n, p in params.items():
            if self.mu is not None:
                scale = self.mu[:active].view(-1, *([1] * (p.dim() - 1)))
                p.grad.add_((p.detach() - global_state[n]) * scale)
            if n in self.corrections:
                p.grad.add_(self.corrections[n][:active])

    def after_step(
        self, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, active: int
    ) -> None:
        """w_i <- w_i - lr * v_i for the step corrections (outside the optimizer)."""
        if not self.step_corrections:
            return
        lr = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for n, p in params.items():
                if n in self.step_corrections:
                    p.sub_(self.step_corrections[n][:active], alpha=lr)


def _shrink(
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainer: ClientTrainer,
    rows: int,
) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """Keep the first ``rows`` clients: parameters and per-element optimizer state become
    views of their first rows (a leading-dimension slice of a contiguous tensor is
    contiguous), so shrinking copies nothing."""
    if rows == 0:
        return params, optimizer
    kept = {n: p.detach()[:rows] for n, p in params.items()}
    new_optimizer = trainer.optimizer(list(kept.values()))
    for old, new in zip(params.values(), kept.values()):
        state = optimizer.state.get(old)
        if state:
            new_optimizer.state[new] = {
                key: value[:rows] if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }
    return kept, new_optimizer
