"""The ``compression`` config group: what clients send up (and, optionally, what the server
broadcasts), with error feedback and exact byte counts.

Uplink: each client's update x (its model delta, after the attack step, if any) is encoded
by the chosen compressor; the server decodes it and the decoded update C(x) goes on
through the pipeline (privacy, secure aggregation, the strategy's aggregator: every
strategy, robust ones included, sees decoded updates). The bytes counted for the client
are the encoded tensors' size. Under ``engine=distributed`` :meth:`Compression.step` runs
on the rank that trained the client, which sends the decoded update and the encoded size
(error feedback is refused there: the residual would have to stay where the client trains).

Error feedback (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019):
client k keeps the residual e_k of what it did not send. When sampled, it compresses
p = x + e_k, sends C(p) and keeps e_k <- p - C(p). Residuals are per-client state like
SCAFFOLD's c_i (``residual_storage``: CPU memory, or a sparse file in the run folder),
start at zero, change only when the server accepts the round, and are checkpointed, so a
resumed run is bit-identical.

Downlink (``downlink``): the global weights broadcast each round are cast to fp16 / bf16
or quantized to int8 blocks; clients train from the decoded copy and their deltas are
taken against it, while the server keeps its weights in full precision. Sparsifiers and
random quantizers are refused here: decoding a sparse model delta needs the previous
model on the client, which a client sampled now and then does not have.

Composition, as decided:

- Differential privacy: compression comes first and the DP step clips the decoded update,
  so one client's contribution is still bounded by the clip norm (the sensitivity the
  accountant assumes), whatever the compressor did.
- Secure aggregation: the masked ring elements are what clients send, so a compressor
  would have to map every client into the same fixed-point ring; none of these does
  (top-k and rand-k lose their sparsity to the masks, per-client scales do not add up).
  Under secure aggregation bytes are reduced with ``secure_aggregation.bits`` (bits / 8
  bytes a coordinate, counted exactly), and ``compression`` must be ``none``.
- SCAFFOLD: its control-variate update is computed from the decoded update and sent
  uncompressed (counted in full).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedtorch import seeding
from fedtorch.compression.compressors import (
    QSGD,
    Compressor,
    HalfPrecision,
    Int8Blocks,
    NoCompression,
    PowerSGD,
    RandK,
    ScaledSign,
    TopK,
)
from fedtorch.errors import ConfigError
from fedtorch.pipeline.pipeline import RejectedUpdate, all_finite
from fedtorch.results import ClientResult
from fedtorch.state.client_store import STORAGES, ClientStateStore
from fedtorch.state.layout import StateLayout

KINDS = ("none", "fp16", "bf16", "int8", "qsgd", "topk", "randk", "signsgd", "powersgd")
DOWNLINK_KINDS = ("none", "fp16", "bf16", "int8")
OPTIONS = {  # the options each kind reads
    "none": (),
    "fp16": (),
    "bf16": (),
    "int8": ("block",),
    "qsgd": ("levels", "bucket"),
    "topk": ("fraction",),
    "randk": ("fraction", "unbiased"),
    "signsgd": (),
    "powersgd": ("rank",),
}
DEFAULTS = {"block": 256, "levels": 16, "bucket": 512, "fraction": 0.01, "rank": 4}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"compression.{name}", f"must be an integer >= 1, got {value!r}")
    return value


def make_compressor(kind: str, options: dict[str, Any], layout: StateLayout | None) -> Compressor:
    """The compressor of ``kind`` with its ``options`` (unset ones take their defaults)."""
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    specs = layout.specs if layout is not None else []
    return {
        "none": lambda: NoCompression(),
        "fp16": lambda: HalfPrecision(torch.float16),
        "bf16": lambda: HalfPrecision(torch.bfloat16),
        "int8": lambda: Int8Blocks(o["block"]),
        "qsgd": lambda: QSGD(o["levels"], o["bucket"]),
        "topk": lambda: TopK(o["fraction"]),
        "randk": lambda: RandK(o["fraction"], bool(o.get("unbiased", False))),
        "signsgd": lambda: ScaledSign(specs),
        "powersgd": lambda: PowerSGD(specs, o["rank"]),
    }[kind]()


class Compression:
    """Uplink (and optional downlink) compression of one run; see the module docstring.

    Args:
        kind: the uplink compressor, one of :data:`KINDS`.
        error_feedback: carry each client's residual to its next update.
        residual_storage: where residuals live: ``memory`` (CPU) or ``disk``.
        downlink: compress the broadcast weights: one of :data:`DOWNLINK_KINDS`.
        fraction: top-k / rand-k: the share of coordinates sent, in (0, 1].
        levels: QSGD's s >= 1.
        bucket: QSGD's bucket size (values sharing one norm).
        block: int8's block size (values sharing one scale).
        rank: PowerSGD's rank r.
        unbiased: rand-k: scale the kept values by P / k.
        seed: the run's seed (randomised compressors draw from (seed, round, client)).

    Raises:
        ConfigError: an unknown kind, an option outside its range or not used by the
            kind, or error feedback with ``none``.
    """

    def __init__(
        self,
        kind: str = "none",
        error_feedback: bool = False,
        residual_storage: str = "memory",
        downlink: str = "none",
        fraction: float | None = None,
        levels: int | None = None,
        bucket: int | None = None,
        block: int | None = None,
        rank: int | None = None,
        unbiased: bool | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(
                "compression.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}"
            )
        if downlink not in DOWNLINK_KINDS:
            raise ConfigError(
                "compression.downlink",
                f"must be one of {', '.join(DOWNLINK_KINDS)}, got {downlink!r} (sparse and "
                "random compressors need the previous model on the client, which a client "
                "sampled now and then does not have)",
            )
        if not isinstance(error_feedback, bool):
            raise ConfigError(
                "compression.error_feedback", f"must be true or false, got {error_feedback!r}"
            )
        if residual_storage not in STORAGES:
            raise ConfigError(
                "compression.residual_storage",
                f"must be one of {', '.join(STORAGES)}, got {residual_storage!r}",
            )
        options = {
            "fraction": fraction,
            "levels": levels,
            "bucket": bucket,
            "block": block,
            "rank": rank,
            "unbiased": unbiased,
        }
        for name, value in options.items():
            if value is not None and name not in OPTIONS[kind]:
                raise ConfigError(
                    f"compression.{name}",
                    f"does not apply to compression={kind} (its options: "
                    f"{', '.join(OPTIONS[kind]) or 'none'})",
                )
        if fraction is not None and not (
            isinstance(fraction, (int, float))
            and not isinstance(fraction, bool)
            and 0 < fraction <= 1
        ):
            raise ConfigError("compression.fraction", f"must be in (0, 1], got {fraction!r}")
        for name in ("levels", "bucket", "block", "rank"):
            if options[name] is not None:
                _positive_int(name, options[name])
        if unbiased is not None and not isinstance(unbiased, bool):
            raise ConfigError("compression.unbiased", f"must be true or false, got {unbiased!r}")
        if error_feedback and kind == "none":
            raise ConfigError(
                "compression.error_feedback",
                "compression=none sends updates exactly, so there is no residual to feed "
                "back; choose a compressor (e.g. compression=topk) or error_feedback=false",
            )
        self.kind, self.error_feedback, self.downlink = kind, error_feedback, downlink
        self.residual_storage, self.options, self.seed = residual_storage, options, seed
        self.compressor: Compressor = NoCompression()
        self.broadcaster: Compressor = make_compressor(downlink, {}, None)
        self.residuals: ClientStateStore | None = None
        self.round_idx = 0
        self.sent: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        """Whether updates are compressed on the way up."""
        return self.kind != "none"

    def bind(self, layout: StateLayout, num_clients: int, run_dir: Path | None) -> None:
        """Build the compressor for this model's layout and the residual store."""
        self.compressor = make_compressor(self.kind, self.options, layout)
        if self.error_feedback:
            self.residuals = ClientStateStore.in_run_folder(
                run_dir,
                "ef_residual",
                num_clients,
                layout.size,
                self.residual_storage,
                "compression.residual_storage",
            )

    def start_round(self, round_idx: int) -> None:
        """Forget the last round's byte counts and any residuals it left staged."""
        self.round_idx, self.sent = round_idx, {}
        if self.residuals is not None:
            self.residuals.discard()

    def step(self, client: ClientResult, update: torch.Tensor) -> torch.Tensor:
        """The pipeline step: what the server decodes from the client's message."""
        cid = client.client_id
        sent = update
        if self.residuals is not None:
            sent = update + self.residuals.get(cid).to(update.device, update.dtype)
        generator = None
        if self.compressor.randomized:
            generator = seeding.generator(
                self.seed, seeding.COMPRESSION, self.round_idx, cid, device=update.device
            )
        message = self.compressor.encode(sent, generator)
        decoded = self.compressor.decode(message).to(update.dtype)
        if not all_finite(decoded):
            raise RejectedUpdate(
                f"compression={self.kind}: the decoded update is not finite (a value beyond "
                "the format's range, e.g. float16's 65504)"
            )
        if self.residuals is not None:
            self.residuals.stage(cid, sent - decoded)
        self.sent[cid] = message.nbytes
        return decoded

    def commit(self) -> None:
        """The server accepted the round: the staged residuals become the clients'."""
        if self.residuals is not None:
            self.residuals.commit()

    def uplink_bytes(self, client_ids: list[int]) -> int:
        """Bytes of the encoded updates these clients sent this round."""
        return sum(self.sent[c] for c in client_ids)

    def broadcast(self, vector: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The global vector as clients decode it, and the bytes of one copy."""
        message = self.broadcaster.encode(vector)
        return self.broadcaster.decode(message).to(vector.dtype), message.nbytes

    def summary(
        self, bytes_up: int, bytes_up_uncompressed: int, bytes_down_uncompressed: int
    ) -> dict[str, Any]:
        """What ``summary.json`` records of the run's compression and its byte counts."""
        return {
            "compression": self.kind,
            "error_feedback": self.error_feedback,
            "downlink_compression": self.downlink,
            "bytes_up_uncompressed": bytes_up_uncompressed,
            "bytes_down_uncompressed": bytes_down_uncompressed,
            "compression_ratio": bytes_up_uncompressed / bytes_up if bytes_up else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": self.residuals.state_dict() if self.residuals else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.residuals is not None:
            self.residuals.load_state_dict(state.get("residuals", {}))
