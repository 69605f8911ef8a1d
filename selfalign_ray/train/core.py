"""The training core: plain torch.distributed + DeepSpeed ZeRO-3, no Ray.

    configure_runtime -> build_engine (HfDeepSpeedConfig: the model loads partitioned, under zero.Init)
    -> TrainCore.train_step(window of CPU-collated micro-batches) per optimizer step
    -> save_checkpoint / load_checkpoint (DeepSpeed's per-rank partition files + client state)
    -> save_hf (gathered one tensor at a time, written by rank 0)

Ray Train's worker (train/worker.py) drives it with its dataset shard, checkpoints and reports; the torchrun
smoke run (train/smoke.py) drives it with generated pairs. Either way the process group exists before
`configure_runtime` (Ray Train creates it; under torchrun DeepSpeed creates it from the env:// variables).

Normalisation (exact, whatever the split into micro-batches and ranks): the step's global count of pairs
(SimPO) or response tokens (SFT) is counted on the CPU batches of the whole window and summed over ranks
once; each micro-batch then backpropagates sum / global count x world size. DeepSpeed averages gradients over
the data-parallel ranks (ZeRO-3 reduce-scatter with a 1/world pre-division), so the x world size makes the
applied gradient the gradient of the step's exact mean. tests/test_train_core.py checks this against one
process with the same pairs.

Non-finite values: each micro-batch's loss is flagged on the device; at the window's boundary, before the
optimizer runs, the flags of all ranks are read once and a non-finite loss raises NonFiniteError naming the
step, epoch, micro-batch and rank. A non-finite gradient norm (finite loss, overflowing backward) makes
DeepSpeed's ZeRO-3 step skip the update (stage3.step: an invalid combined norm sets `overflow`, the update is
discarded); the core reads the norm right after and raises NonFiniteError as well. Either way the weights
never see the non-finite values.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from selfalign_ray.models.loading import ModelLoadConfig, load_causal_lm, load_tokenizer
from selfalign_ray.train.collectives import Collectives
from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.objectives import MetricWindow, batch_counts, forward_sums, summarise
from selfalign_ray.train.precision import Precision, agree, resolve_precision
from selfalign_ray.train.schedule import StepPlan, lr_multiplier

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the update was not applied. Not retryable: the same data would give the
    same values again (the Ray driver turns it into a final failure, see worker.NONFINITE_MARKER)."""


def configure_runtime(cfg: TrainConfig) -> Precision:
    """Threads, seeds, the process group; returns the precision all ranks agreed on (train/precision.py)."""
    import deepspeed
    from transformers import set_seed

    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
        if not cfg.cpu_shm_comm:
            # DeepSpeed's CPU backend would build its shared-memory all-reduce op with gcc on first use
            # (~40 s, and a compiler on every node). deepspeed.ops.__compatible_ops__ is the switch its
            # comm layer reads (deepspeed/comm/torch.py: build_shm_op); with the op marked unavailable it
            # uses the gloo process group as is. The alternative is prebuilding the op into the wheel:
            # DS_BUILD_SHM_COMM=1 pip install deepspeed.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    set_seed(cfg.seed)
    # Ray Train already created the process group (gloo / nccl) and DeepSpeed adopts it; under torchrun
    # DeepSpeed creates it from MASTER_ADDR/RANK/WORLD_SIZE.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    return agreed_precision(cfg)


def agreed_precision(cfg: TrainConfig) -> Precision:
    """resolve_precision on this rank; on CPU, bf16 only if every rank chose it (one all-reduce, gloo)."""
    local = resolve_precision(cfg.bf16, cfg.use_gpu)
    if cfg.use_gpu or not torch.distributed.is_initialized():
        return local
    from selfalign_ray.train.collectives import Collectives

    comm = Collectives("cpu")  # the one place for collectives (tests/test_train_collectives.py)
    flag = comm.min_(comm.tensor([0.0 if local.mode == "fp32" else 1.0]), "bf16 choice")
    return agree(local, bool(flag.item()))


def _attn_implementation(model_path: str, cfg: TrainConfig, model_config=None, config_kwargs: dict | None = None) -> str:
    impl = _chosen_attention(model_path, cfg, model_config, config_kwargs)
    if impl == "sdpa" and cfg.padding_free and not cfg.use_gpu:
        # Packed rows on CPU: per-sequence causal SDPA instead of one block-diagonal T x T mask
        # (models/packed_sdpa.py; bench/RESULTS.md §3 measured the mask as the packed step's largest loss).
        from transformers import AutoConfig

        from selfalign_ray.models import packed_sdpa

        if packed_sdpa.usable_for(model_config if model_config is not None
                                 else AutoConfig.from_pretrained(model_path, **(config_kwargs or {}))):
            packed_sdpa.register()
            return packed_sdpa.NAME
    return impl


