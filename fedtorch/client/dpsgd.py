"""Sample-level DP-SGD inside each client (Abadi et al. 2016), through Opacus.

``client=dpsgd`` replaces the local optimizer's gradient by

    g = (sum_b clip(g_b, C) + N(0, (sigma C)^2 I)) / B

where g_b are per-sample gradients computed by Opacus's ``GradSampleModule`` and
clip(g, C) scales g to L2 norm <= C (over all parameters together). Each client keeps
its own RDP accountant: every local step is one subsampled Gaussian mechanism with
sampling rate B / n_k, composed across all the rounds the client took part in; the
client's epsilon is reported in its metrics, the largest in the round's row
(``client_epsilon_max``) and the largest ever in ``summary.json``.

What this guarantees: (epsilon, delta) sample-level DP of everything each client sends,
w.r.t. one training example of that client. Caveats: batches are shuffled fixed-size
minibatches, analysed as Poisson sampling at rate B / n_k (the usual approximation); the
noise comes from PyTorch's seeded generator (reproducible simulation, not a secure source).
Models with BatchNorm are refused (a sample's output depends on its batch): use GroupNorm.
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
        self._per_sample = GradSampleModule(self.model, loss_reduction="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_sample(x)

    def train(self, task: ClientTask, indices: torch.Tensor, *args, **kwargs) -> ClientResult:
        result = super().train(task, indices, *args, **kwargs)
        accountant = self.accountants.setdefault(task.client_id, PrivacyAccountant(self.mechanism))
        rate = min(1.0, self.batch_size / max(len(indices), 1))
        for _ in range(int(result.metrics["steps"])):
            accountant.step(self.noise_multiplier, rate)
        result.metrics["epsilon"] = accountant.epsilon(self.delta)
        return result

    def privatize_gradients(
        self, batch_size: int, client_id: int, round_idx: int, step: int
    ) -> None:
        """Replace each parameter's gradient by the clipped, noised mean of per-sample ones."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        samples = [p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params]
        norms = torch.cat(samples, dim=1).norm(dim=1)  # [B]
        factors = (self.max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(
            seeding.derive_seed(self.seed, seeding.PRIVACY, round_idx, client_id + 1, step)
        )
        std = self.noise_multiplier * self.max_grad_norm
        for p, per_sample in zip(params, samples):
            clipped = (factors[:, None] * per_sample).sum(dim=0)
            noise = torch.randn(clipped.shape, generator=gen, device=self.device) * std
            p.grad = ((clipped + noise) / batch_size).view_as(p)
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
