"""tracker=wandb (conf/tracker/wandb.yaml): one Weights & Biases run per selfalign-ray run.

Settings come from W&B's own environment variables (WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY,
WANDB_DIR, WANDB_RUN_GROUP, WANDB_BASE_URL, ...); the Hydra keys override them (null = the environment).
`WANDB_MODE=offline` writes the run under WANDB_DIR only (`wandb sync` uploads it later).

Every metric gets its own x-axis through define_metric (the iteration, or one training run's optimizer step),
so W&B's single monotonic step never drops a point when a second training run starts at step 1.
Artifacts are copied into the run's files folder (uploaded with the run; a later move of the output dir does
not break an offline run's sync).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from selfalign_ray.tracking.base import FAILED, KILLED, SUCCESS, Tracker, TrackerError

DEFAULT_PROJECT = "selfalign-ray"
_EXIT_CODE = {SUCCESS: 0, FAILED: 1, KILLED: 255}


@dataclass
class WandbConfig:
    kind: str = "wandb"
    project: str | None = None    # null = WANDB_PROJECT, else DEFAULT_PROJECT
    entity: str | None = None     # null = WANDB_ENTITY (else the API key's default entity)
    mode: str | None = None       # online | offline | disabled; null = WANDB_MODE (default online)
    dir: str | None = None        # null = WANDB_DIR (default: the working directory)
    group: str | None = None      # null = WANDB_RUN_GROUP, else the sweep dir (sweep jobs group together)
    run_name: str | None = None   # null = the output dir's name (a sweep job: its number and overrides)
    tags: list = field(default_factory=list)


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, cfg: WandbConfig):
        try:
            import wandb
        except ImportError as err:
            raise TrackerError(f"tracker=wandb needs wandb: pip install 'selfalign-ray[tracking]' ({err})") from err
        self.cfg = cfg
        self.wandb = wandb
        self.run = None
        self._defined: set[str] = set()

    def start(self, run_name: str, experiment: str | None, params: dict[str, str]) -> None:
        cfg = self.cfg
        if cfg.dir:
            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        try:
            self.run = self.wandb.init(
                project=cfg.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=cfg.entity, mode=cfg.mode, dir=cfg.dir,
                group=cfg.group or os.environ.get("WANDB_RUN_GROUP") or experiment,
                name=cfg.run_name or run_name, tags=[str(t) for t in cfg.tags or []] or None, config=params,
                # Our own log lines stay where they are (Hydra's log file, the terminal); W&B does not wrap them.
                settings=self.wandb.Settings(console="off"),
            )
        except Exception as err:  # noqa: BLE001 - wandb raises UsageError, CommError, ValueError, ...
            raise TrackerError(f"tracker=wandb could not start a run: {type(err).__name__}: {err} (online mode "
                               "needs WANDB_API_KEY or `wandb login`; WANDB_MODE=offline writes locally)") from err

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "step") -> None:
        if axis not in self._defined:
            self.run.define_metric(axis)
            self._defined.add(axis)
        for key in metrics:
            if key not in self._defined:
                self.run.define_metric(key, step_metric=axis)
                self._defined.add(key)
        self.run.log({**metrics, axis: step})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        # As MLflow's: a file lands in artifact_path/, a directory's contents in artifact_path/.
        path, folder = Path(path), Path(self.run.dir) / (artifact_path or "")
        folder.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, folder, dirs_exist_ok=True)
            files = [p for p in folder.rglob("*") if p.is_file() and p.is_relative_to(folder)]
        else:
            shutil.copyfile(path, folder / path.name)
            files = [folder / path.name]
        for f in files:
            self.run.save(str(f), base_path=self.run.dir, policy="end")

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=_EXIT_CODE.get(status, 1))

    def where(self) -> str:
        run = self.run
        return f"wandb run {run.id} ({run.project}, {run.settings.mode}) in {run.dir}" if run else "wandb"
