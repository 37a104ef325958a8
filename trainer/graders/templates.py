"""The graders' template strings: `{{item.answer}}`, `{{sample.output_text}}`, `{{sample.output_json.city}}`,
`{{sample.output_tools}}`, as the hosted graders read them.

A template names a namespace (`item` or `sample`) and a path into it: dotted keys and `[n]` list
indexes (`{{item.choices[0].label}}`). Strings are substituted as they are; anything else as JSON.
"""
import json
import re
from typing import Any

TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
NAMESPACES = ("item", "sample")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools")


class MissingVariable(KeyError):
    """A template names a value the sample or the item does not have."""


def references(text: str) -> list[tuple[str, list]]:
    """Every (namespace, path) a string's templates read, e.g. ("item", ["answer"])."""
    found = []
    for expression in TEMPLATE.findall(text):
        found.append(parse(expression))
    return found


def parse(expression: str) -> tuple[str, list]:
    """`item.a.b[0]` → ("item", ["a", "b", 0]); ValueError when it is not a namespace and a path."""
    namespace, _, rest = expression.partition(".")
    if namespace not in NAMESPACES or not rest:
        raise ValueError(f"{{{{{expression}}}}} must read item.<field> or sample.<field> "
                         f"({', '.join(SAMPLE_FIELDS)})")
    path, position = [], 0
    for match in PATH_PART.finditer(rest):
        if match.start() != position and rest[position:match.start()] != ".":
            raise ValueError(f"{{{{{expression}}}}}: cannot read the path {rest!r}")
        path.append(int(match.group(2)) if match.group(2) is not None else match.group(1))
        position = match.end()
    if not path or position != len(rest):
        raise ValueError(f"{{{{{expression}}}}}: cannot read the path {rest!r}")
    if namespace == "sample" and path[0] not in SAMPLE_FIELDS:
        raise ValueError(f"{{{{{expression}}}}}: a sample has {', '.join(SAMPLE_FIELDS)}, not {path[0]!r}")
    return namespace, path


def lookup(namespaces: dict, namespace: str, path: list) -> Any:
    """The value a parsed template names; `MissingVariable` when there is none."""
    value = namespaces.get(namespace)
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            raise MissingVariable(f"{namespace}.{'.'.join(map(str, path))}") from None
    return value


def render(text: str, namespaces: dict) -> str:
    """`text` with every template replaced by its value (strings as they are, the rest as JSON)."""
    def value(match: re.Match) -> str:
        found = lookup(namespaces, *parse(match.group(1)))
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    return TEMPLATE.sub(value, text)


def sample_namespace(model_sample: str, tool_calls: list | None = None) -> dict:
    """The `sample` a grader sees for a model's reply: its text, its JSON when it is JSON, its tool calls."""
    sample = {"output_text": model_sample, "output_tools": tool_calls or []}
    try:
        sample["output_json"] = json.loads(model_sample)
    except (TypeError, ValueError):
        pass
    return sample
