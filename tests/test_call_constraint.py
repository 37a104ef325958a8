"""While a reply is generated, its calls may only name declared functions; `required` and a named
function are enforced (trainer.call_constraint)."""
from types import SimpleNamespace

import pytest
import torch

from trainer.backbones import tiny_llama
from trainer.call_constraint import CallConstraint, call_head, uses_call_wrapper
from trainer.data.tools import CALL_OPEN, call_text, parse_tool_calls
from trainer.engine import Engine, Request, Sampling

NAMES = ["get_weather", "get_local_time", "convert_currency"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama(str(tmp_path_factory.mktemp("cache")))))


def allowed_texts(tokenizer, constraint, text) -> set[str]:
    allowed = constraint.allowed(tokenizer.encode(text, add_special_tokens=False))
    return None if allowed is None else {tokenizer.decode([i]) for i in allowed}


def test_a_call_name_can_only_continue_into_a_declared_one(tokenizer):
    constraint = CallConstraint(tokenizer, NAMES)
    assert uses_call_wrapper(tokenizer)
    assert constraint.allowed([]) is None  # text, or a call: the model chooses
    pieces = allowed_texts(tokenizer, constraint, CALL_OPEN + '{"name": "get_')
    assert pieces and all(any(f'{name}"'.startswith("get_" + p) or ("get_" + p).startswith(f'{name}"')
                              for name in NAMES) for p in pieces)
    assert not any(p.startswith(("b", "x")) for p in pieces)
    assert allowed_texts(tokenizer, constraint, CALL_OPEN + '{"name": "get_weather", "arguments": {"ci') is None


def test_required_opens_a_call_and_a_named_function_is_the_one_called(tokenizer):
    required = CallConstraint(tokenizer, NAMES, must_call=True)
    assert all(CALL_OPEN.startswith(p) or p.startswith(CALL_OPEN[:1]) for p in allowed_texts(tokenizer, required, ""))
    assert tokenizer.eos_token_id not in required.allowed([])
    named = CallConstraint(tokenizer, ["convert_currency"], must_call=True)
    pieces = allowed_texts(tokenizer, named, CALL_OPEN + '{"name": "')
    assert pieces and all('convert_currency"'.startswith(p) or p.startswith('convert_currency"') for p in pieces)


class ScriptedModel(torch.nn.Module):
    """A stand-in that always prefers the next token of a scripted reply (then any token, in id order)."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, position_ids, attention_mask=None, use_cache=True, cache=None, logits_to_keep=None):
        step = int(position_ids[0, -1])  # the prompt is one token: position 0 predicts the reply's first token
        logits = -torch.arange(self.vocab, dtype=torch.float32).repeat(input_ids.shape[0], input_ids.shape[1], 1)
        if step < len(self.script):
            logits[:, -1, self.script[step]] = 10.0
        return SimpleNamespace(logits=logits / self.vocab)


def test_generation_keeps_an_invented_function_out(tokenizer):
    reply = CALL_OPEN + '{"name": "boil_water", "arguments": {"city": "Porto"}}</tool_call>'
    engine = Engine(ScriptedModel(tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id],
                                  len(tokenizer)))
    sampling = Sampling(max_new_tokens=100, temperature=0.0)
    try:
        (free,) = engine.generate([Request([1], sampling, tokenizer, [tokenizer.eos_token_id])])[0]
        assert [c["function"]["name"] for c in parse_tool_calls(free.text)[1]] == ["boil_water"]
        (kept,) = engine.generate([Request([1], sampling, tokenizer, [tokenizer.eos_token_id],
                                           constraint=CallConstraint(tokenizer, NAMES))])[0]
    finally:
        engine.close()
    assert kept.text.startswith(CALL_OPEN + '{"name": "') and any(
        kept.text.startswith(CALL_OPEN + '{"name": "' + n + '"') for n in NAMES), kept.text


@pytest.mark.parametrize("name", ["get_weather", "météo_du_jour"])
def test_the_head_is_how_training_writes_the_call(name):
    written = call_text(name, {"city": "Porto"})
    assert written.startswith(CALL_OPEN + call_head(name)) and call_head(name).endswith(f'{name}"')
