"""SAO generation through Ray Data and an hf engine actor pool, on the tiny random model."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from selfalign_ray.cli import compose
from selfalign_ray.data.schema import PAIR_SCHEMA, REJECT_SCHEMA
from selfalign_ray.data.shards import ResumeMismatchError
from selfalign_ray.loop import run

pytestmark = pytest.mark.timeout(600)


def sao_cfg(out, persona_file, *extra):
    return compose([
        "model=tiny_random", "dataset_size=8", f"personas.path={persona_file}", f"output_dir={out}",
        "train.enabled=false", "mode.shard_size=3", "mode.respond.max_tokens=16", "mode.instruct.max_tokens=24",
        "engine.batch_size=4", *extra,
    ])


def read_dir(folder):
    return [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]


def accounted_sources(iter_dir):
    pairs = [r for t in read_dir(iter_dir / "shards") for r in t.column("source").to_pylist()]
    rejects = [r for t in read_dir(iter_dir / "rejects") for r in t.column("source").to_pylist()]
    return pairs, rejects


def test_every_persona_ends_in_exactly_one_place(tmp_path, persona_file, ray_local):
    report = run(sao_cfg(tmp_path / "run", persona_file))
    iter_dir = tmp_path / "run" / "iter_1"
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["chunks"] == 3
    pairs, rejects = accounted_sources(iter_dir)
    personas = [json.loads(line)["persona"] for line in persona_file.read_text().splitlines()]
    assert sorted(pairs + rejects) == sorted(personas)
    assert manifest["pairs_kept"] == len(pairs) == report["iterations"][0]["pairs_kept"]
    assert sum(manifest["drops"].values()) == len(rejects)
    assert manifest["inputs"] == 8
    for stage in ("instruct", "respond", "judge"):
        assert manifest["tokens"][stage]["prompt"] > 0
    assert manifest["tokens"]["respond"]["output"] > 0
    for t in read_dir(iter_dir / "shards"):
        assert t.schema.equals(PAIR_SCHEMA)
    for t in read_dir(iter_dir / "rejects"):
        assert t.schema.equals(REJECT_SCHEMA)
    assert 0.0 <= manifest["judge_position_agreement"] <= 1.0
    # The engine actor reports the attention its model ran (tiny Llama, CPU: sdpa; models/attention.py).
    assert manifest["generation"]["engine_attention"] == [f"{report['base_model']}: sdpa"]
    # tiny_random never stops on its own: its preset keeps cut texts (keep_without_eos), marked in the shards.
    assert manifest["truncation"] == "keep_without_eos" and manifest["cut"]["instruct"]["rate"] == 1.0
    marks = {m for t in read_dir(iter_dir / "shards") for col in ("prompt_finish_reason", "chosen_finish_reason",
                                                                   "rejected_finish_reason")
             for m in t.column(col).to_pylist()}
    assert marks == {"length"}


def test_truncation_drop_sends_every_cut_prompt_to_rejects(tmp_path, persona_file, ray_local):
    run(sao_cfg(tmp_path / "run", persona_file, "mode.truncation=drop"))
    iter_dir = tmp_path / "run" / "iter_1"
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["pairs_kept"] == 0 and manifest["drops"] == {"truncated_prompt": 8}
    assert manifest["cut"]["instruct"] == {"completions": 8, "length": 8, "rate": 1.0}
    rejects = [r for t in read_dir(iter_dir / "rejects") for r in t.to_pylist()]
    assert {(r["stage"], r["reason"]) for r in rejects} == {("instruct", "truncated_prompt")} and len(rejects) == 8


def test_resume_regenerates_only_missing_chunks_without_duplicates(tmp_path, persona_file, ray_local):
    out = tmp_path / "run"
    run(sao_cfg(out, persona_file))
    iter_dir = out / "iter_1"
    before = {p.name: p.read_bytes() for p in (iter_dir / "shards").glob("*.parquet")}
    ids_before = sorted(i for t in read_dir(iter_dir / "shards") for i in t.column("prompt_id").to_pylist())

    # A run killed after chunk 1's files but before its marker, and with chunk 2 never written.
    (iter_dir / "chunks" / "part-00001.json").unlink()
    (iter_dir / "chunks" / "part-00002.json").unlink()
    (iter_dir / "shards" / "part-00002.parquet").unlink()
    (iter_dir / "rejects" / "part-00002.parquet").unlink()
    chunk0_mtime = (iter_dir / "shards" / "part-00000.parquet").stat().st_mtime_ns
    run(sao_cfg(out, persona_file))

    assert (iter_dir / "shards" / "part-00000.parquet").stat().st_mtime_ns == chunk0_mtime  # kept, not redone
    ids_after = sorted(i for t in read_dir(iter_dir / "shards") for i in t.column("prompt_id").to_pylist())
    assert ids_after == ids_before  # per-request seeds: the regenerated chunks hold the same prompts
    assert len(ids_after) == len(set(ids_after))
    after = {p.name: p.read_bytes() for p in (iter_dir / "shards").glob("*.parquet")}
    assert after.keys() == before.keys()

    with pytest.raises(ResumeMismatchError, match="dataset_size"):
        run(sao_cfg(out, persona_file, "dataset_size=6"))


def test_bad_persona_lines_are_counted_in_the_manifest(tmp_path, persona_file, ray_local):
    bad = tmp_path / "bad.jsonl"
    shutil.copy(persona_file, bad)
    with open(bad, "ab") as f:
        f.write(b'{"persona": 5}\n{broken\n\xff\xfe\n')
    run(sao_cfg(tmp_path / "run", bad))
    manifest = json.loads((tmp_path / "run" / "iter_1" / "manifest.json").read_text())
    assert manifest["input_errors"]["by_reason"] == {"wrong_type": 1, "invalid_json": 1, "not_utf8": 1}
    assert manifest["inputs"] == 8
