"""Turn conf/deepspeed/*.yaml into the dict each worker's `deepspeed.initialize` gets.

Batch sizes, accumulation, clipping and precision have one source of truth, `TrainConfig`: the YAML
says "auto" for them and this module fills them in. A value written explicitly in the YAML must agree
with `TrainConfig` (a mismatch would otherwise surface as DeepSpeed's batch-size assertion on every
worker, or worse, silently train with the wrong precision).

ZeRO-3 bucket sizes may also say "auto" (conf/deepspeed/zero3_gpu.yaml): they are filled from the model's
hidden size h with the conventions of transformers' DeepSpeed integration (reduce bucket h^2, prefetch
0.9 h^2, parameter persistence 10 h). DeepSpeed itself would quietly drop "auto" there and use its own
defaults (reduce 5e8, prefetch 5e7, persistence 1e5), so the model is needed to fill them; without one (the
driver's early check, before the model is resolved) they are left as "auto".
"""

from __future__ import annotations

import copy
import logging

from selfalign_ray.config import ConfigError, to_dict
from selfalign_ray.train.config import TrainConfig

log = logging.getLogger(__name__)


def deepspeed_bf16(cfg: TrainConfig) -> bool | None:
    """DeepSpeed's bf16 section (bf16 weights): GPU with train.bf16=true; never on CPU, where bf16 is autocast
    around the forward (train/precision.py); None = auto on GPU, decided by each worker (build_engine)."""
    if not cfg.use_gpu or cfg.bf16 is False:
        return False
    return True if cfg.bf16 is True else None


def _filled_values(cfg: TrainConfig) -> dict[tuple[str, ...], object]:
    return {
        ("train_micro_batch_size_per_gpu",): cfg.per_device_batch_size,
        ("gradient_accumulation_steps",): cfg.grad_accum,
        ("train_batch_size",): cfg.global_batch_size,
        ("gradient_clipping",): cfg.max_grad_norm,
        ("bf16", "enabled"): deepspeed_bf16(cfg),
    }


# ZeRO-3 size keys that may be "auto": value as a function of the hidden size.
ZERO_AUTO_SIZES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
GRAD_ACCUM_DTYPES = ("fp32", "bf16")


def hidden_size(model_path: str, config_kwargs: dict | None = None) -> int:
    """The hidden size in a model's config.json (the text model's, for multimodal configs). `config_kwargs`: the
    model's load policy (models/loading.py `tokenizer_kwargs`: revision, remote code)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, **(config_kwargs or {}))
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int) or size <= 0:
        raise ConfigError(f"{model_path}: config has no hidden_size; set the deepspeed.zero_optimization "
                          f"sizes {sorted(ZERO_AUTO_SIZES)} to numbers instead of auto")
    return size


def _fill_zero_sizes(zero: dict, model_path: str | None, config_kwargs: dict | None = None) -> None:
    auto = [k for k in ZERO_AUTO_SIZES if zero.get(k) == "auto"]
    if not auto or model_path is None:
        return
    h = hidden_size(model_path, config_kwargs)
    for key in auto:
        zero[key] = ZERO_AUTO_SIZES[key](h)


def deepspeed_config(base, cfg: TrainConfig, model_path: str | None = None,
                     config_kwargs: dict | None = None) -> dict:
    """A copy of `base` with the "auto" values filled from `cfg` (and ZeRO sizes from `model_path`'s hidden
    size), checked, plus the trainer's fixed choices."""
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
        if value is None:  # decided on the worker
            continue
        if current == "auto":
            node[path[-1]] = value
        elif current != value:
            raise ConfigError(f"deepspeed.{'.'.join(path)}={current!r} contradicts the train settings ({value!r}); "
                              "set it to auto and change `train` instead")
    zero = ds.get("zero_optimization", {})
    for key, value in zero.items():
        if key in ZERO_AUTO_SIZES and value != "auto" and (isinstance(value, bool) or not isinstance(value, int)
                                                            or value < 0):
            raise ConfigError(f"deepspeed.zero_optimization.{key}={value!r}: use a non-negative integer or auto")
    _fill_zero_sizes(zero, model_path, config_kwargs)
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if accum is not None and accum not in GRAD_ACCUM_DTYPES:
        raise ConfigError(f"deepspeed.data_types.grad_accum_dtype={accum!r}: use one of {', '.join(GRAD_ACCUM_DTYPES)}")
    if cfg.use_gpu and accum is None:
        # zero3.yaml is sized for gloo on CPUs; GPU runs want conf/deepspeed/zero3_gpu.yaml.
        log.warning("GPU training with a DeepSpeed config that accumulates gradients in the model dtype (no "
                    "data_types.grad_accum_dtype): use deepspeed=zero3_gpu (fp32 accumulation, overlapped "
                    "communication, buckets sized from the model)")
    if accum == "bf16" and deepspeed_bf16(cfg) is False:
        raise ConfigError("deepspeed.data_types.grad_accum_dtype=bf16 needs bf16 weights (train.bf16=true "
                          "or auto on GPU; an fp32 or CPU-autocast model accumulates in fp32)")
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
