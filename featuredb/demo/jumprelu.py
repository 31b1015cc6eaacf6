"""JumpReLU coders trained the way Gemma Scope trains them: SAEs, skip transcoders, crosscoders and
cross-layer transcoders (CLTs).

The model (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
SAEs"; Google DeepMind's JumpReLUMultiLayerSAE for the multi-slot layout) has S input slots, F
features per slot and S_out output slots; every feature reads its own slot only and writes to every
output slot:

    z[l]    = x[l] @ W_enc[l] + b_enc[l]                          [B, F]   pre-activations of slot l
    a[l]    = z[l] * H(z[l] - theta[l])                           JumpReLU, theta = exp(log_threshold) > 0
    y_hat   = sum_l a[l] @ W_dec[l] + b_dec (+ x[0] @ W_skip)     W_dec[l] is [F, S_out * d_out]

    SAE          S = S_out = 1, y = x                    (one residual-stream site)
    transcoder   S = S_out = 1, x = MLP input (pre_feedforward_layernorm.output), y = MLP output
                 (post_feedforward_layernorm.output), with the affine skip x @ W_skip
    crosscoder   S = S_out layers, y = x: out[m] = sum_l a[l] @ W_dec[l, :, m, :] + b_dec[m]
    clt          S = S_out = every layer, x[l] = layer l's MLP input, y[m] = layer m's MLP output, and
                 causal: W_dec[l, :, m, :] = 0 for m < l (a feature writes to its own layer's MLP
                 output and every later one), held at zero through initialisation, steps and resampling

Loss = FVU + lam * (L0 / L0_target - 1)^2, FVU = sum |y_hat - y|^2 / sum |y - mean(y)|^2 over the
batch and L0 = active features per token (all slots together). The Heaviside step has no useful
derivative, so the threshold gets the paper's straight-through pseudo-derivatives with a rectangle
kernel K(u) = 1{|u| < 1/2} of bandwidth eps:

    d a / d theta      := -(theta / eps) * K((z - theta) / eps)        (the jump of the JumpReLU)
    d H(z - theta) / d theta := -(1 / eps) * K((z - theta) / eps)      (the L0 count)
    d a / d z = H(z - theta), d H / d z = 0                            (no STE into z: the L0 term
                                                                        trains the thresholds only)

The bandwidth eps decides how many entries near the threshold get a gradient. Measured on Gemma 3 270M
(width 2,048, L0 60, 2 epochs of 100k tokens, 1,024 a step; held-out FVE / dead share): eps 0.1 gave layer 3 / 9 / 15
0.869 / 0.782 / 0.535 with 10 / 34 / 38% dead; eps 0.3 gives 0.925 / 0.840 / 0.652 with 16 / 8 / 12% dead
(skip transcoder 0.778, crosscoder 0.683 with 5% dead); eps 0.5 helps layer 15 (0.72) but kills layer 3
(87% dead), and 1.0 kills layer 15: thresholds start near 0.06 after the initial shrink, so a wide
window drags many of them to zero and the L0 term then raises them all together. A short run needs the
narrow window: 64 steps of 256 tokens (a crosscoder over layers 1 / 3 / 5, 3 x 64 features) leave 13%
of the features dead at eps 0.1 and 62% at 0.3. So the default stays 0.1 and `featuredb demo`, whose
runs are long enough, asks for 0.3 (DemoConfig.bandwidth).

Why a quadratic penalty on (L0 / target - 1) (as dictionary_learning's JumpReluTrainer) rather than
Gemma Scope's fixed L0 coefficient: its derivative 2 lam (L0 / target - 1) / target acts as an L0
coefficient that follows the batch's L0 at every step (a proportional controller), so no coefficient
sweep is needed and nothing oscillates. Under Adam, which normalises each threshold's gradient, what
decides whether L0 holds is that the thresholds can move as fast as the encoder changes the
pre-activations (threshold_lr); lam only sets how far off target the penalty starts to win. Measured
with the defaults: held-out L0 within 5% of the target on Gemma 3 270M activations and on synthetic data.
An adapted coefficient (an integral controller) reaches the target exactly, over more steps than a short
run has.

Initialisation (scaled units, below), from the first `init_tokens` tokens:
- decoder rows are unit vectors and stay unit (the part of their gradient along the row is removed and
  they are renormalised after each step, as in Gemma Scope);
- W_enc[l] = the random decoder's own block transposed, read in the whitened stream (a residual stream
  is anisotropic: random raw directions all read its top principal components, fire on the same tokens
  and die together), columns unit; b_enc = -mean(x) @ W_enc (centred pre-activations);
- each threshold = the (1 - L0_target / (S F)) quantile of its feature's pre-activations, so training
  starts at the target L0 with every feature firing;
- a transcoder's W_skip = the ridge least-squares map x -> y (the MLP's linear part), b_dec = mean(y) -
  mean(x) @ W_skip; otherwise b_dec = mean(y);
- each decoder row is then aimed at what is left to explain where its feature fires, and W_enc, b_enc
  and theta are scaled together (the same features fire) by the least-squares factor of the features'
  joint reconstruction, so training starts at FVU <= 1 instead of adding noise.

Input scaling (as featuredb.demo.train): each slot l is multiplied by one constant s_l so that its
centred tokens have mean squared norm d, so the learning rates and eps mean the same thing at every
layer, and a crosscoder weighs its layers equally although Gemma 3's residual grows ~300x with depth.
`to_raw_units` folds the scales into the weights: the saved coder works on raw activations, each
feature's activation is its coefficient in raw units of its own slot's output, and decoder rows keep
their unit norm for an SAE.

Speed on a CPU: matrix products run in bf16 where the CPU multiplies bf16 natively
(featuredb.runtime.device.fast_bf16; ~5x float32 with AMX), accumulating in float32. The forward pass
finds the "support", the entries with z > theta - eps/2 (active, or inside the kernel's window; a few
percent of [B, F]), and decodes from it alone (embedding_bag); the backward pass is three dense
products (g_y @ W_dec^T read at the support, x^T @ dL/dz and a^T @ g_y), which beat sparse kernels on such
a CPU. Adam is torch's fused one: the unfused one cost more than the forward and backward together.

    coder, metrics = train_jumprelu([acts[h]], config=JumpReLUConfig(width=4096, l0_target=64),
                                    hooks_in=[h])
    print(evaluate_jumprelu(coder, [held_out]))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from featuredb.demo.clones import count_clones
from featuredb.runtime.coders import SparseCoder
from featuredb.runtime.device import fast_bf16
from featuredb.runtime.hooks import parse_hook

KINDS = ("sae", "transcoder", "crosscoder", "clt")


@dataclass
class JumpReLUConfig:
    width: int = 4096  # features per slot (F); a crosscoder has S * F features in all
    l0_target: float = 64.0  # wanted active features per token, all slots together
    l0_coef: float = 10.0  # lam in lam * (L0 / l0_target - 1)^2 (see the module doc)
    bandwidth: float = 0.1  # eps of the rectangle kernel, in scaled units (the demo's is wider: module doc)
    lr: float = 0.02  # Adam on the weight matrices, relative: steps of lr x the matrix's RMS entry at init
    bias_lr: float = 1e-2  # Adam on b_enc and b_dec: a short run must move them by O(1) in scaled units
    threshold_lr: float = 0.05  # Adam on log_threshold: thresholds must follow the encoder as it learns
    enc_init_scale: float = 1.0  # encoder columns start at this norm (pre-activations ~ this x N(0, 1))
    batch_size: int = 1024  # tokens per step
    epochs: float = 2.0  # passes over the activations (when steps is None)
    steps: int | None = None  # overrides epochs
    warmup_steps: int = 10  # linear warm-up of the learning rates
    decay_fraction: float = 0.2  # the learning rates fall linearly to 0 over this last share of steps
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    skip: bool | None = None  # affine skip x @ W_skip; None: for transcoders only
    ridge: float = 1e-3  # relative ridge of the least-squares W_skip initialisation
    normalize: bool = True  # scale each slot so centred tokens have mean squared norm d (module doc)
    matmul_dtype: str = "auto"  # the dense encoder product: float32 | bfloat16 | auto (bf16 where native)
    init_tokens: int = 8192  # tokens for the threshold quantiles and the W_skip least squares
    dead_after_tokens: int = 10_000  # a feature that has not fired for this many training tokens is dead
    resample_every: int = 25  # steps between resamplings of dead features (0: never)
    resample_until: float = 0.7  # ... up to this share of the steps, so the last ones train what they revived
    resample_pool: int = 4096  # tokens whose loss each resampling measures (more than one batch: see resample)
    resample_max_cosine: float = 0.9  # a token whose error direction is this close to one drawn before is skipped
    seed: int = 0
    progress: bool = True  # tqdm bar with tokens/s


# --- the trained coder in raw units (what is saved) --------------------------------------------------


@dataclass
class JumpReLUCoder:
    """A trained JumpReLU coder with S input slots, in raw activation units (module doc)."""

    kind: str  # "sae" | "transcoder" | "crosscoder" | "clt"
    hooks_in: list[str]  # one hook per input slot (our names: featuredb.runtime.hooks)
    hooks_out: list[str]  # one hook per output slot
    w_enc: Tensor  # [S, d_in, F]
    b_enc: Tensor  # [S, F]
    threshold: Tensor  # [S, F], > 0
    w_dec: Tensor  # [S, F, S_out, d_out]
    b_dec: Tensor  # [S_out, d_out]
    affine_skip: Tensor | None = None  # [d_in, d_out], single slot only
    l0_target: float = 0.0
    model_name: str | None = None

    @property
    def n_slots(self) -> int:
        return self.w_enc.shape[0]

    @property
    def width(self) -> int:  # features per slot
        return self.w_enc.shape[2]

    def encode(self, xs: list[Tensor]) -> list[Tensor]:
        """Raw activations, one [B, d_in] per input slot -> feature activations, one [B, F] per slot."""
        out = []
        for l, x in enumerate(xs):
            z = x.float() @ self.w_enc[l] + self.b_enc[l]
            out.append(z.masked_fill(z <= self.threshold[l], 0.0))  # pre at the threshold is off
        return out

    def decode(self, acts: list[Tensor], xs: list[Tensor] | None = None) -> list[Tensor]:
        """Feature activations per slot -> outputs, one [B, d_out] per output slot."""
        y = self.b_dec.flatten() + sum(a @ self.w_dec[l].flatten(1) for l, a in enumerate(acts))
        if self.affine_skip is not None:
            if xs is None:
                raise ValueError("a skip transcoder decodes with its input: pass xs")
            y = y + xs[0].float() @ self.affine_skip
        return list(y.view(len(y), *self.b_dec.shape).unbind(1))

    def to_sparse_coder(self, coder_id: str) -> SparseCoder:
        """The single-slot coder (SAE or transcoder) as featuredb's runtime SparseCoder."""
        if self.n_slots != 1:
            raise ValueError("only a single-slot coder (SAE or transcoder) is a SparseCoder")
        kind = "sae" if self.kind == "sae" else ("skip_transcoder" if self.affine_skip is not None else "transcoder")
        return SparseCoder(
            coder_id=coder_id, architecture="jumprelu", kind=kind, hook=self.hooks_in[0],
            hook_out=self.hooks_out[0], layer=parse_hook(self.hooks_in[0]).layer,
            W_enc=self.w_enc[0], b_enc=self.b_enc[0], W_dec=self.w_dec[0, :, 0], b_dec=self.b_dec[0],
            threshold=self.threshold[0], affine_skip=self.affine_skip, model_name=self.model_name,
        )  # fmt: skip


