"""Names for what a token is, in the words people search with: symbols by name, whitespace,
numbers, capitalisation, Python keywords, English function words, identifiers and word pieces.

Pure functions of strings, shared by the `words` explainer (describe/words.py) and by keyword
search (query/search.py turns a quoted symbol into the same names the descriptions carry).
"""

from __future__ import annotations

import keyword
import re

from featuredb.store.indexes import char_name, short_char_name, symbol_names

# Multi-character operators and their concept in Python code.
OPERATOR_CONCEPTS: dict[str, str] = {
    "==": "equality comparison operator", "!=": "inequality comparison operator",
    "<=": "comparison operator", ">=": "comparison operator", "<": "comparison operator", ">": "comparison operator",
    "+=": "augmented assignment", "-=": "augmented assignment", "*=": "augmented assignment",
    "/=": "augmented assignment", "|=": "augmented assignment", "&=": "augmented assignment",
    "->": "return type annotation arrow", "**": "power operator or keyword-argument unpacking",
    "//": "floor division operator", ":=": "walrus assignment expression", ">>>": "doctest prompt",
    "...": "ellipsis", "'''": "triple-quoted string", '"""': "triple-quoted string (docstring)",
    "::": "reStructuredText literal block marker", "``": "reStructuredText inline code markup",
}

OPENING = set("([{")
CLOSING = set(")]}")
QUOTES = set("'\"`")
ARITHMETIC = set("+-*/%")

PYTHON_KEYWORD_ROLES: dict[str, str] = {
    "def": "function definition", "class": "class definition", "return": "return statement",
    "import": "import statement", "from": "import statement", "as": "alias ('as')",
    "if": "conditional", "elif": "conditional", "else": "conditional", "for": "loop", "while": "loop",
    "in": "membership test or loop", "is": "identity test", "not": "boolean negation", "and": "boolean operator",
    "or": "boolean operator", "try": "exception handling", "except": "exception handling",
    "finally": "exception handling", "raise": "raising exceptions", "with": "context manager",
    "lambda": "anonymous function", "yield": "generator", "await": "async code", "async": "async code",
    "assert": "assertion", "pass": "empty statement", "break": "loop control", "continue": "loop control",
    "del": "deletion", "global": "scope declaration", "nonlocal": "scope declaration",
    "True": "boolean constant", "False": "boolean constant", "None": "None constant",
    "match": "pattern matching", "case": "pattern matching",
}
PYTHON_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) - {"_", "type"}
# Not keywords, but what the same searches are after.
PYTHON_BUILTIN_NAMES = frozenset({"self", "cls", "print", "len", "range", "str", "int", "list", "dict", "object"})

FUNCTION_WORDS: dict[str, str] = {}
for _cls, _words in {
    "negation": "not no never n't cannot none neither nor without",
    "conjunction": "and or but nor yet so because although though while whereas",
    "article (determiner)": "the a an",
    "preposition": "of in on at to for with from by about into onto over under between through after before "
                   "during within without per via than",
    "pronoun": "it its this that these those he she they them their we you your i me my his her which who whom "
               "whose what",
    "auxiliary or modal verb": "is are was were be been being has have had do does did can could will would "
                               "should may might must shall",
    "conditional word": "if unless whether when otherwise",
    "number word": "one two three four five six seven eight nine ten zero first second third",
}.items():
    for _w in _words.split():
        FUNCTION_WORDS.setdefault(_w, _cls)

_WORD = re.compile(r"^[A-Za-z]+$")
_IDENTIFIER_CHAR = re.compile(r"[A-Za-z0-9_]")
_CAMEL = re.compile(r"[a-z][A-Z]")
_ASSIGNMENT = re.compile(r"^\s*[A-Za-z_][\w.\[\]'\"]*(\s*,\s*[A-Za-z_]\w*)*\s*[-+*/|&]?=(?!=)\s*\S")
_CODE_START = re.compile(
    r"^\s*(def |class |return\b|import |from \S+ import|if .*:$|elif .*:$|else:|for .* in .*:$|while .*:$|try:|"
    r"except\b.*:$|with .*:$|raise |yield\b|assert |@\w|>>> |\.\.\. |#)")


def show_token(token: str) -> str:
    """A token in quotes with whitespace made visible: ' Paris', '\\n'."""
    return "'" + token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + "'"


def is_symbolic(token: str) -> bool:
    stripped = token.strip()
    return bool(stripped) and not any(ch.isalnum() for ch in stripped)


def line_of(tokens: tuple[str, ...] | list[str], position: int) -> tuple[str, str, str]:
    """The text of the line holding tokens[position]: (before it, the token, after it)."""
    before = "".join(tokens[:position])
    after = "".join(tokens[position + 1:])
    token = tokens[position]
    return before[before.rfind("\n") + 1:], token, after.split("\n", 1)[0]


def looks_like_code(line: str) -> bool:
    """Whether a line of text reads as Python code rather than prose: a statement shape, or a
    density of code symbols no sentence has."""
    stripped = line.strip()
    if not stripped:
        return False
    if _CODE_START.match(line) or _ASSIGNMENT.match(line):
        return True
    symbols = sum(stripped.count(ch) for ch in "=()[]{}_<>*+%|&")
    words = len(stripped.split())
    if "self." in stripped or re.search(r"\w\.\w+\(", stripped) or re.search(r"\w\(.*\)", stripped) and words <= 6:
        return True
    return symbols >= 2 and symbols >= 0.25 * words


def word_around(tokens: tuple[str, ...] | list[str], position: int) -> tuple[str, int, int]:
    """The whole word or identifier the token at `position` is part of: adjacent tokens joined
    while no whitespace or symbol (other than '_') separates them. Returns (word, first, last)."""
    def joins(left: str, right: str) -> bool:
        return bool(left) and bool(right) and not right[0].isspace() and \
            bool(_IDENTIFIER_CHAR.match(left[-1])) and bool(_IDENTIFIER_CHAR.match(right[0]))

    first = last = position
    while first > 0 and joins(tokens[first - 1], tokens[first]):
        first -= 1
    while last + 1 < len(tokens) and joins(tokens[last], tokens[last + 1]):
        last += 1
    return "".join(tokens[first:last + 1]).strip(), first, last


def capitalisation(word: str) -> str | None:
    letters = [ch for ch in word if ch.isalpha()]
    if not letters:
        return None
    if len(letters) > 1 and all(ch.isupper() for ch in letters):
        return "all-caps word"
    if letters[0].isupper() and not _CAMEL.search(word):
        return "capitalised word"
    if _CAMEL.search(word):
        return "camelCase identifier"
    return "lowercase word"
