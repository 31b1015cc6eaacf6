"""featuredb.demo.train (TopK SAE trainer, SAELens writer) and featuredb.demo.corpus."""

from __future__ import annotations

import json

import pytest
import torch

from featuredb.demo.corpus import split_text, write_demo_corpus
from featuredb.runtime.coders import load_coder
from featuredb.demo.train import TopKSAE, TrainConfig, evaluate, save_saelens, train_topk_sae


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and far faster on a busy machine (no OpenMP waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sparse_data(n_tokens: int, d: int = 32, n_dirs: int = 64, active: int = 3, seed: int = 0):
    """Tokens made of `active` known unit directions with positive weights, on a large offset, times 5."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=gen), dim=1)
    offset = 3 * torch.randn(d, generator=gen)
    which = torch.randint(0, n_dirs, (n_tokens, active), generator=gen)
    weights = 0.5 + 2 * torch.rand(n_tokens, active, generator=gen)
    codes = torch.zeros(n_tokens, n_dirs).scatter_add_(1, which, weights)
    x = 5 * codes @ directions + offset + 0.01 * torch.randn(n_tokens, d, generator=gen)
    return x, directions


SMALL = TrainConfig(width=128, k=6, batch_size=256, epochs=8, lr=4e-3, dead_after_tokens=2000, progress=False)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    x, directions = sparse_data(10_000)
    coder, metrics = train_topk_sae(x[:8000], SMALL, hook="model.layers.2.output", coder_id="synthetic")
    return coder, metrics, x[8000:], directions


# --- the math ------------------------------------------------------------------------------------------


def test_hand_written_gradients_match_autograd():
    torch.manual_seed(0)
    d, n, k, aux_k, coef = 16, 64, 4, 8, 1 / 32
    x = 2 * torch.randn(256, d) + 1
    sae = TopKSAE(d, n, k, x.mean(0), torch.Generator().manual_seed(0))
    sae.W_enc += 0.1 * torch.randn(d, n)
    sae.b_enc += 0.1 * torch.randn(n)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    fvu, aux, _, grads = sae.loss_and_grads(x, dead, aux_k, coef)

    p = {name: t.clone().requires_grad_() for name, t in sae.params.items()}
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    top = pre.topk(k)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    x_hat = f @ p["W_dec"] + p["b_dec"]
    fvu_ref = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    e = (x - x_hat).detach()
    aux_top = pre.masked_fill(~dead, -torch.inf).topk(aux_k)
    e_hat = torch.zeros_like(pre).scatter(-1, aux_top.indices, aux_top.values.relu()) @ p["W_dec"]
    aux_ref = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (fvu_ref + coef * min(int(dead.sum()) / aux_k, 1.0) * aux_ref).backward()

    assert fvu == pytest.approx(fvu_ref.item(), rel=1e-5)
    assert aux == pytest.approx(aux_ref.item(), rel=1e-5)
    for name, param in p.items():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_recovers_known_directions_and_explains_the_variance(trained):
    coder, metrics, held_out, directions = trained
    result = evaluate(coder, held_out, tokens_since_fired=metrics.tokens_since_fired,
                      dead_after_tokens=SMALL.dead_after_tokens)
    assert result.fve > 0.9
    assert metrics.fvu < 0.1
    best_match = (coder.W_dec @ directions.T).amax(0)  # each true direction's closest decoder row
    assert (best_match > 0.9).float().mean() >= 0.95


def test_decoder_rows_unit_norm_and_exactly_k_active(trained):
    coder, _, held_out, _ = trained
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(coder.width), rtol=0, atol=1e-5)
    f = coder.encode(held_out)
    assert ((f > 0).sum(-1) <= SMALL.k).all()
    assert ((f > 0).sum(-1) == SMALL.k).float().mean() > 0.99
    assert coder.hook == "model.layers.2.output" and coder.layer == 2 and coder.k == SMALL.k


def test_no_clones_and_a_planted_one_is_counted(trained):
    """No two live latents share a decoder direction; a latent turned into a copy of another is a clone,
    and it counts as wasted beside the dead ones (issue 24)."""
    import dataclasses

    coder, metrics, held_out, _ = trained
    kw = dict(tokens_since_fired=metrics.tokens_since_fired, dead_after_tokens=SMALL.dead_after_tokens)
    result = evaluate(coder, held_out, **kw)
    assert (result.clone_pairs, result.clones) == (0, 0) and result.wasted_share == result.dead_share
    live = [i for i in range(coder.width) if (coder.encode(held_out)[:, i] > 0).any()]
    copy = dataclasses.replace(coder, W_dec=coder.W_dec.clone())
    copy.W_dec[live[1]] = copy.W_dec[live[0]]  # latent live[1] now writes what live[0] writes
    planted = evaluate(copy, held_out, **kw)
    assert (planted.clone_pairs, planted.clones) == (1, 1)
    assert planted.wasted_share == pytest.approx(planted.dead_share + 1 / coder.width)


def test_input_scale_is_folded_into_the_weights():
    """Training is scale invariant: 1000x the data gives the same latents with 1000x the activations."""
    x, _ = sparse_data(2048, seed=1)
    config = TrainConfig(width=64, k=4, batch_size=256, epochs=2, lr=4e-3, progress=False)
    small, m_small = train_topk_sae(x, config)
    big, m_big = train_topk_sae(1000 * x, config)
    assert m_big.scale == pytest.approx(m_small.scale / 1000, rel=1e-4)
    f_small, f_big = small.encode(x[:200]), big.encode(1000 * x[:200])
    assert torch.equal(f_small > 0, f_big > 0)
    torch.testing.assert_close(f_big, 1000 * f_small, rtol=1e-3, atol=1e-2)
    assert evaluate(big, 1000 * x).fve == pytest.approx(evaluate(small, x).fve, abs=1e-4)


def test_auxk_revives_dead_latents():
    """A learning rate high enough to kill latents, on data with more directions than latents."""
    x, _ = sparse_data(4096, d=32, n_dirs=512, active=3, seed=3)
    common = dict(width=256, k=4, batch_size=256, epochs=6, lr=5e-2, dead_after_tokens=1024, progress=False)
    _, without = train_topk_sae(x, TrainConfig(**common, aux_k=0))
    _, with_aux = train_topk_sae(x, TrainConfig(**common))  # aux_k = d // 2
    assert without.dead_share > 0.15
    assert with_aux.dead_share < without.dead_share / 2
    assert with_aux.fvu < without.fvu


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_topk_sae(torch.randn(100, 8), TrainConfig(width=16, k=2, batch_size=256, progress=False))
    with pytest.raises(ValueError, match="k must be"):
        train_topk_sae(torch.randn(512, 8), TrainConfig(width=16, k=32, batch_size=256, progress=False))


# --- SAELens round trip ------------------------------------------------------------------------------


def test_save_saelens_round_trip(trained, tmp_path):
    coder, _, held_out, _ = trained
    out = save_saelens(coder, tmp_path / "sae", model_name="tiny-llama", context_size=128)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == SMALL.k
    assert (cfg["d_in"], cfg["d_sae"]) == (32, 128)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny-llama"

    for is_gemma in (True, False):
        loaded = load_coder(str(out), model_is_gemma=is_gemma)
        assert loaded.hook == "model.layers.2.output" and loaded.layer == 2
        assert loaded.architecture == "topk" and loaded.k == SMALL.k and loaded.apply_b_dec_to_input
        assert torch.equal(loaded.encode(held_out), coder.encode(held_out))
        torch.testing.assert_close(loaded.decode(loaded.encode(held_out)), coder.decode(coder.encode(held_out)))


def test_trained_coder_fits_a_real_model(tiny_llama, tmp_path):
    """Activations captured from a (tiny) model, trained on, saved, and loaded back for that model."""
    from featuredb.runtime.model import load_model
    from featuredb.indexer.run import load_coders

    from conftest import CORPUS_TEXT

    model = load_model(str(tiny_llama))
    hook = "model.layers.1.output"
    ids = model.tokenizer(" ".join(CORPUS_TEXT * 8), add_special_tokens=False)["input_ids"][:1024]
    acts = model.capture(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [hook])[hook][0].float()
    coder, _ = train_topk_sae(acts, TrainConfig(width=64, k=4, batch_size=256, epochs=2, progress=False), hook=hook)
    save_saelens(coder, tmp_path / "sae", model_name=str(tiny_llama))
    (loaded,) = load_coders([f"mine={tmp_path / 'sae'}"], model, torch.device("cpu"))
    assert loaded.coder_id == "mine" and loaded.hook == hook
    assert torch.equal(loaded.encode(acts), coder.encode(acts))


# --- demo corpus ---------------------------------------------------------------------------------------


def test_demo_corpus_mixes_prose_and_code(tmp_path):
    path = tmp_path / "demo.jsonl"
    n = write_demo_corpus(path, max_docs=90)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(docs) == 90
    assert all(set(doc) == {"id", "source", "text"} and doc["text"].strip() for doc in docs)
    assert len({doc["id"] for doc in docs}) == len(docs)
    assert {doc["source"] for doc in docs} == {"reference", "docstring", "code"}
    assert {doc["source"] for doc in docs[:3]} == {"reference", "docstring", "code"}  # mixed from the start
    ids = [doc["id"] for doc in docs]
    assert "topics/assert" in ids and "doc/abc" in ids
    assert any(i.startswith("src/json") for i in ids)
    code = next(doc["text"] for doc in docs if doc["source"] == "code")
    assert "def " in code or "class " in code or "import " in code
    assert " at 0x" not in path.read_text()  # no memory addresses: the file is reproducible
    again = tmp_path / "again.jsonl"
    write_demo_corpus(again, max_docs=90)
    assert again.read_bytes() == path.read_bytes()


def test_demo_corpus_whole_has_unique_ids_and_bounded_documents(tmp_path):
    path = tmp_path / "demo.jsonl"
    n = write_demo_corpus(path, max_chars=3000)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(docs) > 300
    assert len({doc["id"] for doc in docs}) == n
    assert max(len(doc["text"]) for doc in docs) <= 3000


def test_split_text_prefers_top_level_boundaries():
    source = "\n\n".join(f"def f{i}():\n    x = {i}\n\n    return x" for i in range(40))
    pieces = split_text(source, max_chars=200)
    assert all(len(p) <= 200 for p in pieces)
    assert all(p.startswith("def f") for p in pieces)  # never cut inside a function here
    assert "".join(pieces).replace("\n", "") == source.replace("\n", "")
    assert split_text("short", 200) == ["short"] and split_text("  \n", 200) == []
    assert all(len(p) <= 50 for p in split_text("x" * 170, 50))
