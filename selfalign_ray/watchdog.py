"""Driver-side deadlines: a stage that stops making progress fails the run, naming the stage, instead of
waiting forever (a hung collective, an actor that never starts, a pool stuck on a lost node).

    WatchedIterator(it, timeout_s, stage)   items of `it` pulled on a helper thread; iterating raises StallError
                                            when `progress()` was not called for timeout_s (generation: a chunk
                                            committed; generation/runner.py)
    call_with_deadline(fn, probe, ...)      fn() on a helper thread; StallError when probe()'s value does not change
                                            for timeout_s (training: the step history grew; train/trainer.py)

The helper threads are daemons: after a StallError the caller raises, the driver exits, and Ray ends the job's
actors with it (a local Ray goes down with the driver; a submitted job's actors die with its driver).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

_DONE = object()


class StallError(RuntimeError):
    """A stage made no progress within its deadline."""


class WatchedIterator:
    """Iterate `it` with a deadline between progress marks. `timeout_s` <= 0 or None: no deadline.

    The source is consumed on a daemon thread (it may block inside Ray for ever); items and the source's own
    exception come back through a small queue. `close()` stops the thread at its next item and closes the source
    there (a generator can only be closed by the thread that runs it)."""

    def __init__(self, it: Iterator, timeout_s: float | None, stage: str,
                 describe: Callable[[], str] | None = None, poll_s: float = 1.0):
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.stage = stage
        self.describe = describe
        self._poll_s = poll_s
        self._source = iter(it)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._pump, name=f"watch-{stage}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for item in self._source:
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, None), timeout=self._poll_s)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    break
            result = (_DONE, None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            result = (_DONE, err)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - already stopping; the consumer has the real error
                    pass
        while not self._stop.is_set():
            try:
                self._queue.put(result, timeout=self._poll_s)
                return
            except queue.Full:
                continue

    def progress(self) -> None:
        """Mark progress: the deadline restarts now."""
        self._last = time.monotonic()

    def __iter__(self) -> "WatchedIterator":
        return self

    def __next__(self) -> Any:
        while True:
            wait = None if self.timeout_s is None else self._last + self.timeout_s - time.monotonic()
            if wait is not None and wait <= 0:
                detail = f" ({self.describe()})" if self.describe else ""
                raise StallError(f"{self.stage}: no progress for {self.timeout_s:g} s{detail}; "
                                 "stopped by the watchdog (raise the stage's stall_timeout_s if it is just slow)")
            try:
                item, err = self._queue.get(timeout=min(wait, self._poll_s) if wait is not None else self._poll_s)
            except queue.Empty:
                continue
            if err is not None:
                raise err
            if item is _DONE:
                raise StopIteration
            return item

    def close(self, join_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=join_s)


def call_with_deadline(fn: Callable[[], Any], probe: Callable[[], Any], timeout_s: float | None, stage: str,
                       describe: Callable[[], str] | None = None, poll_s: float = 1.0) -> Any:
    """fn() on a daemon thread; its result or its exception. StallError when `probe()` returned the same value
    for `timeout_s` seconds (probe: something that changes with progress, e.g. the size of a history file).
    `timeout_s` <= 0 or None: just fn()."""
    if not timeout_s or timeout_s <= 0:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - raised on the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name=f"deadline-{stage}", daemon=True)
    thread.start()
    seen, last = probe(), time.monotonic()
    while True:
        thread.join(timeout=poll_s)
        if not thread.is_alive():
            break
        now_seen = probe()
        if now_seen != seen:
            seen, last = now_seen, time.monotonic()
        elif time.monotonic() - last > timeout_s:
            detail = f" ({describe()})" if describe else ""
            raise StallError(f"{stage}: no progress for {timeout_s:g} s{detail}; stopped by the watchdog (raise "
                             "the stage's stall_timeout_s if it is just slow)")
    if "error" in box:
        raise box["error"]
    return box["result"]
