"""What a feature's decoder direction says without any data: logit tables and nearest features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogitTables:
    top_ids: Tensor  # [F, k] tokens the feature promotes most (W_dec . W_U), best first
    top_values: Tensor
    bottom_ids: Tensor  # [F, k] tokens it suppresses most, most negative first
    bottom_values: Tensor


@torch.no_grad()
def logit_tables(W_dec: Tensor, unembed: Tensor, to_residual: Tensor | None = None,
                 k: int = 10, chunk: int = 1024) -> LogitTables:
    """Direct logit effect of each decoder direction: W_dec [F, d] (mapped into the residual stream by
    `to_residual` [d, d_model] where the coder lives elsewhere, e.g. before o_proj) times W_U^T."""
    unembed = unembed.float()
    k = min(k, unembed.shape[0])
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, W_dec.shape[0], chunk):  # [chunk, vocab] at a time: vocabularies are large
        directions = W_dec[start:start + chunk].to(unembed.device, torch.float32)
        if to_residual is not None:
            directions = directions @ to_residual.to(directions.device, torch.float32)
        logits = directions @ unembed.T
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        parts.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu()))
    return LogitTables(*(torch.cat(p) for p in zip(*parts)))


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
