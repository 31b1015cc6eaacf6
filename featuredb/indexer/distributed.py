"""Several indexer processes (torchrun): the corpus split by batch, exact statistics merged with
collectives, one writer. `run.py` drives it; this module holds the mechanics.

    torchrun --nproc-per-node 8 -m featuredb.indexer --model ... --coder ... --corpus ... --db ...

Sharding. Every rank reads and tokenizes the whole corpus (cheap next to the forward pass) and cuts
it into the same batches as a single-process run; batch b is indexed by rank b % world. So every
context keeps its global index (top-K ties and the interval-sample hash use it), every batch has
the same contents and padding as in a single-process run, and the --tokens budget cuts the stream
at the same window on every rank.

Merge. FeatureStats are exact and mergeable. At the end each coder's statistics are reduced to
rank 0 along a binary tree of point-to-point tensor sends: log2(world) rounds, and a rank holds at
most one other rank's state of one coder at a time.

Coder groups (--coder-groups G). When the statistics of all coders do not fit on one device, the
ranks form G groups of world / G consecutive ranks, and each group holds only some of the coders
(`assign_coders`: balanced by width). A group shards the corpus among its members as above, so
every batch is run through the model once per group. Each group reduces its coders' statistics to
its leader (its first rank); the leaders then hand them to rank 0 one coder at a time as it writes.
Without the option there is one group of every rank.

Contexts. Each rank stored the token ids of its own contexts (its work dir need not be shared
with the others: on several nodes it is not). Rank 0 collects the indices of the contexts that
made a top or interval example of any coder, and the members of group 0 (which between them
indexed every context) send back those they hold.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from featuredb.errors import IndexingError
from featuredb.indexer.cooccurrence import TokenSample
from featuredb.indexer.stats import FeatureStats
from featuredb.indexer.workdir import ContextStore, LoadedContexts

# Ranks wait in collectives for the slowest rank's last batches and for rank 0's catalogue write.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=2)
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank `rank` of `world`, device `local_rank` on its node,
    in coder group `rank // members` of `groups` (consecutive ranks: with ranks numbered node by
    node, a group's members share a node where they can, and so do its statistics' reductions)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    groups: int = 1
    local_world: int = 1  # processes on this node (they share its memory)

    @property
    def members(self) -> int:
        """Ranks per coder group: they split the corpus between them."""
        return self.world // self.groups

    @property
    def group(self) -> int:
        return self.rank // self.members

    @property
    def member(self) -> int:
        """This rank's position in its group."""
        return self.rank % self.members

    def leader(self, group: int) -> int:
        """The rank that ends up with a group's merged statistics: its first."""
        return group * self.members

    @property
    def group_ranks(self) -> list[int]:
        return list(range(self.leader(self.group), self.leader(self.group) + self.members))

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.members == self.member


SINGLE = Shard()


def shard_from_env() -> Shard | None:
    """The shard torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) describes; None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return Shard(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                 local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def rank_device(device: torch.device, shard: Shard) -> torch.device:
    """One GPU per rank on its node: a bare `cuda` becomes `cuda:LOCAL_RANK`."""
    if device.type == "cuda" and device.index is None and shard.world > 1:
        return torch.device("cuda", shard.local_rank)
    return device


@contextmanager
def process_group(shard: Shard, device: torch.device) -> Iterator[None]:
    """torch.distributed's default group for the run (nccl on CUDA, gloo on CPU); nothing when alone."""
    if shard.world == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        dist.barrier()


def share_from_writer(value: object, shard: Shard) -> object:
    """Rank 0's `value` on every rank (the others pass anything)."""
    if shard.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_writer(decide: Callable[[], T], shard: Shard) -> T:
    """`decide()` run on rank 0 alone (a check of the catalogue, a probe of the coders), its result
    handed to every rank. When it fails, rank 0 raises its error and every other rank one saying so,
    instead of waiting for a rank that stopped."""
    if shard.world == 1:
        return decide()
    outcome: object = None
    if shard.is_writer:
        try:
            outcome = decide()
        except Exception as e:
            share_from_writer(_Failed(str(e)), shard)
            raise
    outcome = share_from_writer(outcome, shard)
    if isinstance(outcome, _Failed):
        raise IndexingError(f"rank 0 stopped: {outcome.message}")
    return outcome  # type: ignore[return-value]


@dataclass(frozen=True)
class _Failed:
    message: str


# ---------------------------------------------------------------------------- coder groups


