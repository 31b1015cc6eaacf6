"""A describe run: every selected feature gets an offline label (`words`, the default, or `tokens`),
and with `--explainer llm|local` an LLM description (optionally scored) on top of a `words` label, written in chunks so a killed run loses at most a chunk.

Resumable and idempotent: a feature is skipped when the descriptions table already holds, for the
coder's current indexing, a description by the same method, explainer model and prompt version
(scored, when scores are asked for). LLM replies are cached on disk, so redoing a lost chunk costs
nothing. Every run ends by syncing the features table (best description, embeddings with the
requested model), which also repairs a run killed between its two commits.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL
from featuredb.store import FeatureStore
from featuredb.describe.evidence import FeatureEvidence, NegativePool, corpus_tokens, load_evidence
from featuredb.describe.explainers import TOKENS_METHOD, TOKENS_VERSION, ChatExplainer, tokens_label
from featuredb.describe.words import (WORDS_METHOD, WORDS_VERSION, analyse, evidence_record, forget_peak_facts,
                                     supported, words_label)
from featuredb.describe.llm_client import (
    ChatBackend,
    LLMError,
    OpenAIChatClient,
    ResponseCache,
    api_key_from_env,
    base_url_from_env,
)
from featuredb.describe.prompts import EXPLAIN_PROMPT_VERSION, WINDOW_AFTER, WINDOW_BEFORE
from featuredb.describe.scoring import Scorer, ScoreResult
from featuredb.describe.embedding_score import EmbeddingScoreConfig, EmbeddingScorer
from featuredb.store.descriptions import Embedder, SyncResult, current_descriptions, sync_features, write_descriptions
from featuredb.errors import DescribeError

EXPLAINERS = ("words", "tokens", "llm", "local")
OFFLINE_EXPLAINERS = ("words", "tokens")
CACHE_FILE = "_describe_cache.sqlite"
_REMOTE_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class DescribeConfig:
    db: str
    explainer: str = "words"
    coder_ids: list[str] = field(default_factory=list)  # empty: every coder
    limit: int | None = None  # at most this many features worked on in this run
    score: bool = False
    base_url: str | None = None  # llm: default from FEATUREDB_BASE_URL / OPENAI_BASE_URL
    model: str | None = None  # llm: model name; local: directory, .gguf file or hub id
    api_key: str | None = None  # llm: default from FEATUREDB_API_KEY / OPENAI_API_KEY
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0
    cache: str | None = None  # default: DB/_describe_cache.sqlite (or ~/.cache/featuredb for remote DBs)
    device: str | None = None  # local explainer
    n_top: int = 10  # top examples shown to the explainer
    n_interval: int = 6  # interval examples shown to the explainer
    n_score: int = 10  # activating (and as many non-activating) contexts per scorer
    chunk_size: int | None = None  # features per write (default: 1024 for tokens, 64 with an LLM)
    progress: bool = True
    embedding_score: bool = True  # score every description offline (describe/embedding_score.py)
    score_only: bool = False  # describe nothing: only score the stored descriptions that lack a score


@dataclass
class DescribeResult:
    coder_ids: list[str]
    features: int = 0  # features worked on in this run
    skipped: int = 0  # features already done
    tokens_labels: int = 0  # offline labels written (words or tokens)
    described: int = 0  # llm / local descriptions written
    scored: int = 0
    unparsed: int = 0  # llm / local replies without a usable description
    updated: int = 0  # feature rows whose current description changed
    embedded: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    embedding_scored: int = 0  # descriptions given an embedding score
    score_seconds: float = 0.0  # spent on them, embedding their context windows included
    windows_embedded: int = 0  # context windows embedded for them


def default_cache_path(db: str) -> Path:
    if _REMOTE_URI.match(db):
        return Path.home() / ".cache" / "featuredb" / "describe-cache.sqlite"
    return Path(db).expanduser() / CACHE_FILE


@contextmanager
def reply_cache(path: Path) -> Iterator[ResponseCache]:
    """The reply cache at `path` for the length of a run. A cache file the run created is removed
    again when the run leaves it empty (a failed first request, every feature already described):
    a cache worth keeping holds replies to reuse."""
    created = not path.exists()
    cache = ResponseCache(path)
    try:
        yield cache
    finally:
        if created and len(cache) == 0:
            cache.remove()


def make_backend(config: DescribeConfig, cache: ResponseCache) -> ChatBackend:
    if config.explainer == "llm":
        return OpenAIChatClient(
            config.base_url or base_url_from_env(), config.model or "",
            api_key=config.api_key if config.api_key is not None else api_key_from_env(), cache=cache,
            timeout=config.timeout, max_retries=config.max_retries, backoff=config.backoff,
            max_concurrency=config.concurrency,
        )
    from featuredb.describe.local import LocalChatModel

    return LocalChatModel(config.model or "", device=config.device, cache=cache)


def _check(config: DescribeConfig) -> None:
    if config.explainer not in EXPLAINERS:
        raise DescribeError(f"unknown explainer {config.explainer!r} (expected one of {', '.join(EXPLAINERS)})")
    if config.explainer not in OFFLINE_EXPLAINERS and not config.model:
        raise DescribeError(f"--explainer {config.explainer} needs --model")
    if config.score_only and (config.score or not config.embedding_score):
        raise DescribeError("--score-only computes the embedding score: it takes neither --score nor --no-embedding-score")
    if config.score and config.explainer in OFFLINE_EXPLAINERS:
        raise DescribeError("--score needs an LLM to score with: use --explainer llm or local")
    if config.limit is not None and config.limit < 1:
        raise DescribeError("--limit must be at least 1")
    if config.concurrency < 1 or (config.chunk_size is not None and config.chunk_size < 1):
        raise DescribeError("concurrency and chunk size must be at least 1")
    if not _REMOTE_URI.match(config.db) and not Path(config.db).expanduser().is_dir():
        raise DescribeError(f"database does not exist: {config.db}")


def run_describe(config: DescribeConfig, *, backend: ChatBackend | None = None,
                 embedder: Embedder | None = None) -> DescribeResult:
    """Describe the features of the catalogue at `config.db` (see the module docstring)."""
    started = time.perf_counter()
    _check(config)
    if embedder is None:
        from featuredb.runtime.embedding import embed as embedder
    store = FeatureStore(config.db)
    coders = {r["coder_id"]: r for r in store.coders().to_dicts()}
    if not coders:
        raise DescribeError(f"no coders in {config.db}: run `featuredb index` first")
    unknown = [s for s in config.coder_ids if s not in coders]
    if unknown:
        raise DescribeError(f"no coder {unknown[0]!r} in {config.db} (coders: {', '.join(sorted(coders))})")
    if config.explainer in OFFLINE_EXPLAINERS or backend is not None:
        result = _describe(store, sorted(coders), config, backend, embedder)
    else:
        with reply_cache(Path(config.cache or default_cache_path(config.db)).expanduser()) as cache:
            result = _describe(store, sorted(coders), config, make_backend(config, cache), embedder)
    result.seconds = time.perf_counter() - started
    return result


def _describe(store: FeatureStore, coders: list[str], config: DescribeConfig, backend: ChatBackend | None,
              embedder: Embedder) -> DescribeResult:
    """The run itself: plan, describe in chunks, sync every coder's feature rows."""
    selected = list(dict.fromkeys(config.coder_ids)) or coders
    result = DescribeResult(coder_ids=selected)
    chat = config.explainer not in OFFLINE_EXPLAINERS
    explainer = ChatExplainer(backend, config.explainer, config.n_top, config.n_interval) if chat else None
    scorer = Scorer(backend, config.n_score, n_top_shown=config.n_top, n_interval_shown=config.n_interval) \
        if config.score else None

    plans = {coder_id: _plan(store, coder_id, config, backend) for coder_id in selected}
    if config.score_only:
        for plan in plans.values():
            plan.skipped, plan.todo = plan.skipped + len(plan.todo), []
    embed_scorer = EmbeddingScorer(store, embedder, config.embedding_model, EmbeddingScoreConfig(
        n_top_shown=config.n_top, n_interval_shown=config.n_interval)) if config.embedding_score else None
    _add_corpus_tokens(store, plans, config.explainer)
    result.skipped = sum(p.skipped for p in plans.values())
    budget = config.limit
    for plan in plans.values():
        if budget is not None:
            plan.todo = plan.todo[:budget]
            budget -= len(plan.todo)
    total = sum(len(p.todo) for p in plans.values())
    chunk_size = config.chunk_size or (64 if chat else 1024)

    progress = _progress_bar(total, config.progress)
    workers = min(config.concurrency, getattr(backend, "max_concurrency", config.concurrency)) if chat else 1
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="describe") if chat else None
    try:
        for coder_id, plan in plans.items():
            negatives = NegativePool.load(store, coder_id) if scorer and plan.todo else None
            for start in range(0, len(plan.todo), chunk_size):
                chunk = plan.todo[start:start + chunk_size]
                _describe_chunk(store, coder_id, plan, chunk, config, explainer, scorer, negatives, pool,
                                progress, result, embed_scorer.reusing if embed_scorer else embedder, embed_scorer)
        if embed_scorer is not None:  # descriptions written before scoring existed, or by a run without it
            _score_stored(embed_scorer, selected, config)
        # Repair / re-embed anything out of line (cheap when nothing is). Every coder, not only the
        # selected ones, so a new --embedding-model leaves the catalogue with one embedding model.
        for coder_id in coders:
            result_sync = sync_features(store, coder_id, embedding_model=config.embedding_model, embedder=embedder)
            _add_sync(result, result_sync)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
        forget_peak_facts()
        if embed_scorer is not None:
            result.embedding_scored, result.score_seconds = embed_scorer.scored, embed_scorer.seconds
            result.windows_embedded = embed_scorer.windows.embedded
            result.embed_seconds += embed_scorer.description_seconds  # the descriptions' embeddings, reused
        stats = getattr(backend, "stats", None)
        if stats is not None:
            result.requests, result.cache_hits, result.retries = stats.requests, stats.cache_hits, stats.retries
    return result


