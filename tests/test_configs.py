"""Every config preset composes, and typed configs reject unknown keys."""

from pathlib import Path

import pytest

from selfalign_ray.cli import CONF_DIR, compose
from selfalign_ray.config import ConfigError, typed
from selfalign_ray.engines.factory import EngineConfig
from selfalign_ray.sao.judge import JudgeConfig
from selfalign_ray.train.config import TrainConfig

GROUPS = ["mode", "model", "engine", "judge", "personas", "train", "deepspeed", "cluster", "tracker"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_preset_composes_into_typed_configs(group):
    presets = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    assert presets
    for preset in presets:
        cfg = compose([f"{group}={preset}"])
        typed(EngineConfig, cfg.engine, "engine")
        typed(JudgeConfig, cfg.judge, "judge")
        TrainConfig(**typed(TrainConfig, cfg.train, "train").__dict__).validate()
        first = (Path(CONF_DIR) / group / f"{preset}.yaml").read_text().splitlines()[0]
        assert first.startswith("#"), f"{group}/{preset}.yaml must open with a comment"
        assert "Launch:" in (Path(CONF_DIR) / group / f"{preset}.yaml").read_text()


def test_paper_recipes():
    gemma = compose(["model=gemma2_9b_it", "train=sao_gemma2_9b_it", "engine=vllm"])
    t = gemma.train
    assert (t.beta, t.gamma_beta_ratio, t.learning_rate, t.global_batch_size, t.epochs) == (10.0, 0.3, 1e-6, 128, 1)
    assert (t.lr_scheduler, t.warmup_ratio, t.bf16, t.use_gpu, t.num_workers) == ("cosine", 0.1, True, True, 4)
    assert gemma.deepspeed.zero_optimization.stage == 3
    assert gemma.model.path == "google/gemma-2-9b-it" and gemma.judge.min_confidence == 0.6
    assert compose([]).mode.respond.n == 2 and compose([]).mode.respond.temperature == 0.6


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"engine: unknown key\(s\) \['batchsize'\]"):
        typed(EngineConfig, {"batchsize": 3}, "engine")


@pytest.mark.parametrize("cls,group", [(TrainConfig, "train"), (EngineConfig, "engine"), (JudgeConfig, "judge")])
def test_default_presets_document_every_typed_field(cls, group):
    """A field missing from the default yaml silently takes the dataclass default and cannot be
    overridden on the command line (`train.x=...` is refused by Hydra's struct mode)."""
    import dataclasses

    cfg = compose([])[group]
    filled_elsewhere = getattr(cls, "NOT_IN_YAML", ())  # EngineConfig.model_load comes from the model node
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in cfg and f.name not in filled_elsewhere]
    assert not missing, f"conf/{group}/ default preset lacks {missing}"


GPU_TRAIN_PRESETS = ["sao_gemma2_9b_it", "sao_llama3_8b_instruct", "simpo_gemma2_9b_it", "simpo_llama3_8b_instruct", "sft"]


