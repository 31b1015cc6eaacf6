"""Steering: what a feature does. Generate from a prompt twice, as the model would and with
features turned up, and compare.

    cat.steer(["gemma3-270m-res-L9-w2k/123:4"], "I went to the", tokens=32).to_dict()

Each feature adds its decoder direction to the model at the sites it writes to, at every position
(prompt and generated), scaled by `strength` x its max activation in the catalogue: strength 1
adds what the feature writes at its strongest, so strengths compare across coders. The sites are
the coder's own (`writes` of featuredb.runtime.coders / multilayer): a residual SAE adds to the
residual stream at its layer, a transcoder or skip transcoder to its output site (the MLP output),
a CLT or crosscoder each output layer's decoder slice at that layer. (A crosscoder's layers are
residual streams, which accumulate: a deeper slice is added on top of what the shallower ones
already changed there.) Several features' vectors at one site add up.

Greedy by default, so the two texts differ only by the steering; with a temperature both runs
sample with the same seed. The model and coders are the Reader's cached ones (model_run), and
both generations hold the shared model alone (`SharedModel.alone`), so they are serialised with
every other forward pass of the server.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featuredb.errors import FeaturedbError, NotFound, QueryError, TooLarge, one_line
from featuredb.query.builder import check_text
from featuredb.query.feature_view import feature_index
from featuredb.query.fires_on import MAX_TEXT_CHARS, text_token_ids
from featuredb.query.model_run import chosen_coders, loaded_coders, model_spec, shared_model

if TYPE_CHECKING:
    from featuredb.query.reader import Reader

DEFAULT_TOKENS = 32
MAX_NEW_TOKENS = 128  # two generations of this many tokens stay interactive on a CPU
MAX_FEATURES = 8
MAX_STRENGTH = 1000.0  # |strength|: in units of the feature's max activation
MAX_TEMPERATURE = 10.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SteerFeature:
    """One feature to turn up (or, with a negative strength, down)."""

    coder_id: str
    feature: int
    strength: float = 1.0  # in units of the feature's max activation in the catalogue


def parse_ref(ref: object) -> SteerFeature:
    """`CODER_ID/INDEX[:STRENGTH]` (the coder_id may itself hold '/' or ':'), a SteerFeature, a
    (coder_id, index[, strength]) tuple or a {"coder_id", "feature"[, "strength"]} dict."""
    if isinstance(ref, SteerFeature):
        return SteerFeature(ref.coder_id, ref.feature, _strength(ref.strength, ref))
    if isinstance(ref, dict):
        unknown = set(ref) - {"coder_id", "feature", "strength"}
        if unknown or not {"coder_id", "feature"} <= set(ref):
            raise QueryError(f"a steered feature is {{'coder_id', 'feature'[, 'strength']}}, got keys {sorted(ref)}")
        return SteerFeature(_coder_id(ref["coder_id"]), _index(ref["feature"]), _strength(ref.get("strength", 1.0), ref))
    if isinstance(ref, (tuple, list)) and len(ref) in (2, 3):
        strength = ref[2] if len(ref) == 3 else 1.0
        return SteerFeature(_coder_id(ref[0]), _index(ref[1]), _strength(strength, ref))
    if not isinstance(ref, str):
        raise QueryError(f"expected CODER_ID/INDEX[:STRENGTH], got {ref!r}")
    coder_id, slash, tail = ref.strip().rpartition("/")
    index, colon, strength = tail.partition(":")
    if not slash or not coder_id or not index.strip().isdigit() or (colon and not strength.strip()):
        raise QueryError(f"expected CODER_ID/INDEX[:STRENGTH] (e.g. res-layer_12/123:4), got {ref!r}")
    try:
        value = float(strength) if colon else 1.0
    except ValueError:
        raise QueryError(f"{ref!r}: strength {strength!r} is not a number") from None
    return SteerFeature(coder_id, int(index), _strength(value, ref))


def _coder_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise QueryError(f"coder_id must be a non-empty string, got {value!r}")
    return value


def _index(value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise QueryError(f"feature index must be an integer >= 0, got {value!r}")
    return int(value)


def _strength(value: object, ref: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
            or abs(value) > MAX_STRENGTH:
        raise QueryError(f"{ref!r}: strength must be a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}, "
                         f"got {value!r}")
    return float(value)


@dataclass
class Steered:
    """Result of Catalogue.steer: the prompt's two continuations.

    features: each steered feature: coder_id, feature, strength, max_activation, description, kind,
        and `writes`, where its vector (strength x max_activation x decoder direction) is added:
        [{"hook", "norm"}].
    tokens_per_second: generated tokens (both texts) per second of generation.
    """

    model: str
    prompt: str
    prompt_tokens: int  # BOS not counted
    tokens: int  # the most new tokens each text may have
    temperature: float
    seed: int
    unsteered: str
    steered: str
    unsteered_ids: list[int]
    steered_ids: list[int]
    features: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "unsteered": self.unsteered, "steered": self.steered,
                "features": self.features, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "tokens": self.tokens, "temperature": self.temperature, "seed": self.seed,
                "unsteered_ids": self.unsteered_ids, "steered_ids": self.steered_ids,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second}


def steer(reader: Reader, features: list, prompt: str, *, tokens: int = DEFAULT_TOKENS, temperature: float = 0.0,
          seed: int = 0, device: str | None = None, model: str | None = None) -> Steered:
    """Every input is checked before the model loads (see the module doc for what is added where)."""
    chosen = _check_features(features)
    prompt = check_text(prompt, "prompt", MAX_TEXT_CHARS)
    tokens, temperature, seed = _check_options(tokens, temperature, seed)
    rows = _feature_rows(reader, chosen)
    coders = chosen_coders(reader, sorted({f.coder_id for f in chosen}))
    spec = model_spec(coders, model)
    reader.check_loadable(coders, explicit_model=model)

    shared = shared_model(reader, spec, device)
    token_ids = text_token_ids(shared, prompt, "prompt", too_long=TooLarge)
    loaded = {coder.coder_id: coder for coder in loaded_coders(reader, coders, shared.model)}
    additions, described = _additions(chosen, rows, loaded)

    prompt_ids = [shared.model.bos_token_id, *token_ids]
    with shared.alone() as subject:
        started = time.perf_counter()
        unsteered = _generate(subject, prompt_ids, {}, tokens, temperature, seed)
        steered = _generate(subject, prompt_ids, additions, tokens, temperature, seed)
        seconds = time.perf_counter() - started
    generated = len(unsteered) + len(steered)
    return Steered(model=spec, prompt=prompt, prompt_tokens=len(token_ids), tokens=tokens, temperature=temperature,
                   seed=seed, unsteered=shared.text(unsteered), steered=shared.text(steered), unsteered_ids=unsteered,
                   steered_ids=steered, features=described, seconds=seconds,
                   tokens_per_second=generated / seconds if seconds > 0 else 0.0)


def _generate(subject, prompt_ids: list[int], additions: dict, tokens: int, temperature: float, seed: int) -> list[int]:
    """New token ids after the prompt, with `additions` ({hook: vector}) added while generating."""
    from featuredb.runtime.steering import generate, steering, stop_token_ids

    try:
        with steering(subject, additions):
            return generate(subject, prompt_ids, tokens=tokens, temperature=temperature, seed=seed,
                            stop_ids=stop_token_ids(subject))
    except FeaturedbError:
        raise  # a HookError names the hook
    except Exception as e:  # torch errors: one line for the user
        raise QueryError(f"generation failed: {one_line(e)}") from None


def _check_features(features: object) -> list[SteerFeature]:
    if isinstance(features, (str, dict, SteerFeature)):
        features = [features]
    if not isinstance(features, (list, tuple)) or not features:
        raise QueryError("name at least one feature to steer with (CODER_ID/INDEX[:STRENGTH])")
    if len(features) > MAX_FEATURES:
        raise QueryError(f"{len(features)} features to steer with; at most {MAX_FEATURES}")
    return [parse_ref(ref) for ref in features]


def _check_options(tokens: object, temperature: object, seed: object) -> tuple[int, float, int]:
    if not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_NEW_TOKENS:
        raise QueryError(f"tokens must be an integer between 1 and {MAX_NEW_TOKENS}, got {tokens!r}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or not 0 <= temperature <= MAX_TEMPERATURE:
        raise QueryError(f"temperature must be a number between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise QueryError(f"seed must be an integer between 0 and 2**63 - 1, got {seed!r}")
    return int(tokens), float(temperature), int(seed)


def _feature_rows(reader: Reader, chosen: list[SteerFeature]) -> dict[tuple[str, int], dict]:
    """The stored max_activation and description of each chosen feature; NotFound for an
    unknown coder or feature, QueryError for one that never fired (no max to scale by)."""
    for f in chosen:
        feature_index(f.feature, reader.coder_row(f.coder_id))
    keys = sorted({(f.coder_id, f.feature) for f in chosen})
    frame = reader.feature_rows(keys, ["coder_id", "feature", "max_activation", "description"])
    rows = {(r["coder_id"], r["feature"]): r for r in frame.iter_rows(named=True)}
    for key in keys:
        if key not in rows:
            raise NotFound(f"feature {key[0]}/{key[1]} is not stored in the catalogue")
        top = rows[key]["max_activation"]
        if top is None or not math.isfinite(top) or top <= 0:
            raise QueryError(f"feature {key[0]}/{key[1]} never fired while indexing (max activation {top}): "
                             "there is no strength to scale its direction by")
    return rows


def _additions(chosen: list[SteerFeature], rows: dict, loaded: dict) -> tuple[dict, list[dict]]:
    """{hook: summed vector} over the chosen features, and each feature as the result lists it."""
    import torch

    additions: dict[str, torch.Tensor] = {}
    described = []
    for f in chosen:
        row, coder = rows[(f.coder_id, f.feature)], loaded[f.coder_id]
        scale = f.strength * float(row["max_activation"])
        writes = []
        for hook, direction in coder.writes(f.feature):
            vector = scale * direction.detach().float().cpu()
            additions[hook] = additions[hook] + vector if hook in additions else vector
            writes.append({"hook": hook, "norm": float(vector.norm())})
        described.append({"coder_id": f.coder_id, "feature": f.feature, "strength": f.strength,
                          "max_activation": float(row["max_activation"]), "description": row["description"],
                          "kind": coder.kind, "writes": writes})
    return additions, described


__all__ = ["Steered", "SteerFeature", "parse_ref", "steer", "DEFAULT_TOKENS", "MAX_NEW_TOKENS", "MAX_FEATURES"]
