"""Which precision a training worker runs in: `train.bf16` = true | false | auto, resolved on the worker itself.

Modes:
- fp32: fp32 weights, activations and gradients.
- bf16 (GPU): bf16 weights and activations, DeepSpeed's `bf16` section (fp32 master weights in the ZeRO-3
  optimizer partitions). The GPU path as before.
- bf16_autocast (CPU): fp32 weights (ZeRO-3 partitions, gradients and AdamW state stay fp32, exactly as in
  fp32 training) and `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward: matmuls run in bf16 on
  CPUs with native bf16 arithmetic. This is also what TRL/HF Trainer do on CPU with bf16=True. Chosen over bf16
  weights on CPU because it needs nothing from DeepSpeed (its bf16 optimizer wrapper is written for accelerators;
  with autocast ZeRO-3 sees an ordinary fp32 model) and keeps fp32 master weights without a second copy.

`auto`:
- GPU: bf16 when the device supports it (torch.cuda.is_bf16_supported()), else fp32.
- CPU: bf16_autocast only when the CPU has native bf16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo)
  AND a short probe (a few linear-layer-sized matmuls, forward in fp32 vs under bf16 autocast, interleaved,
  fastest of several) measures bf16 at most AUTO_MAX_RATIO of the fp32 time. Without native bf16 the CPU emulates
  it and autocast is slower than fp32 (bench/RESULTS.md §3 measured both kinds of CPU), so auto stays fp32.
Every rank resolves for itself; configure_runtime then keeps bf16 only if every rank chose it
(fp32 unless every rank picked bf16), so one slow CPU or a noisy probe cannot split the ranks.
The chosen mode, why, and the CPU's model name and bf16 flags go into train_summary.json (`precision`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SETTINGS = (True, False, "auto")
MODES = ("fp32", "bf16", "bf16_autocast")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# auto on CPU needs bf16 at <= this share of the fp32 time in the probe (a clear win, not noise).
AUTO_MAX_RATIO = 0.8


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{"model": CPU model name, "bf16_flags": native bf16 flags present, "capability": torch's ISA level}."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 — older torch
        capability = None
    return {"model": model, "bf16_flags": [f for f in CPU_BF16_FLAGS if f in flags], "capability": capability}


def probe_cpu_bf16(rounds: int = 3, size: int = 768, tokens: int = 256) -> dict:
    """Forward time of a few (tokens x size) @ (size x size) matmuls in fp32 and under bf16 autocast (the casts
    included, as in training), interleaved, fastest round of each. Returns seconds and their ratio."""
    x = torch.randn(tokens, size)
    w = torch.randn(size, size)

    def run(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(4):
                x @ w
        return time.perf_counter() - start

    run(False), run(True)  # first calls pick kernels
    fp32 = bf16 = float("inf")
    for _ in range(rounds):
        fp32 = min(fp32, run(False))
        bf16 = min(bf16, run(True))
    return {"fp32_s": fp32, "bf16_s": bf16, "ratio": bf16 / fp32}


@dataclass(frozen=True)
class Precision:
    mode: str                       # one of MODES
    reason: str                     # why, one line
    setting: object = False         # what train.bf16 said
    cpu: dict = field(default_factory=dict)    # cpu_info() on CPU workers
    probe: dict | None = None       # probe_cpu_bf16() when auto measured it

    @property
    def weights_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mode == "bf16" else torch.float32

    @property
    def deepspeed_bf16(self) -> bool:
        """DeepSpeed's bf16 section: only for bf16 weights (GPU)."""
        return self.mode == "bf16"

    def autocast(self):
        """The context the forward runs in: CPU bf16 autocast, or nothing."""
        if self.mode == "bf16_autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluation_autocast(self):
        """The context the before/after evaluation runs in: the dtype of the weights that are exported, so that
        the reported change is the saved model's. Under CPU bf16 autocast the saved weights are the fp32 master
        weights; autocast would round them to bf16 (round to nearest even) and, on a checkpoint that came from a
        16-bit grid, a 1e-6 update breaks every exact tie in the gradient's direction: SmolLM2-135M has 8 % of
        its weights on bf16 ties, and one step at lr 1e-6 moved the bf16 forward's mean margin of the default
        run's 4 pairs from -0.14 to +2.69 (accuracy 0.50 -> 0.75) while the fp32 forward of the same weights
        moved it from -0.17 to -0.02 (0.50 -> 0.50). bf16 weights (GPU) are the saved weights: no context."""
        return contextlib.nullcontext()

    def to_dict(self) -> dict:
        return asdict(self)


def check_setting(value) -> None:
    if value not in SETTINGS or (value not in (True, False) and not isinstance(value, str)):
        raise ValueError(f"train.bf16 must be true, false or auto, got {value!r}")


def resolve_precision(setting, use_gpu: bool, *, cpuinfo: str | None = None, probe=probe_cpu_bf16) -> Precision:
    """The mode for `train.bf16` = setting on this process's device (see the module docstring)."""
    check_setting(setting)
    if use_gpu:
        if setting is True:
            return Precision("bf16", "train.bf16=true on GPU: bf16 weights (DeepSpeed bf16)", setting)
        if setting is False:
            return Precision("fp32", "train.bf16=false", setting)
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: GPU supports bf16", setting)
        return Precision("fp32", "auto: GPU without bf16 support", setting)
    info = cpu_info(cpuinfo)
    if setting is True:
        return Precision("bf16_autocast", "train.bf16=true on CPU: bf16 autocast, fp32 weights", setting, info)
    if setting is False:
        return Precision("fp32", "train.bf16=false", setting, info)
    if not info["bf16_flags"]:
        return Precision("fp32", f"auto: CPU without native bf16 ({', '.join(CPU_BF16_FLAGS)} absent); "
                                 "emulated bf16 is slower than fp32", setting, info)
    measured = probe()
    if measured["ratio"] <= AUTO_MAX_RATIO:
        return Precision("bf16_autocast", f"auto: CPU has {', '.join(info['bf16_flags'])} and bf16 took "
                                          f"{measured['ratio']:.2f}x the fp32 time in the probe", setting, info,
                         measured)
    return Precision("fp32", f"auto: CPU has {', '.join(info['bf16_flags'])} but bf16 took {measured['ratio']:.2f}x "
                             f"the fp32 time in the probe (> {AUTO_MAX_RATIO})", setting, info, measured)


def agree(local: Precision, bf16_everywhere: bool) -> Precision:
    """`local` if all ranks chose the same reduced-precision mode, else fp32 with the reason (see agree_over_ranks)."""
    if local.mode == "fp32" or bf16_everywhere:
        return local
    return Precision("fp32", f"{local.reason}; but another rank chose fp32, so all ranks run fp32", local.setting,
                     local.cpu, local.probe)
