"""Example contexts in the compact layout: each context window stored once, each example only what is
its own.

A reader sees an example as one wide row (`schema.examples_schema`: the context's tokens, token ids,
document and index, the feature's value at every token). On disk that row is split three ways:

- `contexts`: one row per distinct window (token ids, document, context index), shared by every
  coder and feature whose examples show it. Its key is a 64-bit hash of its content and its
  model, so the same window written twice (two coders of a run, a re-index, an import) is stored
  once, with no run ids to keep in step.
- `vocabulary`: one row per (model, token id) with the token's text; a context's token strings are
  taken from it. A context whose ids do not resolve there (an import without ids, a pair that
  disagrees with the stored one) keeps its own strings.
- `example_activations`: per example the feature, kind, rank, bin, the context's key, the max
  and its position, the token id at the max (for token search), and the feature's non-zero values
  with their positions (float32, so every value reads back bit-equal; zeros are implicit).

`compact` turns wide rows into the three; `expand` turns compact rows back into wide ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store.schema import (
    contexts_schema,
    example_activations_schema,
    examples_schema,
    vocabulary_schema,
)

CONTEXT_FIELDS = ("tokens", "token_ids", "doc_id", "context_index")  # a wide row's fields that live in `contexts`
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64, wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _row_sums(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum (wrapping uint64) of each row's segment of `flat`; 0 for an empty row."""
    totals = np.concatenate([[np.uint64(0)], np.cumsum(flat, dtype=np.uint64)])
    with np.errstate(over="ignore"):
        return totals[offsets[1:]] - totals[offsets[:-1]]


