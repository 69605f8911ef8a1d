"""Where the app's Ray comes from (conf/cluster/), and what a run on a shared cluster must respect.

cluster=local   ray.init() starts an embedded Ray inside this process (laptop, CI, one node).
cluster=remote  ray.init(address="auto") joins a running cluster: under `ray job submit` (RAY_ADDRESS is set by the
                job supervisor) or on a node started with `ray start`.

Under `ray job submit --working-dir .` the driver runs in Ray's temporary copy of the working dir
(/tmp/ray/session_*/runtime_resources/working_dir_files/...), which is deleted with the session: a relative
output_dir would write shards and models there and lose them. So with cluster=remote a relative output_dir is
refused, unless `cluster.output_root` names an absolute shared directory to resolve it against. A URI
(output_dir=s3://bucket/runs/x, gs://...; selfalign_ray/data/storage.py) is storage every node sees: used as is.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from selfalign_ray.config import ConfigError

log = logging.getLogger(__name__)

# Ray >= 2.52 token authentication. A head started by `ray start` enables it when it finds a token
# (~/.ray/auth_token, which any local ray.init() creates), and then every client — this driver included — must
# run with RAY_AUTH_MODE=token and see the same token. Ray itself only reports "Failed to connect".
AUTH_HINT = (
    "If the cluster uses token authentication (Ray >= 2.52; a head started with `ray start` enables it when "
    "~/.ray/auth_token exists), run with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token, "
    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it). Under `ray job submit` "
    "the job inherits this from the head; see cluster/README.md."
)


def is_remote(cluster) -> bool:
    """cluster=remote (or any config with an address): the app joins a cluster it did not start."""
    return bool(cluster.get("address"))


def resolve_output_dir(cfg) -> Path | str:
    """The run's absolute output directory (a URI is returned as is, as a string).

    cluster=local: relative to the launch directory (Hydra keeps the cwd, hydra.job.chdir=false).
    cluster=remote: an absolute output_dir as is; a relative one under `cluster.output_root` if that is set,
    otherwise a ConfigError (see the module docstring for why).
    """
    from selfalign_ray.data.storage import absolute, is_uri

    if is_uri(cfg.output_dir):
        return absolute(cfg.output_dir)
    path = Path(str(cfg.output_dir)).expanduser()
    if path.is_absolute() or not is_remote(cfg.cluster):
        return path.resolve()
    root = cfg.cluster.get("output_root")
    if not root:
        raise ConfigError(
            f"output_dir={cfg.output_dir!r} is relative, and with cluster=remote the job runs in Ray's temporary "
            "working directory, which is deleted with the session: shards and models would be lost. Pass an "
            "absolute path on storage every node sees (output_dir=/shared/runs/my-run), or set "
            "cluster.output_root=/shared/runs to place relative output dirs under it.")
    root = Path(str(root)).expanduser()
    if not root.is_absolute():
        raise ConfigError(f"cluster.output_root={str(root)!r} must be an absolute path (shared by all nodes)")
    return (root / path).resolve()


def apply_output_dir(cfg) -> Path | str:
    """Resolve output_dir (see resolve_output_dir); on a remote cluster write it back into cfg, so every later
    reader (SAO loop, SynPO loop) uses the resolved path (a local run is left exactly as configured)."""
    out = resolve_output_dir(cfg)
    if is_remote(cfg.cluster) and str(cfg.output_dir) != str(out):
        cfg.output_dir = str(out)
    return out


# Ray's raylet kills the processes a dead worker leaves behind (Linux). vLLM's engine core runs in a child process
# of its actor and does not watch its parent: without this an engine actor killed by OOM or `ray job stop` leaves
# the engine core holding its GPU memory. Set on the `ray start` lines of GPU clusters (cluster/ray_up_gpu.yaml,
# cluster/kuberay_raycluster.yaml). Not set for the embedded cluster: it reaches the driver too, whose
# subprocesses then lose their exit status (seen in tests: `subprocess.run(...).returncode` became 0).
REAPER_ENV = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on host:port (a bind test; the port is released at once)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True


def init_ray(cluster) -> None:
    """Start (local) or join (remote) Ray once per process.

    cluster=local may declare logical GPUs (`cluster.num_gpus=8`): Ray then schedules GPU actors, placement
    groups and train workers exactly as on an 8-GPU node, which is how the GPU layouts are tested on CPU.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(address=cluster.address, ignore_reinit_error=True, log_to_driver=True)
    if not cluster.address:
        # An embedded local cluster: budget CPUs explicitly (null = all cores of this machine).
        kwargs.update(num_cpus=cluster.num_cpus, include_dashboard=cluster.include_dashboard)
        if cluster.get("num_gpus") is not None:
            kwargs["num_gpus"] = cluster.num_gpus
        if cluster.include_dashboard:
            port = cluster.dashboard_port
            if port is None or port_free(port):
                kwargs["dashboard_port"] = port
            else:
                # Another local run (or any server) holds it: without a port Ray picks a free one, so a second
                # experiment on this machine starts instead of dying with "Failed to bind to 127.0.0.1:8265". The
                # embedded cluster's other ports (GCS, raylet, object manager) are chosen free by Ray already.
                log.warning("dashboard port %s is in use (another Ray on this machine?): Ray picks a free one "
                            "(see the 'View the dashboard at' line)", port)
        ray.init(**kwargs)
        return
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        # Without a token the GCS answers "Unauthenticated" and ray.init gives up with a bare ConnectionError.
        # We only explain; we never switch authentication on or off for the user.
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise ConnectionError(f"{e}\n{AUTH_HINT}") from e
        raise


def free_gpus() -> float:
    """GPUs no task, actor or placement group holds right now."""
    import ray

    return float(ray.available_resources().get("GPU", 0.0))


def wait_for_gpus(expected_free: float, what: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> float:
    """Wait until at least `expected_free` GPUs are free again (the actors of a finished stage exit
    asynchronously); raise if they are still held after `timeout_s`. Returns the free count.

    The next stage (training, the next pool) would otherwise wait forever for GPUs nobody will give back.
    """
    import ray

    total = float(ray.cluster_resources().get("GPU", 0.0))
    if total == 0:
        return 0.0
    deadline = time.monotonic() + timeout_s
    free = free_gpus()
    while free + 1e-6 < expected_free and time.monotonic() < deadline:
        time.sleep(poll_s)
        free = free_gpus()
    if free + 1e-6 < expected_free:
        raise RuntimeError(
            f"{what}: {expected_free - free:g} GPU(s) are still reserved {timeout_s:g} s after it finished "
            f"({free:g} of {total:g} free, {expected_free:g} were free before it started). The next stage would "
            "wait forever for them: look for live engine actors or placement groups (`ray list actors`, "
            "`ray list placement-groups`).")
    log.info("%s released its GPUs: %g of %g free", what, free, total)
    return free
