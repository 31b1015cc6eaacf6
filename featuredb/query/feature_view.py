"""One feature as a plain dict: the features row, its examples and descriptions, assembled for
`Catalogue.feature` (the CLI's `show`, the server's feature page and JSON)."""

from __future__ import annotations

import json
import numbers
from typing import TYPE_CHECKING, Any

from featuredb.errors import NotFound, QueryError
from featuredb.store.schema import COOCCURRENCE_COLUMNS, COOCCURRENCE_MIN_COUNT, hook_layers

if TYPE_CHECKING:
    from featuredb.query.reader import StoredFeature


def feature_index(index: object, coder: dict) -> int:
    """`index` checked as a feature of the coder row `coder`."""
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        raise QueryError(f"feature index must be an integer, got {index!r}")
    index = int(index)
    if index < 0:
        raise QueryError(f"feature index must be >= 0, got {index}")
    if index >= coder["width"]:
        raise NotFound(f"feature index {index} is out of range for {coder['coder_id']!r} (width {coder['width']})")
    return index


def examples_of_kind(examples: list[dict], kind: str) -> list[dict]:
    """The examples of one kind ("top" or "interval") by rank (plain Python: a few dozen rows, where
    a dataframe's filter-sort-select costs more than the rows)."""
    keep = ["rank", "tokens", "token_ids", "values", "max_value", "max_position", "doc_id", "context_index"]
    if kind == "interval":
        keep[1:1] = ["bin_min", "bin_max"]
    return [{k: e[k] for k in keep} for e in sorted((e for e in examples if e["kind"] == kind), key=lambda e: e["rank"])]


def description_entry(stored: dict, indexed_at: Any) -> dict:
    """One row of the descriptions table as plain values: text, provenance and scores."""
    return {
        "description": stored["description"], "method": stored["method"], "model": stored["explainer_model"],
        "explainer_source": stored["explainer_source"], "prompt_version": stored["prompt_version"],
        "created_at": stored["created_at"].isoformat(), "embedding_model": None, "current": False,
        # made from an older indexing of the coder: history, never the current description
        "stale": stored["indexed_at"] != indexed_at,
        "scores": {"detection": stored["detection_score"], "fuzz": stored["fuzz_score"],
                   "detection_n": stored["detection_n"], "fuzz_n": stored["fuzz_n"],
                   "details": stored["score_details"],
                   # the offline embedding AUROC (method "embedding"); absent in older catalogues
                   "embedding": stored.get("embedding_score"),
                   "embedding_details": _json_or_none(stored.get("embedding_score_details"))},
    }


def _json_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def description_score(row: dict) -> dict | None:
    """The current description's score as the features row holds it: value and method ("embedding":
    its embedding AUROC); None when it has none."""
    if row.get("description_score") is None:
        return None
    return {"value": row["description_score"], "method": row.get("description_score_method")}


def description_list(coder: dict, row: dict, history: list[dict]) -> list[dict]:
    """Every description of the feature, the current one (the features row's) first, then the
    others newest first. A current description with no descriptions-table row (written by an
    older featuredb, or directly into the features table) is listed from the features row."""
    entries = [description_entry(r, coder["created_at"])
               for r in sorted(history, key=lambda r: r["created_at"], reverse=True)]
    if row.get("description") is None:
        return entries
    current_key = (row["description"], row.get("description_method"), row.get("description_model"))
    current = next((e for e in entries if not e["stale"] and (e["description"], e["method"], e["model"]) == current_key),
                   None)
    if current is None:
        current = {"description": row["description"], "method": row.get("description_method"),
                   "model": row.get("description_model"), "explainer_source": None, "prompt_version": None,
                   "created_at": None, "stale": False, "scores": None}
    else:
        entries.remove(current)
    current.update(current=True, embedding_model=row.get("embedding_model"))
    return [current, *entries]


