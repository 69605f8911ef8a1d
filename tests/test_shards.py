"""Shard storage: schema, atomic commits, verification on resume, settings guard."""

import json
from collections import Counter

import pyarrow as pa
import pytest

from selfalign_ray.data import shards as shards_mod
from selfalign_ray.data.schema import PAIR_SCHEMA, REJECT_SCHEMA, assistant_turn, prompt_id, user_turn
from selfalign_ray.data.shards import ChunkStats, IterationStore, ResumeMismatchError


def pair(text: str) -> dict:
    return {"prompt_id": prompt_id(text), "prompt": user_turn(text), "chosen": assistant_turn("good"),
            "rejected": assistant_turn("bad"), "mode": "sao", "iteration": 1, "source": "persona",
            "generator_model": "m", "judge_confidence": 0.7, "chosen_tokens": 3, "rejected_tokens": 4}


def reject(row_id: int) -> dict:
    return {"row_id": row_id, "source_id": f"s{row_id}", "source": "persona", "stage": "judge",
            "reason": "tie", "error": "", "prompt": "p", "raw": "", "mode": "sao", "iteration": 1}


def commit(store, chunk_id, n_pairs, n_rejects):
    pairs = pa.Table.from_pylist([pair(f"prompt {chunk_id}-{i}") for i in range(n_pairs)], schema=PAIR_SCHEMA)
    rejects = pa.Table.from_pylist([reject(i) for i in range(n_rejects)], schema=REJECT_SCHEMA)
    stats = ChunkStats(inputs=n_pairs + n_rejects, pairs=n_pairs, drops=Counter(tie=n_rejects),
                       tokens={"respond": {"prompt": 10, "output": 20}}, prompts_produced=n_pairs + n_rejects,
                       judged_pairs=n_pairs + n_rejects, judge_orders_agree=n_pairs)
    return store.commit_chunk(chunk_id, pairs, rejects, stats)


def test_commit_manifest_and_datasets_load(tmp_path):
    import datasets

    store = IterationStore(tmp_path / "iter_1")
    markers = {0: commit(store, 0, 3, 1), 1: commit(store, 1, 2, 2)}
    manifest = store.write_manifest(markers, {"mode": "sao"})
    assert (manifest["inputs"], manifest["pairs_kept"], manifest["drops"]) == (8, 5, {"tie": 3})
    assert manifest["tokens"] == {"respond": {"prompt": 20, "output": 40}}
    assert manifest["judge_position_agreement"] == pytest.approx(5 / 8)
    assert json.loads((tmp_path / "iter_1" / "manifest.json").read_text())["pairs_kept"] == 5
    ds = datasets.load_dataset("parquet", data_files=store.shard_files(markers), split="train")
    assert ds.num_rows == 5 and ds[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert set(ds.column_names) == set(PAIR_SCHEMA.names)


def test_counts_must_add_up(tmp_path):
    store = IterationStore(tmp_path)
    pairs = pa.Table.from_pylist([pair("x")], schema=PAIR_SCHEMA)
    with pytest.raises(AssertionError, match="!= 2 inputs"):
        store.commit_chunk(0, pairs, pa.Table.from_pylist([], schema=REJECT_SCHEMA), ChunkStats(inputs=2))


def test_corrupted_or_missing_shard_is_detected_and_uncommitted(tmp_path, caplog):
    store = IterationStore(tmp_path)
    commit(store, 0, 3, 0)
    commit(store, 1, 3, 0)
    shard = tmp_path / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated on disk
    committed = store.committed()
    assert sorted(committed) == [0]
    assert "part-00001.parquet does not match its checksum" in caplog.text
    (tmp_path / "rejects" / "part-00000.parquet").unlink()
    assert store.committed() == {}


def test_seen_prompt_ids_cover_pairs_and_rejected_prompts(tmp_path):
    store = IterationStore(tmp_path)
    markers = {0: commit(store, 0, 2, 1)}
    assert store.seen_prompt_ids(markers) == {prompt_id("prompt 0-0"), prompt_id("prompt 0-1"), prompt_id("p")}


def test_settings_guard_refuses_a_different_run(tmp_path):
    IterationStore(tmp_path).bind_settings({"seed": 0, "dataset_size": 8})
    IterationStore(tmp_path).bind_settings({"seed": 0, "dataset_size": 8})
    with pytest.raises(ResumeMismatchError, match="different settings \\(dataset_size\\)"):
        IterationStore(tmp_path).bind_settings({"seed": 0, "dataset_size": 16})


def test_failed_write_leaves_no_visible_file(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    store = IterationStore(tmp_path)
    monkeypatch.setattr(shards_mod.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        commit(store, 0, 2, 0)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    assert store.committed() == {}
