"""Finished steps and the settings they ran with: a re-run reuses a step only under the same settings.

Generation binds its settings in iter_k/run.json (data/shards.py). Every later step — training (iter_k/train.json,
SynPO's generator.json / improver.json), evaluation (eval_vs_base.json, SynPO's eval.json / eval_base.json) —
keeps the settings it ran with in its record under "settings", and their sha256 under "fingerprint":

    train:  the training config, the DeepSpeed config, the objective, the init model's identity, the data files'
            sha256 (run_step(..., settings=train_settings(...)))
    eval:   the eval settings, the engine settings that decide the answers, the compared models' identities

A model's identity is its path plus either the fingerprint of the step that produced it (a model trained by this
run) or a digest of its files (a base model: config, tokenizer, safetensors index; weight files by size and
header, see model_identity). The report (report.md, summary.json) is rebuilt from these records on every run, so
it can only show results whose settings matched.

A re-run whose settings differ from a finished step's is refused with StepSettingsError (a ResumeMismatchError,
so the CLI prints one line and exits 2) naming each differing setting as `key: old -> new`; the old result is
never reported under new settings. Settings that cannot change a result are left out (see the *_IGNORED sets).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from selfalign_ray.data import storage
from selfalign_ray.data.shards import ResumeMismatchError, sha256_file
from selfalign_ray.redaction import redact

log = logging.getLogger(__name__)

# train.* settings that decide where and how robustly training runs, never the trained weights or the summary:
# the loop switch, restart/checkpoint cadence (a resumed run continues bit-for-bit, train/worker.py), CPU
# reservations and thread counts, the CPU all-reduce implementation, and where checkpoints are staged.
# Also the failure bounds and placement (collective timeout, stall watchdog, PACK/SPREAD): they decide whether a
# run is stopped or where its workers sit, not what a finished run computes.
TRAIN_IGNORED = frozenset({"enabled", "max_failures", "checkpoint_every_steps", "checkpoint_staging_dir",
                           "cpus_per_worker", "torch_threads", "cpu_shm_comm", "collective_timeout_s",
                           "stall_timeout_s", "placement_strategy"})
# deepspeed.* settings that only change logging, communication bucketing/overlap (the same sums, cut into other
# pieces) or which small parameters stay unpartitioned, not the optimizer's arithmetic.
DEEPSPEED_IGNORED = frozenset({"steps_per_print", "wall_clock_breakdown", "comms_logger", "flops_profiler",
                               "tensorboard", "wandb", "csv_monitor", "zero_optimization.overlap_comm",
                               "zero_optimization.contiguous_gradients", "zero_optimization.reduce_bucket_size",
                               "zero_optimization.allgather_bucket_size",
                               "zero_optimization.stage3_prefetch_bucket_size",
                               "zero_optimization.stage3_max_live_parameters",
                               "zero_optimization.stage3_max_reuse_distance",
                               "zero_optimization.stage3_param_persistence_threshold",
                               # our trainer saves the model itself (train/worker.py), never DeepSpeed's 16-bit copy
                               "zero_optimization.stage3_gather_16bit_weights_on_model_save"})
# engine.* settings that place or size the engine pool (actors, CPUs/GPUs per actor, KV-cache memory, threads):
# answers are seeded per row (engines/base.py request_seed), not per actor.
# Nor do the failure bounds (actor restarts, task retries, the stall watchdog).
ENGINE_IGNORED = frozenset({"num_actors", "num_cpus_per_actor", "num_gpus_per_actor", "gpu_memory_utilization",
                            "cpu_kvcache_space_gb", "torch_threads", "max_restarts", "max_task_retries",
                            "stall_timeout_s"})
# eval.* settings that only place the pools (split or shared devices).
EVAL_IGNORED = frozenset({"enabled", "pool_resources"})

# Files in a model directory that are written by training next to the weights and change on every run
# (wall times), or that do not define the model.
_RUN_FILES = frozenset({"train_history.jsonl", "train_summary.json"})
# Files up to this size are hashed whole; larger ones (weights) by size plus their first bytes (the safetensors
# header: every tensor's name, dtype, shape and offsets). Hashing 18 GB of weights on every re-run is too slow.
_WHOLE_FILE_LIMIT = 64 << 20
_HEAD_BYTES = 1 << 20


class StepSettingsError(ResumeMismatchError):
    """A finished step's record holds other settings than the re-run's (exit 2 through the CLI)."""


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _without(d: dict, ignored: frozenset) -> dict:
    """`d` with the dotted keys in `ignored` removed (nested dicts included)."""
    def strip(node, prefix):
        if not isinstance(node, dict):
            return node
        return {k: strip(v, f"{prefix}{k}.") for k, v in node.items() if f"{prefix}{k}" not in ignored}
    return strip(_plain(d), "")


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(_plain(settings), sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- identities
def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    if size <= _WHOLE_FILE_LIMIT:
        return sha256_file(path)
    h = hashlib.sha256(f"size={size}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
    return "head:" + h.hexdigest()


def model_identity(path: str, produced_by: str | None = None) -> dict:
    """`path` plus what it holds: the fingerprint of the step that trained it (`produced_by`), else a digest of
    the directory's files (a hub id or a missing path: the path alone)."""
    if produced_by:
        return {"path": str(path), "step": produced_by}
    if storage.is_uri(path):  # a model on object storage (data/storage.py): its files' names and sizes
        names = [n for n in storage.list_names(path) if not n.startswith(".") and n not in _RUN_FILES]
        if not names:
            return {"path": str(path)}
        listing = "".join(f"{n}\t{storage.size(storage.join(path, n))}\n" for n in names)
        return {"path": str(path), "content": "sizes:" + hashlib.sha256(listing.encode()).hexdigest()}
    root = Path(str(path))
    if not root.is_dir():
        return {"path": str(path)}
    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.name not in _RUN_FILES):
        h.update(f"{f.name}\t{_file_digest(f)}\n".encode())
    return {"path": str(path), "content": h.hexdigest()}


