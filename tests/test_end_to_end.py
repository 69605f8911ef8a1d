"""The main command on the embedded SmolLM2-135M: generation, SimPO training, a loadable model."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_default_command_on_smollm2_with_a_handful_of_personas(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfalign_ray", "dataset_size=6", f"output_dir={out}",
           "mode.respond.max_tokens=48", "mode.instruct.max_tokens=48", "train.global_batch_size=2",
           "cluster.include_dashboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "pairs kept of 6 inputs" in proc.stdout

    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"] == 6
    assert manifest["pairs_kept"] + sum(manifest["drops"].values()) == 6
    assert manifest["pairs_kept"] >= 1, manifest["drops"]
    assert "smollm2-135m-instruct" in manifest["model"]

    summary = json.loads((out / "summary.json").read_text())
    model_dir = summary["iterations"][0]["model"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.chat_template and sum(p.numel() for p in model.parameters()) > 100_000_000
