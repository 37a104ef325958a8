"""Checking training files the way the hosted service and OpenAI's cookbook do.

`validate_file` streams one JSONL file and returns a `FileReport`: errors (the cookbook's
format-error codes plus `invalid_json`), warnings, per-example token counts and the
cookbook's statistics. `validate_files` checks the training and validation files together
(validation examples that repeat training examples are flagged) and returns a
`ValidationReport`, whose `to_json()` is the content of validation.json.

Function calling (both formats, see `trainer.data.tools`) is checked too: declared `tools` /
`functions` must be well-formed function schemas, every call must name a declared function with
`arguments` holding a JSON object, every `tool` result must answer an earlier call, and one example
may not mix the formats (errors); arguments that break the declared JSON schema are warnings.

Preference lines (method=dpo, `DataFormat.preference`) are checked as the hosted service checks
them: `input` holds `messages` (and optionally `tools`, `parallel_tool_calls`) that do not end with
an assistant message, `preferred_output` and `non_preferred_output` each hold exactly one assistant
message, and nothing else is allowed; each output is then checked with the chat rules as the reply
to the input. Identical outputs are a warning. A line in the other method's format is an error
(`wrong_format`) that names the format the job expects.

Every issue carries file, line, code and a one-line message that ends with how to fix it.
"""
from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from trainer.data.tokens import as_format, count_assistant_tokens, count_example_tokens, count_pair_tokens
from trainer.data.tools import message_calls, parse_arguments, uses_functions
from trainer.data.jsonl import FIXES as LINE_FIXES, DataFileError, iter_jsonl, split_error
from trainer.schema import DataFormat

ROLES = ("system", "user", "assistant", "function", "tool")
MESSAGE_KEYS = ("role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight")
EXAMPLE_KEYS = ("messages", "tools", "functions", "parallel_tool_calls")
LEGACY_KEYS, TOOLS_KEYS = ("functions", "function_call"), ("tools", "tool_calls", "tool_call_id", "parallel_tool_calls")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the hosted API accepts as a function name
MAX_SCHEMA_PROBLEMS = 3  # schema problems named per call (the rest are counted)
PROMPT_COMPLETION_KEYS = ("prompt", "completion")
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
PREFERENCE_INPUT_KEYS = ("messages", "tools", "functions", "parallel_tool_calls")
PREFERENCE_LINE = '{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}], "non_preferred_output": [...]}'
FORMATS = {DataFormat.chat: '{"messages": [...]} (method=supervised)',
           DataFormat.prompt_completion: '{"prompt": ..., "completion": ...} (method=supervised, base families)',
           DataFormat.preference: f"{PREFERENCE_LINE} (method=dpo)",
           DataFormat.reinforcement: '{"messages": [..., {"role": "user", ...}], <item fields>} (method=reinforcement)'}
RFT_ROLES = ("developer", "system", "user", "assistant", "tool")
HOSTED_MIN_EXAMPLES = 10  # the hosted service refuses fewer
RECOMMENDED_MIN_EXAMPLES = 50  # OpenAI: clear improvements from 50 to 100 examples
MAX_LISTED_PER_CODE = 50  # issues listed per (file, code); the rest are counted

