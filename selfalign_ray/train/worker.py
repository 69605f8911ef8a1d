"""What every Ray Train worker runs: a DeepSpeed ZeRO-3 engine over this rank's stream of the shards.

    load (partitioned at load) -> restore the last checkpoint, if any -> evaluate (before)
    -> micro-batches, accumulated into optimizer steps (metrics + checkpoints through ray.train.report)
    -> evaluate (after) -> gather the partitions, rank 0 writes the HF directory

After a worker dies, Ray Train (FailureConfig) restarts the whole group; each new worker loads the last
reported DeepSpeed checkpoint and skips the micro-batches that were consumed before it, without
tokenising them. Skipping by count is exact because the driver hands Ray Data one seeded permutation of
the rows, split deterministically (train/order.py, preserve_order).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.metrics import TrainRecorder
from selfalign_ray.train.objectives import MetricWindow, run_micro_batch, summarise
from selfalign_ray.train.schedule import StepPlan, lr_multiplier

HISTORY_FILE = "train_history.jsonl"
SUMMARY_FILE = "train_summary.json"
CHECKPOINT_TAG = "ckpt"
# Test hook: with SELFALIGN_TEST_CRASH_AT_STEP=k in the driver's environment, the last rank exits hard
# (os._exit, as if killed) right after optimizer step k and before reporting it. A marker file in the
# output dir makes this happen on the first attempt only, so the restarted group runs through.
CRASH_ENV = "SELFALIGN_TEST_CRASH_AT_STEP"
CRASH_MARKER = ".test_crash_fired"


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint as DeepSpeed client state."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch to continue in
    micro_in_epoch: int = 0  # micro-batches of that epoch already consumed
    train_s: float = 0.0     # seconds spent in training steps so far (tokens/s over the whole run)
    tokens: float = 0.0      # tokens through the model in training steps, all ranks
    before: dict | None = None  # evaluation before training (kept across restarts)


class MicroBatches:
    """This rank's stream of a Ray Data shard as tokenised, collated micro-batches."""

    def __init__(self, shard, tokenizer, cfg: TrainConfig, objective: str):
        self.shard, self.tok, self.cfg, self.objective = shard, tokenizer, cfg, objective
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def iterate(self, epoch: int = 0, skip: int = 0):
        """Yield (index in epoch, batch); the first `skip` micro-batches are passed over untouched.
        The shard already arrives in the seeded global order (train/order.py); `epoch` only labels it."""
        from selfalign_ray.train.data import collate, preference_examples, sft_example

        cfg = self.cfg
        tables = self.shard.iter_batches(batch_size=cfg.per_device_batch_size, batch_format="pyarrow")
        for index, table in enumerate(tables):
            if index < skip:
                continue
            rows = table.to_pylist()
            if self.objective == "simpo":
                pairs = [preference_examples(self.tok, r, cfg.max_length, cfg.max_prompt_length) for r in rows]
                examples = [c for c, _ in pairs] + [r for _, r in pairs]  # chosen first, then rejected
            else:
                examples = [sft_example(self.tok, r, cfg.max_length, cfg.max_prompt_length) for r in rows]
            yield index, collate(examples, self.pad_id, cfg.padding_free)


def make_adamw(params, lr: float, weight_decay: float):
    """torch AdamW with the fused kernel where torch has one for the device (CPU and CUDA do).

    Why: the default on CPU is the per-tensor Python loop. Under ZeRO-3 it steps one flat fp32 partition,
    and py-spy of a Ray Train worker (bench/RESULTS.md, SmolLM2-135M) showed that loop at 26 % of the step;
    the fused kernel does the same update ~6x faster (0.20 s vs 1.20 s for 135M parameters, 1 thread)."""
    import torch

    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _configure_runtime(cfg: TrainConfig) -> None:
    import deepspeed
    import torch
    from transformers import set_seed

    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
        if not cfg.cpu_shm_comm:
            # DeepSpeed's CPU backend would build its shared-memory all-reduce op with gcc on first use
            # (~40 s, and a compiler on every node). deepspeed.ops.__compatible_ops__ is the switch its
            # comm layer reads (deepspeed/comm/torch.py: build_shm_op); with the op marked unavailable it
            # uses Ray's gloo process group as is. The alternative is prebuilding the op into the wheel:
            # DS_BUILD_SHM_COMM=1 pip install deepspeed.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    set_seed(cfg.seed)
    # Ray Train already created the process group (gloo / nccl); DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")


def _attn_implementation(cfg: TrainConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if cfg.use_gpu:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _build_engine(model_path: str, cfg: TrainConfig, ds_cfg: dict, plan: StepPlan):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # While this object is alive, from_pretrained builds the model under deepspeed.zero.Init: every rank
    # loads its own partition (a collective call: all ranks must load together; the full model never sits
    # on one device). Kept referenced by the caller for the same reason.
    hf_ds = HfDeepSpeedConfig(ds_cfg)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attn_implementation=_attn_implementation(cfg))
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


def evaluate(engine, data: MicroBatches, cfg: TrainConfig, objective: str) -> dict:
    """No-grad pass over a whole shard, summed over all ranks: preference accuracy and mean margin of
    beta * avg log-prob (SimPO; ties count as wrong), or mean loss (SFT)."""
    import torch

    engine.eval()
    window = MetricWindow()
    with torch.no_grad():
        for _, batch in data.iterate():
            window.add(run_micro_batch(engine, batch, cfg, objective))
    engine.train()
    s = summarise(window.all_ranks(), objective)
    if objective == "simpo":
        return {"preference_accuracy": s["preference_accuracy"], "mean_margin": s["margin"],
                "reward_chosen": s["reward_chosen"], "reward_rejected": s["reward_rejected"],
                "mean_loss": s["loss"], "pairs": s["examples"]}
    return {"mean_loss": s["loss"], "token_nll": s["token_nll"], "examples": s["examples"]}


