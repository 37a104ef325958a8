"""Fine-tuning methods as components of the one training recipe (`trainer.train.FineTuningJob`).

A method is built from `conf/method/<name>.yaml`'s `objective` node with `hydra.utils.instantiate`
and gives the recipe everything that differs between methods; the loop, the optimizer, the
checkpoints and the record stay one. An objective has:

    base_learning_rate       the learning rate at learning_rate_multiplier 1
    hyperparameters          its own resolved hyperparameters, recorded with the job's ({"beta": 0.1})
    results_columns          metrics it reports besides results.csv's hosted ones, kept in `results_file`
    tokenize(path, tokenizer, chat, max_length, cache_dir) -> (dataset, cached)
    prepare(model, datasets, batching, model_key)   once, after the model loads and before training
    batches(dataset, batch_size, epoch, batching)   an epoch's batches
    count(batch) -> int      what a batch's loss is normalised by (supervised tokens, pairs), on this rank
    forward(model, batch) -> (summed loss, {statistic: sum})
    metrics(totals, split) -> the row's metrics from statistics summed over a step or the validation file
    evaluate(model, dataset, batch_size, batching, device, dtype) -> totals over the validation file

`supervised` (SFT), `dpo` (preference pairs) and `reinforcement` (GRPO on a grader's rewards) are the methods.
An objective may also have `eval_interval` (steps between evaluations, instead of train.eval_every) and `events`
(set by the job to its event log). Building one raises `MethodError` for a setting it cannot use.
"""
from dataclasses import dataclass
from typing import Optional

import torch


class MethodError(ValueError):
    """A method setting that cannot work (a grader that does not validate, a bad hyperparameter); `code` is the
    hosted API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Batching:
    """How a job lays its data out in batches, whatever the method."""

    seed: int
    pad_token_id: int
    packing: bool = False
    row_length: Optional[int] = None
    shard: tuple[int, int] = (0, 1)  # (rank, world size)


def autocast(device: str, dtype: torch.dtype):
    """The context every forward of a job runs in: autocast in the job's compute dtype (off in fp32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
