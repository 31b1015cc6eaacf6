"""`featuredb demo`: a real, searchable catalogue from scratch, offline, on a laptop CPU.

1. corpus: Python's own reference docs, docstrings and source (featuredb.demo.corpus);
2. subject model: Gemma 3 270M by default, its GGUF converted once into featuredb's cache
   (featuredb.demo.subject); `--subject smollm2` keeps the SmolLM2-135M demo;
3. coders, trained here on activations collected in one forward pass over the corpus:
   - Gemma 3: JumpReLU coders trained as Gemma Scope trains them (featuredb.demo.jumprelu), saved in
     Gemma Scope 2's own layout (featuredb.demo.gemma_scope_format): SAEs on the residual stream at
     three layers, an affine skip transcoder at the middle one, a crosscoder over the three SAE
     layers, and with --clt a small cross-layer transcoder over every layer; a Gemma Scope 2 coder
     for this model can take the place of any of them;
   - SmolLM2 (no published SAEs): TopK SAEs (featuredb.demo.train) in SAELens's format;
4. index: the normal `featuredb index` path loads those files through the normal coder loader;
5. describe: the offline `tokens` explainer labels every feature, MiniLM embeds the labels;
6. search indexes, then what to try next.

Every step leaves its result on disk and is skipped when that result is already there (each coder
on its own), so a second `featuredb demo` is fast and an interrupted one continues where it stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import click
import torch

from featuredb.demo.corpus import write_demo_corpus
from featuredb.demo.gemma_scope_format import gemma_scope_folder, save_gemma_scope_2, width_tag
from featuredb.demo.jumprelu import JumpReLUCoder, JumpReLUConfig, evaluate_jumprelu, train_jumprelu
from featuredb.demo.subject import HUB_ID, SUBJECT_NAME, check_dtype, default_layers, gemma3_270m_folder
from featuredb.demo.train import TrainConfig, evaluate, save_saelens, train_topk_sae
from featuredb.errors import ModelError
from featuredb.indexer.corpus import iter_windows
from featuredb.indexer.run import IndexConfig, batches, run_index
from featuredb.runtime.device import cpu_has_fast_bf16
from featuredb.runtime.model import SubjectModel, load_model, smollm2_gguf_path

@dataclass(frozen=True)
class Subject:
    """What the demo runs on, and the names its coders get."""

    key: str  # --subject
    title: str  # for people: "Gemma 3 270M"
    short: str  # in coder ids: gemma3-270m-res-L9-w4k
    model_name: str  # the model written into the coders' configs
    coder_format: str  # "gemma-scope-2" (JumpReLU) | "saelens" (TopK)
    layers: tuple[int, ...]  # default residual-stream layers
    n_layers: int  # the model's depth (a CLT reads every layer)
    width: int  # features per single-layer coder
    train_tokens: int  # defaults sized so the whole demo takes minutes on a 2-core CPU
    tokens: int  # indexed
    epochs: float
    batch_size: int  # training tokens per step


SUBJECTS = {
    "gemma3": Subject("gemma3", "Gemma 3 270M", SUBJECT_NAME, HUB_ID, "gemma-scope-2", tuple(default_layers(18)), 18,
                      width=2048, train_tokens=100_000, tokens=100_000, epochs=2.0, batch_size=512),
    # the SmolLM2 demo as it was (its figures in docs/benchmarks.md are for these settings)
    "smollm2": Subject("smollm2", "SmolLM2-135M-Instruct", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct",
                       "saelens", (3, 15, 27), 30, width=4096, train_tokens=200_000, tokens=200_000, epochs=2.0,
                       batch_size=1024),
}


@dataclass
class DemoConfig:
    out: Path = Path("featuredb-demo")
    subject: str = "gemma3"  # a key of SUBJECTS
    model: str | None = None  # default: the subject's packaged weights
    layers: list[int] | None = None  # residual-stream layers; default: the subject's (they follow its depth)
    width: int | None = None  # features per single-layer coder; default: the subject's
    k: int = 32  # TopK (smollm2)
    l0: float = 60.0  # JumpReLU L0 target of an SAE and the transcoder (Gemma Scope 2 270M "medium": 60)
    transcoder: bool = True  # an affine skip transcoder at the middle layer (gemma3)
    crosscoder: bool = True  # a crosscoder over the SAE layers (gemma3)
    crosscoder_width: int = 1024  # features per layer of the crosscoder
    clt: bool = False  # a cross-layer transcoder over every layer (gemma3)
    clt_width: int = 512  # features per layer of the CLT
    clt_l0: float = 8.0  # its L0 target per layer (18 x 8 = 144 for Gemma 3 270M)
    train_tokens: int | None = None  # default: the subject's
    eval_tokens: int | None = None  # held out; default: a tenth of train_tokens, at least 2,048
    tokens: int | None = None  # indexed tokens; default: the subject's
    context: int = 128
    epochs: float | None = None  # passes over the training tokens; default: the subject's
    batch_size: int | None = None  # training tokens per step; default: the subject's
    bandwidth: float = 0.3  # JumpReLU kernel width (gemma3): measured best for these sizes (demo/jumprelu.py doc)
    lr: float = 2e-3  # TopK (smollm2)
    outlier_ratio: float = 10.0  # train and index without massive-activation tokens (norm > ratio x median)
    dtype: str | None = None  # model dtype; default bfloat16 where the CPU has fast bf16, else float32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.subject not in SUBJECTS:
            raise ModelError(f"unknown demo subject {self.subject!r}: choose {' or '.join(SUBJECTS)}")
        spec = SUBJECTS[self.subject]
        if self.clt and spec.coder_format != "gemma-scope-2":
            raise ModelError(f"--clt trains a Gemma Scope 2 CLT: it needs --subject gemma3, not {self.subject}")
        self.width = self.width or spec.width
        self.train_tokens = self.train_tokens or spec.train_tokens
        self.eval_tokens = self.eval_tokens or max(2048, self.train_tokens // 10)
        self.tokens = self.tokens or spec.tokens
        self.epochs = self.epochs or spec.epochs
        self.batch_size = self.batch_size or spec.batch_size

    @property
    def spec(self) -> Subject:
        return SUBJECTS[self.subject]

    @property
    def corpus(self) -> Path:
        return self.out / "corpus.jsonl"

    @property
    def coders_dir(self) -> Path:
        return self.out / ("coders" if self.spec.coder_format == "gemma-scope-2" else "saes")

    @property
    def db(self) -> Path:
        return self.out / "catalogue"

    @property
    def layer_list(self) -> list[int]:
        return list(self.layers) if self.layers else list(self.spec.layers)

    def sae_dir(self, layer: int) -> Path:  # smollm2's TopK SAEs
        return self.coders_dir / f"{self.spec.short}-res-L{layer}-w{self.width}-k{self.k}"


def default_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() or cpu_has_fast_bf16() else torch.float32


# --- the coders a run trains (gemma3) ---------------------------------------------------------------


@dataclass
class CoderPlan:
    """One coder to train: what it reads and writes, where it is saved, its id in the catalogue."""

    kind: str  # "sae" | "transcoder" | "crosscoder" | "clt"
    hooks_in: list[str]
    hooks_out: list[str]
    width: int  # features per slot
    l0: float  # target, all slots together
    folder: Path  # in Gemma Scope 2's layout, under config.coders_dir
    coder_id: str

    @property
    def saved(self) -> bool:
        return (self.folder / "config.json").exists()

    @property
    def index_spec(self) -> str:  # [ID=]PATH, as `featuredb index --coder` takes it
        return f"{self.coder_id}={self.folder}"


def residual(layer: int) -> str:
    return f"model.layers.{layer}.output"


def plan_coders(config: DemoConfig) -> list[CoderPlan]:
    """SAEs at every layer, the skip transcoder at the middle one, the crosscoder over all of them, and
    the CLT over every layer of the model."""
    layers, short, root = config.layer_list, config.spec.short, config.coders_dir
    plans = []
    for layer in layers:
        hooks = [residual(layer)]
        plans.append(CoderPlan("sae", hooks, hooks, config.width, config.l0,
                               root / gemma_scope_folder("sae", hooks, config.width),
                               f"{short}-res-L{layer}-w{width_tag(config.width)}"))
    if config.transcoder:
        mid = layers[len(layers) // 2]
        hook_in = f"model.layers.{mid}.pre_feedforward_layernorm.output"
        hook_out = f"model.layers.{mid}.post_feedforward_layernorm.output"
        plans.append(CoderPlan("transcoder", [hook_in], [hook_out], config.width, config.l0,
                               root / gemma_scope_folder("transcoder", [hook_in], config.width, affine=True),
                               f"{short}-transcoder-L{mid}-w{width_tag(config.width)}"))
    if config.crosscoder and len(layers) > 1:
        hooks = [residual(layer) for layer in layers]
        total = config.crosscoder_width * len(layers)
        # the same sparsity per layer as an SAE, over all its layers together
        plans.append(CoderPlan("crosscoder", hooks, hooks, config.crosscoder_width, config.l0 * len(layers),
                               root / gemma_scope_folder("crosscoder", hooks, total),
                               f"{short}-crosscoder-L{'_'.join(map(str, layers))}-w{width_tag(total)}"))
    if config.clt:
        n = config.spec.n_layers
        hooks_in = [f"model.layers.{layer}.pre_feedforward_layernorm.output" for layer in range(n)]
        hooks_out = [f"model.layers.{layer}.post_feedforward_layernorm.output" for layer in range(n)]
        total = config.clt_width * n
        plans.append(CoderPlan("clt", hooks_in, hooks_out, config.clt_width, config.clt_l0 * n,
                               root / gemma_scope_folder("clt", hooks_in, total), f"{short}-clt-w{width_tag(total)}"))
    return plans


# --- activations ------------------------------------------------------------------------------------


@dataclass
class ReplayingModel(SubjectModel):
    """The subject model, answering `capture` for a batch it has seen from what it recorded then.

    The demo trains its coders on the corpus stream's first tokens and then indexes the same
    tokens, batched the same way (`INDEX_BATCH`), through the normal index path: the index's
    forward passes are the collection's again, so they are replayed instead of recomputed (half of
    the index stage's time). A batch not recorded (another batching, a resumed index) runs the model."""

    keep: frozenset[str] | None = None  # the hooks worth recording (what the index reads); None: all
    budget_bytes: int = 1 << 62  # record no more than this (later batches are computed again)
    recorded: dict[bytes, dict[str, torch.Tensor]] = field(default_factory=dict)
    recorded_bytes: int = 0
    replayed: int = 0  # batches answered from `recorded`

    @classmethod
    def of(cls, model: SubjectModel, budget_bytes: int | None = None) -> "ReplayingModel":
        """`model` replaying what it records, within `budget_bytes` (default: a quarter of the
        memory available now: ~0.7 GB for the default demo, more with --clt's 18 sites)."""
        budget = _available_memory() // 4 if budget_bytes is None else budget_bytes
        return cls(**{f.name: getattr(model, f.name) for f in fields(SubjectModel)}, budget_bytes=budget)

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hooks) -> dict[str, torch.Tensor]:
        seen = self.recorded.get(_batch_key(input_ids, attention_mask), {})
        if all(hook in seen for hook in hooks):
            self.replayed += 1
            return {hook: seen[hook] for hook in hooks}
        return super().capture(input_ids, attention_mask, hooks)

    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, acts: dict[str, torch.Tensor]) -> None:
        kept = {hook: a for hook, a in acts.items() if self.keep is None or hook in self.keep}
        size = sum(a.numel() * a.element_size() for a in kept.values())
        if kept and self.recorded_bytes + size <= self.budget_bytes:
            self.recorded[_batch_key(input_ids, attention_mask)] = kept
            self.recorded_bytes += size


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume little
        return 4 << 30


