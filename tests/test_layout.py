"""The package's layout: rooms form layers, no room imports one above it, no import cycle.

The floors are the ones the README's Layout section lists; each package's ``__init__``
docstring says what it may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedtorch

PACKAGE = Path(fedtorch.__file__).parent

# Floor of each room (a folder, or a module at the top); a room imports only rooms on a
# lower floor, or on its own floor without a cycle.
FLOORS = {
    "errors": 0,
    "seeding": 0,
    "results": 0,
    "state": 0,
    "data": 1,
    "models": 1,
    "logging": 1,
    "strategies": 2,
    "pipeline": 3,
    "compression": 4,
    "privacy": 4,
    "client": 5,
    "engines": 6,
    "server": 7,
    "config": 8,
    "train": 9,
    "report": 9,
    "launch": 9,
}


def _room(module: str) -> str:
    """``fedtorch.server.orchestrator`` -> ``server``."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """Every room's imported rooms, from every import statement (function-level too)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts)
        if module == "fedtorch.__init__":
            continue
        room = _room(module)
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "fedtorch":
                    targets = [f"fedtorch.{alias.name}" for alias in node.names]
                else:
                    targets = [node.module]
            for target in targets:
                if target.startswith("fedtorch.") and _room(target) != room:
                    out.setdefault(room, set()).add(_room(target))
    return out


def test_no_loose_module_but_entry_points_and_leaves() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert loose == {"train", "report", "launch", "errors", "seeding", "results"}
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} - {"configs"}
    assert rooms | loose == set(FLOORS)


def test_no_room_imports_a_higher_one() -> None:
    upward = [
        f"{room} (floor {FLOORS[room]}) imports {target} (floor {FLOORS[target]})"
        for room, targets in _imports().items()
        for target in targets
        if FLOORS[target] > FLOORS[room]
    ]
    assert not upward, upward


def test_no_import_cycle_between_rooms() -> None:
    graph = _imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [room for room in graph if reaches(room, room, {room})]
    assert not cycles, cycles


def test_every_room_says_what_it_may_import() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init.parent.name}/__init__.py's docstring"


def test_a_checkpoint_written_before_the_regrouping_still_resumes() -> None:
    from fedtorch.server.checkpoint import config_differences

    before = {
        "client._target_": "fedtorch.client.ClientTrainer",
        "logger._target_": "fedtorch.metrics.MetricsLogger",
        "attack._target_": "fedtorch.attacks.Attack",
        "adapter._target_": "fedtorch.adapters.LoRA",
    }
    now = {
        "client._target_": "fedtorch.client.trainer.ClientTrainer",
        "logger._target_": "fedtorch.logging.metrics.MetricsLogger",
        "attack._target_": "fedtorch.client.attacks.Attack",
        "adapter._target_": "fedtorch.models.adapters.LoRA",
    }
    assert config_differences(before, now) == []
    # Keys added since: a checkpoint without them resumes while they keep their neutral value.
    added = {
        "client.lr_schedule": "constant",
        "privacy.secure_mode": None,
        "secure_aggregation.graph": "sparse",
    }
    assert config_differences(before, {**now, **added}) == []
    other = {**now, "client._target_": "fedtorch.client.dpsgd.DPSGDTrainer"}
    assert config_differences(before, other) == [
        "client._target_ ('fedtorch.client.trainer.ClientTrainer' -> "
        "'fedtorch.client.dpsgd.DPSGDTrainer')"
    ]
