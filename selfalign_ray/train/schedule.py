"""How many micro-batches, accumulation windows and optimizer steps a run has, and the learning-rate curve.

Computed once on the driver from the row count (Parquet metadata) and shipped to every worker, so all
ranks agree on where the optimizer steps fall without talking to each other.

Ray's equal split gives every rank rows // world rows (a remainder of fewer than `world` rows is left out:
ranks with unequal batch counts would wait on each other's collectives forever). Each epoch a rank runs
ceil(rows_per_rank / per_device_batch_size) micro-batches, grouped into windows of `grad_accum`; the last
window of an epoch may be shorter and still makes an optimizer step (its loss is the mean over the pairs, or
SFT response tokens, it has: train/core.py normalises by the step's global count). A dataset smaller than
one global batch therefore makes one optimizer step per epoch on what there is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from selfalign_ray.config import ConfigError
from selfalign_ray.train.config import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    rows: int               # rows in the training files
    world: int              # workers
    rows_per_rank: int      # after the equal split
    micro_batch: int        # rows per micro-batch (per_device_batch_size)
    micro_per_epoch: int    # micro-batches per rank per epoch
    grad_accum: int         # micro-batches per full accumulation window
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def build(cls, rows: int, cfg: TrainConfig) -> StepPlan:
        world = cfg.num_workers
        rows_per_rank = rows // world
        if rows_per_rank == 0:
            raise ConfigError(f"{rows} training rows cannot feed {world} workers (each needs at least one row); "
                              "generate more data or lower train.num_workers")
        micro = math.ceil(rows_per_rank / cfg.per_device_batch_size)
        steps_per_epoch = math.ceil(micro / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        # ceil, as transformers' get_warmup_steps (the SimPO reference trains through the HF Trainer).
        warmup = math.ceil(cfg.warmup_ratio * total)
        return cls(rows, world, rows_per_rank, cfg.per_device_batch_size, micro, cfg.grad_accum,
                   steps_per_epoch, cfg.epochs, total, warmup)

    @property
    def rows_left_out(self) -> int:
        return self.rows - self.rows_per_rank * self.world

    @property
    def smaller_than_global_batch(self) -> bool:
        return self.micro_per_epoch < self.grad_accum

    def is_boundary(self, micro: int) -> bool:
        """Does micro-batch `micro` close its window (the optimizer steps after it)?"""
        return (micro + 1) % self.grad_accum == 0 or micro == self.micro_per_epoch - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "rows_left_out": self.rows_left_out,
                "smaller_than_global_batch": self.smaller_than_global_batch}


def lr_multiplier(kind: str, warmup_steps: int, total_steps: int):
    """LambdaLR factor for the update at 0-based optimizer step `step`.

    Linear warmup to the peak over `warmup_steps` updates; unlike transformers' schedules the first update
    already uses peak/warmup_steps, not 0 (a zero-lr update is a wasted step when a CPU run has only a
    handful). Then cosine or linear decay towards 0 at `total_steps`, or constant.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor
