"""The cumulative synthetic dataset D: each iteration adds (up to pairs_per_iteration of) its pairs, D is the union
of all iterations so far, and no prompt is in D twice."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign_ray.data.schema import PAIR_SCHEMA, assistant_turn, prompt_id, user_turn
from selfalign_ray.generation.assemble import PairAssembler
from selfalign_ray.generation.rows import with_status_columns
from selfalign_ray.synpo.dataset import (
    ADDED_FILE,
    add_pairs,
    cumulative_files,
    earlier_prompt_ids,
)
from selfalign_ray.synpo.pipeline import STAGE_NAMES, SkipEarlierPrompts


def _pairs(prompts, iteration):
    return pa.Table.from_pylist([{
        "prompt_id": prompt_id(p), "prompt": user_turn(p), "chosen": assistant_turn(f"good {p}"),
        "rejected": assistant_turn(f"bad {p}"), "mode": "synpo", "iteration": iteration, "source": "a, b, c",
        "generator_model": "m", "judge_confidence": 0.7, "chosen_tokens": 3, "rejected_tokens": 3,
    } for p in prompts], schema=PAIR_SCHEMA)


def _iteration(out, k, shards):
    """An iteration directory as the generation leaves it: shard files + a manifest listing them."""
    d = out / f"iter_{k}"
    (d / "shards").mkdir(parents=True)
    listed = []
    for i, prompts in enumerate(shards):
        f = d / "shards" / f"part-{i:05d}.parquet"
        pq.write_table(_pairs(prompts, k), f)
        listed.append({"file": str(f), "rows": len(prompts)})
    manifest = {"shards": listed}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, manifest


def test_dataset_grows_by_each_iterations_pairs_without_duplicates(tmp_path):
    d1, m1 = _iteration(tmp_path, 1, [[f"q{i}" for i in range(5)], []])
    added = add_pairs(d1, m1, limit=None, seed=0, iteration=1)
    assert (added["rows"], added["valid_pairs"]) == (5, 5)
    files, size = cumulative_files(tmp_path, 1)
    assert files == [str(d1 / ADDED_FILE)] and size == 5

    # Iteration 2 knows iteration 1's prompts (its generation rejects them) and adds 3 of its 6 valid pairs.
    assert earlier_prompt_ids(tmp_path, 2) == {prompt_id(f"q{i}") for i in range(5)}
    d2, m2 = _iteration(tmp_path, 2, [[f"r{i}" for i in range(4)], ["r4", "r5"]])
    added = add_pairs(d2, m2, limit=3, seed=0, iteration=2)
    assert (added["rows"], added["valid_pairs"], added["limit"]) == (3, 6, 3)
    assert add_pairs(d2, m2, limit=3, seed=0, iteration=2) == added  # the same subset when redone on resume
    files, size = cumulative_files(tmp_path, 2)
    assert files == [str(d1 / ADDED_FILE), str(d2 / ADDED_FILE)] and size == 8
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.equals(PAIR_SCHEMA)
    assert len(set(table.column("prompt_id").to_pylist())) == 8
    assert sorted(set(table.column("iteration").to_pylist())) == [1, 2]
    sampled = [p[0]["content"] for p in pq.read_table(d2 / ADDED_FILE).column("prompt").to_pylist()]
    assert set(sampled) < {f"r{i}" for i in range(6)}

    # An iteration without pairs adds an empty file and D keeps its size.
    d3, m3 = _iteration(tmp_path, 3, [[]])
    assert add_pairs(d3, m3, limit=3, seed=0, iteration=3)["rows"] == 0
    files, size = cumulative_files(tmp_path, 3)
    assert len(files) == 2 and size == 8


def test_cumulative_dataset_refuses_a_prompt_twice(tmp_path):
    for k, prompts in ((1, ["same", "a"]), (2, ["same", "b"])):
        d, m = _iteration(tmp_path, k, [prompts])
        add_pairs(d, m, limit=None, seed=0, iteration=k)
    with pytest.raises(RuntimeError, match=r"in the cumulative dataset twice \(iterations 1 and 2\)"):
        cumulative_files(tmp_path, 2)


def test_missing_earlier_iterations_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="iteration 1 must finish before iteration 2"):
        earlier_prompt_ids(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="iteration 1 has not added its pairs"):
        cumulative_files(tmp_path, 1)


def test_generation_rejects_prompts_of_earlier_iterations():
    """The assembler of iteration 2 turns a prompt that is already in D into a counted reject."""
    rows = with_status_columns(pd.DataFrame({
        "row_id": [0, 1, 2], "chunk_id": 0, "source_id": ["p0", "p1", "p2"], "source": "a, b, c", "iteration": 2,
        "mode": "synpo", "prompt_text": ["old prompt", "new prompt", "new prompt"],
        "chosen_text": "better", "rejected_text": "worse", "chosen_tokens": 1, "rejected_tokens": 1,
        "judge_confidence": 0.6, "judge_agreement": "yes",
    }, index=[0, 0, 1]))  # rows of one chunk come from several batches: their indexes repeat
    assembler = SkipEarlierPrompts(PairAssembler("synpo", 2, "m", STAGE_NAMES), frozenset({prompt_id("old prompt")}))
    pairs, rejects, stats = assembler(rows, set())
    assert pairs.column("prompt").to_pylist() == [user_turn("new prompt")]
    assert rejects.column("reason").to_pylist() == ["duplicate_prompt_earlier_iteration", "duplicate_prompt"]
    assert stats.drops == {"duplicate_prompt_earlier_iteration": 1, "duplicate_prompt": 1}
    assert pairs.column("mode").to_pylist() == ["synpo"] and pairs.column("source").to_pylist() == ["a, b, c"]
