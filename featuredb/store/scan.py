"""Filtered reads and full-text searches of a LanceDB table without the per-query round trips.

LanceDB's synchronous query builder asks the table for its schema twice for every query (to see
whether blob columns need row ids), and each ask is a hop to LanceDB's event-loop thread: 5-13 ms
of a 20-35 ms point lookup, measured on a loaded 2-core machine (docs/benchmarks.md, issue 22).
These functions run the same query through the table's asynchronous handle, which does not ask.
featuredb stores no blob columns, so nothing is lost. Where a LanceDB version has no such handle
they fall back to the synchronous builder.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from lancedb.background_loop import LOOP


def _async_query(table: Any, where: str | None, columns: list[str] | None, limit: int | None):
    # LanceDB's own attribute (the AsyncTable behind a synchronous LanceTable), not one of ours
    query = getattr(table, "_table").query()
    if where:
        query = query.where(where)
    if columns is not None:
        query = query.select(list(columns))
    return query.limit(limit) if limit is not None else query  # no limit: every matching row


def _has_async(table: Any) -> bool:
    return hasattr(getattr(table, "_table", None), "query")


def _sync_query(table: Any, where: str | None, columns: list[str] | None, limit: int | None):
    query = table.search().limit(limit)  # search() alone would cap at 10 rows
    if where:
        query = query.where(where)
    return query.select(list(columns)) if columns is not None else query


def scan(table: Any, where: str | None = None, columns: list[str] | None = None,
         limit: int | None = None) -> pa.Table:
    """The rows of `table` matching the SQL condition `where` (rendered by store.filters, never
    pasted from user input), with `columns` (default all), at most `limit` (default every row)."""
    if not _has_async(table):
        return _sync_query(table, where, columns, limit).to_arrow()
    return LOOP.run(_async_query(table, where, columns, limit).to_arrow())


def text_search(table: Any, text: str, column: str, where: str | None = None, columns: list[str] | None = None,
                limit: int = 10, prefilter: bool = True) -> pa.Table:
    """The `limit` rows of `table` whose `column` best matches `text` by BM25 (its full-text index),
    best first, with `columns` and `_score`; `where` (rendered by store.filters) filters before the
    search, or after it with prefilter=False. The synchronous builder also looks for a legacy
    Tantivy index on every query (a file system or object store round trip)."""
    if not _has_async(table):
        query = table.search(text, query_type="fts", fts_columns=column)
        if where:
            query = query.where(where, prefilter=prefilter)
        return (query.select(list(columns)) if columns is not None else query).limit(limit).to_arrow()
    query = getattr(table, "_table").query().nearest_to_text(text, columns=column)
    if where:
        query = query.where(where)
        if not prefilter:
            query = query.postfilter()
    if columns is not None:
        query = query.select(list(columns))
    return LOOP.run(query.limit(limit).to_arrow())


def scan_batches(table: Any, where: str | None = None, columns: list[str] | None = None,
                 batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """`scan` in record batches of at most `batch_rows` (memory bounded by a batch)."""
    if not _has_async(table):
        yield from _sync_query(table, where, columns, None).to_batches(batch_size=batch_rows)
        return
    reader = LOOP.run(_async_query(table, where, columns, None).to_batches(max_batch_length=batch_rows))
    while True:
        try:
            batch = LOOP.run(reader.__anext__())
        except StopAsyncIteration:
            return
        yield batch


__all__ = ["scan", "scan_batches", "text_search"]
