"""One indexing run: corpus -> model -> every coder -> streaming statistics -> store.

The whole corpus makes one pass through the model; each batch's hooked activations go through every
coder, and each coder's activations update its FeatureStats on the device. Nothing dense is kept
across batches. Checkpoints make a killed run resumable with an identical result.

Under torchrun the same run is split across processes (see distributed.py): each rank indexes
every world-th batch of the one corpus stream with every coder, the statistics are merged on rank
0 with collectives, and rank 0 alone writes the catalogue, equal to a single-process run's. With
--coder-groups G, each of G groups of ranks holds only some of the coders and splits the stream
among its members; rank 0 still writes every coder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from featuredb.errors import CoderError, CorpusError, IndexingError
from featuredb.indexer.cooccurrence import CooccurrenceConfig, Partners, TokenSample
from featuredb.indexer.corpus import Window, iter_windows
from featuredb.indexer.distributed import (SINGLE, Shard, barrier, decided_by_writer, gather_contexts,
                                           gather_example_contexts, gather_samples, process_group, rank_device,
                                           receive_stats, reduce_stats, send_stats, shard_from_env)
from featuredb.indexer.geometry import decoder_neighbours, logit_tables
from featuredb.indexer.plan import Pass, Plan, PlannedCoder, human, model_weight_bytes, plan_passes, planned_coders
from featuredb.indexer.preflight import check_replacements, coder_headers, default_budget_for, refuse_duplicate_ids
from featuredb.indexer.records import compact_examples, feature_batches, vocabulary_strings
from featuredb.indexer.stats import FeatureStats, StatsConfig
from featuredb.indexer.workdir import (PAD, Checkpoints, ContextStore, LoadedContexts, Progress, rank_dir,
                                       removed_unless_resumable, saved_coder_groups, saved_world_sizes)
from featuredb.runtime.coders import Coder, SparseCoder, load_coder
from featuredb.runtime.hooks import hook_site_kind, parse_hook
from featuredb.runtime.multilayer import KINDS as MULTI_LAYER_KINDS
from featuredb.runtime.model import SubjectModel, load_model
from featuredb.store import FeatureStore
from featuredb.store.connect import is_remote
from featuredb.store.decoder_vectors import write_decoder_vectors

CHECKPOINT_FORMAT = 4  # part of the fingerprint: work dirs of an older layout are not resumed


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
    # features that fire together (indexer/cooccurrence.py): partners kept per feature (0: off), and
    # the tokens they are counted on (a fixed random sample when the corpus is larger)
    cooccurrence: CooccurrenceConfig = field(default_factory=CooccurrenceConfig)
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # model dtype; default float32 on CPU, bfloat16 on CUDA
    resume: bool = False
    replace: bool = False  # coders already in the catalogue may be replaced (their descriptions are dropped)
    work_dir: str | None = None  # a local directory; default: <db>/_index_work, or a cache dir for s3://
    checkpoint_seconds: float = 300.0
    progress: bool = True
    distributed: bool | None = None  # None: when under torchrun with WORLD_SIZE > 1; True: require torchrun
    coder_groups: int = 1  # under torchrun: groups of ranks that each hold only some of the coders
    # Leave out massive-activation tokens (attention sinks) like BOS: hooked-activation norm above
    # this many times the median norm of their context's counted tokens. None keeps every token.
    outlier_ratio: float | None = None
    # Device bytes the coders may use (encoders + statistics, see indexer/plan.py): they are packed
    # into as few passes over the corpus as fit it. None: the device's free memory less the model
    # and a headroom.
    memory: int | None = None

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (the world size and the coder groups are
        checked on their own, for a clearer error)."""
        keys = dict(model=self.model, coders=self.coders, corpus=str(self.corpus), tokens=self.tokens,
                    context=self.context, batch_size=self.batch_size, stats=asdict(self.stats),
                    cooccurrence=asdict(self.cooccurrence),
                    outlier_ratio=self.outlier_ratio, format=CHECKPOINT_FORMAT)
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class IndexResult:
    coder_ids: list[str]  # the coders written (on the rank that wrote the catalogue), else those held
    tokens: int  # of the whole run, all ranks together
    contexts: int
    seconds: float
    stream_seconds: float = 0.0  # of that: reading, forward passes and statistics, without loading or writing
    cooccurrence_seconds: float = 0.0  # of that: co-occurrence (sampling tokens while streaming, counting pairs)
    written: bool = True  # False on the ranks of a distributed run that did not write the catalogue
    world: int = 1
    coders_held: list[str] = field(default_factory=list)  # the coders this process loaded and indexed
    passes: list[PassReport] = field(default_factory=list)  # the passes this run made (a resumed run: those it ran)
    plan: Plan | None = None


