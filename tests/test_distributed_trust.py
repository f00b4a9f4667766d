"""What ranks of engine=distributed accept from each other: no pickle, a typed and versioned
header, reports of exactly the clients assigned, sizes rank 0 knows, finite allreduce
sums; and the distributed keys refused outside torchrun."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from fedtorch.data.silos import _exchange
from fedtorch.engines import distributed, messages
from fedtorch.engines.distributed import SummedRound, _Inbox, _Ledger, _tasks_message
from fedtorch.engines.messages import MessageError, decode, encode
from fedtorch.errors import DataError
from fedtorch.models.mlp import MLP
from fedtorch.results import ClientResult, ClientTask
from tests.test_distributed import RUN, fedtorch_run, one_rank_group  # noqa: F401

MARKER_ENV = "FEDTORCH_TEST_MARKER"


class WritesFile:
    """Unpickling this writes ``path``: what a rank sending pickles could make another run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled: code ran on the receiver"))


def pickled_payload(path: str) -> bytes:
    return pickle.dumps(WritesFile(path))


def header(kind: str, **fields) -> bytes:
    payload = fields.pop("payload", [])
    return json.dumps({"v": messages.VERSION, "kind": kind, **fields, "payload": payload}).encode()


UPDATE = {
    "t": "update",
    "client": 3,
    "samples": 40,
    "metrics": {"train_loss": 0.5, "steps": 4},
    "counters": [],
}
ROWS = [{"dtype": "float32", "shape": [1, 10]}]


# The header: encode and decode --------------------------------------------------------


def test_each_kind_round_trips_through_its_header():
    rows = torch.zeros(2, 10)
    items = [UPDATE, {**UPDATE, "client": 4}, {"t": "failed", "client": 5, "reason": "x"}]
    items += [{"t": "end"}, {"t": "busy", "seconds": 0.25}]
    data = encode("updates", {"round": 2, "items": items}, [rows])
    message = decode(data, 1, ("updates",))
    assert message.kind == "updates" and message.fields["items"] == items
    assert message.payloads == [("float32", (2, 10))]
    nan = {**UPDATE, "metrics": {"train_loss": float("nan")}}  # a diverged client's loss
    loss = decode(encode("updates", {"round": 1, "items": [nan]}, [rows]), 1, ("updates",))
    assert loss.fields["items"][0]["metrics"]["train_loss"] != 0.0  # NaN survives, as NaN
    terms = decode(encode("eval_terms", {"batches": 3}, [torch.zeros(1, 4)]), 2, ("eval_terms",))
    assert terms.fields == {"batches": 3} and terms.payloads == [("float32", (1, 4))]


def test_tasks_message_carries_every_field_and_the_vectors_as_blocks():
    like = torch.zeros(6)
    tasks = [
        ClientTask(2, steps=3, step_correction=torch.arange(6.0), prox_mu=0.1),
        ClientTask(0, flip_labels=True, initial_loss=True),
    ]
    fields, blocks = _tasks_message([(tasks, True)], 4, like)
    message = decode(encode("tasks", fields, blocks), 0, ("tasks",))
    sent = message.fields["chunks"][0]["tasks"]
    assert [t["client"] for t in sent] == [2, 0] and sent[0]["steps"] == 3
    assert sent[0]["step_correction"] and not sent[1]["step_correction"]
    assert sent[1]["flip_labels"] and sent[1]["initial_loss"]
    assert message.payloads == [("float32", (0, 6)), ("float32", (1, 6))]
    assert torch.equal(blocks[1][0], torch.arange(6.0))


