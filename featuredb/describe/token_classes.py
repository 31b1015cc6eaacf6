"""Names for what a token is, in the words people search with: symbols by name, whitespace,
numbers, capitalisation, Python keywords, English function words, identifiers and word pieces.

Pure functions of strings, shared by the `words` explainer (describe/words.py) and by keyword
search (query/search.py turns a quoted symbol into the same names the descriptions carry).
"""

from __future__ import annotations

import builtins
import keyword
import re
from dataclasses import dataclass

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

# Built-in functions and types people search for by name ("built-in functions", "type names").
PYTHON_BUILTIN_FUNCTIONS = frozenset(
    name for name in dir(builtins) if name.islower() and not name.startswith("_")
    and name not in ("copyright", "credits", "license", "exit", "quit", "help"))
PYTHON_TYPE_NAMES = frozenset({"int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set", "frozenset",
                               "complex", "object", "type", "bytearray", "Any", "Optional", "Union", "List", "Dict",
                               "Tuple", "Callable", "Iterable", "Iterator", "Sequence", "Mapping"})
KEYWORD_GROUPS: dict[str, frozenset[str]] = {
    "control_flow": frozenset({"if", "elif", "else", "for", "while", "break", "continue", "return", "try", "except",
                               "finally", "raise", "with", "yield", "pass", "match", "case", "await"}),
    "constants": frozenset({"None", "True", "False"}),
    "logic": frozenset({"and", "or", "not", "in", "is"}),
    "definitions": frozenset({"def", "class", "lambda", "import", "from", "as", "global", "nonlocal", "async", "del",
                              "assert"}),
}

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


# --- classes of tokens ----------------------------------------------------------------------------
# A class is a family of tokens people search for by its name ("closing brackets", "plural nouns",
# "function names"): by form, by word class, by role in code. The `words` explainer counts, for each
# class, the share of a feature's peaks in it and names the class when that share is high enough.


@dataclass(frozen=True)
class TokenClass:
    text: str  # how a description names it
    parent: str | None  # the broader class it belongs to (a class is named in place of its parent)
    specificity: int  # ties on share go to the narrower class


TOKEN_CLASSES: dict[str, TokenClass] = {
    # by form
    "numbers": TokenClass("digits (numbers)", None, 2),
    "punctuation": TokenClass("punctuation or symbol", None, 1),
    "brackets": TokenClass("brackets", "punctuation", 2),
    "opening_brackets": TokenClass("opening bracket", "brackets", 3),
    "closing_brackets": TokenClass("closing bracket", "brackets", 3),
    "quotes": TokenClass("quotation mark (string delimiter)", "punctuation", 3),
    "arithmetic": TokenClass("arithmetic operators (+ - * /)", "punctuation", 3),
    "comparison": TokenClass("comparison operators (== != < >)", "punctuation", 3),
    "sentence_punctuation": TokenClass("sentence punctuation (periods, commas)", "punctuation", 2),
    "whitespace": TokenClass("whitespace", None, 0),
    "whitespace_runs": TokenClass("whitespace runs (several spaces or line breaks)", "whitespace", 1),
    "capitalised": TokenClass("capitalised word", None, 2),
    "proper_nouns": TokenClass("proper nouns (capitalised names mid-sentence)", "capitalised", 3),
    "all_caps": TokenClass("all-caps words (acronyms, constants)", None, 2),
    "camel_case": TokenClass("camelCase identifiers", None, 2),
    "snake_case": TokenClass("snake_case identifier (name with underscores)", None, 3),
    "word_endings": TokenClass("word endings (the last piece of a longer word)", None, 2),
    "file_paths": TokenClass("file paths and file names", None, 3),
    "urls": TokenClass("URLs (web addresses)", None, 3),
    # by word class (English)
    "function_words": TokenClass("function words (stop words)", None, 1),
    "negations": TokenClass("negation words", "function_words", 3),
    "conjunctions": TokenClass("conjunctions", "function_words", 3),
    "articles": TokenClass("articles (determiners)", "function_words", 3),
    "prepositions": TokenClass("prepositions", "function_words", 3),
    "pronouns": TokenClass("pronouns", "function_words", 3),
    "auxiliaries": TokenClass("auxiliary and modal verbs", "function_words", 3),
    "conditionals": TokenClass("conditional words", "function_words", 3),
    "number_words": TokenClass("number words", "function_words", 3),
    "question_words": TokenClass("question words (what, which, who, how)", "function_words", 3),
    "verbs": TokenClass("verbs", None, 2),
    "ing_verbs": TokenClass("verbs ending -ing (gerunds, participles)", "verbs", 3),
    "ed_verbs": TokenClass("verbs ending -ed (past tense)", "verbs", 3),
    "plural_nouns": TokenClass("plural nouns (words ending -s)", None, 3),
    "abstract_nouns": TokenClass("nouns ending -tion, -ment, -ness, -ity", None, 3),
    "adjectives": TokenClass("adjectives (-able, -ive, -ous, -ful, -al)", None, 3),
    "adverbs": TokenClass("adverbs ending -ly", None, 3),
    # by role in code
    "identifiers": TokenClass("names (identifiers) in code", None, 1),
    "function_names": TokenClass("function names", "identifiers", 3),
    "method_names": TokenClass("method names (after a dot, before a call)", "function_names", 4),
    "class_names": TokenClass("class names", "identifiers", 3),
    "variable_names": TokenClass("variable names (assigned with =)", "identifiers", 3),
    "argument_names": TokenClass("parameter and keyword argument names", "identifiers", 3),
    "attribute_names": TokenClass("attribute names (after a dot)", "identifiers", 3),
    "module_names": TokenClass("module names in imports", "identifiers", 3),
    "builtins": TokenClass("Python built-in functions and types", "identifiers", 3),
    "exception_names": TokenClass("exception classes (errors)", None, 3),
    "keywords": TokenClass("Python keywords", None, 2),
    "control_flow": TokenClass("control-flow keywords (if, for, return)", "keywords", 3),
    "constants": TokenClass("constants None, True, False", "keywords", 3),
    "logic": TokenClass("boolean and membership operators (and, or, not, in)", "keywords", 3),
    "definitions": TokenClass("definition and import keywords (def, class, import)", "keywords", 3),
}

