"""The bad-input table: each entry is a command-line mistake and the one line it gets.

Shared by ``tests/test_bad_input.py`` (which checks every entry) and the README table
(``python -m tests.bad_inputs`` prints it as Markdown). ``{data}`` stands for a folder of
MNIST-style IDX files prepared by the test, ``{tmp}`` for a scratch folder.
"""

from __future__ import annotations

# (what, overrides added to a small valid run, start of the error line after "error: ")
CASES: list[tuple[str, list[str], str]] = [
    (
        "unknown option of a group",
        ["strategy=fedfoo"],
        "strategy: no option 'fedfoo'; choose from bulyan, fedadagrad",
    ),
    (
        "unknown preset",
        ["+experiment=nope"],
        "experiment: no option 'nope'; choose from flowertune, fmnist_dirichlet",
    ),
    (
        "unknown top-level key",
        ["rounds_typo=3"],
        "rounds_typo: no such key (check the spelling; +rounds_typo=VALUE adds a new one)",
    ),
    ("unknown nested key", ["client.optimizer.lrr=0.1"], "client.optimizer.lrr: no such key"),
    (
        "a group's key under the group's name",
        ["dataset._target_=mypkg.load"],
        "dataset._target_: no such key: the dataset group's keys are under data. (set "
        "data._target_=VALUE",
    ),
    (
        "unparsable override",
        ["rounds=[1"],
        "override: cannot parse the command line: no viable alternative at input '[1'",
    ),
    ("wrong type", ["rounds=abc"], "rounds: must be an integer >= 1, got 'abc'"),
    ("zero rounds", ["rounds=0"], "rounds: must be an integer >= 1, got 0"),
    (
        "negative learning rate",
        ["client.optimizer.lr=-0.1"],
        "client.optimizer.lr: must be > 0, got -0.1",
    ),
    (
        "negative momentum",
        ["client.optimizer.momentum=-0.9"],
        "client.optimizer.momentum: must be >= 0, got -0.9",
    ),
    ("zero local epochs", ["client.epochs=0"], "client.epochs: must be an integer >= 1, got 0"),
    (
        "zero batch size",
        ["client.batch_size=0"],
        "client.batch_size: must be an integer >= 1, got 0",
    ),
    (
        "Dirichlet alpha <= 0",
        ["partition=dirichlet", "partition.alpha=0"],
        "partition.alpha: must be > 0, got 0",
    ),
    (
        "more clients than samples",
        ["num_clients=5000"],
        "num_clients: 5000 clients but only 2000 training samples",
    ),
    (
        "clients_per_round > num_clients",
        ["clients_per_round=9"],
        "clients_per_round: must be an integer in [1, num_clients=5], got 9",
    ),
    ("fraction out of range", ["fraction=1.5"], "fraction: must be in (0, 1], got 1.5"),
    (
        "shards that do not divide the data",
        ["partition=shards", "partition.shards_per_client=7"],
        "partition.shards_per_client:",
    ),
    (
        "more classes per client than exist",
        ["partition=label_skew", "partition.classes_per_client=11"],
        "partition.classes_per_client: must be in [1, 10], got 11",
    ),
    (
        "missing data files",
        ["dataset=mnist", "data.root={tmp}/nowhere", "data.download=false", "data.search_paths=[]"],
        "mnist: data files not found. Looked for train-images-idx3-ubyte[.gz]",
    ),
    (
        "truncated .gz data file",
        [
            "dataset=mnist",
            "data.root={data}/truncated",
            "data.download=false",
            "data.search_paths=[]",
        ],
        "{data}/truncated/train-images-idx3-ubyte.gz:",
    ),
    (
        "wrong IDX magic number",
        ["dataset=mnist", "data.root={data}/magic", "data.download=false", "data.search_paths=[]"],
        "{data}/magic/t10k-labels-idx1-ubyte: not an IDX file",
    ),
    (
        "model output size != class count",
        ["model._target_=tests.plugins.WrongOutputNet"],
        "model: outputs shape [2, 3] but the dataset synthetic (classification) needs "
        "[batch, 10] logits",
    ),
    (
        "plug-in that does not import",
        ["model._target_=nopkg.Net"],
        "model._target_: cannot import 'nopkg.Net': no module 'nopkg'",
    ),
    (
        "plug-in name missing in its module",
        ["model._target_=fedtorch.models.NoSuchNet"],
        "model._target_: module 'fedtorch.models' has no 'NoSuchNet'",
    ),
    (
        "unwritable output folder",
        ["hydra.run.dir=/dev/null/run"],
        "hydra.run.dir: cannot create the output folder /dev/null/run: /dev/null is a file",
    ),
    (
        "CUDA on a machine without it",
        ["device=cuda"],
        "device: cuda requested but CUDA is not available; use device=cpu",
    ),
    ("unknown device", ["device=tpu"], "device: must be cpu, cuda, cuda:N or auto, got 'tpu'"),
    (
        "unknown memory format",
        ["memory_format=nhwc"],
        "memory_format: must be auto, channels_last or contiguous, got 'nhwc'",
    ),
    (
        "target accuracy above 1",
        ["target_accuracy=1.5"],
        "target_accuracy: must be null or in (0, 1], got 1.5",
    ),
    (
        "invalid key_rules regex",
        ["key_rules=[{pattern: '(', rule: local}]"],
        "key_rules[0].pattern: invalid regex",
    ),
    (
        "unknown key rule",
        ["key_rules=[{pattern: x, rule: avg}]"],
        "key_rules[0].rule: must be one of ('mean', 'max', 'keep', 'local'), got 'avg'",
    ),
    (
        "robust rule with too few clients",
        ["strategy=bulyan"],
        "strategy.num_byzantine: Bulyan with these settings needs at least 7 clients per round",
    ),
    (
        "FedNova with a non-SGD optimizer",
        ["strategy=fednova", "client=adam"],
        "client.optimizer: FedNova's normaliser assumes SGD, got Adam",
    ),
    (
        "server learning rate 0",
        ["strategy=fedadam", "strategy.server_lr=0"],
        "strategy.server_lr: must be > 0.0, got 0",
    ),
    (
        "vectorized engine with BatchNorm",
        ["engine=vectorized", "model._target_=tests.test_training.BNNet"],
        "engine: engine=vectorized cannot train",
    ),
    (
        "drop-out probability 1",
        ["system.dropout=1.0"],
        "system.dropout: must be in [0, 1), got 1.0",
    ),
    (
        "malicious fraction above 1",
        ["attack=sign_flip", "attack.fraction=2"],
        "attack.fraction: must be in [0, 1], got 2",
    ),
    (
        "unknown client-failure policy",
        ["on_client_failure=ignore"],
        "on_client_failure: must be drop or raise, got 'ignore'",
    ),
    (
        "infinite learning rate",
        ["client.optimizer.lr=inf"],
        "client.optimizer.lr: must be a finite number, got inf",
    ),
    (
        "NaN hyperparameter",
        ["strategy=fedprox", "client.prox_mu=nan"],
        "client.prox_mu: must be a finite number, got nan",
    ),
    (
        "key rule that matches no key",
        ["key_rules=[{pattern: '^fc9', rule: local}]"],
        "key_rules[0].pattern: '^fc9' matches no key of the model",
    ),
    (
        "FedBN on a model without BatchNorm",
        ["strategy=fedbn"],
        "key_rules[0].pattern: '@batchnorm' matches no key of the model",
    ),
    (
        "compression fraction outside (0, 1]",
        ["compression=topk", "compression.fraction=1.5"],
        "compression.fraction: must be in (0, 1], got 1.5",
    ),
    (
        "QSGD with fewer than one level",
        ["compression=qsgd", "compression.levels=0"],
        "compression.levels: must be an integer >= 1, got 0",
    ),
    (
        "error feedback with nothing to feed back",
        ["compression.error_feedback=true"],
        "compression.error_feedback: compression=none sends updates exactly, so there is no",
    ),
    (
        "sparsifier under secure aggregation",
        [
            "compression=topk",
            "secure_aggregation.enabled=true",
            "secure_aggregation.value_range=1.0",
        ],
        "compression: compression=topk cannot run under secure aggregation",
    ),
    (
        "sparse downlink",
        ["compression=topk", "compression.downlink=topk"],
        "compression.downlink: must be one of none, fp16, bf16, int8, got 'topk'",
    ),
    (
        "negative checkpoint interval",
        ["checkpoint.every=-1"],
        "checkpoint.every: must be an integer >= 0, got -1",
    ),
    (
        "resume from a missing folder",
        ["resume={tmp}/gone"],
        "resume: {tmp}/gone is neither a run folder nor a checkpoint file",
    ),
    (
        "resume where no checkpoint exists",
        ["resume={tmp}"],
        "resume: no checkpoint in {tmp}/checkpoints",
    ),
    (
        "resume from a file that is not a run's checkpoint",
        ["resume={data}/magic/t10k-labels-idx1-ubyte"],
        "resume: {data}/magic/t10k-labels-idx1-ubyte is not a checkpoint of a run",
    ),
    (
        "collective not gather or allreduce",
        ["aggregation.collective=ring"],
        "aggregation.collective: must be gather or allreduce, got 'ring'",
    ),
    (
        "distributed timeout of 0",
        ["distributed.timeout_s=0"],
        "distributed.timeout_s: must be a number > 0, got 0",
    ),
    (
        "a silo without data.silos",
        ["distributed.silo=0"],
        "distributed.silo: is 0, but data.silos is not set: it names this process's silo of "
        "data.silos; leave it null",
    ),
    (
        "secure mode that is not a boolean",
        ["privacy=dp_central", "privacy.secure_mode=maybe"],
        "privacy.secure_mode: must be true, false or null, got 'maybe'",
    ),
    (
        "fixed cohorts with the PRV accountant",
        ["privacy=dp_central", "privacy.sampling=fixed", "privacy.accountant=prv"],
        "privacy.accountant: fixed-size cohorts are accounted with the RDP bound",
    ),
]


# How the text cases' fixture placeholders read in the README.
TEXT_FIXTURES = {
    "{rows}": "rows.jsonl",
    "{empty}": "empty.jsonl",
    "{no_pad}": "/models/nopad",
    "{one_label}": "one_label.jsonl",
    "{chat}": "chat.jsonl",
    "{long}": "long.jsonl",
    "{alpaca}": "alpaca.jsonl",
}


def markdown() -> str:
    """The README table: these cases, then dataset=text's (``tests/text_bad_inputs.py``)."""
    from tests.text_bad_inputs import CASES as TEXT_CASES

    lines = ["| bad input | command-line example | message (`error: ...`) |", "|---|---|---|"]
    rows = [(what, " ".join(overrides), message) for what, overrides, message in CASES]
    for what, overrides, message in TEXT_CASES:
        example = "dataset=text ... " + " ".join(overrides)
        for placeholder, shown in TEXT_FIXTURES.items():
            example, message = (
                example.replace(placeholder, shown),
                message.replace(placeholder, shown),
            )
        rows.append((what, example, message))
    for what, example, message in rows:
        lines.append(f"| {what} | `{example.replace('|', chr(92) + '|')}` | `{message}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
