"""Steering: generate from a prompt with vectors added to the model's activations at hook sites.

    with steering(model, {"model.layers.9.output": vector}):
        ids = generate(model, prompt_ids, tokens=32)

`steering` adds each vector to the activation at its site (featuredb.runtime.hooks naming) in
every forward pass, at every position: a site read as a module's output is changed by a forward
hook, one read as a module's input by a forward pre-hook, so everything downstream sees the
changed activation. A `normalized_input` site is what a coder reads, never what the model passes
on, so nothing can be added there.

`generate` keeps a KV cache: the prompt's keys and values are computed from steered activations,
and each new token's pass adds the vectors again at its one new position, so a cached run is the
same as recomputing the whole sequence with the vectors at every position (tested). Greedy by
default; with a temperature it samples with a seeded generator of its own, so two runs with the
same seed draw the same random numbers.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor

from featuredb.errors import HookError, ModelError
from featuredb.runtime.hooks import parse_hook
from featuredb.runtime.model import SubjectModel


@contextmanager
def steering(model: SubjectModel, additions: Mapping[str, Tensor]) -> Iterator[None]:
    """While the block runs, every forward pass of `model` adds `additions[hook]` ([d]) to the
    activation at `hook`, at every position (see the module doc)."""
    handles = []
    try:
        for hook, vector in additions.items():
            site = parse_hook(hook)
            if site.point == "normalized_input":
                raise HookError(f"hook {site.name!r} is a norm's normalised input, which the model never passes on: "
                                "nothing can be added there")
            if vector.ndim != 1:
                raise HookError(f"hook {site.name!r}: a steering vector must be 1-D, got shape {tuple(vector.shape)}")
            module = model.module_at(site)
            vector = vector.detach().to(model.device)
            if site.point == "output":
                handles.append(module.register_forward_hook(_add_to_output(site.name, vector)))
            else:
                handles.append(module.register_forward_pre_hook(_add_to_input(site.name, vector), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _added(value: Tensor, vector: Tensor, hook: str) -> Tensor:
    if value.shape[-1] != vector.shape[0]:
        raise HookError(f"hook {hook!r}: the activation has width {value.shape[-1]}, the steering vector "
                        f"{vector.shape[0]}")
    return value + vector.to(value.dtype)


def _add_to_output(hook: str, vector: Tensor):
    def add(_module, _args, output):
        # transformers 5.x decoder layers return a tensor; 4.x layers and attention blocks return tuples
        if isinstance(output, Tensor):
            return _added(output, vector, hook)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (_added(output[0], vector, hook), *output[1:])
        raise HookError(f"hook {hook!r}: module output is {type(output).__name__}, not a tensor")

    return add


def _add_to_input(hook: str, vector: Tensor):
    def add(_module, args, kwargs):
        if args and isinstance(args[0], Tensor):
            return (_added(args[0], vector, hook), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), Tensor):
            return args, {**kwargs, "hidden_states": _added(kwargs["hidden_states"], vector, hook)}
        raise HookError(f"hook {hook!r}: module received no tensor input")

    return add


def stop_token_ids(model: SubjectModel) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's own (Gemma's <end_of_turn>)."""
    ids = {model.model.generation_config.eos_token_id, model.model.config.get_text_config().eos_token_id,
           model.tokenizer.eos_token_id}
    found: set[int] = set()
    for value in ids:
        found.update([value] if isinstance(value, int) else (value or []))
    return found


def generate(model: SubjectModel, prompt_ids: list[int], *, tokens: int, temperature: float = 0.0, seed: int = 0,
             stop_ids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Up to `tokens` new token ids after `prompt_ids` (BOS included), stopping before a stop id.
    Greedy at temperature 0, else sampled from softmax(logits / temperature) with `seed`."""
    if not prompt_ids:
        raise ModelError("generation needs at least one prompt token")
    generator = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    cache_keyword = _cache_keyword(model.model)
    new: list[int] = []
    with torch.inference_mode():
        step_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
        cache = None
        while len(new) < tokens:
            out = model.model(input_ids=step_ids, use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
            cache = out[cache_keyword] if cache_keyword in out else out["past_key_values"]
            token = _next_token(out.logits[0, -1], temperature, generator)
            if token in stop_ids:
                break
            new.append(token)
            step_ids = torch.tensor([[token]], dtype=torch.long, device=model.device)
    return new


def _cache_keyword(model) -> str:
    """transformers >= 5.2x names the KV cache `cache` (in and out); before, `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_token(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
