"""Function calling in chat examples: the two formats, how a conversation with tools is rendered for
a backbone, and how a generated reply is read back into calls.

The hosted service took two formats, one per example:

    2023 (legacy)  "functions": [{name, description, parameters}], assistant "function_call":
                   {name, arguments}, and "function" messages with a "name" carrying the result
    later          "tools": [{"type": "function", "function": {...}}], assistant "tool_calls":
                   [{id, type, function: {name, arguments}}], "tool" messages with a "tool_call_id",
                   and "parallel_tool_calls" on the example

`arguments` is always a string holding a JSON object. Both formats render the same way:

- A backbone whose chat template handles tools (it mentions `tools` and `tool_calls`, as Qwen2.5's
  and Llama 3.1's do) gets them natively: `apply_chat_template(messages, tools=...)`, calls as
  `tool_calls` with their arguments parsed, results as `tool` messages.
- Any other template (SmolLM2's, the test models' ChatML) gets the fallback, plain messages:

      system     <the example's system text, if any>\\n\\n + TOOLS_HEADER + one schema per line + TOOLS_FOOTER
      assistant  <content, if any>\\n + one <tool_call>{"name": …, "arguments": {…}}</tool_call> line per call
      user       one <tool_response>…</tool_response> line per result (consecutive results share the turn)

Training and inference both render through `trainer.data.tokenize.render_messages`, so a prompt
is always a token prefix of the conversation it starts. `parse_tool_calls` reads either rendering
(and a bare `{"name", "parameters"}` object, Llama 3.1's habit) back into OpenAI-shaped calls.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Optional

TOOLS_HEADER = "# Tools\nYou may call one or more of these functions (JSON schemas):\n<tools>\n"
TOOLS_FOOTER = ('\n</tools>\nTo call a function, reply with one '
                '<tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call> line per call.')
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
RESULT_ROLES = ("tool", "function")  # messages that carry a call's result


# ---- the two formats -------------------------------------------------------------------------
def as_tools(declared: Any) -> list[dict]:
    """`tools` or legacy `functions` as a `tools` list: [{"type": "function", "function": {...}}].

    Entries that are neither shape are left out (validation reports them)."""
    tools = []
    for entry in declared if isinstance(declared, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("function"), dict):
            tools.append({"type": "function", "function": entry["function"]})
        elif isinstance(entry, dict) and "name" in entry:
            tools.append({"type": "function", "function": entry})
    return tools


def declared_tools(example: Any) -> list[dict]:
    """The functions an example declares (its `tools`, else its `functions`), as a `tools` list."""
    if not isinstance(example, dict):
        return []
    return as_tools(example.get("tools") if example.get("tools") is not None else example.get("functions"))


def message_calls(message: Any) -> list[dict]:
    """An assistant message's calls as [{"id", "name", "arguments"}], from `tool_calls` or the legacy
    `function_call` (id None); [] for a message without calls. Values are as written (unchecked)."""
    if not isinstance(message, dict):
        return []
    if isinstance(message.get("tool_calls"), list):
        calls = []
        for call in message["tool_calls"]:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                calls.append({"id": call.get("id"), "name": function.get("name"),
                              "arguments": function.get("arguments")})
        return calls
    if isinstance(message.get("function_call"), dict):
        call = message["function_call"]
        return [{"id": None, "name": call.get("name"), "arguments": call.get("arguments")}]
    return []


def uses_functions(example: Any) -> bool:
    """Whether an example declares functions or carries calls or results (its tokens are then approximate)."""
    if not isinstance(example, dict):
        return False
    if example.get("tools") or example.get("functions"):
        return True
    messages = example.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") in RESULT_ROLES or message_calls(m)) for m in messages)


def parse_arguments(arguments: Any) -> Any:
    """`arguments` (a JSON string) parsed; the value itself when it is not a string; None when not JSON."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None


