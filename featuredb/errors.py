"""Errors caused by input are shown as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations

import functools
import sys

import click


def user_errors() -> tuple[type[Exception], ...]:
    """Every error class that means "your input is wrong" rather than "featuredb has a bug"."""
    from .embedding import EmbeddingError
    from .indexer.coders import CoderError
    from .indexer.corpus import CorpusError
    from .indexer.describe import DescribeError, LLMError
    from .indexer.hooks import HookError
    from .indexer.model import ModelError
    from .indexer.run import IndexingError
    from .query.errors import QueryError
    from .store import StoreError

    return (CoderError, CorpusError, HookError, ModelError, IndexingError, StoreError, EmbeddingError,
            DescribeError, LLMError, QueryError)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class OneLineCommand(click.Command):
    """A click command whose usage errors are one line on stderr with exit status 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            click.echo(f"error: {one_line(Exception(e.format_message()))}", err=True)
            sys.exit(1)


def one_line_errors(callback=None, *, interrupted: str = "interrupted"):
    """Decorate a click command's callback: input errors -> `error: ...` on stderr, exit 1."""
    if callback is None:
        return functools.partial(one_line_errors, interrupted=interrupted)

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except user_errors() as e:
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(interrupted, err=True)
            sys.exit(130)

    return wrapper
