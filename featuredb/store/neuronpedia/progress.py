"""The marker of an import in progress, so that an import killed part-way is finished by running
the same import again.

Before its first write, an import run creates the table `import_in_progress_<fingerprint>` in the
catalogue. The fingerprint is of its sources: their folders and every file's name, size and mtime,
so the same command on the same files finds the marker again, and an edited or other export does
not. The marker holds a row for the run (whether it replaces stored coders, and the time that
stamps what a source without our sidecar has no time for) and a row per coder the run has started
to write. A run that finds its marker continues as it was started: it may replace the coders listed
there (any stored coder, if it was a --replace run) and stamps its rows with the same time, so it
ends with the tables of an uninterrupted import. The marker is dropped when the run ends, by
success or by an error (whose coder is undone); only a kill or Ctrl-C leaves it behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from featuredb.store.connect import connect
from featuredb.store.feature_store import FeatureStore
from featuredb.store.filters import Filter

MARKER_PREFIX = "import_in_progress_"
MARKER_SCHEMA = pa.schema([
    pa.field("coder_id", pa.string()),  # null in the run's own row
    pa.field("replace", pa.bool_(), nullable=False),
    pa.field("imported_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


@dataclass(frozen=True)
class ImportRun:
    marker: str  # the name of its marker table
    replace: bool  # it may replace any stored coder
    imported_at: dt.datetime
    earlier: frozenset[str]  # coders that killed attempts of this run started to write
    resumed: bool  # its marker was found: an earlier attempt was killed


def import_run(store: FeatureStore | None, sources: list[Path], replace: bool) -> ImportRun:
    """The run of importing `sources`: the one a killed attempt left in `store`, else a new one."""
    marker = MARKER_PREFIX + fingerprint(sources)
    rows = _marker_rows(store, marker) if store is not None else None
    run_row = next((r for r in rows or [] if r["coder_id"] is None), None)
    if run_row is None:
        return ImportRun(marker, replace, dt.datetime.now(dt.timezone.utc), frozenset(), resumed=False)
    earlier = frozenset(r["coder_id"] for r in rows if r["coder_id"] is not None)
    return ImportRun(marker, replace or run_row["replace"], run_row["imported_at"], earlier, resumed=True)


def fingerprint(sources: list[Path]) -> str:
    """A digest of the source folders and every file's name, size and modification time."""
    digest = hashlib.sha256()
    for folder in sources:
        digest.update(f"{folder.resolve()}\n".encode())
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _marker_rows(store: FeatureStore, marker: str) -> list[dict] | None:
    if marker not in store.table_names():
        return None
    try:
        return store.table(marker).to_arrow().to_pylist()
    except (OSError, RuntimeError, ValueError):  # killed while creating it: as if there were none
        return None


def may_replace(run: ImportRun, coder_id: str) -> bool:
    """Whether the run may overwrite coder_id when it is stored."""
    return run.replace or coder_id in run.earlier


def start(store: FeatureStore, run: ImportRun) -> None:
    """Create the run's marker before its first write (once: a resumed run keeps the one it found;
    a marker left unreadable by a kill while it was created is made again)."""
    rows = _marker_rows(store, run.marker)
    if any(r["coder_id"] is None for r in rows or []):
        return
    db = connect(store.uri)
    if rows is not None or run.marker in store.table_names():
        db.drop_table(run.marker)
    db.create_table(run.marker, _rows(run, [None]))


def claim(store: FeatureStore, run: ImportRun, coder_id: str) -> None:
    """Record that the run starts to write coder_id (before it does). The coder is then this run's
    alone: other unfinished runs that had started it lose it, so resuming them cannot overwrite it."""
    if coder_id in run.earlier:
        return
    store.table(run.marker).add(_rows(run, [coder_id]))
    for name in store.table_names():
        if name.startswith(MARKER_PREFIX) and name != run.marker:
            table = store.table(name)
            table.delete(Filter().eq("coder_id", coder_id).render(table.schema))


def finish(store: FeatureStore, run: ImportRun) -> None:
    """Drop the run's marker: it ended."""
    if run.marker in store.table_names():
        connect(store.uri).drop_table(run.marker)


def _rows(run: ImportRun, coder_ids: list[str | None]) -> pa.Table:
    n = len(coder_ids)
    return pa.table({"coder_id": coder_ids, "replace": [run.replace] * n, "imported_at": [run.imported_at] * n},
                    schema=MARKER_SCHEMA)
