"""Generation engines: `hf` (transformers, CPU/GPU) and `vllm` (production)."""

from selfalign_ray.engines.base import (
    ChoiceScores,
    Completion,
    Engine,
    GenerationResult,
    SamplingSpec,
    request_seed,
)
from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.engines.factory import make_engine

__all__ = [
    "ChoiceScores",
    "Completion",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "SamplingSpec",
    "make_engine",
    "request_seed",
]
