"""Cluster operation: the cluster=remote output-dir rule, a real `ray start` head with `ray job submit`, and our
Ray metrics read back from the node's Prometheus endpoint.

The head runs with token authentication (RAY_AUTH_MODE=token, as a Ray 2.60 head does when a token exists) on a
token of its own (RAY_AUTH_TOKEN_PATH in a temp dir), its own --temp-dir and free ports for every listener, so it
neither collides with nor touches other Ray instances on the machine; it is stopped by killing exactly its
processes (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from selfalign_ray.cli import compose
from selfalign_ray.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
# The job's engine and training settings: small enough for a 2-CPU head.
SMALL = ["model=tiny_random", "dataset_size=4", "engine.num_actors=1", "engine.batch_size=4",
         "engine.torch_threads=1", "mode.instruct.max_tokens=16", "mode.respond.max_tokens=12"]


# Our series as the node's Prometheus endpoint names them (Ray adds `ray_`, OpenTelemetry `_total` on counters);
# read back from a real head by test_metrics_are_exported_to_the_nodes_prometheus_endpoint.
EXPORTED = {
    "ray_selfalign_stage_rows_total", "ray_selfalign_stage_prompt_tokens_total",
    "ray_selfalign_stage_output_tokens_total", "ray_selfalign_stage_seconds_total",
    "ray_selfalign_pairs_total", "ray_selfalign_judge_pairs_total",
    "ray_selfalign_train_steps_total", "ray_selfalign_train_tokens_total", "ray_selfalign_train_examples_total",
    "ray_selfalign_train_loss", "ray_selfalign_train_margin", "ray_selfalign_train_accuracy",
    "ray_selfalign_train_lr", "ray_selfalign_train_tokens_per_s",
}


# --- cluster=remote: relative output dirs -------------------------------------------------------------------


def test_remote_rejects_a_relative_output_dir(tmp_path, monkeypatch):
    from selfalign_ray.cluster import resolve_output_dir
    from selfalign_ray.loop import run

    monkeypatch.chdir(tmp_path)
    cfg = compose(["cluster=remote", "model=tiny_random", "output_dir=runs/x"])
    with pytest.raises(ConfigError, match="relative.*temporary working directory.*output_dir=/shared"):
        run(cfg)  # refused before Ray is joined or anything is written
    assert not (tmp_path / "runs").exists()
    # The default output_dir is relative too.
    with pytest.raises(ConfigError, match="is relative"):
        resolve_output_dir(compose(["cluster=remote"]))
    # Accepted: an absolute path, or a relative one under an absolute cluster.output_root.
    assert resolve_output_dir(compose(["cluster=remote", f"output_dir={tmp_path}/a"])) == tmp_path / "a"
    rooted = compose(["cluster=remote", "output_dir=runs/x", f"cluster.output_root={tmp_path}/shared"])
    assert resolve_output_dir(rooted) == tmp_path / "shared" / "runs" / "x"
    with pytest.raises(ConfigError, match="output_root='rel' must be an absolute path"):
        resolve_output_dir(compose(["cluster=remote", "cluster.output_root=rel"]))
    # cluster=local keeps the old behaviour: relative to the launch directory.
    assert resolve_output_dir(compose(["output_dir=runs/x"])) == tmp_path / "runs" / "x"


def test_joining_a_token_cluster_without_the_token_says_how(monkeypatch):
    import ray

    from selfalign_ray.cluster import init_ray

    def refused(**kwargs):  # what ray.init raises when the GCS answers "Unauthenticated" (see the slow test)
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConnectionError, match=r"Failed to connect(.|\n)*run with RAY_AUTH_MODE=token"):
        init_ray(compose(["cluster=remote"]).cluster)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already in token mode: Ray's own error, unchanged
    with pytest.raises(ConnectionError) as err:
        init_ray(compose(["cluster=remote"]).cluster)
    assert str(err.value) == "Failed to connect to Ray cluster at 10.0.0.1:6379"


def test_the_command_line_names_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfalign_ray", "cluster=remote", "output_dir=runs/x"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode != 0
    assert "is relative, and with cluster=remote" in proc.stdout + proc.stderr


# --- the files in cluster/ ---------------------------------------------------------------------------------


def test_cluster_files_are_valid_and_consistent():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    # `ray up` fills in the provider's defaults, then validates against Ray's schema: do the same offline.
    up = yaml.safe_load((REPO / "cluster" / "ray_up_gpu.yaml").read_text())
    validate_config(prepare_config(up))
    assert any("pip install -e '.[gpu]'" in c for c in up["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(up[k]) for k in ("head_start_ray_commands",
                                                                  "worker_start_ray_commands"))

    pvc, cluster = yaml.safe_load_all((REPO / "cluster" / "kuberay_raycluster.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["authOptions"]["mode"] == "token"
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts["/shared"]] == pvc["metadata"]["name"]
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1

    # The dashboard asks only for series we export (names as read back from a node).
    dashboard = json.loads((REPO / "cluster" / "grafana_selfalign.json").read_text())
    used = {name for p in dashboard["panels"] for t in p.get("targets", [])
            for name in re.findall(r"ray_selfalign_\w+", t["expr"])}
    assert used == EXPORTED


# --- a real head -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) for every process we can read."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[int(entry.name)] = (int(fields[1]), int(fields[3]), cmd)
        except (OSError, ValueError, IndexError):
            continue
    return out


class Head:
    """`ray start --head` on free ports with its own temp dir and token; `stop()` kills exactly its processes."""

    PORTS = ("port", "dashboard-port", "metrics-export-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "node-manager-port", "object-manager-port")

    def __init__(self):
        # Short: Ray's unix sockets live under it (the path limit is ~107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="sa_head_", dir="/tmp")
        self.ports = {name: _free_port() for name in self.PORTS}
        token_file = Path(self.temp_dir) / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        self.token = token_file.read_text()
        bin_dir = str(Path(sys.executable).parent)
        # Every Ray process of this head and every client of it: token mode, this head's token (not ~/.ray).
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics-export-port']}/metrics"
        self.sid = None
        self.manifests: list[dict] = []  # of the jobs run on this head (metrics add up over them)

    def start(self) -> None:
        cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               *[f"--{name}={port}" for name, port in self.ports.items()]]
        # A session of its own: every daemon (and worker) of this head inherits it, which is how stop() finds them.
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.sid = proc.pid
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out[-4000:]}")

    def ray(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def job_status(self, job_id: str) -> str:
        """The Jobs REST API, with the token as a bearer header (what the CLI sends under RAY_AUTH_MODE=token)."""
        import requests

        r = requests.get(f"{self.dashboard}/api/jobs/{job_id}", timeout=10,
                         headers={"Authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return r.json()["status"]

    def submit(self, runtime_env: Path, overrides: list[str], timeout: float, wait: bool = True,
               while_running=None) -> None:
        """`ray job submit` the app with cluster=remote; fail with the job's logs unless it SUCCEEDED.

        wait=True: the CLI blocks and tails the logs (the documented command line). wait=False: --no-wait, then
        poll the job's status every 2 s, calling `while_running()` each time (e.g. to scrape metrics live).
        """
        job_id = f"selfalign_test_{uuid.uuid4().hex[:8]}"
        deadline = time.time() + timeout
        proc = self.ray("job", "submit", "--address", self.dashboard, "--submission-id", job_id,
                        "--runtime-env", str(runtime_env), "--working-dir", str(REPO),
                        *([] if wait else ["--no-wait"]), "--",
                        "selfalign-ray", "cluster=remote", *overrides, timeout=timeout)
        state = self.job_status(job_id)
        while state in ("PENDING", "RUNNING") and time.time() < deadline:
            if while_running:
                while_running()
            time.sleep(2)
            state = self.job_status(job_id)
        if state != "SUCCEEDED":
            logs = self.ray("job", "logs", "--address", self.dashboard, job_id)
            raise AssertionError(f"job {job_id}: {state}\nsubmit:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
                                 f"\nlogs:\n{logs.stdout[-6000:]}")

    def stop(self) -> None:
        procs = _processes()
        targets = {pid for pid, (_, sid, cmd) in procs.items()
                   if sid == self.sid or self.temp_dir in cmd}
        # Job drivers start sessions of their own: take every descendant of the head's processes too.
        grew = True
        while grew:
            children = {pid for pid, (ppid, _, _) in procs.items() if ppid in targets} - targets
            targets |= children
            grew = bool(children)
        targets.discard(os.getpid())
        # Like `ray stop`: SIGTERM, then SIGKILL what is left (the GCS server and monitor outlive a SIGTERM).
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in targets):
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def head(tiny_model_path):
    # tiny_model_path: build the tiny model into the shared cache before any job looks for it.
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the `ray` CLI is not installed next to this Python")
    for attempt in range(2):
        # A port picked as free can be taken by someone else before Ray binds it: retry once on fresh ports.
        h = Head()
        try:
            h.start()
            break
        except (RuntimeError, subprocess.TimeoutExpired):
            h.stop()
            if attempt:
                raise
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def runtime_env(head) -> Path:
    """cluster/runtime_env.yaml with this machine's caches instead of /shared (the shipped file must parse)."""
    import yaml

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["env_vars"]["SELFALIGN_RAY_CACHE"].startswith("/shared/")
    env.pop("working_dir", None)  # given on the command line (the repository root)
    env["env_vars"] = {**env["env_vars"], "HF_HUB_OFFLINE": "1"}
    for key in ("HF_HOME", "SELFALIGN_RAY_CACHE"):
        if key in os.environ:
            env["env_vars"][key] = os.environ[key]
        else:
            env["env_vars"].pop(key)
    path = Path(head.temp_dir) / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


