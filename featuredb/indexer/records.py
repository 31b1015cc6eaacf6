"""Turn finished statistics into store rows (column dicts of numpy / Arrow arrays).

Per-example lists (tokens, token ids, per-token values) are built as Arrow list arrays straight
from flat numpy buffers and offsets: a 16k-wide coder has a million example rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from featuredb.indexer.geometry import LogitTables
from featuredb.indexer.stats import FeatureStats
from featuredb.indexer.workdir import PAD, ContextStore, LoadedContexts
from featuredb.store.examples import CompactExamples, context_keys
from featuredb.store.schema import COOCCURRENCE_COLUMNS, contexts_schema, example_activations_schema

TOP_TOKENS = 10
# Rows are built and written this many features at a time (examples: ~64 rows per feature), and
# contexts this many at a time: memory bounded by a batch, not by a coder of a million features.
FEATURES_PER_BATCH = 4096
CONTEXTS_PER_BATCH = 16384


def vocabulary_strings(tokenizer, vocab_size: int) -> np.ndarray:
    """Each token id decoded on its own (' the', not 'Ġthe'), as an object array for fast take()."""
    strings = tokenizer.batch_decode([[i] for i in range(vocab_size)], clean_up_tokenization_spaces=False)
    return np.asarray(strings, dtype=object)


def _list_array(flat: np.ndarray | pa.Array, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = flat if isinstance(flat, pa.Array) else pa.array(flat, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _id_strings(ids: np.ndarray, vocab: np.ndarray) -> list[list[str]]:
    return [list(row) for row in vocab[ids]]


def compact_examples(coder_id: str, model: str, stats: FeatureStats, contexts: ContextStore | LoadedContexts,
                     vocab: np.ndarray, batch_features: int | None = None) -> CompactExamples:
    """A coder's top and interval examples in the store's compact layout, streamed: first the contexts
    they show (each once), then the example rows a batch of features at a time, so memory is bounded
    by a batch, not by the coder."""
    shown = []
    for context in (stats.top_context, stats.interval_context if stats.config.interval_slots else None):
        if context is not None:
            shown.append(torch.unique(context[context >= 0]).cpu().numpy())
    shown_contexts = np.unique(np.concatenate(shown)) if shown else np.zeros(0, dtype=np.int64)
    keys = np.zeros(len(shown_contexts), dtype=np.int64)
    batch_features = batch_features or FEATURES_PER_BATCH
    contexts_per_batch = CONTEXTS_PER_BATCH

    def batches() -> Iterator[tuple[pa.Table, pa.Table]]:
        empty_rows, empty_contexts = example_activations_schema().empty_table(), contexts_schema().empty_table()
        for start in range(0, len(shown_contexts), contexts_per_batch):
            rows = context_rows(model, shown_contexts[start:start + contexts_per_batch], contexts)
            keys[start:start + rows.num_rows] = rows["context_key"].to_numpy()
            yield rows, empty_rows
        for start in range(0, stats.width, batch_features):
            features = slice(start, min(start + batch_features, stats.width))
            yield empty_contexts, _example_rows(coder_id, stats, features, contexts, shown_contexts, keys)

    return CompactExamples(batches(), vocabulary=vocab)


def context_rows(model: str, context_index: np.ndarray, contexts: ContextStore | LoadedContexts) -> pa.Table:
    """Rows of the contexts table for some of the run's contexts (token ids without padding)."""
    token_ids = contexts.tokens(context_index)
    valid = token_ids != PAD
    ids = _list_array(token_ids[valid].astype(np.int32), valid.sum(axis=1), pa.int32())
    doc_ids = contexts.doc_ids(context_index)
    return pa.table({
        "context_key": pa.array(context_keys(model, doc_ids, context_index, ids)),
        "model": pa.array([model] * len(context_index), pa.string()),
        "context_index": pa.array(context_index, pa.int64()),
        "doc_id": pa.array(doc_ids, pa.string()),
        "token_ids": ids,
        "tokens": pa.nulls(len(context_index), pa.list_(pa.string())),
    }, schema=contexts_schema())


