"""One indexing run: corpus -> model -> every coder -> streaming statistics -> store.

The whole corpus makes one pass through the model; each batch's hooked activations go through every
coder, and each coder's activations update its FeatureStats on the device. Nothing dense is kept
across batches. Checkpoints make a killed run resumable with an identical result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..store import FeatureStore
from ..store.decoders import write_decoder_vectors
from .coders import CoderError, SparseCoder, load_coder
from .corpus import CorpusError, Window, iter_windows
from .geometry import decoder_neighbours, logit_tables
from .hooks import hook_site_kind
from .model import SubjectModel, load_model
from .records import example_rows, feature_rows, vocabulary_strings
from .stats import FeatureStats, StatsConfig
from .workdir import PAD, Checkpoints, ContextStore, Progress


@dataclass
class IndexConfig:
    model: str
    coders: list[str]
    corpus: str
    db: str
    tokens: int | None = None  # stop after this many counted tokens (BOS and padding do not count)
    context: int = 128
    batch_size: int = 16  # contexts per forward pass
    stats: StatsConfig = field(default_factory=StatsConfig)
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # model dtype; default float32 on CPU, bfloat16 on CUDA
    resume: bool = False
    work_dir: str | None = None  # default: <db>/_index_work for a local db
    checkpoint_seconds: float = 300.0
    progress: bool = True

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed."""
        keys = dict(model=self.model, coders=self.coders, corpus=str(self.corpus), tokens=self.tokens,
                    context=self.context, batch_size=self.batch_size, stats=asdict(self.stats))
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class IndexResult:
    sae_ids: list[str]
    tokens: int
    contexts: int
    seconds: float


