"""Supervised fine-tuning: cross-entropy on the trained assistant replies (or completions), normalised by the
number of supervised tokens; the accuracy is the share of those tokens predicted right."""
from pathlib import Path

import torch

from trainer.data.cache import tokenize_file
from trainer.data.tokenize import IGNORE_INDEX, batches_for_epoch
from trainer.loss import supervised_forward
from trainer.methods import Batching


class SupervisedObjective:
    """The hosted API's method.type=supervised."""

    results_columns: tuple[str, ...] = ()
    results_file = None

    def __init__(self, base_learning_rate: float):
        self.base_learning_rate = float(base_learning_rate)
        self.hyperparameters: dict = {}

    def tokenize(self, path: Path, tokenizer, chat: bool, max_length: int, cache_dir):
        return tokenize_file(path, tokenizer, chat, max_length, cache_dir)

    def prepare(self, model, datasets: list, batching: Batching, model_key: str, device: str = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 8) -> None:
        """Nothing to compute before training."""

    def batches(self, dataset, batch_size: int, epoch: int, batching: Batching):
        return batches_for_epoch(dataset, batch_size, batching.seed, epoch, batching.pad_token_id,
                                 packing=batching.packing, shard=batching.shard, row_length=batching.row_length)

    def split(self, batch: dict, micro: int | None):
        """The batch in pieces of `micro` rows (examples, or packed rows) for gradient accumulation."""
        rows = batch["input_ids"].size(0)
        for start in range(0, rows, micro or rows):
            yield {key: value[start : start + (micro or rows)] for key, value in batch.items()}

    def count(self, batch: dict) -> int:
        """Supervised tokens (the loss is their mean)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        loss_sum, _, correct = supervised_forward(model, batch)
        return loss_sum, {"loss": loss_sum.item(), "correct": correct}

    def metrics(self, totals: dict, split: str) -> dict:
        """train_loss / train_accuracy, or valid_loss / valid_mean_token_accuracy (results.csv's names)."""
        n = max(totals["count"], 1)
        accuracy = "train_accuracy" if split == "train" else "valid_mean_token_accuracy"
        return {f"{split}_loss": round(totals["loss"] / n, 6), accuracy: round(totals["correct"] / n, 6)}

    @torch.no_grad()
    def evaluate(self, model, dataset, batch_size: int, batching: Batching, device: str, dtype: torch.dtype) -> dict:
        """Summed loss, supervised tokens and correct predictions over this rank's share of `dataset`."""
        from trainer.loss import validation_loss

        loss, count, correct = validation_loss(model, dataset, batch_size, batching.pad_token_id, device, dtype,
                                               shard=batching.shard)
        return {"count": count, "loss": loss, "correct": correct}
