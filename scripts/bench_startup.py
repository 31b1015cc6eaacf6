"""How fast the command line answers: `featuredb --help`, a keyword search, a semantic search.

    python scripts/bench_startup.py                          # on the tests' known-answer catalogue
    python scripts/bench_startup.py --db featuredb-demo/catalogue
    python scripts/bench_startup.py --also /tmp/old-checkout # the same commands from another checkout

Each command runs as a fresh process (what a user types), `--runs` times; the median wall time is
printed. Targets (issue 12, 2-core machine): --help under 0.5 s, keyword search under 1.5 s.
`--also DIR` runs the same commands with DIR first on PYTHONPATH (e.g. a `git worktree` of an
older commit), so before and after are measured in one run on the same machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
CLI = "from featuredb.cli import main; main()"


def wall_seconds(argv: list[str], env: dict[str, str], checkout: str) -> float:
    """One run from the checkout's folder (`python -c` puts the working directory first on sys.path)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, cwd=checkout, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise click.ClickException(f"featuredb {' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return seconds


def known_catalogue(checkout: str, folder: Path) -> str:
    """The tests' known-answer catalogue, written by `checkout`'s own code (older ones name things
    differently)."""
    build = "import sys; from catalogue_fixtures import build_catalogue; build_catalogue(sys.argv[1])"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([checkout, str(Path(checkout) / "tests")])}
    subprocess.run([sys.executable, "-c", build, str(folder)], env=env, cwd=checkout, check=True, capture_output=True)
    return str(folder)


@click.command()
@click.option("--db", default=None, help="Catalogue to search (default: the tests' known-answer catalogue).")
@click.option("--query", default="Marseille", show_default=True, help="Search text.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Runs per command (median).")
@click.option("--also", "others", multiple=True, help="Another checkout to measure the same way (repeatable).")
def main(db, query, runs, others):
    with tempfile.TemporaryDirectory() as scratch:
        checkouts = {"this checkout": str(ROOT)} | {other: str(Path(other).resolve()) for other in others}
        catalogues = {path: db or known_catalogue(path, Path(scratch) / str(i)) for i, path in enumerate(checkouts.values())}
        commands = {
            "featuredb --help": ["--help"],
            "search --keyword": ["search", query, "--keyword"],
            "search (semantic)": ["search", query],
        }
        print(f"median of {runs} runs, seconds (catalogue: {db or 'the tests known-answer catalogue'})")
        print(f"{'command':<20}" + "".join(f"{name[-24:]:>26}" for name in checkouts))
        for label, argv in commands.items():
            row = f"{label:<20}"
            for path in checkouts.values():
                env = os.environ | {"PYTHONPATH": path, "FEATUREDB_DB": catalogues[path]}
                wall_seconds(argv, env, path)  # warm the file cache once
                row += f"{statistics.median(wall_seconds(argv, env, path) for _ in range(runs)):>26.2f}"
            print(row)


if __name__ == "__main__":
    main()