class IndexingError(ValueError):
    """A run that cannot start or finish (bad settings, empty corpus, mismatched checkpoint)."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise IndexingError(f"unknown device '{device}'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise IndexingError("device 'cuda' asked for, but no CUDA device is available")
    return resolved


def load_coders(specs: list[str], model: SubjectModel, device: torch.device) -> list[SparseCoder]:
    """Load every coder and check it fits its hook on this model before anything runs."""
    if not specs:
        raise IndexingError("give at least one --coder")
    is_gemma = "gemma" in type(model.model).__name__.lower()
    coders = [load_coder(spec, model_is_gemma=is_gemma) for spec in specs]
    ids = [c.sae_id for c in coders]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise IndexingError(f"two coders share the id {sorted(duplicates)[0]!r}: name them with ID=PATH")
    dims = model.hook_dims(sorted({c.hook for c in coders}))
    for coder in coders:
        if dims[coder.hook] != coder.d_in:
            raise CoderError(f"coder {coder.sae_id} expects d_in={coder.d_in}, but hook {coder.hook} "
                             f"of this model gives {dims[coder.hook]}")
    # encode in float32: JumpReLU thresholds are compared at full precision
    return [c.to(device=device, dtype=torch.float32) for c in coders]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T]
    count_mask: torch.Tensor  # [B, T] positions that count: not BOS, not padding
    stored_ids: np.ndarray  # [B, T] int32 with PAD for padding, for the context store
    windows: list[Window]


def make_batch(windows: list[Window], context: int, pad_token_id: int) -> Batch:
    B = len(windows)
    stored = np.full((B, context), PAD, dtype=np.int32)
    for i, w in enumerate(windows):
        stored[i, : len(w.token_ids)] = w.token_ids
    real = torch.from_numpy(stored != PAD)
    input_ids = torch.from_numpy(np.where(stored != PAD, stored, pad_token_id).astype(np.int64))
    count_mask = real.clone()
    count_mask[:, 0] = False  # BOS
    return Batch(input_ids, real.long(), count_mask, stored, windows)


def batches(windows: Iterator[Window], batch_size: int, context: int, pad_token_id: int,
            token_budget: int | None, tokens_done: int) -> Iterator[Batch]:
    pending: list[Window] = []
    for window in windows:
        if token_budget is not None and tokens_done >= token_budget:
            break
        pending.append(window)
        tokens_done += len(window.token_ids) - 1
        if len(pending) == batch_size:
            yield make_batch(pending, context, pad_token_id)
            pending = []
    if pending:
        yield make_batch(pending, context, pad_token_id)


def default_work_dir(config: IndexConfig) -> Path:
    if config.work_dir:
        return Path(config.work_dir)
    if "://" in config.db:
        return Path.home() / ".cache" / "featuredb" / "index" / config.fingerprint()
    return Path(config.db) / "_index_work"


def run_index(config: IndexConfig, on_batch: Callable[[int], None] | None = None) -> IndexResult:
    """Index a corpus. `on_batch(n)` is called after each batch (tests use it to interrupt a run)."""
    start_time = time.perf_counter()
    store = FeatureStore(config.db)  # fails early on a db path that is a file
    device = resolve_device(config.device)
    dtype = DTYPES.get(config.dtype) if config.dtype else None
    if config.dtype and dtype is None:
        raise IndexingError(f"unknown dtype '{config.dtype}' (choose from {', '.join(DTYPES)})")
    if config.context < 2 or config.batch_size < 1:
        raise IndexingError("context must be >= 2 and batch size >= 1")

    model = load_model(config.model, device=device, dtype=dtype)
    coders = load_coders(config.coders, model, device)
    hooks = sorted({c.hook for c in coders})

    work_dir = default_work_dir(config)
    checkpoints = Checkpoints(work_dir)
    stats = [FeatureStats(c.width, config.context, config.stats, device=device) for c in coders]
    progress = Progress(fingerprint=config.fingerprint())
    saved = checkpoints.load() if config.resume else None
    if saved is not None:
        progress, states = saved
        if progress.fingerprint != config.fingerprint() or len(states) != len(stats):
            raise IndexingError(f"the checkpoint in {work_dir} was made with other settings; "
                              "run without --resume to start over")
        for s, state in zip(stats, states):
            s.load_state_dict(state)
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    contexts = ContextStore(work_dir, config.context)
    contexts.truncate(progress.contexts, progress.docs_started)

    if not progress.finished:
        _stream(config, model, coders, hooks, stats, contexts, checkpoints, progress, on_batch)
    if progress.contexts == 0:
        raise CorpusError(f"corpus {config.corpus} has no text to index")

    unembed = model.unembed()
    vocab = vocabulary_strings(model.tokenizer, unembed.shape[0])
    for coder, coder_stats in zip(coders, stats):
        sae = sae_row(config, coder, progress)
        logits = logit_tables(coder.W_dec, unembed, model.direction_to_residual(coder.hook_out))
        neighbours = decoder_neighbours(coder.W_dec)
        store.write_coder(
            sae,
            feature_rows(sae, coder_stats, logits, neighbours, contexts, vocab),
            example_rows(coder.sae_id, coder_stats, contexts, vocab),
        )
        write_decoder_vectors(store, coder.sae_id, coder.W_dec)  # for similarity search across coders
    shutil.rmtree(work_dir, ignore_errors=True)
    return IndexResult([c.sae_id for c in coders], progress.tokens_counted, progress.contexts,
                       time.perf_counter() - start_time)


def _stream(config: IndexConfig, model: SubjectModel, coders: list[SparseCoder], hooks: list[str],
            stats: list[FeatureStats], contexts: ContextStore, checkpoints: Checkpoints,
            progress: Progress, on_batch: Callable[[int], None] | None) -> None:
    windows = iter_windows(config.corpus, model.tokenizer, model.bos_token_id, config.context,
                           skip_docs=progress.next_doc, skip_windows=progress.next_window)
    bar = tqdm(total=config.tokens, initial=progress.tokens_counted, unit="tok", unit_scale=True,
               desc="indexing", disable=not config.progress, smoothing=0.1)
    last_checkpoint = time.monotonic()
    n_batches = 0
    device = model.device
    for batch in batches(windows, config.batch_size, config.context, model.pad_token_id,
                         config.tokens, progress.tokens_counted):
        activations = model.capture(batch.input_ids.to(device), batch.attention_mask.to(device), hooks)
        count_mask = batch.count_mask.to(device)
        counted = int(batch.count_mask.sum())
        context_ids = torch.arange(progress.contexts, progress.contexts + len(batch.windows), device=device)
        for coder, coder_stats in zip(coders, stats):
            acts = coder.encode(activations[coder.hook].float())
            acts = acts * count_mask[..., None]  # BOS and padding never count
            coder_stats.update(acts, context_ids, counted)

        doc_index = []  # per window: its document's position in the context store's doc list
        new_docs = []
        for w in batch.windows:
            if w.window_in_doc == 0:
                new_docs.append(w.doc_id)
            doc_index.append(progress.docs_started + len(new_docs) - 1)
        contexts.append(batch.stored_ids, np.asarray(doc_index), new_docs)
        _advance(progress, batch, counted, new_docs)
        bar.update(counted)
        n_batches += 1
        if time.monotonic() - last_checkpoint >= config.checkpoint_seconds:
            checkpoints.save(progress, [s.state_dict() for s in stats])
            last_checkpoint = time.monotonic()
        if on_batch is not None:
            on_batch(n_batches)
    bar.close()
    progress.finished = True
    checkpoints.save(progress, [s.state_dict() for s in stats])


def _advance(progress: Progress, batch: Batch, counted: int, new_docs: list[str]) -> None:
    last = batch.windows[-1]
    progress.contexts += len(batch.windows)
    progress.docs_started += len(new_docs)
    progress.next_doc, progress.next_window = last.doc_ordinal, last.window_in_doc + 1
    progress.tokens_counted += counted


def sae_row(config: IndexConfig, coder: SparseCoder, progress: Progress) -> dict:
    site = "transcoder" if coder.kind != "sae" else hook_site_kind(coder.hook)
    if site not in ("res", "mlp", "att", "transcoder"):
        site = "other"
    return dict(
        sae_id=coder.sae_id, model=config.model, hook=coder.hook, hook_out=coder.hook_out, site=site,
        layer=coder.layer, architecture=coder.architecture, kind=coder.kind, d_in=coder.d_in,
        d_out=coder.d_out, width=coder.width, source=_absolute_if_local(coder.source), tokens_indexed=progress.tokens_counted,
        contexts_indexed=progress.contexts, context=config.context, top_k=config.stats.top_k,
    )


def _absolute_if_local(source: str | None) -> str:
    """Local coder paths are stored absolute, so the catalogue can reload them from anywhere."""
    if source and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source or ""
