"""trainer.data.jsonl: streaming JSONL with per-line errors and clear file-level errors."""
import json
import tracemalloc

import pytest

from trainer.data import jsonl
from trainer.data.jsonl import DataFileError, iter_jsonl, load_examples
from trainer.files import atomic_writer, write_json


def write(tmp_path, data: bytes, name="train.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_parses_lines_with_bom_crlf_and_blank_lines(tmp_path):
    path = write(tmp_path, b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n\t\n{"b": 2}\r\n{"c": 3}')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}, None), (5, {"b": 2}, None), (6, {"c": 3}, None)]
    assert load_examples(path) == [(1, {"a": 1}), (5, {"b": 2}), (6, {"c": 3})]


def test_bad_lines_are_reported_per_line_not_raised(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n{"a": 1,}\n\xff\xfe{}\n{"ok": true}\n')
    rows = list(iter_jsonl(path))
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert rows[1][1] is None and rows[1][2].startswith("invalid_json: ")
    assert rows[2][1] is None and rows[2][2].startswith("invalid_utf8: byte 0xff")
    assert rows[3] == (4, {"ok": True}, None)


def test_load_examples_names_file_line_code_and_fix(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n\n{not json}\n')
    with pytest.raises(DataFileError) as info:
        load_examples(path)
    err = info.value
    assert (err.line, err.code) == (3, "invalid_json")
    text = str(err)
    assert text.startswith(f"{path}:3: [invalid_json] ")
    assert " — " in text and "JSON object" in text


@pytest.mark.parametrize("make, code", [
    (lambda p: p / "missing.jsonl", "file_not_found"),
    (lambda p: p, "is_a_directory"),
    (lambda p: write(p, b""), "empty_file"),
    (lambda p: write(p, b"\n  \r\n\n"), "empty_file"),
    (lambda p: write(p, b"\xef\xbb\xbf\n"), "empty_file"),
])
def test_unusable_files_raise_with_a_fix(tmp_path, make, code):
    path = make(tmp_path)
    with pytest.raises(DataFileError) as info:
        list(iter_jsonl(path))
    assert info.value.code == code and info.value.line is None
    assert str(info.value).startswith(f"{path}: [{code}]") and info.value.fix


def test_overlong_line_is_reported_and_skipped(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n{"b": "' + b"x" * 5000 + b'"}\n{"c": 3}\n')
    rows = list(iter_jsonl(path, max_line_bytes=1000))
    assert rows[0] == (1, {"a": 1}, None)
    assert rows[1][0] == 2 and rows[1][2].startswith("line_too_long")
    assert rows[2] == (3, {"c": 3}, None)
    # exactly at the cap is fine (the newline does not count)
    line = json.dumps({"b": "y" * 100}).encode()
    path = write(tmp_path, line + b"\n" + line)
    assert [e for _, _, e in iter_jsonl(path, max_line_bytes=len(line))] == [None, None]
    assert [e is None for _, _, e in iter_jsonl(path, max_line_bytes=len(line) - 1)] == [False, False]


def test_a_50mb_line_is_streamed_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 4 * 2**20)
    path = write(tmp_path, b'{"a": "' + b"z" * (50 * 2**20) + b'"}\n{"b": 2}\n')
    tracemalloc.start()
    try:
        rows = list(iter_jsonl(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows[0][2] == "line_too_long: line is over 4 MB, not parsed"
    assert rows[1] == (2, {"b": 2}, None)
    assert peak < 12 * 2**20


def test_a_2gb_file_is_streamed_not_loaded(tmp_path, monkeypatch):
    """A sparse 2 GB file: one line, 2 GB of NULs, one line; memory stays small."""
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 2**20)
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(b'{"first": 1}\n')
        handle.seek(2 * 2**30)
        handle.write(b'\n{"last": 3}\n')
    tracemalloc.start()
    try:
        rows = list(iter_jsonl(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(n, o) for n, o, _ in rows] == [(1, {"first": 1}), (2, None), (3, {"last": 3})]
    assert rows[1][2].startswith("line_too_long")
    assert peak < 8 * 2**20


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    path = write(tmp_path, b"[" * 100_000 + b"]" * 100_000 + b"\n")
    (line, obj, error), = list(iter_jsonl(path))
    assert obj is None and error.startswith("invalid_json")


def test_on_bytes_reports_progress(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n{"b": 2}\n')
    seen = []
    list(iter_jsonl(path, on_bytes=seen.append))
    assert seen == [9, 18]


def test_atomic_writer_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
