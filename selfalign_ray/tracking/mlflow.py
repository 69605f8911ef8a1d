"""tracker=mlflow (conf/tracker/mlflow.yaml): one MLflow run per selfalign-ray run, through MlflowClient.

Settings come from MLflow's own environment variables (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, and for a
server MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, MLFLOW_HTTP_REQUEST_TIMEOUT,
MLFLOW_HTTP_REQUEST_MAX_RETRIES); the Hydra keys override them (null = the environment). Credentials are
never config values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from selfalign_ray.tracking.base import FAILED, KILLED, SUCCESS, Tracker, TrackerError

DEFAULT_EXPERIMENT = "selfalign-ray"
# MLflow's limits on one log_batch request and on a parameter value.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000
_STATUS = {SUCCESS: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}


@dataclass
class MlflowConfig:
    kind: str = "mlflow"
    tracking_uri: str | None = None   # null = MLFLOW_TRACKING_URI (MLflow's default when unset)
    experiment: str | None = None     # null = MLFLOW_EXPERIMENT_NAME, else the sweep dir, else DEFAULT_EXPERIMENT
    run_name: str | None = None       # null = the output dir's name (a sweep job: its number and overrides)
    tags: dict = field(default_factory=dict)


class MlflowTracker(Tracker):
    kind = "mlflow"

    def __init__(self, cfg: MlflowConfig):
        try:
            from mlflow import MlflowClient
        except ImportError as err:
            raise TrackerError("tracker=mlflow needs MLflow: pip install 'selfalign-ray[tracking]' "
                               f"(or mlflow / mlflow-skinny) ({err})") from err
        self.cfg = cfg
        self._client_cls = MlflowClient
        self.client = None
        self.run_id: str | None = None
        self.uri = None

    def start(self, run_name: str, experiment: str | None, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment or DEFAULT_EXPERIMENT
        try:
            self.client = self._client_cls(tracking_uri=self.cfg.tracking_uri)  # None: MLFLOW_TRACKING_URI
            self.uri = self.client.tracking_uri
            found = self.client.get_experiment_by_name(name)
            if found is None:
                try:
                    experiment_id = self.client.create_experiment(name)
                except MlflowException:  # another job of the sweep created it meanwhile
                    found = self.client.get_experiment_by_name(name)
                    if found is None:
                        raise
                    experiment_id = found.experiment_id
            else:
                experiment_id = found.experiment_id
            tags = {str(k): str(v) for k, v in (self.cfg.tags or {}).items()}
            run = self.client.create_run(experiment_id, run_name=self.cfg.run_name or run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(k, v if len(v) <= _MAX_PARAM_VALUE else v[:_MAX_PARAM_VALUE - 3] + "...")
                     for k, v in params.items()]
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])
        except MlflowException as err:
            raise TrackerError(f"tracker=mlflow could not start a run in experiment {name!r} at "
                               f"{self.uri or self.cfg.tracking_uri or 'MLFLOW_TRACKING_URI'}: "
                               f"{err.message if hasattr(err, 'message') else err}") from err
        self.experiment = name

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "step") -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow: at most 1000 metrics per request
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, _STATUS.get(status, "FAILED"))

    def where(self) -> str:
        return f"mlflow run {self.run_id} in experiment {self.experiment!r} at {self.uri}"