def assign_coders(widths: Sequence[int], groups: int) -> list[int]:
    """The group of each coder: largest first (ties: the order given), each to the group with the
    fewest features so far (ties: the lowest group). Statistics grow with the width, so this
    balances the groups' memory; every rank computes the same answer from the same widths."""
    load = [0] * groups
    group_of = [0] * len(widths)
    for index in sorted(range(len(widths)), key=lambda i: (-widths[i], i)):
        group = min(range(groups), key=lambda g: (load[g], g))
        group_of[index] = group
        load[group] += widths[index]
    return group_of


# ---------------------------------------------------------------------------- statistics


def reduce_stats(stats: list[FeatureStats], shard: Shard) -> None:
    """Merge the statistics of every rank of this rank's coder group into its leader's, coder by
    coder, along a binary tree over the group's ranks. Afterwards only the leader's `stats` hold
    the result (rank 0's, without coder groups)."""
    ranks = shard.group_ranks
    position = ranks.index(shard.rank)
    for coder_stats in stats:
        step = 1
        while step < len(ranks):
            if position % (2 * step) == step:
                send_stats(coder_stats, dst=ranks[position - step])
            elif position % (2 * step) == 0 and position + step < len(ranks):
                coder_stats.merge(_receive_stats(coder_stats, src=ranks[position + step]))
            step *= 2


def send_stats(stats: FeatureStats, dst: int) -> None:
    for tensor in _stats_tensors(stats):
        dist.send(tensor.contiguous(), dst=dst)


def receive_stats(into: FeatureStats, src: int) -> FeatureStats:
    """`into` (fresh statistics of the right shape) overwritten with those `src` sends."""
    tensors = _stats_tensors(into)
    for tensor in tensors:
        dist.recv(tensor, src=src)  # in place, into `into`'s own tensors
    into.tokens_counted = int(tensors[-1][0])
    return into


def _receive_stats(like: FeatureStats, src: int) -> FeatureStats:
    return receive_stats(FeatureStats(like.width, like.context, like.config, device=like.device,
                                      value_dtype=like.value_dtype), src)


def _stats_tensors(stats: FeatureStats) -> list[torch.Tensor]:
    """The state as tensors on the stats' device, in a fixed order (the token count last)."""
    count = torch.tensor([stats.tokens_counted], dtype=torch.int64, device=stats.device)
    return [getattr(stats, name) for name in FeatureStats.TENSORS] + [count]


def gather_samples(sample: TokenSample, shard: Shard) -> TokenSample | None:
    """Every rank's co-occurrence token sample merged on rank 0 (None on the other ranks): the ranks
    of a group hold parts of the stream, the groups hold other coders' features on the same tokens."""
    parts: list | None = [None] * shard.world if shard.is_writer else None
    dist.gather_object({name: t.cpu() for name, t in sample.state_dict().items()}, parts, dst=0)
    if parts is None:
        return None
    merged = TokenSample(sample.capacity, sample.context)
    for part in parts:
        merged.merge(TokenSample.from_state(part))
    return merged


# ---------------------------------------------------------------------------- contexts


def example_contexts(stats: list[FeatureStats]) -> np.ndarray:
    """Global indices of the contexts that made a top or interval example of any coder (and 0,
    which records.py reads for empty top-K slots)."""
    used = [torch.tensor([0])]
    for s in stats:
        for column in (s.top_context, s.interval_context):
            used.append(column[column >= 0].unique().cpu())
    return torch.cat(used).unique().numpy()


def gather_example_contexts(stats: list[FeatureStats], shard: Shard) -> np.ndarray | None:
    """On rank 0, `example_contexts` of every coder of every group (the group leaders hold them
    after `reduce_stats`); None on the other ranks."""
    part = example_contexts(stats) if shard.member == 0 else np.zeros(0, dtype=np.int64)
    parts: list | None = [None] * shard.world if shard.is_writer else None
    dist.gather_object(part, parts, dst=0)
    return None if parts is None else np.unique(np.concatenate(parts))


def gather_contexts(store: ContextStore, wanted: np.ndarray | None, shard: Shard) -> LoadedContexts | None:
    """Rank 0 passes the global context indices it needs (others pass None); the ranks of group 0
    send the ones they stored (between them, every context once: they split the whole stream; the
    other groups hold the same contexts again). Returns them on rank 0, None on the other ranks."""
    box = [wanted]
    dist.broadcast_object_list(box, src=0)
    held = np.intersect1d(box[0], store.context_indices()) if shard.group == 0 else np.zeros(0, dtype=np.int64)
    tokens = store.tokens(held) if len(held) else np.zeros((0, store.context), dtype=np.int32)
    part = (held, tokens, store.doc_ids(held) if len(held) else [])
    parts: list | None = [None] * shard.world if shard.is_writer else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    index, tokens, doc_ids = zip(*parts)
    return LoadedContexts(np.concatenate(index), np.concatenate(tokens), [d for ds in doc_ids for d in ds])
