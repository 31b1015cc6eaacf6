"""Rewrite a catalogue's examples from the older wide layout (`examples`: every row with its
context's tokens, token ids and dense values) into the compact one (store/examples.py).

Coder by coder, each in one commit of its compact rows, so a kill leaves whole coders done and the
next writable open (or `featuredb upgrade DB`) goes on with the rest. The wide table is dropped
only after every coder's compact rows are stored and counted equal to its wide ones: nothing is
lost, and until then a read-only open reads the wide rows as they are.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pyarrow.compute as pc

from featuredb.store.filters import Filter
from featuredb.store.schema import CODERS_TABLE, EXAMPLES_TABLE, LEGACY_EXAMPLES_TABLE, StoreError

if TYPE_CHECKING:
    from featuredb.store.feature_store import FeatureStore

_BATCH_ROWS = 65_536


def upgrade_examples(store: FeatureStore, *, progress: bool = True) -> int:
    """Compact every coder's wide examples; returns the number of coders rewritten (0: nothing to do)."""
    if LEGACY_EXAMPLES_TABLE not in store.table_names():
        return 0
    legacy = store.table(LEGACY_EXAMPLES_TABLE)
    wide_counts = _counts(legacy)
    compact_counts = _counts(store.table(EXAMPLES_TABLE)) if EXAMPLES_TABLE in store.table_names() else {}
    models = {}
    if CODERS_TABLE in store.table_names():
        models = dict(store.coders().select("coder_id", "model").iter_rows())
    todo = [c for c in sorted(wide_counts) if compact_counts.get(c) != wide_counts[c]]
    bar = _progress(sum(wide_counts[c] for c in todo), progress)
    for coder_id in todo:
        where = Filter().eq("coder_id", coder_id).render(legacy.schema)

        def batches():
            for batch in legacy.search().where(where).limit(None).to_batches(batch_size=_BATCH_ROWS):
                bar.update(batch.num_rows)
                yield batch

        store.write_examples(coder_id, models.get(coder_id, ""), batches())
    bar.close()
    done = _counts(store.table(EXAMPLES_TABLE)) if EXAMPLES_TABLE in store.table_names() else {}
    short = [c for c, n in wide_counts.items() if done.get(c) != n]
    if short:
        raise StoreError(f"upgrading {store.uri}: coder {short[0]!r} has {done.get(short[0], 0)} compact examples "
                         f"for {wide_counts[short[0]]} wide ones; the wide table is kept (open it again to retry)")
    store.drop_table(LEGACY_EXAMPLES_TABLE)
    return len(todo)


def _counts(table) -> dict[str, int]:
    coder_ids = table.search().select(["coder_id"]).limit(None).to_arrow()["coder_id"]
    counts = pc.value_counts(coder_ids)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="example", unit_scale=True, desc="compacting examples", file=sys.stderr,
                disable=not show or total == 0)


__all__ = ["upgrade_examples"]
