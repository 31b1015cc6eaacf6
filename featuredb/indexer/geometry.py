"""What a feature's decoder direction says without any data: logit tables and nearest features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featuredb.runtime.device import fast_bf16


@dataclass
class LogitTables:
    top_ids: Tensor  # [F, k] tokens the feature promotes most (W_dec . W_U), best first
    top_values: Tensor
    bottom_ids: Tensor  # [F, k] tokens it suppresses most, most negative first
    bottom_values: Tensor


# Logits are scored in blocks of this many vocabulary entries: a block's max (min) bounds every
# entry in it, so the top-m entries lie in the m blocks with the highest maxima and only those
# blocks are ranked in full, instead of sorting all 262k logits of a Gemma 3 vocabulary twice.
VOCAB_BLOCK = 256
CANDIDATES_PER_K = 4  # candidates kept per table entry before the exact float32 re-ranking


@torch.no_grad()
def logit_tables(W_dec: Tensor, unembed: Tensor, to_residual: Tensor | None = None,
                 k: int = 10, chunk: int = 256) -> LogitTables:
    """Direct logit effect of each decoder direction: W_dec [F, d] (mapped into the residual stream by
    `to_residual` [d, d_model] where the coder lives elsewhere, e.g. before o_proj) times W_U^T.

    The [chunk, vocab] products are scored in bfloat16 where the device multiplies it natively
    (runtime.device.fast_bf16: 4x float32 on such a CPU, tensor cores on a GPU), the best
    CANDIDATES_PER_K * k tokens of each side are taken from them, and their logits recomputed in
    float32: the values stored are exact, and the order is the float32 order unless a token
    outside the bf16 candidates is within bf16 rounding (~0.4%) of the k-th."""
    vocab = unembed.shape[0]
    k = min(k, vocab)
    score_dtype = torch.bfloat16 if fast_bf16(unembed.device) else torch.float32
    unembed_exact = unembed.float()
    unembed_scores = unembed_exact.to(score_dtype)
    m = min(vocab, CANDIDATES_PER_K * k)
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, W_dec.shape[0], chunk):
        directions = W_dec[start:start + chunk].to(unembed.device, torch.float32)
        if to_residual is not None:
            directions = directions @ to_residual.to(directions.device, torch.float32)
        scores = directions.to(score_dtype) @ unembed_scores.T
        sides = []
        for largest in (True, False):
            ids = _candidates(scores, m, largest)
            exact = torch.einsum("cd,cmd->cm", directions, unembed_exact[ids])
            best = exact.topk(k, dim=1, largest=largest)
            sides += [ids.gather(1, best.indices).cpu(), best.values.cpu()]
        parts.append(tuple(sides))
    return LogitTables(*(torch.cat(p) for p in zip(*parts)))


def _candidates(scores: Tensor, m: int, largest: bool) -> Tensor:
    """Indices [rows, m] of each row's m largest (smallest) scores, via block maxima (minima)."""
    rows, vocab = scores.shape
    n_blocks = vocab // VOCAB_BLOCK
    blocks = scores[:, : n_blocks * VOCAB_BLOCK].view(rows, n_blocks, VOCAB_BLOCK)
    bound = blocks.amax(-1) if largest else blocks.amin(-1)
    chosen = bound.topk(min(n_blocks, m), dim=1, largest=largest).indices
    offsets = torch.arange(VOCAB_BLOCK, device=scores.device)
    ids = (chosen[..., None] * VOCAB_BLOCK + offsets).reshape(rows, -1)
    if n_blocks * VOCAB_BLOCK < vocab:  # the tail that fills no whole block is always a candidate
        tail = torch.arange(n_blocks * VOCAB_BLOCK, vocab, device=scores.device)
        ids = torch.cat([ids, tail.expand(rows, -1)], dim=1)
    best = scores.gather(1, ids).topk(min(m, ids.shape[1]), dim=1, largest=largest).indices
    return ids.gather(1, best)


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, k: int = 10, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """The k features with the highest decoder cosine similarity to each feature (itself excluded)."""
    directions = torch.nn.functional.normalize(W_dec.float(), dim=1)
    n = directions.shape[0]
    k = min(k, n - 1)
    ids, cosines = [], []
    for start in range(0, n, chunk):
        sims = directions[start:start + chunk] @ directions.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + start] = -float("inf")
        best = sims.topk(k, dim=1)
        ids.append(best.indices.cpu())
        cosines.append(best.values.cpu())
    return torch.cat(ids), torch.cat(cosines)
