"""The one error type of the query layer."""

from __future__ import annotations


class QueryError(ValueError):
    """A query that cannot run: empty or absurd input, an unknown coder or feature, a catalogue
    that lacks what the query needs. Always a one-line message meant for the user."""
