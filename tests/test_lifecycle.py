"""GPU layouts on this CPU box: an embedded Ray declaring 8 logical GPUs schedules the real pools (tensor-parallel
placement groups, several pools in one chain) exactly as an 8-GPU node would. The engine is the real `hf` engine
on the tiny random model; it runs on CPU (no CUDA here), so nothing but Ray's scheduling sees the GPUs.

Checked: every placement group a pass creates is removed when it ends or fails, every GPU is free afterwards,
and a training-sized reservation of all GPUs is then granted within seconds.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from selfalign_ray.engines.base import SamplingSpec
from selfalign_ray.engines.config import EngineConfig

GPUS = 8
CPUS = 10


@pytest.fixture(scope="module")
def ray_gpus():
    """One embedded Ray for the module, through the app's own init_ray (cluster.num_gpus=8)."""
    import ray
    from omegaconf import OmegaConf

    from selfalign_ray.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(OmegaConf.create({"address": None, "num_cpus": CPUS, "num_gpus": GPUS, "include_dashboard": False,
                               "dashboard_port": 8265}))
    yield ray
    ray.shutdown()


def _groups(ray) -> dict[str, str]:
    return {pg_id: info["state"] for pg_id, info in ray.util.placement_group_table().items()}


def _assert_all_released(ray, before: dict[str, str]) -> None:
    new = {k: v for k, v in _groups(ray).items() if k not in before}
    assert new and set(new.values()) == {"REMOVED"}, new
    assert ray.available_resources().get("GPU", 0) == GPUS


