"""Model loading policy (selfalign_ray/models/loading.py): safetensors only unless model.allow_pickle_weights,
remote code only through model.trust_remote_code, model.revision pinned for hub ids; the same for the hf engine,
the vLLM engine and the trainer."""

from pathlib import Path

import pytest

from selfalign_ray.cli import compose
from selfalign_ray.config import ConfigError
from selfalign_ray.engines.config import EngineConfig, engine_config
from selfalign_ray.models.loading import ModelLoadConfig, PickleWeightsRefused, check_weights
from selfalign_ray.models.resolve import resolve_model_path

HUB_ID = "meta-llama/Meta-Llama-3-8B-Instruct"
COMMIT = "5f0b02c75b57c5855da9ae460ce51323ea669d8a"


@pytest.fixture(scope="module")
def pickle_model(tiny_model_path, tmp_path_factory) -> str:
    """The tiny model saved as pytorch_model.bin only (a pickle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    out = tmp_path_factory.mktemp("pickle_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")  # transformers 5 only writes safetensors itself
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    assert (out / "pytorch_model.bin").exists() and not list(out.glob("*.safetensors"))
    return str(out)


def test_pickle_only_model_dir_is_refused_naming_the_opt_in(pickle_model, tiny_model_path):
    """Before: resolve_model_path accepted *.bin and from_pretrained unpickled it. Now refused on the driver."""
    with pytest.raises(PickleWeightsRefused, match=r"pickle weights only \(pytorch_model\.bin\).*"
                                                   r"model\.allow_pickle_weights=true"):
        resolve_model_path("hf", pickle_model)
    assert resolve_model_path("hf", pickle_model, allow_pickle_weights=True) == str(Path(pickle_model).resolve())
    check_weights(tiny_model_path, ModelLoadConfig())  # safetensors: fine
    check_weights(HUB_ID, ModelLoadConfig())  # hub ids are left to use_safetensors / load_format


def test_hf_engine_loads_safetensors_only_unless_opted_in(pickle_model):
    from selfalign_ray.engines.hf import HFEngine

    with pytest.raises(PickleWeightsRefused, match="model.allow_pickle_weights=true"):
        HFEngine(pickle_model, EngineConfig())
    engine = HFEngine(pickle_model, EngineConfig(model_load={"allow_pickle_weights": True}))
    assert engine.model.config.model_type == "llama"


def test_trainer_refuses_pickle_weights(pickle_model):
    """The train core loads through the same policy (before the DeepSpeed engine is built)."""
    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.core import build_engine
    from selfalign_ray.train.schedule import StepPlan

    cfg = TrainConfig(num_workers=1, global_batch_size=1, per_device_batch_size=1)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    with pytest.raises(PickleWeightsRefused, match="model.allow_pickle_weights=true"):
        build_engine(pickle_model, cfg, ds, StepPlan.build(4, cfg))


def test_load_kwargs_for_transformers_and_vllm():
    default = ModelLoadConfig()
    assert default.hf_kwargs(HUB_ID) == {"trust_remote_code": False, "use_safetensors": True}
    assert default.vllm_kwargs(HUB_ID) == {"trust_remote_code": False, "load_format": "safetensors"}
    pinned = ModelLoadConfig(trust_remote_code=True, allow_pickle_weights=True, revision=COMMIT)
    assert pinned.hf_kwargs(HUB_ID) == {"trust_remote_code": True, "revision": COMMIT}
    assert pinned.vllm_kwargs(HUB_ID) == {"trust_remote_code": True, "revision": COMMIT, "tokenizer_revision": COMMIT}
    assert "revision" not in pinned.hf_kwargs(str(Path(__file__).parent))  # a local dir has no revisions
    with pytest.raises(ConfigError, match="model.trust_remote_code must be true or false"):
        ModelLoadConfig(trust_remote_code="yes")


def test_model_node_decides_and_engine_extra_cannot_bypass_it():
    """Before: engine.extra.trust_remote_code=true went straight into vllm.LLM. Now refused, pointing at the model."""
    cfg = engine_config(compose(["model=llama3_8b_instruct", "model.trust_remote_code=true",
                                 f"model.revision={COMMIT}"]))
    assert cfg.load == ModelLoadConfig(trust_remote_code=True, revision=COMMIT)
    assert engine_config(compose([])).load == ModelLoadConfig()
    for key, where in (("trust_remote_code", "model.trust_remote_code"), ("revision", "model.revision"),
                       ("load_format", "model.allow_pickle_weights")):
        with pytest.raises(ConfigError, match=rf"engine.extra.{key} is not passed to the engine; set {where}"):
            engine_config(compose([f"+engine.extra.{key}=x"]))


def test_every_model_preset_has_the_policy_fields_and_hub_presets_say_pin_it():
    presets = sorted((Path(__file__).resolve().parent.parent / "conf" / "model").glob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        node = compose([f"model={path.stem}"]).model
        assert (node.allow_pickle_weights, node.trust_remote_code, node.revision) == (False, False, None), path
        if "/" in str(node.path or ""):  # a hub id: the comment above `revision` says to pin it
            lines = path.read_text().splitlines()
            i = next(k for k, line in enumerate(lines) if line.startswith("revision:"))
            above = []
            while i > 0 and lines[i - 1].startswith("#"):
                i -= 1
                above.append(lines[i])
            assert any(line.startswith("# Pin it") for line in above), path


@pytest.mark.vllm
def test_vllm_engine_gets_the_policy(monkeypatch, tiny_model_path, pickle_model):
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
    node = compose(["engine=vllm_cpu", f"engine.torch_threads={torch.get_num_threads()}", "model=llama3_8b_instruct",
                    f"model.revision={COMMIT}", "+engine.extra.hf_token=hf_x"])
    VLLMEngine(HUB_ID, engine_config(node))
    assert (seen["load_format"], seen["trust_remote_code"], seen["revision"], seen["hf_token"]) == \
        ("safetensors", False, COMMIT, "hf_x")
    # Every key is one the installed vLLM's LLM / EngineArgs takes (the stand-in above would take anything).
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    assert set(ModelLoadConfig(revision=COMMIT).vllm_kwargs(HUB_ID)) | {"hf_token"} <= \
        {f.name for f in dataclasses.fields(EngineArgs)}
    seen.clear()
    VLLMEngine(tiny_model_path, engine_config(node))
    assert "revision" not in seen and seen["load_format"] == "safetensors"
    with pytest.raises(PickleWeightsRefused):
        VLLMEngine(pickle_model, engine_config(node))


def test_config_reads_follow_the_policy_too(monkeypatch, tiny_model_path):
    """Attention choice and DeepSpeed's auto sizes read the model's config: with the same revision and remote-code
    setting as its weights (a pinned hub model must not be sized from another revision's config)."""
    import transformers

    from selfalign_ray.models.attention import resolve_attention
    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.core import _attn_implementation
    from selfalign_ray.train.deepspeed_config import hidden_size

    real = transformers.AutoConfig.from_pretrained
    seen = []

    def recording(path, **kwargs):
        seen.append(kwargs)
        return real(tiny_model_path)  # the hub id stands for the tiny model (no network here)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording)
    policy = ModelLoadConfig(trust_remote_code=True, revision="0123abc").tokenizer_kwargs("org/pinned-model")
    assert policy == {"trust_remote_code": True, "revision": "0123abc"}
    hidden_size("org/pinned-model", policy)
    resolve_attention("org/pinned-model", "auto", use_gpu=False, config_kwargs=policy)
    _attn_implementation("org/pinned-model", TrainConfig(padding_free=True), config_kwargs=policy)
    assert len(seen) >= 3 and all(k == policy for k in seen), seen
