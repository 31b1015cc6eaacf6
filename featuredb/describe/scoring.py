"""Detection and fuzzing scores of a description, in the sense of delphi's scorers.

- detection: a chat model reads the description and must tell the activating contexts from
  non-activating ones (each shown as plain text).
- fuzzing: the same contexts with tokens marked <<like this>>: activating contexts marked where the
  feature fires, non-activating ones marked at positions taken from an activating example; the
  model must say which markings fit the description.

Activating contexts are the feature's stored examples the explainer did not see (held out; shown
ones fill up when too few are held out), half from the top list and half from the interval samples.
Non-activating contexts come from `NegativePool`. Each score is the balanced accuracy over the
answers that could be parsed (None when none could); the counts are kept in `details`.
Samples are shuffled with a per-feature seed, so the prompts (and so the cache) are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from featuredb.describe.evidence import Context, FeatureEvidence, feature_seed
from featuredb.describe.llm_client import ChatBackend
from featuredb.describe.prompts import (
    SCORE_PROMPT_VERSION,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    detection_messages,
    explainer_examples,
    fuzz_messages,
    marked_positions,
    parse_labels,
    render,
)


@dataclass
class ScoreResult:
    detection: float | None
    fuzz: float | None
    detection_n: int  # answers parsed
    fuzz_n: int
    details: dict = field(default_factory=dict)


def balanced_accuracy(answers: list[tuple[bool, bool | None]]) -> tuple[float | None, dict]:
    """(score, counts) from (truth, prediction) pairs; unparsed predictions (None) are left out."""
    counts = {"tp": 0, "tn": 0, "fp": 0, "fn": 0, "unparsed": 0}
    for truth, prediction in answers:
        if prediction is None:
            counts["unparsed"] += 1
        else:
            counts[("t" if truth == prediction else "f") + ("p" if prediction else "n")] += 1
    positives, negatives = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    rates = []
    if positives:
        rates.append(counts["tp"] / positives)
    if negatives:
        rates.append(counts["tn"] / negatives)
    return (sum(rates) / len(rates) if rates else None), counts


def activating_samples(ev: FeatureEvidence, n: int, n_top_shown: int, n_interval_shown: int) -> tuple[list[Context], int]:
    """Up to n activating contexts, held-out ones first; also how many of them are held out."""
    shown_top, shown_interval = explainer_examples(ev, n_top_shown, n_interval_shown)
    shown = {id(c) for c in shown_top + shown_interval}
    held_top = [c for c in ev.top if id(c) not in shown]
    held_interval = [c for c in ev.interval if id(c) not in shown]
    held: list[Context] = []
    for i in range(max(len(held_top), len(held_interval))):  # alternate: strong and weaker activations
        held += [group[i] for group in (held_top, held_interval) if i < len(group)]
    held = [c for c in held if c.max_value > 0][:n]
    n_held = len(held)
    if len(held) < n:
        held += [c for c in shown_top + shown_interval if c.max_value > 0][: n - len(held)]
    return held, n_held


@dataclass
class Scorer:
    backend: ChatBackend
    n_examples: int = 10  # activating contexts per scorer (as many non-activating ones are added)
    batch_size: int = 5  # examples per prompt
    n_top_shown: int = 10  # what the explainer was shown (so the rest is held out)
    n_interval_shown: int = 6
    max_tokens: int = 64

    def score(self, description: str, ev: FeatureEvidence, negatives: list[Context]) -> ScoreResult:
        positives, n_held = activating_samples(ev, self.n_examples, self.n_top_shown, self.n_interval_shown)
        positives = [c.window(WINDOW_BEFORE, WINDOW_AFTER) for c in positives]
        negatives = negatives[: max(len(positives), 1)] if positives else []
        rng = random.Random(feature_seed(ev.coder_id, ev.feature, "score"))

        plain = [(render(c.tokens, [False] * len(c.tokens)), True) for c in positives]
        plain += [(render(c.tokens, [False] * len(c.tokens)), False) for c in negatives]
        detection, det_counts = self._run(detection_messages, description, plain, rng)

        marked = [(render(c.tokens, marked_positions(c)), True) for c in positives]
        for c in negatives:
            model = rng.choice(positives)  # mark the positions an activating example has marked
            marks = marked_positions(model)[: len(c.tokens)]
            marks += [False] * (len(c.tokens) - len(marks))
            if not any(marks) and c.tokens:
                marks[min(model.max_position, len(c.tokens) - 1)] = True
            marked.append((render(c.tokens, marks), False))
        fuzz, fuzz_counts = self._run(fuzz_messages, description, marked, rng)

        details = {
            "version": SCORE_PROMPT_VERSION,
            "scorer_model": self.backend.model,
            "activating": len(positives),
            "held_out": n_held,
            "non_activating": len(negatives),
            "non_activating_exact": ev.negatives_exact,
            "detection": det_counts,
            "fuzz": fuzz_counts,
        }
        return ScoreResult(detection, fuzz, len(plain) - det_counts["unparsed"],
                           len(marked) - fuzz_counts["unparsed"], details)

    def _run(self, build, description: str, samples: list[tuple[str, bool]], rng: random.Random):
        if not samples:
            return None, {"tp": 0, "tn": 0, "fp": 0, "fn": 0, "unparsed": 0}
        samples = list(samples)
        rng.shuffle(samples)
        answers: list[tuple[bool, bool | None]] = []
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start:start + self.batch_size]
            reply = self.backend.complete(build(description, [text for text, _ in batch]), max_tokens=self.max_tokens)
            labels = parse_labels(reply, len(batch))
            answers += [(truth, None if labels is None else labels[i]) for i, (_, truth) in enumerate(batch)]
        return balanced_accuracy(answers)
