"""Exact aggregation of LoRA adapters (``adapter.aggregation=exact``, FedEx-LoRA).

Averaging A and B separately is not averaging the updates the clients made: with client
weights p_k (sum 1),

    mean_k (B_k A_k)  !=  (mean_k B_k)(mean_k A_k)

in general. FedEx-LoRA (Singhal et al. 2025, "FedEx-LoRA: Exact Aggregation for Federated
and Efficient Fine-Tuning of Foundation Models") keeps the separate averages as the new
adapters and folds the difference into the frozen base weight of each adapted layer:

    W  <-  W + s * ( sum_k p_k B_k A_k  -  B' A' ),    A' = sum_k p_k A_k,  B' = sum_k p_k B_k

with s = alpha / r, so the global model W + s B' A' equals the weighted mean of the client
models exactly. The price: every adapted layer's base weight changes each round, so a
sampled client downloads those weights every round (counted in ``bytes_down``), and the
server holds one base-sized running sum per adapted layer during a round. Uploads stay
adapter-sized.

It is exact only when the server's new adapters are the plain weighted mean of the
clients' (FedAvg, FedProx); a server optimizer (FedAdam, FedAvgM) or a robust rule has no
such mean, and privacy or secure aggregation hide the individual B_k A_k from the server,
so those are refused before training.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from fedtorch.errors import ConfigError
from fedtorch.results import ClientResult
from fedtorch.state.layout import StateLayout
from fedtorch.strategies.streaming import Aggregator


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: the ``state_dict`` keys of its base weight and its A and B.

    Attributes:
        base: key of the frozen base weight W [out, in] (or [in, out] when ``transposed``).
        a: key of A [r, in].
        b: key of B [out, r].
        scale: alpha / r, peft's ``scaling``.
        transposed: the base layer stores W transposed (transformers' ``Conv1D``, peft's
            ``fan_in_fan_out``).
    """

    base: str
    a: str
    b: str
    scale: float
    transposed: bool

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """s * B A in the base weight's layout (what peft's merge adds to W)."""
        product = (b @ a).mul_(self.scale)
        return product.T if self.transposed else product


def lora_pairs(model: nn.Module, layout: StateLayout) -> list[LoraPair]:
    """The adapted layers of a peft-wrapped ``model``.

    Raises:
        ConfigError: a LoRA layer that is not a linear one (embeddings, convolutions), or
            adapter keys that are not exchanged (``key_rules`` made them local).
    """
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A or not isinstance(module.lora_A[adapter], nn.Linear):
                raise ConfigError(
                    "adapter.aggregation",
                    f"exact supports LoRA on linear layers only; {name} is "
                    f"{type(module.get_base_layer()).__name__} (use aggregation=separate)",
                )
            pair = LoraPair(
                base=f"{name}.base_layer.weight",
                a=f"{name}.lora_A.{adapter}.weight",
                b=f"{name}.lora_B.{adapter}.weight",
                scale=float(module.scaling[adapter]),
                transposed=bool(getattr(module, "fan_in_fan_out", False)),
            )
            for key, rule in ((pair.a, "mean"), (pair.b, "mean"), (pair.base, "keep")):
                if layout.rules.get(key) != rule:
                    raise ConfigError(
                        "adapter.aggregation",
                        f"exact needs {key} to have the rule {rule!r}, it has "
                        f"{layout.rules.get(key)!r} (check key_rules)",
                    )
            pairs.append(pair)
    if not pairs:
        raise ConfigError("adapter.aggregation", "exact: the model has no LoRA layer")
    return pairs


class ExactLoRARound:
    """Wraps a round's aggregator: accumulates sum_k p_k s B_k A_k per adapted layer as the
    updates arrive (cohort order), and at :meth:`finish` folds the residual against the
    aggregator's new adapters into the base weights of ``global_state`` (in place).

    Args:
        inner: the strategy's aggregator (its new adapters must be the weighted mean).
        pairs: the adapted layers (:func:`lora_pairs`).
        layout: the run's flat-vector layout.
        global_vector: the round's starting global vector [P].
        global_state: the server's ``state_dict``; its base weights are updated.
        weight: a client's weight in the mean (the strategy's ``client_weight``).
    """

    def __init__(
        self,
        inner: Aggregator,
        pairs: list[LoraPair],
        layout: StateLayout,
        global_vector: torch.Tensor,
        global_state: MutableMapping[str, torch.Tensor],
        weight: Callable[[ClientResult], float],
    ) -> None:
        self.inner, self.pairs, self.layout = inner, pairs, layout
        self.global_state, self.weight = global_state, weight
        self.names = [n for p in pairs for n in (p.a, p.b)]
        self.start = layout.split(global_vector, self.names)
        self.sums = {
            p.base: torch.zeros_like(global_state[p.base], dtype=torch.float64) for p in pairs
        }
        self.total = 0.0

    def add(self, client: ClientResult, delta: torch.Tensor) -> None:
        w = self.weight(client)
        moved = self.layout.split(delta, self.names)
        for p in self.pairs:
            a = self.start[p.a] + moved[p.a]
            b = self.start[p.b] + moved[p.b]
            self.sums[p.base].add_(p.delta_weight(a, b), alpha=w)
        self.total += w
        self.inner.add(client, delta)

    def finish(self) -> torch.Tensor:
        new_vector = self.inner.finish()
        if not self.total > 0:
            return new_vector
        new = self.layout.split(new_vector, self.names)
        for p in self.pairs:
            mean_product = self.sums[p.base].div_(self.total)
            residual = mean_product - p.delta_weight(new[p.a], new[p.b]).double()
            base = self.global_state[p.base]
            base.copy_((base.double() + residual).to(base.dtype))
        return new_vector


def check_exact_strategy(strategy: object, privacy_on: bool, secure_on: bool) -> None:
    """Refuse, in one line, what ``aggregation=exact`` cannot be exact with."""
    from fedtorch.strategies import FedAvg, averages_plainly

    # A server step of its own (FedAvgM, FedAdam, ...) moves away from the plain mean.
    if not averages_plainly(strategy) or type(strategy).server_step is not FedAvg.server_step:
        raise ConfigError(
            "adapter.aggregation",
            f"exact needs a strategy whose new adapters are the clients' weighted mean "
            f"(fedavg, fedprox); {type(strategy).__name__} is not one (use aggregation=separate)",
        )
    if privacy_on or secure_on:
        raise ConfigError(
            "adapter.aggregation",
            "exact needs each client's B A, which privacy and secure aggregation hide from "
            "the server (use aggregation=separate)",
        )