def _hidden_config(tmp_path, hidden: int) -> str:
    """A config.json-only model directory: all deepspeed_config reads is the hidden size."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=8).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("preset", GPU_TRAIN_PRESETS)
def test_gpu_train_presets_compose_with_the_gpu_deepspeed_preset(preset, tmp_path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from selfalign_ray.train.deepspeed_config import deepspeed_config

    cfg = compose([f"train={preset}"])  # the preset selects deepspeed=zero3_gpu itself
    train = typed(TrainConfig, cfg.train, "train")
    ds = deepspeed_config(cfg.deepspeed, train, model_path=_hidden_config(tmp_path, 4096))
    zero = ds["zero_optimization"]
    # transformers' DeepSpeed "auto" conventions for hidden size 4096 (Llama-3-8B, Mistral-7B).
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096 ** 2, int(0.9 * 4096 ** 2), 40960)
    assert zero["overlap_comm"] is True and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["bf16"]["enabled"] is True and ds["train_batch_size"] == train.global_batch_size
    # DeepSpeed 0.19's own validation accepts the filled section as given ...
    parsed = DeepSpeedZeroConfig(**zero)
    assert parsed.overlap_comm and parsed.param_persistence_threshold == 40960
    assert (parsed.reduce_bucket_size, parsed.prefetch_bucket_size) == (4096 ** 2, int(0.9 * 4096 ** 2))
    # ... while an unfilled "auto" would silently become DeepSpeed's 5e8-element default bucket.
    assert DeepSpeedZeroConfig(**{**zero, "reduce_bucket_size": "auto"}).reduce_bucket_size == 5 * 10 ** 8


@pytest.mark.parametrize("preset", GPU_TRAIN_PRESETS)
def test_gpu_train_presets_select_the_gpu_deepspeed_preset_and_the_command_line_wins(preset):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        chosen = hydra_compose("config", overrides=[f"train={preset}"], return_hydra_config=True)
        replaced = hydra_compose("config", overrides=[f"train={preset}", "deepspeed=zero3_gpu_offload"],
                                 return_hydra_config=True)
        default = hydra_compose("config", return_hydra_config=True)
    assert chosen.hydra.runtime.choices.deepspeed == "zero3_gpu"
    assert chosen.deepspeed.data_types.grad_accum_dtype == "fp32"
    assert replaced.hydra.runtime.choices.deepspeed == "zero3_gpu_offload"
    assert replaced.deepspeed.zero_optimization.offload_optimizer.device == "cpu"
    assert default.hydra.runtime.choices.deepspeed == "zero3"  # the CPU default stays


def test_gpu_deepspeed_preset_sizes_follow_the_model(tmp_path):
    from selfalign_ray.train.deepspeed_config import deepspeed_config

    cfg = compose(["train=sao_gemma2_9b_it"])
    train = typed(TrainConfig, cfg.train, "train")
    gemma = deepspeed_config(cfg.deepspeed, train, model_path=_hidden_config(tmp_path, 3584))["zero_optimization"]
    assert gemma["reduce_bucket_size"] == 3584 ** 2 and gemma["stage3_param_persistence_threshold"] == 35840
    # The driver's early check has no model yet: the sizes stay "auto" for the trainer to fill.
    assert deepspeed_config(cfg.deepspeed, train)["zero_optimization"]["reduce_bucket_size"] == "auto"
    # An explicit number is kept; a bad one is named.
    ds = deepspeed_config({**_plain(cfg.deepspeed), "zero_optimization": {"stage": 3, "reduce_bucket_size": 123}},
                          train, model_path=str(tmp_path))
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        deepspeed_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}}, train)
    with pytest.raises(ConfigError, match="grad_accum_dtype"):
        deepspeed_config({"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "fp8"}}, train)


def test_cpu_deepspeed_preset_is_unchanged():
    zero = compose([]).deepspeed.zero_optimization
    assert (zero.overlap_comm, zero.stage3_param_persistence_threshold, zero.reduce_bucket_size) == (False, 0, 50000000)
    assert "data_types" not in compose([]).deepspeed


def test_mistral_preset_is_synpos_checkpoint():
    # SynPO [S] §3.1 fn. 2 starts from alignment-handbook/zephyr-7b-sft-full (not HuggingFaceH4's sft-beta).
    assert compose(["model=mistral_7b_sft"]).model.path == "alignment-handbook/zephyr-7b-sft-full"


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def test_vllm_presets_are_sized_for_their_device():
    gpu = compose(["engine=vllm"]).engine
    # Continuous batching needs calls of hundreds of prompts (vLLM's max_num_seqs is 256-1024 on GPUs).
    assert gpu.batch_size >= 256 and gpu.num_gpus_per_actor >= 1
    assert gpu.extra.enable_prefix_caching is True
    cpu = compose(["engine=vllm_cpu"]).engine
    assert cpu.batch_size <= 64 and cpu.num_gpus_per_actor == 0


@pytest.mark.vllm
def test_vllm_engine_passes_prefix_caching_through(monkeypatch, tiny_model_path):
    """The preset's engine.extra reaches vllm.LLM (a stand-in LLM records the keyword arguments)."""
    import torch

    vllm = pytest.importorskip("vllm")
    from selfalign_ray.engines.vllm import VLLMEngine

    seen = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = typed(EngineConfig, compose(["engine=vllm_cpu", f"engine.torch_threads={torch.get_num_threads()}",
                                       "engine.extra.enable_prefix_caching=false"]).engine, "engine")
    VLLMEngine(tiny_model_path, cfg)
    assert seen["enable_prefix_caching"] is False  # the preset's value wins over the engine's own default
    seen.clear()
    VLLMEngine(tiny_model_path, typed(EngineConfig, compose(["engine=vllm_cpu",
               f"engine.torch_threads={torch.get_num_threads()}"]).engine, "engine"))
    assert seen["enable_prefix_caching"] is True
