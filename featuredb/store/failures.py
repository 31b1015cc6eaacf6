"""Failures of the environment, not of featuredb: a full disk, a read-only directory, an object
store that cannot be reached. Each becomes one error that says what could not be done where, and
a write of several commits that fails is undone.

LanceDB reports I/O failures as a RuntimeError (or ValueError) wrapping Rust's error, e.g.
`lance error: LanceError(IO): No space left on device (os error 28), /root/.cargo/.../writer.rs:191:9`,
safetensors as a SafetensorError (`Error while serializing: I/O error: ... (os error 28)`), Python
as an OSError. `reason` keeps the part a user can act on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from featuredb.errors import FeaturedbError, StoreError, os_error_text

_WRAPPED_ERROR = re.compile(r"(?:LanceError\(\w+\)|I/O error): (.*)")
_RUST_SOURCE = re.compile(r",? /\S+\.rs:\d+:\d+")
_OS_ERROR = re.compile(r"\(os error \d+\)")
# What the object store's nested error structs mean, by a phrase inside them.
_OBJECT_STORE_REASONS = (
    ("Failed to get AWS credentials", "no AWS credentials found"),
    ("Failed to resolve region", "cannot tell the bucket's region"),
    ("Connection refused", "the endpoint refused the connection"),
    ("dns error", "the endpoint's host name does not resolve"),
)
MAX_REASON_CHARS = 200


def reason(error: BaseException) -> str:
    """What went wrong, on one short line, without Rust source locations or debug structs."""
    if isinstance(error, OSError) and error.strerror:
        return os_error_text(error)
    text = " ".join(str(error).split()) or type(error).__name__
    for phrase, meaning in _OBJECT_STORE_REASONS:
        if phrase in text:
            return meaning
    wrapped = _WRAPPED_ERROR.search(text)
    text = _RUST_SOURCE.sub("", wrapped.group(1) if wrapped else text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def is_io_failure(error: BaseException) -> bool:
    """An OSError, or a library's error wrapping one (and not one of featuredb's own errors)."""
    if isinstance(error, OSError):
        return True
    if isinstance(error, FeaturedbError):
        return False
    text = str(error)
    return "LanceError(IO)" in text or bool(_OS_ERROR.search(text))


@contextmanager
def writing(what: str, where: object, error: type[FeaturedbError] = StoreError) -> Iterator[None]:
    """An I/O failure inside the block becomes `error`: "could not write {what} to {where}: ..."."""
    try:
        yield
    except Exception as e:
        if not is_io_failure(e):
            raise
        raise error(f"could not write {what} to {where}: {reason(e)}") from e


class Commits:
    """The commits one write has made so far, to undo them if a later one fails."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, int]] = []  # (LanceDB table, its version before the commit)

    def commit(self, table: Any, change: Callable[..., object], *args: object) -> None:
        """`change(table, *args)`, one commit to `table`."""
        version = table.version
        change(table, *args)
        if table.version != version:  # a delete that matched nothing makes no commit
            self.made.append((table, version))

    def undo(self) -> None:
        for table, version in reversed(self.made):
            table.restore(version)


@contextmanager
def all_or_nothing(what: str, where: object) -> Iterator[Commits]:
    """A write of several commits (`commits.commit(table, change)`): if the block fails, the commits
    made are undone, and an I/O failure becomes a StoreError saying what could not be written where."""
    commits = Commits()
    try:
        with writing(what, where):
            yield commits
    except Exception as error:
        # Only on a completed failure: after e.g. KeyboardInterrupt LanceDB's background task may
        # still commit, so that case is left like a crash (writing again repairs it).
        try:
            commits.undo()
        except Exception as undo_error:
            error.add_note(f"featuredb: undoing the commits of {what} failed: {undo_error}")
        raise
