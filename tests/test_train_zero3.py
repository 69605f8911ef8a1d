"""SimPO and SFT through Ray Train's TorchTrainer with DeepSpeed ZeRO-3 on 2 CPU workers."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign_ray.cli import compose
from selfalign_ray.data.schema import PAIR_SCHEMA, assistant_turn, prompt_id, user_turn
from selfalign_ray.train import train_model
from selfalign_ray.train.trainer import CRASH_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOPICS = ["rivers", "bread", "chess", "tides", "bees", "trains", "clouds", "maps",
          "violins", "glaciers", "ferns", "bridges", "comets", "owls", "salt", "kites"]


def preference_file(path, n=16):
    """A fixed synthetic preference set: the same good / bad answer style for every prompt."""
    rows = []
    for topic in TOPICS[:n]:
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


def test_simpo_zero3_raises_preference_and_saves_a_loadable_model(tmp_path, tiny_model_path, ray_local):
    train, ds = train_cfg()
    result = train_model(model_path=tiny_model_path, train_files=[preference_file(tmp_path / "p.parquet")],
                         output_dir=str(tmp_path / "model"), cfg=train, deepspeed_cfg=ds)
    s = result.summary
    # 16 pairs over 2 ranks = 8 micro-batches per rank per epoch; accumulation 4 / (1 x 2) = 2 -> 4 steps x 3 epochs.
    assert s["steps"] == 12 and [h["step"] for h in result.history] == list(range(1, 13))
    assert s["after"]["mean_margin"] > s["before"]["mean_margin"] + 1.0
    assert s["after"]["preference_accuracy"] == 1.0
    for h in result.history:
        assert {"loss", "reward_chosen", "reward_rejected", "margin", "preference_accuracy", "tokens_per_s", "lr"} <= h.keys()
    # ZeRO-3 really partitions: rank 0 holds about half of a 2-way split.
    part = s["zero3_partition"]
    assert part["rank0_local_params"] <= part["total_params"] // 2 + 1024

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(result.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template
    assert not (tmp_path / "model" / "_ray").exists()


def test_sft_objective_lowers_the_loss(tmp_path, tiny_model_path, ray_local):
    rows = [{"prompt": user_turn(f"Say hi to {t}."), "completion": assistant_turn(f"Hi {t}!")} for t in TOPICS[:8]]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    train, ds = train_cfg("train.global_batch_size=2")
    result = train_model(model_path=tiny_model_path, train_files=[str(path)], output_dir=str(tmp_path / "sft"),
                         cfg=train, deepspeed_cfg=ds, objective="sft")
    assert result.summary["after"]["mean_loss"] < result.summary["before"]["mean_loss"]


def test_killed_worker_restores_from_last_checkpoint(tmp_path, tiny_model_path, ray_local, monkeypatch):
    # The last rank exits hard at optimizer step 3 (first attempt only); checkpoints every step.
    monkeypatch.setenv(CRASH_ENV, "3")
    train, ds = train_cfg("train.checkpoint_every_steps=1", "train.epochs=1", "train.global_batch_size=2")
    result = train_model(model_path=tiny_model_path, train_files=[preference_file(tmp_path / "p.parquet")],
                         output_dir=str(tmp_path / "model"), cfg=train, deepspeed_cfg=ds)
    # The restart resumes from a checkpoint taken before the crash (Ray registers checkpoints
    # asynchronously, so the newest registered one is step 1 or 2), not from scratch.
    assert result.summary["restored_from_step"] in (1, 2)
    # 16 pairs, 2 ranks, global batch 2 -> 8 optimizer steps; each logged once.
    assert result.summary["steps"] == 8 and [h["step"] for h in result.history] == list(range(1, 9))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.model_dir)


def test_bad_training_settings_fail_before_starting(tmp_path, tiny_model_path):
    train, ds = train_cfg("train.max_prompt_length=512", "train.max_length=512")
    with pytest.raises(ValueError, match="max_prompt_length"):
        train_model(model_path=tiny_model_path, train_files=["x"], output_dir=str(tmp_path), cfg=train, deepspeed_cfg=ds)
    train, ds = train_cfg("train.global_batch_size=3")
    with pytest.raises(ValueError, match="multiple of"):
        train_model(model_path=tiny_model_path, train_files=["x"], output_dir=str(tmp_path), cfg=train, deepspeed_cfg=ds)
