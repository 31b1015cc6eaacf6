"""featuredb.demo.jumprelu (JumpReLU SAE / skip transcoder / crosscoder trainer) and
featuredb.demo.gemma_scope_format (Gemma Scope 2's files), on synthetic data with known sparse structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from featuredb.demo.gemma_scope_format import coder_folder, gemma_scope_config, save_gemma_scope_2, width_tag
from featuredb.demo.clones import count_clones
from featuredb.demo.jumprelu import (JumpReLUConfig, JumpReLUTrainer, distinct_high_loss_tokens, evaluate_jumprelu,
                                     train_jumprelu)
from featuredb.demo.train import evaluate
from featuredb.runtime.coders import load_coder
from test_train import one_thread  # noqa: F401  (autouse: small tensors run fastest on one thread)

RES = "model.layers.{}.output"
MLP_IN, MLP_OUT = "model.layers.3.pre_feedforward_layernorm.output", "model.layers.3.post_feedforward_layernorm.output"


def sparse_codes(n: int, n_dirs: int, active: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n_dirs] codes with `active` random positive entries per token."""
    which = torch.randint(0, n_dirs, (n, active), generator=gen)
    return torch.zeros(n, n_dirs).scatter_add_(1, which, 0.5 + 2 * torch.rand(n, active, generator=gen))


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


