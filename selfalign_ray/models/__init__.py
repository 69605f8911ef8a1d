"""Model presets: where weights come from and how they become a local HF directory."""

from selfalign_ray.models.resolve import ModelNotFoundError, resolve_model_path

__all__ = ["ModelNotFoundError", "resolve_model_path"]
