"""Sample-level DP-SGD inside each client (Abadi et al. 2016), through Opacus.

``client=dpsgd`` replaces the local optimizer's gradient by

    g = (sum_b clip(g_b, C) + N(0, (sigma C)^2 I)) / B

where g_b are per-sample gradients computed by Opacus's ``GradSampleModule`` and
clip(g, C) scales g to L2 norm <= C (over all parameters together). Each client keeps
its own RDP accountant: every local step is one subsampled Gaussian mechanism with
sampling rate B / n_k, composed across all the rounds the client took part in; the
client's epsilon is reported in its metrics, the largest in the round's row
(``client_epsilon_max``) and the largest ever in ``summary.json``.

Batches are drawn the way they are accounted: at every step each of the client's samples
joins the batch independently with probability q = B / n_k (Poisson sampling, as Opacus's
``DPDataLoader`` does), so a batch's size varies and may be 0; the clipped sum is divided
by the expected batch size q n_k. What this guarantees: (epsilon, delta) sample-level DP of
everything each client sends, w.r.t. adding or removing one training example of that
client. The noise and the batches come from PyTorch's seeded generator (reproducible
simulation), or from the OS CSPRNG with ``privacy.secure_mode`` (see
:mod:`fedtorch.privacy.noise`). Models with BatchNorm are refused (a sample's output
depends on its batch): use GroupNorm.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedtorch import seeding
from fedtorch.client.trainer import ClientTrainer
from fedtorch.data.tasks import Classification
from fedtorch.errors import ConfigError
from fedtorch.privacy.accounting import PrivacyAccountant
from fedtorch.privacy.noise import CsprngStream, add_gaussian
from fedtorch.results import ClientResult, ClientTask

# Opacus's hooks fire on the first layer, whose input needs no gradient: expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class DPSGDTrainer(ClientTrainer):
    """Local training with per-sample clipping and Gaussian noise (sequential engine).

    Args (besides :class:`~fedtorch.client.trainer.ClientTrainer`'s):
        max_grad_norm: C, the per-sample gradient bound.
        noise_multiplier: sigma.
        delta: the delta of each client's reported epsilon.
        accountant: ``rdp`` or ``prv``.

    Raises:
        ConfigError: bad values, or a model Opacus cannot train privately (BatchNorm).
    """

    per_sample_clipping = True

    # Opacus's per-sample conv gradients are wrong for channels_last weights.
    supports_channels_last = False

    def __init__(
        self,
        *args,
        max_grad_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        accountant: str = "rdp",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.task, Classification):
            raise ConfigError(
                "client",
                "client=dpsgd supports classification datasets only (Opacus's mean reduction "
                f"is per sample, not per token); this dataset is a {self.task.name} task",
            )
        if self.grad_accum_steps != 1 or self.precision != "32":
            raise ConfigError(
                "client",
                "client=dpsgd clips whole-batch per-sample gradients in full precision: set "
                "client.grad_accum_steps=1 and precision=32",
            )
        for key, value in (
            ("max_grad_norm", max_grad_norm),
            ("noise_multiplier", noise_multiplier),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"client.{key}", f"must be > 0, got {value!r}")
        if not 0 < delta < 1:
            raise ConfigError("client.delta", f"must be in (0, 1), got {delta!r}")
        self.model.train()
        problems = ModuleValidator.validate(self.model, strict=False)
        if problems:
            first = str(problems[0]).split(".")[0]
            raise ConfigError(
                "client",
                f"client=dpsgd cannot train this model: {first}; use GroupNorm instead "
                "(e.g. model=resnet18 model.norm=group)",
            )
        self.max_grad_norm, self.noise_multiplier = float(max_grad_norm), float(noise_multiplier)
        self.delta, self.mechanism = delta, accountant
        self.accountants: dict[int, PrivacyAccountant] = {}
        # Noise and batches from the OS CSPRNG (privacy.secure_mode, set by the builder).
        self.secure = False
        self.task = _PoissonBatchClassification()
        self._per_sample = GradSampleModule(self.model, loss_reduction="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_sample(x)

    def train(self, task: ClientTask, indices: torch.Tensor, *args, **kwargs) -> ClientResult:
        # The expected batch is q n_k = min(B, n_k); privatize_gradients divides by it.
        self._expected_batch = min(self.batch_size, len(indices))
        result = super().train(task, indices, *args, **kwargs)
        accountant = self.accountants.setdefault(task.client_id, PrivacyAccountant(self.mechanism))
        rate = self.sample_rate(len(indices))
        for _ in range(int(result.metrics["steps"])):
            accountant.step(self.noise_multiplier, rate)
        result.metrics["epsilon"] = accountant.epsilon(self.delta)
        return result

    def sample_rate(self, num_samples: int) -> float:
        """q = B / n_k: each sample's chance of joining a batch."""
        return min(1.0, self.batch_size / max(num_samples, 1))

    def schedule(
        self, client_id: int, indices: torch.Tensor, round_idx: int, steps: int | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Poisson-sampled batches: ``num_steps`` steps, each sample in each step's batch
        independently with probability q (padded [S, max size] rows and their sizes)."""
        n, q = len(indices), self.sample_rate(len(indices))
        total = self.num_steps(n, steps)
        if self.secure:
            draws = CsprngStream().uniform(total * n).view(total, n)
        else:
            gen = seeding.generator(self.seed, seeding.CLIENT_TRAINING, round_idx, client_id)
            draws = torch.rand(total, n, generator=gen, dtype=torch.float64)
        chosen = (draws < q).to(indices.device)
        sizes = chosen.sum(dim=1).tolist()
        batches = torch.zeros(total, max(max(sizes, default=0), 1), dtype=torch.long)
        batches = batches.to(indices.device)
        for step, mask in enumerate(chosen):
            batches[step, : sizes[step]] = indices[mask]
        return batches, sizes

    def privatize_gradients(
        self, batch_size: int, client_id: int, round_idx: int, step: int
    ) -> None:
        """Replace each parameter's gradient by the clipped, noised sum of per-sample ones
        divided by the expected batch size (``batch_size`` is this step's actual size)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        samples = [p.grad_sample.reshape(len(p.grad_sample), p.numel()) for p in params]
        norms = torch.cat(samples, dim=1).norm(dim=1)  # [B]
        factors = (self.max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        expected = self._expected_batch
        std = self.noise_multiplier * self.max_grad_norm
        for i, (p, per_sample) in enumerate(zip(params, samples)):
            clipped = (factors[:, None] * per_sample).sum(dim=0)
            key = (round_idx, client_id + 1, step, i)
            noisy = add_gaussian(clipped, std, self.secure, self.seed, *key)
            p.grad = (noisy / expected).view_as(p)
            p.grad_sample = None

    def privacy_summary(self) -> dict[str, float]:
        """What ``summary.json`` records: the largest sample-level epsilon of any client."""
        if not self.accountants:
            return {}
        return {
            "client_epsilon_max": max(a.epsilon(self.delta) for a in self.accountants.values()),
            "client_delta": self.delta,
        }

    def state_dict(self) -> dict:
        return {"accountants": {c: a.state_dict() for c, a in self.accountants.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.accountants = {}
        for c, s in state.get("accountants", {}).items():
            self.accountants[int(c)] = PrivacyAccountant(self.mechanism)
            self.accountants[int(c)].load_state_dict(s)


class _PoissonBatchClassification(Classification):
    """Classification, except that an empty batch (Poisson sampling may draw one) has loss
    0 instead of the NaN of a mean over nothing; other batches are unchanged."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        if len(y) == 0:
            return logits.sum() * 0.0, 0
        return super().loss(logits, y)
