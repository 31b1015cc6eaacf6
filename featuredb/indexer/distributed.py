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

Contexts. Each rank stored the token ids of its own contexts (its work dir need not be shared
with the others: on several nodes it is not). Rank 0 broadcasts the indices of the contexts that
made a top or interval example, and every rank sends back those it holds.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .stats import FeatureStats
from .workdir import ContextStore, LoadedContexts

# Ranks wait in collectives for the slowest rank's last batches and for rank 0's catalogue write.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=2)


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank `rank` of `world`, device `local_rank` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank


SINGLE = Shard()


def shard_from_env() -> Shard | None:
    """The shard torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) describes; None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Shard(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


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


# ---------------------------------------------------------------------------- statistics


def reduce_stats(stats: list[FeatureStats], shard: Shard) -> None:
    """Merge every rank's statistics into rank 0's, coder by coder, along a binary tree.
    Afterwards only rank 0's `stats` hold the result."""
    for coder_stats in stats:
        step = 1
        while step < shard.world:
            if shard.rank % (2 * step) == step:
                _send_stats(coder_stats, dst=shard.rank - step)
            elif shard.rank % (2 * step) == 0 and shard.rank + step < shard.world:
                coder_stats.merge(_receive_stats(coder_stats, src=shard.rank + step))
            step *= 2


def _send_stats(stats: FeatureStats, dst: int) -> None:
    for tensor in _stats_tensors(stats):
        dist.send(tensor.contiguous(), dst=dst)


def _receive_stats(like: FeatureStats, src: int) -> FeatureStats:
    other = FeatureStats(like.width, like.context, like.config, device=like.device, value_dtype=like.value_dtype)
    tensors = _stats_tensors(other)
    for tensor in tensors:
        dist.recv(tensor, src=src)  # in place, into other's own tensors
    other.tokens_counted = int(tensors[-1][0])
    return other


def _stats_tensors(stats: FeatureStats) -> list[torch.Tensor]:
    """The state as tensors on the stats' device, in a fixed order (the token count last)."""
    count = torch.tensor([stats.tokens_counted], dtype=torch.int64, device=stats.device)
    return [getattr(stats, name) for name in FeatureStats.TENSORS] + [count]


# ---------------------------------------------------------------------------- contexts


def example_contexts(stats: list[FeatureStats]) -> np.ndarray:
    """Global indices of the contexts that made a top or interval example of any coder (and 0,
    which records.py reads for empty top-K slots)."""
    used = [torch.tensor([0])]
    for s in stats:
        for column in (s.top_context, s.interval_context):
            used.append(column[column >= 0].unique().cpu())
    return torch.cat(used).unique().numpy()


def gather_contexts(store: ContextStore, wanted: np.ndarray | None, shard: Shard) -> LoadedContexts | None:
    """Rank 0 passes the global context indices it needs (others pass None); every rank sends the
    ones it stored. Returns them on rank 0, None on the other ranks."""
    box = [wanted]
    dist.broadcast_object_list(box, src=0)
    held = np.intersect1d(box[0], store.context_indices())
    tokens = store.tokens(held) if len(held) else np.zeros((0, store.context), dtype=np.int32)
    part = (held, tokens, store.doc_ids(held) if len(held) else [])
    parts: list | None = [None] * shard.world if shard.is_writer else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    index, tokens, doc_ids = zip(*parts)
    return LoadedContexts(np.concatenate(index), np.concatenate(tokens), [d for ds in doc_ids for d in ds])
