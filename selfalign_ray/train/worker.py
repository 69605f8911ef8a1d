"""What every Ray Train worker runs: the training core (train/core.py) over this rank's stream of the shards.

    load (partitioned at load) -> restore the last checkpoint, if any -> evaluate (before)
    -> accumulation windows of micro-batches, one optimizer step each (metrics + checkpoints through
       ray.train.report) -> evaluate (after) -> gather the partitions, rank 0 writes the HF directory

The Ray parts live here (dataset shard, ray.train.report, get_checkpoint, TrainRecorder); the per-step
machinery is the Ray-free core that `python -m selfalign_ray.train.smoke` also runs under torchrun.

After a worker dies, Ray Train (FailureConfig) restarts the whole group; each new worker loads the last
reported DeepSpeed checkpoint and skips the micro-batches that were consumed before it, without
tokenising them. Skipping by count is exact because the driver hands Ray Data one seeded permutation of
the rows per epoch, split deterministically (train/order.py, preserve_order).

A non-finite loss or gradient is not a failure a restart cures: rank 0 writes NONFINITE_MARKER with the
message, every rank raises core.NonFiniteError, a restarted group finds the marker and raises again before
loading anything, and the driver (trainer.train_model) reports the marker's message as the run's failure.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selfalign_ray.data.storage import join, local_copy, upload_dir, write_text
from selfalign_ray.models.loading import ModelLoadConfig
from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.core import (  # noqa: F401  (_attn_implementation, make_adamw: imported from here)
    NonFiniteError,
    TrainCore,
    _attn_implementation,
    build_engine,
    configure_runtime,
    load_checkpoint,
    make_adamw,
    partition_stats,
    save_checkpoint,
    save_hf,
    windows,
)
from selfalign_ray.train.metrics import TrainRecorder
from selfalign_ray.train.order import train_dataset_name
from selfalign_ray.train.schedule import StepPlan
from selfalign_ray.train.step_stream import send_step

HISTORY_FILE = "train_history.jsonl"
# output_dir on object storage: rank 0 copies the step history there at most this often (the driver's watchdog).
HISTORY_PUBLISH_S = 60.0
SUMMARY_FILE = "train_summary.json"
CHECKPOINT_TAG = "ckpt"
# Test hook: with SELFALIGN_TEST_CRASH_AT_STEP=k in the driver's environment, the last rank exits hard
# (os._exit, as if killed) right after optimizer step k and before reporting it. A marker file in the
# output dir makes this happen on the first attempt only, so the restarted group runs through.
CRASH_ENV = "SELFALIGN_TEST_CRASH_AT_STEP"
CRASH_MARKER = ".test_crash_fired"
# Written by rank 0 when a step meets a non-finite loss or gradient (see the module docstring).
NONFINITE_MARKER = ".nonfinite_stop"


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
        The shard already arrives in its epoch's seeded global order (train/order.py); `epoch` only labels it."""
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


def evaluate(core: TrainCore, data: MicroBatches) -> dict:
    """No-grad pass over a whole shard, summed over all ranks: preference accuracy and mean margin of
    beta * avg log-prob (SimPO; ties count as wrong), or mean loss per response token (SFT)."""
    s = core.evaluate(batch for _, batch in data.iterate())
    if core.objective == "simpo":
        return {"preference_accuracy": s["preference_accuracy"], "mean_margin": s["margin"],
                "reward_chosen": s["reward_chosen"], "reward_rejected": s["reward_rejected"],
                "mean_loss": s["loss"], "pairs": s["examples"]}
    return {"mean_loss": s["loss"], "token_nll": s["token_nll"], "examples": s["examples"]}


def _evaluate_all(core: TrainCore, sets: dict) -> dict:
    return {name: evaluate(core, data) for name, data in sets.items()}


def _save_checkpoint_and_report(engine, metrics: dict, progress: Progress, staging_dir: str | None = None) -> None:
    import ray.train
    from ray.train import Checkpoint

    # Staged on local disk (train.checkpoint_staging_dir, default the system temp dir) before Ray Train copies it
    # to storage: ZeRO-3 partitions with fp32 Adam state, ~16 bytes per parameter over all ranks of the node.
    if staging_dir:
        Path(staging_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_dir or None, prefix="selfalign-ckpt-") as d:
        # Ray Train gathers all ranks' partition files into one checkpoint directory in storage.
        save_checkpoint(engine, d, CHECKPOINT_TAG, {"progress": asdict(progress)})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _restore(engine) -> Progress | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        client = load_checkpoint(engine, d, CHECKPOINT_TAG)
    return Progress(**client["progress"])


def _maybe_crash_for_test(crash_at: int, step: int, rank: int, world: int, out: Path) -> None:
    if crash_at and step == crash_at and rank == world - 1:
        marker = out / CRASH_MARKER
        if not marker.exists():
            marker.touch()
            os._exit(1)


