"""The embedding score of a description, as delphi's embedding scorer defines it: offline, no LLM.

The description is embedded (the query side) and so is each of a set of short context windows:
activating ones (windows around the max of the feature's top and interval examples) and
non-activating ones (random windows from the catalogue's context store, plus windows where its
nearest features by decoder cosine fire most: hard negatives, the contexts a vague description
cannot tell apart). The score is the AUROC of description-vs-window cosine similarity separating
the activating windows from the others: 1.0 when every activating window is closer to the
description than every other window, 0.5 for a description no closer to where the feature fires
than to anywhere else. Ties count 1/2.

Cost. A window is embedded once per run however many features use it: windows sit on a fixed grid
(WINDOW tokens, starting every STRIDE tokens; a token belongs to the window whose middle half
holds it), and embeddings are cached by the window's text. A catalogue's windows are bounded by
its corpus (contexts indexed x context / STRIDE), so when features share contexts (the demo: 11k
features, 852 contexts) the run embeds at most that many windows, fewer than its descriptions;
when they share none, a feature costs at most n_activating + n_neighbours x per_neighbour new
windows (random windows are a fixed pool, embedded once). Scoring itself is one dot product per
(description, window): O(features x windows per feature x dim). The cache holds at most
`max_cached` float16 vectors (768 bytes each for MiniLM) and starts again when full.

Differences from delphi: delphi prefixes the query with an instruction for its instruction-tuned
embedding model; the catalogue's model (MiniLM by default) is symmetric and takes none, so the
description is embedded as search embeds it. A window counts as non-activating when the feature's
stored values show no activation in it, or when it lies in a context that is not among the
feature's examples: exact when the feature's top list is shorter than the coder's top-K (it fired
nowhere else), else its activation there is below its K-th top example's (`negatives_exact`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import time

import numpy as np

from featuredb.describe.evidence import Context, FeatureEvidence, feature_seed, load_evidence
from featuredb.describe.scoring import activating_samples
from featuredb.store import FEATURES_TABLE, FeatureStore, Filter
from featuredb.store.descriptions import Embedder, current_descriptions, set_embedding_scores
from featuredb.store.schema import CONTEXTS_TABLE

EMBEDDING_SCORE_METHOD = "embedding"
EMBEDDING_SCORE_VERSION = "embedding-v1"
WINDOW = 32  # tokens per embedded window (delphi's example length)
STRIDE = 16  # windows start every STRIDE tokens, so every token sits in the middle half of one


@dataclass
class EmbeddingScoreConfig:
    """How many windows of each kind one description is scored against."""

    n_activating: int = 20
    """activating windows: held-out examples first (see scoring.activating_samples), top and interval alternating"""
    n_random: int = 20
    """random non-activating windows, from a pool drawn once per model from the context store"""
    n_neighbours: int = 5
    """nearest features (by decoder cosine) whose strongest windows are hard negatives"""
    per_neighbour: int = 2
    """windows per nearest feature: its top examples' windows, where this feature is silent"""
    pool_size: int = 512
    """contexts in the random pool (one window each)"""
    n_top_shown: int = 10
    """top examples the explainer saw (the rest count as held out)"""
    n_interval_shown: int = 6
    """interval examples the explainer saw"""
    max_cached: int = 1 << 18
    """window embeddings kept at most (float16); the cache starts again when full"""
    batch_size: int = 256
    """windows per embedding call"""


