"""Many coders in one argument: shell-style patterns over a release's SAE ids or a local folder.

    gemma-scope-2-270m-pt-res:layer_*_width_16k_l0_medium     SAE ids of a release (SAELens's names)
    gemma-scope-2-270m-pt-res:*                               every coder of the release
    ./gemma-scope-2-270m-pt/resid_post/*                      sub-folders of a local Gemma Scope 2 repo
    google/gemma-scope-2-270m-pt/transcoder/layer_1?_*        folders of a hub repo the registry lists
    --coders-from FILE                                        one spec (or pattern) a line, # comments

A spec without `*`, `?` or `[` is passed on unchanged. A pattern's coders get ids derived from what
matched: a release's coder its SAE id (prefixed by the release when a run's patterns name several
releases), a folder the id its loader derives (`resid_post-layer_9_width_16k_l0_medium`), prefixed
by the folder the pattern starts from when two patterns would otherwise give one id. The same
pattern over the same files gives the same ids on every run. `@HOOK` after a pattern applies to
every match.
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
from dataclasses import dataclass
from pathlib import Path

from featuredb.errors import CoderError
from featuredb.runtime import registry
from featuredb.runtime.coder_files import clean_id
from featuredb.runtime.coders import looks_like_hub_ref, parse_coder_spec

GLOB_CHARS = frozenset("*?[")
_WEIGHT_FILES = ("params.safetensors", "params.npz", "sae_weights.safetensors", "params_layer_0.safetensors")


@dataclass(frozen=True)
class ExpandedSpec:
    spec: str  # one coder: [ID=]LOCATION[@HOOK]
    pattern: str | None = None  # the pattern it came from (None: given as it is)
    source: str | None = None  # what the pattern named: a release, a folder, a hub repo (prefixes clashing ids)


def is_pattern(location: str) -> bool:
    return any(c in GLOB_CHARS for c in location)


def read_coders_file(path: str) -> list[str]:
    """The specs of a --coders-from file: one a line; blank lines and `#` comments skipped."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CoderError(f"--coders-from {path}: cannot read it ({type(e).__name__}: {e.strerror if isinstance(e, OSError) else e.reason})") from None
    specs = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            specs.append(line)
    if not specs:
        raise CoderError(f"--coders-from {path}: no coder specs in it (one a line, # comments)")
    return specs


def expand_specs(specs: list[str]) -> list[ExpandedSpec]:
    """Every coder the specs name, patterns expanded, in the order given (a coder named twice once)."""
    expanded: list[ExpandedSpec] = []
    for spec in specs:
        coder_id, location, hook = parse_coder_spec(spec)
        if not is_pattern(location):
            expanded.append(ExpandedSpec(spec))
            continue
        if coder_id is not None:
            raise CoderError(f"coder spec {spec!r}: a pattern names several coders, so it cannot take one ID=")
        expanded.extend(_expand_pattern(location, hook))
    releases = {e.source for e in expanded if e.pattern and _is_release_pattern(e.pattern)}
    if len(releases) > 1:  # ids of several releases could clash: prefix each by its release
        expanded = [_prefixed(e) if e.pattern and _is_release_pattern(e.pattern) else e for e in expanded]
    seen, unique = set(), []
    for e in expanded:
        if e.spec not in seen:
            seen.add(e.spec)
            unique.append(e)
    return unique


def _expand_pattern(location: str, hook: str | None) -> list[ExpandedSpec]:
    at = f"@{hook}" if hook is not None else ""
    if _is_release_pattern(location):
        release, _, pattern = location.partition(":")
        table = registry.releases()
        if release not in table:
            raise CoderError(f"unknown release {release!r}{_nearest(release, table)} (`featuredb coders list`)")
        ids = [row[0] for row in table[release]["saes"]]
        matched = [i for i in ids if fnmatch.fnmatchcase(i, pattern)]
        if not matched:
            raise CoderError(f"{location}: no coder of {release} matches {pattern!r}{_nearest(pattern, ids)} "
                             f"({len(ids):,} coders)")
        return [ExpandedSpec(f"{clean_id(i.replace('/', '-'))}={release}:{i}{at}", location, release) for i in matched]
    literal = _literal_root(str(Path(location).expanduser()))
    if location.startswith("hf://") or (not literal.exists() and looks_like_hub_ref(_without_globs(location))):
        return _expand_hub(location, at)
    return _expand_local(location, at)


