"""Running one fedtorch job as several processes with torch.distributed (``engine=distributed``).

Launched by torchrun (``fedtorch-run ... -- OVERRIDES`` or ``torchrun -m fedtorch.train
OVERRIDES``), every process (rank) runs the same command: it composes the same config,
checks that every rank did (a hash of the resolved config), builds the same run and takes
a role. Rank 0 is the server: it runs the round loop, owns the run folder (logs, metrics,
checkpoints, ``model.pt``) and hands each other rank its share of every round's clients;
the other ranks are workers: they train the clients they are given and send the updates
back, and write nothing in the run folder.

Before Hydra composes the config, the ranks agree on one run folder: rank 0's timestamp
is sent to all, so ``outputs/runs/<date>`` is resolved once, not once per rank (a
``hydra.run.dir`` given on the command line is used as it is; torchrun restarts need it
fixed, which ``fedtorch-run`` does).

Nothing passed between ranks is pickled: the run folder's timestamp travels as 19 ASCII
bytes checked against its pattern, the config check as a message version and a SHA-256
digest, and everything the engine exchanges as tensors with a typed header
(:mod:`fedtorch.engines.messages`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from fedtorch.engines.messages import VERSION, MessageError
from fedtorch.errors import ConfigError, FedtorchError

# The keys whose values may differ between ranks (left out of the config digest): each
# process's own silo. Every other key must resolve to the same value on every rank.
PER_RANK_KEYS = ("distributed.silo",)
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def start(argv: list[str]) -> list[str]:
    """Join the process group and return ``argv`` with the run folder every rank uses
    (rank 0's) and, on workers, Hydra's own files and log file switched off."""
    if not dist.is_initialized():
        _init_process_group(timedelta(seconds=_timeout_from(argv)))
    args = list(argv)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(run_dir_override(_shared_stamp()))
    if rank() != 0:
        args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return args


def run_dir_override(stamp: str | None = None) -> str:
    """``hydra.run.dir=`` the folder Hydra's default would make now (configs/hydra), or at
    ``stamp``, fixed so that every rank, and every restarted rank, uses the same one."""
    stamp = stamp or time.strftime(STAMP_FORMAT)
    return f"hydra.run.dir=${{paths.output_dir}}/runs/{stamp}"


def _shared_stamp() -> str:
    """Rank 0's timestamp, sent to every rank as 19 ASCII bytes and checked against its
    pattern (a worker takes nothing else from it into its command line)."""
    stamp = torch.zeros(19, dtype=torch.uint8)
    if rank() == 0:
        stamp.copy_(
            torch.frombuffer(bytearray(time.strftime(STAMP_FORMAT).encode()), dtype=torch.uint8)
        )
    dist.broadcast(stamp, src=0)
    text = bytes(stamp.tolist()).decode("ascii", errors="replace")
    if not _STAMP.fullmatch(text):
        raise MessageError(0, f"a run folder timestamp that is not one: {text!r}")
    return text


def _init_process_group(timeout: timedelta) -> None:
    """The default group: gloo for CPU tensors and objects, NCCL for CUDA tensors where
    there is CUDA. Its rendezvous keys are prefixed with torchrun's restart count: after a
    restart the store still holds the previous attempt's addresses, and a rank reading one
    of those before its peer has published the new one fails to connect."""
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    world, me = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=me == 0 and not agent_hosts,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"/fedtorch/attempt_{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=me, world_size=world, timeout=timeout)


def _timeout_from(argv: list[str]) -> float:
    """``distributed.timeout_s`` from the command line, before Hydra has composed (the
    default otherwise, or where it is not a number > 0): the process group's timeout.
    :func:`check_config` validates the composed value, which the engine's barriers use."""
    for arg in argv:
        if arg.startswith("distributed.timeout_s="):
            try:
                value = float(arg.split("=", 1)[1])
            except ValueError:
                break
            return value if 0 < value < float("inf") else 1800.0
    return 1800.0


def check_config(cfg: DictConfig) -> None:
    """Stop every rank with one line if the ranks speak different message versions or
    composed different configs (but for :data:`PER_RANK_KEYS`), or if the timeout is not
    a number > 0. Each rank contributes a fixed int64 [version, digest] row, nothing else."""
    shared = OmegaConf.to_container(cfg, resolve=True)
    for key in PER_RANK_KEYS:
        group, name = key.split(".")
        shared.get(group, {}).pop(name, None)
    text = OmegaConf.to_yaml(OmegaConf.create(shared))
    digest = hashlib.sha256(text.encode()).digest()
    mine = torch.cat(
        [torch.tensor([VERSION]), torch.frombuffer(bytearray(digest), dtype=torch.int64)]
    )
    rows = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(rows, mine)
    versions = [int(r[0]) for r in rows]
    older = [f"rank {r} speaks {v}" for r, v in enumerate(versions) if v != VERSION]
    if older:
        raise ConfigError(
            "distributed",
            f"every rank must run the same fedtorch: this rank speaks message version "
            f"{VERSION}, {', '.join(older)}",
        )
    hexes = [bytes(r[1:].numpy().tobytes()).hex()[:12] for r in rows]
    differing = [r for r, d in enumerate(hexes) if d != hexes[0]]
    if differing:
        raise ConfigError(
            "distributed",
            f"rank(s) {', '.join(map(str, differing))} composed a different config from "
            f"rank 0's (hash {hexes[0]}); every rank must get the same overrides",
        )
    timeout = cfg.distributed.timeout_s
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ConfigError("distributed.timeout_s", f"must be a number > 0, got {timeout!r}")


def finish() -> None:
    """Leave the process group (at the end of a run, on every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class DistributedError(FedtorchError):
    """A rank is gone or hung past ``distributed.timeout_s``."""


_stop_requested = False


def note_stop() -> None:
    """Record that this process was told to stop (Ctrl-C or SIGTERM)."""
    global _stop_requested
    _stop_requested = True


STOP_GRACE_S = 2.0


def lost_peer(message: str) -> Exception:
    """What to raise when a peer is gone: KeyboardInterrupt if this process was told to
    stop too (the peers were stopped by the same signal: checkpoint and exit as on Ctrl-C),
    else a :class:`DistributedError` with ``message``.

    torchrun and schedulers signal the ranks one after another, so a peer stopped first
    can vanish before this rank's own signal arrives: wait ``STOP_GRACE_S`` for it (the
    signal interrupts the sleep) before calling the peer lost."""
    if not _stop_requested:
        time.sleep(STOP_GRACE_S)
    return KeyboardInterrupt() if _stop_requested else DistributedError(message)
