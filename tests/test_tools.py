"""Function calling: both formats validated at the right lines, counted with the cookbook's approximation,
rendered (fallback and a tool-aware template) with prompts that are token prefixes of training, read back
by parse_tool_calls, scored by the eval, shown by chat; and the later model families."""
import io
import json
from types import SimpleNamespace

import pytest

from tests.conftest import write_jsonl
from trainer.backbones import tiny_llama
from trainer.data.tokenize import IGNORE_INDEX, encode_chat, render_messages
from trainer.data.tokens import (
    FUNCTION_TOKENS,
    count_assistant_tokens,
    count_example_tokens,
    count_function_tokens,
    get_encoding,
)
from trainer.data.tools import (
    CALL_OPEN,
    TOOLS_FOOTER,
    TOOLS_HEADER,
    assistant_text,
    declared_tools,
    parse_tool_calls,
    template_supports_tools,
)
from trainer.data.validate import FIXES, chat_errors, schema_problems, validate_file
from trainer.inference import encode_chat_prompt
from trainer.schema import DataFormat

ENC = get_encoding("cl100k_base")
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "description": "City name."},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city"]}}
TIME = {"name": "get_local_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]


def call(ident, name, arguments):
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}


def tools_example(*calls, results=(), answer=None, **extra):
    """tools format: user asks, the assistant calls, optional results and a final answer."""
    messages = [{"role": "system", "content": "You help travellers."}, {"role": "user", "content": "Weather in Porto?"},
                {"role": "assistant", "content": None, "tool_calls": list(calls)}]
    messages += [{"role": "tool", "tool_call_id": ident, "content": text} for ident, text in results]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"tools": TOOLS, "messages": messages} | extra


def legacy_example(arguments='{"city": "Porto"}', result=None, answer=None, **extra):
    messages = [{"role": "system", "content": "You help travellers."}, {"role": "user", "content": "Weather in Porto?"},
                {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": arguments}}]
    if result is not None:
        messages += [{"role": "function", "name": "get_weather", "content": result},
                     {"role": "assistant", "content": answer}]
    return {"functions": [WEATHER, TIME], "messages": messages} | extra


PORTO = call("call_1", "get_weather", '{"city": "Porto"}')


# ---- validation ------------------------------------------------------------------------------
LINES = [  # (example, expected error codes, expected warning codes); one per line of the file
    (tools_example(PORTO, results=[("call_1", "18 C")], answer="18 °C in Porto."), [], []),
    (legacy_example(result="18 C", answer="18 °C in Porto."), [], []),
    (tools_example(call("c", "get_forecast", '{"city": "Porto"}')), ["undeclared_function"], []),
    (tools_example(call("c", "get_weather", {"city": "Porto"})), ["invalid_arguments"], []),
    (legacy_example(arguments='["Porto"]'), ["invalid_arguments"], []),
    (legacy_example(arguments="{city: Porto}"), ["invalid_arguments"], []),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [PORTO]},
                                   {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "ok"}]},
     ["missing_tool_call_id"], []),
    (tools_example(PORTO, results=[("call_9", "18 C")], answer="ok"), ["unknown_tool_call_id"], []),
    (tools_example(PORTO) | {"tools": {"get_weather": WEATHER}}, ["invalid_tools", "undeclared_function"], []),
    (legacy_example() | {"functions": [WEATHER, {"name": "get time", "parameters": {}}]}, ["invalid_functions"], []),
    (tools_example(PORTO) | {"tools": [{"type": "function", "function": WEATHER | {"parameters": {"type": "array"}}}]},
     ["invalid_tools"], []),
    (legacy_example(tools=TOOLS), ["mixed_function_formats"], []),
    (tools_example(PORTO, call("call_2", "get_weather", '{"city": "Lisbon"}'), parallel_tool_calls=False),
     ["invalid_parallel_tool_calls"], []),
    (tools_example(call("c", "get_weather", '{"unit": "kelvin"}'), call("d", "get_local_time", '{"city": 7}')),
     [], ["arguments_schema_mismatch", "arguments_schema_mismatch"]),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}, [], []),
]


def test_both_formats_validate_and_each_problem_is_reported_at_its_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [example for example, _, _ in LINES])
    report = validate_file(path, DataFormat.chat, ENC, 4096)
    for line, (_, errors, warnings) in enumerate(LINES, 1):
        assert [i.code for i in report.errors if i.line == line] == errors, f"line {line}"
        found = [i.code for i in report.warnings if i.line == line and i.code in FIXES and i.code.startswith("arguments")]
        assert found == warnings, f"line {line}"
    for issue in report.errors + report.warnings:
        assert issue.file == str(path) and FIXES[issue.code] in issue.message  # where, code and how to fix
    assert report.n_valid == sum(1 for _, errors, _ in LINES if not errors)
    assert report.stats()["n_with_functions"] == report.n_valid


