"""The `words` explainer: an offline description of what a feature fires on, in the words people
search with.

For every stored example (top and interval) it looks at the token where the example peaks and
names what that token is (a symbol by name, a newline and its indentation, a number, a Python
keyword, an English function word, a capitalised word, an identifier or a piece of a longer word),
what role it plays (an assignment, a call, a function name after `def`, an import, a string), and
where it sits (code or prose, start or end of a line, the token before and after). Each such claim
is counted over the top examples and over the interval examples; a claim goes into the description
only when it fits at least CLAIM_SHARE of the top examples (of the interval examples when there
are no top ones), with that share. A peak also belongs to classes of tokens (token_classes.
TOKEN_CLASSES: by form, by word class, by role in code), counted the same way; the narrowest
class that fits as many peaks is named first, unless one token fits as many (its own claim says
it). The literal tokens follow (keyword search needs them), then what the feature promotes: at
most three readable tokens that occur in the indexed text (the logit table keeps the rest),
named the same way when they share a class.

    "equals sign '=' (100%); assignment (90%); in Python code (100%); after a name (80%) —
     tokens ' =', '=' — promotes ' None', ' self', ' 0'"
    "plural nouns (words ending -s) (63%); in prose (88%) — tokens ' patterns', ' methods'"

Deterministic: the same evidence gives the same text. `analyse` returns the claims with both
shares for the LLM prompt and for the record kept with each description.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType

from featuredb.describe.evidence import Context, FeatureEvidence
from featuredb.describe.token_classes import (
    CLOSING,
    FUNCTION_WORD_CLASSES,
    FUNCTION_WORDS,
    KEYWORD_GROUPS,
    QUESTION_WORDS,
    OPENING,
    OPERATOR_CONCEPTS,
    PYTHON_BUILTIN_FUNCTIONS,
    PYTHON_BUILTIN_NAMES,
    PYTHON_KEYWORD_ROLES,
    PYTHON_KEYWORDS,
    PYTHON_TYPE_NAMES,
    QUOTES,
    TOKEN_CLASSES,
    capitalisation,
    class_ancestors,
    is_symbolic,
    line_of,
    looks_like_code,
    path_or_url,
    short_char_name,
    show_token,
    word_around,
    word_form_class,
)

WORDS_METHOD = "words"
WORDS_VERSION = "words-v2"  # v2: classes of tokens; promotes only tokens of the indexed text
CLAIM_SHARE = 0.6  # a claim must fit at least this share of the examples it is counted on
MAX_CLAIMS = {"what": 3, "class": 2, "role": 2, "where": 3}
LABEL_TOKENS = 3
LABEL_LOGITS = 3
LOGIT_CLASS_SHARE = 0.5  # promoted tokens named by class when this share of the top ten share it
SUFFIXES = ("ing", "ed", "s", "es", "ly", "tion", "ion", "er", "ers", "able", "ment", "ness", "ize", "ise", "al",
            "ity", "ive", "ous")

# family -> order in the text; within a family, higher share first, then the more specific claim.
# "class" names a family of tokens the peaks share (see token_classes.TOKEN_CLASSES).
_FAMILIES = ("what", "class", "role", "where")
_ARITHMETIC = frozenset({"+", "-", "*", "/", "%", "**", "//", "+=", "-=", "*=", "/="})
_COMPARISON = frozenset({"==", "!=", "<", ">", "<=", ">="})
_SENTENCE_PUNCTUATION = frozenset({".", ",", ";", ":", "!", "?"})
_ONE_TOKEN = ("symbol:", "lex:", "keyword:", "builtin:", "piece:", "indent:", "newline", "blank_line")
# Unicode categories no readable token holds: control, format (zero-width joiners, direction marks),
# private use, unassigned, surrogates.
_UNREADABLE = frozenset({"Cc", "Cf", "Co", "Cn", "Cs"})
_MODALS = frozenset({"to", "can", "could", "will", "would", "should", "may", "might", "must", "shall", "cannot"})


@dataclass(frozen=True)
class Claim:
    """One thing the feature's peaks share, with how many examples fit it."""

    key: str  # stable identity ("symbol:=", "newline", "code")
    text: str  # how the description says it
    family: str  # "what" (the token), "role" (its part in the text), "where" (its surroundings)
    specificity: int  # ties on share go to the more specific claim
    top: int = 0
    top_n: int = 0
    interval: int = 0
    interval_n: int = 0

    @property
    def share(self) -> float:
        """Share of the examples the claim is judged on: top ones, else interval ones."""
        if self.top_n:
            return self.top / self.top_n
        return self.interval / self.interval_n if self.interval_n else 0.0


