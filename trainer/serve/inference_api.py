"""`POST /v1/chat/completions` and `POST /v1/completions`: fine-tuned models answer as the hosted API does.

    client.chat.completions.create(model="ft:gpt-3.5-turbo:personal::abc123", messages=[...])
    client.completions.create(model="ft:babbage-002:personal::def456", prompt="…\\n\\n###\\n\\n")

A family name alone (`gpt-3.5-turbo`, `babbage-002`, `davinci-002`) is the server's backbone with
no adapter, rendered in that family's format; an `ft:` name (or a checkpoint's `…:ckpt-step-N`)
is its job's backbone + adapter, with prompts rendered exactly as the job's training rendered
them (its own tokenizer and chat template). Chat models answer on /chat/completions, prompt/
completion models on /completions.

Sampling follows the hosted API: temperature (default 1; 0 is greedy), top_p, n, seed, stop,
max_tokens / max_completion_tokens (default: the rest of the context), presence/frequency
penalties. Usage counts backbone tokens. `stream: true` answers with server-sent events built
from the same token-level deltas as the plain answer, so both carry the same text.
Other fields the hosted API knows are accepted and ignored.
"""
import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.responses import StreamingResponse

from trainer.serve.errors import APIError, not_found

log = logging.getLogger("ftlab.serve")
router = APIRouter()

MAX_N = 8
MAX_STOP = 4


# ---- request bodies --------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields the hosted API knows and ftlab does not use are ignored


class StreamOptions(_Body):
    include_usage: Optional[bool] = False


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: str
    type: str = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers
    function_call: Optional[FunctionCall] = None  # legacy: an assistant's earlier call


class _Sampled(_Body):
    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[dict[str, Any]]] = Field(None, max_length=128)  # [{"type": "function", "function": {...}}]
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None  # or {"type": "function", ...}
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[dict[str, Any]]] = Field(None, max_length=128)  # legacy
    function_call: Union[Literal["none", "auto"], dict[str, Any], None] = None  # legacy; or {"name": ...}


class CompletionRequest(_Sampled):
    # a string, strings, token ids, or lists of token ids: `_prompts` checks that one request keeps to one kind
    prompt: Union[StrictStr, list[Union[StrictStr, StrictInt, list[StrictInt]]]]


# ---- shared ----------------------------------------------------------------------------------
def _server(request: Request):
    return request.app.state.server


def _target(request: Request, name: str, chat: bool):
    """The model a request names, on the endpoint its format answers on."""
    from trainer.serve.pool import ModelNotFound

    server = _server(request)
    if getattr(server, "index", None) is not None and server.index.model_removed(name):
        raise not_found("model", name, "model")  # a deleted ft: model is gone under its checkpoints' names too
    try:
        target = server.models.target(name)
    except ModelNotFound:
        raise not_found("model", name, "model") from None
    if target.chat != chat:
        if chat:
            raise APIError(400, f"{name} is a completions model (prompt/completion format), not a chat model, so it is "
                           "not supported on v1/chat/completions. Use v1/completions with a prompt.",
                           param="model", code="wrong_endpoint")
        raise APIError(400, f"{name} is a chat model, so it is not supported on v1/completions. "
                       "Use v1/chat/completions with messages.", param="model", code="wrong_endpoint")
    return target


def _stop(body: _Sampled) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop sequences, got {len(stop)}", param="stop",
                       code="invalid_value")
    return tuple(s for s in stop if s)


def _sampling(body: _Sampled, target, prompt_tokens: int, max_tokens: Optional[int], what: str):
    from trainer.inference import Sampling

    context = target.context_length
    if prompt_tokens >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your {what} "
                       f"resulted in {prompt_tokens} tokens. Please reduce the length of the {what}.",
                       param="messages" if what == "messages" else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = context - prompt_tokens
    elif prompt_tokens + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
                       "completion). Please reduce the length of the messages or completion.",
                       param="max_tokens", code="context_length_exceeded")
    return Sampling(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, n=body.n or 1, seed=body.seed, stop=_stop(body),
                    presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0)


def _text_content(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content: only text parts are supported, got type "
                           f"{part.get('type')!r}", param=f"messages.[{index}].content", code="unsupported_content")
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatRequest) -> list[dict]:
    messages = []
    for index, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant", "tool", "function"):
            raise APIError(400, f"messages[{index}].role: {message.role!r} is not one of system, developer, user, "
                           "assistant, tool", param=f"messages.[{index}].role", code="invalid_value")
        entry = {"role": role, "content": _text_content(message, index)}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump(include={"id", "type", "function"}) for call in message.tool_calls]
        if message.function_call:
            entry["function_call"] = message.function_call.model_dump(include={"name", "arguments"})
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    return messages


