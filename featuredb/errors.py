"""Every error that means "your input is wrong" rather than "featuredb has a bug".

Each is a `FeaturedbError` with a one-line message meant for the user: the CLI prints it as
`error: ...` with exit status 1 and the server answers it with `status`. Exceptions from
libraries that mean bad input (a truncated safetensors file, a corrupt Lance fragment, a file
that is not UTF-8) are translated into one of these where they arise, so one `except
FeaturedbError` in featuredb.cli is the only error path. This module imports nothing heavy.
"""

from __future__ import annotations


class FeaturedbError(Exception):
    """Bad input or an unusable file, catalogue or setting; `status` is the HTTP status."""

    status = 400


class ModelError(FeaturedbError, ValueError):
    """The subject model cannot be loaded or was given bad input."""


class HookError(FeaturedbError, ValueError):
    """A hook name is malformed or names no module of the model."""


class CoderError(FeaturedbError, ValueError):
    """A coder spec, file or tensor is missing, malformed or unsupported."""


class EmbeddingError(FeaturedbError, ValueError):
    """The text-embedding model cannot be loaded or used."""


class CorpusError(FeaturedbError, ValueError):
    """A corpus file or dataset that cannot be read as documents."""


class IndexingError(FeaturedbError, ValueError):
    """A run that cannot start or finish (bad settings, empty corpus, mismatched checkpoint)."""


class StoreError(FeaturedbError, ValueError):
    """Bad input to the store, or a catalogue the store cannot use."""


class DescribeError(FeaturedbError, ValueError):
    """Bad describe options or an unusable catalogue."""


class LLMError(FeaturedbError, RuntimeError):
    """An LLM request that failed for good (not retryable, or out of retries)."""


class QueryError(FeaturedbError, ValueError):
    """A query that cannot run: empty or absurd input, a catalogue that lacks what it needs."""


class NotFound(QueryError):
    """An unknown coder, or a feature index the coder does not have."""

    status = 404


class TooLarge(QueryError):
    """Input over a size limit (e.g. text for the model)."""

    status = 413


def one_line(error: BaseException) -> str:
    """The error's message on one line of at most 300 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def os_error_text(error: OSError) -> str:
    """"No space left on device: /data/db" from an OSError (its strerror and filename where it has them)."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason}: {error.filename}" if error.filename else reason
