"""Load test of `featuredb serve`: N concurrent keep-alive clients for S seconds, each looping over
a mix of every endpoint (search semantic / keyword / hybrid, feature, examples, similar, coders,
fires_on GET and POST, the HTML pages). Prints requests served, errors (non-2xx or a failed
connection), p50 / p99 latency per endpoint, and the server's RSS before and after.

    python scripts/bench_serve.py --clients 1 16 64 --seconds 60
    python scripts/bench_serve.py --clients 1 4 16 --only fires_get fires_post   # fires_on throughput

Without --db it builds the tests' described tiny-Gemma-2 catalogue (tests/catalogue_fixtures.py
`build_model_catalogue`: 2 Gemma Scope coders of 48 and 40 features, tokens-explainer
descriptions, MiniLM embeddings) in a temporary directory. The server runs as a subprocess
(`featuredb serve`), so its RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "def add(a, b):\n    return a + b",
         "One two three four five six seven eight nine ten.", "In 1999 the numbers 42 and 7 were written.",
         "London, Paris, Berlin and Rome are cities in Europe.", "The quick brown fox jumps over the lazy dog."]
QUERIES = ["cat", "Paris", "numbers", "code", "the", "cities"]


def build_catalogue(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from catalogue_fixtures import build_model_catalogue
    from conftest import save_tiny_model

    return build_model_catalogue(root, save_tiny_model("gemma2", root / "gemma2"))


def start_server(db: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "from featuredb.cli import main; main()", "serve", "--db", str(db),
               "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/coders", timeout=5).raise_for_status()
            return server
        except httpx.HTTPError:
            if server.poll() is not None:
                raise SystemExit(f"featuredb serve exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    raise SystemExit("featuredb serve did not start in 120 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests_for(coders: list[dict]) -> dict[str, callable]:
    """Endpoint name -> a function making one random request of it with a client."""
    def feature() -> tuple[str, int]:
        coder = random.choice(coders)
        return coder["coder_id"], random.randrange(coder["width"])

    def text() -> str:
        return random.choice(TEXTS)

    return {
        "search_semantic": lambda c: c.get("/api/search", params={"q": random.choice(QUERIES)}),
        "search_keyword": lambda c: c.get("/api/search", params={"q": random.choice(QUERIES), "mode": "keyword"}),
        "search_hybrid": lambda c: c.get("/api/search", params={"q": random.choice(QUERIES), "mode": "hybrid"}),
        "feature": lambda c: c.get("/api/features/{}/{}".format(*feature())),
        "examples": lambda c: c.get("/api/features/{}/{}/examples".format(*feature())),
        "similar": lambda c: c.get("/api/features/{}/{}/similar".format(*feature())),
        "coders": lambda c: c.get("/api/coders"),
        "fires_get": lambda c: c.get("/api/fires_on", params={"text": text()}),
        "fires_post": lambda c: c.post("/api/fires_on", json={"text": text(), "limit": 20}),
        "page_search": lambda c: c.get("/", params={"q": random.choice(QUERIES)}),
        "page_feature": lambda c: c.get("/features/{}/{}".format(*feature())),
        "page_fires": lambda c: c.get("/fires", params={"text": text()}),
    }


def run_clients(url: str, clients: int, seconds: float, endpoints: dict[str, callable]) -> dict:
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        names = list(endpoints)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop:
                name = rng.choice(names)
                started = time.perf_counter()
                try:
                    ok = endpoints[name](http).status_code < 400
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with lock:
                    latencies[name].append(elapsed)
                    errors[name] += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    served = sum(len(v) for v in latencies.values())
    return {"clients": clients, "seconds": round(wall, 1), "requests": served, "per_second": round(served / wall, 1),
            "errors": sum(errors.values()),
            "endpoints": {name: {"n": len(v), "errors": errors[name],
                                 "p50_ms": round(1000 * statistics.median(v), 1),
                                 "p99_ms": round(1000 * sorted(v)[min(len(v) - 1, int(0.99 * len(v)))], 1)}
                          for name, v in sorted(latencies.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=None, help="A described catalogue (default: build the tiny one).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=60.0, help="Per client count.")
    parser.add_argument("--only", nargs="+", default=None, help="Only these endpoints (names as printed).")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or build_catalogue(Path(tmp))
        server = start_server(db, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            endpoints = requests_for(httpx.get(f"{url}/api/coders").json()["coders"])
            if args.only:
                endpoints = {name: endpoints[name] for name in args.only}
            with httpx.Client(base_url=url, timeout=120) as http:  # load the embedder, model and coders first
                for request in endpoints.values():
                    request(http).raise_for_status()
            rss_before = rss_mib(server.pid)
            for clients in args.clients:
                result = run_clients(url, clients, args.seconds, endpoints)
                result.update(rss_before_mib=round(rss_before, 1), rss_after_mib=round(rss_mib(server.pid), 1))
                print(json.dumps(result), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