def _training_gets_every_gpu(ray) -> None:
    """What TorchTrainer asks for, without training: one bundle per GPU, granted within seconds."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"GPU": 1, "CPU": 1}] * GPUS, strategy="PACK")
    try:
        assert pg.wait(timeout_seconds=20), "a reservation of every GPU was not granted after generation"
    finally:
        remove_placement_group(pg)


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"source_id": [f"p{i}" for i in range(n)], "prompt_text": [f"Say {i}." for i in range(n)],
                         "iteration": 1, "mode": "eval"})


def _two_models(tmp_path: Path, tiny_model_path: str) -> tuple[str, str]:
    """Two paths of the tiny model: two models, so the chain keeps two pools."""
    other = tmp_path / "tiny_copy"
    other.symlink_to(tiny_model_path, target_is_directory=True)
    return tiny_model_path, str(other)


ENGINE = EngineConfig(kind="hf", num_actors=1, batch_size=2, num_cpus_per_actor=1, num_gpus_per_actor=1,
                      tensor_parallel_size=2, max_model_len=128, torch_threads=1)


@pytest.mark.timeout(300)
def test_tensor_parallel_pools_give_back_every_gpu(ray_gpus, tmp_path, tiny_model_path):
    from selfalign_ray.eval.stages import AnswerStage
    from selfalign_ray.synpo.chain import build_chain, run_rows

    ray = ray_gpus
    a, b = _two_models(tmp_path, tiny_model_path)
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=2)
    pools = build_chain([("a", a, [AnswerStage(spec, 0, "a", "answer_a")]),
                         ("b", b, [AnswerStage(spec, 0, "b", "answer_b")])], ENGINE, "auto")
    assert [p.engine.tensor_parallel_size for p in pools] == [2, 2]  # auto -> full on GPUs: nothing shared
    before = _groups(ray)
    started = time.monotonic()
    out = run_rows(_rows(3), pools, "test pass")
    assert len(out) == 3 and (out["a_error"] == "").all() and (out["b_error"] == "").all()
    # One STRICT_PACK group of 2 GPU bundles per actor (2 pools x 1 actor), all removed; all 8 GPUs free.
    new = {k: v for k, v in _groups(ray).items() if k not in before}
    assert len(new) == 2, new
    _assert_all_released(ray, before)
    _training_gets_every_gpu(ray)
    assert time.monotonic() - started < 240


@pytest.mark.timeout(180)
def test_a_failed_pass_still_removes_its_placement_groups(ray_gpus, tiny_model_path):
    from selfalign_ray.eval.stages import AnswerStage
    from selfalign_ray.generation.pool import PoolSpec, PoolStream

    ray = ray_gpus
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=2)
    pool = PoolSpec("a", tiny_model_path, ENGINE, [AnswerStage(spec, 0, "a", "answer_a")])
    before = _groups(ray)
    ds = ray.data.from_pandas([_rows(4).iloc[i:i + 2] for i in (0, 2)])
    with pytest.raises(RuntimeError, match="the driver failed"):
        with PoolStream("failing pass") as stream:
            for _ in stream.batches(ds, [pool]):
                raise RuntimeError("the driver failed while committing a chunk")
    # Removing the group kills its actor; the GPUs come back without waiting for the job to end.
    from selfalign_ray.cluster import wait_for_gpus

    wait_for_gpus(GPUS, "failing pass", timeout_s=30)
    _assert_all_released(ray, before)


@pytest.mark.timeout(60)
def test_gpus_still_held_after_a_pass_are_an_error_not_a_hang(ray_gpus):
    from ray.util.placement_group import placement_group, remove_placement_group

    from selfalign_ray.cluster import wait_for_gpus

    pg = placement_group([{"GPU": 2}])
    assert pg.wait(timeout_seconds=20)
    try:
        with pytest.raises(RuntimeError, match=r"generation: 2 GPU\(s\) are still reserved 1 s after it finished "
                                               r"\(6 of 8 free, 8 were free before"):
            wait_for_gpus(GPUS, "generation", timeout_s=1, poll_s=0.2)
    finally:
        remove_placement_group(pg)
    assert wait_for_gpus(GPUS, "generation", timeout_s=20) == GPUS


@pytest.mark.timeout(60)
def test_preflight_reads_the_logical_gpus_and_refuses_with_numbers(ray_gpus):
    from selfalign_ray.preflight import PreflightError, check, engine_ask, read_capacity, train_ask
    from selfalign_ray.train.config import TrainConfig

    capacity = read_capacity()
    assert capacity.limit["GPU"] == GPUS and capacity.node_gpus == GPUS  # embedded: it cannot grow
    fits = [engine_ask("generation", EngineConfig(kind="vllm", num_actors=4, num_gpus_per_actor=1,
                                                  tensor_parallel_size=2), 1, "full")]
    assert check(fits, capacity) == []
    too_many = engine_ask("generation", EngineConfig(kind="vllm", num_actors=5, num_gpus_per_actor=1,
                                                     tensor_parallel_size=2), 1, "full")
    with pytest.raises(PreflightError, match=r"generation asks for 10 GPU\(s\) \(1 pool\(s\) \(full\) x 5 engine "
                                             r"actor\(s\) x tensor_parallel_size 2 x 1 GPU\) but .* at most 8"):
        check([too_many], capacity)
    wide = engine_ask("generation", EngineConfig(kind="vllm", num_gpus_per_actor=1, tensor_parallel_size=16), 1,
                      "full")
    with pytest.raises(PreflightError, match="16 GPUs on one node"):
        check([wide], capacity)
    workers = TrainConfig(num_workers=9, use_gpu=True, cpus_per_worker=0.5)
    with pytest.raises(PreflightError, match=r"training asks for 9 GPU\(s\)"):
        check([train_ask("training", workers)], capacity)


def test_tensor_parallel_workers_ask_for_their_bundle_share(monkeypatch):
    """vLLM's Ray executor gives each TP worker VLLM_RAY_PER_WORKER_GPUS GPUs (default 1): it must be the
    bundle's share, or a worker never fits a fractional bundle."""
    from selfalign_ray.engines.vllm import _prepare_process

    monkeypatch.delenv("VLLM_RAY_PER_WORKER_GPUS", raising=False)
    _prepare_process(EngineConfig(kind="vllm", num_gpus_per_actor=0.5, tensor_parallel_size=2), on_cpu=False)
    assert os.environ["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    import vllm.envs

    assert vllm.envs.VLLM_RAY_PER_WORKER_GPUS == 0.5  # what RayExecutorV2._get_actor_resource_kwargs reads


def test_an_actor_closes_its_engine_when_ray_data_drops_it():
    from selfalign_ray.generation.pool import StageRunner

    class Engine:
        closed_on = None

        def close(self):
            Engine.closed_on = __import__("threading").current_thread().name

    runner = StageRunner.__new__(StageRunner)  # the constructor would load a model; __del__ is what is tested
    runner._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    runner.engine = Engine()
    del runner
    assert Engine.closed_on and Engine.closed_on.startswith("engine")  # on the engine's own thread
