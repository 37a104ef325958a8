"""The running batch's KV cache: one slot per row, each row at its own length.

Per layer, keys and values live in one buffer `[slots, kv_heads, capacity, head_dim]`, and row
i of the batch is slot i. A row's tokens sit at positions 0…length-1 of its slot, with their
true positions, so a row never sees padding or another row's tokens:

- an extension writes several tokens of each new row into its slot (prompts, left-padded to one
  width, or what follows a prefix copied from a row that shares it), and `copy_slot` gives a
  prompt's other choices, or the next prompt with the same prefix, the same KV;
- a decoding step writes every row's new token at that row's own length, in one indexed write
  per layer, and attends over the slots up to the longest row, masked per row
  (`decode_mask`);
- a finished row leaves by `copy_slot` from the last row into its slot, so the live rows stay
  slots 0…B-1 and attention reads a view, never a gather.

`scripts/bench_engine.py --layouts` measures this layout against transformers' DynamicCache on
a left-padded batch (what `generate` uses), which copies the whole cache at every step to append.
The transformers model calls `update` once per layer per forward; nothing else of transformers'
`Cache` API is needed when the attention mask is given as a 4-D mask, as the engine gives it.
"""
from typing import Optional

import torch

GROWTH_ROUNDING = 64  # capacity grows in multiples of this many positions, at least doubling


class SlotCache:
    """Keys and values of up to `max_rows` rows (see the module); buffers are made at the first forward."""

    is_compileable = False

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.spare = max_rows  # one more slot, for rows trading places
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0  # positions per slot
        self._extend: Optional[tuple] = None  # (slots, starts, lengths, span) of the rows being extended
        self._decode: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None  # (rows, positions, span)

    # ---- what the next forward does ------------------------------------------------------
    def prepare_extend(self, slots: list[int], starts: list[int], lengths: list[int]) -> int:
        """The next forward extends rows by several tokens (a prompt, or the rest of one after a shared prefix):
        row j's last `lengths[j]` columns (left-padded) go to slot `slots[j]` from position `starts[j]` on, and
        it attends over its slot. Returns the attention span (the longest row after the write)."""
        span = max(start + length for start, length in zip(starts, lengths))
        self.reserve(span)
        self._extend, self._decode = (slots, starts, lengths, span), None
        return span

    def prepare_decode(self, positions: torch.Tensor) -> int:
        """The next forward runs one token per row 0…B-1, each written at `positions[i]` (its length so far);
        returns the attention span (the longest row after the write)."""
        span = int(positions.max()) + 1
        self.reserve(span)
        rows = torch.arange(len(positions), device=positions.device)
        self._decode, self._extend = (rows, positions, span), None
        return span

    # ---- transformers' Cache interface -----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this forward's keys and values of layer `layer_idx`; return what its attention reads."""
        if layer_idx == len(self.keys):  # the first forward allocates, layer by layer
            shape = (self.max_rows + 1, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._extend is not None:
            slots, starts, lengths, span = self._extend
            width = key_states.shape[2]
            for row, (slot, start, length) in enumerate(zip(slots, starts, lengths)):
                keys[slot, :, start:start + length] = key_states[row, :, width - length:]
                values[slot, :, start:start + length] = value_states[row, :, width - length:]
            if slots == list(range(slots[0], slots[0] + len(slots))):
                return keys[slots[0]:slots[0] + len(slots), :, :span], values[slots[0]:slots[0] + len(slots), :, :span]
            index = torch.tensor(slots, device=keys.device)
            return keys[:, :, :span].index_select(0, index), values[:, :, :span].index_select(0, index)
        rows, positions, span = self._decode
        keys[rows, :, positions] = key_states[:, :, 0]
        values[rows, :, positions] = value_states[:, :, 0]
        return keys[: len(rows), :, :span], values[: len(rows), :, :span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._decode[2] if self._decode is not None else 0

    # ---- slots -------------------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Room for `length` positions per slot, growing the buffers (at least doubling) when needed."""
        if length <= self.capacity:
            return
        grown = max(length, 2 * self.capacity)
        grown = -(-grown // GROWTH_ROUNDING) * GROWTH_ROUNDING
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                new = old.new_zeros((*old.shape[:2], grown, old.shape[3]))
                new[:, :, : self.capacity] = old
                buffers[layer] = new
        self.capacity = grown

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Slot `target` gets the first `length` positions of slot `source` (every layer)."""
        if source == target or length == 0:
            return
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]

    def clear(self) -> None:
        """Free the buffers (an idle engine holds no cache memory)."""
        self.keys, self.values, self.capacity = [], [], 0
        self._extend = self._decode = None


def decode_mask(positions: torch.Tensor, span: int) -> torch.Tensor:
    """The 4-D attention mask of a decoding step: row i attends to its slot's positions 0…positions[i]."""
    return (torch.arange(span, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]


def extend_positions(starts: list[int], lengths: list[int], width: int, device) -> torch.Tensor:
    """The position of every column of left-padded extensions `[rows, width]`: row j's new tokens count on from
    `starts[j]`; padding columns get negative positions."""
    starts_t, lengths_t = torch.tensor(starts, device=device), torch.tensor(lengths, device=device)
    return starts_t[:, None] + torch.arange(width, device=device)[None, :] - (width - lengths_t)[:, None]


def extend_mask(positions: torch.Tensor, span: int) -> torch.Tensor:
    """The 4-D mask of an extension: each new token attends to its slot up to its own position. A padding
    column attends to position 0 only (its output is unused; a fully masked row would give NaN)."""
    keys = torch.arange(span, device=positions.device)
    mask = keys[None, None, :] <= positions[:, :, None]
    mask[:, :, 0] = True
    return mask[:, None]
