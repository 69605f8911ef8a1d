"""Where a run's outputs live: a local path or a URI (s3://bucket/prefix, gs://bucket/prefix, any filesystem
pyarrow resolves), behind one small set of functions that every writer and reader of the output dir calls.

    local path   the POSIX file system; writes are atomic renames (data/shards.py atomic_write_bytes), as before.
    URI          pyarrow.fs.FileSystem.from_uri (S3FileSystem, GcsFileSystem, ...). An object store publishes an
                 object whole when its upload completes, so a write needs no rename; what makes a set of objects
                 one commit is written after them (a chunk's marker, train.json), never before.

Credentials and endpoints come only from each store's standard environment variables, read by pyarrow (and by Ray
Train and Ray Data, which get the same filesystem object): for S3 AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (an S3-compatible server: MinIO, moto,
Ceph; pyarrow >= 13 / >= 16 read them itself, so the layer passes no endpoint); for GCS
GOOGLE_APPLICATION_CREDENTIALS or the node's service account. Nothing of them is written into any config or record.

Model directories on a URI (iter_k/model) are used by code that needs local files (engines, the trainer):
`local_copy` downloads one into a per-machine cache, CACHE_ENV or <system temp>/selfalign_ray-storage/, keyed by
the URI and its listing (names + sizes), so a re-trained model is never served from a stale copy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# Overrides where local copies of URIs (models) and local staging dirs (training output) are kept.
CACHE_ENV = "SELFALIGN_STORAGE_CACHE"


def is_uri(path: str | os.PathLike) -> bool:
    """`scheme://...` other than file://: an object store or any other non-POSIX filesystem."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def absolute(path: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash); a local path expanded and made absolute."""
    if is_uri(path):
        return str(path).rstrip("/")
    return str(Path(str(path)).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def name(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it). Raises a ValueError naming the URI if no filesystem handles it."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    try:
        return pafs.FileSystem.from_uri(str(path).rstrip("/"))
    except (ValueError, OSError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path}: no filesystem for this URI ({err}); local paths, s3:// and gs:// are supported"
                         ) from err


def resolve_many(paths: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """For readers that take one filesystem for many files (Ray Data, pyarrow datasets): (None, paths) when all
    are local, else (the filesystem, the paths inside it). Mixing stores in one call is refused."""
    if not any(is_uri(p) for p in paths):
        return None, list(paths)
    schemes = {str(p).split("://", 1)[0] if is_uri(p) else "local" for p in paths}
    if len(schemes) > 1:
        raise ValueError(f"files on different stores ({', '.join(sorted(schemes))}) cannot be read together")
    fs, _ = resolve(paths[0])
    return fs, [resolve(p)[1] for p in paths]


# ------------------------------------------------------------------------------------------ files
def exists(path: str | os.PathLike) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def size(path: str | os.PathLike) -> int:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path} does not exist")
    return info.size


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} does not exist") from err


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_text(path))


def open_input(path: str | os.PathLike):
    """A seekable file for pyarrow readers (pq.read_table, pq.read_metadata)."""
    fs, p = resolve(path)
    return fs.open_input_file(p)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Local: atomic (temp name + rename, data/shards.py), missing parent directories created (as a store needs
    none). URI: one upload, visible only once complete."""
    if not is_uri(path):
        from selfalign_ray.data.shards import atomic_write_bytes

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), data)
        return
    fs, p = resolve(path)
    try:
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as err:
        raise OSError(f"could not write {path} ({len(data)} bytes): {err}") from err


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    # The same bytes as data/shards.py atomic_write_json writes.
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete(path: str | os.PathLike) -> None:
    """Remove a file; a missing one is not an error."""
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


def makedirs(path: str | os.PathLike) -> None:
    """A directory (local); on an object store prefixes need no creation, so nothing is written."""
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def delete_dir(path: str | os.PathLike) -> None:
    """Remove a directory tree; a missing one is not an error."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = resolve(path)
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        pass


def list_names(folder: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Sorted names of the files directly in `folder` matching `pattern` (fnmatch); [] if it does not exist or is a file."""
    fs, p = resolve(folder)
    if fs.get_file_info(p).type == pafs.FileType.File:  # a file where a folder was expected: nothing in it
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))


def list_dirs(folder: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Sorted names of the sub-directories (prefixes) of `folder` matching `pattern`."""
    fs, p = resolve(folder)
    if fs.get_file_info(p).type == pafs.FileType.File:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and fnmatch.fnmatch(i.base_name, pattern))


def _files_under(path: str | os.PathLike) -> list[pafs.FileInfo]:
    fs, p = resolve(path)
    return [i for i in fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File]


# ------------------------------------------------------------------------------- whole directories
def upload_dir(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a local directory tree to `dest` (a URI or a local path), file by file."""
    fs, p = resolve(dest)
    pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(src: str | os.PathLike, local: str | os.PathLike, skip_suffixes: tuple[str, ...] = ()) -> None:
    """Copy the tree under `src` into the local directory `local` (files ending in `skip_suffixes` left out)."""
    fs, p = resolve(src)
    local = Path(local)
    for info in _files_under(src):
        if info.path.endswith(skip_suffixes):
            continue
        target = local / info.path[len(p):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "selfalign_ray-storage")
    root.mkdir(parents=True, exist_ok=True)
    return root


def staging_dir(uri: str, kind: str = "staging") -> Path:
    """A local directory standing for `uri` on this machine (the same one on every call, across restarts)."""
    digest = hashlib.sha256(absolute(uri).encode()).hexdigest()[:16]
    return cache_root() / kind / f"{name(uri)}-{digest}"


def local_copy(path: str | os.PathLike) -> str:
    """A local directory with the files under `path`: the path itself when local, else a cached download.

    Safe under concurrent callers (the engines of one node): each downloads into its own temporary directory and
    renames it into place; the first rename wins and later ones discard theirs."""
    if not is_uri(path):
        return str(path)
    files = _files_under(path)
    if not files:
        raise FileNotFoundError(f"{path}: nothing stored under this URI")
    listing = sorted((i.path, i.size) for i in files)
    digest = hashlib.sha256(json.dumps([absolute(path), listing]).encode()).hexdigest()[:16]
    target = cache_root() / "copies" / f"{name(path)}-{digest}"
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        download_dir(path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("local copy of %s: %s", path, target)
    return str(target)
