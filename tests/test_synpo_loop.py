"""Two SynPO iterations end to end on the tiny random model: generator SFT, improver SFT per iteration, pair
generation through four model pools, the cumulative dataset, SimPO from θ0 and the held-out evaluation."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synpo_fixtures import write_seed_file

from selfalign_ray.cli import compose
from selfalign_ray.data.schema import PAIR_SCHEMA
from selfalign_ray.loop import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

HELDOUT = 3
LISTS = 6


def synpo_cfg(out, seeds, *extra):
    return compose([
        "mode=synpo", "model=tiny_random", "iterations=2", f"dataset_size={LISTS}", f"output_dir={out}",
        f"mode.seeds.path={seeds}", f"mode.seeds.heldout={HELDOUT}", "mode.seeds.train_size=null",
        # Random weights never learn the <question> tags: take the generator's text as the prompt.
        "mode.generator.require_tags=false", "mode.generator.max_tokens=20", "mode.respond.max_tokens=12",
        "mode.improve.max_tokens=12", "mode.sft.epochs=1", "mode.sft.global_batch_size=2",
        "train.global_batch_size=2", "train.eval_before_after=false", "engine.batch_size=8", *extra,
    ])


def _table(files):
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_two_synpo_iterations_on_tiny_random(tmp_path, tiny_model_path, ray_local):
    out = tmp_path / "run"
    seeds = write_seed_file(tmp_path / "seeds.jsonl")
    cfg = synpo_cfg(out, seeds)
    report = run(cfg)

    # Generator: trained once on the non-held-out seeds, in the keyword template -> <question>/<solution> format.
    gen = json.loads((out / "synpo" / "generator.json").read_text())
    split = json.loads((out / "synpo" / "seeds.json").read_text())
    assert len(split["heldout"]) == HELDOUT and len(split["train"]) == 14 - HELDOUT
    gen_data = pq.read_table(out / "synpo" / "generator_sft.parquet")
    assert set(gen_data.column("seed_id").to_pylist()) <= set(split["train"])  # held-out seeds never train
    assert gen_data.column("completion").to_pylist()[0][0]["content"].startswith("<question> ")
    assert (out / "synpo" / "generator" / "model.safetensors").exists() and gen["summary"]["objective"] == "sft"
    assert report["eval_base"]["prompts"] == HELDOUT

    first, second = report["iterations"]
    m1 = json.loads((out / "iter_1" / "manifest.json").read_text())
    m2 = json.loads((out / "iter_2" / "manifest.json").read_text())
    # Every keyword list ends as a pair or a counted reject.
    for m in (m1, m2):
        assert m["status"] == "complete" and m["inputs"] == LISTS
        assert m["pairs_kept"] + sum(m["drops"].values()) == LISTS
        assert m["tokens"]["question"]["output"] > 0 and m["tokens"]["improve"]["output"] > 0
        assert m["eval"]["prompts"] == HELDOUT and m["eval"]["model"] == m["train"]["model_dir"]

    # Iteration 1: π_0 answers, R_1 rewrites; iteration 2: π_1 answers, R_2 (trained on π_1's answers) rewrites,
    # π_0 still writes the rejected answers, and SimPO starts from θ0 again.
    base = report["base_model"]
    assert m1["models"]["policy"] == base and m1["models"]["improver"] == str(out / "iter_1" / "improver")
    assert m2["models"]["policy"] == first["model"] == str(out / "iter_1" / "model")
    assert m2["models"]["base"] == base and m2["models"]["improver"] == str(out / "iter_2" / "improver")
    assert "respond_initial" in m2["tokens"] and "respond_initial" not in m1["tokens"]
    assert json.loads((out / "iter_2" / "improver.json").read_text())["policy"] == first["model"]
    assert m2["train"]["init_model"] == base
    for k in (1, 2):
        assert (out / f"iter_{k}" / "improver" / "model.safetensors").exists()
        assert (out / f"iter_{k}" / "model" / "model.safetensors").exists()

    # The cumulative dataset: iteration 2 trains on both iterations' pairs, each prompt once.
    added = [out / f"iter_{k}" / "added" / "part-00000.parquet" for k in (1, 2)]
    sizes = [pq.read_metadata(f).num_rows for f in added]
    assert m1["cumulative_pairs"] == sizes[0] >= 2 and m2["cumulative_pairs"] == sum(sizes)
    train2 = json.loads((out / "iter_2" / "train.json").read_text())
    assert train2["train_files"] == [str(f) for f, n in zip(added, sizes) if n]
    assert train2["summary"]["rows"] == sum(sizes)
    d = _table(added)
    assert d.schema.equals(PAIR_SCHEMA)
    assert len(set(d.column("prompt_id").to_pylist())) == d.num_rows
    assert set(d.column("mode").to_pylist()) == {"synpo"}
    assert all(len(s.split(", ")) == 3 for s in d.column("source").to_pylist())
    for row in d.to_pylist():
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    # tiny_random's preset keeps cut texts (keep_without_eos): marked in the shards, counted per stage.
    assert m1["truncation"] == "keep_without_eos" and m1["cut"]["improve"]["completions"] >= m1["pairs_kept"]
    assert set(d.column("chosen_finish_reason").to_pylist() + d.column("rejected_finish_reason").to_pylist()) \
        <= {"stop", "length"}

    # Re-running the finished command redoes nothing.
    mtime = (out / "iter_2" / "model" / "model.safetensors").stat().st_mtime_ns
    again = run(cfg)
    assert (out / "iter_2" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    assert [i["cumulative_pairs"] for i in again["iterations"]] == [m1["cumulative_pairs"], m2["cumulative_pairs"]]

    # A setting that run.json does not bind (DeepSpeed) but the finished steps used: refused, naming it.
    from selfalign_ray.steps import StepSettingsError

    with pytest.raises(StepSettingsError, match=r"generator SFT: .*generator.json was made with different settings "
                                                r"\(deepspeed.zero_optimization.offload_optimizer.device: <unset> -> "
                                                r"\"cpu\""):
        run(synpo_cfg(out, seeds, "deepspeed=zero3_offload"))
    assert (out / "iter_2" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    assert not (out / ".lock").exists() and not (out / "iter_2" / "model_ray").exists()
