"""Atomic file writes: every record ftlab leaves is written to a temp file and renamed into place,
so a killed process never leaves a half-written file. And file digests, computed once."""
import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union


@contextlib.contextmanager
def atomic_writer(path: Union[str, Path], mode: str = "w"):
    """Open a temporary file beside `path`; fsync and rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: Union[str, Path], text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_writer(path) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def sha256_of(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, streamed; hashed once per process for a given size and modification time
    (the job record, env.json and the tokenization cache all ask for the data file's)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
