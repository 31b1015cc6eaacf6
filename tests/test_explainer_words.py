"""The offline `words` explainer (issue 16): on hand-made features with known behaviour it names what
they fire on in words, backs each claim with its share, makes no claim the examples do not support,
keeps the literal tokens, and gives the LLM prompt the same evidence."""

from __future__ import annotations

from featuredb.describe import Context, FeatureEvidence, explainer_messages
from featuredb.store import Filter
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


# --- issue 24: readable promoted tokens, classes of tokens ----------------------------------------

def test_promotes_only_readable_tokens_of_the_indexed_text_at_most_three():
    junk = [("\u200c", 9.0), (" পরিস্থিত", 8.0), ("\ufffd", 7.0), (" None", 6.0), ("\x07", 5.5), (" self", 5.0),
            (" 0", 4.0), (" x", 3.0), (" never", -1.0)]
    corpus = {" None", " self", " 0", " x", " never", "\u200c", "\ufffd", "\x07"}  # the junk may even occur
    label = words_label(feature(EQUALS.top, EQUALS.interval, junk), corpus)
    promoted = label.split(" — promotes ")[1]
    assert promoted.startswith("' None', ' self', ' 0'") and "' x'" not in promoted, label
    for token, _ in junk:
        if token not in (" None", " self", " 0"):
            assert repr(token)[1:-1] not in promoted.split(" (")[0]
    # only tokens of the indexed text: one left, so one listed
    assert words_label(feature(EQUALS.top, EQUALS.interval, junk), {" self"}).endswith("— promotes ' self'")
    # none left: the promotes part is left out (the logit table keeps them all)
    label = words_label(feature(EQUALS.top, EQUALS.interval, junk), {" Paris"})
    assert "promotes" not in label and label.endswith("— tokens ' ='"), label


def _claim(label_or_ev, key):
    return next((c for c in supported(analyse(label_or_ev)) if c.key == key), None)


def test_a_feature_firing_on_digits_gets_the_digits_class_with_its_share():
    top = [ctx(["port", " ", d, "\n"], 2, 9.0 - i, rank=i) for i, d in enumerate("3571")]
    top += [ctx(["x", " =", " 4", "2"], 3, 4.0, rank=4), ctx(["the", " cat", " sat"], 1, 3.0, rank=5)]
    ev = feature(top)
    digits = sum(c.tokens[c.max_position].strip().isdigit() for c in ev.top)  # counted independently: 5 of 6
    claim = _claim(ev, "class:numbers")
    assert claim is not None and (claim.top, claim.top_n) == (digits, 6)
    label = words_label(ev)
    assert label.startswith(f"digits (numbers) ({round(100 * digits / 6)}%)"), label


def test_a_feature_firing_on_mixed_tokens_names_no_class():
    mixed = feature([ctx(["in", " ", "1", "9"], 2), ctx(["the", " cat", " sat"], 1), ctx(["f", "(", "x", ")"], 3),
                     ctx(["We", " met", " Guido"], 2), ctx(["a", "\n", "b"], 1), ctx(["x", " +=", " 1"], 1)])
    assert [c for c in supported(analyse(mixed)) if c.family == "class"] == []
    assert "digits" not in words_label(mixed) and "bracket" not in words_label(mixed)


def test_classes_by_form_word_class_and_role_in_code():
    closing = feature([ctx(["f", "(", "x", ")"], 3), ctx(["a", "[", "0", "]"], 3), ctx(["d", " =", " {", "}"], 3),
                       ctx(["g", "(", "y", "))"], 3), ctx(["x", "=[", "1", "]", "\n"], 3)])
    assert words_label(closing).startswith("closing bracket (100%)"), words_label(closing)
    plural = feature([ctx(["the", " cats", " sat"], 1), ctx(["all", " files", " are"], 1),
                      ctx(["two", " functions", " return"], 1), ctx(["the", " arguments", " of"], 1),
                      ctx(["big", " dogs", " bark"], 1)])
    assert words_label(plural).startswith("plural nouns (words ending -s) (100%)"), words_label(plural)
    ing = feature([ctx(["while", " running", " it"], 1), ctx(["by", " adding", " one"], 1),
                   ctx(["for", " parsing", " text"], 1), ctx(["the", " string", " is"], 1)])
    claim = _claim(ing, "class:ing_verbs")  # 'string' is not an -ing verb: 3 of 4
    assert claim is not None and (claim.top, claim.top_n) == (3, 4)
    assert words_label(ing).startswith("verbs ending -ing (gerunds, participles) (75%)"), words_label(ing)
    functions = feature([ctx(["def", " load", "(", "path", "):"], 1), ctx(["x", " =", " parse", "(", "s", ")"], 2),
                         ctx(["def", " save_all", "(", "self", "):"], 1), ctx(["y", " =", " compute", "(", "z", ")"], 2)])
    assert words_label(functions).startswith("function names (100%)"), words_label(functions)
    keywords = feature([ctx(["if", " x", ":", "\n"], 0), ctx(["    ", "return", " y"], 1),
                        ctx(["for", " i", " in", " y", ":"], 0), ctx(["    ", "while", " True", ":"], 1)])
    assert words_label(keywords).startswith("control-flow keywords (if, for, return) (100%)"), words_label(keywords)
    paths = feature([ctx(["see", " /", "usr", "/", "lib", " for"], 2), ctx(["open", " setup", ".", "py", " now"], 3),
                     ctx(["in", " src", "/", "featuredb", "/", "cli"], 3)])
    assert "file paths and file names (100%)" in words_label(paths), words_label(paths)


def test_a_class_is_named_only_where_it_says_more_than_one_token():
    # every peak is 'not': the word's own claim names it (negation); the class would add nothing
    neg = feature([ctx(["This", " is", " not", " a", " bug"], 2), ctx(["it", " does", " not", " work"], 2)])
    assert _claim(neg, "class:negations") is not None
    assert words_label(neg) == "the word 'not' (negation) (100%); in prose (100%) — tokens ' not'"
    # 'not', 'never', 'no': the class covers more than any one word does
    neg = feature([ctx(["it", " does", " not", " work"], 2), ctx(["we", " never", " do"], 1),
                   ctx(["there", " is", " no", " way"], 2)])
    assert words_label(neg).startswith("negation words (100%)"), words_label(neg)


def test_corpus_tokens_are_the_stored_texts_tokens_and_labels_promote_only_those(tmp_path):
    from test_describe import SAE, fake_embed, make_catalogue

    from featuredb.describe import DescribeConfig, run_describe
    from featuredb.describe.evidence import corpus_tokens

    store = make_catalogue(tmp_path / "db")
    wide = store.read_examples(Filter().eq("coder_id", SAE), ["tokens"]).to_pylist()
    expected = {t for row in wide for t in row["tokens"][1:]}  # every stored window, BOS left out
    assert corpus_tokens(store, "toy-model") == expected and "<bos>" not in expected
    assert corpus_tokens(store, "another-model") == frozenset()
    run_describe(DescribeConfig(db=str(tmp_path / "db"), explainer="words", progress=False), embedder=fake_embed)
    labels = {r["feature"]: r["description"] for r in store.features(SAE).to_dicts()}
    # feature 0's logit table: ' is', ' was', ' has'; only ' is' occurs in the indexed text
    assert labels[0].endswith("— promotes ' is'"), labels[0]
    assert {r["feature"]: r["top_logit_tokens"] for r in store.features(SAE).to_dicts()}[0] == [" is", " was", " has"]
    # feature 1's: ' (' occurs, ' main' does not
    assert labels[1].endswith("— promotes ' ('"), labels[1]
