"""The `local` explainer backend: a HuggingFace causal LM run in-process through transformers.

Loads whatever `featuredb.runtime.model.load_model` loads (a local directory, a .gguf file or a
hub id), renders the chat messages with the tokenizer's chat template when it has one, and
decodes greedily, so a prompt always gives the same reply; replies share the on-disk cache.
"""

from __future__ import annotations

import threading
from pathlib import Path

from featuredb.describe.llm_client import Counters, Message, ResponseCache


class LocalChatModel:
    def __init__(self, spec: str, *, device: str | None = None, cache: ResponseCache | None = None) -> None:
        import torch

        from featuredb.runtime.model import load_model

        resolved = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.subject = load_model(spec, device=resolved)
        self.tokenizer = self.subject.tokenizer
        self.model = spec
        self.source = "local"
        self.cache = cache
        path = Path(spec).expanduser()
        # a local model is cached under its absolute path, a hub model under its id
        self._cache_name = str(path.resolve()) if path.exists() else spec
        self._lock = threading.Lock()
        self.max_concurrency = 1
        self.stats = Counters()

    def __repr__(self) -> str:
        return f"LocalChatModel({self.model!r})"

    def prompt_text(self, messages: list[Message]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def complete(self, messages: list[Message], *, max_tokens: int = 200) -> str:
        params = {"max_new_tokens": max_tokens, "decoding": "greedy"}
        key = ResponseCache.key("local", self._cache_name, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return hit
        with self._lock:
            self.stats.add(requests=1)
            reply = self._generate(messages, max_tokens)
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def _generate(self, messages: list[Message], max_tokens: int) -> str:
        import torch

        text = self.prompt_text(messages)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=not has_template)["input_ids"]
        limit = getattr(self.subject.model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] + max_tokens > limit:  # keep the end: the instructions and the task
            ids = ids[:, -max(1, limit - max_tokens):]
        ids = ids.to(self.subject.device)
        with torch.no_grad():
            out = self.subject.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                do_sample=False, pad_token_id=self.subject.pad_token_id,
            )
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
