"""One writer per output dir: `output_dir/.lock`, held by the driver for the whole run.

Two drivers in one output dir would resume into the same chunks and model directories, delete each other's
checkpoints and remove markers mid-commit (e.g. a Ctrl-C'd `ray job submit` whose job kept running, then the
same command again). The lock file is created with O_CREAT|O_EXCL (atomic on local file systems and NFSv3+) and
holds who owns it: host, pid, start time, the Ray job (id and submission id when there is one).

    free                      -> created; removed by release() (at exit, also after an error)
    held by a live process    -> RunLockedError (a user error: exit 2), naming the holder
    held by a dead process    -> same host, pid gone (or reused by a process started later): taken over with a
                                 warning
    held on another host      -> never taken over automatically (its pid means nothing here): the message says
                                 how to check the holder and remove the file
    unreadable (half-written) -> treated as held; the message names the file to remove
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from selfalign_ray.data import storage
from selfalign_ray.data.shards import ResumeMismatchError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


# Locks this process holds, by output dir: note_ray_job() finds them after Ray has started.
_HELD: dict[Path, "RunLock"] = {}


def note_ray_job() -> None:
    """Record the Ray job id in every lock this process holds (call after ray.init: the lock is taken before Ray
    starts, so that a refused driver starts no Ray)."""
    for lock in list(_HELD.values()):
        lock.update_ray_job()


class RunLockedError(ResumeMismatchError):
    """The output dir is locked by another driver (a user error: choose another output_dir or stop that run)."""


def _ray_job() -> dict:
    """The Ray job this driver runs as, when there is one (after ray.init, or under `ray job submit`)."""
    job: dict = {}
    try:
        import ray

        if ray.is_initialized():
            job["job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - the lock must not fail on an introspection detail
        pass
    if "job_id" not in job and os.environ.get("RAY_JOB_ID"):
        job["job_id"] = os.environ["RAY_JOB_ID"]
    # `ray job submit` passes the job's metadata (its submission id, what `ray job stop` takes) to the driver.
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
        if meta.get("job_submission_id"):
            job["submission_id"] = meta["job_submission_id"]
    except (ValueError, AttributeError):
        pass
    return job


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid from its holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def _pid_alive(pid: int, proc_start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    # The pid lives, but as another process (pids are reused): the holder is gone.
    return not (proc_start and _proc_start(pid) not in (None, proc_start))


class RunLock:
    """An exclusive lock on one output dir. `acquire()` / `release()`, or `with RunLock(dir):`."""

    def __init__(self, output_dir: str | Path, name: str = LOCK_NAME):
        # output_dir on object storage (data/storage.py): the lock is an object there. A store has no create-if-
        # absent here (pyarrow exposes no conditional put), so taking it is check, write, read back: two drivers
        # starting within the same second could both pass. It still refuses every later driver, which is the
        # case that happens (a Ctrl-C'd `ray job submit` whose job kept running, then the same command again).
        self.remote = storage.is_uri(output_dir)
        self.path = storage.join(output_dir, name) if self.remote else Path(output_dir) / name
        self.held = False
        self.info: dict = {}

    @property
    def _dir(self) -> str | Path:
        return self.path.rsplit("/", 1)[0] if self.remote else self.path.parent

    @staticmethod
    def describe(info: dict) -> str:
        job = info.get("ray_job") or {}
        parts = [f"host {info.get('host')}", f"pid {info.get('pid')}", f"started {info.get('started')}"]
        if job.get("submission_id"):
            parts.append(f"Ray job {job['submission_id']}")
        elif job.get("job_id"):
            parts.append(f"Ray job id {job['job_id']}")
        return ", ".join(parts)

    def _create(self) -> bool:
        if self.remote:
            if storage.exists(self.path):
                return False
            storage.write_json(self.path, self.info)
            return self._read() == self.info
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        if self.remote:
            try:
                return storage.read_json(self.path) if storage.exists(self.path) else {}
            except (OSError, ValueError):
                return None
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        storage.makedirs(self._dir)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "started_unix": time.time(),
                     "ray_job": _ray_job()}
        for _ in range(3):  # another driver may release or take over between our tries
            if self._create():
                self.held = True
                _HELD[self.path] = self
                return self
            holder = self._read()
            if holder == {}:  # released just now
                continue
            if holder is None:
                raise RunLockedError(
                    f"{self._dir} is locked by {self.path}, which is unreadable (a driver killed while "
                    f"writing it?); if no other run uses this output dir, delete {self.path} and re-run")
            if holder.get("host") == self.info["host"] and holder.get("pid") == os.getpid():
                raise RunLockedError(f"{self._dir} is already locked by this process")
            if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"], holder.get("proc_start")):
                log.warning("%s: taking over the lock of a driver that is gone (%s)", self._dir,
                            self.describe(holder))
                # Rename first: of two drivers taking over at once, only one renames this file away.
                if self.remote:
                    storage.delete(self.path)
                    continue
                stale = self.path.with_name(f"{self.path.name}.stale-{self.info['host']}-{os.getpid()}")
                try:
                    os.rename(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            where = ("" if holder.get("host") == self.info["host"] else
                     f" It was taken on another host: check there that the run is gone (`ps -p {holder.get('pid')}`"
                     f" on {holder.get('host')}, or `ray job list`), then delete {self.path}.")
            raise RunLockedError(
                f"{self._dir} is in use by another driver ({self.describe(holder)}); wait for it, stop it "
                f"(`ray job stop <id>` for a submitted job), or choose another output_dir.{where}")
        raise RunLockedError(f"{self._dir}: could not take {self.path} (other drivers keep racing for it)")

    def update_ray_job(self) -> None:
        """Record the Ray job id once Ray is initialised (the lock is taken before, so a refused driver starts
        no Ray)."""
        if not self.held:
            return
        job = _ray_job()
        if job != self.info.get("ray_job"):
            self.info["ray_job"] = job
            if self.remote:
                storage.write_json(self.path, self.info)
                return
            tmp = self.path.with_name(f"{self.path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
            tmp.write_text(json.dumps(self.info, indent=2) + "\n")
            os.replace(tmp, self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.pop(self.path, None)
        holder = self._read()
        # Never remove a lock someone else took over meanwhile.
        if holder and (holder.get("host"), holder.get("pid")) != (self.info["host"], self.info["pid"]):
            log.warning("%s: the lock now belongs to %s; left in place", self.path, self.describe(holder))
            return
        if self.remote:
            storage.delete(self.path)
            return
        try:
            self.path.unlink()
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
