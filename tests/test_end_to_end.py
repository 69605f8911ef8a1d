"""The main command on the embedded SmolLM2-135M: generation, SimPO training, a loadable model."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_default_command_on_smollm2_with_a_handful_of_personas(tmp_path):
    out = tmp_path / "run"
    # 48 tokens cut most SmolLM2 answers: keep_without_eos keeps them (marked) so that there are pairs to train.
    cmd = [sys.executable, "-m", "selfalign_ray", "dataset_size=6", f"output_dir={out}",
           "mode.respond.max_tokens=48", "mode.instruct.max_tokens=48", "train.global_batch_size=2",
           "mode.truncation=keep_without_eos", "cluster.include_dashboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "pairs kept of 6 inputs" in proc.stdout

    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"] == 6
    assert manifest["pairs_kept"] + sum(manifest["drops"].values()) == 6
    assert manifest["pairs_kept"] >= 1, manifest["drops"]
    assert "smollm2-135m-instruct" in manifest["model"]
    # Every completion is counted; the cut ones are kept and marked in the shard.
    cut = manifest["cut"]
    assert cut["instruct"]["completions"] == 6 and cut["respond"]["completions"] >= 2 * manifest["pairs_kept"]
    import pyarrow.parquet as pq

    shard = pq.read_table(manifest["shards"][0]["file"]).to_pydict()
    marks = shard["chosen_finish_reason"] + shard["rejected_finish_reason"]
    assert set(marks) <= {"stop", "length"} and len(marks) == 2 * manifest["pairs_kept"]
    assert sum(m == "length" for m in marks) <= cut["respond"]["length"]

    summary = json.loads((out / "summary.json").read_text())
    model_dir = summary["iterations"][0]["model"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.chat_template and sum(p.numel() for p in model.parameters()) > 100_000_000
