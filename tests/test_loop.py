"""The generate -> train loop: iteration k generates with the model trained in iteration k-1."""

import json

import pytest

from selfalign_ray.cli import compose
from selfalign_ray.loop import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_iterations_on_tiny_random(tmp_path, persona_file, ray_local):
    out = tmp_path / "run"
    cfg = compose(["model=tiny_random", "dataset_size=4", "iterations=2", f"personas.path={persona_file}",
                   f"output_dir={out}", "mode.respond.max_tokens=12", "mode.instruct.max_tokens=16",
                   "train.global_batch_size=2", "train.eval_before_after=false"])
    report = run(cfg)
    first, second = report["iterations"]
    assert first["model"] == str(out / "iter_1" / "model")
    assert second["generator_model"] == first["model"]  # iteration 2 generated with iteration 1's model
    m2 = json.loads((out / "iter_2" / "manifest.json").read_text())
    assert m2["model"] == first["model"]
    assert m2["train"]["init_model"] == first["model"]  # SAO trains from the previous iteration
    assert m2["train"]["summary"]["steps"] >= 1
    # Iterations take different personas (consecutive slices of one seeded shuffle).
    assert m2["inputs"] == 4 and (out / "iter_2" / "model" / "model.safetensors").exists()

    # Re-running the finished command redoes nothing.
    mtime = (out / "iter_2" / "model" / "model.safetensors").stat().st_mtime_ns
    again = run(cfg)
    assert (out / "iter_2" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    assert [i["pairs_kept"] for i in again["iterations"]] == [i["pairs_kept"] for i in report["iterations"]]
