"""Rows of different adapters in one forward: a grouped LoRA product of ftlab's own.

PEFT serves a mixed batch through `adapter_names`: at every forward it registers a hook on each
LoRA layer, and in each layer copies every adapter's rows out, runs the adapter and adds its
product back. Measured on the embedded SmolLM2, 16 rows, 2 CPU cores, that made a decoding step
~55% slower than the same batch with a single adapter. Here the engine states once per forward
which rows use which adapter (`AdapterPlan`), and each LoRA projection adds each adapter's term
into the base projection's output, as ftlab's fused training path does: `result[rows].addmm_(x[rows]
@ A.T, B.T, alpha=scaling)` where an adapter's rows are contiguous (the usual case: a request's
choices, a batch of one adapter), an indexed add where they are not. Rows of no adapter get the
base projection alone.

PEFT still loads, holds and unloads the adapters (`PeftModel.load_adapter`, `delete_adapter`);
outside the engine's forwards (`plan.groups is None`) every layer runs the forward it had before
(PEFT's own, or a training job's fused one: reinforcement fine-tuning samples from the policy it trains).
"""
import types
from typing import Optional, Union

import torch
import torch.nn.functional as F

Rows = Union[slice, torch.Tensor]  # rows of the flattened [tokens, features] input


class UnsupportedAdapter(ValueError):
    """An adapter the engine cannot serve exactly (DoRA or another variant, a bias, a non-linear base)."""


class AdapterPlan:
    """Which flattened input rows of the next forward use which adapter (by PEFT name); shared by every layer."""

    def __init__(self):
        self.groups: Optional[list[tuple[str, Rows]]] = None  # None: PEFT's own forward


def grouped_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The base projection of every row, plus each planned adapter's LoRA term on its own rows."""
    groups = layer.ftlab_plan.groups
    if groups is None or args or kwargs:  # outside the engine: the forward the layer had (PEFT's, or training's)
        return layer.ftlab_outer_forward(x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    result = layer.base_layer(flat)
    for name, rows in groups:
        if name not in layer.lora_A:  # this adapter leaves this projection alone
            continue
        down_weight, up_weight = _weights(layer, name, result.dtype)
        scaling = layer.scaling[name]
        if isinstance(rows, slice):
            result[rows].addmm_(F.linear(flat[rows].to(result.dtype), down_weight), up_weight.t(), alpha=scaling)
        else:
            term = F.linear(F.linear(flat.index_select(0, rows).to(result.dtype), down_weight), up_weight)
            result.index_add_(0, rows, term, alpha=scaling)
    return result.view(*x.shape[:-1], result.shape[-1])


def _weights(layer, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A and B in the compute dtype, cast once and kept while the weights stay as they are (an adapter
    being trained in fp32 under a bf16 backbone changes only at its optimizer's steps: their version counters)."""
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    if down.dtype == dtype and up.dtype == dtype:
        return down, up
    key = (name, dtype, down._version, up._version, down.data_ptr(), up.data_ptr())
    cached = layer.__dict__.setdefault("ftlab_cast", {})
    if cached.get(name, (None,))[0] != key:
        cached[name] = (key, down.detach().to(dtype), up.detach().to(dtype))
    return cached[name][1], cached[name][2]


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def check_supported(model, adapter_name: str) -> None:
    """Refuse an adapter whose layers `grouped_lora_forward` would not compute exactly."""
    for layer in _lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        if not isinstance(layer.get_base_layer(), torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
            raise UnsupportedAdapter("the adapter adapts a layer that is not a linear projection")
        if layer.lora_variant.get(adapter_name) is not None:
            raise UnsupportedAdapter("the adapter uses a LoRA variant (DoRA or another); serve plain LoRA adapters")
        if layer.lora_B[adapter_name].bias is not None:
            raise UnsupportedAdapter("the adapter has a bias (lora_bias); serve adapters without one")


def install(model, plan: AdapterPlan) -> int:
    """Give every LoRA projection of `model` the grouped forward, reading `plan`; returns how many (idempotent)."""
    layers = _lora_layers(model)
    for layer in layers:
        if getattr(layer, "ftlab_plan", None) is None:  # keep what it ran before (a training job's fused forward)
            previous = layer.__dict__.get("forward")
            layer.ftlab_outer_forward = previous or types.MethodType(type(layer).forward, layer)
        layer.ftlab_plan = plan
        layer.forward = types.MethodType(grouped_lora_forward, layer)
    return len(layers)


def rows_of(indices: list[int], tokens_per_row: int, device) -> Rows:
    """The flattened input rows of batch rows `indices` (a slice when they are contiguous)."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0] * tokens_per_row, (indices[-1] + 1) * tokens_per_row)
    index = torch.tensor(indices, device=device)
    if tokens_per_row > 1:
        index = (index[:, None] * tokens_per_row + torch.arange(tokens_per_row, device=device)[None]).reshape(-1)
    return index
