"""SynPO seed data: a small SFT set of (prompt, gold response) pairs, and its train / held-out split.

Sources (mode.seeds): the builtin set (selfalign_ray/builtin/synpo_seed.jsonl), a local .jsonl/.json/.parquet
file, or a Hugging Face dataset. A record holds either a prompt and a response column
(`prompt_field` / `response_field`) or a chat list (`messages_field`: the first user turn is the prompt,
the first assistant turn after it the response). Malformed records are reported with file and row through
data/inputs.py (`on_error`: skip = count and report, raise = stop at the first).

The seeds serve three purposes (paper Sec. 2): generator SFT targets, improver SFT targets, and — the
held-out slice only — validation of each iteration's model. Held-out seeds never feed training or keywords.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfalign_ray.data.inputs import (
    InputFileError,
    ReadReport,
    RecordError,
    handle_error,
    iter_records,
    line_cap,
    require_text,
)

BUILTIN_SEEDS = Path(__file__).resolve().parent.parent / "builtin" / "synpo_seed.jsonl"


@dataclass(frozen=True)
class Seed:
    id: str
    prompt: str
    response: str
    # Where it was read ("file:row"), for messages; not part of identity.
    origin: str = field(default="", compare=False)


@dataclass
class SeedConfig:
    """Mirrors `mode.seeds` in conf/mode/synpo.yaml."""

    path: str | None = None            # local .jsonl/.json/.parquet; null = builtin set
    hf_dataset: str | None = None      # a hub dataset id (needs hub access)
    hf_subset: str | None = None
    hf_split: str = "train"
    messages_field: str | None = None  # chat-list column; when set, prompt/response fields are not read
    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str | None = "id"        # optional; "file:row" otherwise
    on_error: str = "skip"             # skip | raise
    max_chars: int = 16000
    heldout: float = 8                 # held-out count (>= 1) or fraction (0 < x < 1)
    train_size: int | None = 16        # seeds used for generator/improver SFT (null: every non-held-out seed)


def _from_messages(record: Any, key: str, where: str, row: int, max_chars: int) -> tuple[str, str] | RecordError:
    if not isinstance(record, dict):
        return RecordError(where, row, "not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        return RecordError(where, row, "missing_field", f"no field {key!r} (fields: {sorted(record)[:10]})")
    messages = record[key]
    if not isinstance(messages, list):
        return RecordError(where, row, "wrong_type", f"field {key!r} is {type(messages).__name__}, expected a list of messages")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return RecordError(where, row, "bad_message", f"{key}[{k}] is not a {{role, content}} object of strings")
    user = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
    if user is None:
        return RecordError(where, row, "missing_user_turn", f"{key!r} has no user turn")
    reply = next((m for m in messages[user + 1:] if m["role"] == "assistant"), None)
    if reply is None:
        return RecordError(where, row, "missing_assistant_turn", f"{key!r} has no assistant turn after the first user turn")
    out = []
    for name, text in (("user", messages[user]["content"]), ("assistant", reply["content"])):
        text = text.strip()
        if not text:
            return RecordError(where, row, "empty_field", f"the first {name} turn of {key!r} is empty")
        if len(text) > max_chars:
            return RecordError(where, row, "too_long", f"the first {name} turn of {key!r} has {len(text)} chars > {max_chars}")
        out.append(text)
    return out[0], out[1]


def _to_seed(record: Any, cfg: SeedConfig, where: str, row: int) -> Seed | RecordError:
    if cfg.messages_field:
        pair = _from_messages(record, cfg.messages_field, where, row, cfg.max_chars)
        if isinstance(pair, RecordError):
            return pair
        prompt, response = pair
    else:
        prompt = require_text(record, cfg.prompt_field, Path(where), row, cfg.max_chars)
        if isinstance(prompt, RecordError):
            return prompt
        response = require_text(record, cfg.response_field, Path(where), row, cfg.max_chars)
        if isinstance(response, RecordError):
            return response
    sid = record.get(cfg.id_field) if cfg.id_field else None
    name = Path(where).name if not cfg.hf_dataset else where
    return Seed(id=str(sid) if sid not in (None, "") else f"{name}:{row}", prompt=prompt, response=response,
                origin=f"{where}:{row}")


def _records(cfg: SeedConfig):
    """(where, row, record or RecordError) for every record of the configured source."""
    if cfg.hf_dataset:
        import datasets

        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_subset, split=cfg.hf_split)
        for i, record in enumerate(ds, start=1):
            yield cfg.hf_dataset, i, record
        return
    path = Path(cfg.path).expanduser() if cfg.path else BUILTIN_SEEDS
    fields = [cfg.messages_field] if cfg.messages_field else [cfg.prompt_field, cfg.response_field]
    columns = fields + ([cfg.id_field] if cfg.id_field else [])
    # A seed line holds a prompt and a response (or a chat) of up to max_chars each.
    for row, record in iter_records(path, cfg.prompt_field, columns=columns, max_line_bytes=2 * line_cap(cfg.max_chars)):
        yield str(path), row, record


def load_seeds(cfg: SeedConfig) -> tuple[list[Seed], ReadReport]:
    """Every usable seed (duplicate prompts and duplicate ids reported and dropped) and the report of skipped
    records. Ids are unique: the improver pairs each seed's answer with its gold response by id."""
    if cfg.on_error not in ("skip", "raise"):
        raise ValueError(f"mode.seeds.on_error={cfg.on_error!r} must be 'skip' or 'raise'")
    report = ReadReport()
    seeds: list[Seed] = []
    first_seen: dict[str, Seed] = {}
    ids: dict[str, Seed] = {}
    origin = cfg.hf_dataset or str(Path(cfg.path).expanduser() if cfg.path else BUILTIN_SEEDS)
    if not cfg.hf_dataset and Path(origin).suffix.lower() == ".txt":
        raise InputFileError(f"{origin}: seed data needs a prompt and a response per record; use .jsonl, .json or .parquet")
    for where, row, record in _records(cfg):
        seed = record if isinstance(record, RecordError) else _to_seed(record, cfg, where, row)
        if isinstance(seed, RecordError):
            handle_error(seed, report, cfg.on_error)
            continue
        key = " ".join(seed.prompt.lower().split())
        if key in first_seen:
            handle_error(RecordError(where, row, "duplicate", f"prompt of seed {seed.id} repeats {first_seen[key].origin}"),
                         report, cfg.on_error)
            continue
        if seed.id in ids:
            # Kept, it would merge two records: the improver would train on this prompt with the other's gold answer.
            handle_error(RecordError(where, row, "duplicate_id", f"seed id {seed.id!r} is already used by "
                                     f"{ids[seed.id].origin}"), report, cfg.on_error)
            continue
        ids[seed.id] = seed
        first_seen[key] = seed
        seeds.append(seed)
    if not seeds:
        raise InputFileError(f"{origin}: no usable seed records ({report.to_json()['by_reason'] or 'file is empty'})")
    return seeds, report


