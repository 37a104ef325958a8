"""trainer.data.validate: the cookbook's format checks, warnings and statistics, fuzzed."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data.tokens import get_encoding
from trainer.data.validate import (
    FIXES,
    MAX_LISTED_PER_CODE,
    chat_errors,
    prompt_completion_errors,
    validate_file,
    validate_files,
)
from trainer.schema import DataFormat

ENC = get_encoding("cl100k_base")
CHAT, PC = DataFormat.chat, DataFormat.prompt_completion
JSONL_CODES = {"invalid_json", "invalid_utf8", "line_too_long"}


def chat(user="Hi", answer="Hello!", system="Be brief.", **assistant_extra):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer, **assistant_extra}]
    return {"messages": messages}


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def codes(pairs):
    return [code for code, _ in pairs]


@pytest.mark.parametrize("example, expected", [
    ("a string", ["data_type"]),
    ([1, 2], ["data_type"]),
    ({}, ["missing_messages_list"]),
    ({"messages": []}, ["missing_messages_list"]),
    ({"messages": "hi"}, ["missing_messages_list"]),
    ({"messages": ["hi", {"role": "assistant", "content": "x"}]}, ["data_type"]),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, ["message_missing_key"]),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "x"}]}, ["message_missing_key"]),
    ({"messages": [{"role": "assistant", "content": "x", "tone": "dry"}]}, ["message_unrecognized_key"]),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "x"}]}, ["unrecognized_role"]),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, ["missing_content"]),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, ["missing_content"]),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}, ["missing_content"]),
    ({"messages": [{"role": "user", "content": "x"}]}, ["example_missing_assistant_message"]),
    ({"functions": [{"name": "f"}], "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]}, []),
    ({"messages": [{"role": "user", "content": "x"},  # a call needs the function declared
                   {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]},
     ["undeclared_function"]),
    (chat(), []),
    (chat(name="bot", weight=1), []),
])
def test_cookbook_chat_error_codes(example, expected):
    assert codes(chat_errors(example)) == expected


@pytest.mark.parametrize("example, expected", [
    ({"prompt": "a", "completion": " b"}, []),
    ({"prompt": "a"}, ["missing_key"]),
    ({"prompt": "a", "completion": "b", "extra": 1}, ["unrecognized_key"]),
    ({"prompt": 1, "completion": "b"}, ["invalid_type"]),
    (["a"], ["data_type"]),
])
def test_prompt_completion_errors(example, expected):
    assert codes(prompt_completion_errors(example)) == expected


def test_every_error_has_file_line_code_and_fix(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", [
        chat(), "{oops", {"messages": [{"role": "user", "content": "x"}]}, chat(), '"just a string"'])
    report = validate_file(path, CHAT, ENC, 4096)
    errors = [(i.line, i.code) for i in report.errors]
    assert errors == [(2, "invalid_json"), (3, "example_missing_assistant_message"), (5, "data_type")]
    for issue in report.errors:
        assert issue.file == str(path) and " — " in issue.message
        assert "\n" not in issue.message
    assert report.n_valid == 2


def test_chat_warnings(tmp_path):
    rows = [
        chat(system=None),  # 1: no system
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},  # 2: no user
        chat(answer=""),  # 3: empty assistant content
        {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},  # 4
        chat(weight=2),  # 5: weight not 0/1
        chat(weight=0),  # 6: nothing trained
        chat(user="long " * 5000),  # 7: over the context
        chat(),  # 8
        chat(),  # 9: duplicate of 8
    ]
    report = validate_file(write_rows(tmp_path / "t.jsonl", rows), CHAT, ENC, 4096)
    assert not report.errors
    found = {(i.line, i.code) for i in report.warnings}
    assert {(1, "no_system_message"), (2, "no_user_message"), (3, "empty_assistant_content"),
            (4, "weight_on_non_assistant"), (5, "invalid_weight"), (6, "no_trained_messages"),
            (7, "too_long"), (9, "duplicate"), (None, "too_few_examples")} <= found
    too_long = next(i for i in report.warnings if i.code == "too_long")
    tokens = report.token_counts[6]
    assert f"{tokens} tokens" in too_long.message and f"last {tokens - 4096} would be cut" in too_long.message
    stats = report.stats()
    assert stats["n_too_long"] == 1 and stats["tokens_cut"] == tokens - 4096
    assert stats["n_missing_system"] == 2 and stats["n_missing_user"] == 1


def test_example_count_thresholds(tmp_path):
    def warn_codes(n):
        rows = [chat(user=f"q{i}") for i in range(n)]
        report = validate_file(write_rows(tmp_path / f"t{n}.jsonl", rows), CHAT, ENC, 4096)
        return {i.code for i in report.warnings}
    assert "too_few_examples" in warn_codes(9)
    assert {"too_few_examples", "few_examples"}.isdisjoint(warn_codes(50))
    assert "few_examples" in warn_codes(10) and "too_few_examples" not in warn_codes(10)


def test_prompt_completion_warnings_and_legacy_advice(tmp_path):
    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2?", "completion": ""},
            {"prompt": "Q1", "completion": "A1"}]
    report = validate_file(write_rows(tmp_path / "pc.jsonl", rows), PC, ENC, 4096)
    found = {(i.line, i.code) for i in report.warnings}
    assert {(2, "empty_completion"), (3, "duplicate"), (None, "no_common_separator"),
            (None, "completion_no_leading_space"), (None, "no_stop_sequence")} <= found
    good = [{"prompt": f"Q{i}\n\n###\n\n", "completion": f" A{i} END"} for i in range(3)]
    report = validate_file(write_rows(tmp_path / "good.jsonl", good), PC, ENC, 4096)
    assert {i.code for i in report.warnings} == {"too_few_examples"}
    assert report.stats()["completion_tokens_per_example"]["max"] == len(ENC.encode(" A0 END"))


def test_statistics_match_the_cookbook(tmp_path):
    rows = [chat(user="a " * n, answer="b " * n) for n in range(1, 11)]
    report = validate_file(write_rows(tmp_path / "s.jsonl", rows), CHAT, ENC, 4096)
    stats = report.stats()
    totals = sorted(report.token_counts)
    assert stats["total_tokens_per_example"]["min"] == totals[0]
    assert stats["total_tokens_per_example"]["max"] == totals[-1]
    assert stats["total_tokens_per_example"]["median"] == (totals[4] + totals[5]) / 2
    assert stats["messages_per_example"] == {"min": 3, "max": 3, "mean": 3, "median": 3, "p10": 3, "p90": 3}
    assert stats["assistant_tokens_per_example"]["min"] == len(ENC.encode("b "))


def test_validation_examples_repeating_training_are_flagged(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [chat(user=f"q{i}") for i in range(3)])
    valid = write_rows(tmp_path / "valid.jsonl", [chat(user="q1"), chat(user="new")])
    report = validate_files({"train": train, "validation": valid}, CHAT, ENC, 4096)
    leaks = [(i.file, i.line) for i in report.warnings if i.code == "validation_in_train"]
    assert leaks == [(str(valid), 1)]
    assert report.ok and set(report.to_json()) == {"ok", "errors", "warnings", "stats"}


def test_file_level_problems_become_errors(tmp_path):
    report = validate_files({"train": tmp_path / "nope.jsonl"}, CHAT, ENC, 4096)
    assert not report.ok and report.file_error.code == "file_not_found"
    assert report.to_json()["errors"][0]["code"] == "file_not_found"


def test_issue_lists_are_capped_but_counted(tmp_path):
    rows = ["{bad"] * (MAX_LISTED_PER_CODE + 7)
    report = validate_file(write_rows(tmp_path / "bad.jsonl", rows), CHAT, ENC, 4096)
    listed = report.listed("error")
    assert len(listed) == MAX_LISTED_PER_CODE + 1 and "7 more" in listed[-1].message
    assert report.stats()["error_counts"] == {"invalid_json": MAX_LISTED_PER_CODE + 7}


# --- fuzzing --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "name", "weight", "function_call", "extra"]),
                    st.sampled_from(["user", "assistant", "system", "bot", "", "<|endoftext|>"]) | json_values,
                    max_size=5),
    max_size=4,
)
examples = json_values | st.fixed_dictionaries({"messages": messages}) | st.fixed_dictionaries(
    {}, optional={"prompt": json_values | st.text(), "completion": json_values | st.text(), "x": json_values})
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(example=examples)
def test_checks_never_raise_and_use_known_codes(example):
    for check in (chat_errors, prompt_completion_errors):
        for code, what in check(example):
            assert code in FIXES and isinstance(what, str)


@FUZZ
@given(lines=st.lists(st.binary(max_size=40) | examples.map(lambda e: json.dumps(e).encode()), max_size=8),
       fmt=st.sampled_from([CHAT, PC]))
def test_validator_never_raises_on_arbitrary_files(tmp_path, lines, fmt):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    report = validate_files({"train": path}, fmt, ENC, 64)
    for issue in report.errors + report.warnings:
        assert issue.code in FIXES or issue.code in JSONL_CODES or issue.code == "empty_file"
    if report.file_error is None:
        assert report.stats()["train"]["n_lines"] >= len(report.file("train").token_counts)
    json.dumps(report.to_json())
