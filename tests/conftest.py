"""Shared fixtures: tiny random Gemma 2 / Gemma 3 / Llama models saved as local HF checkpoints.

The models are random but realistic in structure (same module tree as the real checkpoints), and
their RMSNorm weights are randomised so that a hook read before or after a norm gives visibly
different numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS_TEXT = [
    "The cat sat on the mat. The dog sat on the log.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "One two three four five six seven eight nine ten.",
    "In 1999 the numbers 42 and 7 were written on the wall of the house.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "London, Paris, Berlin and Rome are cities in Europe.",
    "The quick brown fox jumps over the lazy dog again and again.",
]


def build_tokenizer(texts: list[str] = CORPUS_TEXT, vocab_size: int = 320):
    """A small byte-level BPE tokenizer trained on the test corpus (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _common_config(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random `kind` in {'gemma2', 'gemma3', 'llama'} model + tokenizer to out_dir."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    common = _common_config(tokenizer)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, query_pre_attn_scalar=16, sliding_window=8))
    elif kind == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, query_pre_attn_scalar=16, sliding_window=8))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(kind)
    _randomise_norms(model, seed)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory) -> Path:
    return save_tiny_model("gemma2", tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return save_tiny_model("gemma3", tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture()
def corpus_jsonl(tmp_path) -> Path:
    import json

    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for i, text in enumerate(CORPUS_TEXT):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return path
