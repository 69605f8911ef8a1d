"""Run state end to end (issue 14) on tiny_random: a re-run under changed settings is refused for every finished
step (training, evaluation) and reuses it under settings that cannot change it; one driver per output dir; two
local runs with different output dirs on one machine both finish."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from selfalign_ray.cli import compose
from selfalign_ray.loop import run
from selfalign_ray.steps import StepSettingsError

pytestmark = [pytest.mark.slow]


def _cfg(out, persona_file, *extra):
    return compose(["model=tiny_random", "dataset_size=2", "iterations=1", f"personas.path={persona_file}",
                    f"output_dir={out}", "mode.respond.max_tokens=8", "mode.instruct.max_tokens=12",
                    "train.global_batch_size=2", "train.eval_before_after=false", "eval.enabled=true",
                    "eval.prompts.num_prompts=2", "eval.sampling.max_tokens=6", "eval.judge.kind=logprob", *extra])


@pytest.mark.timeout(900)
def test_a_changed_setting_is_refused_for_every_finished_step(tmp_path, persona_file, ray_local):
    out, stage = tmp_path / "run", tmp_path / "stage"
    first = run(_cfg(out, persona_file, f"train.checkpoint_staging_dir={stage}"))
    it = first["iterations"][0]
    if it["pairs_kept"] == 0:
        pytest.skip("the tiny random model kept no pair (nothing to train)")
    model = out / "iter_1" / "model" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    # Checkpoints were staged in the configured directory (each staging dir removed after its copy), and deleted
    # from storage only after train.json recorded the result.
    assert stage.is_dir() and not list(stage.iterdir())
    assert (out / "iter_1" / "train.json").exists() and not (out / "iter_1" / "model_ray").exists()
    assert it["train_fingerprint"] and "eval_vs_base" in it
    assert not (out / ".lock").exists()

    # Settings that cannot change a result: every step is reused.
    again = run(_cfg(out, persona_file, "train.checkpoint_every_steps=3", "train.max_failures=0",
                     "eval.pool_resources=full"))
    assert model.stat().st_mtime_ns == mtime
    assert again["iterations"][0]["eval_vs_base"]["fingerprint"] == it["eval_vs_base"]["fingerprint"]

    # A training setting: refused, naming it (the reproduction), nothing retrained or reported.
    summary = (out / "summary.json").read_text()
    with pytest.raises(StepSettingsError, match=r"iteration 1: training: .*train.json was made with different "
                                                r"settings \(train.beta: 10.0 -> 2.0; train.learning_rate: "
                                                r"1e-06 -> 1e-05\)"):
        run(_cfg(out, persona_file, "train.learning_rate=1e-5", "train.beta=2.0"))
    with pytest.raises(StepSettingsError, match=r"deepspeed.zero_optimization.offload_optimizer.device: <unset> -> "
                                                r"\"cpu\""):
        run(_cfg(out, persona_file, "deepspeed=zero3_offload"))
    # An evaluation setting: refused too.
    with pytest.raises(StepSettingsError, match=r"eval_vs_base.json was made with different settings "
                                                r"\(eval.sampling.max_tokens: 6 -> 7\)"):
        run(_cfg(out, persona_file, "eval.sampling.max_tokens=7"))
    assert model.stat().st_mtime_ns == mtime and (out / "summary.json").read_text() == summary
    assert not (out / ".lock").exists()  # released after a refusal as well


def _cli(out, persona_file, *extra) -> list[str]:
    return [sys.executable, "-m", "selfalign_ray", "model=tiny_random", "dataset_size=2", "iterations=1",
            f"personas.path={persona_file}", f"output_dir={out}", "mode.respond.max_tokens=6",
            "mode.instruct.max_tokens=8", "train.enabled=false", "cluster.num_cpus=2", *extra]


@pytest.mark.timeout(600)
def test_two_local_runs_on_one_machine_and_a_second_driver_on_one_dir(tmp_path, persona_file):
    """The second local run used to die with "Failed to bind to 127.0.0.1:8265"; nothing stopped a second
    driver from writing into a dir another driver was using."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1")
    a, b = tmp_path / "a", tmp_path / "b"
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: Ray's progress output would fill a pipe
    first = subprocess.Popen(_cli(a, persona_file), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (a / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (a / ".lock").exists(), "the first run never took its lock"
        # A second driver on the same dir: refused at once, naming the holder (before it starts Ray).
        refused = subprocess.run(_cli(a, persona_file), cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2, refused.stderr[-2000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert "in use by another driver" in line and f"pid {first.pid}" in line, line
        time.sleep(3)
        assert first.poll() is None, "the first run finished before the second started: nothing was tested"
        # Another experiment with its own dir, started a few seconds after the first (dashboard on).
        second = subprocess.run(_cli(b, persona_file), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=400)
        assert second.returncode == 0, second.stderr[-3000:]
        first.wait(timeout=400)
        assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    for out in (a, b):
        assert (out / "summary.json").exists() and not (out / ".lock").exists()
