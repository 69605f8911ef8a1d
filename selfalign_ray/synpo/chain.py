"""Chains of engine pools: SynPO's stages run on up to four models (generator, policy, improver, initial).

`build_chain` turns an ordered list of (model, stages) steps into `PoolSpec`s: adjacent steps on the same
model share one pool (one model copy), a step with only engine-free stages joins the pool before it. How
the pools reserve resources (`pool_resources`):
- `full`: each pool reserves the whole engine amount (on GPUs: one engine per device, what vLLM expects).
- `split`: the pools divide one engine reservation between them (CPUs and GPUs per actor / pools). On a
  2-CPU box that is what makes a 4-pool chain schedulable (with one row block in flight the pools work one
  after another anyway). On GPUs the pools' engines then share each device, so each gets
  `gpu_memory_utilization / pools` of its memory (vLLM sizes its KV cache from it); whether the weights fit
  in that share is checked before anything starts (selfalign_ray/preflight.py).
- `auto` (the default): `full` when the engine asks for GPUs, `split` on CPU.

`run_rows` streams a small table (held-out seeds, improver training prompts) through a chain and returns
every row, for passes that produce no preference shards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.generation.pool import PoolSpec, PoolStream

POOL_RESOURCES = ("auto", "split", "full")


def resolve_pool_resources(resources: str, engine: EngineConfig) -> str:
    """`auto` -> `full` on GPUs (one engine per device), `split` on CPU."""
    if resources not in POOL_RESOURCES:
        raise ValueError(f"mode.pool_resources={resources!r}: use one of {', '.join(POOL_RESOURCES)}")
    if resources == "auto":
        return "full" if engine.num_gpus_per_actor > 0 else "split"
    return resources


def split_engine(engine: EngineConfig, pools: int) -> EngineConfig:
    """One pool's share of an engine reservation divided between `pools` pools (see the module doc)."""
    if pools <= 1:
        return engine
    if engine.tensor_parallel_size > 1 and engine.num_gpus_per_actor > 0:
        raise ValueError("mode.pool_resources=split cannot share tensor-parallel GPU bundles between pools; "
                         "use mode.pool_resources=full (or auto)")
    share = dataclasses.replace(engine, num_cpus_per_actor=engine.num_cpus_per_actor / pools,
                                num_gpus_per_actor=engine.num_gpus_per_actor / pools)
    if engine.num_gpus_per_actor > 0:
        # `pools` engines on each device: each may take only its part of the memory the config allows one engine.
        share.gpu_memory_utilization = engine.gpu_memory_utilization / pools
    return share


def _engine_free(stage: Any) -> bool:
    return getattr(stage, "needs_engine", True) is False


def build_chain(steps: list[tuple[str, str, list]], engine: EngineConfig, resources: str = "auto") -> list[PoolSpec]:
    """steps: (pool name, model path, stages) in order. Returns the pools to chain."""
    resources = resolve_pool_resources(resources, engine)
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
        share = split_engine(engine, len(pools))
        pools = [dataclasses.replace(p, engine=share) for p in pools]
    return pools


def run_rows(rows: pd.DataFrame, pools: list[PoolSpec], what: str = "engine pass") -> pd.DataFrame:
    """Every row of `rows` after all pools, in the input order (a small, unsharded pass)."""
    import ray.data

    if rows.empty:
        return rows
    rows = rows.reset_index(drop=True)
    rows["row_id"] = range(len(rows))
    batch = max(1, min(p.engine.batch_size for p in pools))
    ds = ray.data.from_pandas([rows.iloc[i:i + batch] for i in range(0, len(rows), batch)])
    # Placement groups removed and GPUs checked free when the pass ends (generation/pool.py PoolStream).
    with PoolStream(what) as stream:
        out = pd.concat(list(stream.batches(ds, pools)), ignore_index=True)
    if len(out) != len(rows):
        raise RuntimeError(f"{len(rows)} rows went into the pools and {len(out)} came back")
    return out.sort_values("row_id").reset_index(drop=True)