def _example_rows(coder_id: str, stats: FeatureStats, features: slice, contexts: ContextStore | LoadedContexts,
                  shown_contexts: np.ndarray, keys: np.ndarray) -> pa.Table:
    """Compact rows of the examples of `features`: top (rank = place in the top-K), then interval."""
    parts = []
    _, top_context, top_values = stats.top_sorted(features)
    feature, slot = (top_context >= 0).nonzero(as_tuple=True)
    parts.append(("top", feature, slot, top_context[feature, slot], top_values[feature, slot], None))
    if stats.config.interval_slots:
        bins, _, interval_context, interval_values = stats.intervals_sorted(features)
        feature, slot = (interval_context >= 0).nonzero(as_tuple=True)
        bin_width = stats.scale[features][feature] / stats.config.interval_bins
        bin_index = bins[feature, slot]
        bounds = ((bin_index * bin_width).cpu().numpy(), ((bin_index + 1) * bin_width).cpu().numpy())
        # rank: 0.. within the feature, in bin order
        parts.append(("interval", feature, slot, interval_context[feature, slot], interval_values[feature, slot], bounds))
    tables = []
    for kind, feature, slot, context, values, bounds in parts:
        n = len(feature)
        context = context.cpu().numpy()
        token_ids = contexts.tokens(context)  # [n, T]
        valid = token_ids != PAD
        values = np.where(valid, values.float().cpu().numpy(), 0).astype(np.float32)
        # a context's values are stored for its tokens only (padding dropped, as the wide rows had them)
        at = np.cumsum(valid, axis=1) - 1
        max_position = values.argmax(axis=1)
        positions, nonzero_values = _sparse(values, at)
        peak_token = token_ids[np.arange(n), max_position]
        tables.append(pa.table({
            "coder_id": pa.array([coder_id] * n, pa.string()),
            "feature": pa.array(feature.cpu().numpy() + features.start, pa.int64()),
            "kind": pa.array([kind] * n, pa.string()),
            "rank": pa.array(slot.cpu().numpy().astype(np.int32)),
            "bin_min": pa.nulls(n, pa.float32()) if bounds is None else pa.array(bounds[0], pa.float32()),
            "bin_max": pa.nulls(n, pa.float32()) if bounds is None else pa.array(bounds[1], pa.float32()),
            "context_key": pa.array(keys[np.searchsorted(shown_contexts, context)]),
            "max_value": pa.array(values.max(axis=1).astype(np.float32) if n else np.zeros(0, np.float32)),
            "max_position": pa.array(max_position.astype(np.int32)),
            "peak_token": pa.array(np.where(peak_token == PAD, -1, peak_token).astype(np.int32)),
            "positions": positions,
            "values": nonzero_values,
        }, schema=example_activations_schema()))
    # the store keys rows by (feature, kind, rank): order them as a reader sorts them
    return pa.concat_tables(tables).sort_by([("feature", "ascending"), ("kind", "descending"), ("rank", "ascending")])


def _sparse(values: np.ndarray, at: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
    """Positions (`at`: a token's place among the context's tokens) and values of each row's non-zeros."""
    rows, column = np.nonzero(values)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=len(values)), out=offsets[1:])
    return (pa.ListArray.from_arrays(pa.array(offsets), pa.array(at[rows, column].astype(np.int32))),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[rows, column].astype(np.float32))))


def top_token_counts(stats: FeatureStats, contexts: ContextStore | LoadedContexts, vocab: np.ndarray,
                     features: slice = slice(None)) -> tuple[list, list]:
    """Per feature: the most frequent tokens at the max-activating position of its top examples
    (equal counts: the token of the better-ranked example first, whatever order the slots are in)."""
    _, top_context, top_token_values = stats.top_sorted(features)
    has_context = top_context >= 0
    context = top_context.clamp(min=0).cpu().numpy()  # [F, K]
    position = top_token_values.float().argmax(dim=2).cpu().numpy()  # [F, K]
    token_at_max = contexts.tokens(context.reshape(-1)).reshape(*context.shape, -1)
    token_at_max = np.take_along_axis(token_at_max, position[..., None], axis=2)[..., 0]
    has_context = has_context.cpu().numpy()
    tokens, counts = [], []
    for f in range(token_at_max.shape[0]):
        common = Counter(token_at_max[f][has_context[f]].tolist()).most_common(TOP_TOKENS)
        tokens.append([vocab[t] for t, _ in common])
        counts.append([c for _, c in common])
    return tokens, counts


