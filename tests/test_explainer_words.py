"""The offline `words` explainer (issue 16): on hand-made features with known behaviour it names what
they fire on in words, backs each claim with its share, makes no claim the examples do not support,
keeps the literal tokens, and gives the LLM prompt the same evidence."""

from __future__ import annotations

from featuredb.describe import Context, FeatureEvidence, explainer_messages
from featuredb.describe.words import CLAIM_SHARE, analyse, evidence_record, supported, words_label


def ctx(tokens: list[str], peak: int, value: float = 5.0, kind: str = "top", rank: int = 0) -> Context:
    values = [0.0] * len(tokens)
    values[peak] = value
    if peak + 1 < len(tokens):
        values[peak + 1] = value / 10  # a weaker activation after the peak, as real features have
    return Context(tuple(tokens), tuple(values), peak, rank, kind, rank)


def feature(top: list[Context], interval: list[Context] = (), logits=()) -> FeatureEvidence:
    return FeatureEvidence("toy", 0, 100, 0.01, 9.0, top=list(top), interval=list(interval), top_logits=list(logits))


EQUALS = feature([
    ctx(["x", " =", " 1", "\n"], 1), ctx(["    ", "self", ".", "name", " =", " value", "\n"], 4),
    ctx(["total", " =", " 0", "\n"], 1), ctx(["y", " =", " x", " +", " 1"], 1),
], interval=[ctx(["f", "(", "a", "=", "2", ")"], 3, 1.0, "interval")],
    logits=[(" None", 2.0), (" 0", 1.5), (" self", 1.0)])

NEWLINE_INDENT = feature([
    ctx(["def", " f", "():", "\n    ", "return", " 1"], 3), ctx(["if", " x", ":", "\n    ", "pass"], 3),
    ctx(["for", " i", " in", " y", ":", "\n    ", "print", "(", "i", ")"], 5),
    ctx(["class", " A", ":", "\n    ", "x", " =", " 1"], 3),
])

CAPITALISED = feature([
    ctx(["The", " function", " returns", " None", "."], 0), ctx(["See", " also", " the", " Python", " docs"], 3),
    ctx(["written", " by", " Guido", " van", " Rossum"], 2), ctx(["in", " Paris", " today"], 1),
    ctx(["we", " use", " Linux", " here"], 2),
])

SUBWORD = feature([
    ctx([" the", " exc", "lamation", " mark"], 2), ctx([" an", " inc", "lamation", " for"], 2),
    ctx([" a", " dec", "lamation", " of"], 2), ctx([" pro", "clamation", " day"], 1),
])


def test_equals_sign_feature_is_named_with_its_concept():
    label = words_label(EQUALS)
    assert label.startswith("equals sign '=' (100%)"), label
    assert "assignment" in label and "in Python code" in label
    assert "tokens ' ='" in label  # the literal tokens stay, for keyword search
    assert "promotes ' None'" in label


def test_newline_and_indentation_feature():
    label = words_label(NEWLINE_INDENT)
    assert "newline" in label and "4-space indentation" in label, label
    assert "after colon ':'" in label  # three of four peaks follow a colon: 75%
    assert "(75%)" in label


def test_capitalised_word_feature():
    label = words_label(CAPITALISED)
    assert label.startswith("capitalised word (100%)"), label
    assert "in prose" in label and "in Python code" not in label


def test_subword_feature():
    label = words_label(SUBWORD)
    assert "subword piece 'lamation' inside longer words" in label, label
    assert "tokens 'lamation'" in label


def test_claims_need_the_evidence():
    # one '=' peak among newlines and words: no claim about equals signs or indentation
    mixed = feature([ctx(["x", " =", " 1"], 1), ctx(["a", " b", "\n", "c"], 2), ctx([" the", " cat"], 1),
                     ctx(["The", " dog"], 0)])
    claims = analyse(mixed)
    equals = next(c for c in claims if c.key == "symbol:=")
    assert (equals.top, equals.top_n) == (1, 4) and equals.share < CLAIM_SHARE
    label = words_label(mixed)
    assert "equals sign (" not in label and "newline" not in label.split(" — ")[0]
    # only supported claims are kept, and each carries top and interval counts
    for c in supported(analyse(EQUALS)):
        assert c.share >= CLAIM_SHARE and c.top_n == 4 and c.interval_n == 1
    record = evidence_record(EQUALS)
    assert record["claims"][0]["key"] == "symbol:=" and record["claims"][0]["top"] == 4


def test_negation_in_prose_and_code_is_one_word_claim():
    neg = feature([ctx(["This", " is", " not", " a", " bug"], 2), ctx(["it", " does", " not", " work"], 2),
                   ctx(["if", " not", " x", ":", "\n"], 1)])
    label = words_label(neg)
    assert label.startswith("the word 'not' (negation) (100%)"), label


def test_numbers_and_keywords():
    digits = feature([ctx(["0", "x", "0", "0", "7", "F"], 4), ctx(["port", " ", "6", "5", "5", "3", "5"], 3),
                      ctx(["in", " ", "1", "9", "9", "9"], 4)])
    assert words_label(digits).startswith("digits (numbers) (100%)")
    keyword = feature([ctx(["def", " f", "(", "x", "):", "\n"], 0), ctx(["    ", "def", " g", "(", "self", "):"], 1),
                       ctx(["@", "property", "\n", "def", " h", "():"], 3)])
    label = words_label(keyword)
    assert "Python keyword 'def' (100%)" in label and "function definition" in label, label


def test_dead_feature():
    assert words_label(FeatureEvidence("toy", 1, 0, 0.0, 0.0)) == "never active in the indexed text"


def test_llm_prompt_carries_the_measured_patterns():
    user = explainer_messages(EQUALS)[1]["content"]
    assert "Patterns at the peak token" in user
    assert "- equals sign '=': 4/4 top, 1/1 lower" in user
