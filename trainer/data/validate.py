"""Checking training files the way the hosted service and OpenAI's cookbook do.

`validate_file` streams one JSONL file and returns a `FileReport`: errors (the cookbook's
format-error codes plus `invalid_json`), warnings, per-example token counts and the
cookbook's statistics. `validate_files` checks the training and validation files together
(validation examples that repeat training examples are flagged) and returns a
`ValidationReport`, whose `to_json()` is the content of validation.json.

Every issue carries file, line, code and a one-line message that ends with how to fix it.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from trainer.data.tokens import as_format, count_assistant_tokens, count_example_tokens
from trainer.data.jsonl import FIXES as LINE_FIXES, DataFileError, iter_jsonl, split_error
from trainer.schema import DataFormat

ROLES = ("system", "user", "assistant", "function")
MESSAGE_KEYS = ("role", "content", "name", "function_call", "weight")
PROMPT_COMPLETION_KEYS = ("prompt", "completion")
HOSTED_MIN_EXAMPLES = 10  # the hosted service refuses fewer
RECOMMENDED_MIN_EXAMPLES = 50  # OpenAI: clear improvements from 50 to 100 examples
MAX_LISTED_PER_CODE = 50  # issues listed per (file, code); the rest are counted

FIXES = LINE_FIXES | {  # one table: reading a line (jsonl.py) and checking what it holds
    "data_type": 'each line must be a JSON object such as {"messages": [...]}',
    "missing_messages_list": 'give the example a non-empty "messages" list',
    "message_missing_key": 'every message needs "role" and "content"',
    "message_unrecognized_key": f"remove it; allowed keys are {', '.join(MESSAGE_KEYS)}",
    "unrecognized_role": f"use one of {', '.join(ROLES)}",
    "missing_content": "give the message non-empty string content",
    "example_missing_assistant_message": "add the assistant reply the model should learn",
    "missing_key": 'each line needs "prompt" and "completion"',
    "unrecognized_key": 'remove it; prompt/completion examples take only "prompt" and "completion"',
    "invalid_type": "make it a JSON string",
    "no_system_message": "optional; add the system prompt you will use at inference, if any",
    "no_user_message": "add the user turn the reply answers",
    "too_long": "shorten the example or split the conversation",
    "duplicate": "remove the repeat",
    "validation_in_train": "keep validation examples out of the training file",
    "empty_assistant_content": 'give it content or set "weight": 0 so it is not trained',
    "empty_completion": "give it the text the model should produce",
    "weight_on_non_assistant": "weight only applies to assistant messages; remove it",
    "invalid_weight": 'use "weight": 0 (not trained) or 1 (trained)',
    "no_trained_messages": "set weight 1 on at least one assistant message",
    "too_few_examples": f"the hosted service needs at least {HOSTED_MIN_EXAMPLES}; add examples",
    "few_examples": f"OpenAI recommends at least {RECOMMENDED_MIN_EXAMPLES}; add examples",
    "no_common_separator": r"end every prompt with the same separator, e.g. '\n\n###\n\n'",
    "completion_no_leading_space": "start every completion with a single space",
    "no_stop_sequence": r"end every completion with the same stop sequence, e.g. '\n' or ' END'",
}


@dataclass
class Issue:
    """One error or warning: where it is, its code, and a message ending with the fix."""

    file: str
    line: Optional[int]
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: [{self.code}] {self.message}"


def _message(code: str, what: str) -> str:
    fix = FIXES.get(code)
    return f"{what} — {fix}" if fix else what


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


# --- per-example checks: each returns [(code, what)] -------------------------------------

def chat_errors(example: Any) -> list[tuple[str, str]]:
    """The cookbook's format errors for one chat example (empty list when it is valid)."""
    if not isinstance(example, dict):
        return [("data_type", f"example is a JSON {_type_name(example)}, not an object")]
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        what = "no \"messages\" key" if "messages" not in example else f"\"messages\" is {'empty' if messages == [] else 'a ' + _type_name(messages)}"
        return [("missing_messages_list", what)]
    errors = []
    for index, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            errors.append(("data_type", f"message {index} is a JSON {_type_name(message)}, not an object"))
            continue
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            errors.append(("message_missing_key", f"message {index} has no {' or '.join(repr(k) for k in missing)}"))
        unknown = [key for key in message if key not in MESSAGE_KEYS]
        if unknown:
            errors.append(("message_unrecognized_key", f"message {index} has unrecognized key(s) {', '.join(map(repr, unknown))}"))
        role = message.get("role")
        if "role" in message and not (isinstance(role, str) and role in ROLES):
            errors.append(("unrecognized_role", f"message {index} has role {json.dumps(role)[:40]}"))
        if "content" in message:
            content = message["content"]
            if content is None and message.get("function_call"):
                pass  # a function call carries no content
            elif not isinstance(content, str):
                errors.append(("missing_content", f"message {index} content is {_type_name(content)}, not a string"))
            elif content == "" and role != "assistant":  # empty assistant content is a warning
                errors.append(("missing_content", f"message {index} ({role}) has empty content"))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        errors.append(("example_missing_assistant_message", "no message has role \"assistant\""))
    return errors


