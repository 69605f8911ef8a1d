"""The driver-side deadlines (selfalign_ray/watchdog.py) without Ray: progress keeps a stage alive, silence ends it
naming the stage, errors and results pass through."""

from __future__ import annotations

import threading
import time

import pytest

from selfalign_ray.watchdog import StallError, WatchedIterator, call_with_deadline

pytestmark = [pytest.mark.timeout(60)]


def slow_items(delays):
    for i, d in enumerate(delays):
        time.sleep(d)
        yield i


def test_items_with_progress_marks_pass_a_deadline_shorter_than_the_whole_stream():
    it = WatchedIterator(slow_items([0.3] * 5), timeout_s=0.8, stage="gen", poll_s=0.05)
    got = []
    for item in it:
        got.append(item)
        it.progress()
    assert got == [0, 1, 2, 3, 4]  # 1.5 s in all, never 0.8 s without progress


def test_silence_raises_stall_error_naming_the_stage_and_what_it_waits_on():
    it = WatchedIterator(slow_items([0.0, 30.0]), timeout_s=0.5, stage="generation (pool sao)",
                         describe=lambda: "waiting on chunk(s) 3", poll_s=0.05)
    started = time.monotonic()
    assert next(it) == 0
    with pytest.raises(StallError, match=r"^generation \(pool sao\): no progress for 0.5 s \(waiting on chunk\(s\) 3\)"):
        next(it)
    assert time.monotonic() - started < 5
    it.close(join_s=0.1)


def test_the_sources_own_error_comes_through_and_close_stops_the_pump():
    def broken():
        yield 1
        raise ValueError("actor died")

    it = WatchedIterator(broken(), timeout_s=5, stage="gen", poll_s=0.05)
    assert next(it) == 1
    with pytest.raises(ValueError, match="actor died"):
        next(it)
    endless = WatchedIterator(slow_items([0.01] * 10_000), timeout_s=5, stage="gen", poll_s=0.05)
    next(endless)
    endless.close(join_s=2)
    assert not endless._thread.is_alive()


def test_call_with_deadline_keeps_going_while_the_probe_changes_and_stops_when_it_does_not():
    counter = {"n": 0}

    def work(steps, pause):
        for _ in range(steps):
            time.sleep(pause)
            counter["n"] += 1
        return "done"

    assert call_with_deadline(lambda: work(6, 0.2), lambda: counter["n"], 0.6, "training", poll_s=0.05) == "done"
    stop = threading.Event()
    with pytest.raises(StallError, match=r"^training: no progress for 0.5 s \(no step\)"):
        call_with_deadline(lambda: stop.wait(30), lambda: 0, 0.5, "training", describe=lambda: "no step",
                           poll_s=0.05)
    stop.set()
    with pytest.raises(KeyError):
        call_with_deadline(lambda: {}["x"], lambda: 0, 5, "training")
    assert call_with_deadline(lambda: 7, lambda: 0, 0, "off") == 7
