"""output_dir on object storage (selfalign_ray/data/storage.py), against a local S3-compatible server (moto's server
mode, started here on a free port; credentials and endpoint only through the standard AWS_* variables).

    the storage layer on s3:// and on a local path: the same answers
    chunk commits on S3: a chunk counts only with its marker, and only while its files match the marker
    the SAO loop (generation + training, two iterations) with output_dir=s3://..., its driver SIGKILLed mid-generation
        -> the same command resumes: committed chunks kept, the same pairs as a run on a local path at the same seed,
           each exactly once; the exported models, manifests, records and the report are objects under the prefix;
           iteration 2 generates with and trains from iteration 1's model read back from S3.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selfalign_ray.data import storage
from selfalign_ray.data.shards import IterationStore

BUCKET = "selfalign-test"
# Distinctive, so that the test can check that no object the run writes contains it.
SECRET = "sa-test-secret-7f3c9e"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server for this module; AWS_* set in this process (and so for the drivers it starts)."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "sa-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"{request.getfixturevalue('s3')}/unit-{time.time_ns()}"


def test_layer_answers_the_same_on_s3_and_locally(root, tmp_path):
    a = storage.join(root, "d", "a.json")
    assert not storage.exists(a) and storage.list_names(storage.join(root, "d")) == []
    storage.makedirs(storage.join(root, "d"))
    storage.write_json(a, {"x": 1})
    storage.write_bytes(storage.join(root, "d", "b.bin"), b"12345")
    storage.write_text(storage.join(root, "d", "sub", "c.txt"), "hi")
    assert storage.exists(a) and storage.read_json(a) == {"x": 1}
    assert storage.size(storage.join(root, "d", "b.bin")) == 5
    assert storage.list_names(storage.join(root, "d")) == ["a.json", "b.bin"]
    assert storage.list_names(storage.join(root, "d"), "*.json") == ["a.json"]
    assert storage.list_dirs(storage.join(root, "d")) == ["sub"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        storage.read_bytes(storage.join(root, "d", "missing.json"))
    storage.delete(a)
    storage.delete(a)  # a missing file is not an error
    assert not storage.exists(a)

    # Whole directories: upload, download, and the cached local copy (a new copy once the files change).
    src = tmp_path / "model"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "nested" / "w.bin").write_bytes(b"w" * 10)
    dest = storage.join(root, "model")
    storage.upload_dir(src, dest)
    copy = storage.local_copy(dest)
    assert (Path(copy) / "nested" / "w.bin").read_bytes() == b"w" * 10
    if storage.is_uri(root):
        assert storage.local_copy(dest) == copy  # cached
        storage.write_bytes(storage.join(dest, "nested", "w.bin"), b"v" * 11)
        fresh = storage.local_copy(dest)
        assert fresh != copy and (Path(fresh) / "nested" / "w.bin").read_bytes() == b"v" * 11
    else:
        assert copy == dest  # a local path is used in place
    storage.delete_dir(dest)
    assert not storage.exists(storage.join(dest, "config.json"))


def test_pyarrow_takes_the_endpoint_from_aws_endpoint_url(s3):
    fs, path = storage.resolve(f"{s3}/x")
    assert type(fs).__name__ == "S3FileSystem" and path == f"{BUCKET}/x"
    # The layer passes no endpoint itself: the object reached the moto server through AWS_ENDPOINT_URL alone.
    storage.write_bytes(f"{s3}/endpoint-check", b"ok")
    import boto3

    assert boto3.client("s3").get_object(Bucket=BUCKET, Key="endpoint-check")["Body"].read() == b"ok"


def test_chunks_on_s3_count_only_with_a_marker_that_their_files_match(s3):
    from test_shards import commit

    root = f"{s3}/store-{time.time_ns()}/iter_1"
    store = IterationStore(root)
    markers = {0: commit(store, 0, 3, 1), 1: commit(store, 1, 2, 2)}
    # Chunk 2's shard uploaded, its marker not (a driver killed mid-commit): not committed.
    storage.write_bytes(f"{root}/shards/part-00002.parquet", storage.read_bytes(f"{root}/shards/part-00001.parquet"))
    assert sorted(store.committed()) == [0, 1]
    manifest = store.write_manifest(markers, {"mode": "sao"})
    assert [e["file"] for e in manifest["shards"]] == [f"{root}/shards/part-00000.parquet",
                                                       f"{root}/shards/part-00001.parquet"]
    assert storage.read_json(f"{root}/manifest.json")["pairs_kept"] == 5
    assert len(store.seen_prompt_ids(markers)) == 5 + 1  # 5 pairs + the rejects' one distinct prompt
    # A shard overwritten with other bytes: named, its marker removed, the chunk left to be regenerated.
    storage.write_bytes(f"{root}/shards/part-00001.parquet", storage.read_bytes(f"{root}/shards/part-00000.parquet"))
    assert sorted(store.committed()) == [0]
    assert not storage.exists(f"{root}/chunks/part-00001.json")


def test_a_uri_output_dir_passes_on_a_remote_cluster_and_hydra_logs_stay_local():
    from selfalign_ray.cli import _hydra_run_dir, compose
    from selfalign_ray.cluster import resolve_output_dir

    assert resolve_output_dir(compose(["cluster=remote", "output_dir=s3://b/runs/x/"])) == "s3://b/runs/x"
    assert resolve_output_dir(compose(["output_dir=gs://b/runs/x"])) == "gs://b/runs/x"
    local = _hydra_run_dir("s3://b/runs/x")
    assert "://" not in local and Path(local).is_absolute()
    assert _hydra_run_dir("/data/runs/x") == "/data/runs/x"


# ------------------------------------------------------------------------------------ the SAO loop on S3
def _objects(prefix: str) -> dict:
    fs, inner = storage.resolve(prefix)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return {i.path[len(inner) + 1:]: i for i in infos if i.type == pafs.FileType.File}


def _pairs(manifest: dict) -> list[dict]:
    rows = []
    for entry in manifest["shards"]:
        fs, inner = storage.resolve(entry["file"])
        rows += pq.read_table(inner, filesystem=fs).to_pylist()
    return sorted(rows, key=lambda r: r["prompt_id"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sao_loop_on_s3_resumes_after_a_killed_driver_with_the_pairs_of_a_local_run(s3, tmp_path, monkeypatch):
    from test_faults import BASE, CHUNKS, PERSONAS, Driver

    personas = tmp_path / "personas.jsonl"
    personas.write_text("".join(json.dumps({"id": f"p{i}", "persona": t}) + "\n" for i, t in enumerate(PERSONAS)))
    out = f"{s3}/runs/sao-{time.time_ns()}"
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))  # the drivers' local copies and staging dirs
    args = [*BASE, f"personas.path={personas}", "cluster.num_cpus=2"]
    driver = Driver([*args, "iterations=2", f"output_dir={out}"], tmp_path)

    # 1. Killed as soon as the first chunk of iteration 1 is committed on S3.
    status, log = driver.run(kill_when=lambda: bool(storage.list_names(f"{out}/iter_1/chunks", "part-*.json")),
                             timeout=600)
    assert status is None, f"the driver finished before it could be killed:\n{log[-3000:]}"
    after_kill = {n: storage.read_bytes(f"{out}/iter_1/chunks/{n}")
                  for n in storage.list_names(f"{out}/iter_1/chunks", "part-*.json")}
    assert 1 <= len(after_kill) < CHUNKS

    # 2. The same command again: resumes and finishes both iterations.
    status, log = driver.run(timeout=900)
    assert status == 0, log[-5000:]
    assert "resuming: " in log
    objects = _objects(out)
    for k in (1, 2):
        for folder in ("shards", "rejects"):
            assert sorted(n for n in objects if n.startswith(f"iter_{k}/{folder}/")) == \
                [f"iter_{k}/{folder}/part-{c:05d}.parquet" for c in range(CHUNKS)]
        assert len([n for n in objects if n.startswith(f"iter_{k}/chunks/")]) == CHUNKS
        for name in ("manifest.json", "run.json", "train.json", "model/model.safetensors", "model/config.json",
                     "model/train_summary.json"):
            assert f"iter_{k}/{name}" in objects
    assert {"summary.json", "report.md"} <= set(objects)
    assert not [n for n in objects if "model_ray/" in n]  # Ray Train's checkpoints are removed after success
    # Committed chunks were kept, not regenerated.
    assert {n: storage.read_bytes(f"{out}/iter_1/chunks/{n}") for n in after_kill} == after_kill
    # No credential in anything the run wrote.
    assert not [n for n in objects if SECRET.encode() in storage.read_bytes(f"{out}/{n}")]

    m1, m2 = (storage.read_json(f"{out}/iter_{k}/manifest.json") for k in (1, 2))
    assert m1["status"] == m2["status"] == "complete"
    assert all(e["file"].startswith(f"{out}/iter_1/shards/") for e in m1["shards"])
    # Iteration 2 generated with iteration 1's model and trained from it, both read back from S3.
    assert m2["model"] == m2["train"]["init_model"] == f"{out}/iter_1/model"
    assert storage.read_json(f"{out}/iter_2/train.json")["model_dir"] == f"{out}/iter_2/model"
    pairs = _pairs(m1)
    ids = [r["prompt_id"] for r in pairs]
    assert len(ids) == len(set(ids)) == m1["pairs_kept"] > 0

    # 3. The same generation on a local path at the same seed: the same pairs, each once.
    local = tmp_path / "local"
    status, log = Driver([*args, "iterations=1", "train.enabled=false", f"output_dir={local}"], tmp_path).run(timeout=600)
    assert status == 0, log[-5000:]
    reference = _pairs(json.loads((local / "iter_1" / "manifest.json").read_text()))
    assert [r["prompt_id"] for r in reference] == ids
    assert reference == pairs
    assert not list(tmp_path.glob("s3*"))  # Hydra's logs went to the storage cache, not to a local "s3:" dir


def test_listing_a_file_where_a_folder_was_expected_is_empty(tmp_path):
    """A sweep job whose output_dir is blocked by a file still gets its row (report/sweep.py lists iter_* there)."""
    from selfalign_ray.data import storage

    blocked = tmp_path / "n6-k2"
    blocked.write_text("not a directory")
    assert storage.list_dirs(blocked, "iter_*") == [] and storage.list_names(blocked) == []
