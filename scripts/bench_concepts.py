"""Concept search benchmark (issue 16): do searches for a concept find a feature that fires on it?

    python scripts/bench_concepts.py --db featuredb-demo/catalogue [--modes semantic,keyword,hybrid,auto]
                                     [--sets concepts,classes] [--k 5] [--json out.json] [--show-misses]

Each concept is a query a researcher might type ("equals sign", "negation", "indentation") and a
judge: a predicate on one peak of a feature, i.e. the token where one of its top examples peaks
with its neighbours, read from the catalogue's examples table. A feature *fires on the concept*
when at least JUDGE_SHARE of its first JUDGE_EXAMPLES top examples peak on a token the judge
accepts. A query hits at k when one of its first k results fires on the concept. The judges look
only at tokens, never at descriptions or feature ids, so they hold for any catalogue and any
explainer; they are written here on their own, not with the explainer's token classes, so the
benchmark does not grade the explainer by its own rules.

Concepts no feature of the catalogue fires on cannot be hit and are reported apart, not scored.
The catalogue's current descriptions are what is searched: describe it with another explainer
(`featuredb describe --explainer ...`) and run again to compare explainers.
"""

from __future__ import annotations

import argparse
import builtins
import json
import keyword
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

import featuredb  # noqa: E402
from featuredb.query.search import auto_mode, query_shape  # noqa: E402
from featuredb.store import Filter  # noqa: E402

JUDGE_EXAMPLES = 10  # top examples of a feature the judge looks at
JUDGE_SHARE = 0.5  # share of them that must peak on the concept


@dataclass(frozen=True)
class Peak:
    """The token where one top example peaks, with its neighbours and its line."""

    token: str
    prev: str
    next: str
    line_before: str  # text of the line up to the token
    word: str  # the token joined with adjacent word characters (a whole number or identifier)

    @property
    def s(self) -> str:
        return self.token.strip()


def _word(tokens: list[str], p: int) -> str:
    def glued(a: str, b: str) -> bool:
        return bool(a) and bool(b) and not b[0].isspace() and (a[-1].isalnum() or a[-1] == "_") and \
            (b[0].isalnum() or b[0] == "_")
    lo = hi = p
    while lo > 0 and glued(tokens[lo - 1], tokens[lo]):
        lo -= 1
    while hi + 1 < len(tokens) and glued(tokens[hi], tokens[hi + 1]):
        hi += 1
    return "".join(tokens[lo:hi + 1]).strip()


def peak_of(tokens: list[str], p: int) -> Peak:
    before = "".join(tokens[:p])
    return Peak(tokens[p], tokens[p - 1] if p > 0 else "", tokens[p + 1] if p + 1 < len(tokens) else "",
                before[before.rfind("\n") + 1:], _word(tokens, p))


def _sym(p: Peak, chars: str) -> bool:
    return bool(p.s) and any(c in p.s for c in chars) and not any(c.isalnum() for c in p.s)


def _is(words: set[str], lower: bool = True) -> Callable[[Peak], bool]:
    return lambda p: (p.s.lower() if lower else p.s) in words and p.s.isalpha()


PYTHON_KEYWORDS = set(keyword.kwlist)

