"""The on-disk cache for models we build or convert ourselves (tiny random, SmolLM2 from GGUF)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock


def cache_root() -> Path:
    """`$SELFALIGN_RAY_CACHE`, else `~/.cache/selfalign_ray` (shared by every run on this machine)."""
    root = os.environ.get("SELFALIGN_RAY_CACHE") or os.path.join(Path.home(), ".cache", "selfalign_ray")
    return Path(root).expanduser().resolve()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several drivers (a Hydra multirun, parallel tests) may ask for the same model at once.
    with FileLock(str(path) + ".lock"):
        yield


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmpdir)` and move the result to `target` atomically, unless `target` exists.

    A crash mid-build leaves only a temporary directory behind, never a half-written `target`.
    """
    if (target / "config.json").exists():
        return target
    with _locked(target):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes 0700; other users/actors must read the model
            build(tmp)
            if target.exists():  # a stale incomplete directory from an old layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
