"""Run state on disk (issue 14): step fingerprints, one writer per output dir, file-safety details.
Pure unit tests (no Ray); the end-to-end checks are in test_run_state_e2e.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys

import pyarrow as pa
import pytest

from selfalign_ray.data.runlock import RunLock, RunLockedError, _proc_start
from selfalign_ray.data.schema import PAIR_SCHEMA, REJECT_SCHEMA
from selfalign_ray.data.shards import ChunkStats, IterationStore, ResumeMismatchError, atomic_write_bytes, temp_name
from selfalign_ray.steps import (
    StepSettingsError,
    differences,
    model_identity,
    run_step,
    train_settings,
)
from selfalign_ray.train.config import TrainConfig


# ------------------------------------------------------------------------------------------ fingerprints
def _settings(**train):
    return train_settings(TrainConfig(**train), {"zero_optimization": {"stage": 3, "overlap_comm": False},
                                                 "steps_per_print": 10},
                          {"path": "/m", "content": "abc"}, [{"file": "iter_1/shards/a.parquet", "sha256": "1"}],
                          "simpo")


def test_a_finished_step_is_reused_under_its_settings_and_refused_under_others(tmp_path):
    record = tmp_path / "train.json"
    calls = []
    work = lambda: calls.append(1) or {"model_dir": "m", "summary": {}}
    first = run_step(record, "iteration 1: training", _settings(), work)
    assert calls == [1] and json.loads(record.read_text())["fingerprint"] == first["fingerprint"]
    assert run_step(record, "iteration 1: training", _settings(), work)["fingerprint"] == first["fingerprint"]
    assert calls == [1]  # reused
    with pytest.raises(StepSettingsError) as err:
        run_step(record, "iteration 1: training", _settings(learning_rate=1e-5, beta=2.0), work)
    message = str(err.value)
    assert "train.learning_rate: 1e-06 -> 1e-05" in message and "train.beta: 10.0 -> 2.0" in message
    assert str(record) in message and calls == [1] and "\n" not in message
    # The CLI's user-error path (exit 2) catches it.
    from selfalign_ray.cli import _user_errors

    assert isinstance(err.value, _user_errors())


def test_settings_that_cannot_change_the_result_do_not_count(tmp_path):
    record = tmp_path / "train.json"
    run_step(record, "training", _settings(), lambda: {"model_dir": "m"})
    # Checkpoint cadence, restarts, CPU reservations and the staging dir: same model.
    same = _settings(checkpoint_every_steps=7, max_failures=0, cpus_per_worker=0.25, checkpoint_staging_dir="/x")
    run_step(record, "training", same, lambda: pytest.fail("must be reused"))
    quiet = train_settings(TrainConfig(), {"zero_optimization": {"stage": 3, "overlap_comm": True},
                                           "steps_per_print": 1}, {"path": "/m", "content": "abc"},
                           [{"file": "iter_1/shards/a.parquet", "sha256": "1"}], "simpo")
    run_step(record, "training", quiet, lambda: pytest.fail("must be reused"))
    # ... but the ZeRO stage, the init model's content and the data do.
    for changed, key in (({"zero_optimization": {"stage": 2}}, "deepspeed.zero_optimization.stage: 3 -> 2"),):
        s = train_settings(TrainConfig(), changed, {"path": "/m", "content": "abc"},
                           [{"file": "iter_1/shards/a.parquet", "sha256": "1"}], "simpo")
        with pytest.raises(StepSettingsError, match=key):
            run_step(record, "training", s, lambda: {})
    s = train_settings(TrainConfig(), {"zero_optimization": {"stage": 3}}, {"path": "/m", "content": "abd"},
                       [{"file": "iter_1/shards/a.parquet", "sha256": "2"}], "simpo")
    with pytest.raises(StepSettingsError, match=r"data: .* -> .*; init_model.content: \"abc\" -> \"abd\""):
        run_step(record, "training", s, lambda: {})


def test_a_record_without_settings_is_not_reused(tmp_path):
    record = tmp_path / "train.json"
    record.write_text(json.dumps({"model_dir": "m"}))
    with pytest.raises(StepSettingsError, match="without the settings it ran with"):
        run_step(record, "training", _settings(), lambda: {})


def test_after_runs_once_the_record_exists(tmp_path):
    """train.json is written before the checkpoints are deleted: a crash between costs no retraining."""
    record = tmp_path / "train.json"
    seen = []
    run_step(record, "training", _settings(), lambda: {"model_dir": "m"}, after=lambda r: seen.append(record.exists()))
    run_step(record, "training", _settings(), lambda: {}, after=lambda r: seen.append(record.exists()))
    assert seen == [True, True]  # also on a reuse: leftovers of a crash right after the record are removed


def test_model_identity_follows_the_files_not_the_run_logs(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text('{"hidden_size": 8}')
    (m / "model.safetensors").write_bytes(b"weights")
    first = model_identity(str(m))
    (m / "train_summary.json").write_text("{}")  # written by training, changes every run
    assert model_identity(str(m)) == first
    (m / "config.json").write_text('{"hidden_size": 16}')
    assert model_identity(str(m))["content"] != first["content"]
    assert model_identity(str(m), "f" * 64) == {"path": str(m), "step": "f" * 64}
    assert differences({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == ["a.b: 1 -> 2", "c: <unset> -> 3"]


# ------------------------------------------------------------------------------------------ the lock
def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and "started" in info
        # Another live process on this host holds it (here: our parent, which is alive).
        lock.path.write_text(json.dumps({**info, "pid": os.getppid(), "proc_start": _proc_start(os.getppid())}))
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
        assert f"pid {os.getppid()}" in str(err.value) and socket.gethostname() in str(err.value)
        assert isinstance(err.value, ResumeMismatchError)  # a user error: exit 2
        lock.path.write_text(json.dumps(info))
    assert not (tmp_path / ".lock").exists()  # removed at exit


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="selfalign_ray.data.runlock"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert any("taking over" in r.message and f"pid {dead.pid}" in r.message for r in caplog.records)
    lock.release()
    assert not list(tmp_path.iterdir())


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "other-node", "pid": 1, "started": "x",
                                                "ray_job": {"submission_id": "raysubmit_1"}}))
    with pytest.raises(RunLockedError) as err:
        RunLock(tmp_path).acquire()
    message = str(err.value)
    assert "other-node" in message and "raysubmit_1" in message and f"delete {tmp_path / '.lock'}" in message
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "other-node"
    (tmp_path / ".lock").write_text("{half")
    with pytest.raises(RunLockedError, match="unreadable"):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_someone_else_took_over(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text(json.dumps({"host": "other-node", "pid": 1}))
    lock.release()
    assert (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------------ file safety
def test_atomic_write_fsyncs_the_directory_and_uses_unique_exclusive_temp_names(tmp_path, monkeypatch):
    a, b = temp_name(tmp_path / "x.json"), temp_name(tmp_path / "x.json")
    assert a != b and socket.gethostname() in a.name and f"-{os.getpid()}-" in a.name
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    atomic_write_bytes(tmp_path / "x.json", b"1")
    assert synced == [False, True]  # the file, then its directory (after the rename)
    # A temp name someone else created is never written into (O_EXCL); the error names the target.
    taken = tmp_path / ".taken"
    taken.write_bytes(b"theirs")
    monkeypatch.setattr("selfalign_ray.data.shards.temp_name", lambda p: taken)
    with pytest.raises(OSError, match="could not write .*x.json"):
        atomic_write_bytes(tmp_path / "x.json", b"2")
    assert taken.read_bytes() == b"theirs" and (tmp_path / "x.json").read_bytes() == b"1"


@pytest.mark.parametrize("name", ["../../outside.parquet", "/etc/passwd", "sub/part.parquet", ".."])
def test_a_marker_file_field_may_not_leave_the_iteration_dir(tmp_path, caplog, name):
    store = IterationStore(tmp_path / "iter_1")
    stats = ChunkStats(inputs=0)
    store.commit_chunk(1, PAIR_SCHEMA.empty_table(), REJECT_SCHEMA.empty_table(), stats)
    store.commit_chunk(2, pa.Table.from_pylist([], schema=PAIR_SCHEMA), REJECT_SCHEMA.empty_table(), stats)
    marker_path = store.chunks_dir / "part-00002.json"
    marker = json.loads(marker_path.read_text())
    outside = tmp_path / "outside.parquet"
    outside.write_bytes((store.shards_dir / "part-00002.parquet").read_bytes())  # checksum would match
    marker["shard"]["file"] = name
    marker_path.write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="selfalign_ray.data.shards"):
        assert list(store.committed()) == [1]
    assert any("part-00002.json" in r.getMessage() and repr(name) in r.getMessage() for r in caplog.records)


def test_the_lock_records_the_ray_job_once_ray_runs(tmp_path, monkeypatch):
    from selfalign_ray.data import runlock

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_7"}}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["ray_job"] == {"submission_id": "raysubmit_7"}
        monkeypatch.setattr(runlock, "_ray_job", lambda: {"job_id": "01000000", "submission_id": "raysubmit_7"})
        runlock.note_ray_job()
        assert json.loads((tmp_path / ".lock").read_text())["ray_job"]["job_id"] == "01000000"
    assert not runlock._HELD


def test_a_reused_pid_does_not_keep_a_dead_drivers_lock(tmp_path):
    """The pid is alive (our parent) but started at another time than the lock's holder: the holder is gone."""
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                "proc_start": "1", "started": "x"}))
    if not os.path.exists(f"/proc/{os.getppid()}/stat"):
        pytest.skip("no /proc on this platform")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
