"""Turn conf/deepspeed/*.yaml into the dict each worker's `deepspeed.initialize` gets.

Batch sizes, accumulation, clipping and precision have one source of truth, `TrainConfig`: the YAML
says "auto" for them and this module fills them in. A value written explicitly in the YAML must agree
with `TrainConfig` (a mismatch would otherwise surface as DeepSpeed's batch-size assertion on every
worker, or worse, silently train with the wrong precision).
"""

from __future__ import annotations

import copy

from selfalign_ray.config import ConfigError, to_dict
from selfalign_ray.train.config import TrainConfig


def _filled_values(cfg: TrainConfig) -> dict[tuple[str, ...], object]:
    return {
        ("train_micro_batch_size_per_gpu",): cfg.per_device_batch_size,
        ("gradient_accumulation_steps",): cfg.grad_accum,
        ("train_batch_size",): cfg.global_batch_size,
        ("gradient_clipping",): cfg.max_grad_norm,
        ("bf16", "enabled"): bool(cfg.bf16),
    }


def deepspeed_config(base, cfg: TrainConfig) -> dict:
    """A copy of `base` with the "auto" values filled from `cfg`, checked, plus the trainer's fixed choices."""
    ds = copy.deepcopy(to_dict(base))
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage!r}: the trainer is written for ZeRO-3 "
                          "(partitioned parameters are gathered for saving)")
    for path, value in _filled_values(cfg).items():
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        current = node.get(path[-1], "auto")
        if current == "auto":
            node[path[-1]] = value
        elif current != value:
            raise ConfigError(f"deepspeed.{'.'.join(path)}={current!r} contradicts the train settings ({value!r}); "
                              "set it to auto and change `train` instead")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError("deepspeed.fp16 is not supported: use train.bf16=true on GPUs, fp32 on CPUs")
    # The workers pass a torch AdamW as a client optimizer: nothing to compile (DeepSpeed's FusedAdam and
    # CPUAdam are C++/CUDA ops built at first use), and ZeRO-3 still shards its state. With optimizer
    # offload DeepSpeed would otherwise insist on its CPUAdam.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    offload = ds.get("zero_optimization", {}).get("offload_optimizer")
    if offload and not cfg.use_gpu:
        offload["pin_memory"] = False  # page-locked memory only helps GPU<->CPU copies
    ds.setdefault("steps_per_print", 10**9)
    return ds
