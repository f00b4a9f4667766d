"""The round loop's running totals and knobs: what a checkpoint saves of the loop itself."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Progress:
    """The round loop's running totals; saved in every checkpoint."""

    round: int = 0
    best_accuracy: float | None = None
    best_round: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    # What the same messages would have taken uncompressed (float32 updates and weights).
    bytes_up_uncompressed: int = 0
    bytes_down_uncompressed: int = 0
    # Clients that have received the frozen (``keep``) weights, sent once per client.
    base_sent: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    def record_eval(self, metrics: dict[str, float], round_idx: int) -> None:
        """Keep a round's evaluation and the best test accuracy so far."""
        self.last_eval = metrics
        accuracy = metrics["test_accuracy"]
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.best_accuracy, self.best_round = accuracy, round_idx


@dataclass
class RunSettings:
    """The round-loop knobs (top-level config keys)."""

    rounds: int
    clients_per_round: int
    seed: int
    eval_every: int = 1
    eval_clients: bool = False
    eval_local: bool = False
    eval_batch_size: int = 2048
    target_accuracy: float | None = None
    on_client_failure: str = "drop"
    min_clients: int = 1
    aggregation_memory_budget_mb: float = 1024

    def evaluates(self, round_idx: int) -> bool:
        """Whether the global model is evaluated after ``round_idx`` (every ``eval_every``
        rounds, and after the last)."""
        return round_idx % self.eval_every == 0 or round_idx == self.rounds
