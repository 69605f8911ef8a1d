"""Personas for SAO: the builtin set, a local file, or a Hugging Face dataset; seeded sampling.

Output of `load_personas`: a list of `Persona(id, text)` (deduplicated) and a `ReadReport` of the
records that were skipped. `sample_personas` picks `dataset_size` of them for an iteration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from selfalign_ray.data.inputs import (
    InputFileError,
    ReadReport,
    RecordError,
    handle_error,
    iter_records,
    line_cap,
    require_text,
)

BUILTIN_PERSONAS = Path(__file__).resolve().parent.parent / "builtin" / "personas.jsonl"


@dataclass(frozen=True)
class Persona:
    id: str
    text: str
    # Where it was read ("file:line"), for messages; not part of identity.
    origin: str = field(default="", compare=False)


@dataclass
class PersonaConfig:
    """Mirrors conf/personas/default.yaml."""

    path: str | None = None        # local .jsonl/.json/.parquet/.txt; null = builtin set
    hf_dataset: str | None = None  # e.g. proj-persona/PersonaHub (needs hub access)
    hf_subset: str | None = "persona"
    hf_split: str = "train"
    field: str = "persona"         # the text field of each record
    id_field: str | None = "id"    # optional id field; line number otherwise
    on_error: str = "skip"         # skip (count and report) | raise
    max_chars: int = 4000


def _from_file(path: Path, cfg: PersonaConfig, report: ReadReport) -> list[Persona]:
    out: list[Persona] = []
    columns = [cfg.field] + ([cfg.id_field] if cfg.id_field else [])
    for lineno, record in iter_records(path, cfg.field, columns=columns, max_line_bytes=line_cap(cfg.max_chars)):
        if isinstance(record, RecordError):
            handle_error(record, report, cfg.on_error)
            continue
        text = require_text(record, cfg.field, path, lineno, cfg.max_chars)
        if isinstance(text, RecordError):
            handle_error(text, report, cfg.on_error)
            continue
        pid = record.get(cfg.id_field) if cfg.id_field and isinstance(record, dict) else None
        out.append(Persona(id=str(pid) if pid not in (None, "") else f"{path.name}:{lineno}", text=text,
                           origin=f"{path}:{lineno}"))
    return out


def _from_hub(cfg: PersonaConfig, report: ReadReport) -> list[Persona]:
    import datasets

    ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_subset, split=cfg.hf_split)
    if cfg.field not in ds.column_names:
        raise InputFileError(f"{cfg.hf_dataset}: no column {cfg.field!r} (columns: {ds.column_names})")
    return _hub_rows(cfg.hf_dataset, ds.select_columns([cfg.field]), cfg, report)


def _hub_rows(name: str, rows, cfg: PersonaConfig, report: ReadReport) -> list[Persona]:
    """Personas of hub rows (dicts holding cfg.field), row i named "dataset:i"; the same checks as file records
    (max_chars included)."""
    out = []
    for i, record in enumerate(rows):
        text = require_text(record, cfg.field, Path(name), i, cfg.max_chars)
        if isinstance(text, RecordError):
            handle_error(text, report, cfg.on_error)
            continue
        out.append(Persona(id=f"{name}:{i}", text=text, origin=f"{name}:{i}"))
    return out


def load_personas(cfg: PersonaConfig) -> tuple[list[Persona], ReadReport]:
    if cfg.on_error not in ("skip", "raise"):
        raise ValueError(f"personas.on_error={cfg.on_error!r} must be 'skip' or 'raise'")
    report = ReadReport()
    if cfg.hf_dataset:
        items = _from_hub(cfg, report)
        origin = cfg.hf_dataset
    else:
        path = Path(cfg.path).expanduser() if cfg.path else BUILTIN_PERSONAS
        items = _from_file(path, cfg, report)
        origin = str(path)
    first_seen: dict[str, Persona] = {}
    ids: dict[str, Persona] = {}
    unique = []
    for p in items:
        key = " ".join(p.text.lower().split())
        file, _, line = p.origin.rpartition(":")
        where = (file or origin, int(line) if line.isdigit() else 0)
        if key in first_seen:
            handle_error(RecordError(*where, "duplicate", f"persona {p.id} repeats {first_seen[key].origin}"),
                         report, cfg.on_error)
            continue
        if p.id in ids:
            # Two personas under one id would share their sampling seeds (seeded per id) and their rows' ids.
            handle_error(RecordError(*where, "duplicate_id", f"id {p.id!r} is already used by {ids[p.id].origin}"),
                         report, cfg.on_error)
            continue
        first_seen[key] = p
        ids[p.id] = p
        unique.append(p)
    if not unique:
        raise InputFileError(f"{origin}: no usable personas ({report.to_json()['by_reason'] or 'file is empty'})")
    return unique, report


def sample_personas(pool: list[Persona], dataset_size: int, seed: int, iteration: int) -> list[Persona]:
    """`dataset_size` personas for iteration k (1-based): consecutive slices of one seeded shuffle,
    so iterations see different personas until the pool is used up, then wrap around."""
    if dataset_size <= 0:
        raise ValueError(f"dataset_size must be positive, got {dataset_size}")
    if dataset_size > len(pool):
        raise ValueError(f"dataset_size={dataset_size} is larger than the persona pool ({len(pool)} personas)")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    start = (iteration - 1) * dataset_size
    return [pool[order[(start + i) % len(pool)]] for i in range(dataset_size)]
