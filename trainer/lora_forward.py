"""LoRA projections whose adapter term is added inside the matmul that makes it.

PEFT computes a LoRA projection as `result = base(x)`, then `lora_B(lora_A(x)) * scaling` as a
tensor of its own, and adds the two: besides the matmuls, three passes over the output (write
the adapter's product, scale it, add it), one more in backward (scale the gradient), and for
4-bit layers a defensive copy of `base(x)` first (two passes). The outputs are the widest
tensors of a decoder layer (14,336 columns for Llama-3.1-8B's MLP), so on 8B QLoRA this is
about 300 GB of memory traffic per step at sequence 2048, batch 4.

`fused_lora_forward` computes the same sum as one GEMM that accumulates into `base(x)`:
`result.addmm_(x @ A.T, B.T, alpha=scaling)`. Autograd's backward for it scales only the
narrow (rank-wide) gradients. Figures: README, Performance.
"""
import types

import torch
import torch.nn.functional as F


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
    if len(layer.lora_A) != 1 or layer.lora_variant or getattr(layer, "fan_in_fan_out", False):
        return False
    (name,) = layer.lora_A.keys()
    return (isinstance(layer.lora_dropout[name], torch.nn.Identity) and layer.lora_B[name].bias is None
            and name not in getattr(layer, "lora_magnitude_vector", {}))


def fuse_lora_adds(model) -> int:
    """Give every LoRA projection `can_fuse` accepts the fused forward; returns how many changed."""
    layers = [module for module in model.modules() if can_fuse(module)]
    for layer in layers:
        layer.forward = types.MethodType(fused_lora_forward, layer)
    return len(layers)
