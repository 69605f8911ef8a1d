"""Which attention kernel a model runs with: one rule for the hf engine and for training.

Rules (`choose_attention`):
- A model whose config has attention-logit soft-capping (Gemma-2: `attn_logit_softcapping`) runs `eager` or
  `flash_attention_2`, never `sdpa`: transformers' SDPA path ignores the soft-cap (`softcap` reaches only the
  eager and flash kernels of modeling_gemma2.py), so the model would not be the one that was trained. An explicit
  `sdpa` request for such a model is refused with a ConfigError.
- `auto`: `flash_attention_2` on GPU when `flash_attn` imports; otherwise `sdpa`, or `eager` for soft-capped models.
- On GPU, `auto` that cannot get flash-attention 2 logs a loud warning (a missing or broken flash-attn wheel is
  a slow, memory-hungry run, never a silent one). When packing is on as well (train.padding_free), packing is
  turned off with a warning: without FA2's variable-length kernel a packed row of ~4 x max_length tokens gets
  one block-diagonal T x T mask (GBs of scores per layer at T = 8192), while padded rows cost max_length^2 at
  most. We turn packing off rather than refuse so that a run that generated for hours still trains; the choice
  is logged and recorded (train_summary.json, the generation manifest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from selfalign_ray.config import ConfigError

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class AttentionChoice:
    # What the model is loaded with: flash_attention_2 | sdpa | eager.
    implementation: str
    # Whether packed (padding-free) micro-batches stay on; always the caller's value unless auto fell back on GPU.
    padding_free: bool
    # One line on why, for logs and records.
    reason: str

    def to_dict(self) -> dict:
        return {"implementation": self.implementation, "padding_free": self.padding_free, "reason": self.reason}


def flash_attn_available() -> bool:
    """True when `flash_attn` imports (a wheel built for another torch/CUDA fails here, not at the first step)."""
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 — ImportError, or an undefined-symbol OSError of a mismatched wheel
        log.debug("flash_attn does not import: %s", exc)
        return False
    return True


def has_softcapping(config) -> bool:
    """Whether a transformers config soft-caps attention logits (the text model's, for multimodal configs)."""
    text = getattr(config, "text_config", None) or config
    cap = getattr(text, "attn_logit_softcapping", None)
    return cap is not None and cap != 0


def choose_attention(requested: str, *, softcapped: bool, use_gpu: bool, padding_free: bool = False,
                     flash_available: bool | None = None, where: str = "attn_implementation") -> AttentionChoice:
    """The decision table above. `flash_available` None = check `flash_attn` now (only needed on GPU)."""
    if requested not in IMPLEMENTATIONS:
        raise ConfigError(f"{where}={requested!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if requested == "sdpa" and softcapped:
        raise ConfigError(f"{where}=sdpa: this model soft-caps its attention logits (attn_logit_softcapping, e.g. "
                          "Gemma-2) and transformers' SDPA attention ignores the cap; use eager, flash_attention_2 "
                          "or auto")
    if requested != "auto":
        return AttentionChoice(requested, padding_free, "requested")
    if use_gpu:
        if flash_available is None:
            flash_available = flash_attn_available()
        if flash_available:
            return AttentionChoice("flash_attention_2", padding_free, "auto: GPU with flash-attn installed")
    fallback = "eager" if softcapped else "sdpa"
    why = "attention soft-capping (SDPA would drop it)" if softcapped else "no soft-capping"
    if not use_gpu:
        return AttentionChoice(fallback, padding_free, f"auto: CPU, {why}")
    log.warning("!!! %s=auto on GPU but flash-attn does not import: running %s attention (slower, more memory). "
                "Install the prebuilt flash-attn wheel matching torch and CUDA (see cluster/README.md) or set "
                "%s explicitly to silence this.", where, fallback, where)
    if padding_free:
        log.warning("!!! packing (train.padding_free) turned off: without flash-attention 2 a packed row needs a "
                    "quadratic block-diagonal mask; micro-batches are padded instead")
    return AttentionChoice(fallback, False, f"auto: GPU without flash-attn, {why}"
                           + ("; packing turned off" if padding_free else ""))


def resolve_attention(model_path: str, requested: str, *, use_gpu: bool, padding_free: bool = False,
                      where: str = "attn_implementation", config_kwargs: dict | None = None) -> AttentionChoice:
    """`choose_attention` for the model at `model_path` (reads its config.json only), logged. `config_kwargs`:
    the model's load policy for the config read (models/loading.py `tokenizer_kwargs`: revision, remote code)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, **(config_kwargs or {}))
    choice = choose_attention(requested, softcapped=has_softcapping(config), use_gpu=use_gpu,
                              padding_free=padding_free, where=where)
    log.info("attention for %s: %s (%s)", model_path, choice.implementation, choice.reason)
    return choice
