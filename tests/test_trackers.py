"""Experiment trackers (logger=tensorboard / mlflow / wandb): what each wrote, read back with
the tracker's own reader, matches metrics.jsonl, also across a resume; a missing package or
a bad option stops the build with one line, and building alone writes nothing."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from fedtorch.config.build import build
from fedtorch.errors import ConfigError
from fedtorch.server.checkpoint import Interrupted
from fedtorch.train import train
from tests.conftest import FAST, compose_config

ALL = "logger=[tensorboard,mlflow,wandb,quiet]"
# Two rounds of checkpoints, then a resume from round 2 that also runs round 4: round 3 was
# logged after the checkpoint by the first session and is computed again by the second.
RUN = [*FAST, "data.num_train=400", "data.num_test=200", "checkpoint.every=1", "checkpoint.keep=3"]


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    """Trackers stay on this machine: W&B offline and silent, its folders in a temp dir,
    and no MLflow server from the environment."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numeric_columns(row: dict) -> dict:
    return {
        k: v
        for k, v in row.items()
        if k != "round" and isinstance(v, (int, float)) and v is not True
    }


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict:
    """A 3-round run with all three trackers, its last checkpoint deleted (as if killed
    after logging round 3), resumed with rounds=4."""
    root = tmp_path_factory.mktemp("trackers")
    run_dir, out = root / "run", root / "outputs"
    overrides = [*RUN, ALL, f"paths.output_dir={out}"]
    train(compose_config([*overrides, "rounds=3"]), run_dir)
    first = rows(run_dir)
    (run_dir / "checkpoints" / "round_000003.pt").unlink()
    train(compose_config([*overrides, "rounds=4", "resume=true"]), run_dir)
    return {"run_dir": run_dir, "out": out, "first": first, "final": rows(run_dir)}


def test_resume_recomputes_round_3_with_new_timings(resumed):
    final, first = resumed["final"], resumed["first"]
    assert [r["round"] for r in final] == [1, 2, 3, 4]
    assert final[:2] == first[:2]  # restored from the checkpoint
    assert final[2]["elapsed_s"] != first[2]["elapsed_s"]  # round 3 ran again