@dataclass
class _Plan:
    indexed_at: dt.datetime
    top_k: int
    todo: list[int]
    need_offline: set[int]
    need_chat: set[int]
    skipped: int
    corpus_tokens: frozenset[str] | None = None  # token strings of the indexed text (words labels)


def _add_corpus_tokens(store: FeatureStore, plans: dict[str, _Plan], explainer: str) -> None:
    """Give each plan with words labels to write the tokens of its model's indexed text, read
    once per model (a label names only promoted tokens that occur there)."""
    if offline_method(explainer)[0] != WORDS_METHOD:
        return
    models = {r["coder_id"]: r["model"] for r in store.coders().to_dicts()}
    by_model: dict[str, frozenset[str]] = {}
    for coder_id, plan in plans.items():
        if plan.need_offline and plan.todo:
            model = models[coder_id]
            if model not in by_model:
                by_model[model] = corpus_tokens(store, model)
            plan.corpus_tokens = by_model[model]


def _plan(store: FeatureStore, coder_id: str, config: DescribeConfig, backend: ChatBackend | None) -> _Plan:
    coder = next(r for r in store.coders().to_dicts() if r["coder_id"] == coder_id)
    existing = current_descriptions(store, coder_id)
    method, version = offline_method(config.explainer)
    have_offline = {r["feature"] for r in existing if r["method"] == method and r["prompt_version"] == version}
    have_chat: set[int] = set()
    if backend is not None:
        have_chat = {
            r["feature"] for r in existing
            if r["method"] == config.explainer and r["explainer_model"] == backend.model
            and r["prompt_version"] == EXPLAIN_PROMPT_VERSION and (not config.score or r["score_details"] is not None)
        }
    rows = store.features(coder_id, columns=["feature", "active_count"]).to_dicts()
    need_offline = {r["feature"] for r in rows if r["feature"] not in have_offline}
    need_chat = {r["feature"] for r in rows if backend is not None and r["active_count"] > 0
                 and r["feature"] not in have_chat}
    todo = [r["feature"] for r in rows if r["feature"] in need_offline or r["feature"] in need_chat]
    return _Plan(coder["created_at"], int(coder["top_k"]), todo, need_offline, need_chat, len(rows) - len(todo))


