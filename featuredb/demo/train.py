"""A small TopK sparse-autoencoder trainer, written out by hand so the math is visible.

The model (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; SAELens "topk"):

    pre   = (x - b_dec) @ W_enc + b_enc                  [B, n]
    f     = relu(topk_k(pre))                            k latents per token, the rest 0
    x_hat = f @ W_dec + b_dec                            W_dec rows have unit norm

Training minimises the fraction of variance unexplained, FVU = sum |x_hat - x|^2 / sum |x - mean(x)|^2
over a batch, plus AuxK: the k_aux dead latents with the largest pre-activations reconstruct the
residual error e = x - x_hat, and 1/32 of that loss (its own FVU against e) is added, which gives dead
latents a gradient to come back to life. A latent is dead when it has not fired for
`dead_after_tokens` training tokens.

As in sparsify / the OpenAI code: W_enc starts as W_dec.T, b_dec at the mean of the data, the part of
each decoder row's gradient parallel to the row is removed before the Adam step and the rows are
renormalised after it, and the learning rate is 2e-4 / sqrt(width / 16384) by default.

Input scaling: the residual stream of a real model has an arbitrary scale (SmolLM2's grows from ~80
to ~600 across its layers), so activations are multiplied by one constant s = sqrt(d / E|x - mean|^2)
during training (centred tokens then have mean squared norm d, unit variance per dimension) and the
learning rate means the same thing at every layer. The saved coder works on raw activations: with
W_enc and W_dec kept, b_enc and b_dec divided by s, it picks the same latents and its feature
activations are the trained ones divided by s, i.e. each feature's coefficient along its unit
decoder direction in raw residual units, and x_hat comes out in raw units.

Speed on a CPU: the only dense product is the encoder's x @ W_enc, used to pick the top k latents
(optionally in bfloat16, which is ~3x faster on CPUs with AVX512-BF16 and on GPUs); the chosen
pre-activations are then recomputed exactly in float32, and every other product touches only the
k chosen latents per token (sparse gathers and scatters), forward and backward. The backward pass
is written by hand (checked against autograd in tests/test_train.py). Training runs on the CPU.

The defaults follow the long-run recipes (thousands of steps of 4096 tokens). A short run of a few
hundred steps wants smaller steps and a higher rate: scripts/train_demo_saes.py uses 1024 tokens a
step and lr 2e-3 (measured there).

    coder, metrics = train_topk_sae(acts, TrainConfig(width=4096, k=32), hook="model.layers.15.output")
    print(evaluate(coder, held_out, tokens_since_fired=metrics.tokens_since_fired,
                   dead_after_tokens=50_000))
    save_saelens(coder, "saes/L15", model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from featuredb.demo.clones import count_clones
from featuredb.runtime.coders import SparseCoder
from featuredb.runtime.device import cpu_has_fast_bf16
from featuredb.runtime.hooks import HookError, parse_hook


@dataclass
class TrainConfig:
    width: int = 4096  # latents (d_sae)
    k: int = 32  # active latents per token
    lr: float | None = None  # Adam; None: 2e-4 / sqrt(width / 16384)
    batch_size: int = 4096  # tokens per step
    epochs: float = 1.0  # passes over the activations (when steps is None)
    steps: int | None = None  # overrides epochs
    warmup_steps: int = 10  # linear warm-up of the learning rate
    decay_fraction: float = 0.2  # the learning rate falls linearly to 0 over this last share of steps
    dead_after_tokens: int = 50_000  # a latent is dead when it has not fired for this many tokens
    aux_k: int | None = None  # AuxK latents; None: d_in // 2 (as sparsify); 0 turns AuxK off
    aux_coef: float = 1 / 32
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    normalize: bool = True  # scale inputs so centred tokens have mean squared norm d_in (see module doc)
    select_dtype: str = "auto"  # top-k selection matmul: float32 | bfloat16 | auto (bf16 if the CPU has it)
    seed: int = 0
    progress: bool = True  # tqdm bar with tokens/s

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width / 16384)


@dataclass
class TrainMetrics:
    steps: int
    tokens: int  # training tokens seen (with repeats over epochs)
    seconds: float
    lr: float
    scale: float  # the input scale s (1.0 when not normalising)
    fvu: float  # mean training FVU over the last 10% of steps
    dead_share: float  # share of latents that did not fire in the last dead_after_tokens tokens
    tokens_since_fired: Tensor = field(repr=False)  # [width] at the end of training
    history: list[dict] = field(default_factory=list, repr=False)  # every ~1% of steps: step, fvu, aux, dead

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class TopKSAE:
    """Parameters, hand-written forward/backward and Adam state of a TopK SAE (in scaled units)."""

    def __init__(self, d_in: int, width: int, k: int, b_dec: Tensor, generator: torch.Generator):
        self.k = k
        W_dec = torch.randn(width, d_in, generator=generator)
        self.W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # [n, d] unit rows
        self.W_enc = self.W_dec.T.contiguous()  # [d, n]
        self.b_enc = torch.zeros(width)
        self.b_dec = b_dec.clone().float()
        self.params = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        self.adam_m = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.adam_v = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.adam_t = 0

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    def select(self, xc: Tensor, dtype: torch.dtype) -> Tensor:
        """The k latents with the largest pre-activations, [B, k] sorted by latent index."""
        pre = xc.to(dtype) @ self.W_enc.to(dtype) + self.b_enc.to(dtype)
        return pre.topk(self.k, dim=-1, sorted=False).indices.sort(dim=-1).values

    def train_step(self, x: Tensor, lr: float, dead: Tensor | None, aux_k: int, aux_coef: float,
                   select_dtype: torch.dtype = torch.float32, betas: tuple[float, float] = (0.9, 0.999),
                   ) -> tuple[float, float, Tensor]:
        """One Adam step on batch x [B, d]; returns (fvu, aux loss, latents that fired [n] bool)."""
        fvu, aux_loss, fired, grads = self.loss_and_grads(x, dead, aux_k, aux_coef, select_dtype)
        # keep decoder rows on the unit sphere: drop the gradient component along each row, step, renormalise
        W_dec, g_W_dec = self.W_dec, grads["W_dec"]
        g_W_dec -= (g_W_dec * W_dec).sum(1, keepdim=True) * W_dec
        self.adam_step(grads, lr, betas)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        return fvu, aux_loss, fired

    def loss_and_grads(self, x: Tensor, dead: Tensor | None, aux_k: int, aux_coef: float,
                       select_dtype: torch.dtype = torch.float32) -> tuple[float, float, Tensor, dict[str, Tensor]]:
        """FVU, AuxK loss, fired latents [n] bool, and the gradients of fvu + aux_coef * (scaled) AuxK loss."""
        W_enc, b_enc, W_dec, b_dec = self.W_enc, self.b_enc, self.W_dec, self.b_dec

        # forward: only the k chosen latents of each token are ever computed exactly
        xc = x - b_dec
        idx = self.select(xc, select_dtype)  # [B, k]
        pre = gather_dot(xc, W_enc.T, idx) + b_enc[idx]  # [B, k] exact float32 pre-activations
        acts = pre.relu()
        x_hat = sparse_decode(idx, acts, W_dec) + b_dec
        err = x_hat - x
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var

        # backward of fvu (by hand): dL/dx_hat, then through the chosen latents only
        g_xhat = 2 * err / total_var  # [B, d]
        g_pre = gather_dot(g_xhat, W_dec, idx) * (pre > 0)  # dL/dpre[b, j] = g_xhat[b] . W_dec[idx[b, j]]
        g_W_dec = scatter_rows(idx, acts, g_xhat, self.width)  # row i: sum of acts[b, j] * g_xhat[b]
        g_W_enc_T = scatter_rows(idx, g_pre, xc, self.width)  # column i of W_enc: sum of g_pre[b, j] * xc[b]
        g_b_enc = torch.zeros_like(b_enc).index_add_(0, idx.flatten(), g_pre.flatten())
        aux_loss = torch.zeros(())

        # AuxK: the top aux_k dead latents reconstruct the error e = x - x_hat (a fixed target)
        if dead is not None and aux_k > 0 and bool(dead.any()):
            dead_ids = dead.nonzero().squeeze(1)
            kk = min(aux_k, len(dead_ids))
            pre_dead = xc @ W_enc[:, dead_ids] + b_enc[dead_ids]  # [B, n_dead]
            top = pre_dead.topk(kk, dim=-1, sorted=False)
            cols, order = top.indices.sort(dim=-1)  # sorted by latent, as gather_dot wants
            aux_idx, aux_pre = dead_ids[cols], top.values.gather(-1, order)
            aux_acts = aux_pre.relu()
            e = -err
            r = sparse_decode(aux_idx, aux_acts, W_dec) - e
            e_var = (e - e.mean(0)).pow(2).sum()
            weight = aux_coef * min(len(dead_ids) / aux_k, 1.0)  # sparsify: less weight while few are dead
            aux_loss = r.pow(2).sum() / e_var
            g_ehat = weight * 2 * r / e_var
            g_aux_pre = gather_dot(g_ehat, W_dec, aux_idx) * (aux_pre > 0)
            g_W_dec += scatter_rows(aux_idx, aux_acts, g_ehat, self.width)
            g_W_enc_T += scatter_rows(aux_idx, g_aux_pre, xc, self.width)
            g_b_enc.index_add_(0, aux_idx.flatten(), g_aux_pre.flatten())

        # b_dec enters x_hat directly and the encoder through xc = x - b_dec: d pre_i / d b_dec = -W_enc[:, i]
        g_b_dec = g_xhat.sum(0) - W_enc @ g_b_enc

        fired = torch.zeros(self.width, dtype=torch.bool)
        fired[idx[acts > 0]] = True
        grads = {"W_enc": g_W_enc_T.T, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
        return float(fvu), float(aux_loss), fired, grads

    def adam_step(self, grads: dict[str, Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        """Adam, bias corrections folded into the step size (Kingma & Ba, end of section 2)."""
        self.adam_t += 1
        b1, b2 = betas
        step_size = lr * math.sqrt(1 - b2**self.adam_t) / (1 - b1**self.adam_t)
        eps_hat = eps * math.sqrt(1 - b2**self.adam_t)
        for name, p in self.params.items():
            g, m, v = grads[name], self.adam_m[name], self.adam_v[name]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().add_(eps_hat), value=-step_size)


# --- sparse helpers: each touches only the k chosen latents per token ------------------------------


def gather_dot(a: Tensor, M: Tensor, idx: Tensor) -> Tensor:
    """out[b, j] = a[b] . M[idx[b, j]] for a [B, d], M [n, d], idx [B, k] sorted along j -> [B, k]."""
    B, k = idx.shape
    rows = torch.arange(0, B * k + 1, k, device=idx.device)
    zeros = torch.zeros(B * k, dtype=a.dtype, device=a.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta"
        mask = torch.sparse_csr_tensor(rows, idx.flatten(), zeros, (B, M.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, a, M.T, beta=0.0).values().view(B, k)


def scatter_rows(idx: Tensor, w: Tensor, a: Tensor, n: int) -> Tensor:
    """out[i] = sum over (b, j) with idx[b, j] == i of w[b, j] * a[b] -> [n, d] (i.e. S.T @ a, S sparse)."""
    B, k = idx.shape
    tokens = torch.arange(B, device=idx.device).repeat_interleave(k)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        S_T = torch.sparse_coo_tensor(torch.stack([idx.flatten(), tokens]), w.flatten(), (n, B),
                                      check_invariants=False)
        return torch.sparse.mm(S_T, a)


def sparse_decode(idx: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j acts[b, j] * W_dec[idx[b, j]] -> [B, d]."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")


# --- training ----------------------------------------------------------------------------------------


def train_topk_sae(activations: Tensor, config: TrainConfig | None = None, *, hook: str = "model.layers.0.output",
                   coder_id: str = "topk-sae", model_name: str | None = None) -> tuple[SparseCoder, TrainMetrics]:
    """Train a TopK SAE on activations [N, d] (CPU; float32, or bfloat16 to halve the memory: batches
    are converted to float32); returns a SparseCoder that works on raw activations at `hook`, and the
    training metrics."""
    config = config or TrainConfig()
    x_all = activations
    if x_all.ndim != 2 or not x_all.is_floating_point():
        raise ValueError(f"activations must be a float matrix [tokens, d], got {x_all.dtype} {tuple(x_all.shape)}")
    N, d = x_all.shape
    if not 0 < config.k <= config.width:
        raise ValueError(f"k must be in 1..width, got k={config.k} width={config.width}")
    if N < config.batch_size:
        raise ValueError(f"{N} tokens are fewer than one batch of {config.batch_size}")
    site = parse_hook(hook)
    generator = torch.Generator().manual_seed(config.seed)

    mean, centred_msq = _moments(x_all)
    if not centred_msq > 0:
        raise ValueError("activations have no variance (every token is the same vector)")
    scale = math.sqrt(d / centred_msq) if config.normalize else 1.0
    sae = TopKSAE(d, config.width, config.k, mean * scale, generator)
    aux_k = d // 2 if config.aux_k is None else config.aux_k
    select_dtype = _select_dtype(config.select_dtype)
    lr_max = config.learning_rate()
    steps = config.steps or max(1, round(config.epochs * N / config.batch_size))
    decay_start = steps - int(config.decay_fraction * steps)

    since_fired = torch.zeros(config.width, dtype=torch.long)
    history: list[dict] = []
    fvus: list[float] = []
    order = torch.randperm(N, generator=generator)
    cursor = 0
    bar = tqdm(total=steps * config.batch_size, unit="tok", unit_scale=True, desc=f"training {coder_id}",
               disable=not config.progress, smoothing=0.1)
    start = time.perf_counter()
    for step in range(steps):
        if cursor + config.batch_size > N:  # next epoch: a fresh permutation
            order, cursor = torch.randperm(N, generator=generator), 0
        x = x_all[order[cursor:cursor + config.batch_size]].float() * scale
        cursor += config.batch_size

        lr = lr_max * min(1.0, (step + 1) / max(1, config.warmup_steps))
        if step >= decay_start:
            lr *= (steps - step) / max(1, steps - decay_start)
        dead = since_fired >= config.dead_after_tokens
        fvu, aux, fired = sae.train_step(x, lr, dead, aux_k, config.aux_coef, select_dtype, config.betas)
        since_fired += config.batch_size
        since_fired[fired] = 0
        fvus.append(fvu)
        if step % max(1, steps // 100) == 0 or step == steps - 1:
            history.append(dict(step=step, fvu=fvu, aux=aux, dead=float(dead.float().mean()), lr=lr))
            bar.set_postfix(fvu=f"{fvu:.3f}", dead=f"{float(dead.float().mean()):.1%}")
        bar.update(config.batch_size)
    bar.close()
    seconds = time.perf_counter() - start

    tail = fvus[-max(1, steps // 10):]
    metrics = TrainMetrics(
        steps=steps, tokens=steps * config.batch_size, seconds=seconds, lr=lr_max, scale=scale,
        fvu=sum(tail) / len(tail), dead_share=float((since_fired >= config.dead_after_tokens).float().mean()),
        tokens_since_fired=since_fired, history=history,
    )
    # back to raw units: same latents chosen, activations divided by the scale (see the module doc)
    coder = SparseCoder(
        coder_id=coder_id, architecture="topk", kind="sae", hook=site.name, hook_out=site.name, layer=site.layer,
        W_enc=sae.W_enc.clone(), b_enc=sae.b_enc / scale, W_dec=sae.W_dec.clone(), b_dec=sae.b_dec / scale,
        k=config.k, apply_b_dec_to_input=True, model_name=model_name,
    )
    return coder, metrics


def _moments(x: Tensor, chunk: int = 65536) -> tuple[Tensor, float]:
    """Mean [d] and mean squared norm of the centred rows, in float64 and in chunks (no copy of x)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].double().sum(0)
    mean = total / len(x)
    sq = 0.0
    for i in range(0, len(x), chunk):
        sq += float((x[i:i + chunk].double() - mean).pow(2).sum())
    return mean.float(), sq / len(x)


