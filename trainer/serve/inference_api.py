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
penalties, logprobs (chat: `logprobs` + `top_logprobs`; completions: `logprobs: N`). Usage counts
backbone tokens. Every request is decoded by the backbone's batched engine (`trainer.engine`,
through `generating.py`) beside every other client's. `stream: true` answers with server-sent
events built from the same token-level deltas as the plain answer, so both carry the same text.
Other fields the hosted API knows are accepted and ignored.
"""
import logging
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from trainer.serve import generating
from trainer.serve.errors import APIError, not_found
from trainer.serve.tool_calls import Calling, ReplyStream

log = logging.getLogger("ftlab.serve")
router = APIRouter()

MAX_N = 8
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # the hosted chat API's limit
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's


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
    logprobs: Optional[bool] = None  # each output token's log-prob
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # and this many alternatives (needs logprobs)
    tools: Optional[list[dict[str, Any]]] = Field(None, max_length=128)  # [{"type": "function", "function": {...}}]
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None  # or {"type": "function", ...}
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[dict[str, Any]]] = Field(None, max_length=128)  # legacy
    function_call: Union[Literal["none", "auto"], dict[str, Any], None] = None  # legacy; or {"name": ...}


class CompletionRequest(_Sampled):
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # the legacy API: the top-N alternatives
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


def _logprobs(body: _Sampled) -> tuple[bool, int]:
    """Whether to report log-probs, and how many alternatives: chat's `logprobs` + `top_logprobs`, or the
    legacy completions `logprobs: N`."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return bool(body.logprobs), int(body.top_logprobs or 0)
    return body.logprobs is not None, int(body.logprobs or 0)


def _sampling(body: _Sampled, target, prompt_tokens: int, max_tokens: Optional[int], what: str):
    from trainer.engine import Sampling

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
    logprobs, top_logprobs = _logprobs(body)
    return Sampling(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, n=body.n or 1, seed=body.seed, stop=_stop(body),
                    presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                    logprobs=logprobs, top_logprobs=top_logprobs)


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


# ---- the endpoints ---------------------------------------------------------------------------
def _prepare_chat(request: Request, body: ChatRequest):
    """Resolve, render and tokenize a chat request (may load a tokenizer: run in a worker thread)."""
    target = _target(request, body.model, chat=True)
    calling = Calling.of(body)
    constraint = calling.constraint(target.tokenizer)
    prompt_ids = target.encode_chat(_messages(body), calling.tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = _sampling(body, target, len(prompt_ids), max_tokens, "messages")
    return target, calling, constraint, prompt_ids, sampling


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    """POST /v1/chat/completions (chat models: families with the chat format, their ft: models and checkpoints)."""
    target, calling, constraint, prompt_ids, sampling = await run_in_threadpool(_prepare_chat, request, body)
    generations = await generating.submit(_server(request).models, target, [prompt_ids], sampling, constraint)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": None}

    def logprobs(entries) -> Optional[dict]:
        if not sampling.logprobs:
            return None
        return {"content": generating.chat_logprobs(target.tokenizer, entries), "refusal": None}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        replies = {}  # choice index → ReplyStream: holds back what may turn out to be a call
        pending = {}  # choice index → log-probs of tokens whose text is held back

        def chunk(index, delta, finish_reason=None, entries=()):
            return head | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs(entries),
                                        "finish_reason": finish_reason}]} | extra

        def frame(kind, index, text, finish_reason, entries):
            if kind == "start":
                replies[index], pending[index] = ReplyStream(calling), []
                return [chunk(index, {"role": "assistant", "content": ""})]
            pending[index] += entries
            if kind == "delta":
                shown = replies[index].feed(text)
                if not shown:
                    return []
                sent, pending[index] = pending[index], []
                return [chunk(index, {"content": shown}, entries=sent)]
            rest, calls = replies[index].finish()
            chunks = [chunk(index, {"content": rest}, entries=pending[index])] if rest or pending[index] else []
            if calls and calling.legacy:
                chunks.append(chunk(index, {"function_call": calls[0]["function"]}))
            elif calls:
                chunks.append(chunk(index, {"tool_calls": [{"index": number} | call
                                                           for number, call in enumerate(calls)]}))
            return chunks + [chunk(index, {}, calling.finish_reason(calls, finish_reason))]

        usage_chunk = (lambda usage: head | {"choices": [], "usage": usage}) if include_usage else None
        return generating.EventStream(generating.stream(generations, sampling.n, frame, usage_chunk, len(prompt_ids)))
    (choices,) = await generating.collect(request, generations)
    return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [calling.choice(c.index, c.text, c.finish_reason, logprobs(c.logprobs)) for c in choices],
            "usage": generating.usage(len(prompt_ids), sum(c.n_tokens for c in choices)), "system_fingerprint": None}


def _prepare_completion(request: Request, body: CompletionRequest):
    """Resolve and tokenize a completions request (may load a tokenizer: run in a worker thread)."""
    target = _target(request, body.model, chat=False)
    prompts = _prompts(body, target)
    samplings = [_sampling(body, target, len(p), body.max_tokens, "prompt") for p in prompts]
    sampling = min(samplings, key=lambda s: s.max_new_tokens)  # one length cap for all the prompts of a request
    if body.max_tokens is None:  # the hosted default for completions is 16 tokens
        sampling.max_new_tokens = min(16, sampling.max_new_tokens)
    return target, prompts, sampling


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    """POST /v1/completions (prompt/completion models: babbage-002, davinci-002 and their ft: models)."""
    target, prompts, sampling = await run_in_threadpool(_prepare_completion, request, body)
    generations = await generating.submit(_server(request).models, target, prompts, sampling)
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": None}
    prompt_tokens = sum(len(p) for p in prompts)

    def logprobs(entries, text_offset: int = 0) -> Optional[dict]:
        if not sampling.logprobs:
            return None
        return generating.completion_logprobs(target.tokenizer, entries, text_offset)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        offsets: dict[int, int] = {}  # choice index → characters of text sent so far

        def frame(kind, index, text, finish_reason, entries):
            if kind == "start":
                return []  # completions streams have no role chunk
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(text)
            return [head | {"choices": [{"index": index, "text": text, "logprobs": logprobs(entries, offset),
                                         "finish_reason": finish_reason}]} | extra]

        usage_chunk = (lambda usage: head | {"choices": [], "usage": usage}) if include_usage else None
        return generating.EventStream(generating.stream(generations, sampling.n, frame, usage_chunk, prompt_tokens))
    results = await generating.collect(request, generations)
    choices = [(number * sampling.n + c.index, c) for number, result in enumerate(results) for c in result]
    return head | {"choices": [{"text": c.text, "index": index, "logprobs": logprobs(c.logprobs),
                                "finish_reason": c.finish_reason} for index, c in choices],
                   "usage": generating.usage(prompt_tokens, sum(c.n_tokens for _, c in choices))}