def offline_method(explainer: str) -> tuple[str, str]:
    """The offline label a run writes for every feature: `tokens` when asked for, else `words`
    (the fallback under an LLM description too). Returns (method, version)."""
    return (TOKENS_METHOD, TOKENS_VERSION) if explainer == TOKENS_METHOD else (WORDS_METHOD, WORDS_VERSION)


def offline_label(explainer: str, ev: FeatureEvidence,
                  corpus_tokens: frozenset[str] | None = None) -> tuple[str, dict | None]:
    """The offline label of one feature and the evidence it rests on (words only)."""
    if explainer == TOKENS_METHOD:
        return tokens_label(ev), None
    claims = supported(analyse(ev))  # once: the label and its record both rest on them (half the labelling time)
    return words_label(ev, corpus_tokens, claims=claims), evidence_record(ev, claims=claims)


def _row(coder_id: str, feature: int, text: str, method: str, model: str | None, source: str | None,
         version: str, indexed_at: dt.datetime, scores: ScoreResult | None = None,
         evidence: dict | None = None) -> dict:
    # "evidence" is recorded where the descriptions table has that column (see descriptions_schema)
    return {
        "evidence": json.dumps(evidence, sort_keys=True) if evidence is not None else None,
        "coder_id": coder_id, "feature": feature, "description": text, "method": method,
        "explainer_model": model, "explainer_source": source, "prompt_version": version,
        "created_at": dt.datetime.now(dt.timezone.utc), "indexed_at": indexed_at,
        "detection_score": scores.detection if scores else None, "fuzz_score": scores.fuzz if scores else None,
        "detection_n": scores.detection_n if scores else None, "fuzz_n": scores.fuzz_n if scores else None,
        "score_details": json.dumps(scores.details, sort_keys=True) if scores else None,
    }


