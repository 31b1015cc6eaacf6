"""Descriptions of features: explainers (words, the offline default / tokens / llm / local), detection and fuzzing scores,
embeddings, and the write path into the catalogue.

    from featuredb.describe import DescribeConfig, run_describe
    run_describe(DescribeConfig(db="catalogue", explainer="llm", model="gpt-4o-mini", score=True))

Modules: `evidence` (reading a feature's examples and logits), `prompts` (prompt text and reply
parsing), `explainers`, `scoring`, `llm_client` (OpenAI-compatible client + reply cache),
`local` (in-process transformers model), `featuredb.store.descriptions` (descriptions table and feature updates),
`run` (the resumable run behind `featuredb describe`).
"""

from featuredb.describe.evidence import Context, FeatureEvidence, NegativePool, load_evidence
from featuredb.describe.explainers import TOKENS_METHOD, TOKENS_VERSION, ChatExplainer, tokens_label
from featuredb.describe.llm_client import ChatBackend, LLMError, OpenAIChatClient, ResponseCache, chat_endpoint
from featuredb.describe.prompts import (
    EXPLAIN_PROMPT_VERSION,
    SCORE_PROMPT_VERSION,
    detection_messages,
    explainer_messages,
    fuzz_messages,
    parse_explanation,
    parse_labels,
)
from featuredb.describe.words import WORDS_METHOD, WORDS_VERSION, words_label
from featuredb.describe.run import DescribeConfig, DescribeError, DescribeResult, run_describe
from featuredb.describe.scoring import Scorer, ScoreResult, balanced_accuracy
from featuredb.store.descriptions import (
    METHOD_RANK,
    SyncResult,
    best_description,
    current_descriptions,
    sync_features,
    write_descriptions,
)
from featuredb.store.schema import DESCRIPTIONS_TABLE, descriptions_schema

__all__ = [
    "DESCRIPTIONS_TABLE", "EXPLAIN_PROMPT_VERSION", "METHOD_RANK", "SCORE_PROMPT_VERSION", "TOKENS_METHOD",
    "TOKENS_VERSION", "ChatBackend", "ChatExplainer", "Context", "DescribeConfig", "DescribeError",
    "DescribeResult", "FeatureEvidence", "LLMError", "NegativePool", "OpenAIChatClient", "ResponseCache",
    "ScoreResult", "Scorer", "SyncResult", "balanced_accuracy", "best_description", "chat_endpoint",
    "current_descriptions", "descriptions_schema", "detection_messages", "explainer_messages", "fuzz_messages",
    "load_evidence", "parse_explanation", "parse_labels", "run_describe", "sync_features", "tokens_label",
    "write_descriptions", "WORDS_METHOD", "WORDS_VERSION", "words_label",
]
