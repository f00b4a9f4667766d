"""Simulated malicious clients, to exercise robust aggregation.

A fixed set of ``round(fraction * N)`` clients (drawn once from the run seed) is
malicious. Whenever one of them is sampled it attacks:

``sign_flip``   sends -scale * (its honest update)
``scaled``      sends scale * (its honest update) (model replacement / boosting)
``gaussian``    sends Gaussian noise N(0, std^2) in place of its update
``label_flip``  trains honestly on flipped labels y -> C - 1 - y (data poisoning)

Update attacks rewrite a malicious client's delta in the update pipeline, after local
training and before aggregation, which is where a real attacker's message would enter the
server.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtorch import seeding
from fedtorch.errors import ConfigError
from fedtorch.results import ClientTask, RoundResults

KINDS = ("none", "sign_flip", "scaled", "gaussian", "label_flip")


class Attack:
    """A fraction of malicious clients and how they attack.

    Args:
        kind: one of ``none``, ``sign_flip``, ``scaled``, ``gaussian``, ``label_flip``.
        fraction: share of the N clients that are malicious, in [0, 1].
        scale: multiplier of ``sign_flip`` (-scale) and ``scaled`` (scale); > 0.
        std: standard deviation of ``gaussian``; > 0.
        num_clients, seed: given by the run.
    """

    def __init__(
        self,
        kind: str = "none",
        fraction: float = 0.0,
        scale: float = 1.0,
        std: float = 1.0,
        num_clients: int = 1,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError("attack.kind", f"must be one of {KINDS}, got {kind!r}")
        for key, value, ok in (
            ("fraction", fraction, lambda v: 0 <= v <= 1),
            ("scale", scale, lambda v: v > 0),
            ("std", std, lambda v: v > 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                allowed = "in [0, 1]" if key == "fraction" else "> 0"
                raise ConfigError(f"attack.{key}", f"must be {allowed}, got {value!r}")
        self.kind, self.scale, self.std, self.seed = kind, scale, std, seed
        count = round(fraction * num_clients) if kind != "none" else 0
        gen = seeding.generator(seed, seeding.ATTACK)
        self.malicious = set(torch.randperm(num_clients, generator=gen)[:count].tolist())

    @property
    def rewrites_updates(self) -> bool:
        """Whether some client's update gets rewritten (an update attack is configured)."""
        return bool(self.malicious) and self.kind in ("sign_flip", "scaled", "gaussian")

    def prepare(self, tasks: Sequence[ClientTask]) -> None:
        """Mark malicious tasks for label flipping (the ``label_flip`` attack)."""
        if self.kind == "label_flip":
            for task in tasks:
                task.flip_labels = task.client_id in self.malicious

    def rewrite(self, client_id: int, delta: torch.Tensor, round_idx: int) -> bool:
        """Rewrite one client's delta [P] in place if it attacks this way; returns whether
        the client is malicious (label flippers attacked during training)."""
        if client_id not in self.malicious:
            return False
        if self.kind == "sign_flip":
            delta.mul_(-self.scale)
        elif self.kind == "scaled":
            delta.mul_(self.scale)
        elif self.kind == "gaussian":
            gen = seeding.generator(self.seed, seeding.ATTACK, round_idx, client_id)
            noise = torch.randn(delta.shape, generator=gen, dtype=delta.dtype)
            delta.copy_(noise.mul_(self.std))
        return True

    def corrupt(self, results: RoundResults, round_idx: int) -> int:
        """:meth:`rewrite` every row of a round; returns how many clients attacked."""
        return sum(
            self.rewrite(c.client_id, delta, round_idx)
            for c, delta in zip(results.clients, results.deltas)
        )
