"""Packed (padding-free) batches: same examples, same per-example losses, no attention across examples."""
import pytest
import torch
import torch.nn.functional as F

from trainer.backbones import tiny_llama
from trainer.data.tokenize import (
    IGNORE_INDEX,
    batch_tokens,
    batches_for_epoch,
    collate,
    pack,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(tiny_llama(str(tmp_path_factory.mktemp("cache"))))
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def dataset(backbone):
    _, tokenizer = backbone
    examples = [{"messages": [{"role": "user", "content": "The quick brown fox " * (i % 4 + 1)},
                              {"role": "assistant", "content": "jumps over the lazy dog" + "." * i}]} for i in range(10)]
    examples.append({"prompt": "", "completion": "x"})  # first token supervised: must be cut at the boundary
    chat = tokenize_examples(list(enumerate(examples[:-1])), tokenizer, chat=True, max_length=200)
    plain = tokenize_examples([(11, examples[-1])], tokenizer, chat=False, max_length=200)
    assert plain.examples[0].labels[0] != IGNORE_INDEX
    chat.examples += plain.examples
    return chat


def token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token loss (0 where unsupervised) and the shifted labels, as train.py computes them."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return loss, labels


def per_example_losses_padded(model, examples, pad_token_id) -> list[float]:
    loss, labels = token_losses(model, collate(examples, pad_token_id))
    return [(loss[row].sum() / (labels[row] != IGNORE_INDEX).sum()).item() for row in range(len(examples))]


def per_example_losses_packed(model, examples, batch) -> list[float]:
    loss, labels = token_losses(model, batch)
    out, start = [], 0
    for example in examples:  # position p of the row predicts label p + 1: example spans [start, start + n - 1)
        n = len(example.input_ids)
        span = slice(start, start + n - 1)
        out.append((loss[0, span].sum() / (labels[0, span] != IGNORE_INDEX).sum()).item())
        start += n
    return out


def test_pack_lays_examples_end_to_end_with_positions_restarting(dataset):
    examples = dataset.examples[:4]
    batch = pack(examples)
    lengths = [len(e.input_ids) for e in examples]
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["attention_mask"].shape == (1, 1, sum(lengths), sum(lengths))
    assert batch["input_ids"].shape == (1, sum(lengths)) and batch_tokens(batch) == sum(lengths)
    assert batch["input_ids"][0].tolist() == [t for e in examples for t in e.input_ids]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] == starts


def test_no_example_is_trained_across_a_boundary(dataset):
    batch = pack(dataset.examples[-3:])  # ends with the prompt-less completion, whose first token is supervised
    labels = batch["labels"][0].tolist()
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    # Everything else is the examples' own labels: packing supervises exactly what padding does.
    padded = collate(dataset.examples[-3:], pad_token_id=0)
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum() == sum(
        (padded["labels"][row, 1:] != IGNORE_INDEX).sum() for row in range(3))


def test_packed_per_example_losses_equal_padded(backbone, dataset):
    model, tokenizer = backbone
    examples = dataset.examples[:-1]
    with torch.no_grad():
        padded = per_example_losses_padded(model, examples, tokenizer.pad_token_id)
        packed = per_example_losses_packed(model, examples, pack(examples))
        # Sensitivity check: the same row with a plain causal mask (examples see each other) differs.
        leaky = pack(examples)
        leaky["attention_mask"] = torch.ones_like(leaky["input_ids"])  # 2D: plain causal over the whole row
        leaky_losses = per_example_losses_packed(model, examples, leaky)
    assert packed == pytest.approx(padded, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(leaky_losses[1:], padded[1:])) > 1e-3


def test_packed_gradients_equal_padded(backbone, dataset):
    model, tokenizer = backbone
    model.train()  # training mode builds a KV cache unless told not to: the explicit mask must hold anyway
    examples = dataset.examples[:5]
    grads = []
    for batch in (collate(examples, tokenizer.pad_token_id), pack(examples)):
        model.zero_grad()
        loss, labels = token_losses(model, batch)
        (loss.sum() / (labels != IGNORE_INDEX).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    model.eval()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_batches_for_epoch_packs_the_same_examples_as_padding(dataset):
    padded = list(batches_for_epoch(dataset, 4, seed=1, epoch=2, pad_token_id=0))
    packed = list(batches_for_epoch(dataset, 4, seed=1, epoch=2, pad_token_id=0, packing=True))
    assert len(padded) == len(packed)
    for a, b in zip(padded, packed):
        assert b["input_ids"][0].tolist() == [t for row, mask in zip(a["input_ids"], a["attention_mask"])
                                              for t, m in zip(row.tolist(), mask.tolist()) if m]
        assert batch_tokens(a) == batch_tokens(b)
        assert (a["labels"][:, 1:] != IGNORE_INDEX).sum() == (b["labels"][:, 1:] != IGNORE_INDEX).sum()
