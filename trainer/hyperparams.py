"""Resolve the hosted API's `auto` hyperparameters to the values a job actually uses, and refuse
bad ones (and a bad model-name suffix) before any verb loads anything."""
import math
import re

MAX_AUTO_BATCH_SIZE = 256
MIN_AUTO_BATCH_SIZE = 4
# the hosted auto-epochs rule: 3 epochs, kept between 100 and 25,000 example-passes
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
# What the hosted API takes for a supervised job (its client types): the API refuses anything else.
MAX_EPOCHS = 50
MAX_BATCH_SIZE = 256
MAX_LEARNING_RATE_MULTIPLIER = 10.0  # the hosted API says only "> 0"; 10x the tuned rate already diverges
AUTO_BETA = 0.1  # DPO's beta at auto: the paper's and TRL's default
MAX_BETA = 2.0  # the hosted API takes beta in (0, 2]


def _positive(value, key: str, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not math.isfinite(number) or number <= 0 or (kind is int and float(value) != number):
        raise ValueError(f"{key}={value!r} is not valid: use auto or a positive, finite {kind.__name__}")
    return number


def resolve_n_epochs(requested, n_examples: int) -> int:
    """`train.n_epochs` as the hosted service resolves it: an int as given, `auto` by the rule.

    auto: 3 epochs, but at least 100 and at most 25,000 example-passes, i.e.
    n·3 < 100 → min(25, 100 // n); n·3 > 25,000 → max(1, 25,000 // n).
    """
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        n_epochs = TARGET_EPOCHS
        if n_examples <= 0:
            return n_epochs
        if n_epochs * n_examples < MIN_TARGET_EXAMPLES:
            n_epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
        elif n_epochs * n_examples > MAX_TARGET_EXAMPLES:
            n_epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
        return n_epochs
    try:
        if isinstance(requested, bool):
            raise ValueError
        value = float(requested)
        if not value.is_integer():
            raise ValueError
        n_epochs = int(value)
    except (TypeError, ValueError):
        n_epochs = None
    if n_epochs is None or not 1 <= n_epochs <= MAX_EPOCHS:
        raise ValueError(
            f"train.n_epochs={requested!r} is not valid — use `auto` or a whole number from 1 to {MAX_EPOCHS} "
            f"(e.g. train.n_epochs=3)"
        )
    return n_epochs


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


def resolve_beta(requested) -> float:
    """DPO's `method.dpo.beta`: `auto` is 0.1; else a number in (0, 2], as the hosted API takes."""
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        return AUTO_BETA
    try:
        beta = None if isinstance(requested, bool) else float(requested)
    except (TypeError, ValueError):
        beta = None
    if beta is None or not math.isfinite(beta) or not 0 < beta <= MAX_BETA:
        raise ValueError(f"method.dpo.beta={requested!r} is not valid — use `auto` (0.1) or a number above 0 and at "
                         f"most {MAX_BETA:g} (e.g. method.dpo.beta=0.1)")
    return beta


def resolve_hyperparameters(train_cfg, n_examples: int, n_epochs: int, base_learning_rate: float | None = None,
                            method_hyperparameters: dict | None = None) -> dict:
    """The job's resolved hyperparameters, as recorded in job.json (`n_epochs` as the estimate resolved it); the
    learning rate is the method's `base_learning_rate` (SFT's: train.base_learning_rate) times the multiplier,
    and the method's own (DPO's beta) come after."""
    multiplier = resolve_learning_rate_multiplier(train_cfg.learning_rate_multiplier)
    base = train_cfg.base_learning_rate if base_learning_rate is None else base_learning_rate
    return {
        "n_epochs": n_epochs,
        "batch_size": resolve_batch_size(train_cfg.batch_size, n_examples),
        "learning_rate_multiplier": multiplier,
        "learning_rate": base * multiplier,
    } | (method_hyperparameters or {})


SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


class SettingsError(ValueError):
    """A job setting that can never work; `code` is the hosted API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _value(setting):
    """An enum setting's value (the config holds enums, a plain dict holds strings)."""
    return getattr(setting, "value", setting)


def check_job_settings(cfg, request=None) -> None:
    """Refuse a bad `suffix` or hyperparameter at the start of a verb, before files or models are read.

    `request`: the job's request record (`trainer.request.JobRequest`) when the server is creating it; a job the
    server runs reads its record from `cfg.request`."""
    suffix = cfg.get("suffix")
    if suffix is not None and not SUFFIX.fullmatch(str(suffix)):
        raise SettingsError("invalid_suffix", f"suffix={suffix!r} is not valid: up to 64 letters, digits, '-', '_' "
                                              "or '.' (it becomes part of the model name ft:<model>:<org>:<suffix>:<id>)")
    method = cfg.get("method")
    if method is not None and _value(method.data_format) in ("preference", "reinforcement") \
            and _value(cfg.model.format) != "chat":
        raise SettingsError("invalid_method", f"method={_value(method.type)} trains chat families, and "
                            f"model={cfg.model.name} takes prompt/completion examples: choose a chat family "
                            "(e.g. model=gpt-4.1-mini-2025-04-14)")
    try:
        resolve_n_epochs(cfg.train.n_epochs, 1)
        resolve_batch_size(cfg.train.batch_size, 1)
        resolve_learning_rate_multiplier(cfg.train.learning_rate_multiplier)
        if "method" in cfg:
            resolve_beta(cfg.method.dpo.beta)
    except ValueError as error:
        raise SettingsError("invalid_hyperparameter", str(error)) from None
    if method is not None and _value(method.type) == "reinforcement":
        check_reinforcement(cfg, request)


def check_reinforcement(cfg, request=None) -> None:
    """method=reinforcement: a validation file (the hosted rule), hyperparameters that resolve, a grader that validates
    (the request's, validated when the server created the job, else the configured one)."""
    from trainer.graders import Settings
    from trainer.methods import MethodError
    from trainer.methods.reinforcement import read_grader, resolve_settings
    from trainer.request import read_request

    if not cfg.data.get("validation_file"):
        raise SettingsError("invalid_validation_file", "method=reinforcement needs a validation file, as the hosted "
                            "API does: set data.validation_file=<prompts.jsonl> (its prompts are scored as it trains)")
    settings = cfg.method.reinforcement
    try:
        resolve_settings(settings.compute_multiplier, settings.eval_interval, settings.eval_samples,
                         settings.reasoning_effort, settings.group_size, cfg.train.eval_every)
        request = request or (read_request(cfg.request) if cfg.get("request") else None)
        if request is not None and request.grader is not None:
            return
        grader = settings.grader or cfg.data.get("grader")
        if not grader:
            raise MethodError("invalid_grader", "method=reinforcement needs a grader: method.reinforcement.grader="
                                                "<grader.json> (the hosted API's grader object, as JSON)")
        read_grader(grader, Settings.from_config(cfg.graders))
    except MethodError as error:
        raise SettingsError(error.code, str(error)) from None
