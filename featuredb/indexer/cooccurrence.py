"""Features that fire together: per feature, the features of the same pass (every coder of it) that
fire on the same tokens most often, counted exactly on a fixed random sample of tokens.

Counting every pair over a corpus costs sum over tokens of (features firing there)^2: the demo's
coders fire ~420 features a token together, ~90k pairs a token. So the pairs are counted on a
sample of at most `sample_tokens` counted tokens: the ones with the lowest hash priority
hash(context, position). A bottom-k by a fixed hash is a uniform random sample that merges
exactly (union, keep the k lowest), so a resumed run and a torchrun job sample the same tokens
as one process; coder groups, which each see the whole stream, sample the same tokens too and
their feature lists are joined per token. A corpus of at most `sample_tokens` tokens is counted
in full.

State (bounded by the sample, not by the corpus or the coders' width): per sampled token its
priority, its key (context * T + position) and the pass-global ids of the features firing on it
(coder offset + feature, coders in the pass's order), as CSR.

At the end, per feature i with n_i firings in the sample, every partner j != i with c_ij >= MIN_COUNT
tokens where both fire is scored by Jaccard c_ij / (n_i + n_j - c_ij); the `top_n` best are kept
(ties: the lower id). The counts come from a sparse product A^T A of the sample's
token x feature matrix, taken a block of features at a time so memory stays bounded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from featuredb.indexer.stats import hash_priority
from featuredb.store.schema import COOCCURRENCE_MIN_COUNT

MIN_COUNT = COOCCURRENCE_MIN_COUNT  # a pair seen on one token only is not evidence of anything
DEFAULT_TOP_N = 10
DEFAULT_SAMPLE_TOKENS = 1 << 13  # the demo: ~5% of its index stage (docs/benchmarks.md)
PLANNED_FIRING = 256  # features of one coder firing on a token, as the planner assumes
_SEED = 0x5EED  # fixed: every run of a corpus samples the same tokens
_BLOCK_PAIRS = 1 << 24  # pair products per sparse block: bounds the block's output and its sort
_DENSE_BLOCK = 1 << 24  # a block's output is taken dense (for a top-k) up to this many cells
_ONE_BITS = 0x3F800000  # float32 1.0's bits: Jaccard <= 1


@dataclass(frozen=True)
class CooccurrenceConfig:
    top_n: int = DEFAULT_TOP_N  # partners kept per feature; 0 turns counting off
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS  # tokens the pairs are counted on (at most)

    def __post_init__(self):
        if self.top_n < 0 or self.sample_tokens < 1:
            raise ValueError("co-occurrence: top_n must be >= 0 and sample_tokens >= 1")
        if self.sample_tokens > 1 << 24:  # counts are summed in float32 (exact below 2**24); sort keys pack tokens in 24 bits
            raise ValueError("co-occurrence: at most 16,777,216 sampled tokens")

    @property
    def enabled(self) -> bool:
        return self.top_n > 0


def sample_bytes(config: CooccurrenceConfig, width: int) -> int:
    """A coder's share of the sample's bytes when full (what the pass planner counts): 8 B for each
    firing of its features on a sampled token, planned at a 16th of its width up to PLANNED_FIRING
    a token (Gemma Scope's L0s run ~10-200; the true count is only known once the run has seen the
    corpus). The tokens' own 24 B (priority, key, offset) are a fixed ~0.2 MiB a pass."""
    if not config.enabled:
        return 0
    return config.sample_tokens * 8 * min(PLANNED_FIRING, max(1, width // 16))


class TokenSample:
    """The bottom-`capacity` counted tokens of the stream by hash priority, with the pass-global ids
    of the features firing on each. Kept on the host: it is small and the device stays free."""

    def __init__(self, capacity: int, context: int):
        self.capacity, self.context = capacity, context
        self.priority = torch.zeros(0, dtype=torch.int64)
        self.key = torch.zeros(0, dtype=torch.int64)
        self.offsets = torch.zeros(1, dtype=torch.int64)  # CSR row pointers into `features`
        self.features = torch.zeros(0, dtype=torch.int64)

    @property
    def tokens(self) -> int:
        return len(self.key)

    # --- streaming ------------------------------------------------------------------------------

    def candidates(self, context_ids: Tensor, count_mask: Tensor) -> BatchCandidates | None:
        """The batch's counted tokens that can enter the sample (None when none can): those below the
        sample's current worst priority. context_ids [B]; count_mask [B, T]."""
        B, T = count_mask.shape
        key = (context_ids.long()[:, None] * T + torch.arange(T, device=context_ids.device)).cpu()
        priority = hash_priority(key, torch.zeros_like(key), _SEED)
        eligible = count_mask.cpu().bool()  # may be count_mask itself: never changed in place
        if self.tokens >= self.capacity:
            eligible = eligible & (priority <= self.priority.max())  # a tie may still win on its key
        rows, positions = eligible.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return None
        return BatchCandidates(rows, positions, priority[rows, positions], key[rows, positions])

    def add(self, batch: BatchCandidates) -> None:
        """Fold in a batch's candidates (tokens the sample has not seen) and keep the bottom `capacity`.
        Rows stay in no set order (what is counted does not depend on it): kept rows keep their
        place, new ones follow, and no entry is sorted; only the tokens' priorities are."""
        n = self.tokens
        priority, key = torch.cat([self.priority, batch.priority]), torch.cat([self.key, batch.key])
        keep = torch.zeros(len(key), dtype=torch.bool)
        keep[_lexsort(priority, key)[:self.capacity]] = True
        new_lengths, new_features = batch.placed()
        old_lengths = self.offsets[1:] - self.offsets[:-1]
        old_entries = torch.repeat_interleave(keep[:n], old_lengths)
        new_entries = torch.repeat_interleave(keep[n:], new_lengths)
        self.features = torch.cat([self.features[old_entries], new_features[new_entries]])
        lengths = torch.cat([old_lengths[keep[:n]], new_lengths[keep[n:]]])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        self.priority, self.key = priority[keep], key[keep]

    def merge(self, other: TokenSample) -> None:
        """Fold in another process's sample (another part of the stream, or the same tokens with
        another coder group's features, which are joined) and keep the bottom `capacity`. The result
        is canonical: rows by (priority, key), each row's features ascending."""
        priority = torch.cat([self.priority, other.priority])
        key = torch.cat([self.key, other.key])
        owner = torch.cat([torch.arange(self.tokens), self.tokens + torch.arange(other.tokens)])
        entry_token = torch.cat([_row_of_entries(self.offsets), self.tokens + _row_of_entries(other.offsets)])
        features = torch.cat([self.features, other.features])
        # distinct tokens by (priority, key), lowest first; the first `capacity` stay
        order = _lexsort(priority, key)
        sorted_key = key[order]
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        distinct = first.cumsum(0) - 1  # the new row of each (sorted) input token
        kept = distinct < self.capacity
        new_row = torch.full((len(order),), -1, dtype=torch.int64)
        new_row[owner[order]] = torch.where(kept, distinct, -1)
        keep_rows = order[first & kept]
        # every entry follows its token to its new row; entries of dropped tokens go
        entry_row = new_row[entry_token]
        entries = (entry_row >= 0).nonzero(as_tuple=True)[0]
        entries = entries[((entry_row[entries] << 38) | features[entries]).argsort()]  # by row, then feature
        self.priority, self.key = priority[keep_rows], key[keep_rows]
        self.features = features[entries]
        counts = torch.bincount(entry_row[entries], minlength=len(keep_rows))
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])

    def canonical(self) -> TokenSample:
        """The same sample with rows by (priority, key) and features ascending (as `merge` leaves it)."""
        out = TokenSample(self.capacity, self.context)
        out.merge(self)
        return out

    # --- checkpoints and collectives -----------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        return {"priority": self.priority, "key": self.key, "offsets": self.offsets, "features": self.features,
                "shape": torch.tensor([self.capacity, self.context], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        capacity, context = (int(v) for v in state["shape"])
        if (capacity, context) != (self.capacity, self.context):
            raise ValueError(f"co-occurrence sample of {capacity} tokens x {context}, expected "
                             f"{self.capacity} x {self.context}")
        self.priority, self.key = state["priority"].long(), state["key"].long()
        self.offsets, self.features = state["offsets"].long(), state["features"].long()

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> TokenSample:
        capacity, context = (int(v) for v in state["shape"])
        sample = cls(capacity, context)
        sample.load_state_dict(state)
        return sample

    # --- results --------------------------------------------------------------------------------

    def firing_counts(self, n_features: int) -> Tensor:
        """n_i: sampled tokens on which each pass-global feature fires."""
        return torch.bincount(self.features, minlength=n_features)

    def top_partners(self, n_features: int, top_n: int, device: torch.device | str = "cpu") -> Partners:
        """Per pass-global feature, its `top_n` partners by Jaccard (see the module docstring)."""
        partner = torch.full((n_features, top_n), -1, dtype=torch.int64)
        count = torch.zeros((n_features, top_n), dtype=torch.int64)
        jaccard = torch.zeros((n_features, top_n), dtype=torch.float32)
        if top_n == 0 or self.features.numel() == 0:
            return Partners(partner, count, jaccard, self.tokens)
        fires = self.firing_counts(n_features).to(device)
        token_of = _row_of_entries(self.offsets)
        A = _csr(self.offsets, self.features, (self.tokens, n_features), device)
        # A^T as CSR: each feature's tokens
        by_feature = ((self.features << 24) | token_of).argsort()  # by feature, then token (< 2**24)
        At_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), fires.cpu().cumsum(0)])
        At_tokens = token_of[by_feature]
        # pair products per feature (an upper bound on its output row), to cut blocks by work
        per_token = (self.offsets[1:] - self.offsets[:-1])
        work = torch.zeros(n_features, dtype=torch.int64).index_add_(0, self.features, per_token[token_of])
        fires_host = fires.cpu()
        for start, stop in _blocks(work, _BLOCK_PAIRS):
            lo, hi = int(At_offsets[start]), int(At_offsets[stop])
            if lo == hi:
                continue
            block = _csr(At_offsets[start:stop + 1] - lo, At_tokens[lo:hi], (stop - start, self.tokens), device)
            counts = torch.sparse.mm(block, A)  # [stop - start, n_features]: tokens where both fire
            rows, cols, c = _candidates(counts, start, fires, top_n)
            j = (c.double() / (fires_host[rows] + fires_host[cols] - c).double()).float()
            # by row, then Jaccard descending (a positive float32's bits order like it), then partner
            # id: sorted by id first (any order of equal ids: they are in different rows), then stably
            by_id = cols.argsort()
            key = (rows[by_id] << 31) | (_ONE_BITS - j[by_id].view(torch.int32).long())
            order = by_id[key.argsort(stable=True)]
            rows, cols, c, j = rows[order], cols[order], c[order], j[order]
            first_of_row = torch.ones(len(rows), dtype=torch.bool)
            first_of_row[1:] = rows[1:] != rows[:-1]
            position = torch.arange(len(rows))
            rank = position - torch.where(first_of_row, position, 0).cummax(0).values
            top = (rank < top_n).nonzero(as_tuple=True)[0]
            slot = (rows[top], rank[top])
            partner[slot], count[slot], jaccard[slot] = cols[top], c[top], j[top]
        return Partners(partner, count, jaccard, self.tokens)