@dataclass(frozen=True)
class _Fact:
    text: str
    family: str
    specificity: int


# --- what one example's peak is -------------------------------------------------------------------


def _symbol_facts(token: str, code: bool, before_line: str, prev: str, nxt: str) -> dict[str, _Fact]:
    s = token.strip()
    facts: dict[str, _Fact] = {}
    names = [short_char_name(ch) for ch in dict.fromkeys(s)]
    quoted = show_token(s)
    facts[f"symbol:{s}"] = _Fact(f"{' and '.join(names)} {quoted}", "what", 5)
    if len(s) > 1 or s not in OPENING | CLOSING:
        for ch in dict.fromkeys(s):  # a class of tokens sharing one symbol: '(', '):', '()'
            if len(s) > 1:
                facts[f"char:{ch}"] = _Fact(f"tokens containing the {short_char_name(ch)}", "what", 3)
    classes = ["punctuation"]
    if all(ch in OPENING for ch in s):
        classes.append("opening_brackets")
    elif all(ch in CLOSING for ch in s) or (s[0] in CLOSING and len(s) > 1):
        classes.append("closing_brackets")
    elif all(ch in OPENING | CLOSING for ch in s):
        classes.append("brackets")
    if all(ch in QUOTES for ch in s):
        classes.append("quotes")
    if s in _ARITHMETIC and code:
        classes.append("arithmetic")
    elif s in _COMPARISON:
        classes.append("comparison")
    elif s in _SENTENCE_PUNCTUATION and not code:
        classes.append("sentence_punctuation")
    facts.update(_class_facts(classes))
    concept = OPERATOR_CONCEPTS.get(s)
    if concept and (code or s in (">>>", "::", "``")):
        facts[f"op:{concept}"] = _Fact(concept, "role", 4)
    if s == "=" and code:
        depth = before_line.count("(") - before_line.count(")")
        if depth > 0:
            facts["kwarg"] = _Fact("keyword argument or default value (= inside parentheses)", "role", 4)
        else:
            facts["assignment"] = _Fact("assignment (variable = value)", "role", 4)
    if s == "." and code and prev[-1:].isalnum() and nxt[:1].isalpha():
        facts["attr_dot"] = _Fact("attribute access (dot between names)", "role", 4)
    if s.startswith("@") and not before_line.strip():
        facts["decorator"] = _Fact("decorator", "role", 4)
    if s.startswith("#") and code:
        facts["comment"] = _Fact("start of a comment", "role", 4)
    if s == "." and not code and (not nxt or nxt[:1].isspace()):
        facts["sentence_end"] = _Fact("end of a sentence", "role", 3)
    if s in (",", ";") and not code:
        facts["clause"] = _Fact("between clauses or list items", "role", 2)
    return facts


