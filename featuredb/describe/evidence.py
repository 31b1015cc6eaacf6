"""A feature's evidence read from the store: its example contexts, logit table and top tokens,
plus non-activating contexts for the scorers.

Every stored context window starts with BOS (see the indexer); BOS never activates a feature and
is dropped here, so prompts and labels never show it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store import FEATURES_TABLE, FeatureStore, Filter
from featuredb.store.schema import CONTEXTS_TABLE

_FEATURE_COLUMNS = [
    "feature", "active_count", "density", "max_activation", "top_logit_tokens", "top_logit_values",
    "bottom_logit_tokens", "bottom_logit_values", "top_tokens", "top_token_counts",
]
_EXAMPLE_COLUMNS = ["feature", "kind", "rank", "bin_min", "tokens", "values", "max_value", "max_position",
                    "context_index"]
# Size of the per-coder pool of contexts that non-activating samples are drawn from.
NEGATIVE_POOL_SIZE = 512


@dataclass(frozen=True)
class Context:
    """One text window with this feature's per-token values (all zero for a non-activating one)."""

    tokens: tuple[str, ...]
    values: tuple[float, ...]
    max_position: int
    context_index: int
    kind: str = "top"  # "top", "interval" or "none" (non-activating)
    rank: int = 0

    @cached_property  # asked for again and again while labelling and scoring; values never change
    def max_value(self) -> float:
        return max(self.values, default=0.0)

    def window(self, before: int, after: int, *, start: int | None = None) -> Context:
        """The part of the context around its max (or from `start`), at most before+1+after tokens."""
        n = len(self.tokens)
        if start is None:
            start = max(0, self.max_position - before)
        start = max(0, min(start, n - 1)) if n else 0
        stop = min(n, start + before + 1 + after)
        return Context(self.tokens[start:stop], self.values[start:stop], max(0, self.max_position - start),
                       self.context_index, self.kind, self.rank)


@dataclass
class FeatureEvidence:
    coder_id: str
    feature: int
    active_count: int
    density: float
    max_activation: float
    top: list[Context] = field(default_factory=list)  # by rank
    interval: list[Context] = field(default_factory=list)  # by activation bin, highest first
    top_logits: list[tuple[str, float]] = field(default_factory=list)
    bottom_logits: list[tuple[str, float]] = field(default_factory=list)
    top_tokens: list[tuple[str, int]] = field(default_factory=list)
    top_k: int = 0  # the coder's top-K: a shorter top list means every other context is exactly zero

    @property
    def dead(self) -> bool:
        return self.active_count == 0 and not self.top and not self.interval

    @property
    def context_indices(self) -> set[int]:
        return {c.context_index for c in self.top} | {c.context_index for c in self.interval}

    @property
    def negatives_exact(self) -> bool:
        """Whether contexts outside this feature's examples are known to be non-activating."""
        return len(self.top) < self.top_k


