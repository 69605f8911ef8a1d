"""Build an engine from the `engine` config group (one per actor)."""

from __future__ import annotations

from selfalign_ray.engines.base import Engine
# Re-exported: scripts (bench/) and older callers import it from here.
from selfalign_ray.engines.config import EngineConfig

__all__ = ["EngineConfig", "make_engine"]


def make_engine(model_path: str, cfg: EngineConfig) -> Engine:
    if cfg.kind == "hf":
        from selfalign_ray.engines.hf import HFEngine

        return HFEngine(model_path, cfg)
    if cfg.kind == "vllm":
        from selfalign_ray.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, cfg)
    raise ValueError(f"engine.kind={cfg.kind!r} is not one of: hf, vllm")
