"""Resolve the hosted API's `auto` hyperparameters to the values a job actually uses, and refuse
bad ones (and a bad model-name suffix) before any verb loads anything."""
import math
import re

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


SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


class SettingsError(ValueError):
    """A job setting that can never work; `code` is the hosted API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_job_settings(cfg) -> None:
    """Refuse a bad `suffix` or hyperparameter at the start of a verb, before files or models are read."""
    from trainer.cost import resolve_n_epochs

    suffix = cfg.get("suffix")
    if suffix is not None and not SUFFIX.fullmatch(str(suffix)):
        raise SettingsError("invalid_suffix", f"suffix={suffix!r} is not valid: up to 64 letters, digits, '-', '_' "
                                              "or '.' (it becomes part of the model name ft:<model>:<org>:<suffix>:<id>)")
    try:
        resolve_n_epochs(cfg.train.n_epochs, 1)
        resolve_batch_size(cfg.train.batch_size, 1)
        resolve_learning_rate_multiplier(cfg.train.learning_rate_multiplier)
    except ValueError as error:
        raise SettingsError("invalid_hyperparameter", str(error)) from None
