"""Parameter-efficient fine-tuning: train and exchange small adapters, not the whole model.

``adapter=lora`` wraps the model with ``peft``'s LoRA (Hu et al. 2022): each targeted layer
``W`` becomes ``W + (alpha / r) B A`` with trainable ``A`` [r, in] and ``B`` [out, r] (B
starts at zero, so training starts from the base model) and ``W`` frozen. Frozen
parameters get the ``keep`` aggregation rule: the server sends them to a client once and
never receives them back; only ``A`` and ``B`` travel each round. By default they are
averaged separately (``aggregation=separate``, as FedIT, OpenFedLLM and FlowerTune do), so
every mean-based strategy works unchanged; ``aggregation=exact`` also folds the difference
between the mean of the products B A and the product of the means into the base weights
(FedEx-LoRA, :mod:`fedtorch.strategies.lora_exact`).

``peft`` is an optional dependency: ``pip install "fedtorch[llm]"``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fedtorch.errors import ConfigError, require

# Layer types LoRA can wrap (peft's LoRA layers).
_LORA_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
_OUTPUT_NAMES = ("lm_head", "head", "classifier", "output")


def import_peft() -> Any:
    """``peft``, or a one-line ConfigError naming the extra that installs it."""
    return require("peft", "adapter", "adapter=lora")


class NoAdapter:
    """Train and exchange the whole model (``adapter=none``)."""

    enabled = False
    aggregation = "separate"

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        """Nothing to write besides ``model.pt``."""


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``target_modules=all-linear`` selects: every ``nn.Linear`` but the
    output layer (Hugging Face's ``get_output_embeddings()``, or a layer named lm_head,
    head, classifier or output), as peft's ``all-linear`` does for Hugging Face models."""
    output = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        output = getter()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not output
        and name.rsplit(".", 1)[-1] not in _OUTPUT_NAMES
    ]


class LoRA:
    """LoRA adapters through ``peft`` on any model, fedtorch's or a user's.

    Args:
        r: rank of the update ``B A`` (> 0).
        alpha: scale numerator; the update is ``(alpha / r) B A``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: ``all-linear`` (every linear layer but the output layer) or a list
            of module names or regexes, matched against the end of each module's name as
            peft does (``["qkv", "proj"]``).
        aggregation: ``separate`` (average A and B) or ``exact`` (FedEx-LoRA: the global
            model is the exact weighted mean of the client models; see
            :mod:`fedtorch.strategies.lora_exact`).
    """

    enabled = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | Sequence[str] = "all-linear",
        aggregation: str = "separate",
    ) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError("adapter.r", f"must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError("adapter.alpha", f"must be a number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ConfigError("adapter.dropout", f"must be in [0, 1), got {dropout!r}")
        if not 0 <= dropout < 1:
            raise ConfigError("adapter.dropout", f"must be in [0, 1), got {dropout!r}")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            target_modules = [target_modules]
        if not isinstance(target_modules, str) and not all(
            isinstance(t, str) and t for t in target_modules
        ):
            raise ConfigError(
                "adapter.target_modules",
                f"must be all-linear or a list of module names, got {target_modules!r}",
            )
        if aggregation not in ("separate", "exact"):
            raise ConfigError(
                "adapter.aggregation", f"must be separate or exact, got {aggregation!r}"
            )
        self.aggregation = aggregation
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.target_modules = (
            target_modules if isinstance(target_modules, str) else list(target_modules)
        )

    def targets(self, model: nn.Module) -> list[str]:
        """The module names the adapter wraps; ConfigError if there are none."""
        kind = type(model).__name__
        if self.target_modules == "all-linear":
            names = linear_layers(model)
            if not names:
                raise ConfigError(
                    "adapter.target_modules",
                    f"all-linear: {kind} has no linear layer besides its output layer; name "
                    "layers LoRA can wrap (Linear, Embedding, Conv) in adapter.target_modules",
                )
            return names
        names, unmatched = [], []
        candidates = [(n, m) for n, m in model.named_modules() if n]
        for pattern in self.target_modules:
            hits = [
                n
                for n, m in candidates
                if (n == pattern or n.endswith("." + pattern) or re.fullmatch(pattern, n))
                and isinstance(m, _LORA_TYPES)
            ]
            if not hits:
                unmatched.append(pattern)
            names += [n for n in hits if n not in names]
        if unmatched:
            layers = [n for n, m in candidates if isinstance(m, _LORA_TYPES)]
            shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
            raise ConfigError(
                "adapter.target_modules",
                f"{', '.join(map(repr, unmatched))} matches no Linear, Embedding or Conv layer "
                f"of {kind} (its layers: {shown or 'none'})",
            )
        return names

    def _config(self, peft: Any, targets: str | list[str], classifier: bool = False) -> Any:
        # A sequence classifier's head is new (randomly initialised) and must train: peft's
        # SEQ_CLS task keeps a trainable copy of it (modules_to_save), exchanged as weights.
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            **({"task_type": "SEQ_CLS"} if classifier else {}),
        )

    def apply(self, model: nn.Module) -> nn.Module:
        """The model wrapped by peft with LoRA on :meth:`targets`; the rest frozen.

        A Hugging Face model (``model=hf``: its ``hf_model``) is handed to peft as it is,
        and peft resolves the targets (``all-linear`` included, transformers' Conv1D too).
        """
        peft = import_peft()
        inner = getattr(model, "hf_model", None)
        if inner is None:
            return peft.get_peft_model(model, self._config(peft, self.targets(model)))
        if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
            inner = peft.prepare_model_for_kbit_training(inner)
        try:
            classifier = getattr(model, "head", None) == "sequence_classification"
            config = self._config(peft, self.target_modules, classifier)
            model.hf_model = peft.get_peft_model(inner, config)
        except ValueError as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise ConfigError("adapter.target_modules", reason) from exc
        return model

    @staticmethod
    def _peft_model(model: nn.Module) -> Any:
        return getattr(model, "hf_model", model)

    def merged(self, model: nn.Module) -> nn.Module:
        """A copy of the base model with ``(alpha / r) B A`` folded into its weights."""
        return _without_peft(model, merge=True)

    def unloaded(self, model: nn.Module) -> nn.Module:
        """A copy of the base model without the adapters (nothing merged in)."""
        return _without_peft(model, merge=False)

    def save(self, model: nn.Module, folder: Path) -> None:
        """The adapter in peft's ``save_pretrained`` format (``PeftModel.from_pretrained``)."""
        self._peft_model(model).save_pretrained(str(folder))


def _without_peft(model: nn.Module, merge: bool) -> nn.Module:
    """A copy of ``model`` with peft's wrapping removed, the adapters merged in or dropped."""
    copied = copy.deepcopy(model)
    peft_model = getattr(copied, "hf_model", copied)
    base = peft_model.merge_and_unload() if merge else peft_model.unload()
    if hasattr(copied, "hf_model"):
        copied.hf_model = base
        return copied
    return base
