"""Streaming, mergeable per-feature statistics for one sparse coder.

For every feature we keep, over all counted tokens (BOS and padding are zeroed by the caller):

- count, sum and sum of squares of positive activations (density, mean, std), and the max;
- a histogram of positive activations with equal-width bins on [0, scale], where `scale` is the
  smallest power of two above the running max. When the max crosses the scale, the scale doubles
  and pairs of bins merge: exact, and independent of the order the data came in;
- the top-K contexts ranked by the feature's max activation inside the context (ties: earlier
  context first), with the per-token values of each — exact, equal to a brute-force ranking;
- interval samples: for each of `interval_bins` equal-width bins of [0, scale], the
  `interval_per_bin` active contexts with the lowest hash priority hash(context, feature). A
  bottom-k by a fixed hash is a uniform random sample that merges exactly, so the samples equal a
  brute-force computation too, however the stream was cut, checkpointed or split.

Nothing here grows with the number of tokens: the state is O(features * (K + interval slots) * T).
The hot path exploits sparsity: statistics come from the nonzero activations only, and the top-K
and interval merges touch only the features that have a candidate able to enter them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY_PRIORITY = torch.iinfo(torch.int64).max
PRIORITY_BITS = 40  # the bin index is packed above the priority in one int64 sort key


@dataclass(frozen=True)
class StatsConfig:
    top_k: int = 32
    hist_bins: int = 64  # power of two: bins then nest exactly when the scale doubles
    interval_bins: int = 16  # power of two, same reason
    interval_per_bin: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("hist_bins", "interval_bins"):
            n = getattr(self, name)
            if n < 1 or n & (n - 1):
                raise ValueError(f"{name} must be a power of two, got {n}")
        if self.top_k < 1 or self.interval_per_bin < 0:
            raise ValueError("top_k must be >= 1 and interval_per_bin >= 0")

    @property
    def interval_slots(self) -> int:
        return self.interval_bins * self.interval_per_bin


@dataclass(frozen=True)
class StateSlot:
    """One per-feature tensor of the state: its shape after the feature dimension, dtype, initial value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: int | float = 0

    @property
    def bytes_per_feature(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def state_layout(context: int, config: StatsConfig, value_dtype: torch.dtype = torch.float32) -> dict[str, StateSlot]:
    """Every tensor of a FeatureStats, per feature: what __init__ allocates and `state_bytes` counts."""
    T, K, S = context, config.top_k, config.interval_slots
    return {
        "active_count": StateSlot((), torch.int64),
        "act_sum": StateSlot((), torch.float64),
        "act_sumsq": StateSlot((), torch.float64),
        "act_max": StateSlot((), torch.float32),
        "scale": StateSlot((), torch.float32),
        "hist": StateSlot((config.hist_bins,), torch.int64),
        # top-K contexts by in-context max; empty slots have value 0 and context -1
        "top_value": StateSlot((K,), torch.float32),
        "top_context": StateSlot((K,), torch.int64, -1),
        "top_token_values": StateSlot((K, T), value_dtype),
        # interval samples: slot = bin * interval_per_bin + rank within bin (lowest priority first)
        "interval_value": StateSlot((S,), torch.float32),
        "interval_context": StateSlot((S,), torch.int64, -1),
        "interval_priority": StateSlot((S,), torch.int64, EMPTY_PRIORITY),
        "interval_token_values": StateSlot((S, T), value_dtype),
    }


def state_bytes(width: int, context: int, config: StatsConfig, value_dtype: torch.dtype = torch.float32) -> int:
    """Bytes a FeatureStats of `width` features holds (dominated by width * (K + slots) * context * 4)."""
    return width * sum(slot.bytes_per_feature for slot in state_layout(context, config, value_dtype).values())


def scale_for(max_value: Tensor) -> Tensor:
    """Smallest power of two strictly above max_value (0 where nothing was active)."""
    _, exponent = torch.frexp(max_value.float())  # max = m * 2**e with m in [0.5, 1)
    return torch.where(max_value > 0, torch.ldexp(torch.ones_like(max_value, dtype=torch.float32), exponent), 0.0)


def value_bin(values: Tensor, scale: Tensor, bins: int) -> Tensor:
    """Equal-width bin of each value on [0, scale]. Scale and bins are powers of two, so
    values * bins / scale is exact and a bin at scale 2s is exactly the bin at scale s halved."""
    safe_scale = torch.where(scale > 0, scale, 1.0)
    return (values.float() * bins / safe_scale).floor().long().clamp_(0, bins - 1)


def _int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64-style constants, as signed int64 so torch accepts them
_MIX_IN = tuple(map(_int64, (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)))
_MIX_ROUNDS = tuple(map(_int64, (0x2545F4914F6CDD1D, 0x5851F42D4C957F2D)))


def hash_priority(context: Tensor, feature: Tensor, seed: int) -> Tensor:
    """A fixed pseudo-random priority in [0, 2**PRIORITY_BITS) per (context, feature) pair.
    Integer arithmetic wraps identically on CPU and CUDA, so samples do not depend on the device."""
    x = context.long() * _MIX_IN[0] + feature.long() * _MIX_IN[1] + _int64((seed * _MIX_IN[2]) % (1 << 64))
    for mult in _MIX_ROUNDS:
        x = x ^ ((x >> 31) & ((1 << 33) - 1))  # logical shift: mask off the sign extension
        x = x * mult
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    return x & ((1 << PRIORITY_BITS) - 1)


class FeatureStats:
    """Mergeable statistics of one coder's features. See the module docstring. Its tensors are
    those of `state_layout`, each [width, *shape]."""

    active_count: Tensor
    act_sum: Tensor
    act_sumsq: Tensor
    act_max: Tensor
    scale: Tensor
    hist: Tensor
    top_value: Tensor
    top_context: Tensor
    top_token_values: Tensor
    interval_value: Tensor
    interval_context: Tensor
    interval_priority: Tensor
    interval_token_values: Tensor

    def __init__(self, width: int, context: int, config: StatsConfig = StatsConfig(),
                 device: str | torch.device = "cpu", value_dtype: torch.dtype = torch.float32):
        self.width, self.context, self.config = width, context, config
        self.device, self.value_dtype = torch.device(device), value_dtype
        self.tokens_counted = 0
        for name, slot in state_layout(context, config, value_dtype).items():
            setattr(self, name, torch.full((width, *slot.shape), slot.fill, dtype=slot.dtype, device=self.device))

    # ------------------------------------------------------------------ streaming update
    @torch.no_grad()
    def update(self, acts: Tensor, context_ids: Tensor, counted_tokens: int) -> None:
        """Add one batch. acts: [B, T, F] feature activations with BOS and padding already zeroed;
        context_ids: [B] global context indices, increasing along the stream."""
        B, T, F = acts.shape
        assert F == self.width and T == self.context, (acts.shape, self.width, self.context)
        context_ids = context_ids.to(self.device)
        self.tokens_counted += int(counted_tokens)

        old_scale = self.scale
        self.act_max = torch.maximum(self.act_max, acts.amax(dim=(0, 1)).float())
        self.scale = scale_for(self.act_max)
        self.hist = _rescale_hist(self.hist, old_scale, self.scale)

        # token-level statistics from the nonzero activations only
        flat = acts.reshape(-1, F)
        token_idx, feature_idx = flat.nonzero(as_tuple=True)
        values = flat[token_idx, feature_idx].float()
        self.active_count += torch.bincount(feature_idx, minlength=F)
        self.act_sum.index_add_(0, feature_idx, values.double())
        self.act_sumsq.index_add_(0, feature_idx, values.double().square())
        bins = value_bin(values, self.scale[feature_idx], self.config.hist_bins)
        self.hist.view(-1).index_add_(0, feature_idx * self.config.hist_bins + bins, torch.ones_like(bins))

        # context-level candidates: [F, B] max activation of each feature in each context
        context_max = acts.amax(dim=1).float().T
        self._update_top(context_max, context_ids, acts)
        if self.config.interval_slots:
            self._update_intervals(context_max, context_ids, acts, rescaled=self.scale != old_scale)

    def _update_top(self, context_max: Tensor, context_ids: Tensor, acts: Tensor) -> None:
        # Only features with a context beating their current K-th value can change; later
        # contexts lose ties, so "strictly greater" keeps the ranking exact.
        kth_value = self.top_value.amin(dim=1, keepdim=True)  # empty slots hold 0
        rows = (context_max > kth_value).any(dim=1).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            return
        self._merge_top_rows(rows, context_max[rows], context_ids.expand(rows.numel(), -1), _BatchValues(acts, rows))

    def _update_intervals(self, context_max: Tensor, context_ids: Tensor, acts: Tensor, rescaled: Tensor) -> None:
        cfg = self.config
        F, B = context_max.shape
        active = context_max > 0
        priority = hash_priority(context_ids[None, :], torch.arange(F, device=self.device)[:, None], cfg.seed)
        # A candidate matters only if its bin has a free place or it beats the worst kept priority
        # there. Rows whose scale changed are merged in full: their stored samples change bins.
        bins = value_bin(context_max, self.scale[:, None], cfg.interval_bins)
        stored = self.interval_context >= 0
        stored_bins = torch.where(stored, value_bin(self.interval_value, self.scale[:, None], cfg.interval_bins), 0)
        filled = torch.zeros(F, cfg.interval_bins, dtype=torch.int64, device=self.device)
        filled.scatter_add_(1, stored_bins, stored.long())
        worst = torch.full((F, cfg.interval_bins), -1, dtype=torch.int64, device=self.device)
        worst.scatter_reduce_(1, stored_bins, torch.where(stored, self.interval_priority, -1), reduce="amax")
        worst = torch.where(filled < cfg.interval_per_bin, EMPTY_PRIORITY, worst)
        beats = active & (priority < worst.gather(1, bins))
        rows = (beats.any(dim=1) | (rescaled & stored.any(dim=1))).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            return
        cand_value = torch.where(active[rows], context_max[rows], 0.0)
        self._merge_interval_rows(rows, cand_value, context_ids.expand(rows.numel(), -1), priority[rows],
                                  _BatchValues(acts, rows))

    # ------------------------------------------------------------------ merges (shared by update and merge)
    # Slots are an unordered set: deciding which entries survive needs only the scalar columns
    # (value, context, priority), and the [T]-long per-token rows are written only for entries that
    # newly enter, into the slots freed by the ones that left. Sorting happens once, at the end.
    def _merge_top_rows(self, rows: Tensor, cand_value: Tensor, cand_context: Tensor, cand_tokens) -> None:
        K = self.config.top_k
        old_value, old_context = self.top_value[rows], self.top_context[rows]
        value = torch.cat([old_value, cand_value], dim=1)
        context = torch.cat([old_context, cand_context], dim=1)
        order = _rank_top(value, context)[:, :K]
        keep = torch.zeros_like(value, dtype=torch.bool).scatter_(1, order, value.gather(1, order) > 0)
        self._replace(rows, keep, K, cand_tokens,
                      columns=(self.top_value, self.top_context), fills=(0.0, -1),
                      sources=(value, context), token_values=self.top_token_values)

    def _merge_interval_rows(self, rows: Tensor, cand_value: Tensor, cand_context: Tensor,
                             cand_priority: Tensor, cand_tokens) -> None:
        cfg = self.config
        S = cfg.interval_slots
        value = torch.cat([self.interval_value[rows], cand_value], dim=1)
        context = torch.cat([self.interval_context[rows], cand_context], dim=1)
        priority = torch.cat([self.interval_priority[rows], cand_priority], dim=1)
        order, sorted_bins, rank = _rank_intervals(value, context, priority, self.scale[rows], cfg.interval_bins)
        keep_sorted = (rank < cfg.interval_per_bin) & (sorted_bins < cfg.interval_bins)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        self._replace(rows, keep, S, cand_tokens,
                      columns=(self.interval_value, self.interval_context, self.interval_priority),
                      fills=(0.0, -1, EMPTY_PRIORITY), sources=(value, context, priority),
                      token_values=self.interval_token_values)

    def _replace(self, rows: Tensor, keep: Tensor, n_slots: int, cand_tokens, columns, fills, sources,
                 token_values: Tensor) -> None:
        """Write a merge result in place. keep: [R, n_slots + C] entries that survive (old slots
        first, then candidates). Kept candidates go into freed or empty slots of their row, in order."""
        old_valid = columns[1][rows] >= 0  # the context column
        kept_old, admitted = keep[:, :n_slots], keep[:, n_slots:]
        # the j-th admitted candidate of a row takes the j-th free slot of that row
        free_slot_by_rank = _slots_by_rank(~kept_old, n_slots)
        adm_r, adm_c = admitted.nonzero(as_tuple=True)
        adm_rank = (admitted.long().cumsum(dim=1) - 1)[adm_r, adm_c]
        slot = free_slot_by_rank[adm_r, adm_rank]
        # clear old entries that left
        gone_r, gone_s = (old_valid & ~kept_old).nonzero(as_tuple=True)
        for column, fill in zip(columns, fills):
            column[rows[gone_r], gone_s] = fill
        token_values[rows[gone_r], gone_s] = 0
        if adm_r.numel():
            for column, source in zip(columns, sources):
                column[rows[adm_r], slot] = source[adm_r, n_slots + adm_c]
            token_values[rows[adm_r], slot] = _candidate_token_values(cand_tokens, adm_r, adm_c).to(token_values.dtype)

    # ------------------------------------------------------------------ merging two states
    @torch.no_grad()
    def merge(self, other: "FeatureStats") -> None:
        """Fold another state over the same coder (another corpus shard) into this one."""
        if (other.width, other.context, other.config) != (self.width, self.context, self.config):
            raise ValueError("can only merge statistics of the same coder, context and config")
        self.tokens_counted += other.tokens_counted
        self.active_count += other.active_count.to(self.device)
        self.act_sum += other.act_sum.to(self.device)
        self.act_sumsq += other.act_sumsq.to(self.device)
        self.act_max = torch.maximum(self.act_max, other.act_max.to(self.device))
        new_scale = scale_for(self.act_max)
        self.hist = _rescale_hist(self.hist, self.scale, new_scale) + _rescale_hist(
            other.hist.to(self.device), other.scale.to(self.device), new_scale)
        self.scale = new_scale
        rows = torch.arange(self.width, device=self.device)
        other_context = other.top_context.to(self.device)
        self._merge_top_rows(rows, torch.where(other_context >= 0, other.top_value.to(self.device), 0.0),
                             other_context, other.top_token_values.to(self.device))
        if self.config.interval_slots:
            self._merge_interval_rows(rows, other.interval_value.to(self.device), other.interval_context.to(self.device),
                                      other.interval_priority.to(self.device), other.interval_token_values.to(self.device))

    # ------------------------------------------------------------------ results in order
    def top_sorted(self, features: slice = slice(None)) -> tuple[Tensor, Tensor, Tensor]:
        """Top-K (value, context, per-token values) per feature (of `features`), best first; empty slots last."""
        value, context, token_values = self.top_value[features], self.top_context[features], self.top_token_values[features]
        order = _rank_top(value, context)
        return value.gather(1, order), context.gather(1, order), token_values.gather(1, order[..., None].expand_as(token_values))

    def intervals_sorted(self, features: slice = slice(None)) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Interval samples (bin, value, context, per-token values) per feature (of `features`), by bin
        then priority; empty slots last with bin = interval_bins."""
        value, context = self.interval_value[features], self.interval_context[features]
        token_values = self.interval_token_values[features]
        order, sorted_bins, _ = _rank_intervals(value, context, self.interval_priority[features], self.scale[features],
                                                self.config.interval_bins)
        return (sorted_bins, value.gather(1, order), context.gather(1, order),
                token_values.gather(1, order[..., None].expand_as(token_values)))

    # ------------------------------------------------------------------ checkpoints
    TENSORS = tuple(state_layout(1, StatsConfig()))  # names, in the order checkpoints and collectives use

    def state_dict(self) -> dict[str, Tensor]:
        state = {name: getattr(self, name).contiguous().cpu() for name in self.TENSORS}
        state["tokens_counted"] = torch.tensor([self.tokens_counted], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self.TENSORS:
            current = getattr(self, name)
            loaded = state[name]
            if loaded.shape != current.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(loaded.shape)}, expected {tuple(current.shape)}")
            setattr(self, name, loaded.to(self.device, current.dtype))
        self.tokens_counted = int(state["tokens_counted"][0])

    # ------------------------------------------------------------------ results
    def density(self) -> Tensor:
        return self.active_count.double() / max(self.tokens_counted, 1)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        n = self.active_count.double().clamp(min=1)
        mean = self.act_sum / n
        var = (self.act_sumsq / n - mean.square()).clamp(min=0)
        return mean, var.sqrt()


class _BatchValues:
    """Per-token values of the batch's contexts, gathered only for admitted candidates."""

    def __init__(self, acts: Tensor, rows: Tensor):
        self.acts, self.rows = acts, rows  # acts [B, T, F]; rows: the feature of each merged row


def _candidate_token_values(candidates, row: Tensor, cand: Tensor) -> Tensor:
    """[n, T] per-token values of candidate `cand` of merged row `row`."""
    if isinstance(candidates, _BatchValues):
        return candidates.acts[cand, :, candidates.rows[row]]
    return candidates[row, cand]  # another state's slots: [R, C, T]


def _rank_top(value: Tensor, context: Tensor) -> Tensor:
    """Order of entries by value descending, ties by context ascending; empty (value 0) last."""
    by_context = torch.where(value > 0, context, torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
    by_value = value.gather(1, by_context).argsort(dim=1, descending=True, stable=True)
    return by_context.gather(1, by_value)


def _rank_intervals(value: Tensor, context: Tensor, priority: Tensor, scale: Tensor, n_bins: int):
    """Order of entries by (bin, priority, context), empty last (bin n_bins); and each sorted
    entry's bin and rank within its bin."""
    valid = (value > 0) & (context >= 0)
    bins = torch.where(valid, value_bin(value, scale[:, None], n_bins), n_bins)
    key = (bins << PRIORITY_BITS) | priority.clamp(max=(1 << PRIORITY_BITS) - 1)
    by_context = context.argsort(dim=1, stable=True)
    order = by_context.gather(1, key.gather(1, by_context).argsort(dim=1, stable=True))
    sorted_bins = bins.gather(1, order)
    position = torch.arange(order.shape[1], device=value.device).expand_as(order)
    is_first = torch.ones_like(sorted_bins, dtype=torch.bool)
    is_first[:, 1:] = sorted_bins[:, 1:] != sorted_bins[:, :-1]
    rank = position - torch.where(is_first, position, 0).cummax(dim=1).values
    return order, sorted_bins, rank


def _slots_by_rank(free: Tensor, n_slots: int) -> Tensor:
    """[R, n_slots]: column j holds the index of the row's j-th free slot (n_slots past the end)."""
    rank = torch.where(free, free.long().cumsum(dim=1) - 1, n_slots)
    by_rank = torch.full((free.shape[0], n_slots + 1), n_slots, dtype=torch.int64, device=free.device)
    by_rank.scatter_(1, rank, torch.arange(n_slots, device=free.device).expand_as(rank).clone())
    return by_rank[:, :n_slots]


def _rescale_hist(hist: Tensor, old_scale: Tensor, new_scale: Tensor) -> Tensor:
    """Re-express histograms at a larger power-of-two scale: bin i moves to bin i >> doublings."""
    grown = (new_scale > old_scale) & (old_scale > 0)
    if not grown.any():
        return hist
    rows = grown.nonzero(as_tuple=True)[0]
    doublings = torch.log2(new_scale[rows] / old_scale[rows]).round().long()
    bins = hist.shape[1]
    target = (torch.arange(bins, device=hist.device)[None, :] >> doublings[:, None]).clamp(max=bins - 1)
    hist = hist.clone()
    rescaled = torch.zeros_like(hist[rows])
    rescaled.scatter_add_(1, target, hist[rows])
    hist[rows] = rescaled
    return hist
