"""The one error type of the query layer."""

from __future__ import annotations

from ..errors import one_line  # noqa: F401 (re-exported for the query modules)


class QueryError(ValueError):
    """A query that cannot run: empty or absurd input, an unknown coder or feature, a catalogue
    that lacks what the query needs. Always a one-line message meant for the user."""
