"""``fedtorch-run [torchrun options] -- [overrides]``: torchrun for ``fedtorch.train``.

The options before ``--`` are torchrun's own (its argument parser reads them:
``--nproc_per_node``, ``--nnodes``, ``--rdzv_endpoint``, ``--max_restarts``, ...), the
overrides after it are fedtorch's, and ``engine=distributed`` is added unless an engine is
given. One machine without rendezvous options runs ``--standalone`` (a free port, so runs
side by side do not collide). The run folder is fixed once here, so the processes torchrun
restarts after a crash (``--max_restarts=N``) find the checkpoints of the run they resume.

    fedtorch-run --nproc_per_node=2 -- +experiment=quickstart
    fedtorch-run --nproc_per_node=4 --max_restarts=3 -- +experiment=fmnist_dirichlet
"""

from __future__ import annotations

import sys

from fedtorch.engines.process_group import run_dir_override

RENDEZVOUS = (
    "--nnodes",
    "--rdzv",
    "--master_addr",
    "--master-addr",
    "--master_port",
    "--master-port",
    "--standalone",
    "--node_rank",
    "--node-rank",
)


def command(argv: list[str]) -> list[str]:
    """torchrun's argument list for ``fedtorch-run ARGV``."""
    if "--" in argv:
        cut = argv.index("--")
        launcher, overrides = argv[:cut], argv[cut + 1 :]
    else:
        launcher, overrides = argv, []
    if not any(a.startswith(RENDEZVOUS) for a in launcher):
        launcher = ["--standalone", *launcher]
    if not any(o.startswith("engine=") for o in overrides):
        overrides = ["engine=distributed", *overrides]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = [*overrides, run_dir_override()]
    return [*launcher, "--module", "fedtorch.train", *overrides]


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(command(sys.argv[1:])))
    except SignalException as stop:  # SIGTERM / SIGINT: torchrun has stopped the ranks
        sys.exit(128 + int(stop.sigval))


if __name__ == "__main__":
    main()
