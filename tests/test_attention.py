"""Packed rows on a CPU: attention as matmuls (short rows) or one example at a time (long rows) gives
what SDPA with the block mask gives, in loss and gradients; padded batches go to SDPA unchanged."""
import copy

import pytest
import torch

import trainer.attention
import trainer.loss
from trainer.attention import PACKED_ROWS, example_spans
from trainer.backbones import tiny_llama
from trainer.data.tokenize import collate, pack, tokenize_examples
from trainer.loss import supervised_forward


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny Llama twice: with transformers' SDPA, and with ftlab's packed-rows attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(tiny_llama(str(tmp_path_factory.mktemp("cache"))))
    sdpa = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    packed = copy.deepcopy(sdpa)
    packed.set_attn_implementation(PACKED_ROWS)
    return sdpa, packed, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def examples(models):
    tokenizer = models[2]
    rows = [{"messages": [{"role": "user", "content": "The quick brown fox " * (i % 4 + 1)},
                          {"role": "assistant", "content": "jumps over the lazy dog" + "." * i}]} for i in range(7)]
    return tokenize_examples(list(enumerate(rows)), tokenizer, chat=True, max_length=200).examples


def test_example_spans_are_the_examples_and_the_padding():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]])  # row 1 ends in 3 tokens of padding
    assert example_spans(position_ids) == [(0, 0, 3), (0, 3, 5), (0, 5, 7), (1, 0, 4), (1, 4, 7)]


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss, n, correct = supervised_forward(model, batch)
    loss.backward()
    return loss.detach(), correct, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("short_row", [512, 0], ids=["matmuls", "per-example-sdpa"])
def test_packed_rows_attention_equals_sdpa_with_the_block_mask(models, examples, monkeypatch, short_row):
    sdpa, packed, tokenizer = models
    monkeypatch.setattr(trainer.attention, "SHORT_ROW", short_row)
    used = []  # which path computed each layer's attention
    for name in ("masked_matmul_attention", "sdpa_attention_forward"):
        original = getattr(trainer.attention, name)
        monkeypatch.setattr(trainer.attention, name,
                            lambda *a, _name=name, _original=original, **k: used.append(_name) or _original(*a, **k))
    batch = pack(examples, tokenizer.pad_token_id, row_length=60)  # several rows, some right-padded
    assert batch["input_ids"].shape[0] > 1 and (batch["row_tokens"] < batch["input_ids"].shape[1]).any()
    reference, ours = loss_and_gradients(sdpa, batch), loss_and_gradients(packed, batch)
    n_spans = len(example_spans(batch["position_ids"]))
    assert used == (["masked_matmul_attention"] * 2 if short_row else ["sdpa_attention_forward"] * 2 * n_spans)
    torch.testing.assert_close(ours[0], reference[0])
    assert ours[1] == reference[1]
    for got, expected in zip(ours[2], reference[2]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Sensitivity: spans that join two examples change the loss.
    joined = [(row, start, end) for row, start, end in example_spans(batch["position_ids"])]
    joined[0:2] = [(joined[0][0], joined[0][1], joined[1][2])]
    monkeypatch.setattr(trainer.loss, "example_spans", lambda position_ids: joined)
    if short_row == 0:
        with torch.no_grad():
            assert not torch.allclose(supervised_forward(packed, batch)[0], reference[0])


def test_padded_batches_and_generation_go_to_sdpa(models, examples):
    sdpa, packed, tokenizer = models
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(supervised_forward(packed, batch)[0], supervised_forward(sdpa, batch)[0])
    prompt = torch.tensor([examples[0].input_ids[:10]])
    assert (packed.generate(prompt, max_new_tokens=5, do_sample=False).tolist()
            == sdpa.generate(prompt, max_new_tokens=5, do_sample=False).tolist())
