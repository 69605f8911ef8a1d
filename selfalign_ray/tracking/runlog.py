"""What a run logs to its tracker, read from the records it writes anyway, and what a tracker failure does.

    parameters   the composed config, flattened (`train.learning_rate`), secrets redacted (redaction.py)
    per iteration k (axis "iteration")
                 generation/...    pairs kept, inputs, yield, drops/<reason>, judge position agreement,
                                   cut rate per stage, wall time, pairs/min, tokens/s (all and per stage)
                 train/...         the iteration's training summary (steps, accuracy and margin before/after)
                 eval_vs_base/...  win rate vs the base model with its interval (eval.enabled)
                 eval_heldout/...  SynPO's held-out win rate vs gold (iteration 0: θ0's baseline)
    per optimizer step (axis "train/<run>/step", <run> = sao-iter1, synpo-generator, synpo-improver-iter1, ...)
                 train/<run>/loss, margin, preference_accuracy, lr, grad_norm, tokens_per_s, ...
    artifacts    iter_k/manifest.json per iteration; report.md, report/, summary.json at the end

Training steps arrive live from the rank-0 worker (train/step_stream.py) and are completed from
train_history.jsonl, each step once; everything else is read from the iteration's manifest. So a resumed run
(nothing regenerated) logs the whole run again into its new tracker run.

A tracker failure after the start never stops the run or loses its data: it is logged as a warning once and
tracking is off for the rest of the run (a tracker that is down would otherwise stall every step on its
retries); the files on disk are complete, and re-running the same command logs them again.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Callable

from selfalign_ray.data import storage

from selfalign_ray.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)

ITERATION_AXIS = "iteration"
HISTORY_FILE = "train_history.jsonl"  # = train/worker.py HISTORY_FILE (tracking does not import train/)
# Metric names: MLflow allows letters, digits, _ - . space / (a drop reason such as unparsable_judge:no_ranking
# becomes unparsable_judge_no_ranking).
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(*parts) -> str:
    return "/".join(_UNSAFE.sub("_", str(p)) for p in parts if p != "")


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-6}} -> {"train.lr": "1e-06"}; lists and None as JSON."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return out


def _numbers(d: dict, prefix: str, skip: tuple = ()) -> dict[str, float]:
    out = {}
    for k, v in (d or {}).items():
        if k in skip or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[metric_name(prefix, k)] = float(v)
    return out


def generation_metrics(manifest: dict) -> dict[str, float]:
    m = {metric_name("generation", k): float(manifest[k]) for k in
         ("inputs", "prompts_kept", "pairs_kept", "yield", "judge_position_agreement", "judged_pairs",
          "prompt_repetition_rate", "pairs_added", "cumulative_pairs")
         if isinstance(manifest.get(k), (int, float)) and not isinstance(manifest.get(k), bool)}
    m.update({metric_name("generation", "drops", reason): float(n) for reason, n in (manifest.get("drops") or {}).items()})
    for stage, c in (manifest.get("cut") or {}).items():
        if c.get("rate") is not None:
            m[metric_name("generation", "cut_rate", stage)] = float(c["rate"])
    gen = manifest.get("generation") or {}
    m.update(_numbers(gen, "generation", skip=("rows_generated", "pairs")))
    m.update(_numbers(gen.get("tokens_per_s_by_stage") or {}, "generation/tokens_per_s"))
    return m


def train_summary_metrics(summary: dict) -> dict[str, float]:
    m = _numbers(summary, "train", skip=("world_size", "global_batch_size"))
    for when in ("before", "after", "eval_before", "eval_after"):
        m.update(_numbers(summary.get(when) or {}, f"train/{when}"))
    return m


def eval_metrics(result: dict, name: str) -> dict[str, float]:
    """Win rate, its interval (ci_low, ci_high) and counts."""
    return _numbers(result, name, skip=("level", "bootstrap_samples"))


def read_history(model_dir: Path | str) -> list[dict]:
    path = storage.join(model_dir, HISTORY_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _local(path: str | Path) -> Path | None:
    """`path` as a local file or folder for a tracker's artifact upload: itself, or (output_dir on object storage,
    data/storage.py) a copy in the local staging area; None when it does not exist."""
    if not storage.is_uri(path):
        return Path(path) if Path(path).exists() else None
    if storage.list_names(path):  # a folder (report/)
        return Path(storage.local_copy(path))
    if storage.exists(path):
        local = storage.staging_dir(str(path), kind="artifacts") / storage.name(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(path))
        return local
    return None


class RunLog:
    """The active run's tracker, with the failure policy of the module docstring."""

    def __init__(self, tracker: Tracker | None = None):
        self.tracker = tracker or NullTracker()
        self.enabled = not isinstance(self.tracker, NullTracker)
        self._steps: dict[str, set[int]] = {}

    def _safe(self, what: str, call: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - a tracker must never cost the run its data
            self.enabled = False
            log.warning("tracker=%s failed while logging %s (%s: %s); tracking is off for the rest of this run. "
                        "Every output is on disk; re-running the same command resumes without regenerating "
                        "anything and logs the whole run again.", self.tracker.kind, what, type(err).__name__, err)

    # ------------------------------------------------------------------------------- training steps
    def train_step(self, run: str, metrics: dict) -> None:
        """One optimizer step of training run `run` (a train_history.jsonl record); each step is logged once."""
        step = int(metrics.get("step", 0))
        done = self._steps.setdefault(run, set())
        if not self.enabled or step in done:
            return
        done.add(step)
        values = _numbers(metrics, metric_name("train", run), skip=("step",))
        self._safe(f"training step {step} of {run}",
                   lambda: self.tracker.log_metrics(values, step, metric_name("train", run, "step")))

    def step_callback(self, run: str) -> Callable[[dict], None] | None:
        """For train_model(on_step=...): None when nothing is tracked (no stream is set up)."""
        return (lambda metrics: self.train_step(run, metrics)) if self.enabled else None

    def training(self, run: str, model_dir: Path) -> None:
        """Steps of `run` not logged yet, from its train_history.jsonl (a training done by an earlier attempt)."""
        if self.enabled:
            for record in read_history(model_dir):
                self.train_step(run, record)

    # ------------------------------------------------------------------------------- per iteration
    def iteration(self, k: int, iter_dir: Path, trainings: dict[str, Path] | None = None) -> None:
        """Iteration k's generation, training summary and evaluation from its final manifest, and the manifest."""
        if not self.enabled:
            return
        for run, model_dir in (trainings or {}).items():
            self.training(run, model_dir)
        path = _local(storage.join(iter_dir, "manifest.json"))
        if path is None:
            return
        manifest = json.loads(path.read_text())
        metrics = generation_metrics(manifest)
        metrics.update(train_summary_metrics((manifest.get("train") or {}).get("summary") or {}))
        for key, name in (("eval_vs_base", "eval_vs_base"), ("eval", "eval_heldout")):
            if isinstance(manifest.get(key), dict):
                metrics.update(eval_metrics(manifest[key], name))
        self._safe(f"iteration {k}", lambda: self.tracker.log_metrics(metrics, k, ITERATION_AXIS))
        self._safe(f"{path}", lambda: self.tracker.log_artifact(path, storage.name(iter_dir)))

    def evaluation(self, k: int, result: dict | None, name: str) -> None:
        """An evaluation outside an iteration's manifest (SynPO's θ0 baseline: k = 0)."""
        if result:
            metrics = eval_metrics(result, name)
            self._safe(f"{name} of iteration {k}", lambda: self.tracker.log_metrics(metrics, k, ITERATION_AXIS))

    def standalone_evaluation(self, result: dict, out_dir: str | Path) -> None:
        """`selfalign-ray-eval`: its numbers (win rate, interval and counts when there is a model B; answer
        lengths), logged as step 0, and its output files (results.json, the AlpacaEval files) as artifacts."""
        self.evaluation(0, result, "eval")
        for path in [storage.join(out_dir, "results.json"), *result.get("files", {}).values()]:
            local = _local(path)
            if local is not None:
                self._safe(str(path), lambda p=local: self.tracker.log_artifact(p, None))

    # ------------------------------------------------------------------------------- end of run
    def finish(self, out: str | Path) -> None:
        """The report (report.md, report/*.png) and summary.json as artifacts."""
        for name in ("report.md", "report", "summary.json"):
            local = _local(storage.join(out, name))
            if local is not None:
                self._safe(storage.join(out, name), lambda p=local, n=name: self.tracker.log_artifact(
                    p, n if p.is_dir() else None))
