"""Build an engine from the `engine` config group (one per actor)."""

from __future__ import annotations

from selfalign_ray.engines.base import Engine
# Re-exported: scripts (bench/) and older callers import it from here.
from selfalign_ray.engines.config import EngineConfig

__all__ = ["EngineConfig", "make_engine"]


def make_engine(model_path: str, cfg: EngineConfig) -> Engine:
    # A model on object storage (a previous iteration's iter_k/model under an s3:// output_dir) is read from a
    # copy on this actor's node (data/storage.py local_copy); a local path is used as is.
    from selfalign_ray.data.storage import local_copy

    model_path = local_copy(model_path)
    if cfg.kind == "hf":
        from selfalign_ray.engines.hf import HFEngine

        return HFEngine(model_path, cfg)
    if cfg.kind == "vllm":
        from selfalign_ray.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, cfg)
    raise ValueError(f"engine.kind={cfg.kind!r} is not one of: hf, vllm")