def test_a_pickle_where_a_header_belongs_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "written"
    data = pickled_payload(str(marker))
    with pytest.raises(MessageError) as info:
        decode(data, 1, ("updates",))
    line = str(info.value)
    assert line.startswith("distributed: rank 1 sent a message that is not a fedtorch header")
    assert "\n" not in line and not marker.exists()
    pickle.loads(data)  # the payload is real: unpickled, it writes the file
    assert marker.exists()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "not a fedtorch header"),
        (b"\xff\xfe", "not a fedtorch header"),
        (b"[1, 2]", "not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "not a fedtorch header"),  # nesting past recursion
        (
            json.dumps({"v": messages.VERSION + 1, "kind": "updates"}).encode(),
            f"of version {messages.VERSION + 1}; this rank speaks version {messages.VERSION}",
        ),
        (json.dumps({"kind": "updates"}).encode(), "of version None"),
        (json.dumps({"v": True, "kind": "updates"}).encode(), "of version True"),
        (header("shell", payload=[]), "of kind 'shell' where updates was expected"),
        (header("tasks", round=1, chunks=[]), "of kind 'tasks' where updates was expected"),
        (header("updates", round=1, items=[UPDATE]), "updates.payload must list 1 payload"),
        (header("updates", round=1, items=[UPDATE], payload=ROWS, x=1), "field 'x'"),
        (header("updates", items=[UPDATE], payload=ROWS), "lacks its field 'round'"),
        (header("updates", round=True, items=[], payload=ROWS), "round must be an integer"),
        (header("updates", round=-1, items=[], payload=ROWS), "round must be an integer in"),
        (header("updates", round=2**60, items=[], payload=ROWS), "round must be an integer in"),
        (header("updates", round=1, items=[{"t": "exec"}], payload=ROWS), "must be one of"),
        (
            header(
                "updates", round=1, items=[{**UPDATE, "metrics": {"__class__": 1}}], payload=ROWS
            ),
            "field '__class__'",
        ),
        (
            header("updates", round=1, items=[{**UPDATE, "client": "3"}], payload=ROWS),
            "client must be an integer",
        ),
        (
            header(
                "updates", round=1, items=[{"t": "busy", "seconds": float("nan")}], payload=ROWS
            ),
            "seconds must be a finite number",
        ),
        (
            header(
                "updates",
                round=1,
                items=[{"t": "failed", "client": 1, "reason": "a\nb"}],
                payload=ROWS,
            ),
            "printable ASCII",
        ),
        (
            header("updates", round=1, items=[UPDATE], payload=[{"dtype": "object", "shape": [1]}]),
            "dtype must be one of",
        ),
        (
            header(
                "updates",
                round=1,
                items=[UPDATE],
                payload=[{"dtype": "float32", "shape": [1, 1, 1, 1, 1]}],
            ),
            "shape has 5 entries",
        ),
    ],
)
def test_a_malformed_header_is_one_line_naming_the_rank(data, says):
    with pytest.raises(MessageError) as info:
        decode(data, 1, ("updates",))
    line = str(info.value)
    assert line.startswith("distributed: rank 1 sent ") and says in line, line
    assert "\n" not in line and len(line) < 400


def test_an_oversized_header_is_refused_before_it_is_read():
    assert messages.check_length(100, 4096, 1, ("updates",)) == 100
    for size in (0, -5, 4097, 2**62):
        with pytest.raises(
            MessageError, match=r"^distributed: rank 1 sent a header of -?\d+ bytes"
        ):
            messages.check_length(size, 4096, 1, ("updates",))
    with pytest.raises(MessageError, match="at most 67108864"):
        messages.check_length(1 << 27, 1 << 40, 1, ("updates",))


def test_a_payload_unlike_what_was_assigned_is_refused():
    message = decode(
        encode("updates", {"round": 1, "items": [UPDATE]}, [torch.zeros(1, 10)]), 1, ("updates",)
    )
    assert messages.check_payload(message, 0, torch.float32, (1, 10)) == torch.float32
    with pytest.raises(MessageError, match="rows are float32 \\[1, 10\\]; expected float64"):
        messages.check_payload(message, 0, torch.float64, (1, 10))
    with pytest.raises(MessageError, match="expected float32 \\[1, 11\\]"):
        messages.check_payload(message, 0, torch.float32, (1, 11))


def test_the_sender_checks_its_own_message_against_the_schema():
    with pytest.raises(ValueError, match="metrics has a field 'secret'"):
        encode(
            "updates",
            {"round": 1, "items": [{**UPDATE, "metrics": {"secret": 1.0}}]},
            [torch.zeros(1, 3)],
        )
    assert messages.printable("bad\x00\nthing \u00e9" + "x" * 500).isascii()
    assert len(messages.printable("x" * 500)) == messages.MAX_REASON_CHARS


# What rank 0 accepts from a worker ----------------------------------------------------


def ledger() -> _Ledger:
    return _Ledger(1, 3, [[7, 8], [9]])


def report(kind: str, client: int | None = None) -> dict:
    return {"t": kind} if client is None else {"t": kind, "client": client}


def test_the_assigned_clients_each_once_chunk_by_chunk_then_busy_are_accepted():
    book = ledger()
    assert book.items_left == 3 + 2 + 1
    for item in [report("update", 8), report("failed", 7), report("end"), report("summed", 9)]:
        book.take(item)
    book.take(report("end"))
    book.take(report("busy"))
    assert book.done and book.items_left == 0


