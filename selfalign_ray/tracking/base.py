"""The experiment-tracker interface (conf/tracker/: none | mlflow | wandb) and the tracker that logs nothing.

A tracker receives what the run already writes to disk: the composed config as flat parameters, metrics at a
step on a named axis (the iteration, or a training run's optimizer step), files as artifacts, and the run's
end status. It never decides anything the outputs depend on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from selfalign_ray.config import ConfigError

# end(status): how the run ended.
SUCCESS, FAILED, KILLED = "success", "failed", "killed"


class TrackerError(ConfigError):
    """A tracker that cannot start (package missing, store unreachable, not logged in, bad setting): a user error,
    raised before the run writes anything."""


class Tracker(ABC):
    kind = "none"

    @abstractmethod
    def start(self, run_name: str, experiment: str | None, params: dict[str, str]) -> None:
        """Open the run. `experiment`: the group the run belongs to when neither the tracker's Hydra key nor its
        environment variable names one (a sweep: the sweep dir); None = the tracker's default."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "step") -> None:
        """Numbers at `step` of the x-axis `axis` (e.g. "iteration", "train/sao-iter1/step")."""

    @abstractmethod
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, stored under `artifact_path` (a folder inside the run's artifacts; None = the top)."""

    @abstractmethod
    def end(self, status: str) -> None:
        """Close the run: SUCCESS, FAILED or KILLED."""

    def where(self) -> str:
        """Where the run is recorded, for the log."""
        return self.kind


class NullTracker(Tracker):
    """tracker=none: nothing is logged and no tracking package is imported."""

    def start(self, run_name, experiment, params) -> None:
        pass

    def log_metrics(self, metrics, step, axis="step") -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def end(self, status) -> None:
        pass
