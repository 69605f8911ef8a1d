"""The cumulative synthetic preference dataset D (paper Alg. 1, line 6: D <- D ∪ valid pairs of iteration t).

Per iteration k:
    iter_k/shards/       every valid pair of the iteration (SAO schema, mode="synpo")
    iter_k/added/part-00000.parquet
                         the pairs added to D: all of them, or a seeded random `pairs_per_iteration` of them
                         (the paper adds 10,000 per iteration, App. C.3)
D after iteration k is the union of iter_1..k/added — what SimPO trains on in iteration k.

Prompts are unique across D: the generation of iteration k already rejects prompts that were valid pairs
in an earlier iteration (reason duplicate_prompt_earlier_iteration, see synpo/pipeline.py), and
`cumulative_files` checks it again before training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfalign_ray.data.schema import PAIR_SCHEMA, conform_pairs
from selfalign_ray.data.shards import atomic_write_bytes
from selfalign_ray.engines.base import request_seed

ADDED_FILE = "added/part-00000.parquet"


def _pair_files(manifest: dict) -> list[str]:
    return [s["file"] for s in manifest.get("shards", []) if s["rows"] > 0]


def earlier_prompt_ids(out: Path, iteration: int) -> set[str]:
    """Prompt ids of every valid pair of iterations 1..iteration-1 (from their manifests)."""
    seen: set[str] = set()
    for j in range(1, iteration):
        manifest_path = out / f"iter_{j}" / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} is missing: iteration {j} must finish before iteration {iteration}")
        for f in _pair_files(json.loads(manifest_path.read_text())):
            seen.update(pq.read_table(f, columns=["prompt_id"]).column(0).to_pylist())
    return seen


def add_pairs(iter_dir: Path, manifest: dict, limit: int | None, seed: int, iteration: int) -> dict:
    """Write `iter_dir/added/` (this iteration's contribution to D); deterministic, so safe to redo on resume."""
    files = _pair_files(manifest)
    table = pa.concat_tables([conform_pairs(pq.read_table(f)) for f in files]) if files else PAIR_SCHEMA.empty_table()
    valid = table.num_rows
    if limit is not None and valid > limit:
        rng = random.Random(request_seed(seed, "add_pairs", iteration))
        table = table.take(sorted(rng.sample(range(valid), limit)))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    path = iter_dir / ADDED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return {"file": str(path), "rows": table.num_rows, "valid_pairs": valid, "limit": limit}


def cumulative_files(out: Path, iteration: int) -> tuple[list[str], int]:
    """The files of D after `iteration` (non-empty ones) and its size; fails on a repeated prompt id."""
    files, seen = [], {}
    for j in range(1, iteration + 1):
        path = out / f"iter_{j}" / ADDED_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: iteration {j} has not added its pairs yet")
        ids = pq.read_table(path, columns=["prompt_id"]).column(0).to_pylist()
        for pid in ids:
            if pid in seen:
                raise RuntimeError(f"prompt {pid[:12]}… is in the cumulative dataset twice (iterations {seen[pid]} and {j})")
            seen[pid] = j
        if ids:
            files.append(str(path))
    return files, len(seen)
