"""What a run checks before it loads its model or streams anything (on rank 0 alone under torchrun;
run.py hands the outcome to every rank):

- the coders it would write that the catalogue already holds. Writing a coder replaces every row
  of its coder_id, its descriptions and embeddings included, so that needs --replace; with it, what
  is dropped is said before the run starts. A resumed run's own coders (written after it started,
  by a run killed while writing the catalogue) are not in the way.
- the memory its statistics need, from the coders' widths (stats.state_bytes: the tensors
  FeatureStats allocates), against what the device has free.

Both need each coder's id and width: each coder is loaded on the CPU, one at a time, and freed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from featuredb.errors import IndexingError
from featuredb.indexer.distributed import Shard, assign_coders
from featuredb.indexer.stats import StatsConfig, state_bytes
from featuredb.runtime.coders import SparseCoder, load_coder
from featuredb.store import FeatureStore


@dataclass(frozen=True)
class CoderSize:
    coder_id: str
    width: int


def coder_sizes(specs: Sequence[str], load: Callable[[str], SparseCoder] = load_coder) -> list[CoderSize]:
    """The id and width of every coder (neither depends on the model it is read for), each loaded
    by `load` on its own and freed before the next; two coders of one id are refused."""
    if not specs:
        raise IndexingError("give at least one --coder")
    sizes = []
    for spec in specs:
        coder = load(spec)
        sizes.append(CoderSize(coder.coder_id, coder.width))
        del coder  # one coder in memory at a time
    refuse_duplicate_ids([s.coder_id for s in sizes])
    return sizes


def refuse_duplicate_ids(ids: list[str]) -> None:
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise IndexingError(f"two coders share the id {sorted(duplicates)[0]!r}: name them with ID=PATH")


# --- coders already in the catalogue -------------------------------------------------------------


def check_replacements(store: FeatureStore, coder_ids: list[str], replace: bool,
                       started_at: float | None) -> list[str]:
    """Refuse to overwrite coders already in the catalogue without `replace`; with it, return what
    to tell the user each one loses. `started_at` (epoch seconds) is set when resuming a run: coders
    written since are its own."""
    stored = [row for row in store.coders().to_dicts() if row["coder_id"] in coder_ids
              and (started_at is None or row["created_at"].timestamp() < started_at)]
    if not stored:
        return []
    if not replace:
        listed = ", ".join(f"{row['coder_id']} (model {row['model']}, indexed {_when(row)})" for row in stored)
        # the way out first: a long listing is cut at the end of the one line the CLI prints
        raise IndexingError(f"rerun with --replace to re-index coders already in {store.uri}, dropping their "
                            f"descriptions and embeddings: {listed}")
    return [_replacing(store, row) for row in stored]


def _replacing(store: FeatureStore, row: dict) -> str:
    descriptions, embeddings = _described_and_embedded(store, row["coder_id"])
    return (f"replacing coder {row['coder_id']} (model {row['model']}, indexed {_when(row)}): its {descriptions:,} "
            f"description(s) and {embeddings:,} embedding(s) are dropped")


def _when(row: dict) -> str:
    return f"{row['created_at']:%Y-%m-%d %H:%M} UTC"


def _described_and_embedded(store: FeatureStore, coder_id: str) -> tuple[int, int]:
    """Features of the coder holding a description, and a description vector."""
    rows = store.features(coder_id, columns=["description", "vector"])
    return rows["description"].is_not_null().sum(), rows["vector"].is_not_null().sum()


# --- memory --------------------------------------------------------------------------------------


def check_memory(widths: list[int], context: int, stats: StatsConfig, shard: Shard, device: torch.device) -> None:
    """Refuse statistics that cannot fit in what `device` has free. Each rank holds its coder
    group's statistics on its own device; on the CPU the ranks of a node share its memory."""
    free = free_bytes(device)
    if free is None:
        return
    group_of = assign_coders(widths, shard.groups)
    per_group = [sum(state_bytes(w, context, stats) for w, g in zip(widths, group_of) if g == group)
                 for group in range(shard.groups)]
    if device.type == "cpu":
        ranks = range(min(shard.local_world, shard.world))  # rank 0's node: ranks numbered node by node
        need, holders = sum(per_group[r // shard.members] for r in ranks), len(ranks)
    else:
        need, holders = max(per_group), 1
    if need <= free:
        return
    on = f" on each of {holders} processes" if holders > 1 else ""
    raise IndexingError(
        f"statistics need {_size(need)} for {len(widths)} coder(s) ({sum(widths):,} features) at --top-k "
        f"{stats.top_k}, --interval-samples {stats.interval_per_bin} and --context {context}{on}, but the device "
        f"({device}) has {_size(free)} free: lower --top-k or --context, or index fewer coders at a time "
        "(--coder-groups under torchrun)")


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None where we cannot tell)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return available_ram()
    return None


def available_ram() -> int:
    """The kernel's estimate of memory available without swapping, within this cgroup's limit."""
    available = _meminfo_available()
    limit = _cgroup_room()
    return available if limit is None else min(available, limit)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room() -> int | None:
    """What a cgroup v2 memory limit leaves (a container's limit is not in /proc/meminfo)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
