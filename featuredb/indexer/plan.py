"""Passes planned to fit the device: which coders go through the corpus together.

A run holds, on its device, every coder's encoder (in float32: JumpReLU thresholds are compared at
full precision) and its statistics state (`stats.state_bytes`, plus its share of the co-occurrence
token sample, `cooccurrence.sample_bytes`), and while one coder encodes a batch,
that coder's activations and the scratch of its statistics update (`work_bytes`, one coder at a
time). So a pass of coders C needs

    bytes(C) = sum over C of (encoder + statistics) + max over C of work

and the coders are packed into as few passes as fit the budget. Every pass reads the same windows,
so the passes differ only in their coders; a pass's forward stops at its deepest hooked layer, so
passes are grouped by depth where that costs no extra pass: the coders sorted by their deepest layer
and cut greedily (the fewest contiguous groups), unless first-fit-decreasing by size needs fewer
passes, in which case that wins (each pass is a whole forward over the corpus).

Nothing here reads a tensor: sizes come from the coders' headers (runtime/coder_headers.py).
Under torchrun with --coder-groups G, each pass holds G device-sized bins, one per group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from featuredb.errors import IndexingError
from featuredb.indexer.cooccurrence import CooccurrenceConfig, sample_bytes
from featuredb.indexer.stats import StatsConfig, state_bytes
from featuredb.runtime.coder_headers import CoderHeader, read_safetensors_header

ENCODE_ITEMSIZE = 4  # coders encode in float32 (runtime/coders.py: thresholds compared at full precision)
HEADROOM = 0.10  # of the free memory, left for the allocator, the forward's activations and the rest
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """'40GiB', '500MiB', '640KiB', '2GB' or plain bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise IndexingError(f"--memory {text!r}: expected a size such as 40GiB, 500MiB, 640KiB or plain bytes")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise IndexingError(f"--memory {text!r}: must be more than 0 bytes")
    return size


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def work_bytes(width: int, batch_size: int, context: int, stats: StatsConfig) -> int:
    """Transient bytes while one coder encodes one batch and updates its statistics: the
    activations [B, T, width] in float32 twice (pre-activations, then the masked codes the update
    reads; the nonzero lists of a sparse code are smaller), and the update's per-feature scratch
    ([width, B] context maxima, priorities and bins; [width, slots] interval bookkeeping)."""
    tokens = batch_size * context
    per_feature = batch_size * (4 + 8 + 8 + 1) + 3 * 8 * max(stats.interval_slots, stats.interval_bins) + 8 * stats.top_k
    return width * (2 * 4 * tokens + per_feature)


@dataclass(frozen=True)
class PlannedCoder:
    header: CoderHeader
    weight_bytes: int  # on the device: the encoder; on a CPU run the host's decoder too (same memory)
    state_bytes: int
    work_bytes: int

    @property
    def coder_id(self) -> str:
        return self.header.coder_id

    @property
    def held_bytes(self) -> int:
        """Held on the device for the whole pass."""
        return self.weight_bytes + self.state_bytes


def pass_bytes(coders: Sequence[PlannedCoder]) -> int:
    return sum(c.held_bytes for c in coders) + max((c.work_bytes for c in coders), default=0)


@dataclass
class Pass:
    coders: list[PlannedCoder]
    group_of: list[int] = field(default_factory=list)  # per coder: its coder group (torchrun); all 0 alone

    def __post_init__(self) -> None:
        if not self.group_of:
            self.group_of = [0] * len(self.coders)

    @property
    def coder_ids(self) -> list[str]:
        return [c.coder_id for c in self.coders]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for c in self.coders for layer in c.header.layers})

    @property
    def bytes(self) -> int:
        """On the most loaded device (one per coder group)."""
        groups = set(self.group_of)
        return max(pass_bytes([c for c, g in zip(self.coders, self.group_of) if g == group]) for group in groups)

    def to_json(self) -> dict:
        out = {"coders": self.coder_ids, "layers": self.layers, "bytes": self.bytes}
        if any(self.group_of):
            out["groups"] = self.group_of  # per coder, under torchrun --coder-groups
        return out

    def describe_coders(self) -> str:
        if not any(self.group_of):
            return ", ".join(self.coder_ids)
        return ", ".join(f"{c} (group {g})" for c, g in zip(self.coder_ids, self.group_of))


@dataclass
class Plan:
    budget_bytes: int
    budget_note: str  # how the budget was set: --memory, or free memory less what
    passes: list[Pass]

    def to_json(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "budget": self.budget_note,
                "passes": [p.to_json() for p in self.passes]}

    def lines(self) -> list[str]:
        coders = sum(len(p.coders) for p in self.passes)
        features = sum(c.header.width for p in self.passes for c in p.coders)
        out = [f"plan: {coders} coder(s), {features:,} features, in {len(self.passes)} pass(es) under a budget of "
               f"{human(self.budget_bytes)} ({self.budget_note})"]
        for k, p in enumerate(self.passes, 1):
            out.append(f"  pass {k}/{len(self.passes)}: {len(p.coders)} coder(s), layers "
                       f"{','.join(map(str, p.layers))}, {human(p.bytes)}: {p.describe_coders()}")
        return out