FIXES = LINE_FIXES | {  # one table: reading a line (jsonl.py) and checking what it holds
    "data_type": 'each line must be a JSON object such as {"messages": [...]}',
    "missing_messages_list": 'give the example a non-empty "messages" list',
    "message_missing_key": 'every message needs "role" and "content" (an assistant message that makes a call may leave content out)',
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
    "unrecognized_example_key": f"remove it; an example takes {', '.join(EXAMPLE_KEYS)}",
    "invalid_tools": 'make "tools" a list of {"type": "function", "function": {"name", "description", "parameters"}} with unique names',
    "invalid_functions": 'make "functions" a list of {"name", "description", "parameters"} with unique names',
    "mixed_function_formats": 'use one format per example: "functions" + "function_call" + role "function", or "tools" + "tool_calls" + role "tool"',
    "invalid_function_call": 'give assistant messages "function_call": {"name": "<declared function>", "arguments": "<JSON object as a string>"}',
    "invalid_tool_call": 'give assistant messages "tool_calls": [{"id": "call_…", "type": "function", "function": {"name", "arguments"}}] with unique ids',
    "undeclared_function": 'declare the function in the example\'s "tools" (or "functions"), or call one that is declared',
    "invalid_arguments": 'make "arguments" a string holding a JSON object, e.g. "{\\"city\\": \\"Porto\\"}"',
    "missing_tool_call_id": 'give the tool message the "tool_call_id" of the call it answers',
    "unknown_tool_call_id": "use the id of a tool call made earlier in the conversation",
    "missing_function_name": 'give the function message the "name" of the function whose result it carries',
    "invalid_parallel_tool_calls": 'use "parallel_tool_calls": true or false; with false, make at most one tool call per assistant message',
    "arguments_schema_mismatch": "make the arguments fit the function's declared parameters (required keys, enum values, types)",
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
    "wrong_format": "convert the file to that format, or choose the method whose format it is in",
    "missing_preference_key": 'each line needs "input", "preferred_output" and "non_preferred_output"',
    "unrecognized_preference_key": 'remove it; a preference line takes only "input", "preferred_output" and "non_preferred_output"',
    "invalid_input": 'make "input" an object {"messages": [...]} (optionally with "tools" and "parallel_tool_calls")',
    "invalid_output": 'make it a list of exactly one {"role": "assistant", "content": "..."} message (or one with tool_calls)',
    "input_ends_with_assistant": "end the input with the message the outputs answer (a user or tool message); the outputs are the assistant's reply",
    "identical_outputs": "make the non-preferred output differ from the preferred one, or drop the pair: it teaches nothing",
    "last_message_not_user": "end the messages with the user's turn: the model's reply to it is what the grader scores",
    "missing_item_field": "add the field to every line, or change the grader's template",
    "no_item_fields": "add the fields the grader compares the reply with (e.g. \"reference_answer\")",
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
        calls = message.get("role") == "assistant" and bool(message.get("function_call") or message.get("tool_calls"))
        missing = [key for key in ("role", "content") if key not in message and not (key == "content" and calls)]
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
            if content is None and (message.get("function_call") or message.get("tool_calls")):
                pass  # a call may carry no content
            elif not isinstance(content, str):
                errors.append(("missing_content", f"message {index} content is {_type_name(content)}, not a string"))
            elif content == "" and role != "assistant":  # empty assistant content is a warning
                errors.append(("missing_content", f"message {index} ({role}) has empty content"))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        errors.append(("example_missing_assistant_message", "no message has role \"assistant\""))
    return errors + function_errors(example)


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
        if role == "assistant" and message.get("content") == "" and not message_calls(message):
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
    unknown = [key for key in example if key not in EXAMPLE_KEYS]
    if unknown:
        warnings.append(("unrecognized_example_key", f"unrecognized top-level key(s) {', '.join(map(repr, unknown))}, ignored"))
    return warnings + function_warnings(example)


# --- function calling: each returns [(code, what)] ----------------------------------------

def _declared(example: dict) -> tuple[dict, list]:
    """({name: parameters schema} of the example's functions, [(code, what)] for a malformed declaration)."""
    key = "tools" if "tools" in example else "functions" if "functions" in example else None
    if key is None:
        return {}, []
    code, entries = f"invalid_{key}", example[key]
    if not isinstance(entries, list):
        return {}, [(code, f'"{key}" is {_type_name(entries)}, not a list')]
    declared, errors = {}, []
    for index, entry in enumerate(entries):
        where = f'"{key}"[{index}]'
        function = entry
        if key == "tools":
            if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
                errors.append((code, f'{where} is not {{"type": "function", "function": {{...}}}}'))
                continue
            function = entry["function"]
            where += '.function'
        if not isinstance(function, dict):
            errors.append((code, f"{where} is {_type_name(function)}, not an object"))
            continue
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            errors.append((code, f"{where} has name {json.dumps(name)[:40]}; use 1-64 letters, digits, _ or -"))
            continue
        if name in declared:
            errors.append((code, f"{where} declares {name!r} a second time"))
        if "description" in function and not isinstance(function["description"], str):
            errors.append((code, f"{where} ({name}) description is {_type_name(function['description'])}, not a string"))
        parameters = function.get("parameters", {})
        problem = _schema_shape_problem(parameters)
        if problem:
            errors.append((code, f"{where} ({name}) parameters {problem}"))
            parameters = {}
        declared[name] = parameters
    return declared, errors


def _schema_shape_problem(parameters: Any) -> Optional[str]:
    """Why `parameters` is not a usable JSON schema of an object, or None."""
    if not isinstance(parameters, dict):
        return f"is {_type_name(parameters)}, not a JSON schema object"
    if parameters.get("type", "object") != "object":
        return f'has type {json.dumps(parameters.get("type"))[:30]}, not "object"'
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, dict) for v in properties.values()):
        return '"properties" is not an object of schemas'
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        return '"required" is not a list of key names'
    return None


