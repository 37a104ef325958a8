"""Keep a reply's function calls to the functions the request declared, while it is generated.

The hosted API never calls a function the request did not declare, and honours `tool_choice`
("required", or one named function). A small fine-tuned model sometimes invents a name
(`boil_water`, `hello`) for a question no tool answers. So while a reply writes a call's head
(`<tool_call>{"name": "`) and its name, only tokens that keep the text a prefix of a declared
call's head are allowed; the arguments are left free. With `must_call` the reply must open a call
at once, with `names` narrowed to one function to call that one.

This works where calls are written inside `<tool_call>` (ftlab's fallback rendering, and
templates such as Qwen2.5's), as `{"name": "…", "arguments": …}`, the way training rendered them.
"""
import bisect
import json
import weakref
from typing import Optional

from trainer.data.tools import CALL_OPEN, call_text

_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_pieces(tokenizer) -> tuple[dict[str, list[int]], list[str]]:
    """Every token's text → its ids, and the texts sorted (for prefix lookups); made once per tokenizer."""
    if tokenizer not in _PIECES:
        by_piece: dict[str, list[int]] = {}
        for token_id in range(len(tokenizer)):
            by_piece.setdefault(tokenizer.decode([token_id]), []).append(token_id)
        by_piece.pop("", None)
        _PIECES[tokenizer] = (by_piece, sorted(by_piece))
    return _PIECES[tokenizer]


def call_head(name: str) -> str:
    """How a call to `name` starts after the opener, as training renders it: {"name": "get_weather" (the
    arguments follow), cut from `trainer.data.tools.call_text` itself."""
    body = call_text(name, {})[len(CALL_OPEN):]
    quoted = json.dumps(name, ensure_ascii=False)
    return body[: body.index(quoted) + len(quoted)]


def uses_call_wrapper(tokenizer) -> bool:
    """Whether replies write calls inside `<tool_call>`: ftlab's fallback, or a template that does."""
    from trainer.data.tools import template_supports_tools

    return not template_supports_tools(tokenizer) or CALL_OPEN in str(tokenizer.chat_template or "")


class CallConstraint:
    """The tokens a reply may take next so that its calls name declared functions (see the module)."""

    def __init__(self, tokenizer, names: list[str], must_call: bool = False):
        self.tokenizer = tokenizer
        self.heads = [call_head(name) for name in names]
        self.must_call = must_call
        self.by_piece, self.ordered = token_pieces(tokenizer)

    @classmethod
    def for_tools(cls, tokenizer, tools: list[dict], forced: Optional[str] = None,
                  must_call: bool = False) -> Optional["CallConstraint"]:
        """The constraint for a `tools` list (only `forced` when given), or None where the backbone writes
        calls some other way than inside `<tool_call>`."""
        if not tools or not uses_call_wrapper(tokenizer):
            return None
        names = [forced] if forced else [tool["function"].get("name") for tool in tools]
        return cls(tokenizer, [name for name in names if isinstance(name, str)], must_call=must_call)

    def _continuing(self, remaining: str) -> set[int]:
        """Ids of the tokens whose text is a prefix of `remaining` or starts with it."""
        ids = set()
        for end in range(1, len(remaining) + 1):
            ids.update(self.by_piece.get(remaining[:end], ()))
        start = bisect.bisect_left(self.ordered, remaining)
        while start < len(self.ordered) and self.ordered[start].startswith(remaining):
            ids.update(self.by_piece[self.ordered[start]])
            start += 1
        return ids

    def allowed(self, generated_ids: list[int]) -> Optional[list[int]]:
        """The token ids allowed next after `generated_ids` (the reply so far), or None for any."""
        text = self.tokenizer.decode(generated_ids)
        opener = text.rfind(CALL_OPEN)
        if opener >= 0:  # in a call: its head, then the arguments (free)
            written, targets = text[opener + len(CALL_OPEN):].lstrip(), self.heads
        elif self.must_call:  # the reply must open a call at once
            written, targets = text, [CALL_OPEN + head for head in self.heads]
        else:
            return None
        open_targets = [target for target in targets if target.startswith(written)]
        if not open_targets or written in open_targets:
            return None  # past the name (or written some other way): the arguments are free
        allowed = set().union(*(self._continuing(target[len(written):]) for target in open_targets))
        if opener >= 0 and not written:  # whitespace may come between the opener and the call (Qwen2.5: a newline)
            allowed |= {i for piece, ids in self.by_piece.items() if not piece.strip() for i in ids}
        return sorted(allowed) or None