@dataclass
class PassReport:
    """One pass over the corpus: its coders, what the plan gave it and what it measured."""

    index: int  # 0-based
    coders: list[str]
    layers: list[int]
    bytes: int  # planned device bytes (most loaded device)
    peak_bytes: int  # measured: CUDA's peak allocation above the pass's start; on the CPU the bytes of
    #                  the encoders and statistics this process holds plus its largest batch of codes
    seconds: float  # loading its coders, streaming and writing them
    stream_seconds: float
    tokens: int
    cooccurrence_seconds: float = 0.0  # of `seconds`: sampling tokens and counting pairs (rank 0's)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.stream_seconds, 1e-9)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_index(config: IndexConfig, on_batch: Callable[[int], None] | None = None,
              notify: Callable[[str], None] = say_on_stderr, *, model: SubjectModel | None = None) -> IndexResult:
    """Index a corpus. `on_batch(n)` is called after each batch this process indexed (tests use it
    to interrupt a run); `notify` gets what the run says before it starts (coders it replaces);
    `model` is config.model loaded already (the demo's, which has just trained the coders on it)."""
    new_dir = None if is_remote(config.db) or Path(config.db).expanduser().exists() else Path(config.db).expanduser()
    try:
        return _run_index(replace(config, model=model_reference(config.model)), on_batch, notify, model)
    except BaseException:
        if new_dir is not None and new_dir.is_dir() and not any(new_dir.iterdir()):
            new_dir.rmdir()  # a run that failed before writing anything leaves no empty catalogue behind
        raise


def _run_index(config: IndexConfig, on_batch: Callable[[int], None] | None,
               notify: Callable[[str], None], loaded: SubjectModel | None = None) -> IndexResult:
    start_time = time.perf_counter()
    check_config(config)
    shard = _shard(config)
    device = rank_device(resolve_device(config.device), shard)
    work_dir = default_work_dir(config)
    if config.resume:
        _check_world_size(work_dir, shard)
        _check_coder_groups(work_dir, shard)
    with removed_unless_resumable(work_dir, rank_dir(work_dir, shard.rank, shard.world)), process_group(shard, device):
        store = FeatureStore(config.db) if shard.is_writer else None  # fails early on a db path that is a file
        plan, notes = decided_by_writer(lambda: check_before_loading(config, shard, device, work_dir, store), shard)
        if shard.is_writer and config.progress:  # the plan first, before anything loads
            for line in plan.lines():
                notify(line)
        model = loaded if loaded is not None and loaded.device == device else \
            load_model(config.model, device=device, dtype=DTYPES[config.dtype] if config.dtype else None)
        check_context(model, config.context)
        if shard.is_writer:  # said once everything has loaded: the run starts now
            for note in notes:
                notify(note)
        written, reports, held, tokens, contexts = [], [], [], 0, 0
        for k in range(len(plan.passes)):
            pass_started = time.perf_counter()
            run = Run.start(config, shard, device, work_dir, store, model, plan, k)
            if run is None:
                continue  # written before the run was resumed
            peak = PeakMemory(device)
            stream_seconds = run.stream(on_batch, peak)
            measured = peak.measured(run)
            written += run.write_catalogue()
            held += [c.coder_id for c in run.coders]
            tokens, contexts = run.progress.stream_tokens, run.progress.stream_contexts
            planned = plan.passes[k]
            reports.append(PassReport(k, planned.coder_ids, planned.layers, planned.bytes, measured,
                                      time.perf_counter() - pass_started, stream_seconds, tokens,
                                      run.cooccurrence_seconds))
            run.next_pass()
            del run  # its coders and statistics, before the next pass loads its own
        remove_work_dir(work_dir, shard)
    seconds = time.perf_counter() - start_time
    return IndexResult(written or held, tokens, contexts, seconds, sum(r.stream_seconds for r in reports),
                       cooccurrence_seconds=sum(r.cooccurrence_seconds for r in reports), written=store is not None, world=shard.world, coders_held=held, passes=reports, plan=plan)


