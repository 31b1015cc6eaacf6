"""Terminal output never passes a control character from stored data to the terminal."""

from __future__ import annotations

import unicodedata

import click
import pytest
from catalogue_fixtures import known_catalogue  # noqa: F401  (a fixture)

import featuredb
from featuredb.query.render import context, dashboard, format_cell, printable

HOSTILE = "bell\x07 esc\x1b[2J cr\r nul\x00 del\x7f bidi\u202e zw\u200b"


def control_characters(text: str) -> list[str]:
    """Characters a terminal acts on (C0/C1 controls, DEL) or that reorder what it shows (format)."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c != "\n"]


@pytest.mark.parametrize("text", [HOSTILE, "\x07", "\x9b31m", "a\u2028b", "\U000e0001"])
def test_printable_escapes_every_control_character(text):
    shown = printable(text)
    assert control_characters(shown) == [] and "\n" not in shown
    assert printable("naïve café 東京 ' \" \\") == "naïve café 東京 ' \" \\"  # ordinary text is untouched


def test_escapes_are_distinct():
    assert len({printable(chr(c)) for c in range(0x20)}) == 0x20


def test_show_renders_stored_control_characters_visibly(known_catalogue):
    feature = featuredb.open(known_catalogue).feature("res-L12", 3)
    feature["description"] = "a feature \x07 that rings"
    feature["model"] = "evil\x1b]0;title\x07"
    for example in feature["top_examples"]:
        example["tokens"] = [HOSTILE] * len(example["tokens"])
    shown = click.unstyle(dashboard(feature))  # click's own colour codes are dropped off a terminal
    assert control_characters(shown) == []
    assert "\\x07" in shown and "\\u202e" in shown and "\\x1b]0;title" in shown
    assert format_cell("x\x07y") == "x\\x07y"
    assert control_characters(click.unstyle(context([HOSTILE, "b"], [1.0, 0.0], 0))) == []