def _format_fields(example: dict, messages: list) -> tuple[list, list]:
    """(legacy fields used, tools fields used) in one example, for the mixed-formats check."""
    legacy = [k for k in ("functions",) if k in example]
    new = [k for k in ("tools", "parallel_tool_calls") if k in example]
    for m in messages:
        legacy += [k for k in ("function_call",) if k in m] + (['role "function"'] if m.get("role") == "function" else [])
        new += [k for k in ("tool_calls", "tool_call_id") if k in m] + (['role "tool"'] if m.get("role") == "tool" else [])
    return list(dict.fromkeys(legacy)), list(dict.fromkeys(new))


def _call_errors(call: Any, where: str, code: str, declared: dict) -> list:
    """Errors of one call ({"name", "arguments"}): its shape, its function, its arguments."""
    if not isinstance(call, dict):
        return [(code, f"{where} is {_type_name(call)}, not an object")]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return [(code, f"{where} has no function name")]
    errors = []
    if name not in declared:
        known = ", ".join(map(repr, declared)) or "none"
        errors.append(("undeclared_function", f"{where} calls {name!r}, which the example does not declare (declared: {known})"))
    arguments = call.get("arguments")
    if not isinstance(arguments, str):
        errors.append(("invalid_arguments", f"{where} arguments are {_type_name(arguments)}, not a string"))
    elif not isinstance(parse_arguments(arguments), dict):
        parsed = parse_arguments(arguments)
        what = "not valid JSON" if parsed is None and arguments.strip() != "null" else f"a JSON {_type_name(parsed)}, not an object"
        errors.append(("invalid_arguments", f"{where} arguments are {what}: {arguments[:40]!r}"))
    return errors


