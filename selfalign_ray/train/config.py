"""Typed training settings: mirrors conf/train/*.yaml (every field is documented there as well)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from selfalign_ray.config import ConfigError

# Keys that were removed, with what replaced them: a config that still sets one gets this message, not a bare
# "unknown key", and nothing silently keeps meaning what it used to.
REMOVED_KEYS = {
    "shuffle_buffer_rows": "the per-worker shuffle buffer was replaced by one seeded global permutation of all "
                           "training rows (train/order.py, seeded by train.seed); delete the key",
}

LR_SCHEDULERS = ("cosine", "linear", "constant")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
BF16_SETTINGS = (True, False, "auto")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")


@dataclass
class TrainConfig:
    # App-level switch (read by the loop, ignored by the trainer).
    enabled: bool = True
    # SimPO reward scale beta.
    beta: float = 10.0
    # SimPO target reward margin gamma, given as gamma / beta (as in the SimPO repository).
    gamma_beta_ratio: float = 0.3
    # Conservative SimPO: assumed probability that a preference label is flipped (0 = off).
    label_smoothing: float = 0.0
    # Weight of a token-mean NLL term on the chosen response (0 = pure SimPO).
    sft_weight: float = 0.0
    # Peak learning rate of torch AdamW.
    learning_rate: float = 1e-6
    # Schedule after the linear warmup: cosine | linear | constant (decays to 0 at the last step).
    lr_scheduler: str = "cosine"
    # Fraction of the optimizer steps spent warming up linearly from ~0 to learning_rate.
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    # Global gradient-norm clipping (DeepSpeed gradient_clipping); 0 = off.
    max_grad_norm: float = 1.0
    # Passes over the training data.
    epochs: int = 1
    # Pairs (SFT: examples) per optimizer step over all workers
    # = per_device_batch_size x num_workers x gradient accumulation.
    global_batch_size: int = 128
    # Pairs per worker per forward pass (a pair is two sequences, chosen and rejected, in one pass).
    per_device_batch_size: int = 1
    # Tokens of prompt + response; longer examples are cut like the SimPO reference (prompt from the left
    # to max_prompt_length first, then the responses).
    max_length: int = 512
    max_prompt_length: int = 256
    # Pack the sequences of a micro-batch into one row with restarting position_ids instead of padding
    # them (no compute on pad tokens; transformers builds block-diagonal attention from position_ids).
    padding_free: bool = True
    # Ray Train workers (one per GPU on a cluster).
    num_workers: int = 2
    # CPUs reserved per worker. Keep num_workers x cpus_per_worker below the node's CPUs: Ray Data's
    # read tasks need a CPU too (two workers holding both cores of a 2-core box starve them forever).
    cpus_per_worker: float = 0.5
    # torch intra-op threads per worker on CPU (null: max(1, int(cpus_per_worker))).
    torch_threads: int | None = None
    use_gpu: bool = False
    # true | false | auto (train/precision.py). GPU: bf16 weights and activations with fp32 master weights
    # (DeepSpeed bf16). CPU: bf16 autocast around the forward, fp32 weights. auto: bf16 on GPUs that support it,
    # and on CPUs with native bf16 (avx512_bf16 / amx_bf16) where a probe measures it faster; else fp32.
    bf16: bool | str = False
    # Recompute activations in the backward pass (less memory, ~30 % more compute).
    gradient_checkpointing: bool = False
    # flash_attention_2 | sdpa | eager | auto (flash-attn 2 when installed and use_gpu, else sdpa).
    attn_implementation: str = "auto"
    # Build DeepSpeed's shared-memory all-reduce op on CPU (needs gcc, ~40 s once). Off: plain gloo.
    cpu_shm_comm: bool = False
    # Optimizer steps between checkpoints (restart points after a worker dies); one is also taken at the end.
    checkpoint_every_steps: int = 50
    # Worker-group restarts allowed (Ray Train FailureConfig) before the run fails.
    max_failures: int = 2
    # Local directory where each worker stages a checkpoint before Ray Train copies it to storage (null = the
    # system temp dir). ZeRO-3 with fp32 Adam: ~16 bytes per parameter per node (9B -> ~144 GB).
    checkpoint_staging_dir: str | None = None
    # Seconds a collective (all-reduce, all-gather, barrier) may wait for the other ranks before it raises
    # (torch.distributed process-group timeout through Ray Train's TorchConfig): a rank that hangs or dies in a
    # collective fails the worker group instead of hanging it; FailureConfig then restarts it (max_failures).
    collective_timeout_s: int = 1800
    # Watchdog on the driver: training fails, naming the run, when no optimizer step is recorded for this many
    # seconds (model loading, evaluation before/after and the final save count too). 0 = off.
    stall_timeout_s: float = 3600.0
    # How Ray Train places the workers (ScalingConfig.placement_strategy): PACK fills a node first, SPREAD puts
    # one worker per node where it can, STRICT_SPREAD insists on it.
    placement_strategy: str = "PACK"
    # Measure preference accuracy / margin (SFT: loss) on the training data before and after training.
    eval_before_after: bool = True
    # Seeds model-independent randomness: torch, and the global permutation in which the rows are read
    # (train/order.py: one seeded shuffle of all files, split between the workers after shuffling).
    seed: int = 0
    # Response tokens per chunk when computing log-probs through the LM head (train/logprobs.py): peak memory
    # holds chunk x vocabulary logits instead of sequence x vocabulary, recomputed in backward. 0 = off (the
    # model's full logits). 1024: Llama-3's 128k vocabulary makes 0.5 GiB fp32 per chunk plus its gradient.
    logprob_chunk_tokens: int = 1024

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first bad setting."""
        for name in ("beta", "gamma_beta_ratio", "label_smoothing", "sft_weight", "learning_rate", "warmup_ratio",
                     "weight_decay", "max_grad_norm", "cpus_per_worker"):
            value = getattr(self, name)
            # NaN passes every `<` / `>` check below and would only show up as a NaN loss at step 1.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"train.{name} must be a finite number, got {value!r}")
        if self.sft_weight < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("train.sft_weight, train.weight_decay and train.max_grad_norm must be >= 0")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"train.max_prompt_length ({self.max_prompt_length}) must be < "
                              f"train.max_length ({self.max_length}): responses need room")
        for name in ("global_batch_size", "per_device_batch_size", "num_workers", "epochs", "max_length",
                     "max_prompt_length", "checkpoint_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        per_step = self.per_device_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"per_device_batch_size x num_workers ({self.per_device_batch_size} x "
                              f"{self.num_workers} = {per_step})")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"train.lr_scheduler={self.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
        if self.bf16 not in BF16_SETTINGS or not isinstance(self.bf16, (bool, str)):
            raise ConfigError(f"train.bf16 must be true, false or auto, got {self.bf16!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"train.attn_implementation={self.attn_implementation!r}: "
                              f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"train.label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"train.warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        if self.beta <= 0 or self.learning_rate < 0 or self.cpus_per_worker <= 0 or self.max_failures < 0:
            raise ConfigError("train.beta and train.cpus_per_worker must be > 0, train.learning_rate and "
                              "train.max_failures >= 0")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"train.placement_strategy={self.placement_strategy!r}: use one of "
                              f"{', '.join(PLACEMENT_STRATEGIES)}")
        if isinstance(self.collective_timeout_s, bool) or not isinstance(self.collective_timeout_s, int) \
                or self.collective_timeout_s <= 0:
            raise ConfigError(f"train.collective_timeout_s must be a positive integer (seconds), "
                              f"got {self.collective_timeout_s!r}")
        if isinstance(self.stall_timeout_s, bool) or not isinstance(self.stall_timeout_s, (int, float)) \
                or not self.stall_timeout_s >= 0:
            raise ConfigError(f"train.stall_timeout_s must be a number of seconds >= 0 (0 = off), "
                              f"got {self.stall_timeout_s!r}")
        if isinstance(self.logprob_chunk_tokens, bool) or not isinstance(self.logprob_chunk_tokens, int) \
                or self.logprob_chunk_tokens < 0:
            raise ConfigError(f"train.logprob_chunk_tokens must be an integer >= 0 (0 = off), "
                              f"got {self.logprob_chunk_tokens!r}")

    @classmethod
    def reject_removed(cls, keys) -> None:
        """ConfigError naming every removed key among `keys` and what replaced it."""
        found = [k for k in keys if k in REMOVED_KEYS]
        if found:
            raise ConfigError("; ".join(f"train.{k} is no longer a setting: {REMOVED_KEYS[k]}" for k in found))

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return self.global_batch_size // (self.per_device_batch_size * self.num_workers)
