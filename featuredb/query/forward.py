"""A subject model shared by concurrent requests (the server's fires_on, find and steer).

`SubjectModel.capture` registers forward hooks on the model's modules for the length of a pass,
and hooks are shared by every thread: two captures at once record each other's activations (or
stop each other's pass early). So a `SharedModel` runs one forward pass at a time, and the texts
that wait while a pass runs go through the next pass together, as one right-padded batch: a
text's real tokens come first, and under the causal mask nothing after them (its padding) reaches
them, so each text's activations are those of a lone pass (bit-identical on the tiny test models,
within ~1e-6 relative on SmolLM2, where batched matrix products round differently). One pass
over 16 texts of 12-24 tokens took 2.9 s on SmolLM2-135M (2 CPU cores) against 11-12.6 s for
16 passes.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from featuredb.errors import QueryError

if TYPE_CHECKING:
    from torch import Tensor

    from featuredb.runtime.model import SubjectModel

MAX_BATCH_TEXTS = 32
MAX_BATCH_TOKENS = 8192  # padded positions in one pass: bounds the activations a pass holds


@dataclass
class _Request:
    """One text waiting for its activations; `done` once a pass has answered it."""

    token_ids: list[int]  # BOS first
    hooks: frozenset[str]
    done: threading.Event = field(default_factory=threading.Event)
    activations: dict[str, Tensor] | None = None
    error: BaseException | None = None

    def answer(self, activations: dict[str, Tensor] | None = None, error: BaseException | None = None) -> None:
        self.activations, self.error = activations, error
        self.done.set()


class SharedModel:
    """A SubjectModel that any number of threads may use at once (see the module docstring)."""

    def __init__(self, model: SubjectModel) -> None:
        self.model = model
        self._queue: deque[_Request] = deque()
        self._queue_lock = threading.Lock()
        self._forward_lock = threading.Lock()  # one pass at a time: the hooks are per module
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer's Rust state is not shared safely

    def token_ids(self, text: str) -> list[int]:
        """The text's token ids without special tokens (and without a leading BOS)."""
        with self._tokenizer_lock:
            ids = list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids[1:] if ids and ids[0] == self.model.bos_token_id else ids

    def decode(self, token_ids: list[int]) -> list[str]:
        """Each token as its own string."""
        with self._tokenizer_lock:
            return [self.model.tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in token_ids]

    def token_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The text's token ids (as `token_ids` gives them) and each token's [start, end) characters
        in the text. A fast tokenizer says where each token comes from; for a slow one the spans
        are measured by decoding ever longer prefixes, which holds when the decoded tokens spell
        the text back."""
        with self._tokenizer_lock:
            if getattr(self.model.tokenizer, "is_fast", False):
                encoded = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ids, spans = list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
            else:
                ids = list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
                spans = self._decoded_spans(text, ids)
        if ids and ids[0] == self.model.bos_token_id:
            ids, spans = ids[1:], spans[1:]
        return ids, spans  # type: ignore[return-value]

    def _decoded_spans(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        ends = [len(self.model.tokenizer.decode(ids[:i + 1], clean_up_tokenization_spaces=False))
                for i in range(len(ids))]
        if self.model.tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
            raise QueryError("the model's tokenizer gives no character offsets and does not spell this text back: "
                             "cannot tell which tokens are marked")
        return [(start, end) for start, end in zip([0, *ends[:-1]], ends)]

    def text(self, token_ids: list[int]) -> str:
        """The text of token ids (special tokens left out)."""
        with self._tokenizer_lock:
            return self.model.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @contextmanager
    def alone(self) -> Iterator[SubjectModel]:
        """The model to the caller alone while the block runs (steering: many passes under hooks
        of its own); every capture waits until it ends, and runs after it."""
        with self._forward_lock:
            yield self.model

    def capture(self, token_ids: list[int], hooks: set[str]) -> dict[str, Tensor]:
        """Activations [1 + len(token_ids), d] at each hook for BOS + token_ids, as a lone pass gives them."""
        return self.capture_many([token_ids], hooks)[0]

    def capture_many(self, texts: list[list[int]], hooks: set[str]) -> list[dict[str, Tensor]]:
        """`capture` for several texts at once: they are queued together, so they share passes
        (as many as fit one, see _next_batch) with each other and with anyone else's."""
        requests = [_Request([self.model.bos_token_id, *token_ids], frozenset(hooks)) for token_ids in texts]
        with self._queue_lock:
            self._queue.extend(requests)
        with self._forward_lock:
            # Whoever holds the lock runs the texts queued first; ours may already be answered.
            while not all(request.done.is_set() for request in requests):
                batch = self._next_batch()
                try:
                    self._run(batch)
                finally:  # a KeyboardInterrupt mid-pass: nobody may wait for an answer forever
                    for waiting in batch:
                        if not waiting.done.is_set():
                            waiting.answer(error=RuntimeError("the forward pass was interrupted"))
        for request in requests:
            if request.error is not None:
                raise request.error
        return [request.activations for request in requests]  # type: ignore[misc]

    def _next_batch(self) -> list[_Request]:
        """The longest run of queued requests (oldest first) that fits one pass."""
        with self._queue_lock:
            batch = [self._queue.popleft()]
            while self._queue and len(batch) < MAX_BATCH_TEXTS:
                longest = max(len(r.token_ids) for r in [*batch, self._queue[0]])
                if longest * (len(batch) + 1) > MAX_BATCH_TOKENS:
                    break
                batch.append(self._queue.popleft())
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """Answer every request of the batch: one pass, or, if that fails, one pass each, so that a
        request is never answered with another's error."""
        try:
            for request, activations in zip(batch, self._forward(batch)):
                request.answer(activations)
        except Exception as e:  # HookError / ModelError / torch errors
            if len(batch) == 1:
                batch[0].answer(error=e)
                return
            for request in batch:
                self._run([request])

    def _forward(self, batch: list[_Request]) -> list[dict[str, Tensor]]:
        import torch

        width = max(len(r.token_ids) for r in batch)
        ids = torch.full((len(batch), width), self.model.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            ids[row, :len(request.token_ids)] = torch.tensor(request.token_ids)
            mask[row, :len(request.token_ids)] = 1
        captured = self.model.capture(ids, mask, sorted(set().union(*(r.hooks for r in batch))))
        return [{hook: captured[hook][row, :len(request.token_ids)] for hook in request.hooks}
                for row, request in enumerate(batch)]
