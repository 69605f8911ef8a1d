"""How model weights and code may be loaded: safetensors only, no remote code, a pinned hub revision.

`ModelLoadConfig` mirrors three fields of the `model` config group (conf/model/*.yaml):

- `allow_pickle_weights` (default false): weights load from `*.safetensors` only (`use_safetensors=True` in
  transformers, `load_format="safetensors"` in vLLM). A `pytorch_model.bin` is a pickle, and unpickling runs
  code; a directory holding only pickle weights is refused, naming this opt-in.
- `trust_remote_code` (default false): the one switch that lets a model's own Python code run (transformers and
  vLLM `trust_remote_code`); `engine.extra.trust_remote_code` is refused and points here.
- `revision` (default null): a hub branch, tag or commit for hub ids (`from_pretrained(revision=...)`, vLLM
  `revision=` / `tokenizer_revision=`), recorded in the manifest. Local directories have no revisions: ignored.

Every loader of the project (hf engine, vLLM engine, trainer) takes its keyword arguments from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selfalign_ray.models.resolve import ModelNotFoundError

# The opt-in a refusal names.
OPT_IN = "model.allow_pickle_weights=true"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


class PickleWeightsRefused(ModelNotFoundError):
    """A model directory whose only weights are pickles, without the opt-in."""


@dataclass(frozen=True)
class ModelLoadConfig:
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    revision: str | None = None

    def __post_init__(self):
        from selfalign_ray.config import ConfigError

        for name in ("trust_remote_code", "allow_pickle_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision.strip()):
            raise ConfigError(f"model.revision must be a branch, tag or commit string (or null), got {self.revision!r}")

    @classmethod
    def from_model_node(cls, node: Any) -> "ModelLoadConfig":
        """The load options of a `model` config node (missing fields take their defaults)."""
        node = node or {}
        get = node.get if hasattr(node, "get") else (lambda k, d=None: d)
        return cls(trust_remote_code=get("trust_remote_code", False),
                   allow_pickle_weights=get("allow_pickle_weights", False), revision=get("revision", None))

    @classmethod
    def from_dict(cls, data: dict | None) -> "ModelLoadConfig":
        return cls(**(data or {}))

    def to_json(self) -> dict:
        return asdict(self)

    def revision_for(self, model_path: str) -> str | None:
        """The revision to pass for `model_path`: none for a local directory (it has no revisions)."""
        return None if Path(str(model_path)).expanduser().is_dir() else self.revision

    def hf_kwargs(self, model_path: str) -> dict:
        """Keyword arguments for transformers `AutoModel*.from_pretrained` (weights)."""
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        if not self.allow_pickle_weights:
            kwargs["use_safetensors"] = True
        revision = self.revision_for(model_path)
        if revision:
            kwargs["revision"] = revision
        return kwargs

    def tokenizer_kwargs(self, model_path: str) -> dict:
        """Keyword arguments for `AutoTokenizer` / `AutoConfig.from_pretrained` (no weights)."""
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        revision = self.revision_for(model_path)
        if revision:
            kwargs["revision"] = revision
        return kwargs

    def vllm_kwargs(self, model_path: str) -> dict:
        """Keyword arguments for `vllm.LLM` (its "auto" load format falls back to *.bin; "safetensors" does not)."""
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        if not self.allow_pickle_weights:
            kwargs["load_format"] = "safetensors"
        revision = self.revision_for(model_path)
        if revision:
            kwargs["revision"] = revision
            kwargs["tokenizer_revision"] = revision
        return kwargs


def check_weights(model_path: str, load: ModelLoadConfig, where: str = "model.path") -> None:
    """Refuse a local directory whose weights are pickles only, unless the user opted in. Hub ids pass
    (`use_safetensors=True` / `load_format="safetensors"` refuse pickle-only repositories when they load)."""
    folder = Path(str(model_path)).expanduser()
    if load.allow_pickle_weights or not folder.is_dir():
        return
    if next(folder.glob("*.safetensors"), None) is not None:
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise PickleWeightsRefused(
            f"{where}={model_path} holds pickle weights only ({', '.join(pickles[:3])}); loading a pickle can run "
            f"arbitrary code, so only *.safetensors load by default. Convert the model to safetensors, or set "
            f"{OPT_IN} if you trust this file.")


def load_causal_lm(model_path: str, load: ModelLoadConfig, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` under the load policy (weights checked first)."""
    from transformers import AutoModelForCausalLM

    check_weights(model_path, load)
    return AutoModelForCausalLM.from_pretrained(model_path, **load.hf_kwargs(model_path), **kwargs)


def load_tokenizer(model_path: str, load: ModelLoadConfig, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, **load.tokenizer_kwargs(model_path), **kwargs)