def chat_warnings(example: dict) -> list[tuple[str, str]]:
    """Warnings for a chat example that has no format errors."""
    warnings = []
    messages = example["messages"]
    roles = [m.get("role") for m in messages]
    if "system" not in roles:
        warnings.append(("no_system_message", "no system message"))
    if "user" not in roles:
        warnings.append(("no_user_message", "no user message"))
    trained = 0
    for index, message in enumerate(messages, 1):
        role = message.get("role")
        if role == "assistant" and message.get("content") == "" and not message.get("function_call"):
            warnings.append(("empty_assistant_content", f"message {index} (assistant) has empty content"))
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                warnings.append(("weight_on_non_assistant", f"message {index} ({role}) has a weight"))
            elif isinstance(weight, bool) or weight not in (0, 1):
                warnings.append(("invalid_weight", f"message {index} has weight {json.dumps(weight)[:40]}"))
        if role == "assistant" and message.get("weight", 1) != 0:
            trained += 1
    if trained == 0:
        warnings.append(("no_trained_messages", "every assistant message has weight 0, nothing is trained"))
    return warnings


def prompt_completion_errors(example: Any) -> list[tuple[str, str]]:
    """Format errors for one prompt/completion example."""
    if not isinstance(example, dict):
        return [("data_type", f"example is a JSON {_type_name(example)}, not an object")]
    errors = []
    missing = [key for key in PROMPT_COMPLETION_KEYS if key not in example]
    if missing:
        errors.append(("missing_key", f"no {' or '.join(repr(k) for k in missing)}"))
    unknown = [key for key in example if key not in PROMPT_COMPLETION_KEYS]
    if unknown:
        errors.append(("unrecognized_key", f"unrecognized key(s) {', '.join(map(repr, unknown))}"))
    for key in PROMPT_COMPLETION_KEYS:
        if key in example and not isinstance(example[key], str):
            errors.append(("invalid_type", f"{key!r} is {_type_name(example[key])}, not a string"))
    return errors


def prompt_completion_warnings(example: dict) -> list[tuple[str, str]]:
    """Warnings for a prompt/completion example that has no format errors."""
    if example["completion"].strip() == "":
        return [("empty_completion", "completion is empty")]
    return []


# --- statistics ---------------------------------------------------------------------------

def distribution(values: Iterable[float]) -> Optional[dict]:
    """min, max, mean, median, p10, p90 as the cookbook prints them (None when empty)."""
    import numpy as np

    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return None
    return {
        "min": float(data.min()), "max": float(data.max()),
        "mean": float(data.mean()), "median": float(np.median(data)),
        "p10": float(np.quantile(data, 0.1)), "p90": float(np.quantile(data, 0.9)),
    }


def _common_suffix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return a[len(a) - n:] if n else ""


def _digest(example: Any) -> Optional[bytes]:
    try:
        text = json.dumps(example, sort_keys=True, ensure_ascii=False)
    except (RecursionError, ValueError, TypeError):
        return None
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).digest()


# --- files --------------------------------------------------------------------------------

