"""The pre-flight check and pool fitting, without Ray: capacities are built by hand or from Ray's own autoscaler
config message (a `ray up` / KubeRay cluster's node types), asks from the composed configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfalign_ray.cli import compose
from selfalign_ray.config import ConfigError
from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.preflight import (
    GIB,
    Capacity,
    PreflightError,
    check,
    check_shared_fit,
    engine_ask,
    run_asks,
    train_ask,
    weight_bytes,
)
from selfalign_ray.synpo.chain import build_chain, resolve_pool_resources, split_engine
from selfalign_ray.train.config import TrainConfig

VLLM_GPU = EngineConfig(kind="vllm", num_gpus_per_actor=1)


def _static(cpus: float, gpus: float) -> Capacity:
    now = {"CPU": cpus, "GPU": gpus}
    return Capacity(now, dict(now), gpus, "this machine's embedded Ray (it does not scale)")


def test_vllm_without_gpus_is_refused_with_the_cpu_engines_named():
    with pytest.raises(PreflightError, match=r"generation asks for 1 GPU\(s\) .* at most 0; Ray would wait forever\. "
                                             r".*engine=vllm_cpu .* or engine=hf"):
        check([engine_ask("generation", VLLM_GPU, 1, "full")], _static(2, 0))


def test_an_autoscaling_cluster_is_not_refused_for_gpu_nodes_that_are_not_up_yet(monkeypatch):
    """The `ray up` cluster: a CPU head, GPU workers with min_workers 0. Ray reports the node types (the same
    message the autoscaler publishes); the limit is what they can add up to."""
    import ray
    from ray.core.generated import autoscaler_pb2

    import selfalign_ray.preflight as preflight

    config = autoscaler_pb2.ClusterConfig()
    head = config.node_group_configs.add(name="head", max_count=1)
    head.resources.update({"CPU": 8})
    gpu = config.node_group_configs.add(name="gpu_worker", max_count=2)
    gpu.resources.update({"CPU": 96, "GPU": 8})
    monkeypatch.setattr(preflight, "_autoscaler_config", lambda: config)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0}}])
    capacity = preflight.read_capacity()
    assert capacity.now == {"CPU": 8.0, "GPU": 0.0}
    assert capacity.limit == {"CPU": 200.0, "GPU": 16.0} and capacity.node_gpus == 8
    asks = [engine_ask("generation", EngineConfig(kind="vllm", num_actors=4, num_gpus_per_actor=1,
                                                  tensor_parallel_size=2), 1, "full"),
            train_ask("training", TrainConfig(num_workers=8, use_gpu=True, cpus_per_worker=8))]
    assert check(asks, capacity) == []
    with pytest.raises(PreflightError, match=r"asks for 24 GPU\(s\) .* the autoscaler's maximum offers at most 16 "
                                             r"\(it has 0 now\)"):
        check([train_ask("training", TrainConfig(num_workers=24, use_gpu=True, cpus_per_worker=1))], capacity)
    # A node type without a maximum: no limit.
    unbounded = autoscaler_pb2.ClusterConfig()
    unbounded.node_group_configs.add(name="gpu", max_count=-1).resources.update({"GPU": 8})
    monkeypatch.setattr(preflight, "_autoscaler_config", lambda: unbounded)
    assert math.isinf(preflight.read_capacity().limit["GPU"])
    # The trainer's own check reads the same capacity: the 8 GPU workers are not refused on a head without GPUs.
    from selfalign_ray.train.trainer import _check_cpu_budget

    monkeypatch.setattr(preflight, "read_capacity", lambda cluster=None: capacity)
    _check_cpu_budget(TrainConfig(num_workers=8, use_gpu=True, cpus_per_worker=8))
    with pytest.raises(ConfigError, match="leaves less than one CPU"):
        _check_cpu_budget(TrainConfig(num_workers=2, use_gpu=True, cpus_per_worker=100))


def test_a_joined_cluster_without_limits_only_warns_unless_max_gpus_is_set():
    unknown = Capacity({"CPU": 4.0, "GPU": 0.0}, {"CPU": None, "GPU": None}, None, "the joined cluster",
                       notes=["Ray reports no autoscaler limits for this cluster"])
    warnings = check([engine_ask("generation", VLLM_GPU, 1, "full")], unknown)
    assert len(warnings) == 1 and "asks for 1 GPU(s)" in warnings[0] and "cluster.max_gpus" in warnings[0]
    told = Capacity({"CPU": 4.0, "GPU": 0.0}, {"CPU": None, "GPU": 4.0}, None, "cluster.max_gpus")
    with pytest.raises(PreflightError, match=r"asks for 8 GPU\(s\) .* cluster.max_gpus offers at most 4"):
        check([engine_ask("generation", EngineConfig(kind="vllm", num_actors=8, num_gpus_per_actor=1), 1, "full")],
              told)


def test_training_keeps_a_cpu_for_ray_data():
    with pytest.raises(PreflightError, match=r"training asks for 3 CPU\(s\) .* at most 2"):
        check([train_ask("training", TrainConfig(num_workers=2, cpus_per_worker=1))], _static(2, 0))
    assert check([train_ask("training", TrainConfig(num_workers=2, cpus_per_worker=0.5))], _static(2, 0)) == []


def test_pools_default_to_one_engine_per_device_on_gpus_and_split_memory_when_shared():
    assert resolve_pool_resources("auto", VLLM_GPU) == "full"
    assert resolve_pool_resources("auto", EngineConfig(kind="hf")) == "split"
    pools = build_chain([(r, f"/m/{r}", [object()]) for r in ("generator", "policy", "improver", "initial")],
                        VLLM_GPU, "split")
    share = pools[0].engine
    assert (share.num_gpus_per_actor, share.gpu_memory_utilization) == (0.25, pytest.approx(0.85 / 4))
    assert split_engine(EngineConfig(kind="hf", num_cpus_per_actor=2), 4).gpu_memory_utilization == 0.85
    full = build_chain([(r, f"/m/{r}", [object()]) for r in ("a", "b")], VLLM_GPU, "auto")
    assert [p.engine for p in full] == [VLLM_GPU, VLLM_GPU]


def test_the_composed_runs_ask_for_what_their_pools_and_workers_need():
    synpo = run_asks(compose(["mode=synpo", "engine=vllm"]))
    assert [(a.stage.split(" ")[0], a.pools, a.resources, a.gpus) for a in synpo] == [
        ("generation", 4, "full", 4.0), ("training", 0, "", 0)]
    on_cpu = run_asks(compose(["mode=synpo"]))
    assert (on_cpu[0].pools, on_cpu[0].resources, on_cpu[0].cpus) == (4, "split", 1.0)
    sao = run_asks(compose(["engine=vllm", "engine.tensor_parallel_size=2", "engine.num_actors=4",
                            "eval.enabled=true"]))
    assert [(a.stage, a.gpus, a.gpus_one_node) for a in sao] == [
        ("generation", 8.0, 2.0), ("training", 0, 0), ("evaluation", 16.0, 2.0)]


def _model(tmp_path: Path, mib: int, dtype: str) -> Path:
    folder = tmp_path / f"m{mib}{dtype}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": dtype}))
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(mib * 1024 * 1024)
    return folder


def test_split_refuses_engines_whose_weights_cannot_share_a_device(tmp_path):
    model = str(_model(tmp_path, 400, "float32"))
    assert weight_bytes(model, "auto") == 200 * 1024 * 1024  # float32 files, loaded in bfloat16 on GPU
    assert weight_bytes(model, "float32") == 400 * 1024 * 1024
    assert weight_bytes(str(tmp_path / "nope")) is None
    one_gib = GIB
    # 4 engines on a 1 GiB device: 0.85 / 4 of it = 0.21 GiB each, the weights need 0.20 GiB: fits.
    check_shared_fit([model], VLLM_GPU, 4, "split", one_gib, "generation")
    with pytest.raises(PreflightError, match=r"generation: pool_resources=split puts 5 engines on each GPU, each with "
                                             r"gpu_memory_utilization 0.85/5 = 0.17 GiB of 1.0 GiB, but .* needs "
                                             r"0.20 GiB"):
        check_shared_fit([model], VLLM_GPU, 5, "split", one_gib, "generation")
    check_shared_fit([model], VLLM_GPU, 5, "full", one_gib, "generation")  # one engine per device: not shared
    check_shared_fit([model], VLLM_GPU, 5, "split", None, "generation")  # unknown memory: warned, not refused


def test_the_cluster_presets_declare_gpus_and_limits():
    cfg = compose(["cluster.num_gpus=8", "cluster.max_gpus=16", "cluster.gpu_memory_gb=80"])
    assert (cfg.cluster.num_gpus, cfg.cluster.max_gpus, cfg.cluster.gpu_memory_gb) == (8, 16, 80)
    remote = compose(["cluster=remote"]).cluster
    assert remote.max_gpus is None and remote.gpu_memory_gb is None