class PeakMemory:
    """What one pass holds on its device at most (PassReport.peak_bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.largest_codes = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)

    def saw_codes(self, codes: torch.Tensor) -> None:
        self.largest_codes = max(self.largest_codes, codes.numel() * codes.element_size())

    def measured(self, run: Run) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        # the CPU has no allocator statistics: what the pass holds, counted (the decoders too: same memory)
        held = sum(t.numel() * t.element_size() for c in run.coders for t in _held_tensors(c))
        held += sum(t.numel() * t.element_size() for s in run.stats for t in s.state_dict().values())
        if run.sample is not None:
            held += sum(t.numel() * t.element_size() for t in run.sample.state_dict().values())
        return held + self.largest_codes


def _held_tensors(coder: Coder) -> list[torch.Tensor]:
    """A coder's tensors in memory on a CPU run: its encoder, and a one-layer coder's decoder (a
    multi-layer coder's decoder stays in its files until the catalogue is written)."""
    names = ("W_enc", "b_enc", "threshold", "b_dec", "W_dec") if isinstance(coder, SparseCoder) else (
        "W_enc", "b_enc", "threshold")
    return [t for t in (getattr(coder, n) for n in names) if t is not None]


def remove_work_dir(work_dir: Path, shard: Shard) -> None:
    own_dir = rank_dir(work_dir, shard.rank, shard.world)
    shutil.rmtree(own_dir, ignore_errors=True)
    barrier(shard)
    if own_dir != work_dir and shard.local_rank == 0:
        try:
            os.rmdir(work_dir)  # only if empty: the user's own files in a --work-dir stay
        except OSError:
            pass


@dataclass
class Run:
    """One pass of an indexing run on this process: its state, built by `Run.start`, and its steps
    in the order `run_index` takes them (stream, write_catalogue, next_pass)."""

    config: IndexConfig
    shard: Shard  # this process's place in the job (SINGLE when alone)
    work_dir: Path  # the run's work dir; this rank's own part of it is `own_dir`
    store: FeatureStore | None  # the catalogue: on rank 0 alone, which writes it
    model: SubjectModel
    planned: Pass  # this pass's coders (every group's) as the plan gives them
    coders: list[Coder]  # the coders this process holds: its group's of this pass
    stats: list[FeatureStats]  # one per coder of `coders`, on the device
    progress: Progress  # where this rank stands in the corpus stream of this pass
    checkpoints: Checkpoints  # this rank's
    contexts: ContextStore  # the token ids of the contexts this rank indexed (stored by the first pass)
    sample: TokenSample | None  # the tokens co-occurrence is counted on (None: not counted)
    cooccurrence_seconds: float = 0.0  # spent on co-occurrence so far in this pass (this process)

    @classmethod
    def start(cls, config: IndexConfig, shard: Shard, device: torch.device, work_dir: Path, store: FeatureStore | None,
              model: SubjectModel, plan: Plan, pass_index: int) -> Run | None:
        """Load this process's coders of pass `pass_index` and restore this rank's checkpoint of it
        (a fresh run's first pass starts from an empty work dir); None when the run being resumed
        already wrote this pass."""
        planned = plan.passes[pass_index]
        progress, states, sample_state = _restore_or_start_over(config, shard, work_dir, plan, pass_index)
        if progress.pass_index > pass_index:
            return None
        mine = [c for c, g in zip(planned.coders, planned.group_of) if g == shard.group]
        coders = load_coders([c.header.spec for c in mine], model, device)
        for coder, c in zip(coders, mine):
            if coder.coder_id != c.coder_id or coder.width != c.header.width:
                raise CoderError(f"coder {c.header.spec} loaded as {coder.coder_id} ({coder.width:,} features), but "
                                 f"its headers said {c.coder_id} ({c.header.width:,}): its files changed; start over")
        stats = [FeatureStats(c.width, config.context, config.stats, device=device) for c in coders]
        if states is not None:
            if len(states) != len(stats):
                raise IndexingError(f"the checkpoint in {rank_dir(work_dir, shard.rank, shard.world)} was made with "
                                    "other settings; run without --resume to start over")
            for s, state in zip(stats, states):
                s.load_state_dict(state)
        sample = TokenSample(config.cooccurrence.sample_tokens, config.context) if config.cooccurrence.enabled else None
        if sample is not None and sample_state is not None:
            sample.load_state_dict(sample_state)
        own_dir = rank_dir(work_dir, shard.rank, shard.world)
        contexts = ContextStore(own_dir, config.context)
        contexts.truncate(progress.contexts, progress.docs_started)
        return cls(config, shard, work_dir, store, model, planned, coders, stats, progress, Checkpoints(own_dir),
                   contexts, sample)

    @property
    def own_dir(self) -> Path:
        return rank_dir(self.work_dir, self.shard.rank, self.shard.world)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @cached_property  # read by every batch; the pass's coders never change
    def feature_offsets(self) -> dict[str, int]:
        """Each coder of the pass (every group's): the pass-global id of its first feature."""
        widths = [c.header.width for c in self.planned.coders]
        starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
        return {c.coder_id: int(start) for c, start in zip(self.planned.coders, starts)}

    @property
    def hooks(self) -> list[str]:
        """The hooks this process's coders read."""
        return sorted({hook for coder in self.coders for hook in coder.hooks})

    # --- streaming ------------------------------------------------------------------------------

    def stream(self, on_batch: Callable[[int], None] | None, peak: PeakMemory) -> float:
        """Index this rank's batches of what is left of the corpus stream, and wait for every rank.
        Returns the seconds that took (the slowest rank's)."""
        started = time.perf_counter()
        if not self.progress.finished:
            self.read_stream(on_batch, peak)
        barrier(self.shard)
        return time.perf_counter() - started

    def read_stream(self, on_batch: Callable[[int], None] | None, peak: PeakMemory) -> None:
        """Read the corpus stream from where `progress` stands and index this rank's batches of it."""
        config, shard, progress = self.config, self.shard, self.progress
        windows = iter_windows(config.corpus, self.model.tokenizer, self.model.bos_token_id, config.context,
                               skip_docs=progress.next_doc, skip_windows=progress.next_window)
        # Rank 0's bar counts the whole stream as it passes: with balanced ranks, the job's tokens/s.
        passes = len(self.progress.plan) or 1
        desc = "indexing" if passes == 1 else f"pass {progress.pass_index + 1}/{passes}"
        bar = tqdm(total=config.tokens, initial=progress.stream_tokens, unit="tok", unit_scale=True,
                   desc=desc if shard.world == 1 else f"{desc} ({shard.world} ranks)",
                   disable=not config.progress or not shard.is_writer, smoothing=0.1)
        last_checkpoint = time.monotonic()
        indexed_batches = 0
        try:
            for group in window_groups(windows, config.batch_size, config.tokens, progress.stream_tokens):
                own = shard.owns(progress.stream_batches)
                if own:
                    self.index_batch(make_batch(group, config.context, self.model.pad_token_id), peak)
                    indexed_batches += 1
                counted = counted_tokens(group)
                _advance_stream(progress, group, counted)
                bar.update(counted)
                if own:
                    if time.monotonic() - last_checkpoint >= config.checkpoint_seconds:
                        self.save_checkpoint()
                        last_checkpoint = time.monotonic()
                    if on_batch is not None:
                        on_batch(indexed_batches)
        except BaseException:
            if not bar.disable:
                bar.close()  # ends the bar's line: what is said next about the failure starts on its own
                print(file=bar.fp or sys.stderr, flush=True)
            raise
        bar.close()
        if progress.stream_contexts == 0:  # every rank reads the whole stream: all of them stop here
            raise CorpusError(f"corpus {config.corpus} has no text to index")  # and leave no checkpoint
        progress.finished = True
        self.save_checkpoint()

    def index_batch(self, batch: Batch, peak: PeakMemory | None = None) -> None:
        """Run one batch through the model and every coder; store its contexts. Its contexts' global
        indices continue the stream's (`progress.stream_contexts`)."""
        device, progress, hooks = self.device, self.progress, self.hooks
        activations = self.model.capture(batch.input_ids.to(device), batch.attention_mask.to(device), hooks)
        count_mask = batch.count_mask.to(device)
        counted = int(batch.count_mask.sum())
        counts = {h: (count_mask, counted) for h in hooks}  # per hook: the positions that count, how many
        if self.config.outlier_ratio is not None:
            for h in hooks:
                typical = typical_tokens(activations[h], count_mask, self.config.outlier_ratio)
                counts[h] = (typical, int(typical.sum()))
        first = progress.stream_contexts
        context_ids = torch.arange(first, first + len(batch.windows), device=device)
        context_index = np.arange(first, first + len(batch.windows))  # the same on the host: no device sync
        started = time.perf_counter()
        sampled = None if self.sample is None else self.sample.candidates(context_ids, count_mask)
        offsets = self.feature_offsets
        self.cooccurrence_seconds += time.perf_counter() - started
        for coder, coder_stats in zip(self.coders, self.stats):
            mask, n_counted = _counted_by(coder, counts)
            acts = coder.encode_hooked(activations)
            acts.mul_(mask[..., None])  # BOS and padding never count (in place: encode's output is fresh)
            if peak is not None:
                peak.saw_codes(acts)
            coder_stats.update(acts, context_ids, n_counted)
            if sampled is not None:
                started = time.perf_counter()
                sampled.add(acts, offsets[coder.coder_id])
                self.cooccurrence_seconds += time.perf_counter() - started
        if sampled is not None:
            started = time.perf_counter()
            self.sample.add(sampled)
            self.cooccurrence_seconds += time.perf_counter() - started

        progress.tokens_counted += counted
        if progress.pass_index > 0:
            return  # every pass reads the same windows: the first pass stored them
        doc_index, new_docs = _document_rows(batch.windows, progress)
        self.contexts.append(batch.stored_ids, context_index, doc_index, new_docs)
        progress.contexts += len(batch.windows)
        progress.docs_started += len(new_docs)
        progress.last_doc = batch.windows[-1].doc_ordinal

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.progress, [s.state_dict() for s in self.stats],
                              None if self.sample is None else self.sample.state_dict())

    # --- writing the catalogue ------------------------------------------------------------------

    def write_catalogue(self) -> list[str]:
        """Merge every rank's statistics; rank 0 writes every coder's rows (the ids it wrote), the
        leaders of the other coder groups hand theirs over to it as it goes."""
        examples_from: ContextStore | LoadedContexts | None = self.contexts
        sample = self.sample
        if self.shard.world > 1:
            reduce_stats(self.stats, self.shard)  # each group's leader (rank 0 for group 0) now holds its group's
            examples_from = gather_contexts(self.contexts, gather_example_contexts(self.stats, self.shard), self.shard)
            if sample is not None:
                sample = gather_samples(sample, self.shard)  # every rank's, merged on rank 0
        written = []
        if self.store is not None:
            partners = None
            if sample is not None:  # over every coder of the pass, before the first is written
                started = time.perf_counter()
                width = sum(c.header.width for c in self.planned.coders)
                partners = sample.top_partners(width, self.config.cooccurrence.top_n, self.device)
                self.cooccurrence_seconds += time.perf_counter() - started
            written = self.write_coders(self.store, self.every_coder(), examples_from, partners)
        elif self.shard.groups > 1 and self.shard.member == 0:
            _hand_over(self.stats)  # to rank 0, as it writes
        barrier(self.shard)  # every rank keeps its checkpoint until the catalogue is written
        return written

    def every_coder(self) -> Iterator[tuple[Coder, FeatureStats]]:
        """Rank 0, after the merge: every coder of the pass with its merged statistics, in the order
        planned. Group 0's are already here; another group's coder is loaded again, and its leader
        sends its statistics (`_hand_over`), one coder at a time, so rank 0 holds at most one of them."""
        own = iter(zip(self.coders, self.stats))
        for planned, group in zip(self.planned.coders, self.planned.group_of):
            if group == 0:
                yield next(own)
                continue
            coder = load_coders([planned.header.spec], self.model, self.device)[0]
            coder_stats = receive_stats(FeatureStats(coder.width, self.config.context, self.config.stats,
                                                     device=self.device), src=self.shard.leader(group))
            yield coder, coder_stats
            del coder, coder_stats  # before the next coder arrives

    def write_coders(self, store: FeatureStore, coders: Iterator[tuple[Coder, FeatureStats]],
                     contexts: ContextStore | LoadedContexts, partners: Partners | None = None) -> list[str]:
        """Write every coder's rows (with each feature's co-firing partners when counted); returns their ids."""
        unembed = self.model.unembed()
        vocab = vocabulary_strings(self.model.tokenizer, unembed.shape[0])
        offsets = self.feature_offsets
        written = []
        for coder, coder_stats in coders:
            record = coder_record(self.config, coder, self.progress, None if partners is None else partners.tokens)
            cooccurring = None if partners is None else partners.for_coder(offsets[coder.coder_id], coder.width, offsets)
            # a multi-layer coder's decoder is read here, once, from its files (runtime/multilayer.py)
            total_write, layer_write = coder.decoder_summary()
            total_write = total_write.to(self.device)
            # a multi-layer coder writes to one site at several layers: one map serves them all
            logits = logit_tables(total_write, unembed, self.model.direction_to_residual(coder.hooks_out[0]))
            neighbours = decoder_neighbours(total_write)
            # streamed a batch of features at a time: memory bounded by a batch, not by the coder
            replaced = store.write_coder(
                record,
                feature_batches(record, coder_stats, logits, neighbours, contexts, vocab,
                                slots=list(zip(coder.layers, coder.hooks)), layer_write=layer_write,
                                cooccurring=cooccurring),
                compact_examples(coder.coder_id, record["model"], coder_stats, contexts, vocab),
            )
            # for similarity search across coders
            write_decoder_vectors(store, coder.coder_id, total_write, new=not replaced)
            store.forget_import(coder.coder_id)  # indexed here now: its model and coder are the user's
            written.append(coder.coder_id)
            del coder, coder_stats  # a coder received from another group is freed before the next one
        return written

    def next_pass(self) -> None:
        """This pass is written: the checkpoint moves on to the next pass, with empty statistics and
        the stream at its start, so a resumed run never reads this pass again. The context store's
        place (`contexts`, `docs_started`, `last_doc`) is kept: later passes read the same windows."""
        self.progress = replace(self.progress, pass_index=self.progress.pass_index + 1, next_doc=0, next_window=0,
                                tokens_counted=0, stream_contexts=0, stream_tokens=0, stream_batches=0, finished=False)
        self.checkpoints.save(self.progress, [])
        barrier(self.shard)