@dataclass
class BatchCandidates:
    """A batch's tokens that may enter the sample, and, as each coder encodes the batch, the
    pass-global ids of its features firing on them."""

    rows: Tensor  # [n] batch row of each candidate token
    positions: Tensor  # [n] its position in the context
    priority: Tensor
    key: Tensor
    _token: list[Tensor] | None = None  # per coder: candidate index of each firing
    _feature: list[Tensor] | None = None

    def add(self, acts: Tensor, offset: int) -> None:
        """acts [B, T, F]: one coder's activations of the batch (non-counted tokens zeroed); `offset`:
        its first feature's pass-global id (coders are added in increasing offsets)."""
        rows, positions = self.rows.to(acts.device), self.positions.to(acts.device)
        token, feature = acts[rows, positions].nonzero(as_tuple=True)
        self._token = (self._token or []) + [token.cpu()]
        self._feature = (self._feature or []) + [feature.cpu() + offset]

    def placed(self) -> tuple[Tensor, Tensor]:
        """Features firing on each candidate token, and the firing features' pass-global ids by
        candidate token, then id. Each coder's list is by token then feature already (nonzero's
        order) and coders come in increasing offsets, so each entry's place is counted, not sorted."""
        lists = list(zip(self._token or [], self._feature or []))
        counts = [torch.bincount(token, minlength=len(self.key)) for token, _ in lists]
        lengths = torch.stack(counts).sum(0) if counts else torch.zeros(len(self.key), dtype=torch.int64)
        out = torch.empty(int(lengths.sum()), dtype=torch.int64)
        filled = torch.cumsum(lengths, 0) - lengths  # next free place of each token's row
        for (token, feature), count in zip(lists, counts):
            first = torch.cumsum(count, 0) - count  # where each token's run starts in this list
            out[filled[token] + torch.arange(len(token)) - first[token]] = feature
            filled += count
        return lengths, out