# (query, judge). Plain-words concepts of the kinds researchers search for: symbols, whitespace,
# numbers, code keywords and roles, English function words, casing, word structure.
CONCEPTS: list[tuple[str, Callable[[Peak], bool]]] = [
    ("equals sign", lambda p: p.s == "="),
    ("assignment of a value to a variable", lambda p: p.s == "="),
    ("opening parenthesis", lambda p: _sym(p, "(")),
    ("closing parenthesis", lambda p: _sym(p, ")")),
    ("square brackets", lambda p: _sym(p, "[]")),
    ("curly braces", lambda p: _sym(p, "{}")),
    ("comma", lambda p: p.s == ","),
    ("colon", lambda p: _sym(p, ":")),
    ("period at the end of a sentence", lambda p: p.s == "." and (not p.next or p.next[:1].isspace())),
    ("dot between an object and its attribute", lambda p: p.s == "." and p.prev[-1:].isalnum() and p.next[:1].isalpha()),
    ("newline", lambda p: "\n" in p.token),
    ("indentation at the start of a line", lambda p: not p.s and (("\n" in p.token and p.token.endswith((" ", "\t")))
                                                                  or ("\n" not in p.token and not p.line_before.strip()))),
    ("blank line between paragraphs", lambda p: p.token.replace(" ", "").count("\n") >= 2),
    ("spaces", lambda p: not p.s and "\n" not in p.token),
    ("numbers", lambda p: p.s.isdigit()),
    ("years like 1999", lambda p: p.s.isdigit() and bool(re.fullmatch(r"(19|20)\d\d", p.word))),
    ("hexadecimal numbers", lambda p: p.word.lower().startswith("0x")),
    ("negation", _is({"not", "no", "never", "n't", "cannot"})),
    ("if statements", _is({"if", "elif"})),
    ("else branch", _is({"else", "elif"})),
    ("function definitions", lambda p: p.s == "def" or p.prev.strip() == "def"),
    ("class definitions", lambda p: p.s == "class" or p.prev.strip() == "class"),
    ("return statements", _is({"return"})),
    ("import statements", lambda p: p.s in ("import", "from") or p.line_before.lstrip().startswith(("import ", "from "))),
    ("Python keywords", lambda p: p.s in PYTHON_KEYWORDS),
    ("boolean operators and / or", _is({"and", "or"})),
    ("the word the", _is({"the"})),
    ("indefinite articles a and an", _is({"a", "an"})),
    ("prepositions", _is({"of", "in", "on", "at", "to", "for", "with", "from", "by", "into", "about"})),
    ("pronouns", _is({"it", "this", "that", "they", "we", "you", "he", "she", "its", "their", "them"})),
    ("capitalized words", lambda p: p.s[:1].isupper() and p.s.isalpha() and not p.s.isupper()),
    ("all caps words", lambda p: p.s.isalpha() and p.s.isupper() and len(p.s) >= 2),
    ("underscore", lambda p: "_" in p.s),
    ("dunder methods like __init__", lambda p: p.word.startswith("__") and p.word.endswith("__") and len(p.word) > 4),
    ("self", _is({"self"}, lower=False)),
    ("None, True and False", lambda p: p.s in ("None", "True", "False")),
    ("quotation marks", lambda p: _sym(p, "'\"`")),
    ("comments", lambda p: _sym(p, "#") or "#" in p.line_before),
    ("decorators", lambda p: _sym(p, "@")),
    ("plus and minus signs", lambda p: _sym(p, "+-")),
    ("comparison operators", lambda p: p.s in ("==", "!=", "<", ">", "<=", ">=")),
    ("asterisk", lambda p: _sym(p, "*")),
    ("words ending in ing", lambda p: p.s.isalpha() and p.s.lower().endswith("ing")),
    ("slash", lambda p: _sym(p, "/")),
    ("backslash", lambda p: _sym(p, "\\")),
    ("string literals", lambda p: bool(p.s) and (p.line_before.count('"') % 2 == 1 or p.line_before.count("'") % 2 == 1)),
    ("method calls", lambda p: p.prev.strip() == "." and p.next.startswith("(")),
    ("doctest prompt", lambda p: ">>" in p.s or p.line_before.lstrip().startswith(">>>")),
    ("subword fragments inside longer words", lambda p: p.s.isalpha() and not p.token[:1].isspace()
                                                         and p.prev[-1:].isalpha()),
    ("loops", _is({"for", "while"})),
    ("exceptions and errors", lambda p: p.s in ("try", "except", "raise", "finally") or "Error" in p.s
                                        or "Exception" in p.s),
    ("question mark", lambda p: _sym(p, "?")),
    ("hyphen", lambda p: _sym(p, "-")),
    ("the verb is", _is({"is", "are"})),
    # the same kinds of concept typed as the symbol itself
    ("(", lambda p: _sym(p, "(")),
    ("=", lambda p: p.s == "="),
    ("#", lambda p: _sym(p, "#") or "#" in p.line_before),
    (":", lambda p: _sym(p, ":")),
]


def _identifier(p: Peak) -> bool:
    return bool(p.s) and (p.s[0].isalpha() or p.s[0] == "_") and all(c.isalnum() or c == "_" for c in p.s)


def _whole_word(p: Peak) -> bool:
    """A whole lowercase English word (not a piece of a longer one)."""
    return p.s.isalpha() and p.s.islower() and p.word == p.s


def _chunk(p: Peak) -> str:
    """The run of text without spaces around the peak (as far as the peak's neighbours show it)."""
    left = "" if p.token[:1].isspace() else re.split(r"\s", p.line_before)[-1]
    right = p.next if p.next and not p.next[:1].isspace() and not p.token[-1:].isspace() else ""
    return left + p.s + right


_NOT_PLURAL = {"this", "was", "has", "does", "always", "perhaps", "its", "his", "thus", "yes", "across", "unless",
               "less", "class", "process", "access", "address", "pass", "status", "series", "news", "whereas"}
_BUILTIN_FUNCTIONS = {n for n in dir(builtins) if n.islower() and not n.startswith("_") and callable(getattr(builtins, n))}