# --- support helpers (rows = tokens, columns = features) ------------------------------------------


@dataclass
class Support:
    """One slot's support entries (z > theta - eps/2) of a batch, and what the backward pass needs."""

    rows: Tensor  # [nnz] token, sorted
    cols: Tensor  # [nnz] feature
    act: Tensor  # [nnz] a = z * H(z - theta) (0 for window-only entries)
    active: Tensor  # [nnz] bool, z > theta
    window: Tensor  # [nnz] float, K((z - theta) / eps)
    theta: Tensor  # [nnz] the entry's threshold


def row_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers [n_rows + 1] of sorted row indices."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


def sparse_rows_matmul(crow: Tensor, cols: Tensor, vals: Tensor, M: Tensor) -> Tensor:
    """S @ M for S [B, n] sparse (CSR: crow, cols, vals) and M [n, e] -> [B, e], touching only S's entries."""
    return F.embedding_bag(cols, M, crow[:-1], mode="sum", per_sample_weights=vals)


def densify(s: Support, vals: Tensor, n_rows: int, n_cols: int, dtype: torch.dtype) -> Tensor:
    """The [n_rows, n_cols] matrix holding vals at the support's entries, zeros elsewhere."""
    out = torch.zeros(n_rows, n_cols, dtype=dtype)
    out[s.rows, s.cols] = vals.to(dtype)
    return out