def test_tensorboard_scalars_equal_metrics_once_per_round(resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    logdir = resumed["run_dir"] / "tensorboard"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per session
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    final = resumed["final"]
    columns = set().union(*(numeric_columns(r) for r in final))
    assert {"test_accuracy", "train_loss", "bytes_up", "elapsed_s"} <= columns
    assert columns <= set(acc.Tags()["scalars"])
    for key in columns:
        events = acc.Scalars(key)
        expected = [(r["round"], r[key]) for r in final if key in numeric_columns(r)]
        # The first session's rounds are purged: each round once, with the values of the
        # file (round 3's timings from the second session).
        assert [e.step for e in events] == [step for step, _ in expected], key
        assert [e.value for e in events] == pytest.approx([v for _, v in expected], rel=1e-6)
    summary = json.loads((resumed["run_dir"] / "summary.json").read_text())
    best = acc.Scalars("hparam/best_accuracy")
    assert best[-1].value == pytest.approx(summary["best_accuracy"])
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    hparams = metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["seed"].number_value == 0
    assert hparams["model.hidden"].string_value == "[32]"
    assert hparams["strategy._target_"].string_value.endswith("FedAvg")


def test_mlflow_run_holds_params_metrics_and_files(resumed):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{resumed['out']}/mlflow.db")
    experiment = client.get_experiment_by_name("fedtorch")
    (run,) = client.search_runs([experiment.experiment_id])  # the resume continued it
    state = json.loads((resumed["run_dir"] / "trackers.json").read_text())
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["seed"] == "0" and run.data.params["rounds"] == "3"
    assert run.data.params["model.hidden"] == "[32]"
    # Round 3 as the first session sent it; round 4 from the second; none twice.
    sent = [*resumed["first"], resumed["final"][3]]
    for key in ("test_accuracy", "train_loss", "bytes_up", "elapsed_s"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [
            (r["round"], pytest.approx(r[key])) for r in sent
        ], key
    summary = json.loads((resumed["run_dir"] / "summary.json").read_text())
    assert run.data.metrics["summary/best_accuracy"] == pytest.approx(summary["best_accuracy"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"summary.json", "model.pt", "config.yaml"}  # quiet: no metrics.png
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(resumed["out"])))
    assert json.loads(local.read_text()) == summary


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-ID.wandb``), decoded with wandb's own
    protobuf schema. wandb 0.31 ships no reader of these files (its Go core writes and syncs
    them), so the framing, LevelDB's log format after a 7-byte ``:W&B`` header, is undone
    here: 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_items(items) -> dict:
    return {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_runs_hold_config_history_and_summary(resumed):
    sessions = sorted((resumed["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 2
    state = json.loads((resumed["run_dir"] / "trackers.json").read_text())
    history, summary, exits, config = [], {}, [], {}
    for path in sessions:
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.HasField("run")]
        assert run.run_id == state["wandb"]["id"] and run.project == "fedtorch"
        config.update(wandb_items(run.config.update))
        history += [wandb_items(r.history.item) for r in records if r.HasField("history")]
        for r in records:
            if r.HasField("summary"):
                summary.update(wandb_items(r.summary.update))
        exits += [r.exit.exit_code for r in records if r.HasField("exit")]
    assert exits == [0, 0]
    assert config["seed"] == 0 and config["model"]["hidden"] == [32]
    # The second session sends round 4 only: round 3 went out before the interruption.
    sent = [*resumed["first"], resumed["final"][3]]
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    for got, row in zip(history, sent):
        for key, value in numeric_columns(row).items():
            assert got[key] == pytest.approx(value), key
    expected = json.loads((resumed["run_dir"] / "summary.json").read_text())
    assert summary["best_accuracy"] == pytest.approx(expected["best_accuracy"])
    assert summary["rounds_completed"] == 4


@pytest.mark.parametrize(
    ("name", "module", "feature"),
    [
        ("tensorboard", "tensorboard", "TensorBoard logging"),
        ("mlflow", "mlflow", "MLflow logging"),
        ("wandb", "wandb", "Weights & Biases logging"),
    ],
)
def test_missing_extra_stops_the_build_with_one_line(tmp_path, monkeypatch, name, module, feature):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ConfigError) as err:
        build(compose_config([*FAST, f"logger={name}"]), tmp_path)
    message = str(err.value)
    assert message.startswith(
        f'logger.trackers.{name}: {feature} needs {module}: pip install "fedtorch[{name}]"'
    )
    assert "\n" not in message


def test_bad_tracker_options_stop_the_build(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^logger\.trackers\.wandb\.mode: must be one of offline"
    ):
        build(compose_config([*FAST, "logger=wandb", "logger.trackers.wandb.mode=cloud"]), tmp_path)
    with pytest.raises(ConfigError, match=r"^logger\.trackers\.mlflow\.experiment_name: "):
        build(
            compose_config([*FAST, "logger=mlflow", "logger.trackers.mlflow.experiment_name=''"]),
            tmp_path,
        )
    with pytest.raises(ConfigError, match=r"^logger\.trackers\.mine: needs a _target_"):
        build(compose_config([*FAST, "+logger.trackers.mine.x=1"]), tmp_path)


def test_building_alone_writes_nothing_for_the_trackers(tmp_path):
    """A worker rank of engine=distributed builds the run but never trains it: its
    trackers must not open runs (only rank 0, which trains, logs)."""
    out = tmp_path / "outputs"
    build(compose_config([*FAST, ALL, f"paths.output_dir={out}"]), tmp_path / "run")
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert not written & {"tensorboard", "wandb", "trackers.json"}
    assert not out.exists()


def test_default_and_list_selection_compose():
    assert not compose_config([]).logger.trackers
    both = compose_config(["logger=[tensorboard,mlflow,quiet]", "paths.output_dir=/x"]).logger
    assert set(both.trackers) == {"tensorboard", "mlflow"} and not both.progress
    assert both.trackers.mlflow.tracking_uri == "sqlite:////x/mlflow.db"


@pytest.mark.parametrize(
    ("error", "raised", "status"),
    [(RuntimeError("boom"), RuntimeError, "FAILED"), (KeyboardInterrupt(), Interrupted, "KILLED")],
)
def test_a_failed_or_interrupted_run_ends_the_mlflow_run_so(
    resumed, tmp_path, monkeypatch, error, raised, status
):
    from mlflow.tracking import MlflowClient

    from fedtorch.server.orchestrator import Orchestrator

    def evaluate(self, *args, **kwargs):
        raise error

    uri = f"sqlite:///{resumed['out']}/mlflow.db"  # an existing store: no schema set-up
    name = f"stopped-{status}"
    keys = [
        f"logger.trackers.mlflow.tracking_uri={uri}",
        f"logger.trackers.mlflow.experiment_name={name}",
    ]
    monkeypatch.setattr(Orchestrator, "_evaluate", evaluate)
    with pytest.raises(raised):
        train(compose_config([*RUN, "logger=[mlflow,quiet]", *keys]), tmp_path)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == status