@pytest.mark.parametrize(
    ("items", "says"),
    [
        ([report("update", 4)], "a report of client 4 in round 3, a client rank 0 did not assign"),
        ([report("update", 7), report("update", 7)], "a second report of client 7 in round 3"),
        ([report("failed", 7), report("update", 7)], "a second report of client 7"),
        ([report("update", 9)], "client 9 in round 3 before the end of the chunk sent ahead"),
        (
            [report("update", 7), report("end")],
            "end of a chunk of round 3 without reporting client(s) 8",
        ),
        ([report("busy")], "its last report of round 3 with 2 chunk(s) not ended (clients 7, 8, 9"),
        (
            [
                report("update", 7),
                report("update", 8),
                report("end"),
                report("update", 9),
                report("end"),
                report("end"),
            ],
            "a report (end) after the end of its last chunk",
        ),
        (
            [
                report("update", 7),
                report("update", 8),
                report("end"),
                report("update", 9),
                report("end"),
                report("busy"),
                report("busy"),
            ],
            "a report (busy) after its last one of round 3",
        ),
    ],
)
def test_a_worker_reporting_other_clients_or_twice_is_one_line(items, says):
    book = ledger()
    with pytest.raises(MessageError) as info:
        for item in items:
            book.take(item)
    assert str(info.value).startswith("distributed: rank 1 sent ")
    assert says in str(info.value), str(info.value)


def inbox(known=40, counters=None) -> _Inbox:
    counters = counters if counters is not None else {"bn.num_batches_tracked": torch.tensor(3)}
    return _Inbox(ledger(), torch.zeros(10), counters, lambda client: known)


def test_a_report_gets_the_size_rank_0_knows_and_its_counters_shaped_as_the_model():
    box = inbox(known=40)
    kind, result = box._parse(1, {**UPDATE, "counters": [12]})
    assert kind == "update" and result.num_samples == 40 and result.metrics == UPDATE["metrics"]
    assert result.counters["bn.num_batches_tracked"].dtype == torch.int64
    assert int(result.counters["bn.num_batches_tracked"]) == 12
    unknown = inbox(known=None)  # another silo's client counted in tokens: taken as sent
    assert unknown._parse(1, {**UPDATE, "samples": 77, "counters": [1]})[1].num_samples == 77


@pytest.mark.parametrize(
    ("item", "says"),
    [
        (
            {**UPDATE, "samples": 4000, "counters": [1]},
            "client 3 with 4000 samples in round 3; its size known here is 40",
        ),
        ({**UPDATE, "counters": []}, "0 counter values for client 3; the model's max keys hold 1"),
        ({**UPDATE, "counters": [2**63]}, "counter bn.num_batches_tracked of client 3 out of"),
        ({**UPDATE, "counters": [1.5]}, "counter bn.num_batches_tracked of client 3 out of"),
    ],
)
def test_a_report_with_a_forged_size_or_counters_is_one_line(item, says):
    with pytest.raises(MessageError) as info:
        inbox(known=40)._parse(1, item)
    assert str(info.value).startswith("distributed: rank 1 sent ") and says in str(info.value)


class Weighted:
    def client_weight(self, client: ClientResult) -> float:
        return float(client.num_samples)


def summed_round(weights: list[float], flags: list[float], total: torch.Tensor) -> SummedRound:
    summed = SummedRound(Weighted(), torch.zeros(total.numel()), 1)
    summed.world = len(weights)
    summed.stats = torch.tensor([weights, flags], dtype=torch.float64)
    summed.total = total.to(torch.float64)
    return summed


def test_allreduce_sums_must_be_finite_and_weigh_what_rank_0_knows():
    finite = torch.ones(4)
    summed_round([10.0, 30.0, 5.0], [0.0, 0.0, 0.0], finite).check({1: 30.0, 2: 5.0}, 2)
    with pytest.raises(MessageError, match="^distributed: rank 2 sent a non-finite allreduce sum"):
        summed_round([10.0, 30.0, 5.0], [0.0, 0.0, 1.0], finite).check({1: 30.0, 2: 5.0}, 2)
    with pytest.raises(MessageError, match="rank 1 sent allreduce client weights adding up to 300"):
        summed_round([10.0, 300.0, 5.0], [0.0, 0.0, 0.0], finite).check({1: 30.0, 2: 5.0}, 2)
    with pytest.raises(MessageError, match="rank 1 sent allreduce client weights adding up to nan"):
        summed_round([10.0, float("nan"), 5.0], [0.0] * 3, finite).check({1: 30.0, 2: 5.0}, 2)
    nan = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(MessageError, match="^distributed: one of ranks 1, 2 sent a non-finite"):
        summed_round([10.0, 30.0, 5.0], [0.0, 0.0, 0.0], nan).check({1: 30.0, 2: 5.0}, 2)


