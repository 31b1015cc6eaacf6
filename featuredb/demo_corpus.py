"""A demo corpus that every Python installation already carries: prose and code, no download.

Three kinds of documents, told apart by the `source` field and the id prefix:

    reference   topics/<name>   the language reference topics behind `help('assert')` (pydoc_data.topics)
    docstring   doc/<module>    a module's docstring followed by the docstrings of its public functions,
                                classes and methods, with their signatures
    code        src/<module>    the module's source code (inspect.getsource)

A text longer than `max_chars` is cut into parts `<id>/0`, `<id>/1`, ... at top-level boundaries
(a blank line before an unindented line) where possible, else at blank lines, else at line ends.

The order is deterministic and mixed: the three kinds take turns, and inside the docstring and code
kinds the modules take turns too, so any prefix of the file (indexing with --tokens N) holds prose
and code from many modules. The same Python version writes the same file byte for byte (memory
addresses that some default values print are scrubbed).

    python -m featuredb.demo_corpus demo.jsonl
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

# Pure-Python modules that import without side effects (itertools is built in: docstrings only).
MODULES = (
    "abc", "argparse", "ast", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "fractions", "functools", "heapq", "html", "inspect",
    "ipaddress", "itertools", "json", "logging", "operator", "pathlib", "pprint", "random", "re",
    "shlex", "statistics", "string", "textwrap", "typing", "urllib.parse",
)  # fmt: skip
MAX_CHARS = 4000

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_TOP_LEVEL = re.compile(r"\n\s*\n(?=\S)")  # a blank line before an unindented line
_BLANK = re.compile(r"\n\s*\n")


def write_demo_corpus(path: str | Path, max_docs: int | None = None, max_chars: int = MAX_CHARS) -> int:
    """Write the demo corpus as JSONL (`id`, `source`, `text`); returns the number of documents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for doc_id, source, text in demo_documents(max_chars):
            if max_docs is not None and n >= max_docs:
                break
            f.write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def demo_documents(max_chars: int = MAX_CHARS) -> Iterator[tuple[str, str, str]]:
    """(id, source, text) in the corpus order: reference, docstring and code documents taking turns."""
    from pydoc_data.topics import topics

    reference = [_parts(f"topics/{name}", "reference", topics[name], max_chars) for name in sorted(topics)]
    modules = [importlib.import_module(name) for name in MODULES]
    docstrings = [_parts(f"doc/{m.__name__}", "docstring", module_docstrings(m), max_chars) for m in modules]
    code = [_parts(f"src/{m.__name__}", "code", module_source(m), max_chars) for m in modules]
    streams = [
        _concat(reference),  # topics one after another, in name order
        _round_robin(docstrings),  # modules taking turns
        _round_robin(code),
    ]
    yield from _round_robin(streams)


def module_docstrings(module) -> str:
    """The module docstring, then `name(signature)` and docstring of each public member defined in it
    (classes followed by their public methods), in name order."""
    blocks = [module.__name__, inspect.cleandoc(module.__doc__ or "")]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _defined_in(obj, module):
            continue
        blocks.append(_member_doc(name, obj))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") and attr != "__init__":
                    continue
                member = getattr(member, "__func__", member)  # classmethod / staticmethod
                if inspect.isroutine(member) and member.__doc__:
                    blocks.append(_member_doc(f"{name}.{attr}", member))
    return "\n\n".join(b for b in blocks if b.strip())


def module_source(module) -> str:
    """The module's source code, or "" for a built-in module."""
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""


def split_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut text into pieces of at most max_chars: at top-level boundaries, else blank lines, else lines."""
    text = text.strip("\n")
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    pieces: list[str] = []
    for unit in _units(text, max_chars):
        if pieces and len(pieces[-1]) + 2 + len(unit) <= max_chars:
            pieces[-1] += "\n\n" + unit
        else:
            pieces.append(unit)
    return [p for p in pieces if p.strip()]


def _units(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of at most max_chars that split_text packs together: the coarsest split that fits."""
    for block in _TOP_LEVEL.split(text):
        if len(block) <= max_chars:
            yield block
            continue
        for paragraph in _BLANK.split(block):
            if len(paragraph) <= max_chars:
                yield paragraph
                continue
            line_pack = ""
            for line in paragraph.split("\n"):
                while len(line) > max_chars:  # a single very long line: hard cut
                    if line_pack:
                        yield line_pack
                        line_pack = ""
                    yield line[:max_chars]
                    line = line[max_chars:]
                if line_pack and len(line_pack) + 1 + len(line) > max_chars:
                    yield line_pack
                    line_pack = line
                else:
                    line_pack = f"{line_pack}\n{line}" if line_pack else line
            if line_pack:
                yield line_pack


def _parts(doc_id: str, source: str, text: str, max_chars: int) -> list[tuple[str, str, str]]:
    pieces = split_text(text, max_chars)
    if len(pieces) == 1:
        return [(doc_id, source, pieces[0])]
    return [(f"{doc_id}/{i}", source, piece) for i, piece in enumerate(pieces)]


def _defined_in(obj, module) -> bool:
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return False
    return getattr(obj, "__module__", None) == module.__name__ or (
        module.__name__ == "itertools" and getattr(obj, "__module__", None) is None
    )


def _member_doc(name: str, obj) -> str:
    doc = inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else ""
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = ""
    head = ("class " if inspect.isclass(obj) else "") + name + signature
    body = "\n".join(f"    {line}" if line else "" for line in doc.splitlines())
    return _ADDRESS.sub("", f"{head}\n{body}" if body else head)


def _concat(lists: list[list]) -> Iterator:
    for items in lists:
        yield from items


def _round_robin(iterables) -> Iterator:
    iterators = [iter(it) for it in iterables]
    while iterators:
        alive = []
        for it in iterators:
            for item in it:
                yield item
                alive.append(it)
                break
        iterators = alive


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m featuredb.demo_corpus OUT.jsonl [MAX_DOCS]")
    count = write_demo_corpus(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else None)
    print(f"wrote {count} documents to {sys.argv[1]}")
