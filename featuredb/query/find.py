"""Find by example, through the model: the features whose activation best separates the tokens
the user marked from the others.

    cat.find(["x = [[1]] + [[2]]", "print([[42]])"], negatives=["print(x)"]).where(layer=9).limit(5).to_polars()

Every positive text marks the tokens that carry the concept with `[[...]]`: a token counts as
marked when its characters overlap a mark's (so a mark that cuts a token in half marks the whole
token); a positive text without marks is positive throughout. Negative texts are negative
throughout and may hold no marks (there is no escape for a literal `[[` or `]]`). The positive
texts' unmarked tokens are negatives too; BOS never counts.

All texts go through the model together (`model_run.capture`: one forward pass for up to
forward.MAX_BATCH_TEXTS texts, serialised with every other request's), every chosen coder
encodes the same activations sparsely, and `separation` scores each feature that fires on a
marked token: f1 (default), auroc or precision (see featuredb.query.separation). Ties go to the
feature that fires on more marked tokens, then to the one whose mean activation on them is the
larger share of its max over the catalogue (`relative`: the marked tokens look like its top
examples; many features separate a few examples perfectly, and this keeps the ones that are
about them). `where` conditions are those of every query (coder_id,
layer, site, model, hook, density, max_activation) and are applied to the stored feature rows, so
a feature the catalogue does not store is never a result.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from featuredb.errors import QueryError, TooLarge
from featuredb.query.builder import MAX_LIMIT, QueryBuilder
from featuredb.query.model_run import capture, chosen_coders, loaded_coders, model_spec, shared_model, sparse_activations
from featuredb.query.reader import reading
from featuredb.query.separation import Separation, separation

if TYPE_CHECKING:
    from featuredb.query.forward import SharedModel
    from featuredb.query.reader import Reader

BY = ("f1", "auroc", "precision")
MAX_EXAMPLES = 32  # texts, positive and negative: one forward pass (forward.MAX_BATCH_TEXTS)
MAX_EXAMPLE_CHARS = 2_000
MAX_EXAMPLE_TOKENS = 256  # 32 x 256 = forward.MAX_BATCH_TOKENS: the longest texts still share a pass
MARK_OPEN, MARK_CLOSE = "[[", "]]"
_MARK = re.compile(r"\[\[|\]\]")
INFO_COLUMNS = ["coder_id", "feature", "description", "density", "max_activation"]
RESULT_SCHEMA = {
    "coder_id": pl.String, "feature": pl.Int64, "layer": pl.Int32, "site": pl.String, "score": pl.Float64,
    "f1": pl.Float64, "auroc": pl.Float64, "precision": pl.Float64,
    "marked_fired": pl.Int64, "marked_tokens": pl.Int64, "other_fired": pl.Int64, "other_tokens": pl.Int64,
    "mean_marked": pl.Float64, "relative": pl.Float64, "density": pl.Float64, "max_activation": pl.Float32,
    "description": pl.String,
}


# --- examples and their marks --------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One text as the model reads it (marks removed) and its marked character spans [start, end).
    A positive example without marks is positive throughout; a negative one has none."""

    text: str
    marks: tuple[tuple[int, int], ...]
    positive: bool

    def marked_tokens(self, spans: list[tuple[int, int]], name: str) -> list[bool]:
        """Which tokens (by their character spans) count as marked: those overlapping a mark."""
        if not self.positive:
            return [False] * len(spans)
        if not self.marks:
            return [True] * len(spans)
        # a zero-width token (one the tokenizer inserts) counts where it stands
        starts = np.array([s for s, _ in spans], dtype=np.int64)
        ends = np.array([max(e, s + 1) for s, e in spans], dtype=np.int64)
        marked = np.zeros(len(spans), dtype=bool)
        for low, high in self.marks:
            covers = (starts < high) & (ends > low)
            if not covers.any():
                raise QueryError(f"{name}: the mark {self.text[low:high]!r} (characters {low}-{high}) covers no token")
            marked |= covers
        return marked.tolist()