def _describe_chunk(store, coder_id, plan: _Plan, chunk: list[int], config: DescribeConfig,
                    explainer: ChatExplainer | None, scorer: Scorer | None, negatives: NegativePool | None,
                    pool: cf.ThreadPoolExecutor | None, progress, result: DescribeResult,
                    embedder: Embedder | None, embed_scorer: EmbeddingScorer | None = None) -> None:
    evidence = load_evidence(store, coder_id, chunk, plan.top_k)
    rows: list[dict] = []
    chat_features = [f for f in chunk if f in plan.need_chat and f in evidence
                     and (evidence[f].top or evidence[f].interval)] if explainer else []
    method, version = offline_method(config.explainer)
    for f in chunk:
        if f in plan.need_offline and f in evidence:
            text, record = offline_label(config.explainer, evidence[f], plan.corpus_tokens)
            rows.append(_row(coder_id, f, text, method, None, None, version, plan.indexed_at, evidence=record))
            result.tokens_labels += 1
        if f not in chat_features:
            progress.update(1)
    error: BaseException | None = None
    if chat_features:
        assert explainer is not None and pool is not None
        window = WINDOW_BEFORE + 1 + WINDOW_AFTER

        def work(ev: FeatureEvidence) -> tuple[str | None, ScoreResult | None]:
            text = explainer.describe(ev)
            if text is None or scorer is None:
                return text, None
            assert negatives is not None
            return text, scorer.score(text, ev, negatives.sample(ev, config.n_score, window))

        futures = {pool.submit(work, evidence[f]): f for f in chat_features}
        try:
            for future in cf.as_completed(futures):
                try:
                    text, scores = future.result()
                except LLMError as e:
                    error = e
                    for other in futures:
                        other.cancel()
                    continue
                except cf.CancelledError:
                    continue
                progress.update(1)
                if text is None:
                    result.unparsed += 1
                    continue
                rows.append(_row(coder_id, futures[future], text, explainer.method, explainer.backend.model,
                                 explainer.backend.source, explainer.prompt_version, plan.indexed_at, scores,
                                 evidence=evidence_record(evidence[futures[future]])))
                result.described += 1
                result.scored += scores is not None
        except BaseException:  # e.g. KeyboardInterrupt: keep what is done, then stop
            for other in futures:
                other.cancel()
            _write(store, coder_id, rows, config, result, embedder)
            raise
    result.features += len(chunk)
    if embed_scorer is not None:
        embed_scorer.fill(coder_id, rows, evidence)
    _write(store, coder_id, rows, config, result, embedder)
    if error is not None:
        raise DescribeError(str(error))


def _score_stored(embed_scorer: EmbeddingScorer, coder_ids: list[str], config: DescribeConfig) -> None:
    """Embedding scores for the coders' current descriptions that lack one (a bar of its own)."""
    todo = {coder_id: embed_scorer.unscored(coder_id) for coder_id in coder_ids}
    progress = _progress_bar(sum(len({r["feature"] for r in rows}) for rows in todo.values()), config.progress, "score")
    try:
        for coder_id, rows in todo.items():
            embed_scorer.score_stored(coder_id, rows, config.chunk_size or 1024, progress)
    finally:
        progress.close()


def _write(store, coder_id, rows, config, result, embedder) -> None:
    if rows:
        rows.sort(key=lambda r: (r["feature"], r["method"] not in OFFLINE_EXPLAINERS))
        _add_sync(result, write_descriptions(store, coder_id, rows, embedding_model=config.embedding_model,
                                             embedder=embedder))


def _add_sync(result: DescribeResult, sync: SyncResult) -> None:
    result.updated += sync.updated
    result.embedded += sync.embedded
    result.embed_seconds += sync.embed_seconds


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, what: str = "describe"):
    if not enabled or total == 0:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="feature", desc=what, file=sys.stderr, dynamic_ncols=True)