def _check_run(out: Path, inputs: int) -> dict:
    import pyarrow.parquet as pq

    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"] == inputs
    assert manifest["pairs_kept"] + sum(manifest["drops"].values()) == inputs
    shard_rows = sum(pq.read_metadata(f).num_rows for f in (out / "iter_1" / "shards").glob("*.parquet"))
    reject_rows = sum(pq.read_metadata(f).num_rows for f in (out / "iter_1" / "rejects").glob("*.parquet"))
    assert shard_rows == manifest["pairs_kept"] and reject_rows == sum(manifest["drops"].values())
    assert [s["rows"] for s in manifest["shards"]] and all(Path(s["file"]).is_file() for s in manifest["shards"])
    return manifest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_submit_to_a_token_protected_head(head, runtime_env, tmp_path):
    import requests

    # Token authentication is on: the Jobs API answers 401 without the token, and the CLI without
    # RAY_AUTH_MODE=token does not send it.
    assert requests.get(f"{head.dashboard}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{head.dashboard}/api/jobs/", timeout=10,
                        headers={"Authorization": f"Bearer {head.token}"}).status_code == 200
    no_auth = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    refused = head.ray("job", "list", "--address", head.dashboard, env=no_auth, timeout=60)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr
    # The app joining the head without RAY_AUTH_MODE=token (e.g. run by hand on a node) fails with our hint.
    join = subprocess.run([sys.executable, "-c", "from selfalign_ray.cli import compose\n"
                           "from selfalign_ray.cluster import init_ray\n"
                           "init_ray(compose(['cluster=remote']).cluster)"],
                          env={**no_auth, "RAY_ADDRESS": f"127.0.0.1:{head.ports['port']}"}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert join.returncode != 0 and "run with RAY_AUTH_MODE=token" in join.stderr, join.stderr[-2000:]

    out = tmp_path / "sao"
    head.submit(runtime_env, [*SMALL, "train.enabled=false", f"output_dir={out}"], timeout=420)
    manifest = _check_run(out, 4)
    assert not (out / "iter_1" / "model").exists()
    head.manifests.append(manifest)


def _scrape(url: str) -> list[tuple[str, dict, float]]:
    """The Prometheus text of a node as (name, labels, value) for our series."""
    import requests

    series = []
    for line in requests.get(url, timeout=10).text.splitlines():
        if not line.startswith("ray_selfalign_"):
            continue
        name, _, rest = line.partition("{")
        labels_text, _, value = rest.rpartition("} ")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels_text))
        series.append((name, labels, float(value)))
    return series


