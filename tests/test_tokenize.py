"""Loss masks, truncation, padding, length-grouped batches and the tokenization cache."""
import copy
import json

import pytest

from tests.conftest import chat_example, write_jsonl
from trainer.backbones import tiny_llama
from trainer.data.cache import tokenize_file
from trainer.data.tokenize import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    collate,
    encode_chat,
    encode_prompt_completion,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama(str(tmp_path_factory.mktemp("cache")))))


def supervised_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_chat_loss_covers_only_assistant_replies(tokenizer):
    example = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                            {"role": "assistant", "content": "Paris"}]}
    ids, labels = encode_chat(example, tokenizer)
    assert len(ids) == len(labels)
    assert supervised_text(tokenizer, ids, labels) == "Paris<|im_end|>\n"
    # The concatenated segments are exactly the full rendering.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(example["messages"], tokenize=False)


def test_weight_zero_assistant_message_is_not_trained(tokenizer):
    example = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there", "weight": 0},
                            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao", "weight": 1}]}
    ids, labels = encode_chat(example, tokenizer)
    assert supervised_text(tokenizer, ids, labels) == "Ciao<|im_end|>\n"
    example["messages"][1]["weight"] = 1
    ids, labels = encode_chat(example, tokenizer)
    assert supervised_text(tokenizer, ids, labels) == "Hello there<|im_end|>\nCiao<|im_end|>\n"


def test_prompt_completion_trains_completion_and_eos(tokenizer):
    ids, labels = encode_prompt_completion({"prompt": "Ticket: refund please\n\n###\n\n", "completion": " billing\n"},
                                           tokenizer)
    assert supervised_text(tokenizer, ids, labels) == " billing\n<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 50}]}
    dataset = tokenize_examples([(1, long), (2, short)], tokenizer, chat=True, max_length=40)
    assert dataset.n_truncated == 2
    assert dataset.n_dropped == 1 and dataset.dropped_lines == [1]  # its reply was cut off entirely
    assert all(len(e.input_ids) == 40 for e in dataset.examples)


def test_collate_pads_right_and_masks_padding(tokenizer):
    dataset = tokenize_examples([(1, {"prompt": "a", "completion": " b"}), (2, {"prompt": "a longer prompt", "completion": " c"})],
                                tokenizer, chat=False, max_length=100)
    batch = collate(dataset.examples, pad_token_id=tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in dataset.examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_length_grouped_sampler_is_a_deterministic_permutation_of_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == LengthGroupedSampler(lengths, batch_size=8, seed=3).batches()
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_order = [list(range(200))[i:i + 8] for i in range(0, 200, 8)]
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_order)
    assert padded < 0.75 * padded_random


def tokenize_twice(path, tokenizer, cache, max_length=64):
    first, first_cached = tokenize_file(path, tokenizer, True, max_length, cache)
    second, second_cached = tokenize_file(path, tokenizer, True, max_length, cache)
    return first, first_cached, second, second_cached


@pytest.fixture
def chat_file(tmp_path):
    long_question = "word " * 40  # truncated at 64 tokens, leaving no assistant token: dropped
    return write_jsonl(tmp_path / "train.jsonl", [chat_example("Capital of France?", "Paris"),
                                                  chat_example("And of Spain?", "Madrid, of course " * 3),
                                                  chat_example(long_question, "ok")])


def test_a_file_is_tokenized_once_and_read_back_identical(tokenizer, chat_file, tmp_path):
    first, first_cached, second, second_cached = tokenize_twice(chat_file, tokenizer, tmp_path / "cache")
    assert (first_cached, second_cached) == (False, True)
    assert second == first and first.n_truncated == 2 and first.dropped_lines == [3]
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.pt"))) == 1


def test_the_cache_misses_when_the_file_tokenizer_or_length_changes(tokenizer, chat_file, tmp_path):
    cache = tmp_path / "cache"
    tokenize_file(chat_file, tokenizer, True, 64, cache)
    assert tokenize_file(chat_file, tokenizer, True, 65, cache)[1] is False
    with open(chat_file, "a") as handle:
        handle.write(json.dumps(chat_example("One more?", "Yes")) + "\n")
    changed, cached = tokenize_file(chat_file, tokenizer, True, 64, cache)
    assert cached is False and len(changed.examples) == 3
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenize_file(chat_file, templated, True, 64, cache)[1] is False


def test_a_broken_cache_entry_is_rebuilt_and_no_cache_writes_nothing(tokenizer, chat_file, tmp_path):
    cache = tmp_path / "cache"
    expected, _ = tokenize_file(chat_file, tokenizer, True, 64, cache)
    (entry,) = (cache / "tokenized").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:50])
    assert tokenize_file(chat_file, tokenizer, True, 64, cache) == (expected, False)
    assert tokenize_file(chat_file, tokenizer, True, 64, cache) == (expected, True)
    assert tokenize_file(chat_file, tokenizer, True, 64, None) == (expected, False)
