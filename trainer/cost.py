"""Pricing: what the hosted service would bill, and what a local run costs.

Each example is billed at most `model.context_length` tokens (longer ones are truncated), and
billed tokens = Σ min(context_length, tokens_i) × n_epochs, with the examples' tokens counted
as the hosted service counts them (`trainer.data.tokens`). Validation tokens are not billed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from trainer.data.tokens import count_example_tokens, file_format, get_encoding
from trainer.flops import GPU_PEAK_FLOPS, flops_per_token
from trainer.hyperparams import resolve_n_epochs


# Local throughput model (used when pricing.local_tokens_per_second is null): LoRA on a
# frozen base costs ~4·N FLOPs per token (forward 2N + backward through activations 2N;
# no weight gradients for the base), so tokens/s = peak FLOP/s × MFU / (4·N).
# cpu: ~2e11 fp32 FLOP/s per core (AVX-512 FMA at ~3 GHz) at 35% MFU predicts ~260 tokens/s for
#   SmolLM2-135M LoRA on 2 cores in fp32; measured 273 (json_output sample, 20 steps).
# cpu-bf16: a CPU that computes bf16 natively (AVX512-BF16, AMX), where training runs in bf16:
#   3.5e11 FLOP/s per core (trainer.flops measured 7.1e11 on 2 AMD EPYC cores) at 30% MFU predicts
#   ~390 tokens/s for SmolLM2-135M on 2 cores. Measured: the default job 380 with its validation
#   passes (490 without), the tools sample 538, the bench's 20 steps 615.
# cuda: A100 bf16 dense peak at 30% MFU.
DEVICE_FLOPS = {
    "cpu": {"peak_flops": 2.0e11, "per_core": True, "mfu": 0.35},
    "cpu-bf16": {"peak_flops": 3.5e11, "per_core": True, "mfu": 0.30},
    "cuda": {"peak_flops": GPU_PEAK_FLOPS["A100"], "per_core": False, "mfu": 0.30},
}


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


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo without torch."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def throughput_row(cfg, device: str) -> str:
    """The DEVICE_FLOPS row a job of `cfg` trains at: bf16 on a CPU that computes it (as train.precision=auto picks)."""
    precision = str(getattr(cfg.train.precision, "value", cfg.train.precision))
    if device == "cpu" and precision in ("auto", "bf16") and cpu_computes_bf16():
        return "cpu-bf16"
    return device


def local_tokens_per_second(n_params: float, device: str, cores: Optional[int] = None) -> float:
    """Training throughput predicted from backbone size: peak FLOP/s × MFU / (4 · n_params)."""
    row = DEVICE_FLOPS[device]
    peak = row["peak_flops"] * ((cores or os.cpu_count() or 1) if row["per_core"] else 1)
    return peak * row["mfu"] / flops_per_token(max(float(n_params), 1.0))


def estimate_local(cfg, trained_tokens: int) -> dict:
    """Wall time and cost of training `trained_tokens` on this machine."""
    device = local_device(cfg.train.device)
    n_params = float(cfg.backbone.n_params or 0)
    configured = cfg.pricing.get("local_tokens_per_second") if hasattr(cfg.pricing, "get") else None
    if configured:
        tokens_per_second, source = float(configured), "pricing.local_tokens_per_second"
    elif n_params > 0:
        row = throughput_row(cfg, device)
        tokens_per_second = local_tokens_per_second(n_params, row)
        source = f"model: peak FLOP/s × MFU / (4·n_params), LoRA on a frozen base ({row})"
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
        "training_price_per_1k": None if row.training is None else float(row.training),
        "training_cost_usd": None if row.training is None else billed_tokens / 1000 * float(row.training),
        "fine_tuned_input_per_1k": float(row.input),
        "fine_tuned_output_per_1k": float(row.output),
        "base_input_per_1k": None if row.base_input is None else float(row.base_input),
        "base_output_per_1k": None if row.base_output is None else float(row.base_output),
    }
    if validation_token_counts is not None:
        counts = list(validation_token_counts)
        estimate["validation_examples"] = len(counts)
        estimate["validation_tokens"] = sum(min(context_length, t) for t in counts)  # not billed
    if file_format(cfg).value == "reinforcement":
        estimate |= rollout_estimate(cfg, n_examples, total_tokens, n_epochs)
    else:
        estimate["local"] = estimate_local(cfg, billed_tokens)
    per_hour = row.get("training_per_hour") if hasattr(row, "get") else None
    if per_hour:  # billed by the hour (reinforcement fine-tuning): the hosted rate over this machine's time
        estimate["training_price_per_hour"] = float(per_hour)
        wall = estimate["local"].get("wall_time_s")
        estimate["training_cost_usd"] = None if wall is None else wall / 3600 * float(per_hour)
        estimate["training_cost_basis"] = ("approximate: the hosted price per hour of training times this machine's "
                                           "estimated time (OpenAI bills the hours its own hardware takes, and the "
                                           "grader models' tokens besides)")
    return estimate


def rollout_estimate(cfg, n_examples: int, prompt_tokens: int, n_epochs: int) -> dict:
    """A reinforcement job's work: every prompt sampled G times a epoch, each reply up to max_new_tokens, each
    sample decoded once and trained on once (so timed as twice its tokens). Approximate: replies end early."""
    from trainer.methods.reinforcement import REASONING_EFFORTS, resolve_settings

    settings = cfg.method.reinforcement
    resolved = resolve_settings(settings.compute_multiplier, settings.eval_interval, settings.eval_samples,
                                settings.reasoning_effort, settings.group_size, cfg.train.eval_every)
    samples = n_examples * n_epochs * resolved["samples_per_prompt"]
    reply = round(int(settings.max_new_tokens) * REASONING_EFFORTS[resolved["reasoning_effort"]])
    sampled_tokens = samples * reply + prompt_tokens * n_epochs * resolved["samples_per_prompt"]
    return {"samples": samples, "samples_per_prompt": resolved["samples_per_prompt"],
            "max_reply_tokens": reply, "sampled_tokens_max": sampled_tokens,
            "local": estimate_local(cfg, 2 * sampled_tokens) | {"note": "approximate: replies may end early"}}


def estimate_job(cfg, examples: list, *, n_epochs: Optional[int] = None) -> dict:
    """The estimate.json content for a list of training examples (dicts)."""
    encoding = get_encoding(cfg.model.encoding)
    fmt = file_format(cfg)
    counts = [count_example_tokens(example, fmt, encoding) for example in examples]
    return estimate_from_token_counts(cfg, counts, n_epochs=n_epochs)
