"""featuredb describe: tokens labels, the LLM explainer against a fake OpenAI-compatible server
(prompt, retries, errors, concurrency, caching), scores, the local explainer, the write path and
embeddings."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL
from featuredb.describe import (
    DESCRIPTIONS_TABLE,
    EXPLAIN_PROMPT_VERSION,
    TOKENS_VERSION,
    Context,
    DescribeConfig,
    DescribeError,
    FeatureEvidence,
    LLMError,
    OpenAIChatClient,
    ResponseCache,
    balanced_accuracy,
    chat_endpoint,
    current_descriptions,
    explainer_messages,
    load_evidence,
    parse_explanation,
    parse_labels,
    run_describe,
    tokens_label,
    write_descriptions,
)
from featuredb.describe.prompts import DETECTION_SYSTEM, EXPLAIN_SYSTEM, FUZZ_SYSTEM
from featuredb.cli import main
from catalogue_fixtures import empty_columns
from featuredb.store import FeatureStore, StoreError

SAE = "toy"
CREATED = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
CITIES = (" Paris", " London", " Berlin", " Rome", " Madrid")

# (tokens, index of the activating token, its value) per example; every window starts with BOS.
FEATURE_CONTEXTS = {
    0: {  # capital cities, promotes " is" / " was"
        "top": [("The capital of France is Paris .", 5, 9.0), ("He flew from London to Paris today", 5, 8.0),
                ("The capital of Germany is Berlin .", 5, 7.5), ("We met in Paris last spring", 3, 7.0),
                ("The capital of England is London now", 5, 6.0)],
        "interval": [("She visited Rome once", 2, 2.0), ("A train to Madrid left", 3, 1.0)],
        "logits": ([" is", " was", " has"], [2.0, 1.5, 1.0]),
    },
    1: {  # python function definitions
        "top": [("def add ( a , b ) :", 0, 8.0), ("class A : def run ( self )", 3, 7.0),
                ("x = 1 def f ( ) :", 3, 6.5)],
        "interval": [("print ( def )", 2, 1.5)],
        "logits": ([" (", " main"], [1.2, 0.4]),
    },
    2: None,  # dead: never active
    3: {  # numbers
        "top": [("In 1999 the numbers 42 and 7", 4, 5.0), ("count 1 2 3 42 go", 4, 4.0)],
        "interval": [],
        "logits": ([], []),
    },
}

FLOAT16 = {"rtol": 2e-3, "atol": 1e-4}  # description vectors are stored as float16


def _toks(text: str) -> list[str]:
    words = text.split(" ")
    return ["<bos>", words[0]] + [" " + w for w in words[1:]]


def toy_rows(coder_id: str = SAE, *, created: dt.datetime = CREATED):
    features, examples = empty_columns()
    context_index = 0
    for f, spec in FEATURE_CONTEXTS.items():
        contexts = spec or {"top": [], "interval": [], "logits": ([], [])}
        peak = max((v for _, _, v in contexts["top"]), default=0.0)
        logit_tokens, logit_values = contexts["logits"]
        for name, value in dict(
            coder_id=coder_id, feature=f, model="toy-model", layer=1, hook="blocks.1.hook_resid_post", site="res",
            active_count=len(contexts["top"]) + len(contexts["interval"]),
            density=0.01 if spec else 0.0, max_activation=peak, mean_activation=peak / 2, std_activation=1.0,
            hist_counts=[1, 2], hist_max=16.0, top_logit_tokens=logit_tokens,
            top_logit_ids=list(range(len(logit_tokens))), top_logit_values=logit_values,
            bottom_logit_tokens=[" the"], bottom_logit_ids=[99], bottom_logit_values=[-1.0],
            neighbours=[], neighbour_cosines=[], top_tokens=[], top_token_counts=[],
            description=None, description_method=None, description_model=None, embedding_model=None, vector=None,
        ).items():
            features[name].append(value)
        for kind in ("top", "interval"):
            for rank, (text, position, value) in enumerate(contexts[kind]):
                tokens = _toks(text)
                values = [0.0] * len(tokens)
                values[position + 1] = value
                if position + 2 < len(tokens):
                    values[position + 2] = value / 10
                row = dict(coder_id=coder_id, feature=f, kind=kind, rank=rank,
                           bin_min=None if kind == "top" else value - 0.5,
                           bin_max=None if kind == "top" else value + 0.5,
                           tokens=tokens, token_ids=list(range(len(tokens))), values=values,
                           max_value=max(values), max_position=int(np.argmax(values)), doc_id=f"doc{context_index}",
                           context_index=context_index)
                context_index += 1
                for name, v in row.items():
                    examples[name].append(v)
    sae = dict(coder_id=coder_id, model="toy-model", hook="blocks.1.hook_resid_post", hook_out="blocks.1.hook_resid_post",
               site="res", layer=1, architecture="jumprelu", kind="sae", d_in=8, d_out=8, width=8,
               source="test", tokens_indexed=1000, contexts_indexed=context_index, context=16, top_k=4,
               created_at=created)
    return sae, features, examples


def make_catalogue(path, coder_ids=(SAE,)) -> FeatureStore:
    store = FeatureStore(path)
    for coder_id in coder_ids:
        store.write_coder(*toy_rows(coder_id))
    return store


def fake_embed(texts: list[str], name: str) -> np.ndarray:
    """Deterministic unit vectors (the real MiniLM is exercised in its own test)."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for i, text in enumerate(texts):
        seed = int.from_bytes(hashlib.sha256(f"{name}|{text}".encode()).digest()[:4], "little")
        v = np.random.default_rng(seed).standard_normal(384)
        out[i] = v / np.linalg.norm(v)
    return out


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "db"
    make_catalogue(path)
    return path