# ---- rendering -------------------------------------------------------------------------------
def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` and `tool_calls` itself (Qwen2.5, Llama 3.1)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: transformers picks "tool_use" when given tools
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def needs_tool_rendering(messages: list[dict], tools: Optional[list]) -> bool:
    """Whether a conversation needs more than plain role/content rendering."""
    return bool(tools) or any(m.get("role") in RESULT_ROLES or message_calls(m) for m in messages)


def call_text(name: Any, arguments: Any) -> str:
    """One call as the fallback writes it: <tool_call>{"name": …, "arguments": {…}}</tool_call>."""
    parsed = parse_arguments(arguments)
    value = parsed if parsed is not None else arguments  # unparseable arguments stay the string they were
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': value}, ensure_ascii=False)}{CALL_CLOSE}"


def assistant_text(message: dict) -> str:
    """An assistant message as the fallback renders it: its content, then one line per call."""
    content = message.get("content") or ""
    calls = [call_text(c["name"], c["arguments"]) for c in message_calls(message)]
    return "\n".join(([content] if content else []) + calls)


def tools_text(tools: list[dict]) -> str:
    """The block that declares the tools in the fallback's system message."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return TOOLS_HEADER + "\n".join(lines) + TOOLS_FOOTER


def fallback_messages(messages: list[dict], tools: Optional[list]) -> list[dict]:
    """Plain role/content messages for a template without tool support (see the module docstring).

    Assistant messages stay one message each, in order, keeping `weight`; consecutive results merge
    into one user turn (templates that insist on alternating roles accept it)."""
    out: list[dict] = []
    if tools:
        block = tools_text(tools)
        if messages and messages[0].get("role") == "system" and messages[0].get("content"):
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
            if messages and messages[0].get("role") == "system":
                messages = messages[1:]
    for message in messages:
        role = message.get("role")
        if role in RESULT_ROLES:
            text = f"{RESULT_OPEN}{message.get('content') or ''}{RESULT_CLOSE}"
            if out and out[-1].get("results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "results": True})
        elif role == "assistant":
            out.append({"role": "assistant", "content": assistant_text(message)}
                       | ({"weight": message["weight"]} if "weight" in message else {}))
        else:
            out.append({"role": role, "content": message.get("content") or ""}
                       | ({"name": message["name"]} if "name" in message else {}))
    return [{k: v for k, v in m.items() if k != "results"} for m in out]


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages in the shape tool-aware chat templates expect: calls as `tool_calls` with parsed
    `arguments`, every result a `tool` message with its call's id and function name (legacy calls get
    ids `call_<n>` so that results can refer to them)."""
    out, names, pending, counter = [], {}, [], 0
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            calls = []
            for call in message_calls(message):
                counter += 1
                ident = call["id"] if isinstance(call["id"], str) and call["id"] else f"call_{counter}"
                parsed = parse_arguments(call["arguments"])
                calls.append({"id": ident, "type": "function",
                              "function": {"name": call["name"], "arguments": parsed if parsed is not None else {}}})
                names[ident] = call["name"]
                pending.append(ident)
            converted = {"role": "assistant", "content": message.get("content") or ""}
            out.append(converted | ({"tool_calls": calls} if calls else {}))
        elif role in RESULT_ROLES:
            ident = message.get("tool_call_id")
            if not ident:  # a legacy result answers the earliest unanswered call to its function
                ident = next((i for i in pending if names[i] == message.get("name")), pending[0] if pending else "call_0")
            if ident in pending:
                pending.remove(ident)
            out.append({"role": "tool", "tool_call_id": ident, "name": message.get("name") or names.get(ident, ""),
                        "content": message.get("content") or ""})
        else:
            out.append({"role": role, "content": message.get("content") or ""}
                       | ({"name": message["name"]} if "name" in message else {}))
    return out


# ---- reading a reply back --------------------------------------------------------------------
CALL_PATTERN = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.S)


def new_call_id() -> str:
    """An OpenAI-style call id: call_ + 24 hex characters."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from_json(text: str, bare: bool = False) -> Optional[dict]:
    """{"name", "arguments": JSON string} from a call's JSON, or None when it is not a well-formed call."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    key = "arguments" if "arguments" in value else "parameters"
    if bare and set(value) != {"name", key}:
        return None  # a reply that merely is a JSON object with a "name" is not a call
    arguments = parse_arguments(value.get(key, {}))
    if not isinstance(arguments, dict):
        return None
    return {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def parse_tool_calls(text: str) -> tuple[Optional[str], list[dict]]:
    """Split a generated reply into (content, calls).

    Calls are OpenAI-shaped: {"id": "call_…", "type": "function", "function": {"name", "arguments"}},
    `arguments` a JSON string holding an object. They are read from <tool_call>…</tool_call> spans
    (a last unclosed one too), or from a reply that is a single {"name", "arguments"|"parameters"}
    object. A span whose JSON is not a well-formed call stays in the content. `content` is the text
    around the calls, stripped, or None when the reply was calls only; with no call it is `text` as is.
    """
    calls, kept, last = [], [], 0
    for match in CALL_PATTERN.finditer(text):
        call = _call_from_json(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    if not calls:
        stripped = text.strip()
        call = _call_from_json(stripped, bare=True) if stripped.startswith("{") else None
        if call is None:
            return text, []
        calls, kept, last = [call], [], len(text)
    kept.append(text[last:])
    content = "".join(kept).strip() or None
    return content, [{"id": new_call_id(), "type": "function", "function": call} for call in calls]


def format_call(call: dict) -> str:
    """A call for people: get_weather({"city": "Porto"}) (accepts the OpenAI shape or {"name", "arguments"})."""
    function = call.get("function", call)
    return f"{function.get('name')}({function.get('arguments')})"
