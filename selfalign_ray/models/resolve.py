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


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def _check_model_dir(folder: Path, path: str) -> None:
    """Cheap checks on the driver, so that a directory that is not a model fails here, named, and not as an
    actor's traceback after Ray has started: a parseable config.json with a model_type, and weight files."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ModelNotFoundError(f"model.path={path}: config.json is not readable JSON ({err})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelNotFoundError(f"model.path={path}: config.json has no model_type; not a Hugging Face model config")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelNotFoundError(f"model.path={path} has a config.json but no weight files "
                                 f"({', '.join(WEIGHT_PATTERNS)})")


def resolve_model_path(source: str, path: str | None = None, dtype: str = "float32",
                       allow_pickle_weights: bool = False) -> str:
    """Return a local directory (or, for users with hub access, a hub id) for a model preset.

    source: `smollm2_gguf` (the embedded default), `tiny_random` (tests), or `hf` (`path` is a local
    HF directory or a hub id). A local directory with pickle weights only is refused unless
    `allow_pickle_weights` (model.allow_pickle_weights; models/loading.py).
    """
    if path:
        expanded = Path(os.path.expanduser(path))
        if expanded.is_dir():
            if not (expanded / "config.json").exists():
                raise ModelNotFoundError(
                    f"model.path={path} is a directory but not a Hugging Face model (no config.json)."
                )
            _check_model_dir(expanded, path)
            from selfalign_ray.models.loading import ModelLoadConfig, check_weights

            check_weights(path, ModelLoadConfig(allow_pickle_weights=allow_pickle_weights))
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