def _select_dtype(name: str) -> torch.dtype:
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    if name != "auto":
        raise ValueError(f"select_dtype must be float32, bfloat16 or auto, got {name!r}")
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# --- evaluation --------------------------------------------------------------------------------------


@dataclass
class EvalMetrics:
    tokens: int
    fve: float  # 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2 on these tokens
    l0: float  # mean active latents per token
    dead_share: float  # never fired here (and, if given, not in the training tail either)
    dead_share_here: float  # never fired on these tokens
    clone_pairs: int = 0  # pairs of live latents with decoder cosine > 0.99 (featuredb.demo.clones)
    clones: int = 0  # live latents with such a twin of lower index
    width: int = 0  # latents in all

    @property
    def wasted_share(self) -> float:
        """Dead or a clone: latents the SAE could lose without losing anything it writes."""
        return self.dead_share + self.clones / max(1, self.width)


@torch.no_grad()
def evaluate(coder: SparseCoder, activations: Tensor, *, tokens_since_fired: Tensor | None = None,
             dead_after_tokens: int | None = None, batch_size: int = 4096) -> EvalMetrics:
    """Reconstruction quality of the coder (as saved: raw units) on held-out activations [N, d]."""
    N = len(activations)
    if N == 0:
        raise ValueError("no activations to evaluate on")
    mean, _ = _moments(activations)
    err = var = 0.0
    l0 = 0.0
    fired = torch.zeros(coder.width, dtype=torch.bool)
    for i in range(0, N, batch_size):
        x = activations[i:i + batch_size].float()
        f = coder.encode(x)
        active = f > 0
        fired |= active.any(0)
        l0 += float(active.sum())
        err += float((coder.decode(f) - x).pow(2).sum())
        var += float((x - mean).pow(2).sum())
    dead_here = ~fired
    dead = dead_here
    if tokens_since_fired is not None:
        dead = dead & (tokens_since_fired >= (dead_after_tokens or 0))
    clones = count_clones(coder.W_dec, ~dead)
    return EvalMetrics(tokens=N, fve=1 - err / var, l0=l0 / N, dead_share=float(dead.float().mean()),
                       dead_share_here=float(dead_here.float().mean()), clone_pairs=clones.pairs,
                       clones=clones.clones, width=coder.width)


