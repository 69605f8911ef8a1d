"""Experiment tracking: `tracker=none|mlflow|wandb` (conf/tracker/), one tracker run per selfalign-ray run.

    with tracking_run(cfg) as tracking:    # starts the tracker (a failure: TrackerError, a user error)
        ...                                # the loop calls active().iteration(...), train_model streams steps
        tracking.finish(output_dir)        # report and summary as artifacts
                                           # leaving: end(success | failed | killed)

`none` (the default) imports neither mlflow nor wandb. What is logged and what a failure mid-run does:
runlog.py. Sweep jobs (Hydra -m) log into one experiment (MLflow) / group (W&B) named after the sweep dir.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from selfalign_ray.config import ConfigError, to_dict, typed
from selfalign_ray.tracking.base import FAILED, KILLED, SUCCESS, NullTracker, Tracker, TrackerError
from selfalign_ray.tracking.runlog import RunLog, flatten

__all__ = ["RunLog", "Tracker", "TrackerError", "active", "build_tracker", "tracking_run"]

log = logging.getLogger(__name__)

_NULL = RunLog()
_active: RunLog = _NULL


def active() -> RunLog:
    """The RunLog of the run in progress (one that logs nothing outside tracking_run or with tracker=none)."""
    return _active


def build_tracker(node) -> Tracker:
    """The tracker a conf/tracker/*.yaml node selects (its `kind`)."""
    data = to_dict(node)
    kind = data.get("kind", "none")
    if kind == "none":
        return NullTracker()
    if kind == "mlflow":
        from selfalign_ray.tracking.mlflow import MlflowConfig, MlflowTracker

        return MlflowTracker(typed(MlflowConfig, data, "tracker"))
    if kind == "wandb":
        from selfalign_ray.tracking.wandb import WandbConfig, WandbTracker

        return WandbTracker(typed(WandbConfig, data, "tracker"))
    raise ConfigError(f"tracker.kind={kind!r}: use none, mlflow or wandb")


def _hydra_job() -> dict:
    """The sweep dir, job number and overrides of a Hydra multirun job ({} outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        from selfalign_ray.redaction import redact_overrides

        job = {"overrides": redact_overrides(list(hc.overrides.task))}
        if hc.mode == RunMode.MULTIRUN:
            job.update(sweep_dir=str(hc.sweep.dir), num=int(hc.job.num))
        return job
    except Exception:  # noqa: BLE001 - no Hydra context (tests, notebooks): a plain run
        return {}


def run_params(cfg, job: dict) -> dict[str, str]:
    """The composed config, flattened, secrets redacted; and the command-line overrides."""
    from selfalign_ray.redaction import redact

    params = flatten(redact(to_dict(cfg)))
    if job.get("overrides"):
        params["overrides"] = " ".join(job["overrides"])
    return params


@contextmanager
def tracking_run(cfg):
    """Start the configured tracker around a run; yield its RunLog (also `active()` meanwhile)."""
    global _active
    node = cfg.get("tracker") if hasattr(cfg, "get") else None
    tracker = build_tracker(node) if node is not None else NullTracker()
    if isinstance(tracker, NullTracker):
        yield _NULL
        return
    job = _hydra_job()
    name = Path(str(cfg.output_dir)).name
    experiment = None
    if "sweep_dir" in job:
        experiment = job["sweep_dir"]
        name = f"{job['num']}: {' '.join(job['overrides'])}"[:250] if job["overrides"] else f"job {job['num']}"
    try:
        tracker.start(name, experiment, run_params(cfg, job))
    except TrackerError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the client raised, it is the user's tracker setting
        raise TrackerError(f"tracker={tracker.kind} could not start: {type(err).__name__}: {err}") from err
    log.info("tracking: %s", tracker.where())
    runlog = RunLog(tracker)
    _active, status = runlog, FAILED
    try:
        yield runlog
        status = SUCCESS
    except KeyboardInterrupt:
        status = KILLED
        raise
    finally:
        _active = _NULL
        # Attempted after a failure mid-run too: a W&B run would otherwise be left unfinished.
        try:
            tracker.end(status)
            log.info("tracking: %s ended (%s)", tracker.where(), status)
        except Exception as err:  # noqa: BLE001 - the run's own outcome (and its error) come first
            log.warning("tracker=%s could not close the run (%s: %s)", tracker.kind, type(err).__name__, err)