def feature_seed(coder_id: str, feature: int, salt: str = "") -> int:
    """A stable seed per feature (not Python's salted hash), so prompts and samples are reproducible."""
    digest = hashlib.sha256(f"{coder_id}\x00{feature}\x00{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _strip_bos(tokens: tuple[str, ...], values: list[float], max_position: int) -> tuple[tuple, tuple, int]:
    if len(tokens) > 1 and max_position > 0 and values[0] == 0:
        return tokens[1:], tuple(values[1:]), max_position - 1
    return tokens, tuple(values), max_position


def load_evidence(store: FeatureStore, coder_id: str, features: list[int], top_k: int) -> dict[int, FeatureEvidence]:
    """Evidence for `features` of coder `coder_id` (features not stored are left out)."""
    if not features:
        return {}
    where = Filter().eq("coder_id", coder_id).isin("feature", [int(f) for f in features])
    rows = _query(store, FEATURES_TABLE, where, _FEATURE_COLUMNS)
    evidence: dict[int, FeatureEvidence] = {}
    for r in rows:
        evidence[r["feature"]] = FeatureEvidence(
            coder_id=coder_id, feature=r["feature"], active_count=r["active_count"], density=r["density"],
            max_activation=float(r["max_activation"]),
            top_logits=list(zip(r["top_logit_tokens"], r["top_logit_values"])),
            bottom_logits=list(zip(r["bottom_logit_tokens"], r["bottom_logit_values"])),
            top_tokens=list(zip(r["top_tokens"], r["top_token_counts"])),
            top_k=top_k,
        )
    top: dict[int, list[Context]] = {f: [] for f in evidence}
    interval: dict[int, list[tuple[float, Context]]] = {f: [] for f in evidence}
    examples = store.read_examples(where, _EXAMPLE_COLUMNS)
    # Python objects once per context, not once per example (the coders of a run share their
    # contexts: 852 contexts behind 700k examples on the demo), and the values through numpy.
    # An indexed context has its stream index; an imported one has -1 and its own tokens.
    context_of = examples["context_index"].to_numpy()
    contexts, first = np.unique(context_of, return_index=True)
    tokens_of = {c: tuple(t) for c, t in zip(contexts.tolist(), examples["tokens"].take(pa.array(first)).to_pylist())
                 if c >= 0}
    values = examples["values"].combine_chunks()
    offsets, flat_values = values.offsets.to_numpy(), values.values.to_numpy(zero_copy_only=False)
    columns = ["feature", "kind", "rank", "bin_min", "max_position", "context_index"]
    for i, r in enumerate(examples.select(columns).to_pylist()):
        if r["feature"] not in evidence:
            continue
        tokens = tokens_of.get(r["context_index"]) or tuple(examples["tokens"][i].as_py())
        tokens, values, max_position = _strip_bos(
            tokens, flat_values[offsets[i]:offsets[i + 1]].tolist(), r["max_position"])
        ctx = Context(tokens, values, max_position, r["context_index"], r["kind"], r["rank"])
        if r["kind"] == "top":
            top[r["feature"]].append(ctx)
        else:
            interval[r["feature"]].append((r["bin_min"] or 0.0, ctx))
    for f, ev in evidence.items():
        ev.top = sorted(top[f], key=lambda c: c.rank)
        ev.interval = [c for _, c in sorted(interval[f], key=lambda bc: (-bc[0], bc[1].rank))]
    return evidence


def corpus_tokens(store: FeatureStore, model: str, batch_rows: int = 4096) -> frozenset[str]:
    """The strings of every token of `model` that occurs in the stored contexts (the indexed text
    the catalogue keeps; each window's first token, BOS, left out). One pass over the contexts'
    token ids, a batch at a time: memory is one flag per vocabulary entry and a batch."""
    vocabulary = store.vocabulary(model)
    seen = np.zeros(len(vocabulary), dtype=bool)
    own: set[str] = set()  # contexts that keep their own strings (ids unknown or in conflict)
    if not store.is_compact():  # a catalogue not upgraded yet: the wide examples hold the windows
        coder_ids = [r["coder_id"] for r in store.coders().to_dicts() if r["model"] == model]
        for rows in store.iter_examples(Filter().isin("coder_id", coder_ids), ["tokens"], batch_rows):
            for tokens in rows["tokens"].to_pylist():
                own.update(tokens[1:])
        return frozenset(own)
    if CONTEXTS_TABLE not in store.table_names():
        return frozenset()
    table = store.table(CONTEXTS_TABLE)
    query = table.search().where(Filter().eq("model", model).render(table.schema)) \
        .select(["token_ids", "tokens"]).limit(None)
    for batch in query.to_batches(batch_size=batch_rows):
        token_ids = batch.column("token_ids")
        offsets = np.asarray(token_ids.offsets, dtype=np.int64)
        flat = np.asarray(token_ids.values.to_numpy(zero_copy_only=False), dtype=np.int64)[offsets[0]:offsets[-1]]
        keep = np.ones(len(flat), dtype=bool)
        keep[(offsets[:-1] - offsets[0])[np.diff(offsets) > 0]] = False  # each window's BOS
        ids = flat[keep]
        seen[ids[(ids >= 0) & (ids < len(seen))]] = True
        for tokens in batch.column("tokens").drop_null().to_pylist():
            own.update(tokens[1:])
    strings = vocabulary.take(np.flatnonzero(seen)).drop_null().to_pylist()
    return frozenset(strings) | frozenset(own)


class NegativePool:
    """Contexts stored for a coder's features, for drawing contexts where another feature is inactive.

    The pool is the coder's distinct stored contexts with the lowest fixed hash (a stable uniform
    sample). For a feature, a context is taken as non-activating when it is not among its own
    stored contexts: exact when the feature's top list is shorter than top-K (it fired in no other
    context), otherwise its activation there is below its K-th top context's max (usually zero for
    a sparse feature); `FeatureEvidence.negatives_exact` says which.
    """

    def __init__(self, contexts: list[Context]) -> None:
        self.contexts = contexts

    @classmethod
    def load(cls, store: FeatureStore, coder_id: str, size: int = NEGATIVE_POOL_SIZE) -> NegativePool:
        contexts = store.coder_contexts(coder_id, ["context_index", "tokens"])
        indices = set(contexts["context_index"].to_pylist())
        chosen = sorted(indices, key=lambda c: hashlib.sha256(f"{coder_id}\x00{c}".encode()).digest())[:size]
        if not chosen:
            return cls([])
        kept = contexts.filter(pc.is_in(contexts["context_index"], pa.array(chosen, pa.int64())))
        seen: dict[int, Context] = {}
        for r in sorted(kept.to_pylist(), key=lambda r: r["context_index"]):
            if r["context_index"] not in seen:
                tokens = tuple(r["tokens"][1:] if len(r["tokens"]) > 1 else r["tokens"])  # BOS dropped
                seen[r["context_index"]] = Context(tokens, (0.0,) * len(tokens), 0, r["context_index"], "none")
        return cls([seen[c] for c in chosen if c in seen])

    def sample(self, evidence: FeatureEvidence, n: int, window: int) -> list[Context]:
        """n contexts not among the feature's own, each cut to a random window of `window` tokens."""
        exclude = evidence.context_indices
        candidates = [c for c in self.contexts if c.context_index not in exclude and c.tokens]
        rng = random.Random(feature_seed(evidence.coder_id, evidence.feature, "negatives"))
        picked = rng.sample(candidates, min(n, len(candidates)))
        out = []
        for c in picked:
            start = rng.randrange(max(1, len(c.tokens) - window + 1))
            out.append(c.window(0, window - 1, start=start))
        return out


def _query(store: FeatureStore, table_name: str, where: Filter, columns: list[str]) -> list[dict]:
    if table_name not in store.table_names():
        return []
    table = store.table(table_name)
    query = table.search().select(columns).limit(None)
    condition = where.render(table.schema)
    if condition is not None:
        query = query.where(condition)
    return query.to_arrow().to_pylist()
