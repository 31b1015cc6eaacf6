"""Turn finished statistics into store rows (column dicts of numpy / Arrow arrays).

Per-example lists (tokens, token ids, per-token values) are built as Arrow list arrays straight
from flat numpy buffers and offsets: a 16k-wide coder has a million example rows.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from featuredb.indexer.geometry import LogitTables
from featuredb.indexer.stats import FeatureStats
from featuredb.indexer.workdir import PAD, ContextStore

TOP_TOKENS = 10


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


def example_rows(coder_id: str, stats: FeatureStats, contexts: ContextStore, vocab: np.ndarray) -> dict:
    """Top and interval examples of every feature: token ids and per-token values of each context."""
    parts = []
    # token strings are taken from the vocabulary inside Arrow: no Python string per token
    vocab_strings = pa.array(vocab, type=pa.string())
    # top examples: rank = position in the top-K
    top_value, top_context, top_tokens = stats.top_sorted()
    feature, slot = (top_context >= 0).nonzero(as_tuple=True)
    parts.append(dict(
        kind="top", feature=feature, rank=slot, context=top_context[feature, slot],
        values=top_tokens[feature, slot], bin_min=None, bin_max=None,
    ))
    if stats.config.interval_slots:
        n_bins = stats.config.interval_bins
        bins, _, interval_context, interval_tokens = stats.intervals_sorted()
        feature, slot = (interval_context >= 0).nonzero(as_tuple=True)
        bin_index = bins[feature, slot]
        bin_width = stats.scale[feature] / n_bins
        parts.append(dict(
            kind="interval", feature=feature, rank=slot,  # rank: 0.. within the feature, in bin order
            context=interval_context[feature, slot], values=interval_tokens[feature, slot],
            bin_min=(bin_index * bin_width).cpu().numpy(), bin_max=((bin_index + 1) * bin_width).cpu().numpy(),
        ))

    columns: dict[str, list] = {name: [] for name in (
        "feature", "kind", "rank", "bin_min", "bin_max", "tokens", "token_ids", "values",
        "max_value", "max_position", "doc_id", "context_index")}
    for part in parts:
        n = len(part["feature"])
        if n == 0:
            continue
        context = part["context"].cpu().numpy()
        token_ids = contexts.tokens(context)  # [n, T]
        valid = token_ids != PAD
        lengths = valid.sum(axis=1)
        values = part["values"].float().cpu().numpy()
        flat_ids = token_ids[valid]
        columns["feature"].append(part["feature"].cpu().numpy())
        columns["kind"].append(np.full(n, part["kind"], dtype=object))
        columns["rank"].append(np.asarray(part["rank"].cpu().numpy(), dtype=np.int32))
        for name in ("bin_min", "bin_max"):
            columns[name].append(np.full(n, np.nan, dtype=np.float32) if part[name] is None
                                 else np.asarray(part[name], dtype=np.float32))
        columns["tokens"].append(_list_array(vocab_strings.take(pa.array(flat_ids)), lengths, pa.string()))
        columns["token_ids"].append(_list_array(flat_ids.astype(np.int32), lengths, pa.int32()))
        columns["values"].append(_list_array(values[valid].astype(np.float32), lengths, pa.float32()))
        columns["max_value"].append(values.max(axis=1).astype(np.float32))
        columns["max_position"].append(values.argmax(axis=1).astype(np.int32))
        columns["doc_id"].append(np.asarray(contexts.doc_ids(context), dtype=object))
        columns["context_index"].append(context.astype(np.int64))

    if not columns["feature"]:
        return {"coder_id": []} | {name: [] for name in columns}
    table = {}
    for name, chunks in columns.items():
        if isinstance(chunks[0], pa.Array):
            table[name] = pa.concat_arrays(chunks)
        else:
            table[name] = np.concatenate(chunks)
    for name in ("bin_min", "bin_max"):  # NaN marks "no bin" (top examples) -> null
        table[name] = pa.array(table[name], mask=np.isnan(table[name]), type=pa.float32())
    table["coder_id"] = np.full(len(table["feature"]), coder_id, dtype=object)
    return table


def top_token_counts(stats: FeatureStats, contexts: ContextStore, vocab: np.ndarray) -> tuple[list, list]:
    """Per feature: the most frequent tokens at the max-activating position of its top examples
    (equal counts: the token of the better-ranked example first, whatever order the slots are in)."""
    _, top_context, top_token_values = stats.top_sorted()
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


def feature_rows(sae: dict, stats: FeatureStats, logits: LogitTables, neighbours: tuple[torch.Tensor, torch.Tensor],
                 contexts: ContextStore, vocab: np.ndarray, slots: list[tuple[int, str]] | None = None,
                 layer_write: torch.Tensor | None = None) -> dict:
    """`slots`: the (layer, hook) each slot of features reads, layer-major (default: the coder's one);
    `layer_write` [F, output layers]: a multi-layer coder's decoder norm per output layer."""
    F = stats.width
    slots = slots or [(sae["layer"], sae["hook"])]
    per_slot = F // len(slots)
    mean, std = stats.mean_std()
    top_tokens, top_counts = top_token_counts(stats, contexts, vocab)
    neighbour_ids, neighbour_cosines = neighbours
    as_lists = lambda t: t.cpu().numpy().tolist()  # noqa: E731
    return {
        "coder_id": [sae["coder_id"]] * F,
        "feature": np.arange(F, dtype=np.int64),
        "model": [sae["model"]] * F,
        "layer": np.repeat(np.asarray([layer for layer, _ in slots], dtype=np.int32), per_slot),
        "hook": [hook for _, hook in slots for _ in range(per_slot)],
        "site": [sae["site"]] * F,
        "active_count": stats.active_count.cpu().numpy(),
        "density": stats.density().cpu().numpy(),
        "max_activation": stats.act_max.cpu().numpy().astype(np.float32),
        "mean_activation": mean.cpu().numpy().astype(np.float32),
        "std_activation": std.cpu().numpy().astype(np.float32),
        "hist_counts": as_lists(stats.hist),
        "hist_max": stats.scale.cpu().numpy().astype(np.float32),
        "top_logit_tokens": _id_strings(logits.top_ids.numpy(), vocab),
        "top_logit_ids": as_lists(logits.top_ids.int()),
        "top_logit_values": as_lists(logits.top_values),
        "bottom_logit_tokens": _id_strings(logits.bottom_ids.numpy(), vocab),
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
    }