def distinct_high_loss_tokens(err: Tensor, n: int, max_cosine: float, generator: torch.Generator) -> Tensor:
    """Up to n distinct tokens (rows of err [B, e]) for resampled features, drawn without replacement with
    probability ~ loss^2 = |err|^4 (Anthropic's rule), skipping every token whose error direction has
    cosine > max_cosine with a token drawn before it (a repeated window, the same token in the same kind
    of context): features pointed at such a pair would start as near-clones. Fewer than n when the
    tokens offer fewer."""
    weight = err.double().pow(2).sum(1).pow(2)
    drawable = int((weight > 0).sum())  # multinomial without replacement draws among positive weights only
    if drawable == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.multinomial(weight, drawable, replacement=False, generator=generator)  # a weighted shuffle
    unit = F.normalize(err[order].float(), dim=1)
    chosen = []
    for start in range(0, drawable, 512):  # in chunks, stopping once n are found: not all [B, B] cosines
        stop = min(drawable, start + 512)
        near = (unit[start:stop] @ unit[:stop].T > max_cosine) & (
            torch.arange(stop)[None, :] < torch.arange(start, stop)[:, None])
        chosen.append(order[start:stop][~near.any(1)])
        if sum(len(c) for c in chosen) >= n:
            break
    return torch.cat(chosen)[:n]


# --- the trainer (scaled units) ----------------------------------------------------------------------


