"""Bounded failure on a local Ray cluster: a batch that kills every actor it runs on ends the run naming its chunk
(committed chunks kept, a re-run resumes with every input exactly once), and a stage that stops making progress is
ended by the watchdog, naming the stage. The faults are stages swapped in by the test (monkeypatched into the SAO
pipeline on the driver; Ray pickles the test's local classes by value into the actors).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from persona_texts import PERSONAS

from selfalign_ray.cli import compose
from selfalign_ray.data.shards import IterationStore

pytestmark = [pytest.mark.slow]

# 8 personas in 4 chunks of 2; one engine batch = one chunk.
BASE = ["model=tiny_random", "dataset_size=8", "mode.shard_size=2", "mode.respond.max_tokens=8",
        "mode.instruct.max_tokens=12", "engine.batch_size=2", "train.enabled=false"]
CHUNKS = 4


@pytest.fixture(scope="module")
def personas(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "personas.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "persona": t}) + "\n" for i, t in enumerate(PERSONAS)))
    return path


def every_input_once(iter_dir: Path) -> None:
    """The finished iteration holds each of the 8 inputs exactly once, as a pair or as a reject."""
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["chunks"] == CHUNKS
    sources = [r for s in manifest["shards"] for r in pq.read_table(s["file"], columns=["source"]).column(0).to_pylist()]
    sources += [r for s in manifest["rejects"] for r in pq.read_table(s["file"], columns=["source"]).column(0).to_pylist()]
    assert sorted(sources) == sorted(PERSONAS)


def _wait_for_threads(prefix: str, timeout_s: float) -> None:
    """Join the watchdog's threads named `prefix`* (they end once the hung work they wait on ends)."""
    import threading

    for t in threading.enumerate():
        if t.name.startswith(prefix):
            t.join(timeout=timeout_s)
            assert not t.is_alive(), f"thread {t.name} still runs {timeout_s:g} s after the watchdog stopped it"


@pytest.mark.timeout(600)
def test_batch_that_kills_its_actor_fails_the_run_naming_the_chunk_and_a_rerun_resumes(
        tmp_path, personas, ray_local, monkeypatch, caplog):
    import selfalign_ray.sao.pipeline as pipeline
    from selfalign_ray.generation.runner import PoolFailure
    from selfalign_ray.loop import run

    poison = 2  # rows 4 and 5

    class KillingInstruct(pipeline.InstructStage):
        """Dies like a host OOM kill each time it meets the poisoned chunk."""

        def __call__(self, df, engine):
            if (df["chunk_id"] == poison).any():
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(df, engine)

    out = tmp_path / "run"
    # max_task_retries stays at its default -1 (retry while the actor lives): max_restarts alone ends the run.
    args = [*BASE, f"personas.path={personas}", f"output_dir={out}", "engine.max_restarts=1"]
    monkeypatch.setattr(pipeline, "InstructStage", KillingInstruct)
    started = time.time()
    with pytest.raises(PoolFailure) as failure:
        run(compose(args))
    message = str(failure.value)
    assert "\n" not in message
    named = message.split("generation failed on chunk(s) ")[1].split(" (")[0]
    assert str(poison) in named.split(", "), message
    assert "engine.max_restarts=1" in message
    assert time.time() - started < 300  # bounded: not an endless reload loop
    kept = IterationStore(out / "iter_1").committed()
    assert poison not in kept
    kept_files = {c: (out / "iter_1" / "chunks" / f"part-{c:05d}.json").read_bytes() for c in kept}

    # The cause is gone (a fixed kernel, a bigger host): the same command resumes and keeps what was committed.
    monkeypatch.setattr(pipeline, "InstructStage", KillingInstruct.__mro__[1])
    caplog.set_level(logging.INFO)
    run(compose(args))
    if kept:
        assert f"resuming: {len(kept)} of {CHUNKS} chunks already committed" in caplog.text
    for c, data in kept_files.items():
        assert (out / "iter_1" / "chunks" / f"part-{c:05d}.json").read_bytes() == data
    every_input_once(out / "iter_1")


@pytest.mark.timeout(600)
def test_stalled_stage_is_stopped_by_the_watchdog_naming_the_stage(tmp_path, personas, ray_local, monkeypatch):
    import selfalign_ray.sao.pipeline as pipeline
    from selfalign_ray.loop import run
    from selfalign_ray.watchdog import StallError

    stalled = 1

    class HangingRespond(pipeline.RespondStage):
        """Hangs (a stuck collective, a wedged device) on one chunk, for longer than the watchdog waits."""

        def __call__(self, df, engine):
            if (df["chunk_id"] == stalled).any():
                time.sleep(45)
            return super().__call__(df, engine)

    monkeypatch.setattr(pipeline, "RespondStage", HangingRespond)
    out = tmp_path / "run"
    started = time.time()
    with pytest.raises(StallError) as stall:
        run(compose([*BASE, f"personas.path={personas}", f"output_dir={out}", "engine.stall_timeout_s=20"]))
    message = str(stall.value)
    assert message.startswith("generation (pool sao: instruct/respond/judge): no progress for 20 s"), message
    waiting = message.split("waiting on chunk(s) ")[1].split(";")[0]
    assert str(stalled) in waiting.split(", "), message
    assert time.time() - started < 60  # stopped while the stage still hung (45 s from its start)
    assert stalled not in IterationStore(out / "iter_1").committed()
    # The watchdog's reader thread stops at its next batch (once the hung one ends) and closes Ray Data's
    # iterator there. Let it, before this module's Ray goes: a Ray Data thread that outlives ray.shutdown()
    # starts a new Ray of its own, whose loss later ends the whole pytest process (seen in test_cluster).
    _wait_for_threads("watch-generation", 120)


@pytest.mark.timeout(300)
def test_training_that_records_no_step_is_stopped_by_the_watchdog_naming_the_run(tmp_path, ray_local,
                                                                                 tiny_model_path, monkeypatch):
    import pyarrow as pa

    import selfalign_ray.train.trainer as trainer
    from selfalign_ray.config import to_dict
    from selfalign_ray.watchdog import StallError

    def hung_worker(config):
        """Every rank waits in a collective that never completes (a peer wedged, a lost rank)."""
        time.sleep(40)

    monkeypatch.setattr(trainer, "train_worker", hung_worker)
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": [turn("user", "q1"), turn("user", "q2")],
                             "chosen": [turn("assistant", "a"), turn("assistant", "b")],
                             "rejected": [turn("assistant", "c"), turn("assistant", "d")]}), path)
    cfg = compose(["model=tiny_random", "train.global_batch_size=2", "train.stall_timeout_s=15"])
    started = time.time()
    with pytest.raises(StallError, match=r"^training \(stall-test\): no progress for 15 s "
                                         r"\(0 of 1 optimizer steps recorded\)"):
        trainer.train_model(model_path=tiny_model_path, train_files=[str(path)], output_dir=str(tmp_path / "model"),
                            cfg=cfg.train, deepspeed_cfg=to_dict(cfg.deepspeed), run_name="stall-test")
    assert time.time() - started < 60  # stopped while the workers still hung (40 s from their start)
    # The watchdog leaves trainer.fit() running on its thread (the CLI exits; in-process it ends with the
    # workers). Let it end before this module's Ray goes: a Ray call from a thread that outlives ray.shutdown()
    # can end the whole process later (the driver's core worker exits when it loses its GCS).
    _wait_for_threads("deadline-training", 120)