def _whitespace_facts(tokens: tuple[str, ...], p: int, before_line: str) -> dict[str, _Fact]:
    token = tokens[p]
    facts: dict[str, _Fact] = {}
    nxt = tokens[p + 1] if p + 1 < len(tokens) else ""
    if "\n" in token:
        facts["newline"] = _Fact("newline (line break)", "what", 3)
        if "\n\n" in token.replace(" ", "").replace("\t", ""):
            facts["blank_line"] = _Fact("blank line (paragraph break)", "what", 4)
        indent = token.rsplit("\n", 1)[1]
        if nxt and not nxt.strip() and "\n" not in nxt:
            indent += nxt
        if indent:
            facts["indentation"] = _Fact("newline followed by indentation", "what", 4)
            width = len(indent.expandtabs(4))
            facts[f"indent:{width}"] = _Fact(f"newline followed by {width}-space indentation", "what", 5)
    elif "\t" in token:
        facts["tab"] = _Fact("tab character", "what", 4)
    else:
        if not before_line.strip():
            facts["indentation"] = _Fact("indentation (spaces at the start of a line)", "what", 4)
            width = len(token.expandtabs(4))
            facts[f"indent:{width}"] = _Fact(f"{width}-space indentation at the start of a line", "what", 5)
        else:
            facts["spaces"] = _Fact("run of spaces", "what", 3)
    facts.update(_class_facts(["whitespace_runs" if len(token) >= 2 else "whitespace"]))
    return facts


def _number_facts(tokens: tuple[str, ...], p: int) -> dict[str, _Fact]:
    s = tokens[p].strip()
    whole, first, last = word_around(tokens, p)
    facts = _class_facts(["numbers"])
    if len(s) == 1:
        facts["digit"] = _Fact("single digit", "what", 2)
    if whole.lower().startswith("0x"):
        facts["hex"] = _Fact("hexadecimal number", "what", 4)
    elif whole.isdigit() and len(whole) == 4 and whole[:2] in ("19", "20"):
        facts["year"] = _Fact("year", "what", 4)
    elif first < p or last > p:
        facts["long_number"] = _Fact("digit inside a longer number or name", "what", 2)
    if (p > 0 and tokens[p - 1] == ".") or (p + 1 < len(tokens) and tokens[p + 1] == "."):
        facts["decimal"] = _Fact("decimal number or version", "what", 3)
    return facts