class JumpReLUTrainer:
    """Parameters, hand-written forward/backward and the Adam optimiser of a JumpReLU coder."""

    def __init__(self, d_in: int, d_out: int, n_slots: int, n_out: int, config: JumpReLUConfig, skip: bool,
                 generator: torch.Generator, causal: bool = False):
        S, Fw = n_slots, config.width
        self.config, self.n_out, self.d_out, self.generator = config, n_out, d_out, generator
        # a CLT's slot l writes to output layers m >= l only: [S, 1, n_out * d_out], 1 where it may write
        self.writable = None
        if causal:
            blocks = torch.arange(n_out)[None, :] >= torch.arange(S)[:, None]  # [S, n_out]
            self.writable = blocks.repeat_interleave(d_out, dim=1)[:, None, :].float()
        W_dec = torch.randn(S, Fw, n_out * d_out, generator=generator)
        if self.writable is not None:
            W_dec *= self.writable
        self.W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        # the slot's own output block (slot l writes out[l]; a transcoder's block is all of it), transposed
        own = [self.W_dec[l, :, (l if n_out == S else 0) * d_out:][:, :d_out] for l in range(S)]
        W_enc = torch.stack([o.T if d_in == d_out else torch.randn(d_in, Fw, generator=generator) for o in own])
        self.W_enc = config.enc_init_scale * W_enc / W_enc.norm(dim=1, keepdim=True)
        self.b_enc = torch.zeros(S, Fw)
        self.log_threshold = torch.zeros(S, Fw)
        self.b_dec = torch.zeros(n_out * d_out)
        self.W_skip = torch.zeros(d_in, d_out) if skip else None
        self.params = {"W_enc": self.W_enc, "b_enc": self.b_enc, "log_threshold": self.log_threshold,
                       "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            self.params["W_skip"] = self.W_skip
        self.rms = {name: 1.0 for name in ("W_enc", "W_dec", "W_skip") if name in self.params}  # see initialise
        groups = [{"params": [p], "name": name, "lr": 0.0} for name, p in self.params.items()]  # set per step
        # fused: one pass per parameter instead of ~10 (15x faster on a CPU, where Adam on the two
        # [d, F] matrices would otherwise cost more than the whole forward and backward)
        self.optimizer = torch.optim.Adam(groups, betas=config.betas, fused=True)

    def first_output(self, slot: int) -> int:
        """The first column of W_dec[slot] it may write: slot * d_out for a CLT (causal), else 0."""
        return slot * self.d_out if self.writable is not None else 0

    def learning_rate(self, name: str) -> float:
        """Adam's step size: matrices relative to their RMS entry (W_enc's scale is set by the data, and an
        absolute step that suits d = 32 rewrites a d = 640 encoder in a few steps and kills its features);
        biases in scaled units; log_threshold is relative by construction."""
        cfg = self.config
        if name in self.rms:
            return cfg.lr * self.rms[name]
        return cfg.threshold_lr if name == "log_threshold" else cfg.bias_lr

    @torch.no_grad()
    def initialise(self, xs: list[Tensor], y: Tensor) -> None:
        """b_dec, W_skip and the thresholds from a sample (module doc)."""
        cfg = self.config
        if self.W_skip is not None:
            x = xs[0]
            xc, yc = x - x.mean(0), y - y.mean(0)
            gram = xc.T @ xc
            gram += cfg.ridge * gram.diagonal().mean() * torch.eye(len(gram))
            self.W_skip.copy_(torch.linalg.solve(gram, xc.T @ yc))
            self.b_dec.copy_(y.mean(0) - x.mean(0) @ self.W_skip)
        else:
            self.b_dec.copy_(y.mean(0))
        S, Fw = self.W_enc.shape[0], self.W_enc.shape[2]
        self.precision = []
        for l, x in enumerate(xs):
            # read random directions of the whitened stream: a residual stream is anisotropic, and random
            # raw directions all read its top principal components, fire on the same tokens and die together;
            # b_enc centres each pre-activation (a feature whose direction meets the stream's large mean would
            # start always on or never on); then each feature fires on a share l0_target / (S F) of the tokens
            xc = x - x.mean(0)
            evals, evecs = torch.linalg.eigh(xc.T @ xc / len(x))
            whiten = evecs @ torch.diag(evals.clamp_min(cfg.ridge * evals.mean()).rsqrt()) @ evecs.T
            self.precision.append(whiten @ whiten)  # (ridged) inverse covariance, for resample()
            W = whiten @ self.W_enc[l]
            self.W_enc[l] = cfg.enc_init_scale * W / W.norm(dim=0, keepdim=True)
            self.b_enc[l] = -x.mean(0) @ self.W_enc[l]
            z = x @ self.W_enc[l] + self.b_enc[l]
            k = max(1, min(len(z), len(z) - round(len(z) * cfg.l0_target / (S * Fw))))
            theta = z.kthvalue(k, dim=0).values.clamp_min(cfg.bandwidth)  # theta > 0 (log parametrised)
            self.log_threshold[l] = theta.log()
            # aim each decoder row at what is left to explain where its feature fires: a random row would
            # add noise of ~ L0 theta^2 to every reconstruction (a transcoder's or crosscoder's output
            # space is not its input's, so W_enc^T is no better); a feature silent here keeps its row
            residual = y - self.b_dec - (x @ self.W_skip if self.W_skip is not None else 0)
            aimed = (z * (z > theta)).T @ residual  # [F, S_out * d_out]
            if self.writable is not None:
                aimed *= self.writable[l]
            norm = aimed.norm(dim=1, keepdim=True)
            self.W_dec[l] = torch.where(norm > 0, aimed / norm.clamp_min(1e-30), self.W_dec[l])
        # features read random directions that share the stream's top principal components, so their aimed
        # rows add up: scale every pre-activation (W_enc, b_enc, theta together: the same features fire) by
        # the least-squares factor c of their joint reconstruction, so training starts at FVU <= 1
        recon = sum((z * (z > th)) @ self.W_dec[l] for l, (z, th) in enumerate(
            (x @ self.W_enc[l] + self.b_enc[l], self.log_threshold[l].exp()) for l, x in enumerate(xs)))
        residual = y - self.b_dec - (xs[0] @ self.W_skip if self.W_skip is not None else 0)
        c = float((recon * residual).sum() / recon.pow(2).sum().clamp_min(1e-30))
        c = min(max(c, 0.05), 1.0)  # only ever shrink, and not into the bandwidth
        self.W_enc *= c
        self.b_enc *= c
        self.log_threshold += math.log(c)
        self.rms = {name: float(self.params[name].pow(2).mean().sqrt().clamp_min(1e-8))
                    for name in ("W_enc", "W_dec", "W_skip") if name in self.params}

    def forward(self, xs: list[Tensor], mm_dtype: torch.dtype) -> tuple[Tensor, list[Support]]:
        """y_hat [B, S_out * d_out] and each slot's support (module doc)."""
        eps = self.config.bandwidth
        theta = self.log_threshold.exp()
        B = xs[0].shape[0]
        y_hat = self.b_dec.expand(B, -1).clone()
        if self.W_skip is not None:
            y_hat += xs[0] @ self.W_skip
        supports = []
        for l, x in enumerate(xs):
            z = torch.addmm(self.b_enc[l].to(mm_dtype), x.to(mm_dtype), self.W_enc[l].to(mm_dtype))  # [B, F]
            # the window is cut at 0: z <= 0 never fires (theta > 0), and a tiny theta would take half of z
            rows, cols = (z > (theta[l] - eps / 2).clamp_min(0).to(mm_dtype)).nonzero().unbind(1)
            pre = z[rows, cols].float()
            th = theta[l, cols]
            active = pre > th
            act = pre * active
            window = ((pre - th).abs() < eps / 2).float()
            lo = self.first_output(l)
            y_hat[:, lo:] += sparse_rows_matmul(row_pointers(rows, B), cols, act, self.W_dec[l, :, lo:])
            supports.append(Support(rows, cols, act, active, window, th))
        return y_hat, supports

    def loss_and_grads(self, xs: list[Tensor], y: Tensor, mm_dtype: torch.dtype = torch.float32,
                       ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """FVU, L0 and the penalty of batch (xs, y), and the (STE) gradients of FVU + penalty."""
        cfg = self.config
        B, Fw = y.shape[0], cfg.width
        y_hat, supports = self.forward(xs, mm_dtype)
        self.fired = torch.zeros(len(supports), cfg.width, dtype=torch.bool)  # for the dead-feature count
        for l, s in enumerate(supports):
            self.fired[l, s.cols[s.active]] = True
        err = y_hat - y
        total_var = (y - y.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        l0 = sum(float(s.active.sum()) for s in supports) / B
        penalty = cfg.l0_coef * (l0 / cfg.l0_target - 1) ** 2

        g_y = 2 * err / total_var  # dFVU / dy_hat
        g_l0 = 2 * cfg.l0_coef * (l0 / cfg.l0_target - 1) / cfg.l0_target  # dpenalty / dL0
        grads = {name: torch.zeros_like(p) for name, p in self.params.items() if name not in ("W_enc", "W_dec")}
        g_W_enc, g_W_dec = [], []
        for l, (x, s) in enumerate(zip(xs, supports)):
            # dense products (bf16 where native) read at the support / fed by it: the matmul beats any
            # sparse kernel on a CPU with AMX, and keeps the math as written
            # a CLT's slot l writes only to outputs m >= l: the products skip the zero blocks (half the work)
            lo = self.first_output(l)
            g_out = g_y[:, lo:].to(mm_dtype)
            g_act = (g_out @ self.W_dec[l, :, lo:].T.to(mm_dtype))[s.rows, s.cols].float()  # dFVU / da
            g_pre = g_act * s.active  # d a / d z = H(z - theta)
            # theta: the jump, -(theta/eps) K g_act, and the L0 count, -(1/eps) K / B per entry
            g_theta = -(s.window / cfg.bandwidth) * (s.theta * g_act + g_l0 / B)
            grads["log_threshold"][l].index_add_(0, s.cols, g_theta * s.theta)  # d theta / d log theta = theta
            grads["b_enc"][l].index_add_(0, s.cols, g_pre)
            g_W_enc.append((x.T.to(mm_dtype) @ densify(s, g_pre, B, Fw, mm_dtype)).float())  # x^T @ dL/dz
            g_W_dec_l = torch.zeros_like(self.W_dec[l])
            g_W_dec_l[:, lo:] = densify(s, s.act, B, Fw, mm_dtype).T @ g_out  # a^T @ dL/dy_hat
            g_W_dec.append(g_W_dec_l)
        grads["W_enc"], grads["W_dec"] = torch.stack(g_W_enc), torch.stack(g_W_dec)
        grads["b_dec"] = g_y.sum(0)
        if self.W_skip is not None:
            grads["W_skip"] = xs[0].T @ g_y
        metrics = dict(fvu=float(fvu), l0=l0, penalty=penalty)
        return metrics, grads

    def train_step(self, xs: list[Tensor], y: Tensor, lr_scale: float, mm_dtype: torch.dtype) -> dict[str, float]:
        """One Adam step; decoder rows stay on the unit sphere (gradient along the row removed, renormalised)."""
        metrics, grads = self.loss_and_grads(xs, y, mm_dtype)
        W_dec, g_W_dec = self.W_dec, grads["W_dec"]
        if self.writable is not None:
            g_W_dec *= self.writable  # Adam then never moves a zero entry: its moments stay zero
        g_W_dec -= (g_W_dec * W_dec).sum(-1, keepdim=True) * W_dec
        for group in self.optimizer.param_groups:
            group["params"][0].grad = grads[group["name"]]
            group["lr"] = lr_scale * self.learning_rate(group["name"])
        self.optimizer.step()
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        return metrics

    @torch.no_grad()
    def resample(self, xs: list[Tensor], y: Tensor, dead: Tensor, mm_dtype: torch.dtype) -> Tensor:
        """Give the dead features [S, F] (bool) a new job on these tokens; returns the features resampled
        ([S, F] bool: fewer than the dead ones when the tokens offer fewer distinct jobs).

        A JumpReLU feature whose threshold has risen above all its pre-activations gets no gradient
        again: on Gemma 3 activations most features of a short run end so (77% of 4096 at layer 9).
        As Anthropic's resampling (Bricken et al. 2023) does for ReLU SAEs, each dead feature is pointed
        at one token drawn with probability ~ the square of its loss |error|^2: its decoder row becomes
        that token's unit error, its encoder reads the token's centred input through the inverse
        covariance (so it fires on similar tokens, not on the stream's top principal components), at
        the alive features' mean encoder norm, centred, and its threshold is set so it fires on its
        share l0_target / (S F) of the tokens. Adam forgets its moments for the entries rewritten.

        Every resampled feature gets its own token (distinct_high_loss_tokens): two features pointed at
        one token get the same encoder, threshold and decoder row, hence the same gradients at every step
        after, and stay clones for good (drawn with replacement from one batch, 629 pairs of the demo's
        layer-9 SAE's live features had decoder cosine > 0.99)."""
        dead_ids = dead.nonzero()
        if len(dead_ids) == 0:
            return torch.zeros_like(dead)
        y_hat, _ = self.forward(xs, mm_dtype)
        err = y - y_hat
        tokens = distinct_high_loss_tokens(err, len(dead_ids), self.config.resample_max_cosine, self.generator)
        # when the tokens offer fewer jobs than there are dead features, a random subset of them (every
        # slot alike) is resampled now and the others wait for the next resampling
        dead_ids = dead_ids[torch.randperm(len(dead_ids), generator=self.generator)[:len(tokens)]]
        resampled = torch.zeros_like(dead)
        resampled[dead_ids[:, 0], dead_ids[:, 1]] = True
        S, Fw = self.W_enc.shape[0], self.W_enc.shape[2]
        keep = max(1, min(len(y), len(y) - round(len(y) * self.config.l0_target / (S * Fw))))
        state = self.optimizer.state
        for l, x in enumerate(xs):
            in_slot = dead_ids[:, 0] == l
            cols, t = dead_ids[in_slot, 1], tokens[in_slot]
            if len(cols) == 0:
                continue
            self.W_dec[l, cols] = F.normalize(err[t] * (self.writable[l] if self.writable is not None else 1), dim=1)
            mean = x.mean(0)
            w = F.normalize(self.precision[l] @ (x[t] - mean).T, dim=0)  # [d_in, n]
            alive = ~dead[l]
            w *= float(self.W_enc[l][:, alive].norm(dim=0).mean()) if alive.any() else float(self.W_enc[l].norm(dim=0).mean())
            self.W_enc[l][:, cols] = w
            self.b_enc[l, cols] = -mean @ w
            z = x @ w + self.b_enc[l, cols]
            self.log_threshold[l, cols] = z.kthvalue(keep, dim=0).values.clamp_min(self.config.bandwidth).log()
            for name, index in (("W_enc", (l, slice(None), cols)), ("b_enc", (l, cols)),
                                ("log_threshold", (l, cols)), ("W_dec", (l, cols))):
                for moment in state.get(self.params[name], {}).values():
                    if moment.ndim > 0:  # exp_avg, exp_avg_sq (not the step count)
                        moment[index] = 0
        return resampled

    def to_raw_units(self, s_in: Tensor, s_out: Tensor) -> dict[str, Tensor]:
        """Weights for raw activations, given the slot scales s_in [S], s_out [S_out] (module doc):
        activations of slot l are divided by the scale of its own output slot, so nothing else changes."""
        S, Fw = self.W_enc.shape[0], self.W_enc.shape[2]
        own = s_out if len(s_out) == S else s_out.expand(S)  # slot l's own output scale
        w_dec = self.W_dec.view(S, Fw, self.n_out, self.d_out)
        raw = dict(
            w_enc=self.W_enc * (s_in / own)[:, None, None],
            b_enc=self.b_enc / own[:, None],
            threshold=self.log_threshold.exp() / own[:, None],
            w_dec=w_dec * own[:, None, None, None] / s_out[None, None, :, None],
            b_dec=self.b_dec.view(self.n_out, self.d_out) / s_out[:, None],
        )
        if self.W_skip is not None:
            raw["affine_skip"] = self.W_skip * s_in[0] / s_out[0]
        return {name: t.clone().contiguous() for name, t in raw.items()}


# --- training ----------------------------------------------------------------------------------------


@dataclass
class JumpReLUMetrics:
    steps: int
    tokens: int  # training tokens seen (with repeats over epochs)
    seconds: float
    fvu: float  # mean training FVU over the last 10% of steps
    l0: float  # mean training L0 over the last 10% of steps
    scales_in: list[float]  # the input scale s_l of each slot
    scales_out: list[float]
    resampled: int = 0  # dead features given a new job (JumpReLUTrainer.resample), all resamplings together
    dead_share: float = 0.0  # share of features that had not fired for dead_after_tokens at the end
    history: list[dict] = field(default_factory=list, repr=False)  # every ~1% of steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train_jumprelu(inputs: list[Tensor], targets: list[Tensor] | None = None, *, hooks_in: list[str],
                   hooks_out: list[str] | None = None, config: JumpReLUConfig | None = None, kind: str | None = None,
                   model_name: str | None = None, desc: str = "training jumprelu") -> tuple[JumpReLUCoder, JumpReLUMetrics]:
    """Train a JumpReLU coder on activations [N, d] per input slot (float32 or bfloat16; the same N tokens
    in every slot). targets: one [N, d_out] per output slot, None to reconstruct the inputs (SAE,
    crosscoder). kind: default "sae" for one slot reconstructing itself, "crosscoder" for several,
    "transcoder" when targets are given for one slot; "clt" for targets at every input slot's layer."""
    config = config or JumpReLUConfig()
    reconstruct = targets is None
    targets = inputs if reconstruct else targets
    hooks_out = hooks_out or (hooks_in if reconstruct else None)
    kind = kind or ("transcoder" if not reconstruct else ("sae" if len(inputs) == 1 else "crosscoder"))
    _check_inputs(inputs, targets, hooks_in, hooks_out, kind, config)
    N, d_in, d_out = len(inputs[0]), inputs[0].shape[1], targets[0].shape[1]
    skip = config.skip if config.skip is not None else kind == "transcoder"
    generator = torch.Generator().manual_seed(config.seed)

    s_in = torch.tensor([_scale(x, config.normalize) for x in inputs])
    s_out = s_in if reconstruct else torch.tensor([_scale(y, config.normalize) for y in targets])
    trainer = JumpReLUTrainer(d_in, d_out, len(inputs), len(targets), config, skip, generator, causal=kind == "clt")
    mm_dtype = _matmul_dtype(config.matmul_dtype)
    steps = config.steps or max(1, round(config.epochs * N / config.batch_size))
    decay_start = steps - int(config.decay_fraction * steps)

    def batch(idx: Tensor) -> tuple[list[Tensor], Tensor]:
        xs = [x[idx].float() * s for x, s in zip(inputs, s_in.tolist())]
        y = torch.cat(xs, 1) if reconstruct else torch.cat([t[idx].float() * s for t, s in zip(targets, s_out.tolist())], 1)
        return xs, y

    order = torch.randperm(N, generator=generator)
    trainer.initialise(*batch(order[:config.init_tokens]))
    history, tail = [], []
    cursor = 0
    since_fired = torch.zeros(len(inputs), config.width, dtype=torch.long)  # training tokens since each feature fired
    resampled = 0
    resample_until = int(config.resample_until * steps)
    bar = tqdm(total=steps * config.batch_size, unit="tok", unit_scale=True, desc=desc, disable=not config.progress,
               smoothing=0.1)
    start = time.perf_counter()
    for step in range(steps):
        if cursor + config.batch_size > N:  # next epoch: a fresh permutation
            order, cursor = torch.randperm(N, generator=generator), 0
        xs, y = batch(order[cursor:cursor + config.batch_size])
        cursor += config.batch_size
        lr_scale = min(1.0, (step + 1) / max(1, config.warmup_steps))
        if step >= decay_start:
            lr_scale *= (steps - step) / max(1, steps - decay_start)
        m = trainer.train_step(xs, y, lr_scale, mm_dtype)
        since_fired += config.batch_size
        since_fired[trainer.fired] = 0
        dead = since_fired >= config.dead_after_tokens
        m["dead"] = float(dead.float().mean())
        if config.resample_every and step % config.resample_every == 0 and step < resample_until and dead.any():
            # the loss is measured on a random pool of tokens larger than a batch: every resampled feature
            # needs a token of its own, and hundreds of features die together early in a run
            pool = torch.randperm(N, generator=generator)[:max(config.batch_size, config.resample_pool)]
            revived = trainer.resample(*batch(pool), dead, mm_dtype)
            resampled += int(revived.sum())
            since_fired[revived] = 0  # a fresh start: judged again after dead_after_tokens
        if step >= steps - max(1, steps // 10):
            tail.append(m)
        if step % max(1, steps // 100) == 0 or step == steps - 1:
            history.append(dict(step=step, lr_scale=lr_scale, **m))
            bar.set_postfix(fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead']:.1%}")
        bar.update(config.batch_size)
    bar.close()
    seconds = time.perf_counter() - start

    metrics = JumpReLUMetrics(
        steps=steps, tokens=steps * config.batch_size, seconds=seconds,
        fvu=sum(m["fvu"] for m in tail) / len(tail), l0=sum(m["l0"] for m in tail) / len(tail),
        scales_in=s_in.tolist(), scales_out=s_out.tolist(), resampled=resampled,
        dead_share=float((since_fired >= config.dead_after_tokens).float().mean()), history=history,
    )  # fmt: skip
    coder = JumpReLUCoder(kind=kind, hooks_in=[parse_hook(h).name for h in hooks_in],
                          hooks_out=[parse_hook(h).name for h in hooks_out], l0_target=config.l0_target,
                          model_name=model_name, **trainer.to_raw_units(s_in, s_out))
    return coder, metrics


def _check_inputs(inputs: list[Tensor], targets: list[Tensor], hooks_in: list[str], hooks_out: list[str] | None,
                  kind: str, config: JumpReLUConfig) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not inputs or any(x.ndim != 2 or not x.is_floating_point() for x in inputs + targets):
        raise ValueError("activations must be float matrices [tokens, d]")
    if len({len(x) for x in inputs + targets}) != 1:
        raise ValueError("every slot must hold the same tokens (one row per token in each)")
    if len({x.shape[1] for x in inputs}) != 1 or len({y.shape[1] for y in targets}) != 1:
        raise ValueError("every input slot must have one width d_in, every output slot one width d_out")
    if hooks_out is None or len(hooks_in) != len(inputs) or len(hooks_out) != len(targets):
        raise ValueError("give one hook per input slot (hooks_in) and, for targets, one per output slot (hooks_out)")
    if kind in ("sae", "transcoder") and (len(inputs) != 1 or len(targets) != 1):
        raise ValueError(f"a {kind} has one input and one output slot")
    if kind in ("crosscoder", "clt") and len(targets) != len(inputs):
        raise ValueError(f"a {kind} writes to as many layers as it reads")
    if len(inputs[0]) < config.batch_size:
        raise ValueError(f"{len(inputs[0])} tokens are fewer than one batch of {config.batch_size}")
    if not 0 < config.l0_target < config.width * len(inputs):
        raise ValueError(f"l0_target must be in (0, {config.width * len(inputs)}), got {config.l0_target}")


def _scale(x: Tensor, normalize: bool, chunk: int = 65536) -> float:
    """s with s^2 E|x - mean|^2 = d (float64, in chunks: no copy of x); 1.0 when not normalising."""
    if not normalize:
        return 1.0
    mean = sum(x[i:i + chunk].double().sum(0) for i in range(0, len(x), chunk)) / len(x)
    sq = sum(float((x[i:i + chunk].double() - mean).pow(2).sum()) for i in range(0, len(x), chunk))
    if not sq > 0:
        raise ValueError("activations have no variance (every token is the same vector)")
    return math.sqrt(x.shape[1] * len(x) / sq)


def _matmul_dtype(name: str) -> torch.dtype:
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    if name != "auto":
        raise ValueError(f"matmul_dtype must be float32, bfloat16 or auto, got {name!r}")
    return torch.bfloat16 if fast_bf16("cpu") else torch.float32


# --- evaluation --------------------------------------------------------------------------------------


@dataclass
class JumpReLUEval:
    tokens: int
    fve: float  # 1 - sum |y - y_hat|^2 / sum |y - mean(y)|^2, over every output slot together
    fve_per_slot: list[float]  # the same per output slot
    l0: float  # mean active features per token, all slots together
    dead_share: float  # share of all S * F features that never fire on these tokens
    clone_pairs: int = 0  # pairs of live features with decoder cosine > 0.99 (featuredb.demo.clones)
    clones: int = 0  # live features with such a twin of lower index
    features: int = 0  # S * F

    @property
    def clone_share(self) -> float:
        return self.clones / max(1, self.features)

    @property
    def wasted_share(self) -> float:
        """Dead or a clone: features the coder could lose without losing anything it writes."""
        return self.dead_share + self.clone_share


@torch.no_grad()
def evaluate_jumprelu(coder: JumpReLUCoder, inputs: list[Tensor], targets: list[Tensor] | None = None,
                      batch_size: int = 4096) -> JumpReLUEval:
    """Held-out quality of the coder in raw units; targets None: the inputs (SAE, crosscoder)."""
    targets = inputs if targets is None else targets
    N = len(inputs[0])
    if N == 0:
        raise ValueError("no activations to evaluate on")
    means = [sum(y[i:i + batch_size].double().sum(0) for i in range(0, N, batch_size)) / N for y in targets]
    err = torch.zeros(len(targets), dtype=torch.float64)
    var = torch.zeros(len(targets), dtype=torch.float64)
    fired = torch.zeros(coder.n_slots, coder.width, dtype=torch.bool)
    l0 = 0.0
    for i in range(0, N, batch_size):
        xs = [x[i:i + batch_size].float() for x in inputs]
        acts = coder.encode(xs)
        for l, a in enumerate(acts):
            fired[l] |= (a > 0).any(0)
            l0 += float((a > 0).sum())
        for m, (y_hat, y) in enumerate(zip(coder.decode(acts, xs), targets)):
            y = y[i:i + batch_size].double()
            err[m] += float((y_hat.double() - y).pow(2).sum())
            var[m] += float((y - means[m]).pow(2).sum())
    clones = count_clones(coder.w_dec.flatten(0, 1).flatten(1), fired.flatten())
    return JumpReLUEval(tokens=N, fve=float(1 - err.sum() / var.sum()), fve_per_slot=(1 - err / var).tolist(),
                        l0=l0 / N, dead_share=float((~fired).float().mean()), clone_pairs=clones.pairs,
                        clones=clones.clones, features=fired.numel())