# --- saving ------------------------------------------------------------------------------------------


def transformer_lens_hook(hook: str) -> str:
    """`model.layers.L.output` -> `blocks.L.hook_resid_post` (`.input` -> hook_resid_pre); a
    TransformerLens name passes through."""
    if hook.startswith("blocks."):
        return hook
    site = parse_hook(hook)
    if site.module_path == "" and site.point == "output":
        return f"blocks.{site.layer}.hook_resid_post"
    if site.module_path == "" and site.point == "input":
        return f"blocks.{site.layer}.hook_resid_pre"
    raise HookError(f"hook {hook!r}: save_saelens writes residual-stream SAEs only (layer input or output)")


# The SAELens 6 layout: SAEConfig fields (d_in, d_sae, dtype, ...) and the architecture's own fields (k,
# rescale_acts_by_decoder_norm) at the top level, what the SAE was trained on under "metadata". SAELens 6
# reads a file whose metadata.sae_lens_version is missing, null or < 6.0.0-rc.0 as pre-6 and rebuilds
# metadata from top-level keys only, dropping hook_name, model_name and context_size; so we declare the
# first 6.x layout. sae_lens_training_version stays null: SAELens writes null there for every SAE it did
# not train itself (its Gemma Scope, Llama Scope... converters).
SAELENS_FORMAT_VERSION = "6.0.0"


