"""Preference pairs to tensors: one input, a preferred and a non-preferred output, trained together.

A pair is tokenized as the chat template renders it: the input with the generation prompt (the
prompt), then each output as the assistant turn that follows it, so the prompt's ids are an exact
prefix of both conversations (`encode_conversation` builds them piece by piece). Only output
tokens are labelled. A pair longer than `max_length` keeps its prompt and has its outputs cut; a
pair whose prompt alone fills `max_length` is dropped.

A batch of k pairs holds 2k sequences, prompt + preferred at 2i and prompt + non-preferred at
2i + 1, padded or packed exactly as supervised examples are (`trainer.data.tokenize`), so a pair's
two outputs go through the same forward pass. Or, with ``shared_prompt_width``, one row a pair: the
prompt once, then each output attending to it and to itself (`shared_prompt_rows`), which spares
the prompt's second copy. ``sequence_index`` says which of the 2k sequences each labelled position
belongs to (-1 elsewhere); ``pair_index`` which pairs of the file the batch holds.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from trainer.data.tokenize import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    TokenizedExample,
    collate,
    encode_conversation,
    fill_rows,
    pack,
    shared_prompt_rows,
)
from trainer.data.tools import declared_tools

OUTPUT_KEYS = ("preferred_output", "non_preferred_output")


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the preferred output, with its end-of-turn tokens
    rejected_ids: list[int]  # the non-preferred output
    truncated: bool = False

    def sequences(self) -> list[TokenizedExample]:
        """prompt + preferred, prompt + non-preferred: labels on the outputs only."""
        masked = [IGNORE_INDEX] * len(self.prompt_ids)
        return [TokenizedExample(self.prompt_ids + output, masked + output, self.truncated)
                for output in (self.chosen_ids, self.rejected_ids)]


@dataclass
class PairDataset:
    pairs: list[TokenizedPair]
    n_truncated: int = 0  # pairs whose outputs were cut to max_length
    n_dropped: int = 0  # pairs whose prompt alone fills max_length
    dropped_lines: list[int] = field(default_factory=list)
    reference: Optional[torch.Tensor] = None  # (pairs, 2) fp32: the reference model's log-probs of both outputs
    cache_entry: Optional[str] = None  # the tokenization cache's entry, beside which the reference is kept

    @property
    def examples(self) -> list[TokenizedPair]:  # what a training stage counts and batches, whatever the method
        return self.pairs

    @property
    def n_tokens(self) -> int:
        return sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in self.pairs)

    @property
    def n_supervised(self) -> int:
        return sum(len(p.chosen_ids) + len(p.rejected_ids) for p in self.pairs)


def encode_pair(example: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, preferred output ids, non-preferred output ids) of a preference line."""
    messages, tools = example["input"]["messages"], declared_tools(example["input"])
    prompt_ids, _ = encode_conversation(tokenizer, messages, tools, add_generation_prompt=True)
    outputs = []
    for key in OUTPUT_KEYS:
        ids, _ = encode_conversation(tokenizer, messages + example[key], tools)
        outputs.append(ids[len(prompt_ids):])  # built piece by piece: the prompt's ids are the prefix
    return prompt_ids, outputs[0], outputs[1]


def tokenize_pairs(examples: list[tuple[int, dict]], tokenizer, max_length: int) -> PairDataset:
    """Tokenize (line, example) preference lines, cutting outputs so prompt + output fits `max_length`."""
    dataset = PairDataset(pairs=[])
    for line, example in examples:
        prompt_ids, chosen_ids, rejected_ids = encode_pair(example, tokenizer)
        room = max_length - len(prompt_ids)
        if room <= 0:
            dataset.n_dropped += 1
            dataset.dropped_lines.append(line)
            continue
        truncated = max(len(chosen_ids), len(rejected_ids)) > room
        dataset.n_truncated += truncated
        dataset.pairs.append(TokenizedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated))
    return dataset


def sequence_layout(lengths: list[int], row_length: Optional[int], packing: bool) -> torch.Tensor:
    """Which sequence each position of the batch `pack` (or `collate`) makes from sequences of `lengths`
    belongs to, -1 on padding: the same rows, in the same order."""
    rows = fill_rows(lengths, row_length) if packing else [[i] for i in range(len(lengths))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    layout = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            layout[r, start : start + lengths[index]] = index
            start += lengths[index]
    return layout


def pair_batch(dataset: PairDataset, indices: list[int], pad_token_id: int, packing: bool,
               row_length: Optional[int], weight: float = 1.0,
               shared_prompt_width: Optional[float] = None) -> dict[str, torch.Tensor]:
    """The batch of the pairs at `indices`: their 2k sequences, padded or packed, and what the loss needs; with
    `shared_prompt_width`, one row a pair with its prompt once, when every such row fits that many tokens."""
    pairs = [dataset.pairs[i] for i in indices]
    width = max(len(p.prompt_ids) + 1 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    if shared_prompt_width is not None and width <= shared_prompt_width:
        batch = shared_prompt_rows([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], pad_token_id)
        batch["sequence_index"] = batch.pop("reply_of")  # reply 2i is pair i's preferred output, 2i + 1 the other
    else:
        sequences = [sequence for p in pairs for sequence in p.sequences()]
        batch = pack(sequences, pad_token_id, row_length) if packing else collate(sequences, pad_token_id)
        batch["sequence_index"] = sequence_layout([len(s.input_ids) for s in sequences], row_length, packing)
    batch["pair_index"] = torch.tensor(indices)
    batch["output_tokens"] = torch.tensor([[len(dataset.pairs[i].chosen_ids), len(dataset.pairs[i].rejected_ids)]
                                           for i in indices], dtype=torch.float32)
    batch["pair_weight"] = torch.full((len(indices),), weight)
    if dataset.reference is not None:
        batch["reference"] = dataset.reference[indices]
    return batch


def pair_batches(dataset: PairDataset, batch_size: int, seed: int, epoch: int, pad_token_id: int,
                 packing: bool = False, shard: tuple[int, int] = (0, 1), row_length: Optional[int] = None,
                 shuffle: bool = True, shared_prompt_width: Optional[float] = None):
    """The epoch's batches of `batch_size` pairs: length-grouped and shuffled for (seed, epoch) as supervised
    batches are, or in file order without `shuffle` (the reference pass); laid out as `pair_batch` does."""
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in dataset.pairs]
    if shuffle:
        sampler = LengthGroupedSampler(lengths, batch_size, seed)
        sampler.set_epoch(epoch)
        batches = sampler.batches()
    else:
        batches = [list(range(start, min(start + batch_size, len(lengths))))
                   for start in range(0, len(lengths), batch_size)]
    rank, world_size = shard
    for indices in batches:
        mine = indices[rank::world_size]
        if mine:
            yield pair_batch(dataset, mine, pad_token_id, packing, row_length,
                             shared_prompt_width=shared_prompt_width)
        else:  # a last batch smaller than the number of ranks: a step that trains nothing here
            yield pair_batch(dataset, indices[:1], pad_token_id, packing, row_length, weight=0.0,
                             shared_prompt_width=shared_prompt_width)
