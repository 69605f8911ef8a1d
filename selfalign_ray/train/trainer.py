"""SimPO / SFT on Ray Train: the driver side. `train_model` starts a TorchTrainer whose workers
(selfalign_ray/train/worker.py) run DeepSpeed ZeRO-3, and returns the consolidated HF model directory.

The driver never loads the shards: it counts rows from the Parquet footers, plans the optimizer steps
(schedule.StepPlan), and hands the files to Ray Data (`datasets=`) in one seeded global permutation of all
rows (train/order.py), which streams them to the workers split equally between ranks, deterministically.

Files, for output_dir=D:
    D/                    the trained model: safetensors + tokenizer + chat template (transformers, vLLM)
    D/train_history.jsonl one line per optimizer step (loss, rewards, margin, accuracy, tokens/s, lr)
    D/train_summary.json  the run summary (also TrainResult.summary)
    D_ray/                Ray Train storage (checkpoints) while the run is alive; deleted after success, or by
                          remove_checkpoints(D) once the caller has recorded the result (keep_checkpoints=True:
                          a crash between the two must not cost a full retrain).
                          D, D_ray and the model path must be on storage every node sees (a shared file
                          system on a multi-node cluster), since rank 0 writes D wherever it runs.
D may be a URI (s3://, gs://; data/storage.py): rank 0 then writes the model into a local staging dir on its node
and uploads it to D; D_ray (Ray Train's storage_path) is on the same store, next to D; the training files may be
URIs (read by Ray Data with the same filesystem), and so may the model path (each worker reads a local copy).
If the driver itself dies, calling train_model again with the same inputs and settings resumes from the
last checkpoint in D_ray; with anything different it starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfalign_ray.config import ConfigError, to_dict, typed
from selfalign_ray.data import storage as layer
from selfalign_ray.models.loading import ModelLoadConfig
from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.deepspeed_config import deepspeed_config
from selfalign_ray.train.objectives import OBJECTIVES
from selfalign_ray.train.order import epoch_datasets, train_dataset_name
from selfalign_ray.train.schedule import StepPlan
from selfalign_ray.train.step_stream import StepStream
from selfalign_ray.train.worker import (
    CRASH_ENV,
    CRASH_MARKER,
    HISTORY_FILE,
    NONFINITE_MARKER,
    SUMMARY_FILE,
    train_worker,
)
from selfalign_ray.watchdog import call_with_deadline

log = logging.getLogger(__name__)

COLUMNS = {"simpo": ["prompt", "chosen", "rejected"], "sft": ["prompt", "completion"]}
# Read as well when every file has them: finish reasons ("length" = a response cut at max_tokens, trained
# without its end-of-turn tokens; train/data.py). Files written before they existed read as complete.
OPTIONAL_COLUMNS = {"simpo": ["chosen_finish_reason", "rejected_finish_reason"], "sft": ["completion_finish_reason"]}


def _columns(objective: str, files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    names = [set(pq.read_schema(layer.resolve(f)[1], filesystem=layer.resolve(f)[0]).names) for f in files]
    optional = [c for c in OPTIONAL_COLUMNS[objective] if all(c in n for n in names)]
    partial = [c for c in OPTIONAL_COLUMNS[objective] if c not in optional and any(c in n for n in names)]
    if partial:
        log.warning("column(s) %s are missing from some training files: every response is trained as complete",
                    partial)
    return COLUMNS[objective] + optional
FINGERPRINT_FILE = "selfalign_run.json"


@dataclass
class TrainResult:
    model_dir: str                                      # the HF directory (= output_dir)
    history: list[dict] = field(default_factory=list)   # one dict per optimizer step
    summary: dict = field(default_factory=dict)         # JSON-able run summary


def as_train_config(cfg) -> TrainConfig:
    """A TrainConfig from a TrainConfig, an OmegaConf node or a dict (unknown keys: ConfigError)."""
    if not isinstance(cfg, TrainConfig):
        TrainConfig.reject_removed(to_dict(cfg))
        cfg = typed(TrainConfig, cfg, "train")
    cfg.validate()
    return cfg


def _count_rows(files: list[str], columns: list[str]) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        if not layer.exists(f):
            raise FileNotFoundError(f"training file {f} does not exist")
        fs, inner = layer.resolve(f)
        meta = pq.read_metadata(inner, filesystem=fs)
        names = meta.schema.to_arrow_schema().names
        missing = sorted(set(columns) - set(names))
        if missing:
            raise ConfigError(f"{f} lacks column(s) {missing} (has {names})")
        rows += meta.num_rows
    return rows


def _check_cpu_budget(cfg: TrainConfig) -> None:
    """The workers (+ one CPU Ray Data's read tasks need, or the input pipeline waits forever) against what
    the cluster has or its autoscaler can add (selfalign_ray/preflight.py): GPU nodes of an autoscaling
    cluster that are not up yet are no reason to refuse."""
    from selfalign_ray.preflight import check, read_capacity, train_ask

    capacity = read_capacity()
    ask = train_ask("training", cfg)
    total = capacity.limit.get("CPU")
    if total is not None and total - cfg.num_workers * cfg.cpus_per_worker < 1:
        raise ConfigError(f"train.num_workers x train.cpus_per_worker = {cfg.num_workers * cfg.cpus_per_worker:g} "
                          f"of the cluster's {total:g} CPUs leaves less than one CPU for Ray Data to read the shards "
                          "(training would wait forever); lower train.cpus_per_worker (fractions are fine)")
    for warning in check([ask], capacity):
        log.warning("%s", warning)


def _prepare_storage(storage: Path | str, out: Path, fingerprint: dict) -> bool:
    """Keep D_ray (resume) when it belongs to an interrupted run with the same fingerprint, else start clean.
    Returns whether a run is resumed. `storage` may be a URI (data/storage.py)."""
    record = layer.join(storage, FINGERPRINT_FILE)
    if layer.exists(record) and layer.read_json(record) == fingerprint:
        log.info("resuming the interrupted training run in %s", storage)
        return True
    layer.delete_dir(storage)
    for stale in (HISTORY_FILE, SUMMARY_FILE, CRASH_MARKER):
        (out / stale).unlink(missing_ok=True)
    layer.makedirs(storage)
    layer.write_text(record, json.dumps(fingerprint, indent=2))
    return False


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete the Ray Train storage (checkpoints) of the run that wrote `output_dir` (D_ray, next to D, on the same
    store when D is a URI): they only serve restarts of that run; the HF directory is the product. Idempotent."""
    if layer.is_uri(output_dir):
        layer.delete_dir(f"{layer.absolute(output_dir)}_ray")
        return
    out = Path(output_dir).expanduser().resolve()
    shutil.rmtree(out.parent / f"{out.name}_ray", ignore_errors=True)


def _read_history(path: Path | str) -> list[dict]:
    # A step redone after a restart is logged twice; the later line is the one that counted.
    by_step = {}
    if layer.exists(path):
        for line in layer.read_text(path).splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def train_model(*, model_path: str, train_files: list[str], output_dir: str, cfg, deepspeed_cfg: dict,
                objective: str = "simpo", eval_files: list[str] | None = None,
                run_name: str = "train", keep_checkpoints: bool = False,
                model_load: dict | None = None, on_step=None) -> TrainResult:
    """Train `model_path` on `train_files` (Parquet; TRL conversational preference rows for "simpo",
    prompt-completion rows for "sft") and save the result as an HF directory at `output_dir`.

    `eval_files` (same format) are evaluated before and after training (summary eval_before/eval_after),
    next to the training set itself (before/after). Ray must already be initialised.
    keep_checkpoints=True leaves D_ray for the caller to delete with remove_checkpoints(D) after it has
    recorded the result. `model_load`: how the weights may load
    (models/loading.py ModelLoadConfig as a dict; default: safetensors only, no remote code).

    `on_step(metrics)` gets each optimizer step's metrics in the driver as training runs (train/step_stream.py);
    None = the active tracker's (selfalign_ray/tracking/, tracker=none: no stream at all).
    """
    import ray
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    cfg = as_train_config(cfg)
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r}: use one of {', '.join(OBJECTIVES)}")
    if not train_files:
        raise ConfigError("train_model: no training files")
    columns = COLUMNS[objective]
    rows = _count_rows(train_files, columns)
    columns = _columns(objective, list(train_files) + list(eval_files or []))
    plan = StepPlan.build(rows, cfg)
    local_model = layer.local_copy(model_path)
    ds_cfg = deepspeed_config(deepspeed_cfg, cfg, model_path=local_model,
                              config_kwargs=ModelLoadConfig.from_dict(model_load).tokenizer_kwargs(local_model))
    _check_cpu_budget(cfg)
    if plan.rows_left_out:
        log.warning("%d of %d rows are left out so that the %d workers get equal shares", plan.rows_left_out,
                    rows, plan.world)
    if plan.smaller_than_global_batch:
        log.warning("%d rows are fewer than one global batch (%d): each epoch makes one optimizer step on the "
                    "%d rows there are", rows, cfg.global_batch_size, plan.rows_per_rank * plan.world)

    # On object storage: the workers write into a local staging dir and rank 0 uploads it to output_uri.
    output_uri = layer.absolute(output_dir) if layer.is_uri(output_dir) else None
    out = layer.staging_dir(output_uri) if output_uri else Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = f"{output_uri}_ray" if output_uri else out.parent / f"{out.name}_ray"
    fingerprint = {"model_path": model_path, "train_files": [layer.absolute(f) for f in train_files],
                   "eval_files": [layer.absolute(f) for f in eval_files or []], "objective": objective,
                   "cfg": asdict(cfg), "deepspeed": ds_cfg, "run_name": run_name}
    fingerprint["sha256"] = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    resumed = _prepare_storage(storage, out, fingerprint)

    # The training rows in one seeded permutation of all files, in blocks of one rank's rows per optimizer step,
    # so that step k trains on rows k*G ... (k+1)*G - 1 of the permutation (train/order.py: a small set is
    # sorted on the driver). The eval set: select_columns (not read_parquet(columns=...), deprecated in Ray 2.60)
    # is still pushed down to the reader.
    train_fs, train_paths = layer.resolve_many(list(train_files))
    per_epoch = epoch_datasets(train_fs, train_paths, columns, cfg.seed,
                               rows_per_block=cfg.global_batch_size // cfg.num_workers, epochs=cfg.epochs)
    datasets = {train_dataset_name(e): ds for e, ds in enumerate(per_epoch)}  # a permutation per epoch
    if eval_files:
        eval_fs, eval_paths = layer.resolve_many(list(eval_files))
        datasets["eval"] = ray.data.read_parquet(eval_paths, filesystem=eval_fs).select_columns(columns)
    # Ray Train takes a filesystem and the path inside it for storage on an object store.
    ray_fs, ray_path = layer.resolve(storage) if output_uri else (None, str(storage))
    log.info("training %s (%s) on %d rows: %d optimizer steps of %d, %d workers, %d micro-batches of %d per "
             "step per worker", model_path, objective, rows, plan.total_steps, cfg.global_batch_size,
             cfg.num_workers, plan.grad_accum, cfg.per_device_batch_size)
    if on_step is None:
        from selfalign_ray.tracking import active

        on_step = active().step_callback(run_name)
    stream = StepStream(on_step) if on_step is not None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": asdict(cfg), "plan": asdict(plan), "deepspeed": ds_cfg, "model_path": model_path,
            "objective": objective, "output_dir": str(out), "output_uri": output_uri, "has_eval": bool(eval_files),
            "model_load": ModelLoadConfig.from_dict(model_load).to_json(),
            "crash_at": int(os.environ.get(CRASH_ENV, "0")),
            "step_queue": stream.queue if stream is not None else None,
        },
        # timeout_s: the process group's collective timeout (a hung collective raises instead of hanging).
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo", timeout_s=cfg.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        datasets=datasets,
        # Deterministic order and split: a restarted worker skips exactly the micro-batches it had consumed.
        # equal split (DataConfig's default for every dataset): no rank waits on a batch that never comes;
        # with preserve_order it deals the permutation's equal blocks round-robin (train/order.py).
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    # A marker left by an earlier call is stale: this call trains again (resumed or fresh).
    (out / NONFINITE_MARKER).unlink(missing_ok=True)
    if output_uri:
        layer.delete(layer.join(output_uri, NONFINITE_MARKER))
    try:
        # Watchdog: no new line in the step history for train.stall_timeout_s -> StallError naming the run.
        # (D a URI: rank 0 may run on another node; it also copies the history to D at most once a minute.)
        history = out / HISTORY_FILE
        remote_history = layer.join(output_uri, HISTORY_FILE) if output_uri else None

        def progress() -> tuple[int, int]:
            local = history.stat().st_size if history.exists() else -1
            remote = layer.size(remote_history) if remote_history and layer.exists(remote_history) else -1
            return local, remote

        call_with_deadline(trainer.fit, progress,
                           cfg.stall_timeout_s, f"training ({run_name})",
                           lambda: f"{len(_read_history(history))} of {plan.total_steps} optimizer steps recorded")
    except Exception as err:
        # A non-finite loss/gradient is final (worker.NONFINITE_MARKER): its message, not Ray's wrapper.
        marker = layer.join(output_uri, NONFINITE_MARKER) if output_uri else out / NONFINITE_MARKER
        if layer.exists(marker):
            raise FloatingPointError(layer.read_text(marker).strip()) from err
        raise
    finally:
        if stream is not None:  # the steps the live stream missed, from the history (a failed run's too)
            stream.close(_read_history(out / HISTORY_FILE))

    model_dir = output_uri or str(out)
    summary = layer.read_json(layer.join(model_dir, SUMMARY_FILE))
    summary.update(wall_s=round(time.time() - started, 1), resumed_interrupted_run=resumed)
    layer.write_text(layer.join(model_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    (out / CRASH_MARKER).unlink(missing_ok=True)
    if not keep_checkpoints:
        remove_checkpoints(model_dir)
    return TrainResult(model_dir=model_dir, history=_read_history(layer.join(model_dir, HISTORY_FILE)),
                       summary=summary)
