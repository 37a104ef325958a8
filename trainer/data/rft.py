"""Reinforcement fine-tuning files (method=reinforcement): prompts, and the fields a grader reads.

Each line is a JSON object with `messages` (roles developer, system, user, assistant or tool, the
last one the user's: the model's reply is what gets graded), optional `tools` and
`parallel_tool_calls`, and any other keys, which are the item's fields: a grader reads the whole
line as `item` (`{{item.reference_answer}}`). `trainer.data.validate` checks the format at
file:line; `read_prompts` checks, at file:line, that every field the grader reads is on the line.
"""
from pathlib import Path

from trainer.data.jsonl import DataFileError, load_examples

INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")


def prompt_messages(line: dict) -> list[dict]:
    """The line's messages as a chat template takes them (a `developer` message is the system's)."""
    return [message | {"role": "system"} if message.get("role") == "developer" else message
            for message in line["messages"]]


def read_prompts(path: Path, tokenizer, grader: dict, max_prompt_tokens: int):
    """((line, prompt ids, item, last user text) of every line, the lines dropped as too long).

    Raises DataFileError (missing_item_field) at the first line that lacks a field the grader reads.
    """
    from trainer.graders import item_fields
    from trainer.inference import encode_chat_prompt

    needed = sorted(item_fields(grader))
    prompts, dropped = [], []
    for number, line in load_examples(Path(path)):
        missing = [name for name in needed if name not in line]
        if missing:
            raise DataFileError(path, number, "missing_item_field",
                                f"the grader reads item.{missing[0]}, and this line has no {missing[0]!r}",
                                f"add {missing[0]!r} to every line, or change the grader's template")
        ids = encode_chat_prompt(tokenizer, prompt_messages(line), line.get("tools"))
        if len(ids) > max_prompt_tokens:
            dropped.append(number)
            continue
        question = next((m.get("content") for m in reversed(line["messages"]) if m.get("role") == "user"), "")
        prompts.append((number, ids, line, question if isinstance(question, str) else ""))
    return prompts, dropped
