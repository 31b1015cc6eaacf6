"""Memory of indexing a cross-layer transcoder of Gemma 3 1B's shape: the decoder stays on disk.

A Gemma Scope 2 CLT for Gemma 3 1B has 26 slots of 10,080 features (width 262,080): encoders
26 x 1152 x 10,080 floats (1.2 GB) and a decoder of 26 x 10,080 x 26 x 1152 floats (31 GB). This
writes one with random encoders in the exact layout (config.json + params_layer_{i}.safetensors),
its w_dec stored last in each file as a sparse hole (zeros that take no disk), builds a random
model of Gemma 3 1B's shape (vocabulary cut to 4,096: the CLT's memory does not depend on it), and
streams a few batches through `featuredb index` on the CPU, in a fresh process each time:

    baseline   the model alone, loaded and run over the same batches
    stream     the model + the CLT, indexed batch by batch (stopped before the catalogue is written:
               the logit tables and neighbours of 262k features are the write's, not the stream's)

and prints the peak resident memory of each against the encoders', the decoder's and the
statistics' sizes.

    python scripts/bench_clt_memory.py [--batches 3] [--batch-size 4] [--context 64] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, D_MODEL, PER_SLOT = 26, 1152, 10_080
VOCAB = 4096


def write_clt(folder: Path, seed: int = 0) -> None:
    """The CLT folder; each file's w_enc, b_enc, threshold and b_dec are real random numbers, its
    w_dec a hole at the end of the file (safetensors allows any data order: offsets say where)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for slot in range(LAYERS):
        w_enc = (rng.standard_normal((D_MODEL, PER_SLOT), dtype=np.float32) / np.sqrt(D_MODEL)).astype(np.float32)
        b_enc = np.zeros(PER_SLOT, np.float32)
        threshold = np.full(PER_SLOT, 2.5, np.float32)  # ~0.6% of unit-scale pre-activations pass
        b_dec = np.zeros(D_MODEL, np.float32)
        dense = {"w_enc": w_enc, "b_enc": b_enc, "threshold": threshold, "b_dec": b_dec}
        header, offset = {}, 0
        for name, array in dense.items():
            header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        w_dec_bytes = PER_SLOT * LAYERS * D_MODEL * 4
        header["w_dec"] = {"dtype": "F32", "shape": [PER_SLOT, LAYERS, D_MODEL],
                           "data_offsets": [offset, offset + w_dec_bytes]}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / f"params_layer_{slot}.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for array in dense.values():
                f.write(array.tobytes())
            f.truncate(f.tell() + w_dec_bytes)  # the decoder: a hole, read back as zeros
    config = {"hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output",
              "width": LAYERS * PER_SLOT, "model_name": "google/gemma-3-1b-pt", "architecture": "jump_relu",
              "l0": 100, "affine_connection": False, "type": "clt"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_model(folder: Path) -> None:
    """A random Gemma 3 of 1B's shape (26 layers, d 1152, MLP 6912, 4 query heads x 256, 1 KV head)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer  # a small real tokenizer, offline

    tokenizer = build_tokenizer(vocab_size=VOCAB)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=6912,
                              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                              query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_corpus(path: Path, n_docs: int = 200) -> None:
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while numbers like 42 and 7 filled the wall of the house".split()
    with path.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words, 200))}) + "\n")


class Stop(Exception):
    pass


def phase(name: str, work: Path, batches: int, batch_size: int, context: int) -> None:
    """Run in a fresh process: one phase, then print its peak RSS as JSON."""
    import torch

    from featuredb.indexer.run import IndexConfig, batches as make_batches, run_index
    from featuredb.indexer.corpus import iter_windows
    from featuredb.indexer.stats import StatsConfig
    from featuredb.runtime.model import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    stats = StatsConfig(top_k=8, hist_bins=16, interval_bins=8, interval_per_bin=1)
    started = time.perf_counter()
    if name == "baseline":
        model = load_model(str(work / "model"), device=torch.device("cpu"), dtype=torch.float32)
        windows = iter_windows(str(work / "corpus.jsonl"), model.tokenizer, model.bos_token_id, context)
        hooks = [f"model.layers.{layer}.pre_feedforward_layernorm.output" for layer in range(LAYERS)]
        for i, batch in enumerate(make_batches(windows, batch_size, context, model.pad_token_id, None, 0)):
            if i == batches:
                break
            model.capture(batch.input_ids, batch.attention_mask, hooks)
    else:
        def stop_after(n: int) -> None:
            if n == batches:
                raise Stop

        config = IndexConfig(model=str(work / "model"), coders=[str(work / "clt")], corpus=str(work / "corpus.jsonl"),
                             db=str(work / "db"), context=context, batch_size=batch_size, stats=stats, progress=False,
                             device="cpu", dtype="float32")
        try:
            run_index(config, on_batch=stop_after)
        except Stop:
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"phase": name, "peak_bytes": peak, "seconds": time.perf_counter() - started}))


def run_phase(name: str, args: argparse.Namespace, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--work", str(work), "--batches",
                          str(args.batches), "--batch-size", str(args.batch_size), "--context", str(args.context)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="where the CLT and model go (default: a temp dir)")
    parser.add_argument("--phase", choices=["baseline", "stream"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase(args.phase, args.work, args.batches, args.batch_size, args.context)
        return

    from featuredb.indexer.stats import StatsConfig, state_bytes

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-clt-"))
    if not (work / "clt" / "config.json").exists():
        t = time.perf_counter()
        write_clt(work / "clt")
        print(f"wrote the CLT in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not (work / "model" / "config.json").exists():
        t = time.perf_counter()
        write_model(work / "model")
        print(f"wrote the model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    write_corpus(work / "corpus.jsonl")
    on_disk = sum(p.stat().st_blocks * 512 for p in (work / "clt").iterdir())
    apparent = sum(p.stat().st_size for p in (work / "clt").iterdir())

    baseline = run_phase("baseline", args, work)
    stream = run_phase("stream", args, work)
    gib = 1 << 30
    encoders = LAYERS * (D_MODEL * PER_SLOT + 2 * PER_SLOT) * 4
    decoder = LAYERS * PER_SLOT * LAYERS * D_MODEL * 4
    stats = state_bytes(LAYERS * PER_SLOT, args.context, StatsConfig(top_k=8, hist_bins=16, interval_bins=8,
                                                                     interval_per_bin=1))
    batch = args.batch_size * args.context * LAYERS * PER_SLOT * 4
    extra = stream["peak_bytes"] - baseline["peak_bytes"]
    print(f"CLT of Gemma 3 1B shape: {LAYERS} x {PER_SLOT:,} features (width {LAYERS * PER_SLOT:,}); "
          f"files {apparent / gib:.1f} GiB apparent, {on_disk / gib:.2f} GiB on disk")
    print(f"encoders {encoders / gib:.2f} GiB   decoder {decoder / gib:.1f} GiB (never loaded)   "
          f"statistics state {stats / gib:.2f} GiB   one batch of activations {batch / gib:.2f} GiB")
    print(f"peak RSS: model alone {baseline['peak_bytes'] / gib:.2f} GiB ({baseline['seconds']:.0f} s), "
          f"model + CLT streaming {args.batches} batches of {args.batch_size} x {args.context} tokens "
          f"{stream['peak_bytes'] / gib:.2f} GiB ({stream['seconds']:.0f} s)")
    print(f"the CLT's share: {extra / gib:.2f} GiB = {extra / encoders:.2f} x its encoders, "
          f"{extra / (encoders + stats + batch):.2f} x encoders + statistics + one batch, "
          f"{extra / decoder:.3f} x its decoder")


if __name__ == "__main__":
    main()
