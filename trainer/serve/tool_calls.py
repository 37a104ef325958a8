"""Function calling in chat completions: which functions a request offers, how decoding keeps to them,
and how a reply is read back into OpenAI-shaped calls, whole or streamed."""
from typing import Optional

from trainer.serve.errors import APIError


class Calling:
    """The tools of one chat request, and how its replies are read back into calls.

    `tool_choice: "none"` (legacy `function_call: "none"`) renders no tools, so the model answers in
    text. While decoding, a call may only name a declared function; `required` makes the reply
    open with a call, a named function makes it call that one (`trainer.call_constraint`, where
    calls are written in `<tool_call>`). `parallel_tool_calls: false` keeps the first call. A
    request in the legacy format (`functions`) gets `function_call` back, the new format `tool_calls`.
    """

    def __init__(self, tools: Optional[list], legacy: bool, parallel: bool, forced: Optional[str] = None,
                 required: bool = False):
        self.tools, self.legacy, self.parallel = tools, legacy, parallel
        self.forced, self.required = forced, required  # the function the reply must call; must it call

    @classmethod
    def of(cls, body) -> "Calling":
        """The calling rules of a chat request (`tools`/`tool_choice`, or legacy `functions`/`function_call`)."""
        from trainer.data.tools import as_tools

        legacy = not body.tools and bool(body.functions)
        choice = body.function_call if legacy else body.tool_choice
        declared = as_tools(body.functions if legacy else body.tools)
        if (body.tools or body.functions) and not declared:
            raise APIError(400, "tools: each entry must be {\"type\": \"function\", \"function\": {\"name\": …, "
                           "\"parameters\": {…}}} (functions: {\"name\": …, \"parameters\": {…}})",
                           param="functions" if legacy else "tools", code="invalid_value")
        forced = None
        if isinstance(choice, dict):  # {"type": "function", "function": {"name": …}}, legacy {"name": …}
            forced = (choice.get("function") or {}).get("name") if not legacy else choice.get("name")
            names = [tool["function"].get("name") for tool in declared]
            if forced not in names:
                raise APIError(400, f"{'function_call' if legacy else 'tool_choice'} names {forced!r}, which the "
                               f"request does not declare (declared: {', '.join(map(str, names)) or 'none'})",
                               param="function_call" if legacy else "tool_choice", code="invalid_value")
        return cls(declared if declared and choice != "none" else None, legacy, body.parallel_tool_calls is not False,
                   forced, choice == "required" or forced is not None)

    def constraint(self, tokenizer):
        """What decoding must keep to (`trainer.call_constraint.CallConstraint`), or None."""
        from trainer.call_constraint import CallConstraint

        return CallConstraint.for_tools(tokenizer, self.tools, self.forced, self.required)

    def read(self, text: str) -> tuple[Optional[str], list[dict]]:
        """(content, calls) of a whole reply; with no tools offered the reply is all content."""
        from trainer.data.tools import parse_tool_calls

        if not self.tools:
            return text, []
        content, calls = parse_tool_calls(text)
        return content, calls if self.parallel else calls[:1]

    def finish_reason(self, calls: list, finish_reason: str) -> str:
        if not calls:
            return finish_reason
        return "function_call" if self.legacy else "tool_calls"

    def choice(self, index: int, text: str, finish_reason: str, logprobs: Optional[dict] = None) -> dict:
        """A non-streamed choice: its message, with `tool_calls` (or legacy `function_call`) when it called."""
        content, calls = self.read(text)
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls and self.legacy:
            message["function_call"] = calls[0]["function"]
        elif calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": self.finish_reason(calls, finish_reason)}


class ReplyStream:
    """One streamed choice: text goes out as it comes, except what may still turn out to be a call
    (from a `<tool_call>` opener, or a reply that starts as a JSON object), which waits for the end."""

    def __init__(self, calling: Calling):
        self.calling, self.text, self.shown = calling, "", 0

    def feed(self, text: str) -> str:
        from trainer.data.tools import CALL_OPEN

        self.text += text
        if not self.calling.tools:
            safe = len(self.text)
        elif self.text.lstrip().startswith("{"):
            safe = 0  # a bare JSON call, perhaps
        else:
            safe = self.text.find(CALL_OPEN)
            safe = len(self.text) if safe < 0 else safe
            for cut in range(1, len(CALL_OPEN)):  # the start of an opener split across tokens
                if self.text[:safe].endswith(CALL_OPEN[:cut]):
                    safe -= cut
                    break
            safe = len(self.text[:safe].rstrip())  # the content before a call ends stripped
        safe = max(safe, self.shown)
        shown, self.shown = self.text[self.shown:safe], safe
        return shown

    def finish(self) -> tuple[str, list[dict]]:
        """The content not yet sent, and the calls, once the reply is whole."""
        content, calls = self.calling.read(self.text)
        if not calls:
            return self.text[self.shown:], []
        sent = self.text[:self.shown]
        content = content or ""
        return (content[len(sent):] if content.startswith(sent) else ""), calls