QUESTION_WORDS = frozenset({"what", "which", "who", "whom", "whose", "when", "where", "why", "how"})
FUNCTION_WORD_CLASSES = {
    "negation": "negations", "conjunction": "conjunctions", "article (determiner)": "articles",
    "preposition": "prepositions", "pronoun": "pronouns", "auxiliary or modal verb": "auxiliaries",
    "conditional word": "conditionals", "number word": "number_words",
}


def class_ancestors(key: str) -> list[str]:
    """The broader classes a class belongs to, nearest first."""
    out = []
    parent = TOKEN_CLASSES[key].parent
    while parent is not None:
        out.append(parent)
        parent = TOKEN_CLASSES[parent].parent
    return out


# Words the suffix rules would misread (a noun ending -ing, a singular ending -s, ...).
_NOT_ING = frozenset("thing something nothing anything everything string during bring spring king ring sing wing "
                     "morning evening ceiling swing sibling".split())
_NOT_ED = frozenset("need speed indeed feed seed bed red shed hundred embed naked sacred wicked".split())
_NOT_PLURAL = frozenset("this his its us thus yes was has does always perhaps across unless less class process "
                        "access address pass bus status basis analysis axis series species news plus bonus "
                        "alias canvas corpus virus census lens atlas chaos gas minus versus whereas".split())
_NOT_LY = frozenset("only family apply reply supply early fly italy july assembly anomaly rely multiply imply "
                    "comply holy ugly belly jelly bully ally rally poly".split())
_ADJECTIVE_ENDINGS = ("able", "ible", "ful", "less", "ous", "ive", "ical", "ary")
_NOT_ADJECTIVE = frozenset("table cable give live five drive archive alive olive dive hive primary library "
                           "dictionary summary boundary binary".split())
_ABSTRACT_ENDINGS = ("tion", "sion", "ment", "ness", "ity", "ance", "ence")
_NOT_ABSTRACT = frozenset("since hence once fence city".split())


def word_form_class(word: str) -> str | None:
    """The class a whole lowercase English word belongs to by its ending (None: no clear one)."""
    w = word.lower()
    if not w.isalpha() or len(w) < 4 or w in FUNCTION_WORDS:
        return None
    if w.endswith("ing") and len(w) >= 5 and w not in _NOT_ING:
        return "ing_verbs"
    if w.endswith("ed") and len(w) >= 5 and w not in _NOT_ED:
        return "ed_verbs"
    if w.endswith("ly") and len(w) >= 5 and w not in _NOT_LY:
        return "adverbs"
    if w.endswith(_ABSTRACT_ENDINGS) and len(w) >= 6 and w not in _NOT_ABSTRACT:
        return "abstract_nouns"
    if w.endswith(_ADJECTIVE_ENDINGS) and len(w) >= 6 and w not in _NOT_ADJECTIVE:
        return "adjectives"
    if w.endswith("s") and not w.endswith(("ss", "us", "is", "ous")) and w not in _NOT_PLURAL:
        return "plural_nouns"
    return None


_URL = re.compile(r"(https?://|ftp://|www\.)|\w\.(com|org|net|io|edu|gov)(/|$)", re.IGNORECASE)
_FILE_EXTENSION = re.compile(
    r"\w\.(py|pyc|pyi|txt|json|csv|md|rst|yaml|yml|toml|cfg|ini|html?|css|js|ts|c|h|cpp|sh|bat|exe|dll|so|zip|"
    r"gz|tar|whl|png|jpe?g|gif|svg|pdf|log|xml|db|sqlite|ipynb)\b", re.IGNORECASE)
# Windows paths need a drive or a folder name of 3+ characters between backslashes: not a regex's '\s\d'.
_PATH = re.compile(r"(^|[\s'\"(=])(~|\.{1,2})?/[\w.-]+|[\w.-]+/[\w.-]+/|[A-Za-z]:\\|\\[A-Za-z][\w.-]{2,}\\")


def path_or_url(chunk: str) -> str | None:
    """Whether a run of text without spaces is a URL or a file path: 'urls', 'file_paths' or None."""
    if _URL.search(chunk):
        return "urls"
    if _PATH.search(chunk) or _FILE_EXTENSION.search(chunk):
        return "file_paths"
    return None
