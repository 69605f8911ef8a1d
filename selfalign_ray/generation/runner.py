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
from selfalign_ray.generation.metrics import PairMetrics
from selfalign_ray.generation.pool import ATTENTION_COLUMN, PoolSpec, PoolStream
from selfalign_ray.watchdog import StallError, WatchedIterator

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
    """Generate every chunk of `inputs` not yet committed in `store`; return the manifest.

    The pools' placement groups are removed when generation ends or fails, and the GPUs they held are
    checked free before this returns (training comes next; generation/pool.py PoolStream)."""
    with PoolStream("generation") as stream:
        return _run_generation(stream, store, inputs, pools, assemble, manifest_extra)


def _run_generation(stream: PoolStream, store: IterationStore, inputs: pd.DataFrame, pools: list[PoolSpec],
                    assemble: Assembler, manifest_extra: dict) -> dict:
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
        outcomes = PairMetrics()  # kept/dropped by reason and judge agreement, as Ray metrics (dashboard)
        buffers: dict[int, list[pd.DataFrame]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        attention: set[str] = set()  # what the engines ran, as each actor reported it
        ready: dict[int, pd.DataFrame] = {}  # complete chunks waiting for an earlier chunk to commit first
        order = sorted(int(c) for c in set(pending["chunk_id"]))
        # Watchdog: no chunk committed for engine.stall_timeout_s -> StallError naming the pools (pool.py).
        stall_s = max(p.engine.stall_timeout_s for p in pools)
        batches = iter(stream.batches(ds, pools, stall_timeout_s=stall_s,
                                      describe=lambda: _waiting_on(order, markers, expected)))
        while True:
            try:
                out = next(batches)
            except StopIteration:
                break
            except StallError:
                raise
            except Exception as err:  # the pool gave up on a batch: name its chunks, keep what is committed
                raise PoolFailure(_failure_message(err, pools, order, markers, expected)) from err
            if ATTENTION_COLUMN in out:
                attention.update(str(v) for v in out[ATTENTION_COLUMN].unique())
            for chunk_id, rows in out.groupby("chunk_id"):
                chunk_id = int(chunk_id)
                buffers[chunk_id].append(rows)
                counts[chunk_id] += len(rows)
                if counts[chunk_id] == expected[chunk_id]:
                    ready[chunk_id] = pd.concat(buffers.pop(chunk_id)).sort_values("row_id")
            # Commit in chunk order, whatever order chunks finish in: the shared `seen` set then keeps the
            # copy of a duplicate prompt with the lowest (chunk_id, row_id), every time. A committed chunk is
            # never rewritten: a resume keeps its pairs and regenerates only uncommitted chunks (their `seen` set
            # holds every committed chunk's prompts).
            while order and order[0] in ready:
                chunk_id = order.pop(0)
                pairs, rejects, stats = assemble(ready.pop(chunk_id), seen)
                markers[chunk_id] = store.commit_chunk(chunk_id, pairs, rejects, stats)
                if isinstance(batches, WatchedIterator):
                    batches.progress()
                outcomes.record(manifest_extra, pairs, rejects, stats)
                store.write_manifest(markers, {**manifest_extra, "status": "partial"})
                log.info("chunk %d committed: %d pairs, %d rejects", chunk_id, pairs.num_rows, rejects.num_rows)
        if buffers or ready:
            raise RuntimeError(f"generation ended with incomplete chunks {sorted(buffers)} (complete chunks "
                               f"{sorted(ready)} waited on them): rows were lost in the pipeline")
    missing = sorted(set(expected) - set(markers))
    if missing:
        raise RuntimeError(f"chunks {missing} were not committed")
    extra = {**manifest_extra, "status": "complete"}
    if not pending.empty:
        extra["generation"] = _throughput(store, {c: markers[c] for c in set(pending["chunk_id"])},
                                          time.time() - started)
        extra["generation"]["engine_attention"] = sorted(attention)
    else:
        # Nothing left to do: keep the throughput of the run that did the work.
        old = store.read_manifest()
        if "generation" in old:
            extra["generation"] = old["generation"]
    return store.write_manifest(markers, extra)


class PoolFailure(RuntimeError):
    """An engine pool gave up on a batch (its actor died more often than engine.max_restarts allows, its retries
    were spent, or a stage raised); the message names the uncommitted chunks and the bounds."""


def _ids(chunks: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(c) for c in chunks[:limit])
    return shown + (f", ... ({len(chunks)} in all)" if len(chunks) > limit else "")


def _waiting_on(order: list[int], markers: dict, expected: dict) -> str:
    return f"{len(markers)} of {len(expected)} chunks committed; waiting on chunk(s) {_ids(order)}"


def _failure_message(err: BaseException, pools: list[PoolSpec], order: list[int], markers: dict,
                     expected: dict) -> str:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError)):
        bounds = "; ".join(f"pool {p.name}: engine.max_restarts={p.engine.max_restarts}, "
                           f"engine.max_task_retries={p.engine.max_task_retries}" for p in pools)
        why = (f"an engine actor died more often than its bounds allow ({bounds}): a batch of these chunks kills "
               f"every actor it runs on (host OOM, a crashing kernel), or nodes were lost")
    else:
        first = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {first[0] if first else ''}"
    return (f"generation failed on chunk(s) {_ids(order)} (not committed; {why}); the {len(markers)} of "
            f"{len(expected)} chunks already committed are kept and re-running the same command resumes from them")


def _throughput(store: IterationStore, fresh: dict[int, dict], wall: float) -> dict:
    """Rates over the chunks generated by this invocation (a resumed run counts only its own work)."""
    done = store.totals(fresh)
    out_tokens = sum(v.get("output", 0) for v in done.tokens.values())
    return {
        "wall_s": round(wall, 2),
        "rows_generated": done.inputs,
        "pairs": done.pairs,
        "pairs_per_min": round(done.pairs / wall * 60, 2) if wall else None,
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 2) if wall else None,
        "tokens_per_s_by_stage": {stage: round((v.get("prompt", 0) + v.get("output", 0)) / wall, 2)
                                  for stage, v in done.tokens.items()} if wall else {},
    }
