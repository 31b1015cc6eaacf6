#!/usr/bin/env python
"""Steering benchmark: tokens/s of `cat.steer` on a catalogue's subject model (CPU by default).

In one process, on one prompt, each run generating --tokens new tokens (greedy, no stop token, so
every run generates the same number):

    unsteered, KV cache        generate() as cat.steer runs it
    steered, KV cache          the same under the steering hooks of one feature
    steered, no cache          the whole sequence through the model again for every new token
                               (what generation would cost without a cache that works with hooks)
    cat.steer                  the whole call (both texts), as the CLI and the server run it

Rounds alternate the variants, so a change in the machine's load hits them alike; the median of
--rounds is printed with the load average.

    python scripts/bench_steer.py --db /tmp/demo-before/featuredb-demo/catalogue \
        --feature gemma3-270m-res-L15-w2k/861 --tokens 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import featuredb  # noqa: E402
from featuredb.query.model_run import chosen_coders, loaded_coders, model_spec, shared_model  # noqa: E402
from featuredb.runtime.steering import generate, steering  # noqa: E402


def recomputed(model, prompt_ids: list[int], tokens: int) -> list[int]:
    """Greedy without a KV cache: every position through the model again for each new token."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--feature", required=True, help="CODER_ID/INDEX")
    parser.add_argument("--prompt", default="My favourite hobby is")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cat = featuredb.open(args.db)
    coder_id, index = args.feature.rsplit("/", 1)
    started = time.perf_counter()
    coders = chosen_coders(cat.reader, [coder_id])
    shared = shared_model(cat.reader, model_spec(coders, None), args.device)
    coder = loaded_coders(cat.reader, coders, shared.model)[0]
    print(f"model {shared.model.name} on {args.device} ({torch.get_num_threads()} torch threads), "
          f"loaded in {time.perf_counter() - started:.1f} s")
    model = shared.model
    top = float(cat.feature(coder_id, int(index))["max_activation"])
    additions = {hook: top * direction for hook, direction in coder.writes(int(index))}
    prompt_ids = [model.bos_token_id, *shared.token_ids(args.prompt)]
    print(f"prompt {len(prompt_ids)} tokens (BOS included), {args.tokens} new tokens per run")

    def unsteered():
        return generate(model, prompt_ids, tokens=args.tokens)

    def steered():
        with steering(model, additions):
            return generate(model, prompt_ids, tokens=args.tokens)

    def steered_no_cache():
        with steering(model, additions):
            return recomputed(model, prompt_ids, args.tokens)

    def whole_call():
        return cat.steer([f"{args.feature}:1"], args.prompt, tokens=args.tokens)

    variants = {"unsteered, KV cache": (unsteered, 1), "steered, KV cache": (steered, 1),
                "steered, no cache": (steered_no_cache, 1), "cat.steer (both texts)": (whole_call, 2)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.rounds):
        for name, (run, texts) in variants.items():
            started = time.perf_counter()
            outputs[name] = run()
            rates[name].append(texts * args.tokens / (time.perf_counter() - started))
    assert outputs["steered, KV cache"] == outputs["steered, no cache"], "the cache changed the steered tokens"
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    for name, values in rates.items():
        print(f"{name:<24} {statistics.median(values):6.2f} tokens/s  (rounds: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")


if __name__ == "__main__":
    main()
