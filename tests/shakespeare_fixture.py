"""Tiny play texts in the two layouts ``dataset=shakespeare`` reads, written by the tests."""

from __future__ import annotations

from pathlib import Path

# Per-play layout (Project Gutenberg's per-play files): name alone on a line after a blank
# line, speech to the next blank line. Exercises the dramatis personae (skipped), headings,
# stage directions (alone and inline), a joint speaker, a speakerless paragraph after a
# stage direction and a verse line that looks like a name but is not one.
PLAY = """THE TRAGEDY OF TESTING

by William Shakespeare

PERSONS REPRESENTED.

Bernardo, an officer.
Francisco, a soldier.

SCENE. A platform.


ACT I.

Scene I. A platform.

[Enter Bernardo and
Francisco, severally.]

Ber.
Who's there?
Stand, and unfold yourself.

FRAN.
Nay, answer me. [Aside.] Long live the king!
Bernardo?

Ber.
He.

[Exit Francisco.]

Come hither, sir.
These lines follow a stage direction and have no speaker.

BOTH.
We speak as one.
And still as one.
And again.

ACT II.

SCENE I. Another room.

Fran.
You come most carefully upon your hour.
'Tis now struck twelve; get thee to bed.
For this relief much thanks.

Ber.
Have you had quiet guard?
Not a mouse stirring.
Well, good night.
"""

SECOND_PLAY = """A SHORT PLAY

INDUCTION.

LORD.
O monstrous beast, how like a swine he lies!
Grim death, how foul and loathsome is thine image!
Sirs, I will practise on this drunken man.

HUNTSMAN.
Believe me, lord, I think he cannot choose.
It would seem strange unto him when he wak'd.
"""

# The one-file complete works (LEAF's source): "  Name. text" starts a speech, lines
# indented four spaces continue it.
COMPLETE_WORKS = """THE COMPLETE WORKS

1600

THE TRAGEDY OF TESTING

by William Shakespeare

ACT I. SCENE I.
A platform.

Enter two officers.

  Ber. Who's there?
  Fran. Nay, answer me. Stand and unfold yourself.
    Long live the King!
  Ber. He.
  Fran. For this relief much thanks.
    'Tis bitter cold.
                                                     Exit.

1601

A SHORT PLAY

by William Shakespeare

  Lord. O monstrous beast!
    How like a swine he lies!
  Lord. Grim death.
"""


def write_plays(folder: Path) -> Path:
    """Write the two per-play fixtures (and a poem and a Folio copy, both to be skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "testing_gut.txt").write_text(PLAY)
    (folder / "short_gut.txt").write_text(SECOND_PLAY)
    (folder / "testing_gut_f.txt").write_text(PLAY)
    (folder / "sonnets_gut.txt").write_text("SONNETS\n\nACT I.\n\nPOET.\nA line.\nAnother.\n")
    return folder


def fixture_run(
    root: Path, defaults: dict[str, list[str]], extra=(), clients_per_round: int = 3
) -> list[str]:
    """Overrides of a small 2-round run on the fixture plays in ``root``.

    ``defaults`` maps a group (``model``, ``adapter``) to the overrides used unless
    ``extra`` picks an option of that group itself (``model=mlp``).
    """
    chosen: list[str] = []
    for group, default in defaults.items():
        chosen += [o for o in extra if o.startswith(group + "=")] or default
    rest = [o for o in extra if not o.startswith(tuple(g + "=" for g in defaults))]
    return [
        "dataset=shakespeare",
        f"data.root={root}",
        "data.sequence_length=16",
        "data.train_fraction=0.5",
        *chosen,
        "partition=natural",
        "rounds=2",
        f"clients_per_round={clients_per_round}",
        "client.batch_size=2",
        "client.optimizer.lr=0.5",
        "device=cpu",
        "logger=quiet",
        *rest,
    ]
