"""Find-by-example benchmark (issue 23): does `find` put a feature that fires on the concept in
its top k, and how often does `fires` on the same texts?

    python scripts/bench_find.py --db featuredb-demo/catalogue [--k 5] [--json out.json] [--show]

Each concept is a handful of short positive texts with the tokens that carry it marked `[[...]]`
and one to three negative texts, and a judge from scripts/bench_concepts.py (imported, not
copied): a feature *fires on the concept* when at least half of its first 10 stored top examples
peak on a token the judge accepts. The judges read only the catalogue's stored contexts, never
the examples given here, so a hit is a feature that fires on the concept across the corpus.

Rankings compared, each for the same texts:
- find by f1 / auroc / precision (`Catalogue.find`, marks and negatives used);
- fires: `Catalogue.fires_on` on each positive text (marks removed), features ranked by their
  max activation over the texts: what a user without `find` would run;
- fires at the marks: the same, but only the marked positions count (`fires_on(positions=...)`),
  i.e. the marks without negatives.

Concepts that no feature of the catalogue fires on cannot be hit and are reported apart, not scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_concepts  # noqa: E402  the judges and the peaks loader
import featuredb  # noqa: E402

JUDGES = dict(bench_concepts.CONCEPTS)

# (concept as bench_concepts names it, positive texts with marks, negative texts). At most one
# positive text of a concept has its marked token first: features that fire on whatever token
# comes first after BOS would otherwise separate the marks as well as the concept's own.
CONCEPTS: list[tuple[str, list[str], list[str]]] = [
    ("function definitions",
     ["import math\n[[def]] area(r):\n    return 3.14 * r * r", "class Stack:\n    [[def]] push(self, item):",
      "x = 1\n\n[[def]] main():\n    print('hello')", "@property\n[[def]] name(self):"],
     ["The definition of a term is given in the glossary.", "area(r) returns the area"]),
    ("return statements",
     ["def f(x):\n    [[return]] x + 1", "if not items:\n    [[return]] None", "else:\n    [[return]] self._value",
      "def g():\n    [[return]] [a, b]"],
     ["Returns the number of items in the list.", "print(x + 1)"]),
    ("comparison operators",
     ["if x [[==]] 0:", "while n [[>]] 1:", "if a [[!=]] b:", "assert len(s) [[<=]] 10", "if i [[<]] n:"],
     ["x = 0", "the list is longer than ten"]),
    ("quotation marks",
     ["name = [[']]Alice[[']]", "print([[\"]]hello[[\"]])", "key = [[\"]]path[[\"]]", "s.split([[']],[[']])"],
     ["name = Alice", "print(hello)"]),
    ("numbers",
     ["x = [[42]]", "range([[10]])", "timeout = [[30]]", "the year [[1999]]", "port [[8080]] is open"],
     ["x = y", "the year ahead"]),
    ("exceptions and errors",
     ["raise [[ValueError]]('bad value')", "except [[KeyError]]:", "x = 0\n[[try]]:\n    f()\n[[except]] OSError:",
      "raise [[TypeError]](msg)"],
     ["return value", "the key is missing"]),
    ("indentation at the start of a line",
     ["def f():\n[[    ]]return 1", "for x in xs:\n[[    ]]print(x)", "if ok:\n[[    ]]go()\nelse:\n[[    ]]stop()"],
     ["x = 1 + 2", "a b c d"]),
    ("comments",
     ["x = 1  [[# the answer]]", "[[# TODO: remove this]]\ny = 2", "i += 1  [[# next item]]"],
     ["x = 1", "print('#')"]),
    ("opening parenthesis",
     ["print[[(]]x)", "len[[(]]items)", "f[[(]]a, b)", "range[[(]]10)"],
     ["x = y", "a, b"]),
    ("closing parenthesis",
     ["print(x[[)]]", "len(items[[)]]", "f(a, b[[)]]", "range(10[[)]]"],
     ["x = y", "a, b"]),
    ("equals sign",
     ["x [[=]] 1", "name [[=]] 'Bob'", "self.size [[=]] size", "total [[=]] a + b"],
     ["x == 1", "f(x)"]),
    ("import statements",
     ["[[import]] os", "x = 1\n[[from]] collections [[import]] deque", "# setup\n[[import]] sys, re"],
     ["the import of goods", "os.path.join(a, b)"]),
    ("if statements",
     ["x = f()\n[[if]] x > 0:", "for x in xs:\n    [[if]] not x:", "d = {}\n[[if]] key in d:\n    pass",
      "y = a [[if]] ok else b"],
     ["x > 0", "the data is ready"]),
    ("self",
     ["def run([[self]]):", "def inc([[self]]):\n    [[self]].count += 1", "return [[self]].name",
      "if x:\n    [[self]].items.append(x)"],
     ["def run(x):", "count += 1"]),
    ("None, True and False",
     ["x = [[None]]", "return [[True]]", "flag = [[False]]", "if y is [[None]]:"],
     ["x = 0", "return the value"]),
    ("negation",
     ["if [[not]] ok:", "this is [[not]] allowed", "there is [[no]] file", "it [[cannot]] be empty"],
     ["this is allowed", "if ok:"]),
    ("dot between an object and its attribute",
     ["os[[.]]path", "self[[.]]name", "x[[.]]append(1)", "sys[[.]]argv"],
     ["End of sentence. Next one.", "3.14"]),
    ("decorators",
     ["class A:\n    [[@]]property\n    def x(self):", "x = 1\n\n[[@]]staticmethod\ndef f():",
      "[[@]]classmethod\ndef g(cls):"],
     ["user@example.com", "def x(self):"]),
]


def fires_ranking(cat, texts: list[str], positions: list[list[int]] | None) -> list[tuple[str, int]]:
    """Features ranked by their max activation over the texts (at the given positions per text)."""
    best: dict[tuple[str, int], float] = {}
    for i, text in enumerate(texts):
        result = cat.fires_on(text, limit=1000, per_token=0, positions=None if positions is None else positions[i])
        for coder_id, feature, activation in result.features.select("coder_id", "feature", "activation").iter_rows():
            best[(coder_id, feature)] = max(best.get((coder_id, feature), 0.0), activation)
    return [key for key, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--json", default=None, help="write per-concept results here")
    ap.add_argument("--show", action="store_true", help="print each concept's top results")
    args = ap.parse_args()

    cat = featuredb.open(args.db)
    peaks = bench_concepts.load_peaks(cat)
    answerable = {name: sum(bench_concepts.fires_on(ps, JUDGES[name]) for ps in peaks.values()) for name, _, _ in CONCEPTS}
    scored = [c for c in CONCEPTS if answerable[c[0]]]
    print(f"catalogue {args.db}: {len(CONCEPTS)} concepts, {len(scored)} with a feature firing on them; unscored: "
          + (", ".join(name for name, _, _ in CONCEPTS if not answerable[name]) or "none"))

    started = time.perf_counter()
    cat.find(["[[warm]] up"]).limit(1).to_polars()  # loads the model and coders: not timed below
    print(f"model and coders loaded in {time.perf_counter() - started:.1f}s")

    methods = ["find f1", "find auroc", "find precision", "fires", "fires at the marks"]
    hits = {m: 0 for m in methods}
    seconds = {m: 0.0 for m in methods}
    rows = []
    for name, positives, negatives in scored:
        judge = JUDGES[name]
        row: dict = {"concept": name, "features_firing": answerable[name], "positives": positives, "negatives": negatives}
        rankings: dict[str, list[tuple[str, int]]] = {}
        marked_positions = None
        for by in ("f1", "auroc", "precision"):
            t = time.perf_counter()
            result = cat.find(positives, negatives, by=by).limit(args.k).result()
            seconds[f"find {by}"] += time.perf_counter() - t
            rankings[f"find {by}"] = list(result.features.select("coder_id", "feature").iter_rows())
            marked_positions = [[i for i, m in enumerate(e["marked"]) if m] for e in result.examples if e["positive"]]
        plain = [e.text for e in cat.find(positives).examples]
        for method, positions in (("fires", None), ("fires at the marks", marked_positions)):
            t = time.perf_counter()
            rankings[method] = fires_ranking(cat, plain, positions)[:args.k]
            seconds[method] += time.perf_counter() - t
        for method in methods:
            good = [bench_concepts.fires_on(peaks.get(key, []), judge) for key in rankings[method]]
            hits[method] += any(good)
            row[method] = {"hit": any(good), "results": [f"{c}/{f}" for c, f in rankings[method]], "good": good}
        if args.show:
            print(f"\n{name}: " + "  ".join(f"{m} {'hit' if row[m]['hit'] else 'miss'}" for m in methods))
            for method in methods:
                print(f"  {method:<19} " + " ".join(f"{r}{'*' if g else ''}" for r, g in
                                                    zip(row[method]["results"], row[method]["good"])))
        rows.append(row)

    n = len(scored)
    print(f"\nhit@{args.k} over {n} concepts ({sum(len(c[1]) for c in scored)} positive and "
          f"{sum(len(c[2]) for c in scored)} negative texts)")
    print(f"| ranking | hit@{args.k} | seconds a concept |")
    print("|---|---|---|")
    for method in methods:
        print(f"| {method} | {hits[method]}/{n} ({hits[method] / max(n, 1):.0%}) | {seconds[method] / max(n, 1):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"db": args.db, "k": args.k, "hits": hits, "n": n,
                                               "seconds": seconds, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
