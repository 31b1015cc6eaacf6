"""The indexer's working directory: the token ids of every indexed context, and checkpoints.

Contexts are appended to flat binary files as they are indexed, so example rows can be rebuilt at
the end from context indices alone (the statistics keep only indices and per-token values).
A checkpoint is a directory of safetensors (one per coder) plus `progress.json`; it is written
beside the live one and swapped in with renames, so a kill at any moment leaves a usable one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

PAD = -1  # token id stored for padding positions


@dataclass
class Progress:
    fingerprint: str
    contexts: int = 0  # contexts indexed so far (= next global context index)
    docs_started: int = 0  # documents with at least one indexed window
    next_doc: int = 0  # resume reading at this document ...
    next_window: int = 0  # ... and this window of it
    tokens_counted: int = 0
    finished: bool = False


class ContextStore:
    """Append-only store of context token ids ([n, context] int32, PAD-padded) and their documents."""

    def __init__(self, directory: Path, context: int):
        self.directory, self.context = directory, context
        directory.mkdir(parents=True, exist_ok=True)
        self.tokens_path = directory / "context_tokens.bin"
        self.docs_path = directory / "context_docs.bin"
        self.doc_ids_path = directory / "doc_ids.jsonl"
        for path in (self.tokens_path, self.docs_path, self.doc_ids_path):
            path.touch()
        self._doc_ids: list[str] | None = None

    def append(self, token_ids: np.ndarray, doc_index: np.ndarray, new_doc_ids: list[str]) -> None:
        assert token_ids.shape[1] == self.context
        with self.tokens_path.open("ab") as f:
            f.write(np.ascontiguousarray(token_ids, dtype=np.int32).tobytes())
        with self.docs_path.open("ab") as f:
            f.write(np.ascontiguousarray(doc_index, dtype=np.int64).tobytes())
        if new_doc_ids:
            with self.doc_ids_path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(d) + "\n" for d in new_doc_ids)
        self._doc_ids = None

    def truncate(self, contexts: int, docs: int) -> None:
        """Drop whatever was appended after the checkpoint we resume from."""
        _truncate(self.tokens_path, contexts * self.context * 4)
        _truncate(self.docs_path, contexts * 8)
        lines = self.doc_ids_path.read_text(encoding="utf-8").splitlines(keepends=True)[:docs]
        self.doc_ids_path.write_text("".join(lines), encoding="utf-8")
        self._doc_ids = None

    def __len__(self) -> int:
        return self.tokens_path.stat().st_size // (4 * self.context)

    def tokens(self, contexts: np.ndarray) -> np.ndarray:
        data = np.memmap(self.tokens_path, dtype=np.int32, mode="r").reshape(-1, self.context)
        return np.asarray(data[contexts])

    def doc_ids(self, contexts: np.ndarray) -> list[str]:
        if self._doc_ids is None:
            with self.doc_ids_path.open(encoding="utf-8") as f:
                self._doc_ids = [json.loads(line) for line in f]
        doc_index = np.fromfile(self.docs_path, dtype=np.int64)[contexts]
        return [self._doc_ids[i] for i in doc_index]


def _truncate(path: Path, size: int) -> None:
    if path.stat().st_size < size:
        raise RuntimeError(f"{path} is shorter than its checkpoint says; start over without --resume")
    with path.open("r+b") as f:
        f.truncate(size)


class Checkpoints:
    def __init__(self, directory: Path):
        self.directory = directory
        self.live = directory / "checkpoint"
        self.staging = directory / "checkpoint.tmp"
        self.previous = directory / "checkpoint.old"

    def save(self, progress: Progress, states: list[dict]) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        for i, state in enumerate(states):
            save_file(state, str(self.staging / f"coder_{i}.safetensors"))
        (self.staging / "progress.json").write_text(json.dumps(asdict(progress)))
        _fsync_dir(self.staging)
        shutil.rmtree(self.previous, ignore_errors=True)
        if self.live.exists():
            os.replace(self.live, self.previous)
        os.replace(self.staging, self.live)
        shutil.rmtree(self.previous, ignore_errors=True)

    def load(self) -> tuple[Progress, list[dict]] | None:
        # a kill between the two renames in save() leaves only the previous checkpoint
        for candidate in (self.live, self.previous):
            progress_path = candidate / "progress.json"
            if progress_path.exists():
                progress = Progress(**json.loads(progress_path.read_text()))
                states = []
                i = 0
                while (candidate / f"coder_{i}.safetensors").exists():
                    states.append(load_file(str(candidate / f"coder_{i}.safetensors")))
                    i += 1
                return progress, states
        return None


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
