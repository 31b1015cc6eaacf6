"""Prompts for the LLM explainer and the detection / fuzzing scorers, and parsers of their replies.

The explainer prompt follows the shape used by delphi's and Neuronpedia's explainers: example
contexts with the activating tokens marked <<like this>>, the marked tokens' activations on a 0-10
scale, then the tokens the feature promotes and suppresses as the next token. Change the text and
bump the version: the version is stored with every description (and is part of the cache key
through the prompt itself).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from featuredb.describe.evidence import Context, FeatureEvidence
from featuredb.describe.token_classes import show_token
from featuredb.describe.words import analyse, supported

EXPLAIN_PROMPT_VERSION = "explain-v2"  # v2: the measured patterns at the peaks
SCORE_PROMPT_VERSION = "score-v1"

# A token is marked when its value exceeds this fraction of its example's max (delphi uses 0.3).
MARK_FRACTION = 0.3
WINDOW_BEFORE = 24  # tokens shown before an example's max token
WINDOW_AFTER = 8  # and after it
MAX_LISTED = 10  # activations listed per example
MAX_DESCRIPTION_CHARS = 300
LEFT, RIGHT = "<<", ">>"

Message = dict[str, str]

EXPLAIN_SYSTEM = f"""You are a careful interpretability researcher. You study one feature of a sparse \
autoencoder trained on a language model's internal activations, and you write a short description of \
what the feature responds to.

You will see text examples in which the feature is active, and patterns measured over all its \
examples at the token where each one peaks, with the share of top and of lower-activation examples \
that fit each pattern. In each example the tokens where it is \
active are marked {LEFT}like this{RIGHT}; consecutive active tokens are marked together. Under each \
example its active tokens are listed with their activation on a 0 to 10 scale (10 is the strongest \
activation of the feature). You may also see the tokens the feature makes more likely (promotes) and \
less likely (suppresses) as the model's next token.

Guidelines:
- Describe the pattern the examples share: the marked tokens, and the context around them when it matters.
- Name the concept in plain words people would search for (e.g. "equals sign in assignments", \
"newline and indentation", "negation"), and quote the key tokens.
- Be concise and specific: one line of at most 20 words. Do not list alternative explanations.
- Do not mention the {LEFT} {RIGHT} markers.
- The last line of your reply must be the description, written as:
[EXPLANATION]: <description>"""

DETECTION_SYSTEM = """You check descriptions of features of a language model. You are given the \
description of one feature and numbered text examples. The feature is active in some of the examples \
and inactive in the others. For each example, answer 1 if the feature as described would be active \
somewhere in it, otherwise 0.

Reply with only a list of numbers, one per example, in order, for example [1, 0, 0]."""

FUZZ_SYSTEM = f"""You check descriptions of features of a language model. You are given the description \
of one feature and numbered text examples. In each example some tokens are marked {LEFT}like this{RIGHT}. \
In some examples the marked tokens are exactly where the feature is active; in the others they are not. \
For each example, answer 1 if the marked tokens are where the feature as described is active, \
otherwise 0.

