"""Reading JSONL training files: streamed line by line, with errors a user can act on.

`iter_jsonl` never holds more than one line in memory, so a multi-gigabyte file is read in
constant memory. Per-line problems (bad UTF-8, bad JSON, an oversized line) are yielded as
error strings so a validator can report every bad line; problems with the file as a whole
(missing, a directory, empty) raise `DataFileError`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

MAX_LINE_BYTES = 64 * 1024 * 1024  # longer lines are reported, not parsed
_CHUNK = 1024 * 1024  # read size when skipping over an oversized line
_BOM = b"\xef\xbb\xbf"

# code -> how to fix it, appended to every DataFileError message
FIXES = {
    "file_not_found": "check data.train_file / data.validation_file (relative paths start from the directory ftlab runs in; sample://<name> points at a bundled sample)",
    "is_a_directory": "point data.train_file / data.validation_file at a .jsonl file, not a folder",
    "empty_file": "add one JSON object per line, e.g. {\"messages\": [...]}",
    "unreadable_file": "check the file's permissions",
    "invalid_json": "make each line one complete JSON object (no trailing commas, double-quoted keys, no pretty-printing across lines)",
    "invalid_utf8": "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)",
    "line_too_long": f"keep each example under {MAX_LINE_BYTES // (1024 * 1024)} MB; split or shorten it",
}


class DataFileError(Exception):
    """A data file that cannot be used, with where (file, line) and how to fix it."""

    def __init__(self, path: Union[str, Path], line: Optional[int], code: str, message: str, fix: Optional[str] = None):
        self.path = Path(path)
        self.line = line
        self.code = code
        self.message = message
        self.fix = fix if fix is not None else FIXES.get(code, "")
        super().__init__(str(self))

    @property
    def where(self) -> str:
        """`file:line`, or just the file when the problem is the whole file."""
        return f"{self.path}:{self.line}" if self.line is not None else str(self.path)

    def __str__(self) -> str:
        text = f"{self.where}: [{self.code}] {self.message}"
        return f"{text} — {self.fix}" if self.fix else text


def check_file(path: Union[str, Path]) -> Path:
    """Raise DataFileError unless `path` is an existing, readable regular file."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, None, "file_not_found", "file not found")
    if path.is_dir():
        raise DataFileError(path, None, "is_a_directory", "is a directory, not a JSONL file")
    if not path.is_file():
        raise DataFileError(path, None, "unreadable_file", "is not a regular file")
    return path


def _read_line(handle, max_bytes: int) -> tuple[Optional[bytes], bool]:
    """Read one line in bounded memory: (bytes or None at EOF, True if it was over the cap)."""
    data = handle.readline(max_bytes + 1)
    if not data:
        return None, False
    if len(data) <= max_bytes or (len(data) == max_bytes + 1 and data.endswith(b"\n")):
        return data, False
    # over the cap: skip to the next newline in fixed-size chunks, keeping none of it
    while True:
        chunk = handle.read(_CHUNK)
        if not chunk:
            return b"", True
        newline = chunk.find(b"\n")
        if newline >= 0:
            handle.seek(newline + 1 - len(chunk), os.SEEK_CUR)
            return b"", True


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:g} MB" if n_bytes >= 2**20 else f"{n_bytes} bytes"


def _parse(raw: bytes) -> tuple[Any, Optional[str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid_utf8: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"invalid_json: {err.msg} at column {err.colno}"
    except RecursionError:
        return None, "invalid_json: nested too deeply to parse"


def iter_jsonl(
    path: Union[str, Path],
    *,
    max_line_bytes: Optional[int] = None,
    on_bytes: Optional[Callable[[int], None]] = None,
) -> Iterator[tuple[int, Any, Optional[str]]]:
    """Stream a JSONL file as (line_number, object or None, error or None).

    Line numbers are 1-based and count blank lines, which are skipped. A UTF-8 BOM and CRLF
    endings are accepted. The error string starts with its code (``invalid_json: ...``,
    ``invalid_utf8: ...``, ``line_too_long: ...``). Raises DataFileError for a missing file,
    a directory, or a file with no non-blank line. Lines longer than `max_line_bytes` are
    reported as ``line_too_long`` and skipped without being held in memory whole
    (default: MAX_LINE_BYTES).
    `on_bytes(n)` is called with the bytes consumed so far (for a progress bar).
    """
    path = check_file(path)
    max_line_bytes = max_line_bytes or MAX_LINE_BYTES
    seen_content = False
    try:
        handle = open(path, "rb", buffering=_CHUNK)
    except OSError as err:
        raise DataFileError(path, None, "unreadable_file", f"cannot open: {err.strerror}") from err
    with handle:
        line_number = 0
        while True:
            raw, too_long = _read_line(handle, max_line_bytes)
            if raw is None:
                break
            line_number += 1
            if on_bytes is not None:
                on_bytes(handle.tell())
            if too_long:
                seen_content = True
                yield line_number, None, f"line_too_long: line is over {_size(max_line_bytes)}, not parsed"
                continue
            if line_number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            raw = raw.strip()  # also drops \r of CRLF
            if not raw:
                continue
            seen_content = True
            obj, error = _parse(raw)
            yield line_number, obj, error
    if not seen_content:
        raise DataFileError(path, None, "empty_file", "file is empty (no non-blank lines)")


def split_error(error: str) -> tuple[str, str]:
    """Split an `iter_jsonl` error string into (code, message)."""
    code, _, message = error.partition(": ")
    return code, message


def load_examples(path: Union[str, Path]) -> list[tuple[int, Any]]:
    """All (line_number, object) pairs of a JSONL file; DataFileError at the first bad line."""
    examples = []
    for line_number, obj, error in iter_jsonl(path):
        if error is not None:
            code, message = split_error(error)
            raise DataFileError(path, line_number, code, message)
        examples.append((line_number, obj))
    return examples
