"""Atomic, resumable storage of one iteration's output: pair shards, reject files, manifest.

Layout of `DIR/iter_<k>/`:
    shards/part-00003.parquet    pairs of chunk 3 (PAIR_SCHEMA)
    rejects/part-00003.parquet   every input of chunk 3 that did not become a pair (REJECT_SCHEMA)
    chunks/part-00003.json       commit marker: counts, file sizes and sha256 of both files
    run.json                     the settings that decide which rows exist (checked on resume)
    manifest.json                totals over committed chunks (rewritten after every commit)

A chunk is committed once its marker exists; the marker is written last. Files of a chunk without
marker (a run killed mid-commit) are overwritten when the chunk is regenerated, so a resumed run
never duplicates or loses rows. Readers (training) take the file list from the manifest, never
from a directory listing.

DIR may be a URI (s3://, gs://; data/storage.py): every file goes through the storage layer. Local files are
written by atomic rename; on an object store each object appears whole when its upload completes, and the
marker, uploaded after both files, is still what commits the chunk (no rename needed). Resume verifies the
files' sizes and checksums against the marker either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfalign_ray.data import storage
from selfalign_ray.data.schema import PAIR_SCHEMA, REJECT_SCHEMA, prompt_id

log = logging.getLogger(__name__)


class ResumeMismatchError(RuntimeError):
    pass


def temp_name(path: Path) -> Path:
    """A hidden temporary sibling of `path`, unique across hosts sharing the directory (host + pid + random)."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    """Make a rename/creation in directory `path` durable (a file's fsync does not cover its directory entry)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms/file systems without directory handles: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on directories; the rename itself succeeded
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_name(path)
    created = False
    try:
        # "x" (O_CREAT | O_EXCL): never write into a file someone else created under this name.
        with open(tmp, "xb") as f:
            created = True
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
        fsync_dir(path.parent)
    except OSError as err:
        # A bare write()/fsync() error names no file; say which one was not written (ENOSPC: disk full).
        raise OSError(err.errno, f"{err.strerror or err}: could not write {path} ({len(data)} bytes); "
                                 "nothing under that name was changed") from err
    finally:
        # On ENOSPC or any other failure no half-written file is left under a visible name.
        if created:
            tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def sha256_file(path: Path) -> str:
    if storage.is_uri(path):
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ChunkStats:
    """Counts of one chunk; summed into the manifest."""

    inputs: int = 0
    pairs: int = 0
    drops: Counter = field(default_factory=Counter)
    # {stage: {"prompt": n, "output": n}}
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    prompts_produced: int = 0
    duplicate_prompts: int = 0
    judged_pairs: int = 0
    judge_orders_agree: int = 0
    # {stage: {"completions": n, "length": k}}: completions generated and how many of them hit max_tokens
    # (counted whatever mode.truncation then did with them).
    cut: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "inputs": self.inputs, "pairs": self.pairs, "drops": dict(self.drops), "tokens": self.tokens,
            "prompts_produced": self.prompts_produced, "duplicate_prompts": self.duplicate_prompts,
            "judged_pairs": self.judged_pairs, "judge_orders_agree": self.judge_orders_agree, "cut": self.cut,
        }

    @classmethod
    def from_json(cls, d: dict) -> "ChunkStats":
        return cls(inputs=d["inputs"], pairs=d["pairs"], drops=Counter(d["drops"]), tokens=d["tokens"],
                   prompts_produced=d["prompts_produced"], duplicate_prompts=d["duplicate_prompts"],
                   judged_pairs=d["judged_pairs"], judge_orders_agree=d["judge_orders_agree"],
                   cut=d.get("cut", {}))  # markers written before cut counting have none

    def add(self, other: "ChunkStats") -> None:
        self.inputs += other.inputs
        self.pairs += other.pairs
        self.drops.update(other.drops)
        for stage, counts in other.tokens.items():
            mine = self.tokens.setdefault(stage, {"prompt": 0, "output": 0})
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v
        self.prompts_produced += other.prompts_produced
        self.duplicate_prompts += other.duplicate_prompts
        self.judged_pairs += other.judged_pairs
        self.judge_orders_agree += other.judge_orders_agree
        for stage, counts in other.cut.items():
            mine = self.cut.setdefault(stage, {"completions": 0, "length": 0})
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v


