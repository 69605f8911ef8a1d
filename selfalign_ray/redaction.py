"""Secrets never reach a file the run writes: which config keys hold secrets, and copies with their values hidden.

A key is secret when one of its name parts (split on `.`, `_`, `-`, case-insensitive) is a secret word
(`token`, `secret`, `password`, ...) or two neighbouring parts spell one (`api_key`, `access_key`, ...). Parts
are compared whole so that counts such as `max_tokens` or `logprob_chunk_tokens` stay visible.

Used by every writer of settings: Hydra's `.hydra/` copies, run records, sweep records and summaries, and the
experiment trackers' parameters.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

_SECRET_PARTS = frozenset({"token", "secret", "password", "passwd", "pwd", "credential", "credentials",
                           "apikey", "passphrase", "cookie"})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                           ("auth", "key"), ("session", "key"), ("client", "secret")})


def is_secret_key(key: str) -> bool:
    """True for `hf_token`, `engine.extra.HF_TOKEN`, `WANDB_API_KEY`, `aws_secret_access_key`; False for
    `max_tokens`, `tokenizer`, `num_tokens`."""
    parts = [p for p in re.split(r"[._\-\s]+", str(key).lower()) if p]
    if any(p in _SECRET_PARTS for p in parts):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:]))


def redact(obj: Any) -> Any:
    """A copy of a plain container (dicts, lists, scalars) with every value under a secret key replaced."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redact_override(override: str) -> str:
    """One Hydra command-line override (`engine.extra.hf_token=hf_abc`, `+x.api_key=...`) with a secret value hidden."""
    key, sep, _value = override.partition("=")
    if sep and is_secret_key(key.lstrip("+~")):
        return f"{key}={REDACTED}"
    return override


def redact_overrides(overrides: list[str]) -> list[str]:
    return [redact_override(o) for o in overrides]