def layer_write(coder: dict, norms: list[float] | None) -> list[dict]:
    """A multi-layer coder's feature: how much it writes to each output layer (its decoder norm
    there, and that norm's share of them all); [] for a single-layer coder's."""
    layers = hook_layers(coder["hook_out"])
    if not norms or layers is None or len(layers) != len(norms):
        return []
    total = sum(norms)
    return [{"layer": layer, "norm": norm, "share": norm / total if total > 0 else 0.0}
            for layer, norm in zip(layers, norms)]


def cooccurring(row: dict, labels: dict[tuple[str, int], dict]) -> list[dict]:
    """The features that fire together with this one, best Jaccard first ([] when none was found
    or none was counted: `cooccurrence_counted` tells which)."""
    return [{"coder_id": coder_id, "feature": feature, "count": count, "jaccard": jaccard,
             "layer": labels.get((coder_id, feature), {}).get("layer"),
             "description": labels.get((coder_id, feature), {}).get("description")}
            for coder_id, feature, count, jaccard in zip(*(row.get(c) or [] for c in COOCCURRENCE_COLUMNS))]


def cooccurrence_counted(coder: dict, row: dict) -> dict | None:
    """On how many tokens co-firing was counted (a sample when fewer than the coder's indexed
    tokens), and the score; None when it was not (--cooccurrence 0, or an older featuredb)."""
    tokens, indexed = coder.get("cooccurrence_tokens"), coder.get("tokens_indexed")
    if row.get("cooccurring_features") is None or tokens is None:
        return None
    return {"tokens": tokens, "tokens_indexed": indexed, "sampled": indexed is not None and tokens < indexed,
            "score": "jaccard", "min_count": COOCCURRENCE_MIN_COUNT}


def feature_dict(coder: dict, stored: StoredFeature) -> dict:
    """Everything about one feature as plain values (what `Catalogue.feature` returns)."""
    row, examples, labels = stored.row, stored.examples, stored.labels
    counts = list(row["hist_counts"] or [])
    hist_max = float(row["hist_max"])
    edges = [hist_max * i / len(counts) for i in range(len(counts) + 1)] if counts else []
    return {
        "coder_id": row["coder_id"],
        "feature": row["feature"],
        "model": row["model"],
        "layer": row["layer"],
        "hook": row["hook"],
        "site": row["site"],
        "coder": {k: coder[k] for k in ("kind", "architecture", "width", "d_in", "d_out", "hook_out", "source",
                                       "tokens_indexed", "contexts_indexed", "context", "top_k")},
        "description": row.get("description"),
        "description_score": description_score(row),
        "descriptions": description_list(coder, row, stored.history),
        "density": row["density"],
        "active_count": row["active_count"],
        "max_activation": row["max_activation"],
        "mean_activation": row["mean_activation"],
        "std_activation": row["std_activation"],
        "histogram": {"counts": counts, "max": hist_max, "edges": edges},
        "logits": {
            "top": [{"token": t, "id": i, "value": v} for t, i, v in
                    zip(row["top_logit_tokens"], row["top_logit_ids"], row["top_logit_values"])],
            "bottom": [{"token": t, "id": i, "value": v} for t, i, v in
                       zip(row["bottom_logit_tokens"], row["bottom_logit_ids"], row["bottom_logit_values"])],
        },
        "neighbours": [{"feature": f, "cosine": c, "description": labels.get((row["coder_id"], f), {}).get("description")}
                       for f, c in zip(row["neighbours"], row["neighbour_cosines"])],
        "cooccurring": cooccurring(row, labels),
        "cooccurrence": cooccurrence_counted(coder, row),
        "top_tokens": [{"token": t, "count": c} for t, c in zip(row["top_tokens"], row["top_token_counts"])],
        "layer_write": layer_write(coder, row.get("layer_write")),
        "top_examples": examples_of_kind(examples, "top"),
        "interval_examples": examples_of_kind(examples, "interval"),
    }