@dataclass
class Partners:
    """Per pass-global feature: partner ids (-1: none), counts, Jaccard, best first; and the number of
    sampled tokens they were counted on."""

    partner: Tensor  # [F, top_n] int64
    count: Tensor  # [F, top_n] int64
    jaccard: Tensor  # [F, top_n] float32
    tokens: int

    def for_coder(self, offset: int, width: int, offsets: dict[str, int]) -> Callable[[slice], dict]:
        """The features-table columns of a coder of `width` features whose first pass-global id is `offset`, for a slice
        of its features: partners as (coder_id, feature), through `offsets` (each coder of the pass:
        its first pass-global id)."""
        coder_ids = list(offsets)
        bounds = torch.tensor([offsets[c] for c in coder_ids], dtype=torch.int64)
        if (bounds[1:] < bounds[:-1]).any():
            raise ValueError("co-occurrence: coder offsets must be in increasing order")

        def columns(features: slice) -> dict:
            first, last, _ = features.indices(width)
            start, stop = offset + first, offset + last
            partner = self.partner[start:stop]
            valid = (partner >= 0).sum(1).tolist()  # found partners come first, then -1
            coder_index = torch.searchsorted(bounds, partner.clamp(min=0), right=True) - 1
            local = (partner - bounds[coder_index]).tolist()
            coder_index, count, jaccard = coder_index.tolist(), self.count[start:stop].tolist(), \
                self.jaccard[start:stop].tolist()
            return {"cooccurring_coder_ids": [[coder_ids[k] for k in ks[:n]] for ks, n in zip(coder_index, valid)],
                    "cooccurring_features": [fs[:n] for fs, n in zip(local, valid)],
                    "cooccurring_counts": [cs[:n] for cs, n in zip(count, valid)],
                    "cooccurring_jaccard": [js[:n] for js, n in zip(jaccard, valid)]}

        return columns


