"""Attention over packed rows on a CPU.

A packed row holds several examples end to end, kept apart by a block-diagonal causal mask
(`trainer.data.tokenize.pack`). PyTorch's CPU SDPA kernels are slow at this: with a mask, or
on short sequences, each call costs milliseconds of fixed overhead. Measured fwd+bwd on this
machine (9 heads of 64, bf16): rows of 128 tokens 5.5 ms with SDPA, 1.7 ms as plain matmuls;
one 1440-token row holding 4 examples 80 ms with SDPA and its mask, ~30 ms as 4 causal calls.

So a short row (up to `SHORT_ROW` tokens) is computed as plain bf16 matmuls around an fp32
softmax, the mask applied as is; a longer row one example at a time (where `position_ids`
restart at 0), each a causal SDPA call that needs no mask. Both give what SDPA with the block
mask gives. Padded batches and generation go to transformers' SDPA unchanged.
"""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ROWS = "ftlab_packed_rows"
SHORT_ROW = 512  # the scores of a short row are held in memory for backward: heads × row² × 6 bytes per layer


def example_spans(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in packed rows: the runs where `position_ids` count up from 0.
    A row's right padding counts up from 0 too, so it is a span of its own, as in the block mask."""
    spans = []
    for row, positions in enumerate(position_ids.tolist()):
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
        spans += [(row, start, end) for start, end in zip(starts, starts[1:])]
    return spans


def masked_matmul_attention(module, query, key, value, mask: torch.Tensor, scaling: float):
    """softmax(q kᵀ · scaling, where `mask`) v in the inputs' dtype, the softmax in fp32; output (batch, seq, heads, dim)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling).masked_fill_(~mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous()


def packed_rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          example_spans: list[tuple[int, int, int]] | None = None, **kwargs):
    """transformers' attention interface for packed rows (`example_spans` given, `attention_mask` their
    4D boolean block mask); anything else goes to transformers' SDPA."""
    packed = example_spans is not None and attention_mask is not None and attention_mask.dtype == torch.bool
    if not packed or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[2] <= SHORT_ROW:
        return masked_matmul_attention(module, query, key, value, attention_mask, scaling), None
    rows = []
    for row in range(query.shape[0]):
        rows.append(torch.cat([
            sdpa_attention_forward(module, query[row : row + 1, :, start:end], key[row : row + 1, :, start:end],
                                   value[row : row + 1, :, start:end], None, scaling=scaling, is_causal=True)[0]
            for span_row, start, end in example_spans if span_row == row], dim=1))
    return torch.cat(rows, dim=0), None


AttentionInterface.register(PACKED_ROWS, packed_rows_attention)
AttentionMaskInterface.register(PACKED_ROWS, sdpa_mask)