def _total(series, name: str, **match) -> float:
    return sum(v for n, labels, v in series if n == name and all(labels.get(k) == w for k, w in match.items()))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_metrics_are_exported_to_the_nodes_prometheus_endpoint(head, runtime_env, tmp_path):
    sao = {"mode": "sao", "iteration": "1"}
    gauges = {f"ray_selfalign_train_{g}" for g in ("loss", "margin", "accuracy", "lr", "tokens_per_s")}
    seen_gauges: set[str] = set()

    def collect_gauges(series=None):
        # Gauges are exported only while the rank-0 worker lives (and ~2 report intervals after): look live.
        seen_gauges.update(n for n, labels, _ in series or _scrape(head.metrics_url)
                           if n in gauges and labels.get("stage") == "train" and labels.get("run") == "sao-iter1"
                           and all(labels.get(k) == v for k, v in sao.items()))

    out = tmp_path / "sao_train"
    head.submit(runtime_env, [*SMALL, f"output_dir={out}", "train.global_batch_size=2",
                              "train.eval_before_after=false"], timeout=780, wait=False,
                while_running=collect_gauges)
    head.manifests.append(_check_run(out, 4))
    summary = json.loads((out / "iter_1" / "model" / "train_summary.json").read_text())
    inputs = sum(m["inputs"] for m in head.manifests)
    kept = sum(m["pairs_kept"] for m in head.manifests)
    judged = sum(m.get("judged_pairs", 0) for m in head.manifests)

    # Counters stay after their process exits, but reach the endpoint on the report interval (~10 s): poll.
    deadline, series = time.time() + 90, []
    while time.time() < deadline:
        series = _scrape(head.metrics_url)
        collect_gauges(series)
        if (_total(series, "ray_selfalign_pairs_total", **sao) == inputs
                and _total(series, "ray_selfalign_train_steps_total", stage="train", **sao) == summary["steps"]
                and _total(series, "ray_selfalign_stage_rows_total", stage="judge", **sao) > 0):
            break
        time.sleep(2)
    names = sorted({n for n, _, _ in series} | seen_gauges)
    assert set(names) == EXPORTED, names
    assert _total(series, "ray_selfalign_pairs_total", **sao) == inputs, names
    assert _total(series, "ray_selfalign_pairs_total", outcome="kept", stage="shards", **sao) == kept
    dropped = {(labels["stage"], labels["reason"]) for n, labels, _ in series
               if n == "ray_selfalign_pairs_total" and labels.get("outcome") == "dropped"}
    assert all(stage and reason for stage, reason in dropped)
    if judged:
        assert _total(series, "ray_selfalign_judge_pairs_total", stage="judge", **sao) == judged
    # Engine stages (from the actors): rows and tokens per stage.
    for stage in ("instruct", "respond"):
        assert _total(series, "ray_selfalign_stage_rows_total", stage=stage, **sao) > 0
        assert _total(series, "ray_selfalign_stage_output_tokens_total", stage=stage, **sao) > 0
    # Training (rank-0 worker): steps and tokens match the run's summary; gauges are present.
    train = {"stage": "train", "run": "sao-iter1", **sao}
    assert _total(series, "ray_selfalign_train_steps_total", **train) == summary["steps"] >= 1
    assert _total(series, "ray_selfalign_train_tokens_total", **train) == summary["tokens"] > 0
    assert seen_gauges == gauges, (sorted(gauges - seen_gauges), names)