def _hand_over(stats: list[FeatureStats]) -> None:
    """The leader of group > 0: its coders' merged statistics to rank 0, in the order rank 0 writes
    them (that of --coder, which the group's own list keeps)."""
    while stats:
        send_stats(stats.pop(0), dst=0)  # and free them


# --- setting a run up ---------------------------------------------------------------------------


def check_config(config: IndexConfig) -> None:
    """Refuse settings no run can use, before anything is loaded."""
    if config.dtype and config.dtype not in DTYPES:
        raise IndexingError(f"unknown dtype '{config.dtype}' (choose from {', '.join(DTYPES)})")
    if config.context < 2 or config.batch_size < 1:
        raise IndexingError("context must be >= 2 and batch size >= 1")
    if config.outlier_ratio is not None and not config.outlier_ratio > 1:
        raise IndexingError(f"outlier ratio must be > 1 (a multiple of the median token norm), got {config.outlier_ratio}")
    if not (math.isfinite(config.checkpoint_seconds) and config.checkpoint_seconds >= 0):
        raise IndexingError(f"--checkpoint-seconds must be a number of seconds >= 0, got {config.checkpoint_seconds}")


def check_before_loading(config: IndexConfig, shard: Shard, device: torch.device, work_dir: Path,
                         store: FeatureStore | None) -> tuple[Plan, list[str]]:
    """Rank 0, before the model is loaded: the plan (every coder sized from its headers, packed
    into passes that fit the budget; a resumed run keeps the plan it was started with) and the
    coders it would replace in the catalogue (what replacing them drops, to say once the run starts)."""
    assert store is not None, "rank 0 holds the catalogue"
    planned = _planned_coders(config, device)
    resumed = _resumed_progress(config, work_dir, shard)
    if resumed is not None and resumed.plan:
        plan = saved_plan(resumed, planned)
    else:
        plan = _plan(config, shard, device, planned)
    may_replace = config.replace or (resumed is not None and resumed.replace)
    started_at = resumed.started_at if resumed is not None and resumed.started_at else None
    notes = check_replacements(store, [c.coder_id for c in planned], may_replace, started_at)
    return plan, notes