def _without_globs(text: str) -> str:
    return "".join("x" if c in GLOB_CHARS | {"]"} else c for c in text)


def _is_release_pattern(location: str) -> bool:
    release, colon, _ = location.partition(":")
    return bool(colon) and "/" not in release and not location.startswith("hf://")


def _expand_local(location: str, at: str) -> list[ExpandedSpec]:
    pattern = str(Path(location).expanduser())
    matched = sorted(p for p in glob.glob(pattern) if _holds_coder(Path(p)))
    if not matched:
        root = _literal_root(pattern)
        if not root.is_dir():
            raise CoderError(f"no coder folder matches {location} ({root} does not exist)")
        there = sorted(str(p.relative_to(root)) for p in root.rglob("*") if _holds_coder(p))
        wanted = str(Path(pattern).relative_to(root)) if Path(pattern).is_relative_to(root) else pattern
        raise CoderError(f"no coder folder matches {location}{_nearest(wanted, there) or f' (none in {root})'}")
    source = _literal_root(pattern)
    name = source.parent.name if source.name in registry.SITE_HOOKS or source.name.endswith("_all") else source.name
    return [ExpandedSpec(f"{p}{at}", location, name or "coders") for p in matched]


def _expand_hub(location: str, at: str) -> list[ExpandedSpec]:
    """A hub repo's folders matching the pattern, as the registry lists them (no listing over the network)."""
    parts = location.removeprefix("hf://").strip("/").split("/")
    repo_id, pattern = "/".join(parts[:2]), "/".join(parts[2:])
    folders = sorted({row[1] for entry in registry.releases().values() if entry["repo_id"] == repo_id
                      for row in entry["saes"]})
    if not folders:
        raise CoderError(f"{location}: the registry lists no coders of {repo_id}; give a RELEASE:PATTERN or the "
                         "folders one by one")
    matched = [f for f in folders if fnmatch.fnmatchcase(f, pattern)]
    if not matched:
        raise CoderError(f"no coder folder of {repo_id} matches {pattern!r}{_nearest(pattern, folders)}")
    return [ExpandedSpec(f"{clean_id(f.replace('/', '-'))}={repo_id}/{f}{at}", location, repo_id.split("/")[-1])
            for f in matched]


def _holds_coder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _WEIGHT_FILES)


def _literal_root(pattern: str) -> Path:
    """The folder a pattern starts from: its parts before the first one holding a glob character."""
    parts = Path(pattern).parts
    literal = [p for p in parts[:next((i for i, p in enumerate(parts) if is_pattern(p)), len(parts))]]
    return Path(*literal) if literal else Path(".")


def _prefixed(e: ExpandedSpec) -> ExpandedSpec:
    coder_id, location, hook = parse_coder_spec(e.spec)
    at = f"@{hook}" if hook is not None else ""
    return ExpandedSpec(f"{clean_id(f'{e.source}-{coder_id}')}={location}{at}", e.pattern, e.source)


def prefix_clashing(expanded: list[ExpandedSpec], ids: list[str]) -> list[str]:
    """The coders' ids with those that clash prefixed by their pattern's source where that tells
    them apart (two repos' `resid_post/*`); a clash it cannot resolve is left for the caller to refuse."""
    out = list(ids)
    for coder_id in {i for i in ids if ids.count(i) > 1}:
        at = [k for k, i in enumerate(ids) if i == coder_id]
        sources = [expanded[k].source for k in at]
        if all(sources) and len(set(sources)) == len(sources):
            for k in at:
                out[k] = clean_id(f"{expanded[k].source}-{coder_id}")
    return out


def _nearest(name: str, known) -> str:
    plain = "".join(c for c in name if c not in GLOB_CHARS | {"]"})
    close = difflib.get_close_matches(plain, list(known), n=3, cutoff=0.3)
    return f"; nearest: {', '.join(close)}" if close else ""
