"""Explainers: turn a feature's evidence into a one-line description.

- `tokens_label` (method "tokens"): offline and deterministic, from the most frequent
  max-activating tokens, the n-gram they most often sit in, and the top positive logits, e.g.
  "' Paris', ' London', ' Berlin' (as in ' of Paris') — promotes ' is', ' was'".
- `ChatExplainer` (method "llm" or "local"): the delphi/Neuronpedia-style prompt of
  `prompts.explainer_messages` sent to a chat backend; the reply's description is parsed out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from featuredb.describe.evidence import Context, FeatureEvidence
from featuredb.describe.llm_client import ChatBackend
from featuredb.describe.prompts import EXPLAIN_PROMPT_VERSION, explainer_messages, parse_explanation, show_token

TOKENS_METHOD = "tokens"
TOKENS_VERSION = "tokens-v1"
LABEL_TOKENS = 3  # activating tokens named in a label
LABEL_LOGITS = 3  # promoted tokens named in a label


def _max_tokens(ev: FeatureEvidence) -> list[tuple[str, float]]:
    contexts: list[Context] = ev.top or ev.interval
    return [(c.tokens[c.max_position], c.max_value) for c in contexts if c.tokens and c.max_value > 0]


def _frequent_tokens(ev: FeatureEvidence) -> list[str]:
    """Distinct max-activating tokens by count, then summed activation, then first appearance."""
    pairs = _max_tokens(ev)
    if not pairs:  # no stored contexts: fall back to the tokens it fires on most
        return [t for t, c in ev.top_tokens if c > 0 and t.strip()][:LABEL_TOKENS] or \
               [t for t, c in ev.top_tokens if c > 0][:LABEL_TOKENS]
    count: Counter[str] = Counter()
    mass: Counter[str] = Counter()
    first: dict[str, int] = {}
    for i, (token, value) in enumerate(pairs):
        count[token] += 1
        mass[token] += value
        first.setdefault(token, i)
    return sorted(count, key=lambda t: (-count[t], -mass[t], first[t]))[:LABEL_TOKENS]


def _common_context(ev: FeatureEvidence) -> str | None:
    """Context shared by enough top contexts: the longest 2-3 token n-gram around the max token
    (" (as in ' of Paris')"), else the token most often right before it (" (after ' of')")."""
    contexts = [c for c in (ev.top or ev.interval) if c.tokens and c.max_value > 0]
    if len(contexts) < 2:
        return None
    needed = max(2, math.ceil(len(contexts) / 3))
    for length in (3, 2):
        count: Counter[tuple[str, ...]] = Counter()
        for c in contexts:
            grams = {tuple(c.tokens[s:s + length]) for s in range(c.max_position - length + 1, c.max_position + 1)
                     if s >= 0 and s + length <= len(c.tokens)}
            count.update(grams)
        common = sorted((-n, gram) for gram, n in count.items() if n >= needed and "".join(gram).strip())
        if common:
            return f" (as in {show_token(''.join(common[0][1]))})"
    before = Counter(c.tokens[c.max_position - 1] for c in contexts if c.max_position > 0)
    common_before = sorted((-n, t) for t, n in before.items() if n >= needed and t.strip())
    if common_before:
        return f" (after {show_token(common_before[0][1])})"
    return None


def tokens_label(ev: FeatureEvidence) -> str:
    """A short deterministic label from the feature's evidence."""
    tokens = _frequent_tokens(ev)
    parts = [", ".join(show_token(t) for t in tokens)] if tokens else []
    if ev.dead:
        parts = ["never active in the indexed text"]
    context = _common_context(ev)
    if parts and context and not ev.dead:
        parts[0] += context
    promoted = [t for t, v in ev.top_logits if v > 0][:LABEL_LOGITS]
    label = parts[0] if parts else "no activating tokens stored"
    if promoted:
        label += " — promotes " + ", ".join(show_token(t) for t in promoted)
    return label


@dataclass
class ChatExplainer:
    """An LLM explainer over any chat backend (remote endpoint or local model)."""

    backend: ChatBackend
    method: str  # "llm" or "local"
    n_top: int = 10
    n_interval: int = 6
    max_tokens: int = 200
    prompt_version: str = EXPLAIN_PROMPT_VERSION

    def describe(self, ev: FeatureEvidence) -> str | None:
        """The description, or None when the reply holds none."""
        reply = self.backend.complete(explainer_messages(ev, self.n_top, self.n_interval), max_tokens=self.max_tokens)
        return parse_explanation(reply)
