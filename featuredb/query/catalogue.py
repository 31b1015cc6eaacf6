"""`featuredb.open(path_or_uri)` -> Catalogue: find features by concept, by activation and by
similarity, in the fluent style of LanceDB's own API.

    cat = featuredb.open("./catalogue")
    cat.search("French cities").where(layer=12).limit(10).to_polars()     # semantic
    cat.keyword("Paris").to_polars()                                      # BM25 full text
    cat.hybrid("Paris").to_polars()                                       # both, RRF-fused
    cat.feature("res-layer_12-width_16k", 123)                            # dict: everything
    cat.fires_on("The Eiffel tower is in Paris")                          # runs the model
    cat.find(["The [[Eiffel]] tower", "[[Paris]] in May"]).to_polars()    # runs the model
    cat.steer(["res-layer_12-width_16k/123:4"], "I went to")              # generates twice
    cat.with_token(" Paris").to_polars()                                  # stored contexts only
    cat.similar("res-layer_12-width_16k", 123).to_polars()                # decoder cosine

Every error caused by the query or the catalogue is a QueryError (a ValueError) with a one-line
message. Searches return polars DataFrames; `feature` returns a plain dict. The Catalogue only
delegates: reads and caches are the Reader's (featuredb.query.reader), queries are builders.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import polars as pl

from featuredb.errors import QueryError
from featuredb.query.builder import check_text
from featuredb.query.feature_view import feature_dict, feature_index
from featuredb.query.find import FindQuery, find_query
from featuredb.query.fires_on import FiresOn, fires_on
from featuredb.query.reader import Reader
from featuredb.query.search import SearchQuery, finite_vector
from featuredb.query.similar import SimilarQuery
from featuredb.query.steer import DEFAULT_TOKENS, Steered, steer
from featuredb.query.tokens import TokenQuery
from featuredb.store import indexes

DEFAULT_DB = "./featuredb-demo/catalogue"


def default_db() -> str:
    return os.environ.get("FEATUREDB_DB") or DEFAULT_DB


def open(path_or_uri: str | os.PathLike | None = None, *, embedding_model: str | None = None,  # noqa: A001
         trust_models: bool = False) -> Catalogue:
    """Open a catalogue written by `featuredb index` (a local directory or an object-store URI).
    `embedding_model` overrides the sentence-transformers model used to embed queries (by default
    the one recorded beside the stored description vectors). The models, coder weights and
    embedding model that coders from `featuredb import` name are the export's choice, so they
    load only with trust_models=True (or, for the subject model, fires_on(model=...))."""
    return Catalogue(default_db() if path_or_uri is None else path_or_uri, embedding_model=embedding_model,
                     trust_models=trust_models)


class Catalogue:
    """A read-mostly view of a feature catalogue (see the module docstring)."""

    def __init__(self, uri: str | os.PathLike, *, embedding_model: str | None = None, trust_models: bool = False) -> None:
        self.reader = Reader(uri, embedding_model=embedding_model, trust_models=trust_models)
        self.store, self.uri = self.reader.store, self.reader.uri

    def __repr__(self) -> str:
        return f"Catalogue({self.uri!r})"

    def coders(self) -> pl.DataFrame:
        """The coders in the catalogue, sorted by coder_id."""
        return self.reader.coder_table(refresh=True)

    def embedding_model(self) -> str:
        """The model that embeds queries (see Reader.embedding_model)."""
        return self.reader.embedding_model()

    def search(self, query: str | np.ndarray | list[float]) -> SearchQuery:
        """Semantic search over descriptions: the text is embedded with the catalogue's embedding
        model (or give the query vector itself). Score: cosine similarity."""
        if isinstance(query, str):
            return SearchQuery(self.reader, "semantic", text=check_text(query))
        if query is None:
            raise QueryError("query is empty")
        return SearchQuery(self.reader, "semantic", vector=self._vector(query))

    def keyword(self, text: str) -> SearchQuery:
        """Full-text (BM25) search over descriptions. Score: BM25."""
        return SearchQuery(self.reader, "keyword", text=check_text(text))

    def hybrid(self, text: str, *, vector: np.ndarray | list[float] | None = None) -> SearchQuery:
        """Semantic and keyword search, fused by reciprocal rank. Score: RRF. `vector` is an
        optional precomputed embedding of the text (otherwise the text is embedded)."""
        text = check_text(text)
        return SearchQuery(self.reader, "hybrid", text=text, vector=None if vector is None else self._vector(vector))

    def _vector(self, vector: object) -> tuple[float, ...]:
        return finite_vector(vector, self.reader.vector_dim())

    def feature(self, coder_id: str, index: int) -> dict[str, Any]:
        """Everything stored about one feature: coder, statistics, histogram, logits, neighbours,
        descriptions, top tokens, top and interval examples."""
        coder = self.reader.coder_row(coder_id)
        return feature_dict(coder, self.reader.stored_feature(coder_id, feature_index(index, coder)))

    def fires_on(self, text: str, coders: list[str] | str | None = None, *, by: str = "max",
                 positions: list[int] | None = None, max_density: float | None = None, limit: int = 20,
                 per_token: int = 5, device: str | None = None, model: str | None = None) -> FiresOn:
        """Run `text` through the model and the chosen coders (default: all) and return the features
        that fire. `model` runs that subject model instead of the one the coders record. Safe to
        call from many threads at once. See featuredb.query.fires_on."""
        return fires_on(self.reader, text, coders=coders, by=by, positions=positions, max_density=max_density,
                        limit=limit, per_token=per_token, device=device, model=model)

    def find(self, positives: str | list[str], negatives: str | list[str] | None = None, *, by: str = "f1",
             coders: list[str] | str | None = None, device: str | None = None, model: str | None = None) -> FindQuery:
        """Features that separate the tokens marked `[[like this]]` in the positive texts from every
        other token (a positive text without marks counts throughout; negatives, never), ranked
        by f1, auroc or precision. Runs the model once for all texts. See featuredb.query.find."""
        return find_query(self.reader, positives, negatives, by=by, coders=coders, device=device, model=model)

    def steer(self, features: str | list, prompt: str, *, tokens: int = DEFAULT_TOKENS, temperature: float = 0.0,
              seed: int = 0, device: str | None = None, model: str | None = None) -> Steered:
        """Generate from `prompt` twice, unsteered and with each feature's decoder direction added
        where its coder writes, at every position, scaled by strength x its max activation.
        `features`: "CODER_ID/INDEX[:STRENGTH]" strings, (coder_id, index[, strength]) tuples or
        {"coder_id", "feature", "strength"} dicts (strength 1 by default; at most 8 features).
        Greedy unless temperature > 0 (then sampled with `seed`). See featuredb.query.steer."""
        return steer(self.reader, features, prompt, tokens=tokens, temperature=temperature, seed=seed, device=device,
                     model=model)

    def with_token(self, token_or_phrase: str, *, window: int = 0) -> TokenQuery:
        """Features whose stored top examples peak on this token (or, with a phrase or a window,
        whose context around the peak contains it). No model needed."""
        return TokenQuery(self.reader, check_text(token_or_phrase, "token or phrase", 200), window=window)

    def similar(self, coder_id: str, index: int, *, across: bool = True, by: str = "decoder") -> SimilarQuery:
        """Nearest features by decoder-direction cosine: within the coder, and with across=True in
        every coder of the same model whose decoder lives in the same space. by="cooccurrence":
        the features firing on the same tokens most (Jaccard; counted while indexing)."""
        coder = self.reader.coder_row(coder_id)
        return SimilarQuery(self.reader, coder["coder_id"], feature_index(index, coder), across=bool(across), by=by)

    def map_selection(self, coders: list[str] | str | None = None):
        """Which group of the map these coders are in (default: the largest group's coders); see
        featuredb.query.feature_map.select."""
        from featuredb.query import feature_map

        chosen = [coders] if isinstance(coders, str) else list(coders or [])
        known = set(self.reader.coder_table(refresh=bool(chosen))["coder_id"].to_list())
        return feature_map.select(self.store, chosen, known)

    def map(self, coders: list[str] | str | None = None) -> pl.DataFrame:
        """The 2-D map coordinates of the chosen coders' features (default: the largest mapped
        group): coder_id, feature, layer, density, x, y. Computed by `featuredb map` / finalize."""
        from featuredb.query import feature_map

        return feature_map.points(self.store, self.map_selection(coders))

    def warm(self) -> None:
        """Load the search indexes into memory now (a server calls this at start)."""
        self.reader.warm()

    def create_indexes(self, **options: Any) -> dict[str, list[str]]:
        """Build the vector, full-text and scalar indexes (see featuredb.store.indexes)."""
        return indexes.create_indexes(self.store, **options)

    def optimize(self, **options: Any) -> dict[str, list[str]]:
        """Fold new rows into the indexes, compact files, and create indexes that are missing."""
        return indexes.optimize(self.store, **options)


__all__ = ["Catalogue", "DEFAULT_DB", "default_db", "open"]