def _flat(lists: pa.ListArray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A list array as (offsets from 0, its values in order): a slice of a larger array included."""
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    return offsets - offsets[0], np.asarray(lists.flatten().to_numpy(zero_copy_only=False), dtype=dtype)


def context_keys(model: str, doc_ids: list[str], context_index: np.ndarray, token_ids: pa.ListArray,
                 own_text: list[str | None] | None = None) -> np.ndarray:
    """The int64 key of each context: a hash of its model, document, index, token ids (each with
    its position) and, for a context that keeps its own strings, those strings (joined)."""
    own_tokens = own_text or [None] * len(doc_ids)
    token_ids = token_ids.cast(pa.list_(pa.int64()))
    offsets, flat = _flat(token_ids, np.int64)
    lengths = np.diff(offsets)
    position = np.arange(len(flat), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    with np.errstate(over="ignore"):
        per_token = _mix(flat.astype(np.uint64) * _GOLDEN + (position.astype(np.uint64) << np.uint64(32)))
        tokens_hash = _row_sums(per_token, offsets) + lengths.astype(np.uint64) * _GOLDEN
    header = np.empty(len(doc_ids), dtype=np.uint64)
    prefix = model.encode() + b"\x00"
    for i, (doc, index, strings) in enumerate(zip(doc_ids, context_index.tolist(), own_tokens)):
        text = prefix + doc.encode() + b"\x00" + str(index).encode()
        if strings is not None:
            text += b"\x00" + strings.encode()
        header[i] = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        return _mix(header ^ _mix(tokens_hash)).view(np.int64)


# --- the vocabulary ----------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """One model's token strings by id (as stored); `strings[id]` is None where the id is unknown."""

    model: str
    strings: pa.StringArray  # index = token id; null where not stored

    @classmethod
    def from_rows(cls, model: str, rows: pa.Table) -> Vocabulary:
        ids = rows["token_id"].to_numpy()
        size = int(ids.max()) + 1 if len(ids) else 0
        # the first row stored for an id wins (two writers may both have added it)
        order = np.arange(len(ids))[::-1]
        slot = np.full(size, -1, dtype=np.int64)
        slot[ids[order]] = order
        return cls(model, rows["token"].combine_chunks().take(pa.array(slot, mask=slot < 0)))

    def __len__(self) -> int:
        return len(self.strings)

    def extended(self, rows: pa.Table) -> Vocabulary:
        """This vocabulary with `rows` (pairs of ids it lacks) added."""
        known = np.flatnonzero(np.asarray(self.strings.is_valid()))
        old = pa.table({"token_id": pa.array(known.astype(np.int32)), "token": self.strings.take(pa.array(known))})
        return Vocabulary.from_rows(self.model, pa.concat_tables([old, rows.select(["token_id", "token"])],
                                                                          promote_options="permissive"))

    def take(self, ids: np.ndarray) -> pa.Array:
        """Strings of `ids` (null for ids outside the vocabulary or unknown)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.strings))
        return self.strings.take(pa.array(np.where(inside, ids, 0), mask=~inside))


def vocabulary_rows(model: str, strings: np.ndarray | list[str], ids: np.ndarray | None = None) -> pa.Table:
    """Vocabulary rows: `strings` with their token ids (default 0, 1, ...)."""
    ids = np.arange(len(strings)) if ids is None else ids
    return pa.table({"model": pa.array([model] * len(strings), pa.string()),
                     "token_id": pa.array(np.asarray(ids, dtype=np.int32)),
                     "token": pa.array(list(strings), pa.string())}, schema=vocabulary_schema())


@dataclass
class CompactExamples:
    """A coder's examples already compact (the indexer's): `batches` yields (contexts, rows) pairs,
    the contexts that the compact rows refer to (those not stored yet are added first) and the rows;
    `vocabulary` holds every token string of the model, by id (stored where the store lacks it)."""

    batches: Iterable[tuple[pa.Table, pa.Table]]
    vocabulary: np.ndarray | None = None

    def resolved(self, contexts: pa.Table, rows: pa.Table, conflicts: np.ndarray) -> tuple[pa.Table, pa.Table]:
        """A batch as the store keeps it where some token ids' stored strings differ from this
        vocabulary's (`conflicts`): contexts showing them carry their own strings (so they read back
        as indexed), and a peak on one is -1 (token search reads the context, not the vocabulary)."""
        if len(conflicts) == 0 or self.vocabulary is None:
            return contexts, rows
        peak = rows["peak_token"].to_numpy()
        peak = pa.array(np.where(np.isin(peak, conflicts), -1, peak).astype(np.int32))
        rows = rows.set_column(rows.schema.get_field_index("peak_token"), rows.schema.field("peak_token"), peak)
        return self._with_own_strings(contexts, conflicts), rows

    def _with_own_strings(self, contexts: pa.Table, conflicts: np.ndarray) -> pa.Table:
        offsets, flat = _flat(contexts["token_ids"].combine_chunks(), np.int64)
        shows = np.zeros(len(contexts), dtype=bool)
        shows[np.repeat(np.arange(len(contexts)), np.diff(offsets))[np.isin(flat, conflicts)]] = True
        own = _lists(self.vocabulary[flat], offsets, pa.string())
        tokens = pc.if_else(pa.array(shows), own, contexts["tokens"].combine_chunks())
        return contexts.set_column(contexts.schema.get_field_index("tokens"), contexts.schema.field("tokens"), tokens)


# --- wide rows -> compact rows -----------------------------------------------------------------


@dataclass
class Compacted:
    """What wide example rows become: the contexts they show (deduplicated), vocabulary pairs the
    store did not have, and one compact row per example."""

    contexts: pa.Table  # contexts_schema
    new_vocabulary: pa.Table  # vocabulary_schema
    rows: pa.Table  # example_activations_schema


def compact(wide: pa.Table, model: str, vocabulary: Vocabulary) -> Compacted:
    """Split wide example rows (examples_schema) of one model's coder into the compact layout."""
    n = wide.num_rows
    token_ids = wide["token_ids"].combine_chunks()
    tokens = wide["tokens"].combine_chunks()
    offsets, flat_ids = _flat(token_ids, np.int64)
    lengths = np.diff(offsets)
    flat_tokens = tokens.flatten()
    new_vocabulary, known = _resolve(model, flat_ids, flat_tokens, vocabulary)
    # a row keeps its own strings unless every one of its tokens resolves through the vocabulary
    row_of_token = np.repeat(np.arange(n), lengths)
    unresolved_rows = np.zeros(n, dtype=bool)
    unresolved_rows[row_of_token[~known]] = True
    # a context that keeps its own strings is told apart by them too (two windows may share ids that
    # mean different strings: an import without a vocabulary, positional ids)
    joined = pc.binary_join(tokens, "\x1f").to_pylist() if unresolved_rows.any() else [None] * n
    own_text = [text if unresolved else None for text, unresolved in zip(joined, unresolved_rows.tolist())]
    doc_ids = wide["doc_id"].to_pylist()
    context_index = wide["context_index"].to_numpy()
    keys = context_keys(model, doc_ids, context_index, token_ids, own_text)

    _, first = np.unique(keys, return_index=True)
    first = np.sort(first)
    keep_strings = unresolved_rows[first]
    contexts = pa.table({
        "context_key": pa.array(keys[first]),
        "model": pa.array([model] * len(first), pa.string()),
        "context_index": pa.array(context_index[first], pa.int64()),
        "doc_id": pa.array([doc_ids[i] for i in first.tolist()], pa.string()),
        "token_ids": token_ids.take(pa.array(first)).cast(pa.list_(pa.int32())),
        "tokens": pc.if_else(pa.array(keep_strings), tokens.take(pa.array(first)),
                             pa.nulls(len(first), pa.list_(pa.string()))),
    }, schema=contexts_schema())

    values = wide["values"].combine_chunks()
    flat_values = _flat(values, np.float32)[1]
    max_position = wide["max_position"].to_numpy().astype(np.int64)
    peak = np.where((max_position >= 0) & (max_position < lengths), offsets[:-1] + max_position, -1)
    # the peak's id, where the vocabulary gives its string (else -1: token search reads the context's own)
    peak_resolves = (peak >= 0) & (known[np.clip(peak, 0, None)] if len(flat_ids) else False)
    peak_token = np.where(peak_resolves, flat_ids[np.clip(peak, 0, None)] if len(flat_ids) else -1, -1)
    rows = _compact_rows(wide, keys, peak_token, flat_values, offsets)
    return Compacted(contexts, new_vocabulary, rows)


