"""Reading user-supplied record files (JSONL, Parquet, text) with per-line error reporting.

Shared by personas (SAO) and seed sets (SynPO): every malformed record is reported with file and
line (or row) number; `on_error="skip"` counts and skips it, `on_error="raise"` stops at the first.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SUPPORTED = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}


class InputFileError(ValueError):
    """A bad input file or record, with the file and line in the message."""


@dataclass
class RecordError:
    file: str
    line: int
    reason: str
    detail: str

    def message(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.detail}"


@dataclass
class ReadReport:
    """Errors met while reading, kept for the log and the manifest."""

    errors: list[RecordError] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.errors))

    def to_json(self, limit: int = 100) -> dict:
        return {"count": len(self.errors), "by_reason": self.counts(),
                "first": [e.message() for e in self.errors[:limit]]}


def file_format(path: Path) -> str:
    fmt = SUPPORTED.get(path.suffix.lower())
    if fmt is None:
        raise InputFileError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {', '.join(sorted(SUPPORTED))}"
        )
    return fmt


def iter_records(path: Path, text_field: str) -> Iterator[tuple[int, Any]]:
    """Yield (line/row number, record or exception) for each non-blank record.

    Text files yield {text_field: line}. Errors are yielded as RecordError so the caller decides.
    A `.json` file is JSON Lines or one JSON array (then the number is the element's, from 1).
    """
    fmt = file_format(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - any pyarrow failure means "not a parquet file"
            raise InputFileError(f"{path}: not a readable Parquet file ({err})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head[:1] == b"[":
            # A .json file holding one JSON array (not JSON Lines): records are numbered by element.
            try:
                records = json.loads(path.read_bytes().decode("utf-8-sig"))
            except UnicodeDecodeError as err:
                raise InputFileError(f"{path}: invalid UTF-8 byte at offset {err.start}") from None
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}:{err.lineno}: invalid JSON array: {err.msg} (column {err.colno})") from None
            yield from enumerate(records, start=1)
            return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is not data
            except UnicodeDecodeError as err:
                yield lineno, RecordError(str(path), lineno, "not_utf8", f"invalid UTF-8 byte at offset {err.start}")
                continue
            line = line.strip()
            if not line:
                continue  # blank lines are allowed anywhere
            if fmt == "text":
                yield lineno, {text_field: line}
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, RecordError(str(path), lineno, "invalid_json", err.msg)


def require_text(record: Any, key: str, path: Path, lineno: int, max_chars: int) -> str | RecordError:
    """The non-empty string at `key`, or the RecordError saying why not."""
    if not isinstance(record, dict):
        return RecordError(str(path), lineno, "not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        return RecordError(str(path), lineno, "missing_field", f"no field {key!r} (fields: {sorted(record)[:10]})")
    value = record[key]
    if not isinstance(value, str):
        return RecordError(str(path), lineno, "wrong_type", f"field {key!r} is {type(value).__name__}, expected string")
    value = value.strip()
    if not value:
        return RecordError(str(path), lineno, "empty_field", f"field {key!r} is empty")
    if len(value) > max_chars:
        return RecordError(str(path), lineno, "too_long", f"field {key!r} has {len(value)} chars > {max_chars}")
    return value


def handle_error(err: RecordError, report: ReadReport, on_error: str) -> None:
    if on_error == "raise":
        raise InputFileError(err.message())
    log.warning("skipping %s", err.message())
    report.errors.append(err)
