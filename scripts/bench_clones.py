"""Train the Gemma demo's coders again on its activations and report their held-out quality with clones
counted beside dead features (issue 24): FVE, L0, dead, clones (live features with a live twin of lower
index at decoder cosine > 0.99; pairs), wasted = dead + clones, training time.

`featuredb demo` collects the activations and trains every coder in one step; this script runs the same
code (featuredb.demo.build.collect_activations and train_coder) but keeps the activations in a file, so
the coders can be trained again without the model (a few minutes instead of the whole demo):

    python scripts/bench_clones.py --cache /tmp/acts.pt                  # collect once (~1-2 min), train all
    python scripts/bench_clones.py --cache /tmp/acts.pt --coder gemma3-270m-res-L9-w2k
    python scripts/bench_clones.py --cache /tmp/acts.pt --saved DEMO/coders   # clones of coders already trained

--saved counts the clones of the coders a demo saved (coders/<folder>/params*.safetensors) on the same
held-out tokens, without training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from featuredb.demo.build import (DemoConfig, collect_activations, model_dtype, model_spec, plan_coders,
                                  report_line, train_coder)
from featuredb.demo.jumprelu import JumpReLUCoder, evaluate_jumprelu


def activations(config: DemoConfig, cache: Path | None) -> dict[str, torch.Tensor]:
    """The demo's activations at every planned coder's sites: read from the cache, or collected (and cached)."""
    if cache is not None and cache.exists():
        return torch.load(cache)
    from featuredb.runtime.model import load_model

    hooks = list(dict.fromkeys(h for p in plan_coders(config) for h in p.hooks_in + p.hooks_out))
    model = load_model(model_spec(config), dtype=model_dtype(config))
    started = time.perf_counter()
    acts, _ = collect_activations(model, str(config.corpus), hooks, config.train_tokens + config.eval_tokens,
                                  config.context, dtype=torch.bfloat16, progress=config.progress)
    n = len(acts[hooks[0]])
    print(f"collected {n:,} tokens at {len(hooks)} sites in {time.perf_counter() - started:.0f}s "
          f"({n / (time.perf_counter() - started):,.0f} tokens/s)")
    if cache is not None:
        torch.save(acts, cache)
    return acts


def saved_coder(folder: Path, plan) -> JumpReLUCoder:
    """A coder the demo saved in Gemma Scope 2's layout, read back as a JumpReLUCoder (for evaluation)."""
    files = sorted(folder.glob("params*.safetensors"))
    slots = [load_file(str(f)) for f in files]
    n_out = len(plan.hooks_out)
    w_dec = torch.stack([s["w_dec"].float().reshape(s["w_dec"].shape[0], n_out, -1) for s in slots])
    b_dec = torch.stack([s["b_dec"].float() for s in slots]) if len(slots) == n_out else slots[0]["b_dec"][None].float()
    return JumpReLUCoder(kind=plan.kind, hooks_in=plan.hooks_in, hooks_out=plan.hooks_out,
                         w_enc=torch.stack([s["w_enc"].float() for s in slots]),
                         b_enc=torch.stack([s["b_enc"].float() for s in slots]),
                         threshold=torch.stack([s["threshold"].float() for s in slots]), w_dec=w_dec, b_dec=b_dec,
                         affine_skip=slots[0]["affine_skip_connection"].float() if "affine_skip_connection" in slots[0] else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="featuredb-demo", help="the demo's folder (its corpus.jsonl is read)")
    p.add_argument("--cache", default=None, help="activations file: written after collecting, read if present")
    p.add_argument("--coder", action="append", default=None, help="only this coder id (repeatable)")
    p.add_argument("--saved", default=None, help="evaluate the coders saved under this folder instead of training")
    p.add_argument("--json", default=None, help="write the reports here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()

    config = DemoConfig(out=Path(args.demo), progress=not args.quiet)
    acts = activations(config, Path(args.cache) if args.cache else None)
    n = len(next(iter(acts.values())))
    split = min(config.train_tokens, n - 1000)  # as train_gemma_scope_coders splits
    plans = [plan for plan in plan_coders(config) if not args.coder or plan.coder_id in args.coder]
    reports = []
    for plan in plans:
        if args.saved:
            folder = Path(args.saved) / plan.folder.relative_to(config.coders_dir)
            coder = saved_coder(folder, plan)
            ys = None if plan.kind not in ("transcoder", "clt") else [acts[h][split:] for h in plan.hooks_out]
            held = evaluate_jumprelu(coder, [acts[h][split:] for h in plan.hooks_in], ys)
            report = dict(coder_id=plan.coder_id, width=held.features, fve=held.fve, fve_per_slot=held.fve_per_slot,
                          l0=held.l0, dead_share=held.dead_share, clone_pairs=held.clone_pairs, clones=held.clones,
                          wasted_share=held.wasted_share, held_out_tokens=held.tokens)
            print(f"{plan.coder_id} (saved): FVE {held.fve:.3f}, L0 {held.l0:.1f}, dead {held.dead_share:.1%}, "
                  f"clones {held.clone_share:.1%} ({held.clone_pairs:,} pairs), wasted {held.wasted_share:.1%}")
        else:
            _, report = train_coder(config, plan, acts, split)
            print(f"{plan.coder_id}: {report_line(report)}", flush=True)
        reports.append(report)

    print(f"\n{'coder':<36} {'FVE':>6} {'L0':>6} {'dead':>6} {'clones':>7} {'pairs':>6} {'wasted':>7} {'train s':>8}")
    for r in reports:
        print(f"{r['coder_id']:<36} {r['fve']:>6.3f} {r['l0']:>6.1f} {r['dead_share']:>6.1%} "
              f"{r['clones'] / r['width']:>7.1%} {r['clone_pairs']:>6,} {r['wasted_share']:>7.1%} "
              f"{r.get('train_seconds', float('nan')):>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