def function_errors(example: dict) -> list[tuple[str, str]]:
    """Errors in an example's function declarations, calls and results (empty when it uses none)."""
    messages = [m for m in example.get("messages") or [] if isinstance(m, dict)]
    legacy, new = _format_fields(example, messages)
    errors = []
    if legacy and new:
        errors.append(("mixed_function_formats", f"mixes {', '.join(legacy)} (legacy) with {', '.join(new)}"))
    declared, declaration_errors = _declared(example)
    errors += declaration_errors
    parallel = example.get("parallel_tool_calls")
    if "parallel_tool_calls" in example and not isinstance(parallel, bool):
        errors.append(("invalid_parallel_tool_calls", f'"parallel_tool_calls" is {_type_name(parallel)}, not true or false'))
    call_ids: set = set()
    for index, message in enumerate(example.get("messages") or [], 1):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if "function_call" in message:
            if role != "assistant":
                errors.append(("invalid_function_call", f"message {index} ({role}) has a function_call; only assistant messages call"))
            else:
                errors += _call_errors(message["function_call"], f"message {index} function_call", "invalid_function_call", declared)
        if "tool_calls" in message:
            calls = message["tool_calls"]
            if role != "assistant":
                errors.append(("invalid_tool_call", f"message {index} ({role}) has tool_calls; only assistant messages call"))
            elif not isinstance(calls, list) or not calls:
                errors.append(("invalid_tool_call", f"message {index} tool_calls is {'empty' if calls == [] else 'a ' + _type_name(calls)}"))
            else:
                if parallel is False and len(calls) > 1:
                    errors.append(("invalid_parallel_tool_calls",
                                   f"message {index} makes {len(calls)} tool calls but \"parallel_tool_calls\" is false"))
                for n, call in enumerate(calls):
                    where = f"message {index} tool_calls[{n}]"
                    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                        errors.append(("invalid_tool_call", f'{where} is not {{"id", "type": "function", "function": {{...}}}}'))
                        continue
                    ident = call.get("id")
                    if not isinstance(ident, str) or not ident:
                        errors.append(("invalid_tool_call", f"{where} has no id"))
                    elif ident in call_ids:
                        errors.append(("invalid_tool_call", f"{where} reuses id {ident!r}"))
                    if call.get("type", "function") != "function":
                        errors.append(("invalid_tool_call", f'{where} has type {json.dumps(call.get("type"))[:30]}, not "function"'))
                    errors += _call_errors(call["function"], where, "invalid_tool_call", declared)
                    if isinstance(ident, str) and ident:
                        call_ids.add(ident)
        if role == "tool":
            ident = message.get("tool_call_id")
            if not isinstance(ident, str) or not ident:
                errors.append(("missing_tool_call_id", f"message {index} (tool) has no tool_call_id"))
            elif ident not in call_ids:
                errors.append(("unknown_tool_call_id", f"message {index} (tool) answers {ident!r}, which no earlier tool call has"))
        elif "tool_call_id" in message:
            errors.append(("invalid_tool_call", f"message {index} ({role}) has a tool_call_id; only tool messages answer calls"))
        if role == "function" and not (isinstance(message.get("name"), str) and message["name"]):
            errors.append(("missing_function_name", f"message {index} (function) has no name"))
    return errors


SCHEMA_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def schema_problems(value: Any, schema: Any, path: str = "") -> list[str]:
    """How `value` breaks a JSON schema, for the keywords function parameters use: type, enum,
    properties, required, additionalProperties: false, items. Unknown keywords are not checked."""
    if not isinstance(schema, dict):
        return []
    name = path or "arguments"
    expected = schema.get("type")
    types = expected if isinstance(expected, list) else [expected] if isinstance(expected, str) else []
    if types and not any(SCHEMA_TYPES.get(t, lambda v: True)(value) for t in types):
        return [f"{name} is {_type_name(value)}, not {' or '.join(types)}"]
    problems = []
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        problems.append(f"{name} is {json.dumps(value)[:40]}, not one of {json.dumps(enum)[:80]}")
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        problems += [f"{path + '.' if path else ''}{key} is missing (required)" for key in required if key not in value]
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in properties:
                problems += schema_problems(item, properties[key], where)
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where} is not a declared parameter")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{name}[{index}]")
    return problems


def function_warnings(example: dict) -> list[tuple[str, str]]:
    """Warnings for an example without errors: calls whose arguments break the declared schema."""
    declared, _ = _declared(example)
    warnings = []
    for index, message in enumerate(example["messages"], 1):
        for n, call in enumerate(message_calls(message)):
            problems = schema_problems(parse_arguments(call["arguments"]), declared.get(call["name"], {}))
            if problems:
                more = f" (and {len(problems) - MAX_SCHEMA_PROBLEMS} more)" if len(problems) > MAX_SCHEMA_PROBLEMS else ""
                where = f"message {index} " + (f"tool_calls[{n}]" if "tool_calls" in message else "function_call")
                warnings.append(("arguments_schema_mismatch",
                                 f"{where} to {call['name']!r}: {'; '.join(problems[:MAX_SCHEMA_PROBLEMS])}{more}"))
    return warnings


# --- preference pairs (method=dpo): each returns [(code, what)] -------------------------------

