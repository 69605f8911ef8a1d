"""Hydra multirun: every job in its own output dir, failed jobs recorded (not fatal), a summary of the sweep.

    selfalign-ray -m dataset_size=16,32 iterations=1,2 eval.enabled=true

- `run_job` (cli.py calls it for each job under -m): the job's output_dir is the Hydra job dir
  (hydra.sweep.dir/<job num>) unless output_dir is on the command line; an exception is caught, its traceback
  written to <job dir>/error.txt, and the job marked failed, so the basic launcher goes on with the next job
  (Hydra's basic sweeper would otherwise re-raise the first failure and skip on_multirun_end).
- `SweepSummary` (hydra.callbacks in conf/config.yaml): on_job_end writes <job dir>/sweep_row.json from the
  job's files; on_multirun_end writes sweep_summary.{csv,md,png} in the sweep dir, prints the table, and
  records the failed jobs so that `selfalign-ray` exits with status 1 after the sweep.
To resume a killed sweep, run it again with hydra.sweep.dir=<its dir>: job dirs are numbered by the override
list, so each job finds its outputs again.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from selfalign_ray.data import storage

from selfalign_ray.redaction import redact_overrides, redact_text, secret_values

log = logging.getLogger(__name__)

JOB_RECORD = "sweep_job.json"
ROW_FILE = "sweep_row.json"
COLUMNS = ["job", "status", "mode", "dataset_size", "iterations", "pairs_kept", "train_margin", "train_accuracy",
           "eval_score", "eval_ci_low", "eval_ci_high", "eval_kind", "wall_s", "overrides", "output_dir", "error"]

# Failed jobs of the last multirun in this process (read by cli.main for the exit status).
FAILED_JOBS: list[int] = []


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _write_json(path: Path, obj: Any) -> None:
    from selfalign_ray.data.shards import atomic_write_json

    atomic_write_json(path, obj)


def _claim(job_dir: Path, record: dict) -> None:
    """Refuse an output dir another job of this sweep uses: the jobs would resume each other's outputs."""
    for other in job_dir.parent.glob(f"*/{JOB_RECORD}"):
        theirs = json.loads(other.read_text())
        if theirs.get("job") != record["job"] and theirs.get("output_dir") == record["output_dir"]:
            raise ValueError(f"output_dir={record['output_dir']} is also the output dir of job {theirs['job']} of "
                             "this sweep; leave output_dir unset under -m (each job then writes to its job dir) or "
                             "put the swept keys in it, e.g. output_dir='/data/run-n${dataset_size}-k${iterations}'")
    _write_json(job_dir / JOB_RECORD, record)


