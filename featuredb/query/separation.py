"""How well each feature's activation separates marked tokens from the others (for `find`).

Input: one coder's sparse activations over the counted tokens of every example, as parallel
arrays (position, feature, value) of its nonzero entries, and which positions are marked. Every
entry that is not listed is an activation of 0. Scores, per feature:

- f1 = 2·TP / (2·TP + FP + FN), a token "fired on" when its activation is > 0 (exact for JumpReLU,
  TopK and ReLU codes, whose inactive features are exactly 0);
- precision = TP / (TP + FP);
- auroc = the Mann–Whitney statistic of the raw activations: the chance that a marked token's
  activation is above an other token's, ties counting 1/2.

Only features that fire on at least one marked token are candidates: any other feature has
TP = 0, so f1 = precision = 0, and its auroc is at most 0.5 (its marked tokens are all 0, and
no other token is below 0 for a code that is never negative), never above a candidate's that
fires on a marked token more than on the others. The work is proportional to the candidates'
nonzero entries, never to the coder's width: the unlisted zeros are counted, not stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Separation:
    """Per candidate feature (ascending `feature`), parallel arrays."""

    feature: np.ndarray  # int64
    marked_fired: np.ndarray  # int64: marked tokens with activation > 0 (TP)
    other_fired: np.ndarray  # int64: other tokens with activation > 0 (FP)
    marked_sum: np.ndarray  # float64: sum of activations over the marked tokens
    f1: np.ndarray
    precision: np.ndarray
    auroc: np.ndarray


def separation(position: np.ndarray, feature: np.ndarray, value: np.ndarray, marked: np.ndarray) -> Separation:
    """Scores of every feature that fires (> 0) on a marked position. `marked[p]` says whether
    position p is marked; there must be at least one marked and one other position."""
    marked = np.asarray(marked, dtype=bool)
    n_marked = int(marked.sum())
    n_other = len(marked) - n_marked
    if n_marked == 0 or n_other == 0:
        raise ValueError("separation needs at least one marked and one other position")
    position, feature = np.asarray(position, dtype=np.int64), np.asarray(feature, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)

    on_marked = marked[position]
    candidates = np.unique(feature[(value > 0) & on_marked])
    keep = np.isin(feature, candidates)
    slot = np.searchsorted(candidates, feature[keep])  # each kept entry's candidate
    value, on_marked = value[keep], on_marked[keep]
    count = len(candidates)

    fired = value > 0
    tp = np.bincount(slot, weights=fired & on_marked, minlength=count).astype(np.int64)
    fp = np.bincount(slot, weights=fired & ~on_marked, minlength=count).astype(np.int64)
    marked_sum = np.bincount(slot, weights=np.where(on_marked, value, 0.0), minlength=count)
    fn = n_marked - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        precision = np.where(tp > 0, tp / (tp + fp), 0.0)
    auroc = _mann_whitney(slot, value, on_marked, count, n_marked, n_other)
    return Separation(candidates, tp, fp, marked_sum, f1.astype(np.float64), precision.astype(np.float64), auroc)


def _mann_whitney(slot: np.ndarray, value: np.ndarray, on_marked: np.ndarray, count: int, n_marked: int,
                  n_other: int) -> np.ndarray:
    """AUROC per candidate: (#(marked > other) + #(marked == other) / 2) / (n_marked · n_other),
    over every pair, the unlisted zeros included.

    Each candidate's listed other-token values are sorted once under one integer key (candidate,
    rank of the value among all values), so one searchsorted counts, for every listed marked
    value, the other values of the same candidate below it and equal to it."""
    levels, rank = np.unique(np.append(value, 0.0), return_inverse=True)
    zero_rank, rank = int(rank[-1]), rank[:-1].astype(np.int64)
    stride = np.int64(len(levels) + 1)
    key = slot.astype(np.int64) * stride + rank
    other_keys = np.sort(key[~on_marked])
    start = np.searchsorted(other_keys, np.arange(count, dtype=np.int64) * stride, "left")  # each candidate's first

    other_zeros = n_other - np.bincount(slot[~on_marked], minlength=count)  # unlisted: activation 0
    marked_zeros = n_marked - np.bincount(slot[on_marked], minlength=count)

    # listed marked values: the other values below and equal to each (the unlisted zeros included)
    mine, mine_value, mine_slot = key[on_marked], value[on_marked], slot[on_marked]
    below = np.searchsorted(other_keys, mine, "left") - start[mine_slot]
    equal = np.searchsorted(other_keys, mine, "right") - np.searchsorted(other_keys, mine, "left")
    below = below + np.where(mine_value > 0, other_zeros[mine_slot], 0)
    equal = equal + np.where(mine_value == 0, other_zeros[mine_slot], 0)
    listed = np.bincount(mine_slot, weights=below + 0.5 * equal, minlength=count)

    # unlisted marked zeros: above the negative other values, tied with the zero ones
    zero_keys = np.arange(count, dtype=np.int64) * stride + zero_rank
    negative_others = np.searchsorted(other_keys, zero_keys, "left") - start
    zero_others = other_zeros + np.searchsorted(other_keys, zero_keys, "right") - np.searchsorted(other_keys, zero_keys, "left")
    unlisted = marked_zeros * (negative_others + 0.5 * zero_others)
    return (listed + unlisted) / (float(n_marked) * float(n_other))
