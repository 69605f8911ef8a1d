"""Training progress for people and dashboards, from the rank-0 Ray Train worker.

- a tqdm bar (optimizer steps done / planned, steps/s, loss, accuracy, margin, tokens/s), one line per refresh so
  it reads well in `ray job logs -f` and in the driver's forwarded worker output;
- Ray metrics (Prometheus, exported with a `ray_` prefix and `_total` on counters), tagged stage="train", mode,
  iteration and run (the Ray Train run name, e.g. "sao-iter2" or "synpo-generator"):
      selfalign_train_steps, selfalign_train_tokens, selfalign_train_examples      counters
      selfalign_train_loss, selfalign_train_margin, selfalign_train_accuracy,
      selfalign_train_lr, selfalign_train_tokens_per_s                             gauges (last optimizer step)

Only rank 0 records: the step metrics it gets are already sums over all ranks, so other ranks would count twice.
Everything is best effort: a missing metrics backend or terminal never stops training.
"""

from __future__ import annotations

import logging
import re
import sys

log = logging.getLogger(__name__)

TAGS = ("stage", "mode", "iteration", "run")
# step-metric key -> gauge name suffix (keys absent for an objective, e.g. margin for SFT, are skipped)
GAUGES = {"loss": "loss", "margin": "margin", "preference_accuracy": "accuracy", "lr": "lr",
          "tokens_per_s": "tokens_per_s"}


def run_tags(run_name: str) -> dict[str, str]:
    """"sao-iter2" -> mode sao, iteration 2; "synpo-generator" -> mode synpo, iteration 0 (before iteration 1)."""
    found = re.search(r"iter(\d+)", run_name)
    return {"stage": "train", "mode": run_name.split("-")[0], "iteration": found.group(1) if found else "0",
            "run": run_name}


class _Lines:
    """tqdm redraws with '\\r'; Ray forwards worker output line by line, so each redraw becomes its own line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class TrainRecorder:
    def __init__(self, rank: int, run_name: str, total_steps: int, done_steps: int = 0,
                 refresh_s: float = 10.0):
        self.active = rank == 0
        self.tags = run_tags(run_name)
        self.bar = self.counters = self.gauges = None
        if not self.active:
            return
        try:
            from tqdm import tqdm

            # A restored run starts at the restored step, so counts and the ETA stay right.
            self.bar = tqdm(total=total_steps, initial=done_steps, desc=f"train {run_name}", unit="step",
                            file=_Lines(sys.stderr), mininterval=refresh_s, dynamic_ncols=False, ncols=140)
        except Exception:  # noqa: BLE001
            log.debug("no training progress bar", exc_info=True)
        try:
            from ray.util.metrics import Counter, Gauge

            self.counters = {
                "steps": Counter("selfalign_train_steps", "Optimizer steps done.", tag_keys=TAGS),
                "tokens": Counter("selfalign_train_tokens", "Tokens through the model in training steps "
                                  "(all ranks, no padding).", tag_keys=TAGS),
                "examples": Counter("selfalign_train_examples", "Training examples (pairs for SimPO) consumed "
                                    "(all ranks).", tag_keys=TAGS),
            }
            self.gauges = {key: Gauge(f"selfalign_train_{name}", f"Training {name} at the last optimizer step.",
                                      tag_keys=TAGS) for key, name in GAUGES.items()}
        except Exception:  # noqa: BLE001
            log.debug("no Ray training metrics", exc_info=True)

    @classmethod
    def for_worker(cls, ctx, total_steps: int, done_steps: int) -> "TrainRecorder":
        """From a Ray Train context (the run name carries mode and iteration)."""
        try:
            name = ctx.get_experiment_name()
        except Exception:  # noqa: BLE001
            name = "train"
        return cls(ctx.get_world_rank(), name, total_steps, done_steps)

    def step(self, metrics: dict) -> None:
        """One optimizer step's metrics, as written to train_history.jsonl (all-rank sums and means)."""
        if not self.active:
            return
        try:
            if self.counters:
                self.counters["steps"].inc(1, tags=self.tags)
                for key in ("tokens", "examples"):
                    if metrics.get(key):
                        self.counters[key].inc(float(metrics[key]), tags=self.tags)
            if self.gauges:
                for key, gauge in self.gauges.items():
                    if key in metrics:
                        gauge.set(float(metrics[key]), tags=self.tags)
            if self.bar is not None:
                post = {"loss": f"{metrics['loss']:.4f}"}
                if "preference_accuracy" in metrics:
                    post.update(acc=f"{metrics['preference_accuracy']:.2f}", margin=f"{metrics['margin']:.3f}")
                post["tok/s"] = f"{metrics.get('tokens_per_s', 0):.0f}"
                self.bar.set_postfix(post, refresh=False)
                self.bar.update(1)
        except Exception:  # noqa: BLE001
            log.debug("training metrics not recorded", exc_info=True)

    def close(self) -> None:
        if self.bar is not None:
            try:
                self.bar.close()
            except Exception:  # noqa: BLE001
                pass
            self.bar = None