# A second set (issue 24): classes of tokens, named as people name them (by form, by word class, by
# role in code). Judged on the peaks alone, like the first set; a class with no feature firing on
# it is reported unscored.
CLASS_CONCEPTS: list[tuple[str, Callable[[Peak], bool]]] = [
    ("digits", lambda p: p.s.isdigit()),
    ("closing brackets", lambda p: bool(p.s) and p.s[0] in ")]}" and not any(c.isalnum() for c in p.s)),
    ("opening brackets", lambda p: bool(p.s) and p.s[-1] in "([{" and not any(c.isalnum() for c in p.s)),
    ("punctuation marks", lambda p: bool(p.s) and all(c in string.punctuation for c in p.s)),
    ("whitespace runs", lambda p: not p.s and len(p.token) >= 2),
    ("arithmetic operators", lambda p: p.s in ("+", "-", "*", "/", "%", "**", "//")),
    ("file paths", lambda p: bool(p.s) and bool(re.search(r"\w/[\w.]|^/\w|\w\.(py|txt|json|csv|cfg|toml|yaml|md|rst|html)\b",
                                                          _chunk(p)))),
    ("URLs", lambda p: bool(p.s) and bool(re.search(r"https?:|://|www\.", _chunk(p)))),
    ("plural nouns", lambda p: _whole_word(p) and len(p.s) >= 4 and p.s.endswith("s") and not p.s.endswith(("ss", "us", "is"))
                               and p.s not in _NOT_PLURAL and p.prev.strip().lower() not in ("it", "he", "she", "which", "that")),
    ("verbs in the past tense", lambda p: _whole_word(p) and len(p.s) >= 5 and p.s.endswith("ed") and not p.s.endswith("eed")),
    ("adverbs", lambda p: _whole_word(p) and len(p.s) >= 5 and p.s.endswith("ly") and p.s not in ("only", "family", "apply")),
    ("verbs", lambda p: _whole_word(p) and ((len(p.s) >= 5 and p.s.endswith(("ing", "ed")) and p.s not in ("string", "thing"))
                                            or p.prev.strip().lower() in ("to", "can", "will", "should", "must", "may"))),
    ("conjunctions", _is({"and", "or", "but", "because", "although", "so", "yet", "while", "nor"})),
    ("modal verbs", _is({"can", "could", "will", "would", "should", "may", "might", "must", "shall"})),
    ("articles", _is({"a", "an", "the"})),
    ("question words", _is({"what", "which", "who", "when", "where", "why", "how"})),
    ("number words", _is({"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "first",
                          "second", "third", "hundred", "thousand", "million"})),
    ("proper nouns", lambda p: p.s.isalpha() and len(p.s) > 1 and p.s[0].isupper() and p.s[1:].islower()
                               and bool(p.line_before.strip()) and not p.line_before.rstrip().endswith((".", ":", "!", "?", '"', "#"))),
    ("word endings (suffixes)", lambda p: p.s.isalpha() and not p.token[:1].isspace() and p.prev[-1:].isalpha()
                                          and not p.next[:1].isalpha()),
    ("function names", lambda p: _identifier(p) and p.s not in PYTHON_KEYWORDS
                                 and (p.prev.strip() == "def" or p.next.startswith("("))),
    ("class names", lambda p: _identifier(p) and (p.prev.strip() == "class" or (p.word[:1].isupper() and
                                                  any(c.islower() for c in p.word) and p.next.startswith("(")))),
    ("variable names", lambda p: _identifier(p) and p.s not in PYTHON_KEYWORDS and p.next.strip().startswith("=")
                                 and not p.next.strip().startswith("==")),
    ("module names", lambda p: _identifier(p) and p.s not in ("import", "from", "as")
                               and bool(re.match(r"\s*(import|from)\s", p.line_before))),
    ("attribute names", lambda p: _identifier(p) and p.prev.strip().endswith(".")),
    ("keyword arguments", lambda p: _identifier(p) and p.next.strip() == "="
                                    and p.line_before.count("(") > p.line_before.count(")")),
    ("built-in functions", lambda p: p.s in _BUILTIN_FUNCTIONS and p.word == p.s),
    ("exception names", lambda p: bool(re.search(r"(Error|Exception|Warning)$", p.word))),
    ("control flow keywords", lambda p: p.s in ("if", "elif", "else", "for", "while", "break", "continue", "return",
                                                "try", "except", "finally", "raise")),
    ("snake_case names", lambda p: "_" in p.word.strip("_") and any(c.isalpha() for c in p.word)),
    ("camelCase names", lambda p: bool(re.search(r"[a-z][A-Z]", p.word))),
]
QUERY_SETS = {"concepts": CONCEPTS, "classes": CLASS_CONCEPTS}