@dataclass
class FileReport:
    """What one file's check found. Token arrays hold valid examples only, in file order."""

    path: Path
    kind: str  # train | validation
    format: DataFormat
    context_length: int
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    error_counts: Counter = field(default_factory=Counter)
    warning_counts: Counter = field(default_factory=Counter)
    file_error: Optional[DataFileError] = None  # missing, directory, empty
    n_lines: int = 0  # non-blank lines
    token_lines: array = field(default_factory=lambda: array("q"))
    token_counts: array = field(default_factory=lambda: array("q"))
    assistant_token_counts: array = field(default_factory=lambda: array("q"))
    messages_per_example: array = field(default_factory=lambda: array("q"))
    digests: dict = field(default_factory=dict, repr=False)

    @property
    def n_valid(self) -> int:
        return len(self.token_counts)

    def add(self, kind: str, line: Optional[int], code: str, what: str) -> None:
        """Record an issue; beyond MAX_LISTED_PER_CODE per code it is only counted."""
        counts, issues = (self.error_counts, self.errors) if kind == "error" else (self.warning_counts, self.warnings)
        counts[code] += 1
        if counts[code] <= MAX_LISTED_PER_CODE:
            issues.append(Issue(str(self.path), line, code, _message(code, what)))

    def listed(self, kind: str) -> list:
        """Issues for validation.json: listed ones plus a summary per code that overflowed."""
        counts, issues = (self.error_counts, self.errors) if kind == "error" else (self.warning_counts, self.warnings)
        extra = [Issue(str(self.path), None, code, f"{n - MAX_LISTED_PER_CODE} more lines with this {kind} not listed")
                 for code, n in counts.items() if n > MAX_LISTED_PER_CODE]
        return issues + extra

    def stats(self) -> dict:
        """The cookbook's statistics for this file."""
        over = [t - self.context_length for t in self.token_counts if t > self.context_length]
        stats = {
            "file": str(self.path),
            "format": self.format.value,
            "n_lines": self.n_lines,
            "n_examples": self.n_valid,
            "n_errors": sum(self.error_counts.values()),
            "n_warnings": sum(self.warning_counts.values()),
            "error_counts": dict(self.error_counts),
            "warning_counts": dict(self.warning_counts),
            "total_tokens_per_example": distribution(self.token_counts),
            "n_too_long": len(over),
            "tokens_cut": sum(over),
        }
        if self.format == DataFormat.chat:
            stats["messages_per_example"] = distribution(self.messages_per_example)
            stats["assistant_tokens_per_example"] = distribution(self.assistant_token_counts)
            stats["n_missing_system"] = self.warning_counts.get("no_system_message", 0)
            stats["n_missing_user"] = self.warning_counts.get("no_user_message", 0)
        else:
            stats["completion_tokens_per_example"] = distribution(self.assistant_token_counts)
        return stats


