"""The `words` explainer: an offline description of what a feature fires on, in the words people
search with.

For every stored example (top and interval) it looks at the token where the example peaks and
names what that token is (a symbol by name, a newline and its indentation, a number, a Python
keyword, an English function word, a capitalised word, an identifier or a piece of a longer word),
what role it plays (an assignment, a call, a function name after `def`, an import, a string), and
where it sits (code or prose, start or end of a line, the token before and after). Each such claim
is counted over the top examples and over the interval examples; a claim goes into the description
only when it fits at least CLAIM_SHARE of the top examples (of the interval examples when there
are no top ones), with that share. The literal tokens follow (keyword search needs them), then
what the feature promotes, named the same way when the promoted tokens share a class.

    "equals sign '=' (100%); assignment (90%); in Python code (100%); after a name (80%) —
     tokens ' =', '=' — promotes ' None', ' self', ' 0'"

Deterministic: the same evidence gives the same text. `analyse` returns the claims with both
shares for the LLM prompt and for the record kept with each description.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from featuredb.describe.evidence import Context, FeatureEvidence
from featuredb.describe.token_classes import (
    CLOSING,
    FUNCTION_WORDS,
    OPENING,
    OPERATOR_CONCEPTS,
    PYTHON_BUILTIN_NAMES,
    PYTHON_KEYWORD_ROLES,
    PYTHON_KEYWORDS,
    QUOTES,
    capitalisation,
    is_symbolic,
    line_of,
    looks_like_code,
    short_char_name,
    show_token,
    word_around,
)

WORDS_METHOD = "words"
WORDS_VERSION = "words-v1"
CLAIM_SHARE = 0.6  # a claim must fit at least this share of the examples it is counted on
MAX_CLAIMS = {"what": 3, "role": 2, "where": 3}
LABEL_TOKENS = 3
LABEL_LOGITS = 3
LOGIT_CLASS_SHARE = 0.5  # promoted tokens named by class when this share of the top ten share it
SUFFIXES = ("ing", "ed", "s", "es", "ly", "tion", "ion", "er", "ers", "able", "ment", "ness", "ize", "ise", "al",
            "ity", "ive", "ous")

# family -> order in the text; within a family, higher share first, then the more specific claim.
_FAMILIES = ("what", "role", "where")


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
    if all(ch in OPENING for ch in s):
        facts["opening"] = _Fact("opening bracket", "what", 2)
    if all(ch in CLOSING for ch in s) or (s[0] in CLOSING and len(s) > 1):
        facts["closing"] = _Fact("closing bracket", "what", 2)
    if all(ch in QUOTES for ch in s):
        facts["quote"] = _Fact("quotation mark (string delimiter)", "what", 2)
    facts["punctuation"] = _Fact("punctuation or symbol", "what", 1)
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
    facts["whitespace"] = _Fact("whitespace", "what", 1)
    return facts


def _number_facts(tokens: tuple[str, ...], p: int) -> dict[str, _Fact]:
    s = tokens[p].strip()
    whole, first, last = word_around(tokens, p)
    facts = {"number": _Fact("digits (numbers)", "what", 3)}
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
    lower = s.lower()
    if first < p:
        facts["piece"] = _Fact("subword piece inside a longer word", "what", 3)
        if last == p and lower in SUFFIXES:
            facts[f"suffix:{lower}"] = _Fact(f"the suffix -{lower} ending words like {show_token(word)}", "what", 4)
        facts[f"piece:{lower}"] = _Fact(f"subword piece {show_token(s)} inside longer words like {show_token(word)}",
                                        "what", 5)
    elif last > p:
        facts["word_start"] = _Fact("first piece of a longer word", "what", 3)
    if "_" in word.strip("_") and code:
        facts["snake"] = _Fact("snake_case identifier (name with underscores)", "what", 3)
    if word.startswith("__") and word.endswith("__") and len(word) > 4:
        facts["dunder"] = _Fact("dunder name (__special__ method or attribute)", "what", 4)
    case = capitalisation(word)
    if case and case != "lowercase word":
        facts[f"case:{case}"] = _Fact(case, "what", 2)
    if whole and s.isalpha():  # the word itself, whatever the text around it
        cls = FUNCTION_WORDS.get(lower)
        facts[f"lex:{lower}"] = _Fact(f"the word {show_token(lower)}" + (f" ({cls})" if cls else ""), "what", 5)
    if whole and code and s in PYTHON_KEYWORDS:
        facts[f"keyword:{s}"] = _Fact(f"Python keyword {show_token(s)}", "what", 6)
        facts["keyword"] = _Fact("Python keywords", "what", 2)
        role = PYTHON_KEYWORD_ROLES.get(s)
        if role:
            facts[f"kwrole:{role}"] = _Fact(role, "role", 4)
    elif whole and code and s in PYTHON_BUILTIN_NAMES:
        facts[f"builtin:{s}"] = _Fact(f"the name {show_token(s)} in code", "what", 4)
    elif whole and lower in FUNCTION_WORDS:
        cls = FUNCTION_WORDS[lower]
        facts[f"fw:{cls}"] = _Fact(f"{cls} words", "what", 3)
    elif code and not (s in PYTHON_KEYWORDS):
        facts["identifier"] = _Fact("names (identifiers) in code", "what", 1)
    prev = tokens[p - 1].strip() if first > 0 else ""
    nxt = tokens[last + 1] if last + 1 < len(tokens) else ""
    if code:
        if prev == "def":
            facts["def_name"] = _Fact("function name in a def (function definition)", "role", 5)
        elif prev == "class":
            facts["class_name"] = _Fact("class name in a class definition", "role", 5)
        elif before_line.lstrip().startswith(("import ", "from ")):
            facts["import"] = _Fact("module name in an import statement", "role", 4)
        elif prev.endswith(".") and first > 0:
            facts["attribute"] = _Fact("attribute or method name after a dot", "role", 4)
        if nxt.startswith("(") and s not in PYTHON_KEYWORDS:
            facts["call"] = _Fact("function or method name before its call parentheses", "role", 4)
        elif nxt.strip().startswith("=") and not nxt.strip().startswith("==") and \
                before_line.count("(") > before_line.count(")"):
            facts["kwarg_name"] = _Fact("keyword argument name", "role", 4)
    return facts


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


def facts_of(ctx: Context) -> dict[str, _Fact]:
    """What is true of one example's peak token (keyed so examples can be counted together)."""
    tokens, p = ctx.tokens, ctx.max_position
    if not tokens or not 0 <= p < len(tokens):
        return {}
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
    facts.update(_where_facts(tokens, p, code, before_line, after_line, after_text))
    return facts


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
    when a more specific one of the same kind fits as many examples."""
    chosen: list[Claim] = []
    for family in _FAMILIES:
        kept: list[Claim] = []
        for c in claims:
            count = c.top if c.top_n else c.interval
            if c.family != family or c.share < CLAIM_SHARE or count < 2:
                continue
            if any(k.share >= c.share and k.specificity > c.specificity and _same_kind(k, c) for k in kept):
                continue
            kept.append(c)
        chosen += kept[:MAX_CLAIMS[family]]
    return chosen


def _same_kind(specific: Claim, general: Claim) -> bool:
    """Whether `specific` makes `general` redundant (e.g. 'equals sign' over 'punctuation')."""
    kinds = {
        "punctuation": ("symbol:", "char:", "opening", "closing", "quote"),
        "opening": ("symbol:",), "closing": ("symbol:",), "quote": ("symbol:",),
        "whitespace": ("newline", "indentation", "indent:", "tab", "spaces", "blank_line"),
        "newline": ("indentation", "indent:", "blank_line"), "indentation": ("indent:",),
        "number": ("digit", "hex", "year", "decimal", "long_number"), "keyword": ("keyword:",),
        "piece": ("piece:", "suffix:"), "identifier": ("call", "def_name", "class_name", "attribute", "snake", "dunder"),
    }
    general_key = general.key.split(":")[0] if general.key.startswith("char:") else general.key
    if general.key.startswith("char:"):
        return specific.key.startswith("symbol:")
    if general.key.startswith("fw:"):
        return specific.key.startswith("lex:")
    if general.key.startswith("lex:"):
        return specific.key == "keyword:" + general.key[4:] or specific.key.startswith("builtin:")
    return any(specific.key.startswith(prefix) for prefix in kinds.get(general_key, ()))


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


def promotes_text(ev: FeatureEvidence) -> str | None:
    promoted = [t for t, v in ev.top_logits if v > 0]
    if not promoted:
        return None
    text = "promotes " + ", ".join(show_token(t) for t in promoted[:LABEL_LOGITS])
    kinds = Counter(k for k in (token_kind(t) for t in promoted[:10]) if k)
    if kinds:
        kind, n = kinds.most_common(1)[0]
        if n >= LOGIT_CLASS_SHARE * min(10, len(promoted)) and n >= 2:
            text += f" ({kind} next)"
    return text


def words_label(ev: FeatureEvidence) -> str:
    """The description: supported claims with their shares, the literal tokens, what it promotes."""
    if ev.dead:
        return "never active in the indexed text"
    claims = supported(analyse(ev))
    parts = [f"{c.text} ({_percent(c.share)})" for c in claims]
    tokens = _frequent_peaks(ev)
    head = "; ".join(parts) if parts else "no shared pattern at its peaks"
    label = head
    if tokens:
        label += " — tokens " + ", ".join(show_token(t) for t in tokens)
    promotes = promotes_text(ev)
    if promotes:
        label += " — " + promotes
    return label


def evidence_record(ev: FeatureEvidence) -> dict:
    """The supported claims with both shares, kept with a description (and given to the LLM)."""
    claims = supported(analyse(ev))
    return {"version": WORDS_VERSION, "claims": [
        {k: v for k, v in asdict(c).items() if k != "specificity"} for c in claims]}
