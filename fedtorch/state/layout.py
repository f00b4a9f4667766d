"""``state_dict`` <-> flat vectors, and the aggregation rule of every key.

Aggregating a model key by key in a Python loop is slow and easy to get wrong (BatchNorm's
``num_batches_tracked`` averaged as a float, buffers silently skipped). Instead each key
gets one rule, decided once per run:

``mean``
    exchanged, aggregated by the strategy (weighted average for FedAvg). The default for
    every floating-point parameter and buffer, BatchNorm running statistics included.
    All ``mean`` keys are packed into one flat vector so that aggregation is one fused
    operation over all clients.
``max``
    exchanged, the server takes the element-wise maximum over clients. The default for
    integer buffers such as ``num_batches_tracked``: they are counters, never averaged as
    floats, and keep their integer dtype.
``keep``
    sent to clients but never sent back; the server's value never changes. The default for
    frozen parameters (``requires_grad=False``, such as a base model under LoRA adapters):
    a client receives them once, not every round. (``adapter.aggregation=exact`` is the
    one exception: it folds a residual into the adapted layers' base weights each round,
    and those are then sent every round; see :mod:`fedtorch.strategies.lora_exact`.)
``local``
    never exchanged: each client keeps its own value across rounds (FedBN, personal
    heads). The global model keeps its initial value for these keys.

Rules are chosen with ``key_rules``: a list of ``{pattern: REGEX, rule: NAME}``; the first
pattern that matches a key (``re.search``) decides, otherwise the defaults above apply.
The pattern ``@batchnorm`` stands for every key of the model's BatchNorm layers (weights,
biases and running statistics), whatever the layers are called: FedBN is
``[{pattern: "@batchnorm", rule: local}]``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedtorch.errors import ConfigError

RULES = ("mean", "max", "keep", "local")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeySpec:
    """Where one ``mean`` key lives in the flat vector."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    numel: int


class StateLayout:
    """The rule of every key of a model's ``state_dict`` and the flat-vector packing.

    Args:
        state: a reference ``state_dict`` (shapes and dtypes are read from it).
        key_rules: ``[{pattern, rule}, ...]`` overrides, first match wins.
        frozen: names of frozen parameters, whose default rule is ``keep``.

    Raises:
        ConfigError: a rule name is unknown or a pattern is not a valid regex.
    """

    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        key_rules: Sequence[Mapping] = (),
        frozen: Collection[str] = (),
    ):
        compiled = []
        for i, entry in enumerate(key_rules):
            rule = entry.get("rule")
            if rule not in RULES:
                raise ConfigError(f"key_rules[{i}].rule", f"must be one of {RULES}, got {rule!r}")
            try:
                compiled.append((re.compile(str(entry.get("pattern", ""))), rule))
            except re.error as exc:
                raise ConfigError(f"key_rules[{i}].pattern", f"invalid regex: {exc}") from exc
        unmatched = [
            i
            for i, (pattern, _) in enumerate(compiled)
            if not any(pattern.search(name) for name in state)
        ]
        if unmatched:
            i = unmatched[0]
            shown = key_rules[i].get("written_as", key_rules[i].get("pattern"))
            keys = list(state)
            some = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise ConfigError(
                f"key_rules[{i}].pattern",
                f"{shown!r} matches no key of the model (a typo would silently apply the "
                f"default rule to every key); its keys: {some}",
            )
        self.rules: dict[str, str] = {}
        for name, tensor in state.items():
            default = "mean" if tensor.is_floating_point() else "max"
            if name in frozen:
                default = "keep"
            self.rules[name] = next((r for p, r in compiled if p.search(name)), default)
            if self.rules[name] == "mean" and not tensor.is_floating_point():
                raise ConfigError(
                    "key_rules", f"{name} is {tensor.dtype}; rule 'mean' needs a float tensor"
                )
        self.specs: list[KeySpec] = []
        offset = 0
        for name in self.keys("mean"):
            t = state[name]
            self.specs.append(KeySpec(name, t.shape, t.dtype, offset, t.numel()))
            offset += t.numel()
        self.size = offset
        mean_dtypes = [s.dtype for s in self.specs]
        self.dtype = torch.float32 if not mean_dtypes else _widest(mean_dtypes)

    def keys(self, rule: str) -> list[str]:
        """Names of the keys with this rule, in ``state_dict`` order."""
        return [k for k, r in self.rules.items() if r == rule]

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the ``mean`` keys into one vector of shape [size]."""
        if not self.specs:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat([state[s.name].reshape(-1).to(self.dtype) for s in self.specs])

    def flatten_into(self, state: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """Write the ``mean`` keys of ``state`` into the preallocated vector ``out`` [size]."""
        if self.specs:
            torch.cat([state[s.name].reshape(-1).to(self.dtype) for s in self.specs], out=out)

    def unflatten_into(self, vector: torch.Tensor, state: State) -> None:
        """Copy ``vector`` back into the ``mean`` keys of ``state`` (in place, dtype kept)."""
        for s in self.specs:
            state[s.name].copy_(vector[s.offset : s.offset + s.numel].view(s.shape))

    def mismatch(self, state: Mapping[str, torch.Tensor]) -> str | None:
        """What is wrong with ``state`` against this layout (keys, shapes), or None."""
        missing = [k for k in self.rules if k not in state]
        extra = [k for k in state if k not in self.rules]
        shapes = {s.name: s.shape for s in self.specs}
        wrong = [
            f"{k} {list(state[k].shape)} != {list(shapes[k])}"
            for k in shapes
            if k in state and state[k].shape != shapes[k]
        ]
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
        if wrong:
            parts.append("wrong shape " + ", ".join(wrong[:3]))
        return "; ".join(parts) or None

    def split(self, flat: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Views of ``flat`` ([..., size]) as the ``mean`` keys among ``names``.

        Leading dimensions are kept: a [K, size] matrix gives [K, *shape] views. Keys of
        ``names`` that are not ``mean`` keys are left out.
        """
        lead = flat.shape[:-1]
        wanted = set(names)
        return {
            s.name: flat[..., s.offset : s.offset + s.numel].view(*lead, *s.shape)
            for s in self.specs
            if s.name in wanted
        }

    def mask(self, names: Sequence[str]) -> torch.Tensor:
        """[size] bool vector: True where the flat vector holds one of ``names``."""
        out = torch.zeros(self.size, dtype=torch.bool)
        wanted = set(names)
        for s in self.specs:
            if s.name in wanted:
                out[s.offset : s.offset + s.numel] = True
        return out

    def bytes_of(self, state: Mapping[str, torch.Tensor], rules: Sequence[str]) -> int:
        """Payload size of the keys with the given rules (what one message carries)."""
        return sum(
            state[k].numel() * state[k].element_size() for k, r in self.rules.items() if r in rules
        )


def expand_key_rules(model: nn.Module, key_rules: Sequence[Mapping]) -> list[dict]:
    """Replace the ``@batchnorm`` pattern by a regex of the model's BatchNorm keys."""
    names = [
        re.escape(name)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    batchnorm = rf"^({'|'.join(names)})\." if names else r"(?!)"
    return [
        {**entry, "pattern": batchnorm, "written_as": "@batchnorm"}
        if entry.get("pattern") == "@batchnorm"
        else dict(entry)
        for entry in key_rules
    ]


def _widest(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    widest = dtypes[0]
    for d in dtypes[1:]:
        widest = torch.promote_types(widest, d)
    return widest


def aggregate_max(values: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> State:
    """Element-wise maximum over clients for each key (integer counters)."""
    return {k: torch.stack([v[k] for v in values]).amax(dim=0) for k in keys}