# --- a fake OpenAI-compatible server -----------------------------------------------------------

KEYWORDS = {"capital cities": CITIES, "Python function": (" def", "def"), "numbers": (" 42", " 7", " 1999")}


def fake_reply(messages: list[dict]) -> str:
    """An 'oracle' model: explains by the prompt's tokens, classifies by the description's keywords."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if system == EXPLAIN_SYSTEM:
        if "Paris" in user:
            return "Thinking about it...\n[EXPLANATION]: Names of European capital cities"
        if "<<def>>" in user or "<< def>>" in user:
            return "[EXPLANATION]: The keyword def in Python function definitions"
        return "[EXPLANATION]: Small numbers written as digits"
    description = re.search(r"Feature description: (.*)", user).group(1)
    words = next((w for key, w in KEYWORDS.items() if key.lower() in description.lower()), ())
    examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
    if system == DETECTION_SYSTEM:
        labels = [int(any(w in text for w in words)) for text in examples]
    elif system == FUZZ_SYSTEM:
        labels = [int(any(w in span for span in re.findall(r"<<(.*?)>>", text) for w in words)) for text in examples]
    else:
        raise AssertionError(f"unexpected system prompt {system[:60]!r}")
    return "Answer: " + json.dumps(labels)


class FakeServer:
    """A /v1/chat/completions server on 127.0.0.1 with scripted failures, delays and a request log."""

    def __init__(self):
        self.requests: list[dict] = []
        self.failures: list[tuple[int, dict]] = []  # (status, headers) returned before normal replies
        self.always: tuple[int, str] | None = None  # (status, body) for every request
        self.delays: list[float] = []  # per request, popped in order
        self.reply = fake_reply
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failure = server.failures.pop(0) if server.failures else None
                    delay = server.delays.pop(0) if server.delays else 0.0
                try:
                    time.sleep(delay)
                    if server.always is not None:
                        status, data, headers = server.always[0], server.always[1].encode(), None
                    elif failure is not None:
                        status, data, headers = failure[0], b'{"error": {"message": "try later"}}', failure[1]
                    else:
                        text = server.reply(body["messages"])
                        payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                "finish_reason": "stop"}]}
                        status, data, headers = 200, json.dumps(payload).encode(), None
                finally:
                    # Out of flight before the reply leaves: a client holding its reply may send the
                    # next request at once, and that one must not be counted alongside this one.
                    with server.lock:
                        server.in_flight -= 1
                try:
                    self._send(status, data, headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status, data, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat_requests(self, system: str) -> list[dict]:
        return [r for r in self.requests if r["body"]["messages"][0]["content"] == system]


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def llm_config(db, server, **kw) -> DescribeConfig:
    options = dict(db=str(db), explainer="llm", base_url=server.url, model="fake-model", api_key="sk-test",
                   backoff=0.01, timeout=5.0, progress=False)
    options.update(kw)
    return DescribeConfig(**options)


def descriptions(store: FeatureStore) -> dict[int, str | None]:
    return {r["feature"]: r["description"] for r in store.features(SAE).to_dicts()}


# --- tokens explainer ----------------------------------------------------------------------------


def test_tokens_labels_name_the_activating_tokens_and_logits(db):
    result = run_describe(DescribeConfig(db=str(db), explainer="tokens", progress=False), embedder=fake_embed)
    assert (result.features, result.tokens_labels, result.described) == (4, 4, 0)
    store = FeatureStore(db)
    labels = descriptions(store)
    # Paris is the most frequent max-activating token (then by activation); promoted tokens last
    assert labels[0] == "' Paris', ' Berlin', ' London' (after ' is') — promotes ' is', ' was', ' has'"
    assert labels[1] == "' def', 'def' — promotes ' (', ' main'"
    assert labels[2] == "never active in the indexed text"
    assert labels[3].startswith("' 42'") and "promotes" not in labels[3]
    rows = store.features(SAE).to_dicts()
    assert {r["description_method"] for r in rows} == {"tokens"}
    assert {r["description_model"] for r in rows} == {None}
    assert {r["embedding_model"] for r in rows} == {DEFAULT_EMBEDDING_MODEL}
    assert all(np.allclose(r["vector"], fake_embed([r["description"]], DEFAULT_EMBEDDING_MODEL)[0], **FLOAT16)
               for r in rows)
    history = current_descriptions(store, SAE)
    assert len(history) == 4
    for row in history:
        assert (row["method"], row["explainer_model"], row["prompt_version"]) == ("tokens", None, TOKENS_VERSION)
        assert row["indexed_at"] == CREATED
        assert abs(row["created_at"] - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
        assert row["detection_score"] is None and row["score_details"] is None


def test_tokens_run_is_idempotent(db):
    run_describe(DescribeConfig(db=str(db), progress=False), embedder=fake_embed)
    store = FeatureStore(db)
    versions = {name: store.table(name).version for name in ("features", DESCRIPTIONS_TABLE)}
    again = run_describe(DescribeConfig(db=str(db), progress=False), embedder=fake_embed)
    assert (again.features, again.skipped, again.embedded) == (0, 4, 0)
    assert {name: store.table(name).version for name in versions} == versions


def test_tokens_label_ngram_and_fallbacks():
    def ctx(text, pos, value, i):
        tokens = tuple(_toks(text)[1:])
        values = [0.0] * len(tokens)
        values[pos] = value
        return Context(tokens, tuple(values), pos, i)

    ev = FeatureEvidence(SAE, 0, 3, 0.1, 5.0, top=[
        ctx("the capital of Paris", 3, 5.0, 0), ctx("a capital of Paris", 3, 4.0, 1), ctx("capital of Rome", 2, 3.0, 2),
    ], top_logits=[(" is", 1.0), (" bad", -1.0)], top_k=4)
    assert tokens_label(ev) == "' Paris', ' Rome' (as in ' capital of Paris') — promotes ' is'"
    only_top_tokens = FeatureEvidence(SAE, 1, 5, 0.1, 1.0, top_tokens=[("\n", 3), (" cat", 2)])
    assert tokens_label(only_top_tokens) == "' cat'"
    assert tokens_label(FeatureEvidence(SAE, 2, 0, 0.0, 0.0)) == "never active in the indexed text"


# --- llm explainer against a fake server ---------------------------------------------------------


def test_llm_sends_the_expected_prompt(db, server):
    result = run_describe(llm_config(db, server), embedder=fake_embed)
    assert result.described == 3 and result.tokens_labels == 4 and result.unparsed == 0
    explain = server.chat_requests(EXPLAIN_SYSTEM)
    assert len(explain) == 3  # the dead feature is not sent
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test"}
    body = explain[0]["body"]
    assert body["model"] == "fake-model" and body["temperature"] == 0.0
    evidence = load_evidence(FeatureStore(db), SAE, [0], top_k=4)[0]
    sent = next(r["body"]["messages"] for r in explain if "Paris" in r["body"]["messages"][1]["content"])
    assert sent == explainer_messages(evidence)
    user = sent[1]["content"]
    assert "Example 1: The capital of France is<< Paris>> ." in user  # the BOS is not shown
    assert 'Activations: (" Paris", 10)' in user
    assert "Examples from lower activation ranges:" in user and "<< Rome>>" in user
    assert "Tokens the feature promotes: ' is', ' was', ' has'" in user
    assert "Tokens the feature suppresses: ' the'" in user

    store = FeatureStore(db)
    labels = descriptions(store)
    assert labels[0] == "Names of European capital cities"
    assert labels[1] == "The keyword def in Python function definitions"
    assert labels[2].startswith("never active")  # dead: keeps its tokens label
    row = store.feature_row(SAE, 0)
    assert (row["description_method"], row["description_model"]) == ("llm", "fake-model")
    llm_rows = [r for r in current_descriptions(store, SAE) if r["method"] == "llm"]
    assert {(r["explainer_model"], r["explainer_source"], r["prompt_version"]) for r in llm_rows} == {
        ("fake-model", server.url + "/chat/completions", EXPLAIN_PROMPT_VERSION)}


def test_llm_scores_are_computed_and_stored(db, server):
    result = run_describe(llm_config(db, server, score=True, concurrency=2), embedder=fake_embed)
    assert result.scored == 3
    assert server.max_in_flight <= 2
    store = FeatureStore(db)
    rows = {r["feature"]: r for r in current_descriptions(store, SAE) if r["method"] == "llm"}
    city = rows[0]
    # the oracle answers right, so both scores are perfect
    assert city["detection_score"] == pytest.approx(1.0) and city["fuzz_score"] == pytest.approx(1.0)
    details = json.loads(city["score_details"])
    # 7 stored activating contexts (all shown to the explainer: none held out); the other features
    # have 6 stored contexts between them
    assert (details["activating"], details["non_activating"], city["detection_n"], city["fuzz_n"]) == (7, 6, 13, 13)
    assert details["held_out"] == 0 and details["non_activating_exact"] is False
    assert details["detection"] == {"tp": 7, "tn": 6, "fp": 0, "fn": 0, "unparsed": 0}
    assert details["scorer_model"] == "fake-model"
    # non-activating contexts come from other features' stored contexts
    detection_prompts = [r["body"]["messages"][1]["content"] for r in server.chat_requests(DETECTION_SYSTEM)]
    assert any("def add" in p and "capital cities" in p for p in detection_prompts)
    fuzz_prompts = [r["body"]["messages"][1]["content"] for r in server.chat_requests(FUZZ_SYSTEM)]
    assert any("<< Paris>>" in p for p in fuzz_prompts)
    # rerun: everything is done, nothing is asked
    before = len(server.requests)
    assert run_describe(llm_config(db, server, score=True), embedder=fake_embed).features == 0
    assert len(server.requests) == before


def test_a_wrong_description_scores_half(db, server):
    def always_yes(messages):
        if messages[0]["content"] == EXPLAIN_SYSTEM:
            return "[EXPLANATION]: Small numbers written as digits"
        n = len(re.findall(r"^Example \d+:", messages[-1]["content"], flags=re.M))
        return json.dumps([1] * n)

    server.reply = always_yes
    run_describe(llm_config(db, server, score=True, coder_ids=[SAE], limit=1), embedder=fake_embed)
    row = next(r for r in current_descriptions(FeatureStore(db), SAE) if r["method"] == "llm")
    assert row["detection_score"] == pytest.approx(0.5) and row["fuzz_score"] == pytest.approx(0.5)


def test_retries_on_5xx_429_and_timeouts(db, server):
    server.failures = [(500, {}), (503, {}), (429, {"Retry-After": "0"})]
    server.delays = [0.0, 0.0, 0.0, 1.5]  # the 4th request outlives the client's timeout
    result = run_describe(llm_config(db, server, concurrency=1, timeout=0.5), embedder=fake_embed)
    assert result.described == 3 and result.retries == 4
    assert len(server.requests) == 3 + 4


def test_non_retryable_error_is_one_line_and_keeps_the_db(db, server):
    server.always = (401, '{"error": {"message": "Incorrect API key provided"}}')
    result = CliRunner().invoke(main, ["describe", "--db", str(db), "--explainer", "llm", "--base-url", server.url,
                                                   "--model", "m", "--quiet"], env={"OPENAI_API_KEY": "sk-x"})
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "HTTP 401: Incorrect API key provided" in result.stderr and "sk-x" not in result.stderr
    # not retried: each of the 3 features in flight asked once
    assert len({json.dumps(r["body"]) for r in server.requests}) == len(server.requests) <= 3
    assert server.requests[0]["auth"] == "Bearer sk-x"  # key from the environment
    # what was done before the failure is kept: every feature has its offline (words) label
    assert {r["description_method"] for r in FeatureStore(db).features(SAE).to_dicts()} == {"words"}


def test_retries_give_up(server):
    server.always = (503, "{}")
    client = OpenAIChatClient(server.url, "m", max_retries=2, backoff=0.001)
    with pytest.raises(LLMError, match="HTTP 503 .*gave up after 3 attempts"):
        client.complete([{"role": "user", "content": "hi"}])
    assert client.stats.retries == 2 and len(server.requests) == 3


def test_cache_means_a_rerun_never_pays_twice(tmp_path, server):
    cache = tmp_path / "replies.sqlite"
    first, second = tmp_path / "a", tmp_path / "b"
    make_catalogue(first)
    make_catalogue(second)
    run_describe(llm_config(first, server, score=True, cache=str(cache)), embedder=fake_embed)
    paid = len(server.requests)
    assert paid > 3
    # the same catalogue described from scratch: every prompt is answered from the cache
    result = run_describe(llm_config(second, server, score=True, cache=str(cache)), embedder=fake_embed)
    assert len(server.requests) == paid
    assert result.cache_hits == paid and result.requests == 0 and result.described == 3
    assert descriptions(FeatureStore(first)) == descriptions(FeatureStore(second))


def test_limit_then_resume(db, server):
    first = run_describe(llm_config(db, server, limit=2), embedder=fake_embed)
    assert first.features == 2 and first.described == 2
    assert len(server.requests) == 2
    rest = run_describe(llm_config(db, server, cache=str(db / "other.sqlite")), embedder=fake_embed)
    assert rest.skipped == 2 and rest.features == 2 and rest.described == 1  # feature 2 is dead
    assert len(server.requests) == 3  # the first two were not asked again (even without the cache)
    assert all(d for d in descriptions(FeatureStore(db)).values())


def test_reply_without_description_keeps_the_offline_label(db, server):
    server.reply = lambda messages: "   "
    result = run_describe(llm_config(db, server), embedder=fake_embed)
    assert result.unparsed == 3 and result.described == 0
    assert {r["description_method"] for r in FeatureStore(db).features(SAE).to_dicts()} == {"words"}


def test_parsers():
    assert parse_explanation("Step 1: ...\n[EXPLANATION]: **Capital cities.**\n") == "Capital cities."
    assert parse_explanation("Explanation: the word 'def'") == "the word 'def"
    assert parse_explanation("<think>[EXPLANATION]: no</think>just this") == "just this"
    assert parse_explanation("") is None and parse_explanation(None) is None
    assert parse_labels("Sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_labels("[1, 0] then [0, 0, 1]", 3) == [False, False, True]
    assert parse_labels('["yes", "no"]', 2) == [True, False]
    assert parse_labels("[1, 0]", 3) is None and parse_labels("1 0 1", 3) is None
    score, counts = balanced_accuracy([(True, True), (True, False), (False, False), (False, None)])
    assert score == pytest.approx(0.75) and counts == {"tp": 1, "tn": 1, "fp": 0, "fn": 1, "unparsed": 1}
    assert chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("https://h/api/chat/completions") == "https://h/api/chat/completions"
    with pytest.raises(LLMError):
        chat_endpoint("localhost:8000")


def test_response_cache_persists(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    key = ResponseCache.key("u", "m", [{"role": "user", "content": "x"}], {"t": 0})
    assert cache.get(key) is None
    cache.put(key, "reply")
    cache.close()
    assert ResponseCache(tmp_path / "c.sqlite").get(key) == "reply"
    assert key != ResponseCache.key("u", "m2", [{"role": "user", "content": "x"}], {"t": 0})


# --- the write path ------------------------------------------------------------------------------


def _row(feature, text="a description", **kw):
    row = dict(coder_id=SAE, feature=feature, description=text, method="manual", explainer_model=None,
               explainer_source=None, prompt_version="human", created_at=dt.datetime.now(dt.timezone.utc),
               indexed_at=CREATED, detection_score=None, fuzz_score=None, detection_n=None, fuzz_n=None,
               score_details=None)
    row.update(kw)
    return row


@pytest.mark.parametrize("bad, message", [
    (dict(coder_id="other"), "expected 'toy'"),
    (dict(feature=7), "has no feature 7"),
    (dict(description="  "), "empty description"),
    (dict(method="guess"), "method 'guess'"),
    (dict(detection_score=1.5), r"not in \[0, 1\]"),
    (dict(indexed_at=CREATED - dt.timedelta(days=1)), "indexed again"),
    (dict(prompt_version=None), "required"),
])
def test_write_descriptions_validates_before_writing(db, bad, message):
    store = FeatureStore(db)
    write_descriptions(store, SAE, [_row(0)], embedding_model=DEFAULT_EMBEDDING_MODEL, embedder=fake_embed)
    versions = {name: store.table(name).version for name in ("features", DESCRIPTIONS_TABLE)}
    with pytest.raises(StoreError, match=message):
        write_descriptions(store, SAE, [_row(1), _row(3) | bad], embedding_model=DEFAULT_EMBEDDING_MODEL, embedder=fake_embed)
    assert {name: store.table(name).version for name in versions} == versions


def test_write_descriptions_touches_only_description_columns(db):
    store = FeatureStore(db)
    before = store.features(SAE)
    result = write_descriptions(store, SAE, [_row(1, "written by hand")], embedding_model="emb", embedder=fake_embed)
    assert (result.updated, result.embedded) == (1, 1)
    after = store.features(SAE)
    changed = ["description", "description_method", "description_model", "embedding_model", "vector"]
    assert after.drop(changed).equals(before.drop(changed))
    assert after.drop(changed).height == 4
    row = store.feature_row(SAE, 1)
    assert (row["description"], row["description_method"], row["embedding_model"]) == ("written by hand", "manual", "emb")
    # a manual description outranks a later offline label; the history keeps both
    run_describe(DescribeConfig(db=str(db), progress=False, embedding_model="emb"), embedder=fake_embed)
    assert store.feature_row(SAE, 1)["description"] == "written by hand"
    assert [r["method"] for r in current_descriptions(store, SAE, [1])].count("words") == 1


def test_embedding_dimension_mismatch_is_an_error(db):
    store = FeatureStore(db)
    with pytest.raises(StoreError, match="gives 8-dim vectors"):
        write_descriptions(store, SAE, [_row(0)], embedding_model=DEFAULT_EMBEDDING_MODEL, embedder=lambda texts, name: np.ones((len(texts), 8)))


def test_reindexed_coder_is_described_again(db):
    run_describe(DescribeConfig(db=str(db), progress=False), embedder=fake_embed)
    store = FeatureStore(db)
    store.write_coder(*toy_rows(created=CREATED + dt.timedelta(hours=1)))  # descriptions columns reset
    result = run_describe(DescribeConfig(db=str(db), progress=False), embedder=fake_embed)
    assert result.features == 4 and all(descriptions(store).values())
    assert len(store.table(DESCRIPTIONS_TABLE).to_arrow()) == 8  # the old ones stay as history


def test_changing_the_embedding_model_re_embeds(db):
    run_describe(DescribeConfig(db=str(db), progress=False), embedder=fake_embed)
    result = run_describe(DescribeConfig(db=str(db), progress=False, embedding_model="other"), embedder=fake_embed)
    assert (result.features, result.embedded) == (0, 4)
    rows = FeatureStore(db).features(SAE).to_dicts()
    assert {r["embedding_model"] for r in rows} == {"other"}
    assert np.allclose(rows[0]["vector"], fake_embed([rows[0]["description"]], "other")[0], **FLOAT16)


# --- CLI, real embeddings ------------------------------------------------------------------------


def test_cli_tokens_with_real_embeddings(db):
    from featuredb.runtime.embedding import embed

    result = CliRunner().invoke(main, ["describe", "--db", str(db), "--coder", SAE, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "described 4 feature(s)" in result.stdout and "embedded 4 description(s)" in result.stdout
    rows = FeatureStore(db).features(SAE).to_dicts()
    vectors = np.array([r["vector"] for r in rows])
    assert {r["embedding_model"] for r in rows} == {DEFAULT_EMBEDDING_MODEL}
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert np.allclose(vectors[0], embed([rows[0]["description"]])[0], **FLOAT16)
    # a query about capitals finds the city feature first
    query = embed(["capital cities"])[0]
    assert int(np.argmax(vectors @ query)) == 0


@pytest.mark.parametrize("args, message", [
    (["--explainer", "llm"], "--explainer llm needs --model"),
    (["--score"], "--score needs an LLM"),
    (["--coder", "nope"], "no coder 'nope'"),
])
def test_cli_bad_options(db, args, message):
    result = CliRunner().invoke(main, ["describe", "--db", str(db), *args])
    assert result.exit_code == 1 and result.stderr == f"error: {result.stderr[7:]}"
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_cli_missing_db(tmp_path):
    result = CliRunner().invoke(main, ["describe", "--db", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "database does not exist" in result.stderr
    assert not (tmp_path / "nope").exists()


# --- local explainer -----------------------------------------------------------------------------


def test_local_explainer_runs_in_process(db, tiny_llama, tmp_path):
    from featuredb.describe.local import LocalChatModel

    backend = LocalChatModel(str(tiny_llama), device="cpu", cache=ResponseCache(db / "_describe_cache.sqlite"))
    plain = backend.prompt_text([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert plain == "System: S\n\nUser: U\n\nAssistant:"
    backend.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert backend.prompt_text([{"role": "user", "content": "U"}]) == "<user>U<assistant>"
    config = DescribeConfig(db=str(db), explainer="local", model=str(tiny_llama), score=True, limit=1, progress=False)
    result = run_describe(config, backend=backend, embedder=fake_embed)
    assert result.requests >= 1 and result.described + result.unparsed == 1
    rows = [r for r in current_descriptions(FeatureStore(db), SAE) if r["method"] == "local"]
    for row in rows:
        assert (row["explainer_model"], row["explainer_source"]) == (str(tiny_llama), "local")
        assert row["score_details"] is not None
    # the same catalogue described from scratch: every reply comes from the cache, nothing is generated
    make_catalogue(tmp_path / "db2")
    config.db = str(tmp_path / "db2")
    again = run_describe(config, backend=backend, embedder=fake_embed)  # (the backend's counts add up)
    assert again.requests == result.requests and again.cache_hits == result.requests


@pytest.mark.slow
def test_local_explainer_smollm2_scores(db):
    from featuredb.runtime.model import smollm2_gguf_path

    config = DescribeConfig(db=str(db), explainer="local", model=smollm2_gguf_path(), score=True, limit=1,
                            progress=False)
    result = run_describe(config, embedder=fake_embed)
    assert result.described == 1, result
    row = next(r for r in current_descriptions(FeatureStore(db), SAE) if r["method"] == "local")
    assert row["description"] and row["explainer_source"] == "local"
    assert json.loads(row["score_details"])["activating"] > 0


# --- the reply cache a failed run leaves ---------------------------------------------------------


def cache_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("_describe_cache"))


def test_a_failed_llm_run_leaves_no_empty_cache(db, server):
    server.always = (401, '{"error": {"message": "Incorrect API key provided"}}')
    result = CliRunner().invoke(main, ["describe", "--db", str(db), "--explainer", "llm", "--base-url", server.url,
                                       "--model", "m", "--quiet"], env={"OPENAI_API_KEY": "sk-x"})
    assert result.exit_code == 1 and "HTTP 401" in result.stderr
    assert cache_files(db) == []


def test_a_failed_llm_run_keeps_the_replies_it_paid_for(db, server):
    def one_reply_then_refuse(messages):
        server.always = (401, '{"error": {"message": "quota exceeded"}}')  # every later request
        return fake_reply(messages)

    server.reply = one_reply_then_refuse
    with pytest.raises(DescribeError, match="quota exceeded"):
        run_describe(llm_config(db, server, concurrency=1), embedder=fake_embed)
    kept = ResponseCache(db / "_describe_cache.sqlite")
    assert len(kept) == 1  # the reply paid for, there for the rerun
    kept.close()


def test_an_existing_empty_cache_is_left_alone(db, server):
    cache = ResponseCache(db / "_describe_cache.sqlite")  # the user's, made before the run
    cache.close()
    server.always = (401, "{}")
    with pytest.raises(DescribeError):
        run_describe(llm_config(db, server), embedder=fake_embed)
    assert "_describe_cache.sqlite" in cache_files(db)


def test_the_evidence_is_recorded_with_each_description_and_old_tables_upgrade(db):
    import json

    import lancedb

    run_describe(DescribeConfig(db=str(db), explainer="tokens", progress=False), embedder=fake_embed)
    # as an older featuredb wrote it (before the evidence column and the embedding score after it)
    lancedb.connect(str(db)).open_table(DESCRIPTIONS_TABLE).drop_columns(
        ["evidence", "embedding_score", "embedding_score_details"])
    run_describe(DescribeConfig(db=str(db), explainer="words", progress=False), embedder=fake_embed)
    rows = current_descriptions(FeatureStore(db), SAE)
    tokens_rows = [r for r in rows if r["method"] == "tokens"]
    words_rows = [r for r in rows if r["method"] == "words"]
    assert len(tokens_rows) == len(words_rows) == 4
    assert all(r["evidence"] is None for r in tokens_rows)  # kept, the new column null
    paris = json.loads(next(r for r in words_rows if r["feature"] == 0)["evidence"])
    assert paris["claims"] and all(0 <= c["top"] <= c["top_n"] for c in paris["claims"])
    assert any("paris" in c["text"].lower() for c in paris["claims"])