def plan_only(config: IndexConfig) -> Plan:
    """`featuredb index --plan`: the passes a run would make, from the coders' headers alone (no model
    or weights loaded, nothing written)."""
    check_config(config)
    shard = _shard(config)
    device = rank_device(resolve_device(config.device), shard)
    return _plan(config, shard, device, _planned_coders(config, device))


def _planned_coders(config: IndexConfig, device: torch.device) -> list[PlannedCoder]:
    return planned_coders(coder_headers(config.coders, config.model), config.context, config.batch_size,
                          config.stats, on_host=device.type == "cpu", cooccurrence=config.cooccurrence)


def _plan(config: IndexConfig, shard: Shard, device: torch.device, planned: list[PlannedCoder]) -> Plan:
    """The passes under --memory, or under the device's free memory less the model and a headroom."""
    budget, note = (config.memory, "--memory") if config.memory else default_budget_for(
        device, model_weight_bytes(config.model, DTYPES[config.dtype or _default_dtype(device)].itemsize))
    return plan_passes(planned, budget, note, shard.groups)


def _default_dtype(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" else "float32"  # as load_model chooses


def saved_plan(progress: Progress, planned: list) -> Plan:
    """The plan a resumed run was started with, its coders sized anew from their headers."""
    by_id = {c.coder_id: c for c in planned}
    saved = progress.plan
    if sorted(i for p in saved for i in p["coders"]) != sorted(by_id):
        raise IndexingError("the checkpoint was made for other coders; run without --resume to start over")
    return Plan(progress.budget_bytes, f"{progress.budget_note}; the plan of the run being resumed",
                [Pass([by_id[i] for i in p["coders"]], list(p["groups"])) for p in saved])


def _resumed_progress(config: IndexConfig, work_dir: Path, shard: Shard) -> Progress | None:
    """Rank 0's saved progress when this run resumes it (else None)."""
    saved = Checkpoints(rank_dir(work_dir, 0, shard.world)).load_progress() if config.resume else None
    return saved if saved is not None and saved.fingerprint == config.fingerprint() else None


def check_context(model: SubjectModel, context: int) -> None:
    """A context longer than the model's position embeddings gives it positions it never saw."""
    model_config = model.model.config
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and context > limit:
        raise IndexingError(f"--context {context} is longer than model {model.name} takes (max_position_embeddings "
                            f"{limit}): use --context {limit} or less")


def model_reference(spec: str) -> str:
    """What reloads the model from any directory: a local directory or .gguf file as an absolute
    path (not resolved: a .gguf in the hub cache is a symlink to a blob without the suffix), a
    hub id as given."""
    path = Path(spec).expanduser()
    return os.path.abspath(path) if spec.strip() and path.exists() else spec


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


def load_coders(specs: list[str], model: SubjectModel, device: torch.device) -> list[Coder]:
    """Load every coder and check it fits its hooks on this model before anything runs."""
    if not specs:
        raise IndexingError("give at least one --coder")
    is_gemma = "gemma" in type(model.model).__name__.lower()
    coders = [load_coder(spec, model_is_gemma=is_gemma) for spec in specs]
    refuse_duplicate_ids([c.coder_id for c in coders])
    for coder in coders:
        if getattr(coder, "every_layer", False) and coder.n_slots != model.n_layers:
            raise CoderError(f"coder {coder.coder_id} reads every layer ({{all}}) with {coder.n_slots} slots, but "
                             f"model {model.name} has {model.n_layers} layers: it was trained for another model")
        for hook in coder.hooks_out:
            model.module_at(parse_hook(hook))  # HookError naming the layer count when out of range
    dims = model.hook_dims(sorted({hook for coder in coders for hook in coder.hooks}))
    for coder in coders:
        for hook in coder.hooks:
            if dims[hook] != coder.d_in:
                raise CoderError(f"coder {coder.coder_id} expects d_in={coder.d_in}, but hook {hook} "
                                 f"of this model gives {dims[hook]}")
    # encode in float32 (JumpReLU thresholds are compared at full precision); the decoder stays on
    # the host until the coder is written (the plan counts the encoder alone)
    return [c.encoder_on(device) for c in coders]


def default_work_dir(config: IndexConfig) -> Path:
    """A local directory: beside a local db, in the user's cache for an object-store db."""
    if config.work_dir:
        if is_remote(config.work_dir):
            raise IndexingError(f"--work-dir must be a local directory, got {config.work_dir}")
        return Path(config.work_dir).expanduser()
    if is_remote(config.db):
        return Path.home() / ".cache" / "featuredb" / "index" / hashlib.sha256(config.db.encode()).hexdigest()[:16]
    return Path(config.db).expanduser() / "_index_work"


def _shard(config: IndexConfig) -> Shard:
    """SINGLE, or this process's rank when running under torchrun (and asked to, or not told not to)."""
    shard = shard_from_env()
    if config.distributed and shard is None:
        raise IndexingError("--distributed runs under torchrun: torchrun --nproc-per-node N -m featuredb.indexer ...")
    if shard is None or config.distributed is False:
        shard = SINGLE
    return _with_coder_groups(shard, config)


def _with_coder_groups(shard: Shard, config: IndexConfig) -> Shard:
    """The shard split into `config.coder_groups` groups of consecutive ranks, when it can be."""
    groups = config.coder_groups
    if groups < 1:
        raise IndexingError(f"--coder-groups must be at least 1, got {groups}")
    if groups == 1:
        return shard
    if shard.world % groups:
        raise IndexingError(f"--coder-groups needs torchrun with a world size divisible by {groups} "
                            f"(this run has {shard.world} process(es))")
    if groups > len(config.coders):
        raise IndexingError(f"--coder-groups {groups} is more than the {len(config.coders)} coder(s): "
                            "every group needs at least one")
    return replace(shard, groups=groups)


def _check_world_size(work_dir: Path, shard: Shard) -> None:
    """Checkpoints are per rank: only a run with as many processes can resume them."""
    saved_sizes = saved_world_sizes(work_dir)
    if saved_sizes and shard.world not in saved_sizes:
        made_by = " or ".join(str(n) for n in sorted(saved_sizes))
        raise IndexingError(f"the checkpoint in {work_dir} was made by {made_by} process(es), this run has "
                            f"{shard.world}: resume with {made_by}, or run without --resume to start over")


def _check_coder_groups(work_dir: Path, shard: Shard) -> None:
    """Each rank's checkpoint holds its own group's coders: only the same --coder-groups can resume it."""
    saved = saved_coder_groups(work_dir)
    if saved and shard.groups not in saved:
        made_with = " or ".join(str(n) for n in sorted(saved))
        raise IndexingError(f"the checkpoint in {work_dir} was made with --coder-groups {made_with}, this run has "
                            f"{shard.groups}: resume with --coder-groups {made_with}, or run without --resume "
                            "to start over")


def _restore_or_start_over(config: IndexConfig, shard: Shard, work_dir: Path, plan: Plan,
                           pass_index: int) -> tuple[Progress, list[dict] | None, dict | None]:
    """This rank's progress in pass `pass_index`, and its statistics when its checkpoint holds some
    (None: the pass starts with empty statistics). The first pass of a run that does not resume
    starts from an empty work dir; every later pass starts from the checkpoint the one before left."""
    own_dir = rank_dir(work_dir, shard.rank, shard.world)
    saved = Checkpoints(own_dir).load() if config.resume or pass_index > 0 else None
    if saved is None:
        if pass_index > 0:
            raise IndexingError(f"the checkpoint of pass {pass_index} in {own_dir} is gone; run without --resume")
        _clear_work_dir(work_dir, own_dir, shard, whole=not config.resume)
        return Progress(fingerprint=config.fingerprint(), coder_groups=shard.groups, replace=config.replace,
                        started_at=time.time(), plan=[{"coders": p.coder_ids, "groups": p.group_of}
                                                      for p in plan.passes],
                        budget_bytes=plan.budget_bytes, budget_note=plan.budget_note), None, None
    progress, states, sample = saved
    if progress.fingerprint != config.fingerprint():
        raise IndexingError(f"the checkpoint in {own_dir} was made with other settings; "
                            "run without --resume to start over")
    if progress.pass_index != pass_index or (not states and progress.stream_batches == 0):
        return progress, None, None  # a pass already written (skipped), or one that starts here
    return progress, states, sample


def _clear_work_dir(work_dir: Path, own_dir: Path, shard: Shard, whole: bool) -> None:
    """Start from an empty work dir (whole), or only from an empty rank dir (resuming a rank that had
    not checkpointed yet). One process per node clears a whole work dir, before any rank writes there."""
    if not whole:
        shutil.rmtree(own_dir, ignore_errors=True)
        return
    if shard.local_rank == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    barrier(shard)


# --- batches -------------------------------------------------------------------------------------


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


def window_groups(windows: Iterator[Window], batch_size: int, token_budget: int | None,
                  tokens_done: int) -> Iterator[list[Window]]:
    """The windows of each batch: `batch_size` at a time until the token budget is spent."""
    pending: list[Window] = []
    for window in windows:
        if token_budget is not None and tokens_done >= token_budget:
            break
        pending.append(window)
        tokens_done += counted_tokens([window])
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def counted_tokens(windows: list[Window]) -> int:
    return sum(len(w.token_ids) - 1 for w in windows)  # BOS does not count


def batches(windows: Iterator[Window], batch_size: int, context: int, pad_token_id: int,
            token_budget: int | None, tokens_done: int) -> Iterator[Batch]:
    for group in window_groups(windows, batch_size, token_budget, tokens_done):
        yield make_batch(group, context, pad_token_id)


def typical_tokens(x: torch.Tensor, count_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """`count_mask` [B, T] without the massive-activation tokens of `x` [B, T, d]: those whose norm
    is above `ratio` x the median norm of the counted tokens of their own context (so the rule does
    not depend on how contexts are batched). Attention sinks such as SmolLM2's first whitespace
    token after BOS reach norms of ~25,000 against a median of ~170 and would top every feature
    that fires on them at all."""
    norms = x.float().norm(dim=-1)
    median = norms.masked_fill(~count_mask, float("nan")).nanmedian(dim=1, keepdim=True).values
    return count_mask & ~(norms > ratio * median)


def _counted_by(coder: Coder, counts: dict[str, tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """The positions that count for `coder` and how many: its hook's; for a multi-layer coder, those
    that count at every hook it reads (they differ only when outliers are left out)."""
    if len(coder.hooks) == 1:
        return counts[coder.hook]
    mask = counts[coder.hooks[0]][0]
    for hook in coder.hooks[1:]:
        mask = mask & counts[hook][0]
    return mask, int(mask.sum())


def _document_rows(windows: list[Window], progress: Progress) -> tuple[np.ndarray, list[str]]:
    """Per window: its document's position in the context store's doc list; and the documents new
    to that list (a rank may see a document first at any of its windows)."""
    doc_index, new_docs = [], []
    last_doc = progress.last_doc
    for w in windows:
        if w.doc_ordinal != last_doc:
            new_docs.append(w.doc_id)
            last_doc = w.doc_ordinal
        doc_index.append(progress.docs_started + len(new_docs) - 1)
    return np.asarray(doc_index, dtype=np.int64), new_docs


def _advance_stream(progress: Progress, windows: list[Window], counted: int) -> None:
    last = windows[-1]
    progress.stream_contexts += len(windows)
    progress.stream_tokens += counted
    progress.stream_batches += 1
    progress.next_doc, progress.next_window = last.doc_ordinal, last.window_in_doc + 1


# --- the catalogue's rows --------------------------------------------------------------------------


def coder_record(config: IndexConfig, coder: Coder, progress: Progress, cooccurrence_tokens: int | None = None) -> dict:
    """The coder's row of the catalogue. A multi-layer coder's hook names every layer it reads
    (model.layers.{5,9,12}.output), `layer` is the first of them and `layers` all of them;
    `cooccurrence_tokens`: the tokens its features' co-firing partners were counted on."""
    if coder.kind in ("transcoder", "skip_transcoder", "clt"):
        site = "transcoder"
    else:
        site = hook_site_kind(coder.hooks[0])
    if site not in ("res", "mlp", "att", "transcoder"):
        site = "other"
    return dict(
        coder_id=coder.coder_id, model=config.model, hook=coder.hook, hook_out=coder.hook_out, site=site,
        layer=coder.layer, architecture=coder.architecture, kind=coder.kind, d_in=coder.d_in,
        d_out=coder.d_out, width=coder.width, source=_absolute_if_local(coder.source),
        tokens_indexed=progress.stream_tokens, contexts_indexed=progress.stream_contexts, context=config.context,
        top_k=config.stats.top_k, layers=coder.layers if coder.kind in MULTI_LAYER_KINDS else None,
        cooccurrence_tokens=cooccurrence_tokens,
    )


def _absolute_if_local(source: str | None) -> str:
    """Local coder paths are stored absolute, so the catalogue can reload them from anywhere."""
    if source and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source or ""
