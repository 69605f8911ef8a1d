"""Drive a generation iteration: stream pending chunks through the pools, commit finished chunks.

Inputs are split into chunks (`shard_size` rows each). Rows stream through the actor pools; the
driver gathers the rows coming back by chunk and, once a chunk has all its rows, turns it into a
pair shard + reject file (atomically, see data/shards.py). Committed chunks are skipped on resume.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable

import pandas as pd
import pyarrow as pa

from selfalign_ray.data.shards import ChunkStats, IterationStore
from selfalign_ray.generation.pool import PoolSpec, apply_pool

log = logging.getLogger(__name__)

# (rows of one chunk, prompt ids seen so far) -> (pairs, rejects, stats); updates the seen set.
Assembler = Callable[[pd.DataFrame, set], tuple[pa.Table, pa.Table, ChunkStats]]


def assign_chunks(inputs: pd.DataFrame, shard_size: int) -> pd.DataFrame:
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    inputs = inputs.reset_index(drop=True)
    inputs["row_id"] = range(len(inputs))
    inputs["chunk_id"] = inputs["row_id"] // shard_size
    return inputs


def run_generation(store: IterationStore, inputs: pd.DataFrame, pools: list[PoolSpec],
                   assemble: Assembler, manifest_extra: dict) -> dict:
    """Generate every chunk of `inputs` not yet committed in `store`; return the manifest."""
    import ray

    markers = store.committed()
    expected = inputs.groupby("chunk_id").size().to_dict()
    pending = inputs[~inputs["chunk_id"].isin(markers)]
    seen = store.seen_prompt_ids(markers)
    started = time.time()
    if markers:
        log.info("resuming: %d of %d chunks already committed", len(markers), len(expected))
    if not pending.empty:
        # One block per engine batch, so every actor of the pool gets work from the start.
        batch = max(1, min(p.engine.batch_size for p in pools))
        blocks = [pending.iloc[i:i + batch] for i in range(0, len(pending), batch)]
        ds = ray.data.from_pandas(blocks)
        for pool in pools:
            ds = apply_pool(ds, pool)
        buffers: dict[int, list[pd.DataFrame]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for out in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for chunk_id, rows in out.groupby("chunk_id"):
                chunk_id = int(chunk_id)
                buffers[chunk_id].append(rows)
                counts[chunk_id] += len(rows)
                if counts[chunk_id] == expected[chunk_id]:
                    chunk = pd.concat(buffers.pop(chunk_id)).sort_values("row_id")
                    pairs, rejects, stats = assemble(chunk, seen)
                    markers[chunk_id] = store.commit_chunk(chunk_id, pairs, rejects, stats)
                    store.write_manifest(markers, {**manifest_extra, "status": "partial"})
                    log.info("chunk %d committed: %d pairs, %d rejects", chunk_id, pairs.num_rows, rejects.num_rows)
        if buffers:
            raise RuntimeError(f"generation ended with incomplete chunks {sorted(buffers)}: rows were lost in the pipeline")
    missing = sorted(set(expected) - set(markers))
    if missing:
        raise RuntimeError(f"chunks {missing} were not committed")
    wall = time.time() - started
    extra = {**manifest_extra, "status": "complete"}
    if not pending.empty:
        extra["generation"] = {"wall_s": round(wall, 2), "rows_generated": int(len(pending))}
    else:
        # Nothing to do: keep the timing of the run that did the work.
        import json
        old = json.loads((store.root / "manifest.json").read_text()) if (store.root / "manifest.json").exists() else {}
        if "generation" in old:
            extra["generation"] = old["generation"]
    manifest = store.write_manifest(markers, extra)
    gen = manifest.get("generation")
    if gen and not pending.empty:
        out_tokens = sum(v.get("output", 0) for v in manifest["tokens"].values())
        gen["pairs_per_min"] = round(manifest["pairs_kept"] / wall * 60, 2) if wall else None
        gen["output_tokens_per_s"] = round(out_tokens / wall, 2) if wall else None
        manifest = store.write_manifest(markers, {**extra, "generation": gen})
    return manifest
