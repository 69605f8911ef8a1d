"""Turn a `model` config node into something transformers / vLLM can load: a local dir or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from selfalign_ray.models.smollm2 import SmolLM2NotInstalled, smollm2_path
from selfalign_ray.models.tiny import tiny_random_path


class ModelNotFoundError(FileNotFoundError):
    """Raised once, on the driver, before any actor starts, with a message saying how to get the model."""


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def resolve_model_path(source: str, path: str | None = None, dtype: str = "float32") -> str:
    """Return a local directory (or, for users with hub access, a hub id) for a model preset.

    source: `smollm2_gguf` (the embedded default), `tiny_random` (tests), or `hf` (`path` is a local
    HF directory or a hub id).
    """
    if path:
        expanded = Path(os.path.expanduser(path))
        if expanded.is_dir():
            if not (expanded / "config.json").exists():
                raise ModelNotFoundError(
                    f"model.path={path} is a directory but not a Hugging Face model (no config.json)."
                )
            return str(expanded.resolve())
        if expanded.exists():
            raise ModelNotFoundError(f"model.path={path} is a file, not a Hugging Face model directory.")
        if _looks_like_hub_id(path):
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise ModelNotFoundError(
                    f"model.path={path} is a hub id but HF_HUB_OFFLINE=1; download it first "
                    f"(`huggingface-cli download {path}`) and pass the local directory."
                )
            return path
        raise ModelNotFoundError(
            f"model.path={path} does not exist. Pass a local HF model directory or a hub id like "
            "`meta-llama/Meta-Llama-3-8B-Instruct`."
        )
    if source == "smollm2_gguf":
        try:
            return str(smollm2_path(dtype))
        except SmolLM2NotInstalled as err:
            raise ModelNotFoundError(str(err)) from None
    if source == "tiny_random":
        return str(tiny_random_path())
    raise ModelNotFoundError(
        f"model.source={source!r} needs model.path (a local HF directory or hub id); "
        "known sources without a path: smollm2_gguf, tiny_random."
    )
