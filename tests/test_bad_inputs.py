"""Bad model, coder and corpus files end in one line `error: ...` and leave the catalogue as it was.

Each case writes one broken file next to good ones and runs the real command line; the message must
name the file and what is wrong, and no stored table may move to a new version.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from featuredb.cli import main
from featuredb.store import FeatureStore

from conftest import CORPUS_TEXT
from coder_formats import write_gemma_scope_1, write_gemma_scope_2, write_saelens

D_MODEL = 64  # the tiny test models' hidden size
INDEX_ARGS = ["--quiet", "--context", "16", "--batch-size", "4", "--top-k", "2"]


class Unpickled:
    """Unpickling this makes the directory `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_pickle(path: Path) -> Path:
    """A torch.save file that torch refuses with weights_only=True; returns the marker it would make."""
    marker = path.parent / "UNPICKLED"
    torch.save({"W_enc": torch.zeros(2, 2), "payload": Unpickled(marker)}, path)
    return marker


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def versions(db: Path) -> dict[str, int]:
    store = FeatureStore(str(db))
    return {name: store.table(name).version for name in store.table_names()}


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def index(model: Path, coder: Path, corpus: Path, db: Path):
    return run("index", *INDEX_ARGS, "-m", str(model), "-c", str(coder), "--corpus", str(corpus), "--db", str(db))


def assert_one_line_error(result, *named: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def catalogue(tiny_gemma2, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(db, coder directory, corpus) of one good indexing run, shared: every case must leave it alone."""
    root = tmp_path_factory.mktemp("catalogue")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS_TEXT)))
    coder = write_gemma_scope_1(root / "coders", "res", 1, D_MODEL, 16, seed=1)
    db = root / "db"
    result = index(tiny_gemma2, coder, corpus, db)
    assert result.exit_code == 0, result.output
    return db, coder, corpus


# --- the broken files: each takes (tmp_path, good model dir) and returns what to pass instead ---------


def model_copy(tmp_path: Path, model: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def unknown_model_type(tmp_path, model):
    copy = model_copy(tmp_path, model)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    return {"model": copy}


def truncated_model_weights(tmp_path, model):
    copy = model_copy(tmp_path, model)
    truncate(copy / "model.safetensors")
    return {"model": copy}


def pickled_model_weights(tmp_path, model):
    copy = model_copy(tmp_path, model)
    (copy / "model.safetensors").unlink()
    write_pickle(copy / "pytorch_model.bin")
    return {"model": copy}


def random_bytes_gguf(tmp_path, model):
    path = tmp_path / "model.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return {"model": path}


def text_gguf(tmp_path, model):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n" * 50)
    return {"model": path}


def truncated_gguf(tmp_path, model):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 4) + b"\x05\x00")  # header promises 4 keys, then ends
    return {"model": path}


def gemma_scope_2_dir(tmp_path: Path) -> Path:
    return write_gemma_scope_2(tmp_path / "coders", "resid_post", 1, D_MODEL, 16)


def truncated_gemma_scope_2(tmp_path, model):
    coder = gemma_scope_2_dir(tmp_path)
    truncate(coder / "params.safetensors")
    return {"coder": coder}


def truncated_saelens(tmp_path, model):
    coder = write_saelens(tmp_path / "saelens", "jumprelu", D_MODEL, 16, "blocks.1.hook_resid_post")
    truncate(coder / "sae_weights.safetensors")
    return {"coder": coder}


def truncated_gemma_scope_1(tmp_path, model):
    coder = write_gemma_scope_1(tmp_path / "coders", "res", 1, D_MODEL, 16)
    truncate(coder / "params.npz")
    return {"coder": coder}


def pickled_saelens(tmp_path, model):
    coder = write_saelens(tmp_path / "saelens", "jumprelu", D_MODEL, 16, "blocks.1.hook_resid_post")
    (coder / "sae_weights.safetensors").unlink()
    write_pickle(coder / "sae_weights.pt")
    return {"coder": coder}


def pickled_coder_only(tmp_path, model):
    coder = tmp_path / "coder"
    coder.mkdir()
    write_pickle(coder / "model.bin")
    return {"coder": coder}


def npz_with(tmp_path: Path, key: str, value: np.ndarray) -> Path:
    coder = write_gemma_scope_1(tmp_path / "coders", "res", 1, D_MODEL, 16)
    arrays = dict(np.load(coder / "params.npz"))
    np.savez(coder / "params.npz", **{**arrays, key: value})
    return coder


def npz_string_array(tmp_path, model):
    return {"coder": npz_with(tmp_path, "b_enc", np.array(["0.5"] * 16))}


def npz_object_array(tmp_path, model):
    return {"coder": npz_with(tmp_path, "W_dec", np.array([None, {"a": 1}], dtype=object))}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def surrogate_in_jsonl_text(tmp_path, model):
    # the JSON text holds the six characters \ud800: a valid JSON escape, a lone surrogate once decoded
    return {"corpus": write_jsonl(tmp_path / "corpus.jsonl", ['{"text": "fine"}', '{"text": "bad \\ud800 here"}'])}


def surrogate_in_jsonl_id(tmp_path, model):
    return {"corpus": write_jsonl(tmp_path / "corpus.jsonl", ['{"id": "\\udc00", "text": "fine"}'])}


def invalid_utf8_parquet(tmp_path, model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a surrogate encoded as UTF-8 bytes; Arrow writes a string column without checking its bytes
    texts = pa.array([b"fine text", b"bad \xed\xa0\x80 here"], pa.binary()).view(pa.string())
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    return {"corpus": path}


def invalid_utf8_text(tmp_path, model):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first paragraph\n\nsecond\nbad \xed\xa0\x80 here\n")
    return {"corpus": path}


CASES = {  # case -> (what it breaks, texts the one-line error must hold)
    "unknown_model_type": (unknown_model_type, ["config.json", "no-such-architecture"]),
    "truncated_model_weights": (truncated_model_weights, ["model.safetensors", "truncated"]),
    "pickled_model_weights": (pickled_model_weights, ["pytorch_model.bin", "weights_only"]),
    "random_bytes_gguf": (random_bytes_gguf, ["model.gguf", "GGUF"]),
    "text_gguf": (text_gguf, ["model.gguf", "GGUF"]),
    "truncated_gguf": (truncated_gguf, ["model.gguf", "truncated"]),
    "truncated_gemma_scope_2": (truncated_gemma_scope_2, ["params.safetensors", "corrupt"]),
    "truncated_saelens": (truncated_saelens, ["sae_weights.safetensors", "corrupt"]),
    "truncated_gemma_scope_1": (truncated_gemma_scope_1, ["params.npz", "corrupt"]),
    "pickled_saelens": (pickled_saelens, ["sae_weights.pt", "pickled"]),
    "pickled_coder_only": (pickled_coder_only, ["model.bin", "pickled"]),
    "npz_string_array": (npz_string_array, ["params.npz", "'b_enc'", "<U3"]),
    "npz_object_array": (npz_object_array, ["params.npz", "'W_dec'", "allow_pickle=False"]),
    "surrogate_in_jsonl_text": (surrogate_in_jsonl_text, ["corpus.jsonl:2", "surrogate U+D800"]),
    "surrogate_in_jsonl_id": (surrogate_in_jsonl_id, ["corpus.jsonl:1", "id holds a lone surrogate"]),
    "invalid_utf8_parquet": (invalid_utf8_parquet, ["corpus.parquet row 1", "UTF-8"]),
    "invalid_utf8_text": (invalid_utf8_text, ["corpus.txt:4", "UTF-8"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_one_line_and_catalogue_unchanged(case, catalogue, tiny_gemma2, tmp_path):
    db, coder, corpus = catalogue
    breaks, named = CASES[case]
    bad = {"model": tiny_gemma2, "coder": coder, "corpus": corpus, **breaks(tmp_path, tiny_gemma2)}
    before = versions(db)
    rerun = bad["coder"] if "=" in str(bad["coder"]) else f"rerun={bad['coder']}"  # a new id: no --replace needed
    result = index(bad["model"], rerun, bad["corpus"], db)
    assert_one_line_error(result, *named)
    assert versions(db) == before
    assert not list(tmp_path.rglob("UNPICKLED")), "a pickle was unpickled"


def model_without_tokenizer(tmp_path, model):
    copy = model_copy(tmp_path, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    return {"model": copy}


def nan_in_coder(tmp_path, model):
    coder = gemma_scope_2_dir(tmp_path)
    tensors = load_file(str(coder / "params.safetensors"))
    tensors["w_dec"][3, 17] = np.nan  # NaN in one decoder row made every feature's neighbour cosines NaN
    save_file(tensors, str(coder / "params.safetensors"))
    return {"coder": coder}


def inf_threshold_in_saelens(tmp_path, model):
    coder = write_saelens(tmp_path / "saelens", "jumprelu", D_MODEL, 16, "blocks.1.hook_resid_post")
    tensors = load_file(str(coder / "sae_weights.safetensors"))
    tensors["threshold"][5] = -np.inf
    save_file(tensors, str(coder / "sae_weights.safetensors"))
    return {"coder": coder}


NEW_CATALOGUE_CASES = {  # case -> (what it breaks, texts the one-line error must hold)
    "truncated_model_weights": (truncated_model_weights, ["model.safetensors"]),
    "model_without_tokenizer": (model_without_tokenizer, ["no tokenizer in", "tokenizer.json", "tokenizer.model"]),
    "nan_in_coder": (nan_in_coder, ["params.safetensors", "w_dec[3, 17] is nan"]),
    "inf_threshold_in_saelens": (inf_threshold_in_saelens, ["sae_weights.safetensors", "threshold[5] is -inf"]),
}


@pytest.mark.parametrize("case", NEW_CATALOGUE_CASES)
def test_bad_input_leaves_no_new_catalogue(case, tiny_gemma2, catalogue, tmp_path):
    _, coder, corpus = catalogue
    breaks, named = NEW_CATALOGUE_CASES[case]
    bad = {"model": tiny_gemma2, "coder": coder, **breaks(tmp_path, tiny_gemma2)}
    db = tmp_path / "new-db"
    result = index(bad["model"], bad["coder"], corpus, db)
    assert_one_line_error(result, *named)
    assert not db.exists()


def test_describe_local_with_fake_gguf(catalogue, tmp_path):
    db = catalogue[0]
    model = text_gguf(tmp_path, None)["model"]
    before = versions(db)
    result = run("describe", "--db", str(db), "--explainer", "local", "--model", str(model), "--quiet")
    assert_one_line_error(result, "model.gguf", "GGUF")
    assert versions(db) == before


def test_fires_with_a_model_truncated_after_indexing(tiny_gemma2, catalogue, tmp_path):
    _, coder, corpus = catalogue
    model = model_copy(tmp_path, tiny_gemma2)
    db = tmp_path / "db"
    indexed = index(model, coder, corpus, db)
    assert indexed.exit_code == 0, indexed.output
    truncate(model / "model.safetensors")
    before = versions(db)
    result = run("fires", "the cat sat", "--db", str(db))
    assert_one_line_error(result, "model.safetensors", "truncated")
    assert versions(db) == before
