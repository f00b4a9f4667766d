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
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from fedtorch.errors import ConfigError, FedtorchError


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
        override = [run_dir_override()]
        dist.broadcast_object_list(override, src=0)
        args.append(override[0])
    if rank() != 0:
        args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return args


def run_dir_override() -> str:
    """``hydra.run.dir=`` the folder Hydra's default would make now (configs/hydra), fixed
    so that every rank, and every restarted rank, uses the same one."""
    return f"hydra.run.dir=${{paths.output_dir}}/runs/{time.strftime('%Y-%m-%d_%H-%M-%S')}"


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
    default otherwise): the process group's timeout. :func:`check_config` validates the
    composed value, which the engine's barriers use."""
    for arg in argv:
        if arg.startswith("distributed.timeout_s="):
            try:
                return float(arg.split("=", 1)[1])
            except ValueError:
                break
    return 1800.0


def check_config(cfg: DictConfig) -> None:
    """Stop every rank with one line if the ranks composed different configs (but for
    ``distributed.silo``, which names each process's own silo)."""
    shared = OmegaConf.to_container(cfg, resolve=True)
    shared.get("distributed", {}).pop("silo", None)
    text = OmegaConf.to_yaml(OmegaConf.create(shared))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ConfigError(
            "distributed",
            f"rank(s) {', '.join(map(str, differing))} composed a different config from "
            f"rank 0's (hash {digests[0]}); every rank must get the same overrides",
        )
    timeout = cfg.distributed.timeout_s
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ConfigError("distributed.timeout_s", f"must be a number > 0, got {timeout!r}")


def finish() -> None:
    """Leave the process group (at the end of a run, on every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# Messages: a Python object as a pickled uint8 tensor (length first), sent without blocking
# so a worker can go on training while rank 0 is busy with earlier clients.


def isend_object(obj: Any, dst: int) -> list[Any]:
    """Start sending ``obj`` to rank ``dst``; returns (work, buffer) pairs: wait on each
    work, and keep its buffer alive until then."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64)
    return [(dist.isend(length, dst), length), (dist.isend(data, dst), data)]


def recv_object(src: int) -> Any:
    """The next object rank ``src`` sent with :func:`isend_object`."""
    length = torch.empty(1, dtype=torch.int64)
    dist.recv(length, src)
    data = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.recv(data, src)
    return pickle.loads(data.numpy().tobytes())


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
