"""Attention choice (selfalign_ray/models/attention.py) for the hf engine and training.

Gemma-2 soft-caps attention logits; transformers' SDPA path ignores the cap, so such a model must run eager or
flash-attention 2. No GPU here: the GPU branches are exercised by passing / monkeypatching the flash-attn check.
"""

from __future__ import annotations

import logging

import pytest
import torch

from selfalign_ray.config import ConfigError
from selfalign_ray.models import attention
from selfalign_ray.models.attention import choose_attention, has_softcapping, resolve_attention


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory) -> str:
    """A tiny random Gemma-2 (2 layers, hidden 64) with the tiny models' tokenizer and a strong soft-cap, so
    that dropping the cap changes the logits visibly."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from selfalign_ray.models.tiny import _train_tokenizer

    out = tmp_path_factory.mktemp("tiny_gemma2")
    tok = _train_tokenizer(out, 512)
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=512,
        sliding_window=256, attn_logit_softcapping=2.0, final_logit_softcapping=30.0, initializer_range=0.5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return str(out)


# (requested, soft-capped, use_gpu, flash-attn imports, packing) -> (implementation, packing after)
DECISIONS = [
    ("auto", False, False, False, True, "sdpa", True),                # CPU default: unchanged
    ("auto", True, False, False, True, "eager", True),                # Gemma-2 on CPU: eager, never sdpa
    ("auto", False, True, True, True, "flash_attention_2", True),     # GPU with flash-attn
    ("auto", True, True, True, True, "flash_attention_2", True),      # Gemma-2 on GPU: FA2 keeps the soft-cap
    ("auto", False, True, False, True, "sdpa", False),                # GPU without flash-attn: packing off
    ("auto", True, True, False, True, "eager", False),
    ("auto", True, True, False, False, "eager", False),
    ("eager", True, True, False, True, "eager", True),                # explicit choices are kept as asked
    ("flash_attention_2", False, False, False, True, "flash_attention_2", True),
    ("sdpa", False, True, False, True, "sdpa", True),
]


@pytest.mark.parametrize("requested,softcapped,use_gpu,flash,packing,impl,packing_after", DECISIONS)
def test_decision_table(requested, softcapped, use_gpu, flash, packing, impl, packing_after):
    choice = choose_attention(requested, softcapped=softcapped, use_gpu=use_gpu, padding_free=packing,
                              flash_available=flash)
    assert (choice.implementation, choice.padding_free) == (impl, packing_after)


def test_sdpa_is_refused_for_soft_capped_models():
    with pytest.raises(ConfigError, match="soft-caps its attention logits"):
        choose_attention("sdpa", softcapped=True, use_gpu=False)
    with pytest.raises(ConfigError, match="use one of"):
        choose_attention("flash", softcapped=False, use_gpu=False)


def test_gpu_without_flash_attn_is_loud(monkeypatch, caplog):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="selfalign_ray.models.attention"):
        choice = choose_attention("auto", softcapped=False, use_gpu=True, padding_free=True)
    assert choice.implementation == "sdpa" and not choice.padding_free and "packing turned off" in choice.reason
    text = caplog.text
    assert "flash-attn does not import" in text and "packing (train.padding_free) turned off" in text
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert choose_attention("auto", softcapped=True, use_gpu=True).implementation == "flash_attention_2"


def test_softcapping_is_read_from_the_config(tiny_gemma2, tiny_model_path):
    from transformers import AutoConfig

    assert has_softcapping(AutoConfig.from_pretrained(tiny_gemma2))
    assert not has_softcapping(AutoConfig.from_pretrained(tiny_model_path))
    assert resolve_attention(tiny_model_path, "auto", use_gpu=False).implementation == "sdpa"
    with pytest.raises(ConfigError, match="sdpa"):
        resolve_attention(tiny_gemma2, "sdpa", use_gpu=False, where="engine.extra.attn_implementation")


def test_hf_engine_runs_gemma2_with_its_soft_cap(tiny_gemma2):
    """The engine's logits equal the eager reference and differ from SDPA's (so the check can fail)."""
    from transformers import AutoModelForCausalLM

    from selfalign_ray.engines.factory import EngineConfig
    from selfalign_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_gemma2, EngineConfig(kind="hf", torch_threads=1))
    assert engine.attention.implementation == "eager"
    assert engine.model.config._attn_implementation == "eager"
    torch.manual_seed(1)
    ids = torch.randint(3, engine.model.config.vocab_size, (2, 48))
    refs = {impl: AutoModelForCausalLM.from_pretrained(tiny_gemma2, dtype=torch.float32, attn_implementation=impl)
            for impl in ("eager", "sdpa")}
    with torch.no_grad():
        got = engine.model(input_ids=ids).logits
        eager, sdpa = (refs[k](input_ids=ids).logits for k in ("eager", "sdpa"))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert (got - sdpa).abs().max() > 1e-3, "SDPA should differ: the test model's soft-cap must bite"


def test_training_worker_uses_the_same_rule(tiny_gemma2, monkeypatch):
    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.worker import _attn_implementation

    cpu = TrainConfig(use_gpu=False, padding_free=True)
    assert _attn_implementation(tiny_gemma2, cpu) == "eager" and cpu.padding_free
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    gpu = TrainConfig(use_gpu=True, padding_free=True)
    assert _attn_implementation(tiny_gemma2, gpu) == "eager" and not gpu.padding_free  # packing turned off
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    gpu = TrainConfig(use_gpu=True, padding_free=True)
    assert _attn_implementation(tiny_gemma2, gpu) == "flash_attention_2" and gpu.padding_free
    with pytest.raises(ConfigError, match="train.attn_implementation=sdpa"):
        _attn_implementation(tiny_gemma2, TrainConfig(attn_implementation="sdpa"))