class IterationStore:
    """Shards, rejects, chunk markers and the manifest of one iteration directory."""

    def __init__(self, root: str | Path):
        # A Path for a local directory, the URI string for an object store (data/storage.py).
        self.root = storage.absolute(root) if storage.is_uri(root) else Path(root)
        self.shards_dir = self._sub("shards")
        self.rejects_dir = self._sub("rejects")
        self.chunks_dir = self._sub("chunks")
        for d in (self.shards_dir, self.rejects_dir, self.chunks_dir):
            storage.makedirs(d)

    def _sub(self, *parts: str) -> str | Path:
        return storage.join(self.root, *parts) if isinstance(self.root, str) else self.root.joinpath(*parts)

    @staticmethod
    def _read_table(path, columns: list[str]) -> pa.Table:
        fs, inner = storage.resolve(path)
        return pq.read_table(inner, columns=columns, filesystem=fs)

    # ------------------------------------------------------------- settings
    def bind_settings(self, settings: dict) -> None:
        """Record the settings that determine the rows; refuse to resume under different ones."""
        path = self._sub("run.json")
        if storage.exists(path):
            old = storage.read_json(path)
            if old != json.loads(json.dumps(settings, default=str)):
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ResumeMismatchError(
                    f"{self.root} already holds a run with different settings ({', '.join(diff)}); "
                    f"resume it with the same settings or choose another output_dir."
                )
        else:
            storage.write_json(path, settings)

    # --------------------------------------------------------------- chunks
    @staticmethod
    def part_name(chunk_id: int) -> str:
        return f"part-{chunk_id:05d}"

    @staticmethod
    def _member(folder: Path | str, name) -> Path | str:
        """folder/name for a marker's `file` field, which must be a plain file name: an absolute path, `..` or a
        sub-path would make the run read (and trust) a file outside the iteration dir."""
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or Path(name).is_absolute():
            raise ValueError(f"its file field {name!r} is not a plain file name inside {folder}")
        return storage.join(folder, name)

    def _verify(self, marker: dict) -> str | None:
        for key, folder in (("shard", self.shards_dir), ("rejects", self.rejects_dir)):
            info = marker[key]
            path = self._member(folder, info["file"])
            if not storage.exists(path):
                return f"{path} is missing"
            if storage.size(path) != info["bytes"] or sha256_file(path) != info["sha256"]:
                return f"{path} does not match its checksum (truncated or corrupted)"
        return None

    def committed(self) -> dict[int, dict]:
        """Markers of committed chunks whose files verify. A chunk that fails verification is
        logged by name and left to be regenerated (its marker is removed)."""
        out = {}
        for marker_name in storage.list_names(self.chunks_dir, "part-*.json"):
            marker_path = storage.join(self.chunks_dir, marker_name)
            try:
                marker = storage.read_json(marker_path)
                problem = self._verify(marker)
            except (ValueError, KeyError, TypeError) as err:  # a damaged marker: the chunk is not committed
                marker, problem = None, f"{marker_path} is unreadable ({type(err).__name__}: {err})"
            if problem:
                log.warning("chunk %s will be regenerated: %s", marker_name, problem)
                storage.delete(marker_path)
                continue
            out[marker["chunk_id"]] = marker
        return out

    def seen_prompt_ids(self, markers: dict[int, dict]) -> set[str]:
        """Prompt ids already produced by committed chunks (pairs and rejected prompts)."""
        seen: set[str] = set()
        for chunk_id in markers:
            name = self.part_name(chunk_id) + ".parquet"
            seen.update(self._read_table(storage.join(self.shards_dir, name), ["prompt_id"]).column(0).to_pylist())
            for p in self._read_table(storage.join(self.rejects_dir, name), ["prompt"]).column(0).to_pylist():
                if p:
                    seen.add(prompt_id(p))
        return seen

    def commit_chunk(self, chunk_id: int, pairs: pa.Table, rejects: pa.Table, stats: ChunkStats) -> dict:
        pairs = pairs.cast(PAIR_SCHEMA)
        rejects = rejects.cast(REJECT_SCHEMA)
        if pairs.num_rows + rejects.num_rows != stats.inputs:
            raise AssertionError(
                f"chunk {chunk_id}: {pairs.num_rows} pairs + {rejects.num_rows} rejects != {stats.inputs} inputs"
            )
        name = self.part_name(chunk_id)
        marker: dict[str, Any] = {"chunk_id": chunk_id, "stats": stats.to_json()}
        for key, folder, table in (("rejects", self.rejects_dir, rejects), ("shard", self.shards_dir, pairs)):
            data = _table_bytes(table)
            storage.write_bytes(storage.join(folder, f"{name}.parquet"), data)
            marker[key] = {"file": f"{name}.parquet", "rows": table.num_rows, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}
        # Written after both files: on any store the marker's existence is the commit.
        storage.write_json(storage.join(self.chunks_dir, f"{name}.json"), marker)
        return marker

    # ------------------------------------------------------------- manifest
    def totals(self, markers: dict[int, dict]) -> ChunkStats:
        total = ChunkStats()
        for chunk_id in sorted(markers):
            total.add(ChunkStats.from_json(markers[chunk_id]["stats"]))
        return total

    def shard_files(self, markers: dict[int, dict]) -> list[str]:
        return [storage.join(self.shards_dir, markers[c]["shard"]["file"]) for c in sorted(markers)
                if markers[c]["shard"]["rows"] > 0]

    def read_manifest(self) -> dict:
        path = self._sub("manifest.json")
        return storage.read_json(path) if storage.exists(path) else {}

    def write_manifest(self, markers: dict[int, dict], extra: dict) -> dict:
        total = self.totals(markers)
        judged = total.judged_pairs
        manifest = {
            **extra,
            "inputs": total.inputs,
            "prompts_kept": total.prompts_produced - total.duplicate_prompts,
            "pairs_kept": total.pairs,
            "drops": dict(sorted(total.drops.items())),
            "tokens": total.tokens,
            # Per stage: completions generated, how many stopped at max_tokens, and that share.
            "cut": {stage: {**c, "rate": (c["length"] / c["completions"]) if c["completions"] else None}
                    for stage, c in sorted(total.cut.items())},
            "prompt_repetition_rate": (total.duplicate_prompts / total.prompts_produced) if total.prompts_produced else None,
            "judge_position_agreement": (total.judge_orders_agree / judged) if judged else None,
            "judged_pairs": judged,
            "yield": (total.pairs / total.inputs) if total.inputs else None,
            "chunks": len(markers),
            "shards": [{"file": storage.join(self.shards_dir, markers[c]["shard"]["file"]), "rows": markers[c]["shard"]["rows"],
                        "sha256": markers[c]["shard"]["sha256"]} for c in sorted(markers)],
            "rejects": [{"file": storage.join(self.rejects_dir, markers[c]["rejects"]["file"]), "rows": markers[c]["rejects"]["rows"],
                         "sha256": markers[c]["rejects"]["sha256"]} for c in sorted(markers)],
        }
        storage.write_json(self._sub("manifest.json"), manifest)
        return manifest
