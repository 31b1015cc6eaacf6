"""Peak memory of `featuredb index --tokens N` on a corpus of ONE long document (issue 13, item 6).

Builds the tests' tiny Gemma 2 (tests/conftest.py) and a random Gemma Scope 1 coder, writes a JSONL
corpus holding a single document of --megabytes MB of ordinary text, runs the real command line in a
child process and prints the child's peak RSS (ru_maxrss) and wall time. Memory should follow the work
asked for (--tokens), not the document's length.

    python scripts/measure_corpus_memory.py                     # 30 MB document, --tokens 3000
    python scripts/measure_corpus_memory.py --megabytes 1       # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from coder_formats import write_gemma_scope_1  # noqa: E402
from conftest import CORPUS_TEXT, save_tiny_model  # noqa: E402


def write_one_document_corpus(path: Path, megabytes: float) -> int:
    """One JSONL line whose text is the test sentences repeated to `megabytes` MB; returns its length."""
    sentence = " ".join(CORPUS_TEXT) + " "
    text = sentence * max(1, int(megabytes * 1e6 / len(sentence)))
    path.write_text(json.dumps({"id": "long", "text": text}) + "\n")
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=30.0)
    parser.add_argument("--tokens", type=int, default=3000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_model("gemma2", root / "model")
        coder = write_gemma_scope_1(root / "coders", "res", 1, 64, 16, seed=1)
        corpus = root / "corpus.jsonl"
        chars = write_one_document_corpus(corpus, args.megabytes)
        command = [sys.executable, "-m", "featuredb.cli", "index", "--quiet", "-m", str(model), "-c", str(coder),
                   "--corpus", str(corpus), "--db", str(root / "db"), "--tokens", str(args.tokens),
                   "--context", "64", "--batch-size", "8"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"index failed ({done.returncode}): {done.stderr.strip()}")
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"document_chars": chars, "tokens": args.tokens, "peak_rss_mib": round(peak_mib),
                          "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
