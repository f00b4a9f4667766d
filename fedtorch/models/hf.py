"""Hugging Face ``transformers`` models as fedtorch models (``model=hf``, the llm extra).

``AutoModelForCausalLM`` (``head=causal_lm``, logits [B, T, V]) or
``AutoModelForSequenceClassification`` (``head=sequence_classification``, logits [B, C]),
built either from weights (``name_or_path``: a local folder, or a hub id already in the
local cache or reachable) with ``from_pretrained``, or from a config (``config``: a dict
with ``model_type`` and the architecture's keys) with ``from_config``, which needs no
download. The wrapper returns plain logits, which is what fedtorch's tasks read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtorch.errors import ConfigError, require

HEADS = ("causal_lm", "sequence_classification")


def import_transformers() -> Any:
    """``transformers``, or a one-line ConfigError naming the extra that installs it."""
    return require("transformers", "model", "model=hf")


class HuggingFaceModel(nn.Module):
    """A ``transformers`` model whose forward takes token ids and returns logits.

    Args:
        name_or_path: folder or hub id for ``from_pretrained`` (null: build from ``config``).
        config: ``{model_type: gpt2, n_layer: 2, ...}`` for ``from_config``.
        head: ``causal_lm`` or ``sequence_classification``.
        vocab_size: filled in from the dataset; sets the config's vocabulary (from_config).
        num_classes: labels of ``sequence_classification`` (filled in from the dataset).
        gradient_checkpointing: recompute activations in backward (less memory, more time).
        quantization: ``4bit`` or ``8bit``: load the weights quantized by bitsandbytes
            (QLoRA's frozen base, with ``adapter=lora``); CUDA and ``name_or_path`` only.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: Mapping[str, Any] | None = None,
        head: str = "causal_lm",
        vocab_size: int | None = None,
        num_classes: int | None = None,
        gradient_checkpointing: bool = False,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        transformers = import_transformers()
        extra_load = _quantization(transformers, quantization, name_or_path)
        if head not in HEADS:
            raise ConfigError("model.head", f"must be one of {', '.join(HEADS)}, got {head!r}")
        if (name_or_path is None) == (config is None):
            raise ConfigError(
                "model", "give exactly one of model.name_or_path (weights) or model.config"
            )
        auto = (
            transformers.AutoModelForCausalLM
            if head == "causal_lm"
            else transformers.AutoModelForSequenceClassification
        )
        extra = {"num_labels": num_classes} if head == "sequence_classification" else {}
        if name_or_path is not None:
            where = Path(str(name_or_path)).expanduser()
            if str(name_or_path).startswith(("/", ".", "~")) and not where.is_dir():
                raise ConfigError(
                    "model.name_or_path",
                    f"{where} is not a folder (give one holding config.json and the weights, "
                    "or a hub id)",
                )
            try:
                self.hf_model = auto.from_pretrained(str(name_or_path), **extra, **extra_load)
            except (OSError, ValueError) as exc:
                reason = str(exc).strip().splitlines()[0][:200]
                raise ConfigError(
                    "model.name_or_path",
                    f"cannot load {name_or_path!r} ({reason}); offline, give a folder holding "
                    "config.json and the weights, or build from model.config",
                ) from exc
        else:
            settings = dict(config)
            model_type = settings.pop("model_type", None)
            if not model_type:
                raise ConfigError("model.config", "needs model_type (e.g. gpt2, llama)")
            if vocab_size is not None:
                settings.setdefault("vocab_size", vocab_size)
            try:
                hf_config = transformers.AutoConfig.for_model(model_type, **settings, **extra)
            except (ValueError, KeyError) as exc:
                raise ConfigError("model.config", f"{type(exc).__name__}: {exc}") from exc
            self.hf_model = auto.from_config(hf_config)
        if gradient_checkpointing:
            self.hf_model.gradient_checkpointing_enable()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=tokens).logits


def _quantization(transformers: Any, kind: str | None, name_or_path: str | None) -> dict:
    """``from_pretrained`` arguments that load the weights quantized (QLoRA), or {}."""
    if kind is None:
        return {}
    if kind not in ("4bit", "8bit"):
        raise ConfigError("model.quantization", f"must be null, 4bit or 8bit, got {kind!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.quantization",
            f"{kind} needs CUDA (bitsandbytes' quantized layers); this machine has no CUDA "
            "device: set model.quantization=null",
        )
    if name_or_path is None:
        raise ConfigError("model.quantization", "quantizes weights: give model.name_or_path")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "model.quantization", f"{kind} needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=kind == "4bit",
        load_in_8bit=kind == "8bit",
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}
