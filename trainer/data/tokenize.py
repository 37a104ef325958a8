"""Examples to tensors: render with the backbone's template, mask the loss, pad per batch.

Chat examples are rendered with the backbone's chat template, cut at the assistant turns: the
conversation up to each reply (with the generation prompt), then up to the end of the reply; each
rendering must extend the previous one (true of ChatML and the common templates). Labels are
the token ids of assistant replies whose ``weight`` is not 0 (their function calls included) and
-100 everywhere else. Examples that declare functions or carry calls render as
`trainer.data.tools` describes: natively when the template handles tools, else the fallback.
Prompt/completion examples are trained on the completion and the end-of-sequence token only.

A batch is either padded (one row per example, padded to the longest) or packed (the batch's
examples laid end to end in rows of at most ``row_length`` tokens, ``position_ids`` restarting at
0 for each and a block-diagonal causal mask), so examples never attend to each other and
per-example losses equal the padded batch's. Several continuations of one prompt (a preference
pair's two outputs, reinforcement's sampled replies) can share a row with the prompt computed once
(`shared_prompt_rows`). Every batch carries ``row_tokens``, its real
(non-padding) tokens per row; `model_inputs` is what the model's forward takes from it.
"""
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from trainer.data.tools import (
    declared_tools,
    fallback_messages,
    needs_tool_rendering,
    template_messages,
    template_supports_tools,
)

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render conversations as a growing prefix."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizedDataset:
    examples: list[TokenizedExample]
    n_truncated: int = 0  # examples cut to max_length
    n_dropped: int = 0  # examples with no supervised token left after truncation
    dropped_lines: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def n_supervised(self) -> int:
        return sum(e.n_supervised for e in self.examples)


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                    tools: Optional[list] = None) -> str:
    """The conversation as the backbone's chat template renders it ("" for no messages).

    `tools` (a `tools` list, see `trainer.data.tools.as_tools`) and messages with calls or results are
    rendered natively when the template supports tools, else with the documented fallback."""
    if not messages:
        return ""
    if needs_tool_rendering(messages, tools):
        if template_supports_tools(tokenizer):
            return tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        messages = fallback_messages(messages, tools)
    plain = [{"role": m["role"], "content": m.get("content") or ""} | ({"name": m["name"]} if "name" in m else {}) for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokens_extending(tokenizer, previous: str, current: str) -> list[int]:
    """Token ids of what `current` adds to `previous` (it must start with `previous`)."""
    if not current.startswith(previous):
        raise TemplateError(
            "the backbone's chat template does not render each conversation as a prefix of the next, "
            "so loss masks cannot be built; set backbone.chat_template to a prefix-stable template (e.g. ChatML)"
        )
    return tokenizer(current[len(previous):], add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages: list[dict], tools: Optional[list] = None,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, rendered in pieces cut at the assistant turns.

    Labels are the ids of assistant replies whose weight is not 0, -100 elsewhere. With
    `add_generation_prompt` the ids end with the header of the reply to generate: exactly the ids
    training had before that reply, which is how inference encodes prompts."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def extend(text: str, trained: bool) -> None:
        nonlocal rendered
        ids = tokens_extending(tokenizer, rendered, text)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        rendered = text

    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(render_messages(tokenizer, messages[:index], add_generation_prompt=True, tools=tools), False)
            extend(render_messages(tokenizer, messages[: index + 1], tools=tools), message.get("weight", 1) != 0)
    if add_generation_prompt:
        extend(render_messages(tokenizer, messages, add_generation_prompt=True, tools=tools), False)
    elif messages and messages[-1]["role"] != "assistant":
        extend(render_messages(tokenizer, messages, tools=tools), False)
    return input_ids, labels


def encode_chat(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels for a chat example (its declared functions included); only trained assistant
    replies carry labels."""
    return encode_conversation(tokenizer, example["messages"], declared_tools(example))


def encode_prompt_completion(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels for a prompt/completion example: loss on the completion and EOS."""
    prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def tokenize_examples(examples: list[tuple[int, dict]], tokenizer, chat: bool, max_length: int) -> TokenizedDataset:
    """Tokenize (line, example) pairs, truncating each to `max_length` tokens and counting what was cut."""
    encode = encode_chat if chat else encode_prompt_completion
    dataset = TokenizedDataset(examples=[])
    for line, example in examples:
        input_ids, labels = encode(example, tokenizer)
        truncated = len(input_ids) > max_length
        if truncated:
            dataset.n_truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dataset.n_dropped += 1
            dataset.dropped_lines.append(line)
            continue
        dataset.examples.append(TokenizedExample(input_ids, labels, truncated))
    return dataset


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar length, so dynamic padding wastes little.

    Shuffles the indices, sorts them by length inside mega-batches of `batch_size * 16`, cuts
    batches and shuffles the batch order: random across epochs, deterministic for a seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        indices = list(range(len(self.lengths)))
        rng.shuffle(indices)
        mega = self.batch_size * 16
        batches = []
        for start in range(0, len(indices), mega):
            group = sorted(indices[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.lengths)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch (the loss is computed from the labels outside it)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (right padding, labels -100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "row_tokens": attention_mask.sum(1)}


def fill_rows(lengths: list[int], row_length: int | None) -> list[list[int]]:
    """Example indices grouped into rows of at most `row_length` tokens, first fit, longest first
    (all in one row when `row_length` is None). An example longer than a row gets a row of its own."""
    if row_length is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        free = next((r for r, left in enumerate(room) if lengths[index] <= left), None)
        if free is None:
            rows.append([index])
            room.append(row_length - lengths[index])
        else:
            rows[free].append(index)
            room[free] -= lengths[index]
    return rows


def pack(examples: list[TokenizedExample], pad_token_id: int = 0, row_length: int | None = None) -> dict[str, torch.Tensor]:
    """Lay a batch end to end in rows of at most `row_length` tokens (one row when None): ``position_ids``
    restart per example and ``attention_mask`` is a 4D block-diagonal causal mask, so no example
    attends to another. Rows are right-padded to the longest; the padding is a block of its own.

    Capping rows at the longest an example may be keeps attention (quadratic in the row) and the
    mask as small as padded batches', and gives micro-batching rows to split. The mask is explicit
    because transformers only infers the blocks from ``position_ids`` when there is no mask *and*
    no KV cache. The label at each example's first position is -100, so the shifted loss never
    trains an example's first token to follow the previous example's last one.
    """
    rows = fill_rows([len(e.input_ids) for e in examples], row_length)
    row_tokens = torch.tensor([sum(len(examples[i].input_ids) for i in row) for row in rows])
    shape = (len(rows), int(row_tokens.max()))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)  # which example of the row each position belongs to
    for r, row in enumerate(rows):
        start = 0
        for block, index in enumerate(row):
            example, n = examples[index], len(examples[index].input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start + 1 : start + n] = torch.tensor(example.labels[1:])  # never supervised unpacked either
            position_ids[r, start : start + n] = torch.arange(n)
            owner[r, start : start + n] = block
            start += n
        position_ids[r, start:] = torch.arange(shape[1] - start)
    causal = torch.ones(shape[1], shape[1], dtype=torch.bool).tril_()
    same_example = owner[:, :, None] == owner[:, None, :]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": (same_example & causal)[:, None], "row_tokens": row_tokens}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a padded or packed batch."""
    return int(batch["row_tokens"].sum())


def batches_for_epoch(dataset: TokenizedDataset, batch_size: int, seed: int, epoch: int, pad_token_id: int,
                      packing: bool = False, shard: tuple[int, int] = (0, 1), row_length: int | None = None):
    """The epoch's batches, length-grouped and shuffled for (seed, epoch): padded tensors, or with
    `packing` the same examples packed into rows of at most `row_length` tokens (see `pack`)."""
    sampler = LengthGroupedSampler([len(e.input_ids) for e in dataset.examples], batch_size, seed)
    sampler.set_epoch(epoch)
    for indices in sampler.batches():
        # With several ranks, each takes every world_size-th example of the same global batch.
        rank, world_size = shard
        examples = [dataset.examples[i] for i in indices[rank::world_size]]
        if not examples:  # a last batch smaller than the number of ranks: a step that trains nothing here
            first = dataset.examples[indices[0]]
            examples = [TokenizedExample(first.input_ids, [IGNORE_INDEX] * len(first.labels))]
        yield pack(examples, pad_token_id, row_length) if packing else collate(examples, pad_token_id)


def shared_prompt_rows(pieces: list[tuple[list[int], list[list[int]]]], pad_token_id: int) -> dict:
    """One training row for each prompt and its replies, the prompt computed once.

    A row holds the prompt less its last token, then each reply as a block that starts again from the prompt's last
    token (whose output predicts the reply's first token, a different target in each block): positions continue
    from the prompt in every block, and a block attends to the shared prompt and to itself, causally, through a 4D
    mask (as packed rows do). G replies of R tokens to a prompt of P tokens cost P + G·(R + 1) positions instead of
    G·(P + R). `reply_of` names the reply of each label (-1: none); rows are right-padded, padding a block of its own.
    """
    rows, reply = [], 0
    for prompt, completions in pieces:
        shared = len(prompt) - 1
        ids, positions, labels = list(prompt[:-1]), list(range(shared)), [IGNORE_INDEX] * shared
        blocks, reply_of = [0] * shared, [-1] * shared
        for number, completion in enumerate(completions, 1):
            ids += [prompt[-1], *completion]
            positions += range(shared, shared + 1 + len(completion))
            labels += [IGNORE_INDEX, *completion]
            blocks += [number] * (1 + len(completion))
            reply_of += [-1] + [reply] * len(completion)
            reply += 1
        rows.append((ids, positions, labels, blocks, reply_of))
    width = max(len(row[0]) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)  # padding counts up from 0: a span of its own
    blocks = torch.full(shape, -1, dtype=torch.long)
    reply_of = torch.full(shape, -1, dtype=torch.long)
    for r, (ids, positions, row_labels, row_blocks, row_replies) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n], labels[r, :n] = torch.tensor(ids), torch.tensor(row_labels)
        position_ids[r, :n] = torch.tensor(positions)
        position_ids[r, n:] = torch.arange(width - n)
        blocks[r, :n], reply_of[r, :n] = torch.tensor(row_blocks), torch.tensor(row_replies)
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    query, key = blocks[:, :, None], blocks[:, None, :]
    mask = causal & ((query == key) | ((key == 0) & (query >= 0)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask[:, None],
            "reply_of": reply_of, "row_tokens": torch.tensor([len(row[0]) for row in rows])}