def _ends_with_reply(example: dict) -> bool:
    """Whether a line's messages end with the assistant's (a supervised line: a reinforcement line ends with the user)."""
    messages = example.get("messages")
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"


def wrong_format(example: Any, fmt: DataFormat) -> list[tuple[str, str]]:
    """A `wrong_format` error when a line is plainly in another format than the job's (empty otherwise)."""
    if not isinstance(example, dict):
        return []
    shapes = {DataFormat.preference: "input" in example and ("preferred_output" in example or "non_preferred_output" in example),
              DataFormat.chat: "messages" in example and "input" not in example
              and (fmt != DataFormat.reinforcement or _ends_with_reply(example)),
              DataFormat.prompt_completion: "prompt" in example and "completion" in example and "input" not in example}
    found = next((shape for shape, matches in shapes.items() if matches and shape != fmt), None)
    if found is None:
        return []
    return [("wrong_format", f"this line is in the {found.value} format, but this job expects {FORMATS[fmt]}")]


def _output_errors(output: Any, key: str) -> list[tuple[str, str]]:
    if not isinstance(output, list) or len(output) != 1:
        what = f"a JSON {_type_name(output)}" if not isinstance(output, list) else f"{len(output)} messages"
        return [("invalid_output", f'"{key}" holds {what}, not exactly one assistant message')]
    message = output[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        role = message.get("role") if isinstance(message, dict) else _type_name(message)
        return [("invalid_output", f'"{key}" holds a message with role {json.dumps(role)[:40]}, not "assistant"')]
    return []


def preference_errors(example: Any) -> list[tuple[str, str]]:
    """The hosted service's format errors for one preference line (empty list when it is valid)."""
    if not isinstance(example, dict):
        return [("data_type", f"example is a JSON {_type_name(example)}, not an object")]
    errors = [("missing_preference_key", f"no {key!r}") for key in PREFERENCE_KEYS if key not in example]
    unknown = [key for key in example if key not in PREFERENCE_KEYS]
    if unknown:
        errors.append(("unrecognized_preference_key", f"unrecognized key(s) {', '.join(map(repr, unknown))}"))
    source = example.get("input")
    if "input" in example:
        if not isinstance(source, dict):
            errors.append(("invalid_input", f'"input" is a JSON {_type_name(source)}, not an object'))
        else:
            extra = [key for key in source if key not in PREFERENCE_INPUT_KEYS]
            if extra:
                errors.append(("invalid_input", f'"input" has unrecognized key(s) {", ".join(map(repr, extra))}'))
            if not isinstance(source.get("messages"), list) or not source["messages"]:
                errors.append(("missing_messages_list", '"input" has no non-empty "messages" list'))
    for key in PREFERENCE_KEYS[1:]:
        if key in example:
            errors += _output_errors(example[key], key)
    if errors:
        return errors
    messages = source["messages"]
    if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        errors.append(("input_ends_with_assistant", f"the input's last message (message {len(messages)}) is the assistant's"))
    seen = set()
    for key in PREFERENCE_KEYS[1:]:  # each output, checked with the chat rules as the reply to the input
        conversation = {k: v for k, v in source.items() if k != "messages"} | {"messages": messages + example[key]}
        for code, what in chat_errors(conversation):
            what = what.replace(f"message {len(messages) + 1}", f"{key}[0]")
            if (code, what) not in seen:
                seen.add((code, what))
                errors.append((code, what))
    return errors


def preference_warnings(example: dict) -> list[tuple[str, str]]:
    """Warnings for a preference line that has no format errors."""
    warnings = []
    if "user" not in [m.get("role") for m in example["input"]["messages"]]:
        warnings.append(("no_user_message", "the input has no user message"))
    preferred, non_preferred = example["preferred_output"][0], example["non_preferred_output"][0]
    if _digest(preferred) == _digest(non_preferred):
        warnings.append(("identical_outputs", "preferred_output and non_preferred_output are the same"))
    for key, message in (("preferred_output", preferred), ("non_preferred_output", non_preferred)):
        if message.get("content") == "" and not message_calls(message):
            warnings.append(("empty_assistant_content", f"{key} has empty content"))
    return warnings


# --- reinforcement prompts (method=reinforcement): each returns [(code, what)] -----------------

def reinforcement_errors(example: Any) -> list[tuple[str, str]]:
    """The hosted service's format errors for one reinforcement line: chat messages (roles developer, system,
    user, assistant, tool) ending with the user's; other keys are the grader's item fields."""
    if not isinstance(example, dict):
        return [("data_type", f"example is a JSON {_type_name(example)}, not an object")]
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return chat_errors(example)[:1]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    as_chat = [m | {"role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]
    reply = {"role": "assistant", "content": "reply"}  # the sampled reply, so that the chat rules hold
    conversation = {key: example[key] for key in EXAMPLE_KEYS if key in example} | {"messages": as_chat + [reply]}
    errors = [(code, what) for code, what in chat_errors(conversation)
              if code != "example_missing_assistant_message"]
    errors += [("unrecognized_role", f"message {index} has role \"function\": use tool messages")
               for index, role in enumerate(roles, 1) if role == "function"]
    if not errors and roles[-1] != "user":
        errors.append(("last_message_not_user", f"the last message (message {len(messages)}) is the {roles[-1]}'s"))
    return errors


def reinforcement_warnings(example: dict) -> list[tuple[str, str]]:
    """Warnings for a reinforcement line that has no format errors."""
    fields = [key for key in example if key not in EXAMPLE_KEYS]
    return [] if fields else [("no_item_fields", "the line has no fields besides its messages: a grader can read "
                                                 "only the reply")]


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
    prompt_token_counts: array = field(default_factory=lambda: array("q"))  # preference lines: the input's tokens
    non_preferred_token_counts: array = field(default_factory=lambda: array("q"))  # and the non-preferred output's
    n_with_functions: int = 0  # valid examples that declare functions or carry calls (their tokens are approximate)
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
        if self.format == DataFormat.preference:
            stats["prompt_tokens_per_example"] = distribution(self.prompt_token_counts)
            stats["preferred_tokens_per_example"] = distribution(self.assistant_token_counts)
            stats["non_preferred_tokens_per_example"] = distribution(self.non_preferred_token_counts)
            stats["tokens"] = "approximate: the input once plus both outputs (OpenAI publishes no count for DPO)"
        elif self.format == DataFormat.chat:
            stats["messages_per_example"] = distribution(self.messages_per_example)
            stats["assistant_tokens_per_example"] = distribution(self.assistant_token_counts)
            stats["n_missing_system"] = self.warning_counts.get("no_system_message", 0)
            stats["n_missing_user"] = self.warning_counts.get("no_user_message", 0)
            stats["n_with_functions"] = self.n_with_functions
        elif self.format == DataFormat.reinforcement:  # prompts: the replies are sampled, not in the file
            stats["messages_per_example"] = distribution(self.messages_per_example)
            stats["prompt_tokens_per_example"] = distribution(self.token_counts)
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
    check_errors, check_warnings = {
        DataFormat.chat: (chat_errors, chat_warnings),
        DataFormat.prompt_completion: (prompt_completion_errors, prompt_completion_warnings),
        DataFormat.preference: (preference_errors, preference_warnings),
        DataFormat.reinforcement: (reinforcement_errors, reinforcement_warnings),
    }[fmt]
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
            errors = wrong_format(example, fmt) or check_errors(example)
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
            if fmt == DataFormat.preference:
                prompt, preferred, non_preferred = count_pair_tokens(example, encoding)
                report.prompt_token_counts.append(prompt)
                report.assistant_token_counts.append(preferred)
                report.non_preferred_token_counts.append(non_preferred)
            else:
                report.assistant_token_counts.append(count_assistant_tokens(example, fmt, encoding))
            if fmt in (DataFormat.chat, DataFormat.reinforcement):
                report.messages_per_example.append(len(example["messages"]))
                report.n_with_functions += uses_functions(example)
            elif fmt == DataFormat.prompt_completion:
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
