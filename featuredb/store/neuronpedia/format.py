"""The Neuronpedia format as export and import both see it: folder and file names, the field
names of Neuronpedia's tables and of our sidecar, and how models, sources and rows are named."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BATCH_SIZE = 1024
KINDS = ("features", "activations", "explanations")  # a source's folders of batch files
SIDECAR_DIR = "featuredb"
SIDECAR_CODER_FILE = "coder.jsonl"
CREATOR_ID = "featuredb"  # Neuronpedia's exports replace creator/author ids with their own anyway
NEURONPEDIA_SOURCE = "neuronpedia"  # explainer_source of descriptions imported from Neuronpedia
TOP_MARKER = -1.0  # binMin / binContains of a top example (SAEDashboard's convention)

# Field names of Neuronpedia's tables, as its public dataset exports write them.
NEURON_FIELDS = (
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "decoder_weights_dist", "neg_str", "neg_values", "pos_str", "pos_values", "sourceSetName",
    "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel", "hookName", "vectorDefaultSteerStrength",
    "hasVector",
)
ACTIVATION_FIELDS = (
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue", "values",
    "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains", "binMin", "binMax",
)
EXPLANATION_FIELDS = (
    "id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName", "explanationModelName",
    "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity",
)
# Our feature / example / description columns that Neuronpedia has no field for (sidecar).
FEATURE_EXTRAS = (
    "active_count", "mean_activation", "std_activation", "hist_max", "top_logit_ids", "bottom_logit_ids",
    "top_tokens", "top_token_counts", "description", "description_method", "description_model", "embedding_model",
    "vector",
)
EXAMPLE_EXTRAS = ("rank", "token_ids", "doc_id", "context_index")
DESCRIPTION_EXTRAS = (
    "method", "explainer_source", "prompt_version", "created_at", "detection_score", "fuzz_score", "detection_n",
    "fuzz_n", "score_details", "evidence",
)
# A layer in a coder_id: layer_12, layer-12, blocks.3, L15 (not the l0 of average_l0_82).
_LAYER_PART = re.compile(r"(?<![A-Za-z0-9])(?:(?i:layers?|blocks?)[._-]?|L)[0-9]+(?![A-Za-z0-9])")
SOURCE_ID = re.compile(r"^([0-9]+)-(.+)$")  # {layer}-{sourceSetName}


@dataclass
class SourceIds:
    """What a source's rows name it: modelId and source id (`layer`, `{layer}-{set_name}`)."""

    model: str
    source: str
    layer: int
    set_name: str


def model_id_for(model: str) -> str:
    """Neuronpedia's model id for a model name, path or hub id: `google/gemma-2-2b` -> `gemma-2-2b`."""
    name = re.split(r"[/\\]", model.rstrip("/\\"))[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return slug(name) or "model"


def source_set_for(coder_id: str, site: str, width: int) -> str:
    """A source set name from a coder's coder_id without its layer part, else `{site}-{width}`; a
    source imported from Neuronpedia (`{modelId}/{layer}-{set}`) keeps its set name."""
    imported = SOURCE_ID.match(coder_id.rsplit("/", 1)[-1])
    name = imported.group(2) if imported else _LAYER_PART.sub("", coder_id)
    return slug(name) or f"{site}-{width_label(width)}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def width_label(width: int) -> str:
    return f"{width // 1024}k" if width >= 1024 and width % 1024 == 0 else str(width)


def stable_id(*parts: object) -> str:
    """A deterministic cuid-length id, so exporting twice gives the same files."""
    return "fdb" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:22]


def sidecar_path(folder: Path, kind: str, batch_name: str) -> Path:
    """The sidecar file mirroring the batch file `batch_name` of `folder/kind/`."""
    return folder / SIDECAR_DIR / kind / batch_name


def progress_bar(total: int | None, desc: str, enabled: bool):
    """The bar both directions show, counting features."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="feature", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True)
