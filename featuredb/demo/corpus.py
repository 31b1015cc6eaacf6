"""A demo corpus that every Python installation already carries: prose and code, no download.

Three kinds of documents, told apart by the `source` field and the id prefix:

    reference   topics/<name>   the language reference topics behind `help('assert')` (pydoc_data.topics)
    docstring   doc/<module>    a module's docstring followed by the docstrings of its public functions,
                                classes and methods, with their signatures (read from the source file)
    code        src/<module>    the module's source code (inspect.getsource)

A text longer than `max_chars` is cut into parts `<id>/0`, `<id>/1`, ... at top-level boundaries
(a blank line before an unindented line) where possible, else at blank lines, else at line ends.

The order is deterministic and mixed: the three kinds take turns, and inside the docstring and code
kinds the modules take turns too, so any prefix of the file (indexing with --tokens N) holds prose
and code from many modules. The same Python installation writes the same file byte for byte, whatever
else the process has imported (docstrings come from the source files, not from live objects).

    python -m featuredb.demo.corpus demo.jsonl
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sys
import tokenize
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

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
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
    """The module docstring, then `name(args)` and the docstring of each public function and class
    (a class followed by its documented public methods), in source order.

    Read from the source file with `ast`, not from the live objects: other imports patch stdlib
    modules at run time (e.g. replace inspect.getfile), and the corpus must not depend on them.
    A built-in module (itertools) has no source: its objects are read instead.
    """
    source = module_source(module)
    if not source:
        return _builtin_docstrings(module)
    tree = ast.parse(source)
    blocks = [module.__name__, ast.get_docstring(tree) or ""]
    for node in tree.body:
        if isinstance(node, _DEFS) and not node.name.startswith("_"):
            blocks.append(_ast_doc(node.name, node))
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if not isinstance(item, _FUNCTIONS) or not ast.get_docstring(item):
                        continue
                    if not item.name.startswith("_") or item.name == "__init__":
                        blocks.append(_ast_doc(f"{node.name}.{item.name}", item))
    return "\n\n".join(b for b in blocks if b.strip())


def module_source(module) -> str:
    """The module's source file as text, or "" for a built-in module."""
    origin = getattr(module, "__file__", None)  # frozen modules (abc) have __file__ but no spec origin
    if not origin or not origin.endswith(".py"):
        return ""
    with tokenize.open(origin) as f:  # honours an encoding cookie
        return f.read()


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


def _ast_doc(name: str, node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        head = f"class {name}({bases})" if bases else f"class {name}"
    else:
        head = f"{name}({ast.unparse(node.args)})"
    return _with_doc(head, ast.get_docstring(node) or "")


def _builtin_docstrings(module) -> str:
    blocks = [module.__name__, inspect.cleandoc(module.__doc__ or "")]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = ""
        head = ("class " if inspect.isclass(obj) else "") + name + signature
        blocks.append(_with_doc(head, inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else ""))
    return "\n\n".join(b for b in blocks if b.strip())


def _with_doc(head: str, doc: str) -> str:
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
        sys.exit("usage: python -m featuredb.demo.corpus OUT.jsonl [MAX_DOCS]")
    count = write_demo_corpus(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else None)
    print(f"wrote {count} documents to {sys.argv[1]}")
