"""Function calling through `ftlab serve`: tools and legacy functions in, `tool_calls` / `function_call`
out, and streamed tool-call deltas that the official client assembles into the same calls.

The model's reply is fixed here (the engine is replaced), so these tests check the API's reading
and shaping of calls, not what a tiny random model happens to say."""
import json

import pytest
from openai import OpenAI

from tests.live_server import live_server
from trainer.engine import Delta, Generation, Request
from trainer.engine.engine import _END

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Porto"}}</tool_call>'
TWO_CALLS = 'Checking both.\n' + CALL + '\n<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>'
QUESTION = [{"role": "user", "content": "Weather in Porto?"}]
constraints: list = []  # what each generation was told to keep to (trainer.call_constraint)


@pytest.fixture
def replies(monkeypatch):
    """The next replies the model gives, in pieces of 3 characters (calls split across tokens)."""
    queue: list[str] = []
    constraints.clear()

    def fake_submit(pool, target, prompt_ids, sampling, constraint=None, loop=None):
        constraints.append(constraint)
        text = queue.pop(0)
        generation = Generation(Request(prompt_ids, sampling, target.tokenizer), loop)
        for start in range(0, len(text), 3):
            generation._emit(Delta(0, text[start:start + 3]))
        generation._emit(Delta(0, "", "stop", len(text) // 3))
        generation._emit(_END)
        return generation

    monkeypatch.setattr("trainer.serve.pool.ModelPool.submit", fake_submit)
    return queue


@pytest.fixture
def client(tmp_path, cache_dir):
    overrides = ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32",
                 f"cache_dir={cache_dir}"]
    with live_server(tmp_path / "root", overrides) as (url, _):
        yield OpenAI(base_url=url, api_key="x", max_retries=0)


def test_a_call_comes_back_as_tool_calls_streamed_or_not(client, replies):
    replies += [CALL, CALL]
    plain = client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER], temperature=0)
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Porto"}
    with client.chat.completions.stream(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()  # the client's own assembly of tool-call deltas
    (streamed,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)


def test_parallel_calls_text_around_them_and_parallel_off(client, replies):
    replies += [TWO_CALLS, TWO_CALLS, TWO_CALLS]
    plain = client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER])
    message = plain.choices[0].message
    assert message.content == "Checking both."
    assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls] == ["Porto", "Lima"]
    content, calls = "", {}
    for chunk in client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER],
                                                stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        content += (delta.content or "") if delta else ""
        for call in (delta.tool_calls or []) if delta else []:
            calls.setdefault(call.index, "")
            calls[call.index] += call.function.arguments or ""
    assert content == "Checking both." and [json.loads(a)["city"] for a in calls.values()] == ["Porto", "Lima"]
    single = client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER],
                                            parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_legacy_functions_get_function_call_and_plain_text_stays_text(client, replies):
    replies += [CALL, "It is sunny in Porto.", "It is sunny in Porto."]
    legacy = client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION,
                                            functions=[WEATHER["function"]], function_call="auto")
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "get_weather"
    assert legacy.choices[0].message.tool_calls is None
    text = client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER])
    assert text.choices[0].message.content == "It is sunny in Porto." and text.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER], stream=True) if chunk.choices)
    assert streamed == "It is sunny in Porto."


def test_a_conversation_with_calls_and_results_is_accepted(client, replies):
    replies += ["It is 21 °C in Porto."]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Porto"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=history, tools=[WEATHER],
                                           tool_choice="auto")
    assert reply.choices[0].message.content == "It is 21 °C in Porto."
    assert reply.usage.prompt_tokens > 0


def test_calls_are_kept_to_declared_functions_and_tool_choice_is_enforced(client, replies):
    import openai

    replies += [CALL, CALL, CALL, "Hello!"]
    client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER])
    client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER], tool_choice="required")
    client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION)
    assert [(c.heads, c.must_call) if c else None for c in constraints] == [
        (['{"name": "get_weather"'], False), (['{"name": "get_weather"'], True), (['{"name": "get_weather"'], True),
        None]
    with pytest.raises(openai.BadRequestError, match="does not declare"):
        client.chat.completions.create(model="gpt-3.5-turbo", messages=QUESTION, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "book_hotel"}})
