"""What a run checks before it loads its model or streams anything (on rank 0 alone under torchrun;
run.py hands the outcome to every rank):

- its coders, sized from their headers alone (`coder_headers`: patterns and --coders-from expanded,
  ids derived and unique), for the plan of passes (indexer/plan.py) and its default budget: the
  device's free memory less the model and a headroom (`default_budget_for`);
- the coders it would write that the catalogue already holds. Writing a coder replaces every row
  of its coder_id, its descriptions and embeddings included, so that needs --replace; with it, what
  is dropped is said before the run starts. A resumed run's own coders (written after it started,
  by a run killed while writing the catalogue) are not in the way.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from featuredb.errors import IndexingError
from featuredb.indexer.plan import default_budget
from featuredb.runtime.coder_headers import CoderHeader, coder_header
from featuredb.runtime.coder_patterns import expand_specs, prefix_clashing
from featuredb.store import FeatureStore


def coder_headers(specs: list[str], model: str) -> list[CoderHeader]:
    """Every coder the specs name (patterns expanded), read from its headers; ids unique."""
    if not specs:
        raise IndexingError("give at least one --coder")
    expanded = expand_specs(specs)
    is_gemma = _looks_like_gemma(model)
    headers = [coder_header(e.spec, model_is_gemma=is_gemma) for e in expanded]
    ids = prefix_clashing(expanded, [h.coder_id for h in headers])
    headers = [h if i == h.coder_id else replace(h, coder_id=i, spec=f"{i}={h.spec.partition('=')[2]}")
               for h, i in zip(headers, ids)]
    refuse_duplicate_ids([h.coder_id for h in headers])
    if any(h.d_in is None for h in headers):  # a hub params.npz: its d_in is the model's width
        d_model = _model_width(model)
        headers = [replace(h, d_in=d_model) if h.d_in is None else h for h in headers]
    return headers


def _looks_like_gemma(model: str) -> bool:
    """Whether TransformerLens hook names (SAELens configs) are read the Gemma way: from the model's
    config.json when it is a local folder, else its name."""
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            import json

            return "gemma" in str(json.loads(config.read_text()).get("model_type", "")).lower()
        except (OSError, ValueError):
            pass
    return "gemma" in model.lower()


def _model_width(model: str) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:
        raise IndexingError(f"cannot read the width of model {model} to size its coders: {type(e).__name__}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


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


def default_budget_for(device: torch.device, model_bytes: int) -> tuple[int, str]:
    """The coders' default budget on `device`: what it has free, less the model and a headroom."""
    return default_budget(free_bytes(device), model_bytes, "RAM" if device.type == "cpu" else str(device))


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