def _word_facts(tokens: tuple[str, ...], p: int, code: bool, before_line: str) -> dict[str, _Fact]:
    token = tokens[p]
    s = token.strip()
    word, first, last = word_around(tokens, p)
    whole = first == p == last
    facts: dict[str, _Fact] = {}
    classes: list[str] = []
    lower = s.lower()
    if first < p:
        facts["piece"] = _Fact("subword piece inside a longer word", "what", 3)
        if last == p and lower in SUFFIXES:
            facts[f"suffix:{lower}"] = _Fact(f"the suffix -{lower} ending words like {show_token(word)}", "what", 4)
        if last == p:
            classes.append("word_endings")
        facts[f"piece:{lower}"] = _Fact(f"subword piece {show_token(s)} inside longer words like {show_token(word)}",
                                        "what", 5)
    elif last > p:
        facts["word_start"] = _Fact("first piece of a longer word", "what", 3)
    if "_" in word.strip("_") and code:
        classes.append("snake_case")
    if word.startswith("__") and word.endswith("__") and len(word) > 4:
        facts["dunder"] = _Fact("dunder name (__special__ method or attribute)", "what", 4)
    case = capitalisation(word)
    classes += {"capitalised word": ["capitalised"], "all-caps word": ["all_caps"],
                "camelCase identifier": ["camel_case"]}.get(case or "", [])
    if case == "capitalised word" and not code and first == p and before_line.strip() and \
            not before_line.rstrip().endswith((".", "!", "?", ":", '"', "'", "(", "#", "*", "-")):
        classes.append("proper_nouns")  # capitalised where a sentence does not start
    if word.endswith(("Error", "Exception", "Warning")) and len(word) > 7:
        classes.append("exception_names")
    if whole and s.isalpha():  # the word itself, whatever the text around it
        cls = FUNCTION_WORDS.get(lower)
        facts[f"lex:{lower}"] = _Fact(f"the word {show_token(lower)}" + (f" ({cls})" if cls else ""), "what", 5)
    prev = tokens[p - 1].strip() if first > 0 else ""
    nxt = tokens[last + 1] if last + 1 < len(tokens) else ""
    if whole and code and s in PYTHON_KEYWORDS:
        facts[f"keyword:{s}"] = _Fact(f"Python keyword {show_token(s)}", "what", 6)
        classes += ["keywords"] + [group for group, words in KEYWORD_GROUPS.items() if s in words]
        role = PYTHON_KEYWORD_ROLES.get(s)
        if role:
            facts[f"kwrole:{role}"] = _Fact(role, "role", 4)
    elif whole and code and s in PYTHON_BUILTIN_NAMES:
        facts[f"builtin:{s}"] = _Fact(f"the name {show_token(s)} in code", "what", 4)
    elif whole and lower in FUNCTION_WORDS:
        classes += ["function_words", FUNCTION_WORD_CLASSES[FUNCTION_WORDS[lower]]]
        if lower in QUESTION_WORDS:
            classes.append("question_words")
    elif code and not (s in PYTHON_KEYWORDS):
        classes.append("identifiers")
    if code and (word in PYTHON_BUILTIN_FUNCTIONS or word in PYTHON_TYPE_NAMES) and first == p:
        classes.append("builtins")
    prose = not code or "#" in before_line or before_line.count('"') % 2 == 1 or before_line.count("'") % 2 == 1
    if whole and s.isalpha() and s.islower() and prose:  # English words by their form or place
        form = word_form_class(s)
        if form:
            classes.append(form)
        elif prev.lower() in _MODALS and lower not in FUNCTION_WORDS:
            classes.append("verbs")  # 'to return', 'can change'
    if code:
        if prev == "def":
            facts["def_name"] = _Fact("function name in a def (function definition)", "role", 5)
            classes.append("function_names")
        elif prev == "class":
            facts["class_name"] = _Fact("class name in a class definition", "role", 5)
            classes.append("class_names")
        elif before_line.lstrip().startswith(("import ", "from ")):
            facts["import"] = _Fact("module name in an import statement", "role", 4)
            classes.append("module_names")
        elif prev.endswith(".") and first > 0:
            facts["attribute"] = _Fact("attribute or method name after a dot", "role", 4)
            classes.append("attribute_names")
        if nxt.startswith("(") and s not in PYTHON_KEYWORDS:
            facts["call"] = _Fact("function or method name before its call parentheses", "role", 4)
            if case == "capitalised word":
                classes.append("class_names")  # CapWords(...) constructs an instance
            elif prev.endswith(".") and first > 0:
                classes.append("method_names")
            elif "builtins" not in classes:
                classes.append("function_names")
        elif nxt.strip().startswith("=") and not nxt.strip().startswith("==") and \
                before_line.count("(") > before_line.count(")"):
            facts["kwarg_name"] = _Fact("keyword argument name", "role", 4)
            classes.append("argument_names")
        elif nxt.strip().startswith("=") and not nxt.strip().startswith("==") and "identifiers" in classes:
            classes.append("variable_names")
        elif before_line.lstrip().startswith("def ") and before_line.count("(") > before_line.count(")") and \
                "identifiers" in classes:
            classes.append("argument_names")  # a parameter in a def's signature
    facts.update(_class_facts(classes))
    return facts


def _class_facts(classes: list[str]) -> dict[str, _Fact]:
    """Facts naming the classes of tokens a peak belongs to, and every broader class above them."""
    keys = dict.fromkeys(k for c in classes for k in (c, *class_ancestors(c)))
    return {f"class:{k}": _Fact(TOKEN_CLASSES[k].text, "class", TOKEN_CLASSES[k].specificity) for k in keys}


