"""Injected faults on a local Ray cluster: no pair is lost or duplicated, no work is silently skipped or redone.

    driver SIGKILLed mid-generation, between generation and training, and between iterations
        -> the same command resumes from the last finished step (subprocesses running `python -m selfalign_ray`)
    a generation actor SIGKILLed mid-stage -> Ray restarts it, the batch is retried, the stage finishes
    shard / reject / marker files truncated or corrupted on disk -> named, regenerated, never trained on

Every run is compared with one fault-free run at the same seed (the `reference` fixture): the same pairs, the same
rejects, manifests whose counts and checksums agree with the files. A training worker killed mid-epoch is
covered by tests/test_train_zero3.py::test_killed_worker_restores_from_last_checkpoint (Ray Train FailureConfig
restores the last checkpoint; the final model loads). A full disk while writing a shard and a NaN loss are in
tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selfalign_ray.cli import compose
from selfalign_ray.data.shards import IterationStore, sha256_file

pytestmark = [pytest.mark.slow]

# 8 personas in 4 chunks of 2; one engine batch = one chunk, so chunks commit one after another.
BASE = ["model=tiny_random", "dataset_size=8", "mode.shard_size=2", "mode.respond.max_tokens=16",
        "mode.instruct.max_tokens=24", "engine.batch_size=2", "train.global_batch_size=2",
        "train.eval_before_after=false"]
CHUNKS = 4

PERSONAS = [
    "A night-shift ICU nurse studying for a pharmacology exam who wants ways to memorise drug interactions.",
    "A retired carpenter in rural Ohio building a cedar greenhouse for his tomato seedlings.",
    "A second-year computer science student debugging a Python web scraper that keeps timing out.",
    "A small bakery owner in Lisbon planning a social media campaign for a new pastry.",
    "A high-school chemistry teacher preparing a lab on reaction rates for fifteen-year-olds.",
    "A freelance translator who wants to set up a simple invoicing spreadsheet.",
    "A marathon runner recovering from a knee injury looking for a safe cross-training plan.",
    "A data analyst at a logistics firm who needs to explain forecast errors to managers.",
    "A volunteer firefighter in Tasmania writing a bushfire safety leaflet for new residents.",
    "A cellist preparing an audition who wants a practice schedule for the last three weeks.",
    "A first-time landlord in Leeds unsure how to handle a tenant's deposit dispute.",
    "A school librarian starting a graphic-novel club for reluctant readers aged twelve.",
    "A beekeeper in Wales whose hives lost half their bees over a wet winter.",
    "A paramedic in Manila learning Spanish on a two-hour daily commute.",
    "A hobby astronomer in Chile choosing between two telescopes on a small budget.",
    "A community gardener in Detroit planning raised beds that wheelchair users can reach.",
]


def overrides(out: Path, personas: Path, *extra: str) -> list[str]:
    return [*BASE, f"personas.path={personas}", f"output_dir={out}", *extra]


def shard_rows(iter_dir: Path) -> list[dict]:
    """Every pair of the iteration (from the manifest's file list), sorted by prompt id."""
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in pq.read_table(s["file"]).to_pylist()]
    return sorted(rows, key=lambda r: r["prompt_id"])


def reject_rows(iter_dir: Path) -> list[dict]:
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    return sorted((r for s in manifest["rejects"] for r in pq.read_table(s["file"]).to_pylist()),
                  key=lambda r: r["row_id"])


def assert_consistent(iter_dir: Path, inputs: int = 8) -> dict:
    """The manifest of a finished iteration agrees with the files: rows, checksums, counts; no duplicates,
    no stray files (shards/*.parquet is exactly the manifest's list, as a glob reader would see it)."""
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["chunks"] == CHUNKS
    assert len(list((iter_dir / "chunks").glob("part-*.json"))) == CHUNKS
    for key, folder in (("shards", "shards"), ("rejects", "rejects")):
        for entry in manifest[key]:
            path = Path(entry["file"])
            assert path.parent == iter_dir / folder
            assert pq.read_metadata(path).num_rows == entry["rows"] and sha256_file(path) == entry["sha256"]
        assert sorted(p.name for p in (iter_dir / folder).glob("*.parquet")) == \
            sorted(Path(e["file"]).name for e in manifest[key])
        assert not list((iter_dir / folder).glob(".*tmp*"))
    pairs = sum(e["rows"] for e in manifest["shards"])
    rejects = sum(e["rows"] for e in manifest["rejects"])
    assert pairs == manifest["pairs_kept"] and rejects == sum(manifest["drops"].values())
    assert pairs + rejects == manifest["inputs"] == inputs
    ids = [r["prompt_id"] for r in shard_rows(iter_dir)]
    assert len(ids) == len(set(ids)) == pairs
    return manifest