def heldout_count(heldout: float, total: int) -> int:
    """A count (>= 1) or a fraction of `total` (0 < x < 1, at least one seed)."""
    if isinstance(heldout, bool) or heldout < 0:
        raise ValueError(f"mode.seeds.heldout must be a count >= 0 or a fraction in (0, 1), got {heldout!r}")
    if 0 < heldout < 1:
        return max(1, round(heldout * total))
    if heldout != int(heldout):
        raise ValueError(f"mode.seeds.heldout={heldout!r}: a count must be a whole number (fractions lie in (0, 1))")
    return int(heldout)


@dataclass
class SeedSplit:
    train: list[Seed]      # generator and improver SFT
    heldout: list[Seed]    # validation of each iteration's model
    unused: list[Seed]     # beyond train_size: their prompts still feed the keyword corpus

    def to_json(self) -> dict:
        return {"train": [s.id for s in self.train], "heldout": [s.id for s in self.heldout],
                "unused": len(self.unused)}


def split_seeds(seeds: list[Seed], cfg: SeedConfig, seed: int) -> SeedSplit:
    """A seeded shuffle: the first `heldout` seeds are held out, the next `train_size` train."""
    n_held = heldout_count(cfg.heldout, len(seeds))
    # The generator's noise keyword needs a second seed, and the trainer one row per worker.
    if len(seeds) - n_held < 2:
        raise ValueError(f"{len(seeds)} seeds with {n_held} held out leave fewer than 2 for training; "
                         "add seeds or lower mode.seeds.heldout")
    order = list(seeds)
    random.Random(seed).shuffle(order)
    rest = order[n_held:]
    n_train = len(rest) if cfg.train_size is None else cfg.train_size
    if n_train < 2:
        raise ValueError(f"mode.seeds.train_size={cfg.train_size} must be >= 2 (or null for every seed)")
    if n_train > len(rest):
        # A recipe that asks for 18k seeds must not quietly train on the builtin 165.
        raise ValueError(f"mode.seeds.train_size={n_train} but only {len(rest)} seeds remain after {n_held} held out "
                         f"(source: {cfg.path or cfg.hf_dataset or 'builtin'}); give mode.seeds.path / hf_dataset "
                         "or lower mode.seeds.train_size (null = every seed)")
    return SeedSplit(train=rest[:n_train], heldout=order[:n_held], unused=rest[n_train:])