PROMPT_KINDS = {str: "strings", int: "token ids", list: "token-id lists"}


def _prompts(body: CompletionRequest, target) -> list[list[int]]:
    """The request's prompts as token ids. A prompt is a string, a list of strings, a list of token ids or a
    list of token-id lists (one kind per request); none may be empty, every id must be in the vocabulary."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        prompts, named = [prompt], lambda index: "prompt"
    else:
        prompts, named = prompt, lambda index: f"prompt[{index}]"
    kinds = {type(p) for p in prompts}
    if not prompts or len(kinds) > 1:
        got = "an empty list" if not prompts else "a list mixing " + " and ".join(sorted(PROMPT_KINDS[k] for k in kinds))
        raise APIError(400, f"prompt: send a string, a list of strings, a list of token ids or a list of token-id "
                       f"lists; got {got}", param="prompt", code="invalid_value")
    vocabulary = len(target.tokenizer)
    encoded = []
    for index, text_or_ids in enumerate(prompts):
        ids = target.encode_prompt(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if not ids:
            raise APIError(400, f"{named(index)}: the prompt is empty (no tokens)", param="prompt",
                           code="invalid_value")
        outside = next((token for token in ids if not 0 <= token < vocabulary), None)
        if outside is not None:
            raise APIError(400, f"{named(index)}: token id {outside} is outside this model's vocabulary "
                           f"(0 to {vocabulary - 1})", param="prompt", code="invalid_value")
        encoded.append(ids)
    return encoded


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _run(pool, target, prompt_ids: list[int], sampling, cancelled=None, constraint=None):
    """Deltas of one prompt's choices, the model held for this request only while it generates."""
    from trainer.inference import generate_choices

    with pool.using(target) as model:
        yield from generate_choices(model, target.tokenizer, prompt_ids, sampling, target.stop_token_ids, cancelled,
                                    constraint)


def _collect(pool, target, prompts: list[list[int]], sampling, constraint=None) -> list[dict]:
    """Every choice of every prompt, whole: index (prompt-major), text, finish_reason, n_tokens."""
    choices = []
    for number, prompt_ids in enumerate(prompts):
        texts = [""] * sampling.n
        ends = [None] * sampling.n
        counts = [0] * sampling.n
        for delta in _run(pool, target, prompt_ids, sampling, constraint=constraint):
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
                ends[delta.index], counts[delta.index] = delta.finish_reason, delta.n_tokens
        choices += [{"index": number * sampling.n + row, "text": texts[row], "finish_reason": ends[row] or "length",
                     "n_tokens": counts[row]} for row in range(sampling.n)]
    return choices


