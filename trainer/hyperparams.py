"""Resolve the hosted API's `auto` hyperparameters to the values a job actually uses."""
import math

MAX_AUTO_BATCH_SIZE = 256
MIN_AUTO_BATCH_SIZE = 4


def _positive(value, key: str, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0 or (kind is int and float(value) != number):
        raise ValueError(f"{key}={value!r} is not valid: use auto or a positive {kind.__name__}")
    return number


def resolve_batch_size(requested, n_examples: int) -> int:
    """`auto`: ~0.2% of the training examples, at least 4 and at most 256; else a positive int."""
    if requested == "auto":
        return max(MIN_AUTO_BATCH_SIZE, min(MAX_AUTO_BATCH_SIZE, math.ceil(n_examples * 0.002)))
    return _positive(requested, "train.batch_size", int)


def resolve_learning_rate_multiplier(requested) -> float:
    """`auto`: 1.0 (the base learning rate as tuned for LoRA); else a positive float."""
    if requested == "auto":
        return 1.0
    return _positive(requested, "train.learning_rate_multiplier", float)


def resolve_hyperparameters(train_cfg, n_examples: int, n_epochs: int) -> dict:
    """The job's resolved hyperparameters, as recorded in job.json (`n_epochs` as the estimate resolved it)."""
    multiplier = resolve_learning_rate_multiplier(train_cfg.learning_rate_multiplier)
    return {
        "n_epochs": n_epochs,
        "batch_size": resolve_batch_size(train_cfg.batch_size, n_examples),
        "learning_rate_multiplier": multiplier,
        "learning_rate": train_cfg.base_learning_rate * multiplier,
    }
