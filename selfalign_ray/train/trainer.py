"""SimPO / SFT on Ray Train: a TorchTrainer whose workers run DeepSpeed ZeRO-3.

Driver side (`train_model`): counts rows from Parquet metadata (never loads the shards), builds the
DeepSpeed config, and hands the shards to the workers as a streaming Ray Dataset split equally
between ranks (unequal batch counts would hang the collectives).

Worker side (`_train_worker`): loads the model under ZeRO-3 (partitioned at load), runs
chosen + rejected in one concatenated forward pass, reports metrics every optimizer step and a
DeepSpeed checkpoint every `checkpoint_every_steps`; after a worker dies, `FailureConfig` restarts
the group, which reloads the last checkpoint and skips the micro-batches already consumed.
The final model is gathered from the partitions and saved by rank 0 as a plain HF directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfalign_ray.config import to_dict, typed
from selfalign_ray.train.config import TrainConfig

HISTORY_FILE = "train_history.jsonl"
SUMMARY_FILE = "train_summary.json"
# Test hook: a worker of this rank exits hard at this optimizer step on the first attempt only.
CRASH_ENV = "SELFALIGN_TEST_CRASH_AT_STEP"
# Worker state saved with each checkpoint: where to resume and the pre-training evaluation.
RESUME_KEYS = ("step", "epoch", "micro_in_epoch", "before")


@dataclass
class TrainResult:
    model_dir: str
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def deepspeed_config(base: dict, cfg: TrainConfig) -> dict:
    """Fill the "auto" values of conf/deepspeed/*.yaml from the training settings."""
    ds = json.loads(json.dumps(to_dict(base)))
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.global_batch_size
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds["bf16"] = {"enabled": bool(cfg.bf16)}
    ds.setdefault("steps_per_print", 10**9)
    # We pass a torch AdamW: no DeepSpeed CPUAdam to compile, also with optimizer offload.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def _count_rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in files)


def train_model(*, model_path: str, train_files: list[str], output_dir: str, cfg, deepspeed_cfg: dict,
                objective: str = "simpo", eval_files: list[str] | None = None,
                run_name: str = "train") -> TrainResult:
    """Train `model_path` on `train_files` and save the result as an HF directory at `output_dir`."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg if isinstance(cfg, TrainConfig) else typed(TrainConfig, cfg, "train")
    cfg.validate()
    if objective not in ("simpo", "sft"):
        raise ValueError(f"objective={objective!r}: use simpo or sft")
    if not train_files:
        raise ValueError("train_model: no training files")
    rows = _count_rows(train_files)
    if rows < cfg.num_workers * cfg.per_device_batch_size:
        raise ValueError(f"{rows} training rows cannot feed {cfg.num_workers} workers x "
                         f"{cfg.per_device_batch_size} rows per micro-batch; generate more data or use fewer workers")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (HISTORY_FILE, SUMMARY_FILE):
        (out / stale).unlink(missing_ok=True)

    from ray.data import ExecutionOptions

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": asdict(cfg), "deepspeed": deepspeed_config(deepspeed_cfg, cfg), "model_path": model_path,
            "objective": objective, "rows": rows, "output_dir": str(out),
            "crash_at": int(os.environ.get(CRASH_ENV, "0")),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        datasets={"train": ray.data.read_parquet(train_files)},
        # preserve_order: a restarted worker sees its rows in the same order and can skip what it consumed.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(out / "_ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()
    # A step redone after a restart is logged twice; the later line is the one that counted.
    by_step = {}
    for line in (out / HISTORY_FILE).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    history = [by_step[k] for k in sorted(by_step)]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    # Checkpoints only serve restarts inside this call; the HF directory is the product.
    shutil.rmtree(out / "_ray", ignore_errors=True)
    return TrainResult(model_dir=str(out), history=history, summary=summary)


# ---------------------------------------------------------------------------------------- worker


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


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(1.0, max(0.0, progress))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return f


class _Batches:
    """Tokenised micro-batches of this rank's shard, in a stable order."""

    def __init__(self, shard, tokenizer, cfg: TrainConfig, objective: str):
        self.shard, self.tok, self.cfg, self.objective = shard, tokenizer, cfg, objective

    def __iter__(self):
        from selfalign_ray.train.data import collate, preference_examples, sft_example

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for table in self.shard.iter_batches(batch_size=self.cfg.per_device_batch_size, batch_format="pyarrow"):
            rows = table.to_pylist()
            if self.objective == "simpo":
                pairs = [preference_examples(self.tok, r, self.cfg.max_length, self.cfg.max_prompt_length) for r in rows]
                # Chosen rows first, then rejected: one forward pass over 2B sequences.
                yield collate([c for c, _ in pairs] + [r for _, r in pairs], pad), len(rows)
            else:
                yield collate([sft_example(self.tok, r, self.cfg.max_length, self.cfg.max_prompt_length) for r in rows], pad), len(rows)


def _forward(engine, batch: dict, cfg: TrainConfig, objective: str) -> dict:
    """Loss and per-example statistics of one micro-batch."""

    from selfalign_ray.train.data import sequence_logps
    from selfalign_ray.train.simpo import simpo_loss

    device = engine.device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = sequence_logps(logits, batch["labels"])
    tokens = int(batch["attention_mask"].sum())
    if objective == "sft":
        loss = -sums.sum() / counts.sum().clamp(min=1)
        return {"loss": loss, "tokens": tokens, "n": sums.shape[0]}
    b = sums.shape[0] // 2
    avg = sums / counts.clamp(min=1)
    losses, r_w, r_l = simpo_loss(avg[:b], avg[b:], cfg.beta, cfg.gamma_beta_ratio, cfg.label_smoothing)
    loss = losses.mean()
    if cfg.sft_weight:
        loss = loss + cfg.sft_weight * (-sums[:b].sum() / counts[:b].sum().clamp(min=1))
    return {"loss": loss, "tokens": tokens, "n": b, "reward_chosen": r_w, "reward_rejected": r_l,
            "correct": (r_w > r_l).float()}


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _evaluate(engine, batches, cfg, objective) -> dict:
    """No-grad pass: preference accuracy and mean margin (SimPO) or mean NLL (SFT) over all ranks."""
    import torch

    engine.eval()
    acc = [0.0, 0.0, 0.0]  # correct, margin sum, n   (SFT: nll sum, tokens, n)
    with torch.no_grad():
        for batch, _ in batches:
            o = _forward(engine, batch, cfg, objective)
            if objective == "simpo":
                acc[0] += float(o["correct"].sum())
                acc[1] += float((o["reward_chosen"] - o["reward_rejected"]).sum())
                acc[2] += o["n"]
            else:
                acc[0] += float(o["loss"]) * o["n"]
                acc[2] += o["n"]
    engine.train()
    correct, margin, n = _all_reduce_sum(acc)
    if objective == "simpo":
        return {"preference_accuracy": correct / max(n, 1), "mean_margin": margin / max(n, 1), "pairs": int(n)}
    return {"mean_loss": correct / max(n, 1), "examples": int(n)}


def _train_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    cfg = TrainConfig(**config["cfg"])
    objective, ds_cfg, out = config["objective"], config["deepspeed"], Path(config["output_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
        if not cfg.cpu_shm_comm:
            # DeepSpeed would compile its shared-memory all-reduce op with gcc on first use; plain
            # gloo collectives need no compiler and are fast enough for CPU-sized models.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(cfg.seed)
    # Ray Train already created the process group; DeepSpeed wraps it.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")

    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    # Alive while the model loads: from_pretrained partitions parameters at load (a collective call).
    hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"], dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attn_implementation=_attn_implementation(cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    rows_per_rank = config["rows"] // world  # the equal split drops the remainder
    micro_per_epoch = math.ceil(rows_per_rank / cfg.per_device_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_scheduler, warmup, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)

    partition = _partition_stats(engine.module)
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "before": None, "started": time.time()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ckpt")
            # The returned client state also holds DeepSpeed's own metadata keys: take only ours.
            state.update({k: client[k] for k in RESUME_KEYS})
            state["restored_from_step"] = client["step"]
    batches = _Batches(ray.train.get_dataset_shard("train"), tokenizer, cfg, objective)
    if state["before"] is None and cfg.eval_before_after:
        state["before"] = _evaluate(engine, batches, cfg, objective)

    history_path = out / "train_history.jsonl"
    window = {"loss": 0.0, "n": 0, "tokens": 0, "correct": 0.0, "rw": 0.0, "rl": 0.0, "micro": 0}
    window_started = time.time()
    crash_at = config["crash_at"]
    for epoch in range(state["epoch"], cfg.epochs):
        skip = state["micro_in_epoch"] if epoch == state["epoch"] else 0
        for micro, (batch, _) in enumerate(batches):
            if micro < skip:
                continue  # consumed before the restart
            # We own the accumulation boundary (set before every backward) so that the last,
            # possibly partial, window of an epoch still steps the optimizer on what it has.
            boundary = (micro + 1) % cfg.grad_accum == 0 or micro == micro_per_epoch - 1
            engine.set_gradient_accumulation_boundary(boundary)
            o = _forward(engine, batch, cfg, objective)
            engine.backward(o["loss"])
            engine.step()
            window["loss"] += float(o["loss"]) * o["n"]
            window["n"] += o["n"]
            window["tokens"] += o["tokens"]
            window["micro"] += 1
            if objective == "simpo":
                window["correct"] += float(o["correct"].sum())
                window["rw"] += float(o["reward_chosen"].sum())
                window["rl"] += float(o["reward_rejected"].sum())
            if not boundary:
                continue
            state["step"] += 1
            state["micro_in_epoch"] = micro + 1
            state["epoch"] = epoch
            loss, n, tokens, correct, rw, rl = _all_reduce_sum(
                [window["loss"], window["n"], window["tokens"], window["correct"], window["rw"], window["rl"]])
            elapsed = time.time() - window_started
            metrics = {"step": state["step"], "epoch": epoch, "loss": loss / max(n, 1),
                       "tokens_per_s": tokens / elapsed if elapsed else 0.0, "tokens": int(tokens),
                       "lr": scheduler.get_last_lr()[0]}
            if objective == "simpo":
                metrics.update(reward_chosen=rw / max(n, 1), reward_rejected=rl / max(n, 1),
                               margin=(rw - rl) / max(n, 1), preference_accuracy=correct / max(n, 1))
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss']} at optimizer step {state['step']} "
                                         f"(epoch {epoch}, micro-batch {micro}); last good checkpoint kept")
            if rank == 0:
                with open(history_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            window = dict.fromkeys(window, 0)
            window_started = time.time()
            if crash_at and state["step"] == crash_at and rank == world - 1 and not checkpoint:
                os._exit(1)  # test hook: simulate a worker killed mid-epoch
            if state["step"] % cfg.checkpoint_every_steps == 0 and state["step"] < total_steps:
                _report_with_checkpoint(engine, metrics, state)
            else:
                ray.train.report(metrics)
        state["micro_in_epoch"] = 0
        state["epoch"] = epoch + 1

    after = _evaluate(engine, batches, cfg, objective) if cfg.eval_before_after else None
    _save_hf(engine, model, tokenizer, out, rank)
    if rank == 0:
        summary = {"objective": objective, "steps": state["step"], "rows": config["rows"], "world_size": world,
                   "global_batch_size": cfg.global_batch_size, "wall_s": round(time.time() - state["started"], 1),
                   "before": state["before"], "after": after, "restored_from_step": state.get("restored_from_step"),
                   "zero3_partition": partition}
        hist = [json.loads(x) for x in history_path.read_text().splitlines() if x.strip()] if history_path.exists() else []
        if hist:
            summary["mean_tokens_per_s"] = sum(h["tokens_per_s"] for h in hist) / len(hist)
            summary["final_loss"] = hist[-1]["loss"]
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    ray.train.report({"step": state["step"], "done": 1})


def _partition_stats(module) -> dict:
    """Parameters held by this rank vs the whole model (ZeRO-3 keeps ~1/world of them per rank)."""
    total = local = 0
    for p in module.parameters():
        total += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return {"total_params": total, "rank0_local_params": local}


def _report_with_checkpoint(engine, metrics: dict, state: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        # Every rank writes its own ZeRO partition files; Ray merges them into one checkpoint dir.
        client = {k: state[k] for k in RESUME_KEYS}
        engine.save_checkpoint(d, tag="ckpt", client_state=client)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _save_hf(engine, model, tokenizer, out: Path, rank: int) -> None:
    """Gather the ZeRO-3 partitions and write safetensors + tokenizer (+ chat template) from rank 0."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            state_dict = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        engine.module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
