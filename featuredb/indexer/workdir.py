"""The indexer's working directory: the token ids of every indexed context, and checkpoints.

Contexts are appended to flat binary files as they are indexed, so example rows can be rebuilt at
the end from context indices alone (the statistics keep only indices and per-token values).
A checkpoint is a directory of safetensors (one per coder) plus `progress.json`; it is written
beside the live one and swapped in with renames, so a kill at any moment leaves a usable one. A
write that fails (a full disk, a read-only directory) is an IndexingError saying what and where;
the last checkpoint stays the one to resume.

Layout: a single-process run keeps its context store and `checkpoint/` in the work dir itself; in
a distributed run each rank keeps its own in `rank-{r}-of-{world}/` (see `rank_dir`), so every
rank resumes from its own checkpoint and a work dir records the world size it was made with.

Leftovers: a run that fails (bad input found on the way, a full disk, Ctrl-C) leaves its work dir
only when it holds a checkpoint, which --resume continues from. A work dir the run created that
holds none is removed (`removed_unless_resumable`): --resume could only start over from it. A
killed run (kill -9, a lost node) leaves its work dir as it was, checkpoint or not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from featuredb.errors import IndexingError
from featuredb.store.failures import writing

PAD = -1  # token id stored for padding positions
_RANK_DIR = re.compile(r"^rank-(\d+)-of-(\d+)$")


@dataclass
class Progress:
    """Where a run (or one rank of it) stands. The corpus is one stream of windows cut into batches
    of `batch_size`; `stream_*` count that whole stream, which every rank reads, so a window's
    global context index and the --tokens budget are the same as in a single-process run."""

    fingerprint: str
    contexts: int = 0  # contexts this run (rank) indexed and stored
    docs_started: int = 0  # documents in this context store's doc list
    last_doc: int = -1  # ordinal of the last document in that list
    next_doc: int = 0  # resume reading at this document ...
    next_window: int = 0  # ... and this window of it
    tokens_counted: int = 0  # tokens this run (rank) indexed
    stream_contexts: int = 0  # windows of the stream read so far (= next global context index)
    stream_tokens: int = 0  # counted tokens of those windows (the --tokens budget counts these)
    stream_batches: int = 0  # batches of the stream read so far (batch b: member b % members of each group)
    finished: bool = False
    coder_groups: int = 1  # the run's --coder-groups: a rank's checkpoint holds only its group's coders
    replace: bool = False  # the run was started with --replace: its resumption may replace coders too
    started_at: float = 0.0  # epoch seconds: coders written since are this run's own (resuming its writes)
    pass_index: int = 0  # the pass of the plan this checkpoint belongs to (earlier passes are written)
    plan: list = field(default_factory=list)  # per pass: {"coders": [ids], "groups": [group per coder]}
    budget_bytes: int = 0  # the budget the plan was made for, and how it was set
    budget_note: str = ""


def rank_dir(work_dir: Path, rank: int, world: int) -> Path:
    """Where one rank keeps its context store and checkpoints (the work dir itself when alone)."""
    return work_dir if world == 1 else work_dir / f"rank-{rank}-of-{world}"


def saved_world_sizes(work_dir: Path) -> set[int]:
    """World sizes of the runs that left checkpoints in `work_dir` (1: a single-process run)."""
    sizes = {1} if (work_dir / "checkpoint").is_dir() or (work_dir / "checkpoint.old").is_dir() else set()
    if work_dir.is_dir():
        sizes |= {int(m.group(2)) for m in map(_RANK_DIR.match, os.listdir(work_dir)) if m}
    return sizes


def saved_coder_groups(work_dir: Path) -> set[int]:
    """--coder-groups of the distributed runs whose ranks left checkpoints in `work_dir`."""
    if not work_dir.is_dir():
        return set()
    groups = set()
    for name in os.listdir(work_dir):
        if _RANK_DIR.match(name):
            saved = Checkpoints(work_dir / name).load_progress()
            if saved is not None:
                groups.add(saved.coder_groups)
    return groups


def holds_checkpoint(work_dir: Path) -> bool:
    """Whether any run (or any rank of one) left a checkpoint to resume in `work_dir`."""
    if Checkpoints(work_dir).load_progress() is not None:
        return True
    ranks = [name for name in os.listdir(work_dir) if _RANK_DIR.match(name)] if work_dir.is_dir() else []
    return any(Checkpoints(work_dir / name).load_progress() is not None for name in ranks)


@contextmanager
def removed_unless_resumable(work_dir: Path, own_dir: Path) -> Iterator[None]:
    """Run the body; if it fails, remove this rank's part of a work dir the run created when no
    checkpoint was saved there (and the work dir itself once empty: other ranks' parts stay)."""
    created = not work_dir.exists()
    try:
        yield
    except BaseException:
        if created and not holds_checkpoint(work_dir):
            shutil.rmtree(own_dir, ignore_errors=True)
            with suppress(OSError):
                work_dir.rmdir()  # only if empty
        raise


class ContextStore:
    """Append-only store of context token ids ([n, context] int32, PAD-padded), their global
    context indices (increasing; a rank of a distributed run holds every world-th batch) and
    their documents. Lookups take global context indices."""

    def __init__(self, directory: Path, context: int):
        self.directory, self.context = directory, context
        self.tokens_path = directory / "context_tokens.bin"
        self.index_path = directory / "context_index.bin"
        self.docs_path = directory / "context_docs.bin"
        self.doc_ids_path = directory / "doc_ids.jsonl"
        with self.writing():
            directory.mkdir(parents=True, exist_ok=True)
            for path in (self.tokens_path, self.index_path, self.docs_path, self.doc_ids_path):
                path.touch()
        self._doc_ids: list[str] | None = None

    def writing(self) -> AbstractContextManager[None]:
        return writing("the indexed contexts", self.directory, IndexingError)

    def append(self, token_ids: np.ndarray, context_index: np.ndarray, doc_index: np.ndarray,
               new_doc_ids: list[str]) -> None:
        assert token_ids.shape[1] == self.context and len(token_ids) == len(context_index) == len(doc_index)
        with self.writing():  # a partial append is cut off again when the run resumes (truncate)
            for path, array, dtype in ((self.tokens_path, token_ids, np.int32),
                                       (self.index_path, context_index, np.int64), (self.docs_path, doc_index, np.int64)):
                with path.open("ab") as f:
                    f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
            if new_doc_ids:
                with self.doc_ids_path.open("a", encoding="utf-8") as f:
                    f.writelines(json.dumps(d) + "\n" for d in new_doc_ids)
        self._doc_ids = None

    def truncate(self, contexts: int, docs: int) -> None:
        """Drop whatever was appended after the checkpoint we resume from."""
        with self.writing():
            _truncate(self.tokens_path, contexts * self.context * 4)
            _truncate(self.index_path, contexts * 8)
            _truncate(self.docs_path, contexts * 8)
            lines = self.doc_ids_path.read_text(encoding="utf-8").splitlines(keepends=True)[:docs]
            self.doc_ids_path.write_text("".join(lines), encoding="utf-8")
        self._doc_ids = None

    def __len__(self) -> int:
        return self.tokens_path.stat().st_size // (4 * self.context)

    def context_indices(self) -> np.ndarray:
        """Global context index of every stored row, increasing."""
        return np.fromfile(self.index_path, dtype=np.int64)

    def tokens(self, contexts: np.ndarray) -> np.ndarray:
        data = np.memmap(self.tokens_path, dtype=np.int32, mode="r").reshape(-1, self.context)
        return np.asarray(data[_rows(self.context_indices(), contexts)])

    def doc_ids(self, contexts: np.ndarray) -> list[str]:
        if self._doc_ids is None:
            with self.doc_ids_path.open(encoding="utf-8") as f:
                self._doc_ids = [json.loads(line) for line in f]
        doc_index = np.fromfile(self.docs_path, dtype=np.int64)[_rows(self.context_indices(), contexts)]
        return [self._doc_ids[i] for i in doc_index]


class LoadedContexts:
    """Some contexts in memory (gathered from the ranks of a distributed run), read like a ContextStore."""

    def __init__(self, context_index: np.ndarray, token_ids: np.ndarray, doc_ids: list[str]):
        order = np.argsort(context_index, kind="stable")
        self._index, self._tokens = context_index[order], token_ids[order]
        self._doc_ids = [doc_ids[i] for i in order]

    def tokens(self, contexts: np.ndarray) -> np.ndarray:
        return self._tokens[_rows(self._index, contexts)]

    def doc_ids(self, contexts: np.ndarray) -> list[str]:
        return [self._doc_ids[i] for i in _rows(self._index, contexts)]


def _rows(stored: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """Positions of global context indices `contexts` in the sorted `stored`; KeyError if one is missing."""
    contexts = np.asarray(contexts, dtype=np.int64)
    rows = np.searchsorted(stored, contexts).clip(max=max(len(stored) - 1, 0))
    if len(contexts) and (len(stored) == 0 or not np.array_equal(stored[rows], contexts)):
        raise KeyError("asked for a context that was not stored")
    return rows


def _truncate(path: Path, size: int) -> None:
    if path.stat().st_size < size:
        raise IndexingError(f"{path} is shorter than its checkpoint says; start over without --resume")
    with path.open("r+b") as f:
        f.truncate(size)


SAMPLE_FILE = "cooccurrence.safetensors"


class Checkpoints:
    def __init__(self, directory: Path):
        self.directory = directory
        self.live = directory / "checkpoint"
        self.staging = directory / "checkpoint.tmp"
        self.previous = directory / "checkpoint.old"

    def save(self, progress: Progress, states: list[dict], sample: dict | None = None) -> None:
        """Stage the new checkpoint (each coder's statistics, and the co-occurrence token sample), then
        swap it in; a failure while staging keeps the live one."""
        with writing("a checkpoint", self.directory, IndexingError):
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            for i, state in enumerate(states):
                save_file(state, str(self.staging / f"coder_{i}.safetensors"))
            if sample is not None:
                save_file(sample, str(self.staging / SAMPLE_FILE))
            (self.staging / "progress.json").write_text(json.dumps(asdict(progress)))
            _fsync_dir(self.staging)
            shutil.rmtree(self.previous, ignore_errors=True)
            if self.live.exists():
                os.replace(self.live, self.previous)
            os.replace(self.staging, self.live)
            shutil.rmtree(self.previous, ignore_errors=True)

    def load(self) -> tuple[Progress, list[dict], dict | None] | None:
        """The saved progress, coder statistics and co-occurrence sample (None if not saved)."""
        candidate = self._saved()
        if candidate is None:
            return None
        states = []
        i = 0
        while (candidate / f"coder_{i}.safetensors").exists():
            states.append(load_file(str(candidate / f"coder_{i}.safetensors")))
            i += 1
        sample = load_file(str(candidate / SAMPLE_FILE)) if (candidate / SAMPLE_FILE).exists() else None
        return _read_progress(candidate), states, sample

    def load_progress(self) -> Progress | None:
        """The saved progress alone (no statistics read)."""
        candidate = self._saved()
        return None if candidate is None else _read_progress(candidate)

    def _saved(self) -> Path | None:
        # a kill between the two renames in save() leaves only the previous checkpoint
        for candidate in (self.live, self.previous):
            if (candidate / "progress.json").exists():
                return candidate
        return None


def _read_progress(checkpoint: Path) -> Progress:
    return Progress(**json.loads((checkpoint / "progress.json").read_text()))


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