def parse_example(text: object, *, positive: bool, name: str) -> Example:
    """The example a text with `[[...]]` marks stands for; QueryError for bad marks, TooLarge for
    a text over MAX_EXAMPLE_CHARS."""
    if not isinstance(text, str):
        raise QueryError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXAMPLE_CHARS:
        raise TooLarge(f"{name} is {len(text):,} characters long; at most {MAX_EXAMPLE_CHARS:,}")
    if "\x00" in text:
        raise QueryError(f"{name} contains a NUL character")
    if not positive:
        if _MARK.search(text):
            raise QueryError(f"{name} holds a mark ({MARK_OPEN}...{MARK_CLOSE}): negative texts are negative "
                             "throughout, mark tokens in positive examples only")
        plain, marks = text, ()
    else:
        plain, marks = _strip_marks(text, name)
    if not plain.strip():
        raise QueryError(f"{name} is empty")
    return Example(plain, marks, positive)


def _strip_marks(text: str, name: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    pieces, marks, length, opened, last = [], [], 0, None, 0
    for match in _MARK.finditer(text):
        pieces.append(text[last:match.start()])
        length += match.start() - last
        last = match.end()
        if match.group() == MARK_OPEN:
            if opened is not None:
                raise QueryError(f"{name}: '{MARK_OPEN}' at character {match.start()} opens a mark inside a mark")
            opened = length
        elif opened is None:
            raise QueryError(f"{name}: '{MARK_CLOSE}' at character {match.start()} closes no mark")
        elif opened == length:
            raise QueryError(f"{name}: empty mark '{MARK_OPEN}{MARK_CLOSE}' at character {match.start() - 2}")
        else:
            marks.append((opened, length))
            opened = None
    if opened is not None:
        raise QueryError(f"{name}: a '{MARK_OPEN}' is never closed with '{MARK_CLOSE}'")
    pieces.append(text[last:])
    return "".join(pieces), tuple(marks)


def parse_examples(positives: object, negatives: object = None) -> tuple[Example, ...]:
    """Positive then negative examples from lists of texts (a lone string is one text)."""
    positives = _texts(positives, "positives")
    negatives = [] if negatives is None else _texts(negatives, "negatives")
    if not positives:
        raise QueryError("give at least one positive example")
    if len(positives) + len(negatives) > MAX_EXAMPLES:
        raise TooLarge(f"{len(positives) + len(negatives)} examples; at most {MAX_EXAMPLES} (positive and negative)")
    return (tuple(parse_example(t, positive=True, name=f"example {i + 1}") for i, t in enumerate(positives))
            + tuple(parse_example(t, positive=False, name=f"negative example {i + 1}") for i, t in enumerate(negatives)))


def _texts(value: object, what: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise QueryError(f"{what} must be a text or a list of texts, got {type(value).__name__}")
    return list(value)


@dataclass(frozen=True)
class _Tokenized:
    """The examples as the model read them: tokens in one run, BOS left out of every text."""

    token_ids: list[list[int]]  # per example
    tokens: list[list[str]]
    marked: np.ndarray  # bool over the run of every example's tokens

    @property
    def offsets(self) -> np.ndarray:
        """Where each example's tokens start in the run, and the run's end."""
        return np.cumsum([0] + [len(ids) for ids in self.token_ids])


def _tokenize(shared: SharedModel, examples: tuple[Example, ...]) -> _Tokenized:
    ids_of, tokens_of, marked = [], [], []
    for example, name in zip(examples, _names(examples)):
        ids, spans = shared.token_spans(example.text)
        if not ids:
            raise QueryError(f"{name} has no tokens")
        if len(ids) > MAX_EXAMPLE_TOKENS:
            raise TooLarge(f"{name} is {len(ids):,} tokens long; at most {MAX_EXAMPLE_TOKENS:,}")
        ids_of.append(ids)
        tokens_of.append(shared.decode(ids))
        marked.extend(example.marked_tokens(spans, name))
    flags = np.array(marked, dtype=bool)
    if flags.all():
        raise QueryError("every token is marked: add a negative example (--not) or mark only part of a positive one")
    return _Tokenized(ids_of, tokens_of, flags)


def _names(examples: tuple[Example, ...]) -> list[str]:
    positives = sum(e.positive for e in examples)
    return [f"example {i + 1}" if e.positive else f"negative example {i + 1 - positives}" for i, e in enumerate(examples)]


# --- the query -----------------------------------------------------------------------------------


@dataclass
class FindResult:
    """What `FindQuery.result` found: the examples as tokens, and the ranked features, each with
    its activation on every token of every example (`activations[row][example][token]`)."""

    model: str
    by: str
    examples: list[dict]  # text (marks removed), positive, tokens, marked (per token)
    features: pl.DataFrame
    activations: list[list[list[float]]]

    def to_dict(self) -> dict[str, Any]:
        rows = [{**row, "activations": values} for row, values in zip(self.features.to_dicts(), self.activations)]
        return {"model": self.model, "by": self.by, "examples": self.examples, "results": rows}


@dataclasses.dataclass(frozen=True)
class FindQuery(QueryBuilder):
    """Features ranked by how well they separate the marked tokens from the others (see the module
    docstring). Rows: RESULT_SCHEMA; `score` is the `by` metric."""

    examples: tuple[Example, ...]
    by: str = "f1"
    coders: tuple[str, ...] | None = None
    device: str | None = None
    model: str | None = None

    def _execute(self, n: int) -> pl.DataFrame:
        return self._run(n, with_activations=False).features

    def result(self) -> FindResult:
        """The rows of to_polars(), with the examples' tokens and each row's activations over them."""
        n = self.skip + self.k
        if n > MAX_LIMIT:
            raise QueryError(f"offset + limit is {n}; at most {MAX_LIMIT}")
        with reading(self.reader.uri):
            found = self._run(n, with_activations=True)
        found.features, found.activations = found.features.slice(self.skip), found.activations[self.skip:]
        return found

    def _run(self, n: int, with_activations: bool) -> FindResult:
        reader = self.reader
        coders = _may_match(chosen_coders(reader, list(self.coders) if self.coders else None), self.conditions)
        if coders.height == 0:
            return FindResult(self.model or "", self.by, [], pl.DataFrame(schema=RESULT_SCHEMA), [])
        spec = model_spec(coders, self.model)
        reader.check_loadable(coders, explicit_model=self.model)
        shared = shared_model(reader, spec, self.device)
        run = _tokenize(shared, self.examples)
        loaded = loaded_coders(reader, coders, shared.model)
        captured = capture(shared, run.token_ids, loaded)

        scored, entries = [], {}
        for coder in loaded:
            # every example's tokens in one run, BOS dropped from each
            inputs = {hook: _concat([c[hook][1:] for c in captured]) for hook in coder.hooks}
            position, feature, value = sparse_activations(coder, inputs)
            found = separation(position, feature, value, run.marked)
            scored.append(_frame(coder.coder_id, found, run.marked, self.by))
            if with_activations:
                keep = np.isin(feature, found.feature)
                entries[coder.coder_id] = (position[keep], feature[keep], value[keep])
        ranked = self._ranked(pl.concat(scored), n)

        examples = [{"text": e.text, "positive": e.positive, "tokens": tokens, "marked": flags.tolist()}
                    for e, tokens, flags in zip(self.examples, run.tokens, np.split(run.marked, run.offsets[1:-1]))]
        activations = _activations(ranked, entries, run.offsets) if with_activations else []
        return FindResult(spec, self.by, examples, ranked, activations)

    def _ranked(self, scored: pl.DataFrame, n: int) -> pl.DataFrame:
        """The best n scored features whose stored rows meet the where conditions."""
        info = self._stored(scored)
        out = self.reader.with_coder_columns(scored.join(info, on=["coder_id", "feature"], how="inner"))
        out = out.with_columns(relative=pl.when(pl.col("max_activation") > 0)
                               .then(pl.col("mean_marked") / pl.col("max_activation")).cast(pl.Float64))
        out = out.sort(["score", "marked_fired", "relative", "coder_id", "feature"],
                       descending=[True, True, True, False, False], nulls_last=True).head(n)
        return out.select([pl.col(c).cast(t) for c, t in RESULT_SCHEMA.items()])

    def _stored(self, scored: pl.DataFrame) -> pl.DataFrame:
        """INFO_COLUMNS of the scored features whose rows meet the conditions (one query per coder)."""
        table = self.reader.features_table()
        frames = [pl.DataFrame(schema={"coder_id": pl.String, "feature": pl.Int64, "description": pl.String,
                                       "density": pl.Float64, "max_activation": pl.Float32})]
        for (coder_id,), rows in scored.group_by(["coder_id"], maintain_order=True):
            where = self.conditions.to_filter().eq("coder_id", coder_id).isin("feature", rows["feature"].to_list())
            found = pl.from_arrow(table.search().where(where.render(table.schema)).select(INFO_COLUMNS)
                                  .limit(None).to_arrow())
            frames.append(found.select([pl.col(c).cast(t) for c, t in frames[0].schema.items()]))  # type: ignore[union-attr]
        return pl.concat(frames)


def check_by(by: object) -> str:
    if by not in BY:
        raise QueryError(f"by must be one of {', '.join(BY)}; got {by!r}")
    return str(by)


def _may_match(coders: pl.DataFrame, conditions) -> pl.DataFrame:
    """The coders whose features may meet the conditions: exact for coder_id and model; layer,
    site and hook only for single-layer coders (a multi-layer coder's features have their own)."""
    mask = pl.lit(True)
    single = pl.col("layers").is_null() if "layers" in coders.columns else pl.lit(True)
    for column, values in conditions.eq:
        matches = pl.col(column).is_in(list(values))
        mask = mask & (matches if column in ("coder_id", "model") else (matches | ~single))
    return coders.filter(mask)


def _concat(parts: list):
    import torch

    return torch.cat(parts, dim=0)


def _frame(coder_id: str, found: Separation, marked: np.ndarray, by: str) -> pl.DataFrame:
    n_marked = int(marked.sum())
    scores = {"f1": found.f1, "auroc": found.auroc, "precision": found.precision}
    return pl.DataFrame({
        "coder_id": pl.Series([coder_id] * len(found.feature), dtype=pl.String),
        "feature": found.feature, "score": scores[by], **scores,
        "marked_fired": found.marked_fired, "marked_tokens": np.full(len(found.feature), n_marked, dtype=np.int64),
        "other_fired": found.other_fired, "other_tokens": np.full(len(found.feature), len(marked) - n_marked, dtype=np.int64),
        "mean_marked": found.marked_sum / n_marked,
    })


def _activations(ranked: pl.DataFrame, entries: dict, offsets: np.ndarray) -> list[list[list[float]]]:
    """Each ranked feature's activation on every token, split by example."""
    out = []
    for coder_id, feature in ranked.select("coder_id", "feature").iter_rows():
        position, features, value = entries[coder_id]
        dense = np.zeros(int(offsets[-1]), dtype=np.float64)
        mine = features == feature
        dense[position[mine]] = value[mine]
        out.append([dense[lo:hi].tolist() for lo, hi in zip(offsets[:-1], offsets[1:])])
    return out


def find_query(reader: Reader, positives: object, negatives: object = None, *, by: str = "f1",
               coders: list[str] | str | None = None, device: str | None = None, model: str | None = None) -> FindQuery:
    """A FindQuery over the reader; the examples and options are checked now."""
    names = None if coders is None else tuple(chosen_coders(reader, coders)["coder_id"].to_list())  # checked now
    if device is not None and not isinstance(device, str):
        raise QueryError(f"device must be a string, got {device!r}")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise QueryError(f"model must be a non-empty string, got {model!r}")
    return FindQuery(reader, parse_examples(positives, negatives), by=check_by(by),
                     coders=names, device=device, model=model)


__all__ = ["BY", "Example", "FindQuery", "FindResult", "MAX_EXAMPLES", "MAX_EXAMPLE_CHARS", "MAX_EXAMPLE_TOKENS",
           "find_query", "parse_example", "parse_examples"]