def snapshot(iter_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Chunk markers and their shards: marker name -> (marker mtime_ns, shard mtime_ns, the marker's bytes)."""
    out = {}
    for marker in sorted((iter_dir / "chunks").glob("part-*.json")):
        shard = iter_dir / "shards" / (marker.stem + ".parquet")
        out[marker.name] = (marker.stat().st_mtime_ns, shard.stat().st_mtime_ns, marker.read_bytes())
    return out


@pytest.fixture(scope="module")
def personas(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "personas.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "persona": t}) + "\n" for i, t in enumerate(PERSONAS)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, personas, ray_local) -> Path:
    """One fault-free generation at the same seed: the rows every faulty run must end with."""
    from selfalign_ray.loop import run

    out = tmp_path_factory.mktemp("reference") / "run"
    run(compose(overrides(out, personas, "train.enabled=false")))
    assert_consistent(out / "iter_1")
    return out / "iter_1"


# ------------------------------------------------------------------------------------------------ the driver
class Driver:
    """`python -m selfalign_ray ...` as a subprocess with its own embedded Ray; SIGKILLed when `kill_when()`."""

    def __init__(self, args: list[str], cwd: Path):
        self.args, self.cwd, self.runs = args, cwd, 0

    def run(self, kill_when=None, timeout: float = 900) -> tuple[int | None, str]:
        """(exit status, or None when it was killed; its output)."""
        self.runs += 1
        log = self.cwd / f"driver-{self.runs}.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "selfalign_ray", *self.args], stdout=f,
                                    stderr=subprocess.STDOUT, cwd=self.cwd, env=env, start_new_session=True)
        deadline = time.time() + timeout
        killed = False
        try:
            while proc.poll() is None:
                if kill_when is not None and kill_when():
                    self._kill(proc)
                    killed = True
                    break
                if time.time() > deadline:
                    raise TimeoutError(f"driver run {self.runs} took more than {timeout} s; see {log}")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                self._kill(proc)
        return (None if killed else proc.returncode), log.read_text(errors="replace")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGKILL the driver (nothing runs after it: no handler, no atexit); its embedded Ray goes down with it
        (Ray's reaper), and whatever of that Ray is still alive 20 s later is SIGKILLed here, by pid."""
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(family, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


def _manifest_complete(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


@pytest.mark.timeout(2400)
def test_driver_killed_mid_generation_and_between_steps_resumes_each_time(tmp_path, personas, request):
    out = tmp_path / "run"
    it1, it2 = out / "iter_1", out / "iter_2"
    driver = Driver(overrides(out, personas, "iterations=2", "cluster.num_cpus=2", "cluster.include_dashboard=false"),
                    cwd=tmp_path)

    # 1. SIGKILL as soon as the first chunk is committed: mid-generation.
    status, _ = driver.run(kill_when=lambda: any((it1 / "chunks").glob("part-*.json")))
    assert status is None
    after_kill = snapshot(it1)
    k = len(after_kill)
    assert 1 <= k < CHUNKS, f"{k} chunks committed when the driver was killed: the fault came too late"
    assert json.loads((it1 / "manifest.json").read_text())["status"] == "partial"

    # 2. Same command; SIGKILL once iteration 1's generation is complete (between generation and training).
    status, log = driver.run(kill_when=lambda: _manifest_complete(it1 / "manifest.json"))
    assert status is None, log[-3000:]
    assert f"resuming: {k} of {CHUNKS} chunks already committed" in log
    after_generation = snapshot(it1)
    assert {n: after_generation[n] for n in after_kill} == after_kill  # committed chunks kept, not redone
    manifest = assert_consistent(it1)
    assert manifest["generation"]["rows_generated"] == 8 - 2 * k  # only the missing chunks were generated
    assert not (it1 / "train.json").exists()

    # 3. Same command; SIGKILL once iteration 1's training is recorded (between iterations).
    status, log = driver.run(kill_when=lambda: (it1 / "train.json").exists())
    assert status is None, log[-3000:]
    assert f"resuming: {CHUNKS} of {CHUNKS} chunks already committed" in log  # no regeneration
    assert snapshot(it1) == after_generation
    model = it1 / "model" / "model.safetensors"
    trained = (model.stat().st_mtime_ns, json.loads((it1 / "train.json").read_text()))

    # 4. Same command, to the end: iteration 1 is neither regenerated nor retrained.
    status, log = driver.run()
    assert status == 0, log[-5000:]
    assert "iteration 1: training already done" in log
    assert snapshot(it1) == after_generation
    assert (model.stat().st_mtime_ns, json.loads((it1 / "train.json").read_text())) == trained
    summary = json.loads((out / "summary.json").read_text())
    assert [i["iteration"] for i in summary["iterations"]] == [1, 2]
    assert_consistent(it1)
    m2 = assert_consistent(it2)
    assert m2["model"] == str(it1 / "model") and m2["train"]["init_model"] == str(it1 / "model")
    assert (it2 / "model" / "model.safetensors").exists()

    # The pairs and rejects of iteration 1 are exactly those of a fault-free run at the same seed.
    ref = request.getfixturevalue("reference")  # starts the in-process Ray only now, after the subprocesses
    assert shard_rows(it1) == shard_rows(ref)
    assert reject_rows(it1) == reject_rows(ref)


# ------------------------------------------------------------------------------------------ an engine actor
def _kill_first_live_pool_actor(chunks: Path, done: dict, deadline: float) -> None:
    """SIGKILL the generation pool's actor as soon as it is up (Ray marks it ALIVE once its engine is built),
    i.e. while it holds its first batches. Waiting for the first committed chunk instead raced: with a
    tiny model Ray Data can finish every batch before the driver commits chunk 1, and the pool is gone."""
    from ray._private import state

    while time.time() < deadline:
        for actor in state.actors().values():  # actors of this test's own local cluster only
            if "MapWorker" in actor.get("ActorClassName", "") and actor.get("State") == "ALIVE":
                done["committed_at_kill"] = len(list(chunks.glob("part-*.json")))
                os.kill(actor["Pid"], signal.SIGKILL)
                done.setdefault("pids", []).append(actor["Pid"])
        if done.get("pids"):
            return
        time.sleep(0.02)


@pytest.mark.timeout(900)
def test_killed_generation_actor_is_restarted_and_nothing_is_lost(tmp_path, personas, reference, ray_local):
    from selfalign_ray.loop import run

    out = tmp_path / "run"
    done: dict = {}
    killer = threading.Thread(target=_kill_first_live_pool_actor,
                              args=(out / "iter_1" / "chunks", done, time.time() + 600), daemon=True)
    killer.start()
    report = run(compose(overrides(out, personas, "train.enabled=false")))
    killer.join(timeout=5)
    assert done.get("pids"), "no pool actor was found to kill"
    assert done["committed_at_kill"] < CHUNKS, "the actor was killed after the last chunk: no fault injected"
    manifest = assert_consistent(out / "iter_1")
    assert manifest["pairs_kept"] == report["iterations"][0]["pairs_kept"]
    assert shard_rows(out / "iter_1") == shard_rows(reference)
    assert reject_rows(out / "iter_1") == reject_rows(reference)


# ---------------------------------------------------------------------------------------- damaged files
@pytest.mark.timeout(900)
def test_damaged_shards_are_named_regenerated_and_never_trained_on(tmp_path, personas, reference, ray_local,
                                                                   monkeypatch, caplog):
    import selfalign_ray.loop as loop

    out = tmp_path / "run"
    shutil.copytree(reference.parent, out)
    it1 = out / "iter_1"
    intact = snapshot(it1)["part-00000.json"]
    truncated = it1 / "shards" / "part-00001.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-50])
    flipped = it1 / "rejects" / "part-00002.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    flipped.write_bytes(bytes(data))
    (it1 / "chunks" / "part-00003.json").write_text('{"chunk_id": 3, "shard": {"fi')  # a damaged marker
    damaged = {sha256_file(truncated), sha256_file(flipped)}

    trained_on = []

    def fake_train(cfg, k, init_model, files, iter_dir):
        iter_dir = Path(iter_dir)  # the loop passes a path string (data/storage.py: a path or a URI)
        # What the trainer would read: every file must verify against its marker at this moment.
        markers = IterationStore(iter_dir).committed()
        recorded = {m["shard"]["file"]: m["shard"]["sha256"] for m in markers.values()}
        for f in files:
            assert sha256_file(Path(f)) == recorded[Path(f).name]
        trained_on.extend(files)
        (iter_dir / "model").mkdir(exist_ok=True)
        return {"model_dir": str(iter_dir / "model"), "summary": {"rows": 0, "steps": 0}, "history": [],
                "init_model": init_model, "train_files": files}

    monkeypatch.setattr(loop, "_train", fake_train)
    caplog.set_level(logging.INFO)
    loop.run(compose(overrides(out, personas)))

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"chunk part-00001.json will be regenerated: {truncated} does not match its checksum" in w
               for w in warnings), warnings
    assert any(f"chunk part-00002.json will be regenerated: {flipped} does not match its checksum" in w
               for w in warnings), warnings
    assert any("chunk part-00003.json will be regenerated" in w and "part-00003.json is unreadable" in w
               for w in warnings), warnings
    assert f"resuming: 1 of {CHUNKS} chunks already committed" in caplog.text
    assert snapshot(it1)["part-00000.json"] == intact  # the undamaged chunk is kept as it was
    manifest = assert_consistent(it1)
    assert trained_on == [s["file"] for s in manifest["shards"] if s["rows"] > 0]
    assert not {sha256_file(Path(f)) for f in trained_on} & damaged
    assert shard_rows(it1) == shard_rows(reference)
    assert reject_rows(it1) == reject_rows(reference)
