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
    fill_rows,
    model_inputs,
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
    logits = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return loss, labels


def per_example_losses_padded(model, examples, pad_token_id) -> list[float]:
    loss, labels = token_losses(model, collate(examples, pad_token_id))
    return [(loss[row].sum() / (labels[row] != IGNORE_INDEX).sum()).item() for row in range(len(examples))]


def per_example_losses_packed(model, examples, batch) -> list[float]:
    """Each example's mean loss, found in the packed rows by its token ids."""
    loss, labels = token_losses(model, batch)
    found = {}
    for r, row_positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(row_positions) if p == 0] + [len(row_positions)]
        for start, end in zip(starts, starts[1:]):
            # position p of the row predicts label p + 1: the example's losses are [start, end - 1)
            span = slice(start, end - 1)
            if (labels[r, span] != IGNORE_INDEX).any():
                found[tuple(batch["input_ids"][r, start:end].tolist())] = (
                    loss[r, span].sum() / (labels[r, span] != IGNORE_INDEX).sum()).item()
    return [found[tuple(e.input_ids)] for e in examples]


def test_pack_lays_examples_end_to_end_with_positions_restarting(dataset):
    examples = dataset.examples[:4]
    batch = pack(examples)
    lengths = [len(e.input_ids) for e in examples]
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask", "row_tokens"}
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


@pytest.mark.parametrize("row_length", [None, 40])
def test_packed_per_example_losses_equal_padded(backbone, dataset, row_length):
    model, tokenizer = backbone
    examples = dataset.examples[:-1]
    with torch.no_grad():
        padded = per_example_losses_padded(model, examples, tokenizer.pad_token_id)
        packed = per_example_losses_packed(model, examples, pack(examples, tokenizer.pad_token_id, row_length))
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
    for batch in (collate(examples, tokenizer.pad_token_id), pack(examples), pack(examples, 7, row_length=40)):
        model.zero_grad()
        loss, labels = token_losses(model, batch)
        (loss.sum() / (labels != IGNORE_INDEX).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    model.eval()
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and torch.allclose(grads[0], grads[2], atol=1e-5)


def sequences(batch) -> list[tuple[int, ...]]:
    """The examples' token ids in a batch, wherever they sit (padding left out)."""
    out = []
    for r, (ids, n) in enumerate(zip(batch["input_ids"].tolist(), batch["row_tokens"].tolist())):
        positions = batch["position_ids"][r, :n].tolist() if "position_ids" in batch else [0] + [1] * (n - 1)
        starts = [i for i, p in enumerate(positions) if p == 0] + [n]
        out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]
    return sorted(out)


def test_rows_are_capped_filled_first_fit_and_padding_is_its_own_block(dataset):
    assert fill_rows([5, 9, 3, 4, 12], row_length=12) == [[4], [1, 2], [0, 3]]
    assert fill_rows([5, 9, 3], row_length=None) == [[0, 1, 2]]
    examples = dataset.examples[:6]
    lengths = [len(e.input_ids) for e in examples]
    batch = pack(examples, pad_token_id=7, row_length=max(lengths) + 5)
    rows, width = batch["input_ids"].shape
    assert rows > 1 and width <= max(lengths) + 5 and batch["attention_mask"].shape == (rows, 1, width, width)
    assert batch_tokens(batch) == sum(lengths) and sequences(batch) == sorted(tuple(e.input_ids) for e in examples)
    mask = batch["attention_mask"][:, 0]
    for r in range(rows):
        n = int(batch["row_tokens"][r])
        assert (batch["input_ids"][r, n:] == 7).all() and (batch["labels"][r, n:] == IGNORE_INDEX).all()
        assert not mask[r, n:, :n].any() and not mask[r, :n, n:].any()  # padding and examples never meet
        assert mask[r].diagonal().all()  # every position sees itself: no fully masked row, no NaN


@pytest.mark.parametrize("row_length", [None, 40])
def test_batches_for_epoch_packs_the_same_examples_as_padding(dataset, row_length):
    padded = list(batches_for_epoch(dataset, 4, seed=1, epoch=2, pad_token_id=0))
    packed = list(batches_for_epoch(dataset, 4, seed=1, epoch=2, pad_token_id=0, packing=True, row_length=row_length))
    assert len(padded) == len(packed)
    for a, b in zip(padded, packed):
        assert sequences(a) == sequences(b) and batch_tokens(a) == batch_tokens(b)
        assert (a["labels"][:, 1:] != IGNORE_INDEX).sum() == (b["labels"][:, 1:] != IGNORE_INDEX).sum()
        if row_length is None:
            assert b["input_ids"].size(0) == 1
        else:  # a row holds up to row_length tokens, or one example that is longer on its own
            assert b["input_ids"].size(1) <= max(row_length, a["input_ids"].size(1))