def files_identity(files: list[str], root: Path | str | None = None) -> list[dict]:
    """Each file (relative to `root` when under it) with its sha256."""
    out = []
    for f in files:
        if storage.is_uri(f) or (root is not None and storage.is_uri(root)):
            base = storage.absolute(root).rstrip("/") + "/" if root is not None else ""
            name = str(f)[len(base):] if base and str(f).startswith(base) else str(f)
            out.append({"file": name, "sha256": sha256_file(f)})
            continue
        p = Path(f)
        try:
            name = str(p.resolve().relative_to(Path(root).resolve())) if root else str(p)
        except ValueError:
            name = str(p)
        out.append({"file": name, "sha256": sha256_file(p)})
    return out


# ----------------------------------------------------------------------------------------------- settings
def train_settings(train_cfg, deepspeed: dict, init_model: dict, files: list[dict], objective: str) -> dict:
    """What decides a training step's model and summary (ignored keys: TRAIN_IGNORED, DEEPSPEED_IGNORED)."""
    return {"objective": objective, "train": _without(_plain(train_cfg), TRAIN_IGNORED),
            "deepspeed": _without(deepspeed, DEEPSPEED_IGNORED), "init_model": init_model, "data": files}


def engine_settings(engine) -> dict:
    return _without(_plain(engine), ENGINE_IGNORED)


def eval_settings(eval_cfg: dict, engine, models: dict[str, dict], seed: int) -> dict:
    """What decides an evaluation's answers and verdicts (ignored keys: EVAL_IGNORED, ENGINE_IGNORED)."""
    return {"eval": _without(eval_cfg, EVAL_IGNORED), "engine": engine_settings(engine), "models": models,
            "seed": seed}


# ----------------------------------------------------------------------------------------------- records
def _show(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (absent keys show as <unset>)."""
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    unset = object()
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, unset), b.get(k, unset)
        if va != vb:
            out.append(f"{k}: {'<unset>' if va is unset else _show(va)} -> {'<unset>' if vb is unset else _show(vb)}")
    return out


def check_record(record: Path | str, what: str, settings: dict) -> dict | None:
    """The finished step's result in `record` when it ran with `settings`; None when there is no record;
    StepSettingsError when it ran with other settings (or its record predates settings being kept)."""
    if not storage.exists(record):
        return None
    done = storage.read_json(record)
    new = _plain(redact(settings))
    old = done.get("settings")
    if old is None:
        raise StepSettingsError(
            f"{what}: {record} was written without the settings it ran with (an older version), so it cannot be "
            f"reused safely; delete {record} to redo the step, or choose another output_dir")
    if old != new:
        diff = differences(old, new)
        raise StepSettingsError(
            f"{what}: {record} was made with different settings ({'; '.join(diff)}); re-run with the same "
            f"settings, choose another output_dir, or delete {record} (and the later iterations) to redo it")
    return done


def run_step(record: Path | str, what: str, settings: dict, work: Callable[[], dict],
             after: Callable[[dict], None] | None = None) -> dict:
    """Run `work()` unless `record` holds its result under the same `settings` (a resumed run); store the result
    with its settings and fingerprint. `after(result)` runs once the record is written (also on a reuse): what
    must wait for the record, e.g. deleting the checkpoints that would otherwise be the only way back."""
    done = check_record(record, what, settings)
    if done is not None:
        log.info("%s already done with the same settings (%s)", what, record)
    else:
        import time

        started = time.time()
        done = work()
        done.setdefault("wall_s", round(time.time() - started, 1))
        done["settings"] = _plain(redact(settings))
        done["fingerprint"] = fingerprint(done["settings"])
        storage.write_json(record, done)
    if after is not None:
        after(done)
    return done