@dataclass(frozen=True)
class EmbeddingScore:
    score: float | None  # None: no activating or no non-activating window
    details: dict = field(default_factory=dict)

    def details_json(self) -> str:
        return json.dumps(self.details, sort_keys=True)


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(a positive's value > a negative's) + 1/2 P(equal): the Mann-Whitney U over len(p) x len(n),
    from average ranks (ties share their rank). None when either side is empty."""
    positives, negatives = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = len(positives), len(negatives)
    if n_pos == 0 or n_neg == 0:
        return None
    values = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # rank of each distinct value = the average of the 1-based positions its copies take when sorted
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = average_rank[inverse[:n_pos]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def window_start(position: int, n_tokens: int) -> int:
    """The start of the grid window whose middle half holds token `position` (clamped to the context)."""
    start = STRIDE * ((position - STRIDE // 2) // STRIDE)
    return max(0, min(start, n_tokens - WINDOW))


def window_text(tokens: tuple[str, ...], start: int) -> str:
    return "".join(tokens[start:start + WINDOW])


def _context_key(context: Context) -> tuple[int, int]:
    """Identifies a context's text: its index in the indexing run and a digest of its tokens (two
    runs may number different texts alike)."""
    digest = hashlib.blake2b("\x00".join(context.tokens).encode(), digest_size=8).digest()
    return context.context_index, int.from_bytes(digest, "little")


class WindowEmbeddings:
    """Embeddings of window texts, each computed once (until `max_cached` are held)."""

    def __init__(self, embedder: Embedder, model: str, max_cached: int, batch_size: int) -> None:
        self.embedder, self.model, self.max_cached, self.batch_size = embedder, model, max_cached, batch_size
        self.rows: dict[str, int] = {}
        self.vectors = np.zeros((0, 0), dtype=np.float16)
        self.embedded = 0  # windows embedded in this run (a window evicted and needed again counts twice)

    def ensure(self, texts: list[str]) -> None:
        """Embed the texts not cached yet (in batches)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.rows))
        if not missing:
            return
        if len(self.rows) + len(missing) > self.max_cached:
            self.rows, self.vectors = {}, self.vectors[:0]  # start again: memory stays bounded
            missing = list(dict.fromkeys(texts))
        missing.sort(key=len)  # batches of like length pad little (the embedder sorts within a call only)
        new = [np.asarray(self.embedder(missing[i:i + self.batch_size], self.model), dtype=np.float32)
               for i in range(0, len(missing), self.batch_size)]
        block = np.concatenate(new).astype(np.float16)
        self.vectors = block if self.vectors.size == 0 else np.concatenate([self.vectors, block])
        base = len(self.rows)
        self.rows.update({text: base + i for i, text in enumerate(missing)})
        self.embedded += len(missing)

    def matrix(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32 (every text must be cached)."""
        return self.vectors[[self.rows[t] for t in texts]].astype(np.float32)


@dataclass
class _Windows:
    """One feature's windows: activating texts, hard and random non-activating texts."""

    activating: list[str]
    hard: list[str]
    random: list[str]
    negatives_exact: bool
    held_out: int


class EmbeddingScorer:
    """Scores descriptions of one catalogue's features (see the module docstring); windows are
    embedded with `embedder(texts, model)`, the catalogue's description embedder."""

    def __init__(self, store: FeatureStore, embedder: Embedder, model: str,
                 config: EmbeddingScoreConfig | None = None) -> None:
        self.store, self.model = store, model
        self.config = config or EmbeddingScoreConfig()
        self.embedder = embedder
        self.windows = WindowEmbeddings(embedder, model, self.config.max_cached, self.config.batch_size)
        self._pools: dict[str, list[tuple[tuple[int, int], str, int]]] = {}
        self._coders = {r["coder_id"]: r for r in store.coders().to_dicts()}
        # descriptions embedded for scoring, kept for the write that embeds them again (`reusing`)
        self._description_vectors: dict[str, np.ndarray] = {}
        self.scored = 0  # descriptions scored
        self.seconds = 0.0  # spent scoring (embeddings included)
        self.description_seconds = 0.0  # of which embedding descriptions

    # --- the windows of a feature ---------------------------------------------------------------

    def random_pool(self, model: str) -> list[tuple[tuple[int, int], str, int]]:
        """(context key, window text, window start) of up to pool_size contexts of `model` from the context store,
        the ones with the lowest fixed hash (a stable uniform sample), one grid window each."""
        if model not in self._pools:
            self._pools[model] = self._load_pool(model)
        return self._pools[model]

    def _load_pool(self, model: str) -> list:
        if CONTEXTS_TABLE not in self.store.table_names():
            return []
        table = self.store.table(CONTEXTS_TABLE)
        where = Filter().eq("model", model).render(table.schema)
        keys = table.search().where(where).select(["context_key"]).limit(None).to_arrow()["context_key"].to_numpy()
        chosen = sorted(set(keys.tolist()), key=lambda k: hashlib.sha256(str(k).encode()).digest())
        chosen = np.asarray(chosen[:self.config.pool_size], dtype=np.int64)
        rows = self.store.read_contexts(chosen, ["context_key", "context_index", "tokens"]).to_pylist()
        pool = []
        for r in sorted(rows, key=lambda r: r["context_key"]):
            tokens = tuple(r["tokens"][1:] if len(r["tokens"]) > 1 else r["tokens"])  # BOS dropped
            if not tokens:
                continue
            context = Context(tokens, (0.0,) * len(tokens), 0, r["context_index"], "none")
            start = window_start(random.Random(r["context_key"]).randrange(len(tokens)), len(tokens))
            pool.append((_context_key(context), window_text(tokens, start), start))
        return pool

    def neighbour_windows(self, coder_id: str, features: list[int]) -> dict[int, list[tuple[tuple[int, int], str, int]]]:
        """For each of `features`: (context key, window text, window start) around the max of its
        best `per_neighbour` top examples."""
        if not features or self.config.per_neighbour <= 0:
            return {}
        where = Filter().eq("coder_id", coder_id).isin("feature", sorted(set(features))).eq("kind", "top") \
            .between("rank", None, self.config.per_neighbour - 1)
        columns = ["feature", "rank", "tokens", "values", "max_position", "context_index"]
        out: dict[int, list] = {}
        for r in sorted(self.store.read_examples(where, columns).to_pylist(), key=lambda r: (r["feature"], r["rank"])):
            tokens, position = r["tokens"], r["max_position"]
            if len(tokens) > 1 and position > 0 and r["values"][0] == 0:  # BOS dropped, as evidence does
                tokens, position = tokens[1:], position - 1
            context = Context(tuple(tokens), (), position, r["context_index"])
            start = window_start(position, len(tokens))
            out.setdefault(r["feature"], []).append((_context_key(context), window_text(context.tokens, start), start))
        return out

    def feature_windows(self, ev: FeatureEvidence, model: str, neighbours: list[int],
                        neighbour_windows: dict[int, list]) -> _Windows:
        config = self.config
        positives, held_out = activating_samples(ev, config.n_activating, config.n_top_shown, config.n_interval_shown)
        activating = [window_text(c.tokens, window_start(c.max_position, len(c.tokens))) for c in positives]
        # what the feature is known to do in its own example contexts
        known = {_context_key(c): c.values for c in ev.top + ev.interval}
        taken = set(activating)

        def silent(key: tuple[int, int], text: str, start: int) -> bool:
            if text in taken:
                return False
            values = known.get(key)
            return values is None or max(values[start:start + WINDOW], default=0.0) <= 0.0

        hard: list[str] = []
        for n in neighbours[:config.n_neighbours]:
            for key, text, start in neighbour_windows.get(n, []):
                if silent(key, text, start):
                    hard.append(text)
                    taken.add(text)
        candidates = [text for key, text, start in self.random_pool(model) if silent(key, text, start)]
        rng = random.Random(feature_seed(ev.coder_id, ev.feature, "embedding-score"))
        randoms = rng.sample(candidates, min(config.n_random, len(candidates)))
        return _Windows(activating, hard, randoms, ev.negatives_exact, held_out)

    # --- scoring ------------------------------------------------------------------------------

    def score(self, coder_id: str, descriptions: list[tuple[int, str]],
              evidence: dict[int, FeatureEvidence]) -> list[EmbeddingScore]:
        """The score of each (feature, description) of one coder, `evidence` holding the features'
        evidence (load_evidence). Windows and descriptions are embedded in batches."""
        started = time.perf_counter()
        model = str(self._coders[coder_id]["model"])
        features = sorted({f for f, _ in descriptions if f in evidence})
        neighbours = self._neighbours(coder_id, features)
        wanted = sorted({n for f in features for n in neighbours.get(f, [])[:self.config.n_neighbours]})
        by_neighbour = self.neighbour_windows(coder_id, wanted)
        windows = {f: self.feature_windows(evidence[f], model, neighbours.get(f, []), by_neighbour) for f in features}
        self.windows.ensure([t for w in windows.values() for t in w.activating + w.hard + w.random])
        unique = list(dict.fromkeys(text for _, text in descriptions))
        embedding_started = time.perf_counter()
        vectors = np.asarray(self.embedder(unique, self.model), dtype=np.float32) if unique else np.zeros((0, 0))
        self.description_seconds += time.perf_counter() - embedding_started
        description_vector = dict(zip(unique, vectors))
        self._description_vectors = dict(description_vector)  # only the last batch's: memory stays bounded
        out = []
        for feature, text in descriptions:
            w = windows.get(feature)
            if w is None:
                out.append(EmbeddingScore(None, self._details(None, "no evidence stored")))
                continue
            negatives = w.hard + w.random
            query = description_vector[text]
            similarity = {t: float(s) for t, s in zip(w.activating + negatives,
                                                      self.windows.matrix(w.activating + negatives) @ query)}
            value = auroc(np.array([similarity[t] for t in w.activating]), np.array([similarity[t] for t in negatives]))
            reason = None if value is not None else ("no activating context" if not w.activating else "no non-activating context")
            out.append(EmbeddingScore(value, self._details(w, reason)))
        self.scored += len(out)
        self.seconds += time.perf_counter() - started
        return out

    def fill(self, coder_id: str, rows: list[dict], evidence: dict[int, FeatureEvidence]) -> None:
        """Set `embedding_score` and `embedding_score_details` of descriptions rows (dicts with
        feature and description) in place."""
        if not rows:
            return
        for row, result in zip(rows, self.score(coder_id, [(r["feature"], r["description"]) for r in rows], evidence)):
            row["embedding_score"] = result.score
            row["embedding_score_details"] = result.details_json()

    def reusing(self, texts: list[str], model: str) -> np.ndarray:
        """An Embedder for the write that follows scoring: the descriptions just scored are not
        embedded a second time."""
        if model != self.model or any(t not in self._description_vectors for t in texts):
            return np.asarray(self.embedder(texts, model), dtype=np.float32)
        return np.stack([self._description_vectors[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def unscored(self, coder_id: str) -> list[dict]:
        """The coder's current descriptions with no score from this scorer version and embedding
        model (written before it existed, by a run that did not score, or with another model)."""
        return [r for r in current_descriptions(self.store, coder_id)
                if not score_is_current(r.get("embedding_score_details"), self.model)]

    def score_stored(self, coder_id: str, rows: list[dict], chunk_size: int = 1024, progress=None) -> None:
        """Score stored descriptions rows of the coder (`unscored`), a chunk of features at a time,
        each chunk one commit (a killed run keeps what it scored)."""
        by_feature: dict[int, list[dict]] = {}
        for r in rows:
            by_feature.setdefault(r["feature"], []).append(r)
        features = sorted(by_feature)
        top_k = int(self._coders[coder_id]["top_k"])
        for start in range(0, len(features), chunk_size):
            chunk = features[start:start + chunk_size]
            todo = [r for f in chunk for r in by_feature[f]]
            self.fill(coder_id, todo, load_evidence(self.store, coder_id, chunk, top_k))
            set_embedding_scores(self.store, coder_id, todo)
            if progress is not None:
                progress.update(len(chunk))

    def _neighbours(self, coder_id: str, features: list[int]) -> dict[int, list[int]]:
        if not features or self.config.n_neighbours <= 0:
            return {}
        table = self.store.table(FEATURES_TABLE)
        where = Filter().eq("coder_id", coder_id).isin("feature", features).render(table.schema)
        rows = table.search().where(where).select(["feature", "neighbours"]).limit(None).to_arrow()
        return {f: list(n or []) for f, n in zip(rows["feature"].to_pylist(), rows["neighbours"].to_pylist())}

    def _details(self, windows: _Windows | None, reason: str | None) -> dict:
        details: dict = {"method": EMBEDDING_SCORE_METHOD, "version": EMBEDDING_SCORE_VERSION,
                         "embedding_model": self.model, "window": WINDOW}
        if windows is not None:
            details.update(activating=len(windows.activating), held_out=windows.held_out,
                           hard_negatives=len(windows.hard), random_negatives=len(windows.random),
                           non_activating_exact=windows.negatives_exact)
        if reason is not None:
            details["unscored"] = reason
        return details


def score_is_current(details: str | None, embedding_model: str) -> bool:
    """Whether a stored embedding_score_details says the score was made by this scorer version
    with this embedding model (else it is computed again)."""
    if not details:
        return False
    try:
        parsed = json.loads(details)
    except ValueError:
        return False
    return parsed.get("version") == EMBEDDING_SCORE_VERSION and parsed.get("embedding_model") == embedding_model
