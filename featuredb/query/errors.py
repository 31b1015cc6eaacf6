"""The error types of the query layer; `status` is the HTTP status the server answers with."""

from __future__ import annotations


class QueryError(ValueError):
    """A query that cannot run: empty or absurd input, a catalogue that lacks what the query
    needs. Always a one-line message meant for the user."""

    status = 400


class NotFound(QueryError):
    """An unknown coder, or a feature index the coder does not have."""

    status = 404


class TooLarge(QueryError):
    """Input over a size limit (e.g. text for the model)."""

    status = 413
