"""Per-step training metrics from the rank-0 worker to a callback in the driver, while training runs.

The tracker lives in the driver only (train_model(on_step=...)): workers need no tracker package, credentials
or network route to the tracking server, a restarted worker group does not open a second tracker run, and the
driver's run holds every metric. Rank 0 puts each optimizer step's metrics (the record it appends to
train_history.jsonl: all-rank sums and means) on a Ray queue; a driver thread hands them to the callback as they
come. When training ends, steps the stream missed (the queue's actor lost, a run resumed by a new driver) are
taken from the history, so the callback sees every step once; a step redone after a worker restart is
delivered the first time only.

Delivery is best effort on both ends: a failing queue or callback never stops training.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

# How long the driver thread waits on an empty queue before checking whether training ended.
POLL_S = 0.5


class StepStream:
    def __init__(self, on_step: Callable[[dict], None]):
        from ray.util.queue import Queue

        self.on_step = on_step
        self.delivered: set[int] = set()
        # No CPU: the queue must never wait for (or take) a core the workers or Ray Data need.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="train-step-stream", daemon=True)
        self._thread.start()

    def _deliver(self, metrics: dict) -> None:
        step = metrics.get("step")
        if step in self.delivered:
            return
        self.delivered.add(step)
        try:
            self.on_step(metrics)
        except Exception:  # noqa: BLE001
            log.warning("training step %s was not delivered to the tracker", step, exc_info=True)

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._deliver(self.queue.get(timeout=POLL_S))
            except Empty:
                continue
            except Exception as err:  # noqa: BLE001 - the queue's actor is gone: the history fills the gaps
                log.warning("live training metrics stopped (%s: %s); the steps are taken from "
                            "train_history.jsonl when training ends", type(err).__name__, err)
                return

    def close(self, history: list[dict]) -> None:
        """After training: what is left in the queue, then every step of `history` not delivered yet."""
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            for metrics in self.queue.get_nowait_batch(self.queue.size()):
                self._deliver(metrics)
        except Exception:  # noqa: BLE001
            log.debug("step queue not drained", exc_info=True)
        for record in history:
            self._deliver(record)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            log.debug("step queue not shut down", exc_info=True)


def send_step(queue, metrics: dict):
    """Worker side (rank 0): put one step's metrics on the driver's queue. Returns the queue, or None once it
    failed (the worker stops trying; the driver completes the steps from the history)."""
    if queue is None:
        return None
    try:
        queue.put_nowait(metrics)
        return queue
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        log.warning("live training metrics stopped (%s: %s)", type(err).__name__, err)
        return None