def validate_file(
    path: Path,
    fmt: DataFormat,
    encoding,
    context_length: int,
    *,
    kind: str = "train",
    train_digests: Optional[dict] = None,
    on_bytes: Optional[Callable[[int], None]] = None,
    on_example: Optional[Callable[[int, Any], None]] = None,
) -> FileReport:
    """Stream and check one file. Never raises for bad content; a file-level problem
    (missing, directory, empty) is recorded in `file_error` and as an error. `on_example(line,
    example)` sees every line that parses (the content screen reads along)."""
    fmt = as_format(fmt)
    report = FileReport(Path(path), kind, fmt, int(context_length))
    check_errors, check_warnings = (
        (chat_errors, chat_warnings) if fmt == DataFormat.chat
        else (prompt_completion_errors, prompt_completion_warnings)
    )
    prompt_suffix = completion_suffix = None
    n_no_leading_space = 0
    try:
        for line, example, error in iter_jsonl(path, on_bytes=on_bytes):
            report.n_lines += 1
            if error is not None:
                code, what = split_error(error)
                report.add("error", line, code, what)
                continue
            if on_example is not None:
                on_example(line, example)
            errors = check_errors(example)
            for code, what in errors:
                report.add("error", line, code, what)
            if errors:
                continue
            for code, what in check_warnings(example):
                report.add("warning", line, code, what)
            tokens = count_example_tokens(example, fmt, encoding)
            if tokens > context_length:
                report.add("warning", line, "too_long",
                           f"{tokens} tokens, over the {context_length}-token context; "
                           f"the last {tokens - context_length} would be cut")
            digest = _digest(example)
            if digest is not None:
                if digest in report.digests:
                    report.add("warning", line, "duplicate", f"same example as line {report.digests[digest]}")
                else:
                    report.digests[digest] = line
                if train_digests and digest in train_digests:
                    report.add("warning", line, "validation_in_train",
                               f"same example as training line {train_digests[digest]}")
            report.token_lines.append(line)
            report.token_counts.append(tokens)
            report.assistant_token_counts.append(count_assistant_tokens(example, fmt, encoding))
            if fmt == DataFormat.chat:
                report.messages_per_example.append(len(example["messages"]))
            else:
                prompt, completion = example["prompt"], example["completion"]
                prompt_suffix = prompt if prompt_suffix is None else _common_suffix(prompt_suffix, prompt)
                completion_suffix = completion if completion_suffix is None else _common_suffix(completion_suffix, completion)
                n_no_leading_space += not completion[:1].isspace()
    except DataFileError as err:
        report.file_error = err
        report.add("error", err.line, err.code, f"{err.message} — {err.fix}" if err.fix else err.message)
        return report
    if fmt == DataFormat.prompt_completion and report.n_valid >= 2:
        if not prompt_suffix or not prompt_suffix.strip():
            report.add("warning", None, "no_common_separator", "prompts do not end with a common separator")
        if n_no_leading_space:
            report.add("warning", None, "completion_no_leading_space",
                       f"{n_no_leading_space} of {report.n_valid} completions do not start with whitespace")
        if not completion_suffix:
            report.add("warning", None, "no_stop_sequence", "completions do not end with a common stop sequence")
    if kind == "train":
        if report.n_valid < HOSTED_MIN_EXAMPLES:
            report.add("warning", None, "too_few_examples", f"{report.n_valid} valid examples")
        elif report.n_valid < RECOMMENDED_MIN_EXAMPLES:
            report.add("warning", None, "few_examples", f"{report.n_valid} valid examples")
    return report


@dataclass
class ValidationReport:
    """Everything `ftlab validate` found; `to_json()` is validation.json."""

    files: list  # [FileReport]
    moderation: Any = None  # trainer.moderation.ModerationReport when a screen ran
    extra_errors: list = field(default_factory=list)  # [Issue] from outside the files (moderation)
    extra_warnings: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [i for f in self.files for i in f.listed("error")] + self.extra_errors

    @property
    def warnings(self) -> list:
        return [i for f in self.files for i in f.listed("warning")] + self.extra_warnings

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def file_error(self) -> Optional[DataFileError]:
        """The first file-level problem (missing, directory, empty), if any."""
        return next((f.file_error for f in self.files if f.file_error is not None), None)

    def file(self, kind: str) -> Optional[FileReport]:
        return next((f for f in self.files if f.kind == kind), None)

    def stats(self) -> dict:
        stats = {f.kind: f.stats() for f in self.files}
        if self.moderation is not None:
            stats["moderation"] = self.moderation.summary()
        return stats

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "stats": self.stats(),
        }


def validate_files(
    files: dict,
    fmt: DataFormat,
    encoding,
    context_length: int,
    *,
    on_bytes: Optional[Callable[[str, int], None]] = None,
    on_example: Optional[Callable[[str, int, Any], None]] = None,
) -> ValidationReport:
    """Check {kind: path} files (train first, then validation against it); `on_example(kind, line, example)`
    sees every parsed line of every file in the same pass."""
    reports = []
    train_digests = None
    for kind, path in files.items():
        callback = (lambda n, kind=kind: on_bytes(kind, n)) if on_bytes else None
        reader = (lambda line, example, kind=kind: on_example(kind, line, example)) if on_example else None
        report = validate_file(path, fmt, encoding, context_length, kind=kind,
                               train_digests=train_digests, on_bytes=callback, on_example=reader)
        if kind == "train":
            train_digests = report.digests
        reports.append(report)
    for report in reports:
        report.digests = {}  # free memory: only needed while checking
    return ValidationReport(reports)