def load_peaks(cat) -> dict[tuple[str, int], list[Peak]]:
    where = Filter().eq("kind", "top").between("rank", high=JUDGE_EXAMPLES - 1)
    frame = pl.from_arrow(cat.store.read_examples(where, ["coder_id", "feature", "rank", "tokens", "max_position"]))
    peaks: dict[tuple[str, int], list[Peak]] = {}
    for coder_id, feature, tokens, p in frame.select("coder_id", "feature", "tokens", "max_position").iter_rows():
        if tokens and 0 < p < len(tokens):
            # every stored window starts with BOS (its text, '<bos>', is no part of the line the peak is on)
            tokens, p = tokens[1:], p - 1
            peaks.setdefault((coder_id, feature), []).append(peak_of(tokens, p))
    return peaks


def fires_on(peaks: list[Peak], judge: Callable[[Peak], bool]) -> bool:
    return bool(peaks) and sum(judge(p) for p in peaks) >= JUDGE_SHARE * len(peaks)


def search(cat, mode: str, text: str, k: int) -> pl.DataFrame:
    if mode == "auto":
        mode = auto_mode(text)
    if mode == "semantic":
        return cat.search(text).limit(k).to_polars()
    if mode == "keyword":
        return cat.keyword(text).limit(k).to_polars()
    return cat.hybrid(text).limit(k).to_polars()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--modes", default="semantic,keyword,hybrid")
    ap.add_argument("--sets", default=",".join(QUERY_SETS), help="query sets: " + ", ".join(QUERY_SETS))
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--json", default=None, help="write per-query results here")
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")

    cat = featuredb.open(args.db)
    started = time.perf_counter()
    peaks = load_peaks(cat)
    methods = Counter(cat.store.table("features").search().select(["description_method"]).limit(None)
                      .to_arrow()["description_method"].to_pylist())
    print(f"catalogue {args.db}: {len(peaks):,} features with top examples; descriptions by "
          + ", ".join(f"{m} ({n:,})" for m, n in methods.most_common()))
    report = {"db": args.db, "k": args.k, "methods": dict(methods), "sets": {}}
    for set_name in args.sets.split(","):
        report["sets"][set_name] = run_set(cat, peaks, set_name, QUERY_SETS[set_name], modes, args, started)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def run_set(cat, peaks, set_name: str, concepts, modes: list[str], args, started: float) -> dict:
    answerable = {q: sum(fires_on(ps, judge) for ps in peaks.values()) for q, judge in concepts}
    scored = [(q, judge) for q, judge in concepts if answerable[q]]
    print(f"\n[{set_name}] {len(concepts)} concepts, {len(scored)} with at least one feature firing on them "
          f"(judged in {time.perf_counter() - started:.1f}s); unscored: "
          + (", ".join(q for q, _ in concepts if not answerable[q]) or "none"))

    results = []
    hits = {m: 0 for m in modes}
    by_shape: dict[tuple[str, str], list[int]] = {}
    for q, judge in scored:
        row = {"query": q, "shape": query_shape(q), "features_firing": answerable[q]}
        for mode in modes:
            found = search(cat, mode, q, args.k)
            keys = list(zip(found["coder_id"].to_list(), found["feature"].to_list()))
            good = [fires_on(peaks.get(key, []), judge) for key in keys]
            hit = any(good)
            hits[mode] += hit
            by_shape.setdefault((mode, row["shape"]), []).append(int(hit))
            row[mode] = {"hit": hit, "results": [f"{c}/{f}" for c, f in keys], "good": good,
                         "descriptions": found["description"].to_list()}
            if args.show_misses and not hit:
                print(f"  miss [{mode}] {q!r}: " + " | ".join((d or "")[:70] for d in found["description"].to_list()[:3]))
        results.append(row)

    n = len(scored)
    print(f"[{set_name}] hit@{args.k} over {n} concepts")
    print("| mode | hit@%d | " % args.k + " | ".join(sorted({s for _, s in by_shape})) + " |")
    for mode in modes:
        shapes = " | ".join(f"{sum(v)}/{len(v)}" for (m, s), v in sorted(by_shape.items()) if m == mode)
        print(f"| {mode} | {hits[mode]}/{n} ({hits[mode] / max(n, 1):.0%}) | {shapes} |")
    return {"hits": hits, "n": n, "unscored": [q for q, _ in concepts if not answerable[q]], "results": results}


if __name__ == "__main__":
    main()
