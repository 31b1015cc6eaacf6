"""Token search: the features whose stored top examples peak on a token or phrase (no model).

    cat.with_token(" Paris").where(layer=12).limit(10).to_polars()
"""

from __future__ import annotations

import dataclasses
import numbers

import polars as pl

from featuredb.errors import QueryError
from featuredb.store import EXAMPLES_TABLE, Filter
from featuredb.query.builder import QueryBuilder
from featuredb.query.search import RESULT_COLUMNS, RESULT_SCHEMA

# the search result columns, then how the token matched (score: matches / examples)
TOKEN_SCHEMA = {**{c: RESULT_SCHEMA[c] for c in RESULT_COLUMNS}, "matches": pl.UInt32, "examples": pl.UInt32,
                "score": pl.Float64, "example_max": pl.Float32}


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclasses.dataclass(frozen=True)
class TokenQuery(QueryBuilder):
    """Features whose top examples peak on a token (or contain a phrase around the peak).

    window=0 (default): a single word matches an example whose max-activating (peak) token,
    stripped and case-folded, equals it; a phrase matches where it occurs in the text around the
    peak and the occurrence overlaps the peak token. window=w > 0: the token or phrase occurs
    anywhere within w tokens of the peak (case- and whitespace-insensitive).

    Rows: the search result columns plus matches (top examples that match), examples (top
    examples stored), score = matches / examples and example_max (the highest matching example's
    activation). The `limit` features with the most matches are kept (ties: higher example_max),
    then ordered by matches, score, example_max. Scans the stored top examples: narrow it with
    where(coder_id=..., layer=...) on a large catalogue.
    """

    text: str
    window: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.window, numbers.Integral) or isinstance(self.window, bool) or not 0 <= self.window <= 64:
            raise QueryError(f"window must be an integer in [0, 64], got {self.window!r}")

    def _execute(self, n: int) -> pl.DataFrame:
        reader = self.reader
        phrase = _normalise(self.text)
        words = phrase.split()
        single = self.window == 0 and len(words) == 1
        lowered = " ".join(self.text.lower().split())
        first_word = lowered.split()[0]
        window = max(self.window, len(words))
        schema = {"coder_id": pl.String, "feature": pl.Int64, "matches": pl.UInt32, "example_max": pl.Float32}
        store = reader.store
        if not store.has_examples():
            return self._finish(pl.DataFrame(schema=schema), n)
        coders = self.conditions.matching_coders(reader.coder_table(refresh=True))
        if coders.height == 0:
            return self._finish(pl.DataFrame(schema=schema), n)
        where = Filter().eq("kind", "top")
        if self.conditions.eq:
            where = where.isin("coder_id", coders["coder_id"].to_list())
        hits = []
        if single and store.is_compact():
            # the peak token's string is its model's vocabulary's: no context is read, except for the
            # examples whose context keeps its own strings (peak_token -1)
            table = store.table(EXAMPLES_TABLE)
            for (model,), of_model in coders.group_by("model"):
                ids = [i for i, token in _token_ids_like(store, model, lowered) if _normalise(token) == phrase]
                if ids:
                    matching = where.isin("coder_id", of_model["coder_id"].to_list()).isin("peak_token", ids)
                    rows = (table.search().where(matching.render(table.schema))
                            .select(["coder_id", "feature", "max_value"]).limit(None).to_arrow())
                    hits.append(pl.from_arrow(rows))
            where = where.eq("peak_token", -1)
        for batch in store.iter_examples(where, ["coder_id", "feature", "tokens", "max_position", "max_value"]):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            if single:
                peak = pl.col("tokens").list.get(pl.col("max_position"), null_on_oob=True)
                found = frame.filter(peak.str.strip_chars().str.to_lowercase() == lowered)
                # str.to_lowercase is close to casefold; confirm exactly on the few candidates
                found = found.filter(pl.Series([
                    _normalise(t[p]) == phrase for t, p in zip(found["tokens"].to_list(), found["max_position"].to_list())
                ], dtype=pl.Boolean)) if found.height else found
            else:
                lo = (pl.col("max_position") - window).clip(lower_bound=0)
                text = pl.col("tokens").list.slice(lo, pl.col("max_position") + window + 1 - lo).list.join("")
                # cheap superset on the first word, then the exact check on the few candidates
                candidates = frame.filter(text.str.to_lowercase().str.contains(first_word, literal=True))
                keep = [_phrase_near_peak(t, p, phrase, window, at_peak=self.window == 0)
                        for t, p in zip(candidates["tokens"].to_list(), candidates["max_position"].to_list())]
                found = candidates.filter(pl.Series(keep, dtype=pl.Boolean)) if candidates.height else candidates
            if found.height:
                hits.append(found.select("coder_id", "feature", "max_value"))
        if not hits:
            return self._finish(pl.DataFrame(schema=schema), n)
        matched = (pl.concat(hits).group_by("coder_id", "feature")
                   .agg(pl.len().cast(pl.UInt32).alias("matches"), pl.col("max_value").max().alias("example_max")))
        return self._finish(matched, n)

    def _finish(self, matched: pl.DataFrame, n: int) -> pl.DataFrame:
        reader = self.reader
        if matched.height == 0:
            return pl.DataFrame(schema=TOKEN_SCHEMA)
        if self.conditions.ranges:  # feature-level filters need the features' stats first
            info = reader.feature_rows(list(matched.select("coder_id", "feature").iter_rows()),
                                       ["coder_id", "feature"] + [c for c, _, _ in self.conditions.ranges])
            kept = info.filter(self.conditions.in_ranges()).select("coder_id", "feature")
            matched = matched.join(kept, on=["coder_id", "feature"])
        top = matched.sort(["matches", "example_max", "coder_id", "feature"],
                           descending=[True, True, False, False]).head(n)
        if top.height == 0:
            return pl.DataFrame(schema=TOKEN_SCHEMA)
        totals = self._example_counts(top)
        info = reader.feature_rows(list(top.select("coder_id", "feature").iter_rows()), RESULT_COLUMNS)
        out = (top.join(info, on=["coder_id", "feature"], how="left")
               .join(totals, on=["coder_id", "feature"], how="left")
               .with_columns(score=(pl.col("matches").cast(pl.Float64) / pl.col("examples").cast(pl.Float64)))
               .sort(["matches", "score", "example_max", "coder_id", "feature"],
                     descending=[True, True, True, False, False]))
        return out.select([pl.col(c).cast(t) for c, t in TOKEN_SCHEMA.items()])

    def _example_counts(self, top: pl.DataFrame) -> pl.DataFrame:
        frames = []
        for (coder_id,), group in top.group_by("coder_id"):
            where = Filter().eq("coder_id", coder_id).eq("kind", "top").isin("feature", group["feature"].to_list())
            frames.append(pl.from_arrow(self.reader.store.read_examples(where, ["coder_id", "feature"])))
        counts = pl.concat(frames).group_by("coder_id", "feature").agg(pl.len().cast(pl.UInt32).alias("examples"))
        return counts


