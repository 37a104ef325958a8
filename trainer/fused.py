"""ftlab's own fusions of what PEFT and transformers compute in several passes over big tensors.

**LoRA projections.** PEFT computes one as `result = base(x)`, then `lora_B(lora_A(x)) * scaling`
as a tensor of its own, and adds the two: besides the matmuls, three passes over the output
(write the adapter's product, scale it, add it), one more in backward (scale the gradient), and
for 4-bit layers a defensive copy of `base(x)` first (two passes). The outputs are the widest
tensors of a decoder layer (14,336 columns for Llama-3.1-8B's MLP), so on 8B QLoRA this is about
300 GB of memory traffic per step at sequence 2048, batch 4. `fused_lora_forward` computes the
same sum as one GEMM that accumulates into `base(x)`: `result.addmm_(x @ A.T, B.T, alpha=scaling)`;
autograd's backward for it scales only the narrow (rank-wide) gradients.

**RMSNorm.** transformers' Llama/Mistral/Qwen norm casts to fp32, squares, averages, adds,
takes rsqrt, multiplies, casts back and multiplies by the weight: eight kernels forward, more
backward, and fp32 copies of the hidden states kept for backward (~190 MB per norm at 8B's
hidden size and 8,192 tokens). `fused_rms_norm_forward` calls torch's `rms_norm`, one fused
kernel each way on CUDA that keeps only the input and one number per token; on a CPU it is the
same formula. Figures: README, Performance.
"""
import types

import torch
import torch.nn.functional as F

# transformers' norms that compute `weight * (x / rms(x))`, as torch's rms_norm does (Gemma's `(1 + weight)` does not)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fused_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`base(x) + scaling * x @ A.T @ B.T` for one vanilla LoRA adapter, the adapter term added by the GEMM.

    Anything else PEFT supports (merged or disabled adapters, several active adapters, per-row
    adapter names) goes to PEFT's own forward.
    """
    (name,) = layer.lora_A.keys()
    if args or kwargs or layer.disable_adapters or layer.merged or list(layer.active_adapters) != [name]:
        return type(layer).forward(layer, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])  # 2-D, so the base's output is a fresh matrix, never a view
    result = layer.base_layer(flat)
    dtype = result.dtype  # under autocast the base already computed in the compute dtype
    down = F.linear(flat.to(dtype), layer.lora_A[name].weight.to(dtype))
    result.addmm_(down, layer.lora_B[name].weight.to(dtype).t(), alpha=layer.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


def can_fuse(layer) -> bool:
    """Whether `layer` is a LoRA projection `fused_lora_forward` computes exactly: a linear base (plain or
    bitsandbytes 4-bit), one adapter, no dropout, no DoRA or other variant, no bias on the adapter."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer) or not isinstance(layer.get_base_layer(), torch.nn.Linear):
        return False
    if len(layer.lora_A) != 1 or layer.lora_variant or getattr(layer, "fan_in_fan_out", False):  # DoRA is a variant
        return False
    (name,) = layer.lora_A.keys()
    return isinstance(layer.lora_dropout[name], torch.nn.Identity) and layer.lora_B[name].bias is None


def fuse_lora_adds(model) -> int:
    """Give every LoRA projection `can_fuse` accepts the fused forward; returns how many changed."""
    layers = [module for module in model.modules() if can_fuse(module)]
    for layer in layers:
        layer.forward = types.MethodType(fused_lora_forward, layer)
    return len(layers)


def fused_rms_norm_forward(norm, hidden_states: torch.Tensor) -> torch.Tensor:
    """`norm(hidden_states)` through torch's `rms_norm` (in fp32 inside, rounded once), in the input's dtype."""
    if hidden_states.dtype != norm.weight.dtype:  # an fp32 residual stream under bf16 weights: HF's mixed formula
        return type(norm).forward(norm, hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):  # CUDA's autocast would run it in fp32
        return F.rms_norm(hidden_states, norm.weight.shape, norm.weight, norm.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Give every RMSNorm of a class in RMS_NORM_CLASSES the fused forward; returns how many changed."""
    norms = [module for module in model.modules() if type(module).__name__ in RMS_NORM_CLASSES]
    for norm in norms:
        norm.forward = types.MethodType(fused_rms_norm_forward, norm)
    return len(norms)
