"""A small client for OpenAI-compatible /v1/chat/completions endpoints (OpenAI, vLLM, Ollama,
llama.cpp servers, ...) on the standard library, and the persistent reply cache it shares with the
local explainer.

- At most `max_concurrency` requests are in flight at once (per client, across threads).
- 429, 408, 409, 5xx, connection errors and timeouts are retried with exponential backoff
  (honouring a Retry-After header); other HTTP errors fail at once.
- Replies are cached on disk (SQLite) under a hash of (endpoint, model, messages, generation
  parameters), so a rerun or a resumed run never pays for the same prompt twice. The API key is
  never part of the key, the cache or an error message.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from featuredb.errors import LLMError

Message = dict[str, str]

API_KEY_VARIABLES = ("FEATUREDB_API_KEY", "OPENAI_API_KEY")
BASE_URL_VARIABLES = ("FEATUREDB_BASE_URL", "OPENAI_BASE_URL")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 425, 429})


class ChatBackend(Protocol):
    """What explainers and scorers need: a chat completion, and provenance for what produced it."""

    model: str  # the explainer model recorded with each description
    source: str  # where it ran: an endpoint URL or "local"

    def complete(self, messages: list[Message], *, max_tokens: int) -> str: ...


def api_key_from_env() -> str | None:
    for name in API_KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def base_url_from_env() -> str:
    for name in BASE_URL_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_BASE_URL


def chat_endpoint(base_url: str) -> str:
    """The chat completions URL for a base URL: '.../v1' -> '.../v1/chat/completions'.

    A URL that already ends in /chat/completions is used as is; a bare host gets /v1 added.
    """
    url = base_url.strip()
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise LLMError(f"invalid base URL {base_url!r}: expected http(s)://host[:port][/v1]")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = (path or "/v1") + "/chat/completions"
    return urllib.parse.urlunparse(parsed._replace(path=path))


class ResponseCache:
    """A persistent key -> reply store (SQLite; safe across threads and processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False,
                                         isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, created_at REAL)"
            )
        except (OSError, sqlite3.Error) as e:
            raise LLMError(f"cannot open the reply cache {self.path}: {e}") from e
        self._lock = threading.Lock()

    @staticmethod
    def key(endpoint: str, model: str, messages: list[Message], params: dict) -> str:
        blob = json.dumps({"endpoint": endpoint, "model": model, "messages": messages, "params": params},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", (key, reply, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def remove(self) -> None:
        """Close the cache and delete its files (SQLite's write-ahead log and shared memory too)."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)


class Counters:
    """Thread-safe request statistics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent (retries included) / local generations run
        self.cache_hits = 0
        self.retries = 0

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


class OpenAIChatClient:
    """Chat completions from an OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        cache: ResponseCache | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        max_concurrency: int = 8,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not model:
            raise LLMError("the llm explainer needs a model name (--model)")
        if max_concurrency < 1:
            raise LLMError("max_concurrency must be at least 1")
        self.endpoint = chat_endpoint(base_url)
        self.model = model
        self.source = self.endpoint
        self._api_key = api_key
        self.cache = cache
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._sleep = sleep
        self.stats = Counters()

    def __repr__(self) -> str:  # no key
        return f"OpenAIChatClient({self.endpoint!r}, model={self.model!r})"

    def complete(self, messages: list[Message], *, max_tokens: int = 200) -> str:
        params = {"temperature": self.temperature, "max_tokens": max_tokens}
        key = ResponseCache.key(self.endpoint, self.model, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return hit
        payload = {"model": self.model, "messages": messages, **params}
        with self._slots:
            reply = self._post_with_retries(payload)
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def _post_with_retries(self, payload: dict) -> str:
        body = json.dumps(payload).encode()
        attempt = 0
        while True:
            try:
                self.stats.add(requests=1)
                return self._post(body)
            except _Retryable as e:
                if attempt >= self.max_retries:
                    raise LLMError(f"{self.endpoint}: {e.reason} (gave up after {attempt + 1} attempts)") from None
                delay = e.retry_after if e.retry_after is not None else self.backoff * 2**attempt
                delay = min(self.max_backoff, delay) * (1 + 0.1 * random.random())
                attempt += 1
                self.stats.add(retries=1)
                self._sleep(delay)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in RETRY_STATUSES or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}{detail}", _retry_after(e)) from None
            raise LLMError(f"{self.endpoint}: HTTP {e.code}{detail}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.timeout:g}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout:g}s") from None
            raise _Retryable(f"cannot connect: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        return _reply_text(raw, self.endpoint)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()[:2000]
        data = json.loads(raw)
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        text = str(message or "")
    except Exception:
        text = ""
    text = " ".join(text.split())[:200]
    return f": {text}" if text else ""


def _reply_text(raw: bytes, endpoint: str) -> str:
    try:
        data = json.loads(raw)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError(f"{endpoint}: not a chat completion response: {raw[:200]!r}") from None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
