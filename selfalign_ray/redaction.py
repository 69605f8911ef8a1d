"""Secrets never reach a file the run writes: which config keys hold secrets, and copies with their values hidden.

A key is secret when one of its name parts (split on `.`, `_`, `-`, case-insensitive) is a secret word
(`token`, `secret`, `password`, ...) or two neighbouring parts spell one (`api_key`, `access_key`, ...). Parts
are compared whole so that counts such as `max_tokens` or `logprob_chunk_tokens` stay visible.

Used by every writer of settings: Hydra's `.hydra/` copies, run records, sweep records and summaries, and the
experiment trackers' parameters. `redact_text` and `RedactingFilter` do the same for free text and log lines
(`key=value`, `"key": "value"`, `key: value`), and also hide every known secret value wherever it appears.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
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


def secret_values(overrides: Iterable[str]) -> set[str]:
    """The values of the secret overrides in a command line (to scrub them from text wherever they appear)."""
    out = set()
    for override in overrides:
        key, sep, value = str(override).partition("=")
        value = value.strip().strip("'\"")
        if sep and value and value != REDACTED and is_secret_key(key.lstrip("+~")):
            out.add(value)
    return out


MIN_SCRUBBED_CHARS = 6
# key=value (overrides, Hydra's override_dirname), "key": "value" / 'key': 'value' (JSON, reprs), key: value (YAML).
_ASSIGNED = re.compile(r"(?P<key>[\w.\-+~]+)=(?P<value>[^\s,;'\"\]\)}]+)")
_QUOTED = re.compile(r"""(?P<q>['"])(?P<key>[\w.\-]+)(?P=q)(?P<sep>\s*:\s*)(?P<vq>['"])(?P<value>[^'"]*)(?P=vq)""")
_YAML = re.compile(r"^(?P<head>\s*-?\s*(?P<key>[\w.\-]+):[ \t]+)(?P<value>\S.*?)\s*$", re.MULTILINE)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with the values of secret keys hidden, and every string of `secrets` (known secret values) too
    (values shorter than MIN_SCRUBBED_CHARS only where a secret key names them: replacing a bare `1` everywhere
    would garble the file)."""
    for value in sorted({v for v in secrets if v and len(v) >= MIN_SCRUBBED_CHARS}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _ASSIGNED.sub(lambda m: f"{m['key']}={REDACTED}" if is_secret_key(m["key"].lstrip("+~"))
                         else m.group(0), text)
    text = _QUOTED.sub(lambda m: f"{m['q']}{m['key']}{m['q']}{m['sep']}{m['vq']}{REDACTED}{m['vq']}"
                       if is_secret_key(m["key"]) and m["value"] else m.group(0), text)
    return _YAML.sub(lambda m: f"{m['head']}{REDACTED}" if is_secret_key(m["key"]) and m["value"] != "null"
                     else m.group(0), text)


class RedactingFilter(logging.Filter):
    """A logging filter (hydra.job_logging / hydra_logging in conf/config.yaml) that hides secrets in every record
    a handler writes: Hydra's own lines (`#0 : engine.extra.hf_token=...`) and ours, console and log file alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left for the handler to report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