def _batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()
    return bytes(str(ids.shape), "ascii") + ids.astype("int64").tobytes() + mask.astype("int8").tobytes()


INDEX_BATCH = 32  # windows per batch when the demo collects and when it indexes (see ReplayingModel)


def collect_activations(model: SubjectModel, corpus: str, hooks: list[str], tokens: int, context: int,
                        batch_size: int = INDEX_BATCH, dtype: torch.dtype = torch.float32,
                        progress: bool = True) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Activations [n, d] per hook for the first `tokens` counted tokens (BOS and padding left out),
    and the token count at each window boundary (so held-out splits can fall between windows).
    A ReplayingModel also records each batch's activations as they came."""
    dims = model.hook_dims(hooks)
    room = tokens + batch_size * context
    out = {h: torch.empty(room, dims[h], dtype=dtype) for h in hooks}
    n, boundaries = 0, [0]
    windows = iter_windows(corpus, model.tokenizer, model.bos_token_id, context)
    from tqdm.auto import tqdm

    with tqdm(total=tokens, unit="tok", unit_scale=True, desc="collecting activations", leave=False,
              disable=not progress) as bar:
        for batch in batches(windows, batch_size, context, model.pad_token_id, tokens, 0):
            acts = model.capture(batch.input_ids.to(model.device), batch.attention_mask.to(model.device), hooks)
            if isinstance(model, ReplayingModel):
                model.record(batch.input_ids, batch.attention_mask, acts)
            mask = batch.count_mask.to(model.device)
            m = int(mask.sum())
            for h in hooks:
                out[h][n:n + m] = acts[h][mask].to("cpu", dtype)
            boundaries += (n + mask.sum(1).cumsum(0)).tolist()
            n += m
            bar.update(m)
    return {h: a[:n] for h, a in out.items()}, boundaries


