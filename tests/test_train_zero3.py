"""SimPO and SFT through Ray Train's TorchTrainer with DeepSpeed ZeRO-3 on 2 CPU workers (tiny random Llama).

Each run starts two Ray Train workers that import torch, transformers and DeepSpeed (most of the wall time);
the data is a fixed synthetic preference set (chosen: one fixed phrasing, rejected: another) and the learning
rate is high, so that preference accuracy and margin rise measurably within a dozen optimizer steps.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign_ray.cli import compose
from selfalign_ray.config import ConfigError
from selfalign_ray.data.schema import PAIR_SCHEMA, assistant_turn, prompt_id, user_turn
from selfalign_ray.train import train_model
from selfalign_ray.train.schedule import lr_multiplier
from selfalign_ray.train.trainer import CRASH_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TOPICS = ["rivers", "bread", "chess", "tides", "bees", "trains", "clouds", "maps",
          "violins", "glaciers", "ferns", "bridges", "comets", "owls", "salt", "kites",
          "lanterns", "deserts", "pianos", "volcanoes"]


def preference_file(path, topics):
    rows = []
    for topic in topics:
        prompt = f"Tell me one fact about {topic}."
        rows.append({"prompt_id": prompt_id(prompt), "prompt": user_turn(prompt),
                     "chosen": assistant_turn(f"Here is a clear fact about {topic}."),
                     "rejected": assistant_turn("no no no no"), "mode": "sao", "iteration": 1,
                     "source": "test", "generator_model": "tiny", "judge_confidence": 1.0,
                     "chosen_tokens": 8, "rejected_tokens": 4})
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    return str(path)


def train_cfg(*overrides):
    cfg = compose(["train.global_batch_size=4", "train.learning_rate=0.005", "train.warmup_ratio=0",
                   "train.lr_scheduler=constant", "train.epochs=3", "train.beta=2.0", *overrides])
    return cfg.train, cfg.deepspeed


@pytest.mark.timeout(300)
def test_simpo_zero3_raises_preference_and_saves_a_loadable_model(tmp_path, tiny_model_path, ray_local):
    train, ds = train_cfg()
    result = train_model(model_path=tiny_model_path, train_files=[preference_file(tmp_path / "p.parquet", TOPICS[:16])],
                         eval_files=[preference_file(tmp_path / "heldout.parquet", TOPICS[16:])],
                         output_dir=str(tmp_path / "model"), cfg=train, deepspeed_cfg=ds)
    s = result.summary
    # 16 pairs over 2 ranks = 8 micro-batches per rank per epoch; accumulation 4 / (1 x 2) = 2 -> 4 steps x 3 epochs.
    assert s["steps"] == 12 and [h["step"] for h in result.history] == list(range(1, 13))
    assert s["after"]["mean_margin"] > s["before"]["mean_margin"] + 1.0
    assert s["before"]["preference_accuracy"] < 1.0 and s["after"]["preference_accuracy"] == 1.0
    # The preference carries over to prompts it never trained on.
    assert s["eval_after"]["mean_margin"] > s["eval_before"]["mean_margin"] + 1.0 and s["eval_after"]["pairs"] == 4
    for h in result.history:
        assert {"loss", "reward_chosen", "reward_rejected", "margin", "preference_accuracy", "tokens_per_s", "lr"} <= h.keys()
        assert h["lr"] == pytest.approx(0.005) and h["tokens_per_s"] > 0
    assert s["mean_tokens_per_s"] > 0 and s["tokens"] > 0
    # ZeRO-3 really partitions: outside a gather rank 0 holds no full parameter, only its half of each.
    part = s["zero3_partition_rank0"]
    assert part["materialised"] == 0 and part["total"] / 2 <= part["partition"] <= part["total"] / 2 + 1024

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(result.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(p.numel() for p in model.parameters()) == part["total"]
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert not (tmp_path / "model_ray").exists()  # checkpoints are removed after success


@pytest.mark.timeout(300)
def test_sft_on_fewer_rows_than_one_global_batch(tmp_path, tiny_model_path, ray_local):
    """6 examples, global batch 8: each epoch is one optimizer step on the 6 there are (3 per rank,
    a short accumulation window), through the padded (not packed) batch path."""
    rows = [{"prompt": user_turn(f"Say hi to {t}."), "completion": assistant_turn(f"Hi {t}!")} for t in TOPICS[:6]]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    train, ds = train_cfg("train.global_batch_size=8", "train.padding_free=false")
    result = train_model(model_path=tiny_model_path, train_files=[str(path)], output_dir=str(tmp_path / "sft"),
                         cfg=train, deepspeed_cfg=ds, objective="sft")
    s = result.summary
    assert s["plan"]["smaller_than_global_batch"] and s["plan"]["micro_per_epoch"] == 3
    assert s["steps"] == 3 and [h["examples"] for h in result.history] == [6, 6, 6]
    assert s["after"]["mean_loss"] < s["before"]["mean_loss"] - 0.5


@pytest.mark.timeout(420)
def test_killed_worker_restores_from_last_checkpoint(tmp_path, tiny_model_path, ray_local, monkeypatch):
    # The last rank exits hard right after optimizer step 7, in the second epoch (its own permutation, a dataset
    # of its own: train/order.py), first attempt only; checkpoints every step.
    monkeypatch.setenv(CRASH_ENV, "7")
    train, ds = train_cfg("train.checkpoint_every_steps=1", "train.epochs=2", "train.global_batch_size=2",
                          "train.lr_scheduler=cosine", "train.warmup_ratio=0.25", "train.eval_before_after=false")
    result = train_model(model_path=tiny_model_path, train_files=[preference_file(tmp_path / "p.parquet", TOPICS[:10])],
                         output_dir=str(tmp_path / "model"), cfg=train, deepspeed_cfg=ds)
    s = result.summary
    # Resumed from a checkpoint taken before the crash (Ray registers checkpoints asynchronously, so the
    # newest registered one is step 5 or 6), not from scratch, and not past the crash.
    assert s["restored_from_step"] in (5, 6)
    # 10 pairs, 2 ranks, global batch 2 -> 5 optimizer steps per epoch, 2 epochs; each logged once, on the schedule.
    assert s["steps"] == 10 and [h["step"] for h in result.history] == list(range(1, 11))
    assert [h["epoch"] for h in result.history] == [0] * 5 + [1] * 5
    factor = lr_multiplier("cosine", warmup_steps=3, total_steps=10)
    assert [h["lr"] for h in result.history] == pytest.approx([0.005 * factor(k) for k in range(10)])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.model_dir)


@pytest.mark.timeout(60)
def test_bad_training_settings_fail_before_starting(tmp_path, tiny_model_path, ray_local):
    data = preference_file(tmp_path / "p.parquet", TOPICS[:4])
    cases = [
        (["train.max_prompt_length=512", "train.max_length=512"], "max_prompt_length"),
        (["train.global_batch_size=3"], "multiple of"),
        (["+train.bogus=1"], r"unknown key\(s\) \['bogus'\]"),
        # 2 x 1 CPU on the 2-CPU test cluster: Ray Data's read tasks would wait forever.
        (["train.cpus_per_worker=1"], "leaves less than one CPU"),
        (["deepspeed.train_batch_size=16"], "contradicts the train settings"),
    ]
    for overrides, message in cases:
        train, ds = train_cfg(*overrides)
        with pytest.raises(ConfigError, match=message):
            train_model(model_path=tiny_model_path, train_files=[data], output_dir=str(tmp_path / "m"), cfg=train,
                        deepspeed_cfg=ds)
    train, ds = train_cfg()
    with pytest.raises(ConfigError, match="lacks column"):
        train_model(model_path=tiny_model_path, train_files=[data], output_dir=str(tmp_path / "m"), cfg=train,
                    deepspeed_cfg=ds, objective="sft")
