"""A catalogue on an S3-compatible object store: `featuredb index --db s3://...` writes it, and
`featuredb.open("s3://...")` queries it. The store is moto's server, started here on 127.0.0.1;
credentials and endpoint reach LanceDB through the standard AWS environment variables."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

import featuredb
from featuredb.cli import main
from featuredb.store import FeatureStore
from featuredb.store.connect import storage_options

from coder_formats import write_gemma_scope_1, write_saelens

BUCKET = "featuredb-test"


@pytest.fixture()
def s3_bucket(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()


def test_storage_options_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")  # the S3-specific one wins
    assert storage_options("s3://bucket/db") == {
        "aws_access_key_id": "key", "aws_secret_access_key": "secret", "region": "eu-west-1",
        "endpoint": "http://127.0.0.1:9001", "allow_http": "true"}
    assert storage_options("/local/db") == {}


def test_index_to_s3_and_query(s3_bucket, tiny_gemma2, corpus_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default work dir of an s3:// db is under ~/.cache
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "coders"
    coders = [str(write_gemma_scope_1(root, "res", 1, 64, 48, fire_rate=0.1, seed=1)),
              str(write_saelens(root / "saelens_topk", "topk", 64, 36, "blocks.2.hook_resid_post", k=5))]
    args = ["index", "--model", str(tiny_gemma2), "--corpus", str(corpus_jsonl), "--context", "16",
            "--batch-size", "3", "--top-k", "4", "--quiet"]
    for c in coders:
        args += ["--coder", c]
    uri = f"{s3_bucket}/catalogue"
    remote = CliRunner().invoke(main, args + ["--db", uri])
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(main, args + ["--db", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    work_root = tmp_path / "home" / ".cache" / "featuredb" / "index"
    assert work_root.is_dir() and not any(work_root.iterdir())  # used locally, then removed
    assert not (tmp_path / "s3:").exists()  # nothing went to a local path spelled like the URI

    # the object-store catalogue holds what a local run stores, row for row
    on_s3, on_disk = FeatureStore(uri, read_only=True), FeatureStore(str(tmp_path / "local"), read_only=True)
    assert on_s3.coders().drop("created_at").equals(on_disk.coders().drop("created_at"))
    for coder_id in on_disk.coders()["coder_id"]:
        assert on_s3.features(coder_id).equals(on_disk.features(coder_id))
        assert on_s3.examples(coder_id).equals(on_disk.examples(coder_id))

    # and a query server reads it through featuredb.open
    cat = featuredb.open(uri)
    assert sorted(cat.coders()["coder_id"].to_list()) == sorted(on_disk.coders()["coder_id"].to_list())
    coder_id = cat.coders()["coder_id"][0]
    similar = cat.similar(coder_id, 0).limit(3).to_polars()
    assert len(similar) == 3
    assert len(cat.with_token(" the").limit(5).to_polars()) > 0