def _candidates(counts: Tensor, start: int, fires: Tensor, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row, partner, count) on the host of a block's pairs that may be among a row's `top_n`: every
    pair met on >= MIN_COUNT tokens; where the block's output is dense (coders firing hundreds of
    features a token), only those at or above each row's top_n-th Jaccard (a top-k, ties kept),
    which spares sorting millions of pairs that cannot be kept."""
    b, width = counts.shape
    if counts.values().numel() < b * width // 8 or b * width > _DENSE_BLOCK:
        crow, cols, c = counts.crow_indices().cpu(), counts.col_indices().cpu(), counts.values().cpu()
        rows = _row_of_entries(crow) + start
        keep = (c >= MIN_COUNT - 0.5) & (cols != rows)  # most pairs meet once: dropped before sorting
        return rows[keep], cols[keep], c[keep].round().long()
    dense = counts.to_dense()
    local = torch.arange(b, device=dense.device)
    dense[local, local + start] = 0  # not its own partner
    both = dense.double()
    jaccard = (both / (fires[start:start + b, None].double() + fires[None, :].double() - both)).float()
    jaccard = torch.where(dense >= MIN_COUNT - 0.5, jaccard, -1.0)
    threshold = jaccard.topk(min(top_n, width), dim=1).values[:, -1:]
    rows, cols = ((jaccard >= threshold) & (jaccard >= 0)).nonzero(as_tuple=True)
    return (rows + start).cpu(), cols.cpu(), dense[rows, cols].round().long().cpu()


def _row_of_entries(offsets: Tensor) -> Tensor:
    """The row of every entry of a CSR with these row pointers."""
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets[1:] - offsets[:-1])


def _lexsort(*keys: Tensor) -> Tensor:
    """Indices ordering by keys[0], then keys[1], ... (each ascending; stable)."""
    order = torch.arange(len(keys[0]))
    for key in reversed(keys):
        order = order[key[order].argsort(stable=True)]
    return order


def _csr(offsets: Tensor, columns: Tensor, shape: tuple[int, int], device: torch.device | str) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(offsets.to(device), columns.to(device),
                                       torch.ones(len(columns), dtype=torch.float32, device=device), size=shape,
                                       check_invariants=False)


def _blocks(work: Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive feature ranges [start, stop) of about `budget` summed work each (at most twice it,
    or one feature's own work when that alone is more)."""
    block_of = torch.cumsum(work, 0) // max(budget, 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), (block_of[1:] != block_of[:-1]).nonzero()[:, 0] + 1])
    bounds = starts.tolist() + [len(work)]
    return list(zip(bounds[:-1], bounds[1:]))