Reply with only a list of numbers, one per example, in order, for example [1, 0, 0]."""


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def marked_positions(ctx: Context, fraction: float = MARK_FRACTION) -> list[bool]:
    peak = ctx.max_value
    return [peak > 0 and v > fraction * peak for v in ctx.values]


def render(tokens: Sequence[str], marks: Sequence[bool]) -> str:
    """The tokens as one line of text, runs of marked tokens between << >>."""
    out: list[str] = []
    inside = False
    for token, mark in zip(tokens, marks):
        if mark and not inside:
            out.append(LEFT)
        elif not mark and inside:
            out.append(RIGHT)
        inside = mark
        out.append(token)
    if inside:
        out.append(RIGHT)
    return one_line("".join(out))


def _scaled(value: float, scale: float) -> int:
    return max(0, min(10, round(10 * value / scale))) if scale > 0 else 0


def format_example(number: int, ctx: Context, scale: float) -> str:
    shown = ctx.window(WINDOW_BEFORE, WINDOW_AFTER)
    marks = marked_positions(shown)
    active = [(t, v) for t, v, m in zip(shown.tokens, shown.values, marks) if m]
    active = sorted(active, key=lambda tv: -tv[1])[:MAX_LISTED]
    listed = ", ".join(f"({json.dumps(t, ensure_ascii=False)}, {_scaled(v, scale)})" for t, v in active)
    return f"Example {number}: {render(shown.tokens, marks)}\nActivations: {listed}"


def _logit_line(pairs: list[tuple[str, float]], positive: bool, n: int = 10) -> str:
    chosen = [t for t, v in pairs if (v > 0 if positive else v < 0)][:n]
    return ", ".join(show_token(t) for t in chosen)


def explainer_examples(ev: FeatureEvidence, n_top: int, n_interval: int) -> tuple[list[Context], list[Context]]:
    """The top and interval examples shown to the explainer (the rest are held out for scoring)."""
    top = ev.top[:n_top]
    if n_interval <= 0 or not ev.interval:
        return top, []
    if len(ev.interval) <= n_interval:
        return top, list(ev.interval)
    # evenly spread over the activation bins (interval examples are sorted highest bin first)
    step = len(ev.interval) / n_interval
    return top, [ev.interval[int(i * step)] for i in range(n_interval)]


def explainer_messages(ev: FeatureEvidence, n_top: int = 10, n_interval: int = 6) -> list[Message]:
    top, interval = explainer_examples(ev, n_top, n_interval)
    scale = ev.max_activation if ev.max_activation > 0 else max((c.max_value for c in top + interval), default=0.0)
    parts: list[str] = []
    number = 1
    if top:
        parts.append("Examples where the feature is most active:")
        for ctx in top:
            parts.append(format_example(number, ctx, scale))
            number += 1
    if interval:
        parts.append("\nExamples from lower activation ranges:")
        for ctx in interval:
            parts.append(format_example(number, ctx, scale))
            number += 1
    patterns = measured_patterns(ev)
    if patterns:
        parts.append("\nPatterns at the peak token (share of top examples / of lower examples that fit):")
        parts += patterns
    promoted = _logit_line(ev.top_logits, positive=True)
    suppressed = _logit_line(ev.bottom_logits, positive=False)
    if promoted or suppressed:
        parts.append("")
    if promoted:
        parts.append(f"Tokens the feature promotes: {promoted}")
    if suppressed:
        parts.append(f"Tokens the feature suppresses: {suppressed}")
    parts.append("\nWrite the description as one line: [EXPLANATION]: <description>")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


def measured_patterns(ev: FeatureEvidence) -> list[str]:
    """The `words` explainer's supported claims, one line each with both shares."""
    lines = []
    for claim in supported(analyse(ev)):
        top = f"{claim.top}/{claim.top_n}" if claim.top_n else "-"
        lower = f"{claim.interval}/{claim.interval_n}" if claim.interval_n else "-"
        lines.append(f"- {claim.text}: {top} top, {lower} lower")
    return lines


_EXPLANATION = re.compile(r"\[?(?:EXPLANATION|DESCRIPTION)\]?\s*:\s*(.*)", re.IGNORECASE)


def parse_explanation(text: str | None) -> str | None:
    """The one-line description in a reply (after the last [EXPLANATION]:, else its last line)."""
    if not text:
        return None
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)  # reasoning models
    matches = [m.group(1) for m in _EXPLANATION.finditer(text) if m.group(1).strip()]
    if matches:
        line = matches[-1]
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            return None
        line = lines[-1]
    line = line.strip().strip("*`\"' ").strip()
    line = " ".join(line.split())
    if not line:
        return None
    return line[:MAX_DESCRIPTION_CHARS]


def _classifier_messages(system: str, description: str, examples: list[str]) -> list[Message]:
    body = [f"Feature description: {one_line(description)}", ""]
    body += [f"Example {i}: {text}" for i, text in enumerate(examples, start=1)]
    body += ["", f"Answer with a list of {len(examples)} numbers (1 or 0), one per example."]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(body)}]


def detection_messages(description: str, examples: list[str]) -> list[Message]:
    return _classifier_messages(DETECTION_SYSTEM, description, examples)


def fuzz_messages(description: str, examples: list[str]) -> list[Message]:
    return _classifier_messages(FUZZ_SYSTEM, description, examples)


_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n"}


def parse_labels(text: str | None, n: int) -> list[bool] | None:
    """A list of n yes/no answers from a reply like "[1, 0, 1]"; None when there is none."""
    if not text:
        return None
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    for group in re.findall(r"\[([^\[\]]*)\]", text):
        items = [item.strip().strip("\"'").lower() for item in re.split(r"[,\s]+", group) if item.strip()]
        if len(items) == n and all(item in _TRUE or item in _FALSE for item in items):
            return [item in _TRUE for item in items]
    return None