def _where_facts(tokens: tuple[str, ...], p: int, code: bool, before_line: str, after_line: str,
                 after_text: str) -> dict[str, _Fact]:
    token = tokens[p]
    facts: dict[str, _Fact] = {}
    facts["code" if code else "prose"] = _Fact("in Python code" if code else "in prose",
                                               "where", 1)
    if "\n" not in token and token.strip():
        if not before_line.strip():
            facts["line_start"] = _Fact("at the start of a line", "where", 3)
        if not after_line.strip() and "\n" in after_text:
            facts["line_end"] = _Fact("at the end of a line", "where", 3)
        if code and (before_line.count('"') % 2 == 1 or before_line.count("'") % 2 == 1):
            facts["string"] = _Fact("inside a string literal", "where", 3)
        if code and "#" in before_line:
            facts["in_comment"] = _Fact("inside a comment", "where", 3)
        if before_line.count("``") % 2 == 1:
            facts["inline_code"] = _Fact("inside ``inline code`` in documentation", "where", 3)
        if before_line.lstrip().startswith(">>>"):
            facts["doctest"] = _Fact("in a doctest example (>>>)", "where", 3)
    if p > 0:
        facts[f"after:{tokens[p - 1]}"] = _Fact(f"after {_named(tokens[p - 1])}", "where", 2)
    if p + 1 < len(tokens):
        facts[f"before:{tokens[p + 1]}"] = _Fact(f"before {_named(tokens[p + 1])}", "where", 2)
    return facts


def _named(token: str) -> str:
    """A neighbouring token as the text says it: symbols by name, whitespace by kind."""
    if "\n" in token:
        return "a newline"
    if not token.strip():
        return "spaces"
    if is_symbolic(token):
        return f"{' and '.join(short_char_name(ch) for ch in dict.fromkeys(token.strip()))} {show_token(token.strip())}"
    return show_token(token)


def facts_of(ctx: Context) -> Mapping[str, _Fact]:
    """What is true of one example's peak token (keyed so examples can be counted together).
    Read-only: one mapping per distinct (context, peak), shared by every example that has it."""
    return _peak_facts(ctx.tokens, ctx.max_position)


# The facts depend on the window and the peak only, and features of a catalogue peak at the same
# places again and again (the demo's first 1,024 features of each coder: 219k examples, 68k
# distinct peaks). Keyed by the token tuple, which evidence shares per indexed context, so a hit
# compares by identity. At most 65k peaks (~100 MB); a describe run empties it when it ends.
@functools.lru_cache(maxsize=1 << 16)
def _peak_facts(tokens: tuple[str, ...], p: int) -> Mapping[str, _Fact]:
    if not tokens or not 0 <= p < len(tokens):
        return MappingProxyType({})
    token = tokens[p]
    before_line, _, after_line = line_of(tokens, p)
    after_text = "".join(tokens[p + 1:])
    if "\n" in token:
        prev_line = "".join(tokens[:p]).rsplit("\n", 1)[-1]
        code = looks_like_code(prev_line) or looks_like_code(after_line)
    else:
        code = looks_like_code(before_line + token + after_line)
    prev = tokens[p - 1] if p > 0 else ""
    nxt = tokens[p + 1] if p + 1 < len(tokens) else ""
    s = token.strip()
    if not s:
        facts = _whitespace_facts(tokens, p, before_line)
    elif s.isdigit():
        facts = _number_facts(tokens, p)
    elif is_symbolic(token):
        facts = _symbol_facts(token, code, before_line, prev, nxt)
    else:
        facts = _word_facts(tokens, p, code, before_line)
    if s:
        left = "" if token[:1].isspace() else re.split(r"\s", before_line)[-1]
        right = "" if token[-1:].isspace() else re.split(r"\s", after_line)[0]
        where_from = path_or_url(left + s + right)  # the run of text without spaces the token is in
        if where_from:
            facts.update(_class_facts([where_from]))
    facts.update(_where_facts(tokens, p, code, before_line, after_line, after_text))
    return MappingProxyType(facts)


