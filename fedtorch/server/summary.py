"""``summary.json``: what a finished run reports, gathered from the components."""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch import nn

from fedtorch.compression import Compression
from fedtorch.server.progress import Progress, RunSettings
from fedtorch.server.round_pipeline import RoundPipelines


def run_summary(
    progress: Progress,
    settings: RunSettings,
    *,
    wall_time_s: float,
    round_reached_target: int | None,
    model: nn.Module,
    device: torch.device,
    trainer: Any,
    budget_stop: bool,
    parts: RoundPipelines,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The run's summary: accuracy and loss (final and best), rounds, time, bytes, the
    compression's figures, model size and peak memory, the privacy spent, then ``extra``
    (the dataset, device and partition). ``parts``: the run's privacy, secure
    aggregation and compression (those of its round pipelines)."""
    privacy, compression = parts.privacy, parts.compression
    last_eval = progress.last_eval
    summary: dict[str, Any] = {
        "rounds_completed": progress.round,
        "final_accuracy": last_eval.get("test_accuracy"),
        "final_loss": last_eval.get("test_loss"),
        "best_accuracy": progress.best_accuracy,
        "best_round": progress.best_round,
        "target_accuracy": settings.target_accuracy,
        "round_reached_target": round_reached_target,
        "wall_time_s": round(wall_time_s, 3),
        "bytes_up": progress.bytes_up,
        "bytes_down": progress.bytes_down,
        **_compression_part(progress, compression, parts.secure_agg.enabled),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **peak_memory(device),
        # client=dpsgd accounts per client; otherwise the server's DP, if any.
        **(getattr(trainer, "privacy_summary", dict)() or privacy.summary(budget_stop)),
        **extra,
    }
    return summary


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA memory allocated by PyTorch), MiB.

    After a resume these are the peaks of the resumed process, not of the whole run.
    """
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _compression_part(progress: Progress, compression: Compression, secure_agg: bool) -> dict:
    """Compression's figures, when anything changed what was sent (compression either way,
    or secure aggregation's ring elements)."""
    if not compression.enabled and compression.downlink == "none" and not secure_agg:
        return {}
    return compression.summary(
        progress.bytes_up, progress.bytes_up_uncompressed, progress.bytes_down_uncompressed
    )
