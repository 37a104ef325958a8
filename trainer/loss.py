"""The training loss: summed cross-entropy over the supervised tokens, and how many were predicted right.

The LM head runs only where the next token is supervised (prompt logits are never computed), and
where it can, in chunks of rows fused with the cross-entropy, so the logits are never whole in
memory: on Llama-3.1-8B (128,256-token vocabulary) a batch of 4 × 2048 would otherwise hold
~1.5 GB of bf16 logits, their fp32 copy and the softmax gradient at once.
"""
import torch
import torch.nn.functional as F

from trainer.attention import PACKED_ROWS, example_spans
from trainer.data.tokenize import IGNORE_INDEX, TokenizedDataset, batches_for_epoch, model_inputs

LOGITS_PER_CHUNK = 2**26  # fp32 logits held at once by the fused head: 256 MiB


def head_chunks(hidden, weight, bias, targets, rows_per_chunk: int, grad_hidden: torch.Tensor | None):
    """Yield (rows, targets, fp32 logits, log-normaliser) of `hidden @ weight.T`, chunk by chunk; once the caller
    has read a chunk, its cross-entropy's gradient with respect to `hidden` is written into `grad_hidden` (if given)."""
    for start in range(0, hidden.size(0), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chosen = targets[rows]
        logits = F.linear(hidden[rows].to(weight.dtype), weight, bias).float()
        log_normaliser = torch.logsumexp(logits, dim=-1)
        yield rows, chosen, logits, log_normaliser
        if grad_hidden is not None:
            probabilities = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, in place of the logits
            probabilities[torch.arange(chosen.numel(), device=chosen.device), chosen] -= 1
            grad_hidden[rows] = (probabilities.to(weight.dtype) @ weight).to(hidden.dtype)


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy and correct count of `hidden @ weight.T` against `targets`, chunk by chunk.

    The gradient with respect to `hidden` is computed in the forward pass, chunk by chunk, and kept
    (it is as small as `hidden`); the backward pass only scales it. The head's weight is frozen.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk):
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for _, chosen, logits, log_normaliser in head_chunks(hidden, weight, bias, targets, rows_per_chunk, grad_hidden):
            loss_sum += (log_normaliser - logits.gather(1, chosen[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(-1) == chosen).sum()
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


def token_loss_and_accuracy(outputs: torch.Tensor, targets: torch.Tensor,
                            head: torch.nn.Linear | None = None) -> tuple[torch.Tensor, int, int]:
    """Summed loss, number of supervised targets and number predicted right.

    `outputs` are logits, or the hidden states the `head` turns into logits (fused, in chunks).
    `targets` is aligned with `outputs` (already shifted); -100 marks positions not trained.
    Only supervised positions are gathered (and upcast to fp32).
    """
    mask = targets != IGNORE_INDEX
    picked = outputs[mask]
    chosen = targets[mask]
    if head is None:
        picked = picked.float()
        loss_sum = F.cross_entropy(picked, chosen, reduction="sum")
        correct = (picked.argmax(-1) == chosen).sum()
    else:
        rows = max(1, LOGITS_PER_CHUNK // head.out_features)
        loss_sum, correct = ChunkedHeadCrossEntropy.apply(picked, head.weight, head.bias, chosen, rows)
    return loss_sum, int(chosen.numel()), int(correct.item())


def fusable_head(model) -> torch.nn.Linear | None:
    """The model's LM head when the loss may apply it itself: a frozen plain Linear whose output is
    the logits (no soft-capping or scaling after it), outside FSDP (which owns the head's storage)."""
    if type(model).__name__ == "FullyShardedDataParallel":
        return None
    model = getattr(model, "module", model)  # DistributedDataParallel
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if type(head) is not torch.nn.Linear or head.weight.requires_grad:
        return None
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "output_multiplier")):
        return None
    return head


def supervised_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Linear | None]:
    """Forward the batch with the LM head applied only where the next token is supervised.

    The vocabulary projection is a fifth of a small model's compute; skipping it on prompt
    tokens (and never materialising their logits) is the cheapest speed-up there is. Where the
    head can be fused with the loss, the model hands back hidden states and the loss applies
    the head in chunks. Returns (logits or hidden states, their targets, the kept positions, the
    head to apply or None); outputs and targets are (rows, kept positions, ...).
    """
    labels = batch["labels"]
    positions = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    targets = labels[:, positions + 1]
    inputs = model_inputs(batch) | {"logits_to_keep": positions}
    owner = getattr(model, "module", model)  # DistributedDataParallel
    attention = getattr(getattr(owner, "config", None), "_attn_implementation", None)
    if "position_ids" in batch and attention == PACKED_ROWS:  # packed rows on a CPU (trainer/attention.py)
        inputs["example_spans"] = example_spans(batch["position_ids"])
    head = fusable_head(model)
    if head is None:
        return model(**inputs).logits, targets, positions, None
    owner.set_output_embeddings(torch.nn.Identity())  # for this forward, "logits" are the final hidden states
    try:
        hidden = model(**inputs).logits
    finally:
        owner.set_output_embeddings(head)
    return hidden, targets, positions, head


def supervised_forward(model, batch: dict) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy, supervised targets and correct predictions of the batch (see `supervised_outputs`)."""
    outputs, targets, _, head = supervised_outputs(model, batch)
    return token_loss_and_accuracy(outputs, targets, head=head)


class ChunkedHeadTokenLogProbs(torch.autograd.Function):
    """Log-probability of each target under `hidden @ weight.T`, chunk by chunk, as `ChunkedHeadCrossEntropy`
    computes the summed loss: each token's gradient is made in the forward pass, and the backward pass scales it
    by that token's incoming gradient (negated: a log-probability is minus a cross-entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk):
        log_probs = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for rows, chosen, logits, log_normaliser in head_chunks(hidden, weight, bias, targets, rows_per_chunk,
                                                                grad_hidden):
            log_probs[rows] = logits.gather(1, chosen[:, None]).squeeze(1) - log_normaliser
        ctx.save_for_backward(grad_hidden)
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * -grad_log_probs[:, None].to(grad_hidden.dtype), None, None, None, None


def token_log_probs(outputs: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear | None = None) -> torch.Tensor:
    """The log-probability (fp32) of every supervised target, in the order of `targets[targets != -100]`.

    `outputs` are logits, or the hidden states the `head` turns into logits (fused, in chunks)."""
    mask = targets != IGNORE_INDEX
    picked, chosen = outputs[mask], targets[mask]
    if head is None:
        return torch.log_softmax(picked.float(), dim=-1).gather(1, chosen[:, None]).squeeze(1)
    rows = max(1, LOGITS_PER_CHUNK // head.out_features)
    return ChunkedHeadTokenLogProbs.apply(picked, head.weight, head.bias, chosen, rows)


@torch.no_grad()
def validation_loss(model, dataset: TokenizedDataset, batch_size: int, pad_token_id: int, device: str,
                    dtype: torch.dtype = torch.float32, shard: tuple[int, int] = (0, 1)) -> tuple[float, int, int]:
    """Summed loss, supervised targets and correct predictions over `dataset` (this rank's `shard`).

    What the training loop reports as valid_loss and `ftlab eval` as the validation loss: one
    function, so the two always agree. The caller chooses eval mode; autocast runs in `dtype`.
    """
    loss_total, supervised, correct = 0.0, 0, 0
    for batch in batches_for_epoch(dataset, batch_size, 0, 0, pad_token_id, shard=shard):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, n, c = supervised_forward(model, batch)
        loss_total, supervised, correct = loss_total + loss_sum.item(), supervised + n, correct + c
    return loss_total, supervised, correct
