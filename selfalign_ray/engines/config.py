"""`EngineConfig`: the `engine` config group (conf/engine/*.yaml), beside the engine interface (base.py).

The engines import it; the factory (factory.py) imports the engines: imports flow one way, down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from selfalign_ray.models.loading import ModelLoadConfig


@dataclass
class EngineConfig:
    """Mirrors conf/engine/*.yaml. Fields that one engine does not use are ignored by it."""

    kind: str = "hf"
    # Actors in the map_batches pool and rows per batch handed to one actor call.
    num_actors: int = 1
    batch_size: int = 16
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # "auto": bfloat16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # Prompt + completion budget in tokens; longer prompts fail per row with a counted error.
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    # vLLM only.
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False
    cpu_kvcache_space_gb: int = 4
    # hf only: torch intra-op threads on CPU (null = num_cpus_per_actor). Ray pins actors to
    # OMP_NUM_THREADS=1, which would leave cores idle while the driver just waits.
    torch_threads: int | None = None
    # Bounded failure (Ray Data actor pool, generation/pool.py apply_pool). An actor that dies (host OOM, a
    # segfaulting kernel, its node lost) is restarted at most max_restarts times over its life (each restart reloads
    # the model); once they are spent the actor is dead and the batches it held fail the run, naming their chunks
    # (committed chunks are kept; a re-run resumes). A batch is retried on its restarted actor up to
    # max_task_retries times; -1 = as long as the actor lives, which max_restarts bounds. A finite number is spent
    # within a second when a node is lost before Ray has noticed (every retry meets a refused connection), so the
    # run would fail instead of moving the actor to another node.
    max_restarts: int = 3
    max_task_retries: int = -1
    # Watchdog: the run fails naming the stage when no chunk commits for this many seconds (model loading
    # included: the first commit waits for every actor to load its model and finish a whole batch). 0 = off.
    stall_timeout_s: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict)
    # How weights and code may load (models/loading.py): filled from the `model` node by `engine_config`, never
    # set under `engine` (a plain dict so that the config crosses to the actors as is).
    model_load: dict[str, Any] = field(default_factory=dict)
    # Fields that no conf/engine yaml holds (tests/test_configs.py).
    NOT_IN_YAML = ("model_load",)

    def __post_init__(self):
        # Checked where the config is built (the driver), not after an actor has loaded a model.
        from selfalign_ray.config import ConfigError

        for name in ("num_actors", "batch_size", "max_model_len", "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"engine.{name} must be a positive integer, got {value!r}")
        for name, low in (("max_restarts", 0), ("max_task_retries", -1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"engine.{name} must be an integer >= {low} (max_restarts bounds the failures: a "
                                  f"batch that keeps killing its actor must end the run), got {value!r}")
        if isinstance(self.stall_timeout_s, bool) or not isinstance(self.stall_timeout_s, (int, float)) \
                or not self.stall_timeout_s >= 0:
            raise ConfigError(f"engine.stall_timeout_s must be a number of seconds >= 0 (0 = off), "
                              f"got {self.stall_timeout_s!r}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ConfigError(f"engine.num_cpus_per_actor ({self.num_cpus_per_actor}) and engine.num_gpus_per_actor "
                              f"({self.num_gpus_per_actor}) must be >= 0")
        # Load policy belongs to the model, in one place, for every engine and the trainer alike.
        for key, instead in _MODEL_LOAD_KEYS.items():
            if key in (self.extra or {}):
                raise ConfigError(f"engine.extra.{key} is not passed to the engine; set {instead} instead "
                                  "(it applies to the hf and vLLM engines and to training)")
        self.load  # noqa: B018 - validates model_load here, on the driver

    @property
    def load(self) -> ModelLoadConfig:
        return ModelLoadConfig.from_dict(self.model_load)


# engine.extra keys that would bypass the model's load policy, and the setting to use instead.
_MODEL_LOAD_KEYS = {"trust_remote_code": "model.trust_remote_code", "revision": "model.revision",
                    "tokenizer_revision": "model.revision", "code_revision": "model.revision",
                    "load_format": "model.allow_pickle_weights", "use_safetensors": "model.allow_pickle_weights"}


def engine_config(cfg, engine_node=None) -> EngineConfig:
    """The run's EngineConfig: the `engine` node (or `engine_node`) plus the `model` node's load options."""
    from selfalign_ray.config import ConfigError, typed

    node = cfg.engine if engine_node is None else engine_node
    if "model_load" in node:
        raise ConfigError("engine.model_load is filled from the model node; set model.trust_remote_code, "
                          "model.allow_pickle_weights or model.revision instead")
    engine = typed(EngineConfig, node, "engine")
    engine.model_load = ModelLoadConfig.from_model_node(cfg.get("model")).to_json()
    return engine