def _resolve(model: str, flat_ids: np.ndarray, flat_tokens: pa.Array, vocabulary: Vocabulary) -> tuple[pa.Table, np.ndarray]:
    """Which (id, string) pairs of the input are new to the vocabulary (an id >= 0 the vocabulary
    lacks, given one string throughout the input), and whether each token resolves (its id's
    string, stored or new, is its own string)."""
    frame = pl.DataFrame({"token_id": flat_ids, "token": pl.Series(flat_tokens.cast(pa.large_string()))})
    stored = vocabulary.take(flat_ids)
    has_stored = np.asarray(stored.is_valid())
    pairs = (frame.filter(pl.Series(~has_stored) & (pl.col("token_id") >= 0)).unique()
             .filter(pl.col("token_id").is_unique()).sort("token_id"))
    new = pa.table({"model": pa.array([model] * pairs.height, pa.string()),
                    "token_id": pa.array(pairs["token_id"].to_numpy().astype(np.int32)),
                    "token": pa.array(pairs["token"].to_list(), pa.string())}, schema=vocabulary_schema())
    added = pl.DataFrame({"token_id": pairs["token_id"], "added": pairs["token"]})
    resolved = (frame.with_columns(stored=pl.Series(stored.cast(pa.large_string())))
                .join(added, on="token_id", how="left", maintain_order="left")
                .select(pl.coalesce("stored", "added").eq_missing(pl.col("token")) & (pl.col("token_id") >= 0)))
    return new, resolved.to_series().to_numpy()


def _compact_rows(wide: pa.Table, keys: np.ndarray, peak_token: np.ndarray, flat_values: np.ndarray,
                  offsets: np.ndarray) -> pa.Table:
    nonzero = flat_values != 0
    row_of_value = np.repeat(np.arange(len(keys)), np.diff(offsets))
    position = np.arange(len(flat_values), dtype=np.int64) - offsets[:-1][row_of_value]
    kept_offsets = np.concatenate([[0], np.cumsum(np.bincount(row_of_value[nonzero], minlength=len(keys)))])
    columns = {name: wide[name] for name in ("coder_id", "feature", "kind", "rank", "bin_min", "bin_max")}
    return pa.table({
        **columns,
        "context_key": pa.array(keys),
        "max_value": wide["max_value"], "max_position": wide["max_position"],
        "peak_token": pa.array(peak_token.astype(np.int32)),
        "positions": _lists(position[nonzero].astype(np.int32), kept_offsets),
        "values": _lists(flat_values[nonzero], kept_offsets),
    }, schema=example_activations_schema())