def forget_peak_facts() -> None:
    """Empty the cache of facts_of (a describe run calls it when it ends)."""
    _peak_facts.cache_clear()


# --- counting claims over examples ----------------------------------------------------------------


def _active(contexts: list[Context]) -> list[Context]:
    return [c for c in contexts if c.tokens and c.max_value > 0]


def analyse(ev: FeatureEvidence) -> list[Claim]:
    """Every claim that fits at least one example, with its counts; the supported ones first."""
    top, interval = _active(ev.top), _active(ev.interval)
    found: dict[str, _Fact] = {}
    top_count: Counter[str] = Counter()
    interval_count: Counter[str] = Counter()
    for contexts, count in ((top, top_count), (interval, interval_count)):
        for ctx in contexts:
            facts = facts_of(ctx)
            for key, fact in facts.items():
                found.setdefault(key, fact)
            count.update(facts.keys())
    claims = [Claim(key, f.text, f.family, f.specificity, top_count[key], len(top), interval_count[key],
                    len(interval)) for key, f in found.items()]
    return sorted(claims, key=lambda c: (-c.share, -c.specificity, c.key))


def supported(claims: list[Claim]) -> list[Claim]:
    """The claims the description makes: those fitting CLAIM_SHARE of their examples (and at least
    two of them), at most MAX_CLAIMS per family, families in order. A general claim is left out
    when a more specific one of the same kind fits as many examples; so is one of the broadest
    classes (punctuation, whitespace, identifiers, function words) when a claim about the token
    itself fits as many."""
    chosen: list[Claim] = []
    for family in _FAMILIES:
        kept: list[Claim] = []
        for c in claims:
            count = c.top if c.top_n else c.interval
            if c.family != family or c.share < CLAIM_SHARE or count < 2:
                continue
            if any(k.share >= c.share and k.specificity > c.specificity and _same_kind(k, c) for k in kept):
                continue
            if family == "class" and c.specificity <= 1 and \
                    any(k.family == "what" and k.share >= c.share for k in chosen):
                continue
            kept.append(c)
        chosen += kept[:MAX_CLAIMS[family]]
    return chosen


def _same_kind(specific: Claim, general: Claim) -> bool:
    """Whether `specific` makes `general` redundant (e.g. 'closing bracket' over 'punctuation')."""
    kinds = {
        "whitespace": ("newline", "indentation", "indent:", "tab", "spaces", "blank_line"),
        "newline": ("indentation", "indent:", "blank_line"), "indentation": ("indent:",),
        "piece": ("piece:", "suffix:"),
    }
    if general.key.startswith("class:"):
        return specific.key.startswith("class:") and general.key[6:] in class_ancestors(specific.key[6:])
    if general.key.startswith("char:"):
        return specific.key.startswith("symbol:")
    if general.key.startswith("lex:"):
        return specific.key == "keyword:" + general.key[4:] or specific.key.startswith("builtin:")
    return any(specific.key.startswith(prefix) for prefix in kinds.get(general.key, ()))


# --- the label ------------------------------------------------------------------------------------


def _percent(share: float) -> str:
    return f"{math.floor(100 * share + 0.5)}%"


def _frequent_peaks(ev: FeatureEvidence) -> list[str]:
    contexts = _active(ev.top) or _active(ev.interval)
    count: Counter[str] = Counter()
    mass: Counter[str] = Counter()
    first: dict[str, int] = {}
    for i, c in enumerate(contexts):
        token = c.tokens[c.max_position]
        count[token] += 1
        mass[token] += c.max_value
        first.setdefault(token, i)
    if not count:
        return [t for t, n in ev.top_tokens if n > 0][:LABEL_TOKENS]
    return sorted(count, key=lambda t: (-count[t], -mass[t], first[t]))[:LABEL_TOKENS]