def typical(acts: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """Tokens whose norm is at most `ratio` x the median at every one of these sites: a few
    massive-activation tokens (attention sinks) can carry most of a layer's variance, and training on
    them would spend the whole loss there (as the index leaves them out with the same ratio)."""
    keep = torch.ones(len(acts[0]), dtype=torch.bool)
    for x in acts:
        norms = x.float().norm(dim=1)
        keep &= norms <= ratio * norms.median()
    return keep


def step(title: str):
    click.secho(f"\n== {title}", bold=True)
    return time.perf_counter()


# --- training: Gemma Scope 2 coders (gemma3) --------------------------------------------------------


def train_gemma_scope_coders(config: DemoConfig, model: SubjectModel, plans: list[CoderPlan]) -> list[dict]:
    """Collect the activations every plan needs in one pass, then train, evaluate and save each coder."""
    hooks = list(dict.fromkeys(h for p in plans for h in p.hooks_in + p.hooks_out))
    if isinstance(model, ReplayingModel):  # the index encodes from the input sites only
        model.keep = frozenset(h for p in plans for h in p.hooks_in)
    started = time.perf_counter()
    # bfloat16 storage: the model runs in bf16 already, and it halves the memory
    acts, _ = collect_activations(model, str(config.corpus), hooks, config.train_tokens + config.eval_tokens,
                                  config.context, dtype=torch.bfloat16, progress=config.progress)
    n = len(acts[hooks[0]])
    seconds = time.perf_counter() - started
    click.echo(f"  collected {n:,} tokens at {len(hooks)} sites in {seconds:.0f}s ({n / seconds:,.0f} tokens/s)")
    split = min(config.train_tokens, n - 1000)
    reports = []
    for plan in plans:
        coder, report = train_coder(config, plan, acts, split)
        save_into_place(coder, plan, config)
        click.echo(f"  {plan.coder_id}: " + report_line(report))
        reports.append(report)
    return reports


def train_coder(config: DemoConfig, plan: CoderPlan, acts: dict[str, torch.Tensor], split: int) -> tuple[JumpReLUCoder, dict]:
    """Train one planned coder on the first `split` tokens of the collected activations (massive-activation
    tokens left out) and evaluate it on the rest; returns the coder and its report (coders/training.json)."""
    xs = [acts[h] for h in plan.hooks_in]
    ys = None if plan.kind not in ("transcoder", "clt") else [acts[h] for h in plan.hooks_out]
    kept = typical([x[:split] for x in xs + (ys or [])], config.outlier_ratio)
    train_in = [x[:split][kept] for x in xs]
    train_out = None if ys is None else [y[:split][kept] for y in ys]
    jump_config = JumpReLUConfig(width=plan.width, l0_target=plan.l0, epochs=config.epochs,
                                 batch_size=config.batch_size, bandwidth=config.bandwidth,
                                 progress=config.progress)
    coder, metrics = train_jumprelu(train_in, train_out, hooks_in=plan.hooks_in, hooks_out=plan.hooks_out,
                                    config=jump_config, kind=plan.kind, model_name=config.spec.model_name,
                                    desc=f"training {plan.coder_id}")
    held = evaluate_jumprelu(coder, [x[split:] for x in xs], None if ys is None else [y[split:] for y in ys])
    report = dict(coder_id=plan.coder_id, kind=plan.kind, folder=str(plan.folder.relative_to(config.coders_dir)),
                  hooks_in=plan.hooks_in, hooks_out=plan.hooks_out, width=plan.width * len(plan.hooks_in),
                  l0_target=plan.l0, train_tokens=len(train_in[0]), left_out=int((~kept).sum()),
                  steps=metrics.steps, train_seconds=round(metrics.seconds, 1),
                  train_tokens_per_second=round(metrics.tokens_per_second), resampled=metrics.resampled,
                  held_out_tokens=held.tokens, fve=held.fve, fve_per_slot=held.fve_per_slot, l0=held.l0,
                  dead_share=held.dead_share, clone_pairs=held.clone_pairs, clones=held.clones,
                  wasted_share=held.wasted_share)
    return coder, report


def report_line(report: dict) -> str:
    """A coder's held-out quality in one line: FVE (per slot), L0, dead, clones and wasted (dead + clones)."""
    per_slot = report["fve_per_slot"]
    return (f"FVE {report['fve']:.3f}" + (f" ({' / '.join(f'{v:.3f}' for v in per_slot)})" if len(per_slot) > 1 else "")
            + f", L0 {report['l0']:.1f}, dead {report['dead_share']:.1%}, clones {report['clones'] / report['width']:.1%}"
            f" ({report['clone_pairs']:,} pairs), wasted {report['wasted_share']:.1%} on {report['held_out_tokens']:,}"
            f" held-out tokens; {report['steps']:,} steps in {report['train_seconds']:.0f}s"
            f" ({report['train_tokens_per_second']:,} tokens/s)")


def save_into_place(coder, plan: CoderPlan, config: DemoConfig) -> None:
    """Save under a staging root, then rename the folder into place: a folder with config.json is whole."""
    staging = config.coders_dir / ".partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    written = save_gemma_scope_2(coder, staging, model_name=config.spec.model_name)
    if written.relative_to(staging) != plan.folder.relative_to(config.coders_dir):
        raise AssertionError(f"planned {plan.folder}, wrote {written}")  # gemma_scope_folder and the writer agree
    plan.folder.parent.mkdir(parents=True, exist_ok=True)
    if plan.folder.exists():  # a folder without config.json: left by a killed run
        shutil.rmtree(plan.folder)
    written.rename(plan.folder)
    shutil.rmtree(staging)


# --- training: TopK SAEs (smollm2) ------------------------------------------------------------------


def train_topk_saes(config: DemoConfig, model: SubjectModel, layers: list[int]) -> list[dict]:
    """Train one TopK SAE per layer on the first train_tokens; evaluate on the eval_tokens after."""
    hooks = [residual(layer) for layer in layers]
    acts, _ = collect_activations(model, str(config.corpus), hooks, config.train_tokens + config.eval_tokens,
                                  config.context, progress=config.progress)
    reports = []
    for layer, hook in zip(layers, hooks):
        x = acts[hook]
        split = min(config.train_tokens, len(x) - 1000)
        kept = typical([x[:split]], config.outlier_ratio)
        train_x, held_out = x[:split][kept], x[split:]
        train_config = TrainConfig(width=config.width, k=config.k, lr=config.lr, batch_size=config.batch_size,
                                   epochs=config.epochs, progress=config.progress)
        coder, metrics = train_topk_sae(train_x, train_config, hook=hook, coder_id=config.sae_dir(layer).name,
                                        model_name=config.spec.model_name)
        held = evaluate(coder, held_out, tokens_since_fired=metrics.tokens_since_fired,
                        dead_after_tokens=train_config.dead_after_tokens)
        report = dict(layer=layer, width=config.width, k=config.k, train_tokens=len(train_x),
                      left_out=int((~kept).sum()), held_out_tokens=held.tokens, fve=held.fve, l0=held.l0,
                      dead_share=held.dead_share, clone_pairs=held.clone_pairs, clones=held.clones,
                      wasted_share=held.wasted_share)
        save_saelens(coder, config.sae_dir(layer), model_name=config.spec.model_name, context_size=config.context,
                     dataset_path="featuredb.demo.corpus", extra_metadata={"training": report})
        click.echo(f"  layer {layer:>2}: FVE {held.fve:.3f} on {held.tokens:,} held-out tokens, "
                   f"dead {held.dead_share:.1%}, clones {held.clones / config.width:.1%} ({held.clone_pairs:,} pairs), "
                   f"wasted {held.wasted_share:.1%}, {len(train_x):,} training tokens")
        reports.append(report)
    return reports


# --- the steps --------------------------------------------------------------------------------------


def _indexed_ids(db: Path) -> dict[str, int]:
    from featuredb.store import FeatureStore

    if not db.exists():
        return {}
    coders = FeatureStore(str(db)).coders()
    return dict(zip(coders["coder_id"].to_list(), coders["tokens_indexed"].to_list()))


def model_spec(config: DemoConfig) -> str:
    if config.model:
        return config.model
    if config.subject == "gemma3":
        return str(gemma3_270m_folder(progress=config.progress))
    return smollm2_gguf_path()


def model_dtype(config: DemoConfig) -> torch.dtype:
    dtype = getattr(torch, config.dtype) if config.dtype else default_dtype()
    if config.subject == "gemma3":
        check_dtype(dtype, "gemma3_text")  # before minutes of work, not after
    return dtype


def run_demo(config: DemoConfig) -> None:
    started = time.perf_counter()
    dtype = model_dtype(config)  # a refused dtype leaves nothing behind
    config.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    spec = config.spec

    t = step("1/6 corpus: Python's reference docs, docstrings and source")
    if not config.corpus.exists():
        partial = config.corpus.with_suffix(".partial")
        n_docs = write_demo_corpus(partial)
        partial.replace(config.corpus)
        click.echo(f"  wrote {n_docs:,} documents to {config.corpus}")
    else:
        click.echo(f"  cached: {config.corpus}")
    timings["corpus"] = time.perf_counter() - t

    t = step(f"2/6 subject model: {spec.title}")
    weights = model_spec(config)
    click.echo(f"  {weights}")
    timings["model"] = time.perf_counter() - t

    if spec.coder_format == "gemma-scope-2":
        plans = plan_coders(config)
        title = (f"JumpReLU coders in Gemma Scope 2's layout (width {config.width}, L0 {config.l0:g}): SAEs at layers "
                 f"{config.layer_list}" + (", a skip transcoder" if config.transcoder else "")
                 + (", a crosscoder" if config.crosscoder and len(config.layer_list) > 1 else "")
                 + (", a cross-layer transcoder" if config.clt else ""))
        todo = [p for p in plans if not p.saved]
        coder_specs = [p.index_spec for p in plans]
        coder_ids = [p.coder_id for p in plans]
    else:
        title = f"TopK SAEs (width {config.width}, k {config.k}) on layers {config.layer_list}"
        todo = [layer for layer in config.layer_list if not (config.sae_dir(layer) / "cfg.json").exists()]
        coder_specs = [str(config.sae_dir(layer)) for layer in config.layer_list]
        coder_ids = [config.sae_dir(layer).name for layer in config.layer_list]

    t = step(f"3/6 coders: {title}")
    reports_path = config.coders_dir / "training.json"
    model = None  # kept for the index, which replays its recorded forward passes
    if todo:
        model = ReplayingModel.of(load_model(weights, dtype=dtype))
        click.echo(f"  {spec.title} loaded ({model.dtype}); collecting {config.train_tokens + config.eval_tokens:,} "
                   f"tokens of activations ({config.eval_tokens:,} held out)")
        if spec.coder_format == "gemma-scope-2":
            reports = train_gemma_scope_coders(config, model, todo)
        else:
            reports = train_topk_saes(config, model, todo)
        old = json.loads(reports_path.read_text()) if reports_path.exists() else []
        new_ids = {r.get("coder_id", r.get("layer")) for r in reports}
        kept = [r for r in old if r.get("coder_id", r.get("layer")) not in new_ids]
        reports_path.write_text(json.dumps(kept + reports, indent=2))
    else:
        click.echo(f"  cached: {config.coders_dir}")
    timings["train"] = time.perf_counter() - t

    from featuredb.store.feature_map import compile_umap_in_background

    # the index and the labels leave a core idle at times: the map's compilation runs there
    umap_compiling = compile_umap_in_background()
    t = step(f"4/6 index: {config.tokens:,} tokens through the model and {len(coder_specs)} coders")
    indexed = _indexed_ids(config.db)
    if all(indexed.get(coder_id, 0) >= config.tokens for coder_id in coder_ids):
        click.echo(f"  cached: {config.db}")
    else:
        result = run_index(IndexConfig(
            model=weights, coders=coder_specs, corpus=str(config.corpus), db=str(config.db), tokens=config.tokens,
            context=config.context, batch_size=INDEX_BATCH, dtype=str(dtype).removeprefix("torch."), resume=True,
            replace=True,  # the demo owns its catalogue: more --tokens re-index its own coders
            outlier_ratio=config.outlier_ratio,  # the tokens the coders were trained without
            checkpoint_seconds=60, progress=config.progress), model=model)
        click.echo(f"  indexed {result.tokens:,} tokens in {result.seconds:.0f}s "
                   f"({result.stream_seconds:.0f}s of it the model and statistics; loading, logit tables and writing "
                   f"the rest; features firing together: {result.cooccurrence_seconds:.0f}s)")
    del model
    timings["index"] = time.perf_counter() - t

    t = step("5/6 describe: an offline description of every feature (what it fires on, in words), embedded with MiniLM")
    from featuredb.describe.run import DescribeConfig, run_describe

    described = run_describe(DescribeConfig(db=str(config.db), explainer="words", progress=config.progress))
    click.echo(f"  {described.tokens_labels:,} new labels, {described.skipped:,} already done")
    timings["describe"] = time.perf_counter() - t

    t = step("6/6 the map (UMAP of decoder directions), search indexes, files compacted")
    from featuredb.store import FeatureStore
    from featuredb.store.feature_map import umap_available, update_map
    from featuredb.store.indexes import finalize

    if umap_compiling is not None:
        umap_compiling.wait()
    if umap_available():  # finalize maps too; done first here to time it on its own
        mapped = update_map(FeatureStore(str(config.db)))
        if mapped.groups:
            click.echo(f"  mapped {mapped.features:,} features in {mapped.seconds:.0f}s "
                       f"(`featuredb map --png map.png` draws it; `featuredb serve` shows it at /map)")
    else:
        click.echo("  no map: umap-learn is not installed (pip install umap-learn, then `featuredb map`)")
    timings["map"] = time.perf_counter() - t
    t = time.perf_counter()
    # the demo owns its catalogue (no reader can hold an old version): old versions go now
    built = finalize(str(config.db), cleanup_older_than=dt.timedelta(0))
    click.echo("  " + ", ".join(f"{table}: {', '.join(names) or 'exact search (small table)'}"
                                for table, names in built.items()))
    timings["indexes"] = time.perf_counter() - t

    total = time.perf_counter() - started
    (config.out / "timings.json").write_text(json.dumps({**timings, "total": total}, indent=2))
    click.secho(f"\nDone in {total:.0f}s: {config.db}", bold=True)
    click.echo(try_next(config, coder_ids))


def try_next(config: DemoConfig, coder_ids: list[str]) -> str:
    db, middle, first = config.db, coder_ids[len(config.layer_list) // 2], coder_ids[0]
    text = f"""
Try next:
  export FEATUREDB_DB={db}
  featuredb search "numbers and digits"
  featuredb search "Python keywords" --keyword
  featuredb search "closing parentheses" --hybrid --layer {config.layer_list[len(config.layer_list) // 2]}
  featuredb show {middle}/0
  featuredb fires "def add(a, b): return a + b"
  featuredb similar {first}/0
  featuredb serve                      # the same in a browser: http://127.0.0.1:8000/
"""
    if config.subject == "gemma3":
        text += f"""
Google's own Gemma Scope 2 coders for this model, by release name (hub access needed; the same file
layout as ours, 4x wider), indexed on the same model and corpus:
  featuredb index --model {config.model or "google/gemma-3-270m"} --corpus {config.corpus} --db gemma-scope-2-demo \\
    --tokens 100000 --dtype bfloat16 --outlier-ratio 10 \\
    --coder gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_medium \\
    --coder gemma-scope-2-270m-pt-transcoders:transcoder/layer_9_width_16k_l0_small_affine
  featuredb coders list --model google/gemma-3-270m      # every release for this model
"""
    return text
