"""The speed benchmark's Flower runner trains exactly the reference loop's run.

Same cohorts, batch order and initial weights, so the global model's test accuracy after
every round must be identical, not merely close. Needs Flower's virtual environment (what
bench.py makes: experiments/speed/.flower-venv, or FLOWER_VENV); skipped without it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "experiments" / "speed"
FLOWER_VENV = Path(os.environ.get("FLOWER_VENV", SPEED / ".flower-venv"))
# Seconds-long: synthetic 8x8 data, 6 clients, 3 a round, 2 rounds, one thread.
TINY = [
    "dataset=synthetic",
    "model=mlp",
    "model.hidden=[32]",
    "partition=iid",
    "num_clients=6",
    "clients_per_round=3",
    "rounds=2",
    "client.epochs=1",
    "client.batch_size=10",
    "client.optimizer.lr=0.05",
    "eval_every=1",
    "logger=quiet",
    "device=cpu",
    "seed=0",
]


def flower_python() -> str | None:
    """Python of Flower's venv if it can import flwr, else None."""
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        return None
    check = subprocess.run([python, "-c", "import flwr, ray"], capture_output=True)
    return str(python) if check.returncode == 0 else None


@pytest.mark.slow
def test_flower_runner_matches_reference_round_by_round(tmp_path, monkeypatch):
    python = flower_python()
    if python is None:
        pytest.skip(
            f"no Flower venv with flwr at {FLOWER_VENV} (set FLOWER_VENV, or run "
            "experiments/speed/bench.py once, which makes it)"
        )
    monkeypatch.syspath_prepend(str(SPEED))
    bench = importlib.import_module("bench")
    monkeypatch.setitem(bench.WORKLOADS, "tiny", TINY)
    spec = tmp_path / "tiny.pt"
    bench.write_spec("tiny", [], 1, spec)

    reference = bench.run_engine("reference", "tiny", spec, [], 1, None)
    flower = bench.run_engine("flower", "tiny", spec, [], 1, python)

    assert "error" not in reference, reference
    assert "error" not in flower, flower
    assert len(reference["accuracies"]) == 2
    assert flower["accuracies"] == reference["accuracies"]
    for result in (reference, flower):
        assert len(result["round_times"]) == 2
        assert result["setup_s"] > 0
        assert result["peak_pss_sum_mb"] >= result["peak_pss_max_mb"] > 0
