"""tracker=none|mlflow|wandb (selfalign_ray/tracking/).

Unit checks (no Ray): tracker=none imports no tracking package; parameters are the flattened composed config with
secrets redacted; a tracker that cannot start is a one-line user error before anything is written; a failure
mid-run warns and the run goes on; sweep jobs share one experiment named after the sweep dir.

One tiny_random SAO run (generation, 2 SimPO workers, evaluation against the base model) logs to a real MLflow
file store it creates, read back with MlflowClient: parameters, per-step training history equal to
train_history.jsonl (steps arriving live from the rank-0 worker), generation metrics, the win rate with its
interval, the manifest and report as artifacts. Re-running the same command with tracker=wandb (offline)
resumes without regenerating anything and logs the whole run again from its files; the offline run's
transaction log (.wandb) is read back record by record.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from selfalign_ray.cli import compose
from selfalign_ray.tracking import RunLog, tracking_run
from selfalign_ray.tracking.base import Tracker

REPO = Path(__file__).resolve().parents[1]


def _run_overrides(out: Path, persona_file: Path) -> list[str]:
    return ["model=tiny_random", "dataset_size=4", f"personas.path={persona_file}", f"output_dir={out}",
            "mode.instruct.max_tokens=16", "mode.respond.max_tokens=12", "train.global_batch_size=2",
            "train.eval_before_after=false", "eval.enabled=true", "eval.prompts.num_prompts=2",
            "eval.sampling.max_tokens=8", "+engine.extra.hf_token=hf_SECRET_VALUE"]


# ------------------------------------------------------------------------------------------ unit checks
def test_tracker_none_imports_no_tracking_package(tmp_path):
    code = (
        "import sys\n"
        "from selfalign_ray.cli import compose\n"
        "import selfalign_ray.loop, selfalign_ray.train.trainer, selfalign_ray.synpo.loop\n"
        "from selfalign_ray.tracking import tracking_run, active\n"
        f"cfg = compose(['output_dir={tmp_path}'])\n"
        "assert cfg.tracker.kind == 'none'\n"
        "with tracking_run(cfg) as t:\n"
        "    assert active().step_callback('sao-iter1') is None\n"
        f"    t.iteration(1, {str(tmp_path)!r}, {{'sao-iter1': {str(tmp_path)!r}}})\n"
        f"    t.finish({str(tmp_path)!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_parameters_are_the_flattened_config_with_secrets_redacted():
    from selfalign_ray.tracking import run_params

    cfg = compose(["tracker=mlflow", "+engine.extra.hf_token=hf_SECRET", "+cluster.aws_secret_access_key=abc"])
    params = run_params(cfg, {"overrides": ["+engine.extra.hf_token=<redacted>", "dataset_size=4"]})
    assert params["engine.extra.hf_token"] == "<redacted>"
    assert params["cluster.aws_secret_access_key"] == "<redacted>"
    assert params["mode.respond.max_tokens"] == "96"  # a count of tokens is not a secret
    assert params["train.learning_rate"] == json.dumps(cfg.train.learning_rate)
    assert params["tracker.kind"] == "mlflow" and params["overrides"].endswith("dataset_size=4")
    assert not any("SECRET" in v or v == "abc" for v in params.values())


def test_tracker_that_cannot_start_is_a_user_error_before_anything_is_written(tmp_path, monkeypatch):
    # MLflow 3.18 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true: a real start failure, no server needed.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfalign_ray", "model=tiny_random", f"output_dir={out}", "tracker=mlflow",
           f"tracker.tracking_uri=file://{tmp_path}/mlruns"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("selfalign-ray: error: tracker=mlflow could not start a run"), line
    assert "MLFLOW_ALLOW_FILE_STORE" in line  # MLflow's own remedy reaches the user
    assert not (out / "iter_1").exists()  # nothing was generated (Hydra's .hydra/ copies only)


def test_eval_tracker_that_cannot_start_is_a_user_error_before_anything_is_written(tmp_path):
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "selfalign_ray.eval.cli", "model_a=tiny_random", f"output_dir={out}",
           "tracker=mlflow", f"tracker.tracking_uri=file://{tmp_path}/mlruns"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("selfalign-ray-eval: error: tracker=mlflow could not start a run"), line
    assert not (out / "model_outputs.json").exists()


class _Failing(Tracker):
    kind = "failing"

    def __init__(self):
        self.calls = 0

    def start(self, run_name, experiment, params):
        pass

    def log_metrics(self, metrics, step, axis="step"):
        self.calls += 1
        raise ConnectionError("tracking server went away")

    def log_artifact(self, path, artifact_path=None):
        self.calls += 1
        raise ConnectionError("tracking server went away")

    def end(self, status):
        pass


def test_failure_mid_run_warns_once_and_the_run_goes_on(tmp_path, caplog):
    iter_dir = tmp_path / "iter_1"
    (iter_dir / "model").mkdir(parents=True)
    (iter_dir / "manifest.json").write_text(json.dumps({"pairs_kept": 3, "inputs": 4, "drops": {}}))
    (iter_dir / "model" / "train_history.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    tracker = _Failing()
    runlog = RunLog(tracker)
    with caplog.at_level(logging.WARNING):
        runlog.iteration(1, iter_dir, {"sao-iter1": iter_dir / "model"})
        runlog.train_step("sao-iter1", {"step": 3, "loss": 0.3})
        runlog.finish(tmp_path)
    assert tracker.calls == 1 and not runlog.enabled
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tracking is off for the rest of this run" in warnings[0]
    assert "ConnectionError" in warnings[0]


def test_sweep_jobs_share_one_experiment_named_after_the_sweep(tmp_path, monkeypatch):
    import selfalign_ray.tracking as tracking

    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"file://{tmp_path}/mlruns"
    sweep_dir = str(tmp_path / "sweeps" / "lr-scan")
    for num, size in ((0, 4), (1, 8)):
        monkeypatch.setattr(tracking, "_hydra_job", lambda n=num, s=size: {
            "sweep_dir": sweep_dir, "num": n, "overrides": [f"dataset_size={s}"]})
        cfg = compose(["tracker=mlflow", f"tracker.tracking_uri={uri}", f"dataset_size={size}",
                       f"output_dir={tmp_path}/job{num}"])
        with tracking_run(cfg):
            pass
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep_dir)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["0: dataset_size=4", "1: dataset_size=8"]
    assert {r.data.params["dataset_size"] for r in runs} == {"4", "8"}
    assert {r.info.status for r in runs} == {"FINISHED"}


# ------------------------------------------------------------------------------------ tracked runs (Ray)
def _history(out: Path) -> list[dict]:
    lines = (out / "iter_1" / "model" / "train_history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, ray_local):
    """One tracked tiny_random SAO run into a local MLflow file store; which steps arrived live."""
    from selfalign_ray.loop import run
    from selfalign_ray.train.step_stream import StepStream

    root = tmp_path_factory.mktemp("tracked")
    personas = root / "personas.jsonl"
    personas.write_text("".join(json.dumps({"persona": f"A {job} who wants practical, step by step advice."}) + "\n"
                                for job in ("nurse", "carpenter", "student", "baker", "teacher", "runner")))
    out, uri = root / "run", f"file://{root}/mlruns"
    live: list[int] = []
    deliver = StepStream._deliver

    def spy(self, metrics):
        if threading.current_thread().name == "train-step-stream":
            live.append(metrics["step"])
        deliver(self, metrics)

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mp.setattr(StepStream, "_deliver", spy)
    overrides = _run_overrides(out, personas)
    try:
        report = run(compose(overrides + ["tracker=mlflow", f"tracker.tracking_uri={uri}",
                                          "tracker.experiment=tracking-test"]))
    finally:
        mp.undo()
    return {"out": out, "uri": uri, "report": report, "live": live, "overrides": overrides}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_run_logs_params_steps_metrics_and_artifacts(mlflow_run):
    from mlflow import MlflowClient

    out = mlflow_run["out"]
    client = MlflowClient(mlflow_run["uri"])
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["model.name"] == "tiny_random" and params["dataset_size"] == "4"
    assert params["engine.extra.hf_token"] == "<redacted>"
    assert not any("hf_SECRET_VALUE" in v for v in params.values())

    # Training: every optimizer step of train_history.jsonl, at its step, some of them live from rank 0.
    history = _history(out)
    assert len(history) >= 1
    for key in ("loss", "margin", "preference_accuracy", "lr", "tokens_per_s"):
        logged = client.get_metric_history(run.info.run_id, f"train/sao-iter1/{key}")
        assert [(m.step, m.value) for m in logged] == [(h["step"], pytest.approx(h[key])) for h in history], key
    assert mlflow_run["live"], "no training step came through the live stream"

    # Generation and evaluation of iteration 1, from its manifest.
    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    metrics = run.data.metrics
    assert metrics["generation/pairs_kept"] == manifest["pairs_kept"]
    assert metrics["generation/inputs"] == 4
    for reason, n in manifest["drops"].items():
        assert metrics["generation/drops/" + reason.replace(":", "_")] == n
    for stage, rate in manifest["generation"]["tokens_per_s_by_stage"].items():
        assert metrics[f"generation/tokens_per_s/{stage}"] == pytest.approx(rate)
    if manifest["judge_position_agreement"] is not None:
        assert metrics["generation/judge_position_agreement"] == pytest.approx(manifest["judge_position_agreement"])
    vs_base = manifest["eval_vs_base"]
    for key in ("win_rate", "ci_low", "ci_high"):
        assert metrics[f"eval_vs_base/{key}"] == pytest.approx(vs_base[key])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_vs_base/win_rate")] == [1]

    # The manifest and the report as artifacts.
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"iter_1", "report.md", "summary.json", "report"} <= top
    assert "iter_1/manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id, "iter_1")}
    local = client.download_artifacts(run.info.run_id, "iter_1/manifest.json", str(out.parent / "dl"))
    assert json.loads(Path(local).read_text())["pairs_kept"] == manifest["pairs_kept"]


def _wandb_records(path: Path):
    """The records of an offline run's transaction log (`run-<id>.wandb`): a 7-byte header, then LevelDB log
    blocks of protobuf Records. wandb 0.31 moved its reader into the Go core, so the test reads the format."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf += chunk
        if kind in (1, 4):  # FULL, or the LAST piece of a record split over blocks
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wandb_offline_rerun_logs_the_whole_run_from_its_files(mlflow_run, tmp_path, monkeypatch):
    from selfalign_ray.loop import run

    out = mlflow_run["out"]
    shards = sorted(p.stat().st_mtime_ns for p in (out / "iter_1" / "shards").iterdir())
    model = (out / "iter_1" / "model" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run(compose(mlflow_run["overrides"] + ["tracker=wandb", "tracker.project=tracking-test"]))
    # Resumed: nothing was regenerated or retrained.
    assert sorted(p.stat().st_mtime_ns for p in (out / "iter_1" / "shards").iterdir()) == shards
    assert (out / "iter_1" / "model" / "model.safetensors").stat().st_mtime_ns == model

    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    history, files, config, exit_code = [], set(), {}, None
    for record in _wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "files":
            files.update(f.path for f in record.files.files)
        elif kind == "run":
            for item in record.run.config.update:
                value = json.loads(item.value_json)
                config[item.key] = value["value"] if isinstance(value, dict) and "value" in value else value
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert exit_code == 0
    assert config["model.name"] == "tiny_random" and config["dataset_size"] == "4"
    assert config["engine.extra.hf_token"] == "<redacted>"
    steps = [(h["train/sao-iter1/step"], h["train/sao-iter1/loss"]) for h in history if "train/sao-iter1/loss" in h]
    assert steps == [(h["step"], pytest.approx(h["loss"])) for h in _history(out)]
    (iteration,) = [h for h in history if "generation/pairs_kept" in h]
    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    assert iteration["iteration"] == 1 and iteration["generation/pairs_kept"] == manifest["pairs_kept"]
    assert iteration["eval_vs_base/ci_low"] == pytest.approx(manifest["eval_vs_base"]["ci_low"])
    assert {"iter_1/manifest.json", "report.md", "summary.json"} <= files
    assert (run_dir / "files" / "iter_1" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_tracker_presets_hold_and_document_every_field(kind):
    """Each conf/tracker/*.yaml key is a field of its config dataclass (and the reverse), with a comment above it."""
    import dataclasses
    import importlib

    from selfalign_ray.cli import CONF_DIR
    from selfalign_ray.config import typed

    module = importlib.import_module(f"selfalign_ray.tracking.{kind}")
    cls = {"mlflow": "MlflowConfig", "wandb": "WandbConfig"}[kind]
    node = compose([f"tracker={kind}"]).tracker
    typed(getattr(module, cls), node, "tracker")
    assert set(node) == {f.name for f in dataclasses.fields(getattr(module, cls))}
    lines = (Path(CONF_DIR) / "tracker" / f"{kind}.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", " ")):
            assert lines[i - 1].startswith("#"), f"tracker/{kind}.yaml: no comment above {line!r}"