def _chosen_attention(model_path: str, cfg: TrainConfig, model_config=None, config_kwargs: dict | None = None) -> str:
    """The attention kernel (selfalign_ray/models/attention.py: soft-capped models never run SDPA; auto on GPU
    without flash-attn warns loudly and turns packing off). `cfg` is this worker's own copy: a packing
    fallback lands in cfg.padding_free before the data iterator reads it. `model_config`: decide for that
    config (a random-weight model built from it) instead of the one at `model_path`."""
    from selfalign_ray.models.attention import choose_attention, has_softcapping, resolve_attention

    where = "train.attn_implementation"
    if model_config is not None:
        choice = choose_attention(cfg.attn_implementation, softcapped=has_softcapping(model_config),
                                  use_gpu=cfg.use_gpu, padding_free=cfg.padding_free, where=where)
    else:
        choice = resolve_attention(model_path, cfg.attn_implementation, use_gpu=cfg.use_gpu,
                                   padding_free=cfg.padding_free, where=where, config_kwargs=config_kwargs)
    cfg.padding_free = choice.padding_free
    return choice.implementation


def make_adamw(params, lr: float, weight_decay: float):
    """torch AdamW with the fused kernel where torch has one for the device (CPU and CUDA do).

    Why: the default on CPU is the per-tensor Python loop. Under ZeRO-3 it steps one flat fp32 partition,
    and py-spy of a Ray Train worker (bench/RESULTS.md, SmolLM2-135M) showed that loop at 26 % of the step;
    the fused kernel does the same update ~6x faster (0.20 s vs 1.20 s for 135M parameters, 1 thread)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_engine(model_path: str, cfg: TrainConfig, ds_cfg: dict, plan: StepPlan, model_config=None,
                 load: ModelLoadConfig | None = None, precision: Precision | None = None):
    """(tokenizer, engine, hf_ds). `model_config`: build that (random weights) instead of loading the weights
    at `model_path` (the tokenizer still comes from `model_path`). `load`: the weights/code policy
    (models/loading.py; default safetensors only, no remote code). Keep hf_ds referenced while the engine lives.
    `precision`: configure_runtime's result (None: resolved here); it sets DeepSpeed's bf16 section."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    load = load or ModelLoadConfig()
    tokenizer = load_tokenizer(model_path, load)
    precision = precision or agreed_precision(cfg)
    ds_cfg = {**ds_cfg, "bf16": {**(ds_cfg.get("bf16") or {}), "enabled": precision.deepspeed_bf16}}
    # While this object is alive, from_pretrained builds the model under deepspeed.zero.Init: every rank
    # loads its own partition (a collective call: all ranks must load together; the full model never sits
    # on one device).
    hf_ds = HfDeepSpeedConfig(ds_cfg)
    dtype = precision.weights_dtype
    attn = _attn_implementation(model_path, cfg, model_config, load.tokenizer_kwargs(model_path))
    if model_config is not None:
        # Under hf_ds, from_config builds inside zero.Init and then initialises the partitioned weights itself
        # (transformers' initialize_weights_zero3).
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=attn)
    else:
        model = load_causal_lm(model_path, load, dtype=dtype, attn_implementation=attn)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing is the variant that works with ZeRO-3's parameter hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # torch AdamW as a client optimizer: no C++/CUDA op to build; ZeRO-3 partitions its state.
    optimizer = make_adamw(model.parameters(), cfg.learning_rate, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.lr_scheduler, plan.warmup_steps, plan.total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return tokenizer, engine, hf_ds


def partition_stats(module) -> dict:
    """How ZeRO-3 holds the parameters on this rank.

    total: elements of the full model; partition: elements this rank owns (~total / world);
    materialised: elements currently present in full on this rank outside any gather (0 when every
    parameter is partitioned; persistent small parameters would show up here).
    """
    total = partition = materialised = 0
    for p in module.parameters():
        total += getattr(p, "ds_numel", p.numel())
        partition += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        materialised += p.numel()
    return {"total": total, "partition": partition, "materialised": materialised}


def save_checkpoint(engine, directory, tag: str, client_state: dict) -> None:
    """Each rank writes its own ZeRO partition files (names carry the rank) under directory/tag."""
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)


def load_checkpoint(engine, directory, tag: str) -> dict:
    """Restore weights, optimizer and scheduler; returns the client state saved with them."""
    _, client = engine.load_checkpoint(str(directory), tag=tag)
    return client


def save_hf(engine, tokenizer, out: Path, rank: int) -> None:
    """Gather the ZeRO-3 partitions one tensor at a time (peak memory: one full tensor, not the model),
    copy them to CPU on rank 0 and write safetensors + tokenizer (with its chat template) there."""
    import deepspeed

    module = engine.module
    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        keys = set(module.state_dict().keys())
        state.update({name: b.detach().cpu() for name, b in module.named_buffers() if name in keys})
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)


def windows(micro_batches: Iterable[tuple[int, dict]], plan: StepPlan) -> Iterator[list[tuple[int, dict]]]:
    """Group (index in epoch, batch) pairs into the accumulation windows of the plan (the last may be short)."""
    window: list[tuple[int, dict]] = []
    for micro, batch in micro_batches:
        window.append((micro, batch))
        if plan.is_boundary(micro):
            yield window
            window = []
    if window:  # fewer micro-batches than planned; the caller checks the count
        yield window