def _lists(flat: np.ndarray, offsets: np.ndarray, value_type: pa.DataType | None = None) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, value_type))


# --- compact rows -> wide rows -----------------------------------------------------------------


def expand(rows: pa.Table, contexts: pa.Table, vocabularies: dict[str, Vocabulary],
           columns: Iterable[str] | None = None) -> pa.Table:
    """Wide example rows (examples_schema, or its `columns`) for compact `rows`, given the contexts
    they refer to and the vocabulary of each model those contexts belong to. A row whose context
    is missing (a writer killed between the contexts and the examples commit) is dropped."""
    schema = examples_schema()
    wanted = list(schema.names) if columns is None else list(columns)
    keys = rows["context_key"].to_numpy()
    stored_keys = contexts["context_key"].to_numpy()
    order = np.argsort(stored_keys, kind="stable")
    at = np.searchsorted(stored_keys, keys, sorter=order).clip(max=max(len(stored_keys) - 1, 0))
    found = (stored_keys[order[at]] == keys) if len(stored_keys) else np.zeros(len(keys), dtype=bool)
    if not found.all():
        rows = rows.filter(pa.array(found))
        at = at[found]
    context_row = pa.array(order[at] if len(stored_keys) else np.zeros(0, dtype=np.int64))
    out: dict[str, pa.Array] = {}
    for name in ("coder_id", "feature", "kind", "rank", "bin_min", "bin_max", "max_value", "max_position"):
        if name in wanted:
            out[name] = rows[name].combine_chunks()
    token_ids = contexts["token_ids"].combine_chunks().take(context_row)
    if "token_ids" in wanted:
        out["token_ids"] = token_ids
    if "tokens" in wanted:
        out["tokens"] = context_strings(contexts, context_row, token_ids, vocabularies)
    if "doc_id" in wanted:
        out["doc_id"] = contexts["doc_id"].combine_chunks().take(context_row)
    if "context_index" in wanted:
        out["context_index"] = contexts["context_index"].combine_chunks().take(context_row)
    if "values" in wanted:
        out["values"] = _dense_values(rows, token_ids)
    return pa.table({name: out[name] for name in wanted}, schema=pa.schema([schema.field(n) for n in wanted]))


def context_strings(contexts: pa.Table, context_row: pa.Array, token_ids: pa.ListArray,
                     vocabularies: dict[str, Vocabulary]) -> pa.ListArray:
    own = contexts["tokens"].combine_chunks().take(context_row)
    models = contexts["model"].combine_chunks().take(context_row)
    offsets, flat_ids = _flat(token_ids, np.int64)
    flat = pa.nulls(len(flat_ids), pa.string())
    for model, vocabulary in vocabularies.items():
        # which rows are this model's, compared once a row (not once a token: a Python string
        # comparison per token was most of the time), then spread over each row's tokens
        mine_rows = pc.fill_null(pc.equal(models, model), False).to_numpy(zero_copy_only=False)
        if mine_rows.all():
            flat = vocabulary.take(flat_ids)
        elif mine_rows.any():
            flat = pc.if_else(pa.array(np.repeat(mine_rows, np.diff(offsets))), vocabulary.take(flat_ids), flat)
    from_vocabulary = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
    return pc.if_else(own.is_valid(), own, from_vocabulary)


def _dense_values(rows: pa.Table, token_ids: pa.ListArray) -> pa.ListArray:
    offsets = _flat(token_ids, np.int64)[0]
    dense = np.zeros(offsets[-1], dtype=np.float32)
    kept, flat_positions = _flat(rows["positions"].combine_chunks(), np.int64)
    row_of_value = np.repeat(np.arange(len(offsets) - 1), np.diff(kept))
    dense[offsets[:-1][row_of_value] + flat_positions] = _flat(rows["values"].combine_chunks(), np.float32)[1]
    return _lists(dense, offsets)


def needs_contexts(columns: Iterable[str]) -> bool:
    return any(c in CONTEXT_FIELDS or c == "values" for c in columns)
