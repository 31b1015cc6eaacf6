"""The columns a source without our sidecar (a real Neuronpedia export) lacks, filled in from
what it has; load.py lists these defaults."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store.descriptions import best_description
from featuredb.store.neuronpedia.format import SourceIds
from featuredb.store.neuronpedia.jsonl import is_integer, read_jsonl


def coder_row_from_metadata(folder: Path, ids: SourceIds, features: dict[int, dict],
                          decoders: dict[int, list[float]], imported_at: dt.datetime) -> dict:
    """The coder row from the source's ids, source.jsonl (and its saelensConfig) and its rows;
    created_at is `imported_at` (to the second)."""
    source = _read_source_metadata(folder)
    config = source.get("saelensConfig") if isinstance(source.get("saelensConfig"), dict) else {}
    hook = next((f["hook_name"] for f in features.values() if f["hook_name"]), None) or config.get("hook_name")
    hook = str(hook) if hook else "unknown"
    site = _site_from_names(ids.set_name, hook)
    contexts = _non_negative_int(source.get("num_prompts"))
    context = _non_negative_int(source.get("num_tokens_in_prompt"))
    d_in = len(next(iter(decoders.values()), [])) or _non_negative_int(config.get("d_in"))
    return {
        "coder_id": f"{ids.model}/{ids.source}", "model": ids.model, "hook": hook, "hook_out": hook, "site": site,
        "layer": ids.layer, "architecture": str(config.get("architecture") or "unknown"),
        "kind": "transcoder" if site == "transcoder" else "sae", "d_in": d_in, "d_out": d_in,
        "width": max(max(features) + 1, _non_negative_int(config.get("d_sae"))),
        "source": f"neuronpedia:{ids.model}/{ids.source}", "tokens_indexed": contexts * context,
        "contexts_indexed": contexts, "context": context, "top_k": 0,
        "created_at": imported_at.replace(microsecond=0),
    }


def _read_source_metadata(folder: Path) -> dict:
    path = folder / "source.jsonl"
    lines = list(read_jsonl(path)) if path.is_file() else []
    return lines[0].row if lines else {}


def _site_from_names(set_name: str, hook: str) -> str:
    text = f"{set_name} {hook}".lower()
    for needle, site in (("transcoder", "transcoder"), ("mlp", "mlp"), ("att", "att"), ("res", "res")):
        if needle in text:
            return site
    return "other"


def _non_negative_int(value: object) -> int:
    return value if is_integer(value) and value >= 0 else 0


def histogram_from_bars(heights: list[float], centres: list[float], max_activation: float) -> dict:
    """Neuronpedia's histogram (bars over [min, max] of the nonzero activations) re-binned onto
    our equal-width bins on [0, hist_max]; mean and std of the activations estimated from it."""
    if not heights or sum(heights) <= 0:
        return {"hist_counts": [], "hist_max": max_activation, "mean_activation": 0.0, "std_activation": 0.0}
    half = (centres[1] - centres[0]) / 2 if len(centres) > 1 else abs(centres[0]) or 1.0
    hist_max = max(max(centres) + half, max_activation, 1e-12)
    counts = [0] * len(heights)
    for height, centre in zip(heights, centres):
        counts[min(len(counts) - 1, max(0, int(centre / hist_max * len(counts))))] += int(round(height))
    weights = np.asarray(heights)
    mean = float(np.average(centres, weights=weights))
    std = float(np.sqrt(np.average((np.asarray(centres) - mean) ** 2, weights=weights)))
    return {"hist_counts": counts, "hist_max": hist_max, "mean_activation": mean, "std_activation": std}


def assign_ranks(rows: list[dict], next_rank: Counter) -> None:
    """Top examples ranked by max value, interval ones by interval then max value (per feature)."""
    rows.sort(key=lambda r: (r["feature"], r["kind"], r["bin_min"] or 0.0, -r["max_value"]))
    for row in rows:
        key = (row["feature"], row["kind"])
        row["rank"] = next_rank[key]
        next_rank[key] += 1


def fill_derived_columns(coder: dict, features: dict[int, dict], examples: list[pa.Table],
                          descriptions: list[dict]) -> None:
    """Without a sidecar: active counts, top tokens, top_k and current descriptions from what we have."""
    peaks: dict[int, Counter] = {}
    top_counts: Counter = Counter()
    for table in examples:
        top = table.filter(pc.equal(table["kind"], "top"))
        for feature, tokens, peak in zip(*(top[c].to_pylist() for c in ("feature", "tokens", "max_position"))):
            peaks.setdefault(feature, Counter())[tokens[peak]] += 1
            top_counts[feature] += 1
    coder["top_k"] = max(top_counts.values(), default=0)
    coder["context"] = coder["context"] or max((pc.max(pc.list_value_length(t["tokens"])).as_py() or 0
                                            for t in examples), default=0)
    by_feature: dict[int, list[dict]] = {}
    for row in descriptions:
        by_feature.setdefault(row["feature"], []).append(row)
    for index, row in features.items():
        row["active_count"] = round(row["density"] * coder["tokens_indexed"])
        common = peaks.get(index, Counter()).most_common()
        row["top_tokens"], row["top_token_counts"] = [t for t, _ in common], [c for _, c in common]
        best = best_description(by_feature.get(index, []))
        if best is not None:
            row.update(description=best["description"], description_method=best["method"],
                       description_model=best["explainer_model"])
