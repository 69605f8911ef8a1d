"""Chains of engine pools: SynPO's stages run on up to four models (generator, policy, improver, initial).

`build_chain` turns an ordered list of (model, stages) steps into `PoolSpec`s: adjacent steps on the same
model share one pool (one model copy), a step with only engine-free stages joins the pool before it, and
the pools divide the engine's resource reservation between them (`split`, the default) or each reserve it
whole (`full`). Split is what makes a 4-pool chain schedulable on a 2-CPU box: with one row block in
flight the pools work one after another anyway. On GPUs, `split` means the models share the GPU(s) of one
engine reservation (set engine.gpu_memory_utilization to at most 1/pools for vLLM); `full` gives each its own.

`run_rows` streams a small table (held-out seeds, improver training prompts) through a chain and returns
every row, for passes that produce no preference shards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from selfalign_ray.engines.factory import EngineConfig
from selfalign_ray.generation.pool import PoolSpec, apply_pool

POOL_RESOURCES = ("split", "full")


def _engine_free(stage: Any) -> bool:
    return getattr(stage, "needs_engine", True) is False


def build_chain(steps: list[tuple[str, str, list]], engine: EngineConfig, resources: str = "split") -> list[PoolSpec]:
    """steps: (pool name, model path, stages) in order. Returns the pools to chain."""
    if resources not in POOL_RESOURCES:
        raise ValueError(f"mode.pool_resources={resources!r}: use one of {', '.join(POOL_RESOURCES)}")
    pools: list[PoolSpec] = []
    for name, model, stages in steps:
        if not stages:
            continue
        engine_free = all(_engine_free(s) for s in stages)
        if pools and (pools[-1].model_path == model or engine_free):
            pools[-1].stages.extend(stages)
            if not engine_free:  # pools are named after the model roles they serve
                pools[-1].name += f"+{name}"
            continue
        if engine_free:
            raise ValueError(f"chain step {name!r} has no engine stage and no pool before it to join")
        pools.append(PoolSpec(name, model, engine, list(stages)))
    if resources == "split" and len(pools) > 1:
        if engine.tensor_parallel_size > 1 and engine.num_gpus_per_actor > 0:
            raise ValueError("mode.pool_resources=split cannot share tensor-parallel GPU bundles between pools; "
                             "use mode.pool_resources=full")
        share = dataclasses.replace(engine, num_cpus_per_actor=engine.num_cpus_per_actor / len(pools),
                                    num_gpus_per_actor=engine.num_gpus_per_actor / len(pools))
        pools = [dataclasses.replace(p, engine=share) for p in pools]
    return pools


def run_rows(rows: pd.DataFrame, pools: list[PoolSpec]) -> pd.DataFrame:
    """Every row of `rows` after all pools, in the input order (a small, unsharded pass)."""
    import ray.data

    if rows.empty:
        return rows
    rows = rows.reset_index(drop=True)
    rows["row_id"] = range(len(rows))
    batch = max(1, min(p.engine.batch_size for p in pools))
    ds = ray.data.from_pandas([rows.iloc[i:i + batch] for i in range(0, len(rows), batch)])
    for pool in pools:
        ds = apply_pool(ds, pool)
    out = pd.concat(list(ds.iter_batches(batch_size=None, batch_format="pandas")), ignore_index=True)
    if len(out) != len(rows):
        raise RuntimeError(f"{len(rows)} rows went into the pools and {len(out)} came back")
    return out.sort_values("row_id").reset_index(drop=True)