def feature_batches(sae: dict, stats: FeatureStats, logits: LogitTables, neighbours: tuple[torch.Tensor, torch.Tensor],
                    contexts: ContextStore | LoadedContexts, vocab: np.ndarray, slots: list[tuple[int, str]] | None = None,
                    layer_write: torch.Tensor | None = None, batch_features: int | None = None,
                    cooccurring: Callable[[slice], dict] | None = None) -> Iterator[dict]:
    """The coder's feature rows, a batch of features at a time (see feature_rows)."""
    batch_features = batch_features or FEATURES_PER_BATCH
    for start in range(0, stats.width, batch_features):
        features = slice(start, min(start + batch_features, stats.width))
        yield feature_rows(sae, stats, logits, neighbours, contexts, vocab, slots, layer_write, features, cooccurring)


def feature_rows(sae: dict, stats: FeatureStats, logits: LogitTables, neighbours: tuple[torch.Tensor, torch.Tensor],
                 contexts: ContextStore | LoadedContexts, vocab: np.ndarray, slots: list[tuple[int, str]] | None = None,
                 layer_write: torch.Tensor | None = None, features: slice = slice(None),
                 cooccurring: Callable[[slice], dict] | None = None) -> dict:
    """Rows of `features` (default all). `slots`: the (layer, hook) each slot of features reads,
    layer-major (default: the coder's one); `layer_write` [F, output layers]: a multi-layer coder's
    decoder norm per output layer; `cooccurring`: the co-occurrence columns of a slice of features
    (cooccurrence.Partners.for_coder), None when not counted."""
    index = np.arange(stats.width, dtype=np.int64)[features]
    F = len(index)
    slots = slots or [(sae["layer"], sae["hook"])]
    slot_of = index // (stats.width // len(slots))
    mean, std = stats.mean_std()
    top_tokens, top_counts = top_token_counts(stats, contexts, vocab, features)
    neighbour_ids, neighbour_cosines = neighbours
    as_lists = lambda t: t[features].cpu().numpy().tolist()  # noqa: E731
    numpy = lambda t: t[features].cpu().numpy()  # noqa: E731
    return {
        "coder_id": [sae["coder_id"]] * F,
        "feature": index,
        "model": [sae["model"]] * F,
        "layer": np.asarray([slots[i][0] for i in slot_of], dtype=np.int32),
        "hook": [slots[i][1] for i in slot_of],
        "site": [sae["site"]] * F,
        "active_count": numpy(stats.active_count),
        "density": numpy(stats.density()),
        "max_activation": numpy(stats.act_max).astype(np.float32),
        "mean_activation": numpy(mean).astype(np.float32),
        "std_activation": numpy(std).astype(np.float32),
        "hist_counts": as_lists(stats.hist),
        "hist_max": numpy(stats.scale).astype(np.float32),
        "top_logit_tokens": _id_strings(numpy(logits.top_ids), vocab),
        "top_logit_ids": as_lists(logits.top_ids.int()),
        "top_logit_values": as_lists(logits.top_values),
        "bottom_logit_tokens": _id_strings(numpy(logits.bottom_ids), vocab),
        "bottom_logit_ids": as_lists(logits.bottom_ids.int()),
        "bottom_logit_values": as_lists(logits.bottom_values),
        "neighbours": as_lists(neighbour_ids),
        "neighbour_cosines": as_lists(neighbour_cosines),
        "top_tokens": top_tokens,
        "top_token_counts": top_counts,
        "description": [None] * F,
        "description_method": [None] * F,
        "description_model": [None] * F,
        "embedding_model": [None] * F,
        "vector": [None] * F,
        "layer_write": [None] * F if layer_write is None else as_lists(layer_write.float()),
        **(dict.fromkeys(COOCCURRENCE_COLUMNS, [None] * F) if cooccurring is None else cooccurring(features)),
    }
