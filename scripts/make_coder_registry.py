"""Write featuredb's offline registry of Gemma Scope release names from SAELens's own registry.

    pip download --no-deps sae-lens -d /tmp/sae-lens && python scripts/make_coder_registry.py /tmp/sae-lens/sae_lens-*.whl
    python scripts/make_coder_registry.py path/to/pretrained_saes.yaml

Reads `sae_lens/pretrained_saes.yaml` (from a wheel, or the file itself) and keeps every release
whose name starts with `gemma-scope` (Gemma Scope for Gemma 2, Gemma Scope 2 for Gemma 3): its hub
repo, subject model and, per SAE id, the folder in the repo, the Neuronpedia source and the L0.
The result, featuredb/runtime/gemma_scope_registry.json.gz, ships as package data and is read by
featuredb.runtime.registry; nothing else of SAELens is used or needed at run time.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "featuredb" / "runtime" / "gemma_scope_registry.json.gz"
MEMBER = "sae_lens/pretrained_saes.yaml"


def read_yaml(source: Path) -> tuple[dict, str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            return yaml.safe_load(wheel.read(MEMBER)), source.name
    return yaml.safe_load(source.read_text()), source.name


def gemma_scope_releases(registry: dict) -> dict:
    releases = {}
    for release, entry in sorted(registry.items()):
        if not release.startswith("gemma-scope"):
            continue
        releases[release] = {
            "repo_id": entry["repo_id"],
            "model": entry["model"],
            "conversion": entry.get("conversion_func"),
            "saes": [[sae["id"], sae["path"], sae.get("neuronpedia"), sae.get("l0")] for sae in entry["saes"]],
        }
    return releases


def main(source: str, out: Path = OUT) -> None:
    registry, origin = read_yaml(Path(source))
    releases = gemma_scope_releases(registry)
    payload = {"source": origin, "releases": releases}
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime 0: the same input writes the same bytes
        f.write(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    count = sum(len(r["saes"]) for r in releases.values())
    print(f"{len(releases)} releases, {count:,} coders from {origin} -> {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python scripts/make_coder_registry.py SAE_LENS_WHEEL_OR_PRETRAINED_SAES_YAML [OUT]")
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else OUT)