def test_the_schema_warning_names_each_problem():
    problems = schema_problems({"unit": "kelvin", "days": "3"}, {
        "type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}})
    assert problems == ["city is missing (required)", 'unit is "kelvin", not one of ["celsius", "fahrenheit"]',
                        "days is not a declared parameter"]
    assert schema_problems({"n": 3.0, "tags": ["a", 1]}, {"type": "object", "properties": {
        "n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}) == ["tags[1] is number, not string"]


def test_the_new_keys_are_accepted_and_a_call_needs_no_content():
    example = tools_example(PORTO, results=[("call_1", "18 C")], answer="ok", parallel_tool_calls=True)
    del example["messages"][2]["content"]  # the hosted format leaves content out of a call
    assert chat_errors(example) == []


# ---- counting --------------------------------------------------------------------------------
def test_function_tokens_follow_the_cookbook_formula():
    n = lambda text: len(ENC.encode(text))  # noqa: E731
    c = FUNCTION_TOKENS["cl100k_base"]
    weather = (c["func_init"] + n("get_weather:Current weather in a city") + c["prop_init"]
               + c["prop_key"] + n("city:string:City name")
               + c["prop_key"] + c["enum_init"] + c["enum_item"] + n("celsius") + c["enum_item"] + n("fahrenheit")
               + n("unit:string:"))
    time = c["func_init"] + n("get_local_time:") + c["prop_init"] + c["prop_key"] + n("city:string:")
    assert count_function_tokens(TOOLS, ENC) == weather + time + c["func_end"] == 77
    # gpt-4o's constants (o200k_base): 3 fewer per function, the rest alike
    o200k = SimpleNamespace(name="o200k_base", encode_ordinary=ENC.encode_ordinary)
    assert count_function_tokens(TOOLS, o200k) == 77 - 2 * 3
    assert count_function_tokens([], ENC) == 0


def test_an_example_counts_its_functions_and_calls():
    plain = {"messages": [{"role": "user", "content": "Weather in Porto?"}, {"role": "assistant", "content": "Sunny."}]}
    with_call = {"tools": TOOLS, "messages": [plain["messages"][0],
                                              {"role": "assistant", "content": None, "tool_calls": [PORTO]}]}
    call_tokens = len(ENC.encode("get_weather")) + len(ENC.encode('{"city": "Porto"}'))
    base = count_example_tokens(plain, DataFormat.chat, ENC) - len(ENC.encode("Sunny."))
    assert count_example_tokens(with_call, DataFormat.chat, ENC) == base + 77 + call_tokens
    assert count_assistant_tokens(with_call, DataFormat.chat, ENC) == call_tokens
    legacy = legacy_example()
    assert count_example_tokens(legacy, DataFormat.chat, ENC) == count_example_tokens(
        tools_example(PORTO), DataFormat.chat, ENC)  # same functions, same call: same count


def test_function_tokens_count_toward_the_context_cap(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [tools_example(PORTO)])
    report = validate_file(path, DataFormat.chat, ENC, context_length=80)
    assert [i.code for i in report.warnings if i.code == "too_long"] == ["too_long"]


# ---- rendering -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama(str(tmp_path_factory.mktemp("cache")))))


def supervised(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def assert_prompts_are_training_prefixes(tokenizer, example):
    """Every prompt up to an assistant turn encodes to exactly the ids training had before that reply."""
    ids, labels = encode_chat(example, tokenizer)
    messages = example["messages"]
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = encode_chat_prompt(tokenizer, messages[:index], example.get("tools") or example.get("functions"))
            assert ids[: len(prompt)] == prompt
            assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    return ids, labels


def test_fallback_declares_the_tools_and_trains_on_the_calls(tokenizer):
    assert not template_supports_tools(tokenizer)
    example = tools_example(PORTO, call("call_2", "get_local_time", '{"city": "Porto"}'),
                            results=[("call_1", "18 C"), ("call_2", "14:05")], answer="18 °C, 14:05.")
    ids, labels = assert_prompts_are_training_prefixes(tokenizer, example)
    text = tokenizer.decode(ids)
    assert "You help travellers.\n\n" + TOOLS_HEADER + json.dumps(WEATHER) in text and TOOLS_FOOTER in text
    assert ("<|im_start|>user\n<tool_response>18 C</tool_response>\n<tool_response>14:05</tool_response><|im_end|>"
            in text)  # both results in one turn
    assert supervised(tokenizer, ids, labels) == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Porto"}}</tool_call>\n'
        '<tool_call>{"name": "get_local_time", "arguments": {"city": "Porto"}}</tool_call><|im_end|>\n'
        "18 °C, 14:05.<|im_end|>\n")


def test_legacy_and_tools_formats_render_alike(tokenizer):
    new = tools_example(PORTO, results=[("call_1", "18 C")], answer="18 °C.")
    old = legacy_example(result="18 C", answer="18 °C.")
    assert encode_chat(new, tokenizer) == encode_chat(old, tokenizer)
    assert_prompts_are_training_prefixes(tokenizer, old)
    weightless = tools_example(PORTO, results=[("call_1", "18 C")], answer="18 °C.")
    weightless["messages"][2]["weight"] = 0  # weight works on calls as on text
    ids, labels = encode_chat(weightless, tokenizer)
    assert supervised(tokenizer, ids, labels) == "18 °C.<|im_end|>\n"


def test_examples_without_functions_render_as_before(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_messages(tokenizer, messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert render_messages(tokenizer, messages, tools=[]) == render_messages(tokenizer, messages)


# A ChatML template with tools support in Qwen2.5's manner: schemas in the system turn, consecutive
# tool results grouped into one user turn (so rendering message by message would not be prefix-stable).
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Functions:{% for tool in tools %}
{{ tool | tojson }}{% endfor %}<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}{% for call in message.tool_calls or [] %}<call>{{ call.function.name }} {{ call.function.arguments | tojson }}</call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}
<result>{{ message.content }}</result>{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{%- else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_with_tools_support_renders_them_itself(tokenizer):
    import copy

    native = copy.deepcopy(tokenizer)
    native.chat_template = TOOL_TEMPLATE
    assert template_supports_tools(native)
    example = tools_example(PORTO, call("call_2", "get_weather", '{"city": "Lisbon"}'),
                            results=[("call_1", "18 C"), ("call_2", "22 C")], answer="Both mild.")
    ids, labels = assert_prompts_are_training_prefixes(native, example)
    text = native.decode(ids)
    assert "Functions:" + json.dumps(TOOLS[0]) in text and TOOLS_HEADER not in text  # (transformers trims blocks)
    assert "<|im_start|>user<result>18 C</result><result>22 C</result><|im_end|>" in text
    assert supervised(native, ids, labels) == ('<call>get_weather {"city": "Porto"}</call><call>get_weather '
                                               '{"city": "Lisbon"}</call><|im_end|>\nBoth mild.<|im_end|>\n')
    assert encode_chat(legacy_example(result="18 C", answer="ok"), native)  # legacy calls get ids to match


# ---- reading replies -------------------------------------------------------------------------
def test_parse_tool_calls():
    content, calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Porto"}}</tool_call>')
    assert content is None and len(calls) == 1
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Porto"}'}
    content, calls = parse_tool_calls('Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                                      '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"x": 1} and calls[0]["id"] != calls[1]["id"]
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": {"x": 1}}')[1]  # cut off before the closing tag
    broken = '<tool_call>{"name": "a", "arguments": {"x": </tool_call>'
    assert parse_tool_calls(broken) == (broken, [])  # not a well-formed call: stays text
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}')[1][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}  # Llama 3.1's bare JSON
    assert parse_tool_calls('{"name": "Ada", "city": "Porto"}') == ('{"name": "Ada", "city": "Porto"}', [])
    assert parse_tool_calls("Sunny all week.") == ("Sunny all week.", [])
    message = tools_example(PORTO)["messages"][2]
    assert [c["function"] for c in parse_tool_calls(assistant_text(message))[1]] == [PORTO["function"]]


def test_tool_metrics_on_handmade_replies():
    from trainer.evaluate import task_metrics

    ref_call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Porto", "unit": "celsius"}}</tool_call>'
    references = [ref_call, ref_call, ref_call, ref_call, "Tokyo.", "You're welcome!"]
    replies = [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "porto", "unit": "celsius"}}</tool_call>',  # exact
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lisbon"}}</tool_call>',  # name right, 0/2 fields
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # malformed
        "It is sunny in Porto.",  # no call
        "Tokyo is the capital.",  # right: no call
        '<tool_call>{"name": "get_local_time", "arguments": {}}</tool_call>',  # a call where none was needed
    ]
    metrics = task_metrics("tools", replies, references, None)
    assert metrics["n_call_expected"] == 4 and metrics["n_no_call_expected"] == 2
    assert metrics["tool_name_accuracy"] == pytest.approx(2 / 4)
    assert metrics["arguments_valid"] == pytest.approx(2 / 4)
    assert metrics["argument_field_accuracy"] == pytest.approx(2 / 8)
    assert metrics["call_exact_match"] == pytest.approx(1 / 4)
    assert metrics["no_call_rate"] == pytest.approx(1 / 2)
    assert task_metrics("tools", ["hi"], ["hello"], None)["tool_name_accuracy"] is None  # nothing to score


def test_eval_prompts_keep_calls_and_results():
    from trainer.evaluate import billed_prompt_tokens, split_example

    example = tools_example(PORTO, results=[("call_1", "18 C")], answer="18 °C.")
    prompt, reference = split_example(example, chat=True)
    assert reference == "18 °C." and prompt[2]["tool_calls"] == [PORTO] and prompt[3]["tool_call_id"] == "call_1"
    prompt, reference = split_example(tools_example(PORTO), chat=True)
    assert parse_tool_calls(reference)[1][0]["function"] == PORTO["function"]
    assert billed_prompt_tokens(prompt, True, ENC, declared_tools(example)) == billed_prompt_tokens(prompt, True, ENC) + 77


# ---- chat ------------------------------------------------------------------------------------
def test_chat_shows_calls_instead_of_their_markup(tokenizer, monkeypatch, capsys):
    from trainer import chat

    reply = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Porto"}}</tool_call>'
    seen = {}

    def fake_stream(loaded, prompt_ids, gen, out=None, constraint=None):
        seen["prompt"], seen["constraint"] = prompt_ids, constraint
        for piece in (reply[:12], reply[12:30], reply[30:]):  # pieces split inside the <tool_call> marker
            out.write(piece)
        out.write("\n")
        return reply

    monkeypatch.setattr(chat, "stream_reply", fake_stream)
    loaded = SimpleNamespace(tokenizer=tokenizer)
    messages = [{"role": "user", "content": "Weather in Porto?"}]
    message = chat.show_reply(loaded, messages, TOOLS, gen=None)
    out = capsys.readouterr().out
    assert out == 'Checking.→ get_weather({"city": "Porto"})\n' and CALL_OPEN not in out
    assert message["content"] == "Checking." and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert seen["prompt"] == encode_chat_prompt(tokenizer, messages, TOOLS)
    assert seen["constraint"].heads == ['{"name": "%s"' % tool["function"]["name"] for tool in TOOLS]

    writer = chat.CallHidingWriter(io.StringIO())
    for piece in ("Sunny <to", "day", "\n"):
        writer.write(piece)
    assert writer.out.getvalue() == "Sunny <today\n" and not writer.hid  # a near-marker is just text


def test_chat_declares_the_functions_of_the_training_file(tmp_path):
    from trainer.chat import training_tools

    path = write_jsonl(tmp_path / "train.jsonl", [legacy_example(), tools_example(PORTO),
                                                  {"messages": [{"role": "user", "content": "x"}]}])
    job = SimpleNamespace(record={"training_file": {"path": str(path)}})
    assert [t["function"]["name"] for t in training_tools(None, job)] == ["get_weather", "get_local_time"]


# ---- the later families ----------------------------------------------------------------------
@pytest.mark.parametrize("family, context_length, encoding, prices", [
    ("gpt-3.5-turbo-1106", 16385, "cl100k_base", (0.008, 0.003, 0.006)),
    ("gpt-4o-mini-2024-07-18", 65536, "o200k_base", (0.003, 0.0003, 0.0012)),
    ("gpt-4o-2024-08-06", 65536, "o200k_base", (0.025, 0.00375, 0.015)),
])
def test_later_families_compose_with_their_limits_and_dated_prices(family, context_length, encoding, prices):
    from tests.test_configs import compose_with
    from trainer.cost import price_row

    cfg = compose_with(f"model={family}", "data=tools")
    assert (cfg.model.name, cfg.model.context_length, cfg.model.encoding) == (family, context_length, encoding)
    row = price_row(cfg)
    assert (row.training, row.input, row.output) == prices
    assert compose_with().model.name == "gpt-3.5-turbo"  # the default family is unchanged
