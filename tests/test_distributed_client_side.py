"""engine=distributed: the client's steps (attack, compression, DP clipping and local noise)
run on the rank that trained the client; results stay bit-identical to one process, rank 0
never holds an un-noised update under local DP, and what cannot run there yet is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from tests.conftest import FAST, REPO, compose_config, run_cli
from tests.test_distributed import RUN, fedtorch_run, one_rank_group  # noqa: F401
from tests.test_resume import assert_same

CASES = {
    "fedavg-dp_local": ["strategy=fedavg", "privacy=dp_local"],
    # SCAFFOLD refuses privacy in every engine (its release is the average update only).
    "fedadam-dp_local": ["strategy=fedadam", "strategy.server_lr=0.01", "privacy=dp_local"],
    "fedavg-topk": ["strategy=fedavg", "compression=topk", "compression.fraction=0.1"],
    "scaffold-topk": ["strategy=scaffold", "compression=topk", "compression.fraction=0.1"],
    "fedavg-dp_central-int8-attack": [
        "strategy=fedavg",
        "privacy=dp_central",
        "compression=int8",
        "attack=sign_flip",
        "attack.fraction=0.4",
    ],
}
# The default suite checks FedAvg under local DP on 2 ranks against one process in the
# rank-0 probe test below (one launch serves both checks); every case here is slow.


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_bit_identical_to_one_process(tmp_path, name):
    overrides = [*RUN, *CASES[name]]
    reference = tmp_path / "reference"
    done = run_cli([*overrides, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    done = fedtorch_run(2, [*overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(run_dir, reference)


# Loaded at start-up by every process of the run (a ``sitecustomize`` on PYTHONPATH): rank 1
# records each raw delta its clients hand to their client side; rank 0 records each update
# that arrives from a worker. Both are saved when the process exits.
PROBE = textwrap.dedent(
    """
    import atexit, os
    rank = os.environ.get("RANK")
    if rank in ("0", "1"):
        import torch
        from fedtorch.pipeline import pipeline
        from fedtorch.server import round_pipeline

        seen = []
        atexit.register(lambda: torch.save(seen, os.environ["PROBE_OUT"] + f".rank{rank}"))
        if rank == "0":
            add_sent = pipeline.UpdatePipeline.add_sent

            def recording_add_sent(self, client, sent, receipt):
                seen.append((client.client_id, sent.clone()))
                return add_sent(self, client, sent, receipt)

            pipeline.UpdatePipeline.add_sent = recording_add_sent
        else:
            run = round_pipeline.RoundClientSide.run

            def recording_run(self, client, delta):
                seen.append((self.round_idx, client.client_id, delta.clone()))
                return run(self, client, delta)

            round_pipeline.RoundClientSide.run = recording_run
    """
)


def test_rank_0_never_holds_an_un_noised_update_under_local_dp(tmp_path):
    """FedAvg, privacy=dp_local, 2 ranks: every update that reaches rank 0 from the worker is
    the worker's clipped delta plus noise of the configured size (never the raw or the
    clipped, un-noised delta), and the run is bit-identical to one process."""
    overrides = [*RUN, *CASES["fedavg-dp_local"]]
    reference = tmp_path / "reference"
    done = run_cli([*overrides, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    out = tmp_path / "seen.pt"
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtorch.launch",
            "--nproc_per_node=2",
            "--",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{probe}{os.pathsep}{REPO}", "PROBE_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    received = torch.load(f"{out}.rank0")
    raw = torch.load(f"{out}.rank1")
    assert received and len(received) == len(raw)  # every worker update was recorded
    clip, z = 1.0, 1.0  # configs/privacy/dp_local.yaml
    for (client, sent), (_, trained, delta) in zip(received, raw):
        assert client == trained
        clipped = delta * min(1.0, clip / float(delta.norm()))  # what a worker sends un-noised
        noise = float((sent - clipped).norm())
        expected = z * clip * sent.numel() ** 0.5  # the norm of N(0, (z C)^2 I_P)
        assert 0.8 * expected < noise < 1.2 * expected
        assert float((sent - delta).norm()) > 0.5 * expected
    assert_same(run_dir, reference)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["privacy=dp_central", "secure_aggregation.enabled=true"], "secure_aggregation.enabled"),
        (["compression=topk", "compression.error_feedback=true"], "compression.error_feedback"),
    ],
)
def test_what_cannot_run_on_the_worker_is_refused(tmp_path, one_rank_group, extra, key):  # noqa: F811
    cfg = compose_config([*FAST, "engine=distributed", *extra])
    with pytest.raises(ConfigError, match=f"^{key}: engine=distributed cannot"):
        build(cfg, tmp_path)