def run_job(cfg, task) -> dict:
    """Run `task(cfg)` as one job of a multirun; return its record (also <job dir>/sweep_job.json)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if not any(_key(o) == "output_dir" for o in overrides):
        cfg.output_dir = str(job_dir)
    # Secret overrides (`+engine.extra.hf_token=...`) never reach the job record, the summary or the log.
    secrets = secret_values(overrides)
    record = {"job": int(hc.job.num), "overrides": " ".join(redact_overrides(overrides)), "status": "running",
              "mode": cfg.mode.name, "dataset_size": cfg.dataset_size, "iterations": cfg.iterations,
              "output_dir": storage.absolute(cfg.output_dir)}
    started = time.time()
    try:
        _claim(job_dir, record)
        task(cfg)
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - any failure of one job must leave the others running
        log.error("job %d (%s) failed: %s: %s", record["job"], record["overrides"], type(err).__name__, err)
        (job_dir / "error.txt").write_text(redact_text(traceback.format_exc(), secrets))
        record.update(status="failed", error=redact_text(f"{type(err).__name__}: {err}", secrets))
    record["wall_s"] = round(time.time() - started, 1)
    _write_json(job_dir / JOB_RECORD, record)
    return record


# ---------------------------------------------------------------------------------------------- rows
def _manifests(out: str) -> list[dict]:
    # `out` may be a URI (s3://...; data/storage.py).
    found = []
    for d in storage.list_dirs(out, "iter_*"):
        m = re.fullmatch(r"iter_(\d+)", d)
        if m and storage.exists(storage.join(out, d, "manifest.json")):
            found.append((int(m.group(1)), storage.read_json(storage.join(out, d, "manifest.json"))))
    return [m for _, m in sorted(found, key=lambda kv: kv[0])]


def job_row(record: dict) -> dict:
    """One summary row: the job record plus what its output dir holds (partial outputs of a failed job too)."""
    row = {c: record.get(c) for c in COLUMNS}
    out = record.get("output_dir") or "."
    manifests = _manifests(out)
    if manifests:
        row["pairs_kept"] = sum(m.get("pairs_kept", 0) for m in manifests)
        trained = [m["train"]["summary"] for m in manifests if (m.get("train") or {}).get("summary")]
        after = (trained[-1].get("after") or {}) if trained else {}
        row["train_margin"] = after.get("mean_margin")
        row["train_accuracy"] = after.get("preference_accuracy")
        # The last iteration's score: against the base model if it was evaluated, else SynPO's held-out one.
        for key, kind in (("eval_vs_base", "win rate vs base"), ("eval", "held-out win rate vs gold")):
            scored = [m[key] for m in manifests if isinstance(m.get(key), dict) and m[key].get("win_rate") is not None]
            if scored:
                row.update(eval_score=scored[-1]["win_rate"], eval_ci_low=scored[-1].get("ci_low"),
                           eval_ci_high=scored[-1].get("ci_high"), eval_kind=kind)
                break
    if storage.exists(storage.join(out, "report.md")):
        row["report"] = storage.join(out, "report.md")
    return row


def _fmt(x, column: str = "") -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.1f}" if column == "wall_s" else f"{x:.4f}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _overrides(row: dict) -> list[str]:
    # Hydra escapes interpolations in the recorded overrides (n$\{dataset_size\}); show them as typed.
    return [o.replace("\\{", "{").replace("\\}", "}") for o in (row.get("overrides") or "").split()]


def write_summary(sweep_dir: Path, rows: list[dict]) -> dict[str, Path]:
    """sweep_summary.csv / .md / .png in `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    paths = {"csv": sweep_dir / "sweep_summary.csv", "md": sweep_dir / "sweep_summary.md",
             "png": sweep_dir / "sweep_summary.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "overrides": " ".join(_overrides(r))} for r in rows)
    # The table shows only the overrides that differ between jobs; the shared ones are listed once above it.
    shared = set.intersection(*(set(_overrides(r)) for r in rows)) if rows else set()
    shown = [c for c in COLUMNS if c not in ("output_dir", "error", "eval_kind")]
    failed = [r for r in rows if r.get("status") != "ok"]
    kinds = sorted({r["eval_kind"] for r in rows if r.get("eval_kind")})
    md = [f"# Sweep summary: {len(rows)} jobs, {len(rows) - len(failed)} ok, {len(failed)} failed", "",
          f"- sweep dir: `{sweep_dir}`",
          f"- overrides of every job: `{' '.join(o for o in _overrides(rows[0]) if o in shared) if rows else ''}`",
          "- pairs_kept: over all iterations; train_margin / train_accuracy: the last iteration's model on its own "
          "training pairs after training",
          f"- eval_score: {', '.join(kinds) if kinds else 'none (eval.enabled=false)'}, last iteration, with its "
          "confidence interval", "",
          "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        own = " ".join(o for o in _overrides(r) if o not in shared)
        md.append("| " + " | ".join(_fmt(own if c == "overrides" else r.get(c), c) for c in shown) + " |")
    md += [""]
    if failed:
        md += ["## Failed jobs", ""] + [f"- job {r['job']}: {_fmt(r.get('error'))}" for r in failed] + [""]
    md += ["## Jobs", ""] + [f"- job {r['job']}: `{r.get('output_dir')}`" +
                             (f" ([report]({r['report']}))" if r.get("report") else "") for r in rows] + [""]
    plot_summary(rows, paths["png"])
    md += [f"![eval score vs dataset size]({paths['png'].name})", ""]
    paths["md"].write_text("\n".join(md), encoding="utf-8")
    return paths


def plot_summary(rows: list[dict], path: Path) -> Path:
    """Eval score, training accuracy and pairs kept against dataset size, one line per iteration count."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), dpi=100)
    axes = fig.subplots(1, 3)
    sizes = sorted({r["dataset_size"] for r in rows if isinstance(r.get("dataset_size"), int)})
    panels = ((axes[0], "eval_score", "eval score (last iteration)", (-0.05, 1.05)),
              (axes[1], "train_accuracy", "training preference accuracy (last iteration)", (-0.05, 1.05)),
              (axes[2], "pairs_kept", "pairs kept (all iterations)", None))
    for ax, key, title, ylim in panels:
        ok = [r for r in rows if r.get(key) is not None and r.get("dataset_size") is not None]
        groups = sorted({r.get("iterations") for r in ok}, key=str)
        span = (sizes[-1] - sizes[0]) if len(sizes) > 1 else 1
        for i, k in enumerate(groups):
            pts = sorted(((r["dataset_size"], r[key], r) for r in ok if r.get("iterations") == k), key=lambda p: p[0])
            # Intervals of equal scores would hide each other: shift each iteration count a little sideways.
            dodge = (i - (len(groups) - 1) / 2) * 0.03 * span if key == "eval_score" else 0
            xs, ys = [p[0] + dodge for p in pts], [p[1] for p in pts]
            if key == "eval_score" and all(p[2].get("eval_ci_low") is not None for p in pts):
                err = [[y - p[2]["eval_ci_low"] for y, p in zip(ys, pts)],
                       [p[2]["eval_ci_high"] - y for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=f"iterations={k}")
            else:
                ax.plot(xs, ys, marker="o", label=f"iterations={k}")
        for r in rows:  # failed jobs: a red dotted line at their dataset size
            if r.get("status") != "ok" and r.get("dataset_size") is not None:
                ax.axvline(r["dataset_size"], color="red", ls=":", lw=1)
                ax.text(r["dataset_size"], 0.02, f" job {r['job']} failed (iterations={r.get('iterations')})",
                        color="red", fontsize=7, rotation=90, va="bottom", transform=ax.get_xaxis_transform())
        if ok:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {key}" + (" (eval.enabled=false)" if key == "eval_score" else
                                            " (train.enabled=false)" if key == "train_accuracy" else ""),
                    ha="center", va="center", transform=ax.transAxes, color="grey")
        if key == "eval_score":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="dataset_size", ylabel=key, title=title)
        if ylim:
            ax.set_ylim(*ylim)
        if sizes:
            pad = max(1, (sizes[-1] - sizes[0]) * 0.1)
            ax.set_xticks(sizes)
            ax.set_xlim(sizes[0] - pad, sizes[-1] + pad)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------ callback
class SweepSummary(Callback):
    """hydra.callbacks.sweep_summary in conf/config.yaml. Does nothing outside multirun."""

    def on_multirun_start(self, config, **kwargs) -> None:
        FAILED_JOBS.clear()

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            record = job_return.return_value
        else:  # the job raised past run_job (e.g. a task function without it): record it all the same
            error = getattr(job_return, "_return_value", None)
            cfg = job_return.cfg or {}
            overrides = list(job_return.overrides or [])
            record = {"job": int(config.hydra.job.num), "overrides": " ".join(redact_overrides(overrides)),
                      "status": "failed", "error": redact_text(f"{type(error).__name__}: {error}",
                                                               secret_values(overrides)),
                      "mode": cfg.get("mode", {}).get("name"), "dataset_size": cfg.get("dataset_size"),
                      "iterations": cfg.get("iterations"), "output_dir": str(cfg.get("output_dir", job_dir))}
        _write_json(job_dir / ROW_FILE, job_row(record))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{ROW_FILE}")]
        rows.sort(key=lambda r: r.get("job", 0))
        paths = write_summary(sweep_dir, rows)
        FAILED_JOBS[:] = [r["job"] for r in rows if r.get("status") != "ok"]
        print("\n" + paths["md"].read_text().split("\n## ")[0])
        print(f"sweep summary: {paths['md']}, {paths['csv']}, {paths['png']}")
