"""Clones: live features of one coder whose decoder directions are (almost) the same.

A clone writes what its twin writes, so it is as wasted as a dead feature, and a search shows the
same description twice. Each coder's training report counts them beside the dead features
(featuredb.demo.build): a live feature is a clone when a live feature with a lower index has decoder
cosine > CLONE_COSINE with it, so each group of clones keeps its first member and

    wasted = dead + clones

counts the features the coder could lose without losing anything it writes. A multi-slot coder's
feature (crosscoder, CLT) is compared on its whole decoder row, every output layer together.

    count = count_clones(coder.w_dec.flatten(0, 1).flatten(1), live)   # live: [S * F] bool
    print(count.pairs, count.clones)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CLONE_COSINE = 0.99  # decoder cosine above which two live features count as clones


@dataclass
class CloneCount:
    pairs: int  # pairs of live features with decoder cosine > CLONE_COSINE
    clones: int  # live features with such a twin of lower index (each group keeps one)


@torch.no_grad()
def count_clones(decoder_rows: Tensor, live: Tensor, threshold: float = CLONE_COSINE, chunk: int = 2048) -> CloneCount:
    """Clones among the live features: decoder_rows [n, e] (one row per feature), live [n] bool.
    Cosines are computed a chunk of rows at a time ([chunk, n_live] in memory, not [n, n])."""
    if decoder_rows.ndim != 2 or live.shape != decoder_rows.shape[:1]:
        raise ValueError(f"decoder rows [n, e] and a live mask [n] expected, got {tuple(decoder_rows.shape)} "
                         f"and {tuple(live.shape)}")
    rows = F.normalize(decoder_rows[live].float(), dim=1)  # an all-zero row stays zero: no twin
    n = len(rows)
    pairs, clones = 0, 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cosine = rows[start:stop] @ rows[:stop].T  # [c, stop]: each row against itself and the rows before it
        earlier = torch.arange(stop)[None, :] < torch.arange(start, stop)[:, None]
        twins = (cosine > threshold) & earlier
        pairs += int(twins.sum())
        clones += int(twins.any(1).sum())
    return CloneCount(pairs=pairs, clones=clones)