def _token_ids_like(store, model: str, lowered: str) -> list[tuple[int, str]]:
    """(id, string) of the model's tokens whose stripped, lower-cased string is `lowered` (a superset
    of the exact case-folded match)."""
    strings = store.vocabulary(model).strings
    frame = pl.DataFrame({"token": pl.Series(strings.cast("large_string"))}).with_row_index("id")
    return list(frame.filter(pl.col("token").str.strip_chars().str.to_lowercase() == lowered).iter_rows())


def _phrase_near_peak(tokens: list[str], peak: int, phrase: str, window: int, at_peak: bool) -> bool:
    """Whether `phrase` occurs in the text of tokens[peak - window : peak + window + 1] (case- and
    whitespace-insensitive); with at_peak, only an occurrence that overlaps the peak token counts."""
    lo = max(0, peak - window)
    pieces = tokens[lo:peak + window + 1]
    # normalised text with a map from each character back to its token
    chars: list[str] = []
    owner: list[int] = []
    for i, piece in enumerate(pieces):
        for ch in piece.casefold():
            if ch.isspace():
                if chars and chars[-1] != " ":
                    chars.append(" ")
                    owner.append(i)
                continue
            chars.append(ch)
            owner.append(i)
    text = "".join(chars)
    peak_index = peak - lo
    start = text.find(phrase)
    while start >= 0:
        if not at_peak or peak_index in owner[start:start + len(phrase)]:
            return True
        start = text.find(phrase, start + 1)
    return False