def save_saelens(coder: SparseCoder, directory: str | Path, hook_name: str | None = None,
                 model_name: str | None = None, *, context_size: int | None = None,
                 dataset_path: str | None = None, extra_metadata: dict | None = None) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` in SAELens 6's format (architecture "topk").

    hook_name: TransformerLens form (`blocks.L.hook_resid_post`); default from coder.hook.
    `load_coder(directory)` reads it back with the hook `model.layers.L.output`, and SAELens 6's
    `SAE.load_from_disk(directory)` with its hook_name, model_name and context_size.
    """
    from safetensors.torch import save_file

    if coder.architecture != "topk" or coder.kind != "sae" or not coder.apply_b_dec_to_input:
        raise ValueError("save_saelens writes TopK SAEs that subtract b_dec from their input")
    norms = coder.W_dec.detach().float().norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        # rescale_acts_by_decoder_norm=True (below) is only a no-op for unit decoder rows
        raise ValueError(f"save_saelens writes TopK SAEs with unit-norm decoder rows; norms range "
                         f"{float(norms.min()):.4g}..{float(norms.max()):.4g}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hook_name = transformer_lens_hook(hook_name or coder.hook)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in (("W_enc", coder.W_enc), ("W_dec", coder.W_dec),
                               ("b_enc", coder.b_enc), ("b_dec", coder.b_dec))}
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name or coder.model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "hf_hook_name": coder.hook,  # the exact site in HF module names, as SAELens records for Gemma Scope 2
        "prepend_bos": True,
        "context_size": context_size,
        "dataset_path": dataset_path,
        "trained_with": "featuredb.demo.train",
        **(extra_metadata or {}),
    }
    cfg = {
        "architecture": "topk",
        "d_in": coder.d_in,
        "d_sae": coder.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "k": coder.k,
        # True, as SAELens' own TopK trainer saves: with unit decoder rows it changes no activation, and
        # SAELens' TopKSAE.fold_W_dec_norm (SAEDashboard calls it before anything else) refuses False
        "rescale_acts_by_decoder_norm": True,
        "metadata": metadata,
    }
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return directory
