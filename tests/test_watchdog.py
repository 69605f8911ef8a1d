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


@pytest.mark.parametrize("override, message", [
    ("engine.max_restarts=-1", "engine.max_restarts must be an integer >= 0"),
    ("engine.max_task_retries=1.5", "engine.max_task_retries must be an integer >= -1"),
    ("engine.stall_timeout_s=-5", "engine.stall_timeout_s must be a number of seconds >= 0"),
    ("train.stall_timeout_s=nan", "train.stall_timeout_s must be a number of seconds >= 0"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s must be a positive integer"),
    ("train.placement_strategy=EVERYWHERE", "train.placement_strategy='EVERYWHERE': use one of PACK, SPREAD"),
])
def test_bad_bounds_are_refused_naming_the_setting(override, message):
    from selfalign_ray.cli import compose
    from selfalign_ray.config import ConfigError, typed
    from selfalign_ray.engines.config import EngineConfig
    from selfalign_ray.train.trainer import as_train_config

    cfg = compose(["model=tiny_random", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        if override.startswith("engine."):
            typed(EngineConfig, cfg.engine, "engine")
        else:
            as_train_config(cfg.train)


def test_default_bounds_are_small_and_the_watchdogs_generous():
    from selfalign_ray.cli import compose
    from selfalign_ray.config import typed
    from selfalign_ray.engines.config import EngineConfig
    from selfalign_ray.train.trainer import as_train_config

    for engine in ("hf", "vllm", "vllm_cpu"):
        e = typed(EngineConfig, compose([f"engine={engine}"]).engine, "engine")
        assert (e.max_restarts, e.max_task_retries) == (3, -1) and e.stall_timeout_s >= 3600
    t = as_train_config(compose([]).train)
    assert t.stall_timeout_s >= 3600 and t.collective_timeout_s >= 1800 and t.placement_strategy == "PACK"