@pytest.mark.parametrize(
    ("mine", "says"),
    [
        ({0: ([5, 4, 1], [[5], [4], [1]], 2)}, "rank 0 (silo 0) announced 3 clients; data.silos.0"),
        ({0: ([5, 4], [[2, 2], [4]], 2)}, "rank 0 (silo 0) sent client 0 of its silo a size 5 and"),
        ({0: ([5, -1], [[5], [-1]], 2)}, "client 1 of its silo a size -1"),
        ({0: ([5, 4], [[5], [4]], 0)}, "rank 0 (silo 0) announced 0 classes"),
    ],
)
def test_a_silo_announcing_sizes_unlike_its_config_or_histograms_is_one_line(
    one_rank_group,  # noqa: F811
    mine,
    says,
):
    with pytest.raises(DataError) as info:
        _exchange(mine, [{"num_clients": 2}], [0])
    assert str(info.value).startswith("distributed: ") and says in str(info.value)
    known = _exchange({0: ([5, 4], [[2, 3], [4]], 2)}, [{"num_clients": 2}], [0])
    assert known[0] == ([5, 4], [[2, 3], [4]], 2)


def test_a_task_field_the_schema_does_not_carry_is_not_sent_silently(monkeypatch):
    monkeypatch.setattr(distributed, "TASK_FIELDS", distributed.TASK_FIELDS[:-1])
    with pytest.raises(TypeError, match="ClientTask.initial_loss has no place"):
        _tasks_message([([ClientTask(0, initial_loss=True)], True)], 1, torch.zeros(3))
    _tasks_message([([ClientTask(0)], True)], 1, torch.zeros(3))  # at its default: fine


# The distributed keys outside torchrun (aggregation.collective=ring, distributed.timeout_s=0,
# distributed.silo without data.silos) are rows of tests/bad_inputs.py, checked there.


def test_the_timeout_on_the_command_line_falls_back_when_it_cannot_be_one():
    from fedtorch.engines.process_group import _timeout_from

    assert _timeout_from(["distributed.timeout_s=12"]) == 12.0
    for bad in ("0", "-3", "inf", "nan", "abc"):
        assert _timeout_from([f"distributed.timeout_s={bad}"]) == 1800.0


# Two real ranks ------------------------------------------------------------------------


class PickleSendingMLP(MLP):
    """The MLP; on rank 1, its first training step turns the rank into one that sends
    rank 0 a pickle (which, unpickled, would write the file ``$FEDTORCH_TEST_MARKER``)
    framed as a message, in place of its first batch of updates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and os.environ.get("RANK") == "1" and not getattr(self, "sent", 0):
            self.sent = 1
            data = pickled_payload(os.environ[MARKER_ENV])

            def send(kind, fields, payloads, dst):
                import torch.distributed as dist

                body = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                length = torch.tensor([body.numel()], dtype=torch.int64)
                return [(dist.isend(length, dst), length), (dist.isend(body, dst), body)]

            messages.send = send
        return super().forward(x)


class ForgingMLP(MLP):
    """The MLP; on rank 1, its first training step makes the rank report its first
    client twice in each batch of updates it sends."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and os.environ.get("RANK") == "1" and not getattr(self, "forged", 0):
            self.forged = 1
            honest = messages.send

            def send(kind, fields, payloads, dst):
                if kind == "updates":
                    items = fields["items"]
                    first = next(i for i in items if i["t"] in ("update", "failed"))
                    fields = {**fields, "items": [first, *items]}
                return honest(kind, fields, payloads, dst)

            messages.send = send
        return super().forward(x)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"^error: ", line)]


@pytest.mark.slow  # default-suite time (under 10 minutes on 2 cores); `make test-full`
def test_a_rank_sending_a_pickle_stops_the_run_and_nothing_runs(tmp_path, monkeypatch):
    marker = tmp_path / "written-by-unpickling"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    overrides = [*RUN, "model._target_=tests.test_distributed_trust.PickleSendingMLP"]
    done = fedtorch_run(2, [*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert lines and lines[0].startswith(
        "error: distributed: rank 1 sent a message that is not a fedtorch header (expected "
        "updates): b'\\x80"
    ), done.stderr[-3000:]
    assert "Error executing job" not in done.stderr  # no rank ended with a traceback
    assert not marker.exists()
    assert (
        not (tmp_path / "run" / "metrics.csv").exists()
        or len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) <= 1
    )


@pytest.mark.slow
def test_a_rank_reporting_a_client_twice_stops_the_run_with_one_line(tmp_path):
    overrides = [*RUN, "model._target_=tests.test_distributed_trust.ForgingMLP"]
    done = fedtorch_run(2, [*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert lines and re.match(
        r"error: distributed: rank 1 sent a second report of client \d+ in round 1$", lines[0]
    ), done.stderr[-3000:]
    assert "Error executing job" not in done.stderr