def residual_like(n: int, d: int = 32, n_dirs: int = 96, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokens = sparse codes @ a random unit dictionary * 5, on a large offset, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    D = unit_rows(n_dirs, d, gen)
    offset = 3 * torch.randn(d, generator=gen)
    return 5 * sparse_codes(n, n_dirs, active, gen) @ D + offset + 0.05 * torch.randn(n, d, generator=gen)


SMALL = JumpReLUConfig(width=192, l0_target=3, batch_size=256, epochs=6, matmul_dtype="float32", progress=False)


# --- the math ------------------------------------------------------------------------------------------


def small_trainer(skip: bool, n_slots: int = 1, eps: float = 0.1, seed: int = 0):
    """A trainer moved off its initialisation, and a batch (xs, y) for it."""
    gen = torch.Generator().manual_seed(seed)
    d, Fw, B = 8, 16, 4096
    xs = [torch.randn(B, d, generator=gen) * 2 + 1 for _ in range(n_slots)]
    y = torch.randn(B, d, generator=gen) + xs[0] @ torch.randn(d, d, generator=gen) if skip else torch.cat(xs, 1)
    config = JumpReLUConfig(width=Fw, l0_target=5, l0_coef=3.0, bandwidth=eps, matmul_dtype="float32")
    trainer = JumpReLUTrainer(d, d, n_slots, 1 if skip else n_slots, config, skip, gen)
    trainer.initialise(xs, y)  # starts at L0 = 5; a target of 3 makes the penalty's gradient count
    trainer.config = JumpReLUConfig(**{**config.__dict__, "l0_target": 3})
    with torch.no_grad():
        for p in trainer.params.values():
            p += 0.05 * torch.randn(p.shape, generator=gen)
    return trainer, xs, y


def reference_loss(p: dict[str, torch.Tensor], xs: list[torch.Tensor], y: torch.Tensor, config: JumpReLUConfig):
    """FVU + penalty written directly from the module doc (hard JumpReLU and hard L0)."""
    theta = p["log_threshold"].exp()
    y_hat = p["b_dec"] + (xs[0] @ p["W_skip"] if "W_skip" in p else 0)
    l0 = 0
    for l, x in enumerate(xs):
        z = x @ p["W_enc"][l] + p["b_enc"][l]
        on = (z > theta[l]).float()
        y_hat = y_hat + (z * on) @ p["W_dec"][l]
        l0 = l0 + on.sum() / len(y)
    fvu = (y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    return fvu + config.l0_coef * (l0 / config.l0_target - 1) ** 2


@pytest.mark.parametrize("skip, n_slots", [(False, 1), (True, 1), (False, 3)])
def test_weight_gradients_match_autograd(skip, n_slots):
    """Everything but the threshold is differentiated exactly (d a / d z = H(z - theta), no STE into z)."""
    trainer, xs, y = small_trainer(skip, n_slots)
    metrics, grads = trainer.loss_and_grads(xs, y)
    p = {name: t.clone().requires_grad_() for name, t in trainer.params.items()}
    loss = reference_loss(p, xs, y, trainer.config)
    loss.backward()
    assert metrics["fvu"] + metrics["penalty"] == pytest.approx(loss.item(), rel=1e-5)
    for name, param in p.items():
        if name != "log_threshold":
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def jumprelu_acts(p: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    theta = p["log_threshold"].exp()
    pre = [x @ p["W_enc"][l] + p["b_enc"][l] for l, x in enumerate(xs)]
    return [z * (z > theta[l]) for l, z in enumerate(pre)]


@pytest.mark.parametrize("skip, n_slots", [(False, 1), (True, 1), (False, 2)])
def test_threshold_ste_is_the_central_difference_of_the_loss(skip, n_slots):
    """The rectangle kernel of width eps counts the entries within eps/2 of theta, so the STE is the central
    difference (L(theta + eps/2) - L(theta - eps/2)) / eps of the hard loss, for the L0 step exactly and for
    the JumpReLU's jump to first order: the STE takes the reconstruction's gradient g = dFVU/da times the
    jump (-theta), not the jump's curvature, so the difference is taken of FVU linearised in a around the
    current point, and the jump is z in the window, theta +- eps/2 (rtol ~ eps / theta)."""
    eps = 0.02
    trainer, xs, y = small_trainer(skip, n_slots, eps=eps)
    _, grads = trainer.loss_and_grads(xs, y)
    p = {name: t.clone().double() for name, t in trainer.params.items()}
    xs64, y64 = [x.double() for x in xs], y.double()
    acts0 = [a.requires_grad_() for a in jumprelu_acts(p, xs64)]
    y_hat = p["b_dec"] + sum(a @ p["W_dec"][l] for l, a in enumerate(acts0))
    y_hat = y_hat + (xs64[0] @ p["W_skip"] if skip else 0)
    fvu = (y_hat - y64).pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum()
    g_acts = torch.autograd.grad(fvu, acts0)
    cfg = trainer.config

    def linearised_loss(q: dict[str, torch.Tensor]) -> float:
        acts = jumprelu_acts(q, xs64)
        l0 = sum(float((a > 0).sum()) for a in acts) / len(y64)
        return sum(float((g * a).sum()) for g, a in zip(g_acts, acts)) + cfg.l0_coef * (l0 / cfg.l0_target - 1) ** 2

    theta = p["log_threshold"].exp()
    fd = torch.zeros_like(theta)
    for l in range(theta.shape[0]):
        for i in range(theta.shape[1]):
            up, down = dict(p), dict(p)
            up["log_threshold"], down["log_threshold"] = p["log_threshold"].clone(), p["log_threshold"].clone()
            up["log_threshold"][l, i] = (theta[l, i] + eps / 2).log()
            down["log_threshold"][l, i] = (theta[l, i] - eps / 2).log()
            fd[l, i] = (linearised_loss(up) - linearised_loss(down)) / eps * theta[l, i]  # d/dlog theta = theta d/dtheta
    assert (fd != 0).float().mean() > 0.5  # most windows hold tokens: the check has something to check
    torch.testing.assert_close(grads["log_threshold"].double(), fd, rtol=0.03, atol=1e-3 * float(fd.abs().mean()))


# --- training on known structure -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae():
    torch.set_num_threads(1)
    x = residual_like(12_000)
    coder, metrics = train_jumprelu([x[:10_000]], hooks_in=[RES.format(2)], config=SMALL, model_name="synthetic")
    return coder, metrics, x[10_000:]


def test_sae_explains_the_variance_at_the_target_l0(sae):
    coder, metrics, held_out = sae
    result = evaluate_jumprelu(coder, [held_out])
    # (a TopK SAE of the same width at k = 3 reaches 0.92 here; an untrained or mis-steered coder < 0.5)
    assert result.fve > 0.75, result
    assert abs(result.l0 - SMALL.l0_target) < 0.25 * SMALL.l0_target, result
    assert result.dead_share < 0.6, result  # 96 true directions for 192 features: half may rest
    assert metrics.tokens_per_second > 0 and metrics.steps == round(SMALL.epochs * 10_000 / SMALL.batch_size)


def test_sae_evaluation_agrees_with_the_topk_evaluator(sae):
    """Our multi-slot evaluation of one slot = featuredb.demo.train.evaluate on the runtime coder."""
    coder, _, held_out = sae
    ours = evaluate_jumprelu(coder, [held_out])
    theirs = evaluate(coder.to_sparse_coder("sae"), held_out)
    assert ours.fve == pytest.approx(theirs.fve, abs=1e-5)
    assert ours.l0 == pytest.approx(theirs.l0)
    assert ours.dead_share == pytest.approx(theirs.dead_share_here)


def mlp_like(n: int, d: int = 32, n_dirs: int = 96, active: int = 3, seed: int = 1):
    """x = sparse codes @ D_in (+ noise); y = x @ A (a linear part) + gated codes @ D_out: the MLP's
    non-linear part passes each code on only above 1.5, a JumpReLU of x's directions."""
    gen = torch.Generator().manual_seed(seed)
    codes = sparse_codes(n, n_dirs, active, gen)
    x = 4 * codes @ unit_rows(n_dirs, d, gen) + 0.05 * torch.randn(n, d, generator=gen)
    A = torch.randn(d, d, generator=gen) / d**0.5
    y = x @ A + 6 * (codes * (codes > 1.5)) @ unit_rows(n_dirs, d, gen) + 1.0
    return x, y


def test_skip_transcoder_learns_the_non_linear_part():
    x, y = mlp_like(12_000)
    config = JumpReLUConfig(**{**SMALL.__dict__, "width": 128, "l0_target": 2})
    coder, _ = train_jumprelu([x[:10_000]], [y[:10_000]], hooks_in=[MLP_IN], hooks_out=[MLP_OUT], config=config)
    assert coder.kind == "transcoder" and coder.affine_skip is not None
    result = evaluate_jumprelu(coder, [x[10_000:]], [y[10_000:]])
    # the best linear map alone (least squares on the training tokens) leaves the non-linear part
    X = torch.cat([x[:10_000], torch.ones(10_000, 1)], 1)
    W = torch.linalg.lstsq(X, y[:10_000]).solution
    yh, held = torch.cat([x[10_000:], torch.ones(2000, 1)], 1) @ W, y[10_000:]
    linear_fve = 1 - float((yh - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert linear_fve < 0.8
    assert result.fve > linear_fve + 0.1, (result, linear_fve)
    assert abs(result.l0 - config.l0_target) < 0.3 * config.l0_target, result


def layered(n: int, n_layers: int = 3, d: int = 24, n_dirs: int = 64, active: int = 3, seed: int = 2):
    """The same sparse codes written into every layer through a different dictionary and scale per layer."""
    gen = torch.Generator().manual_seed(seed)
    codes = sparse_codes(n, n_dirs, active, gen)
    return [(2 + 10 * l) * (codes @ unit_rows(n_dirs, d, gen) + 0.02 * torch.randn(n, d, generator=gen))
            for l in range(n_layers)]


@pytest.fixture(scope="module")
def crosscoder():
    torch.set_num_threads(1)
    xs = layered(12_000)
    config = JumpReLUConfig(**{**SMALL.__dict__, "width": 64, "l0_target": 4})
    coder, _ = train_jumprelu([x[:10_000] for x in xs], hooks_in=[RES.format(L) for L in (1, 4, 6)], config=config)
    return coder, [x[10_000:] for x in xs], config


def test_crosscoder_reconstructs_every_layer(crosscoder):
    coder, held_out, config = crosscoder
    assert coder.kind == "crosscoder" and tuple(coder.w_dec.shape) == (3, 64, 3, 24)
    result = evaluate_jumprelu(coder, held_out)
    assert min(result.fve_per_slot) > 0.65, result  # the layers' scales differ 10x: each must be explained
    assert abs(result.l0 - config.l0_target) < 0.3 * config.l0_target, result


# --- Gemma Scope 2's files -----------------------------------------------------------------------------


def test_width_tags_and_folders(sae):
    assert [width_tag(w) for w in (4096, 16384, 65536, 262144, 1048576)] == ["4k", "16k", "65k", "262k", "1m"]
    coder = sae[0]
    assert coder_folder(coder, "small") == "resid_post/layer_2_width_192_l0_small"
    with pytest.raises(ValueError):
        coder_folder(coder, "huge")


def read_published(folder: Path):
    """An independent reader of Gemma Scope 2's published layout (not our loader): -> (config, a function
    mapping the inputs of every slot to (activations per slot, outputs per output layer))."""
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == {"hf_hook_point_in", "hf_hook_point_out", "width", "model_name", "architecture", "l0",
                           "affine_connection", "type"}
    assert config["architecture"] == "jump_relu" and isinstance(config["l0"], int)
    names = ["params.safetensors"] if config["type"] != "crosscoder" else [
        f"params_layer_{i}.safetensors" for i in range(len(list(folder.glob("params_layer_*.safetensors"))))]
    files = []
    for name in names:
        with safe_open(str(folder / name), framework="pt") as f:
            files.append({key: f.get_tensor(key) for key in f.keys()})
    S = len(files)
    d_in, F = files[0]["w_enc"].shape
    for t in files:
        assert t["w_enc"].dtype == torch.float32
        assert t["b_enc"].shape == t["threshold"].shape == (F,)
        if config["type"] == "crosscoder":
            assert set(t) == {"w_enc", "b_enc", "threshold", "w_dec", "b_dec"}
            assert t["w_dec"].shape == (F, S, d_in) and t["b_dec"].shape == (d_in,)
        else:
            assert set(t) == {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} | (
                {"affine_skip_connection"} if config["affine_connection"] else set())
    assert config["width"] == S * F

    def run(xs):
        acts = []
        for x, t in zip(xs, files):
            pre = x @ t["w_enc"] + t["b_enc"]
            acts.append((pre > t["threshold"]) * torch.relu(pre))
        if config["type"] != "crosscoder":
            t = files[0]
            out = acts[0] @ t["w_dec"] + t["b_dec"]
            if config["affine_connection"]:
                out = out + xs[0] @ t["affine_skip_connection"]
            return acts, [out]
        return acts, [sum(a @ t["w_dec"][:, m, :] for a, t in zip(acts, files)) + files[m]["b_dec"] for m in range(S)]

    return config, run


def assert_same_coder(coder, run, xs):
    ours_acts = coder.encode(xs)
    ours_out = coder.decode(ours_acts, xs)
    acts, outs = run(xs)
    assert any(bool((a > 0).any()) for a in acts)
    for a, b in zip(ours_acts, acts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_out, outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_saved_sae_loads_in_featuredb_and_in_a_plain_reader(sae, tmp_path):
    coder, _, held_out = sae
    folder = save_gemma_scope_2(coder, tmp_path, l0_size="small", model_name="google/gemma-3-270m")
    assert folder == tmp_path / "resid_post" / "layer_2_width_192_l0_small"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
    config, run = read_published(folder)
    assert config == {"hf_hook_point_in": RES.format(2), "hf_hook_point_out": RES.format(2), "width": 192,
                      "model_name": "google/gemma-3-270m", "architecture": "jump_relu", "l0": 3,
                      "affine_connection": False, "type": "sae"}
    assert_same_coder(coder, run, [held_out])

    loaded = load_coder(str(folder))
    assert (loaded.kind, loaded.architecture, loaded.hook, loaded.layer) == ("sae", "jumprelu", RES.format(2), 2)
    torch.testing.assert_close(loaded.encode(held_out), coder.encode([held_out])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(held_out)), coder.decode(coder.encode([held_out]))[0],
                               rtol=1e-5, atol=1e-4)


def test_saved_skip_transcoder_loads_in_featuredb_and_in_a_plain_reader(tmp_path):
    x, y = mlp_like(3000)
    config = JumpReLUConfig(**{**SMALL.__dict__, "width": 64, "l0_target": 2, "epochs": 1})
    coder, _ = train_jumprelu([x], [y], hooks_in=[MLP_IN], hooks_out=[MLP_OUT], config=config)
    folder = save_gemma_scope_2(coder, tmp_path, l0_size="big")
    assert folder.relative_to(tmp_path).as_posix() == "transcoder/layer_3_width_64_l0_big_affine"
    config_json, run = read_published(folder)
    assert (config_json["type"], config_json["affine_connection"]) == ("transcoder", True)
    assert (config_json["hf_hook_point_in"], config_json["hf_hook_point_out"]) == (MLP_IN, MLP_OUT)
    assert_same_coder(coder, run, [x[:500]])

    loaded = load_coder(str(folder))
    assert (loaded.kind, loaded.hook, loaded.hook_out) == ("skip_transcoder", MLP_IN, MLP_OUT)
    f = loaded.encode(x[:500])
    torch.testing.assert_close(f, coder.encode([x[:500]])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(f, x[:500]), coder.decode([f], [x[:500]])[0], rtol=1e-5, atol=1e-4)


def test_saved_crosscoder_reads_back_in_a_plain_reader(crosscoder, tmp_path):
    coder, held_out, _ = crosscoder
    folder = save_gemma_scope_2(coder, tmp_path)
    assert folder.relative_to(tmp_path).as_posix() == "crosscoder/layer_1_4_6_width_192_l0_medium"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"] + [f"params_layer_{i}.safetensors" for i in range(3)]
    config, run = read_published(folder)
    assert config["hf_hook_point_in"] == config["hf_hook_point_out"] == "model.layers.{1,4,6}.output"
    assert (config["type"], config["width"], config["l0"]) == ("crosscoder", 192, 4)
    assert config == gemma_scope_config(coder)
    assert_same_coder(coder, run, held_out)


def test_resampling_revives_dead_features_at_tokens_explained_worst():
    """Features whose thresholds rose above every pre-activation get a new job: they fire again on the
    batch, near the target rate, their decoder rows are unit and their Adam moments start over."""
    x = residual_like(4096)
    config = JumpReLUConfig(width=64, l0_target=4, matmul_dtype="float32")
    gen = torch.Generator().manual_seed(0)
    trainer = JumpReLUTrainer(32, 32, 1, 1, config, False, gen)
    trainer.initialise([x], x)
    trainer.train_step([x[:1024]], x[:1024], 1.0, torch.float32)  # Adam has moments now
    dead = torch.zeros(1, 64, dtype=torch.bool)
    dead[0, :20] = True
    with torch.no_grad():
        trainer.log_threshold[0, :20] = 30.0  # e^30: nothing reaches it
    trainer.forward([x], torch.float32)
    assert torch.equal(trainer.resample([x[:1024]], x[:1024], dead, torch.float32), dead)
    z = x @ trainer.W_enc[0] + trainer.b_enc[0]
    rate = (z > trainer.log_threshold.exp()[0]).float().mean(0)
    assert (rate[:20] > 0).all()  # every one fires again
    assert rate[:20].mean() == pytest.approx(config.l0_target / 64, rel=0.5)
    torch.testing.assert_close(trainer.W_dec[0, :20].norm(dim=1), torch.ones(20))
    state = trainer.optimizer.state[trainer.params["W_dec"]]
    assert float(state["exp_avg"][0, :20].abs().sum()) == 0 and float(state["exp_avg"][0, 20:].abs().sum()) > 0
    assert not trainer.resample([x[:1024]], x[:1024], torch.zeros_like(dead), torch.float32).any()


def test_training_reports_resampled_and_dead_features(sae):
    _, metrics, _ = sae
    assert metrics.resampled >= 0 and 0 <= metrics.dead_share <= 1
    assert all("dead" in h for h in metrics.history)


# --- cross-layer transcoders (causal) ------------------------------------------------------------------


def test_clt_gradients_match_autograd_on_the_blocks_it_may_write():
    """A CLT's slot l writes outputs m >= l only: its gradients there are autograd's, elsewhere zero."""
    gen = torch.Generator().manual_seed(3)
    d, S, B = 8, 3, 4096
    xs = [torch.randn(B, d, generator=gen) * 2 + 1 for _ in range(S)]
    y = torch.cat([x @ torch.randn(d, d, generator=gen) for x in xs], 1)
    config = JumpReLUConfig(width=16, l0_target=5, l0_coef=3.0, matmul_dtype="float32")
    trainer = JumpReLUTrainer(d, d, S, S, config, skip=False, generator=gen, causal=True)
    trainer.initialise(xs, y)
    with torch.no_grad():
        for p in trainer.params.values():
            p += 0.05 * torch.randn(p.shape, generator=gen)
        trainer.W_dec *= trainer.writable  # as every step leaves it
    _, grads = trainer.loss_and_grads(xs, y)
    p = {name: t.clone().requires_grad_() for name, t in trainer.params.items()}
    reference_loss(p, xs, y, trainer.config).backward()
    writable = trainer.writable.expand_as(trainer.W_dec).bool()
    torch.testing.assert_close(grads["W_dec"][writable], p["W_dec"].grad[writable], rtol=1e-4, atol=1e-7)
    assert (grads["W_dec"][~writable] == 0).all()
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(grads[name], p[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_clt_trains_causal_and_saves_in_gemma_scope_2s_clt_layout(tmp_path):
    """Each layer's output is written by codes read at that layer or before (as an MLP reads the residual
    stream that earlier layers wrote): a causal CLT explains it, and stays causal through training."""
    inputs = layered(12_000, n_layers=3, d=16, n_dirs=48, active=2, seed=5)
    outputs = [sum(0.5 * x for x in inputs[:m + 1]) for m in range(3)]  # output m reads layers 0..m
    hooks_in = [f"model.layers.{i}.pre_feedforward_layernorm.output" for i in range(3)]
    hooks_out = [f"model.layers.{i}.post_feedforward_layernorm.output" for i in range(3)]
    config = JumpReLUConfig(**{**SMALL.__dict__, "width": 64, "l0_target": 6})
    coder, _ = train_jumprelu([x[:10_000] for x in inputs], [y[:10_000] for y in outputs], hooks_in=hooks_in,
                              hooks_out=hooks_out, config=config, kind="clt")
    assert coder.kind == "clt" and tuple(coder.w_dec.shape) == (3, 64, 3, 16)
    for l in range(3):
        assert (coder.w_dec[l, :, :l] == 0).all()  # nothing written below the slot's own layer
    result = evaluate_jumprelu(coder, [x[10_000:] for x in inputs], [y[10_000:] for y in outputs])
    assert min(result.fve_per_slot) > 0.5, result

    folder = save_gemma_scope_2(coder, tmp_path, model_name="google/gemma-3-270m")
    assert folder.relative_to(tmp_path).as_posix() == "clt/width_192_l0_medium"
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["hf_hook_point_in"] == "model.layers.{all}.pre_feedforward_layernorm.output"
    assert config_json["hf_hook_point_out"] == "model.layers.{all}.post_feedforward_layernorm.output"
    loaded = load_coder(str(folder))
    assert (loaded.kind, loaded.every_layer, loaded.width, loaded.layers) == ("clt", True, 192, [0, 1, 2])
    xs = [x[10_000:10_100] for x in inputs]
    ours = torch.cat(coder.encode(xs), -1)
    torch.testing.assert_close(loaded.encode_hooked(dict(zip(hooks_in, xs))), ours, rtol=1e-5, atol=1e-5)


# --- clones (issue 24) ---------------------------------------------------------------------------------


def brute_force_clones(rows: torch.Tensor, live: torch.Tensor, threshold: float = 0.99) -> tuple[int, int]:
    """(pairs of live rows with cosine > threshold, live rows with such a twin of lower index), pair by pair."""
    unit = [r / np.linalg.norm(r) if r.any() else r for r in rows.double().numpy()]
    live = live.tolist()
    pairs = clones = 0
    for j in range(len(rows)):
        twin = False
        for i in range(j):
            if live[i] and live[j] and float(unit[i] @ unit[j]) > threshold:
                pairs, twin = pairs + 1, True
        clones += twin
    return pairs, clones


def test_clone_count_matches_brute_force():
    gen = torch.Generator().manual_seed(7)
    rows = torch.randn(300, 16, generator=gen)
    rows[10] = 3 * rows[3]  # a scaled copy is a clone (direction, not norm)
    rows[11] = rows[3] + 1e-3 * torch.randn(16, generator=gen)  # ... and so is a near copy: one group of three
    rows[12] = -rows[3]  # opposite: not a clone
    rows[20:25] = rows[7] + 1e-3 * torch.randn(5, 16, generator=gen)  # a group of six
    rows[40] = rows[30]  # a copy of a dead feature: no live twin
    rows[99] = 0  # an all-zero row has no direction
    rows[100] = rows[99]
    live = torch.rand(300, generator=gen) > 0.1
    live[[3, 10, 11, 12, 7, 20, 21, 22, 23, 24, 40, 99, 100]] = True
    live[30] = False
    count = count_clones(rows, live, chunk=64)  # several chunks
    assert (count.pairs, count.clones) == brute_force_clones(rows, live)
    assert count.clones == 2 + 5 and count.pairs == 3 + 15  # the planted groups, and nothing else here


def test_resampled_features_get_tokens_of_their_own():
    """Each resampled feature gets a distinct token, never one whose error is a near copy of another's
    (a repeated window), drawn by its loss: tokens the coder explains exactly are never drawn."""
    gen = torch.Generator().manual_seed(0)
    err = torch.randn(256, 32, generator=gen)
    err[100:150] = err[5]  # 50 copies of one token's error
    err[200:] = 0  # explained exactly
    tokens = distinct_high_loss_tokens(err, 400, max_cosine=0.9, generator=gen)
    assert len(tokens) == len(set(tokens.tolist())) <= 200 - 50 + 1 and (tokens < 200).all()
    assert len({5, *range(100, 150)} & set(tokens.tolist())) <= 1
    unit = torch.nn.functional.normalize(err[tokens], dim=1)
    assert (unit @ unit.T - 2 * torch.eye(len(tokens))).max() <= 0.9
    assert len(distinct_high_loss_tokens(err, 20, max_cosine=0.9, generator=gen)) == 20


CLONE_PRONE = dict(batch_size=128, epochs=3, dead_after_tokens=1000, resample_every=5)


@pytest.mark.parametrize("kind", ["sae", "crosscoder", "transcoder"])
def test_trained_coders_have_no_clones(kind):
    """Far more features than the data has directions, a small batch and frequent resampling: hundreds of
    features die and are resampled at once. Every live feature keeps a direction of its own (resampled
    onto tokens drawn with replacement from one batch, as the trainer once did, the SAE here had 12
    pairs of live features with decoder cosine > 0.99), and the evaluation counts clones as brute force does."""
    if kind == "sae":
        x = residual_like(6_000)
        xs, ys, hooks_in, hooks_out, width = [x], None, [RES.format(2)], None, 512
    elif kind == "crosscoder":
        xs, ys, hooks_in, hooks_out, width = layered(6_000), None, [RES.format(L) for L in (1, 4, 6)], None, 128
    else:
        x, y = mlp_like(6_000)
        xs, ys, hooks_in, hooks_out, width = [x], [y], [MLP_IN], [MLP_OUT], 256
    config = JumpReLUConfig(**{**SMALL.__dict__, **CLONE_PRONE, "width": width})
    coder, metrics = train_jumprelu([x[:5000] for x in xs], None if ys is None else [y[:5000] for y in ys],
                                    hooks_in=hooks_in, hooks_out=hooks_out, config=config)
    assert metrics.resampled > width * len(xs) / 4  # the resampling was exercised
    held_in, held_out = [x[5000:] for x in xs], None if ys is None else [y[5000:] for y in ys]
    result = evaluate_jumprelu(coder, held_in, held_out)
    live = torch.cat([(a > 0).any(0) for a in coder.encode(held_in)])
    assert result.dead_share == pytest.approx(1 - float(live.float().mean()))
    assert (result.clone_pairs, result.clones) == brute_force_clones(coder.w_dec.flatten(0, 1).flatten(1), live)
    assert result.clone_pairs == 0, result
    assert result.wasted_share == pytest.approx(result.dead_share)