@dataclass
class StepResult:
    totals: dict[str, float]                    # all-rank sums of the window (MetricWindow.KEYS)
    metrics: dict[str, float]                   # summarise(): loss, rewards, margin, accuracy / token_nll
    lr: float                                   # the rate this update used
    grad_norm: float                            # global gradient norm before clipping
    elapsed_s: float
    extra: dict = field(default_factory=dict)


class TrainCore:
    """One DeepSpeed engine and the objective it trains; every rank calls the same methods in the same order."""

    def __init__(self, engine, cfg: TrainConfig, objective: str, attn_implementation: str | None = None,
                 precision: Precision | None = None):
        self.engine, self.cfg, self.objective = engine, cfg, objective
        # The forward runs in precision.autocast() (CPU bf16); None = fp32, or bf16 weights when the engine has them.
        self.precision = precision or Precision("bf16" if engine.bfloat16_enabled() else "fp32", "from the engine",
                                                cfg.bf16)
        # What the model was built with (build_engine decided it once, models/attention.py).
        self.attn = attn_implementation or engine.module.config._attn_implementation
        self.coll = Collectives(engine.device)

    @property
    def rank(self) -> int:
        return self.coll.rank

    @property
    def world(self) -> int:
        return self.coll.world_size

    def _normalisers(self, counts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """world / global count of the step: (main term, SimPO's SFT term), device scalars (one reduction).
        `counts`: batch_counts of this rank's micro-batches of the step."""
        if self.objective == "sft":
            local = [sum(c.response_tokens for c in counts), 0]
        else:
            local = [sum(c.examples for c in counts), sum(c.chosen_response_tokens for c in counts)]
        total = self.coll.sum_(self.coll.tensor(local, dtype=torch.float32), "step counts")
        scale = self.world / total.clamp(min=1)
        return scale[0], scale[1]

    def train_step(self, batches: list[dict], *, step: int, epoch: int = 0, first_micro: int = 0,
                   before_update: Callable | None = None) -> StepResult:
        """Forward/backward every micro-batch of one accumulation window, then one optimizer update.

        batches: CPU-collated micro-batches (data.collate), this rank's share of the step; every rank must pass
        the same number. before_update(engine) runs after the last backward and before the update (tests read
        the gradient there). Raises NonFiniteError (update not applied) on a non-finite loss or gradient."""
        engine, cfg = self.engine, self.cfg
        started = time.time()
        counts = [batch_counts(b, self.objective) for b in batches]  # once per micro-batch, on the CPU
        main_scale, sft_scale = self._normalisers(counts)
        window = MetricWindow(self.coll.device)
        for i, batch in enumerate(batches):
            boundary = i == len(batches) - 1
            # We own the accumulation boundary so that a short last window still steps.
            engine.set_gradient_accumulation_boundary(boundary)
            with self.precision.autocast():
                out = forward_sums(engine, batch, cfg, self.objective, self.attn, counts=counts[i])
            loss = out.loss_sum * main_scale
            if self.objective == "simpo" and cfg.sft_weight:
                # The SimPO repo's optional SFT term: token mean of the chosen responses' NLL over the step.
                loss = loss + cfg.sft_weight * out.chosen_nll_sum * sft_scale
            window.add(out, code=(first_micro + i) * self.world + self.rank)
            # scale_wrt_gas=False: the loss is already divided by the step's count, not by grad_accum.
            engine.backward(loss, scale_wrt_gas=False)
            if not boundary:
                engine.step()  # DeepSpeed counts micro-steps; nothing is updated before the boundary
        totals = window.all_ranks(self.coll)  # the step's one host read
        metrics = summarise(totals, self.objective, cfg.sft_weight)
        if totals["nonfinite"]:
            micro, rank = window.first_nonfinite(self.coll)
            raise NonFiniteError(
                f"non-finite loss {metrics['loss']} at optimizer step {step} (epoch {epoch}, micro-batch {micro}); "
                f"the last checkpoint is kept [first on rank {rank}; the update was not applied]")
        if before_update is not None:
            before_update(engine)
        lr = engine.get_lr()[0]
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        if not math.isfinite(grad_norm):
            raise NonFiniteError(
                f"non-finite gradient norm {grad_norm} at optimizer step {step} (epoch {epoch}, micro-batches "
                f"{first_micro}-{first_micro + len(batches) - 1}) with a finite loss {metrics['loss']:.6g}; "
                "DeepSpeed skipped the update, the last checkpoint is kept")
        return StepResult(totals, metrics, lr, grad_norm, time.time() - started)

    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """No-grad pass, summed over all ranks (every rank must yield the same number of batches), in the dtype
        of the weights that are saved (Precision.evaluation_autocast: fp32 under CPU bf16 autocast)."""
        self.engine.eval()
        window = MetricWindow(self.coll.device)
        with torch.no_grad(), self.precision.evaluation_autocast():
            for batch in batches:
                window.add(forward_sums(self.engine, batch, self.cfg, self.objective, self.attn))
        self.engine.train()
        totals = window.all_ranks(self.coll)
        return {**summarise(totals, self.objective, self.cfg.sft_weight), "tokens": totals["tokens"],
                "response_tokens": totals["response_tokens"]}
