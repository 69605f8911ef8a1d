"""Reading user-supplied record files (JSONL, Parquet, text) with per-line error reporting, in bounded memory.

Shared by personas (SAO), seed sets and the keyword corpus (SynPO): every malformed record is reported with file
and line (or row) number; `on_error="skip"` counts and skips it, `on_error="raise"` stops at the first.

Memory stays bounded whatever the file holds: lines are read with a byte cap (a longer line is a `line_too_long`
record, skipped without ever being held whole), Parquet is read in row batches of the needed columns only
(`columns=`), a `.json` array is parsed only up to `MAX_JSON_ARRAY_BYTES` (a larger one is refused: use JSON
Lines), and a ReadReport keeps counts per reason plus the first `MAX_KEPT_ERRORS` errors.
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
# One line of a JSONL / text file may hold at most this many bytes (a persona or seed is far smaller;
# `line_cap(max_chars)` raises it for long fields); a longer one is skipped while it is read, in pieces.
MAX_LINE_BYTES = 1 << 20
# A `.json` file holding one JSON array is parsed whole, so only up to this size.
MAX_JSON_ARRAY_BYTES = 64 << 20
# Parquet rows per batch.
PARQUET_BATCH_ROWS = 1024
# Errors kept with their message (all are counted by reason), and how many are logged one by one.
MAX_KEPT_ERRORS = 100
MAX_LOGGED_ERRORS = 20
_SKIP_CHUNK = 1 << 20


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
    """Errors met while reading, for the log and the manifest: every one counted by reason, the first
    MAX_KEPT_ERRORS kept whole (`errors`), so a file of bad lines cannot grow the driver's memory."""

    errors: list[RecordError] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)

    def add(self, err: RecordError) -> None:
        self.by_reason[err.reason] += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(err)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def counts(self) -> dict[str, int]:
        return dict(self.by_reason)

    def to_json(self, limit: int = MAX_KEPT_ERRORS) -> dict:
        return {"count": self.total, "by_reason": self.counts(),
                "first": [e.message() for e in self.errors[:limit]]}


def line_cap(max_chars: int) -> int:
    """Bytes a line may hold for a field of `max_chars` characters (UTF-8 and JSON escapes take up to 6 bytes a
    character, plus the record's other fields); never below MAX_LINE_BYTES."""
    return max(MAX_LINE_BYTES, 8 * int(max_chars))


def read_lines(f, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of a binary file, each line read with at most `max_bytes + 1` bytes held; a longer
    line is consumed in pieces and yielded as None."""
    lineno = 0
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while True:  # drop the rest of the line without holding it
                rest = f.readline(_SKIP_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        yield lineno, raw


def file_format(path: Path) -> str:
    fmt = SUPPORTED.get(path.suffix.lower())
    if fmt is None:
        raise InputFileError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {', '.join(sorted(SUPPORTED))}"
        )
    return fmt


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file, PARQUET_BATCH_ROWS at a time, only `columns` (those the file has)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        wanted = None if columns is None else [c for c in dict.fromkeys(columns) if c in names]
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted)
        first = next(batches, None)
    except Exception as err:  # noqa: BLE001 - any pyarrow failure means "not a parquet file"
        raise InputFileError(f"{path}: not a readable Parquet file ({err})") from None
    row = 0
    while first is not None:
        for record in first.to_pylist():
            row += 1
            yield row, record
        first = next(batches, None)


def iter_records(path: Path, text_field: str, columns: list[str] | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Yield (line/row number, record or exception) for each non-blank record.

    Text files yield {text_field: line}. Errors are yielded as RecordError so the caller decides.
    A `.json` file is JSON Lines or one JSON array (then the number is the element's, from 1).
    `columns`: the fields the caller reads (Parquet reads only those); `max_line_bytes`: the per-line cap.
    """
    fmt = file_format(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    if fmt == "parquet":
        yield from _parquet_rows(path, columns)
        return
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head[:1] == b"[":
            # A .json file holding one JSON array (not JSON Lines): records are numbered by element.
            size = path.stat().st_size
            if size > MAX_JSON_ARRAY_BYTES:
                raise InputFileError(
                    f"{path}: a JSON array of {size} bytes is over the {MAX_JSON_ARRAY_BYTES >> 20} MiB read whole; "
                    f"give it as JSON Lines, one record a line (e.g. `jq -c '.[]' {path.name} > "
                    f"{path.stem}.jsonl`), which is read line by line")
            try:
                records = json.loads(path.read_bytes().decode("utf-8-sig"))
            except UnicodeDecodeError as err:
                raise InputFileError(f"{path}: invalid UTF-8 byte at offset {err.start}") from None
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}:{err.lineno}: invalid JSON array: {err.msg} (column {err.colno})") from None
            yield from enumerate(records, start=1)
            return
    with open(path, "rb") as f:
        for lineno, raw in read_lines(f, max_line_bytes):
            if raw is None:
                yield lineno, RecordError(str(path), lineno, "line_too_long",
                                          f"line longer than {max_line_bytes} bytes (skipped unread)")
                continue
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
    if report.total < MAX_LOGGED_ERRORS:
        log.warning("skipping %s", err.message())
    elif report.total == MAX_LOGGED_ERRORS:
        log.warning("skipping %s (further bad records are counted by reason, not logged one by one)", err.message())
    report.add(err)
