"""The Ray-free training core (selfalign_ray/train/core.py) under torchrun with gloo, on the tiny random model.

- exact normalisation: one optimizer step on the same 8 pairs gives the same loss and the same full gradient
  (fp32 tolerance) for 1 rank x 4 micro-batches, 2 ranks x 2, uneven micro-batches (3+1 / 1+3 pairs, packed
  and padded), and equals a plain-torch reference (the whole step in one batch, no DeepSpeed);
- non-finite values stop the step before the update (loss: naming micro-batch and step; gradient: DeepSpeed's
  skipped update), weights untouched;
- the torchrun smoke entry point (`python -m selfalign_ray.train.smoke`) with 2 CPU processes.
Plus CPU unit checks of the host-sync-free pieces: counts from the CPU batch, flash-attention-2 boundaries.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, args: list[str], timeout: int) -> str:
    proc = subprocess.run([*TORCHRUN, f"--nproc_per_node={nproc}", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def core_runs(tmp_path_factory, tiny_model_path):
    """The worker script once with 1 process (+ the non-finite steps) and once with 2."""
    base = tmp_path_factory.mktemp("core")
    worker = str(ROOT / "tests" / "train_core_worker.py")
    _torchrun(1, [worker, "--out", str(base / "w1"), "--nonfinite"], timeout=300)
    _torchrun(2, [worker, "--out", str(base / "w2")], timeout=300)
    return base


def _reference(objective: str) -> tuple[float, dict]:
    """The step's objective on all 8 pairs in one padded batch, plain torch: SimPO mean over pairs + 0.5 x
    token-mean NLL of the chosen responses; SFT token mean over all response tokens."""
    sys.path.insert(0, str(ROOT / "tests"))
    import train_core_worker as w
    from transformers import AutoModelForCausalLM

    from selfalign_ray.models.tiny import tiny_random_path
    from selfalign_ray.train.data import collate, response_logps
    from selfalign_ray.train.simpo import simpo_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_random_path()), attn_implementation="sdpa")
    pairs = w.pairs()
    examples = [c for c, _ in pairs] + ([r for _, r in pairs] if objective == "simpo" else [])
    batch = collate(examples, 0, padding_free=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    sums, counts = response_logps(logits, batch)
    if objective == "sft":
        loss = -sums.sum() / counts.sum()
    else:
        avg = sums / counts
        losses, _, _ = simpo_loss(avg[:8], avg[8:], beta=2.0, gamma_beta_ratio=0.3)
        loss = losses.mean() + 0.5 * (-sums[:8].sum() / counts[:8].sum())
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.timeout(700)
@pytest.mark.parametrize("objective", ["simpo", "sft"])
def test_one_step_is_the_same_for_every_split_into_micro_batches_and_ranks(core_runs, objective):
    ref_loss, ref_grads = _reference(objective)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for world in ("w1", "w2"):
        for layout in ("even", "uneven", "uneven_padded"):
            got = torch.load(core_runs / world / f"{objective}-{layout}.pt")
            assert got["examples"] == 8
            assert got["loss"] == pytest.approx(ref_loss, rel=1e-5), (world, layout)
            assert got["grads"].keys() == ref_grads.keys()
            for name, grad in ref_grads.items():
                diff = (got["grads"][name] - grad).abs().max().item()
                assert diff <= 1e-5 * scale, (world, layout, name, diff, scale)


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_non_finite_loss_or_gradient_stops_before_the_update(core_runs):
    report = json.loads((core_runs / "w1" / "nonfinite.json").read_text())
    assert report["clean_step_moved_weights"]  # the learning rate is real, so "unchanged" below means something
    assert re.fullmatch(r"non-finite gradient norm (inf|nan) at optimizer step 2 \(epoch 0, micro-batches 0-3\) "
                        r"with a finite loss [\d.]+; DeepSpeed skipped the update, the last checkpoint is kept",
                        report["nan_grad_error"]), report["nan_grad_error"]
    assert report["nan_grad_weights_unchanged"]
    assert report["nan_loss_error"].startswith(
        "non-finite loss nan at optimizer step 3 (epoch 0, micro-batch 2); the last checkpoint is kept")
    assert report["nan_loss_weights_unchanged"]


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_random_weights_from_a_llama_shape_are_initialised_and_train(core_runs, tiny_model_path):
    """`smoke --llama-shape` (the GPU check's 1B model) on CPU with the tiny shape: built from the config under
    zero.Init, initialised (not left empty), one finite step."""
    from transformers import AutoModelForCausalLM

    report = json.loads((core_runs / "w1" / "from_config.json").read_text())
    same_shape = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert report["params"] == sum(p.numel() for p in same_shape.parameters())
    assert report["all_finite"] and all(0.005 < s < 0.1 for s in report["weights_std"].values()), report
    assert math.isfinite(report["loss"]) and math.isfinite(report["grad_norm"]) and report["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_smoke_two_cpu_processes(tmp_path, tiny_model_path):
    # --bf16 on CPU: the CPU bf16 path (train/precision.py: autocast, fp32 ZeRO-3 partitions) through the core,
    # with the ranks agreeing on it over gloo; the fp32 core is covered by core_runs above.
    out = _torchrun(2, ["-m", "selfalign_ray.train.smoke", "--model", "tiny_random", "--steps", "3", "--bf16",
                        "--seq-len", "64", "--out", str(tmp_path / "smoke")], timeout=240)
    assert "bf16_autocast" in out, out[-3000:]
    steps = re.findall(r"^step (\d+)/3 loss (\S+) tokens (\d+) tokens/s (\S+)", out, re.M)
    assert [int(s[0]) for s in steps] == [1, 2, 3], out[-3000:]
    assert all(math.isfinite(float(s[1])) and int(s[2]) > 0 for s in steps)
    assert "backend gloo" in out
    summary = re.search(r"^SMOKE SUMMARY steps 3 world 2 device cpu params (\d+) tokens_per_s (\S+) "
                        r"peak_mem_gib (\S+) \(rss\) mfu n/a", out, re.M)
    assert summary, out[-3000:]
    assert float(summary.group(2)) > 0 and float(summary.group(3)) > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smoke" / "hf")  # the HF export loads
    assert sum(p.numel() for p in model.parameters()) == int(summary.group(1))


# ---------------------------------------------------------------------------------------------------------
# CPU unit checks: counts before the device copy, precomputed flash-attention-2 boundaries.
# ---------------------------------------------------------------------------------------------------------

def _examples():
    from selfalign_ray.train.data import IGNORE, Example

    # Two pairs: chosen 0,1 then rejected 2,3; prompts of 2 tokens are masked.
    seqs = [([5, 6, 7, 8], 2), ([5, 6, 9], 2), ([5, 6, 7, 7, 7], 2), ([5, 6, 3, 4, 4, 4], 2)]
    return [Example(ids, [IGNORE] * p + ids[p:]) for ids, p in seqs]


@pytest.mark.parametrize("packed", [True, False])
def test_counts_come_from_the_cpu_batch_and_match_the_loss_counts(packed):
    from selfalign_ray.train.data import collate, response_logps
    from selfalign_ray.train.objectives import batch_counts

    batch = collate(_examples(), 0, packed)
    c = batch_counts(batch, "simpo")
    _, per_seq = response_logps(torch.zeros(*batch["input_ids"].shape, 16), batch)
    assert (c.examples, c.tokens) == (2, 18)
    assert c.response_tokens == int(per_seq.sum()) == 2 + 1 + 3 + 4
    assert c.chosen_response_tokens == int(per_seq[:2].sum()) == 3
    sft = batch_counts(batch, "sft")
    assert (sft.examples, sft.chosen_response_tokens) == (4, sft.response_tokens)


def test_flash_attention_2_gets_precomputed_boundaries_of_the_packed_row():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from selfalign_ray.train.data import collate
    from selfalign_ray.train.objectives import flash_varlen_kwargs, model_inputs

    packed = collate(_examples(), 0, True)
    kw = flash_varlen_kwargs(packed["position_ids"], "cpu")
    assert kw["cu_seq_lens_q"].tolist() == [0, 4, 7, 12, 18] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 6 and isinstance(kw["max_length_q"], int)
    # What transformers would derive on the device in every layer, computed once here.
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(packed["position_ids"])
    assert torch.equal(kw["cu_seq_lens_q"], cu_q) and torch.equal(kw["cu_seq_lens_k"], cu_k)
    assert kw["max_length_q"] == int(max_q)
    assert set(kw) <= set(model_inputs(packed, "cpu", "flash_attention_2"))
    assert "cu_seq_lens_q" not in model_inputs(packed, "cpu", "sdpa")
    padded = collate(_examples(), 0, False)
    assert "cu_seq_lens_q" not in model_inputs(padded, "cpu", "flash_attention_2")


def test_metric_window_reads_sums_once_and_names_the_first_non_finite_micro_batch():
    from selfalign_ray.train.collectives import Collectives
    from selfalign_ray.train.objectives import STATS, BatchCounts, MetricWindow, MicroBatchSums

    def out(loss):
        stats = torch.tensor([loss, 1.0, 0.5, 0.25, 2.0], dtype=torch.float64)
        return MicroBatchSums(BatchCounts(2, 10, 6, 3), torch.tensor(loss), torch.tensor(0.0), stats)

    window = MetricWindow("cpu")
    for micro, loss in enumerate([1.0, 2.0, float("nan"), float("inf")]):
        window.add(out(loss), code=micro)
    totals = window.all_ranks(Collectives("cpu"))
    assert len(STATS) == 5 and totals["examples"] == 8 and totals["tokens"] == 40 and totals["nonfinite"] == 2
    assert window.first_nonfinite(Collectives("cpu")) == (2, 0)


def test_smoke_resolves_presets_and_knows_gpu_peaks(tiny_model_path):
    from selfalign_ray.train.smoke import LLAMA_SHAPES, peak_tflops, random_pairs, resolve_model

    assert resolve_model("tiny_random") == tiny_model_path
    assert resolve_model(tiny_model_path) == str(Path(tiny_model_path).resolve())
    with pytest.raises(SystemExit, match="neither a directory nor a preset in conf/model"):
        resolve_model("no_such_model")
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("cpu") is None
    # The 1B shape is Llama-3.2-1B's: ~1.24e9 parameters with tied embeddings.
    from transformers import LlamaConfig

    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPES["1b"])).parameters())
    assert 1.2e9 < n < 1.3e9
    import random

    for chosen, rejected in random_pairs(5, 512, 64, random.Random(0)):
        assert len(chosen.input_ids) <= 64 and len(rejected.input_ids) <= 64
        assert chosen.input_ids[:3] == rejected.input_ids[:3] and all(3 <= t < 512 for t in chosen.input_ids)


def test_precomputed_boundaries_reach_every_attention_layer(tiny_model_path):
    """The CPU stand-in for flash-attention-2: an attention function registered with transformers records the
    kwargs each layer receives when the packed batch's model inputs (built for FA2) go through the real model."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from selfalign_ray.train.data import collate
    from selfalign_ray.train.objectives import model_inputs

    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("selfalign_test_recording", recording)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="selfalign_test_recording")
    packed = collate(_examples(), 0, True)
    with torch.no_grad():
        model(**model_inputs(packed, "cpu", "flash_attention_2"))
    assert len(seen) == model.config.num_hidden_layers
    for cu_q, cu_k, longest in seen:
        assert cu_q.tolist() == cu_k.tolist() == [0, 4, 7, 12, 18] and longest == 6