def token_kind(token: str) -> str | None:
    """A promoted token's class, for naming what a feature promotes."""
    s = token.strip()
    if "\n" in token:
        return "newlines"
    if not s:
        return "spaces"
    if s.isdigit():
        return "digits"
    if is_symbolic(token):
        return f"{short_char_name(s[0])} tokens" if len(set(s)) == 1 else "punctuation"
    if s in PYTHON_KEYWORDS:
        return "Python keywords"
    if s[:1].isupper():
        return "capitalised words"
    if not token[:1].isspace():
        return "word pieces (continuations)"
    return None


def readable(token: str) -> bool:
    """Whether a token reads as text: no control, format (zero-width), private-use, unassigned or
    replacement characters (a byte-fallback piece), and not empty."""
    return bool(token) and all(ch in "\n\t" or (unicodedata.category(ch) not in _UNREADABLE and ch != "\ufffd")
                               for ch in token)


def promoted_tokens(ev: FeatureEvidence, corpus_tokens: Collection[str] | None = None) -> list[str]:
    """The tokens a label says the feature promotes: positive logits, readable, and (when the
    tokens of the indexed text are known) ones that occur in it; the logit table keeps them all."""
    return [t for t, v in ev.top_logits
            if v > 0 and readable(t) and (corpus_tokens is None or t in corpus_tokens)]


def promotes_text(ev: FeatureEvidence, corpus_tokens: Collection[str] | None = None) -> str | None:
    promoted = promoted_tokens(ev, corpus_tokens)
    if not promoted:
        return None
    text = "promotes " + ", ".join(show_token(t) for t in promoted[:LABEL_LOGITS])
    kinds = Counter(k for k in (token_kind(t) for t in promoted[:10]) if k)
    if kinds:
        kind, n = kinds.most_common(1)[0]
        if n >= LOGIT_CLASS_SHARE * min(10, len(promoted)) and n >= 2:
            text += f" ({kind} next)"
    return text


def words_label(ev: FeatureEvidence, corpus_tokens: Collection[str] | None = None, *,
                claims: list[Claim] | None = None) -> str:
    """The description: supported claims with their shares (the class of tokens first, unless one
    token says it all, see `_label_order`), the literal tokens, what it promotes among `corpus_tokens` (the token
    strings of the indexed text, `evidence.corpus_tokens`; None: every readable token)."""
    if ev.dead:
        return "never active in the indexed text"
    claims = _label_order(supported(analyse(ev)) if claims is None else claims)  # given: computed once by the caller
    parts = [f"{c.text} ({_percent(c.share)})" for c in claims]
    tokens = _frequent_peaks(ev)
    head = "; ".join(parts) if parts else "no shared pattern at its peaks"
    label = head
    if tokens:
        label += " — tokens " + ", ".join(show_token(t) for t in tokens)
    promotes = promotes_text(ev, corpus_tokens)
    if promotes:
        label += " — " + promotes
    return label


def _label_order(claims: list[Claim]) -> list[Claim]:
    """Claims in the order the label says them: the class of tokens first ('plural nouns (85%)').
    A class is left out when one token fits as many peaks: its claim already names the token and
    what it is ("the word 'not' (negation)", "equals sign '=='" with its operator role)."""
    one_token = max((c.share for c in claims if c.family == "what" and c.key.startswith(_ONE_TOKEN)), default=0.0)
    classes = [c for c in claims if c.family == "class" and c.share > one_token]
    return classes + [c for c in claims if c.family != "class"]


def evidence_record(ev: FeatureEvidence, *, claims: list[Claim] | None = None) -> dict:
    """The supported claims (`supported(analyse(ev))`, unless given) with both shares, kept with a
    description (and given to the LLM)."""
    claims = supported(analyse(ev)) if claims is None else claims
    return {"version": WORDS_VERSION, "claims": [
        {k: v for k, v in asdict(c).items() if k != "specificity"} for c in claims]}