def planned_coders(headers: Sequence[CoderHeader], context: int, batch_size: int,
                   stats: StatsConfig, on_host: bool = False,
                   cooccurrence: CooccurrenceConfig = CooccurrenceConfig()) -> list[PlannedCoder]:
    """Each coder's bytes on the run's device; `on_host`: the device is the CPU, whose memory also
    holds the decoders that a GPU run keeps off the device. The statistics include the coder's share
    of the co-occurrence token sample (cooccurrence.sample_bytes)."""
    return [PlannedCoder(h, h.encoder_bytes(ENCODE_ITEMSIZE) + (h.decoder_bytes() if on_host else 0),
                         state_bytes(h.width, context, stats) + sample_bytes(cooccurrence, h.width),
                         work_bytes(h.width, batch_size, context, stats))
            for h in headers]


def plan_passes(coders: Sequence[PlannedCoder], budget: int, budget_note: str, groups: int = 1) -> Plan:
    """The fewest passes that fit `budget` per device (see the module doc); order within a pass is
    that of `coders`. A coder that cannot fit alone is refused, naming what it needs."""
    if not coders:
        raise IndexingError("give at least one --coder")
    for c in coders:
        if pass_bytes([c]) > budget:
            raise IndexingError(
                # the advice first: the error line is cut at 300 characters and long coder ids are common
                f"coder {c.coder_id} needs {human(pass_bytes([c]))} on the device, more than the budget of "
                f"{human(budget)}: raise --memory, or lower --top-k, --context or --batch-size (weights "
                f"{human(c.weight_bytes)} + statistics {human(c.state_bytes)} + {human(c.work_bytes)} to encode a "
                f"batch; budget: {budget_note})")
    order = {id(c): k for k, c in enumerate(coders)}
    by_depth = sorted(coders, key=lambda c: (c.header.deepest_layer, order[id(c)]))
    bins = _next_fit(by_depth, budget)
    packed = _first_fit_decreasing(coders, budget)
    if len(packed) < len(bins):
        bins = sorted(packed, key=lambda b: (max(c.header.deepest_layer for c in b), min(order[id(c)] for c in b)))
    bins = [sorted(b, key=lambda c: order[id(c)]) for b in bins]
    if groups == 1:
        return Plan(budget, budget_note, [Pass(b) for b in bins])
    return Plan(budget, budget_note, _grouped(bins, budget, groups))


def _next_fit(coders: list[PlannedCoder], budget: int) -> list[list[PlannedCoder]]:
    bins: list[list[PlannedCoder]] = []
    for c in coders:
        if bins and pass_bytes(bins[-1] + [c]) <= budget:
            bins[-1].append(c)
        else:
            bins.append([c])
    return bins


def _first_fit_decreasing(coders: Sequence[PlannedCoder], budget: int) -> list[list[PlannedCoder]]:
    bins: list[list[PlannedCoder]] = []
    for c in sorted(coders, key=lambda c: -c.held_bytes):
        home = next((b for b in bins if pass_bytes(b + [c]) <= budget), None)
        if home is None:
            bins.append([c])
        else:
            home.append(c)
    return bins


def _grouped(bins: list[list[PlannedCoder]], budget: int, groups: int) -> list[Pass]:
    """G bins a pass, one per coder group; a pass with fewer bins than groups spreads its coders
    over the groups (largest first onto the lightest group) when every group then still fits."""
    passes = []
    for start in range(0, len(bins), groups):
        chunk = bins[start:start + groups]
        if len(chunk) < groups:
            spread: list[list[PlannedCoder]] = [[] for _ in range(groups)]
            for c in sorted((c for b in chunk for c in b), key=lambda c: -c.held_bytes):
                min(spread, key=pass_bytes).append(c)
            if any(not g for g in spread) or any(pass_bytes(g) > budget for g in spread):
                n = sum(len(b) for b in chunk)
                raise IndexingError(f"pass {len(passes) + 1} has {n} coder(s) to share among {groups} coder groups "
                                    "within the budget: lower --coder-groups, or --memory to make more passes")
            chunk = spread
        coders = [c for b in chunk for c in b]
        passes.append(Pass(coders, [g for g, b in enumerate(chunk) for _ in b]))
    return passes


def default_budget(free: int | None, model_bytes: int, device_name: str) -> tuple[int, str]:
    """What the coders may use by default: the device's free memory less the model's weights and
    a headroom of HEADROOM of what is free."""
    if free is None:
        raise IndexingError(f"cannot tell how much memory {device_name} has free: give --memory SIZE")
    budget = int(free * (1 - HEADROOM)) - model_bytes
    note = (f"{device_name} free {human(free)} less the model {human(model_bytes)} and {HEADROOM:.0%} headroom")
    if budget <= 0:
        raise IndexingError(f"no memory left for the coders: {note}; give --memory SIZE")
    return budget, note


def model_weight_bytes(model: str, itemsize: int) -> int:
    """The model's weights at `itemsize` bytes each, from its files' headers (safetensors in a folder,
    or a .gguf's tensor table); 0 for a hub id not in the local cache (then the headroom must cover it)."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        try:
            return itemsize * sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
        except (ValueError, OSError, EOFError):
            return 0  # a corrupt or truncated file: the model loader reports it, with its diagnosis
    if path.is_dir():
        return itemsize * sum(math.prod(shape) for f in sorted(path.glob("*.safetensors"))
                              for _, shape in read_safetensors_header(f).values())
    return 0
