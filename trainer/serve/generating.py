"""Chat and completion requests on the decoding engine: submitted through the model pool, answered
whole or streamed as server-sent events, with the hosted API's log-probs.

Every request's prompts go to the engine of its backbone at once (`ModelPool.submit`), where they
share the running batch with every other client's rows. A full queue is a 429 with Retry-After,
which the official client retries by itself. A client that goes away (a closed stream, a dropped
connection while waiting for a whole answer) cancels its rows at the engine's next step.
"""
import asyncio
import json
import logging
from typing import Callable, Optional

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from trainer.serve.errors import APIError

log = logging.getLogger("ftlab.serve")
DISCONNECT_POLL_S = 0.5  # how often a request waiting for a whole answer checks that its client is still there


async def submit(pool, target, prompts: list[list[int]], sampling, constraint=None) -> list:
    """Queue one generation per prompt (their choices are `sampling.n` rows each); all or none."""
    from trainer.engine import EngineClosed, QueueFull
    from trainer.serve.pool import BackboneBusy

    loop = asyncio.get_running_loop()

    def queue_all() -> list:  # in a worker thread: the first request for a backbone waits for it to load
        generations = []
        try:
            for prompt_ids in prompts:
                generations.append(pool.submit(target, prompt_ids, sampling, constraint, loop))
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise
        return generations

    try:
        return await run_in_threadpool(queue_all)
    except QueueFull as full:
        raise APIError(429, f"The server is busy: {full}.", code="rate_limit_exceeded",
                       headers={"Retry-After": f"{full.retry_after:g}"}) from None
    except BackboneBusy as busy:
        raise APIError(503, f"The server is busy: {busy}.", code="server_busy", headers={"Retry-After": "5"}) from None
    except EngineClosed:
        raise APIError(503, "The server is shutting down.", code="server_shutting_down") from None
    except ValueError as error:  # more choices than the batch holds
        raise APIError(400, str(error), param="n", code="invalid_value") from None


def generation_error(error: Exception) -> APIError:
    """What a client is told when generating failed (the details go to the server log)."""
    from trainer.engine import UnsupportedAdapter

    if isinstance(error, UnsupportedAdapter):
        return APIError(400, f"This model cannot be served: {error}", param="model", code="model_not_supported")
    log.error("generation failed", exc_info=error)
    return APIError(500, "The server had an error while generating; the server log has the details.",
                    code="internal_error")


async def collect(request, generations: list) -> list[list]:
    """Every generation's choices, whole; the rows are cancelled if the client disconnects meanwhile."""
    whole = asyncio.ensure_future(asyncio.gather(*(generation.aresult() for generation in generations)))
    try:
        while True:
            done, _ = await asyncio.wait({whole}, timeout=DISCONNECT_POLL_S)
            if done:
                return whole.result()
            if await request.is_disconnected():
                raise APIError(400, "The client disconnected before the answer was ready.", code="client_disconnected")
    except APIError:
        raise
    except Exception as error:  # noqa: BLE001 - the engine's error, in the hosted shape
        raise generation_error(error) from None
    finally:
        if not whole.done():
            whole.cancel()
        for generation in generations:
            generation.cancel()


class EventStream(StreamingResponse):
    """Server-sent events whose producer is closed however the stream ends (finished, client gone, error)."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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


def event(payload: dict) -> str:
    """One SSE event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The hosted `usage` object (backbone tokens)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream(generations: list, n: int, frame: Callable, usage_chunk: Optional[Callable], prompt_tokens: int):
    """SSE events of every generation's deltas: `frame(kind, index, text, finish_reason, logprobs)` shapes the
    chunks of a choice's start, its deltas and its finish (a list each); then usage, then [DONE]."""
    completion_tokens = 0
    try:
        for number in range(len(generations)):
            for choice in range(n):
                for chunk in frame("start", number * n + choice, "", None, []):
                    yield event(chunk)
        for number, generation in enumerate(generations):
            async for delta in generation:
                index = number * n + delta.index
                if delta.text or delta.logprobs:
                    for chunk in frame("delta", index, delta.text, None, delta.logprobs):
                        yield event(chunk)
                if delta.finish_reason is not None:
                    completion_tokens += delta.n_tokens
                    for chunk in frame("finish", index, "", delta.finish_reason, []):
                        yield event(chunk)
        if usage_chunk is not None:
            yield event(usage_chunk(usage(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"
    except Exception as error:  # noqa: BLE001 - an error event, in the hosted shape; the details are logged
        failure = generation_error(error)
        yield event({"error": {"message": failure.message, "type": "server_error" if failure.status >= 500
                               else "invalid_request_error", "param": failure.param, "code": failure.code}})
    finally:
        for generation in generations:
            generation.cancel()


# ---- log-probs ---------------------------------------------------------------------------------
def _token(tokenizer, token_id: int, logprob: float) -> dict:
    from trainer.engine import token_bytes

    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer, entries: list) -> list[dict]:
    """The chat API's `logprobs.content`: each token, its log-prob, its bytes, and the top alternatives."""
    return [_token(tokenizer, entry.token_id, entry.logprob)
            | {"top_logprobs": [_token(tokenizer, token_id, logprob) for token_id, logprob in entry.top]}
            for entry in entries]


def completion_logprobs(tokenizer, entries: list, text_offset: int = 0) -> dict:
    """The legacy completions `logprobs`: tokens, their log-probs, the top alternatives and text offsets."""
    tokens = [_token(tokenizer, entry.token_id, entry.logprob)["token"] for entry in entries]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{_token(tokenizer, token_id, logprob)["token"]: logprob for token_id, logprob in entry.top}
                             for entry in entries],
            "text_offset": offsets}