class _SSE(StreamingResponse):
    """A stream whose body is closed however it ends (finished, client gone, error), so its producer stops."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001
                    pass


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(pool, target, prompts: list[list[int]], sampling, frame, usage_chunk, constraint=None):
    """SSE events from a producer thread: `frame(kind, index, text, finish_reason)` shapes the chunks (a list).

    The producer generates into a queue and checks `cancelled` at every token, so a client that goes
    away (this generator closed or cancelled) frees the model at the next token.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    completion_tokens = 0

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            cancelled.set()

    def produce():
        try:
            for number, prompt_ids in enumerate(prompts):
                for delta in _run(pool, target, prompt_ids, sampling, cancelled, constraint):
                    put(("delta", number, delta))
                if cancelled.is_set():
                    break
            put(("end", None, None))
        except Exception:  # noqa: BLE001 - reported as an SSE error event, logged here
            log.exception("generation failed for %s", target.name)
            put(("error", None, None))

    try:
        for number in range(len(prompts)):
            for row in range(sampling.n):
                for chunk in frame("start", number * sampling.n + row, "", None):
                    yield _event(chunk)
        threading.Thread(target=produce, name="ftlab-generate", daemon=True).start()
        while True:
            kind, number, item = await events.get()
            if kind == "end":
                break
            if kind == "error":
                yield _event({"error": {"message": "The server had an error while generating; the server log has "
                                                   "the details.", "type": "server_error", "param": None,
                                        "code": "internal_error"}})
                return
            index = number * sampling.n + item.index
            if item.text:
                for chunk in frame("delta", index, item.text, None):
                    yield _event(chunk)
            if item.finish_reason is not None:
                completion_tokens += item.n_tokens
                for chunk in frame("finish", index, "", item.finish_reason):
                    yield _event(chunk)
        if usage_chunk is not None:
            yield _event(usage_chunk(_usage(sum(len(p) for p in prompts), completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()


def _generation_error(error: Exception) -> APIError:
    log.exception("generation failed", exc_info=error)
    return APIError(500, "The server had an error while generating; the server log has the details.",
                    code="internal_error")


# ---- function calling ------------------------------------------------------------------------
class _Calling:
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
    def of(cls, body: ChatRequest) -> "_Calling":
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

    def choice(self, index: int, text: str, finish_reason: str) -> dict:
        """A non-streamed choice: its message, with `tool_calls` (or legacy `function_call`) when it called."""
        content, calls = self.read(text)
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls and self.legacy:
            message["function_call"] = calls[0]["function"]
        elif calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "logprobs": None,
                "finish_reason": self.finish_reason(calls, finish_reason)}


class _ReplyStream:
    """One streamed choice: text goes out as it comes, except what may still turn out to be a call
    (from a `<tool_call>` opener, or a reply that starts as a JSON object), which waits for the end."""

    def __init__(self, calling: _Calling):
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


# ---- the endpoints ---------------------------------------------------------------------------
@router.post("/chat/completions")
def chat_completions(body: ChatRequest, request: Request):
    """POST /v1/chat/completions (chat models: families with the chat format, their ft: models and checkpoints)."""
    target = _target(request, body.model, chat=True)
    pool = _server(request).models
    calling = _Calling.of(body)
    constraint = calling.constraint(target.tokenizer)
    prompt_ids = target.encode_chat(_messages(body), calling.tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = _sampling(body, target, len(prompt_ids), max_tokens, "messages")
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": None}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        replies = {}  # choice index → _ReplyStream: holds back what may turn out to be a call

        def chunk(index, delta, finish_reason=None):
            return head | {"choices": [{"index": index, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}]} | extra

        def frame(kind, index, text, finish_reason):
            if kind == "start":
                replies[index] = _ReplyStream(calling)
                return [chunk(index, {"role": "assistant", "content": ""})]
            if kind == "delta":
                shown = replies[index].feed(text)
                return [chunk(index, {"content": shown})] if shown else []
            rest, calls = replies[index].finish()
            chunks = [chunk(index, {"content": rest})] if rest else []
            if calls and calling.legacy:
                chunks.append(chunk(index, {"function_call": calls[0]["function"]}))
            elif calls:
                chunks.append(chunk(index, {"tool_calls": [{"index": number} | call
                                                           for number, call in enumerate(calls)]}))
            return chunks + [chunk(index, {}, calling.finish_reason(calls, finish_reason))]

        usage_chunk = (lambda usage: head | {"choices": [], "usage": usage}) if include_usage else None
        return _SSE(_stream(pool, target, [prompt_ids], sampling, frame, usage_chunk, constraint),
                    media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        choices = _collect(pool, target, [prompt_ids], sampling, constraint)
    except APIError:
        raise
    except Exception as error:  # noqa: BLE001
        raise _generation_error(error) from None
    return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [calling.choice(c["index"], c["text"], c["finish_reason"]) for c in choices],
            "usage": _usage(len(prompt_ids), sum(c["n_tokens"] for c in choices)), "system_fingerprint": None}


@router.post("/completions")
def completions(body: CompletionRequest, request: Request):
    """POST /v1/completions (prompt/completion models: babbage-002, davinci-002 and their ft: models)."""
    target = _target(request, body.model, chat=False)
    pool = _server(request).models
    prompts = _prompts(body, target)
    samplings = [_sampling(body, target, len(p), body.max_tokens, "prompt") for p in prompts]
    sampling = min(samplings, key=lambda s: s.max_new_tokens)  # one length cap for all the prompts of a request
    if body.max_tokens is None:  # the hosted default for completions is 16 tokens
        sampling.max_new_tokens = min(16, sampling.max_new_tokens)
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": None}
    prompt_tokens = sum(len(p) for p in prompts)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def frame(kind, index, text, finish_reason):
            if kind == "start":
                return []  # completions streams have no role chunk
            return [head | {"choices": [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]} | extra]

        usage_chunk = (lambda usage: head | {"choices": [], "usage": usage}) if include_usage else None
        return _SSE(_stream(pool, target, prompts, sampling, frame, usage_chunk),
                    media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        choices = _collect(pool, target, prompts, sampling)
    except APIError:
        raise
    except Exception as error:  # noqa: BLE001
        raise _generation_error(error) from None
    return head | {"choices": [{"text": c["text"], "index": c["index"], "logprobs": None,
                                "finish_reason": c["finish_reason"]} for c in choices],
                   "usage": _usage(prompt_tokens, sum(c["n_tokens"] for c in choices))}