def _evaluate_all(engine, sets: dict, cfg: TrainConfig, objective: str) -> dict:
    return {name: evaluate(engine, data, cfg, objective) for name, data in sets.items()}


def _save_checkpoint_and_report(engine, metrics: dict, progress: Progress) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        # Each rank writes its own ZeRO partition files (names carry the rank); Ray Train gathers all
        # ranks' files into one checkpoint directory in storage.
        engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state={"progress": asdict(progress)})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _restore(engine) -> Progress | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
    return Progress(**client["progress"])


def _maybe_crash_for_test(crash_at: int, step: int, rank: int, world: int, out: Path) -> None:
    if crash_at and step == crash_at and rank == world - 1:
        marker = out / CRASH_MARKER
        if not marker.exists():
            marker.touch()
            os._exit(1)


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


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker (see trainer.train_model for `config`)."""
    import ray.train

    cfg = TrainConfig(**config["cfg"])
    plan = StepPlan(**config["plan"])
    objective, out = config["objective"], Path(config["output_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.time()

    _configure_runtime(cfg)
    tokenizer, engine, _hf_ds = _build_engine(config["model_path"], cfg, config["deepspeed"], plan)
    partition = partition_stats(engine.module)
    restored = _restore(engine)
    restored_from_step = restored.step if restored else None  # `progress` below advances this same object
    progress = restored or Progress()

    train_data = MicroBatches(ray.train.get_dataset_shard("train"), tokenizer, cfg, objective)
    eval_sets = {"train": train_data}
    if config["has_eval"]:
        eval_sets["eval"] = MicroBatches(ray.train.get_dataset_shard("eval"), tokenizer, cfg, objective)
    if progress.before is None and cfg.eval_before_after:
        progress.before = _evaluate_all(engine, eval_sets, cfg, objective)

    history = out / HISTORY_FILE
    recorder = TrainRecorder.for_worker(ctx, plan.total_steps, progress.step)  # rank 0: tqdm bar + Ray metrics
    for epoch in range(progress.epoch, cfg.epochs):
        skip = progress.micro_in_epoch if epoch == progress.epoch else 0
        window, window_started, seen = MetricWindow(), time.time(), skip
        for micro, batch in train_data.iterate(epoch, skip=skip):
            seen += 1
            boundary = plan.is_boundary(micro)
            # We own the accumulation boundary so that a short last window still steps, and we average the
            # gradient over the micro-batches the window really has (DeepSpeed would divide by grad_accum).
            engine.set_gradient_accumulation_boundary(boundary)
            out_mb = run_micro_batch(engine, batch, cfg, objective)
            engine.backward(out_mb.loss / plan.window_size(micro), scale_wrt_gas=False)
            lr = engine.get_lr()[0]  # the rate this window's update uses
            engine.step()  # every micro-batch: DeepSpeed counts them; only a boundary updates the weights
            window.add(out_mb)
            if not boundary:
                continue
            totals = window.all_ranks()
            elapsed = time.time() - window_started
            progress.step += 1
            progress.train_s += elapsed
            progress.tokens += totals["tokens"]
            last_in_epoch = micro + 1 == plan.micro_per_epoch
            progress.epoch, progress.micro_in_epoch = (epoch + 1, 0) if last_in_epoch else (epoch, micro + 1)
            metrics = {"step": progress.step, "epoch": epoch, **summarise(totals, objective), "lr": lr,
                       "tokens": int(totals["tokens"]), "tokens_per_s": totals["tokens"] / max(elapsed, 1e-9)}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss']} at optimizer step {progress.step} "
                                         f"(epoch {epoch}, micro-batch {micro}); the last checkpoint is kept")
            if rank == 0:
                with open(history, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            recorder.step(metrics)
            _maybe_crash_for_test(config["crash_at"], progress.step, rank, world, out)
            if progress.step % cfg.checkpoint_every_steps == 0 or progress.step == plan.total_steps:
                _save_checkpoint_and_report(engine, metrics, progress)
            else:
                ray.train.report(metrics)
            window, window_started = MetricWindow(), time.time()
        if seen != plan.micro_per_epoch:  # every rank sees the same count, so all raise together
            raise RuntimeError(f"rank {rank} got {seen} micro-batches in epoch {epoch}, the plan expected "
                               f"{plan.micro_per_epoch} ({plan.rows_per_rank} rows per rank)")

    recorder.close()
    after = _evaluate_all(engine, eval_sets, cfg, objective) if cfg.eval_before_after else None
    save_hf(engine, tokenizer, out, rank)
    if rank == 0:
        before = progress.before or {}
        summary = {
            "objective": objective, "steps": progress.step, "rows": plan.rows, "world_size": world,
            "global_batch_size": cfg.global_batch_size, "plan": plan.to_dict(),
            "before": before.get("train"), "after": (after or {}).get("train"),
            "eval_before": before.get("eval"), "eval_after": (after or {}).get("eval"),
            "train_s": round(progress.train_s, 2), "worker_wall_s": round(time.time() - started, 1),
            "tokens": int(progress.tokens),
            # Tokens through the model (prompt + responses, chosen and rejected, no padding) per second of
            # training steps, over all ranks; loading, evaluation and checkpointing are not counted.
            "mean_tokens_per_s": progress.tokens / max(progress.train_s, 1e-9),
            "restored_from_step": restored_from_step,
            "zero3_partition_rank0": partition,
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    ray.train.report({"step": progress.step, "done": 1})