def _refuse_after_nonfinite(out: Path) -> None:
    """A restarted group (FailureConfig) would meet the same non-finite values on the same data: stop at once."""
    marker = out / NONFINITE_MARKER
    if marker.exists():
        raise NonFiniteError(f"{marker.read_text().strip()} (not retried: the same data would fail the same way)")


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker (see trainer.train_model for `config`)."""
    import ray.train

    cfg = TrainConfig(**config["cfg"])
    plan = StepPlan(**config["plan"])
    objective, out = config["objective"], Path(config["output_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.time()
    _refuse_after_nonfinite(out)

    precision = configure_runtime(cfg)
    # A model on object storage (the previous iteration's, under an s3:// output_dir): a copy on this node.
    tokenizer, engine, _hf_ds = build_engine(local_copy(config["model_path"]), cfg, config["deepspeed"], plan,
                                             load=ModelLoadConfig.from_dict(config.get("model_load")),
                                             precision=precision)
    core = TrainCore(engine, cfg, objective, precision=precision)
    partition = partition_stats(engine.module)
    restored = _restore(engine)
    restored_from_step = restored.step if restored else None  # `progress` below advances this same object
    progress = restored or Progress()

    # One shard per epoch, each in its own seeded permutation (train/order.py); evaluation reads epoch 0's.
    train_data = [MicroBatches(ray.train.get_dataset_shard(train_dataset_name(e)), tokenizer, cfg, objective)
                  for e in range(cfg.epochs)]
    eval_sets = {"train": train_data[0]}
    if config["has_eval"]:
        eval_sets["eval"] = MicroBatches(ray.train.get_dataset_shard("eval"), tokenizer, cfg, objective)
    if progress.before is None and cfg.eval_before_after:
        progress.before = _evaluate_all(core, eval_sets)

    history = out / HISTORY_FILE
    if config.get("output_uri") and restored is None and rank == 0:
        # A staging dir on this node may hold the history of an earlier run (the driver cleans only its own node).
        history.unlink(missing_ok=True)
    history_published = 0.0
    recorder = TrainRecorder.for_worker(ctx, plan.total_steps, progress.step)  # rank 0: tqdm bar + Ray metrics
    # The driver's tracker, if any (train/step_stream.py): rank 0 sends each step's metrics.
    step_queue = config.get("step_queue") if rank == 0 else None
    for epoch in range(progress.epoch, cfg.epochs):
        skip = progress.micro_in_epoch if epoch == progress.epoch else 0
        seen, window_started = skip, time.time()
        for window in windows(train_data[epoch].iterate(epoch, skip=skip), plan):
            seen += len(window)
            first, last = window[0][0], window[-1][0]
            try:
                result = core.train_step([b for _, b in window], step=progress.step + 1, epoch=epoch,
                                         first_micro=first)
            except NonFiniteError as err:
                if rank == 0:
                    (out / NONFINITE_MARKER).write_text(str(err))
                    if config.get("output_uri"):  # the driver may run on another node than rank 0
                        write_text(join(config["output_uri"], NONFINITE_MARKER), str(err))
                raise
            # Wall time of the window, reading its micro-batches from the shard included (as before the core).
            elapsed = time.time() - window_started
            totals = result.totals
            progress.step += 1
            progress.train_s += elapsed
            progress.tokens += totals["tokens"]
            last_in_epoch = last + 1 == plan.micro_per_epoch
            progress.epoch, progress.micro_in_epoch = (epoch + 1, 0) if last_in_epoch else (epoch, last + 1)
            metrics = {"step": progress.step, "epoch": epoch, **result.metrics, "lr": result.lr,
                       "grad_norm": result.grad_norm, "tokens": int(totals["tokens"]),
                       "tokens_per_s": totals["tokens"] / max(elapsed, 1e-9)}
            if rank == 0:
                with open(history, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if config.get("output_uri") and time.time() - history_published > HISTORY_PUBLISH_S:
                    # The driver's training watchdog may be on another node: it sees progress on the store.
                    write_text(join(config["output_uri"], HISTORY_FILE), history.read_text())
                    history_published = time.time()
                step_queue = send_step(step_queue, metrics)
            recorder.step(metrics)
            _maybe_crash_for_test(config["crash_at"], progress.step, rank, world, out)
            if progress.step % cfg.checkpoint_every_steps == 0 or progress.step == plan.total_steps:
                _save_checkpoint_and_report(engine, metrics, progress, cfg.checkpoint_staging_dir)
            else:
                ray.train.report(metrics)
            window_started = time.time()
        if seen != plan.micro_per_epoch:  # every rank sees the same count, so all raise together
            raise RuntimeError(f"rank {rank} got {seen} micro-batches in epoch {epoch}, the plan expected "
                               f"{plan.micro_per_epoch} ({plan.rows_per_rank} rows per rank)")

    recorder.close()
    after = _evaluate_all(core, eval_sets) if cfg.eval_before_after else None
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
            # What the model really ran (models/attention.py) and whether micro-batches were packed.
            "attn_implementation": core.attn, "padding_free": cfg.padding_free,
            # fp32 | bf16 | bf16_autocast, why (train.bf16 true/false/auto), the CPU model and its bf16 flags.
            "precision": core.precision.to_dict(),
            # before/after ran in the saved weights' dtype (Precision.evaluation_autocast), not under autocast.
            "evaluated_in": str(core.precision.weights_dtype).removeprefix("torch."),
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        if config.get("output_uri"):
            # output_dir on object storage: `out` is this node's staging dir; the model is published by uploading it.
            upload_dir(out, config["output_uri"])
    ray.train.report({"step": progress.step, "done": 1})
