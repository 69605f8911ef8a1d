"""Typed training settings: mirrors conf/train/*.yaml (every field documented there)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    # App-level switch (read by the loop, ignored by the trainer).
    enabled: bool = True
    # SimPO: reward scale beta and target margin gamma given as gamma / beta.
    beta: float = 10.0
    gamma_beta_ratio: float = 0.3
    label_smoothing: float = 0.0
    # Weight of an NLL term on the chosen response (0 = pure SimPO).
    sft_weight: float = 0.0
    learning_rate: float = 1e-6
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    # Pairs per optimizer step over all workers (= per_device_batch_size x num_workers x grad accumulation).
    global_batch_size: int = 128
    per_device_batch_size: int = 1
    max_length: int = 512
    max_prompt_length: int = 256
    num_workers: int = 2
    # CPUs reserved per worker; keep the sum below the node's CPUs so Ray Data read tasks can run.
    cpus_per_worker: float = 0.5
    # torch intra-op threads per worker on CPU (null: max(1, int(cpus_per_worker))).
    torch_threads: int | None = None
    use_gpu: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    # flash_attention_2 | sdpa | eager | auto (flash-attn 2 when installed and on GPU, else sdpa).
    attn_implementation: str = "auto"
    # Compile DeepSpeed's shared-memory all-reduce op on CPU (needs gcc, ~40 s once). Off: plain gloo.
    cpu_shm_comm: bool = False
    checkpoint_every_steps: int = 50
    max_failures: int = 2
    # Measure preference accuracy / margin on the training data before and after training.
    eval_before_after: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"train.max_prompt_length ({self.max_prompt_length}) must be < "
                             f"train.max_length ({self.max_length})")
        for name in ("global_batch_size", "per_device_batch_size", "num_workers", "epochs", "max_length",
                     "max_prompt_length", "checkpoint_every_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        per_step = self.per_device_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"per_device_batch_size x num_workers ({per_step})")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_scheduler={self.lr_scheduler!r}: use cosine, linear or constant")

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.per_device_batch_size * self.num_workers)
